// delegate.cc: runs the N2UQ custom ops (n2uq_tf/export/custom_ops.py) in stock TFLite.
//
// Two entry points share one set of kernels:
//  * the external-delegate plugin ABI (tflite_plugin_create_delegate / _destroy_delegate):
//    the delegate's Prepare claims every CUSTOM node whose custom_name is an N2UQ op, one
//    ReplaceNodeSubsetsWithDelegateKernels call per node, so it works with any interpreter
//    that loads external delegates (tf.lite, ai_edge_litert, the C++ external delegate);
//  * n2uq_tflite_registration(name): a TfLiteRegistration for MutableOpResolver::AddCustom.
// Kernels validate every tensor and option against the op contract and report problems
// through context->ReportError; the arithmetic is the TFLite-independent core (n2uq_core.h).
// Only the self-written tflite_abi.h describes TFLite structures.
#include <float.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <atomic>
#include <chrono>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "flexbuffer_options.h"
#include "n2uq_core.h"
#include "tflite_abi.h"

#define N2UQ_EXPORT extern "C" __attribute__((visibility("default")))

namespace {

enum OpKind {
  kQuantizePack = 0, kQuantize, kConv2D, kDepthwise, kFullyConnected,
  // The layer ops with a fused output stage (custom_ops "Fused output stages"): the layer op's
  // inputs and options, then the stage's.
  kConv2DFused, kDepthwiseFused, kFullyConnectedFused,
  // A PAD of zeros + MAX_POOL_2D with the output stage after it (its layer input: the float tensor).
  kMaxPool2DFused, kNumOps
};
const char* const kOpNames[kNumOps] = {"N2UQQuantizePack", "N2UQQuantize", "N2UQConv2D", "N2UQDepthwiseConv2D",
                                       "N2UQFullyConnected", "N2UQConv2DFused", "N2UQDepthwiseConv2DFused",
                                       "N2UQFullyConnectedFused", "N2UQMaxPool2DFused"};
// Builtin CONV_2D nodes in int8 the delegate runs (DelegatePrepare, "int8 convolutions"): a kind
// past the custom ops, with no registration of its own.
// And the PAD feeding such a conv (ClaimPadBefore).
const int kInt8Conv2D = kNumOps, kFloatConv2D = kNumOps + 1, kBuiltinPad = kNumOps + 2;
const char* OpName(int kind) {
  return kind >= 0 && kind < kNumOps ? kOpNames[kind]
         : kind == kInt8Conv2D       ? "CONV_2D (int8)"
         : kind == kFloatConv2D      ? "CONV_2D (float)"
         : kind == kBuiltinPad       ? "PAD"
                                     : "N2UQ op";
}
bool IsBuiltinConv(int kind) { return kind == kInt8Conv2D || kind == kFloatConv2D; }
bool IsBuiltin(int kind) { return IsBuiltinConv(kind) || kind == kBuiltinPad; }
bool IsFused(int kind) {
  return kind == kConv2DFused || kind == kDepthwiseFused || kind == kFullyConnectedFused || kind == kMaxPool2DFused;
}
// Inputs of the layer before a fused op's stage inputs: the pool reads its input only; the
// weighted layers their input, weights, multiplier and bias.
size_t LayerInputs(int kind) { return kind == kMaxPool2DFused ? 1 : 4; }
// The layer op a fused op extends (itself for the others).
int BaseKind(int kind) {
  return kind == kConv2DFused ? kConv2D : kind == kDepthwiseFused ? kDepthwise
                                        : kind == kFullyConnectedFused ? kFullyConnected : kind;
}
const int kBuiltinDelegate = 51;  // BuiltinOperator_DELEGATE
const int64_t kMaxDim = int64_t(1) << 24;  // generous cap on channels/features so products cannot overflow
const int64_t kMaxKernel = 4096;

// An integer option, its range and the shape field it fills.
template <class Shape>
struct IntOption {
  const char* key;
  int64_t lo, hi;
  int32_t Shape::*field;
};
using ConvOption = IntOption<N2uqConvShape>;
// Conv / depthwise options and where they go. The pad_* options are there unless padding is
// 'same' (custom_ops: "Padding").
const ConvOption kConvOptions[] = {
    {"in_channels", 1, kMaxDim, &N2uqConvShape::in_channels},
    {"out_channels", 1, kMaxDim, &N2uqConvShape::out_channels},
    {"kernel_height", 1, kMaxKernel, &N2uqConvShape::kernel_height},
    {"kernel_width", 1, kMaxKernel, &N2uqConvShape::kernel_width},
    {"stride_height", 1, kMaxKernel, &N2uqConvShape::stride_height},
    {"stride_width", 1, kMaxKernel, &N2uqConvShape::stride_width},
    {"dilation_height", 1, kMaxKernel, &N2uqConvShape::dilation_height},
    {"dilation_width", 1, kMaxKernel, &N2uqConvShape::dilation_width},
    {"act_bits", 1, N2UQ_MAX_BITS, &N2uqConvShape::act_bits},
    {"weight_bits", 1, N2UQ_MAX_BITS, &N2uqConvShape::weight_bits}};
const ConvOption kPadOptions[] = {{"pad_top", 0, kMaxKernel, &N2uqConvShape::pad_top},
                                  {"pad_bottom", 0, kMaxKernel, &N2uqConvShape::pad_bottom},
                                  {"pad_left", 0, kMaxKernel, &N2uqConvShape::pad_left},
                                  {"pad_right", 0, kMaxKernel, &N2uqConvShape::pad_right}};
// N2UQMaxPool2DFused's layer options (custom_ops.POOL_OPTIONS).
const IntOption<N2uqPoolShape> kPoolOptions[] = {{"channels", 1, kMaxDim, &N2uqPoolShape::channels},
                                                 {"filter_height", 1, kMaxKernel, &N2uqPoolShape::filter_height},
                                                 {"filter_width", 1, kMaxKernel, &N2uqPoolShape::filter_width},
                                                 {"stride_height", 1, kMaxKernel, &N2uqPoolShape::stride_height},
                                                 {"stride_width", 1, kMaxKernel, &N2uqPoolShape::stride_width},
                                                 {"pad_top", 0, kMaxKernel, &N2uqPoolShape::pad_top},
                                                 {"pad_bottom", 0, kMaxKernel, &N2uqPoolShape::pad_bottom},
                                                 {"pad_left", 0, kMaxKernel, &N2uqPoolShape::pad_left},
                                                 {"pad_right", 0, kMaxKernel, &N2uqPoolShape::pad_right}};
// The "padding" option (custom_ops.PADDING_EXPLICIT / PADDING_SAME); kPaddingUnstated: absent.
enum PaddingMode { kPaddingUnstated = -1, kPaddingExplicit = 0, kPaddingSame = 1 };

int OpKindOf(const char* name) {
  if (name == nullptr) return -1;
  for (int i = 0; i < kNumOps; ++i)
    if (strcmp(name, kOpNames[i]) == 0) return i;
  return -1;
}

// Which builtin CONV_2D nodes the delegate claims, per type (int8_conv, float_conv): none, those
// over few input channels where an AVX-512 kernel runs them (auto: AMX or VNNI for int8, FMA for
// float), or every one it supports (all: tests, and the portable kernels).
enum { kBuiltinConvOff = 0, kBuiltinConvAuto = 1, kBuiltinConvAll = 2 };
// auto: at most this many input channels. TFLite's kernels vectorise over input channels, so an
// image stem (3) runs them at a fraction of their rate (on an AMX Xeon: int8 53 GMAC/s against
// 780-1060 on 3x3 layers of 64+ channels, float32 about 57 of the core's 105), while the kernels
// here block over pixels and output channels.
const int kBuiltinConvAutoMaxChannels = 8;

struct Settings {
  int num_threads = 0;  // 0: the interpreter's recommended_num_threads
  int isa = N2UQ_ISA_AUTO;
  int path = N2UQ_PATH_AUTO;  // conv / fully connected kernel path (n2uq_core.h)
  int int8_conv = kBuiltinConvAuto, float_conv = kBuiltinConvAuto;
  bool abi_probe = false;
  // Claim an N2UQQuantizePack whose codes only one N2UQConv2D(Fused) reads together with that conv
  // (DelegatePrepare, "input quantize in the conv").
  bool quantize_into_conv = true;
};

// ----------------------------------------------------------------- profiling registry

struct ProfileEntry {
  const void* delegate = nullptr;
  int op = 0;
  int node_index = -1;
  std::string output_name;
  std::atomic<int> path{0};  // conv / FC: the plan's kernel path (N2UQ_PATH_*), else 0
  std::atomic<uint64_t> invocations{0};
  std::atomic<uint64_t> nanoseconds{0};
};

std::mutex g_mutex;  // guards g_profiles and g_abi_probe
std::vector<std::shared_ptr<ProfileEntry>> g_profiles;
std::string g_abi_probe;

// ----------------------------------------------------------------- delegate state

using Int8ConvPlanPtr = std::shared_ptr<N2uqInt8ConvPlan>;

struct ClaimedNode {
  int kind = -1;
  int node_index = -1;
  std::vector<int> inputs, outputs;
  std::vector<uint8_t> options;
  // kInt8Conv2D / kFloatConv2D: the plan made while claiming, and the node's options
  Int8ConvPlanPtr int8_plan;
  std::shared_ptr<N2uqFloatConvPlan> float_plan;
  N2uqTfLiteConvParams conv_params = {};
  // A conv claimed with the N2UQQuantizePack before it (DelegatePrepare): that node, its tensors and
  // options; `merged` marks the quantize node's own claim, which the conv's kernel replaces.
  int quantize_node = -1;
  std::vector<int> quantize_inputs;
  std::vector<uint8_t> quantize_options;
  bool merged = false;
};

struct DelegateData {
  Settings settings;
  const ClaimedNode* pending = nullptr;  // the node whose kernel init is running right now
};

// ----------------------------------------------------------------- kernel state

struct Kernel {
  int kind = -1;
  bool delegated = false;
  const void* delegate = nullptr;
  Settings settings;
  int node_index = -1;
  std::string init_error;
  std::vector<int> inputs, outputs;  // delegate mode: the original node's tensors
  // options
  int32_t bits = 0, channels = 0;
  float beta1 = 1.0f;
  N2uqConvShape conv = {};
  int padding = kPaddingUnstated;  // PaddingMode
  int32_t depth_multiplier = 1;
  int32_t in_features = 0, out_features = 0, act_bits = 0, weight_bits = 0;
  // fused ops: the output stage's options (step kinds, float output, quantizer); the per-tensor
  // parts (step values, thresholds) are inputs, read at invoke
  N2uqOutputStage stage = {};
  // prepared state
  int64_t positions = 0;  // quantize: positions; FC: batch
  int64_t layer_elements = 0;  // fused: elements of the layer's float output (the stage's input)
  int32_t layer_channels = 0;  // fused: its last dimension (the stage's channels)
  bool weights_ready = false;
  // conv, FC: the weights unpacked once and laid out for the kernel path (n2uq_conv_plan_*)
  std::unique_ptr<N2uqConvPlan, void (*)(N2uqConvPlan*)> plan{nullptr, n2uq_conv_plan_destroy};
  N2uqConvShape fc_shape = {};           // FC: the plan's shape (batch from the input)
  N2uqPoolShape pool = {};               // max pool: options, then the input's size at prepare
  bool pool_int8 = false;                // max pool: int8 input (input_zero_point, input_scale options)
  int32_t pool_zero_point = 0;
  float pool_scale = 0.0f;
  std::vector<uint8_t> weight_codes;     // depthwise: plain codes
  Int8ConvPlanPtr int8_plan;             // kInt8Conv2D: the filter prepared once (ClaimBuiltinConv)
  std::shared_ptr<N2uqFloatConvPlan> float_plan;  // kFloatConv2D: likewise
  N2uqTfLiteConvParams conv_params = {};  // kInt8Conv2D / kFloatConv2D: padding and strides
  std::shared_ptr<ProfileEntry> profile;
  std::string label;
  // kConv2D / kConv2DFused claimed with the N2UQQuantizePack that feeds it (DelegatePrepare): the
  // conv quantizes that op's float input x itself (n2uq_conv_plan_run_quantizing) with its
  // thresholds tensor and options; `codes` is the packed tensor between them (the conv's input 0),
  // written only where it is also an output of the pair (keep_codes).
  struct InputQuantize {
    int x = -1, thresholds = -1, codes = -1, node_index = -1;
    int32_t bits = 0, channels = 0;
    float beta1 = 1.0f;
    bool keep_codes = false;
  } quantize_in;
};

const char* TensorName(const N2uqTfLiteContext* ctx, int index) {
  if (index < 0 || static_cast<size_t>(index) >= ctx->tensors_size) return "?";
  const char* name = ctx->tensors[index].name;
  return name ? name : "?";
}

// "tensor 12 'name'", or "tensor 12" for an unnamed one (exported files keep few names).
std::string TensorLabel(const N2uqTfLiteContext* ctx, int index) {
  std::string label = "tensor " + std::to_string(index);
  if (index >= 0 && static_cast<size_t>(index) < ctx->tensors_size && ctx->tensors[index].name &&
      ctx->tensors[index].name[0])
    label += std::string(" '") + ctx->tensors[index].name + "'";
  return label;
}

int ReportNode(N2uqTfLiteContext* ctx, int kind, int node_index, const std::string& message) {
  std::string text = OpName(kind);
  if (node_index >= 0) text += " (node " + std::to_string(node_index) + ")";
  text += ": " + message;
  if (ctx && ctx->ReportError) ctx->ReportError(ctx, "%s", text.c_str());
  return kN2uqTfLiteError;
}

int Report(N2uqTfLiteContext* ctx, const Kernel* k, const std::string& message) {
  return ReportNode(ctx, k ? k->kind : -1, k ? k->node_index : -1, message);
}

bool CheckedMul(int64_t a, int64_t b, int64_t* out) { return !__builtin_mul_overflow(a, b, out); }

// The options of a non-fused op of kind `kind` (a fused op's layer options).
bool ParseLayerOptions(int kind, Kernel* k, const n2uq::FlexOptions& o, std::string* err) {
  int64_t v[4];
  auto get = [&](const char* key, int64_t lo, int64_t hi, int64_t* out) { return o.GetInt(key, lo, hi, out, err); };
  switch (kind) {
    case kQuantizePack:
    case kQuantize: {
      double beta1;
      if (!get("bits", 1, N2UQ_MAX_BITS, &v[0]) || !get("channels", 1, kMaxDim, &v[1]) ||
          !o.GetFloat("beta1", &beta1, err))
        return false;
      k->bits = int32_t(v[0]);
      k->channels = int32_t(v[1]);
      k->beta1 = float(beta1);
      return true;
    }
    case kConv2D:
    case kDepthwise: {
      N2uqConvShape& s = k->conv;
      for (const ConvOption& option : kConvOptions) {
        if (!get(option.key, option.lo, option.hi, &v[0])) return false;
        s.*option.field = int32_t(v[0]);
      }
      // "padding" decides whether the pad_* options belong to the op (custom_ops.PADDING_*).
      k->padding = kPaddingUnstated;
      if (o.Has("padding")) {
        if (!get("padding", kPaddingExplicit, kPaddingSame, &v[0])) return false;
        k->padding = int(v[0]);
      }
      for (const ConvOption& option : kPadOptions) {
        if (k->padding == kPaddingSame) {
          if (o.Has(option.key)) {
            *err = std::string("option '") + option.key + "' is not allowed with padding = 1 ('same': the pads "
                   "follow from the input size)";
            return false;
          }
          s.*option.field = 0;
        } else if (!get(option.key, option.lo, option.hi, &v[0])) {
          return false;
        } else {
          s.*option.field = int32_t(v[0]);
        }
      }
      if (kind == kDepthwise) {
        if (!get("depth_multiplier", 1, kMaxDim, &v[0])) return false;
        k->depth_multiplier = int32_t(v[0]);
        if (int64_t(s.in_channels) * k->depth_multiplier != s.out_channels) {
          *err = "out_channels " + std::to_string(s.out_channels) + " != in_channels " +
                 std::to_string(s.in_channels) + " * depth_multiplier " + std::to_string(k->depth_multiplier);
          return false;
        }
      }
      return true;
    }
    case kMaxPool2DFused: {
      for (const auto& option : kPoolOptions) {
        if (!get(option.key, option.lo, option.hi, &v[0])) return false;
        k->pool.*option.field = int32_t(v[0]);
      }
      // An int8 input (the int8 PAD + MAX_POOL_2D + DEQUANTIZE of an int8 model) names its
      // dequantization; a float32 one has neither option.
      if (o.Has("input_zero_point") != o.Has("input_scale")) {
        *err = "options input_zero_point and input_scale come together (an int8 input) or not at all";
        return false;
      }
      k->pool_int8 = o.Has("input_zero_point");
      if (k->pool_int8) {
        double scale = 0.0;
        if (!get("input_zero_point", -128, 127, &v[0]) || !o.GetFloat("input_scale", &scale, err)) return false;
        if (!(float(scale) > 0.0f) || float(scale) > FLT_MAX) {  // GetFloat gave a finite double
          *err = "option input_scale must be a positive float32, got " + std::to_string(scale);
          return false;
        }
        k->pool_zero_point = int32_t(v[0]);
        k->pool_scale = float(scale);
      }
      return true;
    }
    case kFullyConnected:
      if (!get("in_features", 1, kMaxDim, &v[0]) || !get("out_features", 1, kMaxDim, &v[1]) ||
          !get("act_bits", 1, N2UQ_MAX_BITS, &v[2]) || !get("weight_bits", 1, N2UQ_MAX_BITS, &v[3]))
        return false;
      k->in_features = int32_t(v[0]);
      k->out_features = int32_t(v[1]);
      k->act_bits = int32_t(v[2]);
      k->weight_bits = int32_t(v[3]);
      return true;
  }
  *err = "unknown op";
  return false;
}

// The output stage of a fused op (custom_ops "Fused output stages"): "steps" and one "step_<i>"
// per step, "quantize" (0 none, 1 pack, 2 codes) with "quantize_bits" and "quantize_beta1" unless
// 0, and "float_output" (steps applied before the float output), required without a quantizer.
bool ParseStageOptions(Kernel* k, const n2uq::FlexOptions& o, std::string* err) {
  N2uqOutputStage& st = k->stage;
  int64_t v = 0;
  if (!o.GetInt("steps", 0, N2UQ_MAX_OUTPUT_STEPS, &v, err)) return false;
  st.num_steps = int32_t(v);
  for (int i = 0; i < st.num_steps; ++i) {
    const std::string key = "step_" + std::to_string(i);
    if (!o.GetInt(key.c_str(), 1, N2UQ_STEP_KINDS - 1, &v, err)) return false;
    st.steps[i].kind = int32_t(v);
  }
  if (!o.GetInt("quantize", N2UQ_QUANTIZE_NONE, N2UQ_QUANTIZE_CODES, &v, err)) return false;
  st.quantize = int32_t(v);
  if (st.quantize != N2UQ_QUANTIZE_NONE) {
    double beta1 = 1.0;
    if (!o.GetInt("quantize_bits", 1, N2UQ_MAX_BITS, &v, err) || !o.GetFloat("quantize_beta1", &beta1, err))
      return false;
    st.bits = int32_t(v);
    st.beta1 = float(beta1);
  }
  st.float_after = -1;
  if (o.Has("float_output")) {
    if (!o.GetInt("float_output", 0, st.num_steps, &v, err)) return false;
    st.float_after = int32_t(v);
  }
  if (st.quantize == N2UQ_QUANTIZE_NONE && st.float_after != st.num_steps) {
    *err = "an output stage without a quantizer (quantize = 0) needs float_output = steps (" +
           std::to_string(st.num_steps) + ")";
    return false;
  }
  return true;
}

bool ParseOptions(Kernel* k, const uint8_t* data, size_t size, std::string* err) {
  n2uq::FlexOptions o;
  if (!o.Parse(data, size, err)) return false;
  if (!ParseLayerOptions(BaseKind(k->kind), k, o, err)) return false;
  return !IsFused(k->kind) || ParseStageOptions(k, o, err);
}

void RegisterProfile(Kernel* k, const N2uqTfLiteContext* ctx) {
  k->profile = std::make_shared<ProfileEntry>();
  k->profile->delegate = k->delegate;
  k->profile->op = k->kind;
  k->profile->node_index = k->node_index;
  if (!k->outputs.empty() && ctx) k->profile->output_name = TensorName(ctx, k->outputs[0]);
  std::lock_guard<std::mutex> lock(g_mutex);
  g_profiles.push_back(k->profile);
}

Kernel* NewKernel(int kind, const uint8_t* options, size_t size) {
  Kernel* k = new Kernel;
  k->kind = kind;
  k->label = OpName(kind);
  std::string err;
  if (!IsBuiltin(kind) && !ParseOptions(k, options, size, &err)) k->init_error = err;
  return k;
}

// Delegate-mode init: `buffer` is a TfLiteDelegateParams; the node's tensors and options
// were saved by DelegatePrepare right before this synchronous call.
void* DelegateKernelInit(N2uqTfLiteContext* ctx, const char* buffer, size_t) {
  const auto* params = reinterpret_cast<const N2uqTfLiteDelegateParams*>(buffer);
  const DelegateData* d = params && params->delegate ? static_cast<const DelegateData*>(params->delegate->data_)
                                                     : nullptr;
  if (d == nullptr || d->pending == nullptr) {
    Kernel* k = new Kernel;
    k->init_error = "delegate kernel created without a claimed node";
    return k;
  }
  const ClaimedNode& node = *d->pending;
  // A quantize and its conv (MergeInputQuantizes) come as one subset of two nodes; should the
  // interpreter still split them, each part gets its own op's kernel.
  bool has_quantize = false, has_conv = node.quantize_node < 0;
  const N2uqTfLiteIntArray* replaced = params->nodes_to_replace;
  for (int i = 0; replaced != nullptr && i < replaced->size; ++i) {
    has_quantize = has_quantize || (node.quantize_node >= 0 && replaced->data[i] == node.quantize_node);
    has_conv = has_conv || replaced->data[i] == node.node_index;
  }
  if (node.quantize_node >= 0 && !has_conv) {
    Kernel* q = NewKernel(kQuantizePack, node.quantize_options.data(), node.quantize_options.size());
    q->delegated = true;
    q->delegate = params->delegate;
    q->settings = d->settings;
    q->node_index = node.quantize_node;
    q->inputs = node.quantize_inputs;
    q->outputs = {node.inputs.empty() ? -1 : node.inputs[0]};
    RegisterProfile(q, ctx);
    return q;
  }
  Kernel* k = NewKernel(node.kind, node.options.data(), node.options.size());
  k->delegated = true;
  k->delegate = params->delegate;
  k->settings = d->settings;
  k->node_index = node.node_index;
  k->inputs = node.inputs;
  k->outputs = node.outputs;
  k->int8_plan = node.int8_plan;
  k->float_plan = node.float_plan;
  k->conv_params = node.conv_params;
  if (has_quantize && node.quantize_inputs.size() == 2 && !node.inputs.empty()) {
    std::unique_ptr<Kernel> q(NewKernel(kQuantizePack, node.quantize_options.data(), node.quantize_options.size()));
    if (!q->init_error.empty() && k->init_error.empty())
      k->init_error = "the N2UQQuantizePack before it (node " + std::to_string(node.quantize_node) + "): " + q->init_error;
    Kernel::InputQuantize& in = k->quantize_in;
    in.x = node.quantize_inputs[0];
    in.thresholds = node.quantize_inputs[1];
    in.codes = node.inputs[0];
    in.node_index = node.quantize_node;
    in.bits = q->bits;
    in.channels = q->channels;
    in.beta1 = q->beta1;
    const N2uqTfLiteIntArray* outs = params->output_tensors;
    for (int i = 0; outs != nullptr && i < outs->size; ++i) in.keep_codes = in.keep_codes || outs->data[i] == in.codes;
    k->label += " (quantizing its input)";
  }
  RegisterProfile(k, ctx);
  if (k->int8_plan) {
    int path = 0;
    n2uq_int8_conv_plan_info(k->int8_plan.get(), nullptr, &path);
    k->profile->path.store(path);
  }
  return k;
}

template <int Kind>
void* ResolverKernelInit(N2uqTfLiteContext*, const char* buffer, size_t length) {
  return NewKernel(Kind, reinterpret_cast<const uint8_t*>(buffer), length);
}

void KernelFree(N2uqTfLiteContext*, void* buffer) {
  Kernel* k = static_cast<Kernel*>(buffer);
  if (k == nullptr) return;
  if (k->profile) {
    std::lock_guard<std::mutex> lock(g_mutex);
    for (size_t i = 0; i < g_profiles.size(); ++i)
      if (g_profiles[i] == k->profile) {
        g_profiles.erase(g_profiles.begin() + i);
        break;
      }
  }
  delete k;
}

// ----------------------------------------------------------------- tensor checks

struct Io {
  std::vector<int> inputs, outputs;
};

bool GetIo(const Kernel* k, const N2uqTfLiteNode* node, Io* io, std::string* err) {
  if (k->delegated) {
    io->inputs = k->inputs;
    io->outputs = k->outputs;
    return true;
  }
  if (node->inputs == nullptr || node->outputs == nullptr) {
    *err = "node has no input or output list";
    return false;
  }
  io->inputs.assign(node->inputs->data, node->inputs->data + node->inputs->size);
  io->outputs.assign(node->outputs->data, node->outputs->data + node->outputs->size);
  return true;
}

// A stage step that reads a tensor input (per-channel values or the residual).
bool StepHasInput(int32_t kind) {
  return kind == N2UQ_STEP_ADD || kind == N2UQ_STEP_MUL || kind == N2UQ_STEP_PRELU || kind == N2UQ_STEP_ADD_TENSOR;
}

// Inputs: quantize ops 2; layer ops 4; fused ops their layer's (LayerInputs), one per step that
// reads a tensor, then the thresholds when they quantize.
int ExpectedInputs(const Kernel* k) {
  const int kind = BaseKind(k->kind);
  if (kind == kQuantizePack || kind == kQuantize) return 2;
  int n = int(LayerInputs(k->kind));
  if (IsFused(k->kind)) {
    for (int i = 0; i < k->stage.num_steps; ++i) n += StepHasInput(k->stage.steps[i].kind) ? 1 : 0;
    n += k->stage.quantize != N2UQ_QUANTIZE_NONE ? 1 : 0;
  }
  return n;
}

// Outputs: 1; a fused op has its float output (if any) first, then its codes (if any).
int ExpectedOutputs(const Kernel* k) {
  if (!IsFused(k->kind)) return 1;
  return (k->stage.float_after >= 0 ? 1 : 0) + (k->stage.quantize != N2UQ_QUANTIZE_NONE ? 1 : 0);
}

const char* TypeName(int type) {
  switch (type) {
    case kN2uqTfLiteFloat32: return "float32";
    case kN2uqTfLiteInt32: return "int32";
    case kN2uqTfLiteUInt8: return "uint8";
    case kN2uqTfLiteInt64: return "int64";
    case kN2uqTfLiteInt8: return "int8";
    default: return "another type";
  }
}

size_t TypeSize(int type) {
  switch (type) {
    case kN2uqTfLiteFloat32: case kN2uqTfLiteInt32: return 4;
    case kN2uqTfLiteUInt8: case kN2uqTfLiteInt8: return 1;
    case kN2uqTfLiteInt64: return 8;
    default: return 0;
  }
}

std::string DimsString(const N2uqTfLiteIntArray* dims) {
  std::string s = "[";
  for (int i = 0; dims && i < dims->size; ++i) s += (i ? ", " : "") + std::to_string(dims->data[i]);
  return s + "]";
}

std::string DimsString(const std::vector<int64_t>& dims) {
  std::string s = "[";
  for (size_t i = 0; i < dims.size(); ++i) s += (i ? ", " : "") + std::to_string(dims[i]);
  return s + "]";
}

// A tensor's affine quantization (per-tensor or per-channel scales and zero points), or null.
const N2uqTfLiteAffineQuantization* Affine(const N2uqTfLiteTensor& t) {
  if (t.quantization.type != kN2uqTfLiteAffineQuantization || t.quantization.params == nullptr) return nullptr;
  const auto* q = static_cast<const N2uqTfLiteAffineQuantization*>(t.quantization.params);
  return q->scale != nullptr && q->zero_point != nullptr && q->scale->size >= 1 ? q : nullptr;
}

// Looks up tensor `index` (the `what` of the op) and checks its type and byte count.
N2uqTfLiteTensor* GetTensor(N2uqTfLiteContext* ctx, int index, int type, const char* what, std::string* err) {
  if (index < 0 || static_cast<size_t>(index) >= ctx->tensors_size) {
    *err = std::string(what) + ": tensor index " + std::to_string(index) + " is missing or out of range";
    return nullptr;
  }
  N2uqTfLiteTensor* t = &ctx->tensors[index];
  if (t->type != type) {
    *err = std::string(what) + " (" + TensorLabel(ctx, index) + ") must be " + TypeName(type) + ", got " +
           TypeName(t->type) + " (type " + std::to_string(t->type) + ")";
    return nullptr;
  }
  if (t->dims == nullptr || t->dims->size < 0 || t->dims->size > 16) {
    *err = std::string(what) + " has no valid shape";
    return nullptr;
  }
  return t;
}

bool IsConstant(const N2uqTfLiteTensor* t) {
  return t->allocation_type == kN2uqTfLiteMmapRo || t->allocation_type == kN2uqTfLitePersistentRo;
}

// The op's output: of `type`, writable (a constant of a malformed model lives in the model's
// read-only buffer) and none of the op's inputs (the kernels read their inputs while writing).
// Output `slot` likewise, and none of the op's other outputs.
N2uqTfLiteTensor* GetOutput(N2uqTfLiteContext* ctx, const Io& io, int type, std::string* err, size_t slot = 0) {
  const int index = io.outputs[slot];
  const std::string what = slot == 0 ? "output" : "output " + std::to_string(slot);
  N2uqTfLiteTensor* out = GetTensor(ctx, index, type, what.c_str(), err);
  if (out == nullptr) return nullptr;
  if (IsConstant(out)) {
    *err = what + " " + TensorLabel(ctx, index) + " is a constant tensor of the model";
    return nullptr;
  }
  for (size_t i = 0; i < io.inputs.size(); ++i)
    if (io.inputs[i] == index) {
      *err = what + " " + TensorLabel(ctx, index) + " is also input " + std::to_string(i) + " of the op";
      return nullptr;
    }
  for (size_t i = 0; i < io.outputs.size(); ++i)
    if (i != slot && io.outputs[i] == index) {
      *err = what + " " + TensorLabel(ctx, index) + " is also output " + std::to_string(i) + " of the op";
      return nullptr;
    }
  return out;
}

bool NumElements(const N2uqTfLiteTensor* t, int64_t* count) {
  int64_t n = 1;
  for (int i = 0; i < t->dims->size; ++i)
    if (t->dims->data[i] < 0 || !CheckedMul(n, t->dims->data[i], &n)) return false;
  *count = n;
  return true;
}

// Input checks that need the data: byte count matches the shape (a truncated buffer never
// reaches the core) and, when `need_data`, the data is there.
bool CheckBytes(const N2uqTfLiteContext* ctx, const N2uqTfLiteTensor* t, const char* what, bool need_data,
                std::string* err) {
  int64_t n, bytes;
  if (!NumElements(t, &n) || !CheckedMul(n, int64_t(TypeSize(t->type)), &bytes)) {
    *err = std::string(what) + " has an invalid shape " + DimsString(t->dims);
    return false;
  }
  if (t->bytes != static_cast<size_t>(bytes)) {
    *err = std::string(what) + " (" + TensorLabel(ctx, int(t - ctx->tensors)) + ") holds " +
           std::to_string(t->bytes) + " bytes but its shape " + DimsString(t->dims) + " needs " + std::to_string(bytes);
    return false;
  }
  if (need_data && t->data == nullptr && bytes > 0) {
    *err = std::string(what) + " (" + TensorLabel(ctx, int(t - ctx->tensors)) +
           ") must be a constant tensor (no data at prepare)";
    return false;
  }
  return true;
}

bool CheckCount(const N2uqTfLiteTensor* t, int64_t expected, const char* what, std::string* err) {
  int64_t n;
  if (!NumElements(t, &n) || n != expected) {
    *err = std::string(what) + " has shape " + DimsString(t->dims) + " but needs " + std::to_string(expected) +
           " elements";
    return false;
  }
  return true;
}

bool Resize(N2uqTfLiteContext* ctx, N2uqTfLiteTensor* out, const std::vector<int64_t>& dims, std::string* err) {
  bool same = out->dims != nullptr && out->dims->size == int(dims.size());
  for (size_t i = 0; same && i < dims.size(); ++i) same = out->dims->data[i] == dims[i];
  if (same && out->bytes > 0) return true;
  for (int64_t d : dims)
    if (d < 0 || d > INT32_MAX) {
      *err = "output dimension out of range";
      return false;
    }
  // The interpreter takes ownership of `array` and frees it (with free(), as TfLiteIntArrayFree
  // does) also when the resize fails, so the error message is formatted beforehand.
  const std::string failed = "resizing the output '" + std::string(out->name ? out->name : "?") + "' to " +
                             DimsString(dims) + " failed";
  auto* array = static_cast<N2uqTfLiteIntArray*>(malloc(sizeof(int) * (1 + dims.size())));
  if (array == nullptr) {
    *err = "out of memory";
    return false;
  }
  array->size = int(dims.size());
  for (size_t i = 0; i < dims.size(); ++i) array->data[i] = int(dims[i]);
  if (ctx->ResizeTensor == nullptr) {
    free(array);
    *err = failed + " (the interpreter has no ResizeTensor)";
    return false;
  }
  if (ctx->ResizeTensor(ctx, out, array) != kN2uqTfLiteOk) {
    *err = failed;
    return false;
  }
  return true;
}

// TF's 'same' padding of one spatial dim (as TFLite's CONV_2D computes it): the output has
// ceil(size / stride) positions and the padding they need is split with the extra one after.
void SamePadding(int64_t size, int64_t kernel, int64_t stride, int64_t dilation, int32_t* before, int32_t* after) {
  const int64_t extent = (kernel - 1) * dilation + 1;
  const int64_t out = (size + stride - 1) / stride;
  int64_t total = (out - 1) * stride + extent - size;
  if (total < 0) total = 0;
  *before = int32_t(total / 2);
  *after = int32_t(total - total / 2);
}

std::string PadsString(const int32_t pads[4]) {
  return "(" + std::to_string(pads[0]) + ", " + std::to_string(pads[1]) + ", " + std::to_string(pads[2]) + ", " +
         std::to_string(pads[3]) + ")";
}

// Sets the pads of k->conv for its input size (in_height, in_width). 'same': computed here, so a
// resized input gets the padding it needs. Explicit: as given. Without the padding option (export
// format 1, and explicit ops at strides 1 x 1) the fixed pads were explicit or 'same' at the
// exported input size: they serve this size if both readings agree, or where they cannot be 'same'
// (at stride 1 'same' padding is the same at every size; else `x`'s shape signature, the file's
// shape, gives the exported size); a size whose answer the file does not tell is refused.
bool ResolvePadding(Kernel* k, const N2uqTfLiteTensor* x, std::string* err) {
  N2uqConvShape& s = k->conv;
  int32_t same[4];
  SamePadding(s.in_height, s.kernel_height, s.stride_height, s.dilation_height, &same[0], &same[1]);
  SamePadding(s.in_width, s.kernel_width, s.stride_width, s.dilation_width, &same[2], &same[3]);
  if (k->padding == kPaddingSame) {
    s.pad_top = same[0], s.pad_bottom = same[1], s.pad_left = same[2], s.pad_right = same[3];
    return true;
  }
  if (k->padding == kPaddingExplicit) return true;
  const int32_t pads[4] = {s.pad_top, s.pad_bottom, s.pad_left, s.pad_right};
  if (memcmp(pads, same, sizeof(pads)) == 0) return true;  // both readings agree
  if ((s.stride_height == 1 && (pads[0] != same[0] || pads[1] != same[1])) ||
      (s.stride_width == 1 && (pads[2] != same[2] || pads[3] != same[3])))
    return true;  // not 'same' at any size: explicit
  const N2uqTfLiteIntArray* sig = x->dims_signature;
  if (sig != nullptr && sig->size == x->dims->size && sig->size >= 3) {
    const int32_t h = sig->data[1], w = sig->data[2];
    if (h < 0 || w < 0) return true;  // a free height/width: format 1 lowered 'same' only for fixed sizes
    if (h > 0 && w > 0) {
      int32_t at_export[4];
      SamePadding(h, s.kernel_height, s.stride_height, s.dilation_height, &at_export[0], &at_export[1]);
      SamePadding(w, s.kernel_width, s.stride_width, s.dilation_width, &at_export[2], &at_export[3]);
      if (memcmp(pads, at_export, sizeof(pads)) != 0) return true;  // not 'same' at export: explicit
      *err = "this op has no 'padding' option (n2uq_tf export format 1), so its pads (top, bottom, left, right) " +
             PadsString(pads) + " may be 'same' padding fixed for the exported " + std::to_string(h) + "x" +
             std::to_string(w) + " input; a " + std::to_string(s.in_height) + "x" + std::to_string(s.in_width) +
             " input needs " + PadsString(same) + " for 'same'. Re-export the model with a current n2uq_tf to "
             "run this input size";
      return false;
    }
  }
  *err = "this op has no 'padding' option (n2uq_tf export format 1) and the file does not say its exported "
         "input size, so its fixed pads " + PadsString(pads) + " may be 'same' padding for another input size "
         "than " + std::to_string(s.in_height) + "x" + std::to_string(s.in_width) + " (which needs " +
         PadsString(same) + "). Re-export the model with a current n2uq_tf to run this input size";
  return false;
}

// Weight bitstream -> codes: code j occupies stream bits j*bits .. j*bits+bits-1, LSB first.
void UnpackStream(const uint8_t* stream, int64_t count, int bits, uint8_t* codes) {
  for (int64_t j = 0; j < count; ++j) {
    unsigned code = 0;
    for (int b = 0; b < bits; ++b) {
      const int64_t t = j * bits + b;
      code |= ((stream[t >> 3] >> (t & 7)) & 1u) << b;
    }
    codes[j] = uint8_t(code);
  }
}

int Threads(const Kernel* k, const N2uqTfLiteContext* ctx) {
  int n = k->settings.num_threads > 0 ? k->settings.num_threads : ctx->recommended_num_threads;
  if (n < 1) n = 1;
  return n > N2UQ_MAX_THREADS ? N2UQ_MAX_THREADS : n;
}

// Conv / FC weights: the bitstream's codes packed as bit planes, then a plan for `shape`
// (the path's layout, built once; AUTO times the paths on this shape).
bool PreparePlan(Kernel* k, const std::vector<uint8_t>& codes, int64_t positions, int32_t channels, int bits,
                 const N2uqConvShape& shape, int threads, std::string* err) {
  const int64_t words = (channels + 63) / 64;
  std::vector<uint64_t> packed(static_cast<size_t>(positions * bits * words), 0);
  char msg[256] = {0};
  if (n2uq_pack_bitplanes(codes.data(), int64_t(codes.size()), positions, channels, bits, packed.data(),
                          int64_t(packed.size()), msg, sizeof(msg)) != N2UQ_OK) {
    *err = std::string("packing the weights failed: ") + msg;
    return false;
  }
  N2uqConvPlan* plan = nullptr;
  if (n2uq_conv_plan_create(&shape, packed.data(), int64_t(packed.size()), k->settings.isa, k->settings.path, threads,
                            &plan, msg, sizeof(msg)) != N2UQ_OK) {
    *err = std::string("preparing the weights failed: ") + msg;
    return false;
  }
  k->plan.reset(plan);
  int path = 0;
  n2uq_conv_plan_info(plan, nullptr, &path);
  if (k->profile) k->profile->path.store(path);
  return true;
}

bool PrepareWeights(Kernel* k, const N2uqTfLiteTensor* w, int64_t count, int bits, int64_t positions,
                    int32_t channels, const N2uqConvShape& shape, int threads, std::string* err) {
  int64_t stream_bits, bytes;
  if (!CheckedMul(count, bits, &stream_bits)) {
    *err = "weight count overflows";
    return false;
  }
  bytes = (stream_bits + 7) / 8;
  if (!CheckCount(w, bytes, "weight bitstream", err)) {
    *err += " (ceil(" + std::to_string(count) + " codes * " + std::to_string(bits) + " bits / 8))";
    return false;
  }
  if (k->weights_ready) return true;  // constant: unpacked once
  std::vector<uint8_t> codes(static_cast<size_t>(count));
  UnpackStream(static_cast<const uint8_t*>(w->data), count, bits, codes.data());
  if (BaseKind(k->kind) == kDepthwise)
    k->weight_codes.swap(codes);
  else if (!PreparePlan(k, codes, positions, channels, bits, shape, threads, err))
    return false;
  k->weights_ready = true;
  return true;
}

// A layer op's float output of shape `dims`, or a fused op's stage inputs (custom_ops "Fused output
// stages": per-channel values of out_channels elements, a residual of exactly `dims`, thresholds)
// and its outputs (the float tensor, then the packed [..., bits, words] or byte codes).
bool PrepareLayerOutputs(N2uqTfLiteContext* ctx, Kernel* k, const Io& io, const std::vector<int64_t>& dims,
                         std::string* err) {
  if (!IsFused(k->kind)) {
    N2uqTfLiteTensor* out = GetOutput(ctx, io, kN2uqTfLiteFloat32, err);
    return out && Resize(ctx, out, dims, err);
  }
  const N2uqOutputStage& st = k->stage;
  const int64_t channels = dims.back();
  int64_t elements = 1;
  for (int64_t d : dims)
    if (d < 0 || !CheckedMul(elements, d, &elements)) {
      *err = "output shape " + DimsString(dims) + " is too large";
      return false;
    }
  k->layer_elements = elements;
  k->layer_channels = int32_t(channels);
  size_t next = LayerInputs(k->kind);
  for (int i = 0; i < st.num_steps; ++i) {
    const int kind = st.steps[i].kind;
    if (!StepHasInput(kind)) continue;
    const bool residual = kind == N2UQ_STEP_ADD_TENSOR;
    const std::string what = "step " + std::to_string(i) + (residual ? " residual" : " values");
    N2uqTfLiteTensor* t = GetTensor(ctx, io.inputs[next++], kN2uqTfLiteFloat32, what.c_str(), err);
    if (!t || !CheckBytes(ctx, t, what.c_str(), false, err)) return false;
    if (residual) {  // no broadcasting: exactly the layer's output shape
      bool same = t->dims->size == int(dims.size());
      for (size_t j = 0; same && j < dims.size(); ++j) same = t->dims->data[j] == dims[j];
      if (!same) {
        *err = what + " has shape " + DimsString(t->dims) + " but the layer's output has " + DimsString(dims);
        return false;
      }
    } else if (!CheckCount(t, channels, what.c_str(), err)) {
      return false;
    }
  }
  if (st.quantize != N2UQ_QUANTIZE_NONE) {
    N2uqTfLiteTensor* t = GetTensor(ctx, io.inputs[next], kN2uqTfLiteFloat32, "thresholds", err);
    if (!t || !CheckBytes(ctx, t, "thresholds", false, err) || !CheckCount(t, (1 << st.bits) - 1, "thresholds", err))
      return false;
  }
  size_t slot = 0;
  if (st.float_after >= 0) {
    N2uqTfLiteTensor* out = GetOutput(ctx, io, kN2uqTfLiteFloat32, err, slot++);
    if (!out || !Resize(ctx, out, dims, err)) return false;
  }
  if (st.quantize != N2UQ_QUANTIZE_NONE) {
    const bool pack = st.quantize == N2UQ_QUANTIZE_PACK;
    N2uqTfLiteTensor* out = GetOutput(ctx, io, pack ? kN2uqTfLiteInt64 : kN2uqTfLiteUInt8, err, slot);
    if (!out) return false;
    std::vector<int64_t> q = dims;
    if (pack) {
      q.back() = st.bits;
      q.push_back((channels + 63) / 64);
    }
    if (!Resize(ctx, out, q, err)) return false;
  }
  return true;
}

// A conv that quantizes its own input (Kernel::quantize_in): the checks of the N2UQQuantizePack it
// replaces (a float32 input [N, H, W, channels], 2^bits - 1 float32 thresholds) and the packed
// tensor between them sized from the input as that op would (nothing else sizes it now; its data is
// written only where the pair outputs it). The conv's own checks of that tensor follow.
// (MergeInputQuantizes paired them only where their bits and channels agree.)
bool PrepareInputQuantize(N2uqTfLiteContext* ctx, Kernel* k, std::string* err) {
  const Kernel::InputQuantize& in = k->quantize_in;
  const std::string where = " of the N2UQQuantizePack before it (node " + std::to_string(in.node_index) + ")";
  N2uqTfLiteTensor* x = GetTensor(ctx, in.x, kN2uqTfLiteFloat32, ("input" + where).c_str(), err);
  if (!x || !CheckBytes(ctx, x, ("input" + where).c_str(), false, err)) return false;
  N2uqTfLiteTensor* t = GetTensor(ctx, in.thresholds, kN2uqTfLiteFloat32, ("thresholds" + where).c_str(), err);
  if (!t || !CheckBytes(ctx, t, ("thresholds" + where).c_str(), false, err) ||
      !CheckCount(t, (1 << in.bits) - 1, ("thresholds" + where).c_str(), err))
    return false;
  const N2uqTfLiteIntArray* d = x->dims;
  if (d->size != 4 || d->data[3] != in.channels) {
    *err = "input shape " + DimsString(d) + where + " must be [N, H, W, C] and end in channels = " +
           std::to_string(in.channels);
    return false;
  }
  N2uqTfLiteTensor* codes = GetTensor(ctx, in.codes, kN2uqTfLiteInt64, "input", err);
  return codes && Resize(ctx, codes, {d->data[0], d->data[1], d->data[2], in.bits, (in.channels + 63) / 64}, err);
}

bool PrepareImpl(N2uqTfLiteContext* ctx, Kernel* k, const Io& io, std::string* err) {
  const int want = ExpectedInputs(k), want_out = ExpectedOutputs(k);
  if (int(io.inputs.size()) != want || int(io.outputs.size()) != want_out) {
    *err = "expects " + std::to_string(want) + " inputs and " + std::to_string(want_out) + " output" +
           (want_out == 1 ? "" : "s") + ", got " + std::to_string(io.inputs.size()) + " and " +
           std::to_string(io.outputs.size());
    return false;
  }
  switch (BaseKind(k->kind)) {
    case kQuantizePack:
    case kQuantize: {
      N2uqTfLiteTensor* x = GetTensor(ctx, io.inputs[0], kN2uqTfLiteFloat32, "input", err);
      if (!x || !CheckBytes(ctx, x, "input", false, err)) return false;
      N2uqTfLiteTensor* t = GetTensor(ctx, io.inputs[1], kN2uqTfLiteFloat32, "thresholds", err);
      if (!t || !CheckBytes(ctx, t, "thresholds", false, err) ||
          !CheckCount(t, (1 << k->bits) - 1, "thresholds", err))
        return false;
      const int rank = x->dims->size;
      if (rank < 1 || x->dims->data[rank - 1] != k->channels) {
        *err = "input shape " + DimsString(x->dims) + " must end in channels = " + std::to_string(k->channels);
        return false;
      }
      int64_t n = 0;
      NumElements(x, &n);
      k->positions = n / k->channels;
      const bool pack = k->kind == kQuantizePack;
      N2uqTfLiteTensor* out = GetOutput(ctx, io, pack ? kN2uqTfLiteInt64 : kN2uqTfLiteUInt8, err);
      if (!out) return false;
      std::vector<int64_t> dims(x->dims->data, x->dims->data + rank);
      if (pack) {
        dims.back() = k->bits;
        dims.push_back((k->channels + 63) / 64);
      }
      return Resize(ctx, out, dims, err);
    }
    case kConv2D:
    case kDepthwise: {
      N2uqConvShape& s = k->conv;
      const bool dw = BaseKind(k->kind) == kDepthwise;
      if (k->quantize_in.x >= 0 && !PrepareInputQuantize(ctx, k, err)) return false;
      N2uqTfLiteTensor* x = GetTensor(ctx, io.inputs[0], dw ? kN2uqTfLiteUInt8 : kN2uqTfLiteInt64, "input", err);
      if (!x || !CheckBytes(ctx, x, "input", false, err)) return false;
      const int words = (s.in_channels + 63) / 64;
      const N2uqTfLiteIntArray* d = x->dims;
      if (dw ? (d->size != 4 || d->data[3] != s.in_channels)
             : (d->size != 5 || d->data[3] != s.act_bits || d->data[4] != words)) {
        *err = "input shape " + DimsString(d) + " must be " +
               (dw ? "[N, H, W, " + std::to_string(s.in_channels) + "]"
                   : "[N, H, W, act_bits=" + std::to_string(s.act_bits) + ", ceil(in_channels/64)=" +
                         std::to_string(words) + "]");
        return false;
      }
      s.batch = d->data[0];
      s.in_height = d->data[1];
      s.in_width = d->data[2];
      if (!ResolvePadding(k, x, err)) return false;
      int32_t oh = 0, ow = 0;
      char msg[256] = {0};
      if (n2uq_conv2d_output_size(&s, &oh, &ow, msg, sizeof(msg)) != N2UQ_OK) {
        *err = msg;
        return false;
      }
      N2uqTfLiteTensor* w = GetTensor(ctx, io.inputs[1], kN2uqTfLiteUInt8, "weight bitstream", err);
      if (!w || !CheckBytes(ctx, w, "weight bitstream", true, err)) return false;
      int64_t positions = int64_t(s.kernel_height) * s.kernel_width;  // depthwise: codes [KH][KW][C*M]
      int64_t count;
      if (!dw) positions *= s.out_channels;
      if (!CheckedMul(positions, dw ? s.out_channels : s.in_channels, &count)) {
        *err = "weight count overflows";
        return false;
      }
      if (!PrepareWeights(k, w, count, s.weight_bits, positions, s.in_channels, s, Threads(k, ctx), err)) return false;
      for (int i = 2; i < 4; ++i) {
        const char* what = i == 2 ? "multiplier" : "bias";
        N2uqTfLiteTensor* t = GetTensor(ctx, io.inputs[i], kN2uqTfLiteFloat32, what, err);
        if (!t || !CheckBytes(ctx, t, what, false, err) || !CheckCount(t, s.out_channels, what, err)) return false;
      }
      return PrepareLayerOutputs(ctx, k, io, {s.batch, oh, ow, s.out_channels}, err);
    }
    case kFullyConnected: {
      N2uqTfLiteTensor* x = GetTensor(ctx, io.inputs[0], kN2uqTfLiteInt64, "input", err);
      if (!x || !CheckBytes(ctx, x, "input", false, err)) return false;
      const int words = (k->in_features + 63) / 64;
      const N2uqTfLiteIntArray* d = x->dims;
      if (d->size < 3 || d->data[d->size - 2] != k->act_bits || d->data[d->size - 1] != words) {
        *err = "input shape " + DimsString(d) + " must be [..., act_bits=" + std::to_string(k->act_bits) +
               ", ceil(in_features/64)=" + std::to_string(words) + "]";
        return false;
      }
      int64_t batch = 1;
      for (int i = 0; i < d->size - 2; ++i) batch *= d->data[i];  // bounded by the checked byte count
      if (batch > INT32_MAX) {
        *err = "batch too large";
        return false;
      }
      k->positions = batch;
      char msg[256] = {0};
      if (n2uq_fully_connected_shape(int32_t(batch), k->in_features, k->out_features, k->act_bits, k->weight_bits,
                                     &k->fc_shape, msg, sizeof(msg)) != N2UQ_OK) {
        *err = msg;
        return false;
      }
      N2uqTfLiteTensor* w = GetTensor(ctx, io.inputs[1], kN2uqTfLiteUInt8, "weight bitstream", err);
      if (!w || !CheckBytes(ctx, w, "weight bitstream", true, err)) return false;
      if (!PrepareWeights(k, w, int64_t(k->out_features) * k->in_features, k->weight_bits, k->out_features,
                          k->in_features, k->fc_shape, Threads(k, ctx), err))
        return false;
      for (int i = 2; i < 4; ++i) {
        const char* what = i == 2 ? "multiplier" : "bias";
        N2uqTfLiteTensor* t = GetTensor(ctx, io.inputs[i], kN2uqTfLiteFloat32, what, err);
        if (!t || !CheckBytes(ctx, t, what, false, err) || !CheckCount(t, k->out_features, what, err)) return false;
      }
      std::vector<int64_t> dims(d->data, d->data + d->size - 2);
      dims.push_back(k->out_features);
      return PrepareLayerOutputs(ctx, k, io, dims, err);
    }
    case kMaxPool2DFused: {
      N2uqTfLiteTensor* x =
          GetTensor(ctx, io.inputs[0], k->pool_int8 ? kN2uqTfLiteInt8 : kN2uqTfLiteFloat32, "input", err);
      if (!x || !CheckBytes(ctx, x, "input", false, err)) return false;
      if (k->pool_int8) {  // the options must be the tensor's own quantization, which TFLite's ops read
        const N2uqTfLiteAffineQuantization* q = Affine(*x);
        if (q == nullptr || q->scale->size != 1 || q->zero_point->size < 1 || q->scale->data[0] != k->pool_scale ||
            q->zero_point->data[0] != k->pool_zero_point) {
          *err = "the int8 input's quantization is not the op's input_scale " + std::to_string(k->pool_scale) +
                 " and input_zero_point " + std::to_string(k->pool_zero_point) + " (one per-tensor scale and zero point)";
          return false;
        }
      }
      const N2uqTfLiteIntArray* d = x->dims;
      if (d->size != 4 || d->data[3] != k->pool.channels) {
        *err = "input shape " + DimsString(d) + " must be [N, H, W, channels=" + std::to_string(k->pool.channels) +
               "]";
        return false;
      }
      k->pool.batch = d->data[0];
      k->pool.in_height = d->data[1];
      k->pool.in_width = d->data[2];
      int32_t oh = 0, ow = 0;
      char msg[256] = {0};
      if (n2uq_max_pool2d_output_size(&k->pool, &oh, &ow, msg, sizeof(msg)) != N2UQ_OK) {
        *err = msg;
        return false;
      }
      return PrepareLayerOutputs(ctx, k, io, {k->pool.batch, oh, ow, k->pool.channels}, err);
    }
  }
  *err = "unknown op";
  return false;
}

// ----------------------------------------------------------------- int8 convolutions

// A builtin CONV_2D in int8 runs here (n2uq_int8_conv_plan_*, the same bytes as XNNPACK's int8
// conv, TFLite's default) when every part of the node is what that kernel supports; anything
// else stays with TFLite, so nothing is reported for nodes left alone.

// A fused activation's bound as XNNPACK clamps it: TFLite's XNNPACK delegate passes the float
// range (relu: 0, +inf; relu6: 0, 6; relu_n1_to_1: -1, 1) and XNNPACK quantizes it like this.
int32_t QuantizeBound(float value, float scale, int32_t zero_point) {
  return int32_t(lrintf(fminf(fmaxf(value / scale + float(zero_point), -128.0f), 127.0f)));
}

// The float range of a fused activation (XNNPACK's clamp; none: unbounded), false for others.
bool ActivationRange(int activation, float* lo, float* hi) {
  *lo = -INFINITY, *hi = INFINITY;
  switch (activation) {
    case kN2uqTfLiteActNone: return true;
    case kN2uqTfLiteActRelu: *lo = 0.0f; return true;
    case kN2uqTfLiteActReluN1To1: *lo = -1.0f, *hi = 1.0f; return true;
    case kN2uqTfLiteActRelu6: *lo = 0.0f, *hi = 6.0f; return true;
    default: return false;
  }
}

// The plan's shape for a filter: one image the size of the dilated filter (any input size runs). A
// dilated size past int32 (a filter of 2^21 rows at dilation 1024) gets 0, which the plan refuses.
N2uqConvShape FilterShape(const N2uqTfLiteConvParams* p, int oc, int kh, int kw, int ic) {
  N2uqConvShape s = {};
  s.batch = 1;
  const int64_t height = int64_t(kh - 1) * p->dilation_height_factor + 1;
  const int64_t width = int64_t(kw - 1) * p->dilation_width_factor + 1;
  s.in_height = height > INT32_MAX ? 0 : int32_t(height);
  s.in_width = width > INT32_MAX ? 0 : int32_t(width);
  s.in_channels = ic;
  s.out_channels = oc;
  s.kernel_height = kh;
  s.kernel_width = kw;
  s.stride_height = p->stride_height;
  s.stride_width = p->stride_width;
  s.dilation_height = p->dilation_height_factor;
  s.dilation_width = p->dilation_width_factor;
  return s;
}

// What both claims read of a CONV_2D node: input, filter, output (rank 4, one group) of `type`, a
// constant filter of exactly its elements' bytes, an optional constant bias [OC] of `bias_type`,
// the options (padding same or valid, strides and dilations 1..1024) and the activation's range.
// `mode`: the setting (auto stops at kBuiltinConvAutoMaxChannels input channels).
struct ConvNode {
  const N2uqTfLiteTensor *x, *w, *b, *y;
  int oc, kh, kw, ic;
  const N2uqTfLiteConvParams* p;
  float lo, hi;
};

bool ReadConvNode(N2uqTfLiteContext* ctx, const N2uqTfLiteNode* node, int type, int bias_type, int mode,
                  ConvNode* n) {
  auto tensor = [&](int index) -> const N2uqTfLiteTensor* {
    return index >= 0 && size_t(index) < ctx->tensors_size ? &ctx->tensors[index] : nullptr;
  };
  const int bias_index = node->inputs->size == 3 ? node->inputs->data[2] : -1;
  n->x = tensor(node->inputs->data[0]), n->w = tensor(node->inputs->data[1]);
  n->b = tensor(bias_index), n->y = tensor(node->outputs->data[0]);
  const N2uqTfLiteTensor *x = n->x, *w = n->w, *b = n->b, *y = n->y;
  if (!x || !w || !y || (bias_index >= 0 && !b)) return false;
  if (x->type != type || w->type != type || y->type != type) return false;
  for (const N2uqTfLiteTensor* t : {x, w, y})
    if (t->dims == nullptr || t->dims->size != 4) return false;
  n->oc = w->dims->data[0], n->kh = w->dims->data[1], n->kw = w->dims->data[2], n->ic = w->dims->data[3];
  if (n->oc < 1 || n->kh < 1 || n->kw < 1 || n->ic < 1 || n->ic != x->dims->data[3] || y->dims->data[3] != n->oc)
    return false;
  int64_t filter_count = 0, filter_bytes = 0;  // checked: a product that wraps could match any byte count
  if (!IsConstant(w) || w->data == nullptr || !NumElements(w, &filter_count) ||
      !CheckedMul(filter_count, int64_t(TypeSize(type)), &filter_bytes) || w->bytes != size_t(filter_bytes))
    return false;
  if (mode == kBuiltinConvAuto && n->ic > kBuiltinConvAutoMaxChannels) return false;
  if (b && (b->type != bias_type || !IsConstant(b) || b->data == nullptr || b->dims == nullptr ||
            b->dims->size != 1 || b->dims->data[0] != n->oc || b->bytes != size_t(n->oc) * 4))
    return false;
  n->p = static_cast<const N2uqTfLiteConvParams*>(node->builtin_data);
  if (n->p->padding != kN2uqTfLitePaddingSame && n->p->padding != kN2uqTfLitePaddingValid) return false;
  for (int v : {n->p->stride_width, n->p->stride_height, n->p->dilation_width_factor, n->p->dilation_height_factor})
    if (v < 1 || v > 1024) return false;
  return ActivationRange(n->p->activation, &n->lo, &n->hi);
}

// The claimed node's tensors and options (its plan set by the caller).
void FillClaim(const N2uqTfLiteNode* node, int kind, const N2uqTfLiteConvParams* p, ClaimedNode* c) {
  c->kind = kind;
  c->inputs.assign(node->inputs->data, node->inputs->data + node->inputs->size);
  c->outputs.assign(node->outputs->data, node->outputs->data + node->outputs->size);
  c->conv_params = *p;
}

// A float32 CONV_2D (runs with n2uq_float_conv_plan_*: TFLite's result up to float rounding).
bool ClaimFloatConv(N2uqTfLiteContext* ctx, const N2uqTfLiteNode* node, const Settings& settings, ClaimedNode* c) {
  ConvNode n;
  if (!ReadConvNode(ctx, node, kN2uqTfLiteFloat32, kN2uqTfLiteFloat32, settings.float_conv, &n)) return false;
  const N2uqConvShape s = FilterShape(n.p, n.oc, n.kh, n.kw, n.ic);
  N2uqFloatConvPlan* plan = nullptr;
  char msg[256] = {0};
  if (n2uq_float_conv_plan_create(&s, static_cast<const float*>(n.w->data), int64_t(n.w->bytes / 4),
                                  n.b ? static_cast<const float*>(n.b->data) : nullptr, n.b ? n.oc : 0, n.lo, n.hi,
                                  settings.isa, &plan, msg, sizeof(msg)) != N2UQ_OK)
    return false;
  std::shared_ptr<N2uqFloatConvPlan> holder(plan, n2uq_float_conv_plan_destroy);
  int isa = N2UQ_ISA_PORTABLE;
  n2uq_float_conv_plan_info(plan, &isa);
  if (settings.float_conv == kBuiltinConvAuto && isa == N2UQ_ISA_PORTABLE) return false;  // TFLite's is faster
  FillClaim(node, kFloatConv2D, n.p, c);
  c->float_plan = holder;
  return true;
}

// An int8 CONV_2D with affine quantization: per-tensor input and output, a symmetric filter with
// one scale or one per output channel (runs with n2uq_int8_conv_plan_*: TFLite's bytes).
bool ClaimInt8Conv(N2uqTfLiteContext* ctx, const N2uqTfLiteNode* node, const Settings& settings, ClaimedNode* c) {
  ConvNode n;
  if (!ReadConvNode(ctx, node, kN2uqTfLiteInt8, kN2uqTfLiteInt32, settings.int8_conv, &n)) return false;
  const N2uqTfLiteAffineQuantization *xq = Affine(*n.x), *wq = Affine(*n.w), *yq = Affine(*n.y);
  if (!xq || !wq || !yq || xq->scale->size != 1 || yq->scale->size != 1 || xq->zero_point->size < 1 ||
      yq->zero_point->size < 1)
    return false;
  if (wq->scale->size != 1 && (wq->scale->size != n.oc || wq->quantized_dimension != 0)) return false;
  for (int i = 0; i < wq->zero_point->size; ++i)
    if (wq->zero_point->data[i] != 0) return false;  // symmetric filters only
  N2uqInt8ConvParams q;
  q.input_scale = xq->scale->data[0];
  q.input_zero_point = xq->zero_point->data[0];
  q.output_scale = yq->scale->data[0];
  q.output_zero_point = yq->zero_point->data[0];
  if (!(q.output_scale > 0.0f)) return false;
  q.output_min = QuantizeBound(n.lo, q.output_scale, q.output_zero_point);
  q.output_max = QuantizeBound(n.hi, q.output_scale, q.output_zero_point);
  // XNNPACK refuses requantization scales >= 256; TFLite's own kernel, which rounds otherwise,
  // then runs the node, so it is left to it.
  for (int o = 0; o < wq->scale->size; ++o)
    if (!(q.input_scale * wq->scale->data[o] / q.output_scale < 256.0f)) return false;
  const N2uqConvShape s = FilterShape(n.p, n.oc, n.kh, n.kw, n.ic);
  N2uqInt8ConvPlan* plan = nullptr;
  char msg[256] = {0};
  if (n2uq_int8_conv_plan_create(&s, static_cast<const int8_t*>(n.w->data), int64_t(n.w->bytes),
                                 n.b ? static_cast<const int32_t*>(n.b->data) : nullptr, n.b ? n.oc : 0,
                                 wq->scale->data, wq->scale->size, &q, settings.isa, settings.path, &plan, msg,
                                 sizeof(msg)) != N2UQ_OK)
    return false;
  Int8ConvPlanPtr holder(plan, n2uq_int8_conv_plan_destroy);
  int isa = N2UQ_ISA_PORTABLE;
  n2uq_int8_conv_plan_info(plan, &isa, nullptr);
  if (settings.int8_conv == kBuiltinConvAuto && isa == N2UQ_ISA_PORTABLE) return false;  // TFLite's is faster
  FillClaim(node, kInt8Conv2D, n.p, c);
  c->int8_plan = holder;
  return true;
}

// A builtin CONV_2D node the settings let the delegate run: int8 or float32, else none.
bool ClaimBuiltinConv(N2uqTfLiteContext* ctx, const N2uqTfLiteNode* node, const Settings& settings, ClaimedNode* c) {
  if (node->builtin_data == nullptr || node->inputs == nullptr || node->outputs == nullptr ||
      node->inputs->size < 2 || node->inputs->size > 3 || node->outputs->size != 1)
    return false;
  const int x = node->inputs->data[0];
  if (x < 0 || size_t(x) >= ctx->tensors_size) return false;
  const int type = ctx->tensors[x].type;
  if (type == kN2uqTfLiteInt8) return settings.int8_conv != kBuiltinConvOff && ClaimInt8Conv(ctx, node, settings, c);
  if (type == kN2uqTfLiteFloat32)
    return settings.float_conv != kBuiltinConvOff && ClaimFloatConv(ctx, node, settings, c);
  return false;
}

bool PrepareBuiltinConv(N2uqTfLiteContext* ctx, Kernel* k, const Io& io, std::string* err) {
  const bool int8 = k->kind == kInt8Conv2D;
  if ((int8 ? !k->int8_plan : !k->float_plan) || io.inputs.size() < 2 || io.outputs.size() != 1) {
    *err = "the conv lost its plan or tensors";
    return false;
  }
  const int type = int8 ? kN2uqTfLiteInt8 : kN2uqTfLiteFloat32;
  N2uqTfLiteTensor* x = GetTensor(ctx, io.inputs[0], type, "input", err);
  if (!x || !CheckBytes(ctx, x, "input", false, err)) return false;
  const N2uqTfLiteConvParams& p = k->conv_params;
  N2uqConvShape& s = k->conv;
  if (x->dims->size != 4) {
    *err = "input shape " + DimsString(x->dims) + " must be 4-D (NHWC)";
    return false;
  }
  const N2uqTfLiteTensor* filter = GetTensor(ctx, io.inputs[1], type, "filter", err);
  if (!filter || filter->dims->size != 4) {
    if (filter) *err = "filter shape " + DimsString(filter->dims) + " must be 4-D";
    return false;
  }
  const N2uqTfLiteTensor& w = *filter;
  s = N2uqConvShape{};
  s.batch = x->dims->data[0];
  s.in_height = x->dims->data[1];
  s.in_width = x->dims->data[2];
  s.in_channels = x->dims->data[3];
  s.out_channels = w.dims->data[0];
  s.kernel_height = w.dims->data[1];
  s.kernel_width = w.dims->data[2];
  s.stride_height = p.stride_height;
  s.stride_width = p.stride_width;
  s.dilation_height = p.dilation_height_factor;
  s.dilation_width = p.dilation_width_factor;
  s.act_bits = s.weight_bits = 1;  // ignored by these convs; lets n2uq_conv2d_output_size check the rest
  if (p.padding == kN2uqTfLitePaddingSame) {
    SamePadding(s.in_height, s.kernel_height, s.stride_height, s.dilation_height, &s.pad_top, &s.pad_bottom);
    SamePadding(s.in_width, s.kernel_width, s.stride_width, s.dilation_width, &s.pad_left, &s.pad_right);
  }
  if (s.in_channels != w.dims->data[3]) {
    *err = "input shape " + DimsString(x->dims) + " must end in the filter's " + std::to_string(w.dims->data[3]) +
           " channels";
    return false;
  }
  int32_t oh = 0, ow = 0;
  char msg[256] = {0};
  if (n2uq_conv2d_output_size(&s, &oh, &ow, msg, sizeof(msg)) != N2UQ_OK) {
    *err = std::string("input shape ") + DimsString(x->dims) + ": " + msg;
    return false;
  }
  N2uqTfLiteTensor* out = GetOutput(ctx, io, type, err);
  return out && Resize(ctx, out, {s.batch, oh, ow, s.out_channels}, err);
}

bool InvokeBuiltinConv(N2uqTfLiteContext* ctx, Kernel* k, const Io& io, std::string* err) {
  if (io.inputs.empty() || io.outputs.size() != 1 || (k->kind == kInt8Conv2D ? !k->int8_plan : !k->float_plan)) {
    *err = "tensor lists changed after prepare";
    return false;
  }
  const N2uqTfLiteTensor& x = ctx->tensors[io.inputs[0]];
  N2uqTfLiteTensor& out = ctx->tensors[io.outputs[0]];
  if (x.data == nullptr || out.data == nullptr || IsConstant(&out)) {
    *err = "the input or output has no data";
    return false;
  }
  char msg[256] = {0};
  const int status =
      k->kind == kInt8Conv2D
          ? n2uq_int8_conv_plan_run(k->int8_plan.get(), &k->conv, static_cast<const int8_t*>(x.data),
                                    int64_t(x.bytes), static_cast<int8_t*>(out.data), int64_t(out.bytes),
                                    Threads(k, ctx), msg, sizeof(msg))
          : n2uq_float_conv_plan_run(k->float_plan.get(), &k->conv, static_cast<const float*>(x.data),
                                     int64_t(x.bytes / 4), static_cast<float*>(out.data), int64_t(out.bytes / 4),
                                     Threads(k, ctx), msg, sizeof(msg));
  if (status != N2UQ_OK) {
    *err = msg;
    return false;
  }
  return true;
}

// ----------------------------------------------------------------- the PAD before a claimed conv

// A PAD node (input, constant int32 paddings [4][2]) whose output a claimed conv reads: the
// exporters' explicit stem padding (PaddedConv2D, TFLite's own 'same' handling of a ZeroPadding2D).
// XNNPACK folds such a pad into its conv; once the conv is ours it would run the pad on its own,
// which took 0.45 ms for the 224x224x3 stem (TFLite's reference kernel: 0.02). Here: row copies and
// fills with 0 (float) or the output zero point (int8, as TFLite pads quantized tensors).
bool ClaimPadBefore(N2uqTfLiteContext* ctx, const N2uqTfLiteNode* node, ClaimedNode* c) {
  if (node->inputs == nullptr || node->outputs == nullptr || node->inputs->size != 2 || node->outputs->size != 1)
    return false;
  auto tensor = [&](int index) -> const N2uqTfLiteTensor* {
    return index >= 0 && size_t(index) < ctx->tensors_size ? &ctx->tensors[index] : nullptr;
  };
  const N2uqTfLiteTensor *x = tensor(node->inputs->data[0]), *pads = tensor(node->inputs->data[1]),
                         *y = tensor(node->outputs->data[0]);
  if (!x || !pads || !y || x->type != y->type || (x->type != kN2uqTfLiteFloat32 && x->type != kN2uqTfLiteInt8))
    return false;
  if (!x->dims || x->dims->size != 4 || !y->dims || y->dims->size != 4) return false;
  if (pads->type != kN2uqTfLiteInt32 || !IsConstant(pads) || pads->data == nullptr || !pads->dims ||
      pads->dims->size != 2 || pads->dims->data[0] != 4 || pads->dims->data[1] != 2 || pads->bytes != 32)
    return false;
  const int32_t* p = static_cast<const int32_t*>(pads->data);
  if (p[0] != 0 || p[1] != 0 || p[6] != 0 || p[7] != 0) return false;  // batch and channels unpadded
  for (int i = 2; i < 6; ++i)
    if (p[i] < 0 || p[i] > kMaxKernel) return false;
  if (x->type == kN2uqTfLiteInt8 &&
      (x->params.scale != y->params.scale || x->params.zero_point != y->params.zero_point))
    return false;  // a requantizing pad is not a copy
  c->kind = kBuiltinPad;
  c->inputs.assign(node->inputs->data, node->inputs->data + node->inputs->size);
  c->outputs.assign(node->outputs->data, node->outputs->data + node->outputs->size);
  return true;
}

// The pads (top, bottom, left, right) of a claimed PAD, read again at prepare (a constant).
bool PadAmounts(N2uqTfLiteContext* ctx, const Io& io, int32_t pads[4], std::string* err) {
  const N2uqTfLiteTensor* t = GetTensor(ctx, io.inputs[1], kN2uqTfLiteInt32, "paddings", err);
  if (!t || t->data == nullptr || t->bytes != 32) {
    if (t) *err = "paddings must be a constant int32 [4, 2]";
    return false;
  }
  const int32_t* p = static_cast<const int32_t*>(t->data);
  for (int i = 0; i < 4; ++i) pads[i] = p[2 + i];
  for (int i = 0; i < 4; ++i)
    if (pads[i] < 0 || pads[i] > kMaxKernel) {
      *err = "paddings out of range";
      return false;
    }
  return true;
}

bool PreparePad(N2uqTfLiteContext* ctx, Kernel* k, const Io& io, std::string* err) {
  if (io.inputs.size() != 2 || io.outputs.size() != 1) {
    *err = "PAD needs 2 inputs and 1 output";
    return false;
  }
  const N2uqTfLiteTensor* x0 = io.inputs[0] >= 0 && size_t(io.inputs[0]) < ctx->tensors_size
                                   ? &ctx->tensors[io.inputs[0]] : nullptr;
  const int type = x0 && x0->type == kN2uqTfLiteInt8 ? kN2uqTfLiteInt8 : kN2uqTfLiteFloat32;
  N2uqTfLiteTensor* x = GetTensor(ctx, io.inputs[0], type, "input", err);
  if (!x || !CheckBytes(ctx, x, "input", false, err)) return false;
  if (x->dims->size != 4) {
    *err = "PAD input must be a 4-D float32 or int8 tensor";
    return false;
  }
  int32_t pads[4];
  if (!PadAmounts(ctx, io, pads, err)) return false;
  N2uqTfLiteTensor* out = GetOutput(ctx, io, type, err);
  return out && Resize(ctx, out,
                       {x->dims->data[0], int64_t(x->dims->data[1]) + pads[0] + pads[1],
                        int64_t(x->dims->data[2]) + pads[2] + pads[3], x->dims->data[3]},
                       err);
}

bool InvokePad(N2uqTfLiteContext* ctx, const Io& io, std::string* err) {
  int32_t pads[4];
  if (io.inputs.size() != 2 || io.outputs.size() != 1 || !PadAmounts(ctx, io, pads, err)) {
    if (err->empty()) *err = "tensor lists changed after prepare";
    return false;
  }
  const N2uqTfLiteTensor& x = ctx->tensors[io.inputs[0]];
  N2uqTfLiteTensor& out = ctx->tensors[io.outputs[0]];
  if (x.data == nullptr || out.data == nullptr || IsConstant(&out) || !x.dims || x.dims->size != 4) {
    *err = "the input or output has no data";
    return false;
  }
  const size_t elem = x.type == kN2uqTfLiteInt8 ? 1 : 4;
  const int64_t n = x.dims->data[0], h = x.dims->data[1], w = x.dims->data[2], c = x.dims->data[3];
  const int64_t oh = h + pads[0] + pads[1], ow = w + pads[2] + pads[3];
  // Checked: dims changed behind prepare's back (negative ones, products past int64) never size a copy.
  int64_t in_bytes = 0, out_bytes = 0;
  if (!NumElements(&x, &in_bytes) || !CheckedMul(in_bytes, int64_t(elem), &in_bytes) ||
      !CheckedMul(n, oh, &out_bytes) || !CheckedMul(out_bytes, ow, &out_bytes) ||
      !CheckedMul(out_bytes, c, &out_bytes) || !CheckedMul(out_bytes, int64_t(elem), &out_bytes) ||
      out.bytes != size_t(out_bytes) || x.bytes != size_t(in_bytes)) {
    *err = "the input or output size changed after prepare";
    return false;
  }
  // One padded row of the output as a pattern: the fill value everywhere (0.0f is all zero bytes).
  const int8_t fill = x.type == kN2uqTfLiteInt8 ? int8_t(out.params.zero_point) : int8_t(0);
  const size_t row = size_t(ow * c) * elem, left = size_t(pads[2] * c) * elem, inner = size_t(w * c) * elem;
  auto* dst = static_cast<uint8_t*>(out.data);
  const auto* src = static_cast<const uint8_t*>(x.data);
  for (int64_t i = 0; i < n; ++i)
    for (int64_t y = 0; y < oh; ++y, dst += row) {
      const int64_t iy = y - pads[0];
      if (iy < 0 || iy >= h) {
        memset(dst, fill, row);
        continue;
      }
      memset(dst, fill, left);
      memcpy(dst + left, src + size_t((i * h + iy) * w * c) * elem, inner);
      memset(dst + left + inner, fill, row - left - inner);
    }
  return true;
}

int KernelPrepare(N2uqTfLiteContext* ctx, N2uqTfLiteNode* node) {
  Kernel* k = static_cast<Kernel*>(node->user_data);
  if (k == nullptr) return Report(ctx, nullptr, "kernel state is missing");
  if (!k->init_error.empty()) return Report(ctx, k, k->init_error);
  Io io;
  std::string err;
  if (!GetIo(k, node, &io, &err) ||
      !(k->kind == kBuiltinPad      ? PreparePad(ctx, k, io, &err)
        : IsBuiltinConv(k->kind) ? PrepareBuiltinConv(ctx, k, io, &err)
                                 : PrepareImpl(ctx, k, io, &err)))
    return Report(ctx, k, err);
  return kN2uqTfLiteOk;
}

// A fused op's layer output before its stage, when the op has no float output to hold it: per
// calling thread (ops of one interpreter run on its thread; interpreters on other threads get their
// own), grown to the largest layer it served.
std::vector<float>& StageScratch() {
  thread_local std::vector<float> scratch;
  return scratch;
}

// A fused op's output stage with its tensors (from the op's inputs after the layer's four, in the
// order of custom_ops "Fused output stages") and its outputs.
struct StageCall {
  N2uqOutputStage stage;
  float* out_float = nullptr;
  uint64_t* packed = nullptr;
  uint8_t* codes = nullptr;
  int64_t out_float_len = 0, packed_len = 0, codes_len = 0;
};

StageCall ResolveStage(const Kernel* k, const Io& io, N2uqTfLiteTensor* t) {
  StageCall c;
  N2uqOutputStage& st = c.stage;
  st = k->stage;
  size_t next = LayerInputs(k->kind);
  for (int i = 0; i < st.num_steps; ++i) {
    if (!StepHasInput(st.steps[i].kind)) continue;
    const N2uqTfLiteTensor& v = t[io.inputs[next++]];
    st.steps[i].values = static_cast<const float*>(v.data);
    st.steps[i].values_len = int64_t(v.bytes / 4);
  }
  if (st.quantize != N2UQ_QUANTIZE_NONE) {
    const N2uqTfLiteTensor& thr = t[io.inputs[next]];
    st.thresholds = static_cast<const float*>(thr.data);
    st.num_thresholds = int32_t(thr.bytes / 4);
  }
  size_t slot = 0;
  if (st.float_after >= 0) {
    c.out_float = static_cast<float*>(t[io.outputs[slot]].data);
    c.out_float_len = int64_t(t[io.outputs[slot]].bytes / 4);
    ++slot;
  }
  if (st.quantize == N2UQ_QUANTIZE_PACK) {
    c.packed = static_cast<uint64_t*>(t[io.outputs[slot]].data);
    c.packed_len = int64_t(t[io.outputs[slot]].bytes / 8);
  } else if (st.quantize == N2UQ_QUANTIZE_CODES) {
    c.codes = static_cast<uint8_t*>(t[io.outputs[slot]].data);
    c.codes_len = int64_t(t[io.outputs[slot]].bytes);
  }
  return c;
}

// Runs a fused op's output stage on the layer output `values`.
int RunStage(const Kernel* k, const Io& io, N2uqTfLiteTensor* t, const float* values, int64_t values_len,
             int threads, char* msg, size_t msg_len) {
  const StageCall c = ResolveStage(k, io, t);
  return n2uq_output_stage(&c.stage, k->layer_elements / k->layer_channels, k->layer_channels, values, values_len,
                           c.out_float, c.out_float_len, c.packed, c.packed_len, c.codes, c.codes_len,
                           k->settings.isa, threads, msg, msg_len);
}

// A layer op's per-channel multiplier and bias (inputs 2 and 3) and the channels both hold.
struct LayerScale {
  const float *multiplier, *bias;
  int64_t channels;
};

LayerScale ReadLayerScale(const Io& io, const N2uqTfLiteTensor* t) {
  const N2uqTfLiteTensor& mult = t[io.inputs[2]];
  const N2uqTfLiteTensor& bias = t[io.inputs[3]];
  return {static_cast<const float*>(mult.data), static_cast<const float*>(bias.data),
          int64_t(mult.bytes < bias.bytes ? mult.bytes : bias.bytes) / 4};
}

// The quantizer of a conv that quantizes its own input (Kernel::quantize_in), and where its codes go
// (null: nowhere outside the conv).
struct QuantizeCall {
  N2uqInputQuantizer quantizer;
  uint64_t* codes = nullptr;
  int64_t codes_len = 0;
};

QuantizeCall ResolveInputQuantize(const Kernel* k, N2uqTfLiteTensor* t) {
  const Kernel::InputQuantize& in = k->quantize_in;
  QuantizeCall q;
  q.quantizer.x = static_cast<const float*>(t[in.x].data);
  q.quantizer.x_len = int64_t(t[in.x].bytes / 4);
  q.quantizer.thresholds = static_cast<const float*>(t[in.thresholds].data);
  q.quantizer.num_thresholds = int32_t(t[in.thresholds].bytes / 4);
  q.quantizer.beta1 = in.beta1;
  if (in.keep_codes) {
    q.codes = static_cast<uint64_t*>(t[in.codes].data);
    q.codes_len = int64_t(t[in.codes].bytes / 8);
  }
  return q;
}

// A fused conv or fully connected op: the plan runs the layer and its stage (in the conv's own
// output pass where its path can, n2uq_conv_plan_run_stage).
int RunPlanStage(const Kernel* k, const Io& io, N2uqTfLiteTensor* t, const N2uqConvShape* shape, int threads,
                 char* msg, size_t msg_len) {
  const N2uqTfLiteTensor& x = t[io.inputs[0]];
  const LayerScale a = ReadLayerScale(io, t);
  const StageCall c = ResolveStage(k, io, t);
  if (k->quantize_in.x >= 0) {
    const QuantizeCall q = ResolveInputQuantize(k, t);
    return n2uq_conv_plan_run_quantizing(k->plan.get(), shape, &q.quantizer, q.codes, q.codes_len, a.multiplier,
                                         a.bias, a.channels, &c.stage, c.out_float, c.out_float_len, c.packed,
                                         c.packed_len, c.codes, c.codes_len, threads, msg, msg_len);
  }
  return n2uq_conv_plan_run_stage(k->plan.get(), shape, static_cast<const uint64_t*>(x.data), int64_t(x.bytes / 8),
                                  a.multiplier, a.bias, a.channels, &c.stage, c.out_float, c.out_float_len, c.packed,
                                  c.packed_len, c.codes, c.codes_len, threads, msg, msg_len);
}

// Every other op: the layer (into its float output, or a fused op's scratch when the op has no
// float output; the stage then runs over it).
int RunLayer(Kernel* k, const Io& io, N2uqTfLiteTensor* t, int threads, char* msg, size_t msg_len) {
  const N2uqTfLiteTensor& x = t[io.inputs[0]];
  N2uqTfLiteTensor& out = t[io.outputs[0]];
  const int isa = k->settings.isa;
  int status = N2UQ_ERR_INTERNAL;
  float* dest = static_cast<float*>(out.data);
  int64_t dest_len = int64_t(out.bytes / 4);
  if (IsFused(k->kind) && k->stage.float_after < 0) {
    std::vector<float>& scratch = StageScratch();
    if (scratch.size() < static_cast<size_t>(k->layer_elements)) scratch.resize(static_cast<size_t>(k->layer_elements));
    dest = scratch.data();
    dest_len = k->layer_elements;
  }
  switch (BaseKind(k->kind)) {
    case kQuantizePack:
    case kQuantize: {
      const N2uqTfLiteTensor& thr = t[io.inputs[1]];
      const int64_t x_len = int64_t(x.bytes / 4);
      const int32_t n_thr = int32_t(thr.bytes / 4);
      if (k->kind == kQuantizePack)
        status = n2uq_quantize_and_pack(static_cast<const float*>(x.data), x_len, x_len / k->channels, k->channels,
                                        static_cast<const float*>(thr.data), n_thr, k->beta1, k->bits,
                                        static_cast<uint64_t*>(out.data), int64_t(out.bytes / 8), isa, threads, msg,
                                        msg_len);
      else
        status = n2uq_quantize_codes(static_cast<const float*>(x.data), x_len, static_cast<const float*>(thr.data),
                                     n_thr, k->beta1, k->bits, static_cast<uint8_t*>(out.data), int64_t(out.bytes),
                                     isa, threads, msg, msg_len);
      break;
    }
    case kConv2D:
    case kFullyConnected: {
      const LayerScale a = ReadLayerScale(io, t);
      if (k->quantize_in.x >= 0) {
        const QuantizeCall q = ResolveInputQuantize(k, t);
        status = n2uq_conv_plan_run_quantizing(k->plan.get(), &k->conv, &q.quantizer, q.codes, q.codes_len,
                                               a.multiplier, a.bias, a.channels, nullptr, dest, dest_len, nullptr, 0,
                                               nullptr, 0, threads, msg, msg_len);
        break;
      }
      status = n2uq_conv_plan_run(k->plan.get(), BaseKind(k->kind) == kConv2D ? &k->conv : &k->fc_shape,
                                  static_cast<const uint64_t*>(x.data), int64_t(x.bytes / 8), a.multiplier, a.bias,
                                  a.channels, dest, nullptr, dest_len, threads, msg, msg_len);
      break;
    }
    case kDepthwise: {
      const LayerScale a = ReadLayerScale(io, t);
      status = n2uq_depthwise_conv2d(&k->conv, static_cast<const uint8_t*>(x.data), int64_t(x.bytes),
                                     k->weight_codes.data(), int64_t(k->weight_codes.size()), a.multiplier, a.bias,
                                     a.channels, dest, nullptr, dest_len, isa, threads, msg, msg_len);
      break;
    }
    case kMaxPool2DFused:
      if (k->pool_int8)
        status = n2uq_max_pool2d_int8(&k->pool, static_cast<const int8_t*>(x.data), int64_t(x.bytes), k->pool_zero_point,
                                      k->pool_scale, dest, dest_len, isa, threads, msg, msg_len);
      else
        status = n2uq_max_pool2d(&k->pool, static_cast<const float*>(x.data), int64_t(x.bytes / 4), dest, dest_len,
                                 isa, threads, msg, msg_len);
      break;
  }
  if (status == N2UQ_OK && IsFused(k->kind)) status = RunStage(k, io, t, dest, dest_len, threads, msg, msg_len);
  return status;
}

bool InvokeImpl(N2uqTfLiteContext* ctx, Kernel* k, const Io& io, char* msg, size_t msg_len, std::string* err) {
  // Shapes were validated in prepare; re-check the data pointers and sizes cheaply, because
  // a caller may have resized an input without re-preparing.
  if (int(io.inputs.size()) != ExpectedInputs(k) || int(io.outputs.size()) != ExpectedOutputs(k)) {
    *err = "tensor lists changed after prepare";
    return false;
  }
  // A conv that quantizes its own input reads the quantizer's input and thresholds instead of the
  // codes between them, which the interpreter need not have allocated.
  const Kernel::InputQuantize& in = k->quantize_in;
  std::vector<int> read = io.inputs;
  if (in.x >= 0) {
    if (!in.keep_codes) read.erase(read.begin());
    read.push_back(in.x);
    read.push_back(in.thresholds);
  }
  for (int idx : read)
    if (idx < 0 || static_cast<size_t>(idx) >= ctx->tensors_size || ctx->tensors[idx].data == nullptr) {
      *err = "an input tensor has no data";
      return false;
    }
  for (int out_idx : io.outputs)
    if (out_idx < 0 || static_cast<size_t>(out_idx) >= ctx->tensors_size || ctx->tensors[out_idx].data == nullptr ||
        IsConstant(&ctx->tensors[out_idx])) {
      *err = "an output tensor has no data or is a constant";
      return false;
    }
  N2uqTfLiteTensor* t = ctx->tensors;
  const int threads = Threads(k, ctx);
  const bool plan_stage = IsFused(k->kind) && (BaseKind(k->kind) == kConv2D || BaseKind(k->kind) == kFullyConnected);
  const int status = plan_stage ? RunPlanStage(k, io, t, BaseKind(k->kind) == kConv2D ? &k->conv : &k->fc_shape,
                                               threads, msg, msg_len)
                                : RunLayer(k, io, t, threads, msg, msg_len);
  if (status != N2UQ_OK) {
    *err = std::string("kernel failed: ") + (msg[0] ? msg : "unknown error");
    return false;
  }
  return true;
}

int KernelInvoke(N2uqTfLiteContext* ctx, N2uqTfLiteNode* node) {
  Kernel* k = static_cast<Kernel*>(node->user_data);
  if (k == nullptr) return Report(ctx, nullptr, "kernel state is missing");
  if (!k->init_error.empty()) return Report(ctx, k, k->init_error);
  const auto start = std::chrono::steady_clock::now();
  Io io;
  std::string err;
  char msg[512] = {0};
  if (!GetIo(k, node, &io, &err) || !(k->kind == kBuiltinPad ? InvokePad(ctx, io, &err)
                                      : IsBuiltinConv(k->kind) ? InvokeBuiltinConv(ctx, k, io, &err)
                                                               : InvokeImpl(ctx, k, io, msg, sizeof(msg), &err)))
    return Report(ctx, k, err);
  if (k->profile) {
    const auto ns = std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now() - start);
    k->profile->invocations.fetch_add(1, std::memory_order_relaxed);
    k->profile->nanoseconds.fetch_add(uint64_t(ns.count()), std::memory_order_relaxed);
    int path = 0;  // a plan's trial may have switched its path on this run
    if (k->plan && n2uq_conv_plan_info(k->plan.get(), nullptr, &path) == N2UQ_OK) k->profile->path.store(path);
  }
  return kN2uqTfLiteOk;
}

