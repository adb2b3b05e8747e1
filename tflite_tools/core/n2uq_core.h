/* n2uq_core: kernels for N2UQ-quantized layers (bit-serial, dot-product, lookup), independent of TFLite.
 *
 * Plain C ABI: every function returns N2UQ_OK (0) or a negative status and, on
 * error, writes a NUL-terminated message into `err` (capacity `err_len`, may be 0).
 * Every size, stride, padding and bit width is validated, and every buffer comes
 * with its length in elements, so malformed arguments are reported, never read
 * out of bounds.
 *
 * Data layout ("packed"): a tensor of codes [..., C] becomes, per position, `bits`
 * bit planes of ceil(C / 64) uint64 words each: words[pos][plane][word], channel c
 * in bit (c % 64) of word c / 64 of each plane; bits above C are zero.
 * Activations are NHWC (pos = n, y, x); conv weights are [OC][KH][KW] x IC.
 *
 * Integer semantics: activation code m in 0..2^a_bits-1, weight code k in
 * 0..2^w_bits-1 (n_w = 2^w_bits - 1). Each output is
 *     acc = 2 * sum(m * k) - n_w * sum(m)      (exact int32 over the receptive field)
 *     out = multiplier[oc] * acc + bias[oc]    (float32, no fused multiply-add)
 * Zero padding contributes m = 0.
 *
 * Conv and fully connected layers have several paths, all bit-exact (the integer is exact
 * and the affine map is the same float32 multiply, then add):
 *   bitserial  AND + popcount over bit planes (S_mk = sum_ij 2^(i+j) popcount(m_i & k_j));
 *   dot        integer dot products on byte codes: acc = sum m * w' with int8 weights
 *              w' = 2k - n_w (AVX-512 VNNI, AVX-VNNI, AVX2 VPMADDUBSW, NEON SDOT, scalar);
 *   amx        the dot path's products on AMX tiles (TDPBUSD), direct for any conv and in its
 *              3x3 Winograd forms (Intel CPUs with AMX-INT8, Linux, after a one-time
 *              self-check; see n2uq_amx_status);
 *   lut        table lookups: per input pixel and 7 channels, the 128 subset sums of their
 *              codes, indexed by the bit planes of 7 weights (AVX-512 VBMI VPERMI2B).
 * N2UQ_PATH_AUTO takes N2UQ_KERNEL_PATH from the environment when set, else times the
 * paths this CPU can run on the layer's shape once (cached per shape and thread count) and
 * keeps the fastest. A conv plan (n2uq_conv_plan_create) unpacks and regroups the weights
 * once into the chosen path's layout, so repeated calls pay only for the arithmetic.
 */
#ifndef N2UQ_CORE_H_
#define N2UQ_CORE_H_

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define N2UQ_CORE_ABI_VERSION 10

enum {
  N2UQ_OK = 0,
  N2UQ_ERR_ARGUMENT = -1,    /* a size, stride, padding, bit width or pointer is invalid */
  N2UQ_ERR_BUFFER = -2,      /* a buffer is shorter than its shape requires */
  N2UQ_ERR_UNSUPPORTED = -3, /* e.g. an ISA this CPU lacks, or 8-bit codes */
  N2UQ_ERR_INTERNAL = -4     /* out of memory or another unexpected failure */
};

/* Instruction-set paths. N2UQ_ISA_AUTO picks N2UQ_KERNEL_ISA from the environment
 * (portable|avx2|avx512|neon) when set, else the fastest the CPU supports. */
enum {
  N2UQ_ISA_AUTO = 0,
  N2UQ_ISA_PORTABLE = 1,
  N2UQ_ISA_AVX2 = 2,
  N2UQ_ISA_AVX512 = 3,
  N2UQ_ISA_NEON = 4
};

/* Conv / fully-connected paths (see above). N2UQ_PATH_AUTO picks N2UQ_KERNEL_PATH from the
 * environment (auto|bitserial|dot|lut|amx) when set, else the fastest measured on the shape. */
enum {
  N2UQ_PATH_AUTO = 0,
  N2UQ_PATH_BITSERIAL = 1,
  N2UQ_PATH_DOT = 2,
  N2UQ_PATH_LUT = 3,
  N2UQ_PATH_AMX = 4
};
#define N2UQ_NUM_PATHS 5

