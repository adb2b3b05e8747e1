// The int8 convolution on AVX-512 VNNI (layout and arithmetic in kernel_table.h, Int8ConvJob):
// receptive-field rows with masked byte copies, VPDPBUSD over them, and XNNPACK's fp32
// requantization. Target options for this file only, no -march; int8_conv.cc calls in only when
// the CPU reports AVX-512 VNNI. The AMX blocks (isa_amx.cc) reuse the rows and the stores.
#if defined(__x86_64__)
#include <immintrin.h>
#include <stdint.h>
#include <string.h>

#include <new>

#include "kernel_table.h"

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512vnni")
#endif

namespace n2uq_core {
namespace {
namespace avx512_int8 {

inline __mmask64 byte_mask(int64_t n) { return n >= 64 ? ~__mmask64(0) : (__mmask64(1) << n) - 1; }

// n input bytes as row bytes (x ^ 0x80), whole 64-byte pieces and a masked tail: masked loads
// never touch memory outside the mask, so the last pixel of the input is read in bounds.
inline void copy_flipped(uint8_t* dst, const int8_t* src, int64_t n) {
  const __m512i flip = _mm512_set1_epi8(char(0x80));
  for (int64_t i = 0; i < n; i += 64) {
    const __mmask64 m = byte_mask(n - i);
    _mm512_mask_storeu_epi8(dst + i, m, _mm512_xor_si512(_mm512_maskz_loadu_epi8(m, src + i), flip));
  }
}

inline void fill(uint8_t* dst, uint8_t value, int64_t n) {
  const __m512i v = _mm512_set1_epi8(char(value));
  for (int64_t i = 0; i < n; i += 64) _mm512_mask_storeu_epi8(dst + i, byte_mask(n - i), v);
}

// The rows of pixels [q, q + count) of one output row (n, oh) from column ow0. Where a kernel
// row lies inside the image (dilation 1) its KW * C bytes are one copy; when they fit a 16-, 32-
// or 64-byte register, one unmasked load and store of that width (masked ones cost about 3x),
// in ascending kernel-row order so that each store's spill past its segment is overwritten by
// the next segment or lands in the padding bytes past K (which meet zero weights). WIDTH is chosen
// once per job so that the last kernel row's store stays inside the row (avx512_int8_rows); each
// load is checked per pixel against the end of the input (masked copy past it).
template <int WIDTH>
inline void copy_segment(uint8_t* dst, const int8_t* src) {
  if (WIDTH == 16) {
    _mm_storeu_si128((__m128i*)dst, _mm_xor_si128(_mm_loadu_si128((const __m128i*)src), _mm_set1_epi8(char(0x80))));
  } else if (WIDTH == 32) {
    _mm256_storeu_si256((__m256i*)dst,
                        _mm256_xor_si256(_mm256_loadu_si256((const __m256i*)src), _mm256_set1_epi8(char(0x80))));
  } else {
    _mm512_storeu_si512(dst, _mm512_xor_si512(_mm512_loadu_si512(src), _mm512_set1_epi8(char(0x80))));
  }
}

template <int WIDTH>
void row_pixels(const Int8ConvJob& j, int64_t n, int64_t oh, int64_t ow0, int64_t count, uint8_t* row) {
  const int64_t c = j.in_channels, seg = j.kernel_width * c, kp = j.k_padded;
  const int8_t* const input_end = j.input + j.batch * j.in_height * j.in_width * c;
  const int64_t ih0 = oh * j.stride_height - j.pad_top;
  for (int64_t i = 0; i < count; ++i, row += kp) {
    const int64_t iw0 = (ow0 + i) * j.stride_width - j.pad_left;
    const bool inside_w = j.dilation_width == 1 && iw0 >= 0 && iw0 + j.kernel_width <= j.in_width;
    uint8_t* dst = row;
    for (int64_t kh = 0; kh < j.kernel_height; ++kh, dst += seg) {
      const int64_t ih = ih0 + kh * j.dilation_height;
      if (ih < 0 || ih >= j.in_height) {
        fill(dst, j.pad_code, seg);
        continue;
      }
      const int8_t* src = j.input + (n * j.in_height + ih) * j.in_width * c;
      if (inside_w) {
        if (WIDTH > 0 && src + iw0 * c + WIDTH <= input_end)
          copy_segment<WIDTH>(dst, src + iw0 * c);
        else
          copy_flipped(dst, src + iw0 * c, seg);
        continue;
      }
      for (int64_t kw = 0; kw < j.kernel_width; ++kw) {
        const int64_t iw = iw0 + kw * j.dilation_width;
        if (iw < 0 || iw >= j.in_width)
          fill(dst + kw * c, j.pad_code, c);
        else
          copy_flipped(dst + kw * c, src + iw * c, c);
      }
    }
  }
}

// The requantized stores of one chunk (32 channels) of a pixel from its two int32 sum vectors
// (bias not yet added): as XNNPACK's qs8 fp32 requantization, float32 product, clamp, round to
// nearest even (MXCSR default), + zp. The clamp bounds values to [-255, 255], so the saturating
// packs (int32 -> int16, + zp, -> int8) are exact; they leave the bytes of each 128-bit lane as
// (4 of vector 0, 4 of vector 1) twice, which one dword permute puts in channel order.
struct ChunkStore {
  __m512i bias[2], zero_point;
  __m512 scale[2], lo, hi;
  __mmask32 mask;
  int64_t oc;
};

inline ChunkStore chunk_store(const Int8ConvJob& j, int64_t chunk) {
  ChunkStore k;
  k.oc = chunk * 32;
  const int64_t left = j.out_channels - k.oc;
  k.mask = left >= 32 ? ~__mmask32(0) : (__mmask32(1) << left) - 1;
  for (int r = 0; r < 2; ++r) {
    k.bias[r] = _mm512_loadu_si512(j.bias + k.oc + 16 * r);
    k.scale[r] = _mm512_loadu_ps(j.scale + k.oc + 16 * r);
  }
  k.zero_point = _mm512_set1_epi16(short(j.output_zero_point));
  k.lo = _mm512_set1_ps(j.min_less_zero_point);
  k.hi = _mm512_set1_ps(j.max_less_zero_point);
  return k;
}

inline void store_chunk(const Int8ConvJob& j, const ChunkStore& k, int64_t q, __m512i acc0, __m512i acc1) {
  __m512i v[2];
  const __m512i acc[2] = {acc0, acc1};
  for (int r = 0; r < 2; ++r) {
    const __m512 f = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(acc[r], k.bias[r])), k.scale[r]);
    v[r] = _mm512_cvtps_epi32(_mm512_min_ps(_mm512_max_ps(f, k.lo), k.hi));
  }
  const __m512i words = _mm512_adds_epi16(_mm512_packs_epi32(v[0], v[1]), k.zero_point);
  const __m512i bytes = _mm512_packs_epi16(words, words);
  const __m512i order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 0, 0, 0, 0, 0, 0, 0, 0);
  _mm256_mask_storeu_epi8(j.output + q * j.out_channels + k.oc, k.mask,
                          _mm512_castsi512_si256(_mm512_permutexvar_epi32(order, bytes)));
}

