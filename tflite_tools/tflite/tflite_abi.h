/* tflite_abi.h: the few TFLite C ABI declarations the n2uq delegate needs.
 *
 * Written from the documented memory layout (x86-64 / aarch64 LP64, see docs/design.md section 3;
 * TF 2.21 and LiteRT 2.3), not copied from TFLite headers: the Python wheels ship no
 * headers, and this file keeps the plugin free of any TFLite build dependency. Only the
 * fields we touch are named; everything is checked by static_asserts below and by the
 * live ABI self-test in tests/test_delegate.py. Names carry an N2uq prefix so an app
 * that also includes the real TFLite headers sees no clashes; the structs are
 * layout-compatible, so pointers can be cast between the two.
 */
#ifndef N2UQ_TFLITE_ABI_H_
#define N2UQ_TFLITE_ABI_H_

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef enum {
  kN2uqTfLiteOk = 0,
  kN2uqTfLiteError = 1,
  kN2uqTfLiteDelegateError = 2
} N2uqTfLiteStatus;

/* TfLiteType values used by the ops. */
typedef enum {
  kN2uqTfLiteNoType = 0,
  kN2uqTfLiteFloat32 = 1,
  kN2uqTfLiteInt32 = 2,
  kN2uqTfLiteUInt8 = 3,
  kN2uqTfLiteInt64 = 4,
  kN2uqTfLiteInt8 = 9
} N2uqTfLiteType;

/* TfLiteAllocationType values: constant tensors are memory-mapped or persistent read-only. */
enum { kN2uqTfLiteMmapRo = 1, kN2uqTfLitePersistentRo = 5 };

enum { kN2uqTfLiteBuiltinConv2d = 3, kN2uqTfLiteBuiltinCustom = 32, kN2uqTfLiteBuiltinPad = 34 };
enum { kN2uqTfLiteDelegateFlagsAllowDynamicTensors = 1 };

typedef struct N2uqTfLiteIntArray {
  int size;
  int data[]; /* flexible array member: allocate sizeof(int) * (1 + size) with malloc */
} N2uqTfLiteIntArray;

typedef struct N2uqTfLiteTensor {
  int type;                    /* 0   N2uqTfLiteType */
  void* data;                  /* 8   union of typed pointers */
  N2uqTfLiteIntArray* dims;    /* 16 */
  struct { float scale; int32_t zero_point; } params; /* 24 */
  int allocation_type;         /* 32 */
  size_t bytes;                /* 40 */
  const void* allocation;      /* 48 */
  const char* name;            /* 56 */
  void* delegate;              /* 64 */
  int buffer_handle;           /* 72 */
  bool data_is_stale;          /* 76 */
  bool is_variable;            /* 77 */
  struct { int type; void* params; } quantization; /* 80 */
  void* sparsity;              /* 96 */
  const N2uqTfLiteIntArray* dims_signature; /* 104 */
} N2uqTfLiteTensor;

/* TfLiteQuantization.type of affine (scale, zero point) quantization; its params point to this. */
enum { kN2uqTfLiteAffineQuantization = 1 };
typedef struct N2uqTfLiteFloatArray {
  int size;
  float data[];
} N2uqTfLiteFloatArray;
typedef struct N2uqTfLiteAffineQuantization {
  N2uqTfLiteFloatArray* scale;     /* 0 */
  N2uqTfLiteIntArray* zero_point;  /* 8 */
  int32_t quantized_dimension;     /* 16 */
} N2uqTfLiteAffineQuantization;

/* The builtin CONV_2D's options (node->builtin_data): the leading fields every TFLite version has
 * (later ones append fields we do not read). TfLitePadding: 1 same, 2 valid. TfLiteFusedActivation:
 * 0 none, 1 relu, 2 relu_n1_to_1, 3 relu6 (others are not claimed). */
