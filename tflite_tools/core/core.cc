// C API of n2uq_core: argument validation, ISA dispatch and the thread pool.
// Compiled without any target options; the per-ISA files hold the kernels.
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <mutex>
#include <new>
#include <thread>
#include <vector>

#include "kernel_table.h"
#include "n2uq_core.h"

namespace n2uq_core {
namespace {

// ---------------------------------------------------------------- errors

int report(char* err, size_t err_len, int status, const char* format, ...) {
  if (err != nullptr && err_len > 0) {
    va_list args;
    va_start(args, format);
    std::vsnprintf(err, err_len, format, args);
    va_end(args);
  }
  return status;
}

#define N2UQ_FAIL(status, ...) return report(err, err_len, status, __VA_ARGS__)
#define N2UQ_CHECK(cond, status, ...) \
  do {                                \
    if (!(cond)) N2UQ_FAIL(status, __VA_ARGS__); \
  } while (0)

// Largest dimension accepted: keeps every index product far from int64 overflow.
constexpr int64_t kMaxDim = 1 << 24;
constexpr int64_t kMaxElements = int64_t(1) << 40;

bool mul_ok(int64_t a, int64_t b, int64_t* out) {
  return !__builtin_mul_overflow(a, b, out) && *out <= kMaxElements;
}

int check_bits(int32_t bits, const char* what, char* err, size_t err_len) {
  if (bits == 8)
    N2UQ_FAIL(N2UQ_ERR_UNSUPPORTED, "%s = 8 is not supported by the bit-serial kernels (1..%d); "
              "8-bit layers should use TFLite's own int8 kernels", what, N2UQ_MAX_BITS);
  N2UQ_CHECK(bits >= 1 && bits <= N2UQ_MAX_BITS, N2UQ_ERR_ARGUMENT, "%s must be 1..%d, got %d", what, N2UQ_MAX_BITS,
             bits);
  return N2UQ_OK;
}

int check_threads(int num_threads, char* err, size_t err_len) {
  N2UQ_CHECK(num_threads >= 1 && num_threads <= N2UQ_MAX_THREADS, N2UQ_ERR_ARGUMENT,
             "num_threads must be 1..%d, got %d", N2UQ_MAX_THREADS, num_threads);
  return N2UQ_OK;
}

// ---------------------------------------------------------------- ISA dispatch

bool cpu_has(int isa) {
  switch (isa) {
    case N2UQ_ISA_PORTABLE:
      return true;
#if defined(__x86_64__)
    case N2UQ_ISA_AVX2:
      __builtin_cpu_init();
      return avx2_kernels() != nullptr && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("popcnt");
    case N2UQ_ISA_AVX512:
      __builtin_cpu_init();
      return avx512_kernels() != nullptr && __builtin_cpu_supports("avx512f") &&
             __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vpopcntdq") &&
             __builtin_cpu_supports("popcnt");
#endif
#if defined(__aarch64__)
    case N2UQ_ISA_NEON:
      return neon_kernels() != nullptr;  // Advanced SIMD is mandatory on aarch64
#endif
    default:
      return false;
  }
}

int best_isa() {
  static const int best = [] {
    for (int isa : {N2UQ_ISA_AVX512, N2UQ_ISA_AVX2, N2UQ_ISA_NEON})
      if (cpu_has(isa)) return isa;
    return int(N2UQ_ISA_PORTABLE);
  }();
  return best;
}

int isa_from_name(const char* name) {
  static const char* const names[] = {"auto", "portable", "avx2", "avx512", "neon"};
  for (int i = 0; i < 5; ++i)
    if (std::strcmp(name, names[i]) == 0) return i;
  return -1;
}

int resolve(int isa, char* err, size_t err_len) {
  if (isa == N2UQ_ISA_AUTO) {
    const char* env = std::getenv("N2UQ_KERNEL_ISA");
    if (env == nullptr || env[0] == '\0') return best_isa();
    isa = isa_from_name(env);
    N2UQ_CHECK(isa >= 0, N2UQ_ERR_ARGUMENT, "N2UQ_KERNEL_ISA=%.40s is not one of auto, portable, avx2, avx512, neon",
               env);
    if (isa == N2UQ_ISA_AUTO) return best_isa();
  }
  N2UQ_CHECK(isa >= N2UQ_ISA_PORTABLE && isa <= N2UQ_ISA_NEON, N2UQ_ERR_ARGUMENT, "unknown ISA id %d", isa);
  N2UQ_CHECK(cpu_has(isa), N2UQ_ERR_UNSUPPORTED, "ISA %s is not supported by this CPU or build",
             n2uq_isa_name(isa));
  return isa;
}

const KernelTable* table_for(int isa) {
  switch (isa) {
    case N2UQ_ISA_AVX2: return avx2_kernels();
    case N2UQ_ISA_AVX512: return avx512_kernels();
    case N2UQ_ISA_NEON: return neon_kernels();
    default: return portable_kernels();
  }
}

// ---------------------------------------------------------------- thread pool

// Workers persist across calls (spawning threads per layer would cost more than small
// layers take). Each call hands out task indices from an atomic counter; a task's
// results never depend on which thread ran it, so outputs are identical for any count.
//
// Waking a sleeping worker (futex) takes tens of microseconds on a VM, which a 50 us
// layer feels twice per call (staging, then the conv). So workers, and the caller
// waiting for them, first spin for kSpin before blocking on the condition variables;
// the spin is short so that idle workers do not keep a shared machine busy.
class ThreadPool {
 public:
  void run(int num_threads, int64_t num_tasks, const std::function<void(int64_t)>& task) {
    if (num_threads > num_tasks) num_threads = (int)num_tasks;
    if (num_threads <= 1) {
      for (int64_t i = 0; i < num_tasks; ++i) task(i);
      return;
    }
    std::lock_guard<std::mutex> one_call_at_a_time(call_mutex_);
    std::atomic<int64_t> next(0);
    const std::function<void()> body = [&] {
      for (int64_t i = next.fetch_add(1); i < num_tasks; i = next.fetch_add(1)) task(i);
    };
    {
      std::unique_lock<std::mutex> lock(mutex_);
      while ((int)workers_.size() < num_threads - 1) {
        const int id = (int)workers_.size();
        workers_.emplace_back([this, id] { worker_loop(id); });
      }
      job_ = &body;
      participants_ = num_threads - 1;
      remaining_.store(participants_);
      generation_.fetch_add(1);
    }
    wake_.notify_all();
    body();
    spin_until([&] { return remaining_.load() == 0; });
    std::unique_lock<std::mutex> lock(mutex_);
    done_.wait(lock, [&] { return remaining_.load() == 0; });
    job_ = nullptr;
  }

