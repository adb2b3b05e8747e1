// The output stage's per-channel steps (n2uq_core.h, N2UQ_STEP_*), as plain loops that the
// compiler vectorizes with the including file's target options (output_stage*.cc). Each step is
// the one float32 operation of the TFLite builtin it stands for, in the builtin's order of
// operands; the build has -ffp-contract=off, so no multiply is fused with an add and the results
// equal the builtins' bit for bit (custom_ops.py, "Exactness", says what can still differ).
// Include inside an anonymous namespace, after n2uq_core.h.

// y >= 0 ? y : y * slope, as a select of bit patterns: GCC leaves a float ternary with a computed arm
// as a branch per element where the ISA has no masked store (SSE, AVX2: 10-40x slower), but
// vectorizes this. Same value, -0 and NaN included.
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

inline void output_steps(const N2uqOutputStage& stage, int first, int last, float* values, int64_t first_position,
                         int64_t positions, int64_t channels) {
  const int64_t count = positions * channels;
  for (int s = first; s < last; ++s) {
    const N2uqOutputStep& step = stage.steps[s];
    const float* v = step.values;
    switch (step.kind) {
      case N2UQ_STEP_ADD:
        for (int64_t p = 0; p < positions; ++p) {
          float* __restrict y = values + p * channels;
          for (int64_t c = 0; c < channels; ++c) y[c] = y[c] + v[c];
        }
        break;
      case N2UQ_STEP_MUL:
        for (int64_t p = 0; p < positions; ++p) {
          float* __restrict y = values + p * channels;
          for (int64_t c = 0; c < channels; ++c) y[c] = y[c] * v[c];
        }
        break;
      case N2UQ_STEP_PRELU:
        for (int64_t p = 0; p < positions; ++p) {
          float* __restrict y = values + p * channels;
          for (int64_t c = 0; c < channels; ++c) y[c] = prelu(y[c], v[c]);
        }
        break;
      case N2UQ_STEP_ADD_TENSOR: {
        float* __restrict y = values;
        const float* __restrict r = v + first_position * channels;
        for (int64_t i = 0; i < count; ++i) y[i] = y[i] + r[i];
        break;
      }
      case N2UQ_STEP_RELU:
        for (int64_t i = 0; i < count; ++i) values[i] = values[i] < 0.0f ? 0.0f : values[i];
        break;
      case N2UQ_STEP_RELU6:
        for (int64_t i = 0; i < count; ++i) {
          const float y = values[i];
          values[i] = y < 0.0f ? 0.0f : y > 6.0f ? 6.0f : y;
        }
        break;
      case N2UQ_STEP_RELU_N1_TO_1:
        for (int64_t i = 0; i < count; ++i) {
          const float y = values[i];
          values[i] = y < -1.0f ? -1.0f : y > 1.0f ? 1.0f : y;
        }
        break;
      default:
        break;  // validated by n2uq_output_stage
    }
  }
}
