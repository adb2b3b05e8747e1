// Dot path: integer dot products on byte codes, instantiated once per ISA file with that
// file's vector ops. Include this after the file's target options and inside an anonymous
// namespace, after defining a struct `DotOps` with
//   kLanes            output channels per weight vector (ConvJob::dot_lanes);
//   kBlocksPerChunk   weight vectors per work item (R <= this);
//   max_pixels(R)     constexpr: output pixels per register block with R weight vectors;
//   Acc, Wv, Av       accumulator (int32 x kLanes), weight vector, broadcast activations;
//   zero(), load_weights(const int8_t*) (kLanes x 4 bytes), broadcast4(const uint8_t*)
//   (one channel quad of one pixel), dot(Acc, Av, Wv) (acc + 4 products per lane: u8 code
//   x s8 weight), Out out(const ConvJob&, int64_t oc0, int valid) (what the stores of `valid`
//   channels from oc0 share: outputs, mask, multiplier and bias) and store(const Out&, int64_t
//   index, Acc) (int32 and/or float outputs of those channels at element `index`);
//   codes64(const uint64_t* planes, int64_t words, int act_bits, uint64_t tail, uint8_t* out)
//   (the 64 codes of one channel word from its bit planes; planes[p * words] is plane p).
// No standard-library headers here (see kernel_table.h).
//
// Integer view: activation code m in 0..2^a - 1, weight code k in 0..2^w - 1, and
//   acc = 2 * sum(m * k) - n_w * sum(m) = sum(m * (2k - n_w)),
// a u8 x s8 dot product with w' = 2k - n_w in [-15, 15] (the plan stores w', so there is
// no correction term), exact in int32 (check_accumulator bounds it).
//
// Staged input (dot_stage_rows): per input row, stride_width phases; per phase and 64-channel
// word, the 64 codes of every padded column in a row of code_columns:
//   stage[row][phase][word][column][64],
// padded column c = column * stride_width + phase, zero in the padding and past the
// channels. Tap (kh, kw) of output column ow reads column ow + (kw * dilation_width) /
// stride_width of phase (kw * dilation_width) % stride_width (code_tap_columns), so the P
// pixels of a register block are 64 bytes apart: one pointer per tap, channel quad j of a
// word at + 4j, pixel p at + 64p. Staging is one 64-byte store per pixel and word.

inline int64_t dot_word_stride(const ConvJob& j) { return j.code_columns * 64; }
inline int64_t dot_phase_stride(const ConvJob& j) { return dot_word_stride(j) * j.words; }
inline int64_t dot_row_stride(const ConvJob& j) { return dot_phase_stride(j) * j.stride_width; }

// Whether some output row reads input row ih: ih + pad_top = oh * stride_height + kh *
// dilation_height for a valid (oh, kh). At stride 2 a 1x1 kernel reads every other row.
inline bool dot_row_read(const ConvJob& j, int64_t ih) {
  const int64_t padded = ih + j.pad_top;
  for (int64_t kh = 0; kh < j.kernel_height; ++kh) {
    const int64_t rest = padded - kh * j.dilation_height;
    if (rest < 0) break;
    if (rest % j.stride_height == 0 && rest / j.stride_height < j.out_height) return true;
  }
  return false;
}

// Whether some tap of a kernel dimension (size k, dilation d, stride st) reads phase `phase`.
inline bool dot_dimension_phase_read(int64_t k, int64_t d, int64_t st, int64_t phase) {
  for (int64_t i = 0; i < k; ++i)
    if (i * d % st == phase) return true;
  return false;
}

// Whether some tap reads column phase `phase` ((kw * dilation_width) % stride_width).
inline bool dot_phase_read(const ConvJob& j, int64_t phase) {
  return dot_dimension_phase_read(j.kernel_width, j.dilation_width, j.stride_width, phase);
}