#define N2UQ_MAX_BITS 4
#define N2UQ_MAX_THREADS 256

typedef struct N2uqConvShape {
  int32_t batch, in_height, in_width, in_channels;
  int32_t out_channels; /* depthwise: in_channels * depth_multiplier */
  int32_t kernel_height, kernel_width;
  int32_t stride_height, stride_width;
  int32_t dilation_height, dilation_width;
  int32_t pad_top, pad_bottom, pad_left, pad_right;
  int32_t act_bits, weight_bits;
} N2uqConvShape;

int n2uq_core_abi_version(void);
/* 1 if this build and CPU can run `isa`, else 0. */
int n2uq_isa_supported(int isa);
/* The concrete ISA that `isa` resolves to (N2UQ_ISA_AUTO -> env or best), or a negative status. */
int n2uq_resolve_isa(int isa, char* err, size_t err_len);
const char* n2uq_isa_name(int isa);
const char* n2uq_path_name(int path);
/* 1 if this build and CPU can run conv path `path` (not AUTO) under the concrete `isa`, else 0. */
int n2uq_path_supported(int isa, int path);
/* The CPU features the kernels look at (CPUID + XCR0 on x86-64, HWCAP on aarch64), as a
 * space-separated list of names, e.g. "popcnt avx2 avx_vnni avx512f ... avx512vnni". The
 * environment variable N2UQ_CPU_DISABLE (comma-separated names, read once) hides features,
 * for testing the fallback kernels. */
const char* n2uq_cpu_features(void);
/* Whether the amx path is offered and why (not): "available: ...", "unavailable: <reason>"
 * (no AMX, no tile permission, or its self-check against the AVX-512 dot path failed), or
 * "emulated: ..." when the test hook N2UQ_AMX_EMULATE=1 (read once) runs the same AMX code on a
 * software model of the tile instructions on any CPU with AVX-512 VNNI. */
const char* n2uq_amx_status(void);

/* Packs codes[num_positions][channels] (each < 2^bits) into
 * out[num_positions][bits][ceil(channels / 64)]. */
int n2uq_pack_bitplanes(const uint8_t* codes, int64_t codes_len, int64_t num_positions, int32_t channels,
                        int32_t bits, uint64_t* out, int64_t out_len, char* err, size_t err_len);

/* code = #{i : x * beta1 > thresholds[i]} (float32 product, strict >), as
 * n2uq_tf.ops.activation_levels; num_thresholds must be 2^bits - 1. */
int n2uq_quantize_codes(const float* x, int64_t count, const float* thresholds, int32_t num_thresholds,
                        float beta1, int32_t bits, uint8_t* out, int64_t out_len, int isa, int num_threads,
                        char* err, size_t err_len);

/* Fused quantize + pack: x[num_positions][channels] -> packed words as n2uq_pack_bitplanes. */
int n2uq_quantize_and_pack(const float* x, int64_t x_len, int64_t num_positions, int32_t channels,
                           const float* thresholds, int32_t num_thresholds, float beta1, int32_t bits,
                           uint64_t* out, int64_t out_len, int isa, int num_threads, char* err, size_t err_len);

/* Output height and width of a conv or depthwise conv with this shape (validates it). */
int n2uq_conv2d_output_size(const N2uqConvShape* shape, int32_t* out_height, int32_t* out_width, char* err,
                            size_t err_len);

/* Conv2d. input: packed [N][H][W] x in_channels at act_bits; weights: packed
 * [OC][KH][KW] x in_channels at weight_bits; multiplier, bias: [OC]. out_float and/or
 * out_int32 (either may be NULL, not both): [N][OH][OW][OC]. One call = plan create, run,
 * destroy (use a plan when the same weights run more than once). */
int n2uq_conv2d(const N2uqConvShape* shape, const uint64_t* input, int64_t input_len, const uint64_t* weights,
                int64_t weights_len, const float* multiplier, const float* bias, int64_t channels_len,
                float* out_float, int32_t* out_int32, int64_t out_len, int isa, int path, int num_threads,
                char* err, size_t err_len);

