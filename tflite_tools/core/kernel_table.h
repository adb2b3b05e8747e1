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
};

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

const KernelTable* portable_kernels();
const KernelTable* avx2_kernels();    // null when not built for x86-64
const KernelTable* avx512_kernels();  // null when not built for x86-64
const KernelTable* neon_kernels();    // null when not built for aarch64

}  // namespace n2uq_core

#endif  // N2UQ_KERNEL_TABLE_H_
