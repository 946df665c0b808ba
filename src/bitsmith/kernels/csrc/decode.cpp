// bitsmith fused decode step: every decoder layer for one new token in one C call.
//
// The lean Python path (infer/lean.py) spends a small model's decode step on ~35 torch ops per layer,
// each far cheaper than its dispatch. Here the whole stack runs in one OpenMP parallel region: the
// matrix products share out their output rows over the team (bs::gemv_rows, the same code bs_gemv
// runs), attention shares out its heads, and the small elementwise steps (norms, RoPE, bias, residual,
// activation) run on one thread between them (`omp single`, whose barrier orders the steps).
//
// Everything a layer needs is described by BsLayer, built once per runner by infer/fused.py from the
// lean plan: packed matrices (q/k/v fused into one, gate/up into one), RMS norm weights already `w`
// or `1 + w`, the runner's KV cache and rotary tables. Arithmetic is float32 and follows lean.py's
// torch ops: rms_norm, x*cos + swap_halves(x)*signed_sin, softmax(scale * q.k) @ v over the cached
// positions (the last `window` only on sliding layers), o, sandwich norms, act(gate) * up, down.
//
// All struct fields are 8 bytes wide so the ctypes mirror in fused.py has no padding to get wrong.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>

#include <omp.h>

#include "gemv.h"

namespace {

struct BsMat {
  const uint8_t* packed;
  const uint16_t* scale;
  const uint16_t* zero;  // null: symmetric
  const float* bias;     // null: none
  int64_t out, in, bits, group;
};

struct BsNorm {
  const float* weight;  // null: this norm is absent
  double eps;
};

struct BsLayer {
  BsNorm in_norm, post_attn_norm, pre_mlp_norm, post_mlp_norm, q_norm, k_norm;
  BsMat qkv, o, gate_up, down;
  void* keys;    // [kv_heads, max_len, head_dim], float32, or fp16 (IEEE half) when kv_half
  void* values;  // [kv_heads, max_len, head_dim], same type
  const float* cos;  // [positions, head_dim]
  const float* sin;  // [positions, head_dim], first half negated (rotate_half's sign)
  int64_t heads, kv_heads, head_dim, window, act, max_len;  // window 0: attend to every position
  int64_t kv_half;
  double scaling;
};

// The model's end, when its head is a native-kernel matrix too: final norm, then logits = head(x), in
// the same parallel region as the layers (one region per token instead of two, and no torch ops
// between them). A model whose head is not (a float head, another kernel) leaves it to torch.
struct BsHead {
  BsNorm norm;
  BsMat head;      // [vocab, hidden]
  float* logits;   // [vocab], written
};

enum { ACT_SILU = 0, ACT_GELU_TANH = 1, ACT_GELU = 2 };

inline bs::Matrix matrix(const BsMat& m, bool int8) {
  return bs::Matrix{m.packed, m.scale, m.zero, m.out, m.in, m.bits, m.group, int8};
}

inline int64_t round16(int64_t n) { return (n + 15) / 16 * 16; }

// The vectors of a step, sized for the largest layer: shared ones are carved out of the caller's
// scratch buffer (offsets), each thread's own are allocated per call (sizes); all multiples of 16.
struct Scratch {
  int64_t qkv, attn, mo, gu, scores, total;  // shared: gemv outputs, attention output and scores
  int64_t nh, nx, nq, nsum, nxp, nact, own;  // per thread
  Scratch(const BsLayer* layers, int64_t n, const BsHead* head) {
    int64_t nqkv = 0, nattn = 0, nmo = 0, ngu = 0, nsc = 0;
    nh = nx = nsum = nxp = nact = 0;
    if (head) {
      nsum = bs::gemv_groups(matrix(head->head, false));
      nxp = nx = head->head.in;
    }
    for (int64_t l = 0; l < n; ++l) {
      const BsLayer& L = layers[l];
      const BsMat* mats[4] = {&L.qkv, &L.o, &L.gate_up, &L.down};
      for (const BsMat* m : mats) {
        nsum = std::max(nsum, bs::gemv_groups(matrix(*m, false)));
        nxp = std::max(nxp, m->in);
        nx = std::max(nx, std::max(m->in, m->out));
      }
      nh = std::max(nh, L.o.out);
      nqkv = std::max(nqkv, L.qkv.out);
      nattn = std::max(nattn, L.heads * L.head_dim);
      nmo = std::max(nmo, std::max(L.o.out, L.down.out));
      ngu = std::max(ngu, L.gate_up.out);
      nact = std::max(nact, L.down.in);
      nsc = std::max(nsc, L.heads * L.max_len);
    }
    int64_t at = 0;
    qkv = at; at += round16(nqkv);
    attn = at; at += round16(nattn);
    mo = at; at += round16(nmo);
    gu = at; at += round16(ngu);
    scores = at; at += round16(nsc);
    total = at;
    nh = round16(nh); nx = round16(nx); nq = round16(nqkv); nsum = round16(nsum); nxp = round16(nxp);
    nact = round16(nact);
    own = nh + nx + nq + nsum + nxp + nact;
  }
};

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

// y = rms_norm(x) * w over n values (y may be x).
void rms_norm(const float* x, const BsNorm& norm, int64_t n, float* y) {
  float ss = 0.f;
#pragma omp simd reduction(+ : ss)
  for (int64_t i = 0; i < n; ++i) ss += x[i] * x[i];
  const float r = 1.f / std::sqrt(ss / (float)n + (float)norm.eps);
  const float* w = norm.weight;
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) y[i] = x[i] * r * w[i];
}

