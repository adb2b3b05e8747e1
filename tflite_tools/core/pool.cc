// Max pooling of float32 NHWC tensors with zero padding (n2uq_max_pool2d in n2uq_core.h), and of
// int8 ones with their dequantization (n2uq_max_pool2d_int8): the layer of the N2UQMaxPool2DFused
// op, which replaces a network's PAD (zeros) + MAX_POOL_2D ('valid') pair, or in an int8 model its
// int8 PAD + MAX_POOL_2D + DEQUANTIZE, and runs the output stage that follows (RPReLU, the next
// quantize-and-pack) on its result, as the fused conv ops do.
//
// Each output is the max over its window's positions inside the input in row-major order, then
// over 0.0f if the window reaches into the padding (the zeros the padded tensor holds). Max is
// exact, so the order only matters for NaN and the sign of a zero: v > m ? v : m keeps the first
// of equal values and never takes a NaN after a number (custom_ops.py, "Exactness", for how
// this compares with TFLite's pool). Sixteen channels at a time stay in registers over the
// window (vectors of the library's baseline ISA: the pool is bound by memory); the work is split
// over output rows.
#include <cfloat>
#include <cstring>

#include "core_internal.h"
#include "n2uq_core.h"

namespace n2uq_core {
namespace {

constexpr int64_t kMaxPoolDim = int64_t(1) << 24;
constexpr int64_t kMaxPoolElements = int64_t(1) << 40;

typedef float Floats4 __attribute__((vector_size(16)));  // SSE2 / NEON: the library's baseline

// The max of channels [c, c + K * sizeof(V) / sizeof(T)) (K vectors V of T, or K = 1 and V = T for
// one channel) over the window's in-range rows [y0, y1) x columns [x0, x1) of the input (row
// stride `row`, pixel stride `channels`), in row-major order from the first position: v > m ? v : m keeps the first of equal values and never
// takes a NaN after a number. Registers only; the vectors are the library's baseline ISA's (the
// pool is bound by memory).
template <class V, int K, class T>
inline void window_max(const T* in, int64_t row, int64_t channels, int64_t c, int64_t y0, int64_t y1, int64_t x0,
                       int64_t x1, V* m) {
  constexpr int64_t kLanes = sizeof(V) / sizeof(T);
  const T* first = in + y0 * row + x0 * channels + c;
  for (int k = 0; k < K; ++k) memcpy(&m[k], first + k * kLanes, sizeof(V));
  for (int64_t y = y0; y < y1; ++y)
    for (int64_t x = x0; x < x1; ++x)
      for (int k = 0; k < K; ++k) {
        V v;
        memcpy(&v, in + y * row + x * channels + c + k * kLanes, sizeof(V));
        m[k] = v > m[k] ? v : m[k];
      }
}

// One output pixel: out[c] = max over the window's in-range positions (window_max), then over
// `pad` (the padded tensor's value: 0.0f, or an int8 zero point) when the window reaches into the
// padding (`padded`), stored through store(c, max): sixteen channels at a time as K vectors V,
// the rest one by one.
template <class V, int K, class T, class Store16, class Store1>
inline void pool_pixel(const T* in, int64_t row, int64_t channels, int64_t y0, int64_t y1, int64_t x0, int64_t x1,
                       bool padded, T pad, Store16 store16, Store1 store1) {
  int64_t c = 0;
  for (; c + 16 <= channels; c += 16) {
    V m[K];
    window_max<V, K>(in, row, channels, c, y0, y1, x0, x1, m);
    if (padded) {
      const V p = V{} + pad;
      for (int k = 0; k < K; ++k) m[k] = p > m[k] ? p : m[k];
    }
    store16(c, m);
  }
  for (; c < channels; ++c) {
    T v;
    window_max<T, 1>(in, row, channels, c, y0, y1, x0, x1, &v);
    if (padded) v = pad > v ? pad : v;
    store1(c, v);
  }
}

typedef int8_t Bytes16 __attribute__((vector_size(16)));

// The float32 pool's pixel: the max itself, padding 0.0f.
inline void pool_pixel_float(const float* in, int64_t row, int64_t channels, int64_t y0, int64_t y1, int64_t x0,
                             int64_t x1, bool padded, float* out) {
  pool_pixel<Floats4, 4>(in, row, channels, y0, y1, x0, x1, padded, 0.0f,
                         [out](int64_t c, const Floats4* m) { memcpy(out + c, m, 64); },
                         [out](int64_t c, float m) { out[c] = m; });
}

// The int8 pool's pixel: padding counts as zero_point (what TFLite's int8 PAD writes), then each
// max dequantized as DEQUANTIZE does it: float(max - zero_point) * scale, one rounding (the product
// of a small integer and a float32 is exact in double, so TFLite's reference kernel, which rounds
// that, and XNNPACK's float32 multiply agree). Max commutes with the dequantization (scale > 0),
// so this is the int8 PAD + MAX_POOL_2D + DEQUANTIZE it replaces, bit for bit.
inline void pool_pixel_int8(const int8_t* in, int64_t row, int64_t channels, int64_t y0, int64_t y1, int64_t x0,
                            int64_t x1, bool padded, int32_t zero_point, float scale, float* out) {
  pool_pixel<Bytes16, 1>(in, row, channels, y0, y1, x0, x1, padded, int8_t(zero_point),
                         [=](int64_t c, const Bytes16* m) {
                           for (int i = 0; i < 16; ++i) out[c + i] = float(int32_t(m[0][i]) - zero_point) * scale;
                         },
                         [=](int64_t c, int8_t m) { out[c] = float(int32_t(m) - zero_point) * scale; });
}

// Both pools: the checks, then output rows split over the threads; pixel(in, row, y0, y1, x0, x1,
// padded, out) pools one output pixel of an image starting at `in`.
template <class T, class Pixel>
int run_pool(const N2uqPoolShape* s, const T* input, int64_t input_len, float* output, int64_t output_len,
             int num_threads, char* err, size_t err_len, Pixel pixel) {
  int32_t oh = 0, ow = 0;
  if (int rc = n2uq_max_pool2d_output_size(s, &oh, &ow, err, err_len)) return rc;
  N2UQ_CHECK(num_threads >= 1 && num_threads <= N2UQ_MAX_THREADS, N2UQ_ERR_ARGUMENT,
             "num_threads must be 1..%d, got %d", N2UQ_MAX_THREADS, num_threads);
  const int64_t c = s->channels, h = s->in_height, w = s->in_width;
  // Every factor is below 2^31, so each product of two fits; the caps keep the next ones in range.
  const int64_t in_pixels = h * w, out_pixels = int64_t(oh) * ow;
  N2UQ_CHECK(in_pixels <= kMaxPoolElements / c && out_pixels <= kMaxPoolElements / c &&
                 in_pixels * c <= kMaxPoolElements / s->batch && out_pixels * c <= kMaxPoolElements / s->batch,
             N2UQ_ERR_UNSUPPORTED, "tensor sizes are too large");
  const int64_t in_elements = in_pixels * c * s->batch, out_elements = out_pixels * c * s->batch;
  N2UQ_CHECK(input != nullptr && output != nullptr, N2UQ_ERR_ARGUMENT, "input or output is NULL");
  N2UQ_CHECK(input_len >= in_elements, N2UQ_ERR_BUFFER, "input has %lld elements, the shape needs %lld",
             (long long)input_len, (long long)in_elements);
  N2UQ_CHECK(output_len >= out_elements, N2UQ_ERR_BUFFER, "output has %lld elements, the shape needs %lld",
             (long long)output_len, (long long)out_elements);
  const char* in_bytes = reinterpret_cast<const char*>(input);
  const char* out_bytes = reinterpret_cast<const char*>(output);
  N2UQ_CHECK(out_bytes + out_elements * 4 <= in_bytes || in_bytes + in_elements * int64_t(sizeof(T)) <= out_bytes,
             N2UQ_ERR_ARGUMENT, "output overlaps input");
  const N2uqPoolShape shape = *s;
  const int64_t rows = int64_t(shape.batch) * oh;
  const int64_t grain = (int64_t(16384) / (int64_t(ow) * c)) + 1;  // ~16K outputs per range at least
  run_ranges(num_threads, rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t n = r / oh, oy = r % oh;
      const int64_t top = oy * shape.stride_height - shape.pad_top;
      const int64_t y0 = top < 0 ? 0 : top, y1 = top + shape.filter_height > h ? h : top + shape.filter_height;
      for (int64_t ox = 0; ox < ow; ++ox) {
        const int64_t left = ox * shape.stride_width - shape.pad_left;
        const int64_t x0 = left < 0 ? 0 : left, x1 = left + shape.filter_width > w ? w : left + shape.filter_width;
        float* out = output + ((n * oh + oy) * ow + ox) * c;
        if (y0 >= y1 || x0 >= x1) {  // the whole window in the padding: the padding's value, 0
          memset(out, 0, size_t(c) * 4);
          continue;
        }
        const bool padded = y1 - y0 < shape.filter_height || x1 - x0 < shape.filter_width;
        pixel(input + n * h * w * c, w * c, y0, y1, x0, x1, padded, out);
      }
    }
  });
  return N2UQ_OK;
}

}  // namespace
}  // namespace n2uq_core