/* n2uq_conv2d with path = N2UQ_PATH_AUTO (the name predates the other paths). */
int n2uq_conv2d_bitserial(const N2uqConvShape* shape, const uint64_t* input, int64_t input_len,
                          const uint64_t* weights, int64_t weights_len, const float* multiplier,
                          const float* bias, int64_t channels_len, float* out_float, int32_t* out_int32,
                          int64_t out_len, int isa, int num_threads, char* err, size_t err_len);

/* A conv (or fully connected) layer prepared once: the shape's filter, the path and ISA,
 * and the weights in that path's layout. `shape` includes batch and input size: AUTO path
 * selection times the candidates on it (and n2uq_conv_plan_run accepts any batch and
 * input size with the same filter). `num_threads` is the thread count selection times at.
 * Where AUTO's runner-up came close to the winner, the plan keeps both for a trial: its first
 * runs try both in blocks of 6 runs (winner, runner-up, winner, runner-up; the first run of each
 * block untimed), and the faster per pixel stays, the other's weights are freed. Every path gives the same outputs, so only the timing and
 * the plan's info / form can change (a run the runner-up fails other than on the caller's
 * arguments is run again by the winner, which keeps the plan); N2UQ_PLAN_TRIAL=0 in the
 * environment turns trials off. A plan
 * may run on several threads at once, during its trial too. */
typedef struct N2uqConvPlan N2uqConvPlan;
int n2uq_conv_plan_create(const N2uqConvShape* shape, const uint64_t* weights, int64_t weights_len, int isa,
                          int path, int num_threads, N2uqConvPlan** plan, char* err, size_t err_len);
int n2uq_conv_plan_run(const N2uqConvPlan* plan, const N2uqConvShape* shape, const uint64_t* input,
                       int64_t input_len, const float* multiplier, const float* bias, int64_t channels_len,
                       float* out_float, int32_t* out_int32, int64_t out_len, int num_threads, char* err,
                       size_t err_len);
/* The plan's concrete ISA and path (either pointer may be NULL): during a trial, the winner's. */
int n2uq_conv_plan_info(const N2uqConvPlan* plan, int* isa, int* path);
/* 1 while the plan's trial is open, 0 when it has none or it closed, N2UQ_ERR_ARGUMENT for NULL. */
int n2uq_conv_plan_on_trial(const N2uqConvPlan* plan);
/* Runs of a plan that a trial spans at most (both sides, untimed runs included): a caller timing
   steady calls warms each plan up with at least this many. */
int n2uq_plan_trial_runs(void);
/* The plan's form (dot and amx paths; the others have only the direct one), or N2UQ_ERR_ARGUMENT
   for a NULL plan. N2UQ_FORM_DIRECT_COMPACT: the amx path's direct form keeping its weights as
   1-, 2- or 4-bit codes (3-bit weights take 4) that each run expands while the tiles work, where the
   plan's timing found that faster than streaming the int8 weights (large layers). */
enum { N2UQ_FORM_DIRECT = 0, N2UQ_FORM_WINOGRAD = 1, N2UQ_FORM_WINOGRAD_STRIDE2 = 2, N2UQ_FORM_DIRECT_COMPACT = 3 };
int n2uq_conv_plan_form(const N2uqConvPlan* plan);
void n2uq_conv_plan_destroy(N2uqConvPlan* plan);

/* The conv shape of a fully connected layer: a 1x1 conv over a 1 x batch image. */
int n2uq_fully_connected_shape(int32_t batch, int32_t in_features, int32_t out_features, int32_t act_bits,
                               int32_t weight_bits, N2uqConvShape* shape, char* err, size_t err_len);

/* Fully connected: input packed [batch] x in_features, weights packed [out_features] x in_features
 * (path AUTO; a plan on n2uq_fully_connected_shape runs any path). */
int n2uq_fully_connected(int32_t batch, int32_t in_features, int32_t out_features, int32_t act_bits,
                         int32_t weight_bits, const uint64_t* input, int64_t input_len, const uint64_t* weights,
                         int64_t weights_len, const float* multiplier, const float* bias, int64_t channels_len,
                         float* out_float, int32_t* out_int32, int64_t out_len, int isa, int num_threads,
                         char* err, size_t err_len);

/* Depthwise conv on unpacked codes. input: uint8 codes [N][H][W][C]; weights: uint8 codes
 * [KH][KW][C * M] (TF's [KH][KW][C][M] flattened; output channel c * M + j sees input
 * channel c), shape->out_channels = C * M. Output as n2uq_conv2d_bitserial. */