// Only the rows and column phases that dot_block reads are staged (the rest of the stage
// keeps stale bytes, never read): a strided 1x1 conv stages 1 / (stride_h * stride_w) of it.
template <class O>
void dot_stage_rows(const ConvJob& j, int64_t begin, int64_t end) {
  const int64_t words = j.words, act_bits = j.act_bits, in_width = j.in_width, stride = j.stride_width;
  const int64_t word_stride = dot_word_stride(j), phase_stride = dot_phase_stride(j), row_stride = dot_row_stride(j);
  const int rem = j.in_channels % 64;
  const uint64_t tail = rem == 0 ? ~0ull : ((1ull << rem) - 1);  // input bits above C are garbage
  // Phases read, as a bit mask (all phases where the stride is too large for one).
  uint64_t phases = stride > 64 ? ~0ull : 0;
  for (int64_t p = 0; p < stride && p < 64; ++p)
    if (dot_phase_read(j, p)) phases |= 1ull << p;
  for (int64_t row = begin; row < end; ++row) {
    if (!dot_row_read(j, row % j.in_height)) continue;
    uint8_t* stage = j.code_stage + row * row_stride;
    for (int64_t c = 0; c < j.padded_width; ++c) {  // padding columns: code 0
      if (c >= j.pad_left && c < j.pad_left + in_width) continue;
      if (c % stride < 64 && !((phases >> (c % stride)) & 1)) continue;
      uint8_t* dst = stage + (c % stride) * phase_stride + (c / stride) * 64;
      for (int64_t w = 0; w < words; ++w)
        for (int b = 0; b < 64; ++b) dst[w * word_stride + b] = 0;
    }
    const uint64_t* src = j.input + row * in_width * act_bits * words;
    for (int64_t x = 0; x < in_width; ++x, src += act_bits * words) {
      const int64_t c = x + j.pad_left;
      if (c % stride < 64 && !((phases >> (c % stride)) & 1)) continue;
      uint8_t* dst = stage + (c % stride) * phase_stride + (c / stride) * 64;
      for (int64_t w = 0; w < words; ++w)
        O::codes64(src + w, words, (int)act_bits, w == words - 1 ? tail : ~0ull, dst + w * word_stride);
    }
  }
}

// Weights of a chunk (ConvJob::dot_weights, see build_dot_weights in core.cc):
// [chunk][KH][KW][quad][R][kLanes][4], R = the chunk's blocks, so one pointer walks them.
template <class O, int P, int R>
void dot_block(const ConvJob& j, int64_t n, int64_t oh, int64_t ow0, int64_t chunk) {
  typedef typename O::Acc Acc;
  typedef typename O::Wv Wv;
  typedef typename O::Av Av;
  Acc acc[P][R];
  for (int p = 0; p < P; ++p)
    for (int r = 0; r < R; ++r) acc[p][r] = O::zero();
  const int64_t quads = j.quads, words = j.words, word_stride = dot_word_stride(j), row_stride = dot_row_stride(j);
  constexpr int64_t kStep = (int64_t)R * O::kLanes * 4;  // weight bytes per quad
  const int64_t taps = (int64_t)j.kernel_height * j.kernel_width;
  const int8_t* const weights = j.dot_weights + chunk * j.dot_chunk_blocks * taps * quads * O::kLanes * 4;
  for (int64_t kh = 0; kh < j.kernel_height; ++kh) {
    const int64_t ih = oh * j.stride_height + kh * j.dilation_height - j.pad_top;
    if (ih < 0 || ih >= j.in_height) continue;  // zero padding: m = 0 adds nothing
    const uint8_t* row = j.code_stage + (n * j.in_height + ih) * row_stride + ow0 * 64;
    for (int64_t kw = 0; kw < j.kernel_width; ++kw) {
      const int8_t* w = weights + (kh * j.kernel_width + kw) * quads * kStep;
      const uint8_t* word = row + j.code_tap_columns[kw];
      for (int64_t wd = 0; wd < words; ++wd, word += word_stride) {
        const int64_t in_word = quads - wd * 16 < 16 ? quads - wd * 16 : 16;
        const uint8_t* a = word;
        // Unrolled by 2: half the loop overhead and exit mispredictions of the 16-quad words.
        int64_t q = 0;
        for (; q + 2 <= in_word; q += 2, a += 8, w += 2 * kStep)
          for (int half = 0; half < 2; ++half) {
            Wv wv[R];
            for (int r = 0; r < R; ++r) wv[r] = O::load_weights(w + half * kStep + r * O::kLanes * 4);
            for (int p = 0; p < P; ++p) {
              const Av av = O::broadcast4(a + 4 * half + 64 * p);
              for (int r = 0; r < R; ++r) acc[p][r] = O::dot(acc[p][r], av, wv[r]);
            }
          }
        if (q < in_word) {
          Wv wv[R];
          for (int r = 0; r < R; ++r) wv[r] = O::load_weights(w + r * O::kLanes * 4);
          for (int p = 0; p < P; ++p) {
            const Av av = O::broadcast4(a + 64 * p);
            for (int r = 0; r < R; ++r) acc[p][r] = O::dot(acc[p][r], av, wv[r]);
          }
          w += kStep;
        }
      }
    }
  }
  // The per-channel part of the stores once per weight vector, not per pixel: with few taps
  // and channels (a 1x1 conv on 64 channels has 16 quads per accumulator) it is a large share.
  const int64_t oc_begin = chunk * j.dot_chunk_blocks * O::kLanes;
  const int64_t first = ((n * j.out_height + oh) * j.out_width + ow0) * j.out_channels;
  for (int r = 0; r < R; ++r) {
    const int64_t oc0 = oc_begin + (int64_t)r * O::kLanes;
    const int64_t left = j.out_channels - oc0;
    const typename O::Out out = O::out(j, oc0, left < O::kLanes ? (int)left : O::kLanes);
    for (int p = 0; p < P; ++p) O::store(out, first + p * j.out_channels + oc0, acc[p][r]);
  }
}