 private:
  static constexpr auto kSpin = std::chrono::microseconds(100);

  template <class Ready>
  static void spin_until(Ready ready) {
    const auto start = std::chrono::steady_clock::now();
    // Yield rather than pause: when the machine is oversubscribed (more runnable threads
    // than cores), a pausing spinner would hold the core that the thread it waits for
    // needs; a 2-thread call then ran 6x slower than 1 thread. With nothing else
    // runnable, yield returns at once and the spin keeps its low latency.
    for (int i = 1; !ready(); ++i) {
      std::this_thread::yield();
      if (i % 16 == 0 && std::chrono::steady_clock::now() - start > kSpin) return;
    }
  }

  void worker_loop(int id) {
    uint64_t seen = 0;
    for (;;) {
      spin_until([&] { return generation_.load() != seen; });
      std::unique_lock<std::mutex> lock(mutex_);
      wake_.wait(lock, [&] { return generation_.load() != seen; });
      seen = generation_.load();
      if (id >= participants_) continue;
      const std::function<void()>* job = job_;
      lock.unlock();
      (*job)();
      lock.lock();
      if (remaining_.fetch_sub(1) == 1) done_.notify_all();
    }
  }

  std::mutex call_mutex_, mutex_;
  std::condition_variable wake_, done_;
  std::vector<std::thread> workers_;
  const std::function<void()>* job_ = nullptr;   // guarded by mutex_
  int participants_ = 0;                          // guarded by mutex_
  std::atomic<int> remaining_{0};                 // written under mutex_, read spinning
  std::atomic<uint64_t> generation_{0};           // written under mutex_, read spinning
};

ThreadPool& pool() {
  // Never destroyed: idle workers simply end with the process.
  static ThreadPool* instance = new ThreadPool();
  return *instance;
}

// Splits [0, count) into about 4 tasks per thread of at least `grain` elements.
void parallel_ranges(int num_threads, int64_t count, int64_t grain,
                     const std::function<void(int64_t, int64_t)>& fn) {
  int64_t size = (count + 4 * num_threads - 1) / (4 * num_threads);
  if (size < grain) size = grain;
  const int64_t tasks = (count + size - 1) / size;
  pool().run(num_threads, tasks, [&](int64_t t) {
    const int64_t begin = t * size;
    fn(begin, begin + size < count ? begin + size : count);
  });
}

// ---------------------------------------------------------------- shapes

struct ConvGeometry {
  int64_t out_height, out_width;
};

// The fields both conv jobs take from a validated shape, its output size and the affine outputs.
template <typename Job>
void fill_job(Job& job, const N2uqConvShape* s, const ConvGeometry& g, const float* multiplier, const float* bias,
              float* out_float, int32_t* out_int32) {
  job.batch = s->batch;
  job.in_height = s->in_height;
  job.in_width = s->in_width;
  job.in_channels = s->in_channels;
  job.out_channels = s->out_channels;
  job.kernel_height = s->kernel_height;
  job.kernel_width = s->kernel_width;
  job.stride_height = s->stride_height;
  job.stride_width = s->stride_width;
  job.dilation_height = s->dilation_height;
  job.dilation_width = s->dilation_width;
  job.pad_top = s->pad_top;
  job.pad_left = s->pad_left;
  job.out_height = int32_t(g.out_height);
  job.out_width = int32_t(g.out_width);
  job.weight_bits = s->weight_bits;
  job.multiplier = multiplier;
  job.bias = bias;
  job.out_float = out_float;
  job.out_int32 = out_int32;
}

int check_spatial(const N2uqConvShape* s, bool depthwise, ConvGeometry* g, char* err, size_t err_len) {
  N2UQ_CHECK(s != nullptr, N2UQ_ERR_ARGUMENT, "shape is NULL");
  const struct {
    const char* name;
    int32_t value;
  } dims[] = {{"batch", s->batch}, {"in_height", s->in_height}, {"in_width", s->in_width},
              {"in_channels", s->in_channels}, {"out_channels", s->out_channels},
              {"kernel_height", s->kernel_height}, {"kernel_width", s->kernel_width}};
  for (const auto& d : dims)
    N2UQ_CHECK(d.value >= 1 && d.value <= kMaxDim, N2UQ_ERR_ARGUMENT, "%s must be 1..%lld, got %d", d.name,
               (long long)kMaxDim, d.value);
  const struct {
    const char* name;
    int32_t value;
  } steps[] = {{"stride_height", s->stride_height}, {"stride_width", s->stride_width},
               {"dilation_height", s->dilation_height}, {"dilation_width", s->dilation_width}};
  for (const auto& d : steps)
    N2UQ_CHECK(d.value >= 1 && d.value <= 1024, N2UQ_ERR_ARGUMENT, "%s must be 1..1024, got %d", d.name, d.value);
  const int64_t extent_h = int64_t(s->kernel_height - 1) * s->dilation_height;
  const int64_t extent_w = int64_t(s->kernel_width - 1) * s->dilation_width;
  const struct {
    const char* name;
    int32_t value;
    int64_t limit;
  } pads[] = {{"pad_top", s->pad_top, extent_h}, {"pad_bottom", s->pad_bottom, extent_h},
              {"pad_left", s->pad_left, extent_w}, {"pad_right", s->pad_right, extent_w}};
  for (const auto& p : pads) {
    N2UQ_CHECK(p.value >= 0, N2UQ_ERR_ARGUMENT, "%s must be >= 0, got %d", p.name, p.value);
    // More padding than the dilated kernel reaches would make all-padding outputs.
    N2UQ_CHECK(p.value <= p.limit, N2UQ_ERR_ARGUMENT,
               "%s = %d is larger than the dilated kernel extent - 1 = %lld", p.name, p.value, (long long)p.limit);
  }
  if (int rc = check_bits(s->weight_bits, "weight_bits", err, err_len)) return rc;
  if (!depthwise)
    if (int rc = check_bits(s->act_bits, "act_bits", err, err_len)) return rc;
  const int64_t padded_h = int64_t(s->in_height) + s->pad_top + s->pad_bottom;
  const int64_t padded_w = int64_t(s->in_width) + s->pad_left + s->pad_right;
  N2UQ_CHECK(padded_h > extent_h && padded_w > extent_w, N2UQ_ERR_ARGUMENT,
             "the dilated kernel (%lld x %lld) is larger than the padded input (%lld x %lld)",
             (long long)extent_h + 1, (long long)extent_w + 1, (long long)padded_h, (long long)padded_w);
  g->out_height = (padded_h - extent_h - 1) / s->stride_height + 1;
  g->out_width = (padded_w - extent_w - 1) / s->stride_width + 1;
  return N2UQ_OK;
}

int check_buffer(const void* ptr, int64_t len, int64_t needed, const char* what, char* err, size_t err_len) {
  N2UQ_CHECK(ptr != nullptr, N2UQ_ERR_ARGUMENT, "%s is NULL", what);
  N2UQ_CHECK(len >= needed, N2UQ_ERR_BUFFER, "%s has %lld elements, the shape needs %lld", what, (long long)len,
             (long long)needed);
  return N2UQ_OK;
}

int check_outputs(const float* out_float, const int32_t* out_int32, int64_t out_len, int64_t needed,
                  const float* multiplier, const float* bias, int64_t channels_len, int64_t channels, char* err,
                  size_t err_len) {
  N2UQ_CHECK(out_float != nullptr || out_int32 != nullptr, N2UQ_ERR_ARGUMENT,
             "out_float and out_int32 are both NULL");
  N2UQ_CHECK(out_len >= needed, N2UQ_ERR_BUFFER, "output has %lld elements, the shape needs %lld",
             (long long)out_len, (long long)needed);
  if (out_float != nullptr) {
    if (int rc = check_buffer(multiplier, channels_len, channels, "multiplier", err, err_len)) return rc;
    if (int rc = check_buffer(bias, channels_len, channels, "bias", err, err_len)) return rc;
  }
  return N2UQ_OK;
}

int64_t words_for(int64_t channels) { return (channels + 63) / 64; }

// The int32 accumulator 2 * S_mk - n_w * S_m must not overflow for any codes.
int check_accumulator(int64_t taps, int64_t act_max, int64_t weight_max, char* err, size_t err_len) {
  const double bound = double(taps) * double(act_max) * (2.0 * double(weight_max) + double(weight_max));
  N2UQ_CHECK(bound < 2147483647.0, N2UQ_ERR_UNSUPPORTED,
             "receptive field of %lld values is too large for the int32 accumulator", (long long)taps);
  return N2UQ_OK;
}

// Per-thread scratch reused across calls: a fresh vector per call costs an mmap and
// page faults per layer once it passes malloc's mmap threshold (a 7x7x512 W2A2
// layer's regrouped weights are 590 KB). Grows, never shrinks; contents are rewritten.
struct Scratch {
  std::vector<uint64_t> stage, weights;
  std::vector<int32_t> pixel_sums;
  std::vector<int64_t> tap_offsets;
};

Scratch& scratch() {
  static thread_local Scratch instance;
  return instance;
}

template <class T>
void ensure(std::vector<T>& v, int64_t size) {
  if (int64_t(v.size()) < size) v.resize(size_t(size));
}

// Columns per staged phase row: the last vector of output pixels (rounded up to whole
// vectors of `lanes`) at the largest tap offset q, and every input column.
int64_t staged_width(const ConvJob& job, int64_t lanes = 1) {
  const int64_t q_max = int64_t(job.kernel_width - 1) * job.dilation_width / job.stride_width;
  const int64_t rounded_out = (int64_t(job.out_width) + lanes - 1) / lanes * lanes;
  int64_t width = rounded_out + q_max;
  const int64_t needed_columns = (int64_t(job.in_width) - 1 + job.pad_left) / job.stride_width + 1;
  return width < needed_columns ? needed_columns : width;
}

// Channel-lane path (see isa_avx512.cc): regroup the weights by kGroupLanes output
// channels, stage the input as the pixel-lane path does, then per output row and channel chunk.
int run_conv_groups(ConvJob job, const KernelTable* table, int num_threads, char* err, size_t err_len) {
  const int64_t words = job.words, taps = int64_t(job.kernel_height) * job.kernel_width;
  // Staged as for the pixel-lane path: adjacent output pixels read adjacent words.
  job.stage_width = staged_width(job);
  job.groups = int32_t((int64_t(job.out_channels) + kGroupLanes - 1) / kGroupLanes);
  job.group_chunks = int32_t((int64_t(job.groups) + kGroupChunk - 1) / kGroupChunk);
  int64_t rows = 0, stage_words = 0, pixels = 0, group_words = 0;
  if (!mul_ok(job.batch, job.in_height, &rows) ||
      !mul_ok(rows, int64_t(job.stride_width) * job.act_bits * words, &stage_words) ||
      !mul_ok(stage_words, job.stage_width, &stage_words) || !mul_ok(rows, job.in_width, &pixels) ||
      !mul_ok(int64_t(job.groups) * kGroupLanes * taps, words * job.weight_bits, &group_words))
    N2UQ_FAIL(N2UQ_ERR_UNSUPPORTED, "the staged input would be too large");
  Scratch& s = scratch();
  try {
    ensure(s.stage, stage_words);
    ensure(s.pixel_sums, pixels);
    ensure(s.weights, group_words);
    ensure(s.tap_offsets, taps * words);
  } catch (const std::bad_alloc&) {
    N2UQ_FAIL(N2UQ_ERR_INTERNAL, "out of memory for the staged input (%lld words)", (long long)stage_words);
  }
  job.stage = s.stage.data();
  job.pixel_sums = s.pixel_sums.data();
  uint64_t* grouped = s.weights.data();
  job.group_weights = grouped;
  // Tap (kh, kw) of output column ow reads input row ih0 + kh * dilation_h and padded
  // column ow * stride + kw * dilation_w = (ow + q) * stride + phase: word q of stride
  // phase `phase` in the staged row ([phase][act_bits][words][stage_width]).
  const int64_t plane = words * job.stage_width, row_stride = int64_t(job.stride_width) * job.act_bits * plane;
  for (int64_t kh = 0; kh < job.kernel_height; ++kh)
    for (int64_t kw = 0; kw < job.kernel_width; ++kw) {
      const int64_t padded = kw * job.dilation_width;
      const int64_t column = (padded % job.stride_width) * job.act_bits * plane + padded / job.stride_width;
      for (int64_t c = 0; c < words; ++c)
        s.tap_offsets[size_t((kh * job.kernel_width + kw) * words + c)] =
            kh * job.dilation_height * row_stride + column + c * job.stage_width;
    }
  job.tap_offsets = s.tap_offsets.data();
  // Regrouping and staging are independent: one parallel pass (one wake-up and barrier
  // for the workers instead of two), groups first, then about 4 row ranges per thread.
  int64_t row_chunk = (rows + 4 * num_threads - 1) / (4 * num_threads);
  if (row_chunk < 1) row_chunk = 1;
  const int64_t row_tasks = (rows + row_chunk - 1) / row_chunk;
  pool().run(num_threads, job.groups + row_tasks, [&](int64_t t) {
    if (t < job.groups) return table->conv_group_weights(job, grouped, t);
    const int64_t begin = (t - job.groups) * row_chunk;
    table->conv_stage_rows(job, begin, begin + row_chunk < rows ? begin + row_chunk : rows);
  });
  const int64_t items = int64_t(job.batch) * job.out_height * job.group_chunks;
  pool().run(num_threads, items, [&](int64_t item) { table->conv_group_item(job, item); });
  return N2UQ_OK;
}

int run_conv(const ConvJob& base, int isa, int num_threads, char* err, size_t err_len) {
  ConvJob job = base;
  const KernelTable* table = table_for(isa);
  if (table->conv_group_item != nullptr) return run_conv_groups(job, table, num_threads, err, err_len);
  const int64_t width = staged_width(job, table->lanes);
  job.stage_width = width;
  int64_t rows = 0, stage_words = 0, pixels = 0;
  if (!mul_ok(job.batch, job.in_height, &rows) ||
      !mul_ok(rows, int64_t(job.stride_width) * job.act_bits * job.words, &stage_words) ||
      !mul_ok(stage_words, width, &stage_words) || !mul_ok(rows, job.in_width, &pixels))
    N2UQ_FAIL(N2UQ_ERR_UNSUPPORTED, "the staged input would be too large");
  Scratch& s = scratch();
  try {
    ensure(s.stage, stage_words);
    ensure(s.pixel_sums, pixels);
  } catch (const std::bad_alloc&) {
    N2UQ_FAIL(N2UQ_ERR_INTERNAL, "out of memory for the staged input (%lld words)", (long long)stage_words);
  }
  job.stage = s.stage.data();
  job.pixel_sums = s.pixel_sums.data();
  job.segments = int32_t((int64_t(job.out_width) + kSegmentWidth - 1) / kSegmentWidth);
  job.channel_chunks = int32_t((int64_t(job.out_channels) + kChannelChunk - 1) / kChannelChunk);
  parallel_ranges(num_threads, rows, 1, [&](int64_t b, int64_t e) { table->conv_stage_rows(job, b, e); });
  const int64_t items = int64_t(job.batch) * job.out_height * job.segments * job.channel_chunks;
  pool().run(num_threads, items, [&](int64_t item) { table->conv_item(job, item); });
  return N2UQ_OK;
}

int conv_impl(const N2uqConvShape* s, const uint64_t* input, int64_t input_len, const uint64_t* weights,
              int64_t weights_len, const float* multiplier, const float* bias, int64_t channels_len, float* out_float,
              int32_t* out_int32, int64_t out_len, int isa, int num_threads, char* err, size_t err_len) {
  ConvGeometry g;
  if (int rc = check_spatial(s, false, &g, err, err_len)) return rc;
  if (int rc = check_threads(num_threads, err, err_len)) return rc;
  const int resolved = resolve(isa, err, err_len);
  if (resolved < 0) return resolved;
  const int64_t words = words_for(s->in_channels);
  int64_t input_needed = 0, weights_needed = 0, out_needed = 0;
  if (!mul_ok(int64_t(s->batch) * s->in_height, int64_t(s->in_width) * s->act_bits * words, &input_needed) ||
      !mul_ok(int64_t(s->out_channels) * s->kernel_height, int64_t(s->kernel_width) * s->weight_bits * words,
              &weights_needed) ||
      !mul_ok(int64_t(s->batch) * g.out_height, g.out_width * s->out_channels, &out_needed))
    N2UQ_FAIL(N2UQ_ERR_UNSUPPORTED, "tensor sizes are too large");
  if (int rc = check_buffer(input, input_len, input_needed, "input", err, err_len)) return rc;
  if (int rc = check_buffer(weights, weights_len, weights_needed, "weights", err, err_len)) return rc;
  if (int rc = check_outputs(out_float, out_int32, out_len, out_needed, multiplier, bias, channels_len,
                             s->out_channels, err, err_len))
    return rc;
  if (int rc = check_accumulator(int64_t(s->kernel_height) * s->kernel_width * s->in_channels,
                                 (1 << s->act_bits) - 1, (1 << s->weight_bits) - 1, err, err_len))
    return rc;
  ConvJob job{};
  fill_job(job, s, g, multiplier, bias, out_float, out_int32);
  job.words = int32_t(words);
  job.act_bits = s->act_bits;
  job.input = input;
  job.weights = weights;
  return run_conv(job, resolved, num_threads, err, err_len);
}

// Sizes of a [num_positions][channels] tensor of codes (or floats) and of its packed
// [num_positions][bits][words] form, after checking the dimensions.
int check_packed_layout(int64_t num_positions, int32_t channels, int32_t bits, int64_t* elements,
                        int64_t* packed_words, char* err, size_t err_len) {
  N2UQ_CHECK(num_positions >= 1 && num_positions <= kMaxElements, N2UQ_ERR_ARGUMENT,
             "num_positions must be >= 1, got %lld", (long long)num_positions);
  N2UQ_CHECK(channels >= 1 && channels <= kMaxDim, N2UQ_ERR_ARGUMENT, "channels must be 1..%lld, got %d",
             (long long)kMaxDim, channels);
  if (!mul_ok(num_positions, channels, elements) || !mul_ok(num_positions, bits * words_for(channels), packed_words))
    N2UQ_FAIL(N2UQ_ERR_UNSUPPORTED, "tensor sizes are too large");
  return N2UQ_OK;
}

int check_thresholds(const float* thresholds, int32_t num_thresholds, int32_t bits, char* err, size_t err_len) {
  if (int rc = check_bits(bits, "bits", err, err_len)) return rc;
  N2UQ_CHECK(thresholds != nullptr, N2UQ_ERR_ARGUMENT, "thresholds is NULL");
  N2UQ_CHECK(num_thresholds == (1 << bits) - 1, N2UQ_ERR_ARGUMENT, "%d-bit codes need %d thresholds, got %d", bits,
             (1 << bits) - 1, num_thresholds);
  return N2UQ_OK;
}

static_assert((1 << N2UQ_MAX_BITS) - 1 < kThresholdTable, "threshold table too small");

// Elements per quantize task at least: the AVX2 / AVX-512 paths take ~3-12 us for 64K
// floats, about what waking a pool worker costs on a shared VM, so smaller layers stay on
// one thread (7x7x512 at 2 threads took 23-34 us against 6-10 us on 1 with a 4096-element
// grain, loaded 2-core VM). The scalar path is ~30x slower per element and keeps 4096.
int64_t quantize_grain(int isa) {
  switch (isa) {
    case N2UQ_ISA_AVX2:
    case N2UQ_ISA_AVX512: return 65536;
    case N2UQ_ISA_NEON: return 16384;
    default: return 4096;
  }
}

// QuantizeJob::thresholds from the caller's (validated) thresholds: see kernel_table.h.
void fill_thresholds(QuantizeJob& job, const float* thresholds, int32_t num_thresholds) {
  int32_t n = 0;
  for (int32_t i = 0; i < num_thresholds; ++i) {
    const float t = thresholds[i] != thresholds[i] ? __builtin_inff() : thresholds[i];
    int32_t k = n++;  // insertion sort: at most 15 values
    for (; k > 0 && job.thresholds[k - 1] > t; --k) job.thresholds[k] = job.thresholds[k - 1];
    job.thresholds[k] = t;
  }
  for (int32_t i = n; i < kThresholdTable; ++i) job.thresholds[i] = __builtin_inff();
}

// Wraps an API body so that no C++ exception crosses the C boundary.
template <class F>
int guarded(char* err, size_t err_len, F&& body) {
  try {
    return body();
  } catch (const std::bad_alloc&) {
    return report(err, err_len, N2UQ_ERR_INTERNAL, "out of memory");
  } catch (const std::exception& e) {
    return report(err, err_len, N2UQ_ERR_INTERNAL, "internal error: %s", e.what());
  } catch (...) {
    return report(err, err_len, N2UQ_ERR_INTERNAL, "internal error");
  }
}

}  // namespace
}  // namespace n2uq_core

