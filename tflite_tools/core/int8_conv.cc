// Int8 convolution with TFLite's int8 CONV_2D arithmetic, for the layers TFLite runs slowly: a
// conv over few input channels (an image stem's 7x7 conv on 3 channels ran at about 53 GMAC/s
// in XNNPACK's int8 kernels on an AMX Xeon, 1/15 of their rate on 3x3 layers). The receptive
// fields become byte rows (im2col) and one GEMM over them runs on AMX tiles, AVX-512 VNNI or
// plain C; layout and the folded bias are derived in kernel_table.h (Int8ConvJob).
//
// Requantization is XNNPACK's (TFLite's default CPU path for int8 convs), so that a delegate
// running this op gives the interpreter's own bytes: scale[oc] = input_scale * filter_scale[oc] /
// output_scale in float32, out = clamp(rne(float(acc) * scale), min - zp, max - zp) + zp.
// (TFLite's reference kernel, used when XNNPACK is off, rounds a fixed-point product instead and
// can differ by one at ties.)
#include <math.h>
#include <stdint.h>
#include <string.h>

#include <algorithm>
#include <memory>
#include <vector>

#include "core_internal.h"
#include "kernel_table.h"
#include "n2uq_core.h"

struct N2uqInt8ConvPlan {
  N2uqConvShape shape;  // the filter part is fixed; batch and input size may change per run
  int isa = N2UQ_ISA_PORTABLE, path = N2UQ_PATH_DOT;
  n2uq_core::Int8ConvBlocksFn blocks = nullptr;  // null: the portable blocks
  int64_t k = 0, k_padded = 0, oc_chunks = 0;
  n2uq_core::AlignedVector<int8_t> weights;  // Int8ConvJob::weights
  std::vector<int8_t> plain;                 // portable: [oc][k_padded]
  std::vector<int32_t> bias;
  std::vector<float> scale;
  float min_less_zero_point = 0, max_less_zero_point = 0;
  int32_t output_zero_point = 0;
  uint8_t pad_code = 0;
  bool requant_saturates = false;      // Int8ConvJob::requant_saturates
  bool stack = false;                  // the column-stacked form (Int8ConvJob::stack)
  std::vector<uint8_t> stack_index;    // [KH * C][64]
  std::vector<uint64_t> stack_masks;   // [KH * C][KH]
  int64_t stack_window = 128, stack_reach = 128;
};

