// delegate_selftest.cc: the FlexBuffer reader and the kernels' validation under a fake
// TfLiteContext, meant to be built with -fsanitize=address,undefined (tests/test_delegate.py).
// The reader gets truncated, bit-flipped and random buffers; the kernels get malformed
// tensors and options through both the op-resolver registration and the delegate path. Builtin
// CONV_2D nodes (int8, float32) and the PAD before one: claimed as the options say and run against
// a scalar reference; malformed ones left to TFLite or refused with an error, resized inputs too.
// Any out-of-bounds read aborts the sanitized binary; wrong answers print FAIL.
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <algorithm>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "flexbuffer_options.h"
#include "n2uq_core.h"
#include "tflite_abi.h"

extern "C" {
const N2uqTfLiteRegistration* n2uq_tflite_registration(const char* op_name);
int n2uq_tflite_op_count(void);
const char* n2uq_tflite_op_name(int index);
N2uqTfLiteDelegate* n2uq_delegate_create(const char* const* keys, const char* const* values, size_t count, char* err,
                                         size_t err_len);
void n2uq_delegate_delete(N2uqTfLiteDelegate* delegate);
}

static int failures = 0;
#define CHECK(cond, ...)                   \
  do {                                     \
    if (!(cond)) {                         \
      printf("FAIL %s:%d ", __FILE__, __LINE__); \
      printf(__VA_ARGS__);                 \
      printf("\n");                        \
      ++failures;                          \
    }                                      \
  } while (0)

static std::vector<uint8_t> Hex(const char* hex) {
  std::vector<uint8_t> out;
  for (size_t i = 0; hex[i] && hex[i + 1]; i += 2) out.push_back(uint8_t(strtoul(std::string(hex + i, 2).c_str(), nullptr, 16)));
  return out;
}

// Options written by the TFLite converter for N2UQQuantizePack(bits=2, channels=5, beta1=0.75)
// and N2UQConv2D(in 5, out 3, 3x3, stride 1, dilation 1, pads 1, act 2, weight 2).
static const char* kPackOptions =
    "62657461310062697473006368616e6e656c73000315100c0300000001000000030000000000403f02000000050000000e06060f2601";
static const char* kConvOptions =
    "6163745f626974730064696c6174696f6e5f6865696768740064696c6174696f6e5f776964746800696e5f6368616e6e656c73006b65"
    "726e656c5f686569676874006b65726e656c5f7769647468006f75745f6368616e6e656c73007061645f626f74746f6d007061645f6c"
    "656674007061645f7269676874007061645f746f70007374726964655f686569676874007374726964655f7769647468007765696768"
    "745f62697473000eaaa293857a6d61554b433a33261a0e010e020101050303030101010101010204040404040404040404040404041c"
    "2401";

// N2UQConv2DFused: the conv above with an output stage PRELU (step 0), ADD of a residual (step 1),
// the float output after step 1, then quantize-and-pack (2 bits, beta1 0.75); written by flexbuffers.Dumps.
static const char* kFusedOptions =
    "6163745f626974730064696c6174696f6e5f6865696768740064696c6174696f6e5f776964746800696e5f6368616e6e656c73006b65"
    "726e656c5f686569676874006b65726e656c5f7769647468006f75745f6368616e6e656c73007061645f626f74746f6d007061645f6c"
    "656674007061645f7269676874007061645f746f70007374726964655f686569676874007374726964655f7769647468007765696768"
    "745f6269747300737465707300737465705f3000737465705f3100666c6f61745f6f7574707574007175616e74697a65007175616e74"
    "697a655f62697473007175616e74697a655f62657461310015f1e9da37cdc2b5a99d938b82331d2c514b598174680000170000000100"
    "000015000000020000000100000001000000010000000500000003000000030000000300000001000000010000000100000001000000"
    "010000000000403f02000000030000000400000002000000010000000100000002000000060606060606060606060606060e06060606"
    "060606692601";

// N2UQMaxPool2DFused(channels 5, 3x3 filter, stride 2, pads top 1 bottom 1 left 1 right 0) with the
// stage PRELU (step 0), the float output before it (float_output 0), then quantize-and-pack (2 bits,
// beta1 1.0); written by flexbuffers.Dumps. kPoolOptionsNoFilterWidth: the same without filter_width.
static const char* kPoolOptions =
    "6368616e6e656c730066696c7465725f6865696768740066696c7465725f7769647468007374726964655f686569676874007374"
    "726964655f7769647468007061645f746f70007061645f626f74746f6d007061645f6c656674007061645f726967687400737465"
    "707300737465705f30007175616e74697a65007175616e74697a655f62697473007175616e74697a655f626574613100666c6f61"
    "745f6f7574707574000fa69e91116359516e3c2635464d8f8200000012000000010000000f000000050000000300000003000000"
    "0000000001000000010000000000000001000000010000000000803f020000000300000001000000020000000200000006060606"
    "06060606060e06060606064b2601";
static const char* kPoolOptionsNoFilterWidth =
    "6368616e6e656c730066696c7465725f686569676874007374726964655f686569676874007374726964655f7769647468007061"
    "645f746f70007061645f626f74746f6d007061645f6c656674007061645f726967687400737465707300737465705f3000717561"
    "6e74697a65007175616e74697a655f62697473007175616e74697a655f626574613100666c6f61745f6f7574707574000e999110"
    "6258506d3b2534454c8e81000f000000010000000e000000050000000300000000000000010000000100000000000000010000"
    "00010000000000803f020000000300000001000000020000000200000006060606060606060e0606060606462601";

static void TestFlexBuffers(int iterations) {
  n2uq::FlexOptions o;
  std::string err;
  std::vector<uint8_t> pack = Hex(kPackOptions), conv = Hex(kConvOptions), fused = Hex(kFusedOptions),
                       pool = Hex(kPoolOptions);
  CHECK(o.Parse(pack.data(), pack.size(), &err), "pack options: %s", err.c_str());
  int64_t v = 0;
  double f = 0;
  CHECK(o.GetInt("bits", 1, 4, &v, &err) && v == 2, "bits");
  CHECK(o.GetInt("channels", 1, 100, &v, &err) && v == 5, "channels");
  CHECK(o.GetFloat("beta1", &f, &err) && f == 0.75, "beta1");
  CHECK(!o.GetInt("missing", 0, 1, &v, &err) && err.find("missing option") != std::string::npos, "missing");
  CHECK(!o.GetInt("bits", 3, 4, &v, &err) && err.find("out of range") != std::string::npos, "range");
  CHECK(o.Parse(conv.data(), conv.size(), &err) && o.entries().size() == 14, "conv options: %s", err.c_str());
  CHECK(o.Parse(fused.data(), fused.size(), &err) && o.entries().size() == 21, "fused options: %s", err.c_str());
  CHECK(o.GetInt("step_1", 1, 7, &v, &err) && v == 4 && o.GetFloat("quantize_beta1", &f, &err) && f == 0.75, "stage");
  CHECK(o.Parse(pool.data(), pool.size(), &err) && o.entries().size() == 15, "pool options: %s", err.c_str());
  CHECK(o.GetInt("pad_right", 0, 4, &v, &err) && v == 0 && o.GetInt("stride_width", 1, 4, &v, &err) && v == 2 &&
            o.GetFloat("quantize_beta1", &f, &err) && f == 1.0,
        "pool options' values");
  CHECK(!o.Parse(nullptr, 0, &err), "empty buffer");
  std::mt19937_64 rng(1234);
  for (const std::vector<uint8_t>* base : {&pack, &conv, &fused, &pool}) {
    for (size_t n = 0; n < base->size(); ++n) {  // every prefix and suffix, in exact-size heap copies
      std::vector<uint8_t> a(base->begin(), base->begin() + n), b(base->end() - n, base->end());
      o.Parse(a.empty() ? nullptr : a.data(), a.size(), &err);
      o.Parse(b.empty() ? nullptr : b.data(), b.size(), &err);
    }
    for (int it = 0; it < iterations; ++it) {
      std::vector<uint8_t> m(*base);
      const int flips = 1 + int(rng() % 4);
      for (int k = 0; k < flips; ++k) m[rng() % m.size()] = uint8_t(rng());
      if (o.Parse(m.data(), m.size(), &err)) {
        for (const auto& e : o.entries()) o.GetFloat(e.key.c_str(), &f, &err);
      }
    }
  }
  for (int it = 0; it < iterations; ++it) {
    std::vector<uint8_t> r(1 + rng() % 64);
    for (auto& byte : r) byte = uint8_t(rng());
    r.back() = uint8_t(1u << (rng() % 4));  // valid root width, so parsing goes deeper
    if (r.size() >= 2) r[r.size() - 2] = uint8_t((9 << 2) | (rng() % 4));  // a map root
    o.Parse(r.data(), r.size(), &err);
  }
}

// ------------------------------------------------------------------ fake interpreter

struct FakeInterpreter {
  N2uqTfLiteContext ctx;
  std::vector<N2uqTfLiteTensor> tensors;
  std::vector<std::vector<uint8_t>> storage;
  std::vector<N2uqTfLiteIntArray*> dims;
  std::string last_error;
  // graph for the delegate path
  N2uqTfLiteNode node;
  N2uqTfLiteRegistration node_reg;
  N2uqTfLiteIntArray* plan = nullptr;
  N2uqTfLiteIntArray* inputs = nullptr;
  N2uqTfLiteIntArray* outputs = nullptr;
  int replaced_status = -1;
  bool fail_resize = false;  // ResizeTensor fails, and frees the new shape as TFLite does
  // keep_kernel: each delegate kernel is only initialised when it replaces a node, then kept (with
  // the node it replaced) for the test to prepare, invoke and free (builtin CONV_2D and PAD tests)
  bool keep_kernel = false;
  int replace_calls = 0;
  struct Kept {
    int node_index;
    N2uqTfLiteRegistration reg;
    N2uqTfLiteNode node;
  };
  std::vector<Kept> kept;
  // nodes 1, 2, ... of the graph (node 0 is `node`)
  std::vector<N2uqTfLiteNode> more_nodes;
  std::vector<N2uqTfLiteRegistration> more_regs;
};

static FakeInterpreter* Self(N2uqTfLiteContext* c) { return reinterpret_cast<FakeInterpreter*>(c); }

static N2uqTfLiteIntArray* NewArray(const std::vector<int>& values) {
  auto* a = static_cast<N2uqTfLiteIntArray*>(malloc(sizeof(int) * (1 + values.size())));
  a->size = int(values.size());
  for (size_t i = 0; i < values.size(); ++i) a->data[i] = values[i];
  return a;
}

static size_t ElementSize(int type) {
  return type == kN2uqTfLiteInt64 ? 8 : type == kN2uqTfLiteUInt8 || type == kN2uqTfLiteInt8 ? 1 : 4;
}

static int FakeResize(N2uqTfLiteContext* c, N2uqTfLiteTensor* t, N2uqTfLiteIntArray* new_size) {
  FakeInterpreter* f = Self(c);
  if (f->fail_resize) {
    free(new_size);
    return kN2uqTfLiteError;
  }
  const size_t index = size_t(t - f->tensors.data());
  size_t n = 1;
  for (int i = 0; i < new_size->size; ++i) n *= size_t(new_size->data[i]);
  free(f->dims[index]);
  f->dims[index] = new_size;
  t->dims = new_size;
  t->bytes = n * ElementSize(t->type);
  f->storage[index].assign(t->bytes, 0xAB);
  t->data = t->bytes ? f->storage[index].data() : nullptr;
  return kN2uqTfLiteOk;
}

static void FakeReport(N2uqTfLiteContext* c, const char* format, ...) {
  char buf[1024];
  va_list args;
  va_start(args, format);
  vsnprintf(buf, sizeof(buf), format, args);
  va_end(args);
  Self(c)->last_error = buf;
}

static int FakePlan(N2uqTfLiteContext* c, N2uqTfLiteIntArray** plan) {
  *plan = Self(c)->plan;
  return kN2uqTfLiteOk;
}

static int FakeNode(N2uqTfLiteContext* c, int index, N2uqTfLiteNode** node, N2uqTfLiteRegistration** reg) {
  FakeInterpreter* f = Self(c);
  if (index == 0) {
    *node = &f->node;
    *reg = &f->node_reg;
    return kN2uqTfLiteOk;
  }
  if (index < 0 || size_t(index) > f->more_nodes.size()) return kN2uqTfLiteError;
  *node = &f->more_nodes[size_t(index) - 1];
  *reg = &f->more_regs[size_t(index) - 1];
  return kN2uqTfLiteOk;
}