const char* KernelProfilingString(const N2uqTfLiteContext*, const N2uqTfLiteNode* node) {
  const Kernel* k = node ? static_cast<const Kernel*>(node->user_data) : nullptr;
  return k ? k->label.c_str() : "N2UQ";
}

N2uqTfLiteRegistration DelegateKernelRegistration() {
  N2uqTfLiteRegistration r;
  memset(&r, 0, sizeof(r));  // registration_external, async_kernel etc. must be NULL
  r.init = DelegateKernelInit;
  r.free = KernelFree;
  r.prepare = KernelPrepare;
  r.invoke = KernelInvoke;
  r.profiling_string = KernelProfilingString;
  r.builtin_code = kBuiltinDelegate;
  r.custom_name = "N2UQDelegate";
  r.version = 1;
  return r;
}

// ----------------------------------------------------------------- delegate

void RecordAbiProbe(N2uqTfLiteContext* ctx, const N2uqTfLiteIntArray* plan) {
  std::string s = "tensors_size " + std::to_string(ctx->tensors_size) + "\n";
  s += "recommended_num_threads " + std::to_string(ctx->recommended_num_threads) + "\n";
  for (size_t i = 0; i < ctx->tensors_size; ++i) {
    const N2uqTfLiteTensor& t = ctx->tensors[i];
    s += "tensor " + std::to_string(i) + " type " + std::to_string(t.type) + " bytes " + std::to_string(t.bytes) +
         " alloc " + std::to_string(t.allocation_type) + " const_data " +
         std::to_string(t.allocation_type == kN2uqTfLiteMmapRo && t.data != nullptr) + " name " +
         (t.name ? t.name : "") + " dims";
    for (int d = 0; t.dims && d < t.dims->size; ++d) s += " " + std::to_string(t.dims->data[d]);
    s += " signature";  // the file's shape: read for files without a padding option (ResolvePadding)
    for (int d = 0; t.dims_signature && d < t.dims_signature->size; ++d)
      s += " " + std::to_string(t.dims_signature->data[d]);
    s += "\n";
  }
  for (int i = 0; i < plan->size; ++i) {
    N2uqTfLiteNode* node = nullptr;
    N2uqTfLiteRegistration* reg = nullptr;
    if (ctx->GetNodeAndRegistration(ctx, plan->data[i], &node, &reg) != kN2uqTfLiteOk) continue;
    s += "node " + std::to_string(plan->data[i]) + " builtin " + std::to_string(reg->builtin_code) + " custom " +
         (reg->custom_name ? reg->custom_name : "-") + " options " + std::to_string(node->custom_initial_data_size) +
         " inputs";
    for (int j = 0; node->inputs && j < node->inputs->size; ++j) s += " " + std::to_string(node->inputs->data[j]);
    s += " outputs";
    for (int j = 0; node->outputs && j < node->outputs->size; ++j) s += " " + std::to_string(node->outputs->data[j]);
    s += "\n";
  }
  std::lock_guard<std::mutex> lock(g_mutex);
  g_abi_probe = s;
}

