// bitsmith: the 64-codes-from-8*bits-bytes unpacking and the row scale/zero-point step of the VBMI int8 kernels (vbmi.cpp decode,
// verify_rows.cpp speculative verify), one definition for both: the verify's rows must see the same
// integer codes as the one-row decode. Included inside each file's anonymous namespace, after
// <immintrin.h>, where AVX-512 VBMI is compiled in (BS_VBMI / BS_VROWS).
#pragma once

// The byte gather and bit offsets that turn 8*bits packed bytes into 64 codes (see vbmi.cpp's top).
struct Unpack {
  __m512i gather, shifts, mask;
  __mmask64 load;
  explicit Unpack(int bits) {
    alignas(64) uint8_t g[64], s[64];
    for (int j = 0; j < 8; ++j)
      for (int i = 0; i < 8; ++i) {
        const int src = j * bits + i;
        g[8 * j + i] = (uint8_t)(src < 64 ? src : 63);  // bytes past the run are masked off below
        s[8 * j + i] = (uint8_t)(i * bits);
      }
    gather = _mm512_load_si512(g);
    shifts = _mm512_load_si512(s);
    mask = _mm512_set1_epi8((char)((1 << bits) - 1));
    load = bits == 8 ? ~(__mmask64)0 : (((__mmask64)1 << (8 * bits)) - 1);
  }
  // 64 codes of the chunk at p (8*bits bytes; masked load: never reads past them).
  __m512i codes(const uint8_t* p, int bits) const {
    const __m512i raw = _mm512_maskz_loadu_epi8(load, p);
    if (bits == 8) return raw;
    return _mm512_and_si512(_mm512_multishift_epi64_epi8(shifts, _mm512_permutexvar_epi8(gather, raw)), mask);
  }
};

// Row o's weight scales as floats into sc [groups], and its zero-point term sum_g s_g * z_g * xsum_g,
// 16 groups per step (a scalar chain per group cost as much as a 64-code chunk at group 64).
// Returned as lanes (their sum is the term), so the row's one horizontal sum covers it too.
inline __m512 row_scales(const bs::Matrix& m, int64_t o, int64_t groups, float mid, const float* xsum, float* sc) {
  const uint16_t* s16 = m.scale + o * groups;
  const uint16_t* z16 = m.zero ? m.zero + o * groups : nullptr;
  __m512 acc = _mm512_setzero_ps();
  for (int64_t g = 0; g < groups; g += 16) {
    const __mmask16 k = groups - g >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (groups - g)) - 1u);
    const __m512 sv = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(k, s16 + g));  // 0 past the row's groups
    const __m512 zv = z16 ? _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(k, z16 + g)) : _mm512_set1_ps(mid);
    _mm512_mask_storeu_ps(sc + g, k, sv);
    acc = _mm512_fmadd_ps(_mm512_mul_ps(sv, zv), _mm512_maskz_loadu_ps(k, xsum + g), acc);
  }
  return acc;
}
