// bitsmith CPU kernels: matmul straight from the packed on-disk layout (formats/packing.py).
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

// Partial sums over codes [start, start + width) of code * x[t][i]: full blocks into the vectors
// acc[2t], acc[2t+1] (two independent FMA chains, fresh per group), leftover codes into tail[t].
template <int TT>
inline void dot8(const uint8_t* row, int64_t start, int64_t width, const float* const* x, vf* acc, float* tail) {
  const uint8_t* p = row + start;
  int64_t n = width / (2 * L) * (2 * L), k = 0;
  for (; k < n; k += 2 * L) {
    vf w0 = Vec::u8(p + k), w1 = Vec::u8(p + k + L);
    for (int t = 0; t < TT; ++t) {
      acc[2 * t] = Vec::fma(w0, Vec::load(x[t] + start + k), acc[2 * t]);
      acc[2 * t + 1] = Vec::fma(w1, Vec::load(x[t] + start + k + L), acc[2 * t + 1]);
    }
  }
  for (; k < width; ++k)
    for (int t = 0; t < TT; ++t) tail[t] += (float)p[k] * x[t][start + k];
}

// xp: x permuted per 32-block into [16 even | 16 odd] (permute_for_4bit), matching the nibbles:
// byte j of a block holds code 2j (low) and code 2j+1 (high).
template <int TT>
inline void dot4(const uint8_t* row, int64_t start, int64_t width, const float* const* x, const float* const* xp,
                 vf* acc, float* tail) {
  const uint8_t* p = row + start / 2;
  int64_t n = width / 32 * 32, k = 0;
  for (; k < n; k += 32) {
    for (int h = 0; h < 16; h += L) {
      vf even, odd;
      Vec::nibbles(p + k / 2 + h, even, odd);
      for (int t = 0; t < TT; ++t) {
        acc[2 * t] = Vec::fma(even, Vec::load(xp[t] + start + k + h), acc[2 * t]);
        acc[2 * t + 1] = Vec::fma(odd, Vec::load(xp[t] + start + k + 16 + h), acc[2 * t + 1]);
      }
    }
  }
  for (; k < width; ++k) {
    float c = (float)((p[k >> 1] >> ((k & 1) * 4)) & 0xF);
    for (int t = 0; t < TT; ++t) tail[t] += c * x[t][start + k];
  }
}

// Any width: each run of 8 codes is one 64-bit word split into lanes by per-lane shifts.
template <int TT, int BITS>
inline void dot_runs(const uint8_t* row, int64_t start, int64_t width, const float* const* x, vf* acc,
                     float* tail) {
  int64_t n = width / (2 * L) * (2 * L), k = 0;
  for (; k < n; k += 2 * L) {
    vf w0 = Vec::codes<BITS>(row, start + k), w1 = Vec::codes<BITS>(row, start + k + L);
    for (int t = 0; t < TT; ++t) {
      acc[2 * t] = Vec::fma(w0, Vec::load(x[t] + start + k), acc[2 * t]);
      acc[2 * t + 1] = Vec::fma(w1, Vec::load(x[t] + start + k + L), acc[2 * t + 1]);
    }
  }
  for (; k < width; ++k) {
    float c = (float)code_at(row, start + k, BITS);
    for (int t = 0; t < TT; ++t) tail[t] += c * x[t][start + k];
  }
}

template <int TT>
inline void group_dot(const Weights& w, const uint8_t* row, int64_t start, int64_t width, const float* const* x,
                      const float* const* xp, vf* acc, float* tail) {
  switch (w.bits) {
    case 8: dot8<TT>(row, start, width, x, acc, tail); return;
    case 4: dot4<TT>(row, start, width, x, xp, acc, tail); return;
    case 2: dot_runs<TT, 2>(row, start, width, x, acc, tail); return;
    case 3: dot_runs<TT, 3>(row, start, width, x, acc, tail); return;
    case 5: dot_runs<TT, 5>(row, start, width, x, acc, tail); return;
    case 6: dot_runs<TT, 6>(row, start, width, x, acc, tail); return;
    default: dot_runs<TT, 7>(row, start, width, x, acc, tail); return;
  }
}

