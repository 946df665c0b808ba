// bitsmith: int8-activation decode of 2- and 3-bit codes on AVX2 builds without AVX-512 (Zen 2/3,
// most laptops). Without it these widths ran qmatmul_float.h's dot_runs (widen every code to float,
// one FMA each) and so decoded slower than 4-bit despite reading fewer bytes (issue 18).
//
// The arithmetic contract is that of qmatmul.cpp's int8 path: x is rounded once per call to int8 with
// one scale xs_b per block of 32 inputs (prepare_int8), codes are multiplied into it as unsigned bytes
// with vpmaddubsw (u8 x s8 -> pairwise i16 sums) and vpmaddwd (-> i32), and the result is the exact
// product of the dequantized weights with the int8-rounded x (float summation order aside).
//
// Codes are unpacked with whole-vector shifts and masks only; x is permuted once per call
// (avx2_permute, in place after prepare_int8) into the order the unpacked bytes come out in:
// - 2 bits, 128-code chunks of 32 bytes: byte j holds codes 4j+s at bits 2s, so plane s = (b >> 2s) & 3
//   pairs with xq[s*32 + j] = x[4j + s]. The four planes' vpmaddubsw sums are added in int16
//   (4 * 2 * 3 * 127 < 32767) before one vpmaddwd; int32 lane l then sums codes [16l, 16l+16): block l/2.
// - 3 bits, 64-code chunks of 24 bytes (8 runs of 8 codes in 3 bytes): each 128-bit lane holds 4 runs
//   (one 32-block); a byte shuffle gathers byte k of dword q from run k, the byte holding code i_q, and a
//   per-dword shift (vpsrlvd) brings code i_q to bit 0 of every byte. Codes 2 and 5 straddle two bytes:
//   their high bits come from a second shuffle shifted left (vpsllvd). Two planes of 16 codes per lane:
//   codes (0,1,3,4) and (6,7,2,5) of the lane's 4 runs; int32 lanes 0-3 are the chunk's first 32-block,
//   4-7 its second.
// xv (x scales, 8 floats per chunk) is rewritten per chunk to match those int32 lanes; each chunk's
// int32 lanes are scaled by x's block scales times per-lane weight scales (groups of 32 and 64 can be
// narrower than a chunk; wider groups are whole chunks).
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "gemv.h"

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__) && !defined(__AVX512F__) && !defined(BS_NO_AVX2_INT8)
#define BS_AVX2_INT8 1
#include <immintrin.h>
#else
#define BS_AVX2_INT8 0
#endif

