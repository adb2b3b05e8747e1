// AVX2 dot path, in two builds of the same kernels (dot_impl.h): VPMADDUBSW + VPMADDWD on
// any AVX2 CPU, and VPDPBUSD on ymm where the CPU has AVX-VNNI. Each build has its own
// target options (this file only, no -march); core.cc calls in after checking the CPU.
#if defined(__x86_64__)
#include <immintrin.h>
#include <stdint.h>

#include "kernel_table.h"

// The parts the two builds share: everything but the multiply-accumulate. 8 output
// channels per vector, 2 vectors per work item; 16 ymm registers hold P * R accumulators,
// R weights and the broadcast (plus a product and the constant ones without VNNI).
#define N2UQ_AVX2_DOT_COMMON                                                                                \
  static constexpr int kLanes = 8;                                                                          \
  static constexpr int kBlocksPerChunk = 2;                                                                 \
  typedef __m256i Acc;                                                                                      \
  typedef __m256i Wv;                                                                                       \
  typedef __m256i Av;                                                                                       \
  static inline Acc zero() { return _mm256_setzero_si256(); }                                              \
  static inline Wv load_weights(const int8_t* p) { return _mm256_loadu_si256((const __m256i*)p); }        \
  static inline Av broadcast4(const uint8_t* p) {                                                           \
    int32_t quad;                                                                                           \
    __builtin_memcpy(&quad, p, 4);                                                                          \
    return _mm256_set1_epi32(quad);                                                                         \
  }                                                                                                         \
  struct Out {                                                                                              \
    int32_t* out_int32;                                                                                     \
    float* out_float;                                                                                       \
    __m256i mask;                                                                                           \
    __m256 multiplier, bias;                                                                                \
  };                                                                                                        \
  static inline Out out(const ConvJob& j, int64_t oc0, int valid) {                                         \
    Out o;                                                                                                  \
    o.out_int32 = j.out_int32;                                                                              \
    o.out_float = j.out_float;                                                                              \
    o.mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(valid), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));       \
    o.multiplier = o.bias = _mm256_setzero_ps();                                                            \
    if (j.out_float) { /* multiplier and bias may be null without a float output */                         \
      o.multiplier = _mm256_maskload_ps(j.multiplier + oc0, o.mask);                                        \
      o.bias = _mm256_maskload_ps(j.bias + oc0, o.mask);                                                    \
    }                                                                                                       \
    return o;                                                                                               \
  }                                                                                                         \
  static inline void store(const Out& o, int64_t index, Acc acc) {                                          \
    if (o.out_int32) _mm256_maskstore_epi32(o.out_int32 + index, o.mask, acc);                              \
    if (o.out_float)                                                                                        \
      _mm256_maskstore_ps(o.out_float + index, o.mask,                                                      \
                          _mm256_add_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(acc), o.multiplier), o.bias));     \
  }                                                                                                         \
  /* Bit c of a plane's 32-bit half -> byte c: the byte holding it is copied into 8 lanes,   */           \
  /* each lane tests its own bit, the all-ones result keeps 2^p.                              */           \
  static inline void codes64(const uint64_t* planes, int64_t words, int act_bits, uint64_t tail, uint8_t* out) { \
    const __m256i spread = _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, \
                                            3, 3, 3, 3, 3, 3, 3, 3);                                        \
    const __m256i select = _mm256_set1_epi64x((long long)0x8040201008040201ull);                          \
    __m256i codes[2] = {_mm256_setzero_si256(), _mm256_setzero_si256()};                                    \
    for (int p = 0; p < act_bits; ++p) {                                                                    \
      const uint64_t bits = planes[p * words] & tail;                                                       \
      for (int h = 0; h < 2; ++h) {                                                                         \
        const __m256i v = _mm256_shuffle_epi8(_mm256_set1_epi32((int)(uint32_t)(bits >> (32 * h))), spread); \
        const __m256i set = _mm256_cmpeq_epi8(_mm256_and_si256(v, select), select);                         \
        codes[h] = _mm256_or_si256(codes[h], _mm256_and_si256(set, _mm256_set1_epi8((char)(1 << p))));     \
      }                                                                                                     \
    }                                                                                                       \
    _mm256_storeu_si256((__m256i*)out, codes[0]);                                                          \
    _mm256_storeu_si256((__m256i*)(out + 32), codes[1]);                                                   \
  }

// ---------------------------------------------------------------- VPMADDUBSW build

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2")
#endif

namespace n2uq_core {
namespace {
namespace avx2_dot {

// u8 x s8 pairs -> int16, pairs -> int32, add. The int16 pair sums never saturate: codes
// x weights are |2 * 15 * 15| = 450 at most, Winograd V8 x U |2 * 90 * 72| = 12960 < 32767.
struct DotOps {
  N2UQ_AVX2_DOT_COMMON
  static constexpr int max_pixels(int r) { return r >= 2 ? 5 : 10; }
  static inline Acc dot(Acc acc, Av a, Wv w) {
    const __m256i pairs = _mm256_maddubs_epi16(a, w);
    return _mm256_add_epi32(acc, _mm256_madd_epi16(pairs, _mm256_set1_epi16(1)));
  }
};

#include "dot_impl.h"

}  // namespace avx2_dot
}  // namespace

const PathKernels* avx2_dot_kernels() {
  static const PathKernels kernels = avx2_dot::make_dot_kernels_wino<avx2_dot::DotOps>("avx2 dot");
  return &kernels;
}

}  // namespace n2uq_core

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

// ---------------------------------------------------------------- AVX-VNNI build

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,avxvnni"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,avxvnni")
#endif

namespace n2uq_core {
namespace {
namespace avx_vnni_dot {

struct DotOps {
  N2UQ_AVX2_DOT_COMMON
  static constexpr int max_pixels(int r) { return r >= 2 ? 6 : 12; }
  static inline Acc dot(Acc acc, Av a, Wv w) { return _mm256_dpbusd_avx_epi32(acc, a, w); }
};

#include "dot_impl.h"

}  // namespace avx_vnni_dot
}  // namespace

const PathKernels* avx_vnni_dot_kernels() {
  static const PathKernels kernels = avx_vnni_dot::make_dot_kernels_wino<avx_vnni_dot::DotOps>("avx-vnni dot");
  return &kernels;
}

}  // namespace n2uq_core

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

#undef N2UQ_AVX2_DOT_COMMON

#else  // not x86-64

#include "kernel_table.h"
namespace n2uq_core {
const PathKernels* avx2_dot_kernels() { return nullptr; }
const PathKernels* avx_vnni_dot_kernels() { return nullptr; }
}  // namespace n2uq_core

#endif
