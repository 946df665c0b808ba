// bitsmith CPU kernels: the int8 prefill GEMM, y [T, out] = x [T, in] @ W^T for many activation rows
// (prefill, chunked serving, the calibrated passes), straight from the packed codes, on AVX-512 VNNI.
//
// Why: the exact prefill dequantizes weight blocks to float32 and runs sgemm: 2 flops per weight per
// row at float32 FMA rate. vpdpbusd multiplies 64 u8 codes by 64 int8 activations per instruction,
// four times the products of a float32 FMA, and the codes never become floats. The arithmetic is the
// int8 decode's (vbmi.cpp, qmatmul_int8.h), llama.cpp's trade for every matmul: x rounded to int8 with
// one scale per block of 32 inputs (max|x| / 127, round half to even), then the exact product of the
// dequantized weights with that rounded x; tests/kernels/int8_oracle.py is the oracle for both.
//
// Per tile of NR = 32 weight rows (one thread's unit of work):
//   1. the rows' codes are unpacked once (Unpack: any width 2-8, natural order; the 3-bit mixed layout
//      through mixed3_codes_row) and laid out interleaved, wb [in / 4][32 rows][4 codes], so one zmm is
//      16 rows x 4 consecutive codes and an int32 lane of vpdpbusd is one output row: no horizontal
//      sums (llama.cpp repacks Q4_0 rows 8 by 8 at load time for the same reason; here the packed file
//      stays as it is and each call pays the unpack, about 1/T of the products);
//   2. for MR = 4 activation rows at a time, per 32-block: 8 vpdpbusd steps (4 codes each) into 8 int32
//      accumulators (4 rows x 2 halves of the tile), converted and scaled by the block's x scale into
//      float group sums; per group: times the rows' weight scales, minus scale * zero * xsum (the
//      zero-point term: sum over the group's blocks of xs_b * sum(q_b), as the decode computes it).
// Shapes: in a multiple of 64 (whole Unpack chunks), group a multiple of 32 (a 32-block never splits
// a group; the last group may be short: SmolLM2's 576 = 4.5 groups of 128). kernels/cpu.py asks
// bs_gemm_int8_takes and keeps the exact path otherwise.

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "gemv.h"

#if defined(__AVX512VBMI__) && defined(__AVX512VNNI__) && defined(__AVX512BW__) && defined(__AVX512VL__) && \
    defined(__AVX512DQ__) && defined(__F16C__)
#include <immintrin.h>
#define BS_GEMM8 1
#else
#define BS_GEMM8 0
#endif

namespace {

#if BS_GEMM8
#include "unpack.h"

constexpr int NR = 32;  // weight rows per tile: two zmm of 16 rows x 4 codes
constexpr int MR = 4;   // activation rows per microkernel call (8 int32 + 16 float accumulators)

// One row of x to int8, natural order: q [in], xs [in / 32] (the block scales), xsum [groups]. The same
// arithmetic as qmatmul_int8.h's quantize_block: scale = amax / 127, q = nearbyint(x * (127 / amax)).
void quantize_row(const float* x, int64_t in, int64_t group, int64_t groups, int8_t* q, float* xs, float* xsum) {
  const __m512 sign = _mm512_set1_ps(-0.f);
  for (int64_t g = 0; g < groups; ++g) xsum[g] = 0.f;
  for (int64_t b = 0; b < in / 32; ++b) {
    const __m512 v0 = _mm512_loadu_ps(x + 32 * b), v1 = _mm512_loadu_ps(x + 32 * b + 16);
    const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_andnot_ps(sign, v0), _mm512_andnot_ps(sign, v1)));
    const __m512 inv = _mm512_set1_ps(amax > 0.f ? 127.f / amax : 0.f);
    const __m512i q0 = _mm512_cvtps_epi32(_mm512_mul_ps(v0, inv)), q1 = _mm512_cvtps_epi32(_mm512_mul_ps(v1, inv));
    _mm_storeu_si128((__m128i*)(q + 32 * b), _mm512_cvtsepi32_epi8(q0));  // |q| <= 127: no saturation
    _mm_storeu_si128((__m128i*)(q + 32 * b + 16), _mm512_cvtsepi32_epi8(q1));
    xs[b] = amax / 127.f;
    xsum[32 * b / group] += xs[b] * (float)_mm512_reduce_add_epi32(_mm512_add_epi32(q0, q1));
  }
}

