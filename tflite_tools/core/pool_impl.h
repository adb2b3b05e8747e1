// The max pools' rows (pool.cc), compiled once per ISA by the including file (pool.cc for the
// baseline, vector_x86.cc for AVX2 and AVX-512), which defines kLaneBytes (16, 32 or 64) and its
// target options first. Include inside a namespace of its own, after n2uq_core.h and <string.h>.
//
// Each output is the max over its window's positions inside the input in row-major order, then
// over the padding's value if the window reaches into the padding. Max is exact, so the order only
// matters for NaN and the sign of a zero: v > m ? v : m keeps the first of equal values and never
// takes a NaN after a number (custom_ops.py, "Exactness", for how this compares with TFLite's
// pool). A pixel's channels go through the window a register block at a time (64 floats or 64
// bytes on AVX-512). The 3x3/2 pool of a ResNet stem (112 x 112 x 64) on the AMX Xeon: int8 180 ->
// 47 us against 16-byte vectors (it was bound by its loop), float32 170 -> 125 us (its 3.2 MB
// input comes from L3).

typedef float PoolFloats __attribute__((vector_size(kLaneBytes)));
typedef int8_t PoolBytes __attribute__((vector_size(kLaneBytes)));
typedef int8_t PoolBytes16 __attribute__((vector_size(16)));
// The int8 maxes are dequantized kDequantLanes at a time, widened through int16 (GCC 12 turned a
// direct int8 -> int32 conversion into byte extracts): 8 with AVX2 (16 spilled its two-register
// vectors), 16 with SSE2 / NEON (4 came out byte by byte) and AVX-512.
constexpr int kDequantLanes = kLaneBytes == 32 ? 8 : 16;
typedef int8_t PoolDequantBytes __attribute__((vector_size(kDequantLanes)));
typedef int16_t PoolDequantShorts __attribute__((vector_size(2 * kDequantLanes)));
typedef int32_t PoolDequantInts __attribute__((vector_size(4 * kDequantLanes)));
typedef float PoolDequantFloats __attribute__((vector_size(4 * kDequantLanes)));
constexpr int kPoolFloatBlock = 4;  // float vectors per register block

