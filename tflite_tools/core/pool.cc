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

inline Floats4 load4(const float* p) {
  Floats4 v;
  memcpy(&v, p, sizeof(v));
  return v;
}

inline Floats4 max4(Floats4 m, Floats4 v) { return v > m ? v : m; }

// One output pixel: out[c] = max over the window's in-range rows [y0, y1) x columns [x0, x1) of
// the input (row stride `row`, pixel stride c), and over 0.0f when the window reaches into the
// padding (`padded`), taken in row-major order. Sixteen channels at a time in registers.
inline void pool_pixel(const float* in, int64_t row, int64_t channels, int64_t y0, int64_t y1, int64_t x0,
                       int64_t x1, bool padded, float* out) {
  const float* first = in + y0 * row + x0 * channels;
  int64_t c = 0;
  for (; c + 16 <= channels; c += 16) {
    Floats4 m0 = load4(first + c), m1 = load4(first + c + 4), m2 = load4(first + c + 8), m3 = load4(first + c + 12);
    for (int64_t y = y0; y < y1; ++y)
      for (int64_t x = x0; x < x1; ++x) {
        const float* p = in + y * row + x * channels + c;
        m0 = max4(m0, load4(p));
        m1 = max4(m1, load4(p + 4));
        m2 = max4(m2, load4(p + 8));
        m3 = max4(m3, load4(p + 12));
      }
    if (padded) {
      const Floats4 zero = {0.0f, 0.0f, 0.0f, 0.0f};
      m0 = max4(m0, zero);
      m1 = max4(m1, zero);
      m2 = max4(m2, zero);
      m3 = max4(m3, zero);
    }
    memcpy(out + c, &m0, 16);
    memcpy(out + c + 4, &m1, 16);
    memcpy(out + c + 8, &m2, 16);
    memcpy(out + c + 12, &m3, 16);
  }
  for (; c < channels; ++c) {
    float m = first[c];
    for (int64_t y = y0; y < y1; ++y)
      for (int64_t x = x0; x < x1; ++x) {
        const float v = in[y * row + x * channels + c];
        m = v > m ? v : m;
      }
    if (padded) m = 0.0f > m ? 0.0f : m;
    out[c] = m;
  }
}

typedef int8_t Bytes16 __attribute__((vector_size(16)));

// The same over int8 codes, padding counting as zero_point (what TFLite's int8 PAD writes), then
// each max dequantized as DEQUANTIZE does it: float(max - zero_point) * scale, one rounding (the
// product of a small integer and a float32 is exact in double, so TFLite's reference kernel, which
// rounds that, and XNNPACK's float32 multiply agree). Max commutes with the dequantization
// (scale > 0), so this is the int8 PAD + MAX_POOL_2D + DEQUANTIZE it replaces, bit for bit.
inline void pool_pixel_int8(const int8_t* in, int64_t row, int64_t channels, int64_t y0, int64_t y1, int64_t x0,
                            int64_t x1, bool padded, int32_t zero_point, float scale, float* out) {
  const int8_t* first = in + y0 * row + x0 * channels;
  int64_t c = 0;
  for (; c + 16 <= channels; c += 16) {
    Bytes16 m;
    memcpy(&m, first + c, 16);
    for (int64_t y = y0; y < y1; ++y)
      for (int64_t x = x0; x < x1; ++x) {
        Bytes16 v;
        memcpy(&v, in + y * row + x * channels + c, 16);
        m = v > m ? v : m;
      }
    if (padded) {
      const Bytes16 zp = Bytes16{} + int8_t(zero_point);
      m = zp > m ? zp : m;
    }
    for (int i = 0; i < 16; ++i) out[c + i] = float(int32_t(m[i]) - zero_point) * scale;
  }
  for (; c < channels; ++c) {
    int8_t m = first[c];
    for (int64_t y = y0; y < y1; ++y)
      for (int64_t x = x0; x < x1; ++x) {
        const int8_t v = in[y * row + x * channels + c];
        m = v > m ? v : m;
      }
    if (padded && int8_t(zero_point) > m) m = int8_t(zero_point);
    out[c] = float(int32_t(m) - zero_point) * scale;
  }
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
                        float* out) { pool_pixel(in, row, c, y0, y1, x0, x1, padded, out); });
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