using namespace n2uq_core;

extern "C" int n2uq_max_pool2d_output_size(const N2uqPoolShape* s, int32_t* out_height, int32_t* out_width,
                                           char* err, size_t err_len) {
  N2UQ_CHECK(s != nullptr && out_height != nullptr && out_width != nullptr, N2UQ_ERR_ARGUMENT,
             "shape or output pointer is NULL");
  N2UQ_CHECK(s->batch >= 1 && s->in_height >= 1 && s->in_width >= 1 && s->channels >= 1, N2UQ_ERR_ARGUMENT,
             "batch, in_height, in_width and channels must be >= 1, got %d, %d, %d, %d", s->batch, s->in_height,
             s->in_width, s->channels);
  N2UQ_CHECK(s->in_height <= kMaxPoolDim && s->in_width <= kMaxPoolDim && s->channels <= kMaxPoolDim,
             N2UQ_ERR_ARGUMENT, "in_height, in_width and channels must be <= %lld", (long long)kMaxPoolDim);
  N2UQ_CHECK(s->filter_height >= 1 && s->filter_width >= 1 && s->filter_height <= 4096 && s->filter_width <= 4096,
             N2UQ_ERR_ARGUMENT, "filter_height and filter_width must be 1..4096, got %d, %d", s->filter_height,
             s->filter_width);
  N2UQ_CHECK(s->stride_height >= 1 && s->stride_width >= 1 && s->stride_height <= 4096 && s->stride_width <= 4096,
             N2UQ_ERR_ARGUMENT, "stride_height and stride_width must be 1..4096, got %d, %d", s->stride_height,
             s->stride_width);
  N2UQ_CHECK(s->pad_top >= 0 && s->pad_bottom >= 0 && s->pad_left >= 0 && s->pad_right >= 0 && s->pad_top <= 4096 &&
                 s->pad_bottom <= 4096 && s->pad_left <= 4096 && s->pad_right <= 4096,
             N2UQ_ERR_ARGUMENT, "pads must be 0..4096, got top %d bottom %d left %d right %d", s->pad_top,
             s->pad_bottom, s->pad_left, s->pad_right);
  const int64_t padded_h = int64_t(s->in_height) + s->pad_top + s->pad_bottom;
  const int64_t padded_w = int64_t(s->in_width) + s->pad_left + s->pad_right;
  N2UQ_CHECK(padded_h >= s->filter_height && padded_w >= s->filter_width, N2UQ_ERR_ARGUMENT,
             "the padded input (%lld x %lld) is smaller than the filter (%d x %d)", (long long)padded_h,
             (long long)padded_w, s->filter_height, s->filter_width);
  *out_height = int32_t((padded_h - s->filter_height) / s->stride_height + 1);
  *out_width = int32_t((padded_w - s->filter_width) / s->stride_width + 1);
  return N2UQ_OK;
}

