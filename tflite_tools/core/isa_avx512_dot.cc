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

// 64 channel codes from their BITS bit planes (plane p at planes[p * words]), lanes outside
// `mask` zero: each plane's bits select 2^p in its own register, then one OR tree (a chain of
// masked adds on one register was the slowest part of staging).
template <int BITS>
inline __m512i codes_from_planes(const uint64_t* planes, int64_t words, uint64_t mask) {
  __m512i part[BITS];
  for (int p = 0; p < BITS; ++p)
    part[p] = _mm512_maskz_mov_epi8((__mmask64)(planes[p * words] & mask), _mm512_set1_epi8((char)(1 << p)));
  if (BITS == 1) return part[0];
  if (BITS == 2) return _mm512_or_si512(part[0], part[BITS > 1 ? 1 : 0]);
  const __m512i three = _mm512_ternarylogic_epi32(part[0], part[BITS > 1 ? 1 : 0], part[BITS > 2 ? 2 : 0], 0xFE);
  return BITS == 3 ? three : _mm512_or_si512(three, part[BITS > 3 ? 3 : 0]);
}

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
  struct Out {
    int32_t* out_int32;
    float* out_float;
    __mmask16 mask;
    __m512 multiplier, bias;
  };
  static inline Out out(const ConvJob& j, int64_t oc0, int valid) {
    Out o;
    o.out_int32 = j.out_int32;
    o.out_float = j.out_float;
    o.mask = (__mmask16)(valid >= 16 ? 0xFFFFu : (1u << valid) - 1u);
    o.multiplier = o.bias = _mm512_setzero_ps();
    if (j.out_float) {  // multiplier and bias may be null without a float output
      o.multiplier = _mm512_maskz_loadu_ps(o.mask, j.multiplier + oc0);
      o.bias = _mm512_maskz_loadu_ps(o.mask, j.bias + oc0);
    }
    return o;
  }
  static inline void store(const Out& o, int64_t index, Acc acc) {
    if (o.out_int32) _mm512_mask_storeu_epi32(o.out_int32 + index, o.mask, acc);
    if (o.out_float)
      _mm512_mask_storeu_ps(o.out_float + index, o.mask,
                            _mm512_add_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(acc), o.multiplier), o.bias));
  }
  static inline void codes64(const uint64_t* planes, int64_t words, int act_bits, uint64_t tail, uint8_t* out) {
    __m512i codes;
    switch (act_bits) {
      case 1: codes = codes_from_planes<1>(planes, words, tail); break;
      case 2: codes = codes_from_planes<2>(planes, words, tail); break;
      case 3: codes = codes_from_planes<3>(planes, words, tail); break;
      default: codes = codes_from_planes<4>(planes, words, tail); break;  // validated: 1..4
    }
    _mm512_storeu_si512((void*)out, codes);
  }
};

#include "dot_impl.h"

// ---- Winograd form (F(2x2, 3x3)) of the dot path: 3x3 kernels, stride 1, dilation 1.
//
// Each 2x2 block of output pixels (a tile) comes from the 4x4 input codes d under it:
//   Y = A^T [U . V] A / 4, V = B^T d B, U = s . (G g G^T), with g the 3x3 weights w' (per
// input channel, summed over channels), B^T = [1 0 -1 0; 0 1 1 0; 0 -1 1 0; 0 1 0 -1],
// G = [1 0 0; 1 1 1; 1 -1 1; 0 0 1] (integer: the usual 1/2 rows are folded into s),
// A^T = [1 1 1 0; 0 1 -1 -1] and s[a][b] = 4 / (e_a e_b), e = (1, 2, 2, 1): 16 products per
// tile and channel instead of 36, every step an exact integer (Y4 = A^T (s . Z) A is a
// multiple of 4). The VPDPBUSD operands must be u8 x s8 and fit a byte:
//   V in [-2M, 4M] (M = 2^act_bits - 1 <= 15) is stored as V8 = V + 2M in [0, 6M] (<= 90);
//   w' = 2k - n_w = 2q + 1 with q = k - 2^(weight_bits - 1) in [-8, 7], and U(q) = G q G^T
//   is in [-72, 72];
// so with acc = sum_c U(q) V8 (one 16-position GEMM over channels),
//   Z = sum_c U(w') V = 2 acc - 4M sum_c U(q) + U1 sum_c V,   U1 = G 1 G^T,
// where -4M s sum_c U(q) is per output channel and s U1 sum_c V per tile; both go through the
// output transform once (the transform is linear), the first in the plan (wino_bias), the second
// per tile (wino_tile_terms). The plan checks that int32 holds every intermediate.
// Input transforms run in int8 lanes: every intermediate (B^T d in [-M, 2M], V, V8) fits.

inline int64_t wino_channel_bytes(const ConvJob& j) { return int64_t(j.words) * 64; }

