// AVX-512 byte-code paths: the dot path on VPDPBUSD (AVX-512 VNNI) and the LUT path on
// VPERMI2B (AVX-512 VBMI). Each part has its own target options (this file only, no
// -march), and core.cc calls in only when the CPU and OS report those features.
#if defined(__x86_64__)
#include <immintrin.h>
#include <stdint.h>

#include "kernel_table.h"

// ---------------------------------------------------------------- dot path (VNNI)

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512vnni")
#endif

namespace n2uq_core {
namespace {
namespace avx512_dot {

// 16 output channels per vector (one int32 lane each), up to 4 vectors per work item (the
// plan picks R, core.cc dot_chunk_blocks); register blocks of P pixels x R vectors: P * R
// accumulators + R weights <= 31 of 32 zmm.
// VPDPBUSD multiplies the broadcast activation quad (unsigned) by the weight quads (signed).
struct DotOps {
  static constexpr int kLanes = 16;
  static constexpr int kBlocksPerChunk = 4;
  static constexpr int max_pixels(int r) { return r >= 4 ? 6 : r == 3 ? 8 : r == 2 ? 12 : 16; }
  typedef __m512i Acc;
  typedef __m512i Wv;
  typedef __m512i Av;
  static inline Acc zero() { return _mm512_setzero_si512(); }
  static inline Wv load_weights(const int8_t* p) { return _mm512_loadu_si512((const void*)p); }
  static inline Av broadcast4(const uint8_t* p) {
    int32_t quad;
    __builtin_memcpy(&quad, p, 4);
    return _mm512_set1_epi32(quad);
  }
  static inline Acc dot(Acc acc, Av a, Wv w) { return _mm512_dpbusd_epi32(acc, a, w); }
  static inline void store(const ConvJob& j, int64_t index, int64_t oc0, Acc acc, int valid) {
    const __mmask16 mask = (__mmask16)(valid >= 16 ? 0xFFFFu : (1u << valid) - 1u);
    if (j.out_int32) _mm512_mask_storeu_epi32(j.out_int32 + index, mask, acc);
    if (j.out_float) {
      const __m512 product = _mm512_mul_ps(_mm512_cvtepi32_ps(acc), _mm512_maskz_loadu_ps(mask, j.multiplier + oc0));
      _mm512_mask_storeu_ps(j.out_float + index, mask, _mm512_add_ps(product, _mm512_maskz_loadu_ps(mask, j.bias + oc0)));
    }
  }
  // Bit plane p's 64 bits select the bytes that get 2^p: one masked byte add per plane.
  static inline void codes64(const uint64_t* planes, int64_t words, int act_bits, uint64_t tail, uint8_t* out) {
    __m512i codes = _mm512_setzero_si512();
    for (int p = 0; p < act_bits; ++p)
      codes = _mm512_mask_add_epi8(codes, (__mmask64)(planes[p * words] & tail), codes, _mm512_set1_epi8((char)(1 << p)));
    _mm512_storeu_si512((void*)out, codes);
  }
};

#include "dot_impl.h"

}  // namespace avx512_dot
}  // namespace

const PathKernels* avx512_dot_kernels() {
  static const PathKernels kernels = avx512_dot::make_dot_kernels<avx512_dot::DotOps>("avx512 vnni dot");
  return &kernels;
}

}  // namespace n2uq_core

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

// ---------------------------------------------------------------- LUT path (VBMI)
//
// T-MAC-style table lookups, with the table over the activations: for every input pixel and
// group of kLutGroup = 6 channels, T[s] = sum_{i in s} m_i for the 64 subsets s (one zmm;
// <= 6 * 15 = 90, a byte). Lane l of a weight index vector holds the bits of plane j of six
// weight codes, so VPERMB(index, T) gives, in every lane at once, sum_i m_i k_ij over six
// channels: 64 lanes x 6 channels x (a-bit activation x 1-bit weight) per instruction, with
// the table as a memory operand. Lanes are (output channel, weight plane): 16 channels x 4
// planes for weight_bits 3-4, 32 x 2 for 1-2.
//
// Lookups accumulate in bytes for K = floor(255 / (6 (2^a - 1))) steps (2 at a = 4, 14 at
// a = 2), then widen with the plane weights 2^j: VPDPBUSD with bytes (1, 2, 4, 8) into int32
// per channel (4 planes), or VPMADDUBSW with (1, 2) into 16-bit per channel (2 planes; the
// 16-bit sums are moved to int32 before they could pass 65535). That gives S_mk; the output
// is 2 S_mk - n_w S_m with S_m from the pixels' code sums, as in the bit-serial path.
//
// Work item: a band of output rows of one image. Its thread builds the tables of the input
// rows the band reads into a ring (kernel_table.h), each row once per band, and runs every
// output-channel chunk on them while they are in cache.

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,avx512vbmi"))), \
                             apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512vnni,avx512vbmi")