// Runs the delegate kernel's whole life (init, prepare, invoke, free) like the interpreter would.
static int FakeReplace(N2uqTfLiteContext* c, N2uqTfLiteRegistration reg, const N2uqTfLiteIntArray* nodes,
                       N2uqTfLiteDelegate* delegate) {
  FakeInterpreter* f = Self(c);
  N2uqTfLiteDelegateParams params = {delegate, const_cast<N2uqTfLiteIntArray*>(nodes), f->inputs, f->outputs};
  N2uqTfLiteNode node = {};
  node.inputs = f->inputs;
  node.outputs = f->outputs;
  node.user_data = reg.init(c, reinterpret_cast<const char*>(&params), 0);
  ++f->replace_calls;
  if (f->keep_kernel) {
    f->kept.push_back({nodes->size == 1 ? nodes->data[0] : -1, reg, node});
    return kN2uqTfLiteOk;
  }
  int status = reg.prepare(c, &node);
  if (status == kN2uqTfLiteOk) status = reg.invoke(c, &node);
  reg.free(c, node.user_data);
  f->replaced_status = status;
  return kN2uqTfLiteOk;
}

static void Init(FakeInterpreter* f) {
  memset(&f->ctx, 0, sizeof(f->ctx));
  f->ctx.ResizeTensor = FakeResize;
  f->ctx.ReportError = FakeReport;
  f->ctx.GetExecutionPlan = FakePlan;
  f->ctx.GetNodeAndRegistration = FakeNode;
  f->ctx.ReplaceNodeSubsetsWithDelegateKernels = FakeReplace;
  f->ctx.recommended_num_threads = 2;
}

static int AddTensor(FakeInterpreter* f, int type, const std::vector<int>& shape, const char* name) {
  f->tensors.emplace_back();
  N2uqTfLiteTensor& t = f->tensors.back();
  memset(&t, 0, sizeof(t));
  t.type = type;
  t.name = name;
  size_t n = 1;
  for (int d : shape) n *= size_t(d);
  t.bytes = n * ElementSize(type);
  f->storage.emplace_back(t.bytes);  // exact size: ASan flags any read past it
  f->dims.push_back(NewArray(shape));
  return int(f->tensors.size()) - 1;
}

static void Finalize(FakeInterpreter* f) {
  for (size_t i = 0; i < f->tensors.size(); ++i) {
    f->tensors[i].dims = f->dims[i];
    f->tensors[i].data = f->storage[i].empty() ? nullptr : f->storage[i].data();
  }
  f->ctx.tensors = f->tensors.data();
  f->ctx.tensors_size = f->tensors.size();
}

static void Release(FakeInterpreter* f) {
  for (auto* d : f->dims) free(d);
  free(f->plan);
  free(f->inputs);
  free(f->outputs);
}

// Runs op `name` (FlexBuffer `options`) on the fake interpreter's tensors `ins` -> `outs`: through
// the op-resolver registration (init, prepare, invoke, free), or with `delegate_path` through the
// delegate's Prepare, which replaces the one-node plan (the kernel runs in FakeReplace) with the
// delegate options `settings` ({key, value} pairs). Returns the status; the error text is in f->last_error.
static int RunNode(FakeInterpreter* f, const char* name, const std::vector<uint8_t>& options,
                   const std::vector<int>& ins, const std::vector<int>& outs, bool delegate_path,
                   const std::vector<std::pair<const char*, const char*>>& settings) {
  int status;
  if (!delegate_path) {
    const N2uqTfLiteRegistration* reg = n2uq_tflite_registration(name);
    N2uqTfLiteNode node = {};
    node.inputs = NewArray(ins);
    node.outputs = NewArray(outs);
    node.user_data = reg->init(&f->ctx, reinterpret_cast<const char*>(options.data()), options.size());
    status = reg->prepare(&f->ctx, &node);
    if (status == kN2uqTfLiteOk) status = reg->invoke(&f->ctx, &node);
    reg->free(&f->ctx, node.user_data);
    free(node.inputs);
    free(node.outputs);
    return status;
  }
  f->plan = NewArray({0});
  f->inputs = NewArray(ins);
  f->outputs = NewArray(outs);
  memset(&f->node, 0, sizeof(f->node));
  f->node.inputs = f->inputs;
  f->node.outputs = f->outputs;
  f->node.custom_initial_data = options.data();
  f->node.custom_initial_data_size = int(options.size());
  memset(&f->node_reg, 0, sizeof(f->node_reg));
  f->node_reg.builtin_code = kN2uqTfLiteBuiltinCustom;
  f->node_reg.custom_name = name;
  std::vector<const char*> keys, values;
  for (const auto& kv : settings) {
    keys.push_back(kv.first);
    values.push_back(kv.second);
  }
  char err[256];
  N2uqTfLiteDelegate* d = n2uq_delegate_create(keys.data(), values.data(), int(keys.size()), err, sizeof(err));
  status = d->Prepare(&f->ctx, d);
  if (status == kN2uqTfLiteOk) status = f->replaced_status;
  n2uq_delegate_delete(d);
  return status;
}

enum Mutation { kNone, kShortWeights, kLongWeights, kBadRank, kBadType, kBadIndex, kTruncatedOptions, kShortBias,
                kBadActBits, kBadDataBytes, kConstantOutput, kFailedResize, kAliasedOutput, kNumMutations };

// One conv run via the op-resolver registration; returns the status and the error text.
// delegate_path: through the delegate (with its `path` and `isa` options when not null)
// rather than the op-resolver registration.
static int RunConv(Mutation m, std::string* error, bool delegate_path, const char* kernel_path = nullptr,
                   const char* isa = nullptr) {
  FakeInterpreter f;
  Init(&f);
  const int words = 1;
  int in = AddTensor(&f, m == kBadType ? kN2uqTfLiteFloat32 : kN2uqTfLiteInt64,
                     m == kBadRank ? std::vector<int>{1, 6, 6, 2 * words} : std::vector<int>{1, 6, 6,
                                                                                               m == kBadActBits ? 3 : 2,
                                                                                               words},
                     "packed");
  int w = AddTensor(&f, kN2uqTfLiteUInt8, {m == kShortWeights ? 33 : m == kLongWeights ? 35 : 34}, "weights");
  int mult = AddTensor(&f, kN2uqTfLiteFloat32, {3}, "multiplier");
  int bias = AddTensor(&f, kN2uqTfLiteFloat32, {m == kShortBias ? 2 : 3}, "bias");
  const std::vector<int> out_shape = m == kFailedResize ? std::vector<int>{1, 2, 3} : std::vector<int>{1, 6, 6, 3};
  int out = AddTensor(&f, kN2uqTfLiteFloat32, out_shape, "out");
  Finalize(&f);
  if (m == kConstantOutput) f.tensors[out].allocation_type = kN2uqTfLiteMmapRo;
  f.fail_resize = m == kFailedResize;
  if (m == kAliasedOutput) out = mult;
  if (m == kBadDataBytes) f.tensors[in].bytes -= 8;  // shape says more than the buffer holds
  for (size_t i = 0; i < f.storage[w].size(); ++i) f.storage[w][i] = uint8_t(i * 37 + 11);
  for (int i = 0; i < 3; ++i) reinterpret_cast<float*>(f.storage[mult].data())[i] = 0.5f;
  if (!f.storage[in].empty()) memset(f.storage[in].data(), 0x5A, f.storage[in].size());
  std::vector<uint8_t> options = Hex(kConvOptions);
  if (m == kTruncatedOptions) options.resize(options.size() / 2);
  std::vector<int> ins = {in, w, mult, m == kBadIndex ? 99 : bias};
  const int status = RunNode(&f, "N2UQConv2D", options, ins, {out}, delegate_path,
                             {{"num_threads", "2"}, {"path", kernel_path ? kernel_path : "auto"},
                              {"isa", isa ? isa : "auto"}});
  *error = f.last_error;
  Release(&f);
  return status;
}

enum FusedMutation { kFusedNone, kShortResidual, kResidualBytes, kShortSlopes, kShortThresholds, kPackedAsFloat,
                     kFloatAliasedToResidual, kOutputsAliased, kConstantCodes, kStepsWithoutInputs, kNoQuantizer,
                     kNumFusedMutations };

// One N2UQConv2DFused run (kFusedOptions) through the op-resolver registration or the delegate; returns the
// status and the error text. A valid run also checks what it wrote: the packed codes' unused bits are 0 and
// the float output was written.
static int RunFused(FusedMutation m, std::string* error, bool delegate_path, const char* kernel_path = "auto") {
  FakeInterpreter f;
  Init(&f);
  int in = AddTensor(&f, kN2uqTfLiteInt64, {1, 6, 6, 2, 1}, "packed");
  int w = AddTensor(&f, kN2uqTfLiteUInt8, {34}, "weights");
  int mult = AddTensor(&f, kN2uqTfLiteFloat32, {3}, "multiplier");
  int bias = AddTensor(&f, kN2uqTfLiteFloat32, {3}, "bias");
  int slopes = AddTensor(&f, kN2uqTfLiteFloat32, {m == kShortSlopes ? 2 : 3}, "slopes");
  int residual = AddTensor(&f, kN2uqTfLiteFloat32, {1, 6, m == kShortResidual ? 5 : 6, 3}, "residual");
  int thresholds = AddTensor(&f, kN2uqTfLiteFloat32, {m == kShortThresholds ? 2 : 3}, "thresholds");
  int out_float = AddTensor(&f, kN2uqTfLiteFloat32, {1, 6, 6, 3}, "float");
  int out_codes = AddTensor(&f, m == kPackedAsFloat ? kN2uqTfLiteFloat32 : kN2uqTfLiteInt64, {1, 6, 6, 2, 1}, "codes");
  Finalize(&f);
  if (m == kResidualBytes) f.tensors[residual].bytes -= 4;
  if (m == kConstantCodes) f.tensors[out_codes].allocation_type = kN2uqTfLiteMmapRo;
  for (size_t i = 0; i < f.storage[w].size(); ++i) f.storage[w][i] = uint8_t(i * 37 + 11);
  memset(f.storage[in].data(), 0x5A, f.storage[in].size());
  for (int i = 0; i < 3; ++i) {
    reinterpret_cast<float*>(f.storage[mult].data())[i] = 0.25f;
    reinterpret_cast<float*>(f.storage[bias].data())[i] = 0.5f - float(i);
  }
  for (size_t i = 0; i < f.storage[slopes].size() / 4; ++i) reinterpret_cast<float*>(f.storage[slopes].data())[i] = 0.1f;
  for (size_t i = 0; i < f.storage[residual].size() / 4; ++i)
    reinterpret_cast<float*>(f.storage[residual].data())[i] = float(int(i % 7) - 3) * 0.5f;
  const float t[3] = {-0.5f, 0.25f, 1.0f};
  memcpy(f.storage[thresholds].data(), t, f.storage[thresholds].size() < sizeof(t) ? f.storage[thresholds].size()
                                                                                   : sizeof(t));
  std::vector<uint8_t> options = Hex(kFusedOptions);
  std::vector<int> ins = {in, w, mult, bias, slopes, residual, thresholds};
  std::vector<int> outs = {m == kFloatAliasedToResidual ? residual : out_float, m == kOutputsAliased ? out_float
                                                                                                     : out_codes};
  if (m == kStepsWithoutInputs) ins.erase(ins.begin() + 4);  // the stage's PReLU has no slopes
  if (m == kNoQuantizer) outs.pop_back();                      // no codes output for the quantizer
  const int status = RunNode(&f, "N2UQConv2DFused", options, ins, outs, delegate_path,
                             {{"num_threads", "2"}, {"path", kernel_path}});
  if (status == kN2uqTfLiteOk) {
    const uint64_t* codes = reinterpret_cast<const uint64_t*>(f.storage[out_codes].data());
    for (size_t i = 0; i < f.storage[out_codes].size() / 8; ++i)
      CHECK((codes[i] >> 3) == 0, "packed word %zu has bits above channel 3: %llx", i, (unsigned long long)codes[i]);
    const float* y = reinterpret_cast<const float*>(f.storage[out_float].data());
    bool written = true;
    for (size_t i = 0; i < f.storage[out_float].size() / 4; ++i) written = written && y[i] == y[i] && y[i] > -100.0f;
    CHECK(written, "the float output was not written");
  }
  *error = f.last_error;
  Release(&f);
  return status;
}

