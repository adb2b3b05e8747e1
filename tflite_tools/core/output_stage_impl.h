// The output stage's per-channel steps (n2uq_core.h, N2UQ_STEP_*) over rows of a layer's float
// output, compiled once per ISA by the including file (output_stage.cc, vector_x86.cc), which defines
// kLaneBytes (16, 32 or 64) and its target options first. The output is walked in blocks of at
// most kBlock floats (whole rows, or a segment of a long row) that stay in L1: each step is one
// flat pass over the block in vectors of kLaneBytes / 4 floats (GCC vector extensions), dispatched
// once per block (a switch per vector costs an indirect branch per step and vector; a loop per row
// costs its overhead per 64 channels). The block is copied in, stepped, written to the float output after float_after steps,
// stepped on, and left in the caller's buffer for the quantizer. Each step is the one float32 operation of the TFLite builtin it stands for, in
// the builtin's order of operands; the build has -ffp-contract=off, so no multiply is fused with an
// add and the results equal the builtins' bit for bit (custom_ops.py, "Exactness", says what can
// still differ). Include inside a namespace of its own, after n2uq_core.h and <string.h>.

typedef float Lanes __attribute__((vector_size(kLaneBytes)));
typedef int32_t LaneMask __attribute__((vector_size(kLaneBytes)));
constexpr int kLanes = kLaneBytes / 4;

inline Lanes splat(float value) { return Lanes{} + value; }
inline Lanes load(const float* p, Lanes*) {
  Lanes v;
  memcpy(&v, p, sizeof(v));
  return v;
}
inline float load(const float* p, float*) { return *p; }
inline void store(float* p, Lanes v) { memcpy(p, &v, sizeof(v)); }
inline void store(float* p, float v) { *p = v; }

// y >= 0 ? y : y * slope and the clamps, as selects: for vectors a comparison mask; for scalars a select of
// bit patterns where an arm is computed (GCC leaves a float ternary with a computed arm as a branch).
inline Lanes prelu(Lanes y, Lanes slope) {
  const Lanes negative = y * slope;
  return y >= splat(0.0f) ? y : negative;
}
inline float prelu(float y, float slope) {
  const float negative = y * slope;
  uint32_t keep, other;
  memcpy(&keep, &y, sizeof(keep));
  memcpy(&other, &negative, sizeof(other));
  const uint32_t mask = 0u - uint32_t(y >= 0.0f);
  const uint32_t bits = (keep & mask) | (other & ~mask);
  float out;
  memcpy(&out, &bits, sizeof(out));
  return out;
}
inline Lanes clamp(Lanes y, float low, float high) {  // y < low ? low : y > high ? high : y
  const Lanes upper = y > splat(high) ? splat(high) : y;
  return y < splat(low) ? splat(low) : upper;
}
inline float clamp(float y, float low, float high) { return y < low ? low : y > high ? high : y; }
inline Lanes relu(Lanes y) { return y < splat(0.0f) ? splat(0.0f) : y; }
inline float relu(float y) { return y < 0.0f ? 0.0f : y; }

constexpr int64_t kBlock = 512;  // floats

// y[i] = op(y[i], v[i]) for i < n, in vectors then a scalar tail.
template <typename Op>
inline void each(float* y, const float* v, int64_t n, Op op) {
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) store(y + i, op(load(y + i, static_cast<Lanes*>(nullptr)),
                                                     load(v + i, static_cast<Lanes*>(nullptr))));
  for (; i < n; ++i) y[i] = op(y[i], v[i]);
}

template <typename Op>
inline void each(float* y, int64_t n, Op op) {
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) store(y + i, op(load(y + i, static_cast<Lanes*>(nullptr))));
  for (; i < n; ++i) y[i] = op(y[i]);
}

// Steps [first, last) on a block of `count` floats: whole rows, or a segment of one row. values[s]: step s's
// operand laid out like the block (per-channel values repeated for each row of the block, or the
// residual's matching elements).
inline void apply_steps(const N2uqOutputStage& stage, int first, int last, float* block, int64_t count,
                        const float* const* values) {
  for (int s = first; s < last; ++s) {
    const float* v = values[s];
    switch (stage.steps[s].kind) {
      case N2UQ_STEP_ADD:
      case N2UQ_STEP_ADD_TENSOR: each(block, v, count, [](auto y, auto a) { return y + a; }); break;
      case N2UQ_STEP_MUL: each(block, v, count, [](auto y, auto a) { return y * a; }); break;
      case N2UQ_STEP_PRELU: each(block, v, count, [](auto y, auto a) { return prelu(y, a); }); break;
      case N2UQ_STEP_RELU: each(block, count, [](auto y) { return relu(y); }); break;
      case N2UQ_STEP_RELU6: each(block, count, [](auto y) { return clamp(y, 0.0f, 6.0f); }); break;
      case N2UQ_STEP_RELU_N1_TO_1: each(block, count, [](auto y) { return clamp(y, -1.0f, 1.0f); }); break;
      default: break;  // validated by n2uq_output_stage
    }
  }
}

// ---- Step sequences compiled whole: each vector goes through every step in registers, the
// float output and final values stored once (the loop below loads and stores the block once per
// step: for a residual block's 7 steps most of the stage's time). The sequences the exporter writes
// for ResNets; others take that loop. Kinds as N2UQ_STEP_*: 1 ADD, 3 PRELU, 4 ADD_TENSOR, 5 RELU.
constexpr int kPrograms = 6;
constexpr int kProgramSteps[kPrograms][8] = {  // {count, kinds...}
    {3, 1, 3, 1},              // RPReLU
    {4, 4, 1, 3, 1},           // residual, RPReLU
    {7, 4, 1, 3, 1, 1, 3, 1},  // residual, RPReLU, the next block's RPReLU
    {1, 5},                    // ReLU
    {2, 4, 5},                 // residual, ReLU
    {2, 1, 5},                 // ADD, ReLU
};