// Padded code rows [begin, end) of the N * wino_code_rows: code row r holds input row r - pad_top,
// column c input column c - pad_left, zero outside the input and past in_channels; and, where
// wino_pixel_sums is set (the stride-1 form), the sum of each pixel's codes (sum_p 2^p
// popcount(plane p)).
template <int BITS>
void wino_codes_bits(const ConvJob& j, int64_t begin, int64_t end) {
  const int64_t words = j.words, cw = wino_channel_bytes(j);
  const int rem = j.in_channels % 64;
  const uint64_t tail = rem == 0 ? ~0ull : ((1ull << rem) - 1);
  for (int64_t row = begin; row < end; ++row) {
    const int64_t n = row / j.wino_code_rows, ih = row % j.wino_code_rows - j.pad_top;
    uint8_t* dst = j.wino_codes + row * j.wino_code_cols * cw;
    int32_t* sums = j.wino_pixel_sums != nullptr ? j.wino_pixel_sums + row * j.wino_code_cols : nullptr;
    const bool row_inside = ih >= 0 && ih < j.in_height;
    const uint64_t* src_row = j.input + (n * j.in_height + ih) * j.in_width * BITS * words;
    for (int64_t c = 0; c < j.wino_code_cols; ++c, dst += cw) {
      const int64_t iw = c - j.pad_left;
      if (!row_inside || iw < 0 || iw >= j.in_width) {
        for (int64_t w = 0; w < words; ++w) _mm512_storeu_si512((void*)(dst + w * 64), _mm512_setzero_si512());
        if (sums != nullptr) sums[c] = 0;
        continue;
      }
      const uint64_t* src = src_row + iw * BITS * words;
      for (int64_t w = 0; w < words; ++w)
        _mm512_storeu_si512((void*)(dst + w * 64), codes_from_planes<BITS>(src + w, words, w == words - 1 ? tail : ~0ull));
      if (sums != nullptr) {
        int64_t sum = 0;
        for (int64_t w = 0; w < words; ++w) {
          const uint64_t mask = w == words - 1 ? tail : ~0ull;
          for (int p = 0; p < BITS; ++p) sum += int64_t(__builtin_popcountll(src[p * words + w] & mask)) << p;
        }
        sums[c] = int32_t(sum);
      }
    }
  }
}

void wino_codes(const ConvJob& j, int64_t begin, int64_t end) {
  switch (j.act_bits) {
    case 1: wino_codes_bits<1>(j, begin, end); break;
    case 2: wino_codes_bits<2>(j, begin, end); break;
    case 3: wino_codes_bits<3>(j, begin, end); break;
    case 4: wino_codes_bits<4>(j, begin, end); break;
    default: break;  // validated by the dispatcher
  }
}

// Input transforms of tiles [begin, end) of the N * wino_tiles_h * wino_tiles_w: V8 of every tile
// and 64-channel word, and the tile's correction terms.
void wino_transform(const ConvJob& j, int64_t begin, int64_t end) {
  const int64_t cw = wino_channel_bytes(j), words = j.words, cols = j.wino_code_cols;
  const int32_t m = (1 << j.act_bits) - 1;
  const __m512i offset = _mm512_set1_epi8((char)(2 * m));
  for (int64_t t = begin; t < end; ++t) {
    const WinoTile tile = wino_tile_at(j, t);
    const int64_t n = tile.n, ty = tile.ty, tx = tile.tx;
    const uint8_t* base = j.wino_codes + ((n * j.wino_code_rows + 2 * ty) * cols + 2 * tx) * cw;
    for (int64_t w = 0; w < words; ++w) {
      __m512i d[4][4], u[4][4];
      for (int r = 0; r < 4; ++r)
        for (int c = 0; c < 4; ++c) d[r][c] = _mm512_loadu_si512((const void*)(base + (r * cols + c) * cw + w * 64));
      for (int c = 0; c < 4; ++c) {  // B^T d: over rows
        u[0][c] = _mm512_sub_epi8(d[0][c], d[2][c]);
        u[1][c] = _mm512_add_epi8(d[1][c], d[2][c]);
        u[2][c] = _mm512_sub_epi8(d[2][c], d[1][c]);
        u[3][c] = _mm512_sub_epi8(d[1][c], d[3][c]);
      }
      for (int a = 0; a < 4; ++a) {  // (B^T d) B: over columns
        __m512i v[4];
        v[0] = _mm512_sub_epi8(u[a][0], u[a][2]);
        v[1] = _mm512_add_epi8(u[a][1], u[a][2]);
        v[2] = _mm512_sub_epi8(u[a][2], u[a][1]);
        v[3] = _mm512_sub_epi8(u[a][1], u[a][3]);
        for (int b = 0; b < 4; ++b) {
          const int x = a * 4 + b;
          const __m512i v8 = _mm512_add_epi8(v[b], offset);
          _mm512_storeu_si512((void*)(j.wino_v + (x * j.wino_tiles + t) * cw + w * 64), v8);
        }
      }
    }
    wino_tile_terms(j, t, n, ty, tx);
  }
}

// ---- Quantize-and-pack between GEMM steps (SideQuantize; core.cc, run_wino2_quantizing).
//
// The 4-bit quantizer is bound by its mask-writing compares (four per 16 channels, one per cycle
// on Zen 5) and its permutes; the GEMMs by VPDPBUSD (two per cycle). They share some issue ports,
// not all: in a bare loop on Zen 5, 12 VPDPBUSDs plus one 16-channel quantize step took 4.5 TSC
// cycles, 3.7 without the step, 2.2 the step alone. Out-of-order execution overlaps them only
// within a few hundred instructions, so the steps go inside the GEMMs' quad loop, a piece of 2
// groups every `every` quads, rather than between GEMM calls (in that bare loop, runs of 20-40
// steps between the VPDPBUSDs hid 5-12% of their time, runs of 1-5 steps 66-74%).
#include "quantize_avx512_impl.h"

