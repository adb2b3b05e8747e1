// Generic kernel bodies, instantiated once per ISA file with that file's vector ops.
//
// Include this after the ISA's `#pragma GCC target` and inside an anonymous namespace,
// after defining a struct `Ops` with:
//   kLanes (uint64 lanes per vector), kAccumulatorBudget (vector registers for accumulators),
//   V, zero(), load(const uint64_t*) (unaligned), and_broadcast(V, uint64_t),
//   popcount(V) (per-lane popcount), add(V, V), store(uint64_t*, V), popcount64(uint64_t).
// No standard-library headers here (see kernel_table.h).
//
// Conv inner loop: vector lanes are kLanes consecutive output pixels of one output row.
// For one tap and one channel word, the staged input holds those pixels' words
// contiguously (stride phases make strided convs contiguous too), so one load serves R
// output channels x weight_bits planes: R * act_bits * weight_bits AND + popcount + add,
// with the weight word broadcast. Accumulators are kept per (channel, i + j) so the
// 2^(i+j) weighting happens once per output, outside the loop.

// Output channels per register block: as many as the accumulators fit (a power of two
// dividing kChannelChunk; channels past the last full block take a one-channel path).
constexpr int pick_register_block(int budget, int sums) {
  return budget / sums >= 16 ? 16 : budget / sums >= 8 ? 8 : budget / sums >= 4 ? 4 : budget / sums >= 2 ? 2 : 1;
}

// Whether some output row reads input row ih (ih + pad_top = oh * stride_height + kh *
// dilation_height for a valid oh, kh), and whether some tap reads column phase `phase`.
inline bool conv_row_read(const ConvJob& j, int64_t ih) {
  const int64_t padded = ih + j.pad_top;
  for (int64_t kh = 0; kh < j.kernel_height; ++kh) {
    const int64_t rest = padded - kh * j.dilation_height;
    if (rest < 0) break;
    if (rest % j.stride_height == 0 && rest / j.stride_height < j.out_height) return true;
  }
  return false;
}

inline bool conv_phase_read(const ConvJob& j, int64_t phase) {
  for (int64_t kw = 0; kw < j.kernel_width; ++kw)
    if (kw * j.dilation_width % j.stride_width == phase) return true;
  return false;
}

// Stages (and sums) only the rows and column phases that some tap reads; the rest of the
// stage and of pixel_sums keeps stale values that no item reads.
template <class O>
void conv_stage_rows(const ConvJob& j, int64_t begin, int64_t end) {
  // Job fields in locals: the uint64 stores below may alias the job's int64 fields as far
  // as the compiler knows, which would reload every one of them per word.
  const int64_t words = j.words, act_bits = j.act_bits, width = j.stage_width, in_width = j.in_width;
  const int64_t stride = j.stride_width, plane_words = act_bits * words;
  const int rem = j.in_channels % 64;
  const uint64_t tail_mask = rem == 0 ? ~0ull : ((1ull << rem) - 1);  // garbage above C must not count
  const int64_t row_stage = stride * plane_words * width;
  uint64_t* const stage_base = j.stage;
  const uint64_t* const input = j.input;
  int32_t* const pixel_sums = j.pixel_sums;
  const int64_t first_phase = j.pad_left % stride, first_column = j.pad_left / stride;
  const int64_t phase_words = plane_words * width;
  uint64_t phases = stride > 64 ? ~0ull : 0;  // phases read (all where the stride exceeds a mask)
  for (int64_t p = 0; p < stride && p < 64; ++p)
    if (conv_phase_read(j, p)) phases |= 1ull << p;
  for (int64_t row = begin; row < end; ++row) {
    if (!conv_row_read(j, row % j.in_height)) continue;
    uint64_t* stage = stage_base + row * row_stage;
    for (int64_t p = 0; p < stride; ++p) {
      if (p < 64 && !((phases >> p) & 1)) continue;
      for (int64_t i = p * phase_words; i < (p + 1) * phase_words; ++i) stage[i] = 0;
    }
    const uint64_t* src = input + row * in_width * plane_words;
    int32_t* sums = pixel_sums + row * in_width;
    // Padded column x + pad_left = column * stride + phase, stepped without a division per pixel.
    int64_t phase = first_phase, column = first_column;
    for (int64_t x = 0; x < in_width; ++x, src += plane_words) {
      if (x > 0 && ++phase == stride) phase = 0, ++column;
      if (phase < 64 && !((phases >> phase) & 1)) continue;
      uint64_t* dst = stage + phase * plane_words * width + column;
      int64_t pixel_sum = 0;
      for (int64_t p = 0; p < act_bits; ++p) {
        int64_t plane_sum = 0;
        for (int64_t c = 0; c < words; ++c) {
          uint64_t w = src[p * words + c];
          if (c == words - 1) w &= tail_mask;
          dst[(p * words + c) * width] = w;
          plane_sum += O::popcount64(w);
        }
        pixel_sum += plane_sum << p;
      }
      sums[x] = (int32_t)pixel_sum;
    }
  }
}