// The max of K vectors V of T at channel c over the window's in-range rows [y0, y1) x columns
// [x0, x1) of the input (row stride `row`, pixel stride `channels`), in row-major order from the
// first position.
template <class V, int K, class T>
__attribute__((always_inline)) inline void window_max(const T* in, int64_t row, int64_t channels, int64_t c, int64_t y0,
                                                      int64_t y1, int64_t x0, int64_t x1, V* m) {
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

// The window's max of K vectors V at channel c, then the padding's value `pad` where the window
// reaches into the padding.
template <class V, int K, class T>
__attribute__((always_inline)) inline void padded_max(const T* in, int64_t row, int64_t channels, int64_t c, int64_t y0,
                                                      int64_t y1, int64_t x0, int64_t x1, bool padded, T pad, V* m) {
  window_max<V, K>(in, row, channels, c, y0, y1, x0, x1, m);
  if (padded) {
    const V p = V{} + pad;
    for (int k = 0; k < K; ++k) m[k] = p > m[k] ? p : m[k];
  }
}

// The float32 pool's pixel: the max itself, padding 0.0f.
inline void pool_pixel_float(const float* in, int64_t row, int64_t channels, int64_t y0, int64_t y1, int64_t x0,
                             int64_t x1, bool padded, float* out) {
  constexpr int64_t kLanes = kLaneBytes / 4;
  int64_t c = 0;
  for (; c + kPoolFloatBlock * kLanes <= channels; c += kPoolFloatBlock * kLanes) {
    PoolFloats m[kPoolFloatBlock];
    padded_max<PoolFloats, kPoolFloatBlock>(in, row, channels, c, y0, y1, x0, x1, padded, 0.0f, m);
    memcpy(out + c, m, sizeof(m));
  }
  for (; c + kLanes <= channels; c += kLanes) {
    PoolFloats m;
    padded_max<PoolFloats, 1>(in, row, channels, c, y0, y1, x0, x1, padded, 0.0f, &m);
    memcpy(out + c, &m, sizeof(m));
  }
  for (; c < channels; ++c) padded_max<float, 1>(in, row, channels, c, y0, y1, x0, x1, padded, 0.0f, out + c);
}

// Dequantizes `count` (a multiple of 16) maxes m to out: float(m - zero_point) * scale.
__attribute__((always_inline)) inline void dequantize(const int8_t* m, int count, int32_t zero_point, float scale,
                                                      float* out) {
  for (int i = 0; i < count; i += kDequantLanes) {
    PoolDequantBytes q;
    memcpy(&q, m + i, sizeof(q));
    const PoolDequantShorts shorts = __builtin_convertvector(q, PoolDequantShorts);
    const PoolDequantInts wide = __builtin_convertvector(shorts, PoolDequantInts);
    const PoolDequantFloats y = __builtin_convertvector(wide - zero_point, PoolDequantFloats) * scale;
    memcpy(out + i, &y, sizeof(y));
  }
}

// The int8 pool's pixel: padding counts as zero_point (what TFLite's int8 PAD writes), then each
// max dequantized as DEQUANTIZE does it: float(max - zero_point) * scale, one rounding (the product
// of a small integer and a float32 is exact in double, so TFLite's reference kernel, which rounds
// that, and XNNPACK's float32 multiply agree). Max commutes with the dequantization (scale > 0),
// so this is the int8 PAD + MAX_POOL_2D + DEQUANTIZE it replaces, bit for bit.
inline void pool_pixel_int8(const int8_t* in, int64_t row, int64_t channels, int64_t y0, int64_t y1, int64_t x0,
                            int64_t x1, bool padded, int32_t zero_point, float scale, float* out) {
  const int8_t pad = int8_t(zero_point);
  int64_t c = 0;
  for (; c + kLaneBytes <= channels; c += kLaneBytes) {
    PoolBytes m;
    padded_max<PoolBytes, 1>(in, row, channels, c, y0, y1, x0, x1, padded, pad, &m);
    dequantize(reinterpret_cast<const int8_t*>(&m), kLaneBytes, zero_point, scale, out + c);
  }
  for (; c + 16 <= channels; c += 16) {
    PoolBytes16 m;
    padded_max<PoolBytes16, 1>(in, row, channels, c, y0, y1, x0, x1, padded, pad, &m);
    dequantize(reinterpret_cast<const int8_t*>(&m), 16, zero_point, scale, out + c);
  }
  for (; c < channels; ++c) {
    int8_t m;
    padded_max<int8_t, 1>(in, row, channels, c, y0, y1, x0, x1, padded, pad, &m);
    out[c] = float(int32_t(m) - zero_point) * scale;
  }
}

// Output rows [begin, end) of the batch's batch * out_height rows: pixel(in, row, y0, y1, x0, x1,
// padded, out) pools one output pixel of the image starting at `in`.
template <class T, class Pixel>
inline void pool_rows(const N2uqPoolShape& s, int64_t out_height, int64_t out_width, const T* input, float* output,
                      int64_t begin, int64_t end, Pixel pixel) {
  const int64_t c = s.channels, h = s.in_height, w = s.in_width;
  for (int64_t r = begin; r < end; ++r) {
    const int64_t n = r / out_height, oy = r % out_height;
    const int64_t top = oy * s.stride_height - s.pad_top;
    const int64_t y0 = top < 0 ? 0 : top, y1 = top + s.filter_height > h ? h : top + s.filter_height;
    for (int64_t ox = 0; ox < out_width; ++ox) {
      const int64_t left = ox * s.stride_width - s.pad_left;
      const int64_t x0 = left < 0 ? 0 : left, x1 = left + s.filter_width > w ? w : left + s.filter_width;
      float* out = output + (r * out_width + ox) * c;
      if (y0 >= y1 || x0 >= x1) {  // the whole window in the padding: the padding's value, dequantized 0
        memset(out, 0, size_t(c) * 4);
        continue;
      }
      const bool padded = y1 - y0 < s.filter_height || x1 - x0 < s.filter_width;
      pixel(input + n * h * w * c, w * c, y0, y1, x0, x1, padded, out);
    }
  }
}

inline void pool_rows_float(const N2uqPoolShape& s, int64_t out_height, int64_t out_width, const float* input,
                            float* output, int64_t begin, int64_t end) {
  const int64_t c = s.channels;
  pool_rows(s, out_height, out_width, input, output, begin, end,
            [c](const float* in, int64_t row, int64_t y0, int64_t y1, int64_t x0, int64_t x1, bool padded,
                float* out) { pool_pixel_float(in, row, c, y0, y1, x0, x1, padded, out); });
}

inline void pool_rows_int8(const N2uqPoolShape& s, int64_t out_height, int64_t out_width, const int8_t* input,
                           int32_t zero_point, float scale, float* output, int64_t begin, int64_t end) {
  const int64_t c = s.channels;
  pool_rows(s, out_height, out_width, input, output, begin, end,
            [=](const int8_t* in, int64_t row, int64_t y0, int64_t y1, int64_t x0, int64_t x1, bool padded,
                float* out) { pool_pixel_int8(in, row, c, y0, y1, x0, x1, padded, zero_point, scale, out); });
}

inline PoolRowKernels pool_row_kernels() { return PoolRowKernels{&pool_rows_float, &pool_rows_int8}; }