// Natural-order codes of weight row o into c [in].
void row_codes(const bs::Matrix& m, const Unpack& u, int64_t row_bytes, int64_t o, uint8_t* c) {
  if (m.layout == bs::kMixed3) return bs::mixed3_codes_row(m, o, c);
  const uint8_t* row = m.packed + o * row_bytes;
  for (int64_t k = 0; k < m.in; k += 64) _mm512_storeu_si512(c + k, u.codes(row + k / 8 * m.bits, (int)m.bits));
}

// The tile of rows [n0, n0 + 32) (rows past m.out are zero codes with zero scales):
// wb [in / 4][32][4] codes, sc [groups][32] scales, sz [groups][32] scale * zero. scratch: [16][in].
void pack_tile(const bs::Matrix& m, const Unpack& u, int64_t n0, uint8_t* scratch, uint8_t* wb, float* sc, float* sz) {
  const int64_t in = m.in, groups = bs::gemv_groups(m), row_bytes = (in + 7) / 8 * m.bits;
  const float mid = (float)((1 << m.bits) / 2);
  const __m512i base = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                          _mm512_set1_epi32((int)(in / 4)));
  for (int h = 0; h < 2; ++h) {
    for (int r = 0; r < 16; ++r) {
      const int64_t o = n0 + 16 * h + r;
      if (o < m.out) {
        row_codes(m, u, row_bytes, o, scratch + r * in);
      } else {
        std::memset(scratch + r * in, 0, in);
      }
    }
    // dword kk of each of the 16 rows -> one 64-byte line (a 16 x (in / 4) transpose of dwords)
    for (int64_t kk = 0; kk < in / 4; ++kk)
      _mm512_storeu_si512(wb + kk * 128 + 64 * h,
                          _mm512_i32gather_epi32(_mm512_add_epi32(base, _mm512_set1_epi32((int)kk)), scratch, 4));
  }
  for (int64_t g = 0; g < groups; ++g)
    for (int r = 0; r < NR; ++r) {
      const int64_t o = n0 + r;
      const float s = o < m.out ? bs::half_to_float(m.scale[o * groups + g]) : 0.f;
      const float z = o < m.out && m.zero ? bs::half_to_float(m.zero[o * groups + g]) : mid;
      sc[g * NR + r] = s;
      sz[g * NR + r] = s * z;
    }
}

// y rows [0, M) (stride ystride) of the tile's 32 columns (the first `valid`), from x rows q [M][in].
template <int M>
void micro(const uint8_t* wb, const float* sc, const float* sz, const int8_t* q, const float* xs, const float* xsum,
           int64_t in, int64_t group, int64_t groups, float* y, int64_t ystride, int valid) {
  const int64_t xblocks = in / 32;
  __m512 yacc[M][2];
  for (int i = 0; i < M; ++i) yacc[i][0] = yacc[i][1] = _mm512_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    const int64_t b_end = std::min((g + 1) * group, in) / 32;
    __m512 facc[M][2];
    for (int i = 0; i < M; ++i) facc[i][0] = facc[i][1] = _mm512_setzero_ps();
    for (int64_t b = g * group / 32; b < b_end; ++b) {
      __m512i acc[M][2];
      for (int i = 0; i < M; ++i) acc[i][0] = acc[i][1] = _mm512_setzero_si512();
      const uint8_t* wp = wb + b * 8 * 128;
      for (int s = 0; s < 8; ++s) {
        const __m512i w0 = _mm512_loadu_si512(wp + s * 128), w1 = _mm512_loadu_si512(wp + s * 128 + 64);
        for (int i = 0; i < M; ++i) {
          int32_t four;
          std::memcpy(&four, q + i * in + b * 32 + s * 4, 4);
          const __m512i xb = _mm512_set1_epi32(four);
          acc[i][0] = _mm512_dpbusd_epi32(acc[i][0], w0, xb);
          acc[i][1] = _mm512_dpbusd_epi32(acc[i][1], w1, xb);
        }
      }
      for (int i = 0; i < M; ++i) {
        const __m512 f = _mm512_set1_ps(xs[i * xblocks + b]);
        facc[i][0] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[i][0]), f, facc[i][0]);
        facc[i][1] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[i][1]), f, facc[i][1]);
      }
    }
    const __m512 s0 = _mm512_loadu_ps(sc + g * NR), s1 = _mm512_loadu_ps(sc + g * NR + 16);
    const __m512 z0 = _mm512_loadu_ps(sz + g * NR), z1 = _mm512_loadu_ps(sz + g * NR + 16);
    for (int i = 0; i < M; ++i) {
      const __m512 xg = _mm512_set1_ps(xsum[i * groups + g]);
      yacc[i][0] = _mm512_fnmadd_ps(z0, xg, _mm512_fmadd_ps(s0, facc[i][0], yacc[i][0]));
      yacc[i][1] = _mm512_fnmadd_ps(z1, xg, _mm512_fmadd_ps(s1, facc[i][1], yacc[i][1]));
    }
  }
  const __mmask16 k0 = valid >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << valid) - 1u);
  const __mmask16 k1 = valid >= 32 ? (__mmask16)0xFFFF : valid <= 16 ? (__mmask16)0 : (__mmask16)((1u << (valid - 16)) - 1u);
  for (int i = 0; i < M; ++i) {
    _mm512_mask_storeu_ps(y + i * ystride, k0, yacc[i][0]);
    _mm512_mask_storeu_ps(y + i * ystride + 16, k1, yacc[i][1]);
  }
}
#endif

}  // namespace

