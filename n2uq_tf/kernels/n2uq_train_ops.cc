// Fused CPU kernels for the N2UQ activation quantizer used in training.
//
// The math and its source of truth are in n2uq_tf/ops.py; these kernels compute the same
// thing in one pass forward and one pass backward (a chain of TF elementwise ops costs a
// memory pass each). ops.py prepares the small per-layer tables (floored intervals,
// bounds d_0..d_n, thresholds T_1..T_n, slopes beta2*delta/a'_i) and finishes the
// parameter gradients from the per-segment sums returned here.
//
// Forward:  xs = x * beta1;  level = #{i : xs > T_i};  y = float(level) * scale.
// Backward: k = #{j : d_j < xs}; element is in segment i = k - 1 when 1 <= k <= n.
//   grad_x = (g * slope_i) * beta1 inside, 0 outside;
//   per segment: sum g, sum g * (xs - d_{i-1}), sum g * x;   everywhere: sum g * level.
//
// Determinism: the flat tensor is cut into fixed blocks; each block reduces into its own
// slot (8 float lanes, then double), and blocks are combined in index order afterwards,
// so results do not depend on how the thread pool schedules blocks.

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <vector>

#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/shape_inference.h"
#include "tensorflow/core/util/work_sharder.h"

namespace n2uq {
namespace {

using tensorflow::OpKernel;
using tensorflow::OpKernelConstruction;
using tensorflow::OpKernelContext;
using tensorflow::Tensor;
using tensorflow::TensorShape;

constexpr int64_t kBlock = 16384;  // elements per deterministic reduction block
constexpr int kLanes = 8;          // one AVX2 register of floats

// Number of sorted values strictly below v (NaN -> 0, like the strict compares in ops.py).
inline int CountBelow(const float* sorted, int n, float v) {
  int lo = 0, hi = n;
  while (lo < hi) {
    const int mid = (lo + hi) / 2;
    if (sorted[mid] < v) lo = mid + 1; else hi = mid;
  }
  return lo;
}

template <int N>
inline void ForwardFixed(const float* x, float* y, int64_t len, const float* t, float beta1, float scale) {
  for (int64_t e = 0; e < len; ++e) {
    const float xs = x[e] * beta1;
    int level = 0;
    for (int i = 0; i < N; ++i) level += xs > t[i];
    y[e] = static_cast<float>(level) * scale;
  }
}

__attribute__((target_clones("avx2", "default")))
void ForwardRange(const float* x, float* y, int64_t len, const float* t, int n, float beta1, float scale) {
  switch (n) {
    case 1: ForwardFixed<1>(x, y, len, t, beta1, scale); return;
    case 3: ForwardFixed<3>(x, y, len, t, beta1, scale); return;
    case 7: ForwardFixed<7>(x, y, len, t, beta1, scale); return;
    case 15: ForwardFixed<15>(x, y, len, t, beta1, scale); return;
    default:
      for (int64_t e = 0; e < len; ++e) {
        y[e] = static_cast<float>(CountBelow(t, n, x[e] * beta1)) * scale;
      }
  }
}

// Per-block output of the backward pass: sums[3 * n] (g, g * offset, g * x per segment) and
// the level sum, all in double.
struct BackwardTables {
  const float* bounds;      // d_0..d_n
  const float* thresholds;  // T_1..T_n
  const float* slopes;      // beta2 * delta / a'_i
  int n;
  float beta1;
};

// One chunk of kLanes elements (or fewer, for the tail): lanes are the innermost loop of every
// statement so the compiler turns each into a vector instruction; selects, not branches.
template <int N>
inline void BackwardChunk(const float* g, const float* x, float* gx, int lanes, const BackwardTables& tab,
                          float (&acc_g)[N][kLanes], float (&acc_off)[N][kLanes], float (&acc_x)[N][kLanes],
                          float (&acc_level)[kLanes]) {
  float xv[kLanes] = {}, gv[kLanes] = {}, xs[kLanes], slope[kLanes] = {}, level[kLanes] = {};
  for (int l = 0; l < lanes; ++l) { xv[l] = x[l]; gv[l] = g[l]; }
  for (int l = 0; l < kLanes; ++l) xs[l] = xv[l] * tab.beta1;
  for (int i = 0; i < N; ++i) {
    const float lo = tab.bounds[i], hi = tab.bounds[i + 1], s = tab.slopes[i], t = tab.thresholds[i];
    for (int l = 0; l < kLanes; ++l) {
      const bool in = (xs[l] > lo) & (xs[l] <= hi);
      const float gi = in ? gv[l] : 0.0f;
      slope[l] += in ? s : 0.0f;  // exactly slope_i inside (segments are disjoint), 0 outside
      acc_g[i][l] += gi;
      acc_off[i][l] += in ? gi * (xs[l] - lo) : 0.0f;
      acc_x[i][l] += in ? gi * xv[l] : 0.0f;
      level[l] += xs[l] > t ? 1.0f : 0.0f;
    }
  }
  float out[kLanes];
  for (int l = 0; l < kLanes; ++l) {
    out[l] = (gv[l] * slope[l]) * tab.beta1;
    acc_level[l] += gv[l] * level[l];
  }
  for (int l = 0; l < lanes; ++l) gx[l] = out[l];
}

template <int N>
void BackwardFixed(const float* g, const float* x, float* gx, int64_t len, const BackwardTables& tab,
                   double* sums, double* level_sum) {
  float acc_g[N][kLanes] = {}, acc_off[N][kLanes] = {}, acc_x[N][kLanes] = {}, acc_level[kLanes] = {};
  int64_t e = 0;
  for (; e + kLanes <= len; e += kLanes) {
    BackwardChunk<N>(g + e, x + e, gx + e, kLanes, tab, acc_g, acc_off, acc_x, acc_level);
  }
  if (e < len) {  // zero-padded lanes add nothing: g = 0 there
    BackwardChunk<N>(g + e, x + e, gx + e, static_cast<int>(len - e), tab, acc_g, acc_off, acc_x, acc_level);
  }
  for (int i = 0; i < N; ++i) {
    double s_g = 0, s_off = 0, s_x = 0;
    for (int l = 0; l < kLanes; ++l) { s_g += acc_g[i][l]; s_off += acc_off[i][l]; s_x += acc_x[i][l]; }
    sums[i] = s_g; sums[N + i] = s_off; sums[2 * N + i] = s_x;
  }
  double s_level = 0;
  for (int l = 0; l < kLanes; ++l) s_level += acc_level[l];
  *level_sum = s_level;
}

void BackwardGeneric(const float* g, const float* x, float* gx, int64_t len, const BackwardTables& tab,
                     double* sums, double* level_sum) {
  const int n = tab.n;
  std::fill(sums, sums + 3 * n, 0.0);
  double s_level = 0;
  for (int64_t e = 0; e < len; ++e) {
    const float xs = x[e] * tab.beta1;
    const int k = CountBelow(tab.bounds, n + 1, xs);
    s_level += static_cast<double>(g[e]) * CountBelow(tab.thresholds, n, xs);
    if (k >= 1 && k <= n) {
      const int i = k - 1;
      gx[e] = (g[e] * tab.slopes[i]) * tab.beta1;
      sums[i] += g[e];
      sums[n + i] += static_cast<double>(g[e]) * (xs - tab.bounds[i]);
      sums[2 * n + i] += static_cast<double>(g[e]) * x[e];
    } else {
      gx[e] = 0.0f;
    }
  }
  *level_sum = s_level;
}

// Portable path: the compiler vectorizes what it can for the baseline ISA.
void BackwardPortable(const float* g, const float* x, float* gx, int64_t len, const BackwardTables& tab,
                   double* sums, double* level_sum) {
  switch (tab.n) {
    case 1: BackwardFixed<1>(g, x, gx, len, tab, sums, level_sum); return;
    case 3: BackwardFixed<3>(g, x, gx, len, tab, sums, level_sum); return;
    case 7: BackwardFixed<7>(g, x, gx, len, tab, sums, level_sum); return;
    case 15: BackwardFixed<15>(g, x, gx, len, tab, sums, level_sum); return;
    default: BackwardGeneric(g, x, gx, len, tab, sums, level_sum);
  }
}

// Explicit AVX2 backward for n <= 15: 8 elements per step, one accumulator register per
// segment and sum. Masks replace branches; a lane outside a segment adds exact zeros.
constexpr int kMaxVectorN = 15;

__attribute__((target("avx2"))) inline double SumLanes(__m256 v) {
  alignas(32) float lanes[kLanes];
  _mm256_store_ps(lanes, v);
  double total = 0;
  for (int l = 0; l < kLanes; ++l) total += lanes[l];
  return total;
}

__attribute__((target("avx2"))) void BackwardAvx2(const float* g, const float* x, float* gx, int64_t len,
                                                  const BackwardTables& tab, double* sums, double* level_sum) {
  const int n = tab.n;
  __m256 acc_g[kMaxVectorN], acc_off[kMaxVectorN], acc_x[kMaxVectorN];
  for (int i = 0; i < n; ++i) acc_g[i] = acc_off[i] = acc_x[i] = _mm256_setzero_ps();
  __m256 acc_level = _mm256_setzero_ps();
  const __m256 beta1 = _mm256_set1_ps(tab.beta1), one = _mm256_set1_ps(1.0f);
  int64_t e = 0;
  for (; e + kLanes <= len; e += kLanes) {
    const __m256 xv = _mm256_loadu_ps(x + e), gv = _mm256_loadu_ps(g + e);
    const __m256 xs = _mm256_mul_ps(xv, beta1);
    __m256 slope = _mm256_setzero_ps(), level = _mm256_setzero_ps();
    __m256 lo = _mm256_set1_ps(tab.bounds[0]);
    __m256 above_lo = _mm256_cmp_ps(xs, lo, _CMP_GT_OQ);
    for (int i = 0; i < n; ++i) {
      const __m256 hi = _mm256_set1_ps(tab.bounds[i + 1]);
      const __m256 in = _mm256_and_ps(above_lo, _mm256_cmp_ps(xs, hi, _CMP_LE_OQ));
      const __m256 gi = _mm256_and_ps(in, gv);
      slope = _mm256_add_ps(slope, _mm256_and_ps(in, _mm256_set1_ps(tab.slopes[i])));
      acc_g[i] = _mm256_add_ps(acc_g[i], gi);
      acc_off[i] = _mm256_add_ps(acc_off[i], _mm256_and_ps(in, _mm256_mul_ps(gi, _mm256_sub_ps(xs, lo))));
      acc_x[i] = _mm256_add_ps(acc_x[i], _mm256_and_ps(in, _mm256_mul_ps(gi, xv)));
      const __m256 above_t = _mm256_cmp_ps(xs, _mm256_set1_ps(tab.thresholds[i]), _CMP_GT_OQ);
      level = _mm256_add_ps(level, _mm256_and_ps(above_t, one));
      above_lo = _mm256_cmp_ps(xs, hi, _CMP_GT_OQ);
      lo = hi;
    }
    _mm256_storeu_ps(gx + e, _mm256_mul_ps(_mm256_mul_ps(gv, slope), beta1));
    acc_level = _mm256_add_ps(acc_level, _mm256_mul_ps(gv, level));
  }
  double tail_level = 0;
  BackwardGeneric(g + e, x + e, gx + e, len - e, tab, sums, &tail_level);  // the < 8 left over
  for (int i = 0; i < n; ++i) {
    sums[i] += SumLanes(acc_g[i]);
    sums[n + i] += SumLanes(acc_off[i]);
    sums[2 * n + i] += SumLanes(acc_x[i]);
  }
  *level_sum = tail_level + SumLanes(acc_level);
}

bool UseAvx2() {
  static const bool use = __builtin_cpu_supports("avx2") && std::getenv("N2UQ_TF_PORTABLE_KERNELS") == nullptr;
  return use;
}

void BackwardRange(const float* g, const float* x, float* gx, int64_t len, const BackwardTables& tab,
                   double* sums, double* level_sum) {
  if (tab.n <= kMaxVectorN && UseAvx2()) {
    BackwardAvx2(g, x, gx, len, tab, sums, level_sum);
    return;
  }
  BackwardPortable(g, x, gx, len, tab, sums, level_sum);
}

// Runs fn(block_begin, block_end) over [0, num_blocks) on the op's CPU thread pool.
template <typename Fn>
void ParallelBlocks(OpKernelContext* ctx, int64_t num_blocks, int64_t cost_per_block, Fn fn) {
  auto* threads = ctx->device()->tensorflow_cpu_worker_threads();
  tensorflow::Shard(threads->num_threads, threads->workers, num_blocks, cost_per_block,
                    [&fn](int64_t begin, int64_t end) { fn(begin, end); });
}

bool IsScalar(const Tensor& t) { return t.dims() == 0 || (t.dims() == 1 && t.dim_size(0) == 1); }

class ForwardOp : public OpKernel {
 public:
  explicit ForwardOp(OpKernelConstruction* ctx) : OpKernel(ctx) {}

