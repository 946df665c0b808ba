// bitsmith verify matmul: T (<= 8) activation rows times one packed matrix with int8 activations, every
// row bit for bit what the one-row int8 decode (vbmi.cpp, one activation row) computes for it, each
// weight row's codes loaded and unpacked once for the T rows. Used by csrc/verify.cpp.
//
// Exactness: the integer dot products of a 64- or 128-code span are exact whatever the order, so only
// the float epilogue must follow the one-row kernel: the same per-lane integer sums (the same lanes of
// the same x permutation, prepared per row by bs::gemv_prepare with one row), converted and scaled by
// the same per-lane x scales and per-group weight scales with the same FMAs in the same order, the
// zero-point lanes from the same masked 16-group steps (vbmi.cpp row_scales), and the lanes summed by
// the transposing four-row reduction for rows in whole quads and one by one for the last out % 4
// rows, as vbmi.cpp groups its output rows. The functions below mirror rows_strided<4, R> and
// rows_vbmi1<R> of vbmi.cpp for one weight row and T activation rows; tests/kernels/test_verify.py
// compares every row with the one-row kernel on random shapes.
//
// Layouts taken: 4-bit codes where vbmi.cpp's superblock decode takes them (strided_takes), 4- to
// 8-bit codes on its chunk decode otherwise. 2- and 3-bit codes (whose one-row decode is being
// reworked), the exact float decode and builds without VBMI + VNNI run the one-row gemv per row.

#include <cstdint>

#include "gemv.h"

#if defined(__AVX512VBMI__) && defined(__AVX512VNNI__) && defined(__AVX512BW__) && defined(__AVX512VL__) && \
    defined(__F16C__) && !defined(BS_NO_STRIDED)
#include <immintrin.h>
#define BS_VROWS 1
#else
#define BS_VROWS 0
#endif

namespace bsv {

constexpr int64_t kMaxRows = 8;

#if BS_VROWS
namespace {

constexpr int64_t kMaxGroups = 512;  // vbmi_takes bounds a row's groups to this
constexpr int kAheadRows = 8;        // prefetch distance in weight rows: vbmi.cpp's two passes of four

#include "unpack.h"  // vbmi.cpp's Unpack and row_scales: the same codes and the same float steps

// vbmi.cpp store_sums: four rows' lane sums by one transposing reduction, fewer rows one by one.
inline void sums4(const __m512* total, float* y0, float* y1, float* y2, float* y3) {
  const __m512 s01 = _mm512_add_ps(_mm512_unpacklo_ps(total[0], total[1]), _mm512_unpackhi_ps(total[0], total[1]));
  const __m512 s23 = _mm512_add_ps(_mm512_unpacklo_ps(total[2], total[3]), _mm512_unpackhi_ps(total[2], total[3]));
  const __m512 s = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(s01), _mm512_castps_pd(s23))),
                                 _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(s01), _mm512_castps_pd(s23))));
  const __m256 h = _mm256_add_ps(_mm512_castps512_ps256(s), _mm512_extractf32x8_ps(s, 1));
  alignas(16) float out[4];
  _mm_store_ps(out, _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1)));
  *y0 = out[0], *y1 = out[1], *y2 = out[2], *y3 = out[3];
}

struct Rows {  // the prepared activation rows (gemv_prepare with one row each)
  const float* xv[kMaxRows];
  const int8_t* xq[kMaxRows];
  const float* xs[kMaxRows];
};

