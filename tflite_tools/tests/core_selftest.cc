// Self-test of the kernel core: every ISA and conv path (bitserial, dot, lut, amx) this CPU
// runs against a naive scalar loop on random cases (edge channel counts, strides,
// dilations, asymmetric padding, bits 1-4 each, thread counts 1-3), through one-shot calls
// and through plans reused across input sizes, the max pool against a scalar loop, plus
// malformed arguments that must return errors. N2UQ_CPU_DISABLE (see n2uq_core.h) reaches
// the fallback kernels.
// Built with -fsanitize=address,undefined by tests/test_kernel_core.py, cross-built for
// aarch64 and run under qemu-user when the toolchain exists.
//
//   g++ -std=c++17 -O1 -g -fsanitize=address,undefined -fno-sanitize-recover=all -pthread \
//       -ffp-contract=off -Itflite_tools/core tflite_tools/core/*.cc tflite_tools/tests/core_selftest.cc
//   ./a.out [num_cases]     prints "selftest: OK ..." and exits 0 on success
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "n2uq_core.h"

namespace {

int failures = 0;

#define EXPECT(cond, ...)                                 \
  do {                                                    \
    if (!(cond)) {                                        \
      ++failures;                                         \
      std::printf("FAIL %s:%d: ", __FILE__, __LINE__);    \
      std::printf(__VA_ARGS__);                           \
      std::printf("\n");                                  \
      if (failures > 20) std::exit(1);                    \
    }                                                     \
  } while (0)

std::mt19937_64 rng(12345);

int uniform(int lo, int hi) { return std::uniform_int_distribution<int>(lo, hi)(rng); }

std::vector<uint64_t> pack(const std::vector<uint8_t>& codes, int64_t positions, int channels, int bits) {
  const int64_t words = (channels + 63) / 64;
  std::vector<uint64_t> out(size_t(positions * bits * words));
  char err[256];
  int rc = n2uq_pack_bitplanes(codes.data(), int64_t(codes.size()), positions, channels, bits, out.data(),
                               int64_t(out.size()), err, sizeof err);
  EXPECT(rc == N2UQ_OK, "pack failed: %s", err);
  // Naive check of the layout.
  for (int64_t p = 0; p < positions; ++p)
    for (int c = 0; c < channels; ++c)
      for (int b = 0; b < bits; ++b) {
        const uint64_t bit = (out[size_t((p * bits + b) * words + c / 64)] >> (c % 64)) & 1;
        if (bit != uint64_t((codes[size_t(p * channels + c)] >> b) & 1)) {
          EXPECT(false, "pack layout wrong at position %lld channel %d plane %d", (long long)p, c, b);
          return out;
        }
      }
  return out;
}

struct Case {
  N2uqConvShape s;
  int oh, ow;
};

Case random_case(bool depthwise, bool wino = false) {
  static const int channel_choices[] = {1, 2, 3, 7, 63, 64, 65, 127, 128, 129, 130, 512, 577};
  Case c{};
  N2uqConvShape& s = c.s;
  s.batch = uniform(1, 2);
  s.kernel_height = uniform(1, 4);
  s.kernel_width = uniform(1, 4);
  s.stride_height = uniform(1, 3);
  s.stride_width = uniform(1, 3);
  s.dilation_height = uniform(1, 2);
  s.dilation_width = uniform(1, 3);
  if (!depthwise && (wino || uniform(0, 3) == 0)) {  // the shapes of the dot path's Winograd forms
    s.kernel_height = s.kernel_width = 3;
    s.stride_height = s.stride_width = uniform(1, 2);  // stride 2: the polyphase form
    s.dilation_height = s.dilation_width = 1;
  } else if (!depthwise && uniform(0, 3) == 0) {  // strided 1x1 (downsample): rows and phases left unstaged
    s.kernel_height = s.kernel_width = 1;
    s.stride_height = uniform(2, 3);
    s.stride_width = uniform(2, 3);
  }
  const int eh = (s.kernel_height - 1) * s.dilation_height, ew = (s.kernel_width - 1) * s.dilation_width;
  s.pad_top = uniform(0, eh);
  s.pad_bottom = uniform(0, eh);
  s.pad_left = uniform(0, ew);
  s.pad_right = uniform(0, ew);
  s.in_height = uniform(1, 7) + (eh > s.pad_top + s.pad_bottom ? eh - s.pad_top - s.pad_bottom : 0);
  s.in_width = uniform(1, 21) + (ew > s.pad_left + s.pad_right ? ew - s.pad_left - s.pad_right : 0);
  s.in_channels = channel_choices[uniform(0, 12)];
  if (depthwise) {
    s.in_channels = uniform(1, 300);
    s.out_channels = s.in_channels * uniform(1, 2);
  } else {
    s.out_channels = uniform(1, 19);
    if (uniform(0, 3) == 0) s.out_channels = uniform(60, 70);
  }
  s.act_bits = uniform(1, 4);
  s.weight_bits = uniform(1, 4);
  c.oh = (s.in_height + s.pad_top + s.pad_bottom - eh - 1) / s.stride_height + 1;
  c.ow = (s.in_width + s.pad_left + s.pad_right - ew - 1) / s.stride_width + 1;
  return c;
}

// Naive integer conv on codes: acc = 2 * sum(m * k) - n_w * sum(m).
std::vector<int32_t> naive(const Case& c, const std::vector<uint8_t>& m, const std::vector<uint8_t>& k,
                           bool depthwise) {
  const N2uqConvShape& s = c.s;
  const int n_w = (1 << s.weight_bits) - 1;
  const int mult = depthwise ? s.out_channels / s.in_channels : 0;
  std::vector<int32_t> out(size_t(s.batch) * c.oh * c.ow * s.out_channels);
  for (int n = 0; n < s.batch; ++n)
    for (int oh = 0; oh < c.oh; ++oh)
      for (int ow = 0; ow < c.ow; ++ow)
        for (int oc = 0; oc < s.out_channels; ++oc) {
          int64_t smk = 0, sm = 0;
          for (int kh = 0; kh < s.kernel_height; ++kh)
            for (int kw = 0; kw < s.kernel_width; ++kw) {
              const int ih = oh * s.stride_height + kh * s.dilation_height - s.pad_top;
              const int iw = ow * s.stride_width + kw * s.dilation_width - s.pad_left;
              if (ih < 0 || ih >= s.in_height || iw < 0 || iw >= s.in_width) continue;
              const uint8_t* px = &m[((size_t(n) * s.in_height + ih) * s.in_width + iw) * s.in_channels];
              if (depthwise) {
                const int mv = px[oc / mult];
                smk += mv * k[(size_t(kh) * s.kernel_width + kw) * s.out_channels + oc];
                sm += mv;
              } else {
                const uint8_t* wk = &k[((size_t(oc) * s.kernel_height + kh) * s.kernel_width + kw) * s.in_channels];
                for (int ic = 0; ic < s.in_channels; ++ic) {
                  smk += int64_t(px[ic]) * wk[ic];
                  sm += px[ic];
                }
              }
            }
          out[((size_t(n) * c.oh + oh) * c.ow + ow) * s.out_channels + oc] = int32_t(2 * smk - n_w * sm);
        }
  return out;
}

std::vector<uint8_t> random_codes(size_t count, int bits) {
  std::vector<uint8_t> v(count);
  for (auto& x : v) x = uint8_t(uniform(0, (1 << bits) - 1));
  return v;
}

std::vector<int> isas() {
  std::vector<int> result;
  for (int isa = N2UQ_ISA_PORTABLE; isa <= N2UQ_ISA_NEON; ++isa)
    if (n2uq_isa_supported(isa)) result.push_back(isa);
  return result;
}

struct Combo {
  int isa, path;
};

// Every (ISA, conv path) pair this build and CPU run.
std::vector<Combo> combos() {
  std::vector<Combo> result;
  for (int isa : isas())
    for (int path = N2UQ_PATH_BITSERIAL; path < N2UQ_NUM_PATHS; ++path)
      if (n2uq_path_supported(isa, path)) result.push_back(Combo{isa, path});
  return result;
}

void check_outputs(const Case& c, const std::vector<int32_t>& expected, const std::vector<int32_t>& got_i,
                   const std::vector<float>& got_f, const std::vector<float>& mult, const std::vector<float>& bias,
                   const char* what, int isa, int threads, int path = 0) {
  for (size_t i = 0; i < expected.size(); ++i) {
    const int oc = int(i % size_t(c.s.out_channels));
    const float want = float(expected[i]) * mult[size_t(oc)] + bias[size_t(oc)];
    if (got_i[i] != expected[i] || std::memcmp(&got_f[i], &want, sizeof want) != 0) {
      EXPECT(false,
             "%s isa=%s path=%s threads=%d index %zu: int %d vs %d, float %.9g vs %.9g (C=%d OC=%d %dx%d s%dx%d "
             "d%dx%d bits a%d w%d)",
             what, n2uq_isa_name(isa), n2uq_path_name(path), threads, i, got_i[i], expected[i], got_f[i], want,
             c.s.in_channels, c.s.out_channels, c.s.kernel_height, c.s.kernel_width, c.s.stride_height,
             c.s.stride_width, c.s.dilation_height, c.s.dilation_width, c.s.act_bits, c.s.weight_bits);
      return;
    }
  }
}

void check_conv_case(const Case& c, bool depthwise) {
  const N2uqConvShape& s = c.s;
  const int64_t pixels = int64_t(s.batch) * s.in_height * s.in_width;
  std::vector<uint8_t> m = random_codes(size_t(pixels * s.in_channels), s.act_bits);
  const size_t weight_count = depthwise ? size_t(s.kernel_height) * s.kernel_width * s.out_channels
                                        : size_t(s.out_channels) * s.kernel_height * s.kernel_width * s.in_channels;
  std::vector<uint8_t> k = random_codes(weight_count, s.weight_bits);
  const std::vector<int32_t> expected = naive(c, m, k, depthwise);
  std::vector<float> mult(size_t(s.out_channels)), bias(size_t(s.out_channels));
  for (auto& x : mult) x = std::uniform_real_distribution<float>(-0.1f, 0.1f)(rng);
  for (auto& x : bias) x = std::uniform_real_distribution<float>(-1.f, 1.f)(rng);
  std::vector<uint64_t> pm, pk;
  if (!depthwise) {
    pm = pack(m, pixels, s.in_channels, s.act_bits);
    pk = pack(k, int64_t(s.out_channels) * s.kernel_height * s.kernel_width, s.in_channels, s.weight_bits);
    // Bits above the channel count are "don't care" in the input: set them.
    const int rem = s.in_channels % 64;
    if (rem != 0) {
      const int64_t words = (s.in_channels + 63) / 64;
      for (size_t i = size_t(words - 1); i < pm.size(); i += size_t(words)) pm[i] |= ~0ull << rem;
    }
  }
  if (depthwise) {
    for (int isa : isas())
      for (int threads = 1; threads <= 3; ++threads) {
        std::vector<int32_t> got_i(expected.size(), -7);
        std::vector<float> got_f(expected.size(), -7.f);
        char err[256] = "";
        const int rc = n2uq_depthwise_conv2d(&s, m.data(), int64_t(m.size()), k.data(), int64_t(k.size()),
                                             mult.data(), bias.data(), int64_t(mult.size()), got_f.data(),
                                             got_i.data(), int64_t(got_i.size()), isa, threads, err, sizeof err);
        EXPECT(rc == N2UQ_OK, "depthwise returned %d: %s", rc, err);
        if (rc == N2UQ_OK) check_outputs(c, expected, got_i, got_f, mult, bias, "depthwise", isa, threads);
      }
    return;
  }
  for (const Combo& combo : combos())
    for (int threads = 1; threads <= 3; ++threads) {
      std::vector<int32_t> got_i(expected.size(), -7);
      std::vector<float> got_f(expected.size(), -7.f);
      char err[256] = "";
      const int rc = n2uq_conv2d(&s, pm.data(), int64_t(pm.size()), pk.data(), int64_t(pk.size()), mult.data(),
                                 bias.data(), int64_t(mult.size()), got_f.data(), got_i.data(), int64_t(got_i.size()),
                                 combo.isa, combo.path, threads, err, sizeof err);
      EXPECT(rc == N2UQ_OK, "conv returned %d: %s", rc, err);
      if (rc == N2UQ_OK) check_outputs(c, expected, got_i, got_f, mult, bias, "conv", combo.isa, threads, combo.path);
    }
}

void run_conv_case(bool depthwise, bool wino = false) {
  check_conv_case(random_case(depthwise, wino), depthwise);
}

// Winograd shapes (3x3, stride 1 and 2) with every kind of partial tile block: input channels off
// the 64-channel words (K), tile counts off the blocks (M: AVX-512 register blocks, AMX's 16-row
// tiles), output channels off the 16-lane vectors and chunks (N), and for stride 2 tiles whose
// 5x5 input window runs past the input. With N2UQ_AMX_EMULATE=1 the amx path's tile model runs
// here, so the sanitizers check the addresses the AMX hardware would load and store; the last
// shape's int8 weights come in 54 KB chunks, which the amx direct form runs pair-outer
// (ConvJob::amx_pairs_outer).
void run_winograd_tail_cases() {
  static const int kShapes[][5] = {  // batch, height, width, in_channels, out_channels
      {2, 9, 11, 80, 40}, {1, 3, 3, 3, 8}, {2, 7, 5, 129, 67}, {1, 13, 13, 64, 16}, {2, 4, 6, 65, 33},
      {1, 12, 12, 150, 64}};
  for (const auto& shape : kShapes) {
    Case c{};
    N2uqConvShape& s = c.s;
    s.batch = shape[0];
    s.in_height = shape[1];
    s.in_width = shape[2];
    s.in_channels = shape[3];
    s.out_channels = shape[4];
    s.kernel_height = s.kernel_width = 3;
    s.dilation_height = s.dilation_width = 1;
    s.pad_top = uniform(0, 2);
    s.pad_bottom = uniform(0, 2);
    s.pad_left = uniform(0, 2);
    s.pad_right = uniform(0, 2);
    s.act_bits = uniform(1, 4);
    s.weight_bits = uniform(1, 4);
    for (int stride = 1; stride <= 2; ++stride) {
      s.stride_height = s.stride_width = stride;
      c.oh = (s.in_height + s.pad_top + s.pad_bottom - 3) / stride + 1;
      c.ow = (s.in_width + s.pad_left + s.pad_right - 3) / stride + 1;
      check_conv_case(c, false);
    }
  }
}

// A plan made once on one input size runs other batch sizes and input sizes of the same
// filter, on every (ISA, path), and reports the path it was made for.
// A random filter for shape s: codes k, packed pk, and the per-channel multiplier and bias.
struct Filter {
  std::vector<uint8_t> k;
  std::vector<uint64_t> pk;
  std::vector<float> mult, bias;
};

Filter random_filter(const N2uqConvShape& s) {
  Filter f;
  const int64_t weights = int64_t(s.out_channels) * s.kernel_height * s.kernel_width;
  f.k = random_codes(size_t(weights * s.in_channels), s.weight_bits);
  f.pk = pack(f.k, weights, s.in_channels, s.weight_bits);
  f.mult.resize(size_t(s.out_channels));
  f.bias.resize(size_t(s.out_channels));
  for (auto& x : f.mult) x = std::uniform_real_distribution<float>(-0.1f, 0.1f)(rng);
  for (auto& x : f.bias) x = std::uniform_real_distribution<float>(-1.f, 1.f)(rng);
  return f;
}

void run_plan_case() {
  Case c = random_case(false);
  N2uqConvShape& s = c.s;
  Filter f = random_filter(s);
  const std::vector<uint8_t>& k = f.k;
  const std::vector<uint64_t>& pk = f.pk;
  const std::vector<float>& mult = f.mult;
  const std::vector<float>& bias = f.bias;
  for (const Combo& combo : combos()) {
    N2uqConvPlan* plan = nullptr;
    char err[256] = "";
    int rc = n2uq_conv_plan_create(&s, pk.data(), int64_t(pk.size()), combo.isa, combo.path, 2, &plan, err,
                                   sizeof err);
    EXPECT(rc == N2UQ_OK && plan != nullptr, "plan_create isa=%s path=%s: %s", n2uq_isa_name(combo.isa),
           n2uq_path_name(combo.path), err);
    if (plan == nullptr) continue;
    int isa = -1, path = -1;
    EXPECT(n2uq_conv_plan_info(plan, &isa, &path) == N2UQ_OK && isa == combo.isa && path == combo.path,
           "plan_info: isa %d path %d, asked %d %d", isa, path, combo.isa, combo.path);
    for (int size = 0; size < 3; ++size) {
      Case run = c;
      run.s.batch = uniform(1, 2);
      run.s.in_height = c.s.in_height + uniform(0, 3);
      run.s.in_width = c.s.in_width + uniform(0, 9);
      n2uq_conv2d_output_size(&run.s, &run.oh, &run.ow, err, sizeof err);
      const int64_t pixels = int64_t(run.s.batch) * run.s.in_height * run.s.in_width;
      std::vector<uint8_t> m = random_codes(size_t(pixels * s.in_channels), s.act_bits);
      std::vector<uint64_t> pm = pack(m, pixels, s.in_channels, s.act_bits);
      const std::vector<int32_t> expected = naive(run, m, k, false);
      const int threads = uniform(1, 3);
      std::vector<int32_t> got_i(expected.size(), -7);
      std::vector<float> got_f(expected.size(), -7.f);
      rc = n2uq_conv_plan_run(plan, &run.s, pm.data(), int64_t(pm.size()), mult.data(), bias.data(),
                              int64_t(mult.size()), got_f.data(), got_i.data(), int64_t(got_i.size()), threads, err,
                              sizeof err);
      EXPECT(rc == N2UQ_OK, "plan_run returned %d: %s", rc, err);
      if (rc == N2UQ_OK) check_outputs(run, expected, got_i, got_f, mult, bias, "plan", combo.isa, threads, combo.path);
    }
    n2uq_conv_plan_destroy(plan);
  }
}

// Plans on trial (N2UQ_PLAN_TRIAL=all keeps every timed selection's runner-up), run from two threads
// at once until their trials close: every run's accumulators equal the reference, whichever body
// ran it, and a closed trial reports a path (under ASan: no body freed while a run still uses it).
void run_plan_trial_case() {
  setenv("N2UQ_PLAN_TRIAL", "all", 1);
  Case c = random_case(false);
  N2uqConvShape& s = c.s;
  Filter f = random_filter(s);
  char err[256] = "";
  n2uq_conv2d_output_size(&s, &c.oh, &c.ow, err, sizeof err);
  const int64_t pixels = int64_t(s.batch) * s.in_height * s.in_width;
  std::vector<uint8_t> m = random_codes(size_t(pixels * s.in_channels), s.act_bits);
  std::vector<uint64_t> pm = pack(m, pixels, s.in_channels, s.act_bits);
  const std::vector<int32_t> expected = naive(c, m, f.k, false);
  for (int isa : isas()) {
    N2uqConvPlan* plan = nullptr;
    int rc = n2uq_conv_plan_create(&s, f.pk.data(), int64_t(f.pk.size()), isa, N2UQ_PATH_AUTO, 1, &plan, err,
                                   sizeof err);
    EXPECT(rc == N2UQ_OK && plan != nullptr, "trial plan_create isa=%s: %s", n2uq_isa_name(isa), err);
    if (plan == nullptr) continue;
    const int opened = n2uq_conv_plan_on_trial(plan);
    int bad[2] = {0, 0};
    auto worker = [&](int id) {
      char werr[256] = "";
      for (int r = 0; r < 14; ++r) {
        std::vector<int32_t> got_i(expected.size(), -7);
        std::vector<float> got_f(expected.size(), -7.f);
        const int wrc = n2uq_conv_plan_run(plan, &s, pm.data(), int64_t(pm.size()), f.mult.data(), f.bias.data(),
                                           int64_t(f.mult.size()), got_f.data(), got_i.data(),
                                           int64_t(got_i.size()), 1, werr, sizeof werr);
        if (wrc != N2UQ_OK || got_i != expected) ++bad[id];
      }
    };
    std::thread a(worker, 0), b(worker, 1);
    a.join();
    b.join();
    int path = -1;
    EXPECT(bad[0] + bad[1] == 0, "trial runs isa=%s (trial %d): %d wrong or failed", n2uq_isa_name(isa), opened,
           bad[0] + bad[1]);
    EXPECT(opened >= 0 && n2uq_conv_plan_on_trial(plan) == 0, "trial isa=%s: opened %d, still open after 28 runs",
           n2uq_isa_name(isa), opened);
    EXPECT(n2uq_conv_plan_info(plan, nullptr, &path) == N2UQ_OK && path > N2UQ_PATH_AUTO && path < N2UQ_NUM_PATHS,
           "trial isa=%s: path %d", n2uq_isa_name(isa), path);
    n2uq_conv_plan_destroy(plan);
  }
  unsetenv("N2UQ_PLAN_TRIAL");
}

// n2uq_conv_plan_run_stage against the plan's float output run through n2uq_output_stage, byte for
// byte: random steps of every kind (a residual in some), float outputs anywhere, pack / codes / no
// quantizer, on every combo (the amx direct form applies stages without a residual in its own
// output pass, on the tile model under N2UQ_AMX_EMULATE=1).
void run_plan_stage_case() {
  Case c = random_case(false);
  N2uqConvShape& s = c.s;
  Filter f = random_filter(s);
  const std::vector<uint64_t>& pk = f.pk;
  const std::vector<float>& mult = f.mult;
  const std::vector<float>& bias = f.bias;
  char err[256] = "";
  n2uq_conv2d_output_size(&s, &c.oh, &c.ow, err, sizeof err);
  const int64_t pixels = int64_t(s.batch) * s.in_height * s.in_width;
  const int64_t positions = int64_t(s.batch) * c.oh * c.ow, elements = positions * s.out_channels;
  std::vector<uint8_t> m = random_codes(size_t(pixels * s.in_channels), s.act_bits);
  std::vector<uint64_t> pm = pack(m, pixels, s.in_channels, s.act_bits);
  // The stage: 0-5 steps, per-channel operands [OC], residuals [positions][OC].
  N2uqOutputStage st{};
  st.num_steps = uniform(0, 5);
  std::vector<std::vector<float>> operands(size_t(st.num_steps));
  for (int i = 0; i < st.num_steps; ++i) {
    st.steps[i].kind = uniform(1, N2UQ_STEP_KINDS - 1);
    const int kind = st.steps[i].kind;
    if (kind == N2UQ_STEP_ADD || kind == N2UQ_STEP_MUL || kind == N2UQ_STEP_PRELU || kind == N2UQ_STEP_ADD_TENSOR) {
      operands[size_t(i)].resize(size_t(kind == N2UQ_STEP_ADD_TENSOR ? elements : s.out_channels));
      for (auto& x : operands[size_t(i)]) x = std::uniform_real_distribution<float>(-2.f, 2.f)(rng);
      st.steps[i].values = operands[size_t(i)].data();
      st.steps[i].values_len = int64_t(operands[size_t(i)].size());
    }
  }
  st.quantize = uniform(0, 2);
  st.float_after = st.quantize == N2UQ_QUANTIZE_NONE ? uniform(0, st.num_steps) : uniform(-1, st.num_steps);
  st.bits = uniform(1, 4);
  std::vector<float> thresholds(size_t((1 << st.bits) - 1));
  for (auto& x : thresholds) x = std::uniform_real_distribution<float>(-1.f, 1.f)(rng);
  st.thresholds = thresholds.data();
  st.num_thresholds = int32_t(thresholds.size());
  st.beta1 = 1.5f;
  const int64_t words = (int64_t(s.out_channels) + 63) / 64;
  for (const Combo& combo : combos()) {
    N2uqConvPlan* plan = nullptr;
    int rc = n2uq_conv_plan_create(&s, pk.data(), int64_t(pk.size()), combo.isa, combo.path, 1, &plan, err,
                                   sizeof err);
    EXPECT(rc == N2UQ_OK && plan != nullptr, "stage plan_create isa=%s path=%s: %s", n2uq_isa_name(combo.isa),
           n2uq_path_name(combo.path), err);
    if (plan == nullptr) continue;
    const int threads = uniform(1, 3);
    const size_t n = static_cast<size_t>(elements);
    std::vector<float> y(n, 0.f), want_f(n, -7.f), got_f(n, -7.f);
    std::vector<uint64_t> want_p(static_cast<size_t>(positions * st.bits * words), 7), got_p(want_p.size(), 7);
    std::vector<uint8_t> want_c(n, 7), got_c(n, 7);
    rc = n2uq_conv_plan_run(plan, &s, pm.data(), int64_t(pm.size()), mult.data(), bias.data(), int64_t(mult.size()),
                            y.data(), nullptr, elements, threads, err, sizeof err);
    EXPECT(rc == N2UQ_OK, "stage: plan_run returned %d: %s", rc, err);
    rc = n2uq_output_stage(&st, positions, s.out_channels, y.data(), elements, want_f.data(), elements, want_p.data(),
                           int64_t(want_p.size()), want_c.data(), elements, combo.isa, threads, err, sizeof err);
    EXPECT(rc == N2UQ_OK, "stage: output_stage returned %d: %s", rc, err);
    rc = n2uq_conv_plan_run_stage(plan, &s, pm.data(), int64_t(pm.size()), mult.data(), bias.data(),
                                  int64_t(mult.size()), &st, got_f.data(), elements, got_p.data(),
                                  int64_t(got_p.size()), got_c.data(), elements, threads, err, sizeof err);
    EXPECT(rc == N2UQ_OK, "run_stage returned %d: %s", rc, err);
    const bool same = std::memcmp(got_f.data(), want_f.data(), got_f.size() * 4) == 0 && got_p == want_p &&
                      got_c == want_c;
    EXPECT(same, "run_stage isa=%s path=%s fused=%d threads=%d steps=%d float_after=%d quantize=%d bits=%d differs "
           "(C=%d OC=%d %dx%d s%dx%d)", n2uq_isa_name(combo.isa), n2uq_path_name(combo.path),
           n2uq_conv_plan_stage_fused(plan), threads, st.num_steps, st.float_after, st.quantize, st.bits,
           s.in_channels, s.out_channels, s.kernel_height, s.kernel_width, s.stride_height, s.stride_width);
    // A NULL stage and a too-short residual are refused with an error.
    rc = n2uq_conv_plan_run_stage(plan, &s, pm.data(), int64_t(pm.size()), mult.data(), bias.data(),
                                  int64_t(mult.size()), nullptr, got_f.data(), elements, nullptr, 0, nullptr, 0, 1, err,
                                  sizeof err);
    EXPECT(rc == N2UQ_ERR_ARGUMENT, "run_stage with a NULL stage returned %d", rc);
    if (elements > 1) {
      N2uqOutputStage short_residual = st;
      std::vector<float> residual(size_t(elements - 1), 0.f);
      short_residual.num_steps = 1;
      short_residual.float_after = 1;
      short_residual.steps[0].kind = N2UQ_STEP_ADD_TENSOR;
      short_residual.steps[0].values = residual.data();
      short_residual.steps[0].values_len = int64_t(residual.size());
      rc = n2uq_conv_plan_run_stage(plan, &s, pm.data(), int64_t(pm.size()), mult.data(), bias.data(),
                                    int64_t(mult.size()), &short_residual, got_f.data(), elements, got_p.data(),
                                    int64_t(got_p.size()), got_c.data(), elements, 1, err, sizeof err);
      EXPECT(rc == N2UQ_ERR_BUFFER, "run_stage with a short residual returned %d", rc);
    }
    n2uq_conv_plan_destroy(plan);
  }
}

// n2uq_conv_plan_run_quantizing against n2uq_quantize_and_pack then n2uq_conv_plan_run (or
// _run_stage), byte for byte: stride-2 3x3 shapes whose even outputs and whole 64-channel words let
// the AVX-512 dot path quantize inside its Winograd GEMMs (bands, an image per thread), one with
// partial tiles, every combo, 1 and 2 threads, a kept-codes buffer, and the refusals.
void run_quantizing_cases() {
  // (batch, height, width, channels, out channels): the first three inline on 1 thread (two bands of
  // two register blocks at least), the first and third on 2 as well; 7x7 outputs quantize first.
  const int shapes[][5] = {{1, 40, 48, 64, 64}, {2, 24, 16, 128, 40}, {3, 16, 16, 192, 64}, {1, 14, 14, 64, 16}};
  int inline_runs = 0;
  bool inline_possible = false;
  for (const auto& d : shapes) {
    N2uqConvShape s{};
    s.batch = d[0];
    s.in_height = d[1];
    s.in_width = d[2];
    s.in_channels = d[3];
    s.out_channels = d[4];
    s.kernel_height = s.kernel_width = 3;
    s.stride_height = s.stride_width = 2;
    s.dilation_height = s.dilation_width = 1;
    s.pad_top = s.pad_left = uniform(0, 1);
    s.pad_bottom = s.pad_right = 1;
    s.act_bits = uniform(1, 4);
    s.weight_bits = uniform(1, 4);
    Filter f = random_filter(s);
    char err[256] = "";
    int32_t oh = 0, ow = 0;
    n2uq_conv2d_output_size(&s, &oh, &ow, err, sizeof err);
    const int64_t pixels = int64_t(s.batch) * s.in_height * s.in_width;
    const int64_t elements = int64_t(s.batch) * oh * ow * s.out_channels;
    const int64_t words = (int64_t(s.in_channels) + 63) / 64;
    std::vector<float> x(size_t(pixels * s.in_channels));
    for (auto& v : x) v = std::uniform_real_distribution<float>(-2.f, 2.f)(rng);
    std::vector<float> thresholds(size_t((1 << s.act_bits) - 1));
    for (auto& v : thresholds) v = std::uniform_real_distribution<float>(-1.5f, 1.5f)(rng);
    for (size_t i = 0; i < x.size(); i += 37) x[i] = thresholds[i % thresholds.size()];  // ties
    const N2uqInputQuantizer q{x.data(), int64_t(x.size()), thresholds.data(), int32_t(thresholds.size()), 1.0f};
    N2uqOutputStage st{};
    std::vector<float> add(size_t(s.out_channels), 0.25f), stage_t = {-0.5f, 0.f, 0.5f};
    st.num_steps = 1;
    st.steps[0].kind = N2UQ_STEP_ADD;
    st.steps[0].values = add.data();
    st.steps[0].values_len = int64_t(add.size());
    st.float_after = 1;
    st.quantize = N2UQ_QUANTIZE_PACK;
    st.bits = 2;
    st.thresholds = stage_t.data();
    st.num_thresholds = 3;
    st.beta1 = 1.0f;
    const int64_t stage_words = (int64_t(s.out_channels) + 63) / 64, stage_len = elements / s.out_channels * 2 * stage_words;
    for (const Combo& combo : combos()) {
      for (int threads = 1; threads <= 2; ++threads) {
        N2uqConvPlan* plan = nullptr;
        int rc = n2uq_conv_plan_create(&s, f.pk.data(), int64_t(f.pk.size()), combo.isa, combo.path, threads, &plan,
                                       err, sizeof err);
        EXPECT(rc == N2UQ_OK && plan != nullptr, "quantizing plan_create isa=%s path=%s: %s", n2uq_isa_name(combo.isa),
               n2uq_path_name(combo.path), err);
        if (plan == nullptr) continue;
        std::vector<uint64_t> pm(size_t(pixels * s.act_bits * words), 0), kept(pm.size(), 7);
        rc = n2uq_quantize_and_pack(x.data(), int64_t(x.size()), pixels, s.in_channels, thresholds.data(),
                                    int32_t(thresholds.size()), 1.0f, s.act_bits, pm.data(), int64_t(pm.size()),
                                    combo.isa, threads, err, sizeof err);
        EXPECT(rc == N2UQ_OK, "quantizing: quantize_and_pack returned %d: %s", rc, err);
        std::vector<float> want(size_t(elements), -7.f), got(size_t(elements), -9.f), got2(size_t(elements), -9.f);
        rc = n2uq_conv_plan_run(plan, &s, pm.data(), int64_t(pm.size()), f.mult.data(), f.bias.data(),
                                int64_t(f.mult.size()), want.data(), nullptr, elements, threads, err, sizeof err);
        EXPECT(rc == N2UQ_OK, "quantizing: plan_run returned %d: %s", rc, err);
        rc = n2uq_conv_plan_run_quantizing(plan, &s, &q, nullptr, 0, f.mult.data(), f.bias.data(),
                                           int64_t(f.mult.size()), nullptr, got.data(), elements, nullptr, 0, nullptr,
                                           0, threads, err, sizeof err);
        EXPECT(rc == N2UQ_OK, "run_quantizing returned %d: %s", rc, err);
        rc = n2uq_conv_plan_run_quantizing(plan, &s, &q, kept.data(), int64_t(kept.size()), f.mult.data(),
                                           f.bias.data(), int64_t(f.mult.size()), nullptr, got2.data(), elements,
                                           nullptr, 0, nullptr, 0, threads, err, sizeof err);
        EXPECT(rc == N2UQ_OK, "run_quantizing (kept codes) returned %d: %s", rc, err);
        EXPECT(std::memcmp(got.data(), want.data(), got.size() * 4) == 0 &&
                   std::memcmp(got2.data(), want.data(), got2.size() * 4) == 0 && kept == pm,
               "run_quantizing isa=%s path=%s inline=%d threads=%d bits=%d/%d differs (%dx%dx%d -> %d, batch %d)",
               n2uq_isa_name(combo.isa), n2uq_path_name(combo.path), n2uq_conv_plan_quantizes_inline(plan, &s, threads),
               threads, s.act_bits, s.weight_bits, s.in_height, s.in_width, s.in_channels, s.out_channels, s.batch);
        inline_runs += n2uq_conv_plan_quantizes_inline(plan, &s, threads) == 1 ? 1 : 0;
        inline_possible = inline_possible || (combo.isa == N2UQ_ISA_AVX512 && combo.path == N2UQ_PATH_DOT &&
                                              n2uq_conv_plan_form(plan) == N2UQ_FORM_WINOGRAD_STRIDE2);
        std::vector<float> want_f(size_t(elements), -7.f), got_f(size_t(elements), -9.f);
        std::vector<uint64_t> want_p(size_t(stage_len), 7), got_p(size_t(stage_len), 9);
        rc = n2uq_conv_plan_run_stage(plan, &s, pm.data(), int64_t(pm.size()), f.mult.data(), f.bias.data(),
                                      int64_t(f.mult.size()), &st, want_f.data(), elements, want_p.data(), stage_len,
                                      nullptr, 0, threads, err, sizeof err);
        EXPECT(rc == N2UQ_OK, "quantizing: run_stage returned %d: %s", rc, err);
        rc = n2uq_conv_plan_run_quantizing(plan, &s, &q, nullptr, 0, f.mult.data(), f.bias.data(),
                                           int64_t(f.mult.size()), &st, got_f.data(), elements, got_p.data(),
                                           stage_len, nullptr, 0, threads, err, sizeof err);
        EXPECT(rc == N2UQ_OK && std::memcmp(got_f.data(), want_f.data(), got_f.size() * 4) == 0 && got_p == want_p,
               "run_quantizing with a stage isa=%s path=%s threads=%d differs (rc %d: %s)", n2uq_isa_name(combo.isa),
               n2uq_path_name(combo.path), threads, rc, err);
        // Refusals: no quantizer, a short input, the wrong number of thresholds, a short codes buffer.
        rc = n2uq_conv_plan_run_quantizing(plan, &s, nullptr, nullptr, 0, f.mult.data(), f.bias.data(),
                                           int64_t(f.mult.size()), nullptr, got.data(), elements, nullptr, 0, nullptr,
                                           0, threads, err, sizeof err);
        EXPECT(rc == N2UQ_ERR_ARGUMENT, "run_quantizing with no quantizer returned %d", rc);
        N2uqInputQuantizer bad = q;
        bad.x_len = q.x_len - 1;
        rc = n2uq_conv_plan_run_quantizing(plan, &s, &bad, nullptr, 0, f.mult.data(), f.bias.data(),
                                           int64_t(f.mult.size()), nullptr, got.data(), elements, nullptr, 0, nullptr,
                                           0, threads, err, sizeof err);
        EXPECT(rc == N2UQ_ERR_BUFFER, "run_quantizing with a short input returned %d", rc);
        bad = q;
        bad.num_thresholds = q.num_thresholds + 1;
        rc = n2uq_conv_plan_run_quantizing(plan, &s, &bad, nullptr, 0, f.mult.data(), f.bias.data(),
                                           int64_t(f.mult.size()), nullptr, got.data(), elements, nullptr, 0, nullptr,
                                           0, threads, err, sizeof err);
        EXPECT(rc == N2UQ_ERR_ARGUMENT, "run_quantizing with too many thresholds returned %d", rc);
        rc = n2uq_conv_plan_run_quantizing(plan, &s, &q, kept.data(), int64_t(kept.size()) - 1, f.mult.data(),
                                           f.bias.data(), int64_t(f.mult.size()), nullptr, got.data(), elements,
                                           nullptr, 0, nullptr, 0, threads, err, sizeof err);
        EXPECT(rc == N2UQ_ERR_BUFFER, "run_quantizing with a short codes buffer returned %d", rc);
        n2uq_conv_plan_destroy(plan);
      }
    }
  }
  EXPECT(!inline_possible || inline_runs >= 3, "run_quantizing: %d runs quantized inside the conv", inline_runs);
}

void run_fully_connected_case() {
  const int batch = uniform(1, 11), in_f = uniform(1, 300), out_f = uniform(1, 40);
  const int a = uniform(1, 4), w = uniform(1, 4);
  Case c{};
  c.s.batch = 1;
  c.s.in_height = c.s.kernel_height = c.s.kernel_width = c.s.stride_height = c.s.stride_width = 1;
  c.s.dilation_height = c.s.dilation_width = 1;
  c.s.in_width = batch;
  c.s.in_channels = in_f;
  c.s.out_channels = out_f;
  c.s.act_bits = a;
  c.s.weight_bits = w;
  c.oh = 1;
  c.ow = batch;
  std::vector<uint8_t> m = random_codes(size_t(batch) * in_f, a), k = random_codes(size_t(out_f) * in_f, w);
  const std::vector<int32_t> expected = naive(c, m, k, false);
  std::vector<uint64_t> pm = pack(m, batch, in_f, a), pk = pack(k, out_f, in_f, w);
  std::vector<float> mult(size_t(out_f), 0.5f), bias(size_t(out_f), 0.25f);
  for (int isa : isas()) {
    std::vector<int32_t> got_i(expected.size());
    std::vector<float> got_f(expected.size());
    char err[256] = "";
    int rc = n2uq_fully_connected(batch, in_f, out_f, a, w, pm.data(), int64_t(pm.size()), pk.data(),
                                  int64_t(pk.size()), mult.data(), bias.data(), out_f, got_f.data(), got_i.data(),
                                  int64_t(got_i.size()), isa, 2, err, sizeof err);
    EXPECT(rc == N2UQ_OK, "fully_connected returned %d: %s", rc, err);
    if (rc == N2UQ_OK) check_outputs(c, expected, got_i, got_f, mult, bias, "fully_connected", isa, 2);
  }
  N2uqConvShape shape;
  char err[256] = "";
  EXPECT(n2uq_fully_connected_shape(batch, in_f, out_f, a, w, &shape, err, sizeof err) == N2UQ_OK, "fc shape: %s", err);
  for (const Combo& combo : combos()) {
    std::vector<int32_t> got_i(expected.size());
    std::vector<float> got_f(expected.size());
    const int rc = n2uq_conv2d(&shape, pm.data(), int64_t(pm.size()), pk.data(), int64_t(pk.size()), mult.data(),
                               bias.data(), out_f, got_f.data(), got_i.data(), int64_t(got_i.size()), combo.isa,
                               combo.path, uniform(1, 3), err, sizeof err);
    EXPECT(rc == N2UQ_OK, "fully connected (conv2d) returned %d: %s", rc, err);
    if (rc == N2UQ_OK) check_outputs(c, expected, got_i, got_f, mult, bias, "fully_connected", combo.isa, 2, combo.path);
  }
}

// Quantize paths vs a naive count over the thresholds as given: any order, duplicates,
// signed zeros, NaN and infinities among the thresholds; x with exact-threshold products,
// signed zeros, NaN, infinities and denormals; beta1 positive, negative or zero; channel
// counts around the 8 / 16 lane vectors and 64-channel words; 1-3 threads.
void run_quantize_case() {
  static const int channel_choices[] = {1, 2, 7, 8, 9, 15, 16, 17, 31, 33, 63, 64, 65, 127, 130, 200, 1000};
  const int bits = uniform(1, 4), n = (1 << bits) - 1;
  const int channels = uniform(0, 3) == 0 ? uniform(1, 200)
                                          : channel_choices[uniform(0, int(sizeof channel_choices / sizeof(int)) - 1)];
  const int positions = channels >= 500 ? uniform(1, 3) : uniform(1, 9);
  const float inf = std::numeric_limits<float>::infinity(), nan = std::numeric_limits<float>::quiet_NaN();
  const float denormal = std::numeric_limits<float>::denorm_min();
  const float specials[] = {nan, -nan, inf, -inf, 0.f, -0.f, denormal, -denormal, 3e-39f, -3e-39f, 3e38f, -3e38f};
  const int num_specials = int(sizeof specials / sizeof(float));
  std::vector<float> t(static_cast<size_t>(n));
  float acc = std::uniform_real_distribution<float>(-1.f, 0.5f)(rng);
  for (auto& x : t) x = acc += std::uniform_real_distribution<float>(0.01f, 0.5f)(rng);
  const int order = uniform(0, 3);  // 0: sorted, 1: shuffled, 2: duplicates, 3: non-finite / zeros
  if (order >= 1) std::shuffle(t.begin(), t.end(), rng);
  if (order == 2)
    for (auto& x : t) x = uniform(0, 2) == 0 ? t[size_t(uniform(0, n - 1))] : uniform(0, 3) == 0 ? -0.f : x;
  if (order == 3)
    for (auto& x : t)
      if (uniform(0, 1)) x = specials[uniform(0, 7)];
  const int beta_kind = uniform(0, 4);
  const float beta1 = beta_kind == 0 ? 0.5f : beta_kind == 1 ? 0.f : beta_kind == 2 ? -0.75f
                                                                    : std::uniform_real_distribution<float>(0.5f, 2.f)(rng);
  std::vector<float> x(size_t(positions) * channels);
  for (auto& v : x) {
    const int kind = uniform(0, 5);
    const float th = t[size_t(uniform(0, n - 1))];
    v = kind == 0 && beta1 != 0.f ? th / beta1  // exactly at a threshold (beta1 = 0.5 case)
        : kind == 1 ? specials[uniform(0, num_specials - 1)]
        : kind == 2 ? th
                    : std::uniform_real_distribution<float>(-2.f, 3.f)(rng);
  }
  std::vector<uint8_t> want(x.size());
  for (size_t i = 0; i < x.size(); ++i) {
    const float scaled = x[i] * beta1;
    int code = 0;
    for (float th : t) code += scaled > th;
    want[i] = uint8_t(code);
  }
  const std::vector<uint64_t> packed_want = pack(want, positions, channels, bits);
  for (int isa : isas()) {
    const int threads = uniform(1, 3);
    std::vector<uint8_t> codes(x.size());
    std::vector<uint64_t> packed(packed_want.size());
    char err[256] = "";
    int rc = n2uq_quantize_codes(x.data(), int64_t(x.size()), t.data(), n, beta1, bits, codes.data(),
                                 int64_t(codes.size()), isa, threads, err, sizeof err);
    EXPECT(rc == N2UQ_OK && codes == want, "quantize_codes isa=%s rc=%d %s bits=%d C=%d order=%d beta1=%g",
           n2uq_isa_name(isa), rc, err, bits, channels, order, beta1);
    rc = n2uq_quantize_and_pack(x.data(), int64_t(x.size()), positions, channels, t.data(), n, beta1, bits,
                                packed.data(), int64_t(packed.size()), isa, threads, err, sizeof err);
    EXPECT(rc == N2UQ_OK && packed == packed_want, "quantize_and_pack isa=%s rc=%d %s bits=%d C=%d order=%d beta1=%g",
           n2uq_isa_name(isa), rc, err, bits, channels, order, beta1);
  }
}

// Max pool vs a scalar loop over an explicitly zero-padded copy of the input. Each window takes
// its input positions first, in row-major order, then its padding positions (the documented
// order, n2uq_max_pool2d: it decides which of +0 / -0 or of two NaNs comes out), so inputs with
// signed zeros, NaN and infinities compare bit for bit too.
std::vector<float> naive_pool(const N2uqPoolShape& s, int oh, int ow, const std::vector<float>& x) {
  const int ph = s.in_height + s.pad_top + s.pad_bottom, pw = s.in_width + s.pad_left + s.pad_right;
  const size_t c = size_t(s.channels);
  std::vector<float> padded(size_t(s.batch) * ph * pw * c, 0.f);
  std::vector<char> in_padding(size_t(ph) * pw, 1);
  for (int n = 0; n < s.batch; ++n)
    for (int y = 0; y < s.in_height; ++y)
      for (int xx = 0; xx < s.in_width; ++xx) {
        const size_t p = size_t(y + s.pad_top) * pw + size_t(xx + s.pad_left);
        in_padding[p] = 0;
        std::memcpy(&padded[(size_t(n) * ph * pw + p) * c], &x[((size_t(n) * s.in_height + y) * s.in_width + xx) * c],
                    c * sizeof(float));
      }
  std::vector<float> out(size_t(s.batch) * oh * ow * c);
  for (int n = 0; n < s.batch; ++n)
    for (int oy = 0; oy < oh; ++oy)
      for (int ox = 0; ox < ow; ++ox)
        for (size_t ch = 0; ch < c; ++ch) {
          bool first = true;
          float m = 0.f;
          for (int pass = 0; pass < 2; ++pass)  // 0: the input positions, 1: the padding's zeros
            for (int fy = 0; fy < s.filter_height; ++fy)
              for (int fx = 0; fx < s.filter_width; ++fx) {
                const size_t p = size_t(oy * s.stride_height + fy) * pw + size_t(ox * s.stride_width + fx);
                if (in_padding[p] != pass) continue;
                const float v = padded[(size_t(n) * ph * pw + p) * c + ch];
                m = first || v > m ? v : m;
                first = false;
              }
          out[((size_t(n) * oh + oy) * ow + ox) * c + ch] = m;
        }
  return out;
}

// One pool shape on random data (mode 0: mixed signs; 1: all negative, so wherever a window
// reaches the padding its zero wins; 2: a quarter special values), on every ISA, with 1 and 3
// threads.
void check_pool_case(const N2uqPoolShape& s, int mode) {
  const float inf = std::numeric_limits<float>::infinity(), nan = std::numeric_limits<float>::quiet_NaN();
  const float specials[] = {nan, -nan, inf, -inf, 0.f, -0.f, std::numeric_limits<float>::denorm_min(), -3e-39f};
  const int want_oh = (s.in_height + s.pad_top + s.pad_bottom - s.filter_height) / s.stride_height + 1;
  const int want_ow = (s.in_width + s.pad_left + s.pad_right - s.filter_width) / s.stride_width + 1;
  int32_t oh = 0, ow = 0;
  char err[256] = "";
  int rc = n2uq_max_pool2d_output_size(&s, &oh, &ow, err, sizeof err);
  EXPECT(rc == N2UQ_OK && oh == want_oh && ow == want_ow, "pool output size rc=%d %s: %dx%d, want %dx%d", rc, err,
         oh, ow, want_oh, want_ow);
  if (rc != N2UQ_OK) return;
  std::vector<float> x(size_t(s.batch) * s.in_height * s.in_width * s.channels);
  for (auto& v : x)
    v = mode == 1                         ? std::uniform_real_distribution<float>(-3.f, -0.5f)(rng)
        : mode == 2 && uniform(0, 3) == 0 ? specials[uniform(0, 7)]
                                          : std::uniform_real_distribution<float>(-2.f, 2.f)(rng);
  const std::vector<float> expected = naive_pool(s, oh, ow, x);
  for (int isa : isas())
  for (int threads : {1, 3}) {
    // Exact size with 1 thread (ASan sees any write past it); with 3, a longer buffer whose tail
    // must stay as it was.
    const size_t extra = threads == 1 ? 0 : 5;
    std::vector<float> got(expected.size() + extra, -7.f);
    rc = n2uq_max_pool2d(&s, x.data(), int64_t(x.size()), got.data(), int64_t(got.size()), isa, threads, err,
                         sizeof err);
    EXPECT(rc == N2UQ_OK, "max_pool2d %s returned %d: %s", n2uq_isa_name(isa), rc, err);
    if (rc != N2UQ_OK) continue;
    for (size_t i = 0; i < got.size(); ++i) {
      const float want = i < expected.size() ? expected[i] : -7.f;
      if (std::memcmp(&got[i], &want, sizeof want) != 0) {
        EXPECT(false,
               "max_pool2d %s threads=%d mode=%d index %zu: %.9g vs %.9g (N=%d %dx%d C=%d filter %dx%d stride "
               "%dx%d pads t%d b%d l%d r%d)",
               n2uq_isa_name(isa), threads, mode, i, got[i], want, s.batch, s.in_height, s.in_width, s.channels,
               s.filter_height, s.filter_width, s.stride_height, s.stride_width, s.pad_top, s.pad_bottom, s.pad_left,
               s.pad_right);
        break;
      }
    }
  }
  // The int8 pool on the same shape: the max of q - zp (exact in float) over a zero-padded window is
  // max(q, zp padding) - zp, so the reference is naive_pool of q - zp times the scale.
  const int32_t zp = uniform(-128, 127);
  const float scale = std::uniform_real_distribution<float>(1e-3f, 0.5f)(rng);
  std::vector<int8_t> q(x.size());
  std::vector<float> shifted(x.size());
  for (size_t i = 0; i < q.size(); ++i) {
    q[i] = int8_t(uniform(-128, 127));
    shifted[i] = float(int32_t(q[i]) - zp);
  }
  std::vector<float> expected_int8 = naive_pool(s, oh, ow, shifted);
  for (float& v : expected_int8) v *= scale;
  for (int isa : isas())
  for (int threads : {1, 3}) {
    std::vector<float> got(expected_int8.size(), -7.f);
    rc = n2uq_max_pool2d_int8(&s, q.data(), int64_t(q.size()), zp, scale, got.data(), int64_t(got.size()), isa,
                              threads, err, sizeof err);
    EXPECT(rc == N2UQ_OK, "max_pool2d_int8 %s returned %d: %s", n2uq_isa_name(isa), rc, err);
    if (rc == N2UQ_OK && std::memcmp(got.data(), expected_int8.data(), got.size() * sizeof(float)) != 0)
      EXPECT(false, "max_pool2d_int8 %s threads=%d zp=%d differs (N=%d %dx%d C=%d filter %dx%d stride %dx%d)",
             n2uq_isa_name(isa), threads, zp, s.batch, s.in_height, s.in_width, s.channels, s.filter_height,
             s.filter_width, s.stride_height, s.stride_width);
  }
}

// Channel counts around the register blocks (16-byte int8 vectors and float blocks of 16 and 4
// on the baseline, up to 64-value blocks on AVX-512, and the scalar tail), 2x3 and 3x3 filters, strides 1 and 2 (and
// mixed), no pads, asymmetric pads and pads at least a filter wide (whole windows in the padding);
// then two wide layers, whose rows (~17K outputs each, over the kernel's grain) 3 threads split.
void run_pool_cases() {
  static const int kChannels[] = {1, 5, 16, 17, 70, 100, 150};
  static const int kFilters[][2] = {{2, 3}, {3, 3}};
  static const int kPads[][4] = {{0, 0, 0, 0}, {1, 0, 2, 1}, {3, 1, 0, 4}, {0, 3, 3, 0}};  // top, bottom, left, right
  for (int channels : kChannels)
    for (const auto& f : kFilters)
      for (int stride = 1; stride <= 2; ++stride)
        for (const auto& p : kPads) {
          N2uqPoolShape s{};
          s.batch = uniform(1, 2);
          s.channels = channels;
          s.filter_height = f[0];
          s.filter_width = f[1];
          s.stride_height = stride;
          s.stride_width = uniform(0, 3) == 0 ? 3 - stride : stride;
          s.pad_top = p[0];
          s.pad_bottom = p[1];
          s.pad_left = p[2];
          s.pad_right = p[3];
          // The smallest input the padded size holds a window of, and up to a few more rows / columns.
          s.in_height = std::max(1, f[0] - p[0] - p[1]) + uniform(0, 5);
          s.in_width = std::max(1, f[1] - p[2] - p[3]) + uniform(0, 8);
          check_pool_case(s, uniform(0, 2));
        }
  static const int kWide[][3] = {{5, 250, 70}, {4, 1000, 17}};  // height, width, channels
  for (const auto& w : kWide) {
    N2uqPoolShape s{};
    s.batch = 1;
    s.in_height = w[0];
    s.in_width = w[1];
    s.channels = w[2];
    s.filter_height = s.filter_width = 3;
    s.stride_height = s.stride_width = 1;
    s.pad_top = s.pad_bottom = s.pad_left = s.pad_right = 1;
    check_pool_case(s, uniform(0, 2));
  }
}

// Malformed pool calls: each returns its status and message, and writes nothing.
void run_pool_malformed() {
  N2uqPoolShape good{};
  good.batch = 2;
  good.in_height = 4;
  good.in_width = 5;
  good.channels = 3;
  good.filter_height = good.filter_width = 3;
  good.stride_height = good.stride_width = 2;
  good.pad_top = 1;
  good.pad_right = 1;
  // Output 2 x 2 x 2 x 3 = 24 values from 2 x 4 x 5 x 3 = 120.
  std::vector<float> in(120, 1.f), out(24, -7.f);
  auto pool = [&](const N2uqPoolShape* s, const float* x, int64_t x_len, float* y, int64_t y_len, int threads,
                  int status, const char* expect) {
    char err[256] = "";
    std::fill(out.begin(), out.end(), -7.f);
    const int rc = n2uq_max_pool2d(s, x, x_len, y, y_len, N2UQ_ISA_AUTO, threads, err, sizeof err);
    EXPECT(rc == status && std::strstr(err, expect) != nullptr, "pool malformed (%s): rc=%d msg='%s'", expect, rc,
           err);
    EXPECT(std::count(out.begin(), out.end(), -7.f) == 24, "pool malformed (%s) wrote its output", expect);
  };
  {
    char err[256] = "";
    const int rc = n2uq_max_pool2d(&good, in.data(), 120, out.data(), 24, N2UQ_ISA_AUTO, 2, err, sizeof err);
    EXPECT(rc == N2UQ_OK && std::count(out.begin(), out.end(), 1.f) == 24, "good pool failed: %d %s", rc, err);
  }
  pool(nullptr, in.data(), 120, out.data(), 24, 1, N2UQ_ERR_ARGUMENT, "NULL");
  pool(&good, nullptr, 120, out.data(), 24, 1, N2UQ_ERR_ARGUMENT, "NULL");
  pool(&good, in.data(), 120, nullptr, 24, 1, N2UQ_ERR_ARGUMENT, "NULL");
  pool(&good, in.data(), 119, out.data(), 24, 1, N2UQ_ERR_BUFFER, "input has 119 elements, the shape needs 120");
  pool(&good, in.data(), 120, out.data(), 23, 1, N2UQ_ERR_BUFFER, "output has 23 elements, the shape needs 24");
  pool(&good, in.data(), -1, out.data(), 24, 1, N2UQ_ERR_BUFFER, "input has");
  pool(&good, in.data(), 120, out.data(), 24, 0, N2UQ_ERR_ARGUMENT, "num_threads");
  pool(&good, in.data(), 120, out.data(), 24, -2, N2UQ_ERR_ARGUMENT, "num_threads");
  pool(&good, in.data(), 120, out.data(), 24, N2UQ_MAX_THREADS + 1, N2UQ_ERR_ARGUMENT, "num_threads");
  {  // an ISA id out of range, and one this CPU or build lacks (if any)
    char err[256] = "";
    EXPECT(n2uq_max_pool2d(&good, in.data(), 120, out.data(), 24, 99, 1, err, sizeof err) == N2UQ_ERR_ARGUMENT &&
               std::strstr(err, "unknown ISA") != nullptr,
           "pool with ISA 99: '%s'", err);
    for (int isa = N2UQ_ISA_PORTABLE; isa <= N2UQ_ISA_NEON; ++isa)
      if (!n2uq_isa_supported(isa))
        EXPECT(n2uq_max_pool2d(&good, in.data(), 120, out.data(), 24, isa, 1, err, sizeof err) ==
                   N2UQ_ERR_UNSUPPORTED,
               "pool with unsupported ISA %d: '%s'", isa, err);
    EXPECT(std::count(out.begin(), out.end(), -7.f) == 24, "pool with a bad ISA wrote its output");
  }
  {  // the int8 pool's own arguments, and its input length in bytes
    const std::vector<int8_t> q(120, 3);
    auto pool8 = [&](const int8_t* x, int64_t x_len, int32_t zp, float scale, int status, const char* expect) {
      char err[256] = "";
      std::fill(out.begin(), out.end(), -7.f);
      const int rc =
          n2uq_max_pool2d_int8(&good, x, x_len, zp, scale, out.data(), 24, N2UQ_ISA_AUTO, 1, err, sizeof err);
      EXPECT(rc == status && std::strstr(err, expect) != nullptr, "int8 pool malformed (%s): rc=%d msg='%s'", expect,
             rc, err);
      EXPECT(std::count(out.begin(), out.end(), -7.f) == 24, "int8 pool malformed (%s) wrote its output", expect);
    };
    pool8(q.data(), 120, 128, 0.5f, N2UQ_ERR_ARGUMENT, "zero_point must be -128..127");
    pool8(q.data(), 120, -129, 0.5f, N2UQ_ERR_ARGUMENT, "zero_point must be -128..127");
    pool8(q.data(), 120, 0, 0.0f, N2UQ_ERR_ARGUMENT, "scale must be positive");
    pool8(q.data(), 120, 0, -1.0f, N2UQ_ERR_ARGUMENT, "scale must be positive");
    pool8(q.data(), 120, 0, std::numeric_limits<float>::quiet_NaN(), N2UQ_ERR_ARGUMENT, "scale must be positive");
    pool8(q.data(), 120, 0, std::numeric_limits<float>::infinity(), N2UQ_ERR_ARGUMENT, "scale must be positive");
    pool8(q.data(), 119, 0, 0.5f, N2UQ_ERR_BUFFER, "input has 119 elements, the shape needs 120");
    pool8(nullptr, 120, 0, 0.5f, N2UQ_ERR_ARGUMENT, "NULL");
  }
  struct Edit {
    int32_t N2uqPoolShape::*field;
    int32_t value;
    const char* expect;
  };
  static const Edit kEdits[] = {
      {&N2uqPoolShape::batch, 0, "must be >= 1"},          {&N2uqPoolShape::batch, -3, "must be >= 1"},
      {&N2uqPoolShape::in_height, -1, "must be >= 1"},     {&N2uqPoolShape::in_width, 0, "must be >= 1"},
      {&N2uqPoolShape::channels, 0, "must be >= 1"},       {&N2uqPoolShape::channels, (1 << 24) + 1, "must be <="},
      {&N2uqPoolShape::in_width, 2000000000, "must be <="}, {&N2uqPoolShape::filter_height, 0, "filter_height"},
      {&N2uqPoolShape::filter_width, -1, "filter_width"},  {&N2uqPoolShape::filter_width, 4097, "filter_width"},
      {&N2uqPoolShape::stride_height, 0, "stride_height"}, {&N2uqPoolShape::stride_width, -2, "stride_width"},
      {&N2uqPoolShape::pad_top, -1, "pads"},               {&N2uqPoolShape::pad_right, 4097, "pads"},
      // Larger than the padded input (4 + 1 rows, 5 + 1 columns).
      {&N2uqPoolShape::filter_height, 6, "smaller than the filter"},
      {&N2uqPoolShape::filter_width, 7, "smaller than the filter"}};
  for (const Edit& e : kEdits) {
    N2uqPoolShape s = good;
    s.*e.field = e.value;
    pool(&s, in.data(), 120, out.data(), 24, 1, N2UQ_ERR_ARGUMENT, e.expect);
    int32_t oh = -5, ow = -5;
    char err[256] = "";
    const int rc = n2uq_max_pool2d_output_size(&s, &oh, &ow, err, sizeof err);
    EXPECT(rc == N2UQ_ERR_ARGUMENT && std::strstr(err, e.expect) && oh == -5 && ow == -5,
           "pool output size malformed (%s): rc=%d msg='%s'", e.expect, rc, err);
  }
  {
    // A filter exactly the padded input's size is fine: one output row.
    N2uqPoolShape s = good;
    s.filter_height = 5;
    int32_t oh = 0, ow = 0;
    char err[256] = "";
    EXPECT(n2uq_max_pool2d_output_size(&s, &oh, &ow, err, sizeof err) == N2UQ_OK && oh == 1 && ow == 2,
           "pool filter of the padded height: %s", err);
    // Sizes whose element counts pass 2^40 are refused before any buffer is looked at.
    s = good;
    s.in_height = s.in_width = s.channels = 1 << 24;
    pool(&s, in.data(), 120, out.data(), 24, 1, N2UQ_ERR_UNSUPPORTED, "too large");
    EXPECT(n2uq_max_pool2d_output_size(nullptr, &oh, &ow, err, sizeof err) == N2UQ_ERR_ARGUMENT, "pool size NULL");
    EXPECT(n2uq_max_pool2d_output_size(&good, nullptr, &ow, err, sizeof err) == N2UQ_ERR_ARGUMENT, "pool size NULL h");
    EXPECT(n2uq_max_pool2d_output_size(&good, &oh, nullptr, err, sizeof err) == N2UQ_ERR_ARGUMENT, "pool size NULL w");
    // A too-small error buffer gets a terminated prefix; a NULL one is allowed.
    char tiny[4];
    EXPECT(n2uq_max_pool2d(nullptr, in.data(), 120, out.data(), 24, N2UQ_ISA_AUTO, 1, tiny, sizeof tiny) ==
                   N2UQ_ERR_ARGUMENT &&
               std::strlen(tiny) == 3,
           "pool tiny error buffer");
    EXPECT(n2uq_max_pool2d(&good, in.data(), 119, out.data(), 24, N2UQ_ISA_AUTO, 1, nullptr, 0) == N2UQ_ERR_BUFFER,
           "pool null error buffer");
  }
  {
    // Output and input in one buffer: any overlap is refused (nothing written); adjacent is fine.
    std::vector<float> shared(24 + 120 + 24, 2.f);
    float* base = shared.data();
    auto overlap = [&](const float* x, float* y, int status) {
      std::fill(shared.begin(), shared.end(), 2.f);
      char err[256] = "";
      const int rc = n2uq_max_pool2d(&good, x, 120, y, 24, N2UQ_ISA_AUTO, 1, err, sizeof err);
      EXPECT(rc == status && (status == N2UQ_OK || std::strstr(err, "overlaps")), "pool overlap at %td/%td: rc=%d %s",
             x - base, y - base, rc, err);
      if (status != N2UQ_OK)
        EXPECT(std::count(shared.begin(), shared.end(), 2.f) == int64_t(shared.size()), "pool overlap wrote");
    };
    overlap(base + 24, base + 24, N2UQ_ERR_ARGUMENT);   // the same address
    overlap(base + 24, base + 1, N2UQ_ERR_ARGUMENT);    // output's last value on the input's first
    overlap(base + 24, base + 143, N2UQ_ERR_ARGUMENT);  // output's first value on the input's last
    overlap(base + 24, base + 60, N2UQ_ERR_ARGUMENT);   // inside
    overlap(base + 24, base, N2UQ_OK);                  // just before
    overlap(base + 24, base + 144, N2UQ_OK);            // just after
  }
}

// Every malformed call must fail with a status and a message (never crash or read
// past a buffer: the sanitizers watch the exact-size vectors).
void run_malformed() {
  N2uqConvShape good{};
  good.batch = 1;
  good.in_height = good.in_width = 5;
  good.in_channels = 70;
  good.out_channels = 3;
  good.kernel_height = good.kernel_width = 3;
  good.stride_height = good.stride_width = good.dilation_height = good.dilation_width = 1;
  good.pad_top = good.pad_bottom = good.pad_left = good.pad_right = 1;
  good.act_bits = good.weight_bits = 2;
  std::vector<uint64_t> in(size_t(25 * 2 * 2)), w(size_t(3 * 9 * 2 * 2));
  std::vector<float> mult(3, 1.f), bias(3, 0.f), out(75);
  std::vector<int32_t> out_i(75);
  std::vector<uint8_t> codes_in(25 * 70, 1), codes_w(9 * 70, 1);
  auto conv = [&](const N2uqConvShape& s, int64_t in_len, int64_t w_len, int64_t out_len, int isa, int threads,
                  const char* expect) {
    char err[256] = "";
    int rc = n2uq_conv2d_bitserial(&s, in.data(), in_len, w.data(), w_len, mult.data(), bias.data(), 3, out.data(),
                                   out_i.data(), out_len, isa, threads, err, sizeof err);
    EXPECT(rc != N2UQ_OK && std::strstr(err, expect) != nullptr, "conv malformed (%s): rc=%d msg='%s'", expect, rc,
           err);
  };
  {
    char err[256] = "";
    int rc = n2uq_conv2d_bitserial(&good, in.data(), int64_t(in.size()), w.data(), int64_t(w.size()), mult.data(),
                                   bias.data(), 3, out.data(), out_i.data(), 75, 0, 1, err, sizeof err);
    EXPECT(rc == N2UQ_OK, "good conv failed: %s", err);
  }
  conv(good, int64_t(in.size()) - 1, int64_t(w.size()), 75, 0, 1, "input has");
  conv(good, int64_t(in.size()), int64_t(w.size()) - 1, 75, 0, 1, "weights has");
  conv(good, int64_t(in.size()), int64_t(w.size()), 74, 0, 1, "output has");
  conv(good, int64_t(in.size()), int64_t(w.size()), 75, 0, 0, "num_threads");
  conv(good, int64_t(in.size()), int64_t(w.size()), 75, 99, 1, "unknown ISA");
  N2uqConvShape s = good;
  s.act_bits = 0;
  conv(s, int64_t(in.size()), int64_t(w.size()), 75, 0, 1, "act_bits");
  s = good;
  s.weight_bits = 9;
  conv(s, int64_t(in.size()), int64_t(w.size()), 75, 0, 1, "weight_bits");
  s = good;
  s.weight_bits = 8;
  conv(s, int64_t(in.size()), int64_t(w.size()), 75, 0, 1, "not supported");
  s = good;
  s.pad_left = 3;
  conv(s, int64_t(in.size()), int64_t(w.size()), 75, 0, 1, "pad_left");
  s = good;
  s.pad_top = -1;
  conv(s, int64_t(in.size()), int64_t(w.size()), 75, 0, 1, "pad_top");
  s = good;
  s.in_channels = 0;
  conv(s, int64_t(in.size()), int64_t(w.size()), 75, 0, 1, "in_channels");
  s = good;
  s.batch = -3;
  conv(s, int64_t(in.size()), int64_t(w.size()), 75, 0, 1, "batch");
  s = good;
  s.stride_width = 0;
  conv(s, int64_t(in.size()), int64_t(w.size()), 75, 0, 1, "stride_width");
  s = good;
  s.kernel_height = 9;
  s.pad_top = s.pad_bottom = 0;
  conv(s, int64_t(in.size()), int64_t(w.size()), 75, 0, 1, "larger than the padded input");
  s = good;
  s.in_channels = 2000000000;
  conv(s, int64_t(in.size()), int64_t(w.size()), 75, 0, 1, "in_channels");
  {
    char err[256] = "";
    int rc = n2uq_conv2d_bitserial(nullptr, in.data(), 1, w.data(), 1, mult.data(), bias.data(), 3, out.data(),
                                   nullptr, 75, 0, 1, err, sizeof err);
    EXPECT(rc != N2UQ_OK && std::strlen(err) > 0, "null shape: rc=%d", rc);
    rc = n2uq_conv2d_bitserial(&good, in.data(), int64_t(in.size()), w.data(), int64_t(w.size()), mult.data(),
                               bias.data(), 3, nullptr, nullptr, 75, 0, 1, err, sizeof err);
    EXPECT(rc != N2UQ_OK && std::strstr(err, "both NULL"), "null outputs: rc=%d %s", rc, err);
    rc = n2uq_conv2d_bitserial(&good, in.data(), int64_t(in.size()), w.data(), int64_t(w.size()), mult.data(),
                               bias.data(), 2, out.data(), nullptr, 75, 0, 1, err, sizeof err);
    EXPECT(rc != N2UQ_OK && std::strstr(err, "multiplier"), "short multiplier: rc=%d %s", rc, err);
    // A too-small error buffer still gets a terminated prefix; a NULL one is allowed.
    char tiny[4];
    rc = n2uq_conv2d_bitserial(&good, in.data(), 1, w.data(), 1, mult.data(), bias.data(), 3, out.data(), nullptr,
                               75, 0, 1, tiny, sizeof tiny);
    EXPECT(rc != N2UQ_OK && std::strlen(tiny) == 3, "tiny error buffer");
    rc = n2uq_conv2d_bitserial(&good, in.data(), 1, w.data(), 1, mult.data(), bias.data(), 3, out.data(), nullptr,
                               75, 0, 1, nullptr, 0);
    EXPECT(rc == N2UQ_ERR_BUFFER, "null error buffer: rc=%d", rc);
    // Depthwise: codes above the bit width are rejected.
    N2uqConvShape d = good;
    d.out_channels = 70;
    std::vector<float> m70(70, 1.f), b70(70, 0.f), o70(25 * 70);
    codes_in[17] = 4;
    rc = n2uq_depthwise_conv2d(&d, codes_in.data(), int64_t(codes_in.size()), codes_w.data(),
                               int64_t(codes_w.size()), m70.data(), b70.data(), 70, o70.data(), nullptr,
                               int64_t(o70.size()), 0, 1, err, sizeof err);
    EXPECT(rc != N2UQ_OK && std::strstr(err, "input code 4"), "depthwise bad code: rc=%d %s", rc, err);
    codes_in[17] = 1;
    d.out_channels = 71;
    rc = n2uq_depthwise_conv2d(&d, codes_in.data(), int64_t(codes_in.size()), codes_w.data(),
                               int64_t(codes_w.size()), m70.data(), b70.data(), 70, o70.data(), nullptr,
                               int64_t(o70.size()), 0, 1, err, sizeof err);
    EXPECT(rc != N2UQ_OK && std::strstr(err, "multiple"), "depthwise bad multiplier: rc=%d %s", rc, err);
    // Packing and quantizing.
    std::vector<uint64_t> packed(2);
    uint8_t bad_codes[3] = {0, 1, 4};
    rc = n2uq_pack_bitplanes(bad_codes, 3, 1, 3, 2, packed.data(), 2, err, sizeof err);
    EXPECT(rc != N2UQ_OK && std::strstr(err, "exceeds"), "pack bad code: rc=%d %s", rc, err);
    rc = n2uq_pack_bitplanes(bad_codes, 2, 1, 3, 2, packed.data(), 2, err, sizeof err);
    EXPECT(rc == N2UQ_ERR_BUFFER, "pack short codes: rc=%d %s", rc, err);
    rc = n2uq_pack_bitplanes(bad_codes, 3, 1, 3, 3, packed.data(), 2, err, sizeof err);
    EXPECT(rc == N2UQ_ERR_BUFFER, "pack short out: rc=%d %s", rc, err);
    rc = n2uq_pack_bitplanes(bad_codes, 3, 0, 3, 2, packed.data(), 2, err, sizeof err);
    EXPECT(rc == N2UQ_ERR_ARGUMENT, "pack zero positions: rc=%d %s", rc, err);
    float x[4] = {0, 1, 2, 3}, t[3] = {0.5f, 1.5f, 2.5f};
    uint8_t q[4];
    rc = n2uq_quantize_codes(x, 4, t, 2, 1.f, 2, q, 4, 0, 1, err, sizeof err);
    EXPECT(rc != N2UQ_OK && std::strstr(err, "thresholds"), "quantize wrong threshold count: %s", err);
    rc = n2uq_quantize_codes(x, 4, t, 3, 1.f, 2, q, 3, 0, 1, err, sizeof err);
    EXPECT(rc == N2UQ_ERR_BUFFER, "quantize short out: rc=%d", rc);
    rc = n2uq_quantize_and_pack(x, 3, 2, 2, t, 3, 1.f, 2, packed.data(), 4, 0, 1, err, sizeof err);
    EXPECT(rc == N2UQ_ERR_BUFFER && std::strstr(err, "x has"), "quantize_and_pack short x: rc=%d %s", rc, err);
  }
  // Paths and plans.
  {
    char err[256] = "";
    auto conv_path = [&](int isa, int path, const char* expect) {
      const int rc = n2uq_conv2d(&good, in.data(), int64_t(in.size()), w.data(), int64_t(w.size()), mult.data(),
                                 bias.data(), 3, out.data(), nullptr, 75, isa, path, 1, err, sizeof err);
      EXPECT(rc != N2UQ_OK && std::strstr(err, expect) != nullptr, "conv path (%s): rc=%d msg='%s'", expect, rc, err);
    };
    conv_path(0, 7, "unknown path");
    conv_path(0, -1, "unknown path");
    conv_path(N2UQ_ISA_PORTABLE, N2UQ_PATH_LUT, "not supported");  // no portable LUT kernels
    for (int isa = N2UQ_ISA_PORTABLE; isa <= N2UQ_ISA_NEON; ++isa)
      for (int path = N2UQ_PATH_BITSERIAL; path < N2UQ_NUM_PATHS; ++path)
        if (n2uq_isa_supported(isa) && !n2uq_path_supported(isa, path)) conv_path(isa, path, "not supported");
    EXPECT(n2uq_path_supported(0, N2UQ_PATH_DOT) == 0 && n2uq_path_supported(N2UQ_ISA_PORTABLE, 0) == 0 &&
               n2uq_path_supported(N2UQ_ISA_PORTABLE, 9) == 0 && n2uq_path_supported(-4, 1) == 0,
           "path_supported takes concrete ISAs and paths only");
    N2uqConvPlan* plan = nullptr;
    int rc = n2uq_conv_plan_create(&good, w.data(), int64_t(w.size()) - 1, 0, 0, 1, &plan, err, sizeof err);
    EXPECT(rc == N2UQ_ERR_BUFFER && plan == nullptr && std::strstr(err, "weights has"), "plan short weights: %s", err);
    rc = n2uq_conv_plan_create(&good, w.data(), int64_t(w.size()), 0, 0, 1, nullptr, err, sizeof err);
    EXPECT(rc == N2UQ_ERR_ARGUMENT && std::strstr(err, "plan is NULL"), "plan NULL out: %s", err);
    rc = n2uq_conv_plan_create(&good, w.data(), int64_t(w.size()), 0, 0, 0, &plan, err, sizeof err);
    EXPECT(rc == N2UQ_ERR_ARGUMENT && std::strstr(err, "num_threads"), "plan threads: %s", err);
    rc = n2uq_conv_plan_create(&good, w.data(), int64_t(w.size()), 0, 0, 1, &plan, err, sizeof err);
    EXPECT(rc == N2UQ_OK && plan != nullptr, "plan create: %s", err);
    rc = n2uq_conv_plan_run(nullptr, &good, in.data(), int64_t(in.size()), mult.data(), bias.data(), 3, out.data(),
                            nullptr, 75, 1, err, sizeof err);
    EXPECT(rc == N2UQ_ERR_ARGUMENT && std::strstr(err, "plan is NULL"), "run NULL plan: %s", err);
    N2uqConvShape other = good;
    other.stride_width = 2;
    rc = n2uq_conv_plan_run(plan, &other, in.data(), int64_t(in.size()), mult.data(), bias.data(), 3, out.data(),
                            nullptr, 75, 1, err, sizeof err);
    EXPECT(rc == N2UQ_ERR_ARGUMENT && std::strstr(err, "differs from the plan"), "run other filter: %s", err);
    rc = n2uq_conv_plan_run(plan, &good, in.data(), int64_t(in.size()) - 1, mult.data(), bias.data(), 3, out.data(),
                            nullptr, 75, 1, err, sizeof err);
    EXPECT(rc == N2UQ_ERR_BUFFER && std::strstr(err, "input has"), "run short input: %s", err);
    other = good;
    other.in_height = 9;  // larger input than the buffers
    rc = n2uq_conv_plan_run(plan, &other, in.data(), int64_t(in.size()), mult.data(), bias.data(), 3, out.data(),
                            nullptr, 75, 1, err, sizeof err);
    EXPECT(rc == N2UQ_ERR_BUFFER, "run larger shape on small buffers: rc=%d %s", rc, err);
    rc = n2uq_conv_plan_run(plan, &good, in.data(), int64_t(in.size()), mult.data(), bias.data(), 3, out.data(),
                            nullptr, 75, 1, err, sizeof err);
    EXPECT(rc == N2UQ_OK, "plan run: %s", err);
    EXPECT(n2uq_conv_plan_info(nullptr, nullptr, nullptr) == N2UQ_ERR_ARGUMENT, "info NULL plan");
    EXPECT(n2uq_conv_plan_form(nullptr) == N2UQ_ERR_ARGUMENT, "form NULL plan");
    n2uq_conv_plan_destroy(plan);
    n2uq_conv_plan_destroy(nullptr);
    N2uqConvShape fc;
    EXPECT(n2uq_fully_connected_shape(0, 3, 3, 2, 2, &fc, err, sizeof err) == N2UQ_ERR_ARGUMENT &&
               std::strstr(err, "batch"), "fc shape batch: %s", err);
    EXPECT(n2uq_fully_connected_shape(1, 3, 3, 2, 2, nullptr, err, sizeof err) == N2UQ_ERR_ARGUMENT, "fc shape NULL");
  }
}


// ---- Int8 convolution (n2uq_int8_conv_plan_*): TFLite's int8 CONV_2D with XNNPACK's fp32
// requantization, against a scalar loop here: acc = bias + sum (x - zp_in) w in int64 over the
// padded input (padding holds x = zp_in), then clamp(rne(float(acc) * s), min - zp, max - zp) + zp
// with s = input_scale * filter_scale / output_scale in float32.

struct Int8Combo {
  int isa, path;
};

// The int8 conv's paths here: portable C always, AVX-512 VNNI and AMX (hardware, or the tile model
// under N2UQ_AMX_EMULATE=1) where the core offers those conv paths.
std::vector<Int8Combo> int8_combos() {
  std::vector<Int8Combo> result{{N2UQ_ISA_PORTABLE, N2UQ_PATH_DOT}};
  if (n2uq_isa_supported(N2UQ_ISA_AVX512)) {
    if (n2uq_path_supported(N2UQ_ISA_AVX512, N2UQ_PATH_DOT)) result.push_back({N2UQ_ISA_AVX512, N2UQ_PATH_DOT});
    if (n2uq_path_supported(N2UQ_ISA_AVX512, N2UQ_PATH_AMX)) result.push_back({N2UQ_ISA_AVX512, N2UQ_PATH_AMX});
  }
  return result;
}

struct Int8Case {
  N2uqConvShape s;  // the filter and geometry; batch and input size of the first input
  std::vector<int8_t> w;
  std::vector<int32_t> bias;  // empty: no bias (NULL)
  std::vector<float> scales;  // 1 or out_channels
  N2uqInt8ConvParams p;
};

int32_t int8_out_size(int32_t size, int32_t kernel, int32_t stride, int32_t dilation, int32_t pad_a, int32_t pad_b) {
  return (size + pad_a + pad_b - (kernel - 1) * dilation - 1) / stride + 1;
}

std::vector<int64_t> naive_int8_acc(const Int8Case& c, const N2uqConvShape& s, const std::vector<int8_t>& x) {
  const int oh = int8_out_size(s.in_height, s.kernel_height, s.stride_height, s.dilation_height, s.pad_top,
                               s.pad_bottom);
  const int ow = int8_out_size(s.in_width, s.kernel_width, s.stride_width, s.dilation_width, s.pad_left,
                               s.pad_right);
  const int zp = c.p.input_zero_point;
  std::vector<int64_t> acc(size_t(s.batch) * oh * ow * s.out_channels);
  for (int n = 0; n < s.batch; ++n)
    for (int y = 0; y < oh; ++y)
      for (int xo = 0; xo < ow; ++xo)
        for (int oc = 0; oc < s.out_channels; ++oc) {
          int64_t sum = c.bias.empty() ? 0 : c.bias[size_t(oc)];
          for (int kh = 0; kh < s.kernel_height; ++kh)
            for (int kw = 0; kw < s.kernel_width; ++kw) {
              const int ih = y * s.stride_height + kh * s.dilation_height - s.pad_top;
              const int iw = xo * s.stride_width + kw * s.dilation_width - s.pad_left;
              const bool inside = ih >= 0 && ih < s.in_height && iw >= 0 && iw < s.in_width;
              const int8_t* wk = &c.w[((size_t(oc) * s.kernel_height + kh) * s.kernel_width + kw) * s.in_channels];
              for (int ic = 0; ic < s.in_channels; ++ic) {
                const int v = inside ? x[((size_t(n) * s.in_height + ih) * s.in_width + iw) * s.in_channels + ic] : zp;
                sum += int64_t(v - zp) * wk[ic];
              }
            }
          acc[((size_t(n) * oh + y) * ow + xo) * s.out_channels + oc] = sum;
        }
  return acc;
}

std::vector<int8_t> naive_int8_requantize(const Int8Case& c, const std::vector<int64_t>& acc) {
  std::vector<int8_t> out(acc.size());
  const int oc_count = c.s.out_channels, zp = c.p.output_zero_point;
  const float lo = float(c.p.output_min - zp), hi = float(c.p.output_max - zp);
  for (size_t i = 0; i < acc.size(); ++i) {
    const int oc = int(i % size_t(oc_count));
    EXPECT(acc[i] >= INT32_MIN && acc[i] <= INT32_MAX, "int8 case accumulator %lld past int32", (long long)acc[i]);
    const float fs = c.scales[c.scales.size() == 1 ? 0 : size_t(oc)];
    const float scale = c.p.input_scale * fs / c.p.output_scale;
    float f = float(int32_t(acc[i])) * scale;
    f = std::min(std::max(f, lo), hi);
    out[i] = int8_t(int(std::nearbyint(f)) + zp);
  }
  return out;
}

std::vector<int8_t> random_int8(size_t count, int lo = -128, int hi = 127) {
  std::vector<int8_t> v(count);
  for (auto& x : v) x = int8_t(uniform(lo, hi));
  return v;
}

// Creates a plan of `c` for every int8 path and runs it on each input (exact-size buffers, so
// the sanitizers see any access outside them) with 1-3 threads.
void check_int8_case(const Int8Case& c, const std::vector<N2uqConvShape>& shapes, const char* what) {
  std::vector<std::vector<int8_t>> inputs;
  std::vector<std::vector<int8_t>> expected;
  for (const N2uqConvShape& s : shapes) {
    inputs.push_back(random_int8(size_t(s.batch) * s.in_height * s.in_width * s.in_channels));
    if (uniform(0, 4) == 0)  // inputs all at one end: row bytes 0x00 / 0xFF, the widest sums
      std::fill(inputs.back().begin(), inputs.back().end(), int8_t(uniform(0, 1) ? 127 : -128));
    expected.push_back(naive_int8_requantize(c, naive_int8_acc(c, s, inputs.back())));
  }
  for (const Int8Combo& combo : int8_combos()) {
    N2uqInt8ConvPlan* plan = nullptr;
    char err[256] = "";
    int rc = n2uq_int8_conv_plan_create(&c.s, c.w.data(), int64_t(c.w.size()), c.bias.empty() ? nullptr : c.bias.data(),
                                        int64_t(c.bias.size()), c.scales.data(), int64_t(c.scales.size()), &c.p,
                                        combo.isa, combo.path, &plan, err, sizeof err);
    EXPECT(rc == N2UQ_OK && plan != nullptr, "%s: int8 plan_create isa=%s path=%s: %s", what,
           n2uq_isa_name(combo.isa), n2uq_path_name(combo.path), err);
    if (plan == nullptr) continue;
    int isa = -1, path = -1;
    EXPECT(n2uq_int8_conv_plan_info(plan, &isa, &path) == N2UQ_OK && isa == combo.isa && path == combo.path,
           "%s: int8 plan_info isa %d path %d, asked %d %d", what, isa, path, combo.isa, combo.path);
    for (size_t i = 0; i < shapes.size(); ++i) {
      const N2uqConvShape& s = shapes[i];
      for (int threads = 1; threads <= 3; ++threads) {
        std::vector<int8_t> got(expected[i].size(), int8_t(-77));
        rc = n2uq_int8_conv_plan_run(plan, &s, inputs[i].data(), int64_t(inputs[i].size()), got.data(),
                                     int64_t(got.size()), threads, err, sizeof err);
        EXPECT(rc == N2UQ_OK, "%s: int8 plan_run returned %d: %s", what, rc, err);
        if (rc != N2UQ_OK) continue;
        for (size_t j = 0; j < got.size(); ++j)
          if (got[j] != expected[i][j]) {
            EXPECT(false,
                   "%s: int8 conv isa=%s path=%s threads=%d index %zu: %d vs %d (N=%d %dx%d C=%d OC=%d k%dx%d s%dx%d "
                   "d%dx%d pads %d %d %d %d zp %d %d range %d..%d scales %zu bias %d)",
                   what, n2uq_isa_name(combo.isa), n2uq_path_name(combo.path), threads, j, got[j], expected[i][j],
                   s.batch, s.in_height, s.in_width, s.in_channels, s.out_channels, s.kernel_height, s.kernel_width,
                   s.stride_height, s.stride_width, s.dilation_height, s.dilation_width, s.pad_top, s.pad_bottom,
                   s.pad_left, s.pad_right, c.p.input_zero_point, c.p.output_zero_point, c.p.output_min,
                   c.p.output_max, c.scales.size(), int(!c.bias.empty()));
            break;
          }
      }
    }
    n2uq_int8_conv_plan_destroy(plan);
  }
}

int pick_zero_point() {
  const int kind = uniform(0, 2);
  return kind == 0 ? -128 : kind == 1 ? 127 : uniform(-128, 127);
}

void run_int8_case() {
  // 32 and 33, kernel heights to 8: the AVX-512 kernels' column-stacked rows (VBMI) take C <= 32 and
  // KH * C <= 256, other shapes per-pixel rows; every third case has rows of several 32-pixel blocks.
  static const int channel_choices[] = {1, 2, 3, 4, 5, 6, 7, 8, 16, 19, 32, 33, 64, 65, 130};
  static const int wide_out[] = {32, 33, 64, 70};
  Int8Case c{};
  N2uqConvShape& s = c.s;
  s.batch = uniform(1, 2);
  s.in_channels = channel_choices[uniform(0, int(sizeof channel_choices / sizeof(int)) - 1)];
  s.out_channels = uniform(0, 2) == 0 ? wide_out[uniform(0, 3)] : uniform(1, 19);
  s.kernel_height = uniform(1, 8);
  s.kernel_width = uniform(1, 7);
  s.stride_height = uniform(1, 3);
  s.stride_width = uniform(1, 3);
  s.dilation_height = uniform(1, 2);
  s.dilation_width = uniform(1, 2);
  const int eh = (s.kernel_height - 1) * s.dilation_height, ew = (s.kernel_width - 1) * s.dilation_width;
  s.pad_top = uniform(0, eh);
  s.pad_bottom = uniform(0, eh);
  s.pad_left = uniform(0, ew);
  s.pad_right = uniform(0, ew);
  s.in_height = uniform(1, 6) + std::max(0, eh - s.pad_top - s.pad_bottom);
  s.in_width = (uniform(0, 2) == 0 ? uniform(30, 110) : uniform(1, 16)) + std::max(0, ew - s.pad_left - s.pad_right);
  s.act_bits = uniform(-5, 9);  // ignored by the int8 conv
  s.weight_bits = uniform(-5, 9);
  c.w = random_int8(size_t(s.out_channels) * s.kernel_height * s.kernel_width * s.in_channels,
                    uniform(0, 2) == 0 ? -128 : -127);
  if (uniform(0, 3) != 0) {
    c.bias.resize(size_t(s.out_channels));
    for (auto& b : c.bias) b = uniform(-20000, 20000);
  }
  c.p.input_zero_point = pick_zero_point();
  c.p.output_zero_point = pick_zero_point();
  c.p.input_scale = std::uniform_real_distribution<float>(0.005f, 0.05f)(rng);
  c.scales.resize(uniform(0, 2) == 0 ? 1 : size_t(s.out_channels));
  for (auto& f : c.scales) f = std::uniform_real_distribution<float>(0.005f, 0.02f)(rng);
  // The output scale from the spread of the accumulators (so rounding and both clamps occur).
  std::vector<N2uqConvShape> shapes{s};
  N2uqConvShape other = s;
  other.batch = 3 - s.batch;
  other.in_height += uniform(0, 3);
  other.in_width += uniform(0, 9);
  shapes.push_back(other);
  const std::vector<int8_t> probe = random_int8(size_t(s.batch) * s.in_height * s.in_width * s.in_channels);
  double sq = 0;
  const std::vector<int64_t> acc = naive_int8_acc(c, s, probe);
  for (int64_t a : acc) sq += double(a) * double(a);
  const double rms = std::max(1.0, std::sqrt(sq / double(acc.size())));
  c.p.output_scale = float(double(c.p.input_scale) * 0.0125 * rms / 30.0);
  const int zp = c.p.output_zero_point, kind = uniform(0, 4);
  c.p.output_min = kind == 1 ? zp : kind == 2 ? std::max(-128, zp - 4) : kind == 4 ? uniform(-128, 127) : -128;
  c.p.output_max = kind == 2 ? std::min(127, zp + 4) : kind == 3 ? std::min(127, zp + 12) : 127;
  if (kind == 3) c.p.output_min = zp;
  if (kind == 4) c.p.output_max = c.p.output_min;
  check_int8_case(c, shapes, "random");
}

// Fixed shapes: the ResNet stem (7x7/2, 3 -> 64 at 224 x 224, TF 'same' pads), receptive fields
// of exactly 64 bytes (4x4x4, 1x1x64) and one over, pixel counts around the 32-pixel blocks; the
// column-stacked rows' limits (KH * C = 256 and 288, C = 32 and 33), a one-register window (C = 1)
// and rows narrower than the kernel.
void run_int8_fixed_cases() {
  // H, W, C, OC, KH, KW, stride, pad: top / left that (at most KH - 1, KW - 1), bottom / right one more
  static const int kShapes[][8] = {
      {224, 224, 3, 64, 7, 7, 2, 2}, {8, 12, 4, 16, 4, 4, 1, 1},  {5, 13, 64, 17, 1, 1, 1, 0},
      {6, 7, 65, 33, 1, 1, 2, 0},    {9, 9, 8, 31, 2, 4, 1, 0},   {3, 11, 1, 5, 1, 1, 1, 0},
      {10, 40, 32, 33, 8, 1, 1, 3},  {9, 33, 32, 17, 9, 1, 1, 4}, {8, 35, 33, 20, 7, 2, 1, 0},
      {3, 100, 1, 5, 1, 1, 1, 0},    {9, 5, 7, 9, 4, 6, 1, 3},    {12, 98, 5, 40, 3, 5, 3, 2}};
  for (const auto& d : kShapes) {
    Int8Case c{};
    N2uqConvShape& s = c.s;
    s.batch = 1;
    s.in_height = d[0];
    s.in_width = d[1];
    s.in_channels = d[2];
    s.out_channels = d[3];
    s.kernel_height = d[4];
    s.kernel_width = d[5];
    s.stride_height = s.stride_width = d[6];
    s.dilation_height = s.dilation_width = 1;
    s.pad_top = std::min(d[7], d[4] - 1);
    s.pad_left = std::min(d[7], d[5] - 1);
    s.pad_bottom = std::min(d[7] + 1, d[4] - 1);
    s.pad_right = std::min(d[7] + 1, d[5] - 1);
    c.w = random_int8(size_t(s.out_channels) * s.kernel_height * s.kernel_width * s.in_channels, -127);
    c.bias.resize(size_t(s.out_channels));
    for (auto& b : c.bias) b = uniform(-3000, 3000);
    c.scales.resize(size_t(s.out_channels));
    for (auto& f : c.scales) f = std::uniform_real_distribution<float>(0.002f, 0.02f)(rng);
    c.p = N2uqInt8ConvParams{0.0187f, -9, 0.3f * std::sqrt(float(s.in_channels * s.kernel_height * s.kernel_width) /
                                                              147.f), -128, -128, 127};
    check_int8_case(c, {s}, "fixed");
  }
}

// Exact ties: scale 1 * 0.5 / 1 = 0.5 on a 1x1 conv with weight 1, so outputs are rne(x / 2) + zp
// (half to even, as XNNPACK; TFLite's reference kernels would round away from zero).
void run_int8_ties() {
  const int8_t x[] = {-9, -7, -5, -3, -1, 0, 1, 3, 5, 7, 9, 11, 127, -128};
  const int want[] = {-4, -4, -2, -2, 0, 0, 0, 2, 2, 4, 4, 6, 64, -64};
  const int count = int(sizeof x);
  N2uqConvShape s{};
  s.batch = s.in_height = s.in_channels = s.out_channels = s.kernel_height = s.kernel_width = 1;
  s.in_width = count;
  s.stride_height = s.stride_width = s.dilation_height = s.dilation_width = 1;
  const int8_t w = 1;
  const float scale = 0.5f;
  for (const Int8Combo& combo : int8_combos())
    for (int zp : {0, 3, -7}) {
      const N2uqInt8ConvParams p{1.0f, 0, 1.0f, zp, -128, 127};
      N2uqInt8ConvPlan* plan = nullptr;
      char err[256] = "";
      int rc = n2uq_int8_conv_plan_create(&s, &w, 1, nullptr, 0, &scale, 1, &p, combo.isa, combo.path, &plan, err,
                                          sizeof err);
      EXPECT(rc == N2UQ_OK, "ties plan: %s", err);
      if (rc != N2UQ_OK) continue;
      std::vector<int8_t> out(size_t(count), int8_t(99));
      rc = n2uq_int8_conv_plan_run(plan, &s, x, count, out.data(), count, 2, err, sizeof err);
      EXPECT(rc == N2UQ_OK, "ties run: %s", err);
      for (int i = 0; i < count && rc == N2UQ_OK; ++i)
        EXPECT(out[size_t(i)] == want[i] + zp, "ties isa=%s path=%s zp=%d: x=%d gave %d, want %d",
               n2uq_isa_name(combo.isa), n2uq_path_name(combo.path), zp, x[i], out[size_t(i)], want[i] + zp);
      n2uq_int8_conv_plan_destroy(plan);
    }
}

// Sums past int32 inside the kernels: the rows hold x + 128, so with x = zp = 127 and weights of
// 127 over 70656 channels the running sum reaches about 2^31 while TFLite's accumulator (x - zp)
// stays small; every path must wrap as VPDPBUSD does (the portable loop once overflowed a signed
// int32 here, which the sanitizers report) and land on TFLite's value.
void run_int8_wrapping_sums() {
  Int8Case c{};
  N2uqConvShape& s = c.s;
  s.batch = s.in_height = s.in_width = s.kernel_height = s.kernel_width = 1;
  s.stride_height = s.stride_width = s.dilation_height = s.dilation_width = 1;
  s.in_channels = 69 * 1024;
  s.out_channels = 3;
  c.w.assign(size_t(s.out_channels) * s.in_channels, int8_t(127));
  c.bias = {100, -100, 7};
  c.scales = {0.0625f};
  c.p = N2uqInt8ConvParams{1.0f, 127, 1.0f, 0, -128, 127};
  std::vector<int8_t> x(size_t(s.in_channels), int8_t(127));
  x[0] = 126, x[1] = 125, x[2] = 120;
  const std::vector<int8_t> expected = naive_int8_requantize(c, naive_int8_acc(c, s, x));
  for (const Int8Combo& combo : int8_combos()) {
    N2uqInt8ConvPlan* plan = nullptr;
    char err[256] = "";
    int rc = n2uq_int8_conv_plan_create(&s, c.w.data(), int64_t(c.w.size()), c.bias.data(), 3, c.scales.data(), 1,
                                        &c.p, combo.isa, combo.path, &plan, err, sizeof err);
    EXPECT(rc == N2UQ_OK, "wrapping sums plan: %s", err);
    if (rc != N2UQ_OK) continue;
    std::vector<int8_t> out(3, int8_t(99));
    rc = n2uq_int8_conv_plan_run(plan, &s, x.data(), int64_t(x.size()), out.data(), 3, 1, err, sizeof err);
    EXPECT(rc == N2UQ_OK && out == expected, "wrapping sums isa=%s path=%s: %d %d %d, want %d %d %d (%s)",
           n2uq_isa_name(combo.isa), n2uq_path_name(combo.path), out[0], out[1], out[2], expected[0], expected[1],
           expected[2], err);
    n2uq_int8_conv_plan_destroy(plan);
  }
}

// Every malformed int8 call returns an error status with a message, never crashes or touches
// memory outside the exact-size buffers, leaves *plan NULL and the output unwritten.
void run_int8_malformed() {
  N2uqConvShape good{};
  good.batch = 1;
  good.in_height = good.in_width = 5;
  good.in_channels = 3;
  good.out_channels = 5;
  good.kernel_height = good.kernel_width = 3;
  good.stride_height = good.stride_width = good.dilation_height = good.dilation_width = 1;
  good.pad_top = good.pad_bottom = good.pad_left = good.pad_right = 1;
  const std::vector<int8_t> w = random_int8(5 * 9 * 3, -127), x = random_int8(75);
  const std::vector<int32_t> bias(5, 7);
  const std::vector<float> scales(5, 0.01f);
  const N2uqInt8ConvParams params{0.02f, 3, 0.1f, -2, -128, 127};
  const float nan = std::numeric_limits<float>::quiet_NaN(), inf = std::numeric_limits<float>::infinity();
  struct Create {
    const N2uqConvShape* shape;
    const int8_t* filter;
    int64_t filter_len;
    const int32_t* bias;
    int64_t bias_len;
    const float* scales;
    int64_t scales_len;
    const N2uqInt8ConvParams* params;
    int isa, path;
    bool out;
  };
  const Create base{&good, w.data(), 135, bias.data(), 5, scales.data(), 5, &params, 0, 0, true};
  auto create = [&](const Create& a, int status, const char* expect) {
    int sentinel = 0;
    N2uqInt8ConvPlan* plan = reinterpret_cast<N2uqInt8ConvPlan*>(&sentinel);  // must become NULL
    char err[256] = "";
    const int rc = n2uq_int8_conv_plan_create(a.shape, a.filter, a.filter_len, a.bias, a.bias_len, a.scales,
                                              a.scales_len, a.params, a.isa, a.path, a.out ? &plan : nullptr, err,
                                              sizeof err);
    EXPECT(rc == status && std::strstr(err, expect) != nullptr && (!a.out || (plan != nullptr) == (rc == N2UQ_OK)),
           "int8 create (%s): rc=%d msg='%s'", expect, rc, err);
    if (rc == N2UQ_OK && a.out) n2uq_int8_conv_plan_destroy(plan);
  };
  Create a = base;
  a.shape = nullptr;
  create(a, N2UQ_ERR_ARGUMENT, "shape is NULL");
  a = base;
  a.out = false;
  create(a, N2UQ_ERR_ARGUMENT, "plan pointer is NULL");
  a = base;
  a.params = nullptr;
  create(a, N2UQ_ERR_ARGUMENT, "params is NULL");
  a = base;
  a.filter = nullptr;
  create(a, N2UQ_ERR_BUFFER, "filter must hold");
  a = base;
  a.filter_len = 134;
  create(a, N2UQ_ERR_BUFFER, "= 135 int8 values, got 134");
  a.filter_len = 136;
  create(a, N2UQ_ERR_BUFFER, "= 135 int8 values, got 136");
  a.filter_len = -1;
  create(a, N2UQ_ERR_BUFFER, "got -1");
  a = base;
  a.bias_len = 4;
  create(a, N2UQ_ERR_BUFFER, "bias must hold out_channels = 5 values, got 4");
  a = base;
  a.scales = nullptr;
  create(a, N2UQ_ERR_BUFFER, "filter_scales must hold");
  a = base;
  a.scales_len = 0;
  create(a, N2UQ_ERR_BUFFER, "got 0");
  a.scales_len = 2;
  create(a, N2UQ_ERR_BUFFER, "got 2");
  a = base;
  a.isa = 99;
  create(a, N2UQ_ERR_ARGUMENT, "");
  a = base;
  a.path = 7;
  create(a, N2UQ_ERR_ARGUMENT, "unknown path");
  a.path = -1;
  create(a, N2UQ_ERR_ARGUMENT, "unknown path");
  a = base;
  a.isa = N2UQ_ISA_PORTABLE;
  a.path = N2UQ_PATH_AMX;
  create(a, N2UQ_ERR_UNSUPPORTED, "amx path is not available");
  for (int path : {N2UQ_PATH_BITSERIAL, N2UQ_PATH_LUT}) {  // paths the int8 conv lacks: the automatic choice
    a = base;
    a.path = path;
    create(a, N2UQ_OK, "");
  }
  a = base;
  a.bias = nullptr;
  a.bias_len = 0;
  create(a, N2UQ_OK, "");
  a.scales_len = 1;
  create(a, N2UQ_OK, "");
  for (float bad : {0.f, -0.01f, nan, inf, -inf}) {
    std::vector<float> s2 = scales;
    s2[3] = bad;
    a = base;
    a.scales = s2.data();
    create(a, N2UQ_ERR_ARGUMENT, "filter scale 3 must be finite and > 0");
    N2uqInt8ConvParams p = params;
    p.input_scale = bad;
    a = base;
    a.params = &p;
    create(a, N2UQ_ERR_ARGUMENT, "input_scale must be finite and > 0");
    p = params;
    p.output_scale = bad;
    create(a, N2UQ_ERR_ARGUMENT, "output_scale must be finite and > 0");
  }
  {
    N2uqInt8ConvParams p = params;
    a = base;
    a.params = &p;
    for (int zp : {-129, 128, INT32_MIN, INT32_MAX}) {
      p = params;
      p.input_zero_point = zp;
      create(a, N2UQ_ERR_ARGUMENT, "input_zero_point must be in -128..127");
      p = params;
      p.output_zero_point = zp;
      create(a, N2UQ_ERR_ARGUMENT, "output_zero_point must be in -128..127");
    }
    const int ranges[][2] = {{5, 4}, {-129, 0}, {0, 128}, {127, -128}, {INT32_MIN, INT32_MAX}};
    for (const auto& r : ranges) {
      p = params;
      p.output_min = r[0];
      p.output_max = r[1];
      create(a, N2UQ_ERR_ARGUMENT, "need -128 <= output_min <= output_max <= 127");
    }
    p = params;
    p.output_min = p.output_max = 127;
    create(a, N2UQ_OK, "");
  }
  // Bad shapes: each field out of range, paddings past the kernel, a kernel past the input, a
  // receptive field over 2^20 bytes.
  struct ShapeEdit {
    int32_t N2uqConvShape::*field;
    int32_t value;
    const char* expect;
  };
  const ShapeEdit edits[] = {{&N2uqConvShape::batch, 0, "batch"},
                             {&N2uqConvShape::batch, -3, "batch"},
                             {&N2uqConvShape::in_height, 0, "in_height"},
                             {&N2uqConvShape::in_width, -1, "in_width"},
                             {&N2uqConvShape::in_channels, 0, "in_channels"},
                             {&N2uqConvShape::in_channels, INT32_MAX, "in_channels"},
                             {&N2uqConvShape::out_channels, 0, "out_channels"},
                             {&N2uqConvShape::kernel_height, 0, "kernel_height"},
                             {&N2uqConvShape::kernel_width, -7, "kernel_width"},
                             {&N2uqConvShape::stride_height, 0, "stride_height"},
                             {&N2uqConvShape::stride_width, 1025, "stride_width"},
                             {&N2uqConvShape::dilation_height, 0, "dilation_height"},
                             {&N2uqConvShape::dilation_width, INT32_MIN, "dilation_width"},
                             {&N2uqConvShape::pad_top, -1, "pad_top"},
                             {&N2uqConvShape::pad_left, 3, "pad_left"},
                             {&N2uqConvShape::pad_right, INT32_MAX, "pad_right"},
                             {&N2uqConvShape::kernel_height, 9, "larger than the padded input"}};
  for (const ShapeEdit& e : edits) {
    N2uqConvShape s = good;
    s.*e.field = e.value;
    a = base;
    a.shape = &s;
    create(a, N2UQ_ERR_ARGUMENT, e.expect);
  }
  {
    N2uqConvShape s = good;
    s.in_channels = (1 << 20) + 1;
    s.kernel_height = s.kernel_width = 1;
    s.in_height = s.in_width = 1;
    s.pad_top = s.pad_bottom = s.pad_left = s.pad_right = 0;
    a = base;
    a.shape = &s;
    create(a, N2UQ_ERR_UNSUPPORTED, "a receptive field of 1048577 bytes");
    s.in_channels = 1 << 18;
    s.kernel_height = 2;
    s.in_height = 2;
    s.kernel_width = 3;
    s.in_width = 3;
    create(a, N2UQ_ERR_UNSUPPORTED, "a receptive field of 1572864 bytes");
  }
  // Runs.
  N2uqInt8ConvPlan* plan = nullptr;
  char err[256] = "";
  int rc = n2uq_int8_conv_plan_create(&good, w.data(), 135, bias.data(), 5, scales.data(), 5, &params, 0, 0, &plan,
                                      err, sizeof err);
  EXPECT(rc == N2UQ_OK && plan != nullptr, "int8 good plan: %s", err);
  if (plan == nullptr) return;
  std::vector<int8_t> out(125, int8_t(99));
  auto run = [&](const N2uqInt8ConvPlan* p, const N2uqConvShape* s, const int8_t* in, int64_t in_len, int8_t* o,
                 int64_t out_len, int threads, int status, const char* expect) {
    std::fill(out.begin(), out.end(), int8_t(99));
    char e[256] = "";
    const int r = n2uq_int8_conv_plan_run(p, s, in, in_len, o, out_len, threads, e, sizeof e);
    EXPECT(r == status && std::strstr(e, expect) != nullptr, "int8 run malformed (%s): rc=%d msg='%s'", expect, r, e);
    if (status != N2UQ_OK)
      EXPECT(std::count(out.begin(), out.end(), int8_t(99)) == 125, "int8 run (%s) wrote its output", expect);
  };
  run(plan, &good, x.data(), 75, out.data(), 125, 1, N2UQ_OK, "");
  run(nullptr, &good, x.data(), 75, out.data(), 125, 1, N2UQ_ERR_ARGUMENT, "plan is NULL");
  run(plan, nullptr, x.data(), 75, out.data(), 125, 1, N2UQ_ERR_ARGUMENT, "shape is NULL");
  run(plan, &good, nullptr, 75, out.data(), 125, 1, N2UQ_ERR_BUFFER, "input has");
  run(plan, &good, x.data(), 74, out.data(), 125, 1, N2UQ_ERR_BUFFER, "input has 74 values, the shape needs 75");
  run(plan, &good, x.data(), -75, out.data(), 125, 1, N2UQ_ERR_BUFFER, "input has");
  run(plan, &good, x.data(), 75, nullptr, 125, 1, N2UQ_ERR_BUFFER, "output has");
  run(plan, &good, x.data(), 75, out.data(), 124, 1, N2UQ_ERR_BUFFER, "output has 124 values, the shape needs 125");
  for (int threads : {0, -1, N2UQ_MAX_THREADS + 1})
    run(plan, &good, x.data(), 75, out.data(), 125, threads, N2UQ_ERR_ARGUMENT, "num_threads");
  for (const ShapeEdit& e : edits) {
    N2uqConvShape s = good;
    s.*e.field = e.value;
    run(plan, &s, x.data(), 75, out.data(), 125, 1, N2UQ_ERR_ARGUMENT, "");
  }
  const ShapeEdit other_filter[] = {{&N2uqConvShape::in_channels, 4, "is not the plan's"},
                                    {&N2uqConvShape::out_channels, 4, "is not the plan's"},
                                    {&N2uqConvShape::kernel_width, 2, "is not the plan's"},
                                    {&N2uqConvShape::kernel_height, 1, "is not the plan's"}};
  for (const ShapeEdit& e : other_filter) {
    N2uqConvShape s = good;
    s.*e.field = e.value;
    if (s.kernel_height == 1) s.pad_top = s.pad_bottom = 0;
    run(plan, &s, x.data(), 75, out.data(), 125, 1, N2UQ_ERR_ARGUMENT, e.expect);
  }
  {
    N2uqConvShape s = good;
    s.in_height = 9;  // a larger input than the buffers hold
    run(plan, &s, x.data(), 75, out.data(), 125, 1, N2UQ_ERR_BUFFER, "input has 75 values, the shape needs 135");
    s = good;
    s.batch = 2;
    run(plan, &s, x.data(), 75, out.data(), 125, 1, N2UQ_ERR_BUFFER, "input has");
    s = good;
    s.pad_top = s.pad_bottom = s.pad_left = s.pad_right = 0;  // 3 x 3 outputs: 45 bytes suffice
    run(plan, &s, x.data(), 75, out.data(), 45, 1, N2UQ_OK, "");
    EXPECT(std::count(out.begin() + 45, out.end(), int8_t(99)) == 80, "int8 run wrote past its output");
  }
  int isa = -1, path = -1;
  EXPECT(n2uq_int8_conv_plan_info(nullptr, &isa, &path) == N2UQ_ERR_ARGUMENT && isa == -1 && path == -1,
         "int8 info NULL plan");
  EXPECT(n2uq_int8_conv_plan_info(plan, nullptr, nullptr) == N2UQ_OK, "int8 info NULL outputs");
  char tiny[4];
  EXPECT(n2uq_int8_conv_plan_run(nullptr, &good, x.data(), 75, out.data(), 125, 1, tiny, sizeof tiny) ==
                 N2UQ_ERR_ARGUMENT && std::strlen(tiny) == 3,
         "int8 tiny error buffer");
  EXPECT(n2uq_int8_conv_plan_run(plan, &good, x.data(), 74, out.data(), 125, 1, nullptr, 0) == N2UQ_ERR_BUFFER,
         "int8 null error buffer");
  n2uq_int8_conv_plan_destroy(plan);
  n2uq_int8_conv_plan_destroy(nullptr);
}

}  // namespace

