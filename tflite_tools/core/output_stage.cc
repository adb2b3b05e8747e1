// The output stage of the fused layer ops (n2uq_output_stage in n2uq_core.h): per-channel steps,
// an optional float output, an optional quantize(-and-pack) of the next layer's input, in one
// pass over the layer's float output: the steps in registers (output_stage_impl.h), the final
// values chunk by chunk into a small buffer that stays in L1 for the quantizer.
// The quantize kernels are the ISA's own (KernelTable::quantize_and_pack / quantize_codes), so the
// codes are those of n2uq_quantize_and_pack on the same float values.
#include <cstdarg>
#include <cstdio>
#include <cstring>
#include <new>
#include <string.h>
#include <vector>

#include "core_internal.h"
#include "n2uq_core.h"

namespace n2uq_core {
namespace portable_steps {
constexpr int kLaneBytes = 16;  // SSE2 on x86-64, NEON on aarch64, the compiler's lowering elsewhere
#include "output_stage_impl.h"
}  // namespace portable_steps

OutputRowsFn output_rows_portable() { return &portable_steps::output_rows; }

namespace {

constexpr int64_t kMaxChannels = int64_t(1) << 24;  // as the conv ops' channel cap
constexpr int64_t kMaxElements = int64_t(1) << 40;
// Floats per chunk: 16 KB, so a chunk and its step vectors stay in L1 between the steps.
constexpr int64_t kChunkElements = 4096;

bool product(int64_t a, int64_t b, int64_t* out) { return !__builtin_mul_overflow(a, b, out) && *out <= kMaxElements; }

const char* step_name(int kind) {
  static const char* const names[N2UQ_STEP_KINDS] = {"?", "ADD", "MUL", "PRELU", "ADD_TENSOR", "RELU", "RELU6",
                                                     "RELU_N1_TO_1"};
  return kind > 0 && kind < N2UQ_STEP_KINDS ? names[kind] : "?";
}

int check_stage(const N2uqOutputStage* s, int64_t positions, int64_t channels, int64_t elements, char* err,
                size_t err_len) {
  N2UQ_CHECK(s != nullptr, N2UQ_ERR_ARGUMENT, "stage is NULL");
  N2UQ_CHECK(s->num_steps >= 0 && s->num_steps <= N2UQ_MAX_OUTPUT_STEPS, N2UQ_ERR_ARGUMENT,
              "num_steps must be 0..%d, got %d", N2UQ_MAX_OUTPUT_STEPS, s->num_steps);
  for (int i = 0; i < s->num_steps; ++i) {
    const N2uqOutputStep& step = s->steps[i];
    N2UQ_CHECK(step.kind > 0 && step.kind < N2UQ_STEP_KINDS, N2UQ_ERR_ARGUMENT,
                "step %d has kind %d, not one of 1..%d", i, step.kind, N2UQ_STEP_KINDS - 1);
    const int64_t needed = step_values_needed(step.kind, channels, elements);
    if (needed > 0) {
      N2UQ_CHECK(step.values != nullptr, N2UQ_ERR_ARGUMENT, "step %d (%s) has no values", i, step_name(step.kind));
      N2UQ_CHECK(step.values_len >= needed, N2UQ_ERR_BUFFER, "step %d (%s) has %lld values, needs %lld", i,
                  step_name(step.kind), (long long)step.values_len, (long long)needed);
    }
  }
  N2UQ_CHECK(s->float_after >= -1 && s->float_after <= s->num_steps, N2UQ_ERR_ARGUMENT,
              "float_after must be -1..num_steps (%d), got %d", s->num_steps, s->float_after);
  N2UQ_CHECK(s->quantize >= N2UQ_QUANTIZE_NONE && s->quantize <= N2UQ_QUANTIZE_CODES, N2UQ_ERR_ARGUMENT,
              "quantize must be 0 (none), 1 (pack) or 2 (codes), got %d", s->quantize);
  N2UQ_CHECK(s->float_after >= 0 || s->quantize != N2UQ_QUANTIZE_NONE, N2UQ_ERR_ARGUMENT,
              "the stage has no output (float_after = -1 and quantize = none)");
  if (s->quantize != N2UQ_QUANTIZE_NONE) {
    N2UQ_CHECK(s->bits >= 1 && s->bits <= N2UQ_MAX_BITS, N2UQ_ERR_ARGUMENT, "bits must be 1..%d, got %d",
                N2UQ_MAX_BITS, s->bits);
    N2UQ_CHECK(s->thresholds != nullptr, N2UQ_ERR_ARGUMENT, "thresholds is NULL");
    N2UQ_CHECK(s->num_thresholds == (1 << s->bits) - 1, N2UQ_ERR_ARGUMENT, "%d-bit codes need %d thresholds, got %d",
                s->bits, (1 << s->bits) - 1, s->num_thresholds);
  }
  return N2UQ_OK;
}

}  // namespace

int64_t step_values_needed(int32_t kind, int64_t channels, int64_t elements) {
  if (kind == N2UQ_STEP_ADD || kind == N2UQ_STEP_MUL || kind == N2UQ_STEP_PRELU) return channels;
  return kind == N2UQ_STEP_ADD_TENSOR ? elements : 0;
}

int check_output_stage(const N2uqOutputStage* stage, int64_t num_positions, int32_t channels, const float* out_float,
                       int64_t out_float_len, const uint64_t* out_packed, int64_t out_packed_len,
                       const uint8_t* out_codes, int64_t out_codes_len, int64_t* elements, char* err, size_t err_len) {
  N2UQ_CHECK(num_positions >= 1 && num_positions <= kMaxElements, N2UQ_ERR_ARGUMENT,
              "num_positions must be >= 1, got %lld", (long long)num_positions);
  N2UQ_CHECK(channels >= 1 && channels <= kMaxChannels, N2UQ_ERR_ARGUMENT, "channels must be 1..%lld, got %d",
              (long long)kMaxChannels, channels);
  N2UQ_CHECK(product(num_positions, channels, elements), N2UQ_ERR_UNSUPPORTED, "tensor sizes are too large");
  if (int rc = check_stage(stage, num_positions, channels, *elements, err, err_len)) return rc;
  if (stage->float_after >= 0) {
    N2UQ_CHECK(out_float != nullptr, N2UQ_ERR_ARGUMENT, "out_float is NULL");
    N2UQ_CHECK(out_float_len >= *elements, N2UQ_ERR_BUFFER, "out_float has %lld elements, the shape needs %lld",
                (long long)out_float_len, (long long)*elements);
  }
  const int64_t words = (int64_t(channels) + 63) / 64;
  if (stage->quantize == N2UQ_QUANTIZE_PACK) {
    int64_t needed = 0;
    N2UQ_CHECK(product(num_positions, stage->bits * words, &needed), N2UQ_ERR_UNSUPPORTED,
                "tensor sizes are too large");
    N2UQ_CHECK(out_packed != nullptr, N2UQ_ERR_ARGUMENT, "out_packed is NULL");
    N2UQ_CHECK(out_packed_len >= needed, N2UQ_ERR_BUFFER, "out_packed has %lld words, the shape needs %lld",
                (long long)out_packed_len, (long long)needed);
  } else if (stage->quantize == N2UQ_QUANTIZE_CODES) {
    N2UQ_CHECK(out_codes != nullptr, N2UQ_ERR_ARGUMENT, "out_codes is NULL");
    N2UQ_CHECK(out_codes_len >= *elements, N2UQ_ERR_BUFFER, "out_codes has %lld elements, the shape needs %lld",
                (long long)out_codes_len, (long long)*elements);
  }
  return N2UQ_OK;
}

}  // namespace n2uq_core