// x [D] <- x * cos + swap_halves(x) * signed_sin
void rope(float* x, const float* cos, const float* sin, int64_t D, float* tmp) {
  const int64_t half = D / 2;
  std::memcpy(tmp, x, D * sizeof(float));
  for (int64_t d = 0; d < half; ++d) x[d] = tmp[d] * cos[d] + tmp[d + half] * sin[d];
  for (int64_t d = half; d < D; ++d) x[d] = tmp[d] * cos[d] + tmp[d - half] * sin[d];
}

void add_bias(float* y, const float* bias, int64_t n) {
  if (!bias) return;
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) y[i] += bias[i];
}

// The end of the attention and of the MLP: y = m x (shared gemv rows; the gemv's barrier included),
// plus bias, optional post-norm, added to this thread's residual stream h. ``out`` is the shared gemv
// output, ``tmp`` this thread's scratch; both m.out (= hidden) long.
void project_add(const bs::Matrix& m, const float* bias, const BsNorm& post_norm, const float* in, float* xsum,
                 float* xp, float* out, float* tmp, float* h) {
  const int64_t hidden = m.out;
  bs::gemv_prepare(m, in, 1, xsum, xp);
  bs::gemv_rows(m, in, xp, xsum, 1, out);  // barrier
  std::memcpy(tmp, out, hidden * sizeof(float));
  add_bias(tmp, bias, hidden);
  if (post_norm.weight) rms_norm(tmp, post_norm, hidden, tmp);
  for (int64_t i = 0; i < hidden; ++i) h[i] += tmp[i];
}

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
  float sum = 0.f;
#pragma omp simd reduction(+ : sum)
  for (int64_t s = 0; s < S; ++s) {
    scores[s] = exp_fast(scores[s] - mx);
    sum += scores[s];
  }
  const float inv = 1.f / sum;
#pragma omp simd
  for (int64_t s = 0; s < S; ++s) scores[s] *= inv;
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

