// The kernels written once in GCC vector extensions and compiled per ISA, here for AVX2 and for
// AVX-512: the output stage's steps (output_stage_impl.h; dispatched by output_stage.cc) and the
// max pools' rows (pool_impl.h; dispatched by pool.cc). The dispatchers call them only under the
// matching resolved ISA; their baseline builds live in those files.
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
namespace avx2_pool {
constexpr int kLaneBytes = 32;
#include "pool_impl.h"
}  // namespace avx2_pool
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
namespace avx512_pool {
constexpr int kLaneBytes = 64;
#include "pool_impl.h"
}  // namespace avx512_pool
}  // namespace n2uq_core
#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

namespace n2uq_core {
OutputRowsFn output_rows_avx2() { return &avx2_steps::output_rows; }
OutputRowsFn output_rows_avx512() { return &avx512_steps::output_rows; }
PoolRowKernels pool_rows_avx2() { return avx2_pool::pool_row_kernels(); }
PoolRowKernels pool_rows_avx512() { return avx512_pool::pool_row_kernels(); }
}  // namespace n2uq_core

#else  // not x86-64

#include "core_internal.h"

namespace n2uq_core {
OutputRowsFn output_rows_avx2() { return nullptr; }
OutputRowsFn output_rows_avx512() { return nullptr; }
PoolRowKernels pool_rows_avx2() { return PoolRowKernels{nullptr, nullptr}; }
PoolRowKernels pool_rows_avx512() { return PoolRowKernels{nullptr, nullptr}; }
}  // namespace n2uq_core

#endif
