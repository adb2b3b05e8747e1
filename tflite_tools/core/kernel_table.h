// Internal interface between the dispatcher (core.cc) and the per-ISA kernel files.
// Plain structs and function pointers only: the ISA files are compiled with wider
// target options and must not instantiate standard-library templates, or the linker
// could pick an AVX-512 copy of a shared inline function for code that runs anywhere.
#ifndef N2UQ_KERNEL_TABLE_H_
#define N2UQ_KERNEL_TABLE_H_

#include <stdint.h>

namespace n2uq_core {

// Output pixels per conv work item: the item computes the receptive-field sums of m
// for these pixels on the stack, then reuses them across its output-channel blocks.
constexpr int kSegmentWidth = 64;
// Output channels per conv work item (several register blocks).
constexpr int kChannelChunk = 64;
// Output channels per depthwise accumulation pass (stack arrays).
constexpr int kDepthwiseChunk = 256;
// Channel-lane conv path (kernels with conv_group_item): output channels per vector
// group, and groups per work item.
constexpr int kGroupLanes = 8;
constexpr int kGroupChunk = 8;

struct StageJob;  // below
struct QuantizeJob;
struct SideQuantize;

struct ConvJob {
  int32_t batch, in_height, in_width, in_channels, words;  // words = ceil(in_channels / 64)
  int32_t out_channels, kernel_height, kernel_width;
  int32_t stride_height, stride_width, dilation_height, dilation_width;
  int32_t pad_top, pad_left, out_height, out_width;
  int32_t act_bits, weight_bits;
  // Staged input: per input row, stride_width phases of the zero-padded row, each
  // [act_bits][words][stage_width] so that the words one tap needs for consecutive
  // output pixels are contiguous (vector lanes = output pixels).
  int64_t stage_width;
  int32_t segments, channel_chunks;  // work items = batch * out_height * segments * channel_chunks
  const uint64_t* input;   // packed [N][H][W][act_bits][words]
  const uint64_t* weights; // packed [OC][KH][KW][weight_bits][words]
  uint64_t* stage;         // [N][H][stride_width][act_bits][words][stage_width]
  int32_t* pixel_sums;     // [N][H][W]: sum_i 2^i popcount(plane i) = sum of codes at the pixel
  const float* multiplier;
  const float* bias;
  float* out_float;        // [N][OH][OW][OC] or null
  int32_t* out_int32;      // same, or null
  // Channel-lane path only (KernelTable::conv_group_item): vector lanes are kGroupLanes
  // output channels, so weights are regrouped; the input is staged as above.
  int32_t groups, group_chunks;    // groups = ceil(out_channels / kGroupLanes)
  const uint64_t* group_weights;   // [groups][KH][KW][words][weight_bits][kGroupLanes], zero past OC
  // [KH][KW][words]: offset of each (tap, word) step's staged words from the staged
  // base of kernel row 0 (input row oh * stride_height - pad_top) at output column 0.
  const int64_t* tap_offsets;
  // A fused output stage (StageJob, below) run in the conv's own output pass, or null: then the
  // conv writes out_float / out_int32. Only paths whose PathKernels::fused_stage is set take one.
  const StageJob* output_stage;
  // The conv quantizes its own input (n2uq_conv_plan_run_quantizing, core.cc's
  // run_wino2_quantizing): the quantizer of the float input, and the GEMMs' share of it (null
  // where the GEMMs have none).
  const QuantizeJob* input_quantize;
  SideQuantize* side_quantize;

  // ---- byte-code paths (dot and lut): one uint8 code per channel, columns zero-padded:
  // tap (kh, kw) of output column ow reads padded column ow * stride_width + kw *
  // dilation_width of input row oh * stride_height + kh * dilation_height - pad_top (rows
  // outside the input are skipped: m = 0 adds nothing).
  int64_t padded_width;   // in_width + pad_left + pad_right

  // Dot path (dot_impl.h): acc = sum m * w' with w' = 2k - n_w in [-15, 15] as int8, so the
  // output needs no correction term. Staged codes [N*H][stride_width][words][code_columns][64];
  // weights [chunk][KH][KW][quads][blocks of the chunk][dot_lanes][4], zero past in_channels
  // and out_channels. Work items: (n * out_height + oh) * oc_chunks + chunk.
  int64_t code_columns;   // ceil(padded_width / stride_width)
  uint8_t* code_stage;
  // [KW]: byte offset of kernel column kw's codes from the staged row base at output column
  // 0: (kw * dilation_width) % stride_width phases, (kw * dilation_width) / stride_width columns.
  const int64_t* code_tap_columns;
  int32_t quads;          // ceil(in_channels / 4)
  int32_t dot_lanes, oc_blocks, oc_chunks;
  int32_t dot_chunk_blocks;  // weight vectors per chunk (<= PathKernels::blocks_per_chunk), set by the plan
  const int8_t* dot_weights;