  void Compute(OpKernelContext* ctx) override {
    const Tensor& x = ctx->input(0);
    const Tensor& thresholds = ctx->input(1);
    const Tensor& beta1 = ctx->input(2);
    const Tensor& scale = ctx->input(3);
    OP_REQUIRES(ctx, thresholds.dims() == 1 && thresholds.dim_size(0) >= 1,
                absl::InvalidArgumentError("N2uqQuantizeForward: thresholds must be a non-empty vector, got shape " +
                                           thresholds.shape().DebugString()));
    OP_REQUIRES(ctx, IsScalar(beta1) && IsScalar(scale),
                absl::InvalidArgumentError("N2uqQuantizeForward: beta1 and scale must be scalars"));
    Tensor* y = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, x.shape(), &y));
    const int64_t size = x.NumElements();
    if (size == 0) return;
    const float* xp = x.flat<float>().data();
    float* yp = y->flat<float>().data();
    const float* t = thresholds.flat<float>().data();
    const int n = static_cast<int>(thresholds.dim_size(0));
    const float b1 = beta1.flat<float>()(0), sc = scale.flat<float>()(0);
    const int64_t num_blocks = (size + kBlock - 1) / kBlock;
    ParallelBlocks(ctx, num_blocks, kBlock * (n + 4), [&](int64_t begin, int64_t end) {
      const int64_t lo = begin * kBlock, hi = std::min(size, end * kBlock);
      ForwardRange(xp + lo, yp + lo, hi - lo, t, n, b1, sc);
    });
  }
};