template <class O, int A, int WB, int R>
inline void conv_block(const ConvJob& j, int64_t n, int64_t oh, int64_t oc0, int64_t ow0, int64_t ow_end,
                       const int32_t* act_sums /* S_m of pixels ow0 .. ow0 + L - 1 */) {
  typedef typename O::V V;
  constexpr int S = A + WB - 1;
  constexpr int L = O::kLanes;
  V acc[R][S];
  for (int o = 0; o < R; ++o)
    for (int s = 0; s < S; ++s) acc[o][s] = O::zero();
  const int64_t words = j.words, width = j.stage_width;
  const int64_t oc_stride = (int64_t)j.kernel_height * j.kernel_width * WB * words;
  const int64_t phase_stride = (int64_t)A * words * width;
  for (int64_t kh = 0; kh < j.kernel_height; ++kh) {
    const int64_t ih = oh * j.stride_height + kh * j.dilation_height - j.pad_top;
    if (ih < 0 || ih >= j.in_height) continue;  // zero padding: m = 0 adds nothing
    const uint64_t* row = j.stage + (n * j.in_height + ih) * j.stride_width * phase_stride;
    // Tap kw reads padded column ow * stride + kw * dilation = (ow + q) * stride + phase.
    int64_t phase = 0, q = 0;
    for (int64_t kw = 0; kw < j.kernel_width; ++kw) {
      if (kw > 0) {
        phase += j.dilation_width;
        while (phase >= j.stride_width) phase -= j.stride_width, ++q;
      }
      const uint64_t* a_base = row + phase * phase_stride + ow0 + q;
      const uint64_t* w_base = j.weights + oc0 * oc_stride + (kh * j.kernel_width + kw) * WB * words;
      for (int64_t c = 0; c < words; ++c) {
        V act[A];
        for (int i = 0; i < A; ++i) act[i] = O::load(a_base + (i * words + c) * width);
        for (int o = 0; o < R; ++o) {
          for (int b = 0; b < WB; ++b) {
            const uint64_t w = w_base[o * oc_stride + b * words + c];
            for (int i = 0; i < A; ++i) acc[o][i + b] = O::add(acc[o][i + b], O::popcount(O::and_broadcast(act[i], w)));
          }
        }
      }
    }
  }
  // Derivation of the output (done once, here). Activation value a = beta2 * delta_a * m,
  // weight value w = alpha_c * (2k / n_w - 1), so over the receptive field
  //   sum(a * w) = beta2 * delta_a * alpha_c * ((2 / n_w) * S_mk - S_m)
  //              = (beta2 * delta_a * alpha_c / n_w) * (2 * S_mk - n_w * S_m),
  // S_mk = sum m*k = sum_{i,j} 2^(i+j) popcount(m_i & k_j), S_m = sum m. A following
  // BatchNorm y = g * (z - mean) / sqrt(var + eps) + b folds into the same affine map, so
  // multiplier_c = g / sqrt(var + eps) * beta2 * delta_a * alpha_c / n_w and bias_c holds the
  // rest: out = multiplier_c * (2 * S_mk - n_w * S_m) + bias_c, with the integer exact.
  //
  // Epilogue in fixed-size loops over the lanes (vectorized by the compiler): it runs
  // once per R x L outputs, which matters when the receptive field is short (C = 64).
  const int64_t n_w = (1 << WB) - 1;
  alignas(64) uint64_t lanes[S][L];
  alignas(64) int32_t tile_int[R][L];
  alignas(64) float tile_float[R][L];
  int64_t act_sum[L];
  for (int l = 0; l < L; ++l) act_sum[l] = act_sums[l];
  for (int o = 0; o < R; ++o) {
    for (int s = 0; s < S; ++s) O::store(lanes[s], acc[o][s]);
    for (int l = 0; l < L; ++l) {
      int64_t smk = (int64_t)lanes[0][l];
      for (int s = 1; s < S; ++s) smk += (int64_t)(lanes[s][l] << s);
      tile_int[o][l] = (int32_t)(2 * smk - n_w * act_sum[l]);
    }
    if (j.out_float) {
      const float multiplier = j.multiplier[oc0 + o], bias = j.bias[oc0 + o];
      for (int l = 0; l < L; ++l) tile_float[o][l] = (float)tile_int[o][l] * multiplier + bias;
    }
  }
  const int64_t valid = ow_end - ow0 < L ? ow_end - ow0 : L;
  for (int64_t l = 0; l < valid; ++l) {
    const int64_t index = ((n * j.out_height + oh) * j.out_width + ow0 + l) * j.out_channels + oc0;
    if (j.out_float)
      for (int o = 0; o < R; ++o) j.out_float[index + o] = tile_float[o][l];
    if (j.out_int32)
      for (int o = 0; o < R; ++o) j.out_int32[index + o] = tile_int[o][l];
  }
}

