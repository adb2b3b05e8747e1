// Portable path: plain C++ for any CPU (baseline x86-64, aarch64 without NEON use, ...).
#include <stdint.h>

#include "kernel_table.h"

namespace n2uq_core {
namespace {

struct Ops {
  static constexpr int kLanes = 1;
  static constexpr int kAccumulatorBudget = 12;
  typedef uint64_t V;
  // SWAR popcount: baseline x86-64 has no popcnt instruction and __builtin_popcountll
  // would become a libgcc call per word.
  static inline uint64_t popcount64(uint64_t v) {
    v = v - ((v >> 1) & 0x5555555555555555ull);
    v = (v & 0x3333333333333333ull) + ((v >> 2) & 0x3333333333333333ull);
    v = (v + (v >> 4)) & 0x0f0f0f0f0f0f0f0full;
    return (v * 0x0101010101010101ull) >> 56;
  }
  static inline V zero() { return 0; }
  static inline V load(const uint64_t* p) { return *p; }
  static inline V and_broadcast(V a, uint64_t w) { return a & w; }
  static inline V popcount(V a) { return popcount64(a); }
  static inline V add(V a, V b) { return a + b; }
  static inline void store(uint64_t* p, V v) { *p = v; }
};

#include "kernels_impl.h"

}  // namespace

const KernelTable* portable_kernels() {
  static const KernelTable table = make_kernel_table<Ops>("portable");
  return &table;
}

}  // namespace n2uq_core