// One piece of the side work, 32 channels (2 groups): each plane's 32 bits assembled in a register
// from the groups' masks and stored whole. Same process, 1 thread, Zen 5, against pieces of 64
// channels: 56x56x64/2 W4A4 0.98x the time, W3A3 1.01x, 28x28x128/2 W4A4 0.98x; pieces of 16
// (each mask stored on its own) hid less than half as much. The progress stays in the struct
// (memory): as locals it took registers the GEMM loop needs, and GCC moved them through the stack
// and xmm registers on every piece.
template <int BITS>
__attribute__((always_inline)) inline void side_piece(SideQuantize* s) {
  const float* const x = s->x;
  const __m512 beta1 = _mm512_set1_ps(s->beta1);
  uint32_t planes[BITS] = {};
  for (int g = 0; g < 2; ++g) {
    __mmask16 p[BITS];
    quantize16<BITS, false>(_mm512_loadu_ps(x + 16 * g), beta1, reinterpret_cast<const __m512*>(s->levels),
                            (__mmask16)0xFFFF, p);
    for (int b = 0; b < BITS; ++b) planes[b] |= uint32_t(p[b]) << (16 * g);
  }
  uint32_t* const out = reinterpret_cast<uint32_t*>(s->out) + s->word;
  for (int b = 0; b < BITS; ++b) out[b * s->words * 2] = planes[b];
  s->x = x + 32;
  if (++s->word == s->words * 2) {
    s->word = 0;
    s->out += BITS * s->words;
  }
  --s->left;
}

template <int BITS>
void side_finish_bits(SideQuantize* s) {
  while (s->left > 0) side_piece<BITS>(s);
}

void side_prepare(const QuantizeJob& q, SideQuantize* s) {
  __m512* const levels = reinterpret_cast<__m512*>(s->levels);
  switch (q.bits) {
    case 1: quantize_levels<1>(q, levels); break;
    case 2: quantize_levels<2>(q, levels); break;
    case 3: quantize_levels<3>(q, levels); break;
    default: quantize_levels<4>(q, levels); break;
  }
  s->beta1 = q.beta1;
  s->bits = q.bits;
  s->words = q.words;
}

void side_finish(SideQuantize* s) {
  switch (s->bits) {
    case 1: side_finish_bits<1>(s); break;
    case 2: side_finish_bits<2>(s); break;
    case 3: side_finish_bits<3>(s); break;
    default: side_finish_bits<4>(s); break;
  }
}

// One position of a register block: z[p * R + r] = sum over the quads of tile p's V8 (at a + p *
// cw) times weight vector r. Out of line, loops unrolled and nothing else in it: inlined into
// wino_block, or with the epilogue here, GCC 12 spilled accumulators inside the quad loop.
// SIDE: with a quantize piece of SIDE bits every side->every quads (above; one code width per
// instance: with a switch over the widths in the loop, GCC spilled accumulators around it and
// the groups hid almost nothing).
template <int P, int R, int SIDE>
__attribute__((noinline)) void wino_gemm(const uint8_t* a, int64_t cw, const int8_t* w, int64_t quads, __m512i* z,
                                         SideQuantize* side) {
  __m512i acc[P][R];
#pragma GCC unroll 16
  for (int p = 0; p < P; ++p)
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) acc[p][r] = _mm512_setzero_si512();
  int32_t countdown = SIDE ? side->countdown : 0;
  for (int64_t q = 0; q < quads; ++q) {
    if (SIDE && --countdown == 0) {
      countdown = side->every;
      if (side->left > 0) side_piece<SIDE>(side);
    }
    __m512i wv[R];
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) wv[r] = _mm512_loadu_si512((const void*)(w + q * (R * 64) + r * 64));
#pragma GCC unroll 16
    for (int p = 0; p < P; ++p) {
      const __m512i av = DotOps::broadcast4(a + p * cw + 4 * q);
#pragma GCC unroll 4
      for (int r = 0; r < R; ++r) acc[p][r] = _mm512_dpbusd_epi32(acc[p][r], av, wv[r]);
    }
  }
  if (SIDE) side->countdown = countdown;
#pragma GCC unroll 16
  for (int p = 0; p < P; ++p)
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) _mm512_storeu_si512((void*)(z + p * R + r), acc[p][r]);
}

// needed[g] = 1 + the last of the P tiles from t0 that needs group g (a position or a class) of
// the Winograd GEMMs, needs(g, partial) saying whether a tile with those partial outputs does; P
// for every group unless the job orders partial tiles last.
template <int G, class Needs>
inline void wino_needed_prefix(const ConvJob& j, int64_t t0, int P, Needs needs, int* needed) {
  for (int g = 0; g < G; ++g) needed[g] = j.wino_partial_last ? 0 : P;
  if (!j.wino_partial_last) return;
  for (int p = 0; p < P; ++p) {
    const int partial = wino_tile_at(j, t0 + p).partial;
    for (int g = 0; g < G; ++g)
      if (needs(g, partial)) needed[g] = p + 1;
  }
}

typedef void (*WinoGemmFn)(const uint8_t*, int64_t, const int8_t*, int64_t, __m512i*, SideQuantize*);

// gemms[n] = wino_gemm<n, R, SIDE> for n in 1 .. P.
template <int P, int R, int SIDE>
struct WinoGemms {
  static void fill(WinoGemmFn* table) {
    table[P] = &wino_gemm<P, R, SIDE>;
    WinoGemms<P - 1, R, SIDE>::fill(table);
  }
};
template <int R, int SIDE>
struct WinoGemms<0, R, SIDE> {
  static void fill(WinoGemmFn*) {}
};

// table[b][n]: the GEMM of n tiles with quantize pieces of b bits (b = 0: none).
template <int P, int R>
inline void fill_wino_gemms(WinoGemmFn (*table)[P + 1]) {
  WinoGemms<P, R, 0>::fill(table[0]);
  WinoGemms<P, R, 1>::fill(table[1]);
  WinoGemms<P, R, 2>::fill(table[2]);
  WinoGemms<P, R, 3>::fill(table[3]);
  WinoGemms<P, R, 4>::fill(table[4]);
}

// One GEMM's operands: P tiles' V from v (tile stride stride), weights w, quads per tile.
struct WinoGemmArgs {
  const uint8_t* v;
  int64_t stride;
  const int8_t* w;
  int64_t quads;
};

