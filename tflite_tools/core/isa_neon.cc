// NEON path (aarch64, where Advanced SIMD is always present): vcntq_u8 counts bytes,
// pairwise widening adds fold them into two 64-bit lanes.
#if defined(__aarch64__)
#include <arm_neon.h>
#include <stdint.h>

#include "kernel_table.h"

namespace n2uq_core {
namespace {

struct Ops {
  static constexpr int kLanes = 2;
  static constexpr int kAccumulatorBudget = 24;  // of 32 q registers
  typedef uint64x2_t V;
  static inline uint64_t popcount64(uint64_t v) { return (uint64_t)__builtin_popcountll(v); }
  static inline V zero() { return vdupq_n_u64(0); }
  static inline V load(const uint64_t* p) { return vld1q_u64(p); }
  static inline V and_broadcast(V a, uint64_t w) { return vandq_u64(a, vdupq_n_u64(w)); }
  static inline V popcount(V a) {
    return vpaddlq_u32(vpaddlq_u16(vpaddlq_u8(vcntq_u8(vreinterpretq_u8_u64(a)))));
  }
  static inline V add(V a, V b) { return vaddq_u64(a, b); }
  static inline void store(uint64_t* p, V v) { vst1q_u64(p, v); }
};

#include "kernels_impl.h"

}  // namespace

const KernelTable* neon_kernels() {
  static const KernelTable table = make_kernel_table<Ops>("neon");
  return &table;
}

}  // namespace n2uq_core

#else

#include "kernel_table.h"
namespace n2uq_core {
const KernelTable* neon_kernels() { return nullptr; }
}  // namespace n2uq_core

#endif
