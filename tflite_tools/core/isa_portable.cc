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

// Dot path in plain C++: 4 output channels per "vector", one block per work item.
struct DotOps {
  static constexpr int kLanes = 4;
  static constexpr int kBlocksPerChunk = 1;
  static constexpr int max_pixels(int) { return 4; }
  struct Acc {
    int32_t v[4];
  };
  typedef const int8_t* Wv;
  struct Av {
    int32_t m[4];
  };
  static inline Acc zero() { return Acc{{0, 0, 0, 0}}; }
  static inline Wv load_weights(const int8_t* p) { return p; }
  static inline Av broadcast4(const uint8_t* p) { return Av{{p[0], p[1], p[2], p[3]}}; }
  static inline Acc dot(Acc acc, const Av& a, Wv w) {
    for (int l = 0; l < 4; ++l)
      acc.v[l] += a.m[0] * w[4 * l] + a.m[1] * w[4 * l + 1] + a.m[2] * w[4 * l + 2] + a.m[3] * w[4 * l + 3];
    return acc;
  }
  struct Out {
    const ConvJob* j;
    int64_t oc0;
    int valid;
  };
  static inline Out out(const ConvJob& j, int64_t oc0, int valid) { return Out{&j, oc0, valid}; }
  static inline void store(const Out& o, int64_t index, const Acc& acc) {
    const ConvJob& j = *o.j;
    const int64_t oc0 = o.oc0, valid = o.valid;
    for (int l = 0; l < valid; ++l) {
      if (j.out_int32) j.out_int32[index + l] = acc.v[l];
      if (j.out_float) j.out_float[index + l] = (float)acc.v[l] * j.multiplier[oc0 + l] + j.bias[oc0 + l];
    }
  }
  static inline void codes64(const uint64_t* planes, int64_t words, int act_bits, uint64_t tail, uint8_t* out) {
    for (int c = 0; c < 64; ++c) out[c] = 0;
    for (int p = 0; p < act_bits; ++p) {
      const uint64_t bits = planes[p * words] & tail;
      for (int c = 0; c < 64; ++c) out[c] |= (uint8_t)(((bits >> c) & 1u) << p);
    }
  }
};

#include "dot_impl.h"

}  // namespace

const KernelTable* portable_kernels() {
  static const KernelTable table = make_kernel_table<Ops>("portable");
  return &table;
}

const PathKernels* portable_dot_kernels() {
  static const PathKernels kernels = make_dot_kernels_wino<DotOps>("portable dot");
  return &kernels;
}

}  // namespace n2uq_core