// Group g's GEMM (args(g)) over the first needed[g] of the P tiles into z[g], and zeros for the
// sums of the rest (the output stage reads every tile's); the quantize pieces of side (or null)
// between their steps while it has some left.
template <int P, int R, int G, class Args>
inline void wino_prefix_gemms(const int* needed, __m512i (*z)[P][R], SideQuantize* side, Args args) {
  WinoGemmFn gemms[5][P + 1];
  fill_wino_gemms<P, R>(gemms);
  for (int g = 0; g < G; ++g) {
    const int n = needed[g];
    if (n > 0) {
      const WinoGemmArgs a = args(g);
      const int bits = side != nullptr && side->left > 0 ? side->bits : 0;
      gemms[bits][n](a.v, a.stride, a.w, a.quads, &z[g][0][0], side);
    }
    for (int p = n; p < P; ++p)
      for (int r = 0; r < R; ++r) z[g][p][r] = _mm512_setzero_si512();
  }
}

// The output stage of both Winograd forms for P tiles (from tile t0) x R weight vectors of one
// chunk: pixels(p, r, y) gives the int32 sums y[2i + jx] of tile p's output pixel (i, jx) for
// vector r before the channel correction (wino_bias); finish(value, t, pixel) turns sum plus
// correction into the output (the stride-1 form adds its per-tile term and divides by 4); then
// the int32 and / or float32 stores of the pixels inside the output.
template <int R, class Pixels, class Finish>
__attribute__((always_inline)) inline void wino_output_stage(const ConvJob& j, int64_t t0, int P, int64_t chunk,
                                                             Pixels pixels, Finish finish) {
  const int64_t lanes = DotOps::kLanes;
  const int64_t oc_padded = int64_t(j.oc_blocks) * lanes;
  const int64_t oc_begin = chunk * j.dot_chunk_blocks * lanes;
  // The job's fields in locals: stores through out_float could alias the job for the
  // compiler, which then reloaded every field after each store.
  int32_t* const out_int32 = j.out_int32;
  float* const out_float = j.out_float;
  const int64_t out_height = j.out_height, out_width = j.out_width, out_channels = j.out_channels;
  // Each tile's first output element and its pixels inside the output (bit 2i + jx), worked out
  // once for the R vectors rather than per vector (wino_tile_at divides; 56x56x64/2 W4A4 on 1
  // thread, Zen 5: about 1% faster, other rows within noise).
  int64_t first[kWinoMaxBlockTiles];
  unsigned inside[kWinoMaxBlockTiles];
  for (int p = 0; p < P; ++p) {
    const WinoTile tile = wino_tile_at(j, t0 + p);
    first[p] = ((tile.n * out_height + 2 * tile.ty) * out_width + 2 * tile.tx) * out_channels;
    // WinoTile::partial says which of the tile's second column (bit 0) and row (bit 1) lie past
    // the output; the first pixel always lies inside.
    const bool col2 = !(tile.partial & 1), row2 = !(tile.partial & 2);
    inside[p] = 1u | (col2 ? 2u : 0u) | (row2 ? 4u : 0u) | (row2 && col2 ? 8u : 0u);
  }
  for (int r = 0; r < R; ++r) {
    const int64_t oc0 = oc_begin + r * lanes, left = out_channels - oc0;
    const __mmask16 mask = (__mmask16)(left >= 16 ? 0xFFFFu : (1u << left) - 1u);
    __m512 multiplier = _mm512_setzero_ps(), bias = _mm512_setzero_ps();
    if (out_float != nullptr) {
      multiplier = _mm512_maskz_loadu_ps(mask, j.multiplier + oc0);
      bias = _mm512_maskz_loadu_ps(mask, j.bias + oc0);
    }
    __m512i bias4[4];  // the channel correction's share of each output pixel of a tile
    for (int i = 0; i < 4; ++i) bias4[i] = _mm512_loadu_si512((const void*)(j.wino_bias + i * oc_padded + oc0));
    for (int p = 0; p < P; ++p) {
      const int64_t t = t0 + p;
      __m512i y[4];
      pixels(p, r, y);
      for (int i = 0; i < 2; ++i) {
        for (int jx = 0; jx < 2; ++jx) {
          if (!(inside[p] & (1u << (2 * i + jx)))) continue;
          const __m512i value = finish(_mm512_add_epi32(y[2 * i + jx], bias4[2 * i + jx]), t, 2 * i + jx);
          const int64_t index = first[p] + (i * out_width + jx) * out_channels + oc0;
          if (out_int32 != nullptr) _mm512_mask_storeu_epi32(out_int32 + index, mask, value);
          if (out_float != nullptr)  // as DotOps::store: float32 multiply, then add
            _mm512_mask_storeu_ps(out_float + index, mask,
                                  _mm512_add_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(value), multiplier), bias));
        }
      }
    }
  }
}

// The stride-1 form's output stage from the position sums z[(x * P + p) * R + r] (x = position):
// Y4 = A^T (s . 2 acc) A + the corrections, / 4. Shared with the AMX form (isa_amx.cc, through
// wino_output below), whose tile stores leave z in this layout.
template <int R>
__attribute__((always_inline)) inline void wino_epilogue(const ConvJob& j, int64_t t0, int P, int64_t chunk,
                                                         const __m512i* z) {
  const int32_t* const terms = j.wino_tile_terms;
  wino_output_stage<R>(
      j, t0, P, chunk,
      [&](int p, int r, __m512i* y) {
        __m512i zs[16];  // s * 2 acc
#pragma GCC unroll 16
        for (int x = 0; x < 16; ++x) zs[x] = _mm512_slli_epi32(z[(x * P + p) * R + r], 1 + kWinoShift[x]);
        for (int i = 0; i < 2; ++i) {
          __m512i u[4];  // A^T Z: over rows
          for (int b = 0; b < 4; ++b)
            u[b] = i == 0 ? _mm512_add_epi32(_mm512_add_epi32(zs[b], zs[4 + b]), zs[8 + b])
                          : _mm512_sub_epi32(_mm512_sub_epi32(zs[4 + b], zs[8 + b]), zs[12 + b]);
          y[2 * i] = _mm512_add_epi32(_mm512_add_epi32(u[0], u[1]), u[2]);  // (A^T Z) A
          y[2 * i + 1] = _mm512_sub_epi32(_mm512_sub_epi32(u[1], u[2]), u[3]);
        }
      },
      [&](__m512i value, int64_t t, int pixel) {  // + the per-tile term, / 4 (exact: a multiple of 4)
        return _mm512_srai_epi32(_mm512_add_epi32(value, _mm512_set1_epi32(terms[t * 4 + pixel])), 2);
      });
}