int n2uq_depthwise_conv2d(const N2uqConvShape* shape, const uint8_t* input, int64_t input_len,
                          const uint8_t* weights, int64_t weights_len, const float* multiplier, const float* bias,
                          int64_t channels_len, float* out_float, int32_t* out_int32, int64_t out_len, int isa,
                          int num_threads, char* err, size_t err_len);

/* Output stage: what a fused layer op (N2UQConv2DFused, ...) does with its layer's float output
 * y = multiplier * acc + bias before the next quantizer, in one pass over [positions][channels]:
 * steps applied in order, each exactly the float32 operation of the TFLite builtin it replaces
 * (so the result is bit-identical to running those builtins one after the other; no fused
 * multiply-add), then optionally the float tensor written, then more steps, then optionally the
 * next layer's quantize-and-pack (or quantize to byte codes), as n2uq_quantize_and_pack. */
enum {
  N2UQ_STEP_ADD = 1,         /* y + v[c]            (ADD of a per-channel constant) */
  N2UQ_STEP_MUL = 2,         /* y * v[c]            (MUL) */
  N2UQ_STEP_PRELU = 3,       /* y >= 0 ? y : y * v[c]  (PRELU) */
  N2UQ_STEP_ADD_TENSOR = 4,  /* y + r[p][c]         (ADD of a tensor of the output's shape: a residual) */
  N2UQ_STEP_RELU = 5,        /* y < 0 ? 0 : y */
  N2UQ_STEP_RELU6 = 6,       /* y < 0 ? 0 : y > 6 ? 6 : y */
  N2UQ_STEP_RELU_N1_TO_1 = 7 /* y < -1 ? -1 : y > 1 ? 1 : y */
};
#define N2UQ_STEP_KINDS 8 /* step kinds are 1 .. N2UQ_STEP_KINDS - 1 */
#define N2UQ_MAX_OUTPUT_STEPS 16

enum { N2UQ_QUANTIZE_NONE = 0, N2UQ_QUANTIZE_PACK = 1, N2UQ_QUANTIZE_CODES = 2 };

typedef struct N2uqOutputStep {
  int32_t kind;         /* N2UQ_STEP_* */
  const float* values;  /* ADD / MUL / PRELU: [channels]; ADD_TENSOR: [num_positions][channels]; else NULL */
  int64_t values_len;   /* elements */
} N2uqOutputStep;

typedef struct N2uqOutputStage {
  int32_t num_steps;                             /* 0 .. N2UQ_MAX_OUTPUT_STEPS */
  N2uqOutputStep steps[N2UQ_MAX_OUTPUT_STEPS];
  int32_t float_after;  /* the float output holds y after this many steps; -1: no float output */
  int32_t quantize;     /* N2UQ_QUANTIZE_*: of y after every step */
  int32_t bits;         /* quantize: code bits, 2^bits - 1 thresholds, beta1 (as n2uq_quantize_and_pack) */
  const float* thresholds;
  int32_t num_thresholds;
  float beta1;
} N2uqOutputStage;

/* Runs `stage` over values[num_positions][channels] (a layer's float output). Writes out_float
 * [num_positions][channels] when stage->float_after >= 0 (it may be `values` itself: each chunk is
 * read before it is written), and out_packed [num_positions][bits][ceil(channels / 64)] (quantize
 * PACK) or out_codes [num_positions][channels] (CODES); the other output pointers may be NULL. */
int n2uq_output_stage(const N2uqOutputStage* stage, int64_t num_positions, int32_t channels, const float* values,
                      int64_t values_len, float* out_float, int64_t out_float_len, uint64_t* out_packed,
                      int64_t out_packed_len, uint8_t* out_codes, int64_t out_codes_len, int isa, int num_threads,
                      char* err, size_t err_len);

