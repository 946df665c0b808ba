// bitsmith CPU kernels: causal attention for a prompt slice (prefill), float32, over the lean runner's
// KV cache (float32 or fp16), AVX-512.
//
// Why: with the int8 GEMM (gemm_int8.cpp) the linears of SmolLM2-135M's 512-token prefill take ~100 ms
// and torch's CPU flash attention as much again. That kernel takes keys in blocks of 512, so a causal
// 512-token prompt computes the whole square of scores. Here each block of BQ query rows scores only the
// keys up to its last row's position (the waste is the diagonal block), in three exact passes per block:
//   1. S [BQ][keys] = scaling * Q K^T: K is transposed once per call into KT [D][S] floats, so one zmm
//      load is 16 keys at one dimension, multiplied into 8 query rows by broadcast FMAs;
//   2. per row, the causal mask (keys past the row's position), the maximum, exp and the sum;
//   3. O [BQ][D] = P V / sum: V is widened once per call into float32 rows; 4 query rows x D share each
//      row of V.
// Tasks are (head, query block) pairs, dynamically scheduled (later blocks have more keys). GQA: head h
// reads KV head h / (H / KV). Sliding windows and logit soft-capping are not handled here (the caller
// keeps torch's path for them).

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "attention.h"

#if defined(__AVX512F__)
#define BS_ATTN 1
#else
#define BS_ATTN 0
#endif

namespace {

#if BS_ATTN
constexpr int64_t BQ = 32;  // query rows per task

// KT [D][S] (row stride S) and VF [S][D] floats of one KV head's keys [0, n).
template <typename KV>
void widen_head(const KV* K, const KV* V, int64_t n, int64_t S, int64_t D, float* kt, float* vf) {
  for (int64_t s = 0; s < n; ++s)
    for (int64_t d = 0; d < D; d += 16) {
      const v16 kv = load16(K + s * D + d), vv = load16(V + s * D + d);
      store16(vf + s * D + d, vv);
      for (int j = 0; j < 16; ++j) kt[(d + j) * S + s] = kv[j];
    }
}

// Scores of R query rows (q [R][D]) against keys [k0, k0 + 32): s [R][ldS].
template <int R>
void scores_tile(const float* q, int64_t D, const float* kt, int64_t S, int64_t k0, float scaling, float* s, int64_t ldS) {
  __m512 acc[R][2];
  for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
  for (int64_t d = 0; d < D; ++d) {
    const __m512 k0v = _mm512_loadu_ps(kt + d * S + k0), k1v = _mm512_loadu_ps(kt + d * S + k0 + 16);
    for (int r = 0; r < R; ++r) {
      const __m512 qd = _mm512_set1_ps(q[r * D + d]);
      acc[r][0] = _mm512_fmadd_ps(qd, k0v, acc[r][0]);
      acc[r][1] = _mm512_fmadd_ps(qd, k1v, acc[r][1]);
    }
  }
  const __m512 sc = _mm512_set1_ps(scaling);
  for (int r = 0; r < R; ++r) {
    _mm512_storeu_ps(s + r * ldS + k0, _mm512_mul_ps(acc[r][0], sc));
    _mm512_storeu_ps(s + r * ldS + k0 + 16, _mm512_mul_ps(acc[r][1], sc));
  }
}

// Row r's probabilities in place over keys [0, n) (exp(s - max), unnormalised; keys [n, width) set to 0);
// returns their sum.
// The lanes past n load as -inf, not 0: a row whose scores are all below -87 (Qwen2.5's layer 0 reaches
// -1,601 .. 12,381) would otherwise take 0 as its maximum, and exp16's clamp would flatten it.
float softmax_row(float* s, int64_t n, int64_t width) {
  const __m512 neg_inf = _mm512_set1_ps(-INFINITY);
  __m512 mx = neg_inf;
  for (int64_t j = 0; j < n; j += 16) mx = _mm512_max_ps(mx, _mm512_mask_loadu_ps(neg_inf, tail16(j, n), s + j));
  const __m512 m = _mm512_set1_ps(_mm512_reduce_max_ps(mx));
  __m512 total = _mm512_setzero_ps();
  for (int64_t j = 0; j < width; j += 16) {
    const __mmask16 k = j < n ? tail16(j, n) : (__mmask16)0;
    const __m512 p = _mm512_maskz_mov_ps(k, exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, s + j), m)));
    _mm512_storeu_ps(s + j, p);
    total = _mm512_add_ps(total, p);
  }
  return _mm512_reduce_add_ps(total);
}

// O rows [R][16 DV] (row stride ldO) = P [R][keys 0..n) @ VF / sums.
template <int R, int DV>
void values_tile(const float* p, int64_t ldS, int64_t n, const float* vf, const float* sums, float* o, int64_t ldO) {
  constexpr int64_t D = 16 * DV;
  __m512 acc[R][DV];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < DV; ++c) acc[r][c] = _mm512_setzero_ps();
  for (int64_t j = 0; j < n; ++j) {
    __m512 v[DV];
    for (int c = 0; c < DV; ++c) v[c] = _mm512_loadu_ps(vf + j * D + 16 * c);
    for (int r = 0; r < R; ++r) {
      const __m512 pj = _mm512_set1_ps(p[r * ldS + j]);
      for (int c = 0; c < DV; ++c) acc[r][c] = _mm512_fmadd_ps(pj, v[c], acc[r][c]);
    }
  }
  for (int r = 0; r < R; ++r) {
    const __m512 inv = _mm512_set1_ps(1.f / sums[r]);
    for (int c = 0; c < DV; ++c) _mm512_storeu_ps(o + r * ldO + 16 * c, _mm512_mul_ps(acc[r][c], inv));
  }
}