// rows_strided<4, R> of vbmi.cpp for weight row o: total[t] for activation rows t < T.
template <int T>
void strided4_row(const bs::Matrix& m, const Unpack& u, const __m512i& lanes, int64_t o, const Rows& x,
                  __m512* total) {
  constexpr int S = 128, SB = 64;
  const int64_t groups = bs::gemv_groups(m), row_bytes = m.in / 2, blocks = m.in / S, G = m.group;
  alignas(64) float sc[kMaxGroups + 16];
  const uint8_t* row = m.packed + o * row_bytes;
  __m512 f[T];
  for (int t = 0; t < T; ++t) {
    total[t] = -row_scales(m, o, groups, 8.f, x.xs[t], sc);
    f[t] = _mm512_setzero_ps();
  }
  const __m512i m15 = _mm512_set1_epi8(15);
  for (int64_t b = 0; b < blocks; ++b) {
    const uint8_t* p = row + b * SB;
    _mm_prefetch((const char*)(p + kAheadRows * row_bytes), _MM_HINT_T0);
    const __m512i raw = _mm512_loadu_si512(p);
    const __m512i lo = _mm512_and_si512(raw, m15), hi = _mm512_and_si512(_mm512_srli_epi16(raw, 4), m15);
    __m512 w = _mm512_setzero_ps();
    if (G < S) w = _mm512_permutexvar_ps(lanes, _mm512_loadu_ps(sc + b * S / G));
    for (int t = 0; t < T; ++t) {
      const int8_t* q = x.xq[t] + b * S;
      const __m512 v = _mm512_loadu_ps(x.xv[t] + b * (S / 4));
      const __m512i dot = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), lo, _mm512_loadu_si512(q)),
                                              hi, _mm512_loadu_si512(q + 64));
      const __m512 d = _mm512_cvtepi32_ps(dot);
      if (G < S) total[t] = _mm512_fmadd_ps(d, _mm512_mul_ps(v, w), total[t]);
      else f[t] = _mm512_fmadd_ps(d, v, f[t]);
    }
    if (G >= S && ((b + 1) * S % G == 0 || b + 1 == blocks))
      for (int t = 0; t < T; ++t) {
        total[t] = _mm512_fmadd_ps(f[t], _mm512_set1_ps(sc[b * S / G]), total[t]);
        f[t] = _mm512_setzero_ps();
      }
  }
  for (int64_t k = blocks * S; k < m.in; k += 64) {  // the natural-order tail, chunk by chunk
    const __m512i c = u.codes(row + k / 8 * 4, 4);
    for (int t = 0; t < T; ++t) {
      const __m512i dot = _mm512_dpbusd_epi32(_mm512_setzero_si512(), c, _mm512_loadu_si512(x.xq[t] + k));
      total[t] = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(dot), _mm512_loadu_ps(x.xv[t] + k / 4)),
                                 _mm512_set1_ps(sc[k / G]), total[t]);
    }
  }
}

// rows_vbmi1<R> of vbmi.cpp for weight row o (any width it takes): total[t] for activation rows t < T.
template <int T>
void chunk_row(const bs::Matrix& m, const Unpack& u, const __m512i&, int64_t o, const Rows& x, __m512* total) {
  const int bits = (int)m.bits;
  const int64_t groups = bs::gemv_groups(m), row_bytes = m.in / 8 * bits, chunk_bytes = 8 * bits;
  alignas(64) float sc[kMaxGroups + 16];
  const uint8_t* row = m.packed + o * row_bytes;
  for (int t = 0; t < T; ++t) total[t] = -row_scales(m, o, groups, (float)((1 << bits) / 2), x.xs[t], sc);
  for (int64_t g = 0; g < groups; ++g) {
    const int64_t start = g * m.group, end = start + m.group < m.in ? start + m.group : m.in;
    __m512 f[T];
    for (int t = 0; t < T; ++t) f[t] = _mm512_setzero_ps();
    for (int64_t k = start; k < end; k += 64) {
      const uint8_t* p = row + k / 64 * chunk_bytes;
      _mm_prefetch((const char*)(p + kAheadRows * row_bytes), _MM_HINT_T0);
      const __m512i c = u.codes(p, bits);
      for (int t = 0; t < T; ++t) {
        const __m512i dot = _mm512_dpbusd_epi32(_mm512_setzero_si512(), c, _mm512_loadu_si512(x.xq[t] + k));
        f[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_loadu_ps(x.xv[t] + k / 4), f[t]);
      }
    }
    for (int t = 0; t < T; ++t) total[t] = _mm512_fmadd_ps(f[t], _mm512_set1_ps(sc[g]), total[t]);
  }
}

