// bitsmith decode attention for one new token (csrc/decode.cpp): softmax(scaling * q . k_s) @ v_s over
// a float32 or fp16 KV cache, one head or several heads of one KV group at a time, in float32 vector
// code; split out of decode.cpp and included by step.h (decode.cpp, verify.cpp: internal to each).
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>

#include "gemv.h"

namespace {

// exp(x) without a library call, so `omp simd` loops over it vectorise (softmax, SiLU): Cephes-style
// range reduction x = n ln2 + r and a degree-6 polynomial, within a few ulp of expf; x is clamped to
// [-87, 88] (exp(-87) ~ 1.6e-38 stands in for smaller results, which softmax and SiLU cannot tell apart).
inline float exp_fast(float x) {
  x = x < -87.f ? -87.f : (x > 88.f ? 88.f : x);
  const float n = std::floor(x * 1.44269504088896341f + 0.5f);
  float r = x - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.f;
  return p * __builtin_bit_cast(float, ((int32_t)n + 127) << 23);
}

#if defined(__AVX512F__)
// exp_fast on 16 lanes, the same steps (2^n by one vscalefps). GCC 12 vectorised neither of the `omp simd`
// loops that call exp_fast (gated's not at all, softmax's only in a version it did not take): in a Qwen2.5
// 1.5B decode token at 1 thread, gated and softmax ran scalar for ~2.5% of the time (session 16 profile).
inline __m512 exp16(__m512 x) {
  x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.f)), _mm512_set1_ps(88.f));
  const __m512 n = _mm512_roundscale_ps(_mm512_fmadd_ps(x, _mm512_set1_ps(1.44269504088896341f), _mm512_set1_ps(0.5f)),
                                        _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fmadd_ps(n, _mm512_set1_ps(2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_add_ps(_mm512_fmadd_ps(_mm512_mul_ps(p, r), r, r), _mm512_set1_ps(1.f));
  return _mm512_scalef_ps(p, n);
}
// The lanes [i, i + 16) of [0, n) that exist.
inline __mmask16 tail16(int64_t i, int64_t n) {
  return n - i >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (n - i)) - 1u);
}
#endif

// 16 floats as one value (GCC/Clang vector extension): one AVX-512 register, two AVX2 ones, or
// four SSE ones, whatever -march=native gives; used where D is a multiple of 16.
typedef float v16 __attribute__((vector_size(64)));
typedef float v8 __attribute__((vector_size(32)));
typedef float v4 __attribute__((vector_size(16)));
inline v16 load16(const float* p) { v16 v; std::memcpy(&v, p, sizeof v); return v; }
// 16 halves -> 16 floats. With AVX-512 one conversion straight into the vector type: going through
// memcpy (as the F16C version must, for two halves) cost SmolLM2's decode 20% in the attention loop.
#if defined(__AVX512F__)
inline v16 load16(const uint16_t* p) { return (v16)_mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)p)); }
#elif defined(__F16C__)
inline v16 load16(const uint16_t* p) {
  const __m256 a = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)p));
  const __m256 b = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(p + 8)));
  v16 v;
  std::memcpy(&v, &a, sizeof a);
  std::memcpy(reinterpret_cast<char*>(&v) + sizeof a, &b, sizeof b);
  return v;
}
#else
inline v16 load16(const uint16_t* p) {
  v16 v;
  for (int i = 0; i < 16; ++i) v[i] = bs::half_to_float(p[i]);
  return v;
}
#endif
inline float load1(const float* p) { return *p; }
inline float load1(const uint16_t* p) { return bs::half_to_float(*p); }
inline void store16(float* p, v16 v) { std::memcpy(p, &v, sizeof v); }
inline float hsum16(v16 v) {
  v8 a, b;
  std::memcpy(&a, &v, sizeof a);
  std::memcpy(&b, reinterpret_cast<const char*>(&v) + sizeof a, sizeof b);
  a += b;
  v4 c, d;
  std::memcpy(&c, &a, sizeof c);
  std::memcpy(&d, reinterpret_cast<const char*>(&a) + sizeof c, sizeof d);
  c += d;
  return (c[0] + c[2]) + (c[1] + c[3]);
}

// softmax over scores[0, S) in place, normalised; the shift by the maximum as torch's softmax does.
void softmax(float* scores, int64_t S, float mx) {
#if defined(__AVX512F__)
  __m512 total = _mm512_setzero_ps();
  for (int64_t s = 0; s < S; s += 16) {
    const __mmask16 k = tail16(s, S);
    const __m512 e = exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, scores + s), _mm512_set1_ps(mx)));
    _mm512_mask_storeu_ps(scores + s, k, e);
    total = _mm512_mask_add_ps(total, k, total, e);
  }
  const __m512 inv = _mm512_set1_ps(1.f / _mm512_reduce_add_ps(total));
  for (int64_t s = 0; s < S; s += 16) {
    const __mmask16 k = tail16(s, S);
    _mm512_mask_storeu_ps(scores + s, k, _mm512_mul_ps(_mm512_maskz_loadu_ps(k, scores + s), inv));
  }