// Input quantize in the conv: an N2UQQuantizePack whose packed output one claimed N2UQConv2D(Fused)
// reads as its input and no other node of the plan reads is claimed with that conv, as one kernel
// that quantizes the float input itself (n2uq_conv_plan_run_quantizing: where the conv's path can,
// inside its GEMMs, which hid 26-39% of the quantizer's time on Zen 5). One kernel, not two: the float
// input then lives until the conv runs (with the quantize node on its own, the interpreter may reuse
// its memory once that node has run). A packed tensor that is also a graph output stays an output
// of the pair, which then writes it (DelegateKernelInit).
void MergeInputQuantizes(N2uqTfLiteContext* ctx, const N2uqTfLiteIntArray* plan, std::vector<ClaimedNode>* claims) {
  for (ClaimedNode& q : *claims) {
    if (q.kind != kQuantizePack || q.outputs.size() != 1 || q.inputs.size() != 2) continue;
    const int codes = q.outputs[0];
    int readers = 0;
    for (int i = 0; i < plan->size; ++i) {
      N2uqTfLiteNode* node = nullptr;
      N2uqTfLiteRegistration* reg = nullptr;
      if (ctx->GetNodeAndRegistration(ctx, plan->data[i], &node, &reg) != kN2uqTfLiteOk || !node || !node->inputs)
        continue;
      for (int j = 0; j < node->inputs->size; ++j) readers += node->inputs->data[j] == codes ? 1 : 0;
    }
    // The conv must come right after the quantize in the plan: with other nodes between them the
    // interpreter may split the pair into two kernels (a residual computed in between).
    int next = -1;
    for (int i = 0; i + 1 < plan->size; ++i)
      if (plan->data[i] == q.node_index) next = plan->data[i + 1];
    if (readers != 1 || next < 0) continue;
    const std::unique_ptr<Kernel> quantize(NewKernel(kQuantizePack, q.options.data(), q.options.size()));
    for (ClaimedNode& c : *claims)
      if ((c.kind == kConv2D || c.kind == kConv2DFused) && c.node_index == next && c.quantize_node < 0 &&
          !c.inputs.empty() && c.inputs[0] == codes) {
        // Options that disagree (bits, channels) or do not parse: each op reports its own problem.
        const std::unique_ptr<Kernel> conv(NewKernel(c.kind, c.options.data(), c.options.size()));
        if (!quantize->init_error.empty() || !conv->init_error.empty() || quantize->bits != conv->conv.act_bits ||
            quantize->channels != conv->conv.in_channels)
          break;
        c.quantize_node = q.node_index;
        c.quantize_inputs = q.inputs;
        c.quantize_options = q.options;
        q.merged = true;
        break;
      }
  }
}