extern "C" {

// Whether bs_gemm_int8 runs a matrix of `in` inputs, `bits`-bit codes (| layout << kLayoutShift) and
// group `group` on this build.
int64_t bs_gemm_int8_takes(int64_t in, int64_t bits, int64_t group) {
  const int64_t layout = bits >> bs::kLayoutShift;
  bits &= (1 << bs::kLayoutShift) - 1;
  return BS_GEMM8 && bits >= 2 && bits <= 8 && in > 0 && in % 64 == 0 && group > 0 && group % 32 == 0 &&
         (layout == bs::kNatural || (layout == bs::kMixed3 && bits == 3));
}

// y [T, out] = x [T, in] @ W^T with x rounded to int8 per 32-block (see the top). The caller checked
// bs_gemm_int8_takes.
void bs_gemm_int8(const uint8_t* packed, const uint16_t* scale, const uint16_t* zero, int64_t out, int64_t in,
                  int64_t bits, int64_t group, const float* x, int64_t T, float* y, int64_t threads) {
#if BS_GEMM8
  const bs::Matrix m{packed, scale, zero, out, in, bits & ((1 << bs::kLayoutShift) - 1), group, true,
                     bits >> bs::kLayoutShift};
  const int64_t groups = bs::gemv_groups(m), xblocks = in / 32, tiles = (out + NR - 1) / NR;
  std::vector<int8_t> q((size_t)(T * in));
  std::vector<float> xs((size_t)(T * xblocks)), xsum((size_t)(T * groups));
#pragma omp parallel num_threads((int)threads)
  {
#pragma omp for schedule(static)
    for (int64_t t = 0; t < T; ++t)
      quantize_row(x + t * in, in, group, groups, q.data() + t * in, xs.data() + t * xblocks, xsum.data() + t * groups);
    const Unpack u((int)m.bits);
    std::vector<uint8_t> scratch((size_t)(16 * in));
    std::vector<uint8_t> wb((size_t)(NR * in) + 64);
    std::vector<float> sc((size_t)(groups * NR)), sz((size_t)(groups * NR));
#pragma omp for schedule(dynamic, 1)
    for (int64_t tile = 0; tile < tiles; ++tile) {
      const int64_t n0 = tile * NR;
      const int valid = (int)std::min<int64_t>(NR, out - n0);
      pack_tile(m, u, n0, scratch.data(), wb.data(), sc.data(), sz.data());
      int64_t t = 0;
      for (; t + MR <= T; t += MR)
        micro<MR>(wb.data(), sc.data(), sz.data(), q.data() + t * in, xs.data() + t * xblocks, xsum.data() + t * groups,
                  in, group, groups, y + t * out + n0, out, valid);
      const int8_t* qt = q.data() + t * in;
      const float *xst = xs.data() + t * xblocks, *xgt = xsum.data() + t * groups;
      switch (T - t) {
        case 3: micro<3>(wb.data(), sc.data(), sz.data(), qt, xst, xgt, in, group, groups, y + t * out + n0, out, valid); break;
        case 2: micro<2>(wb.data(), sc.data(), sz.data(), qt, xst, xgt, in, group, groups, y + t * out + n0, out, valid); break;
        case 1: micro<1>(wb.data(), sc.data(), sz.data(), qt, xst, xgt, in, group, groups, y + t * out + n0, out, valid); break;
        default: break;
      }
    }
  }
#else
  (void)packed, (void)scale, (void)zero, (void)out, (void)in, (void)bits, (void)group, (void)x, (void)T, (void)y,
      (void)threads;
#endif
}

}  // extern "C"