typedef void (*DotBlockFn)(const ConvJob&, int64_t, int64_t, int64_t, int64_t);

template <class O, int P, int R>
struct DotBlocks {
  static void fill(DotBlockFn* table) {
    table[P] = &dot_block<O, P, R>;
    DotBlocks<O, P - 1, R>::fill(table);
  }
};
template <class O, int R>
struct DotBlocks<O, 0, R> {
  static void fill(DotBlockFn*) {}
};

// Runs one output row of one chunk with R weight vectors: the row in equal blocks of at
// most max_pixels(R) pixels (56 = 8 x 7 with a limit of 7), so no pixel is wasted.
template <class O, int R>
void dot_row(const ConvJob& j, int64_t n, int64_t oh, int64_t chunk) {
  constexpr int kMax = O::max_pixels(R);
  DotBlockFn blocks[kMax + 1];
  DotBlocks<O, kMax, R>::fill(blocks);
  const int64_t width = j.out_width;
  const int64_t count = (width + kMax - 1) / kMax;
  const int64_t base = width / count, longer = width % count;
  for (int64_t b = 0, x = 0; b < count; ++b) {
    const int64_t pixels = base + (b < longer ? 1 : 0);
    blocks[pixels](j, n, oh, x, chunk);
    x += pixels;
  }
}

template <class O>
void dot_item(const ConvJob& j, int64_t item, int /*slot*/) {
  const int64_t chunk = item % j.oc_chunks, row = item / j.oc_chunks;
  const int64_t oh = row % j.out_height, n = row / j.out_height;
  const int64_t left = j.oc_blocks - chunk * j.dot_chunk_blocks;
  const int blocks = left < j.dot_chunk_blocks ? (int)left : j.dot_chunk_blocks;
  static_assert(O::kBlocksPerChunk >= 1 && O::kBlocksPerChunk <= 4, "1..4 weight vectors per chunk");
  switch (blocks) {
    case 1: dot_row<O, 1>(j, n, oh, chunk); break;
    case 2: if (O::kBlocksPerChunk >= 2) dot_row<O, (O::kBlocksPerChunk >= 2 ? 2 : 1)>(j, n, oh, chunk); break;
    case 3: if (O::kBlocksPerChunk >= 3) dot_row<O, (O::kBlocksPerChunk >= 3 ? 3 : 1)>(j, n, oh, chunk); break;
    case 4: if (O::kBlocksPerChunk >= 4) dot_row<O, (O::kBlocksPerChunk >= 4 ? 4 : 1)>(j, n, oh, chunk); break;
    default: break;
  }
}