int DelegatePrepare(N2uqTfLiteContext* ctx, N2uqTfLiteDelegate* delegate) {
  auto* d = static_cast<DelegateData*>(delegate->data_);
  N2uqTfLiteIntArray* plan = nullptr;
  if (ctx->GetExecutionPlan(ctx, &plan) != kN2uqTfLiteOk || plan == nullptr) {
    ctx->ReportError(ctx, "%s", "n2uq delegate: cannot read the execution plan");
    return kN2uqTfLiteDelegateError;
  }
  if (d->settings.abi_probe) RecordAbiProbe(ctx, plan);
  // Collect first: replacing nodes rebuilds the execution plan `plan` points into.
  std::vector<ClaimedNode> claims;
  for (int i = 0; i < plan->size; ++i) {
    N2uqTfLiteNode* node = nullptr;
    N2uqTfLiteRegistration* reg = nullptr;
    if (ctx->GetNodeAndRegistration(ctx, plan->data[i], &node, &reg) != kN2uqTfLiteOk || !node || !reg) continue;
    if (reg->builtin_code == kN2uqTfLiteBuiltinConv2d) {
      ClaimedNode c;
      if (ClaimBuiltinConv(ctx, node, d->settings, &c)) {
        c.node_index = plan->data[i];
        claims.push_back(std::move(c));
      }
      continue;
    }
    if (reg->builtin_code != kN2uqTfLiteBuiltinCustom) continue;
    const int kind = OpKindOf(reg->custom_name);
    if (kind < 0) continue;
    ClaimedNode c;
    c.kind = kind;
    c.node_index = plan->data[i];
    if (node->inputs) c.inputs.assign(node->inputs->data, node->inputs->data + node->inputs->size);
    if (node->outputs) c.outputs.assign(node->outputs->data, node->outputs->data + node->outputs->size);
    if (node->custom_initial_data && node->custom_initial_data_size > 0) {
      const auto* p = static_cast<const uint8_t*>(node->custom_initial_data);
      c.options.assign(p, p + node->custom_initial_data_size);
    }
    // A node that writes one of its own inputs is refused here: the interpreter's partitioning
    // of such a node fails without a message, and no kernel could run it.
    for (int out : c.outputs)
      for (size_t j = 0; j < c.inputs.size(); ++j)
        if (c.inputs[j] == out) {
          ReportNode(ctx, kind, c.node_index,
                     "output " + TensorLabel(ctx, out) + " is also input " + std::to_string(j) + " of the op");
          return kN2uqTfLiteDelegateError;
        }
    claims.push_back(std::move(c));
  }
  // The PADs feeding the builtin convs claimed above (ClaimPadBefore).
  const size_t claimed = claims.size();
  for (size_t ci = 0; ci < claimed; ++ci) {
    if (!IsBuiltinConv(claims[ci].kind) || claims[ci].inputs.empty()) continue;
    const int wanted = claims[ci].inputs[0];
    for (int i = 0; i < plan->size; ++i) {
      N2uqTfLiteNode* node = nullptr;
      N2uqTfLiteRegistration* reg = nullptr;
      if (ctx->GetNodeAndRegistration(ctx, plan->data[i], &node, &reg) != kN2uqTfLiteOk || !node || !reg ||
          reg->builtin_code != kN2uqTfLiteBuiltinPad || !node->outputs || node->outputs->size != 1 ||
          node->outputs->data[0] != wanted)
        continue;
      bool taken = false;
      for (const ClaimedNode& other : claims) taken = taken || other.node_index == plan->data[i];
      ClaimedNode c;
      if (!taken && ClaimPadBefore(ctx, node, &c)) {
        c.node_index = plan->data[i];
        claims.push_back(std::move(c));
      }
    }
  }
  if (d->settings.quantize_into_conv) MergeInputQuantizes(ctx, plan, &claims);
  const N2uqTfLiteRegistration reg = DelegateKernelRegistration();
  struct { int size; int data[2]; } nodes;  // a TfLiteIntArray of one node, or of a quantize and its conv
  for (const ClaimedNode& c : claims) {
    if (c.merged) continue;  // replaced with its conv
    nodes.size = 0;
    if (c.quantize_node >= 0) nodes.data[nodes.size++] = c.quantize_node;
    nodes.data[nodes.size++] = c.node_index;
    d->pending = &c;  // read by DelegateKernelInit, which the call below runs synchronously
    const int status = ctx->ReplaceNodeSubsetsWithDelegateKernels(
        ctx, reg, reinterpret_cast<const N2uqTfLiteIntArray*>(&nodes), delegate);
    d->pending = nullptr;
    if (status != kN2uqTfLiteOk) return status;
  }
  return kN2uqTfLiteOk;
}