static void TestFusedKernels() {
  static const char* const expected[kNumFusedMutations] = {
      "", "step 1 residual has shape [1, 6, 5, 3] but the layer's output has [1, 6, 6, 3]", "bytes but its shape",
      "step 0 values has shape [2] but needs 3 elements", "thresholds has shape [2] but needs 3 elements",
      "must be int64", "is also input 5 of the op", "is also output 1 of the op", "is a constant tensor",
      "expects 7 inputs and 2 outputs, got 6 and 2", "expects 7 inputs and 2 outputs, got 7 and 1"};
  static const char* const kPaths[] = {"auto", "bitserial", "dot", "lut", "amx"};
  for (int path = 0; path < 2; ++path) {
    for (int m = 0; m < kNumFusedMutations; ++m) {
      std::string error;
      const int status = RunFused(FusedMutation(m), &error, path == 1);
      if (m == kFusedNone) {
        CHECK(status == kN2uqTfLiteOk, "valid fused conv failed (path %d): %s", path, error.c_str());
      } else {
        CHECK(status != kN2uqTfLiteOk, "fused mutation %d accepted (path %d)", m, path);
        CHECK(error.find(expected[m]) != std::string::npos && error.find("N2UQConv2DFused") != std::string::npos,
              "fused mutation %d (path %d): unexpected message '%s'", m, path, error.c_str());
      }
    }
  }
  const int isa = n2uq_resolve_isa(N2UQ_ISA_AUTO, nullptr, 0);
  for (int path = N2UQ_PATH_BITSERIAL; path < N2UQ_NUM_PATHS; ++path) {
    if (isa < 0 || !n2uq_path_supported(isa, path)) continue;  // every path the delegate's default ISA runs
    std::string error;
    CHECK(RunFused(kFusedNone, &error, true, kPaths[path]) == kN2uqTfLiteOk, "valid fused conv failed (path %s): %s",
          kPaths[path], error.c_str());
  }
}

// The op-resolver registration of `name` (for MutableOpResolver::AddCustom) has every callback the
// interpreter calls and the op's name.
static bool Registered(const char* name) {
  const N2uqTfLiteRegistration* reg = n2uq_tflite_registration(name);
  return reg != nullptr && reg->init != nullptr && reg->free != nullptr && reg->prepare != nullptr &&
         reg->invoke != nullptr && reg->custom_name != nullptr && strcmp(reg->custom_name, name) == 0;
}

static void TestRegistrations() {
  const int count = n2uq_tflite_op_count();
  CHECK(count > 0 && n2uq_tflite_op_name(count) == nullptr && n2uq_tflite_op_name(-1) == nullptr, "op count %d",
        count);
  for (int i = 0; i < count; ++i) {
    const char* name = n2uq_tflite_op_name(i);
    CHECK(name != nullptr && Registered(name), "op %d (%s): registration missing or incomplete", i,
          name ? name : "no name");
  }
  CHECK(n2uq_tflite_registration("N2UQBogus") == nullptr, "registration of an unknown op");
}

enum PoolMutation { kPoolNone, kPoolShortThresholds, kPoolWrongChannels, kPoolShortSlopes, kPoolFilterTooLarge,
                    kPoolMissingOption, kPoolIntInput, kPoolFloatAliasedToInput, kPoolNoThresholdsInput,
                    kNumPoolMutations };

// The pool's float output and packed codes, computed here: max over each window of the zero-padded
// input, then the PReLU (y >= 0 ? y : y * slope) and the count of thresholds below y * beta1
// (beta1 = 1), bit b of the code in plane b.
static void PoolReference(const std::vector<float>& x, int h, int w, const float* slopes, const float* t,
                          std::vector<float>* pooled, std::vector<uint64_t>* packed) {
  const int c = 5, fh = 3, fw = 3, stride = 2, pad_top = 1, pad_left = 1;
  const int oh = (h + 2 - fh) / stride + 1, ow = (w + 1 - fw) / stride + 1;
  pooled->assign(size_t(oh) * ow * c, 0.0f);
  packed->assign(size_t(oh) * ow * 2, 0);
  for (int oy = 0; oy < oh; ++oy)
    for (int ox = 0; ox < ow; ++ox)
      for (int ch = 0; ch < c; ++ch) {
        float m = -1e30f;
        for (int fy = 0; fy < fh; ++fy)
          for (int fx = 0; fx < fw; ++fx) {
            const int y = oy * stride + fy - pad_top, xx = ox * stride + fx - pad_left;
            const float v = y < 0 || y >= h || xx < 0 || xx >= w ? 0.0f : x[(size_t(y) * w + xx) * c + ch];
            if (v > m) m = v;
          }
        const size_t p = size_t(oy) * ow + ox;
        (*pooled)[p * c + ch] = m;
        const float y = m >= 0.0f ? m : m * slopes[ch];
        const unsigned code = unsigned(y > t[0]) + unsigned(y > t[1]) + unsigned(y > t[2]);
        for (int b = 0; b < 2; ++b) (*packed)[p * 2 + b] |= uint64_t((code >> b) & 1u) << ch;
      }
}

// One N2UQMaxPool2DFused run (kPoolOptions) on a 5x6 input through the op-resolver registration or
// the delegate; returns the status and the error text. A valid run is checked against PoolReference
// bit for bit (the float output and the packed codes).
static int RunPool(PoolMutation m, std::string* error, bool delegate_path) {
  FakeInterpreter f;
  Init(&f);
  const int h = m == kPoolFilterTooLarge ? 1 : 5, w = m == kPoolFilterTooLarge ? 1 : 6;
  const int oh = (h + 2 - 3) / 2 + 1, ow = (w + 1 - 3) / 2 + 1;
  int in = AddTensor(&f, m == kPoolIntInput ? kN2uqTfLiteInt32 : kN2uqTfLiteFloat32,
                     {1, h, w, m == kPoolWrongChannels ? 6 : 5}, "x");
  int slopes = AddTensor(&f, kN2uqTfLiteFloat32, {m == kPoolShortSlopes ? 4 : 5}, "slopes");
  int thresholds = AddTensor(&f, kN2uqTfLiteFloat32, {m == kPoolShortThresholds ? 2 : 3}, "thresholds");
  int out_float = AddTensor(&f, kN2uqTfLiteFloat32, {1, oh, ow, 5}, "pooled");
  int out_codes = AddTensor(&f, kN2uqTfLiteInt64, {1, oh, ow, 2, 1}, "codes");
  Finalize(&f);
  // Channel 0 all negative (windows inside the input give a negative max: the PReLU's slope acts,
  // windows reaching the padding give 0), the others mixed.
  std::vector<float> x(f.storage[in].size() / 4);
  for (size_t i = 0; i < x.size(); ++i)
    x[i] = i % 5 == 0 ? -0.5f - 0.25f * float(i % 3) : float(int((i * 37 + 11) % 17) - 8) * 0.25f;
  memcpy(f.storage[in].data(), x.data(), f.storage[in].size());
  const float slope_values[5] = {0.5f, 2.0f, 0.25f, 1.5f, 0.75f};
  memcpy(f.storage[slopes].data(), slope_values, f.storage[slopes].size());
  const float t[3] = {-0.5f, 0.25f, 1.0f};
  memcpy(f.storage[thresholds].data(), t, f.storage[thresholds].size());
  memset(f.storage[out_float].data(), 0xAB, f.storage[out_float].size());  // so unwritten outputs show
  memset(f.storage[out_codes].data(), 0xAB, f.storage[out_codes].size());
  std::vector<uint8_t> options = Hex(m == kPoolMissingOption ? kPoolOptionsNoFilterWidth : kPoolOptions);
  std::vector<int> ins = {in, slopes, thresholds};
  std::vector<int> outs = {m == kPoolFloatAliasedToInput ? in : out_float, out_codes};
  if (m == kPoolNoThresholdsInput) ins.pop_back();
  // (the registration's completeness is checked by TestPoolKernels before any resolver run)
  const int status = RunNode(&f, "N2UQMaxPool2DFused", options, ins, outs, delegate_path, {{"num_threads", "2"}});
  if (status == kN2uqTfLiteOk && m == kPoolNone) {
    std::vector<float> pooled;
    std::vector<uint64_t> packed;
    PoolReference(x, h, w, slope_values, t, &pooled, &packed);
    CHECK(f.storage[out_float].size() == pooled.size() * 4 &&
              memcmp(f.storage[out_float].data(), pooled.data(), pooled.size() * 4) == 0,
          "pool float output differs from the reference (path %d)", int(delegate_path));
    CHECK(f.storage[out_codes].size() == packed.size() * 8 &&
              memcmp(f.storage[out_codes].data(), packed.data(), packed.size() * 8) == 0,
          "pool packed codes differ from the reference (path %d)", int(delegate_path));
  }
  *error = f.last_error;
  Release(&f);
  return status;
}

static void TestPoolKernels() {
  static const char* const expected[kNumPoolMutations] = {
      "", "thresholds has shape [2] but needs 3 elements", "input shape [1, 5, 6, 6] must be [N, H, W, channels=5]",
      "step 0 values has shape [4] but needs 5 elements", "the padded input (3 x 2) is smaller than the filter (3 x 3)",
      "missing option 'filter_width'", "must be float32", "output tensor 0 'x' is also input 0 of the op",
      "expects 3 inputs and 2 outputs, got 2 and 2"};
  // Without a complete registration (TestRegistrations reports it) the resolver run would call NULL.
  const bool registered = Registered("N2UQMaxPool2DFused");
  for (int path = registered ? 0 : 1; path < 2; ++path) {
    for (int m = 0; m < kNumPoolMutations; ++m) {
      std::string error;
      const int status = RunPool(PoolMutation(m), &error, path == 1);
      if (m == kPoolNone) {
        CHECK(status == kN2uqTfLiteOk, "valid pool failed (path %d): %s", path, error.c_str());
      } else {
        CHECK(status != kN2uqTfLiteOk, "pool mutation %d accepted (path %d)", m, path);
        CHECK(error.find(expected[m]) != std::string::npos && error.find("N2UQMaxPool2DFused") != std::string::npos,
              "pool mutation %d (path %d): unexpected message '%s'", m, path, error.c_str());
      }
    }
  }
}

static void TestKernels() {
  static const char* const expected[kNumMutations] = {
      "", "weight bitstream", "weight bitstream", "input shape", "must be int64", "out of range",
      "malformed custom options", "bias", "input shape", "bytes but its shape", "is a constant tensor",
      "resizing the output 'out' to [1, 6, 6, 3] failed", "is also input 2 of the op"};
  for (int path = 0; path < 2; ++path) {
    for (int m = 0; m < kNumMutations; ++m) {
      std::string error;
      const int status = RunConv(Mutation(m), &error, path == 1);
      if (m == kNone) {
        CHECK(status == kN2uqTfLiteOk, "valid conv failed (path %d): %s", path, error.c_str());
      } else {
        CHECK(status != kN2uqTfLiteOk, "mutation %d accepted (path %d)", m, path);
        CHECK(error.find(expected[m]) != std::string::npos && error.find("N2UQConv2D") != std::string::npos,
              "mutation %d (path %d): unexpected message '%s'", m, path, error.c_str());
      }
    }
  }
  // Every kernel path the CPU runs, through the delegate's `path` option, valid and mutated.
  static const char* const kPaths[] = {"auto", "bitserial", "dot", "lut", "amx"};
  for (int isa = N2UQ_ISA_PORTABLE; isa <= N2UQ_ISA_NEON; ++isa) {
    if (!n2uq_isa_supported(isa)) continue;
    for (int path = N2UQ_PATH_BITSERIAL; path < N2UQ_NUM_PATHS; ++path) {
      std::string error;
      const int status = RunConv(kNone, &error, true, kPaths[path], n2uq_isa_name(isa));
      if (n2uq_path_supported(isa, path)) {
        CHECK(status == kN2uqTfLiteOk, "valid conv failed (isa %s, path %s): %s", n2uq_isa_name(isa), kPaths[path],
              error.c_str());
        for (int m = 1; m < kNumMutations; ++m) {
          CHECK(RunConv(Mutation(m), &error, true, kPaths[path], n2uq_isa_name(isa)) != kN2uqTfLiteOk &&
                    error.find(expected[m]) != std::string::npos,
                "mutation %d (isa %s, path %s): '%s'", m, n2uq_isa_name(isa), kPaths[path], error.c_str());
        }
      } else {  // a path this CPU cannot run is refused at Prepare, never run
        CHECK(status != kN2uqTfLiteOk && error.find("not supported") != std::string::npos,
              "unsupported path accepted (isa %s, path %s): '%s'", n2uq_isa_name(isa), kPaths[path], error.c_str());
      }
    }
  }
  char err[256];
  const char* keys[] = {"isa", "bogus", "path"};
  const char* values[] = {"sse9", "1", "gemm"};
  CHECK(n2uq_delegate_create(keys, values, 1, err, sizeof(err)) == nullptr && strstr(err, "isa"), "bad isa");
  CHECK(n2uq_delegate_create(keys + 1, values + 1, 1, err, sizeof(err)) == nullptr && strstr(err, "unknown option"),
        "unknown option");
  CHECK(n2uq_delegate_create(keys + 2, values + 2, 1, err, sizeof(err)) == nullptr && strstr(err, "path must be"),
        "bad path");
}