// All rows of a block through values_tile, R rows at a time (R x DV accumulators fit the 32 registers).
template <int DV>
void values_rows(const float* s, int64_t width, int64_t rows, int64_t first_keys, const float* vf, const float* sums,
                 float* ob, int64_t ldO) {
  constexpr int R = DV <= 4 ? 4 : 2;
  int64_t r = 0;
  for (; r + R <= rows; r += R)  // the last of these rows sees first_keys + r + R keys
    values_tile<R, DV>(s + r * width, width, first_keys + r + R, vf, sums + r, ob + r * ldO, ldO);
  for (; r < rows; ++r) values_tile<1, DV>(s + r * width, width, first_keys + r + 1, vf, sums + r, ob + r * ldO, ldO);
}

// One task: head h, query rows [i0, i1) at positions start + i.
void attend_block(const float* q, int64_t T, int64_t D, const float* kt, const float* vf, int64_t S, int64_t start,
                  float scaling, int64_t i0, int64_t i1, int64_t h, int64_t H, float* out, float* s) {
  const int64_t rows = i1 - i0, keys = start + i1;  // the block's last row sees keys [0, start + i1)
  const int64_t width = (keys + 31) / 32 * 32;      // scores are computed 32 keys at a time (KT is padded)
  const float* qb = q + (h * T + i0) * D;
  int64_t r = 0;
  for (; r + 8 <= rows; r += 8)
    for (int64_t k0 = 0; k0 < width; k0 += 32) scores_tile<8>(qb + r * D, D, kt, S, k0, scaling, s + r * width, width);
  for (; r < rows; ++r)
    for (int64_t k0 = 0; k0 < width; k0 += 32) scores_tile<1>(qb + r * D, D, kt, S, k0, scaling, s + r * width, width);
  float sums[BQ];
  for (r = 0; r < rows; ++r) sums[r] = softmax_row(s + r * width, start + i0 + r + 1, width);
  const int64_t ldO = H * D, first = start + i0;  // row r sees first + r + 1 keys (later ones are zeros)
  float* ob = out + i0 * ldO + h * D;
  switch (D / 16) {
    case 1: values_rows<1>(s, width, rows, first, vf, sums, ob, ldO); break;
    case 2: values_rows<2>(s, width, rows, first, vf, sums, ob, ldO); break;
    case 3: values_rows<3>(s, width, rows, first, vf, sums, ob, ldO); break;
    case 4: values_rows<4>(s, width, rows, first, vf, sums, ob, ldO); break;
    case 5: values_rows<5>(s, width, rows, first, vf, sums, ob, ldO); break;
    case 6: values_rows<6>(s, width, rows, first, vf, sums, ob, ldO); break;
    case 7: values_rows<7>(s, width, rows, first, vf, sums, ob, ldO); break;
    default: values_rows<8>(s, width, rows, first, vf, sums, ob, ldO); break;
  }
}

template <typename KV>
void attend_all(const float* q, const KV* K, const KV* V, int64_t H, int64_t KVH, int64_t T, int64_t start, int64_t D,
                int64_t stride, float scaling, float* out, int64_t threads) {
  const int64_t S = (start + T + 31) / 32 * 32;  // keys, padded to whole 32-key tiles (zeros)
  std::vector<float> kt((size_t)(KVH * D * S), 0.f), vf((size_t)(KVH * S * D), 0.f);
  const int64_t blocks = (T + BQ - 1) / BQ, rep = H / KVH;
#pragma omp parallel num_threads((int)threads)
  {
#pragma omp for schedule(static)
    for (int64_t g = 0; g < KVH; ++g)
      widen_head(K + g * stride * D, V + g * stride * D, start + T, S, D, kt.data() + g * D * S, vf.data() + g * S * D);
    std::vector<float> s((size_t)(BQ * S));
#pragma omp for schedule(dynamic, 1)
    for (int64_t task = 0; task < H * blocks; ++task) {
      const int64_t b = blocks - 1 - task / H, h = task % H;  // the longest blocks first
      const int64_t g = h / rep, i0 = b * BQ, i1 = std::min(T, i0 + BQ);
      attend_block(q, T, D, kt.data() + g * D * S, vf.data() + g * S * D, S, start, scaling, i0, i1, h, H, out, s.data());
    }
  }
}
#endif

}  // namespace

extern "C" {

// Whether bs_attn_prefill runs heads of D dimensions on this build.
int64_t bs_attn_prefill_takes(int64_t D) { return BS_ATTN && D > 0 && D % 16 == 0 && D <= 128; }

// out [T, H * D] = causal softmax(scaling * q k^T) v for query rows q [H, T, D] (float32) at positions
// [start, start + T), against the cache K, V [KVH, stride, D] (fp16 when half != 0, else float32) holding
// keys [0, start + T). H a multiple of KVH; the caller checked bs_attn_prefill_takes(D).
void bs_attn_prefill(const float* q, const void* K, const void* V, int64_t half, int64_t H, int64_t KVH, int64_t T,
                     int64_t start, int64_t D, int64_t stride, float scaling, float* out, int64_t threads) {
#if BS_ATTN
  if (half)
    attend_all(q, (const uint16_t*)K, (const uint16_t*)V, H, KVH, T, start, D, stride, scaling, out, threads);
  else
    attend_all(q, (const float*)K, (const float*)V, H, KVH, T, start, D, stride, scaling, out, threads);
#else
  (void)q, (void)K, (void)V, (void)half, (void)H, (void)KVH, (void)T, (void)start, (void)D, (void)stride,
      (void)scaling, (void)out, (void)threads;
#endif
}

}  // extern "C"