// ---- Winograd form F(2x2, 3x3) for any DotOps (3x3, stride 1, dilation 1). The derivation,
// the byte ranges and the data layout are those of the AVX-512 version (isa_avx512_dot.cc,
// ConvJob in kernel_table.h), so core.cc's plan and weights serve every ISA: V8 = B^T d B +
// 2M in [0, 90] (u8, and valid s8 for SDOT), U = G q G^T in [-72, 72] (s8). Transforms are
// plain byte loops the compiler vectorizes under the file's target options; byte arithmetic
// wraps, which is exact since every final value is in [0, 90].

// Padded code rows [begin, end) of the N * wino_code_rows and each pixel's code sum.
template <class O>
void wino_codes_generic(const ConvJob& j, int64_t begin, int64_t end) {
  const int64_t words = j.words, act_bits = j.act_bits, cw = words * 64;
  const int rem = j.in_channels % 64;
  const uint64_t tail = rem == 0 ? ~0ull : ((1ull << rem) - 1);
  for (int64_t row = begin; row < end; ++row) {
    const int64_t n = row / j.wino_code_rows, ih = row % j.wino_code_rows - j.pad_top;
    uint8_t* dst = j.wino_codes + row * j.wino_code_cols * cw;
    // Pixel sums only where wino_pixel_sums is set (the stride-1 form's per-tile terms).
    int32_t* sums = j.wino_pixel_sums != nullptr ? j.wino_pixel_sums + row * j.wino_code_cols : nullptr;
    for (int64_t c = 0; c < j.wino_code_cols; ++c, dst += cw) {
      const int64_t iw = c - j.pad_left;
      if (ih < 0 || ih >= j.in_height || iw < 0 || iw >= j.in_width) {
        for (int64_t b = 0; b < cw; ++b) dst[b] = 0;
        if (sums != nullptr) sums[c] = 0;
        continue;
      }
      const uint64_t* src = j.input + ((n * j.in_height + ih) * j.in_width + iw) * act_bits * words;
      int32_t sum = 0;  // <= 15 * channels, in int32 (wino_fits bounds channels far below)
      for (int64_t w = 0; w < words; ++w) {
        uint8_t* out = dst + w * 64;
        O::codes64(src + w, words, (int)act_bits, w == words - 1 ? tail : ~0ull, out);
        for (int b = 0; b < 64; ++b) sum += out[b];
      }
      if (sums != nullptr) sums[c] = sum;
    }
  }
}

// V8 = B^T d B + 2M of 64 channel bytes (one word of one tile): B^T d over rows, then over
// columns, in GCC vector types of 32 bytes (one ymm on AVX2, two registers elsewhere; plain
// loops here stayed scalar).
typedef uint8_t WinoBytes __attribute__((vector_size(32)));

inline void transform64(const uint8_t* base, int64_t row_step, int64_t col_step, uint8_t* out, int64_t out_step,
                        uint8_t offset) {
  for (int half = 0; half < 2; ++half) {
    WinoBytes d[4][4], u[4][4];
    for (int r = 0; r < 4; ++r)
      for (int c = 0; c < 4; ++c) __builtin_memcpy(&d[r][c], base + r * row_step + c * col_step + 32 * half, 32);
    for (int c = 0; c < 4; ++c) {
      u[0][c] = d[0][c] - d[2][c];
      u[1][c] = d[1][c] + d[2][c];
      u[2][c] = d[2][c] - d[1][c];
      u[3][c] = d[1][c] - d[3][c];
    }
    for (int a = 0; a < 4; ++a) {
      const WinoBytes v[4] = {u[a][0] - u[a][2] + offset, u[a][1] + u[a][2] + offset, u[a][2] - u[a][1] + offset,
                              u[a][1] - u[a][3] + offset};
      for (int b = 0; b < 4; ++b) __builtin_memcpy(out + (a * 4 + b) * out_step + 32 * half, &v[b], 32);
    }
  }
}

// Input transforms of tiles [begin, end) of the N * wino_tiles_h * wino_tiles_w: V8 per tile and
// channel byte, and the tile's correction terms A^T (s U1 sum_c V) A.
template <class O>
void wino_transform_generic(const ConvJob& j, int64_t begin, int64_t end) {
  const int64_t words = j.words, cw = words * 64, cols = j.wino_code_cols, tiles = j.wino_tiles;
  const uint8_t offset = (uint8_t)(2 * ((1 << j.act_bits) - 1));
  for (int64_t t = begin; t < end; ++t) {
    const int64_t tr = t / j.wino_tiles_w, tx = t % j.wino_tiles_w;
    const int64_t n = tr / j.wino_tiles_h, ty = tr % j.wino_tiles_h;
    const uint8_t* base = j.wino_codes + ((n * j.wino_code_rows + 2 * ty) * cols + 2 * tx) * cw;
    for (int64_t w = 0; w < words; ++w)
      transform64(base + w * 64, cols * cw, cw, j.wino_v + t * cw + w * 64, tiles * cw, offset);
    wino_tile_terms(j, t, n, ty, tx);
  }
}