// One register block: P tiles (from tile t0) x R weight vectors of one chunk, every one of the
// 16 positions, then the output transform and the stores.
template <int P, int R>
void wino_block(const ConvJob& j, int64_t t0, int64_t chunk) {
  const int64_t cw = wino_channel_bytes(j), quads = j.quads, lanes = DotOps::kLanes;
  const int8_t* const weights = j.dot_weights + chunk * j.dot_chunk_blocks * 16 * quads * lanes * 4;
  __m512i z[16][P][R];
  // A tile whose second output row (column) lies past the output needs no position of row
  // (column) 3: A^T's first row reads rows 0-2 only. In wino_partial_last order such tiles come
  // last, so each position runs over the block's tiles up to the last one that needs it (the
  // skipped sums zeroed for the output stage, which never stores those pixels).
  int needed[16];
  wino_needed_prefix<16>(
      j, t0, P, [](int x, int partial) { return !((partial & 2) && x / 4 == 3) && !((partial & 1) && x % 4 == 3); },
      needed);
  wino_prefix_gemms<P, R, 16>(needed, z, j.side_quantize, [&](int x) {
    return WinoGemmArgs{j.wino_v + (x * j.wino_tiles + t0) * cw, cw, weights + x * quads * R * 64, quads};
  });
  wino_epilogue<R>(j, t0, P, chunk, &z[0][0][0]);
}

// ---- Stride-2 form of the dot path: 3x3 kernels, stride 2, dilation 1 (polyphase Winograd).
//
// In 1D, two outputs of a 3-tap stride-2 conv read five inputs: y0 = d0 g0 + d1 g1 + d2 g2 and
// y1 = d2 g0 + d3 g1 + d4 g2. The even inputs (d0, d2, d4) meet the even taps (g0, g2) as a
// stride-1 conv, which F(2, 2) does in 3 products: (d0 - d2) g0, d2 (g0 + g2), (d4 - d2) g2;
// the odd inputs meet g1 in 2 plain products. So with
//   T d = (d0 - d2, d2, d4 - d2, d1, d3),  G g = (g0, g0 + g2, g2, g1, g1),
//   A = [1 1 0 1 0; 0 1 1 0 1],             y = A (G g . T d),
// a 2x2 output tile of the 2D conv is Y = A [U . V] A^T with V = T d T^T (the tile's 5x5 input
// codes d) and U = G g G^T summed over channels: 25 products per tile and channel instead of 36,
// every step an integer (no 1/2 rows, no scaling). Byte ranges, M = 2^act_bits - 1:
//   V in [-2M, 2M] is stored as V8 = V + 2M in [0, 4M] (<= 60, u8);
//   U = U(w') itself with w' = 2k - n_w in [-15, 15]: |U| <= 4 * 15 = 60 (s8), so
// acc = sum_c U V8 and Z = sum_c U V = acc - 2M sum_c U: the channel term goes through A once in
// the plan (wino_bias); there is no per-tile term. The plan checks that int32 holds every sum.
// Input transforms run in int8 lanes (wrapping; every final value is in [0, 4M]).

// Input transforms of tiles [begin, end) of the N * wino_tiles_h * wino_tiles_w: V8 of every tile
// and word, the codes taken straight from the packed input (tiles overlap by one pixel only, so a
// staged code image would be written and read for about as many pixels as this converts).
template <int BITS>
void wino2_transform_bits(const ConvJob& j, int64_t begin, int64_t end) {
  const int64_t cw = wino_channel_bytes(j), words = j.words, pixel_words = BITS * words;
  const int rem = j.in_channels % 64;
  const uint64_t tail = rem == 0 ? ~0ull : ((1ull << rem) - 1);
  const __m512i offset = _mm512_set1_epi8((char)(2 * ((1 << BITS) - 1)));
  for (int64_t w = 0; w < words; ++w) {
    const uint64_t mask = w == words - 1 ? tail : ~0ull;
    __m512i u[5][5];
    WinoTile last{-1, -1, -1, 0};
    for (int64_t t = begin; t < end; ++t) {
      const WinoTile tile = wino_tile_at(j, t);
      const int64_t ih0 = 4 * tile.ty - j.pad_top, iw0 = 4 * tile.tx - j.pad_left;
      // Neighbouring tiles share a column: the last one's T d is this one's first.
      const bool shares = last.n == tile.n && last.ty == tile.ty && last.tx + 1 == tile.tx;
      if (shares)
        for (int a = 0; a < 5; ++a) u[a][0] = u[a][4];
      last = tile;
      const uint64_t* image = j.input + tile.n * j.in_height * j.in_width * pixel_words;
      for (int c = shares ? 1 : 0; c < 5; ++c) {  // T d: over rows
        const bool col_inside = iw0 + c >= 0 && iw0 + c < j.in_width;
        __m512i d[5];
        for (int r = 0; r < 5; ++r)
          d[r] = col_inside && ih0 + r >= 0 && ih0 + r < j.in_height
                     ? codes_from_planes<BITS>(image + ((ih0 + r) * j.in_width + iw0 + c) * pixel_words + w, words, mask)
                     : _mm512_setzero_si512();
        u[0][c] = _mm512_sub_epi8(d[0], d[2]);
        u[1][c] = d[2];
        u[2][c] = _mm512_sub_epi8(d[4], d[2]);
        u[3][c] = d[1];
        u[4][c] = d[3];
      }
      for (int a = 0; a < 5; ++a) {  // (T d) T^T: over columns, + 2M
        const __m512i v[5] = {_mm512_sub_epi8(u[a][0], u[a][2]), u[a][2], _mm512_sub_epi8(u[a][4], u[a][2]),
                              u[a][1], u[a][3]};
        for (int b = 0; b < 5; ++b)
          _mm512_storeu_si512((void*)(j.wino_v + (t * kWinoPositions2 + kWino2Slot[a * 5 + b]) * cw + w * 64),
                              _mm512_add_epi8(v[b], offset));
      }
    }
  }
}