// ------------------------------------------------------------------ builtin CONV_2D claims

// A builtin CONV_2D node (int8 or float32) the delegate may claim: input [N, H, W, IC], constant
// filter [OC, KH, KW, IC], constant bias [OC] (int32 / float32), TfLiteConvParams as builtin_data;
// int8 tensors with affine quantization (per-channel filter scales, zero points 0).
struct ConvSpec {
  int batch = 2, height = 9, width = 11, in_channels = 3, out_channels = 33, kernel_h = 3, kernel_w = 3;
  int padding = kN2uqTfLitePaddingSame, stride_h = 2, stride_w = 1, dilation_h = 1, dilation_w = 1;
  int activation = kN2uqTfLiteActRelu;
  bool bias = true, per_channel = true;
  float output_scale = 0.8f;  // int8
};

static const float kConvInputScale = 0.05f;
static const int kConvInputZeroPoint = -3, kConvOutputZeroPoint = 5;
static float ConvFilterScale(int oc) { return 0.01f + 0.00025f * float(oc % 7); }

// TFLite's output size of one spatial dim (0 when a 'valid' conv does not fit).
static int ConvOutputSize(int size, int kernel, int stride, int dilation, int padding) {
  const int extent = (kernel - 1) * dilation + 1;
  if (padding == kN2uqTfLitePaddingSame) return (size + stride - 1) / stride;
  return size < extent ? 0 : (size - extent) / stride + 1;
}

struct BuiltinConv {
  FakeInterpreter f;  // first: the context's callbacks cast back to it
  bool int8 = true;
  ConvSpec spec;
  int x = -1, w = -1, b = -1, y = -1;
  N2uqTfLiteConvParams params = {};
  bool builtin_data = true;
  N2uqTfLiteAffineQuantization quant[3] = {};  // of x, w, y
  std::vector<void*> arrays;                   // quantization arrays and replaced buffers, freed at the end
  std::vector<int> inputs, outputs;            // the node's tensors
  std::vector<int> pad_inputs, pad_outputs;    // a PAD node's (AddPad), else empty
  int pad_input = -1, paddings = -1;           // its input and paddings tensors
  BuiltinConv() = default;
  BuiltinConv(const BuiltinConv&) = delete;
  BuiltinConv& operator=(const BuiltinConv&) = delete;
  ~BuiltinConv() {
    for (void* a : arrays) free(a);
    Release(&f);
  }
};

static N2uqTfLiteFloatArray* NewFloats(BuiltinConv* c, const std::vector<float>& values) {
  auto* a = static_cast<N2uqTfLiteFloatArray*>(malloc(sizeof(int) + sizeof(float) * values.size()));
  a->size = int(values.size());
  for (size_t i = 0; i < values.size(); ++i) a->data[i] = values[i];
  c->arrays.push_back(a);
  return a;
}

static N2uqTfLiteIntArray* NewInts(BuiltinConv* c, const std::vector<int>& values) {
  N2uqTfLiteIntArray* a = NewArray(values);
  c->arrays.push_back(a);
  return a;
}

// Affine quantization `slot` (0 x, 1 w, 2 y) of tensor `index`.
static void SetAffine(BuiltinConv* c, int slot, int index, const std::vector<float>& scales,
                      const std::vector<int>& zero_points) {
  N2uqTfLiteAffineQuantization& q = c->quant[slot];
  q.scale = NewFloats(c, scales);
  q.zero_point = NewInts(c, zero_points);
  q.quantized_dimension = 0;
  c->f.tensors[index].quantization.type = kN2uqTfLiteAffineQuantization;
  c->f.tensors[index].quantization.params = &q;
}

// Gives tensor `index` the shape `shape`; its bytes and data stay as they are.
static void SetDims(FakeInterpreter* f, int index, const std::vector<int>& shape) {
  free(f->dims[index]);
  f->dims[index] = NewArray(shape);
  f->tensors[index].dims = f->dims[index];
}

// Gives tensor `index` a fresh buffer of `bytes` (filled with `fill`).
static void SetBuffer(BuiltinConv* c, int index, size_t bytes, uint8_t fill) {
  void* data = malloc(bytes ? bytes : 1);
  memset(data, fill, bytes);
  c->arrays.push_back(data);
  c->f.tensors[index].data = data;
  c->f.tensors[index].bytes = bytes;
}

// Random values in tensor `index` (the conv's input, or the PAD's).
static void FillActivations(BuiltinConv* c, int index, uint32_t seed) {
  std::mt19937 rng(seed);
  N2uqTfLiteTensor& t = c->f.tensors[index];
  if (t.data == nullptr) return;
  if (c->int8) {
    for (size_t i = 0; i < t.bytes; ++i) static_cast<uint8_t*>(t.data)[i] = uint8_t(rng());
  } else {  // quarters in [-2, 2]: with halves for weights every sum is exact in float32, in any order
    for (size_t i = 0; i < t.bytes / 4; ++i) static_cast<float*>(t.data)[i] = float(int(rng() % 17) - 8) * 0.25f;
  }
}

static void FillConvInput(BuiltinConv* c, uint32_t seed) { FillActivations(c, c->x, seed); }

static void BuildConv(BuiltinConv* c, bool int8, const ConvSpec& s) {
  FakeInterpreter& f = c->f;
  Init(&f);
  c->int8 = int8;
  c->spec = s;
  const int type = int8 ? kN2uqTfLiteInt8 : kN2uqTfLiteFloat32;
  const int oh = ConvOutputSize(s.height, s.kernel_h, s.stride_h, s.dilation_h, s.padding);
  const int ow = ConvOutputSize(s.width, s.kernel_w, s.stride_w, s.dilation_w, s.padding);
  c->x = AddTensor(&f, type, {s.batch, s.height, s.width, s.in_channels}, "conv_input");
  c->w = AddTensor(&f, type, {s.out_channels, s.kernel_h, s.kernel_w, s.in_channels}, "conv_filter");
  c->b = AddTensor(&f, int8 ? kN2uqTfLiteInt32 : kN2uqTfLiteFloat32, {s.out_channels}, "conv_bias");
  c->y = AddTensor(&f, type, {s.batch, oh > 0 ? oh : 1, ow > 0 ? ow : 1, s.out_channels}, "conv_output");
  Finalize(&f);
  f.tensors[c->w].allocation_type = kN2uqTfLiteMmapRo;
  f.tensors[c->b].allocation_type = kN2uqTfLiteMmapRo;
  std::mt19937 rng(7);
  std::vector<uint8_t>& w = f.storage[c->w];
  std::vector<uint8_t>& b = f.storage[c->b];
  if (int8) {
    for (auto& v : w) v = uint8_t(int8_t(int(rng() % 255) - 127));
    for (size_t i = 0; i < b.size() / 4; ++i) reinterpret_cast<int32_t*>(b.data())[i] = int32_t(rng() % 4001) - 2000;
    std::vector<float> scales;
    for (int o = 0; o < (s.per_channel ? s.out_channels : 1); ++o) scales.push_back(ConvFilterScale(o));
    SetAffine(c, 0, c->x, {kConvInputScale}, {kConvInputZeroPoint});
    SetAffine(c, 1, c->w, scales, std::vector<int>(scales.size(), 0));
    SetAffine(c, 2, c->y, {s.output_scale}, {kConvOutputZeroPoint});
  } else {
    for (size_t i = 0; i < w.size() / 4; ++i) reinterpret_cast<float*>(w.data())[i] = float(int(rng() % 7) - 3) * 0.5f;
    for (size_t i = 0; i < b.size() / 4; ++i) reinterpret_cast<float*>(b.data())[i] = float(int(rng() % 9) - 4) * 0.25f;
  }
  c->params.padding = s.padding;
  c->params.stride_width = s.stride_w;
  c->params.stride_height = s.stride_h;
  c->params.activation = s.activation;
  c->params.dilation_width_factor = s.dilation_w;
  c->params.dilation_height_factor = s.dilation_h;
  c->inputs = s.bias ? std::vector<int>{c->x, c->w, c->b} : std::vector<int>{c->x, c->w};
  c->outputs = {c->y};
  FillConvInput(c, 1);
}

// The conv of the fixture's current input computed here (TFLite's CONV_2D; int8 with XNNPACK's
// requantization: s = input_scale * filter_scale / output_scale in float32, the float(acc) * s
// clamped to the activation's quantized range, rounded to nearest even), as output bytes.
static std::vector<uint8_t> ConvReference(const BuiltinConv& c, std::vector<int>* out_dims) {
  const ConvSpec& s = c.spec;
  const N2uqTfLiteTensor& xt = c.f.tensors[c.x];
  const int n = xt.dims->data[0], h = xt.dims->data[1], wd = xt.dims->data[2], ic = xt.dims->data[3];
  const int oc = s.out_channels, kh = s.kernel_h, kw = s.kernel_w;
  const int oh = ConvOutputSize(h, kh, s.stride_h, s.dilation_h, s.padding);
  const int ow = ConvOutputSize(wd, kw, s.stride_w, s.dilation_w, s.padding);
  int pad_top = 0, pad_left = 0;
  if (s.padding == kN2uqTfLitePaddingSame) {
    pad_top = std::max((oh - 1) * s.stride_h + (kh - 1) * s.dilation_h + 1 - h, 0) / 2;
    pad_left = std::max((ow - 1) * s.stride_w + (kw - 1) * s.dilation_w + 1 - wd, 0) / 2;
  }
  *out_dims = {n, oh, ow, oc};
  float lo = -INFINITY, hi = INFINITY;
  if (s.activation == kN2uqTfLiteActRelu) lo = 0.0f;
  if (s.activation == kN2uqTfLiteActReluN1To1) lo = -1.0f, hi = 1.0f;
  if (s.activation == kN2uqTfLiteActRelu6) lo = 0.0f, hi = 6.0f;
  const bool has_bias = c.inputs.size() == 3 && c.inputs[2] >= 0;
  const size_t item = c.int8 ? 1 : 4;
  std::vector<uint8_t> out(size_t(n) * oh * ow * oc * item);
  const void* xv = xt.data;
  const void* wv = c.f.tensors[c.w].data;
  const void* bv = c.f.tensors[c.b].data;
  for (int b = 0; b < n; ++b)
    for (int y = 0; y < oh; ++y)
      for (int x = 0; x < ow; ++x)
        for (int o = 0; o < oc; ++o) {
          int32_t acc = 0;
          double sum = 0.0;
          if (has_bias) {
            if (c.int8) acc = static_cast<const int32_t*>(bv)[o];
            else sum = static_cast<const float*>(bv)[o];
          }
          for (int ky = 0; ky < kh; ++ky)
            for (int kx = 0; kx < kw; ++kx) {
              const int iy = y * s.stride_h - pad_top + ky * s.dilation_h;
              const int ix = x * s.stride_w - pad_left + kx * s.dilation_w;
              if (iy < 0 || iy >= h || ix < 0 || ix >= wd) continue;  // padding: x = zero point
              for (int i = 0; i < ic; ++i) {
                const size_t xi = ((size_t(b) * h + iy) * wd + ix) * ic + i, wi = ((size_t(o) * kh + ky) * kw + kx) * ic + i;
                if (c.int8)
                  acc += (int32_t(static_cast<const int8_t*>(xv)[xi]) - kConvInputZeroPoint) *
                         int32_t(static_cast<const int8_t*>(wv)[wi]);
                else
                  sum += double(static_cast<const float*>(xv)[xi]) * double(static_cast<const float*>(wv)[wi]);
              }
            }
          const size_t at = ((size_t(b) * oh + y) * ow + x) * oc + o;
          if (c.int8) {
            const float scale = kConvInputScale * ConvFilterScale(s.per_channel ? o : 0) / s.output_scale;
            const float zp = float(kConvOutputZeroPoint);
            const float qlo = float(lrintf(fminf(fmaxf(lo / s.output_scale + zp, -128.0f), 127.0f))) - zp;
            const float qhi = float(lrintf(fminf(fmaxf(hi / s.output_scale + zp, -128.0f), 127.0f))) - zp;
            const float v = fminf(fmaxf(float(acc) * scale, qlo), qhi);
            out[at] = uint8_t(int8_t(lrintf(v) + kConvOutputZeroPoint));
          } else {
            const float v = fminf(fmaxf(float(sum), lo), hi);
            memcpy(out.data() + at * 4, &v, 4);
          }
        }
  return out;
}

