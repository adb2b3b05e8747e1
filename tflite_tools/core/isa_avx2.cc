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

// ---------------------------------------------------------------- quantize (and pack)
//
// 8 channels per vector, a binary search over the sorted threshold table (kernel_table.h).
// Before level b the codes decided so far are multiples of 2^(b+1), so k = code >> (b+1) is
// 0..7 and level b's 8-entry table L_b[k] = T[k * 2^(b+1) + 2^b - 1] serves every lane
// through one VPERMPS. The comparison's movemask is that group's 8 bits of bit plane b,
// and k becomes 2k + bit (the all-ones comparison result is -1).

template <int BITS>
inline void quantize_levels(const QuantizeJob& j, __m256* levels) {
  for (int b = 0; b < BITS; ++b) {
    float table[8];
    for (int k = 0; k < 8; ++k) {
      const int index = (k << (b + 1)) + (1 << b) - 1;  // past the table: never indexed
      table[k] = j.thresholds[index < kThresholdTable ? index : kThresholdTable - 1];
    }
    levels[b] = _mm256_loadu_ps(table);
  }
}

// k = the codes of the 8 values x; planes[b]: their bits of plane b (all 8 lanes).
template <int BITS, bool CODES>
inline __m256i quantize8(__m256 x, __m256 beta1, const __m256* levels, uint32_t* planes) {
  const __m256 scaled = _mm256_mul_ps(x, beta1);
  __m256i k = _mm256_setzero_si256();
  for (int b = BITS - 1; b >= 0; --b) {
    const __m256 t = b == BITS - 1 ? _mm256_permutevar8x32_ps(levels[b], _mm256_setzero_si256())
                                   : _mm256_permutevar8x32_ps(levels[b], k);
    // Ordered, non-signaling >: false for a NaN, like the scalar comparison.
    const __m256 m = _mm256_cmp_ps(scaled, t, _CMP_GT_OQ);
    planes[b] = (uint32_t)_mm256_movemask_ps(m);
    if (CODES || b > 0) k = _mm256_sub_epi32(_mm256_add_epi32(k, k), _mm256_castps_si256(m));
  }
  return k;
}

inline __m256i lanes_below(int count) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(count), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

template <int BITS>
void quantize_and_pack_bits(const QuantizeJob& j, int64_t begin, int64_t end) {
  __m256 levels[BITS];
  quantize_levels<BITS>(j, levels);
  const __m256 beta1 = _mm256_set1_ps(j.beta1);
  const int64_t channels = j.channels, words = j.words, full_words = channels / 64;
  const int rem = (int)(channels % 64);
  for (int64_t pos = begin; pos < end; ++pos) {
    const float* x = j.x + pos * channels;
    uint64_t* out = j.out_packed + pos * BITS * words;
    for (int64_t w = 0; w < full_words; ++w, x += 64) {
      uint64_t planes[BITS] = {};
      // Half a word at a time, level by level over its 4 groups: 4 independent
      // permute-compare chains (8 would not fit the 16 ymm registers).
      for (int half = 0; half < 2; ++half) {
        __m256 scaled[4];
        __m256i k[4];
        for (int g = 0; g < 4; ++g) {
          scaled[g] = _mm256_mul_ps(_mm256_loadu_ps(x + 32 * half + 8 * g), beta1);
          k[g] = _mm256_setzero_si256();
        }
        for (int b = BITS - 1; b >= 0; --b) {
          uint64_t bits = 0;
          for (int g = 0; g < 4; ++g) {
            const __m256 t = b == BITS - 1 ? _mm256_permutevar8x32_ps(levels[b], _mm256_setzero_si256())
                                           : _mm256_permutevar8x32_ps(levels[b], k[g]);
            const __m256 m = _mm256_cmp_ps(scaled[g], t, _CMP_GT_OQ);
            bits |= (uint64_t)(uint32_t)_mm256_movemask_ps(m) << (8 * g);
            if (b > 0) k[g] = _mm256_sub_epi32(_mm256_add_epi32(k[g], k[g]), _mm256_castps_si256(m));
          }
          planes[b] |= bits << (32 * half);
        }
      }
      for (int b = 0; b < BITS; ++b) out[b * words + w] = planes[b];
    }
    if (rem > 0) {  // last, partial word: masked loads, bits past the channels cleared
      uint64_t planes[BITS] = {};
      for (int g = 0; 8 * g < rem; ++g) {
        const int left = rem - 8 * g;
        const __m256 v = left >= 8 ? _mm256_loadu_ps(x + 8 * g) : _mm256_maskload_ps(x + 8 * g, lanes_below(left));
        const uint32_t keep = left >= 8 ? 0xFFu : (1u << left) - 1u;
        uint32_t p[BITS];
        quantize8<BITS, false>(v, beta1, levels, p);
        for (int b = 0; b < BITS; ++b) planes[b] |= (uint64_t)(p[b] & keep) << (8 * g);
      }
      for (int b = 0; b < BITS; ++b) out[b * words + full_words] = planes[b];
    }
  }
}