enum { kN2uqTfLitePaddingSame = 1, kN2uqTfLitePaddingValid = 2 };
enum { kN2uqTfLiteActNone = 0, kN2uqTfLiteActRelu = 1, kN2uqTfLiteActReluN1To1 = 2, kN2uqTfLiteActRelu6 = 3 };
typedef struct N2uqTfLiteConvParams {
  int padding;                 /* 0 */
  int stride_width;            /* 4 */
  int stride_height;           /* 8 */
  int activation;              /* 12 */
  int dilation_width_factor;   /* 16 */
  int dilation_height_factor;  /* 20 */
} N2uqTfLiteConvParams;

struct N2uqTfLiteDelegate;

typedef struct N2uqTfLiteNode {
  N2uqTfLiteIntArray* inputs;        /* 0 */
  N2uqTfLiteIntArray* outputs;       /* 8 */
  N2uqTfLiteIntArray* intermediates; /* 16 */
  N2uqTfLiteIntArray* temporaries;   /* 24 */
  void* user_data;                   /* 32 */
  void* builtin_data;                /* 40 */
  const void* custom_initial_data;   /* 48 */
  int custom_initial_data_size;      /* 56 */
  struct N2uqTfLiteDelegate* delegate; /* 64 */
  bool might_have_side_effect;       /* 72 */
} N2uqTfLiteNode;

struct N2uqTfLiteContext;

typedef struct N2uqTfLiteRegistration {
  void* (*init)(struct N2uqTfLiteContext* context, const char* buffer, size_t length); /* 0 */
  void (*free)(struct N2uqTfLiteContext* context, void* buffer);                      /* 8 */
  int (*prepare)(struct N2uqTfLiteContext* context, N2uqTfLiteNode* node);             /* 16 */
  int (*invoke)(struct N2uqTfLiteContext* context, N2uqTfLiteNode* node);              /* 24 */
  const char* (*profiling_string)(const struct N2uqTfLiteContext* context, const N2uqTfLiteNode* node); /* 32 */
  int32_t builtin_code;            /* 40 */
  const char* custom_name;         /* 48 */
  int version;                     /* 56 */
  void* registration_external;     /* 64: must stay NULL */
  void* async_kernel;              /* 72 */
  uint64_t inplace_operator;       /* 80 */
} N2uqTfLiteRegistration;

/* Prefix of TfLiteContext up to the last member we use; we only ever hold pointers to
 * the interpreter's context, never an array of them, so the tail need not be declared. */
typedef struct N2uqTfLiteContext {
  size_t tensors_size;                                                                   /* 0 */
  int (*GetExecutionPlan)(struct N2uqTfLiteContext* context, N2uqTfLiteIntArray** execution_plan); /* 8 */
  N2uqTfLiteTensor* tensors;                                                             /* 16 */
  void* impl_;                                                                           /* 24 */
  int (*ResizeTensor)(struct N2uqTfLiteContext* context, N2uqTfLiteTensor* tensor, N2uqTfLiteIntArray* new_size); /* 32 */
  void (*ReportError)(struct N2uqTfLiteContext* context, const char* format, ...);      /* 40 */
  int (*AddTensors)(struct N2uqTfLiteContext* context, int tensors_to_add, int* first_new_tensor_index); /* 48 */
  int (*GetNodeAndRegistration)(struct N2uqTfLiteContext* context, int node_index, N2uqTfLiteNode** node,
                                N2uqTfLiteRegistration** registration);                  /* 56 */
  int (*ReplaceNodeSubsetsWithDelegateKernels)(struct N2uqTfLiteContext* context,
                                               N2uqTfLiteRegistration registration,
                                               const N2uqTfLiteIntArray* nodes_to_replace,
                                               struct N2uqTfLiteDelegate* delegate);     /* 64 */
  int recommended_num_threads;                                                           /* 72 */
} N2uqTfLiteContext;