// y[t0 .. t0+TT, o] for one output row: sum_g scale_g * dot_g - sum_g scale_g * zero_g * xsum_g.
template <int TT>
void row_tile(const Weights& w, int64_t o, int64_t t0, const float* x, const float* xp, const float* xsum,
              const float* sc, const float* zr, float* y) {
  const float* xr[TT];
  const float* xpr[TT];
  vf total[TT];  // scale-weighted group dots, summed across lanes once at the end
  float offset[TT];
  for (int t = 0; t < TT; ++t) {
    xr[t] = x + (t0 + t) * w.in;
    xpr[t] = xp + (t0 + t) * w.in;
    total[t] = Vec::zero();
    offset[t] = 0.f;
  }
  const uint8_t* row = w.packed + o * w.row_bytes;
  for (int64_t g = 0; g < w.groups; ++g) {
    int64_t start = g * w.group;
    int64_t width = start + w.group <= w.in ? w.group : w.in - start;
    vf acc[2 * TT];
    float tail[TT];
    for (int t = 0; t < TT; ++t) {
      acc[2 * t] = acc[2 * t + 1] = Vec::zero();
      tail[t] = 0.f;
    }
    group_dot<TT>(w, row, start, width, xr, xpr, acc, tail);
    float s = sc[g], z = zr[g];
    for (int t = 0; t < TT; ++t) {
      total[t] = Vec::fma(Vec::set(s), Vec::add(acc[2 * t], acc[2 * t + 1]), total[t]);
      offset[t] += s * (z * xsum[(t0 + t) * w.groups + g] - tail[t]);
    }
  }
  for (int t = 0; t < TT; ++t) y[(t0 + t) * w.out + o] = Vec::sum(total[t]) - offset[t];
}

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

// 4-bit rows made only of whole groups that are whole 32-blocks (group % 32 == 0, in % group == 0):
// the common case (w4g32, w4g128) without the general path's per-group dispatch and tail handling.
// One fresh FMA chain per group, scaled into two alternating totals (so consecutive groups do not
// wait on each other); the zero-point term sum_g scale*zero*xsum is a separate loop over groups.
template <int TT>
void row_tile4(const Weights& w, int64_t o, int64_t t0, const float* xp, const float* xsum, const float* sc,
               const float* zr, float* y) {
  const float* xpr[TT];
  vf total[2 * TT];
  for (int t = 0; t < TT; ++t) {
    xpr[t] = xp + (t0 + t) * w.in;
    total[2 * t] = total[2 * t + 1] = Vec::zero();
  }
  const uint8_t* row = w.packed + o * w.row_bytes;
  const int64_t group = w.group;
  for (int64_t g = 0; g < w.groups; ++g) {
    const int64_t start = g * group;
    vf acc[TT];
    for (int t = 0; t < TT; ++t) acc[t] = Vec::zero();
    for (int64_t k = start; k < start + group; k += 32) {
      const uint8_t* p = row + k / 2;
      for (int h = 0; h < 16; h += L) {
        vf even, odd;
        Vec::nibbles(p + h, even, odd);
        for (int t = 0; t < TT; ++t) {
          acc[t] = Vec::fma(even, Vec::load(xpr[t] + k + h), acc[t]);
          acc[t] = Vec::fma(odd, Vec::load(xpr[t] + k + 16 + h), acc[t]);
        }
      }
    }
    const vf s = Vec::set(sc[g]);
    const int half = (int)(g & 1);
    for (int t = 0; t < TT; ++t) total[2 * t + half] = Vec::fma(acc[t], s, total[2 * t + half]);
  }
  for (int t = 0; t < TT; ++t)
    y[(t0 + t) * w.out + o] = Vec::sum(Vec::add(total[2 * t], total[2 * t + 1])) -
                              zero_offset(sc, zr, xsum + (t0 + t) * w.groups, w.groups);
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

// ---- 4- and 8-bit codes times int8 activations (decode) ------------------------------------------
// The float gemv above spends ~7 vector instructions per 16 bytes of 4-bit codes (widen, mask,
// shift, two conversions, two FMAs) and so runs compute-bound at about half the memory bandwidth.
// Like llama.cpp's Q4_0 x Q8_0 dot products, this path quantizes x once per call to int8 with one
// scale per block of 32 inputs (xs_b = max|x_b| / 127; small blocks keep an outlier channel from
// flattening its neighbours) and multiplies the unsigned codes into it with integer dot products
// (VNNI vpdpbusd; for 4-bit codes AVX2 maddubs + madd otherwise, which would saturate on 8-bit
// codes, so 8-bit needs VNNI). The result is the exact product of the dequantized weights with the
// int8-rounded x: a relative error of a few 1e-3 on y, the trade llama.cpp makes for every matmul.
// A caller passing int8 = 0 (bs_gemv, bs_decode_step) gets the exact float path instead.
//
// Prepared per call (prepare_int8): xq [T, in] int8; xv [T, in / 4] floats of per-lane x scales;
// xsum [T, groups] = sum over the group's blocks of xs_b * sum(xq_b), for the zero-point term.
// 4-bit: the 32 bytes of a 64-code chunk hold even codes in low nibbles and odd codes in high ones,
// so xq is stored per chunk as [32 even | 32 odd] and each int32 lane of the two dot products sums
// codes of one 32-block (lanes 0-3 the chunk's first block, 4-7 its second): xv holds, per chunk,
// [xs_b0 x4, xs_b1 x4]. 8-bit: xq in natural order, one dot product per 32-block, xv [xs_b x8].
#if BS_SIMD >= 256
#define BS_INT8 1
#if defined(__AVX512VNNI__) && defined(__AVX512VL__) || defined(__AVXVNNI__)
#define BS_VNNI 1
#else
#define BS_VNNI 0
#endif
inline __m256i dot_u8s8(__m256i acc, __m256i u, __m256i s) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
  return _mm256_dpbusd_epi32(acc, u, s);
#elif defined(__AVXVNNI__)
  return _mm256_dpbusd_avx_epi32(acc, u, s);
#else
  // 4-bit codes only: 15 * 127 * 2 < 32767, the pairwise i16 sums never saturate.
  return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1)));
