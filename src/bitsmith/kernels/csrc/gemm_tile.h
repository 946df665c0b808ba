// bitsmith: the int8 prefill GEMM's tiles (gemm_int8.cpp), for any weight rows that come out as
// natural-order unsigned byte codes with a float scale and scale * zero per group: gemm_int8.cpp's
// packed scalar codes (2-8 bits) and codebook_int8.cpp's vector codes (the int8 codebook + 128, zero
// 128). What the tiles compute, and why, is described at the top of gemm_int8.cpp. Included inside
// each file's anonymous namespace, after <immintrin.h>, where AVX-512 VNNI + VBMI are compiled in.
#pragma once

constexpr int NR = 32;  // weight rows per tile: two zmm of 16 rows x 4 codes
constexpr int MR = 4;   // activation rows per microkernel call (8 int32 + 16 float accumulators)

// One row of x to int8, natural order: q [in], xs [in / 32] (the block scales), xsum [groups]. The same
// arithmetic as qmatmul_int8.h's quantize_block: scale = amax / 127, q = nearbyint(x * (127 / amax));
// with DIVIDE, nearbyint(x / scale) as torch rounds it (the vq kernels' and int8_activations' rounding:
// the two differ where a value sits near a tie).
template <bool DIVIDE = false>
void quantize_row(const float* x, int64_t in, int64_t group, int64_t groups, int8_t* q, float* xs, float* xsum) {
  const __m512 sign = _mm512_set1_ps(-0.f);
  for (int64_t g = 0; g < groups; ++g) xsum[g] = 0.f;
  for (int64_t b = 0; b < in / 32; ++b) {
    const __m512 v0 = _mm512_loadu_ps(x + 32 * b), v1 = _mm512_loadu_ps(x + 32 * b + 16);
    const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_andnot_ps(sign, v0), _mm512_andnot_ps(sign, v1)));
    __m512i q0, q1;
    if (DIVIDE) {
      const __m512 step = _mm512_set1_ps(amax > 0.f ? amax / 127.f : 1.f);  // amax 0: x is 0, so is q
      q0 = _mm512_cvtps_epi32(_mm512_div_ps(v0, step)), q1 = _mm512_cvtps_epi32(_mm512_div_ps(v1, step));
    } else {
      const __m512 inv = _mm512_set1_ps(amax > 0.f ? 127.f / amax : 0.f);
      q0 = _mm512_cvtps_epi32(_mm512_mul_ps(v0, inv)), q1 = _mm512_cvtps_epi32(_mm512_mul_ps(v1, inv));
    }
    _mm_storeu_si128((__m128i*)(q + 32 * b), _mm512_cvtsepi32_epi8(q0));  // |q| <= 127: no saturation
    _mm_storeu_si128((__m128i*)(q + 32 * b + 16), _mm512_cvtsepi32_epi8(q1));
    xs[b] = amax / 127.f;
    xsum[32 * b / group] += xs[b] * (float)_mm512_reduce_add_epi32(_mm512_add_epi32(q0, q1));
  }
}

// The 32 rows' natural-order codes (scratch [32][in], rows past the matrix zero) interleaved for the
// microkernel: wb [in / 4][32][4], dword kk of each of 16 rows -> one 64-byte line.
inline void interleave_tile(const uint8_t* scratch, int64_t in, uint8_t* wb) {
  const __m512i base = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                          _mm512_set1_epi32((int)(in / 4)));
  for (int h = 0; h < 2; ++h)
    for (int64_t kk = 0; kk < in / 4; ++kk)
      _mm512_storeu_si512(wb + kk * 128 + 64 * h, _mm512_i32gather_epi32(_mm512_add_epi32(base, _mm512_set1_epi32((int)kk)),
                                                                         scratch + 16 * h * in, 4));
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

// y [T, out] = x [T, in] @ W^T, x rounded to int8 per 32-block. Rows: a per-thread reader of the weight
// rows, built from `args`, with kDivide (quantize_row's rounding), codes(o, c) (row o's natural-order
// unsigned codes into c [in]) and scales(o, g, s, sz) (group g's scale and scale * zero as floats).
template <class Rows>
void gemm_tiles(const typename Rows::Args& args, int64_t out, int64_t in, int64_t group, const float* x, int64_t T,
                float* y, int64_t threads) {
  const int64_t groups = (in + group - 1) / group, xblocks = in / 32, tiles = (out + NR - 1) / NR;
  std::vector<int8_t> q((size_t)(T * in));
  std::vector<float> xs((size_t)(T * xblocks)), xsum((size_t)(T * groups));
#pragma omp parallel num_threads((int)threads)
  {
#pragma omp for schedule(static)
    for (int64_t t = 0; t < T; ++t)
      quantize_row<Rows::kDivide>(x + t * in, in, group, groups, q.data() + t * in, xs.data() + t * xblocks,
                                  xsum.data() + t * groups);
    const Rows rows(args);
    std::vector<uint8_t> scratch((size_t)(NR * in));
    std::vector<uint8_t> wb((size_t)(NR * in) + 64);
    std::vector<float> sc((size_t)(groups * NR)), sz((size_t)(groups * NR));
#pragma omp for schedule(dynamic, 1)
    for (int64_t tile = 0; tile < tiles; ++tile) {
      const int64_t n0 = tile * NR;
      const int valid = (int)std::min<int64_t>(NR, out - n0);
      for (int r = 0; r < NR; ++r) {
        if (r < valid) {
          rows.codes(n0 + r, scratch.data() + r * in);
          for (int64_t g = 0; g < groups; ++g) rows.scales(n0 + r, g, &sc[g * NR + r], &sz[g * NR + r]);
        } else {  // rows past the matrix: zero codes with zero scales
          std::memset(scratch.data() + r * in, 0, (size_t)in);
          for (int64_t g = 0; g < groups; ++g) sc[g * NR + r] = sz[g * NR + r] = 0.f;
        }
      }
      interleave_tile(scratch.data(), in, wb.data());
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
}