using namespace n2uq_core;

extern "C" int n2uq_output_stage(const N2uqOutputStage* stage, int64_t num_positions, int32_t channels,
                                 const float* values, int64_t values_len, float* out_float, int64_t out_float_len,
                                 uint64_t* out_packed, int64_t out_packed_len, uint8_t* out_codes,
                                 int64_t out_codes_len, int isa, int num_threads, char* err, size_t err_len) {
  return guarded(err, err_len, [&]() -> int {
    N2UQ_CHECK(num_threads >= 1 && num_threads <= N2UQ_MAX_THREADS, N2UQ_ERR_ARGUMENT,
                "num_threads must be 1..%d, got %d", N2UQ_MAX_THREADS, num_threads);
    int64_t elements = 0;
    if (int rc = check_output_stage(stage, num_positions, channels, out_float, out_float_len, out_packed,
                                    out_packed_len, out_codes, out_codes_len, &elements, err, err_len))
      return rc;
    N2UQ_CHECK(values != nullptr, N2UQ_ERR_ARGUMENT, "values is NULL");
    N2UQ_CHECK(values_len >= elements, N2UQ_ERR_BUFFER, "values has %lld elements, the shape needs %lld",
                (long long)values_len, (long long)elements);
    // In place is fine (each block of a row is read before it is written); a shifted overlap is not.
    N2UQ_CHECK(stage->float_after < 0 || out_float == values || out_float + elements <= values ||
                   values + elements <= out_float,
                N2UQ_ERR_ARGUMENT, "out_float overlaps values without being values");
    const int64_t words = (int64_t(channels) + 63) / 64;
    const int resolved = resolve_isa(isa, err, err_len);
    if (resolved < 0) return resolved;
    OutputRowsFn rows = resolved == N2UQ_ISA_AVX512 ? output_rows_avx512()
                        : resolved == N2UQ_ISA_AVX2 ? output_rows_avx2()
                                                    : output_rows_portable();
    if (rows == nullptr) rows = output_rows_portable();
    const KernelTable* table = isa_kernels(resolved);
    QuantizeJob quantize{};
    if (stage->quantize != N2UQ_QUANTIZE_NONE)
      prepare_quantize_job(quantize, stage->thresholds, stage->num_thresholds, stage->bits, stage->beta1);
    quantize.channels = channels;
    quantize.words = int32_t(words);

    const int64_t chunk_positions = kChunkElements / channels > 0 ? kChunkElements / channels : 1;
    const int64_t grain = quantize_task_elements(resolved) / channels + 1;
    const N2uqOutputStage& s = *stage;
    run_ranges(num_threads, num_positions, grain, [&](int64_t begin, int64_t end) {
      std::vector<float> buffer(s.quantize != N2UQ_QUANTIZE_NONE ? size_t(chunk_positions * channels) : 0);
      float* chunk = buffer.data();
      for (int64_t p0 = begin; p0 < end; p0 += chunk_positions) {
        const int64_t count = end - p0 < chunk_positions ? end - p0 : chunk_positions;
        const int64_t offset = p0 * channels, n = count * channels;
        rows(s, values + offset, s.float_after >= 0 ? out_float + offset : nullptr,
             s.quantize != N2UQ_QUANTIZE_NONE ? chunk : nullptr, p0, count, channels);
        if (s.quantize == N2UQ_QUANTIZE_NONE) continue;
        QuantizeJob job = quantize;
        job.x = chunk;
        if (s.quantize == N2UQ_QUANTIZE_PACK) {
          job.out_packed = out_packed + p0 * s.bits * words;
          table->quantize_and_pack(job, 0, count);
        } else {
          job.channels = 1;
          job.words = 1;
          job.out_codes = out_codes + offset;
          table->quantize_codes(job, 0, n);
        }
      }
    });
    return N2UQ_OK;
  });
}