// This position's k | v [2 * kv_heads * head_dim] (this thread's copy) into cache row `pos`, written by
// the first thread only (nobody reads that row during the step). An fp16 cache rounds them, and every
// thread rounds its copy the same way, so this position reads as the torch path reads it back.
void store_kv(const BsLayer& L, float* kv, int64_t pos, bool first) {
  const int64_t D = L.head_dim, kn = L.kv_heads * D;
  if (L.kv_half)
    for (int64_t i = 0; i < 2 * kn; ++i) kv[i] = bs::half_to_float(bs::float_to_half(kv[i]));
  if (!first) return;
  for (int64_t g = 0; g < L.kv_heads; ++g) {
    const int64_t row = (g * L.max_len + pos) * D;
    if (L.kv_half) {
      uint16_t* kc = static_cast<uint16_t*>(L.keys) + row;
      uint16_t* vc = static_cast<uint16_t*>(L.values) + row;
      for (int64_t d = 0; d < D; ++d) {
        kc[d] = bs::float_to_half(kv[g * D + d]);
        vc[d] = bs::float_to_half(kv[kn + g * D + d]);
      }
    } else {
      std::memcpy(static_cast<float*>(L.keys) + row, kv + g * D, D * sizeof(float));
      std::memcpy(static_cast<float*>(L.values) + row, kv + kn + g * D, D * sizeof(float));
    }
  }
}

// Head i of the layer: q [heads * D], kv this position's k | v, output into attn [heads * D].
void attend(const BsLayer& L, int64_t i, const float* q, const float* kv, int64_t lo, int64_t pos, float* scores,
            float* attn) {
  const int64_t D = L.head_dim, g = i / (L.heads / L.kv_heads), at = g * L.max_len * D;
  const float* k_now = kv + g * D;
  const float* v_now = kv + L.kv_heads * D + g * D;
  if (L.kv_half)
    attend_head(q + i * D, static_cast<const uint16_t*>(L.keys) + at, static_cast<const uint16_t*>(L.values) + at,
                k_now, v_now, lo, pos, D, (float)L.scaling, scores + i * L.max_len, attn + i * D);
  else
    attend_head(q + i * D, static_cast<const float*>(L.keys) + at, static_cast<const float*>(L.values) + at, k_now,
                v_now, lo, pos, D, (float)L.scaling, scores + i * L.max_len, attn + i * D);
}

// y[i] = act(gate[i]) * up[i]
void gated(const float* gate, const float* up, int64_t n, int64_t act, float* y) {
  if (act == ACT_SILU) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) y[i] = gate[i] / (1.f + exp_fast(-gate[i])) * up[i];
  } else if (act == ACT_GELU_TANH) {  // 0.5 g (1 + tanh(u)) = g - g / (exp(2u) + 1)
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) {
      const float g = gate[i], u = 0.7978845608028654f * (g + 0.044715f * g * g * g);
      y[i] = (g - g / (exp_fast(2.f * u) + 1.f)) * up[i];
    }
  } else {
    for (int64_t i = 0; i < n; ++i) y[i] = 0.5f * gate[i] * (1.f + std::erf(gate[i] * 0.7071067811865476f)) * up[i];
  }
}

}  // namespace

extern "C" {

// y[i] = float(half(x[i])): the KV cache's rounding, exposed for tests against torch's .half().
void bs_half_roundtrip(const float* x, float* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] = bs::half_to_float(bs::float_to_half(x[i]));
}

// Floats of scratch bs_decode_step needs for these layers.
int64_t bs_decode_scratch(const BsLayer* layers, int64_t n, const BsHead* head) { return Scratch(layers, n, head).total; }