// The output tensor holds ConvReference's shape and values (floats compared as values).
static bool ConvOutputMatches(const BuiltinConv& c, std::string* why) {
  std::vector<int> dims;
  const std::vector<uint8_t> expected = ConvReference(c, &dims);
  const N2uqTfLiteTensor& y = c.f.tensors[c.y];
  if (y.dims == nullptr || y.dims->size != 4 || std::vector<int>(y.dims->data, y.dims->data + 4) != dims) {
    *why = "output shape " + std::to_string(y.dims ? y.dims->size : -1) + "-D differs from the reference's";
    return false;
  }
  if (y.bytes != expected.size() || y.data == nullptr) {
    *why = "output holds " + std::to_string(y.bytes) + " bytes, the reference " + std::to_string(expected.size());
    return false;
  }
  const size_t item = c.int8 ? 1 : 4;
  for (size_t i = 0; i < expected.size() / item; ++i) {
    bool same;
    if (c.int8) {
      same = static_cast<const uint8_t*>(y.data)[i] == expected[i];
    } else {
      float got, want;
      memcpy(&got, static_cast<const uint8_t*>(y.data) + i * 4, 4);
      memcpy(&want, expected.data() + i * 4, 4);
      same = got == want;
    }
    if (!same) {
      char buf[160];
      if (c.int8)
        snprintf(buf, sizeof(buf), "output %zu is %d, the reference %d", i, int(static_cast<const int8_t*>(y.data)[i]),
                 int(int8_t(expected[i])));
      else
        snprintf(buf, sizeof(buf), "output %zu is %g, the reference %g", i,
                 double(static_cast<const float*>(y.data)[i]), double(reinterpret_cast<const float*>(expected.data())[i]));
      *why = buf;
      return false;
    }
  }
  return true;
}

typedef std::vector<std::pair<const char*, const char*>> DelegateOptions;

static std::string OptionsString(const DelegateOptions& options) {
  std::string s = "{";
  for (const auto& kv : options) s += std::string(s.size() > 1 ? ", " : "") + kv.first + "=" + kv.second;
  return s + "}";
}

// The delegate's Prepare over the fixture's graph: node 0 the conv (its tensors, builtin_data, builtin
// code CONV_2D) and, when the fixture has a PAD (pad_inputs), node 1 the PAD. Returns how many nodes it
// claimed; each claimed node's kernel is initialised and waits in f.kept for the caller to prepare
// and invoke it (PrepareKernel, InvokeKernel), then ReleaseConv frees them.
static int ClaimNodes(BuiltinConv* c, const DelegateOptions& options, N2uqTfLiteDelegate** delegate) {
  FakeInterpreter& f = c->f;
  free(f.plan);
  free(f.inputs);
  free(f.outputs);
  const bool pad = !c->pad_inputs.empty();
  f.plan = pad ? NewArray({1, 0}) : NewArray({0});
  f.inputs = NewArray(c->inputs);
  f.outputs = NewArray(c->outputs);
  memset(&f.node, 0, sizeof(f.node));
  f.node.inputs = f.inputs;
  f.node.outputs = f.outputs;
  f.node.builtin_data = c->builtin_data ? &c->params : nullptr;
  memset(&f.node_reg, 0, sizeof(f.node_reg));
  f.node_reg.builtin_code = kN2uqTfLiteBuiltinConv2d;
  f.node_reg.version = 1;
  f.more_nodes.assign(pad ? 1 : 0, N2uqTfLiteNode{});
  f.more_regs.assign(pad ? 1 : 0, N2uqTfLiteRegistration{});
  if (pad) {
    f.more_nodes[0].inputs = NewInts(c, c->pad_inputs);
    f.more_nodes[0].outputs = NewInts(c, c->pad_outputs);
    f.more_regs[0].builtin_code = kN2uqTfLiteBuiltinPad;
    f.more_regs[0].version = 1;
  }
  f.keep_kernel = true;
  f.replace_calls = 0;
  f.kept.clear();
  f.last_error.clear();
  std::vector<const char*> keys, values;
  for (const auto& kv : options) {
    keys.push_back(kv.first);
    values.push_back(kv.second);
  }
  char err[256] = {0};
  *delegate = n2uq_delegate_create(keys.data(), values.data(), keys.size(), err, sizeof(err));
  CHECK(*delegate != nullptr, "delegate options %s refused: %s", OptionsString(options).c_str(), err);
  if (*delegate == nullptr) return 0;
  const int status = (*delegate)->Prepare(&f.ctx, *delegate);
  CHECK(status == kN2uqTfLiteOk, "the delegate's Prepare failed: %s", f.last_error.c_str());
  CHECK(f.replace_calls == int(f.kept.size()), "%d replacements, %zu kernels", f.replace_calls, f.kept.size());
  return f.replace_calls;
}

// Whether the delegate claimed the fixture's one conv node (its kernel then waits as node 0's).
static bool ClaimConv(BuiltinConv* c, const DelegateOptions& options, N2uqTfLiteDelegate** delegate) {
  const int claimed = ClaimNodes(c, options, delegate);
  CHECK(claimed <= 1 && (claimed == 0 || c->f.kept[0].node_index == 0), "one CONV_2D node: %d claims", claimed);
  return claimed == 1;
}

static FakeInterpreter::Kept* KeptKernel(BuiltinConv* c, int node_index) {
  for (auto& k : c->f.kept)
    if (k.node_index == node_index) return &k;
  return nullptr;
}

// The kept kernel of node `node_index`: prepare / invoke, as the interpreter calls them; the status,
// the error text in f.last_error.
static int PrepareKernel(BuiltinConv* c, int node_index) {
  FakeInterpreter::Kept* k = KeptKernel(c, node_index);
  return k ? k->reg.prepare(&c->f.ctx, &k->node) : kN2uqTfLiteError;
}

static int InvokeKernel(BuiltinConv* c, int node_index) {
  FakeInterpreter::Kept* k = KeptKernel(c, node_index);
  return k ? k->reg.invoke(&c->f.ctx, &k->node) : kN2uqTfLiteError;
}

// The conv kernel's prepare, then (when it succeeded) invoke.
static int PrepareAndInvoke(BuiltinConv* c) {
  c->f.last_error.clear();
  int status = PrepareKernel(c, 0);
  if (status == kN2uqTfLiteOk) status = InvokeKernel(c, 0);
  return status;
}

static void ReleaseConv(BuiltinConv* c, N2uqTfLiteDelegate* delegate) {
  for (auto& k : c->f.kept) k.reg.free(&c->f.ctx, k.node.user_data);
  c->f.kept.clear();
  n2uq_delegate_delete(delegate);
}

// The ISA of a plan the core makes for a 1x1 filter with the delegate's default isa (auto) and kernel
// `path` (int8), or -1 when it makes none.
static int ProbePlanIsa(bool int8, int path) {
  N2uqConvShape s = {};
  s.batch = s.in_height = s.in_width = s.in_channels = s.out_channels = s.kernel_height = s.kernel_width = 1;
  s.stride_height = s.stride_width = s.dilation_height = s.dilation_width = 1;
  char msg[256] = {0};
  int isa = N2UQ_ISA_PORTABLE;
  if (int8) {
    const int8_t w = 1;
    const float scale = 1.0f;
    const N2uqInt8ConvParams q = {1.0f, 0, 1.0f, 0, -128, 127};
    N2uqInt8ConvPlan* plan = nullptr;
    if (n2uq_int8_conv_plan_create(&s, &w, 1, nullptr, 0, &scale, 1, &q, N2UQ_ISA_AUTO, path, &plan, msg,
                                   sizeof(msg)) != N2UQ_OK)
      return -1;
    n2uq_int8_conv_plan_info(plan, &isa, nullptr);
    n2uq_int8_conv_plan_destroy(plan);
  } else {
    const float w = 1.0f;
    N2uqFloatConvPlan* plan = nullptr;
    if (n2uq_float_conv_plan_create(&s, &w, 1, nullptr, 0, -INFINITY, INFINITY, N2UQ_ISA_AUTO, &plan, msg,
                                    sizeof(msg)) != N2UQ_OK)
      return -1;
    n2uq_float_conv_plan_info(plan, &isa);
    n2uq_float_conv_plan_destroy(plan);
  }
  return isa;
}

// Whether the delegate's default int8_conv / float_conv = auto claims a node over few channels
// here: when the plan for its filter gets an AVX-512 kernel (the delegate's own criterion).
static bool ClaimsByDefault(bool int8) {
  const int isa = ProbePlanIsa(int8, N2UQ_PATH_AUTO);
  return isa >= 0 && isa != N2UQ_ISA_PORTABLE;
}

// The delegate settings a valid node is run with, and whether each claims it.
static std::vector<std::pair<DelegateOptions, bool>> ConvSettings(bool int8) {
  const char* key = int8 ? "int8_conv" : "float_conv";
  std::vector<std::pair<DelegateOptions, bool>> out = {
      {{{key, "all"}, {"isa", "portable"}}, true},
      {{{key, "all"}, {"num_threads", "1"}}, true},
      {{}, ClaimsByDefault(int8)},  // auto
      {{{key, "auto"}, {"isa", "portable"}}, false},  // TFLite's own kernels beat the portable ones
      {{{key, "off"}}, false},
      {{{int8 ? "float_conv" : "int8_conv", "all"}, {key, "off"}}, false}};
  if (int8) {
    out.push_back({{{key, "all"}, {"path", "dot"}}, true});
    if (ProbePlanIsa(true, N2UQ_PATH_AMX) >= 0)  // the amx path runs here
      out.push_back({{{key, "all"}, {"path", "amx"}, {"num_threads", "2"}}, true});
  }
  return out;
}

// Valid nodes: claimed where the settings say so, and the result equals the reference.
static void TestBuiltinConvValid() {
  std::vector<ConvSpec> specs(5);
  specs[1].padding = kN2uqTfLitePaddingValid;  // strided along W, dilated, relu6, no bias
  specs[1].stride_h = 1, specs[1].stride_w = 2, specs[1].dilation_w = 2, specs[1].activation = kN2uqTfLiteActRelu6;
  specs[1].bias = false, specs[1].output_scale = 0.05f;  // relu6: 120 levels
  specs[2].in_channels = 1, specs[2].out_channels = 5, specs[2].kernel_h = 2, specs[2].kernel_w = 3;  // per-tensor
  specs[2].stride_h = 1, specs[2].dilation_h = 2, specs[2].activation = kN2uqTfLiteActReluN1To1;
  specs[2].per_channel = false, specs[2].output_scale = 0.05f;
  specs[3].in_channels = 8, specs[3].out_channels = 64, specs[3].kernel_h = specs[3].kernel_w = 1;  // auto's limit
  specs[3].stride_w = 2, specs[3].activation = kN2uqTfLiteActNone;
  specs[4].batch = 1, specs[4].height = 20, specs[4].width = 23, specs[4].kernel_h = specs[4].kernel_w = 7;  // a stem
  specs[4].out_channels = 16, specs[4].stride_w = 2;
  for (int int8 = 1; int8 >= 0; --int8) {
    for (size_t si = 0; si <= specs.size(); ++si) {
      for (const auto& setting : ConvSettings(int8 != 0)) {
        BuiltinConv c;
        BuildConv(&c, int8 != 0, specs[si < specs.size() ? si : 0]);
        if (si == specs.size()) c.inputs[2] = -1;  // an omitted optional bias
        N2uqTfLiteDelegate* d = nullptr;
        const bool claimed = ClaimConv(&c, setting.first, &d);
        const std::string where = std::string(int8 ? "int8" : "float") + " conv " + std::to_string(si) + " " +
                                  OptionsString(setting.first);
        CHECK(claimed == setting.second, "%s: claimed %d, expected %d", where.c_str(), int(claimed),
              int(setting.second));
        if (claimed) {
          for (int run = 0; run < 2; ++run) {  // the kernel again on another input
            if (run) FillConvInput(&c, 99);
            const int status = PrepareAndInvoke(&c);
            std::string why;
            CHECK(status == kN2uqTfLiteOk, "%s: run %d failed: %s", where.c_str(), run, c.f.last_error.c_str());
            CHECK(status != kN2uqTfLiteOk || ConvOutputMatches(c, &why), "%s: run %d: %s", where.c_str(), run,
                  why.c_str());
          }
        }
        ReleaseConv(&c, d);
      }
    }
    // Over 8 input channels, auto leaves the node to TFLite; all takes it.
    for (const char* mode : {"auto", "all"}) {
      ConvSpec wide;
      wide.in_channels = 9;
      BuiltinConv c;
      BuildConv(&c, int8 != 0, wide);
      N2uqTfLiteDelegate* d = nullptr;
      const bool claimed = ClaimConv(&c, {{int8 ? "int8_conv" : "float_conv", mode}}, &d);
      CHECK(claimed == (strcmp(mode, "all") == 0), "%s conv over 9 channels, %s: claimed %d", int8 ? "int8" : "float", mode,
            int(claimed));
      std::string why;
      if (claimed)
        CHECK(PrepareAndInvoke(&c) == kN2uqTfLiteOk && ConvOutputMatches(c, &why), "9 channels: %s %s",
              c.f.last_error.c_str(), why.c_str());
      ReleaseConv(&c, d);
    }
  }
}

