// AVX2 path (x86-64 without AVX-512 VPOPCNTDQ). The target options apply to this file
// only (no -march in the build), and the dispatcher calls in only after checking the CPU.
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#include <stdint.h>

#include "kernel_table.h"

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,popcnt"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,popcnt")
#endif

namespace n2uq_core {
namespace {

struct Ops {
  static constexpr int kLanes = 4;
  static constexpr int kAccumulatorBudget = 8;  // 16 ymm registers in all
  typedef __m256i V;
  static inline uint64_t popcount64(uint64_t v) { return (uint64_t)__builtin_popcountll(v); }
  static inline V zero() { return _mm256_setzero_si256(); }
  static inline V load(const uint64_t* p) { return _mm256_loadu_si256((const __m256i*)p); }
  static inline V and_broadcast(V a, uint64_t w) { return _mm256_and_si256(a, _mm256_set1_epi64x((long long)w)); }
  // No vector popcount before AVX-512: nibble lookup with vpshufb, bytes summed per
  // 64-bit lane with vpsadbw.
  static inline V popcount(V a) {
    const __m256i lookup = _mm256_setr_epi8(0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4, 0, 1, 1, 2, 1, 2, 2, 3,
                                            1, 2, 2, 3, 2, 3, 3, 4);
    const __m256i low_mask = _mm256_set1_epi8(0x0f);
    const __m256i lo = _mm256_and_si256(a, low_mask);
    const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(a, 4), low_mask);
    const __m256i bytes = _mm256_add_epi8(_mm256_shuffle_epi8(lookup, lo), _mm256_shuffle_epi8(lookup, hi));
    return _mm256_sad_epu8(bytes, _mm256_setzero_si256());
  }
  static inline V add(V a, V b) { return _mm256_add_epi64(a, b); }
  static inline void store(uint64_t* p, V v) { _mm256_storeu_si256((__m256i*)p, v); }
};

#include "kernels_impl.h"

}  // namespace

const KernelTable* avx2_kernels() {
  static const KernelTable table = make_kernel_table<Ops>("avx2");
  return &table;
}

}  // namespace n2uq_core

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

#else  // not x86

#include "kernel_table.h"
namespace n2uq_core {
const KernelTable* avx2_kernels() { return nullptr; }
}  // namespace n2uq_core

#endif