// All output rows: whole quads (four weight rows, each row's lanes then summed four at a time) and the
// last out % 4 rows alone, shared out over the team as vbmi.cpp does (an orphaned omp for).
template <int T, void (*ROW)(const bs::Matrix&, const Unpack&, const __m512i&, int64_t, const Rows&, __m512*)>
void all_rows(const bs::Matrix& m, const Rows& x, float* y, int64_t ystride) {
  const Unpack u((int)m.bits);
  alignas(64) int32_t idx[16];
  for (int l = 0; l < 16; ++l) idx[l] = m.group < 128 ? (int32_t)(l * 8 / m.group) : 0;
  const __m512i lanes = _mm512_load_si512(idx);
  const int64_t quads = m.out / 4;
#pragma omp for schedule(static)
  for (int64_t b = 0; b <= quads; ++b) {
    if (b < quads) {
      __m512 total[4][T];
      for (int r = 0; r < 4; ++r) ROW(m, u, lanes, b * 4 + r, x, total[r]);
      for (int t = 0; t < T; ++t) {
        const __m512 four[4] = {total[0][t], total[1][t], total[2][t], total[3][t]};
        float* yt = y + t * ystride + b * 4;
        sums4(four, yt, yt + 1, yt + 2, yt + 3);
      }
    } else {
      for (int64_t o = quads * 4; o < m.out; ++o) {
        __m512 total[T];
        ROW(m, u, lanes, o, x, total);
        for (int t = 0; t < T; ++t) y[t * ystride + o] = _mm512_reduce_add_ps(total[t]);
      }
    }
  }
}

template <int T>
void strided_rows(const bs::Matrix& m, const Rows& x, float* y, int64_t ystride) {
  all_rows<T, strided4_row<T>>(m, x, y, ystride);
}
template <int T>
void chunk_rows(const bs::Matrix& m, const Rows& x, float* y, int64_t ystride) {
  all_rows<T, chunk_row<T>>(m, x, y, ystride);
}

#define BS_BY_T(FN)                                        \
  switch (T) {                                             \
    case 1: return FN<1>(m, x, y, ystride);                \
    case 2: return FN<2>(m, x, y, ystride);                \
    case 3: return FN<3>(m, x, y, ystride);                \
    case 4: return FN<4>(m, x, y, ystride);                \
    case 5: return FN<5>(m, x, y, ystride);                \
    case 6: return FN<6>(m, x, y, ystride);                \
    case 7: return FN<7>(m, x, y, ystride);                \
    default: return FN<8>(m, x, y, ystride);               \
  }

}  // namespace
#endif

// y[t * ystride + o] = row t of x times m for t < T (<= kMaxRows), from the rows prepared one by one
// (xp[t], xs[t]: bs::gemv_prepare(m, x[t], 1, ..)). Every thread of the team calls it (barrier at the end).
void verify_rows(const bs::Matrix& m, const float* const* x, const float* const* xp, const float* const* xs,
                 int64_t T, float* y, int64_t ystride) {
#if BS_VROWS
  if (bs::vbmi_takes(m) && m.bits >= 4) {
    Rows r;
    for (int64_t t = 0; t < T; ++t) {
      r.xv[t] = xp[t];
      r.xq[t] = (const int8_t*)(xp[t] + m.in / 4);
      r.xs[t] = xs[t];
    }
    const Rows& x = r;
    if (m.bits == 4 && bs::strided_takes(m)) BS_BY_T(strided_rows)
    BS_BY_T(chunk_rows)
  }
#endif
  for (int64_t t = 0; t < T; ++t) bs::gemv_rows(m, x[t], xp[t], xs[t], 1, y + t * ystride);
}

}  // namespace bsv

extern "C" {

// Whether verify_rows runs an int8 layout on its own tiles (1) or one row at a time through the one-row
// gemv (0): tests check that the layouts meant for the tiles take them.
int64_t bs_verify_rows_tiled(int64_t bits, int64_t in, int64_t group) {
  const bs::Matrix m{nullptr, nullptr, nullptr, 1, in, bits, group, true};
  return BS_VROWS && bs::vbmi_takes(m) && bits >= 4;
}

}  // extern "C"
