// delegate_selftest.cc: the FlexBuffer reader and the kernels' validation under a fake
// TfLiteContext, meant to be built with -fsanitize=address,undefined (tests/test_delegate.py).
// The reader gets truncated, bit-flipped and random buffers; the kernels get malformed
// tensors and options through both the op-resolver registration and the delegate path.
// Any out-of-bounds read aborts the sanitized binary; wrong answers print FAIL.
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

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
};

static FakeInterpreter* Self(N2uqTfLiteContext* c) { return reinterpret_cast<FakeInterpreter*>(c); }

static N2uqTfLiteIntArray* NewArray(const std::vector<int>& values) {
  auto* a = static_cast<N2uqTfLiteIntArray*>(malloc(sizeof(int) * (1 + values.size())));
  a->size = int(values.size());
  for (size_t i = 0; i < values.size(); ++i) a->data[i] = values[i];
  return a;
}

static size_t ElementSize(int type) { return type == kN2uqTfLiteInt64 ? 8 : type == kN2uqTfLiteUInt8 ? 1 : 4; }

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
  if (index != 0) return kN2uqTfLiteError;
  *node = &Self(c)->node;
  *reg = &Self(c)->node_reg;
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

int main(int argc, char** argv) {
  const int iterations = argc > 1 ? atoi(argv[1]) : 2000;
  TestFlexBuffers(iterations);
  TestRegistrations();
  TestKernels();
  TestFusedKernels();
  TestPoolKernels();
  if (failures) {
    printf("selftest: %d failure(s)\n", failures);
    return 1;
  }
  printf("selftest: OK\n");
  return 0;
}