  // Winograd form of the dot path (3x3 kernels, stride 1, dilation 1; PathKernels::wino_item,
  // derivation in isa_avx512_dot.cc): output tiles of 2x2 pixels, tile t = (n * wino_tiles_h +
  // ty) * wino_tiles_w + tx. dot_weights are then [chunk][16][quads][blocks of the chunk][dot_lanes][4]
  // (the transformed weights U of q = k - 2^(weight_bits - 1)); quads rounded up to a multiple of
  // PathKernels::wino_quad_align with zero weights (amx: whole 64-channel words).
  //
  // Stride-2 form (3x3, stride 2, dilation 1; PathKernels::wino2_item, derivation in
  // isa_avx512_dot.cc): the same tiles and fields with 25 positions instead of 16, no code image
  // (the transforms read the packed input), wino_v [tiles][25 slots][words * 64] (V + 2M; slots: kWino2Order),
  // dot_weights [chunk][25 slots][16 * words quads][blocks][dot_lanes][4] holding U(w') itself
  // (zero past in_channels; no per-tile terms), and wino_bias the channel correction A (-2M
  // sum_c U) A^T.
  int32_t wino_tiles_h, wino_tiles_w, wino_tile_blocks;  // ceil(out / 2); register blocks of tiles
  int64_t wino_tiles;                                     // batch * tiles_h * tiles_w
  // The tiles the wino_tile_blocks register blocks divide: [first, first + span), all of them
  // unless the threads split the tiles (run_wino).
  int64_t wino_block_first, wino_block_span;
  // Where the kernels take it (PathKernels::wino_partial_last): 1 orders each image's tiles as
  // its whole tiles, then the last column's, the last row's and the corner (wino_tile_at), so
  // that a register block's tiles that need a position (or class) come first; 0: row-major.
  int32_t wino_partial_last;
  int64_t wino_code_rows, wino_code_cols;  // 2 * tiles + 2: the zero-padded code image of one batch item
  uint8_t* wino_codes;       // [N][code_rows][code_cols][words * 64] codes, zero outside the input
  uint8_t* wino_v;           // [16][tiles][words * 64] transformed input V + 2 (2^act_bits - 1), u8
  int32_t* wino_tile_terms;  // [tiles][4] per-tile correction A^T (s U1 sum_c V) A, per output pixel
  int32_t* wino_pixel_sums;  // [N][code_rows][code_cols] sum of the codes at each padded pixel
  const int32_t* wino_bias;  // [4][oc_blocks * dot_lanes] per-channel correction A^T (-s 4M sum_c U) A

  // Phased direct form (PathKernels::phased_run: the amx path's direct form, isa_amx.cc): the
  // zero-padded input of one image split into its stride phases, each phase and 64-channel word
  // one flat image of amx_cols columns,
  //   amx_stage[phase_y][phase_x][word][amx_plane_pixels][64] (codes of image amx_image),
  // pixel (r, c) of phase (py, px) = padded input pixel (r * stride_height + py, c * stride_width
  // + px). Output pixel (oh, ow) is virtual pixel q = oh * amx_cols + ow, and tap (kh, kw) reads
  // pixel q + ((kh * dilation_height) / stride_height) * amx_cols + (kw * dilation_width) /
  // stride_width of phase ((kh * dilation_height) % stride_height, (kw * dilation_width) %
  // stride_width): one byte offset per tap from the stage's base (amx_tap_offsets [KH * KW]),
  // the same for every q, so 16 consecutive virtual pixels are one tile of row stride 64.
  // Virtual pixels with ow >= out_width, or past out_height * amx_cols (up to amx_virtual, a
  // multiple of 32), are computed and dropped; the planes hold every pixel they read. Weights:
  // the direct dot layout with quads padded to whole words (16 per word) and kAmxDirectVectors
  // vectors per chunk. Each thread stages the plane rows its own pairs of 16-pixel tiles read
  // into its own stage (core.cc, run_phased).
  int64_t amx_cols, amx_virtual, amx_plane_rows, amx_plane_pixels, amx_image;
  uint8_t* amx_stage;
  const int64_t* amx_tap_offsets;
  // Int8 weights, loop order of a task (core.cc, run_phased): each pair over every chunk (its
  // staged rows stay in L1 while the weights stream from L2) instead of each chunk over every pair.
  bool amx_pairs_outer;
  // Compact weights of the phased direct form (null: dot_weights hold the layout's int8 bytes):
  // the layout with chunks of one vector, each 64-byte row as its 64 codes k = (w' + n_w) / 2 of
  // compact_bits (1, 2 or 4) bits in 8 * compact_bits bytes (compact_bits_for below); phased_run
  // expands each row just before its tile load (isa_amx.cc, compact_vectors).
  const uint8_t* compact_weights;
  int32_t compact_bits;