template <class O, int A, int WB>
void conv_item_bits(const ConvJob& j, int64_t item) {
  constexpr int R = pick_register_block(O::kAccumulatorBudget, A + WB - 1);
  constexpr int L = O::kLanes;
  const int64_t chunk = item % j.channel_chunks;
  int64_t rest = item / j.channel_chunks;
  const int64_t segment = rest % j.segments;
  rest /= j.segments;
  const int64_t oh = rest % j.out_height, n = rest / j.out_height;
  const int64_t ow_begin = segment * kSegmentWidth;
  const int64_t ow_end = ow_begin + kSegmentWidth < j.out_width ? ow_begin + kSegmentWidth : j.out_width;
  const int64_t oc_begin = chunk * kChannelChunk;
  const int64_t oc_end = oc_begin + kChannelChunk < j.out_channels ? oc_begin + kChannelChunk : j.out_channels;

  // S_m per output pixel of the segment; lanes past the row end read zeros.
  int32_t act_sums[kSegmentWidth] = {};
  for (int64_t ow = ow_begin; ow < ow_end; ++ow) {
    int64_t total = 0;
    for (int64_t kh = 0; kh < j.kernel_height; ++kh) {
      const int64_t ih = oh * j.stride_height + kh * j.dilation_height - j.pad_top;
      if (ih < 0 || ih >= j.in_height) continue;
      const int32_t* row = j.pixel_sums + (n * j.in_height + ih) * j.in_width;
      for (int64_t kw = 0; kw < j.kernel_width; ++kw) {
        const int64_t iw = ow * j.stride_width + kw * j.dilation_width - j.pad_left;
        if (iw >= 0 && iw < j.in_width) total += row[iw];
      }
    }
    act_sums[ow - ow_begin] = (int32_t)total;
  }
  int64_t oc = oc_begin;
  // Channel blocks outside, pixels inside: the block's weights stay in L1 across the row.
  for (; oc + R <= oc_end; oc += R)
    for (int64_t ow = ow_begin; ow < ow_end; ow += L)
      conv_block<O, A, WB, R>(j, n, oh, oc, ow, ow_end, act_sums + (ow - ow_begin));
  for (; oc < oc_end; ++oc)
    for (int64_t ow = ow_begin; ow < ow_end; ow += L)
      conv_block<O, A, WB, 1>(j, n, oh, oc, ow, ow_end, act_sums + (ow - ow_begin));
}

template <class O, int A>
void conv_item_weight_bits(const ConvJob& j, int64_t item) {
  switch (j.weight_bits) {
    case 1: conv_item_bits<O, A, 1>(j, item); break;
    case 2: conv_item_bits<O, A, 2>(j, item); break;
    case 3: conv_item_bits<O, A, 3>(j, item); break;
    case 4: conv_item_bits<O, A, 4>(j, item); break;
    default: break;  // validated by the dispatcher
  }
}

template <class O>
void conv_item(const ConvJob& j, int64_t item) {
  switch (j.act_bits) {
    case 1: conv_item_weight_bits<O, 1>(j, item); break;
    case 2: conv_item_weight_bits<O, 2>(j, item); break;
    case 3: conv_item_weight_bits<O, 3>(j, item); break;
    case 4: conv_item_weight_bits<O, 4>(j, item); break;
    default: break;
  }
}