// One position of a register block: z[p * R + r] = sum over the quads of tile p's V8 (at a + p *
// cw) times weight vector r ([quad][R][kLanes][4] from w). Out of line so the accumulators stay
// in registers (the AVX-512 version found GCC spilling them when the epilogue was inlined).
template <class O, int P, int R>
__attribute__((noinline)) void wino_gemm_generic(const uint8_t* a, int64_t cw, const int8_t* w, int64_t quads,
                                                 int32_t* z) {
  typedef typename O::Acc Acc;
  typedef typename O::Wv Wv;
  typedef typename O::Av Av;
  constexpr int64_t kStep = (int64_t)R * O::kLanes * 4;
  // Every loop over P and R unrolled whole: otherwise GCC 12 kept a copy of the accumulators
  // on the stack, stored every iteration.
  Acc acc[P][R];
#pragma GCC unroll 16
  for (int p = 0; p < P; ++p)
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) acc[p][r] = O::zero();
  for (int64_t q = 0; q < quads; ++q, w += kStep) {
    Wv wv[R];
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) wv[r] = O::load_weights(w + r * O::kLanes * 4);
#pragma GCC unroll 16
    for (int p = 0; p < P; ++p) {
      const Av av = O::broadcast4(a + p * cw + 4 * q);
#pragma GCC unroll 4
      for (int r = 0; r < R; ++r) acc[p][r] = O::dot(acc[p][r], av, wv[r]);
    }
  }
#pragma GCC unroll 16
  for (int p = 0; p < P; ++p)
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) __builtin_memcpy(z + (p * R + r) * O::kLanes, &acc[p][r], sizeof(Acc));
}

// The output stage of both Winograd forms for P tiles from t0 x R weight vectors of one chunk, in
// GCC vectors of the Acc's size (VU: int32 lane arrays written piecewise and read back as a whole
// Acc stalled store forwarding; unsigned, so wrapping is defined, the plan keeping the true values
// in int32): pixels(p, r, y) gives tile p's sums y[2i + jx] for vector r before the channel
// correction; finish(value, t, pixel) the output from sum plus correction; then O::store of the
// pixels inside the output.
template <class O, int R, class Pixels, class Finish>
inline void wino_output_stage_generic(const ConvJob& j, int64_t t0, int P, int64_t chunk, Pixels pixels,
                                      Finish finish) {
  typedef typename O::Acc Acc;
  constexpr int L = O::kLanes;
  typedef uint32_t VU __attribute__((vector_size(4 * L)));
  static_assert(sizeof(VU) == sizeof(Acc), "an Acc is kLanes int32 lanes");
  const int64_t oc_padded = int64_t(j.oc_blocks) * L, oc_begin = chunk * j.dot_chunk_blocks * L;
  const int64_t out_height = j.out_height, out_width = j.out_width, out_channels = j.out_channels;
  const int64_t tiles_w = j.wino_tiles_w, per_image = int64_t(j.wino_tiles_h) * tiles_w;
  for (int r = 0; r < R; ++r) {
    const int64_t oc0 = oc_begin + r * L, left = out_channels - oc0;
    const int valid = left < L ? (int)left : L;
    const typename O::Out out = O::out(j, oc0, valid);
    const int32_t* bias4 = j.wino_bias + oc0;  // [4][oc_padded]: each output pixel's channel term
    for (int p = 0; p < P; ++p) {
      const int64_t t = t0 + p, n = t / per_image, ty = t % per_image / tiles_w, tx = t % tiles_w;
      VU y[4];
      pixels(p, r, y);
      for (int i = 0; i < 2; ++i) {
        const int64_t oy = 2 * ty + i;
        if (oy >= out_height) continue;
        for (int jx = 0; jx < 2; ++jx) {
          const int64_t ox = 2 * tx + jx;
          if (ox >= out_width) continue;
          VU bias;
          __builtin_memcpy(&bias, bias4 + (2 * i + jx) * oc_padded, sizeof(VU));
          const VU value = finish(y[2 * i + jx] + bias, t, 2 * i + jx);
          Acc acc;
          __builtin_memcpy(&acc, &value, sizeof(value));
          O::store(out, ((n * out_height + oy) * out_width + ox) * out_channels + oc0, acc);
        }
      }
    }
  }
}

