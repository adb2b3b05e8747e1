// The amx path: the dot path's GEMMs on AMX tiles (AMX-TILE + AMX-INT8, TDPBUSD), in its direct
// form (phased, any conv) and both Winograd forms (3x3 stride 1 and stride 2); the rest (codes,
// input transforms, Winograd output stages) the AVX-512 VNNI kernels'. Target
// options for this file only, no -march; core.cc offers the path only when the CPU and OS
// report AMX, the process got the tile-data permission and a self-check matched the AVX-512
// result. The same GEMM source also runs on a software model of the tile instructions
// (AmxEmulated), which reads and writes exactly the bytes the hardware would: tests run it under
// the sanitizers on CPUs without AMX.
#if defined(__x86_64__)
#include <immintrin.h>
#include <stdint.h>

#include <algorithm>
#include <new>

#include "kernel_table.h"
#include "n2uq_core.h"

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("amx-tile,amx-int8,avx512f,avx512bw,avx512vl,avx512vnni"))), \
                             apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("amx-tile,amx-int8,avx512f,avx512bw,avx512vl,avx512vnni")
#endif

namespace n2uq_core {
namespace {
#include "quantize_avx512_impl.h"
namespace amx {

// LDTILECFG's 64-byte operand (palette 1: 8 tiles of up to 16 rows x 64 bytes).
struct alignas(64) TileConfig {
  uint8_t palette, start_row, reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};

// The tile instructions themselves, as inline assembly with "memory" clobbers (the compiler
// must see that LDTILECFG reads the whole 64-byte config, loads read and stores write memory;
// GCC 12's _tile_loadconfig declares an 8-byte operand). Tile numbers are immediates.
struct AmxHardware {
  static inline void config(const TileConfig& c) { __asm__ volatile("ldtilecfg %0" ::"m"(c) : "memory"); }
  static inline void release() { __asm__ volatile("tilerelease" ::: "memory"); }
  template <int T> static inline void zero() { __asm__ volatile("tilezero %%tmm%c0" ::"i"(T) : "memory"); }
  template <int T> static inline void load(const void* base, int64_t stride) {
    __asm__ volatile("tileloadd (%0,%1,1), %%tmm%c2" ::"r"(base), "r"(stride), "i"(T) : "memory");
  }
  // TILELOADDT1: the same load with a hint that the data will not be reused soon.
  template <int T> static inline void load_t1(const void* base, int64_t stride) {
    __asm__ volatile("tileloaddt1 (%0,%1,1), %%tmm%c2" ::"r"(base), "r"(stride), "i"(T) : "memory");
  }
  template <int T> static inline void store(void* base, int64_t stride) {
    __asm__ volatile("tilestored %%tmm%c2, (%0,%1,1)" ::"r"(base), "r"(stride), "i"(T) : "memory");
  }
  // TDPBUSD tmm(C), tmm(A), tmm(B) in Intel order; AT&T lists the operands reversed.
  template <int C, int A, int B> static inline void dpbusd() {
    __asm__ volatile("tdpbusd %%tmm%c0, %%tmm%c1, %%tmm%c2" ::"i"(B), "i"(A), "i"(C) : "memory");
  }
};

// A software model of the same instructions on per-thread tile registers, with their
// architectural semantics (Intel SDM, AMX): loads read rows x colsb bytes at the stride and zero
// the rest of the register; TDPBUSD adds u8 x s8 quad products in int32 (wrapping) over
// colsb(A) / 4 quads and zeroes C past its shape; every shape rule the hardware faults on traps.
struct EmulatedState {
  bool configured;
  uint8_t rows[8];
  uint16_t colsb[8];
  uint8_t data[8][16][64];
};
thread_local EmulatedState emulated_state;

struct AmxEmulated {
  static inline void check(bool ok) {
    if (!ok) __builtin_trap();
  }
  static inline void config(const TileConfig& c) {
    EmulatedState& s = emulated_state;
    check(c.palette == 1 && c.start_row == 0);
    for (int t = 0; t < 8; ++t) {
      check(c.rows[t] <= 16 && c.colsb[t] <= 64 && (c.rows[t] == 0) == (c.colsb[t] == 0));
      s.rows[t] = c.rows[t];
      s.colsb[t] = c.colsb[t];
    }
    __builtin_memset(s.data, 0, sizeof(s.data));
    s.configured = true;
  }
  static inline void release() {
    __builtin_memset(&emulated_state, 0, sizeof(emulated_state));
  }
  static inline void used(int t) { check(emulated_state.configured && emulated_state.rows[t] != 0); }
  template <int T> static inline void zero() {
    used(T);
    __builtin_memset(emulated_state.data[T], 0, sizeof(emulated_state.data[T]));
  }
  template <int T> static inline void load(const void* base, int64_t stride) {
    used(T);
    EmulatedState& s = emulated_state;
    __builtin_memset(s.data[T], 0, sizeof(s.data[T]));
    for (int m = 0; m < s.rows[T]; ++m)
      __builtin_memcpy(s.data[T][m], static_cast<const uint8_t*>(base) + m * stride, s.colsb[T]);
  }
  template <int T> static inline void load_t1(const void* base, int64_t stride) { load<T>(base, stride); }
  template <int T> static inline void store(void* base, int64_t stride) {
    used(T);
    const EmulatedState& s = emulated_state;
    for (int m = 0; m < s.rows[T]; ++m) __builtin_memcpy(static_cast<uint8_t*>(base) + m * stride, s.data[T][m], s.colsb[T]);
  }
  template <int C, int A, int B> static inline void dpbusd() {
    used(C);
    used(A);
    used(B);
    EmulatedState& s = emulated_state;
    check(C != A && C != B && A != B);
    check(s.rows[A] == s.rows[C] && s.colsb[A] == 4 * s.rows[B] && s.colsb[B] == s.colsb[C] && s.colsb[A] % 4 == 0 &&
          s.colsb[C] % 4 == 0);
    for (int m = 0; m < s.rows[C]; ++m)
      for (int n = 0; n < s.colsb[C] / 4; ++n) {
        uint32_t acc;
        __builtin_memcpy(&acc, s.data[C][m] + 4 * n, 4);
        for (int k = 0; k < s.colsb[A] / 4; ++k)
          for (int i = 0; i < 4; ++i)
            acc += uint32_t(int32_t(s.data[A][m][4 * k + i]) * int32_t(int8_t(s.data[B][k][4 * n + i])));
        __builtin_memcpy(s.data[C][m] + 4 * n, &acc, 4);
      }
    for (int m = 0; m < 16; ++m)  // the rest of C
      for (int b = m < s.rows[C] ? s.colsb[C] : 0; b < 64; ++b) s.data[C][m][b] = 0;
  }
};

// Tiles: 0 = A (the block's V8 rows, one 64-channel word), 1..R = B (the weights of that word
// for weight vector r), 4..3+R = C (the int32 sums).
constexpr int kMaxTiles = 16;  // rows of A and C
static_assert(kMaxTiles <= kWinoMaxBlockTiles, "wino_output takes at most kWinoMaxBlockTiles tiles");
constexpr int kMaxVectors = 3; // A + 3 B + 3 C of the 8 tiles

// The tile shapes of a block of P tiles x R weight vectors.
template <class Tiles, int R>
inline void configure(int P) {
  TileConfig cfg;
  __builtin_memset(&cfg, 0, sizeof(cfg));
  cfg.palette = 1;
  cfg.rows[0] = uint8_t(P);
  cfg.colsb[0] = 64;
  for (int r = 0; r < R; ++r) {
    cfg.rows[1 + r] = 16;
    cfg.colsb[1 + r] = 64;
    cfg.rows[4 + r] = uint8_t(P);
    cfg.colsb[4 + r] = 64;
  }
  Tiles::config(cfg);  // per item: the configuration is per thread
}

// C[p][r] = sum over `words` words of A (P rows from a, row stride a_stride; the next word 64
// bytes on) times B (vector r's 16 quad rows from b + 64 r, row stride R * 64; the next word
// 16 * R * 64 bytes on), stored to z[p * R + r][lane].
template <class Tiles, int R>
inline void gemm(const uint8_t* a, int64_t a_stride, const int8_t* b, int64_t words, int32_t* z) {
  Tiles::template zero<4>();
  if (R > 1) Tiles::template zero<5>();
  if (R > 2) Tiles::template zero<6>();
  for (int64_t w = 0; w < words; ++w, a += 64, b += 16 * R * 64) {
    Tiles::template load<0>(a, a_stride);
    Tiles::template load<1>(b, R * 64);
    if (R > 1) Tiles::template load<2>(b + 64, R * 64);
    if (R > 2) Tiles::template load<3>(b + 128, R * 64);
    Tiles::template dpbusd<4, 0, 1>();
    if (R > 1) Tiles::template dpbusd<5, 0, 2>();
    if (R > 2) Tiles::template dpbusd<6, 0, 3>();
  }
  Tiles::template store<4>(z, R * 64);
  if (R > 1) Tiles::template store<5>(z + 16, R * 64);
  if (R > 2) Tiles::template store<6>(z + 32, R * 64);
}

// One block: P <= 16 tiles (from t0) x R <= 3 weight vectors of one chunk. Per position x the
// GEMM Z_x[p][16 r + lane] = sum over quads of V8_x[t0 + p] . U_x[r][lane], which is exactly
// what TDPBUSD computes with A = V8 rows (tile p: 64 channel bytes of a word, row stride = the
// per-tile bytes cw) and B = the dot weight layout's 16 quads x 16 lanes x 4 bytes of a word
// (row stride R * 64): C[p][lane] += sum_k sum_i A[p][4k + i] * B[k][4 lane + i]. The rest (the
// transforms, corrections and their derivation) is the AVX-512 form's, isa_avx512_dot.cc.
// Weights are padded with zero quads to whole words (PathKernels::wino_quad_align = 16; the
// stride-2 form's always are), so
// every B load is 16 full rows inside the plan's buffer, and the padded channels' V8 bytes
// (2M, not 0) meet zero weights.
//
// The stride-2 form (FORM = kWinoStride2) stores V8 [tile][25 slots][cw] and the weights [slot]
// [quads] per chunk, slots in class order (kernel_table.h): class c's GEMM runs over its slots
// and their words into one C tile per vector (A rows = tiles, row stride 25 * cw), so z holds 9
// class sums per tile, z[(c * P + p) * R + r][lane], as wino2_output reads them.
template <class Tiles, int FORM, int R>
void block(const ConvJob& j, int64_t t0, int P, int64_t chunk, int32_t* z) {
  const int64_t words = j.words, cw = words * 64, quads = words * 16;
  const int positions = FORM == kWinoStride2 ? kWinoPositions2 : kWinoPositions1;
  const int8_t* const weights = j.dot_weights + chunk * j.dot_chunk_blocks * positions * quads * 64;
  configure<Tiles, R>(P);
  if (FORM == kWinoStride2) {
    // A class's slots are consecutive, and so are their words in V8 and in the weights: one
    // GEMM over count * words words.
    const uint8_t* const v = j.wino_v + t0 * kWinoPositions2 * cw;
    for (int c = 0; c < 9; ++c) {
      const int begin = kWino2ClassStart[c], count = kWino2ClassStart[c + 1] - begin;
      gemm<Tiles, R>(v + begin * cw, kWinoPositions2 * cw, weights + begin * quads * R * 64, count * words,
                     z + c * P * R * 16);
    }
  } else {
    for (int x = 0; x < 16; ++x)  // z[(x * P + p) * R + r][lane], as wino_output reads it
      gemm<Tiles, R>(j.wino_v + (x * j.wino_tiles + t0) * cw, cw, weights + x * quads * R * 64, words,
                     z + x * P * R * 16);
  }
  Tiles::release();
  if (FORM == kWinoStride2)
    wino2_output(j, t0, P, chunk, z);
  else
    wino_output(j, t0, P, chunk, z);
}

// Item chunk * wino_tile_blocks + block; blocks of near-equal tile counts, at most kMaxTiles.
template <class Tiles, int FORM>
void item(const ConvJob& j, int64_t item, int /*slot*/) {
  alignas(64) int32_t z[16 * kMaxTiles * kMaxVectors * 16];
  const int64_t chunk = item / j.wino_tile_blocks, blk = item % j.wino_tile_blocks;
  const int64_t count = j.wino_tile_blocks, base = j.wino_block_span / count, longer = j.wino_block_span % count;
  const int64_t t0 = j.wino_block_first + blk * base + (blk < longer ? blk : longer);
  const int64_t tiles = base + (blk < longer ? 1 : 0);
  const int64_t left = j.oc_blocks - chunk * j.dot_chunk_blocks;
  if (tiles < 1 || tiles > kMaxTiles) return;  // run_wino sizes blocks by wino_block_tiles
  switch (left < j.dot_chunk_blocks ? (int)left : j.dot_chunk_blocks) {
    case 1: block<Tiles, FORM, 1>(j, t0, int(tiles), chunk, z); break;
    case 2: block<Tiles, FORM, 2>(j, t0, int(tiles), chunk, z); break;
    case 3: block<Tiles, FORM, 3>(j, t0, int(tiles), chunk, z); break;
    default: break;  // blocks_per_chunk = kMaxVectors
  }
}

// ---- Phased direct form (any kernel, stride and dilation; layout in kernel_table.h, ConvJob::
// amx_stage). Per pair of 16-pixel tiles and chunk of R <= 2 weight vectors, C[g][r] = sum over
// taps and words of A_g . B_r: A_g = 16 consecutive virtual pixels' codes of one word (row
// stride 64, one load however the tap shifts them), B_r = that tap and word's 16 quads x 16
// lanes of vector r (the direct dot weights, row stride R * 64). The sum is the dot path's acc
// = sum m w', w' = 2k - n_w (no correction term), so the output is multiplier * acc + bias.
// Tiles: 0-1 = A_0, A_1; 2..1+R = B; 4 + 2g + r = C[g][r]. Every load is 16 full rows inside the
// plane (amx_plane_pixels covers the last pair's taps), so one configuration serves a chunk.
template <class Tiles, int R>
inline void configure_direct() {
  TileConfig cfg;
  __builtin_memset(&cfg, 0, sizeof(cfg));
  cfg.palette = 1;
  for (int g = 0; g < 2; ++g) {
    cfg.rows[g] = 16;
    cfg.colsb[g] = 64;
    for (int r = 0; r < R; ++r) {
      cfg.rows[4 + 2 * g + r] = 16;
      cfg.colsb[4 + 2 * g + r] = 64;
    }
  }
  for (int r = 0; r < R; ++r) {
    cfg.rows[2 + r] = 16;
    cfg.colsb[2 + r] = 64;
  }
  Tiles::config(cfg);
}

// ---- The fused output stage (ConvJob::output_stage, StageJob in kernel_table.h), on the valid
// pixels of one pair and chunk: y = multiplier * acc + bias, then each step as output_stage_impl.h
// computes it (the float32 operation of its builtin, operands in the builtin's order, no fused
// multiply-add), the float output after float_after steps, and the final y quantized by
// quantize16: with PACK its plane masks are the 16 bits of a vector's channels in each plane word
// (stored as that 16-bit part of the word), with CODES one byte per channel. The conv's float
// output never goes to memory: the separate stage pass re-read it from L2, and its steps were
// each a load, operation and store of every value (56x56x64 with the residual block's 7 steps:
// 150 us for the stage against 70 us for the conv on the AMX Xeon).

// One step on the 16 channels of one pixel, v its per-channel operand. No residual (ADD_TENSOR):
// core.cc's plan_fuses_stage leaves those stages to the separate pass.
template <int KIND>
__attribute__((always_inline)) inline __m512 apply_step(__m512 y, __m512 v) {
  const __m512 zero = _mm512_setzero_ps();
  if constexpr (KIND == N2UQ_STEP_ADD) return _mm512_add_ps(y, v);
  if constexpr (KIND == N2UQ_STEP_MUL) return _mm512_mul_ps(y, v);
  if constexpr (KIND == N2UQ_STEP_PRELU)  // y >= 0 ? y : y * slope (NaN: the product)
    return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(y, zero, _CMP_GE_OQ), _mm512_mul_ps(y, v), y);
  if constexpr (KIND == N2UQ_STEP_RELU)  // y < 0 ? 0 : y
    return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(y, zero, _CMP_LT_OQ), y, zero);
  if constexpr (KIND == N2UQ_STEP_RELU6 || KIND == N2UQ_STEP_RELU_N1_TO_1) {  // y < low ? low : y > high ? high : y
    const __m512 low = KIND == N2UQ_STEP_RELU6 ? zero : _mm512_set1_ps(-1.0f);
    const __m512 high = _mm512_set1_ps(KIND == N2UQ_STEP_RELU6 ? 6.0f : 1.0f);
    const __m512 upper = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(y, high, _CMP_GT_OQ), y, high);
    return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(y, low, _CMP_LT_OQ), upper, low);
  }
  return y;
}