#endif
}

using bs::load256;

#if !BS_VNNI
// 8-bit codes as code - 128 in int8, and the int32 lane sums (4 bytes each) of their products with x
// given |code - 128| (u) and code - 128 (b): maddubs(|b|, sign(x, b)) = b * x pairwise, no saturation.
inline __m256i signed8(__m256i codes) { return _mm256_xor_si256(codes, _mm256_set1_epi8((char)0x80)); }
inline __m256i dot_abs_sign(__m256i u, __m256i b, __m256i x) {
  return _mm256_madd_epi16(_mm256_maddubs_epi16(u, _mm256_sign_epi8(x, b)), _mm256_set1_epi16(1));
}
#endif

// Integer dot products of one 64-code 4-bit chunk (32 bytes at p) with xq at q.
inline __m256i chunk4(__m256i b, const int8_t* q) {
  const __m256i nib = _mm256_set1_epi8(0x0F);
  const __m256i lo = _mm256_and_si256(b, nib), hi = _mm256_and_si256(_mm256_srli_epi16(b, 4), nib);
#if BS_VNNI
  return dot_u8s8(dot_u8s8(_mm256_setzero_si256(), lo, load256(q)), hi, load256(q + 32));
#else  // both halves summed in int16 first (2 * 2 * 15 * 127 < 32767): one vpmaddwd, one add fewer
  const __m256i s = _mm256_add_epi16(_mm256_maddubs_epi16(lo, load256(q)), _mm256_maddubs_epi16(hi, load256(q + 32)));
  return _mm256_madd_epi16(s, _mm256_set1_epi16(1));
#endif
}