// One register block: P tiles from t0 x R weight vectors of one chunk, all 16 positions, then
// the output transform (on int32 lanes), the corrections, / 4, and O::store as the direct form.
template <class O, int P, int R>
void wino_block_generic(const ConvJob& j, int64_t t0, int64_t chunk) {
  constexpr int L = O::kLanes;
  typedef uint32_t VU __attribute__((vector_size(4 * L)));
  typedef int32_t VS __attribute__((vector_size(4 * L)));
  const int64_t cw = int64_t(j.words) * 64, quads = j.quads;
  const int8_t* const weights = j.dot_weights + chunk * j.dot_chunk_blocks * 16 * quads * L * 4;
  // The position sums as int32 lanes, written whole by the GEMM and read whole by the
  // transform (copying them lane by lane cost a store-forwarding stall per vector).
  alignas(64) int32_t z[16][P][R][L];
  for (int x = 0; x < 16; ++x)
    wino_gemm_generic<O, P, R>(j.wino_v + (x * j.wino_tiles + t0) * cw, cw, weights + x * quads * R * L * 4, quads,
                               &z[x][0][0][0]);
  const int32_t* const terms = j.wino_tile_terms;
  wino_output_stage_generic<O, R>(
      j, t0, P, chunk,
      [&](int p, int r, VU* y) {
        VU zs[16];  // s * 2 acc
#pragma GCC unroll 16
        for (int x = 0; x < 16; ++x) {
          __builtin_memcpy(&zs[x], &z[x][p][r][0], sizeof(VU));
          zs[x] = zs[x] << (1 + kWinoShift[x]);
        }
        for (int i = 0; i < 2; ++i) {
          VU u[4];  // A^T (s * 2 acc): over rows
#pragma GCC unroll 4
          for (int b = 0; b < 4; ++b)
            u[b] = i == 0 ? zs[b] + zs[4 + b] + zs[8 + b] : zs[4 + b] - zs[8 + b] - zs[12 + b];
          y[2 * i] = u[0] + u[1] + u[2];
          y[2 * i + 1] = u[1] - u[2] - u[3];
        }
      },
      [&](VU value, int64_t t, int pixel) {  // + the per-tile term, / 4 (signed; exact: a multiple of 4)
        return (VU)((VS)(value + (uint32_t)terms[t * 4 + pixel]) >> 2);
      });
}

// ---- Stride-2 form (3x3, stride 2, dilation 1) for any DotOps: the derivation and layout are
// those of the AVX-512 version (isa_avx512_dot.cc): V8 = T d T^T + 2M in [0, 60], U = G w' G^T
// in [-60, 60], Y = A Z A^T + wino_bias, no per-tile term.