#else
  float sum = 0.f;
#pragma omp simd reduction(+ : sum)
  for (int64_t s = 0; s < S; ++s) {
    scores[s] = exp_fast(scores[s] - mx);
    sum += scores[s];
  }
  const float inv = 1.f / sum;
#pragma omp simd
  for (int64_t s = 0; s < S; ++s) scores[s] *= inv;
#endif
}

// out [D] = softmax(scaling * q . k_s) @ v_s over the cached positions s in [lo, pos) (K, V: float or
// half) and this one (k_now, v_now: not read back from the cache, which thread 0 may be writing).
// D = 16 * C: q and the output stay in registers, one fresh FMA chain per key.
template <int C, typename KV>
void attend_head_v(const float* q, const KV* K, const KV* V, const float* k_now, const float* v_now, int64_t lo,
                   int64_t pos, float scaling, float* scores, float* out) {
  constexpr int64_t D = 16 * C;
  const int64_t S = pos + 1 - lo;
  v16 qv[C], acc[C];
  for (int c = 0; c < C; ++c) {
    qv[c] = load16(q + 16 * c);
    acc[c] = v16{};
  }
  float mx = -INFINITY;
  for (int64_t s = 0; s < S; ++s) {
    v16 dot;
    if (lo + s < pos) {
      const KV* k = K + (lo + s) * D;
      dot = qv[0] * load16(k);
      for (int c = 1; c < C; ++c) dot += qv[c] * load16(k + 16 * c);
    } else {
      dot = qv[0] * load16(k_now);
      for (int c = 1; c < C; ++c) dot += qv[c] * load16(k_now + 16 * c);
    }
    scores[s] = hsum16(dot) * scaling;
    mx = scores[s] > mx ? scores[s] : mx;
  }
  softmax(scores, S, mx);
  for (int64_t s = 0; s + lo < pos; ++s) {
    const KV* v = V + (lo + s) * D;
    const float p = scores[s];
    for (int c = 0; c < C; ++c) acc[c] += p * load16(v + 16 * c);
  }
  for (int c = 0; c < C; ++c) acc[c] += scores[S - 1] * load16(v_now + 16 * c);
  for (int c = 0; c < C; ++c) store16(out + 16 * c, acc[c]);
}

// NH heads of one KV group at once (q, out: [NH, D]; scores: NH rows max_len apart): each cached key
// and value row is loaded and widened once for the NH heads instead of once per head. Per head the
// arithmetic is attend_head_v's, in the same order, so the results are the same bits.
template <int C, int NH, typename KV>
void attend_heads_v(const float* q, const KV* K, const KV* V, const float* k_now, const float* v_now, int64_t lo,
                    int64_t pos, float scaling, float* scores, int64_t stride, float* out) {
  constexpr int64_t D = 16 * C;
  const int64_t S = pos + 1 - lo;
  v16 qv[NH][C];
  float mx[NH];
  for (int h = 0; h < NH; ++h) {
    for (int c = 0; c < C; ++c) qv[h][c] = load16(q + h * D + 16 * c);
    mx[h] = -INFINITY;
  }
  for (int64_t s = 0; s < S; ++s) {
    v16 kv[C];
    if (lo + s < pos)
      for (int c = 0; c < C; ++c) kv[c] = load16(K + (lo + s) * D + 16 * c);
    else
      for (int c = 0; c < C; ++c) kv[c] = load16(k_now + 16 * c);
    for (int h = 0; h < NH; ++h) {
      v16 dot = qv[h][0] * kv[0];
      for (int c = 1; c < C; ++c) dot += qv[h][c] * kv[c];
      const float score = hsum16(dot) * scaling;
      scores[h * stride + s] = score;
      mx[h] = score > mx[h] ? score : mx[h];
    }
  }
  for (int h = 0; h < NH; ++h) softmax(scores + h * stride, S, mx[h]);
  v16 acc[NH][C];
  for (int h = 0; h < NH; ++h)
    for (int c = 0; c < C; ++c) acc[h][c] = v16{};
  for (int64_t s = 0; s + lo < pos; ++s) {
    v16 vv[C];
    for (int c = 0; c < C; ++c) vv[c] = load16(V + (lo + s) * D + 16 * c);
    for (int h = 0; h < NH; ++h) {
      const float p = scores[h * stride + s];
      for (int c = 0; c < C; ++c) acc[h][c] += p * vv[c];
    }
  }
  for (int h = 0; h < NH; ++h)
    for (int c = 0; c < C; ++c) {
      acc[h][c] += scores[h * stride + S - 1] * load16(v_now + 16 * c);
      store16(out + h * D + 16 * c, acc[h][c]);
    }
}