class BackwardOp : public OpKernel {
 public:
  explicit BackwardOp(OpKernelConstruction* ctx) : OpKernel(ctx) {}

  void Compute(OpKernelContext* ctx) override {
    const Tensor& grad = ctx->input(0);
    const Tensor& x = ctx->input(1);
    const Tensor& bounds = ctx->input(2);
    const Tensor& thresholds = ctx->input(3);
    const Tensor& beta1 = ctx->input(4);
    const Tensor& slopes = ctx->input(5);
    OP_REQUIRES(ctx, grad.shape() == x.shape(),
                absl::InvalidArgumentError("N2uqQuantizeBackward: grad shape " + grad.shape().DebugString() +
                                           " differs from x shape " + x.shape().DebugString()));
    OP_REQUIRES(ctx, thresholds.dims() == 1 && thresholds.dim_size(0) >= 1,
                absl::InvalidArgumentError("N2uqQuantizeBackward: thresholds must be a non-empty vector"));
    const int n = static_cast<int>(thresholds.dim_size(0));
    OP_REQUIRES(ctx, bounds.dims() == 1 && bounds.dim_size(0) == n + 1,
                absl::InvalidArgumentError("N2uqQuantizeBackward: bounds must have n + 1 = " + std::to_string(n + 1) +
                                           " values, got shape " + bounds.shape().DebugString()));
    OP_REQUIRES(ctx, slopes.dims() == 1 && slopes.dim_size(0) == n,
                absl::InvalidArgumentError("N2uqQuantizeBackward: slopes must have n = " + std::to_string(n) +
                                           " values, got shape " + slopes.shape().DebugString()));
    OP_REQUIRES(ctx, IsScalar(beta1), absl::InvalidArgumentError("N2uqQuantizeBackward: beta1 must be a scalar"));

    Tensor *grad_x = nullptr, *sums = nullptr, *level_sum = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, x.shape(), &grad_x));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(1, TensorShape({3, n}), &sums));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(2, TensorShape({}), &level_sum));
    const int64_t size = x.NumElements();
    const BackwardTables tab{bounds.flat<float>().data(), thresholds.flat<float>().data(),
                             slopes.flat<float>().data(), n, beta1.flat<float>()(0)};
    const int64_t num_blocks = (size + kBlock - 1) / kBlock;
    std::vector<double> partial(static_cast<size_t>(num_blocks) * (3 * n + 1), 0.0);
    const float* gp = grad.flat<float>().data();
    const float* xp = x.flat<float>().data();
    float* gxp = grad_x->flat<float>().data();
    ParallelBlocks(ctx, num_blocks, kBlock * (6 * n + 8), [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        const int64_t lo = b * kBlock, hi = std::min(size, lo + kBlock);
        double* slot = partial.data() + b * (3 * n + 1);
        BackwardRange(gp + lo, xp + lo, gxp + lo, hi - lo, tab, slot, slot + 3 * n);
      }
    });
    double* out = sums->flat<double>().data();
    std::fill(out, out + 3 * n, 0.0);
    double total_level = 0.0;
    for (int64_t b = 0; b < num_blocks; ++b) {  // fixed order: deterministic
      const double* slot = partial.data() + b * (3 * n + 1);
      for (int j = 0; j < 3 * n; ++j) out[j] += slot[j];
      total_level += slot[3 * n];
    }
    level_sum->scalar<double>()() = total_level;
  }
};

}  // namespace
}  // namespace n2uq