// Input transforms of tiles [begin, end) of the N * wino_tiles_h * wino_tiles_w, the codes taken
// straight from the packed input (as the AVX-512 version).
template <class O>
void wino2_transform_generic(const ConvJob& j, int64_t begin, int64_t end) {
  const int64_t words = j.words, cw = words * 64, act_bits = j.act_bits, pixel_words = act_bits * words;
  const int rem = j.in_channels % 64;
  const uint64_t tail = rem == 0 ? ~0ull : ((1ull << rem) - 1);
  const uint8_t offset = (uint8_t)(2 * ((1 << act_bits) - 1));
  alignas(64) uint8_t codes[5][5][64];
  const int64_t tiles_w = j.wino_tiles_w;
  for (int64_t tr = begin / tiles_w; tr * tiles_w < end; ++tr) {
    const int64_t n = tr / j.wino_tiles_h, ty = tr % j.wino_tiles_h, ih0 = 4 * ty - j.pad_top;
    const int64_t tx_begin = begin > tr * tiles_w ? begin - tr * tiles_w : 0;
    const int64_t tx_end = end < (tr + 1) * tiles_w ? end - tr * tiles_w : tiles_w;
    for (int64_t w = 0; w < words; ++w) {
      for (int64_t tx = tx_begin; tx < tx_end; ++tx) {
        const int64_t t = tr * tiles_w + tx, iw0 = 4 * tx - j.pad_left;
        // Neighbouring tiles share a column of codes: the last one's last is this one's first.
        if (tx > tx_begin)
          for (int r = 0; r < 5; ++r) __builtin_memcpy(codes[r][0], codes[r][4], 64);
        for (int r = 0; r < 5; ++r)
          for (int c = tx == tx_begin ? 0 : 1; c < 5; ++c) {
            const int64_t ih = ih0 + r, iw = iw0 + c;
            if (ih < 0 || ih >= j.in_height || iw < 0 || iw >= j.in_width) {
              __builtin_memset(codes[r][c], 0, 64);
              continue;
            }
            const uint64_t* src = j.input + ((n * j.in_height + ih) * j.in_width + iw) * pixel_words + w;
            O::codes64(src, words, (int)act_bits, w == words - 1 ? tail : ~0ull, codes[r][c]);
          }
        for (int half = 0; half < 2; ++half) {
          WinoBytes u[5][5];
          for (int c = 0; c < 5; ++c) {  // T d: over rows
            WinoBytes d[5];
            for (int r = 0; r < 5; ++r) __builtin_memcpy(&d[r], codes[r][c] + 32 * half, 32);
            u[0][c] = d[0] - d[2];
            u[1][c] = d[2];
            u[2][c] = d[4] - d[2];
            u[3][c] = d[1];
            u[4][c] = d[3];
          }
          for (int a = 0; a < 5; ++a) {  // (T d) T^T: over columns, + 2M
            const WinoBytes v[5] = {u[a][0] - u[a][2] + offset, u[a][2] + offset, u[a][4] - u[a][2] + offset,
                                    u[a][1] + offset, u[a][3] + offset};
            for (int b = 0; b < 5; ++b)
              __builtin_memcpy(j.wino_v + (t * kWinoPositions2 + kWino2Slot[a * 5 + b]) * cw + w * 64 + 32 * half,
                               &v[b], 32);
          }
        }
      }
    }
  }
}

// One register block: P tiles from t0 x R weight vectors of one chunk, one GEMM per class (as the
// AVX-512 version), then the output transform (int32 lanes), the channel correction and O::store.
template <class O, int P, int R>
void wino2_block_generic(const ConvJob& j, int64_t t0, int64_t chunk) {
  constexpr int L = O::kLanes;
  typedef uint32_t VU __attribute__((vector_size(4 * L)));
  const int64_t cw = int64_t(j.words) * 64, quads = cw / 4;
  const int8_t* const weights = j.dot_weights + chunk * j.dot_chunk_blocks * kWinoPositions2 * quads * L * 4;
  const uint8_t* const v = j.wino_v + t0 * kWinoPositions2 * cw;
  alignas(64) int32_t z[9][P][R][L];
  for (int c = 0; c < 9; ++c) {
    const int begin = kWino2ClassStart[c], count = kWino2ClassStart[c + 1] - begin;
    wino_gemm_generic<O, P, R>(v + begin * cw, kWinoPositions2 * cw, weights + begin * quads * R * L * 4,
                               count * quads, &z[c][0][0][0]);
  }
  wino_output_stage_generic<O, R>(
      j, t0, P, chunk,
      [&](int p, int r, VU* y) {
        VU zs[9];
#pragma GCC unroll 9
        for (int c = 0; c < 9; ++c) __builtin_memcpy(&zs[c], &z[c][p][r][0], sizeof(VU));
        for (int i = 0; i < 2; ++i) {  // output row i takes row parts i and i + 1
          VU u[3];
#pragma GCC unroll 3
          for (int c = 0; c < 3; ++c) u[c] = zs[3 * i + c] + zs[3 * (i + 1) + c];
          y[2 * i] = u[0] + u[1];
          y[2 * i + 1] = u[1] + u[2];
        }
      },
      [](VU value, int64_t, int) { return value; });
}