// The final y of a vector quantized into out_codes or the plane words (see above).
template <int BITS, bool CODES>
__attribute__((always_inline)) inline void stage_quantize(const StageJob& st, __m512 y, __m512 beta1, const __m512* levels, __mmask16 mask,
                           int64_t position, int64_t oc, int64_t out_channels) {
  __mmask16 planes[BITS];
  const __m512i code = quantize16<BITS, CODES>(y, beta1, levels, mask, planes);
  if constexpr (CODES) {
    _mm512_mask_cvtepi32_storeu_epi8(st.q.out_codes + position * out_channels + oc, mask, code);
    return;
  }
  // Plane b's word oc / 64 of this position; its bytes 2 (oc / 16 % 4), +1 (little endian).
  char* word = reinterpret_cast<char*>(st.q.out_packed + position * BITS * st.q.words + oc / 64) + 2 * (oc / 16 % 4);
  for (int b = 0; b < BITS; ++b) __builtin_memcpy(word + b * st.q.words * 8, &planes[b], 2);
}

// The 16-bit parts of a position's plane words past the last channel's group (no vector writes
// them) are zero, as n2uq_quantize_and_pack leaves them: written with the last group.
inline void stage_zero_tail(const StageJob& st, int64_t position, int64_t out_channels) {
  const int64_t words = st.q.words, groups = (out_channels + 15) / 16;
  const uint16_t none = 0;
  for (int b = 0; b < st.q.bits; ++b)
    for (int64_t g = groups; g < 4 * words; ++g)
      __builtin_memcpy(reinterpret_cast<char*>(st.q.out_packed + (position * st.q.bits + b) * words + g / 4) + 2 * (g % 4),
                       &none, 2);
}

