// bitsmith small-batch packed matmul: y [T, out] = x [T, in] @ W^T for T = 2..16 activation rows,
// each weight row read (and its codes widened to float) once for all T rows.
//
// Who needs it: the verify forward of speculative decoding (k + 1 rows of one sequence) and the decode
// step of continuous batching (one row per active request). bs_gemv (qmatmul.cpp) handles few rows in
// register tiles of 4: for 4-bit codes it widens each 32-code block once per tile, and inside a tile each
// row's group is one serial chain of FMAs, so on the development machine (scratch timing, 1 thread) 4 rows cost
// 2.3x one row in float32 and 8 rows 3.9x: compute-bound, not memory-bound. Here, for the common layout
// (4-bit codes, groups a multiple of 32 that tile the row: w4g32, w4g64, w4g128), a weight row's 32-code
// block is widened once into two float vectors and multiplied into up to 8 rows' independent chains
// (16 rows: two tiles of 8 over the same row, still in L1), so the FMA latency of one chain hides behind
// the others and the widening is paid once per 8 rows. Measured (scratch timing, 4096x1536 w4g128, one thread,
// loaded machine): on par with bs_gemv's float path at 4 rows (0.84 vs 0.82 ms), 8 % faster at 8 rows; the
// FMAs themselves (one per code per row) remain, so several rows still cost several times one row here.
//
// Exactness: each row's arithmetic is the float32 gemv's for one row (qmatmul_float.h row_tile4<1>) in the
// same order (per group one chain of FMAs over the 32-blocks, even codes then odd; groups alternately
// into two scaled totals; lanes summed by _mm512_reduce_add_ps; minus the zero-point term summed as
// there), so every row equals what the exact single-row decode computes for it, bit for bit. Speculative
// verification relies on this: the target's verify rows are its plain decode rows.
//
// Other widths and layouts (ragged last groups, in not a multiple of the group) and builds without
// AVX-512 go to bs::gemv_rows, which is exact for them as well. Plain C ABI, loaded through ctypes
// (kernels/build.py).

#include <cstdint>
#include <vector>

#include "gemv.h"

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512DQ__)
#include <immintrin.h>
#define BS_SMALL_SIMD 1
#else
#define BS_SMALL_SIMD 0
#endif

// Last: its zero_offset is the zero-point term of the single-row gemv that every row here must equal bit
// for bit, and its fp-contract=off pragma (no a * b + c contracted where the source writes none) then
// holds for this unit as for the gemv's (without it the scalar tail rounded differently: test_small_gemm).
#include "qmatmul.h"

namespace {

constexpr int MAX_TILE = 8;  // rows sharing one widening of the codes (16 float accumulators + codes fit the registers)

#if BS_SMALL_SIMD
struct Rows4 {
  const uint8_t* packed;
  const uint16_t* scale;
  const uint16_t* zero;
  int64_t out, in, group, groups, row_bytes;
};

// Output row o for activation rows t0 .. t0 + TT: xp is x permuted per 32-block into [16 even | 16 odd]
// (bs::gemv_prepare), matching the nibbles (byte j of a block holds code 2j low, 2j + 1 high).
template <int TT>
void tile4(const Rows4& w, int64_t o, int64_t t0, const float* xp, const float* xsum, const float* sc,
           const float* zr, float* y) {
  const float* xr[TT];
  __m512 total[2 * TT];
  for (int t = 0; t < TT; ++t) {
    xr[t] = xp + (t0 + t) * w.in;
    total[2 * t] = total[2 * t + 1] = _mm512_setzero_ps();
  }
  const uint8_t* row = w.packed + o * w.row_bytes;
  const __m512i low4 = _mm512_set1_epi32(0xF);
  for (int64_t g = 0; g < w.groups; ++g) {
    const int64_t start = g * w.group;
    __m512 acc[TT];
    for (int t = 0; t < TT; ++t) acc[t] = _mm512_setzero_ps();
    for (int64_t k = start; k < start + w.group; k += 32) {
      const __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(row + k / 2)));
      const __m512 even = _mm512_cvtepi32_ps(_mm512_and_si512(b, low4));
      const __m512 odd = _mm512_cvtepi32_ps(_mm512_srli_epi32(b, 4));
      for (int t = 0; t < TT; ++t) {
        acc[t] = _mm512_fmadd_ps(even, _mm512_loadu_ps(xr[t] + k), acc[t]);
        acc[t] = _mm512_fmadd_ps(odd, _mm512_loadu_ps(xr[t] + k + 16), acc[t]);
      }
    }
    const __m512 s = _mm512_set1_ps(sc[g]);
    const int half = (int)(g & 1);
    for (int t = 0; t < TT; ++t) total[2 * t + half] = _mm512_fmadd_ps(acc[t], s, total[2 * t + half]);
  }
  for (int t = 0; t < TT; ++t)
    y[(t0 + t) * w.out + o] = _mm512_reduce_add_ps(_mm512_add_ps(total[2 * t], total[2 * t + 1])) -
                              zero_offset(sc, zr, xsum + (t0 + t) * w.groups, w.groups);
}