// Per row: total += sum over groups of scale_g * (sum over the group's chunks/blocks of x-scaled
// integer dots), lanes summed once at the end, minus the zero-point term.
template <int TT>
void row_tile_int8(const Weights& w, int64_t o, int64_t t0, const float* xv, const int8_t* xq, const float* xsum,
                   const float* sc, const float* zr, float* y) {
  const uint8_t* row = w.packed + o * w.row_bytes;
  const int64_t group = w.group, groups = w.groups, in = w.in;
#ifndef BS_ROWS_AHEAD
#define BS_ROWS_AHEAD 2
#endif
  // software prefetch of the row BS_ROWS_AHEAD rows on (see vbmi.cpp's BS_AHEAD: the streamers stop at
  // 4 KB boundaries); one request per cache line, a few per row
  for (int64_t b = 0; BS_ROWS_AHEAD > 0 && b < w.row_bytes; b += 64)
    _mm_prefetch((const char*)(row + BS_ROWS_AHEAD * w.row_bytes + b), _MM_HINT_T0);
  const int8_t* q[TT];
  const float* v[TT];
  __m256 total[TT];
  for (int t = 0; t < TT; ++t) {
    q[t] = xq + (t0 + t) * in;
    v[t] = xv + (t0 + t) * (in / 4);
    total[t] = _mm256_setzero_ps();
  }
  if (w.bits == 4 && group == 32) {  // a chunk spans two groups: per-lane weight scales
    for (int64_t g = 0; g < groups; g += 2) {
      const __m256i b = load256(row + g * 16);
      const __m256 s = _mm256_set_m128(_mm_set1_ps(sc[g + 1]), _mm_set1_ps(sc[g]));
      for (int t = 0; t < TT; ++t) {
        const __m256 f = _mm256_mul_ps(s, _mm256_loadu_ps(v[t] + g * 4));
        total[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(chunk4(b, q[t] + g * 32)), f, total[t]);
      }
    }
#if BS_SIMD == 256
  } else if (w.bits == 4) {  // group % 64 == 0: one flat loop over chunks, each scaled by its group's scale
    // (per-group inner loops of one or two chunks cost 20-40% more on Zen 3, session 20)
    const int64_t per = group / 64;
    for (int64_t c = 0, g = 0, left = per; c < in / 64; ++c) {
      const __m256i b = load256(row + c * 32);
      const __m256 s = _mm256_set1_ps(sc[g]);
      for (int t = 0; t < TT; ++t)
        total[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(chunk4(b, q[t] + c * 64)), _mm256_mul_ps(s, _mm256_loadu_ps(v[t] + c * 8)), total[t]);
      if (--left == 0) ++g, left = per;
    }
#endif
  } else {
    for (int64_t g = 0; g < groups; ++g) {
      __m256 f0[TT], f1[TT];  // two FMA chains, alternating chunks
      for (int t = 0; t < TT; ++t) f0[t] = f1[t] = _mm256_setzero_ps();
      const int64_t end = std::min((g + 1) * group, in);
      if (w.bits == 4) {
        int64_t k = g * group;
        for (; k + 128 <= end; k += 128) {
          const __m256i b0 = load256(row + k / 2), b1 = load256(row + k / 2 + 32);
          for (int t = 0; t < TT; ++t) {
            f0[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(chunk4(b0, q[t] + k)), _mm256_loadu_ps(v[t] + k / 8), f0[t]);
            f1[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(chunk4(b1, q[t] + k + 64)), _mm256_loadu_ps(v[t] + k / 8 + 8), f1[t]);
          }
        }
        if (k < end) {  // one 64-code chunk left (groups of 64, a partial last group)
          const __m256i b0 = load256(row + k / 2);
          for (int t = 0; t < TT; ++t)
            f0[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(chunk4(b0, q[t] + k)), _mm256_loadu_ps(v[t] + k / 8), f0[t]);
        }
      } else {
#if BS_VNNI
        int64_t k = g * group;
        for (; k + 64 <= end; k += 64) {
          const __m256i b0 = load256(row + k), b1 = load256(row + k + 32);
          for (int t = 0; t < TT; ++t) {
            const __m256i a0 = dot_u8s8(_mm256_setzero_si256(), b0, load256(q[t] + k));
            const __m256i a1 = dot_u8s8(_mm256_setzero_si256(), b1, load256(q[t] + k + 32));
            f0[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(a0), _mm256_loadu_ps(v[t] + k / 4), f0[t]);
            f1[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(a1), _mm256_loadu_ps(v[t] + k / 4 + 8), f1[t]);
          }
        }
        if (k < end) {  // one 32-block left
          const __m256i b0 = load256(row + k);
          for (int t = 0; t < TT; ++t) {
            const __m256i a0 = dot_u8s8(_mm256_setzero_si256(), b0, load256(q[t] + k));
            f0[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(a0), _mm256_loadu_ps(v[t] + k / 4), f0[t]);
          }
        }
#else
        // AVX2 without VNNI: maddubs would saturate on u8 codes, so the codes go in as code - 128 (int8)
        // and the product as |code - 128| (u8, <= 128) times x with the sign of code - 128: each i16 pair
        // sum is at most 2 * 128 * 127 < 32767, exact. The -128 offset is folded into the zero points
        // by the caller (gemv_rows: zero - 128), so the row's result is the same exact product.
        int64_t k = g * group;
        for (; k + 64 <= end; k += 64) {
          const __m256i b0 = signed8(load256(row + k)), b1 = signed8(load256(row + k + 32));
          const __m256i u0 = _mm256_abs_epi8(b0), u1 = _mm256_abs_epi8(b1);
          for (int t = 0; t < TT; ++t) {
            const __m256i a0 = dot_abs_sign(u0, b0, load256(q[t] + k));
            const __m256i a1 = dot_abs_sign(u1, b1, load256(q[t] + k + 32));
            f0[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(a0), _mm256_loadu_ps(v[t] + k / 4), f0[t]);
            f1[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(a1), _mm256_loadu_ps(v[t] + k / 4 + 8), f1[t]);
          }
        }
        if (k < end) {  // one 32-block left
          const __m256i b0 = signed8(load256(row + k)), u0 = _mm256_abs_epi8(b0);
          for (int t = 0; t < TT; ++t)
            f0[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot_abs_sign(u0, b0, load256(q[t] + k))),
                                    _mm256_loadu_ps(v[t] + k / 4), f0[t]);
        }
#endif
      }
      const __m256 s = _mm256_set1_ps(sc[g]);
      for (int t = 0; t < TT; ++t) total[t] = _mm256_fmadd_ps(_mm256_add_ps(f0[t], f1[t]), s, total[t]);
    }
  }
  for (int t = 0; t < TT; ++t) y[(t0 + t) * w.out + o] = bs::hsum8(total[t]) - zero_offset(sc, zr, xsum + (t0 + t) * groups, groups);
}
#else
#define BS_INT8 0
#define BS_VNNI 0
#endif