bool ParseSetting(Settings* s, const char* key, const char* value, std::string* err) {
  const std::string k = key ? key : "", v = value ? value : "";
  if (k == "num_threads") {
    char* end = nullptr;
    const long n = strtol(v.c_str(), &end, 10);
    if (v.empty() || *end != 0 || n < 0 || n > N2UQ_MAX_THREADS) {
      *err = "num_threads must be an integer in 0.." + std::to_string(N2UQ_MAX_THREADS) + " (0: the interpreter's)";
      return false;
    }
    s->num_threads = int(n);
    return true;
  }
  if (k == "isa") {
    static const char* const names[] = {"auto", "portable", "avx2", "avx512", "neon"};
    for (int i = 0; i < 5; ++i)
      if (v == names[i]) {
        char msg[256] = {0};
        const int resolved = n2uq_resolve_isa(i, msg, sizeof(msg));
        if (resolved < 0) {
          *err = std::string("isa '") + v + "': " + msg;
          return false;
        }
        s->isa = i;
        return true;
      }
    *err = "isa must be auto, portable, avx2, avx512 or neon, got '" + v + "'";
    return false;
  }
  if (k == "path") {
    static const char* const names[] = {"auto", "bitserial", "dot", "lut", "amx"};
    for (int i = 0; i < N2UQ_NUM_PATHS; ++i)
      if (v == names[i]) {
        s->path = i;
        return true;
      }
    *err = "path must be auto, bitserial, dot, lut or amx, got '" + v + "'";
    return false;
  }
  if (k == "int8_conv" || k == "float_conv") {
    static const char* const names[] = {"off", "auto", "all"};
    for (int i = 0; i < 3; ++i)
      if (v == names[i]) {
        (k == "int8_conv" ? s->int8_conv : s->float_conv) = i;
        return true;
      }
    *err = k + " must be off, auto or all, got '" + v + "'";
    return false;
  }
  if (k == "abi_probe") {
    s->abi_probe = v == "1" || v == "true" || v == "True";
    return true;
  }
  if (k == "quantize_into_conv") {
    if (v != "0" && v != "1") {
      *err = "quantize_into_conv must be 0 or 1, got '" + v + "'";
      return false;
    }
    s->quantize_into_conv = v == "1";
    return true;
  }
  *err = "unknown option '" + k +
         "' (known: num_threads, isa, path, int8_conv, float_conv, abi_probe, quantize_into_conv)";
  return false;
}

}  // namespace

