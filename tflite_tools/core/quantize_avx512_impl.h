// The AVX-512 activation quantizer shared by the quantize kernels (isa_avx512.cc) and the AMX
// conv's fused output stage (isa_amx.cc). Include inside an anonymous namespace (each file gets its
// own copy, compiled with that file's target options), after <immintrin.h> and kernel_table.h.
//
// 16 channels per vector, a binary search over the sorted threshold table (kernel_table.h):
// bit b of the code is s > T[code_above_b + 2^b - 1]. Level b's table is T shifted down by
// 2^b - 1, so VPERMPS with the partial code as the index fetches every lane's threshold,
// and the comparison's 16-bit mask is that group's 16 bits of bit plane b, ready to store.
// Per 16 channels: 1 multiply, `bits` compares, bits - 1 permutes and masked adds (the
// scalar path compared every value with all 2^bits - 1 thresholds).

template <int BITS>
inline void quantize_levels(const QuantizeJob& j, __m512* levels) {
  for (int b = 0; b < BITS; ++b) {
    // Lane i: T[i + 2^b - 1], clamped into the table (lanes past it are never indexed);
    // the top level sees code 0 only, so its threshold is broadcast.
    float table[16];
    for (int i = 0; i < 16; ++i) {
      const int index = (b == BITS - 1 ? 0 : i) + (1 << b) - 1;
      table[i] = j.thresholds[index < kThresholdTable ? index : kThresholdTable - 1];
    }
    levels[b] = _mm512_loadu_ps(table);
  }
}

// Codes of the 16 values x (lanes outside `valid` get no plane bits); planes[b]: bit plane b.
template <int BITS, bool CODES>
inline __m512i quantize16(__m512 x, __m512 beta1, const __m512* levels, __mmask16 valid, __mmask16* planes) {
  const __m512 scaled = _mm512_mul_ps(x, beta1);
  __m512i code = _mm512_setzero_si512();
  for (int b = BITS - 1; b >= 0; --b) {
    const __m512 t = b == BITS - 1 ? levels[b] : _mm512_permutexvar_ps(code, levels[b]);
    // Ordered, non-signaling >: false for a NaN, like the scalar comparison.
    const __mmask16 m = _mm512_mask_cmp_ps_mask(valid, scaled, t, _CMP_GT_OQ);
    planes[b] = m;
    if (CODES || b > 0) code = _mm512_mask_add_epi32(code, m, code, _mm512_set1_epi32(1 << b));
  }
  return code;
}
