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

// Whether some tap reads column phase `phase` ((kw * dilation_width) % stride_width).
inline bool dot_phase_read(const ConvJob& j, int64_t phase) {
  for (int64_t kw = 0; kw < j.kernel_width; ++kw)
    if (kw * j.dilation_width % j.stride_width == phase) return true;
  return false;
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
