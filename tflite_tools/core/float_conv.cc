// Float convolution over few input channels (an image stem), for the layers TFLite's float
// kernels run far below the core's rate (layout and blocking in kernel_table.h, FloatConvJob).
// Results equal TFLite's up to float rounding: each output is bias + the sum of its products in
// float32, in another order than XNNPACK's (and with fused multiply-adds on the AVX-512 path).
// The activation is XNNPACK's clamp to [output_min, output_max].
#include <math.h>
#include <stdint.h>
#include <string.h>

#include <memory>
#include <vector>

#include "core_internal.h"
#include "kernel_table.h"
#include "n2uq_core.h"

struct N2uqFloatConvPlan {
  N2uqConvShape shape;  // the filter part is fixed; batch, input size and padding may change per run
  int isa = N2UQ_ISA_PORTABLE;
  n2uq_core::FloatConvRowsFn rows = nullptr;  // null: the portable rows
  std::vector<float> filter;                  // portable: [OC][KH][KW][C] as given
  n2uq_core::AlignedVector<float> weights;    // FloatConvJob::weights
  std::vector<float> bias;                    // [passes * 64]
  std::vector<int64_t> tap_offsets;
  float output_min = -INFINITY, output_max = INFINITY;
};

namespace n2uq_core {
namespace {

constexpr int64_t kMaxFloatTaps = int64_t(1) << 20;

// The portable rows: one float32 sum per output (multiply, then add), in the same tap order.
void portable_rows(const FloatConvJob& j, const float* filter, int64_t begin, int64_t end) {
  const int64_t c = j.in_channels, taps = j.taps;
  for (int64_t item = begin; item < end; ++item) {
    const int64_t n = item / j.out_height, oh = item % j.out_height;
    for (int64_t ow = 0; ow < j.out_width; ++ow) {
      float* out = j.output + ((n * j.out_height + oh) * j.out_width + ow) * j.out_channels;
      for (int64_t oc = 0; oc < j.out_channels; ++oc) {
        float acc = j.bias[oc];
        for (int64_t kh = 0; kh < j.kernel_height; ++kh) {
          const float* x = j.input + ((n * j.in_height + oh * j.stride_height + kh * j.dilation_height) * j.in_width +
                                      ow * j.stride_width) * c;
          const float* w = filter + (oc * j.kernel_height + kh) * taps;
          for (int64_t t = 0; t < taps; ++t) acc += x[j.tap_offsets[t]] * w[t];
        }
        out[oc] = fminf(fmaxf(acc, j.output_min), j.output_max);
      }
    }
  }
}

int create(const N2uqConvShape* shape, const float* filter, int64_t filter_len, const float* bias, int64_t bias_len,
           float output_min, float output_max, int isa, N2uqFloatConvPlan** out, char* err, size_t err_len) {
  N2UQ_CHECK(out != nullptr, N2UQ_ERR_ARGUMENT, "plan pointer is NULL");
  *out = nullptr;
  int64_t oh, ow;
  if (int rc = int8_conv_geometry(shape, &oh, &ow, err, err_len)) return rc;
  const int64_t oc = shape->out_channels, c = shape->in_channels;
  const int64_t taps = int64_t(shape->kernel_width) * c, k = taps * shape->kernel_height;
  N2UQ_CHECK(k <= kMaxFloatTaps, N2UQ_ERR_UNSUPPORTED, "a receptive field of %lld values is more than %lld",
             (long long)k, (long long)kMaxFloatTaps);
  N2UQ_CHECK(filter != nullptr && filter_len == oc * k, N2UQ_ERR_BUFFER,
             "filter must hold out_channels * kernel_height * kernel_width * in_channels = %lld floats, got %lld",
             (long long)(oc * k), (long long)filter_len);
  N2UQ_CHECK(bias == nullptr || bias_len == oc, N2UQ_ERR_BUFFER, "bias must hold out_channels = %lld floats, got %lld",
             (long long)oc, (long long)bias_len);
  N2UQ_CHECK(!isnan(output_min) && !isnan(output_max) && output_min <= output_max, N2UQ_ERR_ARGUMENT,
             "need output_min <= output_max, got %g, %g", double(output_min), double(output_max));
  for (int64_t i = 0; i < oc * k; ++i)
    N2UQ_CHECK(isfinite(filter[i]), N2UQ_ERR_ARGUMENT, "filter value %lld is not finite", (long long)i);
  const int resolved = resolve_isa(isa, err, err_len);
  if (resolved < 0) return resolved;
  std::unique_ptr<N2uqFloatConvPlan> plan(new N2uqFloatConvPlan);
  plan->shape = *shape;
  plan->rows = resolved == N2UQ_ISA_AVX512 ? avx512_float_conv_rows() : nullptr;
  plan->isa = plan->rows != nullptr ? N2UQ_ISA_AVX512 : N2UQ_ISA_PORTABLE;
  plan->output_min = output_min;
  plan->output_max = output_max;
  const int64_t passes = (oc + 63) / 64;
  plan->bias.assign(size_t(passes * 64), 0.0f);
  if (bias != nullptr) memcpy(plan->bias.data(), bias, size_t(oc) * sizeof(float));
  plan->tap_offsets.resize(size_t(taps));
  for (int64_t t = 0; t < taps; ++t)
    plan->tap_offsets[size_t(t)] = (t / c) * shape->dilation_width * c + t % c;
  if (plan->rows != nullptr) {
    plan->weights.assign(size_t(passes * k * 64), 0.0f);
    for (int64_t o = 0; o < oc; ++o)
      for (int64_t i = 0; i < k; ++i)  // i = kh * taps + t: [pass][kh][t][64]
        plan->weights[size_t(((o / 64) * k + i) * 64 + o % 64)] = filter[o * k + i];
  } else {
    plan->filter.assign(filter, filter + oc * k);
  }
  *out = plan.release();
  return N2UQ_OK;
}

int run(const N2uqFloatConvPlan* plan, const N2uqConvShape* shape, const float* input, int64_t input_len,
        float* output, int64_t output_len, int num_threads, char* err, size_t err_len) {
  N2UQ_CHECK(plan != nullptr, N2UQ_ERR_ARGUMENT, "plan is NULL");
  int64_t oh, ow;
  if (int rc = int8_conv_geometry(shape, &oh, &ow, err, err_len)) return rc;
  const N2uqConvShape& p = plan->shape;
  N2UQ_CHECK(shape->in_channels == p.in_channels && shape->out_channels == p.out_channels &&
                 shape->kernel_height == p.kernel_height && shape->kernel_width == p.kernel_width &&
                 shape->dilation_width == p.dilation_width,
             N2UQ_ERR_ARGUMENT,
             "the shape's filter (%d x %d, %d -> %d channels, dilation_width %d) is not the plan's (%d x %d, %d -> %d, %d)",
             shape->kernel_height, shape->kernel_width, shape->in_channels, shape->out_channels, shape->dilation_width,
             p.kernel_height, p.kernel_width, p.in_channels, p.out_channels, p.dilation_width);
  N2UQ_CHECK(num_threads >= 1 && num_threads <= N2UQ_MAX_THREADS, N2UQ_ERR_ARGUMENT,
             "num_threads must be 1..%d, got %d", N2UQ_MAX_THREADS, num_threads);
  const int64_t c = shape->in_channels;
  const int64_t in_needed = int64_t(shape->batch) * shape->in_height * shape->in_width * c;
  const int64_t out_needed = int64_t(shape->batch) * oh * ow * shape->out_channels;
  N2UQ_CHECK(input != nullptr && input_len >= in_needed, N2UQ_ERR_BUFFER, "input has %lld values, the shape needs %lld",
             (long long)input_len, (long long)in_needed);
  N2UQ_CHECK(output != nullptr && output_len >= out_needed, N2UQ_ERR_BUFFER,
             "output has %lld values, the shape needs %lld", (long long)output_len, (long long)out_needed);
  // Padding: a zero-padded copy (few channels make it small), so the kernels only see valid taps.
  std::vector<float> padded;
  int64_t height = shape->in_height, width = shape->in_width;
  const float* x = input;
  if (shape->pad_top || shape->pad_bottom || shape->pad_left || shape->pad_right) {
    height += shape->pad_top + shape->pad_bottom;
    width += shape->pad_left + shape->pad_right;
    padded.assign(size_t(shape->batch * height * width * c), 0.0f);
    for (int64_t n = 0; n < shape->batch; ++n)
      for (int64_t y = 0; y < shape->in_height; ++y)
        memcpy(padded.data() + ((n * height + y + shape->pad_top) * width + shape->pad_left) * c,
               input + (n * shape->in_height + y) * shape->in_width * c, size_t(shape->in_width * c) * sizeof(float));
    x = padded.data();
  }
  FloatConvJob j;
  j.batch = shape->batch;
  j.in_height = height;
  j.in_width = width;
  j.in_channels = c;
  j.out_height = oh;
  j.out_width = ow;
  j.out_channels = shape->out_channels;
  j.kernel_height = shape->kernel_height;
  j.stride_height = shape->stride_height;
  j.stride_width = shape->stride_width;
  j.dilation_height = shape->dilation_height;
  j.taps = int64_t(shape->kernel_width) * c;
  j.tap_offsets = plan->tap_offsets.data();
  j.passes = (shape->out_channels + 63) / 64;
  j.input = x;
  j.output = output;
  j.weights = plan->weights.data();
  j.bias = plan->bias.data();
  j.output_min = plan->output_min;
  j.output_max = plan->output_max;
  const FloatConvRowsFn fn = plan->rows;
  const float* filter = plan->filter.data();
  run_ranges(num_threads, int64_t(shape->batch) * oh, 1, [&](int64_t b, int64_t e) {
    if (fn != nullptr)
      fn(j, b, e);
    else
      portable_rows(j, filter, b, e);
  });
  return N2UQ_OK;
}

}  // namespace
}  // namespace n2uq_core

using n2uq_core::guarded;

int n2uq_float_conv_plan_create(const N2uqConvShape* shape, const float* filter, int64_t filter_len, const float* bias,
                                int64_t bias_len, float output_min, float output_max, int isa,
                                N2uqFloatConvPlan** plan, char* err, size_t err_len) {
  return guarded(err, err_len, [&]() -> int {
    return n2uq_core::create(shape, filter, filter_len, bias, bias_len, output_min, output_max, isa, plan, err,
                             err_len);
  });
}

int n2uq_float_conv_plan_run(const N2uqFloatConvPlan* plan, const N2uqConvShape* shape, const float* input,
                             int64_t input_len, float* output, int64_t output_len, int num_threads, char* err,
                             size_t err_len) {
  return guarded(err, err_len, [&]() -> int {
    return n2uq_core::run(plan, shape, input, input_len, output, output_len, num_threads, err, err_len);
  });
}

int n2uq_float_conv_plan_info(const N2uqFloatConvPlan* plan, int* isa) {
  if (plan == nullptr) return N2UQ_ERR_ARGUMENT;
  if (isa) *isa = plan->isa;
  return N2UQ_OK;
}

void n2uq_float_conv_plan_destroy(N2uqFloatConvPlan* plan) { delete plan; }