// VPDPBUSD over one block's rows (pixel p's K bytes at rows + p * stride, 32 rows readable):
// 8 pixels x 2 vectors of 16 channels in 16 accumulators; per quad two weight rows and 8
// broadcasts of the pixels' 4 row bytes. Stores pixels [q0, q0 + count).
void block(const Int8ConvJob& j, const uint8_t* rows, int64_t stride, int64_t q0, int64_t count) {
  const int64_t quads = j.k_padded / 4;
  for (int64_t chunk = 0; chunk < j.oc_chunks; ++chunk) {
    const int8_t* w = j.weights + chunk * (j.k_padded / 64) * 2048;
    for (int64_t p0 = 0; p0 < count; p0 += 8) {
      __m512i acc[8][2];
      for (int p = 0; p < 8; ++p) acc[p][0] = acc[p][1] = _mm512_setzero_si512();
      const int np = count - p0 < 8 ? int(count - p0) : 8;
      for (int64_t t = 0; t < quads; ++t) {
        // quad t: word t / 16, row t % 16 of each vector's tile
        const int8_t* wt = w + (t / 16) * 2048 + (t % 16) * 64;
        const __m512i w0 = _mm512_load_si512(wt), w1 = _mm512_load_si512(wt + 1024);
        for (int p = 0; p < 8; ++p) {
          int32_t quad;
          memcpy(&quad, rows + (p0 + p) * stride + 4 * t, 4);
          const __m512i x = _mm512_set1_epi32(quad);
          acc[p][0] = _mm512_dpbusd_epi32(acc[p][0], x, w0);
          acc[p][1] = _mm512_dpbusd_epi32(acc[p][1], x, w1);
        }
      }
      const ChunkStore k = chunk_store(j, chunk);
      for (int p = 0; p < np; ++p) store_chunk(j, k, q0 + p0 + p, acc[p][0], acc[p][1]);
    }
  }
}

