// C API of n2uq_core: argument validation, ISA dispatch and the thread pool.
// Compiled without any target options; the per-ISA files hold the kernels.
#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <new>
#include <string>
#include <thread>
#include <vector>

#include "core_internal.h"
#include "kernel_table.h"
#include "n2uq_core.h"

#if defined(__x86_64__)
#include <cpuid.h>
#endif
#if defined(__x86_64__) && defined(__linux__)
#include <cerrno>
#include <sys/syscall.h>
#include <unistd.h>
#endif
#if defined(__aarch64__) && defined(__linux__)
#include <sys/auxv.h>
#endif

namespace n2uq_core {

int report_error(char* err, size_t err_len, int status, const char* format, ...) {
  if (err != nullptr && err_len > 0) {
    va_list args;
    va_start(args, format);
    std::vsnprintf(err, err_len, format, args);
    va_end(args);
  }
  return status;
}

namespace {

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

// ---------------------------------------------------------------- CPU features

// What the kernels need from the CPU, read once. x86-64: CPUID for the instructions and
// XCR0 (XGETBV) for the OS saving the registers they use (ymm: bits 1-2; zmm and opmask:
// bits 5-7); a feature the OS does not enable counts as absent. aarch64: the kernel's HWCAP.
struct CpuFeatures {
  bool popcnt = false, avx2 = false, avx512f = false, avx512bw = false, avx512vl = false;
  bool avx512vpopcntdq = false, avx512vnni = false, avx512vbmi = false, avx_vnni = false;
  bool gfni = false;  // GF2P8AFFINEQB (its 512-bit form with avx512f)
  bool amx_int8 = false;  // AMX-TILE + AMX-INT8 and XCR0 tile state; the amx path also needs arch_prctl
  bool asimd_dotprod = false;
};

CpuFeatures detect_cpu_features() {
  CpuFeatures f;
#if defined(__x86_64__)
  unsigned a = 0, b = 0, c = 0, d = 0;
  if (!__get_cpuid(1, &a, &b, &c, &d)) return f;
  f.popcnt = (c >> 23) & 1;
  const bool osxsave = (c >> 27) & 1, avx = (c >> 28) & 1;
  uint64_t xcr0 = 0;
  if (osxsave) {
    uint32_t lo = 0, hi = 0;
    __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    xcr0 = (uint64_t(hi) << 32) | lo;
  }
  const bool ymm_state = avx && (xcr0 & 0x6) == 0x6;
  const bool zmm_state = ymm_state && (xcr0 & 0xE0) == 0xE0;
  const bool tile_state = (xcr0 & 0x60000) == 0x60000;
  if (__get_cpuid_max(0, nullptr) < 7) return f;
  __cpuid_count(7, 0, a, b, c, d);
  const unsigned max_subleaf = a;
  f.avx2 = ymm_state && ((b >> 5) & 1);
  f.avx512f = zmm_state && ((b >> 16) & 1);
  f.avx512bw = f.avx512f && ((b >> 30) & 1);
  f.avx512vl = f.avx512f && ((b >> 31) & 1);
  f.avx512vbmi = f.avx512f && ((c >> 1) & 1);
  f.gfni = f.avx512f && ((c >> 8) & 1);
  f.avx512vnni = f.avx512f && ((c >> 11) & 1);
  f.avx512vpopcntdq = f.avx512f && ((c >> 14) & 1);
  f.amx_int8 = tile_state && ((d >> 24) & 1) && ((d >> 25) & 1);
  if (max_subleaf >= 1) {
    __cpuid_count(7, 1, a, b, c, d);
    f.avx_vnni = f.avx2 && ((a >> 4) & 1);
  }
#elif defined(__aarch64__) && defined(__linux__)
  f.asimd_dotprod = (getauxval(AT_HWCAP) >> 20) & 1;  // HWCAP_ASIMDDP
#endif
  return f;
}

// The features' names (n2uq_cpu_features) and flags, in one table.
struct FeatureName {
  const char* name;
  bool CpuFeatures::*flag;
};
const FeatureName kFeatureNames[] = {
    {"popcnt", &CpuFeatures::popcnt},       {"avx2", &CpuFeatures::avx2},
    {"avx_vnni", &CpuFeatures::avx_vnni},   {"avx512f", &CpuFeatures::avx512f},
    {"avx512bw", &CpuFeatures::avx512bw},   {"avx512vl", &CpuFeatures::avx512vl},
    {"avx512vpopcntdq", &CpuFeatures::avx512vpopcntdq}, {"avx512vnni", &CpuFeatures::avx512vnni},
    {"avx512vbmi", &CpuFeatures::avx512vbmi}, {"gfni", &CpuFeatures::gfni},
    {"amx_int8", &CpuFeatures::amx_int8},
    {"asimddp", &CpuFeatures::asimd_dotprod}};

// N2UQ_CPU_DISABLE (comma-separated feature names) treats those features as absent, so that
// tests reach the fallback kernels (e.g. AVX2 without AVX-VNNI) on any CPU. It can only remove
// features, never add one the CPU lacks.
CpuFeatures masked(CpuFeatures f) {
  const char* env = std::getenv("N2UQ_CPU_DISABLE");
  if (env == nullptr) return f;
  const std::string list = std::string(",") + env + ",";
  for (const FeatureName& n : kFeatureNames)
    if (list.find(std::string(",") + n.name + ",") != std::string::npos) f.*n.flag = false;
  return f;
}

const CpuFeatures& cpu_features() {
  static const CpuFeatures features = masked(detect_cpu_features());
  return features;
}

// ---------------------------------------------------------------- ISA and path dispatch

bool cpu_has(int isa) {
  const CpuFeatures& f = cpu_features();
  switch (isa) {
    case N2UQ_ISA_PORTABLE:
      return true;
    case N2UQ_ISA_AVX2:
      return avx2_kernels() != nullptr && f.avx2 && f.popcnt;
    case N2UQ_ISA_AVX512:
      return avx512_kernels() != nullptr && f.avx512f && f.avx512bw && f.avx512vpopcntdq && f.popcnt;
    case N2UQ_ISA_NEON:
      return neon_kernels() != nullptr;  // Advanced SIMD is mandatory on aarch64
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

// The amx path's kernels (hardware or, with N2UQ_AMX_EMULATE=1, the software model), or null
// with the reason in amx_status(); decided once (defined with the plans below).
const PathKernels* amx_path_kernels();

// The kernels of a byte-code path under a concrete, supported ISA, or null when this build
// or CPU cannot run it. Declarative: each row names the instructions the kernels execute
// beyond the ISA family's own (see cpu_has).
const PathKernels* path_kernels(int isa, int path) {
  const CpuFeatures& f = cpu_features();
  struct Row {
    int isa, path;
    bool cpu_ok;
    const PathKernels* kernels;
  };
  const Row rows[] = {
      {N2UQ_ISA_PORTABLE, N2UQ_PATH_DOT, true, portable_dot_kernels()},
      {N2UQ_ISA_AVX2, N2UQ_PATH_DOT, f.avx_vnni, avx_vnni_dot_kernels()},  // preferred over the next row
      {N2UQ_ISA_AVX2, N2UQ_PATH_DOT, true, avx2_dot_kernels()},
      {N2UQ_ISA_AVX512, N2UQ_PATH_DOT, f.avx512vnni, avx512_dot_kernels()},
      {N2UQ_ISA_AVX512, N2UQ_PATH_LUT, f.avx512vbmi && f.avx512vnni, avx512_lut_kernels()},
      {N2UQ_ISA_NEON, N2UQ_PATH_DOT, f.asimd_dotprod, neon_dot_kernels()},
  };
  // Looked up only here: deciding it may run the AMX self-check (an AVX-512 conv).
  if (isa == N2UQ_ISA_AVX512 && path == N2UQ_PATH_AMX) return f.avx512vnni ? amx_path_kernels() : nullptr;
  for (const Row& r : rows)
    if (r.isa == isa && r.path == path && r.cpu_ok && r.kernels != nullptr) return r.kernels;
  return nullptr;
}

bool path_available(int isa, int path) {
  if (!cpu_has(isa)) return false;
  if (path == N2UQ_PATH_BITSERIAL) return true;
  return path_kernels(isa, path) != nullptr;
}

int path_from_name(const char* name) {
  static const char* const names[] = {"auto", "bitserial", "dot", "lut", "amx"};
  for (int i = 0; i < N2UQ_NUM_PATHS; ++i)
    if (std::strcmp(name, names[i]) == 0) return i;
  return -1;
}

// A concrete path, N2UQ_PATH_AUTO (select by measurement) or a negative status.
int requested_path(int path, char* err, size_t err_len) {
  if (path == N2UQ_PATH_AUTO) {
    const char* env = std::getenv("N2UQ_KERNEL_PATH");
    if (env == nullptr || env[0] == '\0') return N2UQ_PATH_AUTO;
    path = path_from_name(env);
    N2UQ_CHECK(path >= 0, N2UQ_ERR_ARGUMENT, "N2UQ_KERNEL_PATH=%.40s is not one of auto, bitserial, dot, lut, amx", env);
    return path;
  }
  N2UQ_CHECK(path > N2UQ_PATH_AUTO && path < N2UQ_NUM_PATHS, N2UQ_ERR_ARGUMENT, "unknown path id %d", path);
  return path;
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
    run_slots(num_threads, num_tasks, [&](int64_t i, int) { task(i); });
  }

  // As run, and each task also gets its thread's slot in 0 .. num_threads - 1 (the caller
  // is slot 0), for per-thread scratch that the caller allocated.
  void run_slots(int num_threads, int64_t num_tasks, const std::function<void(int64_t, int)>& task) {
    if (num_threads > num_tasks) num_threads = (int)num_tasks;
    if (num_threads <= 1) {
      for (int64_t i = 0; i < num_tasks; ++i) task(i, 0);
      return;
    }
    std::atomic<int64_t> next(0);
    run_body(num_threads, [&](int slot) {
      for (int64_t i = next.fetch_add(1); i < num_tasks; i = next.fetch_add(1)) task(i, slot);
    });
  }

  // Runs part(slot) once on each of num_threads threads (the caller is slot 0): a static split,
  // so that the same part of a tensor goes to the same core on every call.
  void run_each(int num_threads, const std::function<void(int)>& part) {
    if (num_threads <= 1) {
      part(0);
      return;
    }
    run_body(num_threads, part);
  }

 private:
  void run_body(int num_threads, const std::function<void(int)>& body) {
    std::lock_guard<std::mutex> one_call_at_a_time(call_mutex_);
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
    body(0);
    spin_until([&] { return remaining_.load() == 0; });
    std::unique_lock<std::mutex> lock(mutex_);
    done_.wait(lock, [&] { return remaining_.load() == 0; });
    job_ = nullptr;
  }

  static constexpr auto kSpin = std::chrono::microseconds(100);
  static constexpr auto kPauseSpin = std::chrono::microseconds(5);

  template <class Ready>
  static void spin_until(Ready ready) {
    const auto start = std::chrono::steady_clock::now();
    // First kPauseSpin of pause-spinning: a yield is a system call (about a microsecond on a
    // VM), which every parallel region paid about twice (the worker seeing the job, the caller
    // seeing it done): 1.7 us per region at 2 threads. Then yield rather than pause: when the
    // machine is oversubscribed (more runnable threads than cores), a pausing spinner would
    // hold the core that the thread it waits for needs; a 2-thread call then ran 6x slower
    // than 1 thread. With nothing else runnable, yield returns at once.
    for (int i = 1; !ready(); ++i) {
      if (i % 64 == 0 && std::chrono::steady_clock::now() - start > kPauseSpin) break;
      cpu_relax();
    }
    for (int i = 1; !ready(); ++i) {
      std::this_thread::yield();
      if (i % 16 == 0 && std::chrono::steady_clock::now() - start > kSpin) return;
    }
  }

  static inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
  }

  void worker_loop(int id) {
    uint64_t seen = 0;
    for (;;) {
      spin_until([&] { return generation_.load() != seen; });
      std::unique_lock<std::mutex> lock(mutex_);
      wake_.wait(lock, [&] { return generation_.load() != seen; });
      seen = generation_.load();
      if (id >= participants_) continue;
      const std::function<void(int)>* job = job_;
      lock.unlock();
      (*job)(id + 1);
      lock.lock();
      if (remaining_.fetch_sub(1) == 1) done_.notify_all();
    }
  }

  std::mutex call_mutex_, mutex_;
  std::condition_variable wake_, done_;
  std::vector<std::thread> workers_;
  const std::function<void(int)>* job_ = nullptr;  // guarded by mutex_
  int participants_ = 0;                          // guarded by mutex_
  std::atomic<int> remaining_{0};                 // written under mutex_, read spinning
  std::atomic<uint64_t> generation_{0};           // written under mutex_, read spinning
};

ThreadPool& pool() {
  // Never destroyed: idle workers simply end with the process.
  static ThreadPool* instance = new ThreadPool();
  return *instance;
}

// One contiguous part of [0, count) per thread, at least `grain` elements each (fewer threads
// if need be), slot s always getting the same part: the quantizers' float input then stays in
// the L2 of the core that read it on the last call. With dynamically handed-out tasks, parts
// moved between cores from call to call (2 threads, AMX Xeon: 56x56x64 at 2 bits 11.0 -> 9.4 us,
// 14x14x256 5.0 -> 4.4 us).
void parallel_ranges_static(int num_threads, int64_t count, int64_t grain,
                            const std::function<void(int64_t, int64_t)>& fn) {
  int64_t parts = (count + grain - 1) / grain;
  if (parts > num_threads) parts = num_threads;
  if (parts < 1) parts = 1;
  pool().run_each((int)parts, [&](int slot) { fn(count * slot / parts, count * (slot + 1) / parts); });
}

// Splits [0, count) into about 4 tasks per thread, as many as tasks of `grain` elements allow,
// of equal sizes, in whole rounds of the thread count (7 tasks over 2 threads are 4 + 3), handed
// out as threads get free.
void parallel_ranges(int num_threads, int64_t count, int64_t grain,
                     const std::function<void(int64_t, int64_t)>& fn) {
  int64_t size = (count + 4 * num_threads - 1) / (4 * num_threads);
  if (size < grain) size = grain;
  int64_t tasks = (count + size - 1) / size;
  if (tasks > 1 && num_threads > 1) tasks = (tasks + num_threads - 1) / num_threads * num_threads;
  if (tasks > count) tasks = count;
  size = (count + tasks - 1) / tasks;
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
// page faults per layer once it passes malloc's mmap threshold. Grows, never shrinks;
// contents are rewritten. (Weights live in the plan, prepared once.)
struct Scratch {
  AlignedVector<uint64_t> stage;
  // run_wino2_quantizing: each thread's packed input image, and the codes the checks of a run
  // that quantizes its own input are given
  std::vector<AlignedVector<uint64_t>> images;
  AlignedVector<uint64_t> input_codes;
  AlignedVector<int32_t> pixel_sums;
  std::vector<int64_t> tap_offsets;
  AlignedVector<uint8_t> codes;   // dot path: staged codes; lut path: every thread's table rings
};

Scratch& scratch() {
  static thread_local Scratch instance;
  return instance;
}

template <class V>
int ensure(V& v, int64_t size, const char* what, char* err, size_t err_len) {
  try {
    if (int64_t(v.size()) < size) v.resize(size_t(size));
  } catch (const std::bad_alloc&) {
    N2UQ_FAIL(N2UQ_ERR_INTERNAL, "out of memory for the %s (%lld elements)", what, (long long)size);
  }
  return N2UQ_OK;
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

}  // namespace
}  // namespace n2uq_core

// A prepared conv: the filter, the resolved ISA and path, and the weights in that path's
// layout (built once, read-only afterwards, so it may run on several threads at once).
struct N2uqConvPlanBody {
  N2uqConvShape filter;  // batch / in_height / in_width: the shape it was created (and timed) on
  int isa = 0, path = 0;
  const n2uq_core::KernelTable* table = nullptr;
  const n2uq_core::PathKernels* kernels = nullptr;  // dot / lut
  std::vector<uint64_t> packed;   // bitserial: [OC][KH][KW][weight_bits][words]
  n2uq_core::AlignedVector<uint64_t> grouped;  // bitserial with conv_group_item: ConvJob::group_weights
  n2uq_core::AlignedVector<int8_t> dot;        // dot: ConvJob::dot_weights (empty when compact)
  n2uq_core::AlignedVector<uint8_t> compact;   // amx direct form: ConvJob::compact_weights
  int compact_bits = 0;           // ConvJob::compact_bits; 0: the int8 weights in dot
  int dot_chunk_blocks = 0;       // dot: ConvJob::dot_chunk_blocks
  n2uq_core::AlignedVector<uint8_t> lut;       // lut: ConvJob::lut_indices
  int wino = 0;                   // dot: its form (n2uq_core::WinoForm; dot holds the transformed weights)
  n2uq_core::AlignedVector<int32_t> wino_bias; // dot, Winograd forms: ConvJob::wino_bias
};

namespace n2uq_core {
struct PlanTrial;  // the runner-up of a timed selection on trial (path selection, below)
}

// The C API's plan: the body that runs, and while a trial is open the runner-up it is timed
// against on the plan's first runs. The body is swapped at most once (std::atomic_load / store
// of the shared_ptr): a run holds its own reference, so a body another thread still runs is freed
// only after that run.
struct N2uqConvPlan {
  mutable std::shared_ptr<const N2uqConvPlanBody> body;
  std::unique_ptr<n2uq_core::PlanTrial> trial;  // null: no runner-up was kept
  mutable std::atomic<bool> trial_open{false};
  ~N2uqConvPlan();
  std::shared_ptr<const N2uqConvPlanBody> current() const { return std::atomic_load(&body); }
};

namespace n2uq_core {
namespace {

// ---------------------------------------------------------------- bit-serial path

// Channel-lane path (see isa_avx512.cc): the weights were regrouped by kGroupLanes output
// channels in the plan; stage the input as the pixel-lane path does, then per output row
// and channel chunk.
int run_conv_groups(ConvJob job, const KernelTable* table, int num_threads, char* err, size_t err_len) {
  const int64_t words = job.words, taps = int64_t(job.kernel_height) * job.kernel_width;
  // Staged as for the pixel-lane path: adjacent output pixels read adjacent words.
  job.stage_width = staged_width(job);
  job.groups = int32_t((int64_t(job.out_channels) + kGroupLanes - 1) / kGroupLanes);
  job.group_chunks = int32_t((int64_t(job.groups) + kGroupChunk - 1) / kGroupChunk);
  int64_t rows = 0, stage_words = 0, pixels = 0;
  if (!mul_ok(job.batch, job.in_height, &rows) ||
      !mul_ok(rows, int64_t(job.stride_width) * job.act_bits * words, &stage_words) ||
      !mul_ok(stage_words, job.stage_width, &stage_words) || !mul_ok(rows, job.in_width, &pixels))
    N2UQ_FAIL(N2UQ_ERR_UNSUPPORTED, "the staged input would be too large");
  Scratch& s = scratch();
  if (int rc = ensure(s.stage, stage_words, "staged input", err, err_len)) return rc;
  if (int rc = ensure(s.pixel_sums, pixels, "pixel sums", err, err_len)) return rc;
  if (int rc = ensure(s.tap_offsets, taps * words, "tap offsets", err, err_len)) return rc;
  job.stage = s.stage.data();
  job.pixel_sums = s.pixel_sums.data();
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
  parallel_ranges(num_threads, rows, 1, [&](int64_t b, int64_t e) { table->conv_stage_rows(job, b, e); });
  const int64_t items = int64_t(job.batch) * job.out_height * job.group_chunks;
  pool().run(num_threads, items, [&](int64_t item) { table->conv_group_item(job, item); });
  return N2UQ_OK;
}

int run_bitserial(const ConvJob& base, const N2uqConvPlanBody& plan, int num_threads, char* err, size_t err_len) {
  ConvJob job = base;
  const KernelTable* table = plan.table;
  job.weights = plan.packed.data();
  if (table->conv_group_item != nullptr) {
    job.group_weights = plan.grouped.data();
    return run_conv_groups(job, table, num_threads, err, err_len);
  }
  const int64_t width = staged_width(job, table->lanes);
  job.stage_width = width;
  int64_t rows = 0, stage_words = 0, pixels = 0;
  if (!mul_ok(job.batch, job.in_height, &rows) ||
      !mul_ok(rows, int64_t(job.stride_width) * job.act_bits * job.words, &stage_words) ||
      !mul_ok(stage_words, width, &stage_words) || !mul_ok(rows, job.in_width, &pixels))
    N2UQ_FAIL(N2UQ_ERR_UNSUPPORTED, "the staged input would be too large");
  Scratch& s = scratch();
  if (int rc = ensure(s.stage, stage_words, "staged input", err, err_len)) return rc;
  if (int rc = ensure(s.pixel_sums, pixels, "pixel sums", err, err_len)) return rc;
  job.stage = s.stage.data();
  job.pixel_sums = s.pixel_sums.data();
  job.segments = int32_t((int64_t(job.out_width) + kSegmentWidth - 1) / kSegmentWidth);
  job.channel_chunks = int32_t((int64_t(job.out_channels) + kChannelChunk - 1) / kChannelChunk);
  parallel_ranges(num_threads, rows, 1, [&](int64_t b, int64_t e) { table->conv_stage_rows(job, b, e); });
  const int64_t items = int64_t(job.batch) * job.out_height * job.segments * job.channel_chunks;
  pool().run(num_threads, items, [&](int64_t item) { table->conv_item(job, item); });
  return N2UQ_OK;
}

// ---------------------------------------------------------------- byte-code paths

int run_wino(const ConvJob& base, const N2uqConvPlanBody& plan, int num_threads, char* err, size_t err_len);

// Dot path: stage the input rows and column phases some tap reads as codes (columns
// zero-padded), then work items of (output row, chunk of output-channel blocks).
int run_phased(const ConvJob& base, const N2uqConvPlanBody& plan, int num_threads, char* err, size_t err_len);

// The dot layout's output-channel blocking (every form of dot and amx): vectors of k->lanes
// channels, plan.dot_chunk_blocks of them per chunk.
void set_dot_chunks(ConvJob& job, const N2uqConvPlanBody& plan) {
  job.dot_lanes = plan.kernels->lanes;
  job.oc_blocks = int32_t((int64_t(job.out_channels) + job.dot_lanes - 1) / job.dot_lanes);
  job.dot_chunk_blocks = plan.dot_chunk_blocks;
  job.oc_chunks = (job.oc_blocks + job.dot_chunk_blocks - 1) / job.dot_chunk_blocks;
}

int run_dot(const ConvJob& base, const N2uqConvPlanBody& plan, int num_threads, char* err, size_t err_len) {
  if (plan.wino) return run_wino(base, plan, num_threads, err, err_len);
  if (plan.kernels->phased_run != nullptr) return run_phased(base, plan, num_threads, err, err_len);
  ConvJob job = base;
  const PathKernels* k = plan.kernels;
  job.dot_weights = plan.dot.data();
  job.padded_width = int64_t(job.in_width) + plan.filter.pad_left + plan.filter.pad_right;
  job.code_columns = (job.padded_width + job.stride_width - 1) / job.stride_width;
  job.quads = int32_t((int64_t(job.in_channels) + 3) / 4);
  set_dot_chunks(job, plan);
  int64_t rows = 0, bytes = 0;
  if (!mul_ok(job.batch, job.in_height, &rows) || !mul_ok(rows, job.code_columns * job.stride_width, &bytes) ||
      !mul_ok(bytes, int64_t(job.words) * 64, &bytes))
    N2UQ_FAIL(N2UQ_ERR_UNSUPPORTED, "the staged input would be too large");
  Scratch& s = scratch();
  if (int rc = ensure(s.codes, bytes, "staged codes", err, err_len)) return rc;
  if (int rc = ensure(s.tap_offsets, job.kernel_width, "tap offsets", err, err_len)) return rc;
  job.code_stage = s.codes.data();
  const int64_t phase_bytes = job.code_columns * 64 * job.words;  // layout in dot_impl.h
  for (int64_t kw = 0; kw < job.kernel_width; ++kw) {
    const int64_t padded = kw * job.dilation_width;
    s.tap_offsets[size_t(kw)] = padded % job.stride_width * phase_bytes + padded / job.stride_width * 64;
  }
  job.code_tap_columns = s.tap_offsets.data();
  parallel_ranges(num_threads, rows, 1, [&](int64_t b, int64_t e) { k->stage_rows(job, b, e); });
  const int64_t items = int64_t(job.batch) * job.out_height * job.oc_chunks;
  pool().run_slots(num_threads, items, [&](int64_t item, int slot) { k->item(job, item, slot); });
  return N2UQ_OK;
}

// The direct form's int8 weights past which a conv with few tile pairs per thread splits its work
// by output channels (run_phased): 3/4 of the 2 MB L2 per core of the AMX Xeons.
constexpr int64_t kChunkSplitWeightBytes = int64_t(1536) << 10;

// A chunk's int8 weights past which a task runs each pair over every chunk rather than each chunk
// over every pair (ConvJob::amx_pairs_outer): half the AMX Xeons' 48 KB L1D, the other half
// left to the staged rows streaming past. A chunk of this size or less stays in L1 across the
// pairs, so chunk-outer reads the weights from L2 once and the stage once per chunk; a larger
// one is re-read from L2 for every pair in either order, and pair-outer then reads the stage
// once instead of once per chunk (its tile loads from L2 beside the weights' cost about 1.3x the
// cycles per TDPBUSD of one operand from L2 and the other from L1). Quantize-and-pack plus conv,
// int8 weights, interleaved, AMX Xeon (family 6 model 167): 14x14x256/2 W4A4 69.1 -> 59.7 us on
// 1 thread, 39.7 -> 36.8 on 2; 28x28x128/2 W4A4 on 2 threads 38.8 -> 35.9; 56x56x64/2 (18 KB
// chunks) 71.6 -> 80.7 the other way round. Past kChunkSplitWeightBytes a task's weights come
// from L3 and each chunk is better read once (7x7x512 W2A2 on 1 thread 119 -> 139 us pair-outer).
constexpr int64_t kPairsOuterChunkBytes = int64_t(24) << 10;

// Phased direct form (layout in kernel_table.h, ConvJob::amx_stage; tile work in isa_amx.cc). One
// task per thread, each staging the plane rows its own pairs read into its own stage and then
// running them: staged rows that another core just wrote reach the tile loads through that
// core's cache, and when one thread staged and another ran the tiles, 2 threads (Xeon, 28x28x128)
// were slower than 1. Tasks split the pairs of 16-pixel tiles (rows staged twice where two
// tasks meet) or, with few pairs, the chunks (each task then stages every row).
int run_phased(const ConvJob& base, const N2uqConvPlanBody& plan, int num_threads, char* err, size_t err_len) {
  ConvJob job = base;
  const PathKernels* k = plan.kernels;
  job.dot_weights = plan.dot.data();
  job.quads = job.words * 16;
  set_dot_chunks(job, plan);
  const int64_t sh = job.stride_height, sw = job.stride_width;
  const int64_t row_shift = int64_t(job.kernel_height - 1) * job.dilation_height / sh;
  const int64_t col_shift = int64_t(job.kernel_width - 1) * job.dilation_width / sw;
  job.amx_cols = job.out_width + col_shift;
  int64_t virt = 0, stage_bytes = 0, all_bytes = 0;
  if (!mul_ok(job.out_height, job.amx_cols, &virt)) N2UQ_FAIL(N2UQ_ERR_UNSUPPORTED, "the staged input would be too large");
  job.amx_virtual = (virt + 31) / 32 * 32;
  // Rows of a plane: every pixel the last pair's taps read (q < amx_virtual plus the largest shift).
  const int64_t max_shift = row_shift * job.amx_cols + col_shift;
  job.amx_plane_rows = (job.amx_virtual + max_shift + job.amx_cols - 1) / job.amx_cols;
  job.amx_plane_pixels = job.amx_plane_rows * job.amx_cols;
  const int64_t pairs = job.amx_virtual / 32, all_pairs = pairs * job.batch, chunks = job.oc_chunks;
  // Split by chunks (each thread all pairs of its output channels) only where there are fewer than
  // 4 pairs per thread and the pairs' split would cost more: a thread without a pair; compact
  // weights, whose expansion serves G = 4 A tiles per vector with every pair in one thread and
  // fewer with the pairs split; int8 weights past kChunkSplitWeightBytes, which each thread of
  // the pairs' split would stream from beyond its L2 (7x7x512, 2.4 MB: 39 us split by chunks, 65 us
  // split by pairs, 112 us on 1 thread; AMX Xeon, 2 MB L2 per core). Otherwise the pairs': each
  // thread stages only the input rows its pairs read, mostly the rows its own share of the
  // previous op wrote, where split by chunks each stages the whole input (the stride-2 layers'
  // is 4x their output); quantize-and-pack plus conv, 2 threads, interleaved: 28x28x128/2 W4A4
  // 47.0 -> 37.3 us, 14x14x256/2 W4A4 42.2 -> 39.9, 14x14x256 W2A2 50.6 -> 47.2; with compact
  // weights chunks stayed ahead on 14x14x256, 14x14x256/2 and 7x7x512. Where pairs are many,
  // split by chunks both threads write every output pixel, 64 channels apart, and 28x28x128 ran
  // 2.4x slower than split by pairs. One task per thread: with 2 or 4 smaller tasks per thread
  // (taken as threads come free) every shape ran slower, up to 1.9x (56x56x64/2 on 2 threads).
  const int threads = num_threads;
  const bool few_pairs = all_pairs < 4 * threads;
  const bool split_chunks = threads > 1 && chunks > 1 && few_pairs &&
                            (all_pairs < threads || plan.compact_bits != 0 ||
                             int64_t(plan.dot.size()) > kChunkSplitWeightBytes);
  const int64_t units = split_chunks ? chunks : all_pairs;
  const int64_t tasks = units < threads ? units : threads;
  if (!mul_ok(sh * sw, int64_t(job.words) * job.amx_plane_pixels, &stage_bytes) ||
      !mul_ok(stage_bytes, 64, &stage_bytes) || !mul_ok(stage_bytes, threads, &all_bytes))
    N2UQ_FAIL(N2UQ_ERR_UNSUPPORTED, "the staged input would be too large");
  Scratch& s = scratch();
  if (int rc = ensure(s.codes, all_bytes, "staged codes", err, err_len)) return rc;
  if (int rc = ensure(s.tap_offsets, int64_t(job.kernel_height) * job.kernel_width, "tap offsets", err, err_len))
    return rc;
  const int64_t plane_bytes = job.amx_plane_pixels * 64;
  for (int64_t kh = 0; kh < job.kernel_height; ++kh)
    for (int64_t kw = 0; kw < job.kernel_width; ++kw) {
      const int64_t y = kh * job.dilation_height, x = kw * job.dilation_width;
      s.tap_offsets[size_t(kh * job.kernel_width + kw)] =
          (y % sh * sw + x % sw) * job.words * plane_bytes + (y / sh * job.amx_cols + x / sw) * 64;
    }
  job.amx_tap_offsets = s.tap_offsets.data();
  uint8_t* const stages = s.codes.data();
  if (plan.compact_bits != 0) {  // chunks of one vector (prepare_weights)
    job.dot_weights = nullptr;
    job.compact_weights = plan.compact.data();
    job.compact_bits = plan.compact_bits;
  }
  // Split by chunks, every task stages all rows of each image: a thread's stage keeps the last
  // image it staged (staged_image[slot]), so it stages each image once.
  int64_t staged_image[N2UQ_MAX_THREADS];
  for (int i = 0; i < threads && i < N2UQ_MAX_THREADS; ++i) staged_image[i] = -1;
  // Task s on slot s (the caller is slot 0) on every call: the same pairs on the same core, whose
  // caches hold what its last call left there (its stage, its output rows) and, after a
  // quantize-and-pack split the same way (parallel_ranges_static), the rows it packed. Handed out
  // as threads came free, the tasks swapped cores on some calls (14x14x256/2 W4A4, 2 threads:
  // calls alternating 31 and 36 us).
  pool().run_each(int(tasks), [&](int slot) {
    const int64_t task = slot;
    ConvJob local = job;
    local.amx_stage = stages + slot * stage_bytes;
    // This task's share: chunks [c0, c1) of every pair, or flat pairs [g0, g1) (image * pairs + pair).
    int64_t c0 = 0, c1 = chunks, g0 = 0, g1 = all_pairs;
    if (split_chunks) {
      c0 = chunks * task / tasks;
      c1 = chunks * (task + 1) / tasks;
    } else {
      g0 = all_pairs * task / tasks;
      g1 = all_pairs * (task + 1) / tasks;
    }
    if (c0 >= c1 || g0 >= g1) return;
    const int64_t chunk_bytes = direct_chunk_bytes(job);
    local.amx_pairs_outer = plan.compact_bits == 0 && c1 - c0 > 1 && chunk_bytes > kPairsOuterChunkBytes &&
                            (c1 - c0) * chunk_bytes <= kChunkSplitWeightBytes;
    for (int64_t n = g0 / pairs; n * pairs < g1; ++n) {
      const int64_t p0 = g0 > n * pairs ? g0 - n * pairs : 0, p1 = g1 < (n + 1) * pairs ? g1 - n * pairs : pairs;
      local.amx_image = n;
      if (!split_chunks || staged_image[slot] != n) {
        // The plane rows pairs [p0, p1) read: virtual pixels [32 p0, 32 p1 + max_shift).
        const int64_t r0 = p0 * 32 / job.amx_cols, r1 = (p1 * 32 - 1 + max_shift) / job.amx_cols + 1;
        for (int64_t phase = 0; phase < sh * sw; ++phase)
          k->stage_rows(local, phase * job.amx_plane_rows + r0, phase * job.amx_plane_rows + r1);
        staged_image[slot] = n;
      }
      k->phased_run(local, n, c0, c1, p0, p1);
    }
  });
  return N2UQ_OK;
}

// Splitting the tiles by equal work (run_wino): a tile's GEMMs read 4 x 4 positions (stride-2
// form: 5 x 5), and 3 of the 4 (5) rows or columns where its second output row or column lies
// past the output. In wino_partial_last order each image's tiles come in four runs of equal cost
// (whole tiles, last column, last row, corner), so the split is worked out per run, not per tile:
// a 56x56 output has 784 tiles, and a per-tile walk through wino_tile_at's divisions cost the
// 2-thread 56x56x64 layers about a tenth of their time.
struct WinoTileRuns {
  int64_t count[4], cost[4], image_cost;
};

WinoTileRuns wino_tile_runs(const ConvJob& j, bool stride2) {
  const int64_t whole = stride2 ? 5 : 4, part = 3;
  const int64_t h_odd = j.out_height % 2, w_odd = j.out_width % 2;
  const int64_t whole_h = j.wino_tiles_h - h_odd, whole_w = j.wino_tiles_w - w_odd;
  WinoTileRuns r = {{whole_h * whole_w, whole_h * w_odd, whole_w * h_odd, h_odd * w_odd},
                    {whole * whole, whole * part, part * whole, part * part}, 0};
  for (int i = 0; i < 4; ++i) r.image_cost += r.count[i] * r.cost[i];
  return r;
}

// The number of tiles, in wino_partial_last order, whose summed cost first reaches `target`.
int64_t wino_tiles_reaching(const WinoTileRuns& r, int64_t batch, int64_t target) {
  const int64_t per_image = r.count[0] + r.count[1] + r.count[2] + r.count[3];
  const int64_t images = r.image_cost > 0 ? target / r.image_cost : 0;
  if (images >= batch) return batch * per_image;
  int64_t t = images * per_image, sum = images * r.image_cost;
  for (int i = 0; i < 4 && sum < target; ++i) {
    if (sum + r.count[i] * r.cost[i] >= target) return t + (target - sum + r.cost[i] - 1) / r.cost[i];
    sum += r.count[i] * r.cost[i];
    t += r.count[i];
  }
  return t;
}

// N2UQ_WINO_ORDER=0 keeps row-major tiles in the Winograd forms (A/B runs).
bool wino_partial_last_order() {
  const char* env = std::getenv("N2UQ_WINO_ORDER");
  return env == nullptr || std::strcmp(env, "0") != 0;
}

bool wino_split_tiles() {
  const char* env = std::getenv("N2UQ_WINO_SPLIT");
  return env == nullptr || std::strcmp(env, "0") != 0;
}

// Tiles per register block of a Winograd plan: the kernels' maximum, else as many as the chunk's
// register budget allows (the blocks of a run are then equal).
int wino_most_tiles(const N2uqConvPlanBody& plan) {
  const int blocks = plan.dot_chunk_blocks;
  return plan.kernels->wino_block_tiles > 0 ? plan.kernels->wino_block_tiles
         : blocks >= 4                      ? 6
         : blocks == 3                      ? 8
         : blocks == 2                      ? 12
                                            : 16;
}

// ---- A stride-2 Winograd conv that quantizes its own input (n2uq_conv_plan_run_quantizing).
//
// The quantize-and-pack of the float input goes between the GEMMs' steps (SideQuantize), where
// part of its time hides behind their VPDPBUSDs (isa_avx512_dot.cc). A tile's transform needs
// its input rows' codes before the tile's GEMMs, so each thread takes its tiles in bands: the
// rows of band 0 quantized on their own and transformed, then band b's GEMMs quantize the rows
// band b + 1 adds, which are transformed next. The first band's rows do not hide: 1 / bands of
// the quantizer (56x56x64/2 W4A4 on 1 thread of Zen 5, pieces of 64 channels: 8 bands 117.1 us,
// 4: 117.8, 2: 119.0, quantizing first 122.9). Every band has two register blocks or more.
// Each thread packs into an image of its own, so rows that two threads' tiles share are
// quantized by both (no thread reads what another writes). Tiles row-major, none partial
// (quantizes_inline): the rows of tiles [a, b) are one range.
constexpr int kQuantizeBands = 8;

// The input rows [lo, hi) (n * in_height + ih) that the stride-2 transforms of tiles [a, b) read:
// tile row ty reads rows 4 ty - pad_top .. + 4 (isa_avx512_dot.cc, wino2_transform_bits).
void wino2_rows(const ConvJob& j, int64_t a, int64_t b, int64_t* lo, int64_t* hi) {
  const int64_t per_image = int64_t(j.wino_tiles_h) * j.wino_tiles_w;
  const auto row = [&](int64_t t, int64_t offset) {
    const int64_t n = t / per_image, ty = t % per_image / j.wino_tiles_w;
    return n * j.in_height + std::min<int64_t>(std::max<int64_t>(4 * ty - j.pad_top + offset, 0), j.in_height);
  };
  *lo = row(a, 0);
  *hi = row(b - 1, 5);
}

// One thread's tiles [first, first + span), quantizing the rows they read into image.
void wino2_quantizing_part(ConvJob own, const N2uqConvPlanBody& plan, int most, int64_t first, int64_t span,
                           uint64_t* image, int slot) {
  const PathKernels* k = plan.kernels;
  QuantizeJob q = *own.input_quantize;
  q.out_packed = image;
  own.input = image;
  const int64_t width = own.in_width;
  const int64_t row_pieces = width * own.words * 2, row_words = width * int64_t(own.act_bits) * own.words;
  SideQuantize side{};
  k->side_prepare(q, &side);
  const int64_t bands = std::max<int64_t>(1, std::min<int64_t>(kQuantizeBands, span / (2 * int64_t(most))));
  // Band edges on whole register blocks where they can be (a band of 49 tiles ran blocks of 7
  // where 8 fit).
  const auto band_first = [&](int64_t b) {
    return b >= bands ? first + span : first + std::min(span, (span * b / bands + most / 2) / most * most);
  };
  int64_t lo = 0, done = 0;
  wino2_rows(own, first, band_first(1), &lo, &done);
  plan.table->quantize_and_pack(q, lo * width, done * width);
  k->wino2_transform(own, first, band_first(1));
  for (int64_t b = 0; b < bands; ++b) {
    const int64_t t0 = band_first(b), t1 = band_first(b + 1);
    int64_t next_lo = 0, next_hi = done;
    if (b + 1 < bands) wino2_rows(own, t1, band_first(b + 2), &next_lo, &next_hi);
    own.wino_block_first = t0;
    own.wino_block_span = t1 - t0;
    own.wino_tile_blocks = int32_t((own.wino_block_span + most - 1) / most);
    const int64_t items = int64_t(own.oc_chunks) * own.wino_tile_blocks;
    side.left = std::max<int64_t>(0, next_hi - done) * row_pieces;
    own.side_quantize = nullptr;
    if (side.left > 0) {
      side.x = q.x + done * width * own.in_channels;
      side.out = image + done * row_words;
      side.word = 0;
      // The band's GEMM steps (each item: 25 positions x quads of every tile) per piece.
      const int64_t steps = items * kWinoPositions2 * own.quads;
      side.every = int32_t(std::max<int64_t>(1, std::min<int64_t>(steps / side.left, 1 << 20)));
      side.countdown = side.every;
      own.side_quantize = &side;
    }
    for (int64_t item = 0; item < items; ++item) k->wino2_item(own, item, slot);
    if (side.left > 0) k->side_finish(&side);
    done = std::max(done, next_hi);
    if (b + 1 < bands) k->wino2_transform(own, t1, band_first(b + 2));
  }
}

int run_wino2_quantizing(const ConvJob& job, const N2uqConvPlanBody& plan, int most, int parts, char* err,
                         size_t err_len) {
  int64_t image_words = 0;
  if (!mul_ok(int64_t(job.batch) * job.in_height, int64_t(job.in_width) * job.act_bits * job.words, &image_words))
    N2UQ_FAIL(N2UQ_ERR_UNSUPPORTED, "the packed input would be too large");
  Scratch& s = scratch();
  if (s.images.size() < size_t(parts)) s.images.resize(size_t(parts));
  for (int i = 0; i < parts; ++i)
    if (int rc = ensure(s.images[size_t(i)], image_words, "packed input", err, err_len)) return rc;
  const int64_t tiles = job.wino_tiles;
  if (parts == 1) {
    wino2_quantizing_part(job, plan, most, 0, tiles, s.images[0].data(), 0);
    return N2UQ_OK;
  }
  pool().run_each(parts, [&](int slot) {
    const int64_t first = tiles * slot / parts, end = tiles * (slot + 1) / parts;
    if (end > first) wino2_quantizing_part(job, plan, most, first, end - first, s.images[size_t(slot)].data(), slot);
  });
  return N2UQ_OK;
}

// Winograd forms of the dot path (layout in kernel_table.h, kernels in isa_avx512_dot.cc): the
// padded codes, their transforms per 2x2 output tile, then items of (chunk, block of tiles),
// or on several threads each thread's own share of the tiles.
int run_wino(const ConvJob& base, const N2uqConvPlanBody& plan, int num_threads, char* err, size_t err_len) {
  ConvJob job = base;
  const PathKernels* k = plan.kernels;
  const bool stride2 = plan.wino == kWinoStride2;
  const int positions = stride2 ? kWinoPositions2 : kWinoPositions1;
  job.dot_weights = plan.dot.data();
  job.wino_bias = plan.wino_bias.data();
  job.quads = int32_t((int64_t(job.in_channels) + 3) / 4);
  set_dot_chunks(job, plan);
  job.wino_tiles_h = (job.out_height + 1) / 2;
  job.wino_tiles_w = (job.out_width + 1) / 2;
  const int64_t cw = int64_t(job.words) * 64;
  int64_t code_bytes = 0, tiles = 0, v_bytes = 0, terms = 0, pixels = 0;
  if (!mul_ok(int64_t(job.batch) * job.wino_tiles_h, job.wino_tiles_w, &tiles) ||
      !mul_ok(tiles, positions * cw, &v_bytes) || !mul_ok(tiles, 4, &terms))
    N2UQ_FAIL(N2UQ_ERR_UNSUPPORTED, "the staged input would be too large");
  if (!stride2) {  // the staged code image: the 4 input rows and columns of each tile, overlapping by 2
    job.wino_code_rows = 2 * int64_t(job.wino_tiles_h) + 2;
    job.wino_code_cols = 2 * int64_t(job.wino_tiles_w) + 2;
    if (!mul_ok(int64_t(job.batch) * job.wino_code_rows, job.wino_code_cols, &pixels) ||
        !mul_ok(pixels, cw, &code_bytes))
      N2UQ_FAIL(N2UQ_ERR_UNSUPPORTED, "the staged input would be too large");
  }
  job.wino_tiles = tiles;
  const bool split = num_threads > 1 && tiles >= 2 * num_threads && wino_split_tiles();
  const int most = wino_most_tiles(plan);
  job.wino_tile_blocks = int32_t((tiles + most - 1) / most);
  Scratch& s = scratch();
  if (int rc = ensure(s.codes, code_bytes + v_bytes, "staged codes", err, err_len)) return rc;
  job.wino_codes = s.codes.data();
  job.wino_v = s.codes.data() + code_bytes;
  // The stride-2 transforms read the packed input themselves and have no per-tile terms; the
  // stride-1 ones read a staged code image and its pixel sums.
  if (!stride2) {
    if (int rc = ensure(s.pixel_sums, terms + pixels, "tile and pixel sums", err, err_len)) return rc;
    job.wino_tile_terms = s.pixel_sums.data();
    job.wino_pixel_sums = s.pixel_sums.data() + terms;
    // Split as the tiles below are (slot s the same share of the rows on every call), so that
    // each thread's transforms mostly read the rows its own core staged.
    const auto stage = [&](int64_t b, int64_t e) { k->wino_codes(job, b, e); };
    if (split)
      parallel_ranges_static(num_threads, int64_t(job.batch) * job.wino_code_rows, 1, stage);
    else
      parallel_ranges(num_threads, int64_t(job.batch) * job.wino_code_rows, 1, stage);
  }
  job.wino_block_first = 0;
  job.wino_block_span = tiles;
  job.wino_partial_last = k->wino_partial_last && wino_partial_last_order() ? 1 : 0;
  const auto item_fn = stride2 ? k->wino2_item : k->wino_item;
  const auto transform = stride2 ? k->wino2_transform : k->wino_transform;
  if (job.input_quantize != nullptr) return run_wino2_quantizing(job, plan, most, split ? num_threads : 1, err, err_len);
  if (split) {
    // Each thread transforms its own share of the tiles and runs every chunk over them: no
    // barrier between the transforms and the GEMMs, and each thread's V stays in its own core's
    // caches (handed out as items, a thread's blocks read V that the other core had written).
    // Quantize-and-pack plus conv, 2 threads, Zen 5, against items: 56x56x64/2 W4A4 68.3 -> 64.6
    // us, 14x14x256/2 W4A4 66.7 -> 64.1, 28x28x128/2 59.5 -> 58.4.
    // Shares of equal work where some tiles are partial (wino_tile_runs), else of equal tiles.
    const int parts = num_threads;
    const bool weighted = job.wino_partial_last && (job.out_height % 2 != 0 || job.out_width % 2 != 0);
    const WinoTileRuns runs = wino_tile_runs(job, stride2);
    const auto bound = [&](int64_t part) {  // slot `part`'s first tile
      if (part <= 0) return int64_t(0);
      if (part >= parts) return tiles;
      if (!weighted) return tiles * part / parts;
      const int64_t total = runs.image_cost * job.batch;
      return wino_tiles_reaching(runs, job.batch, (total * part + parts - 1) / parts);
    };
    pool().run_each(parts, [&](int slot) {
      ConvJob own = job;
      own.wino_block_first = bound(slot);
      own.wino_block_span = bound(slot + 1) - own.wino_block_first;
      if (own.wino_block_span <= 0) return;
      own.wino_tile_blocks = int32_t((own.wino_block_span + most - 1) / most);
      transform(own, own.wino_block_first, own.wino_block_first + own.wino_block_span);
      const int64_t own_items = int64_t(own.oc_chunks) * own.wino_tile_blocks;
      for (int64_t item = 0; item < own_items; ++item) item_fn(own, item, slot);
    });
    return N2UQ_OK;
  }
  parallel_ranges(num_threads, tiles, 1, [&](int64_t b, int64_t e) { transform(job, b, e); });
  const int64_t items = int64_t(job.oc_chunks) * job.wino_tile_blocks;
  pool().run_slots(num_threads, items, [&](int64_t item, int slot) { item_fn(job, item, slot); });
  return N2UQ_OK;
}

// Input rows a LUT work item keeps tables for: every row one output row reads (the span of
// the dilated kernel), reused by the next output rows (row ih lives in slot ih % span).
int64_t lut_ring_rows(const N2uqConvShape& s) { return int64_t(s.kernel_height - 1) * s.dilation_height + 1; }

// Partial sums of one LUT register block: kLutMaxBlockPixels x every output channel (rounded
// up to the lanes of whole chunks), int32.
int64_t lut_tile_bytes(const N2uqConvShape& s) {
  return kLutMaxBlockPixels * ((int64_t(s.out_channels) + 127) / 128 * 128) * 4;
}

// Bytes of one thread's LUT scratch (layout in kernel_table.h): the slot header, per ring
// row and padded column the tables and the pixel's code sum, one pixel's codes.
bool lut_thread_bytes(const N2uqConvShape& s, int64_t in_width, int64_t* bytes) {
  const int64_t groups = (int64_t(s.in_channels) + kLutGroup - 1) / kLutGroup;
  const int64_t padded = in_width + s.pad_left + s.pad_right, rows = lut_ring_rows(s);
  const int64_t columns = (padded + s.stride_width - 1) / s.stride_width;  // per stride phase
  const int64_t header = (rows * 8 + 63) / 64 * 64, codes = words_for(s.in_channels) * 64 + 64;
  int64_t tables = 0, row = 0, ring = 0;
  if (!mul_ok(columns * s.stride_width, groups * kLutTable, &tables)) return false;
  row = tables + (padded * 4 + 63) / 64 * 64;  // tables, then the int32 code sum of every column
  if (!mul_ok(rows, row, &ring)) return false;
  *bytes = header + ring + lut_tile_bytes(s) + codes;
  return true;
}

// Largest LUT scratch per thread: layers that would need more (huge dilations or widths) do
// not offer the path.
constexpr int64_t kMaxLutRing = int64_t(64) << 20;

// The LUT path handles the shape (kernel rows, scratch size).
bool lut_fits(const N2uqConvShape& s) {
  int64_t bytes = 0;
  return s.kernel_height <= kLutMaxKernelRows && s.kernel_width <= kLutMaxKernelRows &&
         lut_thread_bytes(s, s.in_width, &bytes) && bytes <= kMaxLutRing;
}

// Output rows per LUT work item: each item rebuilds the tables of the rows it reads, so
// bands trade parallelism for the (span - stride) rows rebuilt at every band edge.
int64_t lut_band_rows(const ConvJob& job, int num_threads) {
  const int64_t rows = int64_t(job.batch) * job.out_height;
  int64_t band = (rows + 2 * num_threads - 1) / (2 * num_threads);  // about 2 items per thread
  if (band > 16) band = 16;
  if (band > job.out_height) band = job.out_height;
  return band < 1 ? 1 : band;
}

int run_lut(const ConvJob& base, const N2uqConvPlanBody& plan, int num_threads, char* err, size_t err_len) {
  ConvJob job = base;
  const PathKernels* k = plan.kernels;
  job.lut_indices = plan.lut.data();
  job.padded_width = int64_t(job.in_width) + plan.filter.pad_left + plan.filter.pad_right;
  job.lut_code_bytes = int64_t(job.words) * 64 + 64;
  job.lut_groups = int32_t((int64_t(job.in_channels) + kLutGroup - 1) / kLutGroup);
  const int lanes = job.weight_bits <= 2 ? k->lanes : k->lanes_wide;
  const int per_chunk = k->blocks_per_chunk * k->lanes / lanes;  // chunks of the same channels either way
  job.lut_blocks = int32_t((int64_t(job.out_channels) + lanes - 1) / lanes);
  job.lut_chunks = (job.lut_blocks + per_chunk - 1) / per_chunk;
  int64_t per_thread = 0, all = 0;
  if (!lut_thread_bytes(plan.filter, job.in_width, &per_thread) || per_thread > kMaxLutRing ||
      !mul_ok(per_thread, num_threads, &all))
    N2UQ_FAIL(N2UQ_ERR_UNSUPPORTED, "the lookup tables of this input would be too large for the lut path (%lld MB "
              "per thread at most)", (long long)(kMaxLutRing >> 20));
  job.lut_ring_rows = int32_t(lut_ring_rows(plan.filter));
  job.lut_tile_bytes = lut_tile_bytes(plan.filter);
  job.lut_band = int32_t(lut_band_rows(job, num_threads));
  job.lut_thread_bytes = per_thread;
  Scratch& s = scratch();
  if (int rc = ensure(s.codes, all + 64, "lookup tables", err, err_len)) return rc;
  const uintptr_t address = reinterpret_cast<uintptr_t>(s.codes.data());
  job.lut_tables = s.codes.data() + (64 - address % 64) % 64;
  const int64_t bands = (int64_t(job.out_height) + job.lut_band - 1) / job.lut_band;
  pool().run_slots(num_threads, int64_t(job.batch) * bands, [&](int64_t item, int slot) { k->item(job, item, slot); });
  return N2UQ_OK;
}

// ---------------------------------------------------------------- plans

// Weight codes [OC][KH][KW][C] from packed bit planes [OC][KH][KW][weight_bits][words].
std::vector<uint8_t> weight_codes(const N2uqConvShape& s, const uint64_t* packed) {
  const int64_t words = words_for(s.in_channels), bits = s.weight_bits, channels = s.in_channels;
  const int64_t positions = int64_t(s.out_channels) * s.kernel_height * s.kernel_width;
  std::vector<uint8_t> codes(size_t(positions * channels));
  for (int64_t pos = 0; pos < positions; ++pos) {
    const uint64_t* src = packed + pos * bits * words;
    uint8_t* dst = codes.data() + pos * channels;
    for (int64_t c = 0; c < channels; ++c) {
      unsigned code = 0;
      for (int64_t b = 0; b < bits; ++b) code |= unsigned((src[b * words + c / 64] >> (c % 64)) & 1) << b;
      dst[c] = uint8_t(code);
    }
  }
  return codes;
}

// ConvJob::dot_weights: int8 w' = 2k - n_w, [chunk][KH][KW][quads][blocks of the chunk][lanes][4]
// (chunks of `per_chunk` blocks of `lanes` output channels; the last chunk may have fewer blocks).
// Quads per tap are rounded up to a multiple of quad_align (> 1: zero weights past in_channels).
void build_dot_weights(const N2uqConvShape& s, const std::vector<uint8_t>& codes, int lanes, int per_chunk,
                       int quad_align, AlignedVector<int8_t>* out) {
  const int64_t taps = int64_t(s.kernel_height) * s.kernel_width, channels = s.in_channels;
  const int64_t align = quad_align > 1 ? quad_align : 1;
  const int64_t quads = ((channels + 3) / 4 + align - 1) / align * align;
  const int64_t blocks = (int64_t(s.out_channels) + lanes - 1) / lanes;
  const int64_t block_bytes = taps * quads * lanes * 4;
  const int n_w = (1 << s.weight_bits) - 1;
  out->assign(size_t(blocks * block_bytes), 0);
  for (int64_t oc = 0; oc < s.out_channels; ++oc) {
    const int64_t block = oc / lanes, chunk = block / per_chunk, r = block % per_chunk;
    const int64_t in_chunk = blocks - chunk * per_chunk < per_chunk ? blocks - chunk * per_chunk : per_chunk;
    for (int64_t t = 0; t < taps; ++t)
      for (int64_t c = 0; c < channels; ++c) {
        const int64_t index = chunk * per_chunk * block_bytes + (((t * quads + c / 4) * in_chunk + r) * lanes + oc % lanes) * 4 + c % 4;
        (*out)[size_t(index)] = int8_t(2 * int(codes[size_t((oc * taps + t) * channels + c)]) - n_w);
      }
  }
}

// ConvJob::compact_weights from the int8 dot layout (every row 64 bytes w' = 2k - n_w): each row's
// codes k in the compact row layout (kernel_table.h).
void build_compact_weights(const AlignedVector<int8_t>& dot, int weight_bits, AlignedVector<uint8_t>* out) {
  const int bits = compact_bits_for(weight_bits), n_w = (1 << weight_bits) - 1, row_bytes = 8 * bits;
  const int64_t rows = int64_t(dot.size()) / 64;
  out->assign(size_t(rows * row_bytes), 0);
  for (int64_t r = 0; r < rows; ++r)
    for (int i = 0; i < 64; ++i) {
      const unsigned k = unsigned(dot[size_t(r * 64 + i)] + n_w) / 2;
      (*out)[size_t(r * row_bytes + i % row_bytes)] |= uint8_t(k << (bits * (i / row_bytes)));
    }
}

// ConvJob::lut_indices: [chunk][KH][KW][groups][blocks of the chunk][64]; in a block, lane
// (oc % per_block) * planes + j holds bit j of the weight codes of the group's kLutGroup
// channels (bit i: channel i), planes = 2 for weight_bits <= 2, else 4, per_block = 64 /
// planes output channels; lanes of missing planes or channels index entry 0 (= 0).
void build_lut_indices(const N2uqConvShape& s, const std::vector<uint8_t>& codes, int chunk_blocks_narrow,
                       AlignedVector<uint8_t>* out) {
  const int64_t taps = int64_t(s.kernel_height) * s.kernel_width, channels = s.in_channels;
  const int64_t planes = s.weight_bits <= 2 ? 2 : 4, per_block = 64 / planes;
  // Chunks hold the same output channels for either lane layout: chunk_blocks_narrow blocks of
  // 32 channels, or twice as many of 16.
  const int64_t per_chunk = chunk_blocks_narrow * 32 / per_block;
  const int64_t groups = (channels + kLutGroup - 1) / kLutGroup;
  const int64_t blocks = (int64_t(s.out_channels) + per_block - 1) / per_block;
  const int64_t block_bytes = taps * groups * 64;
  out->assign(size_t(blocks * block_bytes), 0);
  for (int64_t oc = 0; oc < s.out_channels; ++oc) {
    const int64_t block = oc / per_block, chunk = block / per_chunk, r = block % per_chunk;
    const int64_t in_chunk = blocks - chunk * per_chunk < per_chunk ? blocks - chunk * per_chunk : per_chunk;
    for (int64_t t = 0; t < taps; ++t)
      for (int64_t c = 0; c < channels; ++c) {
        const unsigned code = codes[size_t((oc * taps + t) * channels + c)];
        const int64_t base = chunk * per_chunk * block_bytes + ((t * groups + c / kLutGroup) * in_chunk + r) * 64 +
                             (oc % per_block) * planes;
        for (int64_t j = 0; j < s.weight_bits; ++j)
          (*out)[size_t(base + j)] |= uint8_t(((code >> j) & 1u) << (c % kLutGroup));
      }
  }
}

// The form of the dot path for a shape (see isa_avx512_dot.cc), on kernels that have it:
//   kWinoStride1: 3x3, stride 1, dilation 1, and every intermediate within int32: |Y4| <= 9 * 4 *
//     C * (2 * 9h * 6M + 4M * 9h + 9 * 4M), h = 2^(weight_bits - 1), M = 2^act_bits - 1;
//   kWinoStride2: 3x3, stride 2, dilation 1, and |Y| <= 9 * C * (4 n_w * 4M + 2M * 4 n_w) (each
//     output sums 9 positions of |acc| <= C |U| |V8| and |2M sum_c U|), n_w = 2^weight_bits - 1;
//   else kWinoNone (direct). N2UQ_DOT_WINOGRAD=0 in the environment keeps the direct form (for
// comparisons).
int wino_form(const N2uqConvShape& s, const PathKernels* k) {
  const char* env = std::getenv("N2UQ_DOT_WINOGRAD");
  if (env != nullptr && std::strcmp(env, "0") == 0) return kWinoNone;
  if (k == nullptr || s.kernel_height != 3 || s.kernel_width != 3 || s.dilation_height != 1 ||
      s.dilation_width != 1 || s.stride_height != s.stride_width)
    return kWinoNone;
  const int64_t h = int64_t(1) << (s.weight_bits - 1), m = (int64_t(1) << s.act_bits) - 1, n_w = 2 * h - 1;
  const int64_t limit = (int64_t(1) << 31) - 1;
  if (s.stride_height == 1 && k->wino_item != nullptr) {
    const int64_t per_channel = 36 * (108 * h * m + 36 * h * m + 36 * m);
    return int64_t(s.in_channels) <= limit / per_channel - 1 ? kWinoStride1 : kWinoNone;
  }
  if (s.stride_height == 2 && k->wino2_item != nullptr) {  // its weights are whole words for any kernels
    const int64_t per_channel = 9 * (16 * n_w * m + 8 * m * n_w);
    return int64_t(s.in_channels) <= limit / per_channel - 1 ? kWinoStride2 : kWinoNone;
  }
  return kWinoNone;
}

// Winograd weights (ConvJob::dot_weights in the layout kernel_table.h gives for it) and
// ConvJob::wino_bias: per output channel and input channel U(q) = G q G^T, q = k - h. Quads per
// position are rounded up to a multiple of quad_align (> 1: zero weights past in_channels).
void build_wino_weights(const N2uqConvShape& s, const std::vector<uint8_t>& codes, int lanes, int per_chunk,
                        int quad_align, AlignedVector<int8_t>* out, AlignedVector<int32_t>* bias) {
  static const int kG[4][3] = {{1, 0, 0}, {1, 1, 1}, {1, -1, 1}, {0, 0, 1}};
  static const int kShift[16] = {2, 1, 1, 2, 1, 0, 0, 1, 1, 0, 0, 1, 2, 1, 1, 2};
  const int64_t align = quad_align > 1 ? quad_align : 1;
  const int64_t channels = s.in_channels, quads = ((channels + 3) / 4 + align - 1) / align * align;
  const int64_t blocks = (int64_t(s.out_channels) + lanes - 1) / lanes, block_bytes = 16 * quads * lanes * 4;
  const int h = 1 << (s.weight_bits - 1), m = (1 << s.act_bits) - 1;
  out->assign(size_t(blocks * block_bytes), 0);
  bias->assign(size_t(4 * blocks * lanes), 0);
  std::vector<int64_t> sums(16);
  for (int64_t oc = 0; oc < s.out_channels; ++oc) {
    const int64_t block = oc / lanes, chunk = block / per_chunk, r = block % per_chunk;
    const int64_t in_chunk = blocks - chunk * per_chunk < per_chunk ? blocks - chunk * per_chunk : per_chunk;
    std::fill(sums.begin(), sums.end(), 0);
    for (int64_t c = 0; c < channels; ++c) {
      int q[3][3];
      for (int t = 0; t < 9; ++t) q[t / 3][t % 3] = int(codes[size_t((oc * 9 + t) * channels + c)]) - h;
      for (int a = 0; a < 4; ++a)
        for (int b = 0; b < 4; ++b) {
          int u = 0;
          for (int i = 0; i < 3; ++i)
            for (int jj = 0; jj < 3; ++jj) u += kG[a][i] * q[i][jj] * kG[b][jj];
          const int64_t x = a * 4 + b;
          const int64_t index = chunk * per_chunk * block_bytes + (((x * quads + c / 4) * in_chunk + r) * lanes + oc % lanes) * 4 + c % 4;
          (*out)[size_t(index)] = int8_t(u);
          sums[size_t(x)] += u;
        }
    }
    int64_t z[16];
    for (int x = 0; x < 16; ++x) z[x] = -4 * m * sums[size_t(x)] * (int64_t(1) << kShift[x]);
    for (int i = 0; i < 2; ++i)  // through the output transform A^T z A, A^T = [1 1 1 0; 0 1 -1 -1]
      for (int jx = 0; jx < 2; ++jx) {
        int64_t u[4];
        for (int b = 0; b < 4; ++b) u[b] = i == 0 ? z[b] + z[4 + b] + z[8 + b] : z[4 + b] - z[8 + b] - z[12 + b];
        (*bias)[size_t((2 * i + jx) * blocks * lanes + oc)] = int32_t(jx == 0 ? u[0] + u[1] + u[2] : u[1] - u[2] - u[3]);
      }
  }
}

// Stride-2 form weights (ConvJob::dot_weights: U(w') = G w' G^T per position, in slot order) and
// ConvJob::wino_bias = A (-2M sum_c U) A^T per output pixel of a tile (isa_avx512_dot.cc).
void build_wino2_weights(const N2uqConvShape& s, const std::vector<uint8_t>& codes, int lanes, int per_chunk,
                         AlignedVector<int8_t>* out, AlignedVector<int32_t>* bias) {
  static const int kG[5][3] = {{1, 0, 0}, {1, 0, 1}, {0, 0, 1}, {0, 1, 0}, {0, 1, 0}};
  static const int kA[2][5] = {{1, 1, 0, 1, 0}, {0, 1, 1, 0, 1}};
  const int64_t channels = s.in_channels, quads = words_for(channels) * 16;  // whole words: kernel_table.h
  const int64_t blocks = (int64_t(s.out_channels) + lanes - 1) / lanes;
  const int64_t block_bytes = kWinoPositions2 * quads * lanes * 4;
  const int n_w = (1 << s.weight_bits) - 1, m = (1 << s.act_bits) - 1;
  out->assign(size_t(blocks * block_bytes), 0);
  bias->assign(size_t(4 * blocks * lanes), 0);
  int64_t sums[kWinoPositions2];
  for (int64_t oc = 0; oc < s.out_channels; ++oc) {
    const int64_t block = oc / lanes, chunk = block / per_chunk, r = block % per_chunk;
    const int64_t in_chunk = blocks - chunk * per_chunk < per_chunk ? blocks - chunk * per_chunk : per_chunk;
    std::fill(sums, sums + kWinoPositions2, 0);
    for (int64_t c = 0; c < channels; ++c) {
      int g[3][3];
      for (int t = 0; t < 9; ++t) g[t / 3][t % 3] = 2 * int(codes[size_t((oc * 9 + t) * channels + c)]) - n_w;
      for (int a = 0; a < 5; ++a)
        for (int b = 0; b < 5; ++b) {
          int u = 0;
          for (int i = 0; i < 3; ++i)
            for (int jj = 0; jj < 3; ++jj) u += kG[a][i] * g[i][jj] * kG[b][jj];
          const int64_t x = a * 5 + b, slot = kWino2Slot[x];
          const int64_t index = chunk * per_chunk * block_bytes +
                                (((slot * quads + c / 4) * in_chunk + r) * lanes + oc % lanes) * 4 + c % 4;
          (*out)[size_t(index)] = int8_t(u);
          sums[x] += u;
        }
    }
    for (int i = 0; i < 2; ++i)
      for (int jx = 0; jx < 2; ++jx) {
        int64_t y = 0;
        for (int a = 0; a < 5; ++a)
          for (int b = 0; b < 5; ++b) y += kA[i][a] * kA[jx][b] * sums[a * 5 + b];
        (*bias)[size_t((2 * i + jx) * blocks * lanes + oc)] = int32_t(-2 * m * y);
      }
  }
}

// Weight vectors per dot-path work chunk (R of the register blocks). Measured on Zen 5 (AVX-512,
// ResNet-18 3x3 layers): R = 3 allows blocks of up to 8 pixels, so rows of 7, 14, 28 and 56
// pixels split into whole 7-pixel blocks and each weight vector loaded from L2 (the 7x7x512
// layer's 221 KB per chunk) serves 7 pixels; R = 4 (6 pixels) split a 7-pixel row 4 + 3 and
// ran 35% slower there, and was no faster on the other rows.
// With 4 blocks (64 channels on AVX-512), 3 + 1 left a one-vector chunk: 2 + 2 measured 8% faster.
int dot_chunk_blocks(const PathKernels* k, int64_t blocks) {
  const int most = k->blocks_per_chunk < 3 ? k->blocks_per_chunk : 3;
  return blocks == 4 && most >= 2 ? 2 : most;
}

// Paths whose plans and runs are the dot path's (amx: the dot layout, another Winograd GEMM).
bool dot_layout(int path) { return path == N2UQ_PATH_DOT || path == N2UQ_PATH_AMX; }

// Builds `plan`'s weights for its path from the packed weights.
int prepare_weights(N2uqConvPlanBody* plan, const uint64_t* weights, int64_t weights_needed, int num_threads, char* err,
                    size_t err_len, bool direct_form = false, bool compact = false) {
  const N2uqConvShape& s = plan->filter;
  if (plan->path == N2UQ_PATH_BITSERIAL) {
    plan->packed.assign(weights, weights + weights_needed);
    if (plan->table->conv_group_item != nullptr) {
      ConvJob job{};
      job.in_channels = s.in_channels;
      job.words = int32_t(words_for(s.in_channels));
      job.out_channels = s.out_channels;
      job.kernel_height = s.kernel_height;
      job.kernel_width = s.kernel_width;
      job.weight_bits = s.weight_bits;
      job.weights = plan->packed.data();
      const int64_t groups = (int64_t(s.out_channels) + kGroupLanes - 1) / kGroupLanes;
      int64_t grouped = 0;
      if (!mul_ok(groups * kGroupLanes * s.kernel_height * s.kernel_width, job.words * int64_t(s.weight_bits),
                  &grouped))
        N2UQ_FAIL(N2UQ_ERR_UNSUPPORTED, "the weights are too large");
      plan->grouped.assign(size_t(grouped), 0);
      uint64_t* dst = plan->grouped.data();
      pool().run(num_threads, groups, [&](int64_t g) { plan->table->conv_group_weights(job, dst, g); });
    }
    return N2UQ_OK;
  }
  const std::vector<uint8_t> codes = weight_codes(s, weights);
  if (dot_layout(plan->path)) {
    plan->wino = direct_form ? kWinoNone : wino_form(s, plan->kernels);
    const bool phased = plan->wino == kWinoNone && plan->kernels->phased_run != nullptr;
    compact = compact && phased;
    plan->dot_chunk_blocks =
        compact  ? 1  // isa_amx.cc, compact_vectors: a vector's rows consecutive
        : phased ? kAmxDirectVectors
               : dot_chunk_blocks(plan->kernels, (int64_t(s.out_channels) + plan->kernels->lanes - 1) /
                                                      plan->kernels->lanes);
    if (plan->wino == kWinoStride1)
      build_wino_weights(s, codes, plan->kernels->lanes, plan->dot_chunk_blocks, plan->kernels->wino_quad_align,
                         &plan->dot, &plan->wino_bias);
    else if (plan->wino == kWinoStride2)
      build_wino2_weights(s, codes, plan->kernels->lanes, plan->dot_chunk_blocks, &plan->dot, &plan->wino_bias);
    else
      build_dot_weights(s, codes, plan->kernels->lanes, plan->dot_chunk_blocks, phased ? 16 : 1, &plan->dot);
    if (compact) {
      build_compact_weights(plan->dot, s.weight_bits, &plan->compact);
      plan->compact_bits = compact_bits_for(s.weight_bits);
      AlignedVector<int8_t>().swap(plan->dot);
    }
  }
  else
    build_lut_indices(s, codes, plan->kernels->blocks_per_chunk * plan->kernels->lanes / 32, &plan->lut);
  return N2UQ_OK;
}

// The filter fields of two shapes (everything but batch and input size) agree.
bool same_filter(const N2uqConvShape& a, const N2uqConvShape& b) {
  return a.in_channels == b.in_channels && a.out_channels == b.out_channels && a.kernel_height == b.kernel_height &&
         a.kernel_width == b.kernel_width && a.stride_height == b.stride_height && a.stride_width == b.stride_width &&
         a.dilation_height == b.dilation_height && a.dilation_width == b.dilation_width && a.pad_top == b.pad_top &&
         a.pad_bottom == b.pad_bottom && a.pad_left == b.pad_left && a.pad_right == b.pad_right &&
         a.act_bits == b.act_bits && a.weight_bits == b.weight_bits;
}

// Validates a conv shape and the sizes of its packed input and weights.
struct ConvSizes {
  ConvGeometry g;
  int64_t input, weights, out;
};

int check_conv(const N2uqConvShape* s, ConvSizes* z, char* err, size_t err_len) {
  if (int rc = check_spatial(s, false, &z->g, err, err_len)) return rc;
  const int64_t words = words_for(s->in_channels);
  if (!mul_ok(int64_t(s->batch) * s->in_height, int64_t(s->in_width) * s->act_bits * words, &z->input) ||
      !mul_ok(int64_t(s->out_channels) * s->kernel_height, int64_t(s->kernel_width) * s->weight_bits * words,
              &z->weights) ||
      !mul_ok(int64_t(s->batch) * z->g.out_height, z->g.out_width * s->out_channels, &z->out))
    N2UQ_FAIL(N2UQ_ERR_UNSUPPORTED, "tensor sizes are too large");
  return check_accumulator(int64_t(s->kernel_height) * s->kernel_width * s->in_channels, (1 << s->act_bits) - 1,
                           (1 << s->weight_bits) - 1, err, err_len);
}

// Runs a plan on a validated shape (same filter) and buffers.
int run_plan(const N2uqConvPlanBody& plan, const N2uqConvShape* s, const ConvGeometry& g, const uint64_t* input,
             const float* multiplier, const float* bias, float* out_float, int32_t* out_int32, int num_threads,
             char* err, size_t err_len, const StageJob* stage = nullptr,
             const QuantizeJob* input_quantize = nullptr) {
  ConvJob job{};
  fill_job(job, s, g, multiplier, bias, out_float, out_int32);
  job.output_stage = stage;
  job.input_quantize = input_quantize;  // quantizes_inline(plan, ...) held
  job.words = int32_t(words_for(s->in_channels));
  job.act_bits = s->act_bits;
  job.input = input;
  switch (plan.path) {
    case N2UQ_PATH_DOT:
    case N2UQ_PATH_AMX: return run_dot(job, plan, num_threads, err, err_len);
    case N2UQ_PATH_LUT: return run_lut(job, plan, num_threads, err, err_len);
    default: return run_bitserial(job, plan, num_threads, err, err_len);
  }
}

// N2UQ_AMX_COMPACT in the environment: "1" gives every amx plan of the direct form compact weights,
// "0" none (1 / 0 here); otherwise (-1) the selection times them as a candidate of their own.
int compact_override() {
  const char* env = std::getenv("N2UQ_AMX_COMPACT");
  if (env != nullptr && std::strcmp(env, "1") == 0) return 1;
  if (env != nullptr && std::strcmp(env, "0") == 0) return 0;
  return -1;
}

// A plan for a concrete path (weights built), or a status.
int make_plan(const N2uqConvShape& s, const uint64_t* weights, int64_t weights_needed, int isa, int path,
              int num_threads, std::unique_ptr<N2uqConvPlanBody>* out, char* err, size_t err_len,
              bool direct_form = false, bool compact = false) {
  N2UQ_CHECK(path_available(isa, path), N2UQ_ERR_UNSUPPORTED, "path %s is not supported with ISA %s by this CPU or build",
             n2uq_path_name(path), n2uq_isa_name(isa));
  if (path == N2UQ_PATH_LUT) {
    N2UQ_CHECK(lut_fits(s), N2UQ_ERR_UNSUPPORTED,
               "the lut path takes kernels of at most %d x %d and %lld MB of tables per thread", kLutMaxKernelRows,
               kLutMaxKernelRows,
               (long long)(kMaxLutRing >> 20));
  }
  std::unique_ptr<N2uqConvPlanBody> plan(new N2uqConvPlanBody);
  plan->filter = s;
  plan->isa = isa;
  plan->path = path;
  plan->table = table_for(isa);
  plan->kernels = path == N2UQ_PATH_BITSERIAL ? nullptr : path_kernels(isa, path);
  const int forced = compact_override();
  compact = path == N2UQ_PATH_AMX && (forced == 1 || (forced == -1 && compact));
  if (int rc = prepare_weights(plan.get(), weights, weights_needed, num_threads, err, err_len, direct_form, compact))
    return rc;
  *out = std::move(plan);
  return N2UQ_OK;
}

// ---------------------------------------------------------------- path selection

// Selection by measurement: the first plan of a shape (filter, batch, input size, ISA,
// thread count) times every path the CPU can run on random codes of that shape and keeps
// the fastest; later plans of the same shape reuse the answer. Where the dot or amx path has a
// Winograd form for the shape, its direct form is a candidate of its own (the forms trade
// fewer products for 16/9 or 25/9 times the weight bytes). Per candidate: one warm-up
// call (scratch growth, page faults, pool wake-up), then interleaved rounds until each has
// run kMinRounds times and kMinSeconds have passed, at most kMaxRounds; the best (minimum)
// time of each decides, which is the estimate least disturbed by other processes. kMinSeconds
// (once a fixed 15 rounds, ~4 ms on a small layer) because a disturbance lasts a while:
// another runtime's pool threads may still spin after their last job (a TFLite builtin that
// ran just before), and a benchmark once saw a 2-thread choice of bit-serial that ran 30%
// slower than dot, which other processes picked; picks by a longer window agree more often.
// Where some candidate's weights exceed kColdWeightBytes, every timed run starts with the
// candidate's weights flushed from the caches: in a network the other layers run between two
// calls of a layer, so large weights come from memory (ResNet-18 W2A2 on Zen 5: the 7x7x512
// convs' Winograd weights, 4.2 MB each, took 224-231 us per call in the network against ~145 us
// warm, and bit-serial, whose 2-bit planes are 7x smaller and which loses warm, took 162-168 us;
// a warm timing picked the Winograd form).
// Past kMinSeconds the rounds go on, up to kMaxSeconds, until every candidate's best time is
// confirmed by a second round within kConfirmRatio of it: on a shared host (the Xeon VM) bursts of
// another tenant's load lasted longer than the 20 ms window, and a 2-thread 7x7x512 W2A2 plan
// kept the lut path at 0.39x of TFLite int8, where the amx path ran 1.2x.
constexpr int kMinRounds = 5;
constexpr int kMaxRounds = 100;
constexpr double kMinSeconds = 0.02;
constexpr double kMaxSeconds = 0.25;
constexpr double kConfirmRatio = 1.1;
constexpr int64_t kCalibrationBytes = int64_t(64) << 20;  // per buffer (input, output) of the timing runs
// The timing above is one window at Prepare, on calibration codes, and a host can be in another
// phase then than later (the AMX Xeon VM: a stretch of slow tile work made a 28x28x128/2 W2A2
// plan keep the Winograd form at 0.86x of TFLite int8, where the direct form ran 1.32x) or the
// calls can meet other caches than the timing's (flushed weights against weights still in L2 or
// L3). So the runner-up, where it came within kTrialKeepRatio of the winner, is kept and the
// plan's first real runs try both (PlanTrial) in kTrialBlocks blocks each of kTrialRuns + 1 runs,
// winner, runner-up, winner, runner-up, the first of each block untimed; the best timed run of
// each per input pixel decides, the runner-up taking over only where it beat the winner by kTrialSwitchRatio; the
// loser's weights are then freed and the shape's cached answer replaced. Every path gives the same
// outputs, so the trial changes only timing. Blocks, not alternating runs: the calls then meet the
// caches they will meet later. Back to back (one layer called again and again), a block's runs
// find its weights where its previous run left them; alternating, each run found them evicted by
// the other's (14x14x256/2 W4A4 on the AMX Xeon: the int8 weights' direct form ran 50-55 us back
// to back, 78 us in an alternating trial, 66 us in a block's first runs; compact weights 60-65,
// 71 and 57). Inside a network, other layers run between a layer's calls either way. Two blocks
// each: a plan's first runs are slower than its later ones (that layer's direct form: 117, 65,
// 59 us, about 55 from the tenth run), and the second blocks meet the steadier state. Near-ties
// stay a coin toss: Zen 5's 14x14x256/2 W3A3 / W4A4 on 2 threads runs its Winograd form about 5-10%
// faster than the direct form back to back, but the trial measured -13% to +25% between the two
// by run (3-4 blocks of 5-8 runs did no better), so either form is kept (0.85x or 0.97x of TFLite
// int8 in the per-layer benchmark). The keep
// ratio is 2: a flushed timing of 1.2 MB of int8 weights (L3 at ~16 GB/s) adds ~70 us that those calls may not pay (the same layer at W2A2: 132
// us flushed against compact weights' 71, 51.5 against 55 back to back).
// N2UQ_PLAN_TRIAL=0 turns the trial off, =all keeps every runner-up whatever its time (tests).
constexpr double kTrialKeepRatio = 2.0;
constexpr double kTrialSwitchRatio = 0.95;
constexpr int kTrialRuns = 5;
constexpr int kTrialBlocks = 2;  // per side, alternating: winner, runner-up, winner, runner-up
// n2uq_plan_trial_runs: 2 * kTrialBlocks * (kTrialRuns + 1) = 24 runs.

struct SelectionKey {
  int32_t fields[17];
  int isa, threads;
  bool operator<(const SelectionKey& o) const {
    return std::memcmp(this, &o, sizeof(*this)) < 0;
  }
};

// A shape's answer: the winner, and the runner-up while a trial of it is open (else -1).
struct Selection {
  int winner = 0, rival = -1;
};

std::mutex g_selection_mutex;
std::map<SelectionKey, Selection>& selections() {
  static std::map<SelectionKey, Selection>* cache = new std::map<SelectionKey, Selection>();  // never destroyed
  return *cache;
}

// N2UQ_PLAN_TRIAL: 0 (off), 1 (default: runner-ups within kTrialKeepRatio), 2 ("all").
int trial_mode() {
  const char* env = std::getenv("N2UQ_PLAN_TRIAL");
  if (env != nullptr && std::strcmp(env, "0") == 0) return 0;
  if (env != nullptr && std::strcmp(env, "all") == 0) return 2;
  return 1;
}

bool select_log() {
  const char* log = std::getenv("N2UQ_SELECT_LOG");
  return log != nullptr && std::strcmp(log, "1") == 0;
}

SelectionKey selection_key(const N2uqConvShape& s, int isa, int threads) {
  SelectionKey key;
  std::memset(&key, 0, sizeof(key));
  static_assert(sizeof(N2uqConvShape) == sizeof(key.fields), "shape layout");
  std::memcpy(key.fields, &s, sizeof(s));
  key.isa = isa;
  key.threads = threads;
  return key;
}

// Deterministic pseudo-random codes packed as the conv input.
std::vector<uint64_t> calibration_input(int64_t words_needed) {
  std::vector<uint64_t> input(static_cast<size_t>(words_needed));
  uint64_t state = 0x9E3779B97F4A7C15ull;
  for (uint64_t& w : input) {
    state ^= state << 13;
    state ^= state >> 7;
    state ^= state << 17;
    w = state;
  }
  return input;
}

// ---------------------------------------------------------------- AMX availability

// The AMX GEMMs (hardware, or the model under the test hook) against the AVX-512 ones on a small
// conv whose tiles, input channels and output channels all leave partial tiles (Winograd: 18
// tiles in blocks of 9 at stride 1, 8 at stride 2; direct: 2 images of 6 x 8 and 3 x 4 virtual
// pixels, pairs past the last row; 80 channels: a 16-channel tail word; 40 output channels: 3
// vectors, the last half full, a chunk of 1 in the direct form), 2-bit codes, every form. Empty
// on a bit-exact match, else what differed.
std::string amx_self_check_form(const PathKernels* amx, int stride, bool winograd) {
  N2uqConvShape s{};
  s.batch = 2;
  s.in_height = s.in_width = 6;
  s.in_channels = 80;
  s.out_channels = 40;
  s.kernel_height = s.kernel_width = 3;
  s.stride_height = s.stride_width = stride;
  s.dilation_height = s.dilation_width = 1;
  s.pad_top = s.pad_bottom = s.pad_left = s.pad_right = 1;
  s.act_bits = s.weight_bits = 2;
  const int form = !winograd ? kWinoNone : stride == 1 ? kWinoStride1 : kWinoStride2;
  char err[256] = "";
  ConvSizes z;
  if (check_conv(&s, &z, err, sizeof err) != N2UQ_OK) return std::string("self-check shape: ") + err;
  const std::vector<uint64_t> input = calibration_input(z.input);
  std::vector<uint64_t> weights = calibration_input(z.weights + 7);
  weights.erase(weights.begin(), weights.begin() + 7);  // other bits than the input's
  const PathKernels* kernels[2] = {amx, avx512_dot_kernels()};
  std::vector<int32_t> out[2];
  for (int i = 0; i < 2; ++i) {
    N2uqConvPlanBody plan;
    plan.filter = s;
    plan.isa = N2UQ_ISA_AVX512;
    plan.path = i == 0 ? N2UQ_PATH_AMX : N2UQ_PATH_DOT;
    plan.table = table_for(N2UQ_ISA_AVX512);
    plan.kernels = kernels[i];
    out[i].assign(size_t(z.out), 0);
    if (prepare_weights(&plan, weights.data(), z.weights, 1, err, sizeof err, !winograd) != N2UQ_OK)
      return std::string("self-check weights: ") + err;
    if (plan.wino != form) {  // N2UQ_DOT_WINOGRAD=0 now need not hold later: check the AMX GEMM anyway
      plan.wino = form;
      if (form == kWinoStride1)
        build_wino_weights(s, weight_codes(s, weights.data()), plan.kernels->lanes, plan.dot_chunk_blocks,
                           plan.kernels->wino_quad_align, &plan.dot, &plan.wino_bias);
      else
        build_wino2_weights(s, weight_codes(s, weights.data()), plan.kernels->lanes, plan.dot_chunk_blocks,
                            &plan.dot, &plan.wino_bias);
    }
    if (run_plan(plan, &s, z.g, input.data(), nullptr, nullptr, nullptr, out[i].data(), 1, err, sizeof err) != N2UQ_OK)
      return std::string("self-check run: ") + err;
  }
  for (size_t i = 0; i < out[0].size(); ++i)
    if (out[0][i] != out[1][i]) {
      char what[160];
      std::snprintf(what, sizeof what, "the self-check differed from the AVX-512 dot path (%s form, stride %d) at "
                    "output %zu (%d vs %d)", winograd ? "Winograd" : "direct", stride, i, out[0][i], out[1][i]);
      return what;
    }
  return std::string();
}

std::string amx_self_check(const PathKernels* amx) {
  for (int stride = 1; stride <= 2; ++stride)
    for (bool winograd : {true, false}) {
      const std::string problem = amx_self_check_form(amx, stride, winograd);
      if (!problem.empty()) return problem;
    }
  return std::string();
}

struct AmxState {
  const PathKernels* kernels = nullptr;
  std::string status;
};

// Decided once per process: the environment's test hook, then the CPU and OS (CPUID, XCR0), the
// kernel's permission for the tile data state (Linux asks processes to request it), and the
// self-check.
const AmxState& amx_state() {
  static const AmxState state = [] {
    AmxState a;
    const CpuFeatures& f = cpu_features();
    const char* env = std::getenv("N2UQ_AMX_EMULATE");
    const bool emulate = env != nullptr && std::strcmp(env, "1") == 0;
    // The CPU first: the kernels' static tables are built by code compiled for AVX-512.
    if (!cpu_has(N2UQ_ISA_AVX512) || !f.avx512vnni) {
      a.status = "unavailable: the amx path needs the avx512 ISA with AVX-512 VNNI";
    } else if (amx_kernels(false) == nullptr) {
      a.status = "unavailable: not built for x86-64";
    } else if (emulate) {  // the self-check runs on the model too, so that tests reach it
      const std::string problem = amx_self_check(amx_kernels(true));
      if (problem.empty()) {
        a.kernels = amx_kernels(true);
        a.status = "emulated: N2UQ_AMX_EMULATE=1 runs the AMX code on a software model of the tile instructions "
                   "(a test hook); self-check passed";
      } else {
        a.status = "unavailable: emulated: " + problem;
      }
    } else if (!f.amx_int8) {
      a.status = "unavailable: the CPU or OS does not report AMX-TILE and AMX-INT8";
    } else {
#if defined(__x86_64__) && defined(__linux__)
      const long kReqXcompPerm = 0x1023, kXfeatureTileData = 18;  // ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA
      if (syscall(SYS_arch_prctl, kReqXcompPerm, kXfeatureTileData) != 0) {
        a.status = std::string("unavailable: arch_prctl(ARCH_REQ_XCOMP_PERM, XTILEDATA) failed: ") +
                   std::strerror(errno);
      } else {
        const std::string problem = amx_self_check(amx_kernels(false));
        if (problem.empty()) {
          a.kernels = amx_kernels(false);
          a.status = "available: AMX hardware, self-check passed";
        } else {
          a.status = "unavailable: " + problem;
        }
      }
#else
      a.status = "unavailable: requesting the AMX tile state is implemented for Linux only";
#endif
    }
    return a;
  }();
  return state;
}

const PathKernels* amx_path_kernels() { return amx_state().kernels; }

// A selection candidate: a path, and for dot and amx whether it runs its direct form where the
// shape has a Winograd one. Encoded as path + kDirectForm in the selection cache.
constexpr int kDirectForm = 1 << 8;
// And for the amx path's direct form, whether it keeps compact weights (ConvJob::compact_weights).
constexpr int kCompactWeights = 1 << 9;
// Compact weights are a candidate where the int8 weights reach this: they trade expanding every
// weight row once per group of two pairs (beside the tile work) for 2-8x fewer weight bytes to
// stream, which pays where the weights come from beyond L2 (7x7x512, 2.4 MB of int8: W2A2 139 -> 89
// us on the AMX Xeon; tflite_tools/README.md).
constexpr int64_t kCompactMinBytes = int64_t(512) << 10;

int make_candidate_plan(const N2uqConvShape& s, const ConvSizes& z, const uint64_t* weights, int isa, int candidate,
                        int num_threads, std::unique_ptr<N2uqConvPlanBody>* out, char* err, size_t err_len) {
  return make_plan(s, weights, z.weights, isa, candidate & ~(kDirectForm | kCompactWeights), num_threads, out, err,
                   err_len, (candidate & kDirectForm) != 0, (candidate & kCompactWeights) != 0);
}

// Writes back and evicts `bytes` at `data` from every cache level (no-op where the ISA has no
// user-level flush).
void flush_from_caches(const void* data, size_t bytes) {
  const char* p = static_cast<const char*>(data);
  for (size_t i = 0; i < bytes; i += 64) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_clflush(p + i);
#elif defined(__aarch64__)
    __asm__ __volatile__("dc civac, %0" : : "r"(p + i) : "memory");
#endif
  }
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_mfence();
#elif defined(__aarch64__)
  __asm__ __volatile__("dsb ish" : : : "memory");
#endif
}

// Calls fn(data, bytes) for each buffer a plan's runs read weights from.
template <class Fn>
void for_each_weight_buffer(const N2uqConvPlanBody& plan, Fn fn) {
  fn(plan.packed.data(), plan.packed.size() * sizeof(uint64_t));
  fn(plan.grouped.data(), plan.grouped.size() * sizeof(uint64_t));
  fn(plan.dot.data(), plan.dot.size());
  fn(plan.compact.data(), plan.compact.size());
  fn(plan.lut.data(), plan.lut.size());
  fn(plan.wino_bias.data(), plan.wino_bias.size() * sizeof(int32_t));
}

void flush_plan_weights(const N2uqConvPlanBody& plan) {
  for_each_weight_buffer(plan, [](const void* data, size_t bytes) { flush_from_caches(data, bytes); });
}

size_t plan_weight_bytes(const N2uqConvPlanBody& plan) {
  size_t total = 0;
  for_each_weight_buffer(plan, [&](const void*, size_t bytes) { total += bytes; });
  return total;
}

// Candidates are timed with their weights flushed when some candidate's weights exceed this: half
// the L2 of the cores measured (1-2 MB per core). Smaller weights mostly stay within L2 and L3 in
// a network, and flushing them would turn a warm per-layer benchmark's pick into a cold one's
// (28x28x128/2 W2A2 on Zen 5: bit-serial, 5% slower warm than the stride-2 Winograd form, whose
// 0.8 MB of weights cost about that much more from memory; in the network the two tied).
constexpr size_t kColdWeightBytes = size_t(1) << 20;

// A candidate's name in the selection's log lines.
std::string candidate_name(int candidate) {
  return std::string(n2uq_path_name(candidate & ~(kDirectForm | kCompactWeights))) +
         ((candidate & kDirectForm) ? " (direct form)" : "") + ((candidate & kCompactWeights) ? " (compact weights)" : "");
}

// A plan's bodies as selected: the winner, and the runner-up kept for a trial (or null).
struct Selected {
  std::unique_ptr<N2uqConvPlanBody> winner, rival;
  int winner_candidate = 0, rival_candidate = -1;
  SelectionKey key{};
};

int select_and_make_plan(const N2uqConvShape& s, const ConvSizes& z, const uint64_t* weights, int isa,
                         int num_threads, Selected* out, char* err, size_t err_len) {
  std::vector<int> candidates;
  for (int path = N2UQ_PATH_BITSERIAL; path < N2UQ_NUM_PATHS; ++path) {
    if (!path_available(isa, path)) continue;
    if (path == N2UQ_PATH_LUT && !lut_fits(s)) continue;
    candidates.push_back(path);
    const bool winograd =
        (path == N2UQ_PATH_DOT || path == N2UQ_PATH_AMX) && wino_form(s, path_kernels(isa, path)) != kWinoNone;
    if (winograd) candidates.push_back(path | kDirectForm);
    // The direct form's int8 weights: 32-channel chunks x taps x 64-channel words x 64 bytes per quad row.
    const int64_t direct_bytes = (int64_t(s.out_channels) + 31) / 32 * 32 * s.kernel_height * s.kernel_width *
                                 words_for(s.in_channels) * 64;
    if (path == N2UQ_PATH_AMX && compact_override() == -1 && direct_bytes >= kCompactMinBytes)
      candidates.push_back(path | kCompactWeights | (winograd ? kDirectForm : 0));
  }
  const SelectionKey key = selection_key(s, isa, num_threads);
  out->key = key;
  const int mode = trial_mode();
  {
    std::lock_guard<std::mutex> lock(g_selection_mutex);
    auto it = selections().find(key);
    if (it != selections().end()) {
      // Answered before: its runner-up too while that shape's trial is open (a network's layers
      // of one shape are all prepared before any of them runs).
      out->winner_candidate = it->second.winner;
      out->rival_candidate = mode == 0 ? -1 : it->second.rival;
      candidates.assign(1, it->second.winner);
    }
  }
  if (candidates.size() == 1) {
    out->winner_candidate = candidates[0];
    if (int rc = make_candidate_plan(s, z, weights, isa, candidates[0], num_threads, &out->winner, err, err_len))
      return rc;
    // The runner-up is optional: where it cannot be made (memory), the plan runs without a trial.
    int rival_rc = N2UQ_OK;
    if (out->rival_candidate >= 0) {
      try {
        rival_rc = make_candidate_plan(s, z, weights, isa, out->rival_candidate, num_threads, &out->rival, err,
                                       err_len);
      } catch (const std::bad_alloc&) {
        rival_rc = N2UQ_ERR_INTERNAL;
      }
    }
    if (rival_rc != N2UQ_OK) {
      out->rival.reset();
      out->rival_candidate = -1;
      if (err != nullptr && err_len > 0) err[0] = '\0';
    }
    return N2UQ_OK;
  }
  // The timing runs on one image of the batch when the whole batch's buffers would exceed
  // kCalibrationBytes (plans serve any batch); on a shape even one image of which exceeds it (a
  // corrupt file's, say), nothing is timed and the first candidate kept, allocating nothing big.
  N2uqConvShape timed = s;
  ConvSizes tz = z;
  auto too_big = [](const ConvSizes& c) { return c.input > kCalibrationBytes / 8 || c.out > kCalibrationBytes / 4; };
  if (too_big(tz) && s.batch > 1) {
    timed.batch = 1;
    if (int rc = check_conv(&timed, &tz, err, err_len)) return rc;
  }
  if (too_big(tz)) {
    out->winner_candidate = candidates[0];
    return make_candidate_plan(s, z, weights, isa, candidates[0], num_threads, &out->winner, err, err_len);
  }
  std::vector<std::unique_ptr<N2uqConvPlanBody>> plans(candidates.size());
  for (size_t i = 0; i < candidates.size(); ++i)
    if (int rc = make_candidate_plan(s, z, weights, isa, candidates[i], num_threads, &plans[i], err, err_len))
      return rc;
  const std::vector<uint64_t> input = calibration_input(tz.input);
  std::vector<int32_t> output(size_t(tz.out));
  // best and second-best time of each candidate: a minimum counts once another round came within
  // kConfirmRatio of it.
  std::vector<double> best(candidates.size(), 1e30), second(candidates.size(), 1e30);
  bool cold = false;
  for (const auto& plan : plans) cold = cold || plan_weight_bytes(*plan) > kColdWeightBytes;
  using clock = std::chrono::steady_clock;
  const auto start = clock::now();
  for (int round = 0; round <= kMaxRounds; ++round) {
    for (size_t i = 0; i < candidates.size(); ++i) {
      if (cold) flush_plan_weights(*plans[i]);
      const auto t0 = clock::now();
      if (int rc = run_plan(*plans[i], &timed, tz.g, input.data(), nullptr, nullptr, nullptr, output.data(),
                            num_threads, err, err_len))
        return rc;
      const double seconds = std::chrono::duration<double>(clock::now() - t0).count();
      if (round == 0) continue;  // warms up
      second[i] = std::min(second[i], std::max(best[i], seconds));
      best[i] = std::min(best[i], seconds);
    }
    const double elapsed = std::chrono::duration<double>(clock::now() - start).count();
    bool confirmed = true;
    for (size_t i = 0; i < candidates.size(); ++i) confirmed = confirmed && second[i] <= best[i] * kConfirmRatio;
    if (round >= kMinRounds && elapsed > kMinSeconds && (confirmed || elapsed > kMaxSeconds)) break;
  }
  size_t winner = 0;
  for (size_t i = 1; i < candidates.size(); ++i)
    if (best[i] < best[winner]) winner = i;
  size_t runner_up = winner == 0 ? 1 : 0;
  for (size_t i = 0; i < candidates.size(); ++i)
    if (i != winner && best[i] < best[runner_up]) runner_up = i;
  const bool trial = mode == 2 || (mode == 1 && best[runner_up] <= best[winner] * kTrialKeepRatio);
  if (select_log()) {
    std::fprintf(stderr, "n2uq path selection, %dx%dx%d -> %d, %dx%d /%d, W%dA%d, %d thread(s):", s.in_height,
                 s.in_width, s.in_channels, s.out_channels, s.kernel_height, s.kernel_width, s.stride_height,
                 s.weight_bits, s.act_bits, num_threads);
    for (size_t i = 0; i < candidates.size(); ++i)
      std::fprintf(stderr, " %s %.1f us%s", candidate_name(candidates[i]).c_str(), best[i] * 1e6,
                   i == winner ? " [chosen]" : trial && i == runner_up ? " [on trial]" : "");
    std::fprintf(stderr, "\n");
  }
  out->winner_candidate = candidates[winner];
  out->winner = std::move(plans[winner]);
  if (trial) {
    out->rival_candidate = candidates[runner_up];
    out->rival = std::move(plans[runner_up]);
  }
  {
    std::lock_guard<std::mutex> lock(g_selection_mutex);
    selections()[key] = Selection{out->winner_candidate, out->rival_candidate};
  }
  return N2UQ_OK;
}

}  // namespace

// The trial of a selection's runner-up (kTrialKeepRatio above) on a plan's first runs.
struct PlanTrial {
  std::mutex mutex;
  std::shared_ptr<const N2uqConvPlanBody> rival;
  int candidates[2] = {0, 0};  // the winner's and the runner-up's (selection cache, log)
  SelectionKey key{};
  int started[2] = {0, 0}, timed[2] = {0, 0};
  double best[2] = {1e30, 1e30};  // seconds per input pixel
};

namespace {

// Closes a trial (the caller holds its mutex): the runner-up becomes the body where it won, its
// reference is dropped either way (the last run still holding it frees it), the shape's cached
// answer becomes the verdict.
void close_trial(const N2uqConvPlan& plan, PlanTrial& t, bool switched, const char* why) {
  if (switched) std::atomic_store(&plan.body, t.rival);
  t.rival.reset();
  plan.trial_open.store(false, std::memory_order_release);
  {
    std::lock_guard<std::mutex> cache_lock(g_selection_mutex);
    selections()[t.key] = Selection{t.candidates[switched ? 1 : 0], -1};
  }
  if (select_log()) {
    const N2uqConvShape& s = plan.current()->filter;
    std::fprintf(stderr,
                 "n2uq plan trial, %dx%dx%d -> %d, %dx%d /%d, W%dA%d: %s %.2f ns, %s %.2f ns per input pixel "
                 "(best of %d runs each): kept %s%s\n",
                 s.in_height, s.in_width, s.in_channels, s.out_channels, s.kernel_height, s.kernel_width,
                 s.stride_height, s.weight_bits, s.act_bits, candidate_name(t.candidates[0]).c_str(), t.best[0] * 1e9,
                 candidate_name(t.candidates[1]).c_str(), t.best[1] * 1e9, kTrialBlocks * kTrialRuns,
                 candidate_name(t.candidates[switched ? 1 : 0]).c_str(), why);
  }
}

// Records one finished run of side 0 (the body) or 1 (the runner-up); after kTrialBlocks *
// kTrialRuns timed runs of each, keeps the faster and closes the trial.
void finish_trial_run(const N2uqConvPlan& plan, int side, double seconds_per_pixel) {
  PlanTrial& t = *plan.trial;
  std::lock_guard<std::mutex> lock(t.mutex);
  if (!plan.trial_open.load(std::memory_order_relaxed)) return;
  t.best[side] = std::min(t.best[side], seconds_per_pixel);
  ++t.timed[side];
  if (t.timed[0] < kTrialBlocks * kTrialRuns || t.timed[1] < kTrialBlocks * kTrialRuns) return;
  close_trial(plan, t, t.best[1] < t.best[0] * kTrialSwitchRatio, "");
}

// Runs fn(body) on the body this run gets: during a trial, the side whose block is due (blocks of
// kTrialRuns + 1 runs, each block's first run untimed), timed per input pixel; otherwise the
// plan's body.
template <class Fn>
int run_with_trial(const N2uqConvPlan& plan, int64_t pixels, Fn fn) {
  // No trial, or a closed one: the body is final (its last store happened before the close).
  if (!plan.trial_open.load(std::memory_order_acquire)) return fn(*plan.body);
  std::shared_ptr<const N2uqConvPlanBody> body;
  int side = -1;
  bool timed = false;
  {
    PlanTrial& t = *plan.trial;
    std::lock_guard<std::mutex> lock(t.mutex);
    if (plan.trial_open.load(std::memory_order_relaxed)) {
      // Run `started` of the trial: block started / (kTrialRuns + 1), its first run untimed.
      const int started = t.started[0] + t.started[1];
      side = started / (kTrialRuns + 1) % 2;
      timed = started % (kTrialRuns + 1) != 0;
      ++t.started[side];
      body = side == 0 ? plan.current() : t.rival;
    }
  }
  if (!body) body = plan.current();
  const auto t0 = std::chrono::steady_clock::now();
  const int rc = fn(*body);
  if (side == 1 && rc != N2UQ_OK && rc != N2UQ_ERR_ARGUMENT && rc != N2UQ_ERR_BUFFER) {
    // The runner-up could not run this call (a path's own limit, memory): the winner keeps the
    // plan, and runs the call. A failed run leaves nothing the caller passed in changed but the
    // outputs, which a run writes whole.
    {
      PlanTrial& t = *plan.trial;
      std::lock_guard<std::mutex> lock(t.mutex);
      if (plan.trial_open.load(std::memory_order_relaxed)) close_trial(plan, t, false, " (the runner-up failed a run)");
    }
    return fn(*plan.current());
  }
  if (side >= 0 && timed && rc == N2UQ_OK)
    finish_trial_run(plan, side,
                     std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() / double(pixels));
  return rc;
}


int create_plan(const N2uqConvShape* s, const uint64_t* weights, int64_t weights_len, int isa, int path,
                int num_threads, Selected* out, ConvSizes* sizes, char* err, size_t err_len) {
  ConvSizes z;
  if (int rc = check_conv(s, &z, err, err_len)) return rc;
  if (int rc = check_threads(num_threads, err, err_len)) return rc;
  if (int rc = check_buffer(weights, weights_len, z.weights, "weights", err, err_len)) return rc;
  const int resolved = resolve(isa, err, err_len);
  if (resolved < 0) return resolved;
  const int wanted = requested_path(path, err, err_len);
  if (wanted < 0) return wanted;
  if (sizes) *sizes = z;
  if (wanted == N2UQ_PATH_AUTO) return select_and_make_plan(*s, z, weights, resolved, num_threads, out, err, err_len);
  return make_plan(*s, weights, z.weights, resolved, wanted, num_threads, &out->winner, err, err_len);
}

// The checks of a plan's run on a shape and input (the outputs are the caller's to check).
int check_plan_run(const N2uqConvPlanBody& plan, const N2uqConvShape* s, const uint64_t* input, int64_t input_len,
                   int num_threads, ConvSizes* z, char* err, size_t err_len) {
  if (int rc = check_conv(s, z, err, err_len)) return rc;
  if (int rc = check_threads(num_threads, err, err_len)) return rc;
  N2UQ_CHECK(same_filter(*s, plan.filter), N2UQ_ERR_ARGUMENT,
             "the shape's filter (channels, kernel, strides, dilations, padding, bits) differs from the plan's");
  return check_buffer(input, input_len, z->input, "input", err, err_len);
}

int run_checked(const N2uqConvPlanBody& plan, const N2uqConvShape* s, const uint64_t* input, int64_t input_len,
                const float* multiplier, const float* bias, int64_t channels_len, float* out_float,
                int32_t* out_int32, int64_t out_len, int num_threads, char* err, size_t err_len,
                const QuantizeJob* input_quantize = nullptr) {
  ConvSizes z;
  if (int rc = check_plan_run(plan, s, input, input_len, num_threads, &z, err, err_len)) return rc;
  if (int rc = check_outputs(out_float, out_int32, out_len, z.out, multiplier, bias, channels_len, s->out_channels,
                             err, err_len))
    return rc;
  return run_plan(plan, s, z.g, input, multiplier, bias, out_float, out_int32, num_threads, err, err_len, nullptr,
                  input_quantize);
}

// Whether a plan applies an output stage in its own output pass: the amx path's direct form,
// for stages without a residual. The conv's epilogue runs between its tile work, mostly after it
// (the reorder buffer holds the epilogue of one pair, not more), so fusing saves the float output's
// round trip through L2 and the separate pass, and costs nothing else only while the epilogue is
// short: in ResNet-18 W2A2 on the AMX Xeon the convs with the RPReLU and quantize-and-pack ran
// 0.72-0.88x of their unfused time, those with the residual ADD, float output and two RPReLUs
// 1.12-1.15x (the separate pass streams the residual; the fused loop's cost grew faster than its
// step count). stage may be null (the plan's answer for stages without a residual).
bool plan_fuses_stage(const N2uqConvPlanBody& plan, const N2uqOutputStage* stage) {
  if (plan.path != N2UQ_PATH_AMX || plan.wino != 0 || plan.kernels == nullptr || plan.kernels->phased_run == nullptr ||
      !plan.kernels->fused_stage)
    return false;
  if (stage != nullptr)
    for (int i = 0; i < stage->num_steps; ++i)
      if (stage->steps[i].kind == N2UQ_STEP_ADD_TENSOR) return false;
  return true;
}

// The conv's float output for a stage the plan cannot fuse: per calling thread, grown to the
// largest layer it served.
AlignedVector<float>& stage_values_scratch() {
  static thread_local AlignedVector<float> values;
  return values;
}

int run_stage_checked(const N2uqConvPlanBody& plan, const N2uqConvShape* s, const uint64_t* input, int64_t input_len,
                      const float* multiplier, const float* bias, int64_t channels_len, const N2uqOutputStage* stage,
                      float* out_float, int64_t out_float_len, uint64_t* out_packed, int64_t out_packed_len,
                      uint8_t* out_codes, int64_t out_codes_len, int num_threads, char* err, size_t err_len,
                      const QuantizeJob* input_quantize = nullptr) {
  ConvSizes z;
  if (int rc = check_plan_run(plan, s, input, input_len, num_threads, &z, err, err_len)) return rc;
  if (int rc = check_buffer(multiplier, channels_len, s->out_channels, "multiplier", err, err_len)) return rc;
  if (int rc = check_buffer(bias, channels_len, s->out_channels, "bias", err, err_len)) return rc;
  const int64_t positions = z.out / s->out_channels;
  int64_t elements = 0;
  if (int rc = check_output_stage(stage, positions, s->out_channels, out_float, out_float_len, out_packed,
                                  out_packed_len, out_codes, out_codes_len, &elements, err, err_len))
    return rc;
  // The conv writes the whole float output before the stage reads its operands (unfused), or
  // earlier pairs' outputs before later pairs read them (fused), so none may share its memory.
  if (stage->float_after >= 0) {
    const auto apart = [&](const float* v, int64_t n) { return v + n <= out_float || out_float + elements <= v; };
    for (int i = 0; i < stage->num_steps; ++i) {
      const N2uqOutputStep& step = stage->steps[i];
      const int64_t needed = step_values_needed(step.kind, s->out_channels, elements);
      N2UQ_CHECK(needed == 0 || apart(step.values, needed), N2UQ_ERR_ARGUMENT, "step %d's %s overlaps out_float", i,
                 step.kind == N2UQ_STEP_ADD_TENSOR ? "residual" : "values");
    }
    N2UQ_CHECK(stage->quantize == N2UQ_QUANTIZE_NONE || apart(stage->thresholds, stage->num_thresholds),
               N2UQ_ERR_ARGUMENT, "the thresholds overlap out_float");
  }
  if (plan_fuses_stage(plan, stage)) {
    StageJob job{};
    job.num_steps = stage->num_steps;
    for (int i = 0; i < stage->num_steps; ++i) {
      job.kinds[i] = stage->steps[i].kind;
      job.values[i] = stage->steps[i].values;
    }
    job.float_after = stage->float_after;
    job.out_float = out_float;
    job.quantize = stage->quantize;
    if (stage->quantize != N2UQ_QUANTIZE_NONE)
      prepare_quantize_job(job.q, stage->thresholds, stage->num_thresholds, stage->bits, stage->beta1);
    job.q.channels = s->out_channels;
    job.q.words = int32_t(words_for(s->out_channels));
    job.q.out_packed = out_packed;
    job.q.out_codes = out_codes;
    return run_plan(plan, s, z.g, input, multiplier, bias, nullptr, nullptr, num_threads, err, err_len, &job,
                    input_quantize);
  }
  // Unfused: the conv's float output, then the stage over it in place (n2uq_output_stage reads each
  // chunk before it writes it). Into out_float wherever the stage writes one: a scratch buffer
  // between them was one more layer-sized stream (56x56x64 W2A2, direct form, with a residual
  // block's 7-step stage: 239 -> 184 us on 1 thread of the AMX Xeon; 28x28x128 147 -> 131 us).
  float* values = out_float;
  if (stage->float_after < 0) {
    AlignedVector<float>& scratch = stage_values_scratch();
    if (int rc = ensure(scratch, elements, "conv output", err, err_len)) return rc;
    values = scratch.data();
  }
  if (int rc = run_plan(plan, s, z.g, input, multiplier, bias, values, nullptr, num_threads, err, err_len, nullptr,
                        input_quantize))
    return rc;
  return n2uq_output_stage(stage, positions, s->out_channels, values, elements, out_float, out_float_len, out_packed,
                           out_packed_len, out_codes, out_codes_len, plan.isa, num_threads, err, err_len);
}

int conv_impl(const N2uqConvShape* s, const uint64_t* input, int64_t input_len, const uint64_t* weights,
              int64_t weights_len, const float* multiplier, const float* bias, int64_t channels_len, float* out_float,
              int32_t* out_int32, int64_t out_len, int isa, int path, int num_threads, char* err, size_t err_len) {
  // Validate the cheap arguments first so that bad calls fail before any weight work.
  ConvSizes z;
  if (int rc = check_conv(s, &z, err, err_len)) return rc;
  if (int rc = check_threads(num_threads, err, err_len)) return rc;
  if (int rc = check_buffer(input, input_len, z.input, "input", err, err_len)) return rc;
  if (int rc = check_buffer(weights, weights_len, z.weights, "weights", err, err_len)) return rc;
  if (int rc = check_outputs(out_float, out_int32, out_len, z.out, multiplier, bias, channels_len, s->out_channels,
                             err, err_len))
    return rc;
  Selected plan;
  if (int rc = create_plan(s, weights, weights_len, isa, path, num_threads, &plan, nullptr, err, err_len)) return rc;
  return run_plan(*plan.winner, s, z.g, input, multiplier, bias, out_float, out_int32, num_threads, err, err_len);
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

// Elements per quantize task at least: the AVX2 / AVX-512 paths take ~2-6 us for 32K
// floats, a few times what handing a task to a spinning pool worker costs, so smaller layers
// stay on one thread (7x7x512 at 2 threads took 23-34 us against 6-10 us on 1 with a
// 4096-element grain and yield-only spinning, loaded 2-core VM; with the pause-spin, 32K split
// 14x14x256 at 4 bits 6.4 -> 4.1 us and left 7x7x512 on one thread, Zen 5). The scalar path is
// ~30x slower per element and keeps 4096.
int64_t quantize_grain(int isa) {
  switch (isa) {
    case N2UQ_ISA_AVX2:
    case N2UQ_ISA_AVX512: return 32768;
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

}  // namespace

int int8_conv_geometry(const N2uqConvShape* shape, int64_t* out_height, int64_t* out_width, char* err,
                       size_t err_len) {
  N2UQ_CHECK(shape != nullptr, N2UQ_ERR_ARGUMENT, "shape is NULL");
  N2uqConvShape s = *shape;
  s.act_bits = s.weight_bits = 1;  // bytes, not codes: the checks below are the spatial ones
  ConvGeometry g;
  if (int rc = check_spatial(&s, false, &g, err, err_len)) return rc;
  *out_height = g.out_height;
  *out_width = g.out_width;
  return N2UQ_OK;
}

bool cpu_avx512_vnni() { return cpu_has(N2UQ_ISA_AVX512) && cpu_features().avx512vnni; }

bool cpu_avx512_vbmi() { return cpu_has(N2UQ_ISA_AVX512) && cpu_features().avx512vbmi; }

bool cpu_avx512_gfni() { return cpu_avx512_vbmi() && cpu_features().gfni; }

int amx_mode() {
  const PathKernels* k = amx_path_kernels();
  return k == nullptr ? 0 : k == amx_kernels(true) ? 2 : 1;
}

int requested_conv_path(int path, char* err, size_t err_len) { return requested_path(path, err, err_len); }
}  // namespace n2uq_core

using namespace n2uq_core;

N2uqConvPlan::~N2uqConvPlan() = default;

namespace {
// Whether a run of plan on shape (checked) with num_threads quantizes its input inside the conv
// (run_wino2_quantizing): the stride-2 Winograd form on kernels whose GEMMs take quantize work,
// whole tiles only (even output height and width), whole 64-channel words, two bands of two
// register blocks per thread at least, and on several threads the split of the tiles between
// them. N2UQ_QUANTIZE_INLINE=0 turns it off.
bool quantizes_inline(const N2uqConvPlanBody& plan, const N2uqConvShape& s, int num_threads) {
  const char* env = std::getenv("N2UQ_QUANTIZE_INLINE");
  if (env != nullptr && std::strcmp(env, "0") == 0) return false;
  if (plan.wino != kWinoStride2 || plan.kernels == nullptr || plan.kernels->side_prepare == nullptr ||
      plan.kernels->side_finish == nullptr || s.in_channels % 64 != 0)
    return false;
  char err[256];
  ConvGeometry g;
  if (check_spatial(&s, false, &g, err, sizeof err) != N2UQ_OK || g.out_height % 2 != 0 || g.out_width % 2 != 0)
    return false;
  // Two bands per thread at least (each of two register blocks): with one, nothing hides and two
  // threads quantize the rows their tiles share twice (28x28x128/2 W4A4, 2 threads: 55.4 us
  // against 54.7 quantizing first).
  const int64_t tiles = int64_t(s.batch) * (g.out_height / 2) * (g.out_width / 2);
  const int64_t threads = std::max(1, num_threads);
  if (tiles / threads < 4 * int64_t(wino_most_tiles(plan))) return false;
  return threads == 1 || wino_split_tiles();
}

// n2uq_conv_plan_run_quantizing's checks of the quantizer and the codes buffer, and its job.
int check_input_quantizer(const N2uqConvShape* s, const N2uqInputQuantizer* q, const uint64_t* packed,
                          int64_t packed_len, QuantizeJob* job, char* err, size_t err_len) {
  N2UQ_CHECK(s != nullptr, N2UQ_ERR_ARGUMENT, "shape is NULL");
  N2UQ_CHECK(q != nullptr, N2UQ_ERR_ARGUMENT, "quantizer is NULL");
  ConvSizes z;
  if (int rc = check_conv(s, &z, err, err_len)) return rc;
  if (int rc = check_thresholds(q->thresholds, q->num_thresholds, s->act_bits, err, err_len)) return rc;
  const int64_t elements = int64_t(s->batch) * s->in_height * s->in_width * s->in_channels;
  if (int rc = check_buffer(q->x, q->x_len, elements, "x", err, err_len)) return rc;
  if (packed != nullptr)
    if (int rc = check_buffer(packed, packed_len, z.input, "packed", err, err_len)) return rc;
  *job = QuantizeJob{};
  job->x = q->x;
  job->channels = s->in_channels;
  job->words = int32_t(words_for(s->in_channels));
  prepare_quantize_job(*job, q->thresholds, q->num_thresholds, s->act_bits, q->beta1);
  return N2UQ_OK;
}

// One run of n2uq_conv_plan_run_quantizing on body: the codes inside the conv where
// quantizes_inline holds and the caller keeps none, else quantize-and-pack first (into packed, or
// scratch); then run(codes, their length, the inline quantizer or null).
template <class Run>
int run_quantizing(const N2uqConvPlanBody& body, const N2uqConvShape* s, const QuantizeJob& q, uint64_t* packed,
                   int num_threads, char* err, size_t err_len, Run run) {
  ConvSizes z;
  if (int rc = check_conv(s, &z, err, err_len)) return rc;
  if (int rc = check_threads(num_threads, err, err_len)) return rc;
  uint64_t* codes = packed;
  if (codes == nullptr) {
    Scratch& scratch_buffers = scratch();
    if (int rc = ensure(scratch_buffers.input_codes, z.input, "packed input", err, err_len)) return rc;
    codes = scratch_buffers.input_codes.data();
  }
  if (packed == nullptr && quantizes_inline(body, *s, num_threads)) return run(codes, z.input, &q);
  QuantizeJob job = q;
  job.out_packed = codes;
  const KernelTable* table = body.table;
  const int64_t positions = int64_t(s->batch) * s->in_height * s->in_width;
  parallel_ranges_static(num_threads, positions, quantize_grain(body.isa) / s->in_channels + 1,
                         [&](int64_t b, int64_t e) { table->quantize_and_pack(job, b, e); });
  return run(codes, z.input, nullptr);
}

// A run's work for the trial's per-pixel times: input pixels (the filter is the plan's); the shape
// is checked by the run, which a null one fails before any time is recorded.
int64_t trial_pixels(const N2uqConvShape* s) {
  return s == nullptr ? 1 : std::max<int64_t>(1, int64_t(s->batch) * s->in_height * s->in_width);
}
}  // namespace

extern "C" {

int n2uq_core_abi_version(void) { return N2UQ_CORE_ABI_VERSION; }

int n2uq_isa_supported(int isa) { return cpu_has(isa) ? 1 : 0; }

int n2uq_resolve_isa(int isa, char* err, size_t err_len) { return resolve(isa, err, err_len); }

const char* n2uq_path_name(int path) {
  switch (path) {
    case N2UQ_PATH_AUTO: return "auto";
    case N2UQ_PATH_BITSERIAL: return "bitserial";
    case N2UQ_PATH_DOT: return "dot";
    case N2UQ_PATH_LUT: return "lut";
    case N2UQ_PATH_AMX: return "amx";
    default: return "unknown";
  }
}

int n2uq_path_supported(int isa, int path) {
  return isa > N2UQ_ISA_AUTO && path > N2UQ_PATH_AUTO && path < N2UQ_NUM_PATHS && path_available(isa, path) ? 1 : 0;
}

const char* n2uq_cpu_features(void) {
  static const std::string names = [] {
    const CpuFeatures& f = cpu_features();
    std::string out;
    for (const FeatureName& n : kFeatureNames)
      if (f.*n.flag) out += (out.empty() ? "" : " ") + std::string(n.name);
    return out;
  }();
  return names.c_str();
}

const char* n2uq_amx_status(void) { return amx_state().status.c_str(); }

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
    parallel_ranges_static(num_threads, count, quantize_grain(resolved),
                           [&](int64_t b, int64_t e) { table->quantize_codes(job, b, e); });
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
    parallel_ranges_static(num_threads, num_positions, grain,
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

int n2uq_conv2d(const N2uqConvShape* shape, const uint64_t* input, int64_t input_len, const uint64_t* weights,
                int64_t weights_len, const float* multiplier, const float* bias, int64_t channels_len,
                float* out_float, int32_t* out_int32, int64_t out_len, int isa, int path, int num_threads,
                char* err, size_t err_len) {
  return guarded(err, err_len, [&]() -> int {
    return conv_impl(shape, input, input_len, weights, weights_len, multiplier, bias, channels_len, out_float,
                     out_int32, out_len, isa, path, num_threads, err, err_len);
  });
}

int n2uq_conv2d_bitserial(const N2uqConvShape* shape, const uint64_t* input, int64_t input_len,
                          const uint64_t* weights, int64_t weights_len, const float* multiplier, const float* bias,
                          int64_t channels_len, float* out_float, int32_t* out_int32, int64_t out_len, int isa,
                          int num_threads, char* err, size_t err_len) {
  return n2uq_conv2d(shape, input, input_len, weights, weights_len, multiplier, bias, channels_len, out_float,
                     out_int32, out_len, isa, N2UQ_PATH_AUTO, num_threads, err, err_len);
}

int n2uq_conv_plan_create(const N2uqConvShape* shape, const uint64_t* weights, int64_t weights_len, int isa,
                          int path, int num_threads, N2uqConvPlan** plan, char* err, size_t err_len) {
  return guarded(err, err_len, [&]() -> int {
    N2UQ_CHECK(plan != nullptr, N2UQ_ERR_ARGUMENT, "plan is NULL");
    *plan = nullptr;
    Selected made;
    if (int rc = create_plan(shape, weights, weights_len, isa, path, num_threads, &made, nullptr, err, err_len))
      return rc;
    std::unique_ptr<N2uqConvPlan> handle(new N2uqConvPlan);
    handle->body = std::shared_ptr<const N2uqConvPlanBody>(std::move(made.winner));
    if (made.rival) {
      handle->trial.reset(new PlanTrial);
      handle->trial->rival = std::shared_ptr<const N2uqConvPlanBody>(std::move(made.rival));
      handle->trial->candidates[0] = made.winner_candidate;
      handle->trial->candidates[1] = made.rival_candidate;
      handle->trial->key = made.key;
      handle->trial_open.store(true);
    }
    *plan = handle.release();
    return N2UQ_OK;
  });
}

int n2uq_conv_plan_run(const N2uqConvPlan* plan, const N2uqConvShape* shape, const uint64_t* input,
                       int64_t input_len, const float* multiplier, const float* bias, int64_t channels_len,
                       float* out_float, int32_t* out_int32, int64_t out_len, int num_threads, char* err,
                       size_t err_len) {
  return guarded(err, err_len, [&]() -> int {
    N2UQ_CHECK(plan != nullptr, N2UQ_ERR_ARGUMENT, "plan is NULL");
    return run_with_trial(*plan, trial_pixels(shape), [&](const N2uqConvPlanBody& body) {
      return run_checked(body, shape, input, input_len, multiplier, bias, channels_len, out_float, out_int32, out_len,
                         num_threads, err, err_len);
    });
  });
}

int n2uq_conv_plan_run_stage(const N2uqConvPlan* plan, const N2uqConvShape* shape, const uint64_t* input,
                             int64_t input_len, const float* multiplier, const float* bias, int64_t channels_len,
                             const N2uqOutputStage* stage, float* out_float, int64_t out_float_len,
                             uint64_t* out_packed, int64_t out_packed_len, uint8_t* out_codes, int64_t out_codes_len,
                             int num_threads, char* err, size_t err_len) {
  return guarded(err, err_len, [&]() -> int {
    N2UQ_CHECK(plan != nullptr, N2UQ_ERR_ARGUMENT, "plan is NULL");
    return run_with_trial(*plan, trial_pixels(shape), [&](const N2uqConvPlanBody& body) {
      return run_stage_checked(body, shape, input, input_len, multiplier, bias, channels_len, stage, out_float,
                               out_float_len, out_packed, out_packed_len, out_codes, out_codes_len, num_threads, err,
                               err_len);
    });
  });
}

int n2uq_conv_plan_run_quantizing(const N2uqConvPlan* plan, const N2uqConvShape* shape,
                                  const N2uqInputQuantizer* quantizer, uint64_t* packed, int64_t packed_len,
                                  const float* multiplier, const float* bias, int64_t channels_len,
                                  const N2uqOutputStage* stage, float* out_float, int64_t out_float_len,
                                  uint64_t* out_packed, int64_t out_packed_len, uint8_t* out_codes,
                                  int64_t out_codes_len, int num_threads, char* err, size_t err_len) {
  return guarded(err, err_len, [&]() -> int {
    N2UQ_CHECK(plan != nullptr, N2UQ_ERR_ARGUMENT, "plan is NULL");
    QuantizeJob q;
    if (int rc = check_input_quantizer(shape, quantizer, packed, packed_len, &q, err, err_len)) return rc;
    return run_with_trial(*plan, trial_pixels(shape), [&](const N2uqConvPlanBody& body) {
      return run_quantizing(body, shape, q, packed, num_threads, err, err_len,
                            [&](const uint64_t* codes, int64_t codes_len, const QuantizeJob* inline_q) {
                              if (stage == nullptr)
                                return run_checked(body, shape, codes, codes_len, multiplier, bias, channels_len,
                                                   out_float, nullptr, out_float_len, num_threads, err, err_len,
                                                   inline_q);
                              return run_stage_checked(body, shape, codes, codes_len, multiplier, bias, channels_len,
                                                       stage, out_float, out_float_len, out_packed, out_packed_len,
                                                       out_codes, out_codes_len, num_threads, err, err_len, inline_q);
                            });
    });
  });
}

int n2uq_conv_plan_quantizes_inline(const N2uqConvPlan* plan, const N2uqConvShape* shape, int num_threads) {
  if (plan == nullptr || shape == nullptr) return N2UQ_ERR_ARGUMENT;
  const std::shared_ptr<const N2uqConvPlanBody> body = plan->current();
  return same_filter(*shape, body->filter) && quantizes_inline(*body, *shape, num_threads) ? 1 : 0;
}

int n2uq_conv_plan_stage_fused(const N2uqConvPlan* plan) {
  if (plan == nullptr) return N2UQ_ERR_ARGUMENT;
  return plan_fuses_stage(*plan->current(), nullptr) ? 1 : 0;
}

int n2uq_conv_plan_info(const N2uqConvPlan* plan, int* isa, int* path) {
  if (plan == nullptr) return N2UQ_ERR_ARGUMENT;
  const std::shared_ptr<const N2uqConvPlanBody> body = plan->current();
  if (isa) *isa = body->isa;
  if (path) *path = body->path;
  return N2UQ_OK;
}

int n2uq_conv_plan_form(const N2uqConvPlan* plan) {
  if (plan == nullptr) return N2UQ_ERR_ARGUMENT;
  static_assert(N2UQ_FORM_WINOGRAD == kWinoStride1 && N2UQ_FORM_WINOGRAD_STRIDE2 == kWinoStride2,
                "the C API's form numbers are the plan's");
  const std::shared_ptr<const N2uqConvPlanBody> body = plan->current();
  return body->compact_bits != 0 ? N2UQ_FORM_DIRECT_COMPACT : body->wino;
}

int n2uq_conv_plan_on_trial(const N2uqConvPlan* plan) {
  if (plan == nullptr) return N2UQ_ERR_ARGUMENT;
  return plan->trial_open.load(std::memory_order_acquire) ? 1 : 0;
}

int n2uq_plan_trial_runs(void) { return 2 * kTrialBlocks * (kTrialRuns + 1); }

void n2uq_conv_plan_destroy(N2uqConvPlan* plan) { delete plan; }

int n2uq_fully_connected_shape(int32_t batch, int32_t in_features, int32_t out_features, int32_t act_bits,
                               int32_t weight_bits, N2uqConvShape* shape, char* err, size_t err_len) {
  N2UQ_CHECK(shape != nullptr, N2UQ_ERR_ARGUMENT, "shape is NULL");
  N2UQ_CHECK(batch >= 1, N2UQ_ERR_ARGUMENT, "batch must be >= 1, got %d", batch);
  N2UQ_CHECK(in_features >= 1, N2UQ_ERR_ARGUMENT, "in_features must be >= 1, got %d", in_features);
  N2UQ_CHECK(out_features >= 1, N2UQ_ERR_ARGUMENT, "out_features must be >= 1, got %d", out_features);
  // A 1x1 conv over a 1 x batch "image": the batch rows become the output pixels.
  std::memset(shape, 0, sizeof(*shape));
  shape->batch = 1;
  shape->in_height = 1;
  shape->in_width = batch;
  shape->in_channels = in_features;
  shape->out_channels = out_features;
  shape->kernel_height = shape->kernel_width = 1;
  shape->stride_height = shape->stride_width = 1;
  shape->dilation_height = shape->dilation_width = 1;
  shape->act_bits = act_bits;
  shape->weight_bits = weight_bits;
  return N2UQ_OK;
}

int n2uq_fully_connected(int32_t batch, int32_t in_features, int32_t out_features, int32_t act_bits,
                         int32_t weight_bits, const uint64_t* input, int64_t input_len, const uint64_t* weights,
                         int64_t weights_len, const float* multiplier, const float* bias, int64_t channels_len,
                         float* out_float, int32_t* out_int32, int64_t out_len, int isa, int num_threads, char* err,
                         size_t err_len) {
  N2uqConvShape shape;
  if (int rc = n2uq_fully_connected_shape(batch, in_features, out_features, act_bits, weight_bits, &shape, err,
                                          err_len))
    return rc;
  return n2uq_conv2d(&shape, input, input_len, weights, weights_len, multiplier, bias, channels_len, out_float,
                     out_int32, out_len, isa, N2UQ_PATH_AUTO, num_threads, err, err_len);
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

// ---------------------------------------------------------------- for output_stage.cc (core_internal.h)

namespace n2uq_core {

int resolve_isa(int isa, char* err, size_t err_len) { return resolve(isa, err, err_len); }

const KernelTable* isa_kernels(int isa) { return table_for(isa); }

void prepare_quantize_job(QuantizeJob& job, const float* thresholds, int32_t num_thresholds, int32_t bits,
                          float beta1) {
  job.bits = bits;
  job.num_thresholds = num_thresholds;
  fill_thresholds(job, thresholds, num_thresholds);
  job.beta1 = beta1;
}

int64_t quantize_task_elements(int isa) { return quantize_grain(isa); }

void run_ranges(int num_threads, int64_t count, int64_t grain, const std::function<void(int64_t, int64_t)>& fn) {
  parallel_ranges(num_threads, count, grain, fn);
}

}  // namespace n2uq_core
