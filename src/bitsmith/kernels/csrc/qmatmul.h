// bitsmith CPU kernels: matmul straight from the packed on-disk layout (formats/packing.py). This header
// holds what the units of that matmul share, internal to them (anonymous namespace, like step.h):
// qmatmul.cpp (the decode gemv: its float tiles in qmatmul_float.h, its int8-activation tiles in
// qmatmul_int8.h), dequant.cpp (the prefill's dequantization) and smallbatch.cpp (its zero-point term).
// Include it after every other header: its pragma holds for the rest of the including unit.
//
// Layout: each row of `in` codes is padded to a multiple of 8; every run of 8 codes is `bits` bytes,
// a little-endian bit stream with code i of the run in bits [i*bits, (i+1)*bits). Scales and zeros
// are fp16 [out, G] (zero in code units, may be fractional; symmetric codes use the midpoint).
//
// gemv (decode, few activation rows): per group,
//     y[t, o] += scale * (sum_i code_i * x[t, i] - zero * sum_i x[t, i])
// so the inner loop is only "widen codes to float, fused multiply-add"; the group sums of x are
// computed once per call. 4-bit codes are read 16 bytes (32 codes) at a time: the low nibbles are the
// even codes and the high nibbles the odd codes, so x is permuted once per call into
// [16 even | 16 odd] per 32-block instead of re-interleaving codes for every row.
//
// dequant (prefill): (code - zero) * scale for a block of rows into a float buffer, exactly the
// reference reconstruction, for a BLAS matmul done by the caller.
//
// Vector code is written once against a tiny `Vec` interface with AVX-512, AVX2+FMA and portable
// scalar implementations; -march=native picks one. Plain C ABI (called through ctypes) so it builds
// with a bare g++ in seconds; threads come from OpenMP, which resolves to the libgomp torch loaded.
#pragma once

#include <cstdint>
#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "gemv.h"

// No contraction of a * b + c into a fused multiply-add where the source does not write one: the
// compiler contracts (or not) per instantiation, so the scalar tails and zero-point terms of a row
// could round differently in a 4-row tile than alone (seen on AVX2, Zen 3: test_small_gemm), and
// speculative verification needs every row bit for bit what the single-row gemv computes. The
// vector code's FMAs are explicit intrinsics and unaffected.
// It holds for every unit that includes this header, from the include on (the units were one file
// under it).
#pragma GCC optimize("fp-contract=off")

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512DQ__)
#include <immintrin.h>
#define BS_SIMD 512
#elif defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define BS_SIMD 256
#else
#define BS_SIMD 0
#endif