void blocks(const Int8ConvJob& j, int64_t begin, int64_t end) {
  const size_t bytes = size_t(j.stack ? j.stack_bytes : kInt8BlockPixels * j.k_padded);
  uint8_t* a = static_cast<uint8_t*>(::operator new(bytes, std::align_val_t(64)));
  memset(a, 0, bytes);
  for (int64_t item = begin; item < end; ++item) {
    if (j.stack) {  // item: output row (n, oh)
      avx512_int8_stack_row(j, item / j.out_height, item % j.out_height, a, 0, int8_stack_vectors(j));
      const int64_t step = j.stride_width * j.kernel_height * j.in_channels;
      for (int64_t ow0 = 0; ow0 < j.out_width; ow0 += kInt8BlockPixels)
        block(j, a + ow0 * step, step, item * j.out_width + ow0,
              j.out_width - ow0 < kInt8BlockPixels ? j.out_width - ow0 : kInt8BlockPixels);
    } else {  // item: 32-pixel block
      const int64_t q0 = item * kInt8BlockPixels;
      avx512_int8_rows(j, q0, 0, kInt8BlockPixels, a);
      block(j, a, j.k_padded, q0, j.pixels - q0 < kInt8BlockPixels ? j.pixels - q0 : kInt8BlockPixels);
    }
  }
  ::operator delete(a, std::align_val_t(64));
}

}  // namespace avx512_int8
}  // namespace

void avx512_int8_rows(const Int8ConvJob& j, int64_t q0, int64_t p_begin, int64_t p_end, uint8_t* a) {
  using namespace avx512_int8;
  const int64_t end = q0 + p_end < j.pixels ? q0 + p_end : j.pixels;
  const int64_t seg = j.kernel_width * j.in_channels, last = (j.kernel_height - 1) * seg;
  // The widest unmasked copy a segment fits whose last store stays inside the row.
  const int width = seg <= 16 && last + 16 <= j.k_padded ? 16 : seg <= 32 && last + 32 <= j.k_padded ? 32
                    : seg <= 64 && last + 64 <= j.k_padded ? 64 : 0;
  const int64_t plane = j.out_height * j.out_width;
  for (int64_t q = q0 + p_begin; q < end;) {  // one output row's run at a time
    const int64_t n = q / plane, r = q - n * plane, oh = r / j.out_width, ow = r - oh * j.out_width;
    const int64_t count = j.out_width - ow < end - q ? j.out_width - ow : end - q;
    uint8_t* row = a + (q - q0) * j.k_padded;
    switch (width) {
      case 16: row_pixels<16>(j, n, oh, ow, count, row); break;
      case 32: row_pixels<32>(j, n, oh, ow, count, row); break;
      case 64: row_pixels<64>(j, n, oh, ow, count, row); break;
      default: row_pixels<0>(j, n, oh, ow, count, row); break;
    }
    q += count;
  }
}

