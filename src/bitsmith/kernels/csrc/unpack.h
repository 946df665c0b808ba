// bitsmith: the 64-codes-from-8*bits-bytes unpacking of the VBMI int8 kernels (vbmi.cpp decode,
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