template <int BITS>
void quantize_codes_bits(const QuantizeJob& j, int64_t begin, int64_t end) {
  __m256 levels[BITS];
  quantize_levels<BITS>(j, levels);
  const __m256 beta1 = _mm256_set1_ps(j.beta1);
  uint32_t p[BITS];
  int64_t i = begin;
  for (; i + 8 <= end; i += 8) {
    const __m256i k = quantize8<BITS, true>(_mm256_loadu_ps(j.x + i), beta1, levels, p);
    // int32 0..15 -> bytes: the saturating packs work per 128-bit half, so lanes 0-3 and
    // 4-7 land in the low 4 bytes of either half.
    __m256i bytes = _mm256_packus_epi32(k, k);
    bytes = _mm256_packus_epi16(bytes, bytes);
    const uint64_t lo = (uint32_t)_mm_cvtsi128_si32(_mm256_castsi256_si128(bytes));
    const uint64_t hi = (uint32_t)_mm_cvtsi128_si32(_mm256_extracti128_si256(bytes, 1));
    const uint64_t packed = lo | hi << 32;
    __builtin_memcpy(j.out_codes + i, &packed, 8);
  }
  if (i < end) {
    const int left = (int)(end - i);
    const __m256i k = quantize8<BITS, true>(_mm256_maskload_ps(j.x + i, lanes_below(left)), beta1, levels, p);
    alignas(32) int32_t codes[8];
    _mm256_store_si256((__m256i*)codes, k);
    for (int l = 0; l < left; ++l) j.out_codes[i + l] = (uint8_t)codes[l];
  }
}

void quantize_and_pack_avx2(const QuantizeJob& j, int64_t begin, int64_t end) {
  switch (j.bits) {
    case 1: quantize_and_pack_bits<1>(j, begin, end); break;
    case 2: quantize_and_pack_bits<2>(j, begin, end); break;
    case 3: quantize_and_pack_bits<3>(j, begin, end); break;
    case 4: quantize_and_pack_bits<4>(j, begin, end); break;
    default: break;  // validated by the dispatcher
  }
}

void quantize_codes_avx2(const QuantizeJob& j, int64_t begin, int64_t end) {
  switch (j.bits) {
    case 1: quantize_codes_bits<1>(j, begin, end); break;
    case 2: quantize_codes_bits<2>(j, begin, end); break;
    case 3: quantize_codes_bits<3>(j, begin, end); break;
    case 4: quantize_codes_bits<4>(j, begin, end); break;
    default: break;
  }
}

KernelTable make_avx2_table() {
  KernelTable table = make_kernel_table<Ops>("avx2");
  table.quantize_codes = &quantize_codes_avx2;
  table.quantize_and_pack = &quantize_and_pack_avx2;
  return table;
}

}  // namespace

const KernelTable* avx2_kernels() {
  static const KernelTable table = make_avx2_table();
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