namespace {

// The 64-bit word holding a run of 8 codes. The caller guarantees 8 readable bytes (the packed buffer
// carries 8 bytes of padding), and bits above 8*bits are masked away by every user.
inline uint64_t run_word(const uint8_t* row, int64_t run, int bits) {
  uint64_t w;
  std::memcpy(&w, row + run * bits, 8);
  return w;
}

inline uint32_t code_at(const uint8_t* row, int64_t i, int bits) {
  return (uint32_t)(run_word(row, i >> 3, bits) >> ((i & 7) * bits)) & ((1u << bits) - 1u);
}


// One vector of L float lanes and the few operations the kernels need, per instruction set.
#if BS_SIMD == 512
struct Vec {
  static constexpr int L = 16;
  typedef __m512 f;
  static f zero() { return _mm512_setzero_ps(); }
  static f load(const float* p) { return _mm512_loadu_ps(p); }
  static f fma(f a, f b, f c) { return _mm512_fmadd_ps(a, b, c); }
  static f add(f a, f b) { return _mm512_add_ps(a, b); }
  static f sub(f a, f b) { return _mm512_sub_ps(a, b); }
  static f mul(f a, f b) { return _mm512_mul_ps(a, b); }
  static void store(float* p, f a) { _mm512_storeu_ps(p, a); }
  static f set(float s) { return _mm512_set1_ps(s); }
  static float sum(f a) { return _mm512_reduce_add_ps(a); }
  static __m512i bytes(const uint8_t* p) { return _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)p)); }
  static f u8(const uint8_t* p) { return _mm512_cvtepi32_ps(bytes(p)); }  // L bytes -> L floats
  static void nibbles(const uint8_t* p, f& lo, f& hi) {                   // L bytes -> 2L codes
    __m512i b = bytes(p);
    lo = _mm512_cvtepi32_ps(_mm512_and_si512(b, _mm512_set1_epi32(0xF)));
    hi = _mm512_cvtepi32_ps(_mm512_srli_epi32(b, 4));
  }
  template <int BITS>
  static f codes(const uint8_t* row, int64_t i) {  // codes i .. i+L (i a multiple of 8): two runs
    const __m512i shifts = _mm512_set_epi64(7 * BITS, 6 * BITS, 5 * BITS, 4 * BITS, 3 * BITS, 2 * BITS, BITS, 0);
    const __m512i mask = _mm512_set1_epi64((1 << BITS) - 1);
    __m512i w0 = _mm512_set1_epi64((long long)run_word(row, i >> 3, BITS));
    __m512i w1 = _mm512_set1_epi64((long long)run_word(row, (i >> 3) + 1, BITS));
    __m256i c0 = _mm512_cvtepi64_epi32(_mm512_and_si512(_mm512_srlv_epi64(w0, shifts), mask));
    __m256i c1 = _mm512_cvtepi64_epi32(_mm512_and_si512(_mm512_srlv_epi64(w1, shifts), mask));
    return _mm512_cvtepi32_ps(_mm512_inserti64x4(_mm512_castsi256_si512(c0), c1, 1));
  }
};
#elif BS_SIMD == 256
struct Vec {
  static constexpr int L = 8;
  typedef __m256 f;
  static f zero() { return _mm256_setzero_ps(); }
  static f load(const float* p) { return _mm256_loadu_ps(p); }
  static f fma(f a, f b, f c) { return _mm256_fmadd_ps(a, b, c); }
  static f add(f a, f b) { return _mm256_add_ps(a, b); }
  static f sub(f a, f b) { return _mm256_sub_ps(a, b); }
  static f mul(f a, f b) { return _mm256_mul_ps(a, b); }
  static void store(float* p, f a) { _mm256_storeu_ps(p, a); }
  static f set(float s) { return _mm256_set1_ps(s); }
  static float sum(f a) { return bs::hsum8(a); }
  static __m256i bytes(const uint8_t* p) { return _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)p)); }
  static f u8(const uint8_t* p) { return _mm256_cvtepi32_ps(bytes(p)); }
  static void nibbles(const uint8_t* p, f& lo, f& hi) {
    __m256i b = bytes(p);
    lo = _mm256_cvtepi32_ps(_mm256_and_si256(b, _mm256_set1_epi32(0xF)));
    hi = _mm256_cvtepi32_ps(_mm256_srli_epi32(b, 4));
  }
  template <int BITS>
  static f codes(const uint8_t* row, int64_t i) {  // one run: 8 codes
    const __m256i lo_shifts = _mm256_set_epi64x(3 * BITS, 2 * BITS, BITS, 0);
    const __m256i hi_shifts = _mm256_set_epi64x(7 * BITS, 6 * BITS, 5 * BITS, 4 * BITS);
    __m256i w = _mm256_set1_epi64x((long long)run_word(row, i >> 3, BITS));
    __m256i lo = _mm256_srlv_epi64(w, lo_shifts);                      // codes 0..3 in 64-bit lanes
    __m256i hi = _mm256_slli_epi64(_mm256_srlv_epi64(w, hi_shifts), 32);  // codes 4..7, upper halves
    __m256i mixed = _mm256_blend_epi32(lo, hi, 0xAA);                  // dwords: 0 4 1 5 2 6 3 7
    __m256i ordered = _mm256_permutevar8x32_epi32(mixed, _mm256_setr_epi32(0, 2, 4, 6, 1, 3, 5, 7));
    return _mm256_cvtepi32_ps(_mm256_and_si256(ordered, _mm256_set1_epi32((1 << BITS) - 1)));
  }
};
#else
struct Vec {  // portable: one lane; the compiler may still vectorise the loops
  static constexpr int L = 1;
  typedef float f;
  static f zero() { return 0.f; }
  static f load(const float* p) { return *p; }
  static f fma(f a, f b, f c) { return a * b + c; }
  static f add(f a, f b) { return a + b; }
  static f sub(f a, f b) { return a - b; }
  static f mul(f a, f b) { return a * b; }
  static void store(float* p, f a) { *p = a; }
  static f set(float s) { return s; }
  static float sum(f a) { return a; }
  static f u8(const uint8_t* p) { return (float)*p; }
  static void nibbles(const uint8_t* p, f& lo, f& hi) {
    lo = (float)(*p & 0xF);
    hi = (float)(*p >> 4);
  }
  template <int BITS>
  static f codes(const uint8_t* row, int64_t i) { return (float)code_at(row, i, BITS); }
};
#endif
typedef Vec::f vf;
constexpr int L = Vec::L;

struct Weights {
  const uint8_t* packed;   // [out, row_bytes], readable 8 bytes past the end
  const uint16_t* scale;   // fp16 [out, groups]
  const uint16_t* zero;    // fp16 [out, groups] or null (symmetric)
  int64_t out, in, bits, group, groups, row_bytes;
  float mid;
  int64_t layout = bs::kNatural;  // kMixed3: dequant_row hands the row to mixed3.cpp
  float scale_at(int64_t o, int64_t g) const { return bs::half_to_float(scale[o * groups + g]); }
  float zero_at(int64_t o, int64_t g) const { return zero ? bs::half_to_float(zero[o * groups + g]) : mid; }
  // Row o's scales into s[0, groups) and zeros into z[0, groups), as floats.
  void row_params(int64_t o, float* s, float* z) const {
    int64_t g = 0;
#if defined(__F16C__)
    for (; g + 8 <= groups; g += 8) {
      _mm256_storeu_ps(s + g, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(scale + o * groups + g))));
      if (zero) _mm256_storeu_ps(z + g, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(zero + o * groups + g))));
    }
#endif
    for (; g < groups; ++g) {
      s[g] = scale_at(o, g);
      if (zero) z[g] = zero_at(o, g);
    }
    if (!zero)
      for (g = 0; g < groups; ++g) z[g] = mid;
  }
};

// The zero-point term of one row: sum_g scale_g * zero_g * xsum_g, in vector lanes (a serial scalar
// chain here cost as much as the codes).
inline float zero_offset(const float* sc, const float* zr, const float* xs, int64_t groups) {
  vf off = Vec::zero();
  int64_t g = 0;
  for (; g + L <= groups; g += L) off = Vec::fma(Vec::mul(Vec::load(sc + g), Vec::load(zr + g)), Vec::load(xs + g), off);
  float offset = Vec::sum(off);
  for (; g < groups; ++g) offset += sc[g] * zr[g] * xs[g];
  return offset;
}

void permute_for_4bit(const float* x, float* xp, int64_t in) {
  int64_t n = in / 32 * 32;
  for (int64_t b = 0; b < n; b += 32)
    for (int j = 0; j < 16; ++j) {
      xp[b + j] = x[b + 2 * j];
      xp[b + 16 + j] = x[b + 2 * j + 1];
    }
  for (int64_t i = n; i < in; ++i) xp[i] = x[i];
}

}  // namespace