// attend_group_v's prefetch, in cached rows ahead of the 4-position score block: the key rows (into L1)
// and the value rows (into L2, read right after the scores). The cache comes from memory every token (the
// weights' stream evicts it from L3): in a scratch A/B of 28 layers' groups of 6 heads over 544 positions
// with the cache evicted, 16 / 16 took ~0.7x the time of no prefetch (8-32 rows: within noise of it).
#ifndef BS_ATT_PF
#define BS_ATT_PF 16
#endif
#ifndef BS_ATT_PFV
#define BS_ATT_PFV 16
#endif
#if defined(__AVX512F__)
// attend_group_v's scores: scores[h * stride + s] = scaling * q_h . k_s over [lo, pos] (k_now last), and
// each head's maximum into mx. The value rows of each block are prefetched into L2 for group_values.
template <int C, int NH, typename KV>
void group_scores(const float* q, const KV* K, const KV* V, const float* k_now, int64_t lo, int64_t pos, float scaling,
                  float* scores, int64_t stride, float* mx) {
  constexpr int64_t D = 16 * C;
  const int64_t S = pos + 1 - lo, cached = pos - lo;
  const __m128 scale4 = _mm_set1_ps(scaling);
  __m128 mx4[NH];
  for (int h = 0; h < NH; ++h) mx4[h] = _mm_set1_ps(-INFINITY);
  int64_t s = 0;
  for (; s + 4 <= cached; s += 4) {
    for (int i = 0; i < 4; ++i)  // rows past the cache's end are prefetched too (never faults)
      for (int64_t b = 0; b < D * (int64_t)sizeof(KV); b += 64) {
        if (BS_ATT_PF) _mm_prefetch((const char*)(K + (lo + s + i + BS_ATT_PF) * D) + b, _MM_HINT_T0);
        if (BS_ATT_PFV) _mm_prefetch((const char*)(V + (lo + s + i + BS_ATT_PFV) * D) + b, _MM_HINT_T1);
      }
    __m512 dot[NH][4];
    for (int h = 0; h < NH; ++h)
      for (int i = 0; i < 4; ++i) dot[h][i] = _mm512_setzero_ps();
    for (int c = 0; c < C; ++c) {
      __m512 k[4];
      for (int i = 0; i < 4; ++i) k[i] = (__m512)load16(K + (lo + s + i) * D + 16 * c);
      for (int h = 0; h < NH; ++h) {
        const __m512 qc = _mm512_loadu_ps(q + h * D + 16 * c);
        for (int i = 0; i < 4; ++i) dot[h][i] = _mm512_fmadd_ps(qc, k[i], dot[h][i]);
      }
    }
    for (int h = 0; h < NH; ++h) {
      const __m128 sc = _mm_mul_ps(bs::sum4(dot[h]), scale4);
      _mm_storeu_ps(scores + h * stride + s, sc);
      mx4[h] = _mm_max_ps(mx4[h], sc);
    }
  }
  for (int h = 0; h < NH; ++h) {
    const __m128 m2 = _mm_max_ps(mx4[h], _mm_movehl_ps(mx4[h], mx4[h]));
    mx[h] = _mm_cvtss_f32(_mm_max_ss(m2, _mm_shuffle_ps(m2, m2, 1)));
  }
  for (; s < S; ++s) {  // the cached positions left over, then this one (k_now)
    for (int h = 0; h < NH; ++h) {
      __m512 dot = _mm512_setzero_ps();
      for (int c = 0; c < C; ++c) {
        const __m512 kc = s < cached ? (__m512)load16(K + (lo + s) * D + 16 * c) : _mm512_loadu_ps(k_now + 16 * c);
        dot = _mm512_fmadd_ps(_mm512_loadu_ps(q + h * D + 16 * c), kc, dot);
      }
      const float score = _mm512_reduce_add_ps(dot) * scaling;
      scores[h * stride + s] = score;
      mx[h] = score > mx[h] ? score : mx[h];
    }
  }
}