typedef struct N2uqTfLiteDelegate {
  void* data_;                                                                              /* 0 */
  int (*Prepare)(N2uqTfLiteContext* context, struct N2uqTfLiteDelegate* delegate);          /* 8 */
  int (*CopyFromBufferHandle)(N2uqTfLiteContext*, struct N2uqTfLiteDelegate*, int, N2uqTfLiteTensor*); /* 16 */
  int (*CopyToBufferHandle)(N2uqTfLiteContext*, struct N2uqTfLiteDelegate*, int, N2uqTfLiteTensor*);   /* 24 */
  void (*FreeBufferHandle)(N2uqTfLiteContext*, struct N2uqTfLiteDelegate*, int*);           /* 32 */
  int64_t flags;                                                                            /* 40 */
  void* opaque_delegate_builder;                                                            /* 48: NULL */
} N2uqTfLiteDelegate;

/* What a delegate kernel's init receives as `buffer` (length 0). */
typedef struct N2uqTfLiteDelegateParams {
  N2uqTfLiteDelegate* delegate;
  N2uqTfLiteIntArray* nodes_to_replace;
  N2uqTfLiteIntArray* input_tensors;
  N2uqTfLiteIntArray* output_tensors;
} N2uqTfLiteDelegateParams;

#ifdef __cplusplus
}  /* extern "C" */

