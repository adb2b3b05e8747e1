// The AVX-512 activation quantizer shared by the quantize kernels (isa_avx512.cc) and the AMX
// conv's fused output stage (isa_amx.cc). Include inside an anonymous namespace (each file gets its
// own copy, compiled with that file's target options), after <immintrin.h> and kernel_table.h.
//
// 16 channels per vector, a binary search over the sorted threshold table (kernel_table.h):
// bit b of the code is s > T[code_above_b + 2^b - 1], and the comparison's 16-bit mask is that
// group's 16 bits of bit plane b, ready to store. The top level's threshold is one value; the
// second level's is one of two, picked by a blend on the top level's mask; below that, level b's
// table is T shifted down by 2^b - 1, so VPERMPS with the partial code as the index fetches every
// lane's threshold. The compares (to a mask register) and VPERMPS both need port 5 on Intel
// cores, VBLENDMPS does not: per 16 channels at 4 bits, 4 compares and 2 permutes on port 5
// (with a permute at the second level too, the quantizer measured 6%, 14% and 12% slower at 4, 3
// and 2 bits on the AMX Xeon).

// Vectors quantize_levels fills: one per level, and the second level's other candidate.
template <int BITS>
constexpr int kQuantizeLevels = BITS + 1;

template <int BITS>
inline void quantize_levels(const QuantizeJob& j, __m512* levels) {
  const auto threshold = [&](int index) { return j.thresholds[index < kThresholdTable ? index : kThresholdTable - 1]; };
  for (int b = 0; b + 2 < BITS; ++b) {  // the permute tables; the top two levels are broadcasts
    // Lane i: T[i + 2^b - 1], clamped into the table (lanes past it are never indexed).
    float table[16];
    for (int i = 0; i < 16; ++i) table[i] = threshold(i + (1 << b) - 1);
    levels[b] = _mm512_loadu_ps(table);
  }
  levels[BITS - 1] = _mm512_set1_ps(threshold((1 << (BITS - 1)) - 1));  // code 0 above it
  if constexpr (BITS >= 2) {
    // The second level's thresholds for code 0 and code 2^(BITS-1) above it.
    levels[BITS - 2] = _mm512_set1_ps(threshold((1 << (BITS - 2)) - 1));
    levels[BITS] = _mm512_set1_ps(threshold((1 << (BITS - 1)) + (1 << (BITS - 2)) - 1));
  }
}

// Level b's thresholds for each lane, given the partial code and the top level's mask.
template <int BITS>
inline __m512 level_thresholds(int b, __m512i code, __mmask16 top, const __m512* levels) {
  if (b == BITS - 1) return levels[b];
  if (b == BITS - 2) return _mm512_mask_blend_ps(top, levels[b], levels[BITS]);
  return _mm512_permutexvar_ps(code, levels[b]);
}

// Whether level b's bit must go into the code: for CODES, or for a permute below it.
template <int BITS, bool CODES>
constexpr bool keeps_code_bit(int b) { return CODES || (b > 0 && BITS >= 3); }

// Codes of the 16 values x (lanes outside `valid` get no plane bits); planes[b]: bit plane b.
// The code is returned complete only with CODES.
template <int BITS, bool CODES>
inline __m512i quantize16(__m512 x, __m512 beta1, const __m512* levels, __mmask16 valid, __mmask16* planes) {
  const __m512 scaled = _mm512_mul_ps(x, beta1);
  __m512i code = _mm512_setzero_si512();
  __mmask16 top = 0;
  for (int b = BITS - 1; b >= 0; --b) {
    const __m512 t = level_thresholds<BITS>(b, code, top, levels);
    // Ordered, non-signaling >: false for a NaN, like the scalar comparison.
    const __mmask16 m = _mm512_mask_cmp_ps_mask(valid, scaled, t, _CMP_GT_OQ);
    planes[b] = m;
    if (b == BITS - 1) top = m;
    if (keeps_code_bit<BITS, CODES>(b)) code = _mm512_mask_add_epi32(code, m, code, _mm512_set1_epi32(1 << b));
  }
  return code;
}