extern "C" int n2uq_max_pool2d(const N2uqPoolShape* s, const float* input, int64_t input_len, float* output,
                               int64_t output_len, int num_threads, char* err, size_t err_len) {
  return guarded(err, err_len, [&]() -> int {
    const int64_t c = s != nullptr ? s->channels : 0;
    return run_pool(s, input, input_len, output, output_len, num_threads, err, err_len,
                    [c](const float* in, int64_t row, int64_t y0, int64_t y1, int64_t x0, int64_t x1, bool padded,
                        float* out) { pool_pixel_float(in, row, c, y0, y1, x0, x1, padded, out); });
  });
}

extern "C" int n2uq_max_pool2d_int8(const N2uqPoolShape* s, const int8_t* input, int64_t input_len, int32_t zero_point,
                                    float scale, float* output, int64_t output_len, int num_threads, char* err,
                                    size_t err_len) {
  return guarded(err, err_len, [&]() -> int {
    N2UQ_CHECK(zero_point >= -128 && zero_point <= 127, N2UQ_ERR_ARGUMENT, "zero_point must be -128..127, got %d",
               zero_point);
    N2UQ_CHECK(scale > 0.0f && scale <= FLT_MAX, N2UQ_ERR_ARGUMENT, "scale must be positive and finite, got %g",
               double(scale));
    const int64_t c = s != nullptr ? s->channels : 0;
    return run_pool(s, input, input_len, output, output_len, num_threads, err, err_len,
                    [c, zero_point, scale](const int8_t* in, int64_t row, int64_t y0, int64_t y1, int64_t x0,
                                           int64_t x1, bool padded, float* out) {
                      pool_pixel_int8(in, row, c, y0, y1, x0, x1, padded, zero_point, scale, out);
                    });
  });
}