namespace {

// Codes per chunk: 32 bytes of 2-bit codes, 24 bytes of 3-bit codes.
constexpr int64_t chunk_codes(int64_t bits) { return bits == 2 ? 128 : 64; }

#if BS_AVX2_INT8
using bs::load256;

// The unpacked planes of one chunk (as u8 codes) and their integer dot product with the permuted xq.
template <int BITS>
struct Planes {
  static constexpr int N = BITS == 2 ? 4 : 2;
  __m256i u[N];
  // p: the chunk's packed bytes (3-bit: 32 bytes are read, 8 past the chunk; the packed buffer carries
  // 8 bytes of padding past its end)
  explicit Planes(const uint8_t* p) {
    if (BITS == 2) {
      const __m256i b = load256(p), m = _mm256_set1_epi8(3);
      u[0] = _mm256_and_si256(b, m);
      u[1] = _mm256_and_si256(_mm256_srli_epi16(b, 2), m);
      u[2] = _mm256_and_si256(_mm256_srli_epi16(b, 4), m);
      u[3] = _mm256_and_si256(_mm256_srli_epi16(b, 6), m);
    } else {
      // lane 0: bytes 0-15 (runs 0-3), lane 1: bytes 12-27 (runs 4-7)
      const __m256i v = _mm256_loadu2_m128i((const __m128i*)(p + 12), (const __m128i*)p);
      const __m256i i1 = _mm256_setr_epi8(0, 3, 6, 9, 0, 3, 6, 9, 1, 4, 7, 10, 1, 4, 7, 10,
                                          0, 3, 6, 9, 0, 3, 6, 9, 1, 4, 7, 10, 1, 4, 7, 10);
      const __m256i i2 = _mm256_setr_epi8(2, 5, 8, 11, 2, 5, 8, 11, 0, 3, 6, 9, 1, 4, 7, 10,
                                          2, 5, 8, 11, 2, 5, 8, 11, 0, 3, 6, 9, 1, 4, 7, 10);
      const __m256i i3 = _mm256_setr_epi8(-1, -1, -1, -1, -1, -1, -1, -1, 1, 4, 7, 10, 2, 5, 8, 11,
                                          -1, -1, -1, -1, -1, -1, -1, -1, 1, 4, 7, 10, 2, 5, 8, 11);
      const __m256i lo = _mm256_srlv_epi32(_mm256_shuffle_epi8(v, i2), _mm256_setr_epi32(2, 5, 6, 7, 2, 5, 6, 7));
      const __m256i hi = _mm256_sllv_epi32(_mm256_shuffle_epi8(v, i3), _mm256_setr_epi32(0, 0, 2, 1, 0, 0, 2, 1));
      const __m256i mlo = _mm256_setr_epi32(0x07070707, 0x07070707, 0x03030303, 0x01010101,
                                            0x07070707, 0x07070707, 0x03030303, 0x01010101);
      const __m256i mhi = _mm256_setr_epi32(0, 0, 0x04040404, 0x06060606, 0, 0, 0x04040404, 0x06060606);
      u[0] = _mm256_and_si256(_mm256_srlv_epi32(_mm256_shuffle_epi8(v, i1), _mm256_setr_epi32(0, 3, 1, 4, 0, 3, 1, 4)),
                              _mm256_set1_epi8(7));
      u[1] = _mm256_or_si256(_mm256_and_si256(lo, mlo), _mm256_and_si256(hi, mhi));
    }
  }
  // int32 lanes of sum code * xq over the chunk (q: the chunk's permuted xq, N * 32 bytes)
  __m256i dot(const int8_t* q) const {
    __m256i s = _mm256_maddubs_epi16(u[0], load256(q));
    for (int i = 1; i < N; ++i) s = _mm256_add_epi16(s, _mm256_maddubs_epi16(u[i], load256(q + 32 * i)));
    return _mm256_madd_epi16(s, _mm256_set1_epi16(1));
  }
};

struct Rows {
  const bs::Matrix& m;
  int64_t groups, row_bytes;
  float mid;
  __m256i lane_group;  // group < cw: lane l's group within its chunk
};

// Row o's weight scales into sc [groups] (sc has 8 floats of slack), returning the zero-point term
// sum_g s_g * z_g * xsum_g of each activation row t < TT. 8 groups per step, the last few through a
// zero-padded copy (a scalar tail cost a tenth of a 1536-code row's time at 12 groups).
template <int TT>
void row_scales(const Rows& r, int64_t o, const float* xsum, float* sc, float* offset) {
  const uint16_t* s16 = r.m.scale + o * r.groups;
  const uint16_t* z16 = r.m.zero ? r.m.zero + o * r.groups : nullptr;
  __m256 acc[TT];
  for (int t = 0; t < TT; ++t) acc[t] = _mm256_setzero_ps();
  for (int64_t g = 0; g < r.groups; g += 8) {
    const int64_t n = std::min<int64_t>(8, r.groups - g);
    const uint16_t *sp = s16 + g, *zp = z16 ? z16 + g : nullptr;
    const float* xp[TT];
    for (int t = 0; t < TT; ++t) xp[t] = xsum + t * r.groups + g;
    uint16_t s_pad[8] = {}, z_pad[8] = {};
    float x_pad[TT][8] = {};
    if (n < 8) {
      std::memcpy(s_pad, sp, 2 * n);
      sp = s_pad;
      if (zp) std::memcpy(z_pad, zp, 2 * n), zp = z_pad;
      for (int t = 0; t < TT; ++t) std::memcpy(x_pad[t], xp[t], 4 * n), xp[t] = x_pad[t];
    }
    const __m256 s = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)sp));
    const __m256 z = zp ? _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)zp)) : _mm256_set1_ps(r.mid);
    _mm256_storeu_ps(sc + g, s);
    const __m256 sz = _mm256_mul_ps(s, z);
    for (int t = 0; t < TT; ++t) acc[t] = _mm256_fmadd_ps(sz, _mm256_loadu_ps(xp[t]), acc[t]);
  }
  for (int t = 0; t < TT; ++t) offset[t] = bs::hsum8(acc[t]);
}

#ifndef BS_AVX2_AHEAD
#define BS_AVX2_AHEAD 2  // rows ahead to prefetch (as qmatmul_int8.h's BS_ROWS_AHEAD)
#endif