// ----------------------------------------------------------------- exported C API

N2UQ_EXPORT N2uqTfLiteDelegate* n2uq_delegate_create(const char* const* keys, const char* const* values,
                                                     size_t count, char* err, size_t err_len) {
  Settings settings;
  std::string error;
  for (size_t i = 0; i < count; ++i)
    if (!ParseSetting(&settings, keys ? keys[i] : nullptr, values ? values[i] : nullptr, &error)) {
      if (err && err_len) snprintf(err, err_len, "n2uq delegate: %s", error.c_str());
      return nullptr;
    }
  auto* d = new DelegateData;
  d->settings = settings;
  auto* delegate = new N2uqTfLiteDelegate;
  memset(delegate, 0, sizeof(*delegate));
  delegate->data_ = d;
  delegate->Prepare = DelegatePrepare;
  delegate->flags = kN2uqTfLiteDelegateFlagsAllowDynamicTensors;
  return delegate;
}

N2UQ_EXPORT void n2uq_delegate_delete(N2uqTfLiteDelegate* delegate) {
  if (delegate == nullptr) return;
  delete static_cast<DelegateData*>(delegate->data_);
  delete delegate;
}

// External-delegate plugin ABI. `count` is read as 32 bits: Python's loader passes a C int.
N2UQ_EXPORT N2uqTfLiteDelegate* tflite_plugin_create_delegate(char** keys, char** values, size_t count,
                                                              void (*report_error)(const char*)) {
  char err[512] = {0};
  N2uqTfLiteDelegate* delegate = n2uq_delegate_create(keys, values, size_t(uint32_t(count)), err, sizeof(err));
  if (delegate == nullptr && report_error) report_error(err);
  return delegate;
}