void wino2_transform(const ConvJob& j, int64_t begin, int64_t end) {
  switch (j.act_bits) {
    case 1: wino2_transform_bits<1>(j, begin, end); break;
    case 2: wino2_transform_bits<2>(j, begin, end); break;
    case 3: wino2_transform_bits<3>(j, begin, end); break;
    case 4: wino2_transform_bits<4>(j, begin, end); break;
    default: break;  // validated by the dispatcher
  }
}

// The stride-2 form's output stage from the class sums z[(c * P + p) * R + r] (kernel_table.h:
// class c = 3 * row part + column part, parts {0, 3}, {1}, {2, 4}): output pixel (i, jx) sums the
// classes of row parts i and i + 1 and column parts jx and jx + 1.
template <int R>
__attribute__((always_inline)) inline void wino2_epilogue(const ConvJob& j, int64_t t0, int P, int64_t chunk,
                                                          const __m512i* z) {
  wino_output_stage<R>(
      j, t0, P, chunk,
      [&](int p, int r, __m512i* y) {
        __m512i u[2][3];  // over row parts: output row i takes parts i and i + 1
#pragma GCC unroll 3
        for (int c = 0; c < 3; ++c) {
          const __m512i mid = z[((3 + c) * P + p) * R + r];
          u[0][c] = _mm512_add_epi32(z[((0 + c) * P + p) * R + r], mid);
          u[1][c] = _mm512_add_epi32(mid, z[((6 + c) * P + p) * R + r]);
        }
        for (int i = 0; i < 2; ++i) {
          y[2 * i] = _mm512_add_epi32(u[i][0], u[i][1]);
          y[2 * i + 1] = _mm512_add_epi32(u[i][1], u[i][2]);
        }
      },
      [](__m512i value, int64_t, int) { return value; });
}

// One register block: P tiles (from t0) x R weight vectors of one chunk, one GEMM per class over
// its positions' quads (contiguous: kernel_table.h), then the output stage.
template <int P, int R>
void wino2_block(const ConvJob& j, int64_t t0, int64_t chunk) {
  const int64_t cw = wino_channel_bytes(j), quads = cw / 4, lanes = DotOps::kLanes;
  const int8_t* const weights = j.dot_weights + chunk * j.dot_chunk_blocks * kWinoPositions2 * quads * lanes * 4;
  const uint8_t* const v = j.wino_v + t0 * kWinoPositions2 * cw;
  __m512i z[9][P][R];
  // Tiles whose second output row (column) lies past the output need no class of row (column)
  // part 2 (A's second row alone reads positions 2 and 4). In wino_partial_last order they come
  // last, so each class runs over the block's tiles up to the last one that needs it; the skipped
  // sums are zeroed for the output stage, whose pixels past the output are never stored. (7x7
  // outputs: 342 tile-positions of 400.)
  int needed[9];
  wino_needed_prefix<9>(
      j, t0, P, [](int c, int partial) { return !((partial & 2) && c / 3 == 2) && !((partial & 1) && c % 3 == 2); },
      needed);
  wino_prefix_gemms<P, R, 9>(needed, z, j.side_quantize, [&](int c) {
    const int begin = kWino2ClassStart[c], count = kWino2ClassStart[c + 1] - begin;
    return WinoGemmArgs{v + begin * cw, kWinoPositions2 * cw, weights + begin * quads * R * 64, count * quads};
  });
  wino2_epilogue<R>(j, t0, P, chunk, &z[0][0][0]);
}

// ---- Register blocks, runs and items of both Winograd forms (FORM: kernel_table.h's WinoForm).

typedef void (*WinoBlockFn)(const ConvJob&, int64_t, int64_t);

template <int FORM, int P, int R>
void wino_form_block(const ConvJob& j, int64_t t0, int64_t chunk) {
  if (FORM == kWinoStride2)
    wino2_block<P, R>(j, t0, chunk);
  else
    wino_block<P, R>(j, t0, chunk);
}

template <int FORM, int P, int R>
struct WinoBlocks {
  static void fill(WinoBlockFn* table) {
    table[P] = &wino_form_block<FORM, P, R>;
    WinoBlocks<FORM, P - 1, R>::fill(table);
  }
};
template <int FORM, int R>
struct WinoBlocks<FORM, 0, R> {
  static void fill(WinoBlockFn*) {}
};

// Tiles per register block at most, per R (accumulators P * R + R weights, and the 16 * P * R
// position sums, or 9 * P * R class sums, kept for the output transform).
constexpr int wino_max_tiles(int r) { return r >= 4 ? 6 : r == 3 ? 8 : r == 2 ? 12 : 16; }
static_assert(wino_max_tiles(1) <= kWinoMaxBlockTiles, "the output stage's per-tile arrays are too short");