// The pair's valid pixels: z row zi[i] is output position position[i]; returns their count.
inline int pair_pixels(const ConvJob& j, int64_t n, int64_t q0, int* zi, int64_t* position) {
  int count = 0;
  const int64_t cols = j.amx_cols;
  int64_t oh = q0 / cols, ow = q0 - oh * cols;
  for (int p = 0; p < 32 && oh < j.out_height; ++oh, ow = 0) {
    const int64_t valid = ow < j.out_width ? j.out_width - ow : 0;
    const int run = valid < 32 - p ? int(valid) : 32 - p;
    const int64_t first = (n * j.out_height + oh) * j.out_width + ow;
    for (int i = 0; i < run; ++i, ++count) {
      zi[count] = p + i;
      position[count] = first + i;
    }
    p += int(cols - ow);
  }
  return count;
}

// One step of the loop over the pair's values y[i][r * 16 + lane] (count pixels).
template <int KIND, int R>
void step_block(float (*y)[R * 16], int count, const __m512* v) {
  for (int i = 0; i < count; ++i)
    for (int r = 0; r < R; ++r) _mm512_store_ps(y[i] + 16 * r, apply_step<KIND>(_mm512_load_ps(y[i] + 16 * r), v[r]));
}

// The pair's values stay in y[pixel][vector] (L1) and each step is one loop over them, so its kind
// is dispatched once per pair (a switch per vector cost ~10 cycles per vector and step; step
// sequences compiled whole, each vector in registers throughout, measured no faster). BITS = 0:
// no quantizer.
template <int R, int BITS>
void direct_output_stage(const ConvJob& j, int64_t n, int64_t chunk, int64_t q0, const int32_t* z) {
  const StageJob& st = *j.output_stage;
  const int64_t oc_begin = chunk * j.dot_chunk_blocks * 16, oc_count = j.out_channels;
  __mmask16 mask[R];
  __m512 multiplier[R], bias[R];
  for (int r = 0; r < R; ++r) {
    const int64_t left = oc_count - (oc_begin + 16 * r);
    mask[r] = (__mmask16)(left >= 16 ? 0xFFFFu : (1u << left) - 1u);
    multiplier[r] = _mm512_maskz_loadu_ps(mask[r], j.multiplier + oc_begin + 16 * r);
    bias[r] = _mm512_maskz_loadu_ps(mask[r], j.bias + oc_begin + 16 * r);
  }
  __m512 v[R][kMaxStageSteps];  // per-channel operands (zero for the other kinds)
  for (int s = 0; s < st.num_steps; ++s) {
    const int kind = st.kinds[s];
    const bool per_channel = kind == N2UQ_STEP_ADD || kind == N2UQ_STEP_MUL || kind == N2UQ_STEP_PRELU;
    for (int r = 0; r < R; ++r)
      v[r][s] = per_channel ? _mm512_maskz_loadu_ps(mask[r], st.values[s] + oc_begin + 16 * r) : _mm512_setzero_ps();
  }
  __m512 levels[BITS > 0 ? kQuantizeLevels<BITS> : 1];
  if constexpr (BITS > 0) quantize_levels<BITS>(st.q, levels);
  const __m512 beta1 = _mm512_set1_ps(st.q.beta1);
  const bool zero_tail = BITS > 0 && st.quantize == N2UQ_QUANTIZE_PACK && oc_begin + 16 * R >= oc_count &&
                         (oc_count + 15) / 16 < 4 * int64_t(st.q.words);
  int zi[32];
  int64_t position[32];
  const int count = pair_pixels(j, n, q0, zi, position);
  alignas(64) float y[32][R * 16];
  for (int i = 0; i < count; ++i)
    for (int r = 0; r < R; ++r)  // as DotOps::store: float32 multiply, then add
      _mm512_store_ps(y[i] + 16 * r,
                      _mm512_add_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_load_si512(z + zi[i] * R * 16 + 16 * r)),
                                                  multiplier[r]),
                                    bias[r]));
  for (int s = 0; s <= st.num_steps; ++s) {
    if (s == st.float_after)
      for (int i = 0; i < count; ++i)
        for (int r = 0; r < R; ++r)
          _mm512_mask_storeu_ps(st.out_float + position[i] * oc_count + oc_begin + 16 * r, mask[r],
                                _mm512_load_ps(y[i] + 16 * r));
    if (s == st.num_steps) break;
    // Each kind's loop, by N2UQ_STEP_* (ADD_TENSOR never comes here).
    static_assert(N2UQ_STEP_ADD == 1 && N2UQ_STEP_MUL == 2 && N2UQ_STEP_PRELU == 3 && N2UQ_STEP_RELU == 5 &&
                      N2UQ_STEP_RELU6 == 6 && N2UQ_STEP_RELU_N1_TO_1 == 7 && N2UQ_STEP_KINDS == 8,
                  "the table's order");
    using StepBlock = void (*)(float (*)[R * 16], int, const __m512*);
    static constexpr StepBlock kSteps[N2UQ_STEP_KINDS] = {
        nullptr, &step_block<N2UQ_STEP_ADD, R>, &step_block<N2UQ_STEP_MUL, R>, &step_block<N2UQ_STEP_PRELU, R>,
        nullptr, &step_block<N2UQ_STEP_RELU, R>, &step_block<N2UQ_STEP_RELU6, R>,
        &step_block<N2UQ_STEP_RELU_N1_TO_1, R>};
    __m512 vs[R];
    for (int r = 0; r < R; ++r) vs[r] = v[r][s];
    if (const StepBlock step = kSteps[st.kinds[s]]) step(y, count, vs);
  }
  if constexpr (BITS > 0)
    for (int i = 0; i < count; ++i) {
      for (int r = 0; r < R; ++r) {
        const __m512 yr = _mm512_load_ps(y[i] + 16 * r);
        if (st.quantize == N2UQ_QUANTIZE_CODES)
          stage_quantize<BITS, true>(st, yr, beta1, levels, mask[r], position[i], oc_begin + 16 * r, oc_count);
        else  // the plane words need no complete code (quantize16)
          stage_quantize<BITS, false>(st, yr, beta1, levels, mask[r], position[i], oc_begin + 16 * r, oc_count);
      }
      if (zero_tail) stage_zero_tail(st, position[i], oc_count);
    }
}