namespace n2uq_core {
namespace {

constexpr int64_t kMaxInt8K = int64_t(1) << 20;  // bytes of one receptive field
// The stacked form's limits: a vector's bytes come from a 128-byte window of each input row
// (at most 63 / (KH * C) + 2 columns of C bytes: C <= 32), and its tables have KH * C phases.
constexpr int64_t kMaxStackChannels = 32, kMaxStackColumnBytes = 256;

// Im2col rows copy every pixel's K bytes (7 copies of 21 bytes per pixel for a ResNet stem: 0.21
// ms of its 0.72 ms on the Xeon). The stacked form instead writes each output row's S once (one
// 64-byte store per 64 bytes, KH row windows permuted in) and the GEMM reads pixel rows in place;
// it needs contiguous kernel rows in S (dilation_width 1) and VBMI's two-table byte permute.
void build_stack_tables(int64_t kh_count, int64_t c, std::vector<uint8_t>* index, std::vector<uint64_t>* masks) {
  const int64_t khc = kh_count * c;
  index->assign(size_t(khc * 64), 0);
  masks->assign(size_t(khc * kh_count), 0);
  for (int64_t phase = 0; phase < khc; ++phase)
    for (int64_t b = 0; b < 64; ++b) {
      const int64_t d = phase + b, column = d / khc, rem = d - column * khc, kh = rem / c;
      (*index)[size_t(phase * 64 + b)] = uint8_t(column * c + rem % c);  // < 128: see the limits above
      (*masks)[size_t(phase * kh_count + kh)] |= uint64_t(1) << b;
    }
}

// The portable blocks: the same rows, one int32 dot product per pixel and channel, and the
// requantization in scalar float32 (lrintf rounds to nearest even in the default mode).
void portable_blocks(const Int8ConvJob& j, const int8_t* plain, int64_t begin, int64_t end) {
  const int64_t kp = j.k_padded, c = j.in_channels, plane = j.out_height * j.out_width;
  std::vector<uint8_t> row(size_t(kp), 0);
  for (int64_t q = begin * kInt8BlockPixels; q < end * kInt8BlockPixels && q < j.pixels; ++q) {
    const int64_t n = q / plane, r = q - n * plane, oh = r / j.out_width, ow = r - oh * j.out_width;
    for (int64_t kh = 0; kh < j.kernel_height; ++kh)
      for (int64_t kw = 0; kw < j.kernel_width; ++kw) {
        const int64_t ih = oh * j.stride_height - j.pad_top + kh * j.dilation_height;
        const int64_t iw = ow * j.stride_width - j.pad_left + kw * j.dilation_width;
        uint8_t* dst = row.data() + (kh * j.kernel_width + kw) * c;
        const bool inside = ih >= 0 && ih < j.in_height && iw >= 0 && iw < j.in_width;
        const int8_t* src = j.input + ((n * j.in_height + ih) * j.in_width + iw) * c;
        for (int64_t i = 0; i < c; ++i) dst[i] = inside ? uint8_t(src[i]) ^ 0x80 : j.pad_code;
      }
    for (int64_t oc = 0; oc < j.out_channels; ++oc) {
      const int8_t* w = plain + oc * kp;
      // Wrapping int32 sums, as VPDPBUSD and TDPBUSD add: the shifted inputs (x + 128) can take the
      // running sum past int32 where TFLite's own accumulator (x - zp) fits, and the bias brings it back.
      uint32_t acc = uint32_t(j.bias[oc]);
      for (int64_t i = 0; i < j.k; ++i) acc += uint32_t(int32_t(row[size_t(i)]) * int32_t(w[i]));
      float f = float(int32_t(acc)) * j.scale[oc];
      f = fminf(fmaxf(f, j.min_less_zero_point), j.max_less_zero_point);
      j.output[q * j.out_channels + oc] = int8_t(lrintf(f) + j.output_zero_point);
    }
  }
}

int check_params(const N2uqInt8ConvParams* p, char* err, size_t err_len) {
  N2UQ_CHECK(p != nullptr, N2UQ_ERR_ARGUMENT, "params is NULL");
  N2UQ_CHECK(isfinite(p->input_scale) && p->input_scale > 0, N2UQ_ERR_ARGUMENT,
             "input_scale must be finite and > 0, got %g", double(p->input_scale));
  N2UQ_CHECK(isfinite(p->output_scale) && p->output_scale > 0, N2UQ_ERR_ARGUMENT,
             "output_scale must be finite and > 0, got %g", double(p->output_scale));
  N2UQ_CHECK(p->input_zero_point >= -128 && p->input_zero_point <= 127, N2UQ_ERR_ARGUMENT,
             "input_zero_point must be in -128..127, got %d", p->input_zero_point);
  N2UQ_CHECK(p->output_zero_point >= -128 && p->output_zero_point <= 127, N2UQ_ERR_ARGUMENT,
             "output_zero_point must be in -128..127, got %d", p->output_zero_point);
  N2UQ_CHECK(p->output_min >= -128 && p->output_min <= p->output_max && p->output_max <= 127, N2UQ_ERR_ARGUMENT,
             "need -128 <= output_min <= output_max <= 127, got %d, %d", p->output_min, p->output_max);
  return N2UQ_OK;
}

// The concrete path for `isa` and the request: amx where its self-check passed, else the AVX-512
// VNNI blocks, else (portable and AVX2 ISAs) the portable ones.
int choose_path(int isa, int path, Int8ConvBlocksFn* blocks, char* err, size_t err_len) {
  const bool avx512 = isa == N2UQ_ISA_AVX512 && cpu_avx512_vnni() && avx512_int8_conv_blocks() != nullptr;
  const int amx = avx512 ? amx_mode() : 0;
  if (path == N2UQ_PATH_AUTO) path = amx ? N2UQ_PATH_AMX : N2UQ_PATH_DOT;
  if (path == N2UQ_PATH_AMX) {
    N2UQ_CHECK(amx != 0, N2UQ_ERR_UNSUPPORTED, "the int8 conv's amx path is not available here (%s)",
               n2uq_amx_status());
    *blocks = amx_int8_conv_blocks(amx == 2);
    return N2UQ_PATH_AMX;
  }
  N2UQ_CHECK(path == N2UQ_PATH_DOT, N2UQ_ERR_UNSUPPORTED, "the int8 conv runs the dot or amx path, not %s",
             n2uq_path_name(path));
  *blocks = avx512 ? avx512_int8_conv_blocks() : nullptr;
  return N2UQ_PATH_DOT;
}

int create(const N2uqConvShape* shape, const int8_t* filter, int64_t filter_len, const int32_t* bias,
           int64_t bias_len, const float* filter_scales, int64_t scales_len, const N2uqInt8ConvParams* params,
           int isa, int path, N2uqInt8ConvPlan** out, char* err, size_t err_len) {
  N2UQ_CHECK(out != nullptr, N2UQ_ERR_ARGUMENT, "plan pointer is NULL");
  *out = nullptr;
  int64_t oh, ow;
  if (int rc = int8_conv_geometry(shape, &oh, &ow, err, err_len)) return rc;
  if (int rc = check_params(params, err, err_len)) return rc;
  const int64_t oc = shape->out_channels, k = int64_t(shape->kernel_height) * shape->kernel_width * shape->in_channels;
  N2UQ_CHECK(k <= kMaxInt8K, N2UQ_ERR_UNSUPPORTED, "a receptive field of %lld bytes is more than %lld",
             (long long)k, (long long)kMaxInt8K);
  N2UQ_CHECK(filter != nullptr && filter_len == oc * k, N2UQ_ERR_BUFFER,
             "filter must hold out_channels * kernel_height * kernel_width * in_channels = %lld int8 values, got %lld",
             (long long)(oc * k), (long long)filter_len);
  N2UQ_CHECK(bias == nullptr || bias_len == oc, N2UQ_ERR_BUFFER, "bias must hold out_channels = %lld values, got %lld",
             (long long)oc, (long long)bias_len);
  N2UQ_CHECK(filter_scales != nullptr && (scales_len == 1 || scales_len == oc), N2UQ_ERR_BUFFER,
             "filter_scales must hold 1 or out_channels = %lld values, got %lld", (long long)oc, (long long)scales_len);
  const int resolved = resolve_isa(isa, err, err_len);
  if (resolved < 0) return resolved;
  const int requested = requested_conv_path(path, err, err_len);
  if (requested < 0) return requested;
  // Paths the int8 conv lacks (bitserial, lut) fall back to the automatic choice, so that an
  // environment forcing one for the N2UQ convs leaves this op runnable.
  const int wanted = requested == N2UQ_PATH_AMX || requested == N2UQ_PATH_DOT ? requested : N2UQ_PATH_AUTO;
  std::unique_ptr<N2uqInt8ConvPlan> plan(new N2uqInt8ConvPlan);
  const int chosen = choose_path(resolved, wanted, &plan->blocks, err, err_len);
  if (chosen < 0) return chosen;
  plan->shape = *shape;
  plan->isa = plan->blocks != nullptr ? N2UQ_ISA_AVX512 : N2UQ_ISA_PORTABLE;
  plan->stack = plan->blocks != nullptr && cpu_avx512_vbmi() && shape->dilation_width == 1 &&
                shape->in_channels <= kMaxStackChannels &&
                int64_t(shape->kernel_height) * shape->in_channels <= kMaxStackColumnBytes;
  if (plan->stack) {
    build_stack_tables(shape->kernel_height, shape->in_channels, &plan->stack_index, &plan->stack_masks);
    const uint8_t largest = *std::max_element(plan->stack_index.begin(), plan->stack_index.end());
    plan->stack_window = largest < 64 ? 64 : 128;
    plan->stack_reach = int64_t(largest) + 1;
  }
  plan->path = chosen;
  plan->k = k;
  plan->k_padded = (k + 63) / 64 * 64;
  plan->oc_chunks = (oc + 31) / 32;
  const int64_t kp = plan->k_padded, padded_oc = plan->oc_chunks * 32, words = kp / 64;
  plan->bias.assign(size_t(padded_oc), 0);
  plan->scale.assign(size_t(padded_oc), 0.0f);
  for (int64_t o = 0; o < oc; ++o) {
    const float fs = filter_scales[scales_len == 1 ? 0 : o];
    N2UQ_CHECK(isfinite(fs) && fs > 0, N2UQ_ERR_ARGUMENT, "filter scale %lld must be finite and > 0, got %g",
               (long long)o, double(fs));
    plan->scale[size_t(o)] = params->input_scale * fs / params->output_scale;  // XNNPACK's order
    int64_t sum = 0;
    for (int64_t i = 0; i < k; ++i) sum += filter[o * k + i];
    plan->bias[size_t(o)] = int32_t(int64_t(bias ? bias[o] : 0) - (int64_t(params->input_zero_point) + 128) * sum);
  }
  if (plan->blocks != nullptr) {
    plan->weights.assign(size_t(plan->oc_chunks * words * 2048), 0);
    const int64_t khs = shape->kernel_height, kws = shape->kernel_width, c = shape->in_channels;
    for (int64_t o = 0; o < oc; ++o)
      for (int64_t i = 0; i < k; ++i) {
        // K position of filter byte i = (kh, kw, ch): the same, or (kw, kh, ch) in the stacked form
        const int64_t ch = i % c, kw = (i / c) % kws, kh = i / (c * kws);
        const int64_t at = plan->stack ? (kw * khs + kh) * c + ch : i;
        const int64_t chunk = o / 32, r = (o % 32) / 16, lane = o % 16, word = at / 64, quad = (at % 64) / 4;
        plan->weights[size_t(((chunk * words + word) * 2 + r) * 1024 + quad * 64 + lane * 4 + at % 4)] =
            filter[o * k + i];
      }
  } else {
    plan->plain.assign(size_t(oc * kp), 0);
    for (int64_t o = 0; o < oc; ++o) memcpy(plan->plain.data() + o * kp, filter + o * k, size_t(k));
  }
  plan->min_less_zero_point = float(params->output_min - params->output_zero_point);
  plan->max_less_zero_point = float(params->output_max - params->output_zero_point);
  plan->output_zero_point = params->output_zero_point;
  plan->requant_saturates = std::all_of(plan->scale.begin(), plan->scale.end(), [](float s) { return s <= 0.5f; });
  plan->pad_code = uint8_t(int8_t(params->input_zero_point)) ^ 0x80;
  *out = plan.release();
  return N2UQ_OK;
}

int run(const N2uqInt8ConvPlan* plan, const N2uqConvShape* shape, const int8_t* input, int64_t input_len,
        int8_t* output, int64_t output_len, int num_threads, char* err, size_t err_len) {
  N2UQ_CHECK(plan != nullptr, N2UQ_ERR_ARGUMENT, "plan is NULL");
  int64_t oh, ow;
  if (int rc = int8_conv_geometry(shape, &oh, &ow, err, err_len)) return rc;
  const N2uqConvShape& p = plan->shape;
  N2UQ_CHECK(shape->in_channels == p.in_channels && shape->out_channels == p.out_channels &&
                 shape->kernel_height == p.kernel_height && shape->kernel_width == p.kernel_width,
             N2UQ_ERR_ARGUMENT, "the shape's filter (%d x %d, %d -> %d channels) is not the plan's (%d x %d, %d -> %d)",
             shape->kernel_height, shape->kernel_width, shape->in_channels, shape->out_channels, p.kernel_height,
             p.kernel_width, p.in_channels, p.out_channels);
  N2UQ_CHECK(num_threads >= 1 && num_threads <= N2UQ_MAX_THREADS, N2UQ_ERR_ARGUMENT,
             "num_threads must be 1..%d, got %d", N2UQ_MAX_THREADS, num_threads);
  const int64_t in_needed = int64_t(shape->batch) * shape->in_height * shape->in_width * shape->in_channels;
  const int64_t pixels = int64_t(shape->batch) * oh * ow, out_needed = pixels * shape->out_channels;
  N2UQ_CHECK(input != nullptr && input_len >= in_needed, N2UQ_ERR_BUFFER, "input has %lld values, the shape needs %lld",
             (long long)input_len, (long long)in_needed);
  N2UQ_CHECK(output != nullptr && output_len >= out_needed, N2UQ_ERR_BUFFER,
             "output has %lld values, the shape needs %lld", (long long)output_len, (long long)out_needed);
  Int8ConvJob j;
  j.batch = shape->batch;
  j.in_height = shape->in_height;
  j.in_width = shape->in_width;
  j.in_channels = shape->in_channels;
  j.out_height = oh;
  j.out_width = ow;
  j.out_channels = shape->out_channels;
  j.kernel_height = shape->kernel_height;
  j.kernel_width = shape->kernel_width;
  j.stride_height = shape->stride_height;
  j.stride_width = shape->stride_width;
  j.dilation_height = shape->dilation_height;
  j.dilation_width = shape->dilation_width;
  j.pad_top = shape->pad_top;
  j.pad_left = shape->pad_left;
  j.pixels = pixels;
  j.k = plan->k;
  j.k_padded = plan->k_padded;
  j.oc_chunks = plan->oc_chunks;
  j.input = input;
  j.output = output;
  j.pad_code = plan->pad_code;
  j.weights = plan->weights.data();
  j.bias = plan->bias.data();
  j.scale = plan->scale.data();
  j.min_less_zero_point = plan->min_less_zero_point;
  j.max_less_zero_point = plan->max_less_zero_point;
  j.output_zero_point = plan->output_zero_point;
  j.requant_saturates = plan->requant_saturates ? 1 : 0;
  j.stack = plan->stack ? 1 : 0;
  j.stack_cols = (ow - 1) * shape->stride_width + shape->kernel_width;
  // The last block's 32 rows: from its first pixel ow0 = the last multiple of 32 below out_width.
  const int64_t last_row = ((ow - 1) / kInt8BlockPixels * kInt8BlockPixels + kInt8BlockPixels - 1) *
                           shape->stride_width * shape->kernel_height * shape->in_channels;
  j.stack_bytes = (last_row + plan->k_padded + 63) / 64 * 64;
  j.stack_window = plan->stack_window;
  j.stack_reach = plan->stack_reach;
  j.stack_index = plan->stack_index.data();
  j.stack_masks = plan->stack_masks.data();
  // Items: output rows in the stacked form, else 32-pixel blocks (the portable blocks: always).
  const int64_t blocks = plan->stack ? int64_t(shape->batch) * oh
                                     : (pixels + kInt8BlockPixels - 1) / kInt8BlockPixels;
  const Int8ConvBlocksFn fn = plan->blocks;
  const int8_t* plain = plan->plain.data();
  run_ranges(num_threads, blocks, 1, [&](int64_t b, int64_t e) {
    if (fn != nullptr)
      fn(j, b, e);
    else
      portable_blocks(j, plain, b, e);
  });
  return N2UQ_OK;
}

}  // namespace
}  // namespace n2uq_core