// Malformed nodes. Each is left to TFLite (U), or claimed and then refused by the kernel's prepare or
// invoke with an error (E); A: an empty filter zero-point list (TFLite's loader refuses a count that
// differs from the scales'; the filter's zero points are only required to be 0) may run, exactly.
enum ConvMutation {
  kCmInputQuantNull, kCmFilterQuantNull, kCmOutputQuantNull, kCmInputQuantNotAffine, kCmFilterQuantNotAffine,
  kCmOutputQuantNotAffine, kCmInputScalesEmpty, kCmFilterScalesEmpty, kCmOutputScalesEmpty, kCmInputZeroPointsEmpty,
  kCmOutputZeroPointsEmpty, kCmFilterZeroPointsEmpty, kCmFilterScalesShort, kCmFilterScalesLong, kCmInputScalesTwo,
  kCmFilterZeroPointNonZero, kCmQuantizedDimension3, kCmQuantizedDimensionNegative, kCmHugeScale, kCmOutputScaleZero,
  kCmOutputScaleNaN, kCmInputScaleNegative, kCmFilterScaleZero, kCmInputZeroPointOutOfRange,
  kCmOutputZeroPointOutOfRange, kCmFilterNotConstant, kCmFilterDataNull, kCmFilterBytesShort, kCmFilterBytesLong,
  kCmFilterRank3, kCmFilterDimZero, kCmFilterDimNegative, kCmFilterBytesWrap, kCmDilatedFilterPastInt32,
  kCmFilterNaN, kCmBiasWrongType, kCmBiasWrongSize, kCmBiasBytes, kCmBiasNotConstant, kCmBiasDataNull, kCmBiasRank2,
  kCmBiasIndexOutOfRange, kCmInputRank3, kCmInputRank5, kCmOutputRank3, kCmOutputRank5, kCmInputDimsNull,
  kCmFilterDimsNull, kCmChannelMismatch, kCmOutputChannelMismatch, kCmInputInt32, kCmFilterTypeMismatch,
  kCmOutputTypeMismatch, kCmBuiltinDataNull, kCmPadding0, kCmPadding3, kCmStrideWidth0, kCmStrideHeightNegative,
  kCmStride1025, kCmDilationWidth0, kCmDilationHeight0, kCmActivationTanh, kCmActivationSignBit,
  kCmActivationNegative, kCmOneInput, kCmFourInputs, kCmNoOutputs, kCmTwoOutputs, kCmInputIndexNegative,
  kCmInputIndexOutOfRange, kCmFilterIndexNegative, kCmFilterIndexOutOfRange, kCmOutputIndexNegative,
  kCmOutputIndexOutOfRange, kCmInputBytesShort, kCmInputDataNull, kCmOutputConstant, kCmOutputResizeFails,
  kCmInputTooSmall, kNumConvMutations
};

static const struct {
  const char* name;
  char expect;  // U, E or A
  bool int8_only, float_only;
} kConvMutations[kNumConvMutations] = {
    {"input quantization.params NULL", 'U', true, false},
    {"filter quantization.params NULL", 'U', true, false},
    {"output quantization.params NULL", 'U', true, false},
    {"input quantization not affine", 'U', true, false},
    {"filter quantization not affine", 'U', true, false},
    {"output quantization not affine", 'U', true, false},
    {"input scales empty", 'U', true, false},
    {"filter scales empty", 'U', true, false},
    {"output scales empty", 'U', true, false},
    {"input zero points empty", 'U', true, false},
    {"output zero points empty", 'U', true, false},
    {"filter zero points empty", 'A', true, false},
    {"filter scales OC - 1", 'U', true, false},
    {"filter scales OC + 1", 'U', true, false},
    {"input scales 2", 'U', true, false},
    {"filter zero point 1", 'U', true, false},
    {"quantized_dimension 3", 'U', true, false},
    {"quantized_dimension -1", 'U', true, false},
    {"requantization scale >= 256", 'U', true, false},
    {"output scale 0", 'U', true, false},
    {"output scale NaN", 'U', true, false},
    {"input scale negative", 'U', true, false},
    {"filter scale 0", 'U', true, false},
    {"input zero point 300", 'U', true, false},
    {"output zero point -200", 'U', true, false},
    {"filter not constant", 'U', false, false},
    {"filter data NULL", 'U', false, false},
    {"filter bytes short", 'U', false, false},
    {"filter bytes long", 'U', false, false},
    {"filter rank 3", 'U', false, false},
    {"filter dim 0", 'U', false, false},
    {"filter dim negative", 'U', false, false},
    {"filter dims whose byte count wraps", 'U', false, false},
    {"dilated filter past int32", 'U', false, false},
    {"filter NaN", 'U', false, true},
    {"bias wrong type", 'U', false, false},
    {"bias OC - 1 values", 'U', false, false},
    {"bias bytes short", 'U', false, false},
    {"bias not constant", 'U', false, false},
    {"bias data NULL", 'U', false, false},
    {"bias rank 2", 'U', false, false},
    {"bias index out of range", 'U', false, false},
    {"input rank 3", 'U', false, false},
    {"input rank 5", 'U', false, false},
    {"output rank 3", 'U', false, false},
    {"output rank 5", 'U', false, false},
    {"input dims NULL", 'U', false, false},
    {"filter dims NULL", 'U', false, false},
    {"input channels 4", 'U', false, false},
    {"output channels OC + 1", 'U', false, false},
    {"input int32", 'U', false, false},
    {"filter of another type", 'U', false, false},
    {"output of another type", 'U', false, false},
    {"builtin_data NULL", 'U', false, false},
    {"padding 0 (unknown)", 'U', false, false},
    {"padding 3", 'U', false, false},
    {"stride_width 0", 'U', false, false},
    {"stride_height -1", 'U', false, false},
    {"stride_height 1025", 'U', false, false},
    {"dilation_width 0", 'U', false, false},
    {"dilation_height 0", 'U', false, false},
    {"activation 4 (tanh)", 'U', false, false},
    {"activation 5 (sign bit)", 'U', false, false},
    {"activation -1", 'U', false, false},
    {"one input", 'U', false, false},
    {"four inputs", 'U', false, false},
    {"no outputs", 'U', false, false},
    {"two outputs", 'U', false, false},
    {"input index -1", 'U', false, false},
    {"input index out of range", 'U', false, false},
    {"filter index -1", 'U', false, false},
    {"filter index out of range", 'U', false, false},
    {"output index -1", 'U', false, false},
    {"output index out of range", 'U', false, false},
    {"input bytes short", 'E', false, false},
    {"input data NULL", 'E', false, false},
    {"output constant", 'E', false, false},
    {"output resize fails", 'E', false, false},
    {"input smaller than the filter", 'E', false, false},
};