// Stores the valid pixels of one pair: z[p][r * 16 + lane] for virtual pixels q0 + p.
template <int R>
inline void direct_output(const ConvJob& j, int64_t n, int64_t chunk, int64_t q0, const int32_t* z) {
  if (j.output_stage != nullptr) {
    switch (j.output_stage->quantize == N2UQ_QUANTIZE_NONE ? 0 : j.output_stage->q.bits) {
      case 0: direct_output_stage<R, 0>(j, n, chunk, q0, z); break;
      case 1: direct_output_stage<R, 1>(j, n, chunk, q0, z); break;
      case 2: direct_output_stage<R, 2>(j, n, chunk, q0, z); break;
      case 3: direct_output_stage<R, 3>(j, n, chunk, q0, z); break;
      case 4: direct_output_stage<R, 4>(j, n, chunk, q0, z); break;
      default: break;  // validated by n2uq_conv_plan_run_stage
    }
    return;
  }
  __mmask16 mask[R];
  __m512 multiplier[R], bias[R];
  const int64_t oc_begin = chunk * j.dot_chunk_blocks * 16;
  for (int r = 0; r < R; ++r) {
    const int64_t left = j.out_channels - (oc_begin + 16 * r);
    mask[r] = (__mmask16)(left >= 16 ? 0xFFFFu : (1u << left) - 1u);
    multiplier[r] = bias[r] = _mm512_setzero_ps();
    if (j.out_float != nullptr) {  // multiplier and bias may be null without a float output
      multiplier[r] = _mm512_maskz_loadu_ps(mask[r], j.multiplier + oc_begin + 16 * r);
      bias[r] = _mm512_maskz_loadu_ps(mask[r], j.bias + oc_begin + 16 * r);
    }
  }
  // Runs of valid pixels: from virtual pixel q0 + p, the rest of output row oh (ow < out_width).
  const int64_t cols = j.amx_cols;
  int64_t oh = q0 / cols, ow = q0 - oh * cols;
  for (int p = 0; p < 32 && oh < j.out_height; ++oh, ow = 0) {
    const int64_t valid = ow < j.out_width ? j.out_width - ow : 0;
    const int run = valid < 32 - p ? int(valid) : 32 - p;
    const int64_t index = ((n * j.out_height + oh) * j.out_width + ow) * j.out_channels + oc_begin;
    const int32_t* zp = z + p * R * 16;
    if (j.out_int32 == nullptr) {  // the float output alone: no per-pixel tests
      float* out = j.out_float + index;
      for (int i = 0; i < run; ++i, zp += R * 16, out += j.out_channels)
        for (int r = 0; r < R; ++r)  // as DotOps::store: float32 multiply, then add
          _mm512_mask_storeu_ps(out + 16 * r, mask[r],
                                _mm512_add_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_load_si512(zp + 16 * r)),
                                                            multiplier[r]),
                                              bias[r]));
    } else {
      for (int i = 0; i < run; ++i, zp += R * 16) {
        const int64_t at = index + int64_t(i) * j.out_channels;
        for (int r = 0; r < R; ++r) {
          const __m512i acc = _mm512_load_si512((const void*)(zp + 16 * r));
          _mm512_mask_storeu_epi32(j.out_int32 + at + 16 * r, mask[r], acc);
          if (j.out_float != nullptr)
            _mm512_mask_storeu_ps(j.out_float + at + 16 * r, mask[r],
                                  _mm512_add_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(acc), multiplier[r]), bias[r]));
        }
      }
    }
    p += int(cols - ow);  // past the row's dropped virtual pixels to the next row's first
  }
}

