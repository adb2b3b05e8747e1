// The output stage's steps (output_stage_impl.h) compiled for AVX2 and for AVX-512; the
// dispatcher (output_stage.cc) calls them only under the matching resolved ISA.
#if defined(__x86_64__)
#include <stdint.h>
#include <string.h>

#include "core_internal.h"
#include "n2uq_core.h"

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2")
#endif
namespace n2uq_core {
namespace avx2_steps {
constexpr int kLaneBytes = 32;
#include "output_stage_impl.h"
}  // namespace avx2_steps
}  // namespace n2uq_core
#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx512bw,avx512vl"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,prefer-vector-width=512")
#endif
namespace n2uq_core {
namespace avx512_steps {
constexpr int kLaneBytes = 64;
#include "output_stage_impl.h"
}  // namespace avx512_steps
}  // namespace n2uq_core
#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

namespace n2uq_core {
OutputRowsFn output_rows_avx2() { return &avx2_steps::output_rows; }
OutputRowsFn output_rows_avx512() { return &avx512_steps::output_rows; }
}  // namespace n2uq_core

#else  // not x86-64

#include "core_internal.h"

namespace n2uq_core {
OutputRowsFn output_rows_avx2() { return nullptr; }
OutputRowsFn output_rows_avx512() { return nullptr; }
}  // namespace n2uq_core

#endif