// A valid fixture (ConvSpec's defaults, 'valid' padding for kCmInputTooSmall) with mutation `m`.
static void BuildMutatedConv(BuiltinConv* c, bool int8, ConvMutation m) {
  ConvSpec s;
  if (m == kCmInputTooSmall) s.padding = kN2uqTfLitePaddingValid;
  BuildConv(c, int8, s);
  FakeInterpreter& f = c->f;
  N2uqTfLiteTensor &x = f.tensors[c->x], &w = f.tensors[c->w], &b = f.tensors[c->b], &y = f.tensors[c->y];
  const int oc = s.out_channels;
  const int big = 1 << 22;
  switch (m) {
    case kCmInputQuantNull: x.quantization.params = nullptr; break;
    case kCmFilterQuantNull: w.quantization.params = nullptr; break;
    case kCmOutputQuantNull: y.quantization.params = nullptr; break;
    case kCmInputQuantNotAffine: x.quantization.type = 0; break;
    case kCmFilterQuantNotAffine: w.quantization.type = 2; break;
    case kCmOutputQuantNotAffine: y.quantization.type = 0; break;
    case kCmInputScalesEmpty: c->quant[0].scale = NewFloats(c, {}); break;
    case kCmFilterScalesEmpty: c->quant[1].scale = NewFloats(c, {}); break;
    case kCmOutputScalesEmpty: c->quant[2].scale = NewFloats(c, {}); break;
    case kCmInputZeroPointsEmpty: c->quant[0].zero_point = NewInts(c, {}); break;
    case kCmOutputZeroPointsEmpty: c->quant[2].zero_point = NewInts(c, {}); break;
    case kCmFilterZeroPointsEmpty: c->quant[1].zero_point = NewInts(c, {}); break;
    case kCmFilterScalesShort: c->quant[1].scale = NewFloats(c, std::vector<float>(size_t(oc - 1), 0.01f)); break;
    case kCmFilterScalesLong: c->quant[1].scale = NewFloats(c, std::vector<float>(size_t(oc + 1), 0.01f)); break;
    case kCmInputScalesTwo: c->quant[0].scale = NewFloats(c, {kConvInputScale, kConvInputScale}); break;
    case kCmFilterZeroPointNonZero: c->quant[1].zero_point->data[oc - 1] = 1; break;
    case kCmQuantizedDimension3: c->quant[1].quantized_dimension = 3; break;
    case kCmQuantizedDimensionNegative: c->quant[1].quantized_dimension = -1; break;
    case kCmHugeScale: c->quant[1].scale->data[5] = 1e4f; break;  // 0.05 * 1e4 / 0.8 = 625
    case kCmOutputScaleZero: c->quant[2].scale->data[0] = 0.0f; break;
    case kCmOutputScaleNaN: c->quant[2].scale->data[0] = NAN; break;
    case kCmInputScaleNegative: c->quant[0].scale->data[0] = -0.05f; break;
    case kCmFilterScaleZero: c->quant[1].scale->data[3] = 0.0f; break;
    case kCmInputZeroPointOutOfRange: c->quant[0].zero_point->data[0] = 300; break;
    case kCmOutputZeroPointOutOfRange: c->quant[2].zero_point->data[0] = -200; break;
    case kCmFilterNotConstant: w.allocation_type = 2; break;  // kTfLiteArenaRw
    case kCmFilterDataNull: w.data = nullptr; break;
    case kCmFilterBytesShort: w.bytes -= 1; break;
    case kCmFilterBytesLong: w.bytes += 1; break;
    case kCmFilterRank3: SetDims(&f, c->w, {oc, 3, 3 * 3}); break;
    case kCmFilterDimZero: SetDims(&f, c->w, {oc, 0, 3, 3}); break;
    case kCmFilterDimNegative: SetDims(&f, c->w, {oc, -3, -3, 3}); break;
    case kCmFilterBytesWrap:
      // [1, 2^22, 2^22, 2^22]: 2^66 elements, a byte count of 0 modulo 2^64 (the buffer's is 0)
      SetDims(&f, c->x, {1, 1, 1, big});
      SetDims(&f, c->w, {1, big, big, big});
      SetDims(&f, c->y, {1, 1, 1, 1});
      w.bytes = 0;
      if (int8) c->quant[1].scale = NewFloats(c, {0.01f}), c->quant[1].zero_point = NewInts(c, {0});
      c->inputs.pop_back();  // no bias
      break;
    case kCmDilatedFilterPastInt32: {
      // [1, 2^21 + 1, 1, 1] at dilation 1024: a dilated height of 2^31 + 1
      const int kh = (1 << 21) + 1;
      SetDims(&f, c->x, {1, 6, 7, 1});
      SetDims(&f, c->w, {1, kh, 1, 1});
      SetDims(&f, c->y, {1, 6, 7, 1});
      SetBuffer(c, c->w, size_t(kh) * (int8 ? 1 : 4), 0);
      if (int8) c->quant[1].scale = NewFloats(c, {0.01f}), c->quant[1].zero_point = NewInts(c, {0});
      c->params.dilation_height_factor = 1024;
      c->inputs.pop_back();
      break;
    }
    case kCmFilterNaN: reinterpret_cast<float*>(w.data)[17] = NAN; break;
    case kCmBiasWrongType: b.type = int8 ? kN2uqTfLiteFloat32 : kN2uqTfLiteInt32; break;
    case kCmBiasWrongSize: SetDims(&f, c->b, {oc - 1}), b.bytes = size_t(oc - 1) * 4; break;
    case kCmBiasBytes: b.bytes -= 4; break;
    case kCmBiasNotConstant: b.allocation_type = 2; break;
    case kCmBiasDataNull: b.data = nullptr; break;
    case kCmBiasRank2: SetDims(&f, c->b, {1, oc}); break;
    case kCmBiasIndexOutOfRange: c->inputs[2] = 99; break;
    case kCmInputRank3: SetDims(&f, c->x, {2 * 9, 11, 3}); break;
    case kCmInputRank5: SetDims(&f, c->x, {2, 9, 11, 3, 1}); break;
    case kCmOutputRank3: SetDims(&f, c->y, {2 * 9, 11, oc}); break;
    case kCmOutputRank5: SetDims(&f, c->y, {2, 5, 11, oc, 1}); break;
    case kCmInputDimsNull: x.dims = nullptr; break;
    case kCmFilterDimsNull: w.dims = nullptr; break;
    case kCmChannelMismatch: SetDims(&f, c->x, {2, 9, 11, 4}); break;
    case kCmOutputChannelMismatch: SetDims(&f, c->y, {2, 5, 11, oc + 1}); break;
    case kCmInputInt32: x.type = kN2uqTfLiteInt32; break;
    case kCmFilterTypeMismatch: w.type = int8 ? kN2uqTfLiteUInt8 : kN2uqTfLiteInt8; break;
    case kCmOutputTypeMismatch: y.type = int8 ? kN2uqTfLiteUInt8 : kN2uqTfLiteInt32; break;
    case kCmBuiltinDataNull: c->builtin_data = false; break;
    case kCmPadding0: c->params.padding = 0; break;
    case kCmPadding3: c->params.padding = 3; break;
    case kCmStrideWidth0: c->params.stride_width = 0; break;
    case kCmStrideHeightNegative: c->params.stride_height = -1; break;
    case kCmStride1025: c->params.stride_height = 1025; break;
    case kCmDilationWidth0: c->params.dilation_width_factor = 0; break;
    case kCmDilationHeight0: c->params.dilation_height_factor = 0; break;
    case kCmActivationTanh: c->params.activation = 4; break;
    case kCmActivationSignBit: c->params.activation = 5; break;
    case kCmActivationNegative: c->params.activation = -1; break;
    case kCmOneInput: c->inputs = {c->x}; break;
    case kCmFourInputs: c->inputs.push_back(c->b); break;
    case kCmNoOutputs: c->outputs.clear(); break;
    case kCmTwoOutputs: c->outputs.push_back(c->b); break;
    case kCmInputIndexNegative: c->inputs[0] = -1; break;
    case kCmInputIndexOutOfRange: c->inputs[0] = int(f.tensors.size()); break;
    case kCmFilterIndexNegative: c->inputs[1] = -1; break;
    case kCmFilterIndexOutOfRange: c->inputs[1] = 1 << 30; break;
    case kCmOutputIndexNegative: c->outputs[0] = -1; break;
    case kCmOutputIndexOutOfRange: c->outputs[0] = int(f.tensors.size()); break;
    case kCmInputBytesShort: x.bytes -= 1; break;
    case kCmInputDataNull: x.data = nullptr; break;
    case kCmOutputConstant: y.allocation_type = kN2uqTfLiteMmapRo; break;
    case kCmOutputResizeFails: SetDims(&f, c->y, {1, 2, 2, oc}), f.fail_resize = true; break;
    case kCmInputTooSmall: SetDims(&f, c->x, {2, 2, 11, 3}), x.bytes = size_t(2 * 2 * 11 * 3) * (int8 ? 1 : 4); break;
    case kNumConvMutations: break;
  }
}

static void TestBuiltinConvMalformed() {
  const char* const prefixes[2] = {"CONV_2D (float)", "CONV_2D (int8)"};
  for (int int8 = 0; int8 < 2; ++int8) {
    const bool by_default = ClaimsByDefault(int8 != 0);
    for (int m = 0; m < kNumConvMutations; ++m) {
      if ((kConvMutations[m].int8_only && !int8) || (kConvMutations[m].float_only && int8)) continue;
      for (int all = 0; all < 2; ++all) {
        BuiltinConv c;
        BuildMutatedConv(&c, int8 != 0, ConvMutation(m));
        N2uqTfLiteDelegate* d = nullptr;
        const DelegateOptions options = all ? DelegateOptions{{int8 ? "int8_conv" : "float_conv", "all"}}
                                            : DelegateOptions{};
        const bool claimed = ClaimConv(&c, options, &d);
        const char expect = all || by_default ? kConvMutations[m].expect : 'U';
        const std::string where = std::string(prefixes[int8]) + " " + kConvMutations[m].name + " " +
                                  OptionsString(options);
        int status = kN2uqTfLiteOk;
        if (claimed) {
          status = PrepareAndInvoke(&c);
          if (status == kN2uqTfLiteOk) status = InvokeKernel(&c, 0);  // and once more
        }
        if (expect == 'U') {
          CHECK(!claimed, "%s: claimed (run status %d, '%s')", where.c_str(), status, c.f.last_error.c_str());
        } else if (expect == 'E') {
          CHECK(claimed && status != kN2uqTfLiteOk && c.f.last_error.find(prefixes[int8]) != std::string::npos,
                "%s: claimed %d, status %d, error '%s'", where.c_str(), int(claimed), status,
                c.f.last_error.c_str());
        } else {
          std::string why;
          CHECK(!claimed || (status == kN2uqTfLiteOk && ConvOutputMatches(c, &why)), "%s: status %d '%s' %s",
                where.c_str(), status, c.f.last_error.c_str(), why.c_str());
        }
        ReleaseConv(&c, d);
      }
    }
  }
}

// A claimed kernel across input resizes, as the interpreter drives it: after each resize its prepare
// runs again (then invoke). An input smaller than the filter: prepare reports an error, and an invoke
// anyway is refused too; then a larger input runs and matches the reference. Invokes with the input
// or output resized behind prepare's back are refused, never run out of bounds.
static void TestBuiltinConvResize() {
  for (int int8 = 0; int8 < 2; ++int8) {
    ConvSpec s;
    s.padding = kN2uqTfLitePaddingValid;
    BuiltinConv c;
    BuildConv(&c, int8 != 0, s);
    N2uqTfLiteDelegate* d = nullptr;
    const char* what = int8 ? "int8" : "float";
    const bool claimed = ClaimConv(&c, {{int8 ? "int8_conv" : "float_conv", "all"}}, &d);
    CHECK(claimed, "%s resize: not claimed", what);
    if (!claimed) {
      ReleaseConv(&c, d);
      continue;
    }
    FakeInterpreter& f = c.f;
    N2uqTfLiteTensor& x = f.tensors[c.x];
    std::string why;
    CHECK(PrepareAndInvoke(&c) == kN2uqTfLiteOk && ConvOutputMatches(c, &why), "%s resize: first run: %s %s", what,
          f.last_error.c_str(), why.c_str());
    // smaller than the 3x3 filter
    CHECK(FakeResize(&f.ctx, &x, NewArray({1, 2, 5, 3})) == kN2uqTfLiteOk, "resize");
    f.last_error.clear();
    CHECK(PrepareKernel(&c, 0) != kN2uqTfLiteOk && f.last_error.find("CONV_2D") != std::string::npos,
          "%s resize: prepare accepted an input smaller than the filter: '%s'", what, f.last_error.c_str());
    f.last_error.clear();
    CHECK(InvokeKernel(&c, 0) != kN2uqTfLiteOk, "%s resize: invoke after a failed prepare ran",
          what);
    // rank 3
    CHECK(FakeResize(&f.ctx, &x, NewArray({5, 6, 3})) == kN2uqTfLiteOk, "resize");
    CHECK(PrepareKernel(&c, 0) != kN2uqTfLiteOk && f.last_error.find("4-D") != std::string::npos,
          "%s resize: prepare accepted a 3-D input: '%s'", what, f.last_error.c_str());
    // larger, and another batch: runs
    CHECK(FakeResize(&f.ctx, &x, NewArray({3, 12, 14, 3})) == kN2uqTfLiteOk, "resize");
    FillConvInput(&c, 5);
    CHECK(PrepareAndInvoke(&c) == kN2uqTfLiteOk && ConvOutputMatches(c, &why), "%s resize: larger input: %s %s", what,
          f.last_error.c_str(), why.c_str());
    // the input shrunk without a prepare: the kernel's shape needs more than the buffer holds
    CHECK(FakeResize(&f.ctx, &x, NewArray({1, 12, 14, 3})) == kN2uqTfLiteOk, "resize");
    f.last_error.clear();
    CHECK(InvokeKernel(&c, 0) != kN2uqTfLiteOk && !f.last_error.empty(),
          "%s resize: invoke ran on an input smaller than prepared", what);
    // the output shrunk without a prepare
    CHECK(PrepareAndInvoke(&c) == kN2uqTfLiteOk, "%s resize: %s", what, f.last_error.c_str());
    CHECK(FakeResize(&f.ctx, &f.tensors[c.y], NewArray({1, 1, 1, s.out_channels})) == kN2uqTfLiteOk, "resize");
    f.last_error.clear();
    CHECK(InvokeKernel(&c, 0) != kN2uqTfLiteOk && !f.last_error.empty(),
          "%s resize: invoke ran into an output smaller than prepared", what);
    ReleaseConv(&c, d);
  }
}

// ------------------------------------------------------------------ the PAD before a claimed conv

// Puts a PAD (node 1) before the conv: a new input, the conv's less the pads, and constant int32
// paddings [[0, 0], [top, bottom], [left, right], [0, 0]], writing the conv's input; int8 tensors keep
// the input's quantization (the legacy scale and zero point too, which the claim compares).
static void AddPad(BuiltinConv* c, int top, int bottom, int left, int right) {
  FakeInterpreter& f = c->f;
  const ConvSpec& s = c->spec;
  c->pad_input = AddTensor(&f, c->int8 ? kN2uqTfLiteInt8 : kN2uqTfLiteFloat32,
                           {s.batch, s.height - top - bottom, s.width - left - right, s.in_channels}, "pad_input");
  c->paddings = AddTensor(&f, kN2uqTfLiteInt32, {4, 2}, "paddings");
  Finalize(&f);  // (the tensors moved; nothing was mutated yet)
  f.tensors[c->paddings].allocation_type = kN2uqTfLiteMmapRo;
  const int32_t pads[8] = {0, 0, top, bottom, left, right, 0, 0};
  memcpy(f.storage[c->paddings].data(), pads, sizeof(pads));
  if (c->int8) {
    f.tensors[c->pad_input].quantization = f.tensors[c->x].quantization;
    for (int t : {c->pad_input, c->x}) {
      f.tensors[t].params.scale = kConvInputScale;
      f.tensors[t].params.zero_point = kConvInputZeroPoint;
    }
  }
  c->pad_inputs = {c->pad_input, c->paddings};
  c->pad_outputs = {c->x};
  FillActivations(c, c->pad_input, 3);
  memset(f.storage[c->x].data(), 0xAB, f.storage[c->x].size());  // the PAD writes it
}