using ::tensorflow::shape_inference::InferenceContext;

REGISTER_OP("N2uqQuantizeForward")
    .Input("x: float")
    .Input("thresholds: float")
    .Input("beta1: float")
    .Input("scale: float")
    .Output("y: float")
    .SetShapeFn([](InferenceContext* c) {
      c->set_output(0, c->input(0));
      return absl::OkStatus();
    })
    .Doc("N2UQ activation quantizer forward: float(#{i : x * beta1 > thresholds[i]}) * scale.");

REGISTER_OP("N2uqQuantizeBackward")
    .Input("grad: float")
    .Input("x: float")
    .Input("bounds: float")
    .Input("thresholds: float")
    .Input("beta1: float")
    .Input("slopes: float")
    .Output("grad_x: float")
    .Output("segment_sums: double")
    .Output("level_sum: double")
    .SetShapeFn([](InferenceContext* c) {
      c->set_output(0, c->input(1));
      c->set_output(1, c->Matrix(3, c->Dim(c->input(3), 0)));
      c->set_output(2, c->Scalar());
      return absl::OkStatus();
    })
    .Doc("N2UQ G-STE backward: grad_x, per-segment sums [3, n] and sum(grad * level).");

REGISTER_KERNEL_BUILDER(Name("N2uqQuantizeForward").Device(tensorflow::DEVICE_CPU), n2uq::ForwardOp);
REGISTER_KERNEL_BUILDER(Name("N2uqQuantizeBackward").Device(tensorflow::DEVICE_CPU), n2uq::BackwardOp);
