// NEON path (aarch64, where Advanced SIMD is always present): vcntq_u8 counts bytes,
// pairwise widening adds fold them into two 64-bit lanes.
#if defined(__aarch64__)
#include <arm_neon.h>
#include <stdint.h>

#include "kernel_table.h"

namespace n2uq_core {
namespace {

struct Ops {
  static constexpr int kLanes = 2;
  static constexpr int kAccumulatorBudget = 24;  // of 32 q registers
  typedef uint64x2_t V;
  static inline uint64_t popcount64(uint64_t v) { return (uint64_t)__builtin_popcountll(v); }
  static inline V zero() { return vdupq_n_u64(0); }
  static inline V load(const uint64_t* p) { return vld1q_u64(p); }
  static inline V and_broadcast(V a, uint64_t w) { return vandq_u64(a, vdupq_n_u64(w)); }
  static inline V popcount(V a) {
    return vpaddlq_u32(vpaddlq_u16(vpaddlq_u8(vcntq_u8(vreinterpretq_u8_u64(a)))));
  }
  static inline V add(V a, V b) { return vaddq_u64(a, b); }
  static inline void store(uint64_t* p, V v) { vst1q_u64(p, v); }
};

#include "kernels_impl.h"

// ---------------------------------------------------------------- quantize (and pack)
//
// 4 channels per vector, the binary search of the AVX2 path (isa_avx2.cc): before level b,
// k = code >> (b+1) is 0..7 and level b's 8-float table L_b[k] = T[k * 2^(b+1) + 2^b - 1]
// is read with one TBL over its 32 bytes (byte indices 4k .. 4k + 3 per lane). The
// comparison (all ones where s > t, false for a NaN) gives plane b's 4 bits and k = 2k + bit.

template <int BITS>
inline void quantize_levels(const QuantizeJob& j, uint8x16x2_t* levels) {
  for (int b = 0; b < BITS; ++b) {
    float table[8];
    for (int k = 0; k < 8; ++k) {
      const int index = (k << (b + 1)) + (1 << b) - 1;  // past the table: never indexed
      table[k] = j.thresholds[index < kThresholdTable ? index : kThresholdTable - 1];
    }
    levels[b].val[0] = vreinterpretq_u8_f32(vld1q_f32(table));
    levels[b].val[1] = vreinterpretq_u8_f32(vld1q_f32(table + 4));
  }
}

// k = the codes of the 4 values x; planes[b]: their bits of plane b (bit l = lane l).
template <int BITS, bool CODES>
inline uint32x4_t quantize4(float32x4_t x, float32x4_t beta1, const uint8x16x2_t* levels, uint32_t* planes) {
  const float32x4_t scaled = vmulq_f32(x, beta1);
  const uint32x4_t lane_bits = {1, 2, 4, 8};
  const uint32x4_t byte_offsets = vdupq_n_u32(0x03020100u);
  uint32x4_t k = vdupq_n_u32(0);
  for (int b = BITS - 1; b >= 0; --b) {
    const uint8x16_t index = vreinterpretq_u8_u32(vmlaq_n_u32(byte_offsets, k, 0x04040404u));
    const float32x4_t t = vreinterpretq_f32_u8(vqtbl2q_u8(levels[b], index));
    const uint32x4_t m = vcgtq_f32(scaled, t);
    planes[b] = vaddvq_u32(vandq_u32(m, lane_bits));
    if (CODES || b > 0) k = vsubq_u32(vaddq_u32(k, k), m);
  }
  return k;
}

template <int BITS>
void quantize_and_pack_bits(const QuantizeJob& j, int64_t begin, int64_t end) {
  uint8x16x2_t levels[BITS];
  quantize_levels<BITS>(j, levels);
  const float32x4_t beta1 = vdupq_n_f32(j.beta1);
  const int64_t channels = j.channels, words = j.words;
  for (int64_t pos = begin; pos < end; ++pos) {
    const float* x = j.x + pos * channels;
    uint64_t* out = j.out_packed + pos * BITS * words;
    for (int64_t w = 0; w < words; ++w) {
      const int64_t c0 = w * 64;
      const int count = channels - c0 < 64 ? (int)(channels - c0) : 64;
      uint64_t planes[BITS] = {};
      int c = 0;
      for (; c + 4 <= count; c += 4) {
        uint32_t p[BITS];
        quantize4<BITS, false>(vld1q_f32(x + c0 + c), beta1, levels, p);
        for (int b = 0; b < BITS; ++b) planes[b] |= (uint64_t)p[b] << c;
      }
      if (c < count) {  // 1-3 channels left: zero-padded copy, bits past the channels cleared
        float tail[4] = {0.f, 0.f, 0.f, 0.f};
        for (int l = 0; l < count - c; ++l) tail[l] = x[c0 + c + l];
        uint32_t p[BITS];
        quantize4<BITS, false>(vld1q_f32(tail), beta1, levels, p);
        const uint32_t keep = (1u << (count - c)) - 1u;
        for (int b = 0; b < BITS; ++b) planes[b] |= (uint64_t)(p[b] & keep) << c;
      }
      for (int b = 0; b < BITS; ++b) out[b * words + w] = planes[b];
    }
  }
}

template <int BITS>
void quantize_codes_bits(const QuantizeJob& j, int64_t begin, int64_t end) {
  uint8x16x2_t levels[BITS];
  quantize_levels<BITS>(j, levels);
  const float32x4_t beta1 = vdupq_n_f32(j.beta1);
  uint32_t p[BITS];
  uint32_t codes[4];
  for (int64_t i = begin; i < end; i += 4) {
    const int left = end - i < 4 ? (int)(end - i) : 4;
    float values[4] = {0.f, 0.f, 0.f, 0.f};
    for (int l = 0; l < left; ++l) values[l] = j.x[i + l];
    vst1q_u32(codes, quantize4<BITS, true>(vld1q_f32(values), beta1, levels, p));
    for (int l = 0; l < left; ++l) j.out_codes[i + l] = (uint8_t)codes[l];
  }
}

void quantize_and_pack_neon(const QuantizeJob& j, int64_t begin, int64_t end) {
  switch (j.bits) {
    case 1: quantize_and_pack_bits<1>(j, begin, end); break;
    case 2: quantize_and_pack_bits<2>(j, begin, end); break;
    case 3: quantize_and_pack_bits<3>(j, begin, end); break;
    case 4: quantize_and_pack_bits<4>(j, begin, end); break;
    default: break;  // validated by the dispatcher
  }
}

void quantize_codes_neon(const QuantizeJob& j, int64_t begin, int64_t end) {
  switch (j.bits) {
    case 1: quantize_codes_bits<1>(j, begin, end); break;
    case 2: quantize_codes_bits<2>(j, begin, end); break;
    case 3: quantize_codes_bits<3>(j, begin, end); break;
    case 4: quantize_codes_bits<4>(j, begin, end); break;
    default: break;
  }
}

KernelTable make_neon_table() {
  KernelTable table = make_kernel_table<Ops>("neon");
  table.quantize_codes = &quantize_codes_neon;
  table.quantize_and_pack = &quantize_and_pack_neon;
  return table;
}

}  // namespace

const KernelTable* neon_kernels() {
  static const KernelTable table = make_neon_table();
  return &table;
}

}  // namespace n2uq_core