// Tile T from base: a plain TILELOADD, or with STREAM the TILELOADDT1 (not to be reused soon).
template <class Tiles, int T, bool STREAM>
inline void load_tile(const void* base, int64_t stride) {
  if constexpr (STREAM)
    Tiles::template load_t1<T>(base, stride);
  else
    Tiles::template load<T>(base, stride);
}

// The tile work of one pair (virtual pixels q0 .. q0 + 31) and chunk of R vectors: C[g][r] over
// every tap and word, stored to zp[p][r * 16 + lane]. STREAM_B: the weights are loaded with
// TILELOADDT1 (not to be reused soon), which keeps the pair's staged rows in L1 beside them. In a
// loop of the tile instructions alone on the AMX Xeon (family 6 model 167), A from a 40 KB region
// and B streamed from L2: 33 -> 26 cycles per TDPBUSD; in the conv a few percent (14x14x256/2
// W4A4, 1 thread).
template <class Tiles, int R, bool STREAM_B = false>
inline void pair_tiles(const ConvJob& j, int64_t q0, const int8_t* weights, int32_t* zp) {
  const int64_t taps = int64_t(j.kernel_height) * j.kernel_width, words = j.words;
  const int64_t plane_bytes = j.amx_plane_pixels * 64, tap_bytes = words * 16 * R * 64;
  Tiles::template zero<4>();
  Tiles::template zero<6>();
  if (R > 1) Tiles::template zero<5>();
  if (R > 1) Tiles::template zero<7>();
  for (int64_t t = 0; t < taps; ++t) {
    const uint8_t* a = j.amx_stage + j.amx_tap_offsets[t] + q0 * 64;
    const int8_t* b = weights + t * tap_bytes;
    for (int64_t w = 0; w < words; ++w, a += plane_bytes, b += 16 * R * 64) {
      Tiles::template load<0>(a, 64);
      load_tile<Tiles, 2, STREAM_B>(b, R * 64);
      Tiles::template dpbusd<4, 0, 2>();
      Tiles::template load<1>(a + 16 * 64, 64);
      Tiles::template dpbusd<6, 1, 2>();
      if (R > 1) {
        load_tile<Tiles, 3, STREAM_B>(b + 64, R * 64);
        Tiles::template dpbusd<5, 0, 3>();
        Tiles::template dpbusd<7, 1, 3>();
      }
    }
  }
  Tiles::template store<4>(zp, R * 64);
  Tiles::template store<6>(zp + 16 * R * 16, R * 64);
  if (R > 1) Tiles::template store<5>(zp + 16, R * 64);
  if (R > 1) Tiles::template store<7>(zp + 16 * R * 16 + 16, R * 64);
}