inline int program_of(const N2uqOutputStage& stage) {
  for (int p = 0; p < kPrograms; ++p) {
    if (kProgramSteps[p][0] != stage.num_steps) continue;
    int i = 0;
    while (i < stage.num_steps && kProgramSteps[p][1 + i] == stage.steps[i].kind) ++i;
    if (i == stage.num_steps) return p;
  }
  return -1;
}

template <int KIND>
inline Lanes program_step(Lanes y, Lanes v) {
  if constexpr (KIND == N2UQ_STEP_ADD || KIND == N2UQ_STEP_ADD_TENSOR) return y + v;
  if constexpr (KIND == N2UQ_STEP_PRELU) return prelu(y, v);
  if constexpr (KIND == N2UQ_STEP_RELU) return relu(y);
  return y;
}

// Steps I.. of program P on one vector at element e of the block (operands[s]: step s's operand
// laid out like the block), the float output where due.
template <int P, int I>
inline Lanes program_steps(Lanes y, const float* const* operands, int64_t e, int split, float* out_float) {
  if (out_float != nullptr && split == I) store(out_float + e, y);
  if constexpr (I == kProgramSteps[P][0]) {
    return y;
  } else {
    constexpr int kind = kProgramSteps[P][1 + I];
    const Lanes v = kind == N2UQ_STEP_RELU ? splat(0.0f) : load(operands[I] + e, static_cast<Lanes*>(nullptr));
    return program_steps<P, I + 1>(program_step<kind>(y, v), operands, e, split, out_float);
  }
}

// The block (n values, a multiple of kLanes) through program P: out_float (after `split` steps;
// may be null) and out_final (may be null) written once per vector.
template <int P>
void program_block(const float* values, const float* const* operands, int64_t n, int split, float* out_float,
                   float* out_final) {
  for (int64_t e = 0; e < n; e += kLanes) {
    const Lanes y = program_steps<P, 0>(load(values + e, static_cast<Lanes*>(nullptr)), operands, e, split, out_float);
    if (out_final != nullptr) store(out_final + e, y);
  }
}

inline bool run_program(int program, const float* values, const float* const* operands, int64_t n, int split,
                        float* out_float, float* out_final) {
  using Block = void (*)(const float*, const float* const*, int64_t, int, float*, float*);
  static constexpr Block kBlocks[kPrograms] = {&program_block<0>, &program_block<1>, &program_block<2>,
                                               &program_block<3>, &program_block<4>, &program_block<5>};
  if (program < 0 || n % kLanes != 0) return false;
  kBlocks[program](values, operands, n, split, out_float, out_final);
  return true;
}

// Rows [0, positions) of values (positions x channels; row 0 is output position first_position):
// out_float (may be values itself) gets each row after stage.float_after steps, out_final (may be
// null; positions x channels) after every step.
inline void output_rows(const N2uqOutputStage& stage, const float* values, float* out_float, float* out_final,
                        int64_t first_position, int64_t positions, int64_t channels) {
  float local[kBlock];
  // Blocks of whole rows where a row fits (per-channel operands repeated once per call to the
  // block's rows, so every step is one flat loop), else one row in segments of kBlock.
  const bool whole_rows = channels <= kBlock;
  const int64_t rows_per_block = whole_rows ? kBlock / channels : 1;
  float repeated[N2UQ_MAX_OUTPUT_STEPS][whole_rows ? kBlock : 1];
  const float* operands[N2UQ_MAX_OUTPUT_STEPS] = {};
  for (int s = 0; s < stage.num_steps; ++s) {
    const int kind = stage.steps[s].kind;
    if (whole_rows && (kind == N2UQ_STEP_ADD || kind == N2UQ_STEP_MUL || kind == N2UQ_STEP_PRELU))
      for (int64_t r = 0; r < rows_per_block; ++r)
        memcpy(repeated[s] + r * channels, stage.steps[s].values, size_t(channels) * 4);
  }
  const int split = out_float != nullptr ? stage.float_after : 0;
  const int program = program_of(stage);
  for (int64_t p = 0; p < positions; p += rows_per_block) {
    const int64_t rows = positions - p < rows_per_block ? positions - p : rows_per_block;
    for (int64_t c0 = 0; c0 < channels; c0 += kBlock) {
      const int64_t n = whole_rows ? rows * channels : (channels - c0 < kBlock ? channels - c0 : kBlock);
      const int64_t offset = p * channels + c0;  // of the block in values / out_float / out_final
      for (int s = 0; s < stage.num_steps; ++s) {
        const N2uqOutputStep& step = stage.steps[s];
        if (step.kind == N2UQ_STEP_ADD_TENSOR)
          operands[s] = step.values + first_position * channels + offset;
        else if (step.values != nullptr)
          operands[s] = whole_rows ? repeated[s] : step.values + c0;
      }
      if (program >= 0 && run_program(program, values + offset, operands, n, split,
                                      out_float != nullptr ? out_float + offset : nullptr,
                                      out_final != nullptr ? out_final + offset : nullptr))
        continue;
      float* block = out_final != nullptr ? out_final + offset : local;
      memcpy(block, values + offset, size_t(n) * 4);
      apply_steps(stage, 0, split, block, n, operands);
      if (out_float != nullptr) memcpy(out_float + offset, block, size_t(n) * 4);
      if (out_final != nullptr) apply_steps(stage, split, stage.num_steps, block, n, operands);
    }
  }
}