/* A conv plan's run followed by an output stage (the fused layer ops): the same outputs as
 * n2uq_conv_plan_run's float output run through n2uq_output_stage (bit for bit), without the
 * float output in between where the plan applies the stage in its own output pass (the amx path's
 * direct form, for stages without a residual: n2uq_conv_plan_stage_fused); otherwise the two run
 * in turn (the conv's float output then in out_float, where the stage writes one, and the stage
 * in place over it). multiplier and bias are required; stage, out_float, out_packed and out_codes
 * as for n2uq_output_stage over the conv's [N * OH * OW][OC] output. No step's values (a
 * residual included) and no thresholds may overlap out_float. */
int n2uq_conv_plan_run_stage(const N2uqConvPlan* plan, const N2uqConvShape* shape, const uint64_t* input,
                             int64_t input_len, const float* multiplier, const float* bias, int64_t channels_len,
                             const N2uqOutputStage* stage, float* out_float, int64_t out_float_len,
                             uint64_t* out_packed, int64_t out_packed_len, uint8_t* out_codes, int64_t out_codes_len,
                             int num_threads, char* err, size_t err_len);
/* 1 when the plan applies an output stage without a residual in its own output pass, 0 when it
 * runs it afterwards, N2UQ_ERR_ARGUMENT for a NULL plan. */
int n2uq_conv_plan_stage_fused(const N2uqConvPlan* plan);

/* A conv plan's run on a float input it quantizes itself: n2uq_quantize_and_pack of x (with the
 * shape's act_bits, its thresholds and beta1) followed by n2uq_conv_plan_run (stage NULL: the
 * float output into out_float, out_float_len elements; out_packed and out_codes unused) or
 * n2uq_conv_plan_run_stage, with the same outputs bit for bit. Where the plan's path allows
 * (n2uq_conv_plan_quantizes_inline) and packed is NULL, the quantizing runs inside the conv,
 * between its GEMMs' steps, where about half of its time hides behind theirs. packed: NULL, or
 * packed_len words that receive the input's codes whole (the conv then quantizes first). */
typedef struct N2uqInputQuantizer {
  const float* x;          /* [batch][in_height][in_width][in_channels] */
  int64_t x_len;
  const float* thresholds; /* 2^act_bits - 1 */
  int32_t num_thresholds;
  float beta1;
} N2uqInputQuantizer;
int n2uq_conv_plan_run_quantizing(const N2uqConvPlan* plan, const N2uqConvShape* shape,
                                  const N2uqInputQuantizer* quantizer, uint64_t* packed, int64_t packed_len,
                                  const float* multiplier, const float* bias, int64_t channels_len,
                                  const N2uqOutputStage* stage, float* out_float, int64_t out_float_len,
                                  uint64_t* out_packed, int64_t out_packed_len, uint8_t* out_codes,
                                  int64_t out_codes_len, int num_threads, char* err, size_t err_len);
/* 1 when n2uq_conv_plan_run_quantizing with this shape (the plan's filter), num_threads and no
 * packed buffer quantizes inside the conv (the stride-2 Winograd form of the AVX-512 dot path,
 * even output height and width, in_channels a multiple of 64; N2UQ_QUANTIZE_INLINE=0 turns it
 * off), 0 when it quantizes first, N2UQ_ERR_ARGUMENT for a NULL plan or shape. A plan still on
 * trial (n2uq_conv_plan_on_trial) may answer for either candidate. */
int n2uq_conv_plan_quantizes_inline(const N2uqConvPlan* plan, const N2uqConvShape* shape, int num_threads);

/* Max pooling (the layer of the N2UQMaxPool2DFused op: a PAD of zeros + MAX_POOL_2D 'valid'):
 * input float32 [batch][in_height][in_width][channels] -> output [batch][OH][OW][channels],
 * OH = (in_height + pad_top + pad_bottom - filter_height) / stride_height + 1 (OW likewise); each
 * output the max of its filter_height x filter_width window, a position in the padding counting
 * as 0.0f (the zeros the PAD wrote). */
typedef struct N2uqPoolShape {
  int32_t batch, in_height, in_width, channels;
  int32_t filter_height, filter_width, stride_height, stride_width;
  int32_t pad_top, pad_bottom, pad_left, pad_right;
} N2uqPoolShape;

int n2uq_max_pool2d_output_size(const N2uqPoolShape* shape, int32_t* out_height, int32_t* out_width, char* err,
                                size_t err_len);
int n2uq_max_pool2d(const N2uqPoolShape* shape, const float* input, int64_t input_len, float* output,
                    int64_t output_len, int isa, int num_threads, char* err, size_t err_len);