inline bool int8_ok(const bs::Matrix& m) {
  if (!BS_INT8 || !m.int8) return false;
  if (bs::vbmi_takes(m) || bs::avx2_takes(m)) return true;  // any width, vbmi.cpp; 2/3 bits, avx2_int8.cpp
  if (m.bits == 4) return m.in % 64 == 0 && (m.group == 32 || m.group % 64 == 0);
  return m.bits == 8 && m.in % 32 == 0 && m.group % 32 == 0;  // AVX2 without VNNI too (row_tile_int8)
}

#if BS_INT8
// One block of 32 x values to int8 (round half to even, as nearbyint) at its place in the row's xq
// layout; returns the sum of the codes and sets *scale = max|x| / 127.
inline int32_t quantize_block(const float* x, int64_t bits, int64_t b, int8_t* qr, float* scale) {
  const __m256 sign = _mm256_set1_ps(-0.f);
  __m256 v[4];
  __m256 mx = _mm256_setzero_ps();
  for (int i = 0; i < 4; ++i) {
    v[i] = _mm256_loadu_ps(x + 8 * i);
    mx = _mm256_max_ps(mx, _mm256_andnot_ps(sign, v[i]));
  }
  __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps(mx, 1));
  m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
  m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
  const float amax = _mm_cvtss_f32(m4);
  *scale = amax / 127.f;
  const __m256 inv = _mm256_set1_ps(amax > 0.f ? 127.f / amax : 0.f);
  __m256i q[4];
  for (int i = 0; i < 4; ++i) q[i] = _mm256_cvtps_epi32(_mm256_mul_ps(v[i], inv));  // MXCSR: nearest even
  const __m256i s4 = _mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3]));
  __m128i s2 = _mm_add_epi32(_mm256_castsi256_si128(s4), _mm256_extracti128_si256(s4, 1));
  s2 = _mm_add_epi32(s2, _mm_shuffle_epi32(s2, 0x4E));
  s2 = _mm_add_epi32(s2, _mm_shuffle_epi32(s2, 0xB1));
  // pack to 32 bytes in natural order: packs interleave 128-bit lanes, the permute undoes it
  const __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3]));
  __m256i bytes = _mm256_permutevar8x32_epi32(p, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
  const int64_t start = b * 32;
  if (bits == 4) {  // evens to [0, 16), odds to [16, 32), then into the chunk's halves
    const __m256i split = _mm256_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15,
                                           0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15);
    bytes = _mm256_permute4x64_epi64(_mm256_shuffle_epi8(bytes, split), 0xD8);  // qwords 0 2 1 3
    int8_t* chunk = qr + (start & ~(int64_t)63) + (b & 1) * 16;
    _mm_storeu_si128((__m128i*)chunk, _mm256_castsi256_si128(bytes));
    _mm_storeu_si128((__m128i*)(chunk + 32), _mm256_extracti128_si256(bytes, 1));
  } else {
    _mm256_storeu_si256((__m256i*)(qr + start), bytes);
  }
  return _mm_cvtsi128_si32(s2);
}
#endif

// xv [T, in / 4] floats, xq [T, in] int8 and xsum [T, groups] (layouts above).
#if BS_INT8
void prepare_int8(const bs::Matrix& m, const float* x, int64_t T, float* xsum, float* xv, int8_t* xq) {
  const int64_t groups = bs::gemv_groups(m), blocks = m.in / 32;
  const bool nibbles = m.bits == 4 && !bs::vbmi_takes(m);  // vbmi.cpp reads codes in natural order
  for (int64_t t = 0; t < T; ++t) {
    const float* xr = x + t * m.in;
    int8_t* qr = xq + t * m.in;
    float* vr = xv + t * (m.in / 4);
    for (int64_t g = 0; g < groups; ++g) xsum[t * groups + g] = 0.f;
    for (int64_t b = 0; b < blocks; ++b) {
      const int64_t start = b * 32;
      float scale;
      const int32_t sum = quantize_block(xr + start, nibbles ? 4 : 8, b, qr, &scale);
      if (nibbles) {  // chunk b / 2, lanes 0-3 (even b) or 4-7 (odd b)
        for (int l = 0; l < 4; ++l) vr[(b / 2) * 8 + (b & 1) * 4 + l] = scale;
      } else {
        for (int l = 0; l < 8; ++l) vr[b * 8 + l] = scale;
      }
      xsum[t * groups + start / m.group] += scale * (float)sum;
    }
  }
}
#endif

}  // namespace