using namespace n2uq_core;

extern "C" {

int n2uq_core_abi_version(void) { return N2UQ_CORE_ABI_VERSION; }

int n2uq_isa_supported(int isa) { return cpu_has(isa) ? 1 : 0; }

int n2uq_resolve_isa(int isa, char* err, size_t err_len) { return resolve(isa, err, err_len); }

const char* n2uq_isa_name(int isa) {
  switch (isa) {
    case N2UQ_ISA_AUTO: return "auto";
    case N2UQ_ISA_PORTABLE: return "portable";
    case N2UQ_ISA_AVX2: return "avx2";
    case N2UQ_ISA_AVX512: return "avx512";
    case N2UQ_ISA_NEON: return "neon";
    default: return "unknown";
  }
}

int n2uq_pack_bitplanes(const uint8_t* codes, int64_t codes_len, int64_t num_positions, int32_t channels,
                        int32_t bits, uint64_t* out, int64_t out_len, char* err, size_t err_len) {
  return guarded(err, err_len, [&]() -> int {
    if (int rc = check_bits(bits, "bits", err, err_len)) return rc;
    int64_t codes_needed = 0, out_needed = 0;
    if (int rc = check_packed_layout(num_positions, channels, bits, &codes_needed, &out_needed, err, err_len))
      return rc;
    if (int rc = check_buffer(codes, codes_len, codes_needed, "codes", err, err_len)) return rc;
    if (int rc = check_buffer(out, out_len, out_needed, "out", err, err_len)) return rc;
    const int64_t words = words_for(channels);
    const uint8_t max_code = uint8_t((1 << bits) - 1);
    for (int64_t i = 0; i < codes_needed; ++i)
      N2UQ_CHECK(codes[i] <= max_code, N2UQ_ERR_ARGUMENT, "code %d at index %lld exceeds %d for %d bits",
                 codes[i], (long long)i, max_code, bits);
    for (int64_t pos = 0; pos < num_positions; ++pos) {
      const uint8_t* src = codes + pos * channels;
      uint64_t* dst = out + pos * bits * words;
      std::memset(dst, 0, size_t(bits * words) * sizeof(uint64_t));
      for (int64_t c = 0; c < channels; ++c)
        for (int p = 0; p < bits; ++p) dst[p * words + c / 64] |= uint64_t((src[c] >> p) & 1) << (c % 64);
    }
    return N2UQ_OK;
  });
}

int n2uq_quantize_codes(const float* x, int64_t count, const float* thresholds, int32_t num_thresholds, float beta1,
                        int32_t bits, uint8_t* out, int64_t out_len, int isa, int num_threads, char* err,
                        size_t err_len) {
  return guarded(err, err_len, [&]() -> int {
    if (int rc = check_thresholds(thresholds, num_thresholds, bits, err, err_len)) return rc;
    if (int rc = check_threads(num_threads, err, err_len)) return rc;
    N2UQ_CHECK(count >= 1 && count <= kMaxElements, N2UQ_ERR_ARGUMENT, "count must be >= 1, got %lld",
               (long long)count);
    N2UQ_CHECK(x != nullptr, N2UQ_ERR_ARGUMENT, "x is NULL");
    if (int rc = check_buffer(out, out_len, count, "out", err, err_len)) return rc;
    const int resolved = resolve(isa, err, err_len);
    if (resolved < 0) return resolved;
    QuantizeJob job{};
    job.x = x;
    job.channels = 1;
    job.words = 1;
    job.bits = bits;
    job.num_thresholds = num_thresholds;
    fill_thresholds(job, thresholds, num_thresholds);
    job.beta1 = beta1;
    job.out_codes = out;
    const KernelTable* table = table_for(resolved);
    parallel_ranges(num_threads, count, quantize_grain(resolved), [&](int64_t b, int64_t e) { table->quantize_codes(job, b, e); });
    return N2UQ_OK;
  });
}

int n2uq_quantize_and_pack(const float* x, int64_t x_len, int64_t num_positions, int32_t channels,
                           const float* thresholds, int32_t num_thresholds, float beta1, int32_t bits, uint64_t* out,
                           int64_t out_len, int isa, int num_threads, char* err, size_t err_len) {
  return guarded(err, err_len, [&]() -> int {
    if (int rc = check_thresholds(thresholds, num_thresholds, bits, err, err_len)) return rc;
    if (int rc = check_threads(num_threads, err, err_len)) return rc;
    int64_t x_needed = 0, out_needed = 0;
    if (int rc = check_packed_layout(num_positions, channels, bits, &x_needed, &out_needed, err, err_len)) return rc;
    if (int rc = check_buffer(x, x_len, x_needed, "x", err, err_len)) return rc;
    if (int rc = check_buffer(out, out_len, out_needed, "out", err, err_len)) return rc;
    const int resolved = resolve(isa, err, err_len);
    if (resolved < 0) return resolved;
    QuantizeJob job{};
    job.x = x;
    job.channels = channels;
    job.words = int32_t(words_for(channels));
    job.bits = bits;
    job.num_thresholds = num_thresholds;
    fill_thresholds(job, thresholds, num_thresholds);
    job.beta1 = beta1;
    job.out_packed = out;
    const KernelTable* table = table_for(resolved);
    const int64_t grain = quantize_grain(resolved) / channels + 1;
    parallel_ranges(num_threads, num_positions, grain,
                    [&](int64_t b, int64_t e) { table->quantize_and_pack(job, b, e); });
    return N2UQ_OK;
  });
}

int n2uq_conv2d_output_size(const N2uqConvShape* shape, int32_t* out_height, int32_t* out_width, char* err,
                            size_t err_len) {
  return guarded(err, err_len, [&]() -> int {
    ConvGeometry g;
    // Depthwise shapes pass too: act_bits is only checked when it is set.
    const bool skip_act_bits = shape != nullptr && shape->act_bits == 0;
    if (int rc = check_spatial(shape, skip_act_bits, &g, err, err_len)) return rc;
    N2UQ_CHECK(out_height != nullptr && out_width != nullptr, N2UQ_ERR_ARGUMENT, "output pointers are NULL");
    *out_height = int32_t(g.out_height);
    *out_width = int32_t(g.out_width);
    return N2UQ_OK;
  });
}

int n2uq_conv2d_bitserial(const N2uqConvShape* shape, const uint64_t* input, int64_t input_len,
                          const uint64_t* weights, int64_t weights_len, const float* multiplier, const float* bias,
                          int64_t channels_len, float* out_float, int32_t* out_int32, int64_t out_len, int isa,
                          int num_threads, char* err, size_t err_len) {
  return guarded(err, err_len, [&]() -> int {
    return conv_impl(shape, input, input_len, weights, weights_len, multiplier, bias, channels_len, out_float,
                     out_int32, out_len, isa, num_threads, err, err_len);
  });
}

int n2uq_fully_connected(int32_t batch, int32_t in_features, int32_t out_features, int32_t act_bits,
                         int32_t weight_bits, const uint64_t* input, int64_t input_len, const uint64_t* weights,
                         int64_t weights_len, const float* multiplier, const float* bias, int64_t channels_len,
                         float* out_float, int32_t* out_int32, int64_t out_len, int isa, int num_threads, char* err,
                         size_t err_len) {
  // A 1x1 conv over a 1 x batch "image": the batch rows become the vector lanes.
  N2uqConvShape shape{};
  shape.batch = 1;
  shape.in_height = 1;
  shape.in_width = batch;
  shape.in_channels = in_features;
  shape.out_channels = out_features;
  shape.kernel_height = shape.kernel_width = 1;
  shape.stride_height = shape.stride_width = 1;
  shape.dilation_height = shape.dilation_width = 1;
  shape.act_bits = act_bits;
  shape.weight_bits = weight_bits;
  return guarded(err, err_len, [&]() -> int {
    N2UQ_CHECK(batch >= 1, N2UQ_ERR_ARGUMENT, "batch must be >= 1, got %d", batch);
    N2UQ_CHECK(in_features >= 1, N2UQ_ERR_ARGUMENT, "in_features must be >= 1, got %d", in_features);
    N2UQ_CHECK(out_features >= 1, N2UQ_ERR_ARGUMENT, "out_features must be >= 1, got %d", out_features);
    return conv_impl(&shape, input, input_len, weights, weights_len, multiplier, bias, channels_len, out_float,
                     out_int32, out_len, isa, num_threads, err, err_len);
  });
}

int n2uq_depthwise_conv2d(const N2uqConvShape* s, const uint8_t* input, int64_t input_len, const uint8_t* weights,
                          int64_t weights_len, const float* multiplier, const float* bias, int64_t channels_len,
                          float* out_float, int32_t* out_int32, int64_t out_len, int isa, int num_threads, char* err,
                          size_t err_len) {
  return guarded(err, err_len, [&]() -> int {
    ConvGeometry g;
    if (int rc = check_spatial(s, false, &g, err, err_len)) return rc;
    if (int rc = check_threads(num_threads, err, err_len)) return rc;
    N2UQ_CHECK(s->out_channels % s->in_channels == 0, N2UQ_ERR_ARGUMENT,
               "depthwise out_channels (%d) must be a multiple of in_channels (%d)", s->out_channels,
               s->in_channels);
    const int resolved = resolve(isa, err, err_len);
    if (resolved < 0) return resolved;
    int64_t input_needed = 0, weights_needed = 0, out_needed = 0;
    if (!mul_ok(int64_t(s->batch) * s->in_height, int64_t(s->in_width) * s->in_channels, &input_needed) ||
        !mul_ok(int64_t(s->kernel_height) * s->kernel_width, s->out_channels, &weights_needed) ||
        !mul_ok(int64_t(s->batch) * g.out_height, g.out_width * s->out_channels, &out_needed))
      N2UQ_FAIL(N2UQ_ERR_UNSUPPORTED, "tensor sizes are too large");
    if (int rc = check_buffer(input, input_len, input_needed, "input", err, err_len)) return rc;
    if (int rc = check_buffer(weights, weights_len, weights_needed, "weights", err, err_len)) return rc;
    if (int rc = check_outputs(out_float, out_int32, out_len, out_needed, multiplier, bias, channels_len,
                               s->out_channels, err, err_len))
      return rc;
    const int act_max = (1 << s->act_bits) - 1, weight_max = (1 << s->weight_bits) - 1;
    if (int rc = check_accumulator(int64_t(s->kernel_height) * s->kernel_width, act_max, weight_max, err, err_len))
      return rc;
    // Codes outside the bit width would break the int32 bound and the semantics: reject.
    uint8_t input_max = 0, weights_max = 0;
    for (int64_t i = 0; i < input_needed; ++i) input_max = input[i] > input_max ? input[i] : input_max;
    for (int64_t i = 0; i < weights_needed; ++i) weights_max = weights[i] > weights_max ? weights[i] : weights_max;
    N2UQ_CHECK(input_max <= act_max, N2UQ_ERR_ARGUMENT, "input code %d exceeds %d for act_bits = %d", input_max,
               act_max, s->act_bits);
    N2UQ_CHECK(weights_max <= weight_max, N2UQ_ERR_ARGUMENT, "weight code %d exceeds %d for weight_bits = %d",
               weights_max, weight_max, s->weight_bits);
    DepthwiseJob job{};
    fill_job(job, s, g, multiplier, bias, out_float, out_int32);
    job.depth_multiplier = s->out_channels / s->in_channels;
    job.input = input;
    job.weights = weights;
    const KernelTable* table = table_for(resolved);
    pool().run(num_threads, int64_t(s->batch) * g.out_height, [&](int64_t row) { table->depthwise_row(job, row); });
    return N2UQ_OK;
  });
}

}  // extern "C"