// ---- Register blocks, runs and items of both Winograd forms.

typedef void (*WinoBlockFn)(const ConvJob&, int64_t, int64_t);

// One register block of either form (kernel_table.h's WinoForm: FORM 1 or 2).
template <class O, int FORM, int P, int R>
void wino_form_block_generic(const ConvJob& j, int64_t t0, int64_t chunk) {
  if (FORM == kWinoStride2)
    wino2_block_generic<O, P, R>(j, t0, chunk);
  else
    wino_block_generic<O, P, R>(j, t0, chunk);
}

template <class O, int FORM, int P, int R>
struct WinoBlocksGeneric {
  static void fill(WinoBlockFn* table) {
    table[P] = &wino_form_block_generic<O, FORM, P, R>;
    WinoBlocksGeneric<O, FORM, P - 1, R>::fill(table);
  }
};
template <class O, int FORM, int R>
struct WinoBlocksGeneric<O, FORM, 0, R> {
  static void fill(WinoBlockFn*) {}
};

// Block `block` of the plan's wino_tile_blocks equal blocks of tiles, in equal register blocks
// of at most max_pixels(R) tiles (the plan's blocks may be larger than this ISA's registers).
template <class O, int FORM, int R>
void wino_run_generic(const ConvJob& j, int64_t block, int64_t chunk) {
  constexpr int kMax = O::max_pixels(R);
  WinoBlockFn blocks[kMax + 1];
  WinoBlocksGeneric<O, FORM, kMax, R>::fill(blocks);
  const int64_t count = j.wino_tile_blocks, base = j.wino_block_span / count, longer = j.wino_block_span % count;
  const int64_t t0 = j.wino_block_first + block * base + (block < longer ? block : longer);
  const int64_t size = base + (block < longer ? 1 : 0);
  const int64_t parts = (size + kMax - 1) / kMax;
  if (parts == 0) return;
  const int64_t part = size / parts, part_longer = size % parts;
  for (int64_t b = 0, t = t0; b < parts; ++b) {
    const int64_t tiles = part + (b < part_longer ? 1 : 0);
    blocks[tiles](j, t, chunk);
    t += tiles;
  }
}

// Item chunk * wino_tile_blocks + block of either form.
template <class O, int FORM>
void wino_item_generic(const ConvJob& j, int64_t item, int /*slot*/) {
  const int64_t chunk = item / j.wino_tile_blocks, block = item % j.wino_tile_blocks;
  const int64_t left = j.oc_blocks - chunk * j.dot_chunk_blocks;
  switch (left < j.dot_chunk_blocks ? (int)left : j.dot_chunk_blocks) {
    case 1: wino_run_generic<O, FORM, 1>(j, block, chunk); break;
    case 2: if (O::kBlocksPerChunk >= 2) wino_run_generic<O, FORM, (O::kBlocksPerChunk >= 2 ? 2 : 1)>(j, block, chunk); break;
    case 3: if (O::kBlocksPerChunk >= 3) wino_run_generic<O, FORM, (O::kBlocksPerChunk >= 3 ? 3 : 1)>(j, block, chunk); break;
    case 4: if (O::kBlocksPerChunk >= 4) wino_run_generic<O, FORM, (O::kBlocksPerChunk >= 4 ? 4 : 1)>(j, block, chunk); break;
    default: break;
  }
}

template <class O>
PathKernels make_dot_kernels(const char* name) {
  PathKernels k = {};
  k.name = name;
  k.lanes = O::kLanes;
  k.lanes_wide = O::kLanes;
  k.stage_rows = &dot_stage_rows<O>;
  k.item = &dot_item<O>;
  k.blocks_per_chunk = O::kBlocksPerChunk;
  return k;
}

// The dot kernels plus the generic Winograd form.
template <class O>
PathKernels make_dot_kernels_wino(const char* name) {
  PathKernels k = make_dot_kernels<O>(name);
  k.wino_codes = &wino_codes_generic<O>;
  k.wino_transform = &wino_transform_generic<O>;
  k.wino_item = &wino_item_generic<O, kWinoStride1>;
  k.wino2_transform = &wino2_transform_generic<O>;
  k.wino2_item = &wino_item_generic<O, kWinoStride2>;
  return k;
}