namespace bs {

void gemv_prepare(const Matrix& m, const float* x, int64_t T, float* xsum, float* xp) {
  const int64_t groups = gemv_groups(m);
#if BS_INT8
  if (int8_ok(m)) {  // xp [T, in] floats hold xv [T, in / 4] floats then xq [T, in] bytes
    prepare_int8(m, x, T, xsum, xp, (int8_t*)(xp + T * (m.in / 4)));
    if (strided_takes(m) && (T == 1 || m.layout == kMixed3))  // the mixed layout reads permuted rows at any T
      for (int64_t t = 0; t < T; ++t) vbmi_permute(m, (int8_t*)(xp + T * (m.in / 4)) + t * m.in, xp + t * (m.in / 4));
    if (avx2_takes(m))
      for (int64_t t = 0; t < T; ++t) avx2_permute(m, (int8_t*)(xp + T * (m.in / 4)) + t * m.in, xp + t * (m.in / 4));
    return;
  }
#endif
  for (int64_t t = 0; t < T; ++t)
    for (int64_t g = 0; g < groups; ++g) {
      int64_t end = (g + 1) * m.group < m.in ? (g + 1) * m.group : m.in;
      float s = 0.f;
      for (int64_t i = g * m.group; i < end; ++i) s += x[t * m.in + i];
      xsum[t * groups + g] = s;
    }
  if (m.bits == 4)
    for (int64_t t = 0; t < T; ++t) permute_for_4bit(x + t * m.in, xp + t * m.in, m.in);
}

void gemv_rows(const Matrix& m, const float* x, const float* xp, const float* xs, int64_t T, float* y) {
  const Weights w{m.packed, m.scale, m.zero, m.out, m.in, m.bits, m.group, gemv_groups(m),
                  (m.in + 7) / 8 * m.bits, (float)((1 << m.bits) / 2)};
  if (m.bits != 4 && !int8_ok(m)) xp = x;
  const bool whole4 = m.bits == 4 && m.group % 32 == 0 && m.in % m.group == 0;
#if BS_INT8
  if (int8_ok(m) && vbmi_takes(m))  // before the scratch below: vbmi.cpp needs none (one malloc per thread per call)
    return vbmi_rows(m, xp, (const int8_t*)(xp + T * (m.in / 4)), xs, T, y);
  if (int8_ok(m) && avx2_takes(m)) return avx2_rows(m, xp, (const int8_t*)(xp + T * (m.in / 4)), xs, T, y);
#endif
  std::vector<float> params(2 * w.groups);  // this thread's row scales and zeros as floats
  float* sc = params.data();
  float* zr = sc + w.groups;
#if BS_INT8
  if (int8_ok(m)) {
    const int8_t* xq = (const int8_t*)(xp + T * (m.in / 4));
#pragma omp for schedule(static)
    for (int64_t o = 0; o < m.out; ++o) {
      w.row_params(o, sc, zr);
      if (m.bits == 8 && !BS_VNNI)  // row_tile_int8 multiplies code - 128 there
        for (int64_t g = 0; g < w.groups; ++g) zr[g] -= 128.f;
      int64_t t = 0;
      for (; t + 4 <= T; t += 4) row_tile_int8<4>(w, o, t, xp, xq, xs, sc, zr, y);
      switch (T - t) {
        case 3: row_tile_int8<3>(w, o, t, xp, xq, xs, sc, zr, y); break;
        case 2: row_tile_int8<2>(w, o, t, xp, xq, xs, sc, zr, y); break;
        case 1: row_tile_int8<1>(w, o, t, xp, xq, xs, sc, zr, y); break;
      }
    }
    return;
  }
#endif
#pragma omp for schedule(static)
  for (int64_t o = 0; o < m.out; ++o) {
    w.row_params(o, sc, zr);
    int64_t t = 0;
    if (whole4) {
      for (; t + 4 <= T; t += 4) row_tile4<4>(w, o, t, xp, xs, sc, zr, y);
      switch (T - t) {
        case 3: row_tile4<3>(w, o, t, xp, xs, sc, zr, y); break;
        case 2: row_tile4<2>(w, o, t, xp, xs, sc, zr, y); break;
        case 1: row_tile4<1>(w, o, t, xp, xs, sc, zr, y); break;
      }
      continue;
    }
    for (; t + 4 <= T; t += 4) row_tile<4>(w, o, t, x, xp, xs, sc, zr, y);
    switch (T - t) {
      case 3: row_tile<3>(w, o, t, x, xp, xs, sc, zr, y); break;
      case 2: row_tile<2>(w, o, t, x, xp, xs, sc, zr, y); break;
      case 1: row_tile<1>(w, o, t, x, xp, xs, sc, zr, y); break;
    }
  }
}

}  // namespace bs