  // LUT path (see isa_avx512_dot.cc): per input pixel and group of kLutGroup input
  // channels a table of the 2^kLutGroup subset sums of their codes; weights are table
  // indices [chunk][KH][KW][lut_groups][blocks of the chunk][64] (lane = output channel x
  // weight plane). Work items are bands of up to lut_band output rows of one image; each
  // builds the tables of the input rows it reads into its thread's ring (per thread:
  // lut_thread_bytes at lut_tables + slot * lut_thread_bytes, 64-byte aligned):
  //   [lut_ring_rows int64: the input row each slot holds, padded to 64 bytes]
  //   [lut_ring_rows][padded_width][lut_groups * kLutTable + 64]: a pixel's tables, then its
  //   code sum (int32) at the start of the last 64 bytes; row ih in slot ih % lut_ring_rows;
  //   [lut_tile_bytes]: int32 partial sums of one register block's pixels, every channel;
  //   [lut_code_bytes]: one pixel's codes (64 per channel word, then 64 zero bytes).
  int32_t lut_groups, lut_blocks, lut_chunks, lut_band, lut_ring_rows;
  int64_t lut_tile_bytes, lut_code_bytes, lut_thread_bytes;
  uint8_t* lut_tables;
  const uint8_t* lut_indices;
};

// Forms of the dot path (N2uqConvPlan::wino): direct, Winograd F(2x2, 3x3) for 3x3 stride 1,
// and its polyphase stride-2 variant for 3x3 stride 2.
enum WinoForm { kWinoNone = 0, kWinoStride1 = 1, kWinoStride2 = 2 };
// Transformed positions per 2x2 output tile of each form.
constexpr int kWinoPositions1 = 16, kWinoPositions2 = 25;
// The stride-2 form's positions x = 5a + b in class order. Output pixel (i, jx) of a tile sums
// the positions with a in S_i and b in S_jx, S_0 = {0, 1, 3}, S_1 = {1, 2, 4} (isa_avx512_dot.cc),
// so positions whose row a falls in the same part of {0, 3} | {1} | {2, 4}, and column b likewise,
// meet the same output pixels: each of these 9 classes (row part * 3 + column part) is summed in
// one GEMM over all its positions' channels, and only 9 sums per tile reach the output transform.
// V8 is stored [tile][slot][channel bytes] and the weights [slot][quads] per chunk, slots in this
// order, so that a class is one contiguous run of quads.
constexpr int kWino2Order[kWinoPositions2] = {0,  3,  15, 18, 1,  16, 2,  4,  17, 19, 5,  8, 6,
                                              7,  9,  10, 13, 20, 23, 11, 21, 12, 14, 22, 24};
constexpr int kWino2ClassStart[10] = {0, 4, 6, 10, 12, 13, 15, 19, 21, 25};
// kWino2Slot[x]: the slot of position x, the inverse of kWino2Order.
struct Wino2Slots {
  int slot[kWinoPositions2];
  constexpr Wino2Slots() : slot() {
    for (int i = 0; i < kWinoPositions2; ++i) slot[kWino2Order[i]] = i;
  }
};
constexpr Wino2Slots kWino2Slots;
constexpr const int* kWino2Slot = kWino2Slots.slot;

// LUT path geometry: 6 input channels per table (VPERMB: a 64-byte table, a 6-bit index
// per byte lane, the table a memory operand).
constexpr int kLutGroup = 6;
constexpr int kLutTable = 1 << kLutGroup;
// Kernel rows and columns the LUT path handles (it keeps per-row pointers and per-column
// offsets), and output pixels per register block at most (the partial-sum tile's rows).
constexpr int kLutMaxKernelRows = 32;
constexpr int kLutMaxBlockPixels = 12;

struct DepthwiseJob {
  int32_t batch, in_height, in_width, in_channels, depth_multiplier, out_channels;
  int32_t kernel_height, kernel_width, stride_height, stride_width, dilation_height, dilation_width;
  int32_t pad_top, pad_left, out_height, out_width, weight_bits;
  const uint8_t* input;    // codes [N][H][W][C]
  const uint8_t* weights;  // codes [KH][KW][OC]
  const float* multiplier;
  const float* bias;
  float* out_float;
  int32_t* out_int32;
};

// Threshold table entries: 2^N2UQ_MAX_BITS - 1 thresholds, padded to a full 16-float vector.
constexpr int kThresholdTable = 16;

struct QuantizeJob {
  const float* x;
  int32_t channels, words, bits, num_thresholds;
  // The caller's thresholds sorted ascending, NaN replaced by +inf, padded with +inf to
  // kThresholdTable entries. code = #{i : x * beta1 > T_i} does not depend on their order,
  // and "s > NaN" and "s > +inf" are false for every s (NaN included), so this table gives
  // the same codes while letting the kernels binary-search it: with sorted T the
  // predicates s > T_i are nested, and bit b of the code is the outcome of one comparison.
  float thresholds[kThresholdTable];
  float beta1;
  uint8_t* out_codes;   // quantize_codes: one code per element
  uint64_t* out_packed; // quantize_and_pack: [positions][bits][words]
};

// Quantize-and-pack work that a conv's GEMMs do between their own steps (ConvJob::side_quantize):
// `left` pieces of 32 channels of the float input from x on, in order, into the packed codes
// (channels a multiple of 64): out is the current position's [bits][words] plane words, and `word`
// the next piece's index among their 32-bit halves (2 * words per plane). One piece every `every`
// GEMM steps (isa_avx512_dot.cc).
struct SideQuantize {
  alignas(64) float levels[5][16];  // the quantizer's threshold vectors (PathKernels::side_prepare)
  float beta1;
  const float* x;
  uint64_t* out;
  int32_t bits, words, word;
  int64_t left;
  int32_t every, countdown;
};

// A layer's output stage (n2uq_core.h, N2uqOutputStage) resolved for a conv's output pass
// (n2uq_conv_plan_run_stage): the conv computes y = multiplier * acc + bias per output, applies
// the steps in order, writes y to out_float after float_after steps (-1: no float output), and
// quantizes the final y into out_packed [positions][bits][words] (16 channels = one 16-bit part of
// a word) or out_codes [positions][channels]. Every operation is the float32 one of
// output_stage_impl.h, so the results equal the conv's float output run through n2uq_output_stage.
constexpr int kMaxStageSteps = 16;  // N2UQ_MAX_OUTPUT_STEPS
struct StageJob {
  int32_t num_steps;
  int32_t kinds[kMaxStageSteps];         // N2UQ_STEP_*
  const float* values[kMaxStageSteps];   // per channel [OC], the residual [positions][OC], or null
  int32_t float_after;
  float* out_float;
  int32_t quantize;                      // N2UQ_QUANTIZE_*
  QuantizeJob q;                         // bits, thresholds, beta1, words = ceil(OC / 64), outputs
};

struct KernelTable {
  const char* name;
  int lanes;
  // Stages input rows [begin, end) of the N*H rows and fills their pixel_sums.
  void (*conv_stage_rows)(const ConvJob&, int64_t begin, int64_t end);
  // Computes one work item (see ConvJob::segments / channel_chunks).
  void (*conv_item)(const ConvJob&, int64_t item);
  // Channel-lane path, both null where the ISA has none (input staged by conv_stage_rows).
  // Regroups job.weights of channel group g into grouped (layout of ConvJob::group_weights).
  void (*conv_group_weights)(const ConvJob&, uint64_t* grouped, int64_t g);
  // Computes item (n * out_height + oh) * group_chunks + chunk.
  void (*conv_group_item)(const ConvJob&, int64_t item);
  // One output row (n * out_height + oh).
  void (*depthwise_row)(const DepthwiseJob&, int64_t row);
  // Elements [begin, end) of x (channels = 1 view) -> out_codes.
  void (*quantize_codes)(const QuantizeJob&, int64_t begin, int64_t end);
  // Positions [begin, end) -> out_packed.
  void (*quantize_and_pack)(const QuantizeJob&, int64_t begin, int64_t end);
};

// A conv path beyond the bit-serial one (kernel_table.h's ConvJob fields of that path).
// Null where the build has none; core.cc checks the CPU features the path needs.
struct PathKernels {
  const char* name;
  // Dot path: output channels per weight vector (ConvJob::dot_lanes); LUT path: output
  // channels per index vector for weight_bits <= 2 and > 2 (64 lanes = channels x planes).
  int lanes, lanes_wide;
  // Stages input rows [begin, end) of the N*H rows (codes, or tables + pixel_sums).
  void (*stage_rows)(const ConvJob&, int64_t begin, int64_t end);
  // Computes one work item (dot: (n * out_height + oh) * oc_chunks + chunk; lut: a band);
  // `slot` is the running thread's index for per-thread scratch (0 .. num_threads - 1).
  void (*item)(const ConvJob&, int64_t item, int slot);
  // Output channel blocks (of `lanes`) per work item.
  int blocks_per_chunk;
  // Winograd form of the dot path (null where the ISA has none): codes of padded rows
  // [begin, end) of the N * wino_code_rows, transforms of tiles [begin, end) of the N *
  // wino_tiles_h * wino_tiles_w, and item chunk * wino_tile_blocks + block.
  void (*wino_codes)(const ConvJob&, int64_t begin, int64_t end);
  void (*wino_transform)(const ConvJob&, int64_t begin, int64_t end);
  void (*wino_item)(const ConvJob&, int64_t item, int slot);
  // The stride-2 form (null where the ISA has none): transforms of tiles [begin, end) of the N *
  // wino_tiles_h * wino_tiles_w from the packed input, and items as above.
  void (*wino2_transform)(const ConvJob&, int64_t begin, int64_t end);
  void (*wino2_item)(const ConvJob&, int64_t item, int slot);
  // The phased direct form (null where the direct form is the dot items; amx): stage_rows then
  // stages plane rows [begin, end) of the sh * sw * amx_plane_rows of image amx_image into
  // ConvJob::amx_stage, and this runs pairs [pair_begin, pair_end) of 16-pixel tiles of image n
  // for chunks [chunk_begin, chunk_end) from it. Weights have quads padded to whole words,
  // kAmxDirectVectors vectors per chunk.
  void (*phased_run)(const ConvJob&, int64_t n, int64_t chunk_begin, int64_t chunk_end, int64_t pair_begin,
                     int64_t pair_end);
  // Whether phased_run applies ConvJob::output_stage in its output pass (else the caller runs the stage
  // over the conv's float output).
  bool fused_stage;
  // Winograd tiles per item at most (0: the AVX-512 register-block maximum for the chunk's
  // blocks), and the multiple the weights' quads per position are padded to with zero weights
  // (0 or 1: none; the AMX form loads whole 64-channel words).
  int wino_block_tiles, wino_quad_align;
  // Whether both Winograd forms' transforms and output stages take tiles in
  // ConvJob::wino_partial_last order.
  bool wino_partial_last;
  // Quantize-and-pack inside the stride-2 form's GEMMs (null where the kernels have none):
  // side_prepare fills a SideQuantize's levels, beta1, bits and words from the quantizer;
  // side_finish quantizes the groups it has left.
  void (*side_prepare)(const QuantizeJob&, SideQuantize*);
  void (*side_finish)(SideQuantize*);
};

// The stride-1 Winograd form's scale s (log2 s[a][b]) and U1 = G 1 G^T per position (derivation in
// isa_avx512_dot.cc), shared by every ISA's kernels.
constexpr int kWinoShift[16] = {2, 1, 1, 2, 1, 0, 0, 1, 1, 0, 0, 1, 2, 1, 1, 2};
constexpr int kWinoU1[16] = {1, 3, 1, 1, 3, 9, 3, 3, 1, 3, 1, 1, 1, 3, 1, 1};

// (A^T z A)[i][jx] of a 4x4 position array z (row-major): row i of A^T is (1 1 1 0) or (0 1 -1 -1).
inline int64_t wino_output_term(const int64_t* z, int i, int jx) {
  int64_t u[4];
  for (int b = 0; b < 4; ++b) u[b] = i == 0 ? z[b] + z[4 + b] + z[8 + b] : z[4 + b] - z[8 + b] - z[12 + b];
  return jx == 0 ? u[0] + u[1] + u[2] : u[1] - u[2] - u[3];
}

// The stride-1 form's per-tile correction of tile t (image n, tile row ty, column tx): sum_c V =
// B^T S B with S the tile's pixel code sums (the transform is linear), as s U1 sum_c V per
// position, taken through the output transform A^T z A once: its 4 output pixels' terms.
inline void wino_tile_terms(const ConvJob& j, int64_t t, int64_t n, int64_t ty, int64_t tx) {
  const int64_t cols = j.wino_code_cols;
  const int32_t* sums = j.wino_pixel_sums + (n * j.wino_code_rows + 2 * ty) * cols + 2 * tx;
  int64_t u[4][4];
  for (int c = 0; c < 4; ++c) {
    const int64_t d0 = sums[c], d1 = sums[cols + c], d2 = sums[2 * cols + c], d3 = sums[3 * cols + c];
    u[0][c] = d0 - d2;
    u[1][c] = d1 + d2;
    u[2][c] = d2 - d1;
    u[3][c] = d1 - d3;
  }
  int64_t z[16];
  for (int a = 0; a < 4; ++a) {
    const int64_t v[4] = {u[a][0] - u[a][2], u[a][1] + u[a][2], u[a][2] - u[a][1], u[a][1] - u[a][3]};
    for (int b = 0; b < 4; ++b) z[a * 4 + b] = kWinoU1[a * 4 + b] * v[b] * (int64_t(1) << kWinoShift[a * 4 + b]);
  }
  for (int i = 0; i < 4; ++i) j.wino_tile_terms[t * 4 + i] = int32_t(wino_output_term(z, i / 2, i % 2));
}

// Tiles per register block of either Winograd form at most, on every path (the output stage
// keeps per-tile arrays of this size).
constexpr int kWinoMaxBlockTiles = 16;

// A Winograd tile's place: image n, tile row ty and column tx, and which of its outputs lie past
// the output (bit 0: its second column, bit 1: its second row), for tile index t in the job's order.
struct WinoTile {
  int64_t n, ty, tx;
  int partial;
};

inline WinoTile wino_tile_at(const ConvJob& j, int64_t t) {
  const int64_t tiles_h = j.wino_tiles_h, tiles_w = j.wino_tiles_w, per_image = tiles_h * tiles_w;
  const int64_t h_odd = j.out_height % 2, w_odd = j.out_width % 2;
  WinoTile w;
  w.n = t / per_image;
  int64_t i = t % per_image;
  if (!j.wino_partial_last) {
    w.ty = i / tiles_w;
    w.tx = i % tiles_w;
  } else {
    const int64_t whole_h = tiles_h - h_odd, whole_w = tiles_w - w_odd;
    if (i < whole_h * whole_w) {  // whole tiles, row-major
      w.ty = i / whole_w;
      w.tx = i % whole_w;
    } else if ((i -= whole_h * whole_w) < whole_h * w_odd) {  // the last column
      w.ty = i;
      w.tx = tiles_w - 1;
    } else if ((i -= whole_h * w_odd) < whole_w * h_odd) {  // the last row
      w.ty = tiles_h - 1;
      w.tx = i;
    } else {  // the corner
      w.ty = tiles_h - 1;
      w.tx = tiles_w - 1;
    }
  }
  w.partial = (w_odd != 0 && w.tx == tiles_w - 1 ? 1 : 0) | (h_odd != 0 && w.ty == tiles_h - 1 ? 2 : 0);
  return w;
}

const KernelTable* portable_kernels();
const KernelTable* avx2_kernels();    // null when not built for x86-64
const KernelTable* avx512_kernels();  // null when not built for x86-64
const KernelTable* neon_kernels();    // null when not built for aarch64

const PathKernels* portable_dot_kernels();
const PathKernels* avx2_dot_kernels();       // VPMADDUBSW; null when not built for x86-64
const PathKernels* avx_vnni_dot_kernels();   // AVX-VNNI VPDPBUSD on ymm; null when not x86-64
const PathKernels* avx512_dot_kernels();     // AVX-512 VNNI; null when not built for x86-64
const PathKernels* avx512_lut_kernels();     // AVX-512 VBMI + VNNI; null when not built for x86-64
const PathKernels* neon_dot_kernels();       // SDOT (dotprod); null when not built for aarch64
// The AVX-512 dot path with its Winograd GEMM on AMX tiles (isa_amx.cc); `emulated`: the same
// code on a software model of the tile instructions (test hook, runs on AVX-512 VNNI alone).
// Null when not built for x86-64. core.cc checks AMX support, permission and a self-check.
const PathKernels* amx_kernels(bool emulated);

// Weight vectors per chunk of the phased direct form (ConvJob::amx_stage): 2 A tiles x 2 B
// tiles = 4 C tiles of AMX's 8.
constexpr int kAmxDirectVectors = 2;
// Bytes of one chunk of the direct dot layout's int8 weights (dot_chunk_blocks vectors x taps x
// words x 16 quad rows x 64 bytes): chunk c starts at dot_weights + c * this.
inline int64_t direct_chunk_bytes(const ConvJob& j) {
  return int64_t(j.dot_chunk_blocks) * j.kernel_height * j.kernel_width * j.words * 16 * 64;
}
// ConvJob::compact_weights: the bits per code of a weight_bits layer (3-bit codes take 4, so that
// every code sits inside one byte), and the row layout: a 64-byte row's codes in 8 * bits bytes,
// byte j holding code j + 8 * bits * f in its bits [bits * f, bits * (f + 1)), f < 8 / bits. So a
// vector of the row's bytes repeated in each 8 * bits-byte part, part f shifted right by bits * f,
// has every code in the low bits of its own byte (isa_amx.cc, expand_b).
inline int compact_bits_for(int weight_bits) { return weight_bits == 3 ? 4 : weight_bits; }
// One plane row u of the phased direct form's stage (ConvJob::amx_stage), as both stagers walk it:
// its first pixel of word 0 (word w's is plane_bytes * w on), and the columns [c0, c1) whose input
// pixel lies inside the input, the first at src (plane 0 of word 0; column c's at src + (c - c0) *
// src_step). read: whether some tap reads the row's phase (planes no tap reads are not staged).
struct PhasedStageRow {
  bool read;
  uint8_t* base;
  int64_t c0, c1;
  const uint64_t* src;
  int64_t src_step;
};
inline PhasedStageRow phased_stage_row(const ConvJob& j, int64_t u, int act_bits) {
  PhasedStageRow r = {};
  const int64_t sh = j.stride_height, sw = j.stride_width, cols = j.amx_cols;
  const int64_t prow = u % j.amx_plane_rows, phase = u / j.amx_plane_rows;
  const int64_t py = phase / sw, px = phase % sw;
  const auto phase_read = [](int64_t k, int64_t d, int64_t st, int64_t ph) {
    for (int64_t i = 0; i < k; ++i)
      if (i * d % st == ph) return true;
    return false;
  };
  if (!phase_read(j.kernel_height, j.dilation_height, sh, py) || !phase_read(j.kernel_width, j.dilation_width, sw, px))
    return r;
  r.read = true;
  r.base = j.amx_stage + (phase * j.words * j.amx_plane_pixels + prow * cols) * 64;
  const int64_t ih = prow * sh + py - j.pad_top, in_pixel = int64_t(act_bits) * j.words;
  if (ih >= 0 && ih < j.in_height) {
    const int64_t first = j.pad_left - px;  // c * sw >= first
    r.c0 = first <= 0 ? 0 : (first + sw - 1) / sw;
    const int64_t last = j.in_width - 1 + j.pad_left - px;  // c * sw <= last
    r.c1 = last < 0 ? 0 : last / sw + 1;
    if (r.c1 > cols) r.c1 = cols;
    if (r.c0 > r.c1) r.c0 = r.c1;
  }
  if (r.c0 < r.c1)
    r.src = j.input + ((j.amx_image * j.in_height + ih) * j.in_width + r.c0 * sw + px - j.pad_left) * in_pixel;
  r.src_step = sw * in_pixel;
  return r;
}
// Stages the phase planes of the phased direct form (ConvJob::amx_stage): plane rows [begin, end)
// of the stride_height * stride_width * amx_plane_rows of image amx_image (isa_avx512_dot.cc;
// x86-64 only). The _gfni stager gives the same bytes with GF2P8AFFINEQB (AVX-512 VBMI + GFNI);
// core.cc offers it only where the CPU reports both.
void phased_stage_rows(const ConvJob& j, int64_t begin, int64_t end);
void phased_stage_rows_gfni(const ConvJob& j, int64_t begin, int64_t end);
// Whether the CPU and OS report AVX-512 VBMI and GFNI (core.cc; N2UQ_CPU_DISABLE=gfni hides it).
bool cpu_avx512_gfni();

// The AVX-512 Winograd output stage (isa_avx512_dot.cc; x86-64 only): output transform,
// corrections and stores of `tiles` tiles from t0 of `chunk`, from their 64-byte aligned
// position sums z[((x * tiles + p) * R + r) * 16 + lane] (R = the chunk's weight vectors).
void wino_output(const ConvJob& j, int64_t t0, int tiles, int64_t chunk, const int32_t* z);
// The same for the stride-2 form, from the class sums z[((c * tiles + p) * R + r) * 16 + lane].
void wino2_output(const ConvJob& j, int64_t t0, int tiles, int64_t chunk, const int32_t* z);

// ---- Int8 convolution (int8_conv.cc: TFLite's int8 CONV_2D, for layers with few input channels
// such as an image stem, where TFLite's own kernels run far below their usual rate).
// Rows: pixel q's receptive field in filter order (kh, kw, c), K = KH * KW * C bytes, each input
// byte x stored as the unsigned x ^ 0x80 = x + 128 (VPDPBUSD and TDPBUSD multiply unsigned by
// signed bytes), padding as pad_code = zp_in ^ 0x80, and bytes K..k_padded-1 meeting zero weights.
// So sum_k row[k] * w[k] = sum (x + 128) w, and the bias folds the rest of TFLite's
// acc = bias + sum (x - zp_in) w:  int8_bias = bias - (zp_in + 128) * sum_k w[k].
// Output: XNNPACK's fp32 requantization, clamp(rne(float(acc) * scale), min - zp, max - zp) + zp.
struct Int8ConvJob {
  int64_t batch, in_height, in_width, in_channels, out_height, out_width, out_channels;
  int64_t kernel_height, kernel_width, stride_height, stride_width, dilation_height, dilation_width;
  int64_t pad_top, pad_left;
  int64_t pixels;            // batch * out_height * out_width
  int64_t k, k_padded;       // KH * KW * C, rounded up to a multiple of 64 (one AMX tile row)
  int64_t oc_chunks;         // ceil(out_channels / 32): chunks of 2 vectors of 16 channels
  const int8_t* input;       // NHWC
  int8_t* output;            // [pixels][out_channels]
  uint8_t pad_code;
  // [chunk][k_padded / 64][vector 0..1][16 quads][16 lanes][4 bytes]: the AMX B tiles, whose
  // rows are also the VNNI path's weight vectors of one quad (zero past K and out_channels).
  const int8_t* weights;
  const int32_t* bias;       // [oc_chunks * 32], folded as above
  const float* scale;        // [oc_chunks * 32]: input_scale * filter_scale[oc] / output_scale
  float min_less_zero_point, max_less_zero_point;
  int32_t output_zero_point;
  int requant_saturates;     // every |scale| <= 0.5: no float clamp needed (avx512_int8_store)
  // The column-stacked form (stack = 1; dilation_width 1, int8_conv.cc): K in (kw, kh, c) order,
  // and per output row (n, oh) one stacked row S[col][kh][c] = x[oh * sh - pad_top + kh * dh]
  // [col - pad_left][c] (the zero point outside the image) over stack_cols columns, so that pixel
  // ow's K bytes are S + ow * stride_width * KH * C, contiguous: the GEMM reads them in place (AMX
  // tile loads take any row stride) and nothing is copied per pixel. S is built 64 bytes at a time
  // (AVX-512 VBMI): a vector starting `phase` bytes into a column takes byte b from index[phase][b]
  // of a 128-byte window of each kernel row's input, where masks[phase][kh] has the bytes of row kh.
  int stack;
  int64_t stack_cols, stack_bytes;    // S: columns, and bytes (the last block's 32 rows inside)
  int64_t stack_window;               // 64 where every index is < 64 (one window register), else 128
  int64_t stack_reach;                // bytes of the window any index reads: the largest index + 1
  const uint8_t* stack_index;         // [KH * C][64]
  const uint64_t* stack_masks;        // [KH * C][KH]
};
constexpr int64_t kInt8BlockPixels = 32;  // pixels per block: 2 AMX A tiles of 16 rows
// Runs items [begin, end) of the job: 32-pixel blocks (rows, products and requantized stores), or
// in the stacked form output rows (n, oh).
typedef void (*Int8ConvBlocksFn)(const Int8ConvJob& job, int64_t begin, int64_t end);
Int8ConvBlocksFn avx512_int8_conv_blocks();          // AVX-512 VNNI; null when not built for x86-64
Int8ConvBlocksFn amx_int8_conv_blocks(bool emulated);  // isa_amx.cc; null when not built for x86-64
// The 64-byte vectors of one stacked row.
inline int64_t int8_stack_vectors(const Int8ConvJob& j) {
  return (j.stack_cols * j.kernel_height * j.in_channels + 63) / 64;
}
// The AVX-512 parts the AMX blocks share (isa_avx512_int8.cc; x86-64 only), each on a part of its
// work so that the AMX blocks can spread it between their tile products: the rows of the block
// at pixel q0, its pixels [q0 + p_begin, q0 + p_end), into a[32][k_padded]; vectors [v_begin,
// v_end) of the stacked row of output row (n, oh) into s (AVX-512 VBMI); and the requantized
// stores of the block at pixel q0, its pixels [q0 + p_begin, q0 + p_end), from
// z[oc_chunks][32 pixels][32 channels] int32 sums (without the bias).
void avx512_int8_rows(const Int8ConvJob& j, int64_t q0, int64_t p_begin, int64_t p_end, uint8_t* a);
void avx512_int8_stack_row(const Int8ConvJob& j, int64_t n, int64_t oh, uint8_t* s, int64_t v_begin,
                           int64_t v_end);
void avx512_int8_store(const Int8ConvJob& j, int64_t q0, int64_t p_begin, int64_t p_end, const int32_t* z);

// ---- Float convolution over few input channels (float_conv.cc): a direct conv, each output row
// in register blocks of 7 pixels x up to 4 vectors of 16 channels (28 FMA accumulators), every
// input value a broadcast operand. TFLite's float kernels vectorise over input channels, so an
// image stem (3) ran at about 57 GMAC/s in XNNPACK on the AMX Xeon; this loop keeps both FMA ports
// busy (about 105 there).
struct FloatConvJob {
  int64_t batch, in_height, in_width, in_channels;  // the input, zero padded beforehand when needed
  int64_t out_height, out_width, out_channels;
  int64_t kernel_height, stride_height, stride_width, dilation_height;
  int64_t taps;                // KW * C
  const int64_t* tap_offsets;  // [taps]: kw * dilation_width * C + c, floats from a pixel's first tap
  int64_t passes;              // ceil(out_channels / 64)
  const float* input;          // NHWC
  float* output;               // NHWC
  const float* weights;        // [pass][KH][taps][64], zero past out_channels
  const float* bias;           // [passes * 64]
  float output_min, output_max;
};
// Runs output rows [begin, end) of the N * out_height.
typedef void (*FloatConvRowsFn)(const FloatConvJob& job, int64_t begin, int64_t end);
FloatConvRowsFn avx512_float_conv_rows();  // isa_avx512_float.cc; null when not built for x86-64

}  // namespace n2uq_core

#endif  // N2UQ_KERNEL_TABLE_H_