// Pairs [pair_begin, pair_end) of image n for one chunk of R vectors. The output of a pair is
// stored after the next pair's tile work is issued (the pair's C tiles went to z before the next
// pair's TILEZERO). Its stores overlap that tile work little (vector loads and stores contend
// with the tile loads; tflite_tools/README.md), and spreading them over the tap steps measured
// slower still. Storing the C tiles only after that output (the int8 conv's order below) measured
// the same: ResNet-18 invokes within the spread of two copies of one build.
template <class Tiles, int R>
void direct_pairs(const ConvJob& j, int64_t n, int64_t chunk, int64_t pair_begin, int64_t pair_end,
                  const int8_t* weights) {
  alignas(64) int32_t z[2][32 * R * 16];
  configure_direct<Tiles, R>();
  for (int64_t pair = pair_begin; pair < pair_end; ++pair) {
    pair_tiles<Tiles, R>(j, pair * 32, weights, z[(pair - pair_begin) & 1]);
    if (pair > pair_begin) direct_output<R>(j, n, chunk, pair * 32 - 32, z[(pair - 1 - pair_begin) & 1]);
  }
  Tiles::release();
  if (pair_end > pair_begin) direct_output<R>(j, n, chunk, (pair_end - 1) * 32, z[(pair_end - 1 - pair_begin) & 1]);
}

// With a fused output stage or ConvJob::amx_pairs_outer, and whole chunks of 2 vectors: the chunks
// inside the pair loop, so that a pair's outputs (its float rows and plane words) are written in
// one visit each and its staged rows stay in L1 across the chunks.
// Chunk-outer, each chunk's pass over the image touched every output line again, half of it
// (56x56x64 W2A2, the stage's float output alone: 106 -> 89 us on the AMX Xeon).
template <class Tiles>
void direct_pairs_all_chunks(const ConvJob& j, int64_t n, int64_t chunk_begin, int64_t chunk_end, int64_t pair_begin,
                             int64_t pair_end) {
  constexpr int R = kAmxDirectVectors;
  alignas(64) int32_t z[2][32 * R * 16];
  const int64_t chunk_bytes = direct_chunk_bytes(j);
  configure_direct<Tiles, R>();
  int64_t previous_pair = -1, previous_chunk = 0;
  int slot = 0;
  for (int64_t pair = pair_begin; pair < pair_end; ++pair)
    for (int64_t chunk = chunk_begin; chunk < chunk_end; ++chunk, slot ^= 1) {
      if (j.amx_pairs_outer)  // the chunks' weights stream past (kPairsOuterChunkBytes, core.cc)
        pair_tiles<Tiles, R, true>(j, pair * 32, j.dot_weights + chunk * chunk_bytes, z[slot]);
      else
        pair_tiles<Tiles, R>(j, pair * 32, j.dot_weights + chunk * chunk_bytes, z[slot]);
      if (previous_pair >= 0) direct_output<R>(j, n, previous_chunk, previous_pair * 32, z[slot ^ 1]);
      previous_pair = pair;
      previous_chunk = chunk;
    }
  Tiles::release();
  if (previous_pair >= 0) direct_output<R>(j, n, previous_chunk, previous_pair * 32, z[slot ^ 1]);
}

// ---- Compact weights (ConvJob::compact_weights): per vector of 16 output channels and group of
// up to 4 A tiles (64 virtual pixels, two pairs), C[g] = sum over taps and words of A_g . B, each B
// (a tap and word's 16 quad rows) expanded from its codes into an L1 ring one step ahead of the
// tile work that reads it, so the vector ALUs expand while the tiles multiply. The weights streamed
// per run are 2-8x fewer bytes than the int8 layout's (7x7x512's 2.4 MB did not fit the Xeon's
// 2 MB L2 and came from L3 at ~16 GB/s); each expanded B serves G TDPBUSDs, so expanding costs
// the same share of the tile work on every shape. Tiles: 0-1 = A (alternating), 2-3 = B (the
// ring's two slots), 4..3+G = C[g].

// One B's 16 rows from its codes. Per row: its 8 * BITS bytes broadcast to each 8 * BITS-byte part
// of a vector, part f shifted right by BITS * f (VPSRLVQ: qword q is in part q * BITS / 8), so each
// byte's low BITS bits are its code (the compact row layout, kernel_table.h); the bits above, the
// next byte's, are masked off and VPSHUFB maps code k to its weight 2k - n_w.
template <int BITS>
__attribute__((always_inline)) inline void expand_b(const uint8_t* src, int8_t* dst, __m512i lut) {
  const __m512i low = _mm512_set1_epi8(char((1 << BITS) - 1));
  const __m512i shifts = BITS == 1   ? _mm512_set_epi64(7, 6, 5, 4, 3, 2, 1, 0)
                         : BITS == 2 ? _mm512_set_epi64(6, 6, 4, 4, 2, 2, 0, 0)
                                     : _mm512_set_epi64(4, 4, 4, 4, 0, 0, 0, 0);
  for (int r = 0; r < 16; ++r, src += 8 * BITS, dst += 64) {
    __m512i v;
    if constexpr (BITS == 1) {
      uint64_t bytes;
      __builtin_memcpy(&bytes, src, 8);
      v = _mm512_set1_epi64(int64_t(bytes));
    } else if constexpr (BITS == 2) {
      v = _mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src)));
    } else {
      v = _mm512_broadcast_i64x4(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src)));
    }
    _mm512_store_si512(dst, _mm512_shuffle_epi8(lut, _mm512_and_si512(_mm512_srlv_epi64(v, shifts), low)));
  }
}

// One tap and word: B (tile TB, from the ring slot b) times the G A tiles at a, into C[g] = tile 4 + g.
template <class Tiles, int G, int TB>
__attribute__((always_inline)) inline void compact_step(const uint8_t* a, const int8_t* b) {
  Tiles::template load<TB>(b, 64);
  Tiles::template load<0>(a, 64);
  Tiles::template dpbusd<4, 0, TB>();
  Tiles::template load<1>(a + 16 * 64, 64);
  Tiles::template dpbusd<5, 1, TB>();
  if (G > 2) {
    Tiles::template load<0>(a + 32 * 64, 64);
    Tiles::template dpbusd<6, 0, TB>();
    Tiles::template load<1>(a + 48 * 64, 64);
    Tiles::template dpbusd<7, 1, TB>();
  }
}