// attend_group_v's output: out[h] = sum_s p[h][s] v_s over [lo, pos] (v_now last), CB column blocks of 16
// at a time over all positions.
template <int C, int NH, typename KV>
void group_values(const float* p, const KV* V, const float* v_now, int64_t lo, int64_t pos, int64_t stride, float* out) {
  constexpr int64_t D = 16 * C;
  constexpr int CB = NH <= 4 ? 4 : 2;  // accumulators NH * CB <= 16
  static_assert(C % CB == 0, "column blocks");
  const int64_t cached = pos - lo;
  for (int c0 = 0; c0 < C; c0 += CB) {
    __m512 acc[NH][CB];
    for (int h = 0; h < NH; ++h)
      for (int b = 0; b < CB; ++b) acc[h][b] = _mm512_setzero_ps();
    for (int64_t t = 0; t < cached; ++t) {
      __m512 vv[CB];
      for (int b = 0; b < CB; ++b) vv[b] = (__m512)load16(V + (lo + t) * D + 16 * (c0 + b));
      for (int h = 0; h < NH; ++h) {
        const __m512 w = _mm512_set1_ps(p[h * stride + t]);
        for (int b = 0; b < CB; ++b) acc[h][b] = _mm512_fmadd_ps(w, vv[b], acc[h][b]);
      }
    }
    for (int h = 0; h < NH; ++h) {
      const __m512 w = _mm512_set1_ps(p[h * stride + cached]);
      for (int b = 0; b < CB; ++b)
        _mm512_storeu_ps(out + h * D + 16 * (c0 + b), _mm512_fmadd_ps(w, _mm512_loadu_ps(v_now + 16 * (c0 + b)), acc[h][b]));
    }
  }
}

// NH (3-6) heads of one KV group of D = 16 * C, more than attend_heads_v keeps in registers (Qwen2.5
// 1.5B: 6 heads of 128 per group, which it took 2 at a time, widening each cached row 3 times and
// summing every score horizontally). Scores: 4 cached positions at a time, each key row widened once
// for the NH heads (q read from L1), the 4 x NH dot products reduced by one bs::sum4 per head. Values:
// CB column blocks of 16 at a time over all positions (NH x CB accumulators), each value row widened
// once. The sums run in another order than attend_head_v's (not the same bits; torch's order is
// neither's).
template <int C, int NH, typename KV>
void attend_group_v(const float* q, const KV* K, const KV* V, const float* k_now, const float* v_now, int64_t lo,
                    int64_t pos, float scaling, float* scores, int64_t stride, float* out) {
  float mx[NH];
  group_scores<C, NH>(q, K, V, k_now, lo, pos, scaling, scores, stride, mx);
  for (int h = 0; h < NH; ++h) softmax(scores + h * stride, pos + 1 - lo, mx[h]);
  group_values<C, NH>(scores, V, v_now, lo, pos, stride, out);
}
#endif

// The most heads one unit attends at once for a head size: attend_heads_v keeps q and the accumulators
// in registers; attend_group_v (AVX-512) takes 3-6 heads of 128.
#if defined(__AVX512F__)
inline int64_t max_grouped(int64_t D) { return D <= 64 ? 4 : D == 128 ? 6 : 1; }
#else
inline int64_t max_grouped(int64_t D) { return D <= 64 ? 4 : D == 128 ? 2 : 1; }
#endif

// Any D (the vector version above for multiples of 16 up to 256).
template <typename KV>
void attend_head(const float* q, const KV* K, const KV* V, const float* k_now, const float* v_now, int64_t lo,
                 int64_t pos, int64_t D, float scaling, float* scores, float* out) {
  switch (D) {
    case 16: return attend_head_v<1>(q, K, V, k_now, v_now, lo, pos, scaling, scores, out);
    case 32: return attend_head_v<2>(q, K, V, k_now, v_now, lo, pos, scaling, scores, out);
    case 64: return attend_head_v<4>(q, K, V, k_now, v_now, lo, pos, scaling, scores, out);
    case 128: return attend_head_v<8>(q, K, V, k_now, v_now, lo, pos, scaling, scores, out);
    case 256: return attend_head_v<16>(q, K, V, k_now, v_now, lo, pos, scaling, scores, out);
  }
  const int64_t S = pos + 1 - lo;
  float mx = -INFINITY;
  for (int64_t s = 0; s < S; ++s) {
    float dot = 0.f;
    if (lo + s < pos) {
      const KV* k = K + (lo + s) * D;
      for (int64_t d = 0; d < D; ++d) dot += q[d] * load1(k + d);
    } else {
#pragma omp simd reduction(+ : dot)
      for (int64_t d = 0; d < D; ++d) dot += q[d] * k_now[d];
    }
    scores[s] = dot * scaling;
    mx = scores[s] > mx ? scores[s] : mx;
  }
  softmax(scores, S, mx);
  for (int64_t d = 0; d < D; ++d) out[d] = 0.f;
  for (int64_t s = 0; s < S; ++s) {
    const float p = scores[s];
    if (lo + s < pos) {
      const KV* v = V + (lo + s) * D;
      for (int64_t d = 0; d < D; ++d) out[d] += p * load1(v + d);
    } else {
#pragma omp simd
      for (int64_t d = 0; d < D; ++d) out[d] += p * v_now[d];
    }
  }
}

}  // namespace