using n2uq_core::guarded;

int n2uq_int8_conv_plan_create(const N2uqConvShape* shape, const int8_t* filter, int64_t filter_len,
                               const int32_t* bias, int64_t bias_len, const float* filter_scales, int64_t scales_len,
                               const N2uqInt8ConvParams* params, int isa, int path, N2uqInt8ConvPlan** plan,
                               char* err, size_t err_len) {
  return guarded(err, err_len, [&]() -> int {
    return n2uq_core::create(shape, filter, filter_len, bias, bias_len, filter_scales, scales_len, params, isa, path,
                             plan, err, err_len);
  });
}

int n2uq_int8_conv_plan_run(const N2uqInt8ConvPlan* plan, const N2uqConvShape* shape, const int8_t* input,
                            int64_t input_len, int8_t* output, int64_t output_len, int num_threads, char* err,
                            size_t err_len) {
  return guarded(err, err_len, [&]() -> int {
    return n2uq_core::run(plan, shape, input, input_len, output, output_len, num_threads, err, err_len);
  });
}

int n2uq_int8_conv_plan_info(const N2uqInt8ConvPlan* plan, int* isa, int* path) {
  if (plan == nullptr) return N2UQ_ERR_ARGUMENT;
  if (isa) *isa = plan->isa;
  if (path) *path = plan->path;
  return N2UQ_OK;
}

void n2uq_int8_conv_plan_destroy(N2uqInt8ConvPlan* plan) { delete plan; }