// The tile work of G A tiles (virtual pixels q0 .. q0 + 16 G - 1) and one vector, from that
// vector's compact rows, stored to z[p][lane].
template <class Tiles, int BITS, int G>
void compact_tiles(const ConvJob& j, int64_t q0, const uint8_t* rows, __m512i lut, int32_t* z) {
  alignas(64) int8_t ring[2][16 * 64];
  const int64_t words = j.words, steps = int64_t(j.kernel_height) * j.kernel_width * words;
  const int64_t plane_bytes = j.amx_plane_pixels * 64, b_bytes = 16 * 8 * BITS;
  Tiles::template zero<4>();
  Tiles::template zero<5>();
  if (G > 2) Tiles::template zero<6>();
  if (G > 2) Tiles::template zero<7>();
  expand_b<BITS>(rows, ring[0], lut);
  for (int64_t k = 0; k < steps; ++k) {
    if (k + 1 < steps) expand_b<BITS>(rows + (k + 1) * b_bytes, ring[(k + 1) & 1], lut);
    const int64_t t = k / words, w = k - t * words;
    const uint8_t* a = j.amx_stage + j.amx_tap_offsets[t] + w * plane_bytes + q0 * 64;
    if (k & 1)
      compact_step<Tiles, G, 3>(a, ring[1]);
    else
      compact_step<Tiles, G, 2>(a, ring[0]);
  }
  Tiles::template store<4>(z, 64);
  Tiles::template store<5>(z + 16 * 16, 64);
  if (G > 2) Tiles::template store<6>(z + 32 * 16, 64);
  if (G > 2) Tiles::template store<7>(z + 48 * 16, 64);
}

// Vectors [vector_begin, vector_end) (the plan's chunks of one vector) over pairs [pair_begin,
// pair_end), two pairs at a time; each group's output stored after the next group's tile work.
template <class Tiles, int BITS>
void compact_vectors(const ConvJob& j, int64_t n, int64_t vector_begin, int64_t vector_end, int64_t pair_begin,
                     int64_t pair_end) {
  alignas(64) int32_t z[2][64 * 16];
  alignas(64) int8_t table[64];
  for (int i = 0; i < 64; ++i) table[i] = int8_t(2 * (i % 16) - ((1 << j.weight_bits) - 1));
  const __m512i lut = _mm512_load_si512(table);
  const int64_t vector_bytes = int64_t(j.kernel_height) * j.kernel_width * j.words * 16 * 8 * BITS;
  int64_t previous_vector = -1, previous_q0 = 0;
  int previous_pairs = 0, slot = 0;
  configure_direct<Tiles, 2>();  // all 8 tiles 16 rows x 64 bytes, as the compact tiles use them
  auto flush = [&]() {
    for (int p = 0; p < previous_pairs; ++p)
      direct_output<1>(j, n, previous_vector, previous_q0 + 32 * p, z[slot ^ 1] + 32 * 16 * p);
  };
  for (int64_t v = vector_begin; v < vector_end; ++v)
    for (int64_t pair = pair_begin; pair < pair_end; pair += 2, slot ^= 1) {
      const int pairs = pair + 1 < pair_end ? 2 : 1;
      if (pairs == 2)
        compact_tiles<Tiles, BITS, 4>(j, pair * 32, j.compact_weights + v * vector_bytes, lut, z[slot]);
      else
        compact_tiles<Tiles, BITS, 2>(j, pair * 32, j.compact_weights + v * vector_bytes, lut, z[slot]);
      if (previous_vector >= 0) flush();
      previous_vector = v;
      previous_q0 = pair * 32;
      previous_pairs = pairs;
    }
  Tiles::release();
  if (previous_vector >= 0) flush();
}

template <class Tiles>
void phased_run(const ConvJob& j, int64_t n, int64_t chunk_begin, int64_t chunk_end, int64_t pair_begin,
                int64_t pair_end) {
  if (j.compact_weights != nullptr) {
    switch (j.compact_bits) {
      case 1: compact_vectors<Tiles, 1>(j, n, chunk_begin, chunk_end, pair_begin, pair_end); break;
      case 2: compact_vectors<Tiles, 2>(j, n, chunk_begin, chunk_end, pair_begin, pair_end); break;
      case 4: compact_vectors<Tiles, 4>(j, n, chunk_begin, chunk_end, pair_begin, pair_end); break;
      default: break;  // compact_bits_for
    }
    return;
  }
  if ((j.output_stage != nullptr || j.amx_pairs_outer) && j.dot_chunk_blocks == kAmxDirectVectors &&
      j.oc_blocks % kAmxDirectVectors == 0) {
    direct_pairs_all_chunks<Tiles>(j, n, chunk_begin, chunk_end, pair_begin, pair_end);
    return;
  }
  const int64_t chunk_bytes = direct_chunk_bytes(j);
  for (int64_t chunk = chunk_begin; chunk < chunk_end; ++chunk) {
    const int64_t left = j.oc_blocks - chunk * j.dot_chunk_blocks;
    const int8_t* const weights = j.dot_weights + chunk * chunk_bytes;
    switch (left < j.dot_chunk_blocks ? (int)left : j.dot_chunk_blocks) {
      case 1: direct_pairs<Tiles, 1>(j, n, chunk, pair_begin, pair_end, weights); break;
      case 2: direct_pairs<Tiles, 2>(j, n, chunk, pair_begin, pair_end, weights); break;
      default: break;  // dot_chunk_blocks = kAmxDirectVectors
    }
  }
}