N2UQ_EXPORT void tflite_plugin_destroy_delegate(N2uqTfLiteDelegate* delegate) { n2uq_delegate_delete(delegate); }

// Op-resolver route: registrations for MutableOpResolver::AddCustom(name, registration).
N2UQ_EXPORT int n2uq_tflite_op_count(void) { return kNumOps; }

N2UQ_EXPORT const char* n2uq_tflite_op_name(int index) {
  return index >= 0 && index < kNumOps ? kOpNames[index] : nullptr;
}

N2UQ_EXPORT const N2uqTfLiteRegistration* n2uq_tflite_registration(const char* op_name) {
  static N2uqTfLiteRegistration regs[kNumOps];
  static std::once_flag once;
  std::call_once(once, [] {
    void* (*inits[])(N2uqTfLiteContext*, const char*, size_t) = {
        ResolverKernelInit<kQuantizePack>, ResolverKernelInit<kQuantize>, ResolverKernelInit<kConv2D>,
        ResolverKernelInit<kDepthwise>, ResolverKernelInit<kFullyConnected>, ResolverKernelInit<kConv2DFused>,
        ResolverKernelInit<kDepthwiseFused>, ResolverKernelInit<kFullyConnectedFused>,
        ResolverKernelInit<kMaxPool2DFused>};
    static_assert(sizeof(inits) / sizeof(inits[0]) == kNumOps, "one resolver init per op kind");
    for (int i = 0; i < kNumOps; ++i) {
      memset(&regs[i], 0, sizeof(regs[i]));
      regs[i].init = inits[i];
      regs[i].free = KernelFree;
      regs[i].prepare = KernelPrepare;
      regs[i].invoke = KernelInvoke;
      regs[i].profiling_string = KernelProfilingString;
      regs[i].builtin_code = kN2uqTfLiteBuiltinCustom;
      regs[i].custom_name = kOpNames[i];
      regs[i].version = 1;
    }
  });
  const int kind = OpKindOf(op_name);
  return kind >= 0 ? &regs[kind] : nullptr;
}

