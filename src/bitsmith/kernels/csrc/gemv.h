// The decode gemv of qmatmul.cpp, split so other kernels in the library (decode.cpp) can run it
// inside their own OpenMP parallel region instead of opening one per matrix.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>
#if defined(__F16C__) || defined(__AVX__)
#include <immintrin.h>
#endif

namespace bs {

// IEEE fp16 <-> fp32 (scales and zeros, the fp16 KV cache): F16C where compiled in, else portable code,
// both tested against torch's .half() (bs_half_roundtrip).
inline float half_to_float(uint16_t h) {
#if defined(__F16C__)
  return _cvtsh_ss(h);
#endif
  // exact for normals, subnormals, inf and nan
  uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1Fu;
  uint32_t man = h & 0x3FFu;
  uint32_t bits;
  if (exp == 0) {
    if (man == 0) {
      bits = sign;
    } else {  // subnormal: renormalise
      int e = -1;
      do { ++e; man <<= 1; } while ((man & 0x400u) == 0);
      bits = sign | ((uint32_t)(127 - 15 - e) << 23) | ((man & 0x3FFu) << 13);
    }
  } else if (exp == 31) {
    bits = sign | 0x7F800000u | (man << 13);
  } else {
    bits = sign | ((exp + 112u) << 23) | (man << 13);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

// fp32 -> fp16, round to nearest even (what torch's .half() does).
inline uint16_t float_to_half(float f) {
#if defined(__F16C__)
  return _cvtss_sh(f, _MM_FROUND_TO_NEAREST_INT);
#else
  uint32_t x;
  std::memcpy(&x, &f, 4);
  const uint32_t sign = (x >> 16) & 0x8000u;
  x &= 0x7FFFFFFFu;
  if (x >= 0x7F800000u) return (uint16_t)(sign | (x > 0x7F800000u ? 0x7E00u : 0x7C00u));  // nan, inf
  if (x >= 0x477FF000u) return (uint16_t)(sign | 0x7C00u);  // rounds past 65504: inf
  if (x < 0x38800000u) {  // below the smallest normal half: subnormal (or zero)
    const float a = __builtin_bit_cast(float, x) * 16777216.f;  // in units of 2^-24
    return (uint16_t)(sign | (uint32_t)std::nearbyint(a));
  }
  const uint32_t mant = x & 0x1FFFu, base = ((x >> 13) - ((127u - 15u) << 10));
  const uint32_t up = mant > 0x1000u || (mant == 0x1000u && (base & 1u));
  return (uint16_t)(sign | (base + up));
#endif
}

// How a matrix's packed bytes are laid out: formats/packing.py's (kNatural), or 3-bit codes with every
// whole 256-code superblock repacked at load (kMixed3, strided.h; kernels/cpu.py repacks where
// bs_mixed3_takes, and only for int8 decode: the exact float paths read natural bytes only).
enum : int64_t { kNatural = 0, kMixed3 = 1 };
// The C entries' `bits` argument carries the layout above its low byte (kernels/cpu.py NativeKernel._bind).
constexpr int64_t kLayoutShift = 8;

// One packed weight matrix (fp16 scale/zero [out, groups]).
struct Matrix {
  const uint8_t* packed;   // [out, row_bytes], readable 8 bytes past the end
  const uint16_t* scale;   // fp16 [out, groups]
  const uint16_t* zero;    // fp16 [out, groups] or null (symmetric)
  int64_t out, in, bits, group;
  bool int8;               // 4/8-bit decode with int8 activations where the shape allows (per call)
  int64_t layout = kNatural;
};

// A Matrix from a C entry's arguments (`bits_arg`: the code width | layout << kLayoutShift).
inline Matrix abi_matrix(const uint8_t* packed, const uint16_t* scale, const uint16_t* zero, int64_t out, int64_t in,
                         int64_t bits_arg, int64_t group, bool int8) {
  return Matrix{packed, scale, zero, out, in, bits_arg & ((1 << kLayoutShift) - 1), group, int8, bits_arg >> kLayoutShift};
}

#if defined(__AVX512F__)
// The lane sums of t[0..4) as the four lanes of one vector: one transposing reduction (~10
// instructions) instead of four horizontal sums (~8 each); the gemv's 4-row passes and the attention's
// 4-position score blocks.
inline __m128 sum4(const __m512* t) {
  const __m512 s01 = _mm512_add_ps(_mm512_unpacklo_ps(t[0], t[1]), _mm512_unpackhi_ps(t[0], t[1]));
  const __m512 s23 = _mm512_add_ps(_mm512_unpacklo_ps(t[2], t[3]), _mm512_unpackhi_ps(t[2], t[3]));
  const __m512 s = _mm512_add_ps(  // per 128-bit lane: partial sums of rows 0, 1, 2, 3
      _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(s01), _mm512_castps_pd(s23))),
      _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(s01), _mm512_castps_pd(s23))));
  const __m256 h = _mm256_add_ps(_mm512_castps512_ps256(s), _mm512_extractf32x8_ps(s, 1));
  return _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
}
#endif

