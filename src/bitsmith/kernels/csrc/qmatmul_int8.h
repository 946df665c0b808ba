// The int8-activation decode tiles of qmatmul.cpp's gemv (bs::gemv_prepare / gemv_rows), 4- and 8-bit
// codes; every width on AVX-512 VBMI + VNNI goes to vbmi.cpp instead, 2 and 3 bits on AVX2 to
// avx2_int8.cpp. Internal to qmatmul.cpp.
//
// The float gemv (qmatmul_float.h) spends ~7 vector instructions per 16 bytes of 4-bit codes (widen, mask,
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
#pragma once
#include "qmatmul.h"

namespace {

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
#define BS_ROWS_AHEAD 2  // rows ahead to prefetch
#endif
  bs::prefetch_row_ahead(row, w.row_bytes, BS_ROWS_AHEAD);
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