// ---------------------------------------------------------------- dot path (SDOT)
//
// ARMv8.2 dot product (FEAT_DotProd, optional before ARMv8.4): these functions alone are
// compiled for it, and core.cc calls in only when HWCAP reports asimddp.
#pragma GCC push_options
#pragma GCC target("arch=armv8.2-a+dotprod")

namespace n2uq_core {
namespace {
namespace neon_dot {

// 4 output channels per vector, 4 vectors per work item; P * R accumulators + R weights +
// the broadcast in 32 q registers. Codes (<= 15) and Winograd V8 (<= 90) are valid int8,
// so SDOT (s8 x s8) serves.
struct DotOps {
  static constexpr int kLanes = 4;
  static constexpr int kBlocksPerChunk = 4;
  static constexpr int max_pixels(int r) { return r >= 4 ? 6 : r == 3 ? 8 : r == 2 ? 12 : 16; }
  typedef int32x4_t Acc;
  typedef int8x16_t Wv;
  typedef int8x16_t Av;
  static inline Acc zero() { return vdupq_n_s32(0); }
  static inline Wv load_weights(const int8_t* p) { return vld1q_s8(p); }
  static inline Av broadcast4(const uint8_t* p) {
    uint32_t quad;
    __builtin_memcpy(&quad, p, 4);
    return vreinterpretq_s8_u32(vdupq_n_u32(quad));
  }
  static inline Acc dot(Acc acc, Av a, Wv w) { return vdotq_s32(acc, a, w); }
  struct Out {
    const ConvJob* j;
    int64_t oc0;
    int valid;
  };
  static inline Out out(const ConvJob& j, int64_t oc0, int valid) { return Out{&j, oc0, valid}; }
  static inline void store(const Out& o, int64_t index, Acc acc) {
    const ConvJob& j = *o.j;
    const int64_t oc0 = o.oc0;
    const int valid = o.valid;
    int32_t lanes[4];
    vst1q_s32(lanes, acc);
    if (valid == 4) {
      if (j.out_int32) vst1q_s32(j.out_int32 + index, acc);
      if (j.out_float) {
        const float32x4_t product = vmulq_f32(vcvtq_f32_s32(acc), vld1q_f32(j.multiplier + oc0));
        vst1q_f32(j.out_float + index, vaddq_f32(product, vld1q_f32(j.bias + oc0)));
      }
      return;
    }
    for (int l = 0; l < valid; ++l) {
      if (j.out_int32) j.out_int32[index + l] = lanes[l];
      if (j.out_float) j.out_float[index + l] = (float)lanes[l] * j.multiplier[oc0 + l] + j.bias[oc0 + l];
    }
  }
  // Per 8 channels: the plane's byte in 8 lanes, each lane tests its bit (VTST), 2^p kept.
  static inline void codes64(const uint64_t* planes, int64_t words, int act_bits, uint64_t tail, uint8_t* out) {
    const uint8x8_t select = {1, 2, 4, 8, 16, 32, 64, 128};
    uint8x8_t codes[8];
    for (int b = 0; b < 8; ++b) codes[b] = vdup_n_u8(0);
    for (int p = 0; p < act_bits; ++p) {
      const uint64_t bits = planes[p * words] & tail;
      const uint8x8_t weight = vdup_n_u8((uint8_t)(1u << p));
      for (int b = 0; b < 8; ++b)
        codes[b] = vorr_u8(codes[b], vand_u8(vtst_u8(vdup_n_u8((uint8_t)(bits >> (8 * b))), select), weight));
    }
    for (int b = 0; b < 8; ++b) vst1_u8(out + 8 * b, codes[b]);
  }
};

#include "dot_impl.h"

}  // namespace neon_dot
}  // namespace

const PathKernels* neon_dot_kernels() {
  static const PathKernels kernels = neon_dot::make_dot_kernels_wino<neon_dot::DotOps>("neon sdot");
  return &kernels;
}

}  // namespace n2uq_core

#pragma GCC pop_options

#else

#include "kernel_table.h"
namespace n2uq_core {
const KernelTable* neon_kernels() { return nullptr; }
const PathKernels* neon_dot_kernels() { return nullptr; }
}  // namespace n2uq_core

#endif