#if defined(__AVX__)
// The eight lanes of a 256-bit float vector summed (the AVX2 paths' one horizontal sum per row: qmatmul.cpp,
// avx2_int8.cpp, codebook.cpp).
inline float hsum8(__m256 a) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
// 32 bytes from p, unaligned (the AVX2 int8 paths' code and activation loads).
inline __m256i load256(const void* p) { return _mm256_loadu_si256((const __m256i*)p); }
// Software prefetch of the weight row `ahead` rows of row_bytes past `row` (none where ahead <= 0), one
// request per cache line, a few per row: the hardware streamers stop at 4 KB boundaries (see vbmi.cpp's
// BS_AHEAD). The AVX2 int8 row tiles call it once per output row (qmatmul_int8.h, avx2_int8.cpp).
inline void prefetch_row_ahead(const uint8_t* row, int64_t row_bytes, int ahead) {
  for (int64_t b = 0; ahead > 0 && b < row_bytes; b += 64)
    _mm_prefetch((const char*)(row + ahead * row_bytes + b), _MM_HINT_T0);
}
#endif

inline int64_t gemv_groups(const Matrix& m) { return (m.in + m.group - 1) / m.group; }

// Per-call preparation of x [T, in] on one thread: group sums xsum [T, groups] and, for 4-bit codes,
// x permuted per 32-block into xp [T, in] (for other widths xp is not written and may be null).
void gemv_prepare(const Matrix& m, const float* x, int64_t T, float* xsum, float* xp);

// y [T, out] = x @ W^T from prepared inputs. The output rows are shared out with an orphaned
// `omp for` (implicit barrier at the end), so every thread of the enclosing team must call it; outside
// a parallel region it runs on the calling thread alone.
void gemv_rows(const Matrix& m, const float* x, const float* xp, const float* xsum, int64_t T, float* y);

// The int8-activation decode of every width on AVX-512 VBMI + VNNI (vbmi.cpp): whether m takes it
// (in and group multiples of 64, m.int8 set, this build has the instructions), and its rows from
// prepared inputs (xv, xq, xsum as gemv_prepare writes them; an orphaned `omp for` as gemv_rows).
bool vbmi_takes(const Matrix& m);
void vbmi_rows(const Matrix& m, const float* xv, const int8_t* xq, const float* xsum, int64_t T, float* y);
// One activation row of 2-, 3- or 4-bit codes runs vbmi.cpp's superblock decode when strided_takes(m):
// gemv_prepare then permutes its int8 x in place with vbmi_permute (the layout vbmi_rows reads).
bool strided_takes(const Matrix& m);
void vbmi_permute(const Matrix& m, int8_t* xq, float* xv);
// The 3-bit mixed layout (mixed3.cpp): whether a 3-bit matrix of this shape may be repacked (this build
// runs it: in and group as strided_takes needs them), T >= 2 int8 activation rows of one (every row
// permuted by vbmi_permute; an orphaned `omp for`), and row o dequantized ((code - zero) * scale) into dst [in].
// The int8 decode of 2- and 3-bit codes on AVX2 builds without AVX-512 (avx2_int8.cpp): whether m takes
// it, x's int8 codes and scales of one activation row permuted in place after prepare_int8, and its rows
// (an orphaned `omp for` as gemv_rows).
bool avx2_takes(const Matrix& m);
void avx2_permute(const Matrix& m, int8_t* xq, float* xv);
void avx2_rows(const Matrix& m, const float* xv, const int8_t* xq, const float* xsum, int64_t T, float* y);
bool mixed3_takes(const Matrix& m);
void mixed3_rows(const Matrix& m, const float* xv, const int8_t* xq, const float* xsum, int64_t T, float* y);
void mixed3_dequant_row(const Matrix& m, int64_t o, float* dst);
// Row o's codes in natural order into c [in] (the int8 prefill GEMM, gemm_int8.cpp).
void mixed3_codes_row(const Matrix& m, int64_t o, uint8_t* c);

}  // namespace bs