template <int FORM, int R>
void wino_run(const ConvJob& j, int64_t block, int64_t chunk) {
  constexpr int kMax = wino_max_tiles(R);
  WinoBlockFn blocks[kMax + 1];
  WinoBlocks<FORM, kMax, R>::fill(blocks);
  const int64_t count = j.wino_tile_blocks, base = j.wino_block_span / count, longer = j.wino_block_span % count;
  const int64_t t0 = j.wino_block_first + block * base + (block < longer ? block : longer);
  blocks[base + (block < longer ? 1 : 0)](j, t0, chunk);
}

template <int FORM>
void wino_item(const ConvJob& j, int64_t item, int /*slot*/) {
  const int64_t chunk = item / j.wino_tile_blocks, block = item % j.wino_tile_blocks;
  const int64_t left = j.oc_blocks - chunk * j.dot_chunk_blocks;
  switch (left < j.dot_chunk_blocks ? (int)left : j.dot_chunk_blocks) {
    case 1: wino_run<FORM, 1>(j, block, chunk); break;
    case 2: wino_run<FORM, 2>(j, block, chunk); break;
    case 3: wino_run<FORM, 3>(j, block, chunk); break;
    case 4: wino_run<FORM, 4>(j, block, chunk); break;
    default: break;
  }
}

// The phase planes of the phased direct form (ConvJob::amx_stage): every pixel of a plane row,
// codes inside the input and zero outside it, one 64-byte store per pixel and word; the code
// width a template parameter, so that the plane-to-byte expansion inlines into the pixel loop.
// Planes of phases no tap reads are not staged (never read).
template <int BITS>
void phased_stage_rows_bits(const ConvJob& j, int64_t begin, int64_t end) {
  const int64_t words = j.words, cols = j.amx_cols, plane_bytes = j.amx_plane_pixels * 64;
  const int rem = j.in_channels % 64;
  const uint64_t tail = rem == 0 ? ~0ull : ((1ull << rem) - 1);  // input bits above C are garbage
  const __m512i zero = _mm512_setzero_si512();
  for (int64_t u = begin; u < end; ++u) {
    const PhasedStageRow row = phased_stage_row(j, u, BITS);
    if (!row.read) continue;
    for (int64_t w = 0; w < words; ++w) {
      uint8_t* const dst = row.base + w * plane_bytes;
      for (int64_t c = 0; c < row.c0; ++c) _mm512_store_si512((void*)(dst + c * 64), zero);
      for (int64_t c = row.c1; c < cols; ++c) _mm512_store_si512((void*)(dst + c * 64), zero);
      if (row.c0 == row.c1) continue;
      const uint64_t mask = w == words - 1 ? tail : ~0ull;
      const uint64_t* src = row.src + w;
      for (int64_t c = row.c0; c < row.c1; ++c, src += row.src_step)
        _mm512_store_si512((void*)(dst + c * 64), codes_from_planes<BITS>(src, words, mask));
    }
  }
}

}  // namespace avx512_dot
}  // namespace

// The stage is 64-byte aligned (AlignedVector), and so is every pixel of it.
void phased_stage_rows(const ConvJob& j, int64_t begin, int64_t end) {
  switch (j.act_bits) {
    case 1: avx512_dot::phased_stage_rows_bits<1>(j, begin, end); break;
    case 2: avx512_dot::phased_stage_rows_bits<2>(j, begin, end); break;
    case 3: avx512_dot::phased_stage_rows_bits<3>(j, begin, end); break;
    default: avx512_dot::phased_stage_rows_bits<4>(j, begin, end); break;  // validated: 1..4
  }
}

void wino_output(const ConvJob& j, int64_t t0, int tiles, int64_t chunk, const int32_t* z) {
  const int64_t left = j.oc_blocks - chunk * j.dot_chunk_blocks;
  const __m512i* v = reinterpret_cast<const __m512i*>(z);
  switch (left < j.dot_chunk_blocks ? (int)left : j.dot_chunk_blocks) {
    case 1: avx512_dot::wino_epilogue<1>(j, t0, tiles, chunk, v); break;
    case 2: avx512_dot::wino_epilogue<2>(j, t0, tiles, chunk, v); break;
    case 3: avx512_dot::wino_epilogue<3>(j, t0, tiles, chunk, v); break;
    case 4: avx512_dot::wino_epilogue<4>(j, t0, tiles, chunk, v); break;
    default: break;
  }
}

void wino2_output(const ConvJob& j, int64_t t0, int tiles, int64_t chunk, const int32_t* z) {
  const int64_t left = j.oc_blocks - chunk * j.dot_chunk_blocks;
  const __m512i* v = reinterpret_cast<const __m512i*>(z);
  switch (left < j.dot_chunk_blocks ? (int)left : j.dot_chunk_blocks) {
    case 1: avx512_dot::wino2_epilogue<1>(j, t0, tiles, chunk, v); break;
    case 2: avx512_dot::wino2_epilogue<2>(j, t0, tiles, chunk, v); break;
    case 3: avx512_dot::wino2_epilogue<3>(j, t0, tiles, chunk, v); break;
    case 4: avx512_dot::wino2_epilogue<4>(j, t0, tiles, chunk, v); break;
    default: break;
  }
}