int main(int argc, char** argv) {
  const int cases = argc > 1 ? std::atoi(argv[1]) : 60;
  std::string names, paths;
  for (int isa : isas()) names += std::string(" ") + n2uq_isa_name(isa);
  for (const Combo& c : combos()) paths += std::string(" ") + n2uq_isa_name(c.isa) + "/" + n2uq_path_name(c.path);
  std::string int8_paths;
  for (const Int8Combo& c : int8_combos())
    int8_paths += std::string(" ") + n2uq_isa_name(c.isa) + "/" + n2uq_path_name(c.path);
  for (int i = 0; i < cases; ++i) run_conv_case(false);
  run_winograd_tail_cases();
  // 3x3 stride-1 shapes: every ISA's dot path runs them in Winograd form.
  for (int i = 0; i < cases / 4 + 1; ++i) run_conv_case(false, true);
  for (int i = 0; i < cases / 4 + 1; ++i) run_plan_case();
  for (int i = 0; i < 3; ++i) run_plan_trial_case();
  for (int i = 0; i < cases / 2 + 1; ++i) run_plan_stage_case();
  run_quantizing_cases();
  for (int i = 0; i < cases / 3 + 1; ++i) run_conv_case(true);
  for (int i = 0; i < cases / 3 + 1; ++i) run_fully_connected_case();
  for (int i = 0; i < 2 * cases; ++i) run_quantize_case();
  run_pool_cases();
  for (int i = 0; i < cases / 2 + 1; ++i) run_int8_case();
  run_int8_fixed_cases();
  run_int8_ties();
  run_int8_wrapping_sums();
  run_malformed();
  run_pool_malformed();
  run_int8_malformed();
  if (failures) {
    std::printf("selftest: %d failures\n", failures);
    return 1;
  }
  std::printf("selftest: OK, %d conv cases on ISAs:%s; paths:%s; int8 conv paths:%s; amx: %s; cpu: %s\n", cases,
              names.c_str(), paths.c_str(), int8_paths.c_str(), n2uq_amx_status(), n2uq_cpu_features());
  return 0;
}
