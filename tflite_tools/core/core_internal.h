// What core.cc shares with the output stage (output_stage.cc), which lives in its own files:
// the ISA resolution, the per-ISA kernel tables, the quantize job set-up and the thread pool.
// Compiled without target options only (uses std::function).
#ifndef N2UQ_CORE_INTERNAL_H_
#define N2UQ_CORE_INTERNAL_H_

#include <stddef.h>
#include <stdint.h>

#include <exception>
#include <functional>
#include <new>
#include <vector>

#include "kernel_table.h"
#include "n2uq_core.h"

namespace n2uq_core {

// Writes the formatted message into err (when err_len > 0) and returns status: how every C API
// function of the core fails (N2UQ_FAIL / N2UQ_CHECK expect `err` and `err_len` in scope).
int report_error(char* err, size_t err_len, int status, const char* format, ...)
    __attribute__((format(printf, 4, 5)));
#define N2UQ_FAIL(status, ...) return ::n2uq_core::report_error(err, err_len, status, __VA_ARGS__)
#define N2UQ_CHECK(cond, status, ...)              \
  do {                                             \
    if (!(cond)) N2UQ_FAIL(status, __VA_ARGS__);   \
  } while (0)

// Vectors whose data start on a cache line: the kernels load 64-byte rows (zmm registers, AMX
// tile rows) at multiples of 64 bytes from these buffers, and a row that straddles two lines
// costs two (the amx path's tile loads ran up to 1.4x slower, varying with malloc's placement).
template <class T>
struct CacheLineAllocator {
  typedef T value_type;
  CacheLineAllocator() = default;
  template <class U>
  CacheLineAllocator(const CacheLineAllocator<U>&) {}
  T* allocate(size_t n) { return static_cast<T*>(::operator new(n * sizeof(T), std::align_val_t(64))); }
  void deallocate(T* p, size_t) { ::operator delete(p, std::align_val_t(64)); }
  template <class U>
  bool operator==(const CacheLineAllocator<U>&) const { return true; }
  template <class U>
  bool operator!=(const CacheLineAllocator<U>&) const { return false; }
};
template <class T>
using AlignedVector = std::vector<T, CacheLineAllocator<T>>;

// Wraps an API body so that no C++ exception crosses the C boundary.
template <class F>
int guarded(char* err, size_t err_len, F&& body) {
  try {
    return body();
  } catch (const std::bad_alloc&) {
    return report_error(err, err_len, N2UQ_ERR_INTERNAL, "out of memory");
  } catch (const std::exception& e) {
    return report_error(err, err_len, N2UQ_ERR_INTERNAL, "internal error: %s", e.what());
  } catch (...) {
    return report_error(err, err_len, N2UQ_ERR_INTERNAL, "internal error");
  }
}

// The concrete ISA `isa` resolves to (N2UQ_ISA_AUTO: env or best), or a negative status.
int resolve_isa(int isa, char* err, size_t err_len);
// The kernel table of a concrete, supported ISA.
const KernelTable* isa_kernels(int isa);
// Fills a QuantizeJob's thresholds table, bit count and beta1 (validated by the caller).
void prepare_quantize_job(QuantizeJob& job, const float* thresholds, int32_t num_thresholds, int32_t bits,
                          float beta1);
// Elements per quantize task at least, for a concrete ISA.
int64_t quantize_task_elements(int isa);
// Splits [0, count) over the pool's threads in ranges of at least `grain`.
void run_ranges(int num_threads, int64_t count, int64_t grain, const std::function<void(int64_t, int64_t)>& fn);

// For the int8 conv (int8_conv.cc): the output size of a shape (validated as a conv's, its bit
// widths ignored), whether the CPU has AVX-512 VNNI, the amx path's state (0: unavailable, 1: AMX
// hardware, 2: the software model of N2UQ_AMX_EMULATE=1) and a requested path (AUTO: the
// environment's N2UQ_KERNEL_PATH, if set).
int int8_conv_geometry(const N2uqConvShape* shape, int64_t* out_height, int64_t* out_width, char* err,
                       size_t err_len);
bool cpu_avx512_vnni();
bool cpu_avx512_vbmi();
int amx_mode();
int requested_conv_path(int path, char* err, size_t err_len);

// The values a stage step reads: per channel (ADD, MUL, PRELU), the layer's elements (ADD_TENSOR),
// or none (the ReLUs).
int64_t step_values_needed(int32_t kind, int64_t channels, int64_t elements);

// n2uq_output_stage's checks of a stage and its output buffers (not of the values it reads);
// *elements = num_positions * channels.
int check_output_stage(const N2uqOutputStage* stage, int64_t num_positions, int32_t channels, const float* out_float,
                       int64_t out_float_len, const uint64_t* out_packed, int64_t out_packed_len,
                       const uint8_t* out_codes, int64_t out_codes_len, int64_t* elements, char* err, size_t err_len);

// The output stage's rows (output_stage_impl.h: steps in registers, float output, final values),
// compiled once per ISA; the AVX2 / AVX-512 ones are null where the build is not for x86-64.
typedef void (*OutputRowsFn)(const N2uqOutputStage& stage, const float* values, float* out_float, float* out_final,
                             int64_t first_position, int64_t positions, int64_t channels);
OutputRowsFn output_rows_portable();
OutputRowsFn output_rows_avx2();
OutputRowsFn output_rows_avx512();

// The max pools' output rows [begin, end) of batch * out_height (pool_impl.h), compiled once per
// ISA; the AVX2 / AVX-512 ones are null where the build is not for x86-64.
struct PoolRowKernels {
  void (*float_rows)(const N2uqPoolShape& s, int64_t out_height, int64_t out_width, const float* input, float* output,
                     int64_t begin, int64_t end);
  void (*int8_rows)(const N2uqPoolShape& s, int64_t out_height, int64_t out_width, const int8_t* input,
                    int32_t zero_point, float scale, float* output, int64_t begin, int64_t end);
};
PoolRowKernels pool_rows_portable();
PoolRowKernels pool_rows_avx2();
PoolRowKernels pool_rows_avx512();

}  // namespace n2uq_core

#endif  // N2UQ_CORE_INTERNAL_H_