N2UQ_EXPORT int n2uq_delegate_abi_version(void) { return 1; }

// Per-op timing of delegate kernels (steady clock around each invoke), for benchmarks.
N2UQ_EXPORT int n2uq_delegate_profile_count(void) {
  std::lock_guard<std::mutex> lock(g_mutex);
  return int(g_profiles.size());
}

N2UQ_EXPORT int n2uq_delegate_profile_entry(int index, const void** delegate, char* op, size_t op_len, char* name,
                                            size_t name_len, int* node_index, uint64_t* invocations,
                                            uint64_t* nanoseconds) {
  std::lock_guard<std::mutex> lock(g_mutex);
  if (index < 0 || size_t(index) >= g_profiles.size()) return -1;
  const ProfileEntry& e = *g_profiles[index];
  if (delegate) *delegate = e.delegate;
  if (op && op_len) snprintf(op, op_len, "%s", OpName(e.op));
  if (name && name_len) snprintf(name, name_len, "%s", e.output_name.c_str());
  if (node_index) *node_index = e.node_index;
  if (invocations) *invocations = e.invocations.load();
  if (nanoseconds) *nanoseconds = e.nanoseconds.load();
  return 0;
}

// The kernel path (N2UQ_PATH_*) profile entry `index` runs (0 for ops without paths), or -1.
N2UQ_EXPORT int n2uq_delegate_profile_path(int index) {
  std::lock_guard<std::mutex> lock(g_mutex);
  if (index < 0 || size_t(index) >= g_profiles.size()) return -1;
  return g_profiles[index]->path.load();
}

N2UQ_EXPORT void n2uq_delegate_profile_reset(void) {
  std::lock_guard<std::mutex> lock(g_mutex);
  for (auto& e : g_profiles) {
    e->invocations = 0;
    e->nanoseconds = 0;
  }
}

// ABI self-test: the tensor and node table the last delegate with abi_probe=1 saw in its
// Prepare, as text. Returns the full length (copies at most out_len - 1 bytes).
N2UQ_EXPORT size_t n2uq_delegate_abi_probe(char* out, size_t out_len) {
  std::lock_guard<std::mutex> lock(g_mutex);
  if (out && out_len) snprintf(out, out_len, "%s", g_abi_probe.c_str());
  return g_abi_probe.size();
}