namespace {

// Row o of the weights, (code - zero) * scale in float32, into dst [in]: the reference arithmetic.
// permuted (4-bit only): each full 32-block as [16 even | 16 odd] codes (see bs_dequant).
void dequant_row(const Weights& w, int64_t o, float* dst, bool permuted) {
  if (w.layout == bs::kMixed3)
    return bs::mixed3_dequant_row(bs::Matrix{w.packed, w.scale, w.zero, w.out, w.in, w.bits, w.group, true, w.layout}, o, dst);
  const int64_t in = w.in, group = w.group, bits = w.bits;
  const uint8_t* row = w.packed + o * w.row_bytes;
  for (int64_t g = 0; g < w.groups; ++g) {
    int64_t start = g * group;
    int64_t end = start + group < in ? start + group : in;
    float s = w.scale_at(o, g), z = w.zero_at(o, g);
    vf vs = Vec::set(s), vz = Vec::set(z);
    int64_t i = start;
    if (bits == 8) {
      for (; i + L <= end; i += L) Vec::store(dst + i, Vec::mul(Vec::sub(Vec::u8(row + i), vz), vs));
    } else if (bits == 4 && permuted) {
      for (; i + 32 <= end; i += 32)
        for (int h = 0; h < 16; h += L) {
          vf even, odd;
          Vec::nibbles(row + i / 2 + h, even, odd);
          Vec::store(dst + i + h, Vec::mul(Vec::sub(even, vz), vs));
          Vec::store(dst + i + 16 + h, Vec::mul(Vec::sub(odd, vz), vs));
        }
    } else if (bits == 4) {
      for (; i + 2 <= end; i += 2) {
        uint8_t b = row[i >> 1];
        dst[i] = ((float)(b & 0xF) - z) * s;
        dst[i + 1] = ((float)(b >> 4) - z) * s;
      }
    } else {
      for (; i + L <= end && L >= 8; i += L) {
        vf c;
        switch (bits) {
          case 2: c = Vec::codes<2>(row, i); break;
          case 3: c = Vec::codes<3>(row, i); break;
          case 5: c = Vec::codes<5>(row, i); break;
          case 6: c = Vec::codes<6>(row, i); break;
          default: c = Vec::codes<7>(row, i); break;
        }
        Vec::store(dst + i, Vec::mul(Vec::sub(c, vz), vs));
      }
    }
    for (; i < end; ++i) dst[i] = ((float)code_at(row, i, (int)bits) - z) * s;
  }
}

#if BS_SIMD == 512 && defined(__AVX512BF16__)
// 16 floats -> 16 bfloat16, round to nearest even (the same rounding as torch's .to(bfloat16)).
inline void store_bf16x16(uint16_t* p, __m512 v) { _mm256_storeu_si256((__m256i*)p, (__m256i)_mm512_cvtneps_pbh(v)); }
#endif

// One float -> bfloat16 bits, round to nearest even; NaN stays a (quiet) NaN.
inline uint16_t to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);
  return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

}  // namespace

