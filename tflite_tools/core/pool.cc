// Max pooling of float32 NHWC tensors with zero padding (n2uq_max_pool2d in n2uq_core.h), and of
// int8 ones with their dequantization (n2uq_max_pool2d_int8): the layer of the N2UQMaxPool2DFused
// op, which replaces a network's PAD (zeros) + MAX_POOL_2D ('valid') pair, or in an int8 model its
// int8 PAD + MAX_POOL_2D + DEQUANTIZE, and runs the output stage that follows (RPReLU, the next
// quantize-and-pack) on its result, as the fused conv ops do. The checks and the split of output
// rows over threads are here; the rows are pool_impl.h's, compiled per ISA (this file: the
// baseline's 16-byte vectors, SSE2 or NEON; vector_x86.cc: AVX2, AVX-512) and picked by the
// resolved ISA, as the other kernels'.
#include <cfloat>
#include <cstring>
#include <string.h>

#include "core_internal.h"
#include "n2uq_core.h"

namespace n2uq_core {
namespace portable_pool {
constexpr int kLaneBytes = 16;
#include "pool_impl.h"
}  // namespace portable_pool

PoolRowKernels pool_rows_portable() { return portable_pool::pool_row_kernels(); }

namespace {

constexpr int64_t kMaxPoolDim = int64_t(1) << 24;
constexpr int64_t kMaxPoolElements = int64_t(1) << 40;

// Both pools: the checks, then output rows split over the threads; rows(kernels, shape, oh, ow,
// begin, end) pools output rows [begin, end) with the row kernels of the resolved `isa`.
template <class T, class Rows>
int run_pool(const N2uqPoolShape* s, const T* input, int64_t input_len, float* output, int64_t output_len,
             int isa, int num_threads, char* err, size_t err_len, Rows rows) {
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
  const int resolved = resolve_isa(isa, err, err_len);
  if (resolved < 0) return resolved;
  PoolRowKernels kernels = resolved == N2UQ_ISA_AVX512 ? pool_rows_avx512()
                           : resolved == N2UQ_ISA_AVX2 ? pool_rows_avx2()
                                                  : pool_rows_portable();
  if (kernels.float_rows == nullptr) kernels = pool_rows_portable();
  const N2uqPoolShape shape = *s;
  const int64_t rows_total = int64_t(shape.batch) * oh;
  const int64_t grain = (int64_t(16384) / (int64_t(ow) * c)) + 1;  // ~16K outputs per range at least
  run_ranges(num_threads, rows_total, grain,
             [&](int64_t begin, int64_t end) { rows(kernels, shape, int64_t(oh), int64_t(ow), begin, end); });
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
                               int64_t output_len, int isa, int num_threads, char* err, size_t err_len) {
  return guarded(err, err_len, [&]() -> int {
    return run_pool(s, input, input_len, output, output_len, isa, num_threads, err, err_len,
                    [=](const PoolRowKernels& k, const N2uqPoolShape& shape, int64_t oh, int64_t ow, int64_t begin,
                        int64_t end) { k.float_rows(shape, oh, ow, input, output, begin, end); });
  });
}

extern "C" int n2uq_max_pool2d_int8(const N2uqPoolShape* s, const int8_t* input, int64_t input_len, int32_t zero_point,
                                    float scale, float* output, int64_t output_len, int isa, int num_threads,
                                    char* err, size_t err_len) {
  return guarded(err, err_len, [&]() -> int {
    N2UQ_CHECK(zero_point >= -128 && zero_point <= 127, N2UQ_ERR_ARGUMENT, "zero_point must be -128..127, got %d",
               zero_point);
    N2UQ_CHECK(scale > 0.0f && scale <= FLT_MAX, N2UQ_ERR_ARGUMENT, "scale must be positive and finite, got %g",
               double(scale));
    return run_pool(s, input, input_len, output, output_len, isa, num_threads, err, err_len,
                    [=](const PoolRowKernels& k, const N2uqPoolShape& shape, int64_t oh, int64_t ow, int64_t begin,
                        int64_t end) { k.int8_rows(shape, oh, ow, input, zero_point, scale, output, begin, end); });
  });
}