/* The same over int8 input padded with zero_point (-128..127), each max dequantized:
   output = float(max - zero_point) * scale (scale > 0, finite), as TFLite's int8 PAD, MAX_POOL_2D
   and DEQUANTIZE compute it. */
int n2uq_max_pool2d_int8(const N2uqPoolShape* shape, const int8_t* input, int64_t input_len, int32_t zero_point,
                         float scale, float* output, int64_t output_len, int isa, int num_threads, char* err,
                         size_t err_len);

/* Int8 convolution with TFLite's int8 CONV_2D arithmetic: input and output int8 with zero points,
 * a symmetric int8 filter [OC][KH][KW][IC] with per-channel (or one) scales, int32 bias (or NULL)
 * on the scale input_scale * filter_scale. Per output:
 *     acc = bias[oc] + sum (x - input_zero_point) * w       (padding contributes x = zero point)
 *     out = clamp(rne(float(acc) * s[oc]), output_min - zp, output_max - zp) + zp,
 *     s[oc] = input_scale * filter_scale[oc] / output_scale  (float32, in this order)
 * which is XNNPACK's requantization (TFLite's default CPU kernels), so results match the
 * interpreter's byte for byte. For convs over few input channels (an image stem), where TFLite's
 * kernels are slow; paths: amx (AMX tiles), dot (AVX-512 VNNI; portable C under other ISAs).
 * The shape's act_bits and weight_bits are ignored. A plan accepts any batch and input size with
 * its filter. */
typedef struct N2uqInt8ConvParams {
  float input_scale;
  int32_t input_zero_point;
  float output_scale;
  int32_t output_zero_point;
  int32_t output_min, output_max; /* the fused activation's range, quantized: -128 <= min <= max <= 127 */
} N2uqInt8ConvParams;
typedef struct N2uqInt8ConvPlan N2uqInt8ConvPlan;
int n2uq_int8_conv_plan_create(const N2uqConvShape* shape, const int8_t* filter, int64_t filter_len,
                               const int32_t* bias, int64_t bias_len, const float* filter_scales, int64_t scales_len,
                               const N2uqInt8ConvParams* params, int isa, int path, N2uqInt8ConvPlan** plan,
                               char* err, size_t err_len);
int n2uq_int8_conv_plan_run(const N2uqInt8ConvPlan* plan, const N2uqConvShape* shape, const int8_t* input,
                            int64_t input_len, int8_t* output, int64_t output_len, int num_threads, char* err,
                            size_t err_len);
int n2uq_int8_conv_plan_info(const N2uqInt8ConvPlan* plan, int* isa, int* path);
void n2uq_int8_conv_plan_destroy(N2uqInt8ConvPlan* plan);
/* Float convolution over few input channels (TFLite's float CONV_2D, for an image stem, where
 * TFLite's kernels run far below the core's rate): filter float [OC][KH][KW][IC], bias [OC] or
 * NULL, output clamped to [output_min, output_max] (the fused activation's range; +-INFINITY for
 * none). Each output is bias + its products summed in float32, in this kernel's order (fused
 * multiply-adds on the avx512 ISA), so results equal TFLite's up to float rounding. ISAs: avx512,
 * portable (others run the portable code). The shape's act_bits and weight_bits are ignored; a
 * plan accepts any batch, input size and padding with its filter and dilation_width. */
typedef struct N2uqFloatConvPlan N2uqFloatConvPlan;
int n2uq_float_conv_plan_create(const N2uqConvShape* shape, const float* filter, int64_t filter_len, const float* bias,
                                int64_t bias_len, float output_min, float output_max, int isa,
                                N2uqFloatConvPlan** plan, char* err, size_t err_len);
int n2uq_float_conv_plan_run(const N2uqFloatConvPlan* plan, const N2uqConvShape* shape, const float* input,
                             int64_t input_len, float* output, int64_t output_len, int num_threads, char* err,
                             size_t err_len);
int n2uq_float_conv_plan_info(const N2uqFloatConvPlan* plan, int* isa);
void n2uq_float_conv_plan_destroy(N2uqFloatConvPlan* plan);
#ifdef __cplusplus
}
#endif

#endif /* N2UQ_CORE_H_ */