const PathKernels* avx512_dot_kernels() {
  static const PathKernels kernels = [] {
    PathKernels k = avx512_dot::make_dot_kernels<avx512_dot::DotOps>("avx512 vnni dot");
    k.wino_codes = &avx512_dot::wino_codes;
    k.wino_transform = &avx512_dot::wino_transform;
    k.wino_item = &avx512_dot::wino_item<kWinoStride1>;
    k.wino2_transform = &avx512_dot::wino2_transform;
    k.wino2_item = &avx512_dot::wino_item<kWinoStride2>;
    k.wino_partial_last = true;
    k.side_prepare = &avx512_dot::side_prepare;
    k.side_finish = &avx512_dot::side_finish;
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

// ---------------------------------------------------------------- phased stage (VBMI + GFNI)
//
// The same stage bytes as phased_stage_rows, with one byte permute and one GF2P8AFFINEQB per
// pixel and word instead of a mask move and a masked byte move per plane (those moves all need
// port 5 on Intel cores, and their count grows with the code width; the stage's time is mostly its
// 64-byte stores, so this saves 1-2 us of a 4-bit 56x56x64/2 conv). GF2P8AFFINEQB(x, A)
// sets bit i of byte j of each qword to parity(A.byte[7 - i] AND x.byte[j]); with x.byte[j] =
// 1 << j that is bit j of A.byte[7 - i], an 8x8 bit transpose. So with A's qword q holding
// plane p's byte q in byte 7 - p (p < BITS, the rest zero), byte j of qword q (channel 8q + j
// of the word) gets bit p = channel 8q + j's bit in plane p: its code. VPERMB (one register) or
// VPERMT2B (two) builds A from the planes' bytes, which lie in one 64- or 128-byte window from
// the word's plane 0 when (BITS - 1) * words <= 7 or 15; wider pixels take phased_stage_rows.

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx512bw,avx512vl,avx512vbmi,gfni"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512vbmi,gfni")
#endif

namespace n2uq_core {
namespace {
namespace avx512_gfni {

// The window's qwords from the word's plane 0: (BITS - 1) * words + 1.
inline int64_t window_qwords(int bits, int64_t words) { return int64_t(bits - 1) * words + 1; }

template <int BITS, bool TWO>
void stage_rows_bits(const ConvJob& j, int64_t begin, int64_t end) {
  const int64_t words = j.words, cols = j.amx_cols, plane_bytes = j.amx_plane_pixels * 64;
  const int rem = j.in_channels % 64;
  const uint64_t tail = rem == 0 ? ~0ull : ((1ull << rem) - 1);  // input bits above C are garbage
  // A's byte 8q + 7 - p <- window byte 8 p words + q; bytes 8q + 0 .. 7 - BITS stay zero.
  alignas(64) uint8_t index[64];
  uint64_t a_mask = 0;
  for (int b = 0; b < 64; ++b) {
    const int q = b / 8, p = 7 - b % 8;
    index[b] = uint8_t(p < BITS ? 8 * p * words + q : 0);
    if (p < BITS) a_mask |= 1ull << b;
  }
  const __m512i permute = _mm512_load_si512(index), bit_select = _mm512_set1_epi64(0x8040201008040201ll);
  const int64_t window = 8 * window_qwords(BITS, words);  // bytes, <= 128 (<= 64 without TWO)
  const __mmask64 load0 = window >= 64 ? ~__mmask64(0) : (__mmask64(1) << window) - 1;
  const __mmask64 load1 = !TWO || window <= 64 ? 0 : window >= 128 ? ~__mmask64(0) : (__mmask64(1) << (window - 64)) - 1;
  const __m512i zero = _mm512_setzero_si512();
  for (int64_t u = begin; u < end; ++u) {
    const PhasedStageRow row = phased_stage_row(j, u, BITS);
    if (!row.read) continue;
    for (int64_t w = 0; w < words; ++w) {
      uint8_t* const dst = row.base + w * plane_bytes;
      for (int64_t c = 0; c < row.c0; ++c) _mm512_store_si512((void*)(dst + c * 64), zero);
      for (int64_t c = row.c1; c < cols; ++c) _mm512_store_si512((void*)(dst + c * 64), zero);
      if (row.c0 == row.c1) continue;
      const __mmask64 keep = (__mmask64)(w == words - 1 ? tail : ~0ull);
      // The window ends inside the pixel (its last qword is plane BITS - 1 of word w); masked
      // loads read no byte past it.
      const uint8_t* src = reinterpret_cast<const uint8_t*>(row.src + w);
      for (int64_t c = row.c0; c < row.c1; ++c, src += 8 * row.src_step) {
        const __m512i lo = _mm512_maskz_loadu_epi8(load0, src);
        const __m512i a = TWO ? _mm512_maskz_permutex2var_epi8((__mmask64)a_mask, lo, permute,
                                                               _mm512_maskz_loadu_epi8(load1, src + 64))
                              : _mm512_maskz_permutexvar_epi8((__mmask64)a_mask, permute, lo);
        _mm512_store_si512((void*)(dst + c * 64), _mm512_maskz_gf2p8affine_epi64_epi8(keep, bit_select, a, 0));
      }
    }
  }
}

}  // namespace avx512_gfni
}  // namespace

void phased_stage_rows_gfni(const ConvJob& j, int64_t begin, int64_t end) {
  const int64_t window = avx512_gfni::window_qwords(j.act_bits, j.words);
  if (j.act_bits < 2 || window > 16) {  // 1 bit: one mask move per pixel already; wider: no window
    phased_stage_rows(j, begin, end);
    return;
  }
  const bool two = window > 8;
  switch (j.act_bits) {
    case 2: two ? avx512_gfni::stage_rows_bits<2, true>(j, begin, end) : avx512_gfni::stage_rows_bits<2, false>(j, begin, end); break;
    case 3: two ? avx512_gfni::stage_rows_bits<3, true>(j, begin, end) : avx512_gfni::stage_rows_bits<3, false>(j, begin, end); break;
    default: two ? avx512_gfni::stage_rows_bits<4, true>(j, begin, end) : avx512_gfni::stage_rows_bits<4, false>(j, begin, end); break;
  }
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
    PathKernels k = {};
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
