// AVX-512 path: VPOPCNTQ counts each 64-bit lane directly, so the inner loop is
// AND (with an embedded weight broadcast) + VPOPCNTQ + VPADDQ. Target options apply to
// this file only; the dispatcher calls in only when the CPU has avx512f/bw/vpopcntdq.
#if defined(__x86_64__)
#include <immintrin.h>
#include <stdint.h>

#include "kernel_table.h"

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx512vpopcntdq,avx512bw,popcnt"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx512f,avx512vpopcntdq,avx512bw,popcnt")
#endif

namespace n2uq_core {
namespace {

struct Ops {
  static constexpr int kLanes = 8;
  static constexpr int kAccumulatorBudget = 24;  // of 32 zmm registers
  typedef __m512i V;
  static inline uint64_t popcount64(uint64_t v) { return (uint64_t)__builtin_popcountll(v); }
  static inline V zero() { return _mm512_setzero_si512(); }
  static inline V load(const uint64_t* p) { return _mm512_loadu_si512((const void*)p); }
  static inline V and_broadcast(V a, uint64_t w) { return _mm512_and_si512(a, _mm512_set1_epi64((long long)w)); }
  static inline V popcount(V a) { return _mm512_popcnt_epi64(a); }
  static inline V add(V a, V b) { return _mm512_add_epi64(a, b); }
  static inline void store(uint64_t* p, V v) { _mm512_storeu_si512((void*)p, v); }
};

#include "kernels_impl.h"

}  // namespace

const KernelTable* avx512_kernels() {
  static const KernelTable table = make_kernel_table<Ops>("avx512");
  return &table;
}

}  // namespace n2uq_core

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

#else  // not x86-64

#include "kernel_table.h"
namespace n2uq_core {
const KernelTable* avx512_kernels() { return nullptr; }
}  // namespace n2uq_core

#endif