#endif

namespace n2uq_core {
namespace {
namespace avx512_lut {


// Ring row layout: tables [phase][group][column][64] (padded column c = column * stride +
// phase, so the P pixels of a register block are P consecutive tables: offsets 64p), then
// the code sum of every padded column (int32, zero in the padding), padded to 64 bytes.
inline int64_t table_columns(const ConvJob& j) { return (j.padded_width + j.stride_width - 1) / j.stride_width; }
inline int64_t group_stride(const ConvJob& j) { return table_columns(j) * kLutTable; }
inline int64_t phase_stride(const ConvJob& j) { return group_stride(j) * j.lut_groups; }
inline int64_t sums_offset(const ConvJob& j) { return phase_stride(j) * j.stride_width; }
inline int64_t row_bytes(const ConvJob& j) { return sums_offset(j) + (j.padded_width * 4 + 63) / 64 * 64; }
inline int64_t header_bytes(const ConvJob& j) { return ((int64_t)j.lut_ring_rows * 8 + 63) / 64 * 64; }

// The 64-entry table of six codes: entry s adds code i where bit i of s is set.
inline __m512i table6(const uint8_t* codes) {
  const __m512i v = _mm512_castsi128_si512(_mm_loadl_epi64((const __m128i*)codes));
  static const uint64_t kBit[6] = {0xAAAAAAAAAAAAAAAAull, 0xCCCCCCCCCCCCCCCCull, 0xF0F0F0F0F0F0F0F0ull,
                                   0xFF00FF00FF00FF00ull, 0xFFFF0000FFFF0000ull, 0xFFFFFFFF00000000ull};
  __m512i t = _mm512_maskz_mov_epi8((__mmask64)kBit[0], _mm512_permutexvar_epi8(_mm512_setzero_si512(), v));
  for (int i = 1; i < 6; ++i)
    t = _mm512_mask_add_epi8(t, (__mmask64)kBit[i], t, _mm512_permutexvar_epi8(_mm512_set1_epi8((char)i), v));
  return t;
}

// Builds input row `ih` of image n into ring slot `slot` (zero tables in the padding).
void build_row(const ConvJob& j, uint8_t* ring, int64_t n, int64_t ih, int64_t slot) {
  const int64_t words = j.words, act_bits = j.act_bits, groups = j.lut_groups, stride = j.stride_width;
  const int64_t gstride = group_stride(j), pstride = phase_stride(j);
  uint8_t* row = ring + header_bytes(j) + slot * row_bytes(j);
  int32_t* sums = (int32_t*)(row + sums_offset(j));
  uint8_t* codes = ring + j.lut_thread_bytes - j.lut_code_bytes;
  const int rem = j.in_channels % 64;
  const uint64_t tail = rem == 0 ? ~0ull : ((1ull << rem) - 1);  // input bits above C are garbage
  for (int64_t c = 0; c < j.padded_width; ++c) {
    if (c >= j.pad_left && c < j.pad_left + j.in_width) continue;
    uint8_t* dst = row + (c % stride) * pstride + (c / stride) * kLutTable;
    for (int64_t g = 0; g < groups; ++g) _mm512_storeu_si512((void*)(dst + g * gstride), _mm512_setzero_si512());
    sums[c] = 0;
  }
  _mm512_storeu_si512((void*)(codes + words * 64), _mm512_setzero_si512());
  const uint64_t* src = j.input + (n * j.in_height + ih) * j.in_width * act_bits * words;
  for (int64_t x = 0; x < j.in_width; ++x, src += act_bits * words) {
    __m512i total = _mm512_setzero_si512();
    for (int64_t w = 0; w < words; ++w) {
      __m512i c = _mm512_setzero_si512();
      for (int64_t p = 0; p < act_bits; ++p)
        c = _mm512_mask_add_epi8(c, (__mmask64)(src[p * words + w] & (w == words - 1 ? tail : ~0ull)), c,
                                 _mm512_set1_epi8((char)(1 << p)));
      _mm512_storeu_si512((void*)(codes + w * 64), c);
      total = _mm512_add_epi64(total, _mm512_sad_epu8(c, _mm512_setzero_si512()));
    }
    const int64_t c = x + j.pad_left;
    uint8_t* dst = row + (c % stride) * pstride + (c / stride) * kLutTable;
    for (int64_t g = 0; g < groups; ++g)
      _mm512_storeu_si512((void*)(dst + g * gstride), table6(codes + g * kLutGroup));
    sums[c] = (int32_t)_mm512_reduce_add_epi64(total);
  }
}

struct RowContext {
  const uint8_t* base;                      // the ring's first row
  const uint8_t* rows[kLutMaxKernelRows];   // ring row of each kernel row, null outside the input
  int64_t column[kLutMaxKernelRows];        // offset of kernel column kw's table at output column 0
};

// Epilogue of one register block: out = 2 S_mk - n_w S_m (derivation in kernels_impl.h),
// int32 exact, then the float affine map; smk[i] holds 16 channels from oc0 + 16 i.
inline void store16(const ConvJob& j, int64_t index, int64_t oc0, __m512i smk, int32_t correction) {
  if (oc0 >= j.out_channels) return;
  const __m512i value = _mm512_sub_epi32(_mm512_slli_epi32(smk, 1), _mm512_set1_epi32(correction));
  const int64_t left = j.out_channels - oc0;
  const __mmask16 mask = (__mmask16)(left >= 16 ? 0xFFFFu : (1u << left) - 1u);
  if (j.out_int32) _mm512_mask_storeu_epi32(j.out_int32 + index + oc0, mask, value);
  if (j.out_float) {
    const __m512 product = _mm512_mul_ps(_mm512_cvtepi32_ps(value), _mm512_maskz_loadu_ps(mask, j.multiplier + oc0));
    _mm512_mask_storeu_ps(j.out_float + index + oc0, mask, _mm512_add_ps(product, _mm512_maskz_loadu_ps(mask, j.bias + oc0)));
  }
}

// S_m of output pixel ow0 + p: the code sums of the pixels its taps read.
inline int32_t code_sum(const ConvJob& j, const RowContext& ctx, int64_t ow) {
  int32_t total = 0;
  for (int64_t kh = 0; kh < j.kernel_height; ++kh) {
    const uint8_t* row = ctx.rows[kh];
    if (row == nullptr) continue;
    const int32_t* sums = (const int32_t*)(row + sums_offset(j));
    for (int64_t kw = 0; kw < j.kernel_width; ++kw) total += sums[ow * j.stride_width + kw * j.dilation_width];
  }
  return total;
}

// Where a register block's sums go between channel-group blocks: int32 [P][pitch], the
// chunk's channels from column oc_chunk (see lut_row).
struct Tile {
  int32_t* sums;
  int64_t pitch;
  bool first, last;  // first group block: start from zero; last: write the outputs
};

// One (tap, channel group) of a register block: its pixel 0's table (offset from the ring
// row base of the block's first output column) and its index vectors' step number.
struct Step {
  int64_t table, index;
};

// One register block: P output pixels x R index vectors of one chunk over `steps` (taps x
// channel groups), JW weight planes per output channel in the lanes (2 or 4). Lookups go in
// pairs: two byte results (<= 2 * 90 = 180), one add, one widening with the plane weights,
// all per (pixel, vector) back to back, so only the wide sums stay live (P * R + 2R + 3
// registers). Measured on Zen 5: keeping byte sums for more steps (K = 6 at 3 bits, 14 at
// 2) needs P * R more registers and spilled; the tables as memory operands of VPERMB and
// the 2R index vectors in registers balance the loads (1 + 1/P per lookup).
template <int JW, int P, int R>
void lut_block(const ConvJob& j, const RowContext& ctx, const Step* steps, int64_t count, int64_t n, int64_t oh,
               int64_t ow0, int64_t chunk, const Tile& tile) {
  constexpr int64_t kLanes = JW == 4 ? 16 : 32;
  constexpr int64_t kPerChunk = 64 / kLanes;  // index vectors of a full chunk (64 output channels)
  const int64_t taps = (int64_t)j.kernel_height * j.kernel_width;
  const uint8_t* const indices = j.lut_indices + chunk * kPerChunk * taps * j.lut_groups * 64;
  const uint8_t* const base = ctx.base + ow0 * kLutTable;
  const __m512i scale4 = _mm512_set1_epi32(0x08040201), scale2 = _mm512_set1_epi16(0x0201);
  const int64_t oc_chunk = chunk * 64;
  int32_t* const sums = tile.sums + oc_chunk;
  const int64_t pitch = tile.pitch;
  __m512i wide[P][R];
  if (JW == 4 && !tile.first) {
    for (int p = 0; p < P; ++p)
      for (int r = 0; r < R; ++r) wide[p][r] = _mm512_loadu_si512((const void*)(sums + p * pitch + r * 16));
  } else {
    for (int p = 0; p < P; ++p)
      for (int r = 0; r < R; ++r) wide[p][r] = _mm512_setzero_si512();
  }
  if (JW == 2 && tile.first)
    for (int p = 0; p < P; ++p)
      for (int i = 0; i < R * 32; ++i) sums[p * pitch + i] = 0;
  // JW = 2: 16-bit sums (each pair adds <= 180 * (1 + 2)), moved into the int32 tile before
  // they could pass 65535 and at the end.
  constexpr int64_t kFlushPairs = 65535 / 540;
  auto flush = [&]() {
    for (int p = 0; p < P; ++p)
      for (int r = 0; r < R; ++r) {
        int32_t* d = sums + p * pitch + r * 32;
        const __m512i lo = _mm512_cvtepu16_epi32(_mm512_castsi512_si256(wide[p][r]));
        const __m512i hi = _mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64(wide[p][r], 1));
        _mm512_storeu_si512((void*)d, _mm512_add_epi32(_mm512_loadu_si512((const void*)d), lo));
        _mm512_storeu_si512((void*)(d + 16), _mm512_add_epi32(_mm512_loadu_si512((const void*)(d + 16)), hi));
        wide[p][r] = _mm512_setzero_si512();
      }
  };
  int64_t s = 0;
  while (s + 2 <= count) {
    const int64_t pairs = (count - s) / 2;
    const int64_t run = JW == 2 && pairs > kFlushPairs ? kFlushPairs : pairs;
    for (const int64_t end = s + 2 * run; s < end; s += 2) {
      const uint8_t* t0 = base + steps[s].table;
      const uint8_t* t1 = base + steps[s + 1].table;
      const uint8_t* w0 = indices + steps[s].index * (R * 64);
      const uint8_t* w1 = indices + steps[s + 1].index * (R * 64);
      __m512i i0[R], i1[R];
      for (int r = 0; r < R; ++r) {
        i0[r] = _mm512_loadu_si512((const void*)(w0 + r * 64));
        i1[r] = _mm512_loadu_si512((const void*)(w1 + r * 64));
      }
      for (int p = 0; p < P; ++p) {
        const __m512i a = _mm512_loadu_si512((const void*)(t0 + p * kLutTable));
        const __m512i b = _mm512_loadu_si512((const void*)(t1 + p * kLutTable));
        for (int r = 0; r < R; ++r) {
          const __m512i u = _mm512_add_epi8(_mm512_permutexvar_epi8(i0[r], a), _mm512_permutexvar_epi8(i1[r], b));
          wide[p][r] = JW == 4 ? _mm512_dpbusd_epi32(wide[p][r], u, scale4)
                               : _mm512_add_epi16(wide[p][r], _mm512_maddubs_epi16(u, scale2));
        }
      }
    }
    if (JW == 2) flush();
  }
  if (s < count) {  // an odd last step
    const uint8_t* t0 = base + steps[s].table;
    const uint8_t* w0 = indices + steps[s].index * (R * 64);
    for (int r = 0; r < R; ++r) {
      const __m512i i0 = _mm512_loadu_si512((const void*)(w0 + r * 64));
      for (int p = 0; p < P; ++p) {
        const __m512i u = _mm512_permutexvar_epi8(i0, _mm512_loadu_si512((const void*)(t0 + p * kLutTable)));
        wide[p][r] = JW == 4 ? _mm512_dpbusd_epi32(wide[p][r], u, scale4)
                             : _mm512_add_epi16(wide[p][r], _mm512_maddubs_epi16(u, scale2));
      }
    }
    if (JW == 2) flush();
  }
  if (!tile.last) {
    if (JW == 4)
      for (int p = 0; p < P; ++p)
        for (int r = 0; r < R; ++r) _mm512_storeu_si512((void*)(sums + p * pitch + r * 16), wide[p][r]);
    return;
  }
  const int32_t n_w = (1 << j.weight_bits) - 1;
  for (int p = 0; p < P; ++p) {
    const int64_t index = ((n * j.out_height + oh) * j.out_width + ow0 + p) * j.out_channels;
    const int32_t correction = n_w * code_sum(j, ctx, ow0 + p);
    for (int r = 0; r < R; ++r) {
      const int64_t oc0 = oc_chunk + r * kLanes;
      if (JW == 4) {
        store16(j, index, oc0, wide[p][r], correction);
      } else {
        const int32_t* d = sums + p * pitch + r * 32;
        store16(j, index, oc0, _mm512_loadu_si512((const void*)d), correction);
        store16(j, index, oc0 + 16, _mm512_loadu_si512((const void*)(d + 16)), correction);
      }
    }
  }
}

typedef void (*LutBlockFn)(const ConvJob&, const RowContext&, const Step*, int64_t, int64_t, int64_t, int64_t,
                           int64_t, const Tile&);

template <int JW, int P, int R>
struct LutBlocks {
  static void fill(LutBlockFn* table) {
    table[P] = &lut_block<JW, P, R>;
    LutBlocks<JW, P - 1, R>::fill(table);
  }
};
template <int JW, int R>
struct LutBlocks<JW, 0, R> {
  static void fill(LutBlockFn*) {}
};

// Register blocks (pixels x index vectors), measured on Zen 5 (see lut_block): 3 x 4 vectors
// for 4-plane lanes (64 channels), 7 x 2 for 2-plane lanes (64 channels); larger blocks
// spilled, smaller ones reloaded the tables more often.
constexpr int block_pixels(int jw) { return jw == 4 ? 3 : 7; }

// Bytes of tables one register block may read per channel-group block: with the chunk loop
// innermost they stay in L1 (48 KB on the cores this was tuned on) across every chunk.
constexpr int64_t kTableBlockBytes = 24 * 1024;
// Steps (taps x channel groups) per group block at most: the step list lives on the stack.
constexpr int64_t kMaxSteps = kLutMaxKernelRows * kLutMaxKernelRows;

// One output row: pixel blocks, then channel-group blocks, then chunks of 64 output
// channels (innermost, so a block's tables are reused from L1 by every chunk).
template <int JW>
void lut_row(const ConvJob& j, const RowContext& ctx, int64_t n, int64_t oh, int32_t* tile) {
  constexpr int kPixels = block_pixels(JW), kVectors = JW == 4 ? 4 : 2;
  LutBlockFn blocks[kVectors + 1][kPixels + 1];
  LutBlocks<JW, kPixels, 1>::fill(blocks[1]);
  LutBlocks<JW, kPixels, kVectors>::fill(blocks[kVectors]);
  if (kVectors == 4) {
    LutBlocks<JW, kPixels, (kVectors == 4 ? 2 : 1)>::fill(blocks[2]);
    LutBlocks<JW, kPixels, (kVectors == 4 ? 3 : 1)>::fill(blocks[kVectors == 4 ? 3 : 1]);
  }
  const int64_t lanes = JW == 4 ? 16 : 32;
  const int64_t width = j.out_width, groups = j.lut_groups, gstride = group_stride(j);
  const int64_t count = (width + kPixels - 1) / kPixels;
  const int64_t base = width / count, longer = width % count;
  int64_t rows = 0;
  for (int64_t kh = 0; kh < j.kernel_height; ++kh) rows += ctx.rows[kh] != nullptr;
  const int64_t columns = (kPixels - 1) * j.stride_width + (j.kernel_width - 1) * j.dilation_width + 1;
  int64_t per_block = kTableBlockBytes / (columns * (rows > 0 ? rows : 1) * kLutTable);
  per_block = per_block < 2 ? 2 : per_block / 2 * 2;  // even: whole lookup pairs
  const int64_t taps_used = rows * j.kernel_width;
  if (taps_used > 0 && per_block * taps_used > kMaxSteps) per_block = kMaxSteps / taps_used;
  if (per_block < 1) per_block = 1;
  Step steps[kMaxSteps];
  const int64_t pitch = (int64_t)j.lut_chunks * 64;
  for (int64_t b = 0, x = 0; b < count; ++b) {
    const int64_t pixels = base + (b < longer ? 1 : 0);
    for (int64_t g0 = 0; g0 < groups; g0 += per_block) {
      const int64_t g1 = groups - g0 < per_block ? groups : g0 + per_block;
      int64_t used = 0;
      for (int64_t kh = 0; kh < j.kernel_height; ++kh) {
        if (ctx.rows[kh] == nullptr) continue;  // outside the input: m = 0 adds nothing
        const int64_t row = ctx.rows[kh] - ctx.base;
        for (int64_t kw = 0; kw < j.kernel_width; ++kw)
          for (int64_t g = g0; g < g1; ++g)
            steps[used++] = Step{row + ctx.column[kw] + g * gstride, (kh * j.kernel_width + kw) * groups + g};
      }
      const Tile t{tile, pitch, g0 == 0, g1 == groups};
      for (int64_t chunk = 0; chunk < j.lut_chunks; ++chunk) {
        const int64_t left = j.lut_blocks - chunk * kVectors;
        const int vectors = left < kVectors ? (int)left : kVectors;
        (void)lanes;
        blocks[vectors][pixels](j, ctx, steps, used, n, oh, x, chunk, t);
      }
    }
    x += pixels;
  }
}

void lut_item(const ConvJob& j, int64_t item, int slot) {
  const int64_t bands = ((int64_t)j.out_height + j.lut_band - 1) / j.lut_band;
  const int64_t n = item / bands, oh_begin = item % bands * j.lut_band;
  const int64_t oh_end = oh_begin + j.lut_band < j.out_height ? oh_begin + j.lut_band : j.out_height;
  uint8_t* ring = j.lut_tables + slot * j.lut_thread_bytes;
  int64_t* held = (int64_t*)ring;  // input row each ring slot holds
  const int64_t span = j.lut_ring_rows;
  for (int64_t s = 0; s < span; ++s) held[s] = -1;
  RowContext ctx;
  ctx.base = ring + header_bytes(j);
  for (int64_t kw = 0; kw < j.kernel_width; ++kw) {
    const int64_t padded = kw * j.dilation_width;  // column ow * stride + padded: phase, then column
    ctx.column[kw] = padded % j.stride_width * phase_stride(j) + padded / j.stride_width * kLutTable;
  }
  for (int64_t oh = oh_begin; oh < oh_end; ++oh) {
    for (int64_t kh = 0; kh < j.kernel_height; ++kh) {
      const int64_t ih = oh * j.stride_height + kh * j.dilation_height - j.pad_top;
      ctx.rows[kh] = nullptr;
      if (ih < 0 || ih >= j.in_height) continue;
      const int64_t s = ih % span;
      if (held[s] != ih) {
        build_row(j, ring, n, ih, s);
        held[s] = ih;
      }
      ctx.rows[kh] = ring + header_bytes(j) + s * row_bytes(j);
    }
    int32_t* tile = (int32_t*)(ring + j.lut_thread_bytes - j.lut_code_bytes - j.lut_tile_bytes);
    if (j.weight_bits <= 2)
      lut_row<2>(j, ctx, n, oh, tile);
    else
      lut_row<4>(j, ctx, n, oh, tile);
  }
}

}  // namespace avx512_lut
}  // namespace

const PathKernels* avx512_lut_kernels() {
  static const PathKernels kernels = [] {
    PathKernels k;
    k.name = "avx512 vbmi lut";
    k.lanes = 32;       // weight_bits <= 2: 32 channels x 2 planes
    k.lanes_wide = 16;  // weight_bits 3-4: 16 channels x 4 planes
    k.stage_rows = nullptr;
    k.item = &avx512_lut::lut_item;
    k.blocks_per_chunk = 2;  // chunks of 64 output channels (4 index vectors of 16 when wide)
    return k;
  }();
  return &kernels;
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
const PathKernels* avx512_dot_kernels() { return nullptr; }
const PathKernels* avx512_lut_kernels() { return nullptr; }
}  // namespace n2uq_core

#endif
