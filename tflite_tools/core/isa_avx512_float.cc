// The float convolution over few input channels on AVX-512 FMA (layout in kernel_table.h,
// FloatConvJob). Target options for this file only, no -march; float_conv.cc calls in only when
// the CPU reports AVX-512.
#if defined(__x86_64__)
#include <immintrin.h>
#include <stdint.h>

#include "kernel_table.h"

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx512bw,avx512vl,fma"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,fma")
#endif

namespace n2uq_core {
namespace {
namespace avx512_float {

constexpr int kPixels = 7;  // 7 pixels x 4 vectors = 28 accumulators, 4 weight registers

// Output row (n, oh), channel pass `pass` (V vectors of its 64 channels). Pixels past the row's
// end in the last block read the last pixel's inputs (in bounds) and are not stored.
template <int V>
void row_pass(const FloatConvJob& j, int64_t n, int64_t oh, int64_t pass) {
  const int64_t c = j.in_channels, ow_count = j.out_width, oc0 = pass * 64;
  const float* image = j.input + n * j.in_height * j.in_width * c;
  const float* weights = j.weights + pass * j.kernel_height * j.taps * 64;
  __mmask16 mask[V];
  __m512 bias[V];
  for (int v = 0; v < V; ++v) {
    const int64_t left = j.out_channels - (oc0 + 16 * v);
    mask[v] = (__mmask16)(left >= 16 ? 0xFFFFu : (1u << left) - 1u);
    bias[v] = _mm512_loadu_ps(j.bias + oc0 + 16 * v);
  }
  const __m512 lo = _mm512_set1_ps(j.output_min), hi = _mm512_set1_ps(j.output_max);
  for (int64_t ow0 = 0; ow0 < ow_count; ow0 += kPixels) {
    const int np = ow_count - ow0 < kPixels ? int(ow_count - ow0) : kPixels;
    int64_t pixel[kPixels];  // floats from the row's first tap to pixel p's
    for (int p = 0; p < kPixels; ++p) pixel[p] = int64_t(p < np ? p : np - 1) * j.stride_width * c;
    __m512 acc[kPixels][V];
    for (int p = 0; p < kPixels; ++p)
      for (int v = 0; v < V; ++v) acc[p][v] = bias[v];
    for (int64_t kh = 0; kh < j.kernel_height; ++kh) {
      const float* row = image + ((oh * j.stride_height + kh * j.dilation_height) * j.in_width + ow0 * j.stride_width) * c;
      const float* w = weights + kh * j.taps * 64;
      for (int64_t t = 0; t < j.taps; ++t, w += 64) {
        __m512 wv[V];
        for (int v = 0; v < V; ++v) wv[v] = _mm512_load_ps(w + 16 * v);
        const float* x = row + j.tap_offsets[t];
        for (int p = 0; p < kPixels; ++p) {
          const __m512 xv = _mm512_set1_ps(x[pixel[p]]);
          for (int v = 0; v < V; ++v) acc[p][v] = _mm512_fmadd_ps(xv, wv[v], acc[p][v]);
        }
      }
    }
    float* out = j.output + ((n * j.out_height + oh) * ow_count + ow0) * j.out_channels + oc0;
    for (int p = 0; p < np; ++p, out += j.out_channels)
      for (int v = 0; v < V; ++v)
        _mm512_mask_storeu_ps(out + 16 * v, mask[v], _mm512_min_ps(_mm512_max_ps(acc[p][v], lo), hi));
  }
}

void rows(const FloatConvJob& j, int64_t begin, int64_t end) {
  for (int64_t item = begin; item < end; ++item) {
    const int64_t n = item / j.out_height, oh = item % j.out_height;
    for (int64_t pass = 0; pass < j.passes; ++pass) {
      const int64_t left = j.out_channels - pass * 64;
      switch (left >= 64 ? 4 : int((left + 15) / 16)) {
        case 1: row_pass<1>(j, n, oh, pass); break;
        case 2: row_pass<2>(j, n, oh, pass); break;
        case 3: row_pass<3>(j, n, oh, pass); break;
        default: row_pass<4>(j, n, oh, pass); break;
      }
    }
  }
}

}  // namespace avx512_float
}  // namespace

FloatConvRowsFn avx512_float_conv_rows() { return &avx512_float::rows; }

}  // namespace n2uq_core

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

#else  // not x86-64

#include "kernel_table.h"
namespace n2uq_core {
FloatConvRowsFn avx512_float_conv_rows() { return nullptr; }
}  // namespace n2uq_core

#endif