// h [hidden] (the embedded token at position `pos`) -> the last layer's output, in place; every
// layer's K/V cache gets position `pos` written. scratch: bs_decode_scratch(layers, n) floats.
// int8 != 0: the matrix products use int8 activations where bs_gemv would (see qmatmul.cpp).
// head (may be null): the final norm and head run in the same region; h is then left normed.
//
// Synchronisation: only the matrix products and the attention heads are shared out (5 barriers a
// layer). Everything between them (norms, bias, RoPE, residual, activation, the gemv input
// preparation) is cheap and is computed by every thread into its own buffers from the same shared
// inputs, so no thread waits for another to finish it. Thread 0 alone writes the new K/V row; the
// attention reads the cache for the earlier positions and each thread's own copy for this one.
void bs_decode_step(const BsLayer* layers, int64_t n, float* h, int64_t pos, float* scratch, int64_t threads,
                    int64_t int8, const BsHead* head) {
  const Scratch s(layers, n, head);
  float* qkv = scratch + s.qkv;    // shared: gemv outputs and attention output
  float* attn = scratch + s.attn;
  float* mo = scratch + s.mo;
  float* gu = scratch + s.gu;
  float* scores = scratch + s.scores;
  const int64_t hidden = n > 0 ? layers[0].o.out : 0;
#pragma omp parallel num_threads((int)threads)
  {
    // this thread's buffers, all at the same 64-byte alignment so every thread rounds alike
    float* own = static_cast<float*>(std::aligned_alloc(64, s.own * sizeof(float)));
    float* hh_ = own;          // residual stream
    float* x = hh_ + s.nh;     // normed input, RoPE temporary, biased gemv output
    float* q = x + s.nx;       // q | k | v after bias, norms and RoPE
    float* xsum = q + s.nq;
    float* xp = xsum + s.nsum;
    float* act = xp + s.nxp;
    std::memcpy(hh_, h, hidden * sizeof(float));
    const bool first = omp_get_thread_num() == 0;
    for (int64_t l = 0; l < n; ++l) {
      const BsLayer& L = layers[l];
      const bs::Matrix mqkv = matrix(L.qkv, int8), mo_ = matrix(L.o, int8), mgu = matrix(L.gate_up, int8),
                       mdown = matrix(L.down, int8);
      const int64_t D = L.head_dim, qn = L.heads * D, inter = L.down.in;
      const int64_t lo = L.window > 0 && pos + 1 > L.window ? pos + 1 - L.window : 0;
      rms_norm(hh_, L.in_norm, hidden, x);
      bs::gemv_prepare(mqkv, x, 1, xsum, xp);
      bs::gemv_rows(mqkv, x, xp, xsum, 1, qkv);  // barrier
      std::memcpy(q, qkv, L.qkv.out * sizeof(float));
      add_bias(q, L.qkv.bias, L.qkv.out);
      float* k = q + qn;  // then v: this position's k | v
      const float* cos = L.cos + pos * D;
      const float* sin = L.sin + pos * D;
      for (int64_t i = 0; i < L.heads; ++i) {
        if (L.q_norm.weight) rms_norm(q + i * D, L.q_norm, D, q + i * D);
        rope(q + i * D, cos, sin, D, x);
      }
      for (int64_t g = 0; g < L.kv_heads; ++g) {
        if (L.k_norm.weight) rms_norm(k + g * D, L.k_norm, D, k + g * D);
        rope(k + g * D, cos, sin, D, x);
      }
      store_kv(L, k, pos, first);
#pragma omp for schedule(static)
      for (int64_t i = 0; i < L.heads; ++i) attend(L, i, q, k, lo, pos, scores, attn);  // barrier
      project_add(mo_, L.o.bias, L.post_attn_norm, attn, xsum, xp, mo, x, hh_);  // barrier
      rms_norm(hh_, L.pre_mlp_norm, hidden, x);
      bs::gemv_prepare(mgu, x, 1, xsum, xp);
      bs::gemv_rows(mgu, x, xp, xsum, 1, gu);  // barrier
      if (L.gate_up.bias) {
        std::memcpy(x, gu, L.gate_up.out * sizeof(float));
        add_bias(x, L.gate_up.bias, L.gate_up.out);
        gated(x, x + inter, inter, L.act, act);
      } else {
        gated(gu, gu + inter, inter, L.act, act);
      }
      project_add(mdown, L.down.bias, L.post_mlp_norm, act, xsum, xp, mo, x, hh_);  // barrier
    }
    if (head) {  // every thread norms its own copy of the stream, then the head's rows are shared out
      const bs::Matrix mh = matrix(head->head, int8);
      const int64_t width = head->head.in;
      rms_norm(hh_, head->norm, width, x);
      bs::gemv_prepare(mh, x, 1, xsum, xp);
      bs::gemv_rows(mh, x, xp, xsum, 1, head->logits);  // barrier
      add_bias(head->logits, first ? head->head.bias : nullptr, head->head.out);
      if (first) std::memcpy(h, x, width * sizeof(float));
    } else if (first) {
      std::memcpy(h, hh_, hidden * sizeof(float));
    }
    std::free(own);
  }
}

}  // extern "C"
