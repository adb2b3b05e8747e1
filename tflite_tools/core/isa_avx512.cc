// AVX-512 path: VPOPCNTQ counts each 64-bit lane directly, so the inner loop is
// AND (with an embedded weight broadcast) + VPOPCNTQ + VPADDQ. Target options apply to
// this file only; the dispatcher calls in only when the CPU has avx512f/bw/vpopcntdq.
#if defined(__x86_64__)
#include <immintrin.h>
#include <stdint.h>

#include "kernel_table.h"

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx512vpopcntdq,avx512bw,popcnt"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx512f,avx512vpopcntdq,avx512bw,popcnt")
#endif

namespace n2uq_core {
namespace {

struct Ops {
  static constexpr int kLanes = 8;
  static constexpr int kAccumulatorBudget = 24;  // of 32 zmm registers
  typedef __m512i V;
  static inline uint64_t popcount64(uint64_t v) { return (uint64_t)__builtin_popcountll(v); }
  static inline V zero() { return _mm512_setzero_si512(); }
  static inline V load(const uint64_t* p) { return _mm512_loadu_si512((const void*)p); }
  static inline V and_broadcast(V a, uint64_t w) { return _mm512_and_si512(a, _mm512_set1_epi64((long long)w)); }
  static inline V popcount(V a) { return _mm512_popcnt_epi64(a); }
  static inline V add(V a, V b) { return _mm512_add_epi64(a, b); }
  static inline void store(uint64_t* p, V v) { _mm512_storeu_si512((void*)p, v); }
};

#include "kernels_impl.h"

// ---------------------------------------------------------------- channel-lane conv
//
// Vector lanes are kGroupLanes = 8 consecutive output channels; the activation word of
// one pixel is broadcast. For each tap and channel word the weight bit planes of the
// group are WB vector loads reused by P pixels x A planes, and the inner step is the
// same AND + VPOPCNTQ + VPADDQ as the pixel-lane kernel. What this layout buys: every
// lane is a real output channel (no lanes wasted on a row of 7, 14 or 28 pixels), one
// weight pointer walks sequentially, and the epilogue stores 8 or 16 channels of a pixel
// contiguously instead of transposing scalars, which dominated at C = 64 (one word per tap).
// Carry-save (Harley-Seal) accumulation was not used: on this core VPOPCNTQ + VPADDQ is
// 2 ops per AND result and a carry-save adder is 2 VPTERNLOGQ per AND result saved, so it
// cannot cut the op count (it pays off only where popcount is many ops, e.g. AVX2).

// [OC][KH][KW][WB][words] -> [group][KH][KW][words][WB][lane], zeros past OC. Per
// (tap, plane) the group's 8 channels x 8 consecutive words are one 8x8 transpose
// (24 shuffles); a scalar loop takes word tails and the last, partial group.
void group_weights(const ConvJob& j, uint64_t* grouped, int64_t g) {
  const int64_t words = j.words, wb = j.weight_bits, taps = (int64_t)j.kernel_height * j.kernel_width;
  const int64_t tap_in = wb * words, per_channel = taps * tap_in;
  uint64_t* dst = grouped + g * per_channel * kGroupLanes;
  const uint64_t* src = j.weights + g * kGroupLanes * per_channel;
  const bool full = (g + 1) * kGroupLanes <= j.out_channels;
  const int64_t vector_words = full ? words / 8 * 8 : 0;
  const __m512i lo_idx = _mm512_setr_epi64(0, 1, 8, 9, 4, 5, 12, 13), hi_idx = _mm512_setr_epi64(2, 3, 10, 11, 6, 7, 14, 15);
  const __m512i half_lo = _mm512_setr_epi64(0, 1, 2, 3, 8, 9, 10, 11), half_hi = _mm512_setr_epi64(4, 5, 6, 7, 12, 13, 14, 15);
  for (int64_t t = 0; t < taps; ++t)
    for (int64_t b = 0; b < wb; ++b) {
      const int64_t in_offset = t * tap_in + b * words;
      for (int64_t c = 0; c < vector_words; c += 8) {
        __m512i r[8], u[8], s[8];
        for (int l = 0; l < 8; ++l) r[l] = _mm512_loadu_si512((const void*)(src + l * per_channel + in_offset + c));
        for (int l = 0; l < 8; l += 2) {  // u[l]: words 0,2,4,6 of rows l, l+1; u[l+1]: words 1,3,5,7
          u[l] = _mm512_unpacklo_epi64(r[l], r[l + 1]);
          u[l + 1] = _mm512_unpackhi_epi64(r[l], r[l + 1]);
        }
        for (int e = 0; e < 2; ++e) {  // e = 0: even words, 1: odd words
          s[4 * e + 0] = _mm512_permutex2var_epi64(u[e], lo_idx, u[2 + e]);      // words 0|4 (+e), rows 0-3
          s[4 * e + 1] = _mm512_permutex2var_epi64(u[e], hi_idx, u[2 + e]);      // words 2|6 (+e), rows 0-3
          s[4 * e + 2] = _mm512_permutex2var_epi64(u[4 + e], lo_idx, u[6 + e]);  // rows 4-7
          s[4 * e + 3] = _mm512_permutex2var_epi64(u[4 + e], hi_idx, u[6 + e]);
        }
        for (int e = 0; e < 2; ++e) {
          const __m512i w0 = _mm512_permutex2var_epi64(s[4 * e], half_lo, s[4 * e + 2]);
          const __m512i w4 = _mm512_permutex2var_epi64(s[4 * e], half_hi, s[4 * e + 2]);
          const __m512i w2 = _mm512_permutex2var_epi64(s[4 * e + 1], half_lo, s[4 * e + 3]);
          const __m512i w6 = _mm512_permutex2var_epi64(s[4 * e + 1], half_hi, s[4 * e + 3]);
          const int64_t word[4] = {c + e, c + 4 + e, c + 2 + e, c + 6 + e};
          const __m512i v[4] = {w0, w4, w2, w6};
          for (int k = 0; k < 4; ++k)
            _mm512_storeu_si512((void*)(dst + ((t * words + word[k]) * wb + b) * kGroupLanes), v[k]);
        }
      }
      for (int64_t c = vector_words; c < words; ++c)
        for (int64_t l = 0; l < kGroupLanes; ++l)
          dst[((t * words + c) * wb + b) * kGroupLanes + l] =
              g * kGroupLanes + l < j.out_channels ? src[l * per_channel + in_offset + c] : 0;
    }
}

// P output pixels (ow0 ..) x one channel group of output row (n, oh).
template <int A, int WB, int P, int G>
inline void group_block(const ConvJob& j, int64_t n, int64_t oh, int64_t g, int64_t ow0,
                        const int32_t* sums /* S_m of pixels ow0 .. ow0 + P - 1 */) {
  constexpr int S = A + WB - 1;
  __m512i acc[P][G][S];
  for (int p = 0; p < P; ++p)
    for (int h = 0; h < G; ++h)
      for (int s = 0; s < S; ++s) acc[p][h][s] = _mm512_setzero_si512();
  // Staged rows (conv_stage_rows): [stride phase][A][words][stage_width], so pixel p of a
  // tap is word p of the tap's base (an immediate offset) and the planes are A pointers.
  const int64_t words = j.words, width = j.stage_width, plane = words * width;
  const int64_t row_stride = (int64_t)j.stride_width * A * plane;  // one input row of the stage
  const int64_t tap_words = words * WB * kGroupLanes;
  const int64_t group_stride = (int64_t)j.kernel_height * j.kernel_width * tap_words;
  // Rows outside the input are zero padding (m = 0 adds nothing): only kernel rows
  // [kh_begin, kh_end) are visited. Their (tap, word) steps are one flat run of
  // tap_offsets, and the weights are stored in the same order, WB * 8 words per step.
  const int64_t ih0 = oh * j.stride_height - j.pad_top, dh = j.dilation_height;
  const int64_t kh_begin = ih0 >= 0 ? 0 : (-ih0 + dh - 1) / dh;
  int64_t kh_end = j.in_height - 1 - ih0 < 0 ? 0 : (j.in_height - 1 - ih0) / dh + 1;
  if (kh_end > j.kernel_height) kh_end = j.kernel_height;
  const int64_t steps_per_row = (int64_t)j.kernel_width * words;
  const int64_t base = (n * j.in_height + ih0) * row_stride + ow0;  // + offset >= 0 for visited rows
  const int64_t* offset = j.tap_offsets + kh_begin * steps_per_row;
  const int64_t* const offset_end = j.tap_offsets + kh_end * steps_per_row;
  const uint64_t* wt = j.group_weights + g * group_stride + kh_begin * steps_per_row * WB * kGroupLanes;
  for (; offset < offset_end; ++offset, wt += WB * kGroupLanes) {
    const uint64_t* a = j.stage + (base + *offset);
    __m512i wv[G][WB];
    for (int h = 0; h < G; ++h)
      for (int b = 0; b < WB; ++b) wv[h][b] = _mm512_loadu_si512((const void*)(wt + h * group_stride + b * kGroupLanes));
    for (int p = 0; p < P; ++p)
      for (int i = 0; i < A; ++i) {
        const __m512i av = _mm512_set1_epi64((long long)a[i * plane + p]);
        for (int h = 0; h < G; ++h)
          for (int b = 0; b < WB; ++b)
            acc[p][h][i + b] = _mm512_add_epi64(acc[p][h][i + b], _mm512_popcnt_epi64(_mm512_and_si512(av, wv[h][b])));
      }
  }
  // out = multiplier * (2 * S_mk - n_w * S_m) + bias (derivation in conv_block, kernels_impl.h),
  // S_mk = sum_s 2^s acc[s]; int32 exact, then a float multiply and a separate add (no FMA).
  const int64_t oc0 = g * kGroupLanes;
  const int valid = j.out_channels - oc0 < G * kGroupLanes ? (int)(j.out_channels - oc0) : G * kGroupLanes;
  const __mmask16 mask = (__mmask16)((1u << valid) - 1);
  const int64_t n_w = (1 << WB) - 1, out_channels = j.out_channels;
  // Locals: the output stores could alias the job as far as the compiler knows.
  float* const out_float = j.out_float;
  int32_t* const out_int32 = j.out_int32;
  const int64_t pixel0 = (n * j.out_height + oh) * j.out_width + ow0;
  __m512 multiplier = _mm512_setzero_ps(), bias = _mm512_setzero_ps();
  if (out_float) {
    multiplier = _mm512_maskz_loadu_ps(mask, j.multiplier + oc0);
    bias = _mm512_maskz_loadu_ps(mask, j.bias + oc0);
  }
  // Low dwords of both groups' qword lanes: channels oc0 .. oc0 + 15 in order.
  const __m512i low_dwords = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  for (int p = 0; p < P; ++p) {
    // 2 * S_mk per group, then the groups' low dwords side by side and one subtraction:
    // arithmetic mod 2^32 is exact because the final value fits int32 (check_accumulator).
    __m512i twice[G];
    for (int h = 0; h < G; ++h) {
      twice[h] = _mm512_slli_epi64(acc[p][h][0], 1);
      for (int s = 1; s < S; ++s) twice[h] = _mm512_add_epi64(twice[h], _mm512_slli_epi64(acc[p][h][s], (unsigned)s + 1));
    }
    const __m512i packed = G == 2 ? _mm512_permutex2var_epi32(twice[0], low_dwords, twice[G - 1])
                                  : _mm512_castsi256_si512(_mm512_cvtepi64_epi32(twice[0]));
    const __m512i as32 = _mm512_sub_epi32(packed, _mm512_set1_epi32((int32_t)(n_w * sums[p])));
    const int64_t index = (pixel0 + p) * out_channels + oc0;
    if (out_int32) _mm512_mask_storeu_epi32(out_int32 + index, mask, as32);
    if (out_float) {
      const __m512 product = _mm512_mul_ps(_mm512_cvtepi32_ps(as32), multiplier);
      _mm512_mask_storeu_ps(out_float + index, mask, _mm512_add_ps(product, bias));
    }
  }
}

// Register blocking: P pixels x G channel groups x S partial sums in 24 accumulators (of
// 32 registers; the rest hold G * WB weight vectors and the broadcast activation). Two
// groups for up to 3 sums (W1A1, W2A2, W1A3, ...): one output vector of 16 channels per
// pixel halves the epilogue per output and the per-tap overhead per MAC (measured +15-20%
// on W1A1/W2A2 at C = 64-128); no gain measured for W3A3, where blocks would shrink to 2 pixels.
constexpr int group_count(int sums) { return sums <= 3 ? 2 : 1; }
constexpr int group_pixels(int sums) { return 24 / (sums * group_count(sums)); }

typedef void (*GroupBlockFn)(const ConvJob&, int64_t, int64_t, int64_t, int64_t, const int32_t*);

template <int A, int WB, int P, int G>
struct GroupBlocks {
  static void fill(GroupBlockFn* table) {
    table[P] = &group_block<A, WB, P, G>;
    GroupBlocks<A, WB, P - 1, G>::fill(table);
  }
};
template <int A, int WB, int G>
struct GroupBlocks<A, WB, 0, G> {
  static void fill(GroupBlockFn*) {}
};

// S_m (sum of codes over the receptive field) of output pixels [begin, end) of row
// (n, oh), from the staged per-pixel sums: per tap, the range of output columns whose
// input column lies inside the row, so the inner loop has no branch.
void row_sums(const ConvJob& j, int64_t n, int64_t oh, int64_t begin, int64_t end, int32_t* out) {
  for (int64_t ow = begin; ow < end; ++ow) out[ow - begin] = 0;
  for (int64_t kh = 0; kh < j.kernel_height; ++kh) {
    const int64_t ih = oh * j.stride_height + kh * j.dilation_height - j.pad_top;
    if (ih < 0 || ih >= j.in_height) continue;
    const int32_t* row = j.pixel_sums + (n * j.in_height + ih) * j.in_width;
    for (int64_t kw = 0; kw < j.kernel_width; ++kw) {
      // iw = ow * stride + offset must lie in [0, in_width).
      const int64_t offset = kw * j.dilation_width - j.pad_left, stride = j.stride_width;
      int64_t first = offset >= 0 ? 0 : (-offset + stride - 1) / stride;
      int64_t last = j.in_width - 1 - offset < 0 ? 0 : (j.in_width - 1 - offset) / stride + 1;
      if (first < begin) first = begin;
      if (last > end) last = end;
      if (stride == 1) {  // contiguous: vectorized
        for (int64_t ow = first; ow < last; ++ow) out[ow - begin] += row[ow + offset];
      } else {
        for (int64_t ow = first; ow < last; ++ow) out[ow - begin] += row[ow * stride + offset];
      }
    }
  }
}

template <int A, int WB>
void group_item_bits(const ConvJob& j, int64_t item) {
  constexpr int S = A + WB - 1, G = group_count(S), kMax = group_pixels(S);
  constexpr int64_t kSegment = 256;  // output columns per S_m buffer
  GroupBlockFn blocks[kMax + 1], single[kMax + 1];
  GroupBlocks<A, WB, kMax, G>::fill(blocks);
  GroupBlocks<A, WB, kMax, 1>::fill(single);  // an odd last group
  const int64_t chunk = item % j.group_chunks, row = item / j.group_chunks;
  const int64_t oh = row % j.out_height, n = row / j.out_height;
  const int64_t g_end = (chunk + 1) * kGroupChunk < j.groups ? (chunk + 1) * kGroupChunk : j.groups;
  int32_t sums[kSegment];
  for (int64_t seg = 0; seg < j.out_width; seg += kSegment) {
    const int64_t seg_width = j.out_width - seg < kSegment ? j.out_width - seg : kSegment;
    row_sums(j, n, oh, seg, seg + seg_width, sums);
    // The segment in equal blocks of at most kMax pixels (7 = one block of 7, 28 = 4 x 7):
    // no lane or pixel is wasted and every block keeps as many pixels per weight load as fit.
    const int64_t count = (seg_width + kMax - 1) / kMax;
    const int64_t base = seg_width / count, longer = seg_width % count;
    for (int64_t g = chunk * kGroupChunk; g < g_end; g += G) {
      GroupBlockFn* table = g + G <= g_end ? blocks : single;
      for (int64_t b = 0, x = 0; b < count; ++b) {
        const int64_t width = base + (b < longer ? 1 : 0);
        table[width](j, n, oh, g, seg + x, sums + x);
        x += width;
      }
    }
  }
}

template <int A>
void group_item_weight_bits(const ConvJob& j, int64_t item) {
  switch (j.weight_bits) {
    case 1: group_item_bits<A, 1>(j, item); break;
    case 2: group_item_bits<A, 2>(j, item); break;
    case 3: group_item_bits<A, 3>(j, item); break;
    case 4: group_item_bits<A, 4>(j, item); break;
    default: break;  // validated by the dispatcher
  }
}

void group_item(const ConvJob& j, int64_t item) {
  switch (j.act_bits) {
    case 1: group_item_weight_bits<1>(j, item); break;
    case 2: group_item_weight_bits<2>(j, item); break;
    case 3: group_item_weight_bits<3>(j, item); break;
    case 4: group_item_weight_bits<4>(j, item); break;
    default: break;
  }
}

// ---------------------------------------------------------------- quantize (and pack)
// 16 channels per vector: quantize_levels and quantize16, shared with the AMX conv's fused stage.
#include "quantize_avx512_impl.h"

// Prefetch distance of the quantizer's float input. A layer's input that the conv before it
// pushed out of L2 came from L3 at ~30 GB/s without it (56x56x64 at 2 bits 23 us, 16 us hot);
// 16 KB ahead: 16 us (AMX Xeon). A prefetch never faults, so the last ones may reach past the end.
constexpr int kQuantizePrefetchFloats = 4096;

template <int BITS>
void quantize_and_pack_bits(const QuantizeJob& j, int64_t begin, int64_t end) {
  __m512 levels[kQuantizeLevels<BITS>];
  quantize_levels<BITS>(j, levels);
  const __m512 beta1 = _mm512_set1_ps(j.beta1);
  const int64_t channels = j.channels, words = j.words, full_words = channels / 64;
  const int rem = (int)(channels % 64);
  for (int64_t pos = begin; pos < end; ++pos) {
    const float* x = j.x + pos * channels;
    uint64_t* out = j.out_packed + pos * BITS * words;
    // Two groups of 16 at a time, level by level: two independent compare chains (a whole word's
    // four measured 21% slower at 4 bits on the AMX Xeon). Each mask is stored as its 16 bits of
    // the plane word (a KMOVW to memory).
    for (int64_t h = 0; h < 2 * full_words; ++h, x += 32) {
      char* half = reinterpret_cast<char*>(out + h / 2) + 4 * (h % 2);
      __m512 scaled[2];
      __m512i code[2];
      __mmask16 top[2] = {0, 0};
      for (int g = 0; g < 2; ++g) {
        // The address as an integer: near the end it lies past the input, which a pointer may not.
        _mm_prefetch(reinterpret_cast<const char*>(reinterpret_cast<uintptr_t>(x + 16 * g) +
                                                   kQuantizePrefetchFloats * sizeof(float)),
                     _MM_HINT_T0);
        scaled[g] = _mm512_mul_ps(_mm512_loadu_ps(x + 16 * g), beta1);
        code[g] = _mm512_setzero_si512();
      }
      for (int b = BITS - 1; b >= 0; --b) {
        for (int g = 0; g < 2; ++g) {
          const __m512 t = level_thresholds<BITS>(b, code[g], top[g], levels);
          const __mmask16 m = _mm512_cmp_ps_mask(scaled[g], t, _CMP_GT_OQ);
          if (b == BITS - 1) top[g] = m;
          if (keeps_code_bit<BITS, false>(b)) code[g] = _mm512_mask_add_epi32(code[g], m, code[g], _mm512_set1_epi32(1 << b));
          __builtin_memcpy(half + 8 * b * words + 2 * g, &m, 2);
        }
      }
    }
    if (rem > 0) {  // last, partial word: masked loads, lanes past the channels give 0 bits
      uint64_t planes[BITS] = {};
      for (int g = 0; 16 * g < rem; ++g) {
        const int left = rem - 16 * g;
        const __mmask16 valid = (__mmask16)(left >= 16 ? 0xFFFFu : (1u << left) - 1u);
        __mmask16 p[BITS];
        quantize16<BITS, false>(_mm512_maskz_loadu_ps(valid, x + 16 * g), beta1, levels, valid, p);
        for (int b = 0; b < BITS; ++b) planes[b] |= (uint64_t)p[b] << (16 * g);
      }
      for (int b = 0; b < BITS; ++b) out[b * words + full_words] = planes[b];
    }
  }
}

template <int BITS>
void quantize_codes_bits(const QuantizeJob& j, int64_t begin, int64_t end) {
  __m512 levels[kQuantizeLevels<BITS>];
  quantize_levels<BITS>(j, levels);
  const __m512 beta1 = _mm512_set1_ps(j.beta1);
  __mmask16 p[BITS];
  int64_t i = begin;
  for (; i + 16 <= end; i += 16) {
    const __m512i code = quantize16<BITS, true>(_mm512_loadu_ps(j.x + i), beta1, levels, (__mmask16)0xFFFF, p);
    _mm_storeu_si128((__m128i*)(j.out_codes + i), _mm512_cvtepi32_epi8(code));
  }
  if (i < end) {
    const __mmask16 valid = (__mmask16)((1u << (end - i)) - 1u);
    const __m512i code = quantize16<BITS, true>(_mm512_maskz_loadu_ps(valid, j.x + i), beta1, levels, valid, p);
    _mm512_mask_cvtepi32_storeu_epi8(j.out_codes + i, valid, code);
  }
}

void quantize_and_pack_avx512(const QuantizeJob& j, int64_t begin, int64_t end) {
  switch (j.bits) {
    case 1: quantize_and_pack_bits<1>(j, begin, end); break;
    case 2: quantize_and_pack_bits<2>(j, begin, end); break;
    case 3: quantize_and_pack_bits<3>(j, begin, end); break;
    case 4: quantize_and_pack_bits<4>(j, begin, end); break;
    default: break;  // validated by the dispatcher
  }
}

void quantize_codes_avx512(const QuantizeJob& j, int64_t begin, int64_t end) {
  switch (j.bits) {
    case 1: quantize_codes_bits<1>(j, begin, end); break;
    case 2: quantize_codes_bits<2>(j, begin, end); break;
    case 3: quantize_codes_bits<3>(j, begin, end); break;
    case 4: quantize_codes_bits<4>(j, begin, end); break;
    default: break;
  }
}

KernelTable make_avx512_table() {
  KernelTable table = make_kernel_table<Ops>("avx512");
  table.conv_group_weights = &group_weights;
  table.conv_group_item = &group_item;
  table.quantize_codes = &quantize_codes_avx512;
  table.quantize_and_pack = &quantize_and_pack_avx512;
  return table;
}

}  // namespace

const KernelTable* avx512_kernels() {
  static const KernelTable table = make_avx512_table();
  return &table;
}

}  // namespace n2uq_core

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

#else  // not x86-64

#include "kernel_table.h"
namespace n2uq_core {
const KernelTable* avx512_kernels() { return nullptr; }
}  // namespace n2uq_core

#endif