// Depthwise: each output channel sees one input channel, so there is no channel
// reduction to bit-pack; multiply-accumulate the small integer codes directly
// (the compiler vectorizes the channel loop with this file's ISA).
template <class O>
void depthwise_row(const DepthwiseJob& j, int64_t row) {
  const int64_t oh = row % j.out_height, n = row / j.out_height;
  const int64_t n_w = (1 << j.weight_bits) - 1;
  const int64_t oc_total = j.out_channels, multiplier = j.depth_multiplier;
  int32_t sum_mk[kDepthwiseChunk];
  int32_t sum_m[kDepthwiseChunk];
  for (int64_t ow = 0; ow < j.out_width; ++ow) {
    const int64_t out_base = ((n * j.out_height + oh) * j.out_width + ow) * oc_total;
    for (int64_t oc0 = 0; oc0 < oc_total; oc0 += kDepthwiseChunk) {
      const int64_t count = oc_total - oc0 < kDepthwiseChunk ? oc_total - oc0 : kDepthwiseChunk;
      for (int64_t c = 0; c < count; ++c) sum_mk[c] = sum_m[c] = 0;
      for (int64_t kh = 0; kh < j.kernel_height; ++kh) {
        const int64_t ih = oh * j.stride_height + kh * j.dilation_height - j.pad_top;
        if (ih < 0 || ih >= j.in_height) continue;
        for (int64_t kw = 0; kw < j.kernel_width; ++kw) {
          const int64_t iw = ow * j.stride_width + kw * j.dilation_width - j.pad_left;
          if (iw < 0 || iw >= j.in_width) continue;
          const uint8_t* in = j.input + ((n * j.in_height + ih) * j.in_width + iw) * j.in_channels;
          const uint8_t* w = j.weights + (kh * j.kernel_width + kw) * oc_total + oc0;
          if (multiplier == 1) {
            in += oc0;
            for (int64_t c = 0; c < count; ++c) {
              const int32_t m = in[c];
              sum_mk[c] += m * (int32_t)w[c];
              sum_m[c] += m;
            }
          } else {
            for (int64_t c = 0; c < count; ++c) {
              const int32_t m = in[(oc0 + c) / multiplier];
              sum_mk[c] += m * (int32_t)w[c];
              sum_m[c] += m;
            }
          }
        }
      }
      for (int64_t c = 0; c < count; ++c) {
        const int32_t value = (int32_t)(2 * (int64_t)sum_mk[c] - n_w * sum_m[c]);
        const int64_t oc = oc0 + c;
        if (j.out_int32) j.out_int32[out_base + oc] = value;
        if (j.out_float) j.out_float[out_base + oc] = (float)value * j.multiplier[oc] + j.bias[oc];
      }
    }
  }
}

// level = #{i : x * beta1 > T_i}: the float32 product and strict comparison of
// ops.activation_levels (a NaN compares false everywhere and gets code 0). The count
// over all thresholds (which the compiler keeps branch-free) measured faster here than a
// scalar binary search over the sorted table, whose loads depend on each other; the
// AVX2 / AVX-512 files do the binary search with vector permutes instead.
inline int32_t activation_code(float x, const QuantizeJob& j) {
  const float scaled = x * j.beta1;
  int32_t code = 0;
  for (int32_t i = 0; i < j.num_thresholds; ++i) code += scaled > j.thresholds[i] ? 1 : 0;
  return code;
}

template <class O>
void quantize_codes(const QuantizeJob& j, int64_t begin, int64_t end) {
  for (int64_t i = begin; i < end; ++i) j.out_codes[i] = (uint8_t)activation_code(j.x[i], j);
}

template <class O>
void quantize_and_pack(const QuantizeJob& j, int64_t begin, int64_t end) {
  const int64_t words = j.words;
  for (int64_t pos = begin; pos < end; ++pos) {
    const float* x = j.x + pos * j.channels;
    uint64_t* out = j.out_packed + pos * j.bits * words;
    for (int64_t word = 0; word < words; ++word) {
      uint64_t planes[4] = {0, 0, 0, 0};
      const int64_t c0 = word * 64;
      const int64_t count = j.channels - c0 < 64 ? j.channels - c0 : 64;
      for (int64_t c = 0; c < count; ++c) {
        const uint64_t code = (uint64_t)activation_code(x[c0 + c], j);
        for (int p = 0; p < 4; ++p) planes[p] |= ((code >> p) & 1u) << c;
      }
      for (int p = 0; p < j.bits; ++p) out[p * words + word] = planes[p];
    }
  }
}

template <class O>
KernelTable make_kernel_table(const char* name) {
  KernelTable table;
  table.name = name;
  table.lanes = O::kLanes;
  table.conv_stage_rows = &conv_stage_rows<O>;
  table.conv_item = &conv_item<O>;
  table.conv_group_weights = nullptr;
  table.conv_group_item = nullptr;
  table.depthwise_row = &depthwise_row<O>;
  table.quantize_codes = &quantize_codes<O>;
  table.quantize_and_pack = &quantize_and_pack<O>;
  return table;
}