void avx512_int8_store(const Int8ConvJob& j, int64_t q0, int64_t p_begin, int64_t p_end, const int32_t* z) {
  using namespace avx512_int8;
  if (!j.requant_saturates) {  // float clamps first (store_chunk), 32 channels at a time
    for (int64_t chunk = 0; chunk < j.oc_chunks; ++chunk) {
      const ChunkStore k = chunk_store(j, chunk);
      const int32_t* zc = z + chunk * 32 * 32;
      for (int64_t p = p_begin; p < p_end; ++p)
        store_chunk(j, k, q0 + p, _mm512_load_si512(zc + p * 32), _mm512_load_si512(zc + p * 32 + 16));
    }
    return;
  }
  // 64 channels (two chunks) per store. With every |scale| <= 0.5, |float(acc) * scale| <= 2^30,
  // so VCVTPS2DQ is exact (round to nearest even) and the saturating packs int32 -> int16, + zp,
  // int16 -> int8 give clamp(v + zp, -128, 127) (a value past int16 saturates to the same end
  // whatever zp adds); the activation's range, clamp(rne(f), lo, hi) = rne(clamp(f, lo, hi)) for
  // integer lo and hi, is then one byte max and min. The packs leave each 128-bit lane L as
  // v0[4L..4L+3], v1[4L..], v2[4L..], v3[4L..]; a dword permute puts the channels in order.
  const __m512i order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
  const __m512i zero_point = _mm512_set1_epi16(short(j.output_zero_point));
  const __m512i lo = _mm512_set1_epi8(char(int(j.min_less_zero_point) + j.output_zero_point));
  const __m512i hi = _mm512_set1_epi8(char(int(j.max_less_zero_point) + j.output_zero_point));
  for (int64_t pair = 0; pair * 2 < j.oc_chunks; ++pair) {
    const int64_t oc = pair * 64, left = j.out_channels - oc;
    const __mmask64 mask = left >= 64 ? ~__mmask64(0) : (__mmask64(1) << left) - 1;
    // An odd last chunk is paired with itself; its copy lands in the masked-off bytes.
    const int64_t second = 2 * pair + 1 < j.oc_chunks ? 2 * pair + 1 : 2 * pair;
    const int32_t* z0 = z + 2 * pair * 32 * 32;
    const int32_t* z1 = z + second * 32 * 32;
    __m512i bias[4];
    __m512 scale[4];
    for (int r = 0; r < 4; ++r) {
      const int64_t at = (r < 2 ? 2 * pair : second) * 32 + 16 * (r & 1);
      bias[r] = _mm512_loadu_si512(j.bias + at);
      scale[r] = _mm512_loadu_ps(j.scale + at);
    }
    for (int64_t p = p_begin; p < p_end; ++p) {
      const int32_t* acc[4] = {z0 + p * 32, z0 + p * 32 + 16, z1 + p * 32, z1 + p * 32 + 16};
      __m512i v[4];
      for (int r = 0; r < 4; ++r)
        v[r] = _mm512_cvtps_epi32(
            _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(_mm512_load_si512(acc[r]), bias[r])), scale[r]));
      const __m512i w01 = _mm512_adds_epi16(_mm512_packs_epi32(v[0], v[1]), zero_point);
      const __m512i w23 = _mm512_adds_epi16(_mm512_packs_epi32(v[2], v[3]), zero_point);
      const __m512i bytes = _mm512_permutexvar_epi32(order, _mm512_packs_epi16(w01, w23));
      _mm512_mask_storeu_epi8(j.output + (q0 + p) * j.out_channels + oc, mask,
                              _mm512_min_epi8(_mm512_max_epi8(bytes, lo), hi));
    }
  }
}

Int8ConvBlocksFn avx512_int8_conv_blocks() { return &avx512_int8::blocks; }

}  // namespace n2uq_core

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

// ---- The stacked rows (VPERMT2B: AVX-512 VBMI, which int8_conv.cc checks before choosing the form)

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx512bw,avx512vl,avx512vbmi"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512vbmi")
#endif