#define N2UQ_ABI_CHECK(type, member, offset) \
  static_assert(offsetof(type, member) == (offset), #type "." #member " must be at offset " #offset)
static_assert(sizeof(void*) == 8, "the layout below is for LP64 targets (x86-64, aarch64)");
static_assert(sizeof(N2uqTfLiteIntArray) == 4, "TfLiteIntArray header");
static_assert(sizeof(N2uqTfLiteTensor) == 112, "context->tensors strides by sizeof(TfLiteTensor)");
N2UQ_ABI_CHECK(N2uqTfLiteTensor, type, 0);
N2UQ_ABI_CHECK(N2uqTfLiteTensor, data, 8);
N2UQ_ABI_CHECK(N2uqTfLiteTensor, dims, 16);
N2UQ_ABI_CHECK(N2uqTfLiteTensor, params, 24);
N2UQ_ABI_CHECK(N2uqTfLiteTensor, allocation_type, 32);
N2UQ_ABI_CHECK(N2uqTfLiteTensor, bytes, 40);
N2UQ_ABI_CHECK(N2uqTfLiteTensor, allocation, 48);
N2UQ_ABI_CHECK(N2uqTfLiteTensor, name, 56);
N2UQ_ABI_CHECK(N2uqTfLiteTensor, delegate, 64);
N2UQ_ABI_CHECK(N2uqTfLiteTensor, buffer_handle, 72);
N2UQ_ABI_CHECK(N2uqTfLiteTensor, data_is_stale, 76);
N2UQ_ABI_CHECK(N2uqTfLiteTensor, is_variable, 77);
N2UQ_ABI_CHECK(N2uqTfLiteTensor, quantization, 80);
N2UQ_ABI_CHECK(N2uqTfLiteTensor, sparsity, 96);
N2UQ_ABI_CHECK(N2uqTfLiteTensor, dims_signature, 104);
N2UQ_ABI_CHECK(N2uqTfLiteAffineQuantization, scale, 0);
N2UQ_ABI_CHECK(N2uqTfLiteAffineQuantization, zero_point, 8);
N2UQ_ABI_CHECK(N2uqTfLiteAffineQuantization, quantized_dimension, 16);
static_assert(sizeof(N2uqTfLiteFloatArray) == 4, "TfLiteFloatArray header");
N2UQ_ABI_CHECK(N2uqTfLiteConvParams, padding, 0);
N2UQ_ABI_CHECK(N2uqTfLiteConvParams, stride_width, 4);
N2UQ_ABI_CHECK(N2uqTfLiteConvParams, stride_height, 8);
N2UQ_ABI_CHECK(N2uqTfLiteConvParams, activation, 12);
N2UQ_ABI_CHECK(N2uqTfLiteConvParams, dilation_width_factor, 16);
N2UQ_ABI_CHECK(N2uqTfLiteConvParams, dilation_height_factor, 20);
static_assert(sizeof(N2uqTfLiteRegistration) == 88, "registration is passed by value");
N2UQ_ABI_CHECK(N2uqTfLiteRegistration, init, 0);
N2UQ_ABI_CHECK(N2uqTfLiteRegistration, free, 8);
N2UQ_ABI_CHECK(N2uqTfLiteRegistration, prepare, 16);
N2UQ_ABI_CHECK(N2uqTfLiteRegistration, invoke, 24);
N2UQ_ABI_CHECK(N2uqTfLiteRegistration, profiling_string, 32);
N2UQ_ABI_CHECK(N2uqTfLiteRegistration, builtin_code, 40);
N2UQ_ABI_CHECK(N2uqTfLiteRegistration, custom_name, 48);
N2UQ_ABI_CHECK(N2uqTfLiteRegistration, version, 56);
N2UQ_ABI_CHECK(N2uqTfLiteRegistration, registration_external, 64);
N2UQ_ABI_CHECK(N2uqTfLiteRegistration, async_kernel, 72);
N2UQ_ABI_CHECK(N2uqTfLiteRegistration, inplace_operator, 80);
N2UQ_ABI_CHECK(N2uqTfLiteContext, tensors_size, 0);
N2UQ_ABI_CHECK(N2uqTfLiteContext, GetExecutionPlan, 8);
N2UQ_ABI_CHECK(N2uqTfLiteContext, tensors, 16);
N2UQ_ABI_CHECK(N2uqTfLiteContext, ResizeTensor, 32);
N2UQ_ABI_CHECK(N2uqTfLiteContext, ReportError, 40);
N2UQ_ABI_CHECK(N2uqTfLiteContext, GetNodeAndRegistration, 56);
N2UQ_ABI_CHECK(N2uqTfLiteContext, ReplaceNodeSubsetsWithDelegateKernels, 64);
N2UQ_ABI_CHECK(N2uqTfLiteContext, recommended_num_threads, 72);
N2UQ_ABI_CHECK(N2uqTfLiteNode, inputs, 0);
N2UQ_ABI_CHECK(N2uqTfLiteNode, outputs, 8);
N2UQ_ABI_CHECK(N2uqTfLiteNode, user_data, 32);
N2UQ_ABI_CHECK(N2uqTfLiteNode, builtin_data, 40);
N2UQ_ABI_CHECK(N2uqTfLiteNode, custom_initial_data, 48);
N2UQ_ABI_CHECK(N2uqTfLiteNode, custom_initial_data_size, 56);
N2UQ_ABI_CHECK(N2uqTfLiteNode, delegate, 64);
N2UQ_ABI_CHECK(N2uqTfLiteNode, might_have_side_effect, 72);
static_assert(sizeof(N2uqTfLiteDelegate) == 56, "TfLiteDelegate");
N2UQ_ABI_CHECK(N2uqTfLiteDelegate, data_, 0);
N2UQ_ABI_CHECK(N2uqTfLiteDelegate, Prepare, 8);
N2UQ_ABI_CHECK(N2uqTfLiteDelegate, CopyFromBufferHandle, 16);
N2UQ_ABI_CHECK(N2uqTfLiteDelegate, CopyToBufferHandle, 24);
N2UQ_ABI_CHECK(N2uqTfLiteDelegate, FreeBufferHandle, 32);
N2UQ_ABI_CHECK(N2uqTfLiteDelegate, flags, 40);
N2UQ_ABI_CHECK(N2uqTfLiteDelegate, opaque_delegate_builder, 48);
N2UQ_ABI_CHECK(N2uqTfLiteDelegateParams, nodes_to_replace, 8);
N2UQ_ABI_CHECK(N2uqTfLiteDelegateParams, input_tensors, 16);
N2UQ_ABI_CHECK(N2uqTfLiteDelegateParams, output_tensors, 24);
#undef N2UQ_ABI_CHECK
#endif /* __cplusplus */

#endif /* N2UQ_TFLITE_ABI_H_ */