void tile4_any(int tt, const Rows4& w, int64_t o, int64_t t0, const float* xp, const float* xsum, const float* sc,
               const float* zr, float* y) {
  switch (tt) {
    case 1: return tile4<1>(w, o, t0, xp, xsum, sc, zr, y);
    case 2: return tile4<2>(w, o, t0, xp, xsum, sc, zr, y);
    case 3: return tile4<3>(w, o, t0, xp, xsum, sc, zr, y);
    case 4: return tile4<4>(w, o, t0, xp, xsum, sc, zr, y);
    case 5: return tile4<5>(w, o, t0, xp, xsum, sc, zr, y);
    case 6: return tile4<6>(w, o, t0, xp, xsum, sc, zr, y);
    case 7: return tile4<7>(w, o, t0, xp, xsum, sc, zr, y);
    default: return tile4<8>(w, o, t0, xp, xsum, sc, zr, y);
  }
}

// Row o's fp16 scales and zeros as floats (zeros: the midpoint 8 when symmetric, as qmatmul.cpp).
void row_params(const Rows4& w, int64_t o, float* sc, float* zr) {
  for (int64_t g = 0; g < w.groups; ++g) {
    sc[g] = bs::half_to_float(w.scale[o * w.groups + g]);
    zr[g] = w.zero ? bs::half_to_float(w.zero[o * w.groups + g]) : 8.f;
  }
}

void rows4(const Rows4& w, const float* xp, const float* xsum, int64_t T, float* y, int threads) {
  const int tiles = (int)((T + MAX_TILE - 1) / MAX_TILE);
  const int base = (int)(T / tiles), extra = (int)(T % tiles);  // tiles of near-equal size: 12 = 6 + 6
#pragma omp parallel num_threads(threads)
  {
    std::vector<float> params(2 * w.groups);
    float* sc = params.data();
    float* zr = sc + w.groups;
#pragma omp for schedule(static)
    for (int64_t o = 0; o < w.out; ++o) {
      row_params(w, o, sc, zr);
      int64_t t0 = 0;
      for (int i = 0; i < tiles; ++i) {
        const int tt = base + (i < extra);
        tile4_any(tt, w, o, t0, xp, xsum, sc, zr, y);
        t0 += tt;
      }
    }
  }
}
#endif

}  // namespace

extern "C" {

// Whether bs_small_gemm takes this layout with its own tiles (1) or hands it to the general gemv (0).
int64_t bs_small_gemm_tiled(int64_t bits, int64_t in, int64_t group) {
  return BS_SMALL_SIMD && bits == 4 && group % 32 == 0 && group > 0 && in % group == 0;
}

// y [T, out] = x [T, in] @ W^T in float32 (no int8 activations), each row exactly as the single-row
// float gemv computes it. Any T >= 1; meant for 2..16.
void bs_small_gemm(const uint8_t* packed, const uint16_t* scale, const uint16_t* zero, int64_t out, int64_t in,
                   int64_t bits, int64_t group, const float* x, int64_t T, float* y, int64_t threads) {
  const bs::Matrix m = bs::abi_matrix(packed, scale, zero, out, in, bits, group, false);
  std::vector<float> xsum(T * bs::gemv_groups(m), 0.f);
  std::vector<float> xp(T * in);
  bs::gemv_prepare(m, x, T, xsum.data(), xp.data());
#if BS_SMALL_SIMD
  if (bs_small_gemm_tiled(bits, in, group)) {
    const Rows4 w{packed, scale, zero, out, in, group, bs::gemv_groups(m), (in + 7) / 8 * 4};
    rows4(w, xp.data(), xsum.data(), T, y, (int)threads);
    return;
  }
#endif
#pragma omp parallel num_threads((int)threads)
  bs::gemv_rows(m, x, xp.data(), xsum.data(), T, y);
}

}  // extern "C"