extern "C" {

// y [T, out] = x [T, in] @ W^T for small T (decode).
// int8 != 0: 4- and 8-bit codes take the int8-activation path where this build and shape allow it.
void bs_gemv(const uint8_t* packed, const uint16_t* scale, const uint16_t* zero, int64_t out, int64_t in,
             int64_t bits, int64_t group, const float* x, int64_t T, float* y, int64_t threads, int64_t int8) {
  const bs::Matrix m = bs::abi_matrix(packed, scale, zero, out, in, bits, group, int8 != 0);
  std::vector<float> xsum(T * bs::gemv_groups(m), 0.f);
  std::vector<float> xp(T * in);  // 4-bit permuted x, or int8 x and its scales (T * in / 2 floats)
  bs::gemv_prepare(m, x, T, xsum.data(), xp.data());
#pragma omp parallel num_threads((int)threads)
  bs::gemv_rows(m, x, xp.data(), xsum.data(), T, y);
}

// buf [rows, in] = (code - zero) * scale for weight rows [row0, row0 + rows) (prefill), the same
// arithmetic as the reference. permuted != 0 (4-bit only) writes each full 32-block as
// [16 even | 16 odd] codes, the order nibbles come in; the caller permutes x the same way
// (bs_permute4), which leaves x @ W^T unchanged and saves interleaving the weights.
void bs_dequant(const uint8_t* packed, const uint16_t* scale, const uint16_t* zero, int64_t out, int64_t in,
                int64_t bits, int64_t group, int64_t row0, int64_t rows, float* buf, int64_t permuted,
                int64_t threads) {
  const int64_t layout = bits >> bs::kLayoutShift;  // the code width | layout << kLayoutShift (gemv.h)
  bits &= (1 << bs::kLayoutShift) - 1;
  Weights w{packed, scale, zero, out, in, bits, group, (in + group - 1) / group, (in + 7) / 8 * bits,
            (float)((1 << bits) / 2), layout};
#pragma omp parallel for schedule(static) num_threads((int)threads)
  for (int64_t r = 0; r < rows; ++r) dequant_row(w, row0 + r, buf + r * in, permuted != 0);
}

// The same rows rounded to bfloat16 (round to nearest even, as torch's .to(torch.bfloat16) of the
// float32 rows bs_dequant writes), for a bf16 matmul (AMX / AVX512-BF16 through oneDNN). Each row
// is made in float32 in a per-thread scratch row that stays in L1/L2, then narrowed.
void bs_dequant_bf16(const uint8_t* packed, const uint16_t* scale, const uint16_t* zero, int64_t out, int64_t in,
                     int64_t bits, int64_t group, int64_t row0, int64_t rows, uint16_t* buf, int64_t permuted,
                     int64_t threads) {
  const int64_t layout = bits >> bs::kLayoutShift;  // the code width | layout << kLayoutShift (gemv.h)
  bits &= (1 << bs::kLayoutShift) - 1;
  Weights w{packed, scale, zero, out, in, bits, group, (in + group - 1) / group, (in + 7) / 8 * bits,
            (float)((1 << bits) / 2), layout};
#pragma omp parallel num_threads((int)threads)
  {
    std::vector<float> row(in);
#pragma omp for schedule(static)
    for (int64_t r = 0; r < rows; ++r) {
      dequant_row(w, row0 + r, row.data(), permuted != 0);
      uint16_t* dst = buf + r * in;
      int64_t i = 0;
#if BS_SIMD == 512 && defined(__AVX512BF16__)
      for (; i + 16 <= in; i += 16) store_bf16x16(dst + i, _mm512_loadu_ps(row.data() + i));
#endif
      for (; i < in; ++i) dst[i] = to_bf16(row[i]);
    }
  }
}

// xp [T, in] = x [T, in] with every full 32-block permuted to [16 even | 16 odd].
void bs_permute4(const float* x, float* xp, int64_t T, int64_t in) {
  for (int64_t t = 0; t < T; ++t) permute_for_4bit(x + t * in, xp + t * in, in);
}

// xb [T, in] = x [T, in] rounded to bfloat16 (nearest even), each full 32-block permuted to
// [16 even | 16 odd] first when permuted != 0: the bf16 prefill's activations in one pass.
void bs_to_bf16(const float* x, uint16_t* xb, int64_t T, int64_t in, int64_t permuted) {
  std::vector<float> row(permuted ? in : 0);
  for (int64_t t = 0; t < T; ++t) {
    const float* src = x + t * in;
    if (permuted) {
      permute_for_4bit(src, row.data(), in);
      src = row.data();
    }
    uint16_t* dst = xb + t * in;
    int64_t i = 0;
#if BS_SIMD == 512 && defined(__AVX512BF16__)
    for (; i + 16 <= in; i += 16) store_bf16x16(dst + i, _mm512_loadu_ps(src + i));
#endif
    for (; i < in; ++i) dst[i] = to_bf16(src[i]);
  }
}

// dst[t * dst_stride + j] = src[t * cols + j] widened from bfloat16 to float32 (exact: the bits shifted
// up), for t < rows, j < cols: the bf16 prefill's block product [T, n] into its columns of the float32
// output. torch's strided copy of the same ran at ~4 ns per element (17% of Qwen2.5-1.5B's prefill).
void bs_widen_bf16(const uint16_t* src, int64_t rows, int64_t cols, float* dst, int64_t dst_stride) {
  for (int64_t t = 0; t < rows; ++t) {
    const uint16_t* s = src + t * cols;
    float* d = dst + t * dst_stride;
    int64_t j = 0;
#if BS_SIMD == 512
    for (; j + 16 <= cols; j += 16) {
      const __m512i w = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)(s + j)));
      _mm512_storeu_ps(d + j, _mm512_castsi512_ps(_mm512_slli_epi32(w, 16)));
    }
#endif
    for (; j < cols; ++j) {
      const uint32_t u = (uint32_t)s[j] << 16;
      std::memcpy(d + j, &u, 4);
    }
  }
}

int bs_simd_width() { return BS_SIMD; }

// The bit widths this build runs on the int8-activation path (see row_tile_int8) when a call asks for
// it, as a mask (1 << bits).
int bs_int8_widths() {
  int mask = BS_INT8 ? 1 << 4 | 1 << 8 : 0;
  const bs::Matrix probe{nullptr, nullptr, nullptr, 1, 64, 2, 64, true};
  for (int bits = 2; bits <= 8; ++bits) {
    bs::Matrix m = probe;
    m.bits = bits;
    if (bs::vbmi_takes(m)) mask |= 1 << bits;  // vbmi.cpp: every width on AVX-512 VBMI + VNNI
    m.in = m.group = 128;
    if (bs::avx2_takes(m)) mask |= 1 << bits;  // avx2_int8.cpp: 2 and 3 bits on AVX2 without AVX-512
  }
  return mask;
}

}  // extern "C"