// The PAD's output computed here from its input and paddings: the input with rows and columns of the
// input's zero point (int8) or 0 around it.
static bool PadOutputMatches(const BuiltinConv& c) {
  const N2uqTfLiteTensor& in = c.f.tensors[c.pad_input];
  const N2uqTfLiteTensor& out = c.f.tensors[c.x];
  const int32_t* p = static_cast<const int32_t*>(c.f.tensors[c.paddings].data);
  const size_t item = c.int8 ? 1 : 4;
  const int n = in.dims->data[0], h = in.dims->data[1], w = in.dims->data[2], ch = in.dims->data[3];
  const int oh = h + p[2] + p[3], ow = w + p[4] + p[5];
  if (out.dims->size != 4 || out.dims->data[0] != n || out.dims->data[1] != oh || out.dims->data[2] != ow ||
      out.dims->data[3] != ch || out.bytes != size_t(n) * oh * ow * ch * item)
    return false;
  for (int b = 0; b < n; ++b)
    for (int y = 0; y < oh; ++y)
      for (int x = 0; x < ow; ++x) {
        const int iy = y - p[2], ix = x - p[4];
        const bool inside = iy >= 0 && iy < h && ix >= 0 && ix < w;
        const uint8_t* got = static_cast<const uint8_t*>(out.data) + ((size_t(b) * oh + y) * ow + x) * ch * item;
        for (size_t i = 0; i < ch * item; ++i) {
          const uint8_t want = inside ? static_cast<const uint8_t*>(in.data)[((size_t(b) * h + iy) * w + ix) * ch * item + i]
                               : c.int8 ? uint8_t(int8_t(kConvInputZeroPoint)) : uint8_t(0);
          if (got[i] != want) return false;
        }
      }
  return true;
}

// The interpreter's order: prepare the PAD (it sizes the conv's input), the conv, then invoke both.
static int RunPadAndConv(BuiltinConv* c) {
  c->f.last_error.clear();
  int status = PrepareKernel(c, 1);
  if (status == kN2uqTfLiteOk) status = PrepareKernel(c, 0);
  if (status == kN2uqTfLiteOk) status = InvokeKernel(c, 1);
  if (status == kN2uqTfLiteOk) status = InvokeKernel(c, 0);
  return status;
}

// Malformed PADs: each is left to TFLite (U: only the conv is claimed) or claimed and refused by its
// kernel (E).
enum PadMutation {
  kPmBatchPadded, kPmChannelsPadded, kPmNegative, kPmPast4096, kPmPaddingsNotConstant, kPmPaddingsDataNull,
  kPmPaddingsBytes, kPmPaddingsShape24, kPmPaddingsShape8, kPmPaddingsInt64, kPmInputInt32, kPmInputOtherType,
  kPmScaleDiffers, kPmZeroPointDiffers, kPmOneInput, kPmThreeInputs, kPmTwoOutputs, kPmInputIndexNegative,
  kPmPaddingsIndexOutOfRange, kPmInputRank3, kPmInputDimsNull, kPmInputBytesShort, kPmOutputConstant,
  kPmInputDataNull, kNumPadMutations
};

static const struct {
  const char* name;
  char expect;
  bool int8_only;
} kPadMutations[kNumPadMutations] = {
    {"batch padded", 'U', false},          {"channels padded", 'U', false},
    {"a negative pad", 'U', false},        {"a pad past 4096", 'U', false},
    {"paddings not constant", 'U', false}, {"paddings data NULL", 'U', false},
    {"paddings bytes 28", 'U', false},     {"paddings shape [2, 4]", 'U', false},
    {"paddings shape [8]", 'U', false},    {"paddings int64", 'U', false},
    {"input int32", 'U', false},           {"input of the other type", 'U', false},
    {"input scale differs", 'U', true},    {"input zero point differs", 'U', true},
    {"one input", 'U', false},             {"three inputs", 'U', false},
    {"two outputs", 'U', false},           {"input index -1", 'U', false},
    {"paddings index out of range", 'U', false}, {"input rank 3", 'U', false},
    {"input dims NULL", 'U', false},       {"input bytes short", 'E', false},
    {"output constant", 'E', false},       {"input data NULL", 'E', false},
};

static void BuildPadConv(BuiltinConv* c, bool int8) {
  ConvSpec s;
  s.padding = kN2uqTfLitePaddingValid;
  BuildConv(c, int8, s);
  AddPad(c, 1, 2, 2, 1);
}

static void TestBuiltinPad() {
  for (int int8 = 0; int8 < 2; ++int8) {
    const char* what = int8 ? "int8" : "float";
    const char* key = int8 ? "int8_conv" : "float_conv";
    // valid: claimed with the conv, the padded input and the conv's result as computed here
    for (const auto& setting : std::vector<std::pair<DelegateOptions, bool>>{
             {{{key, "all"}}, true}, {{{key, "all"}, {"isa", "portable"}}, true}, {{}, ClaimsByDefault(int8 != 0)},
             {{{key, "off"}}, false}}) {
      BuiltinConv c;
      BuildPadConv(&c, int8 != 0);
      N2uqTfLiteDelegate* d = nullptr;
      const int claimed = ClaimNodes(&c, setting.first, &d);
      const std::string where = std::string(what) + " PAD + conv " + OptionsString(setting.first);
      CHECK(claimed == (setting.second ? 2 : 0) && (!claimed || (KeptKernel(&c, 0) && KeptKernel(&c, 1))),
            "%s: %d nodes claimed", where.c_str(), claimed);
      if (claimed == 2) {
        std::string why;
        CHECK(RunPadAndConv(&c) == kN2uqTfLiteOk && PadOutputMatches(c) && ConvOutputMatches(c, &why),
              "%s: '%s' %s", where.c_str(), c.f.last_error.c_str(), why.c_str());
        // another input size: both prepare again and run it
        N2uqTfLiteTensor& in = c.f.tensors[c.pad_input];
        CHECK(FakeResize(&c.f.ctx, &in, NewArray({1, 4, 7, 3})) == kN2uqTfLiteOk, "resize");
        FillActivations(&c, c.pad_input, 8);
        CHECK(RunPadAndConv(&c) == kN2uqTfLiteOk && PadOutputMatches(c) && ConvOutputMatches(c, &why),
              "%s, resized: '%s' %s", where.c_str(), c.f.last_error.c_str(), why.c_str());
        // shrunk without a prepare: refused at invoke
        CHECK(FakeResize(&c.f.ctx, &in, NewArray({1, 2, 7, 3})) == kN2uqTfLiteOk, "resize");
        c.f.last_error.clear();
        CHECK(InvokeKernel(&c, 1) != kN2uqTfLiteOk && c.f.last_error.find("PAD") != std::string::npos,
              "%s: invoke ran on an input resized after prepare: '%s'", where.c_str(), c.f.last_error.c_str());
        // negative dims whose products match both byte counts (1 x 1 x -4 x -1 -> 1 x 4 x -1 x -1), set
        // behind prepare's back: refused at invoke, never a fill of the "left" padding of -2 channels
        CHECK(RunPadAndConv(&c) == kN2uqTfLiteOk, "%s: '%s'", where.c_str(), c.f.last_error.c_str());
        const size_t item = int8 ? 1 : 4;
        SetDims(&c.f, c.pad_input, {1, 1, -4, -1});
        in.bytes = 4 * item;
        SetDims(&c.f, c.x, {1, 4, -1, -1});
        c.f.tensors[c.x].bytes = 4 * item;
        c.f.last_error.clear();
        CHECK(InvokeKernel(&c, 1) != kN2uqTfLiteOk && c.f.last_error.find("PAD") != std::string::npos,
              "%s: invoke ran on negative dims: '%s'", where.c_str(), c.f.last_error.c_str());
        // an empty input whose padded output would hold 3 * 2^62 elements
        SetDims(&c.f, c.pad_input, {1, 0, 0x7fffffff, 0x7fffffff});
        in.bytes = 0;
        c.f.last_error.clear();
        CHECK(InvokeKernel(&c, 1) != kN2uqTfLiteOk && c.f.last_error.find("PAD") != std::string::npos,
              "%s: invoke ran on an output past int64: '%s'", where.c_str(), c.f.last_error.c_str());
        // 3-D: refused at prepare
        CHECK(FakeResize(&c.f.ctx, &in, NewArray({4, 7, 3})) == kN2uqTfLiteOk, "resize");
        CHECK(PrepareKernel(&c, 1) != kN2uqTfLiteOk && c.f.last_error.find("PAD") != std::string::npos,
              "%s: prepare accepted a 3-D input: '%s'", where.c_str(), c.f.last_error.c_str());
      }
      ReleaseConv(&c, d);
    }
    for (int m = 0; m < kNumPadMutations; ++m) {
      if (kPadMutations[m].int8_only && !int8) continue;
      BuiltinConv c;
      BuildPadConv(&c, int8 != 0);
      FakeInterpreter& f = c.f;
      N2uqTfLiteTensor &in = f.tensors[c.pad_input], &pads = f.tensors[c.paddings];
      int32_t* p = reinterpret_cast<int32_t*>(f.storage[c.paddings].data());
      switch (PadMutation(m)) {
        case kPmBatchPadded: p[0] = 1; break;
        case kPmChannelsPadded: p[7] = 1; break;
        case kPmNegative: p[2] = -1; break;
        case kPmPast4096: p[5] = 5000; break;
        case kPmPaddingsNotConstant: pads.allocation_type = 2; break;
        case kPmPaddingsDataNull: pads.data = nullptr; break;
        case kPmPaddingsBytes: pads.bytes = 28; break;
        case kPmPaddingsShape24: SetDims(&f, c.paddings, {2, 4}); break;
        case kPmPaddingsShape8: SetDims(&f, c.paddings, {8}); break;
        case kPmPaddingsInt64: pads.type = kN2uqTfLiteInt64; break;
        case kPmInputInt32: in.type = kN2uqTfLiteInt32; break;
        case kPmInputOtherType: in.type = int8 ? kN2uqTfLiteFloat32 : kN2uqTfLiteInt8; break;
        case kPmScaleDiffers: in.params.scale *= 2.0f; break;
        case kPmZeroPointDiffers: in.params.zero_point += 1; break;
        case kPmOneInput: c.pad_inputs.pop_back(); break;
        case kPmThreeInputs: c.pad_inputs.push_back(c.paddings); break;
        case kPmTwoOutputs: c.pad_outputs.push_back(c.y); break;
        case kPmInputIndexNegative: c.pad_inputs[0] = -1; break;
        case kPmPaddingsIndexOutOfRange: c.pad_inputs[1] = int(f.tensors.size()) + 5; break;
        case kPmInputRank3: SetDims(&f, c.pad_input, {2 * 6, 8, 3}); break;
        case kPmInputDimsNull: in.dims = nullptr; break;
        case kPmInputBytesShort: in.bytes -= 1; break;
        case kPmOutputConstant: f.tensors[c.x].allocation_type = kN2uqTfLiteMmapRo; break;
        case kPmInputDataNull: in.data = nullptr; break;
        case kNumPadMutations: break;
      }
      N2uqTfLiteDelegate* d = nullptr;
      const int claimed = ClaimNodes(&c, {{key, "all"}}, &d);
      const std::string where = std::string(what) + " PAD " + kPadMutations[m].name;
      if (kPadMutations[m].expect == 'U') {
        CHECK(claimed == 1 && KeptKernel(&c, 0), "%s: %d nodes claimed", where.c_str(), claimed);
      } else {
        const int status = claimed == 2 ? RunPadAndConv(&c) : kN2uqTfLiteOk;
        CHECK(claimed == 2 && status != kN2uqTfLiteOk && f.last_error.find("PAD (node 1)") != std::string::npos,
              "%s: %d nodes claimed, status %d, '%s'", where.c_str(), claimed, status, f.last_error.c_str());
      }
      ReleaseConv(&c, d);
    }
  }
}

static void TestBuiltinConv() {
  printf("builtin CONV_2D: the delegate's defaults claim int8 %s, float32 %s; int8 amx path %s\n",
         ClaimsByDefault(true) ? "yes" : "no", ClaimsByDefault(false) ? "yes" : "no",
         ProbePlanIsa(true, N2UQ_PATH_AMX) >= 0 ? "tested" : "not available");
  TestBuiltinConvValid();
  TestBuiltinConvMalformed();
  TestBuiltinConvResize();
  TestBuiltinPad();
}

int main(int argc, char** argv) {
  const int iterations = argc > 1 ? atoi(argv[1]) : 2000;
  TestFlexBuffers(iterations);
  TestRegistrations();
  TestKernels();
  TestFusedKernels();
  TestPoolKernels();
  TestBuiltinConv();
  if (failures) {
    printf("selftest: %d failure(s)\n", failures);
    return 1;
  }
  printf("selftest: OK\n");
  return 0;
}