// y[t0 .. t0+TT, o] for one output row.
template <int BITS, int TT>
void row_tile(const Rows& r, int64_t o, int64_t t0, const float* xv, const int8_t* xq, const float* xsum, float* sc,
              float* y) {
  const bs::Matrix& m = r.m;
  const uint8_t* row = m.packed + o * r.row_bytes;
  bs::prefetch_row_ahead(row, r.row_bytes, BS_AVX2_AHEAD);
  constexpr int64_t CW = chunk_codes(BITS), CB = CW * BITS / 8;
  const int8_t* q[TT];
  const float* v[TT];
  __m256 total[TT];
  float offset[TT];
  for (int t = 0; t < TT; ++t) {
    q[t] = xq + (t0 + t) * m.in;
    v[t] = xv + (t0 + t) * (m.in / 4);
    total[t] = _mm256_setzero_ps();
  }
  row_scales<TT>(r, o, xsum + t0 * r.groups, sc, offset);
  // One flat loop over chunks, each with per-lane weight scales (per-group inner loops of one or two
  // chunks cost 20-40% more on Zen 3): lane l of chunk c is in group (c * CW + l * CW / 8) / group.
  const int64_t chunks = m.in / CW;
  const int64_t per = m.group <= CW ? CW / m.group : 0;  // groups per chunk, or
  const int64_t span = m.group <= CW ? 0 : m.group / CW;  // chunks per group
  for (int64_t c = 0, g = 0, left = span; c < chunks; ++c) {
    const Planes<BITS> w(row + c * CB);
    __m256 ws;
    if (per) {
      ws = _mm256_permutevar8x32_ps(_mm256_loadu_ps(sc + c * per), r.lane_group);
    } else {
      ws = _mm256_set1_ps(sc[g]);
      if (--left == 0) ++g, left = span;
    }
    for (int t = 0; t < TT; ++t) {
      const __m256 f = _mm256_mul_ps(ws, _mm256_loadu_ps(v[t] + c * 8));
      total[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(w.dot(q[t] + c * CW)), f, total[t]);
    }
  }
  for (int t = 0; t < TT; ++t) y[(t0 + t) * m.out + o] = bs::hsum8(total[t]) - offset[t];
}

template <int BITS>
void rows(const Rows& r, const float* xv, const int8_t* xq, const float* xsum, int64_t T, float* y) {
  std::vector<float> sc(r.groups + 8, 0.f);  // this thread's row scales (+ slack for 8-lane loads)
#pragma omp for schedule(static)
  for (int64_t o = 0; o < r.m.out; ++o) {
    int64_t t = 0;
    for (; t + 4 <= T; t += 4) row_tile<BITS, 4>(r, o, t, xv, xq, xsum, sc.data(), y);
    switch (T - t) {
      case 3: row_tile<BITS, 3>(r, o, t, xv, xq, xsum, sc.data(), y); break;
      case 2: row_tile<BITS, 2>(r, o, t, xv, xq, xsum, sc.data(), y); break;
      case 1: row_tile<BITS, 1>(r, o, t, xv, xq, xsum, sc.data(), y); break;
    }
  }
}
#endif

}  // namespace

namespace bs {

bool avx2_takes(const Matrix& m) {
  if (!BS_AVX2_INT8 || !m.int8 || m.layout != kNatural || (m.bits != 2 && m.bits != 3)) return false;
  const int64_t cw = chunk_codes(m.bits);
  return m.in % cw == 0 && (m.group % cw == 0 || (m.group < cw && (m.group == 32 || m.group == 64)));
}

// One activation row's xq [in] (natural order) and xv [in / 4] (8 copies of each 32-block's scale), as
// prepare_int8 writes them, rewritten in place into the chunk layouts above.
void avx2_permute(const Matrix& m, int8_t* xq, float* xv) {
  const int64_t cw = chunk_codes(m.bits), chunks = m.in / cw;
  int8_t tmp[128];
  for (int64_t c = 0; c < chunks; ++c) {
    int8_t* q = xq + c * cw;
    std::memcpy(tmp, q, (size_t)cw);
    float xs[4];
    for (int b = 0; b < cw / 32; ++b) xs[b] = xv[(c * cw / 32 + b) * 8];  // read before the writes below
    if (m.bits == 2) {
      for (int s = 0; s < 4; ++s)
        for (int j = 0; j < 32; ++j) q[s * 32 + j] = tmp[4 * j + s];
      for (int l = 0; l < 8; ++l) xv[c * 8 + l] = xs[l / 2];
    } else {
      static const int plane[2][4] = {{0, 1, 3, 4}, {6, 7, 2, 5}};  // code within a run, per dword
      for (int p = 0; p < 2; ++p)
        for (int h = 0; h < 2; ++h)
          for (int d = 0; d < 4; ++d)
            for (int k = 0; k < 4; ++k) q[p * 32 + h * 16 + 4 * d + k] = tmp[32 * h + 8 * k + plane[p][d]];
      for (int l = 0; l < 8; ++l) xv[c * 8 + l] = xs[l / 4];
    }
  }
}

void avx2_rows(const Matrix& m, const float* xv, const int8_t* xq, const float* xsum, int64_t T, float* y) {
#if BS_AVX2_INT8
  const int64_t cw = chunk_codes(m.bits);
  alignas(32) int32_t lanes[8];
  for (int l = 0; l < 8; ++l) lanes[l] = (int32_t)(m.group <= cw ? l * (cw / 8) / m.group : 0);
  const Rows r{m, gemv_groups(m), (m.in + 7) / 8 * m.bits, (float)((1 << m.bits) / 2),
               _mm256_load_si256((const __m256i*)lanes)};
  if (m.bits == 2) return rows<2>(r, xv, xq, xsum, T, y);
  return rows<3>(r, xv, xq, xsum, T, y);
#else
  (void)m, (void)xv, (void)xq, (void)xsum, (void)T, (void)y;
#endif
}

}  // namespace bs