namespace n2uq_core {

// Bytes [lo, hi) of a 64-byte vector (clamped to it).
static inline __mmask64 byte_range(int64_t lo, int64_t hi) {
  lo = lo < 0 ? 0 : lo;
  hi = hi > 64 ? 64 : hi;
  if (hi <= lo) return 0;
  const __mmask64 upto_hi = hi >= 64 ? ~__mmask64(0) : (__mmask64(1) << hi) - 1;
  return upto_hi & ~((__mmask64(1) << lo) - 1);
}

// S for output row (n, oh), one 64-byte vector at a time: per kernel row inside the image, a
// 128-byte window of its input row (from column col_first - pad_left, where the vector's first
// column col_first starts) permuted into place and merged under that row's byte mask; bytes of
// rows or columns outside the image keep the input zero point. Then x ^ 0x80 for all. The rows
// inside the image are listed once per call and (col_first, phase) advance by 64 bytes per vector
// without a division, and interior vectors are those whose indexed bytes lie in the row (a
// window may run past it): with a division, the row arithmetic and masked loads per vector, a
// ResNet stem's 112 rows took 73 us (about 30 cycles per vector of 7 permutes), now 54 us.
void avx512_int8_stack_row(const Int8ConvJob& j, int64_t n, int64_t oh, uint8_t* s, int64_t v_begin, int64_t v_end) {
  const int64_t c = j.in_channels, kh_count = j.kernel_height, khc = kh_count * c, row_bytes = j.in_width * c;
  const int64_t vectors = v_end < int8_stack_vectors(j) ? v_end : int8_stack_vectors(j);
  if (v_begin >= vectors) return;
  const uintptr_t image = uintptr_t(j.input + n * j.in_height * row_bytes);
  uintptr_t starts[256];   // per kernel row inside the image: its input row's first byte (khc <= 256)
  int64_t kernel_rows[256];  // and that kernel row
  int64_t inside_rows = 0;
  for (int64_t kh = 0; kh < kh_count; ++kh) {
    const int64_t ih = oh * j.stride_height - j.pad_top + kh * j.dilation_height;
    if (ih < 0 || ih >= j.in_height) continue;
    starts[inside_rows] = image + uintptr_t(ih * row_bytes);
    kernel_rows[inside_rows++] = kh;
  }
  // A vector is interior when every byte its index reads lies in the row (stack_reach) and whole
  // windows load inside the input: past a row's end they read the next row, which no index selects.
  const uintptr_t input_end = uintptr_t(j.input + j.batch * j.in_height * row_bytes);
  const uintptr_t last_start = inside_rows > 0 ? starts[inside_rows - 1] : image;
  const __m512i zero_point = _mm512_set1_epi8(char(j.pad_code ^ 0x80)), flip = _mm512_set1_epi8(char(0x80));
  const int64_t column_step = 64 / khc, phase_step = 64 % khc;
  int64_t col_first = 64 * v_begin / khc, phase = 64 * v_begin - col_first * khc;
  for (int64_t v = v_begin; v < vectors; ++v) {
    const int64_t base = (col_first - j.pad_left) * c;  // window start in the input row, in bytes
    const __m512i index = _mm512_loadu_si512(j.stack_index + phase * 64);
    const uint64_t* masks = j.stack_masks + phase * kh_count;
    __m512i out = zero_point;
    if (base >= 0 && base + j.stack_reach <= row_bytes && last_start + base + j.stack_window <= input_end) {
      if (j.stack_window == 64) {  // every index < 64: one window register, a one-table VPERMB per row
        for (int64_t i = 0; i < inside_rows; ++i) {
          const __m512i lo = _mm512_loadu_si512(reinterpret_cast<const void*>(starts[i] + base));
          out = _mm512_mask_permutexvar_epi8(out, masks[kernel_rows[i]], index, lo);
        }
      } else {
        for (int64_t i = 0; i < inside_rows; ++i) {
          const __m512i lo = _mm512_loadu_si512(reinterpret_cast<const void*>(starts[i] + base));
          const __m512i hi = _mm512_loadu_si512(reinterpret_cast<const void*>(starts[i] + base + 64));
          out = _mm512_mask_mov_epi8(out, masks[kernel_rows[i]], _mm512_permutex2var_epi8(lo, index, hi));
        }
      }
    } else {
      // At the edges: only window bytes inside the row load, and only vector bytes reading them merge.
      const __mmask64 lo_load = byte_range(-base, row_bytes - base);
      const __mmask64 hi_load = byte_range(-base - 64, row_bytes - base - 64);
      const int64_t lo = base < 0 ? -base : 0, hi = row_bytes - base < 128 ? row_bytes - base : 128;
      const __mmask64 inside = hi <= lo ? 0
                                        : _mm512_cmpge_epu8_mask(index, _mm512_set1_epi8(char(lo))) &
                                              _mm512_cmplt_epu8_mask(index, _mm512_set1_epi8(char(hi)));
      for (int64_t i = 0; i < inside_rows; ++i) {
        const uintptr_t at = starts[i] + uintptr_t(base);  // may lie outside the row: masked
        const __m512i lo_bytes = _mm512_maskz_loadu_epi8(lo_load, reinterpret_cast<const void*>(at));
        const __m512i hi_bytes = _mm512_maskz_loadu_epi8(hi_load, reinterpret_cast<const void*>(at + 64));
        out = _mm512_mask_mov_epi8(out, masks[kernel_rows[i]] & inside,
                                   _mm512_permutex2var_epi8(lo_bytes, index, hi_bytes));
      }
    }
    _mm512_store_si512(s + 64 * v, _mm512_xor_si512(out, flip));
    col_first += column_step;
    phase += phase_step;
    if (phase >= khc) {
      phase -= khc;
      ++col_first;
    }
  }
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
Int8ConvBlocksFn avx512_int8_conv_blocks() { return nullptr; }
}  // namespace n2uq_core

#endif