// ---- Int8 convolution (kernel_table.h, Int8ConvJob). Per block of 32 pixels (pixel p's K bytes
// at rows + p * stride: the block's im2col rows, or in place in the stacked row) and chunk of 2
// vectors of 16 channels: C[g][r] = sum over 64-byte words of A_g (16 pixels' bytes of the word)
// . B_r (the word's 16 quads x 16 lanes of vector r), with TDPBUSD's u8 x s8 products. Tiles:
// 0-1 = A_0, A_1; 2-3 = B_0, B_1; 4 + 2g + r = C[g][r].
//
// The vector work (the previous block's requantized stores, the next item's rows) runs between
// the tile products, a slice after each word's four TDPBUSDs. A stem's K is 3 words, so a chunk's
// products are a few hundred cycles: run in turn with the vector work, the tile unit waited for
// the vectors and the vectors for the tile unit (0.30 ms for a ResNet stem on the AMX Xeon, the
// products about half of it). Issued first, the products leave the vector work few reorder-buffer
// entries only when long stretches of it follow them; slices keep both units busy.
template <class Tiles>
void int8_blocks(const Int8ConvJob& j, int64_t begin, int64_t end) {
  if (end <= begin) return;
  const int64_t words = j.k_padded / 64;
  // Two row buffers (item i's rows in a[i & 1]) and two sum buffers (block b's in z[b & 1]).
  const size_t bytes = size_t(j.stack ? j.stack_bytes : kInt8BlockPixels * j.k_padded);
  uint8_t* a[2];
  for (uint8_t*& buffer : a) {
    buffer = static_cast<uint8_t*>(::operator new(bytes, std::align_val_t(64)));
    __builtin_memset(buffer, 0, bytes);
  }
  const size_t z_values = size_t(j.oc_chunks) * 32 * 32;
  int32_t* const z_base = static_cast<int32_t*>(::operator new(2 * z_values * 4, std::align_val_t(64)));
  int32_t* const z[2] = {z_base, z_base + z_values};
  // The units of an item's rows' work (stacked-row vectors, else block pixels).
  const int64_t prepare_units = j.stack ? int8_stack_vectors(j) : kInt8BlockPixels;
  const auto prepare = [&](int64_t item, int64_t u0, int64_t u1) {
    if (u1 <= u0) return;
    if (j.stack)  // item: output row (n, oh); units: vectors of its stacked row
      avx512_int8_stack_row(j, item / j.out_height, item % j.out_height, a[item & 1], u0, u1);
    else  // item: 32-pixel block; units: its pixels
      avx512_int8_rows(j, item * kInt8BlockPixels, u0, u1, a[item & 1]);
  };
  const int64_t step = j.stack ? j.stride_width * j.kernel_height * j.in_channels : j.k_padded;
  const int64_t blocks_per_item = j.stack ? (j.out_width + kInt8BlockPixels - 1) / kInt8BlockPixels : 1;
  const int64_t slots_per_block = j.oc_chunks * words;
  const int64_t store_quota = (kInt8BlockPixels + slots_per_block - 1) / slots_per_block;
  const int64_t prepare_quota = (prepare_units + blocks_per_item * slots_per_block - 1) /
                                (blocks_per_item * slots_per_block);
  struct {
    int64_t q0 = -1, count = 0, done = 0;  // the block whose stores are due, and how many are done
    const int32_t* z = nullptr;
  } store;
  const auto finish_store = [&]() {
    if (store.q0 >= 0) avx512_int8_store(j, store.q0, store.done, store.count, store.z);
    store.q0 = -1;
  };
  configure_direct<Tiles, 2>();
  prepare(begin, 0, prepare_units);
  int64_t block_index = 0;
  for (int64_t item = begin; item < end; ++item) {
    const uint8_t* rows = a[item & 1];
    // The item's pixels: an output row of the stacked form, else one block.
    const int64_t first_q = j.stack ? item * j.out_width : item * kInt8BlockPixels;
    const int64_t pixels = j.stack ? j.out_width : std::min(j.pixels - first_q, kInt8BlockPixels);
    const bool next = item + 1 < end;
    int64_t prepared = 0;  // units of the next item's rows done
    for (int64_t p0 = 0; p0 < pixels; p0 += kInt8BlockPixels, ++block_index) {
      int32_t* const zb = z[block_index & 1];
      for (int64_t chunk = 0; chunk < j.oc_chunks; ++chunk) {
        const int8_t* w = j.weights + chunk * words * 2048;
        const uint8_t* r = rows + p0 * step;
        Tiles::template zero<4>();
        Tiles::template zero<5>();
        Tiles::template zero<6>();
        Tiles::template zero<7>();
        for (int64_t word = 0; word < words; ++word, w += 2048) {
          Tiles::template load<0>(r + word * 64, step);
          Tiles::template load<2>(w, 64);
          Tiles::template dpbusd<4, 0, 2>();
          Tiles::template load<3>(w + 1024, 64);
          Tiles::template dpbusd<5, 0, 3>();
          Tiles::template load<1>(r + 16 * step + word * 64, step);
          Tiles::template dpbusd<6, 1, 2>();
          Tiles::template dpbusd<7, 1, 3>();
          // This slot's slice of the vector work (reads neither these tiles nor zb).
          if (store.q0 >= 0) {
            const int64_t to = store.done + store_quota < store.count ? store.done + store_quota : store.count;
            avx512_int8_store(j, store.q0, store.done, to, store.z);
            store.done = to;
          }
          if (next) {
            const int64_t to = prepared + prepare_quota < prepare_units ? prepared + prepare_quota : prepare_units;
            prepare(item + 1, prepared, to);
            prepared = to;
          }
        }
        int32_t* const zc = zb + chunk * 32 * 32;  // [32 pixels][32 channels]
        Tiles::template store<4>(zc, 128);
        Tiles::template store<5>(zc + 16, 128);
        Tiles::template store<6>(zc + 16 * 32, 128);
        Tiles::template store<7>(zc + 16 * 32 + 16, 128);
      }
      finish_store();  // before the next block's tiles overwrite its sums
      store.q0 = first_q + p0;
      store.count = pixels - p0 < kInt8BlockPixels ? pixels - p0 : kInt8BlockPixels;
      store.done = 0;
      store.z = zb;
    }
    if (next) prepare(item + 1, prepared, prepare_units);  // before the next item's tiles read them
  }
  Tiles::release();
  finish_store();
  ::operator delete(z_base, std::align_val_t(64));
  for (uint8_t* buffer : a) ::operator delete(buffer, std::align_val_t(64));
}

template <class Tiles>
PathKernels make(const char* name) {
  PathKernels k = *avx512_dot_kernels();
  k.name = name;
  k.blocks_per_chunk = kMaxVectors;
  k.wino_item = &item<Tiles, kWinoStride1>;
  k.wino2_item = &item<Tiles, kWinoStride2>;
  k.wino_block_tiles = kMaxTiles;
  k.wino_quad_align = 16;
  k.stage_rows = cpu_avx512_gfni() ? &phased_stage_rows_gfni : &phased_stage_rows;
  k.phased_run = &phased_run<Tiles>;
  k.fused_stage = true;
  k.side_prepare = nullptr;  // its tile GEMMs take no quantize work between their steps
  k.side_finish = nullptr;
  return k;
}

}  // namespace amx
}  // namespace

const PathKernels* amx_kernels(bool emulated) {
  static const PathKernels hardware = amx::make<amx::AmxHardware>("amx");
  static const PathKernels model = amx::make<amx::AmxEmulated>("amx (emulated)");
  return emulated ? &model : &hardware;
}

Int8ConvBlocksFn amx_int8_conv_blocks(bool emulated) {
  return emulated ? &amx::int8_blocks<amx::AmxEmulated> : &amx::int8_blocks<amx::AmxHardware>;
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
const PathKernels* amx_kernels(bool) { return nullptr; }
Int8ConvBlocksFn amx_int8_conv_blocks(bool) { return nullptr; }
}  // namespace n2uq_core

#endif
