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
#include <cstring>

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
  float* keys;    // [kv_heads, max_len, head_dim]
  float* values;  // [kv_heads, max_len, head_dim]
  const float* cos;  // [positions, head_dim]
  const float* sin;  // [positions, head_dim], first half negated (rotate_half's sign)
  int64_t heads, kv_heads, head_dim, window, act, max_len;  // window 0: attend to every position
  double scaling;
};

enum { ACT_SILU = 0, ACT_GELU_TANH = 1, ACT_GELU = 2 };

inline bs::Matrix matrix(const BsMat& m) { return bs::Matrix{m.packed, m.scale, m.zero, m.out, m.in, m.bits, m.group}; }

inline int64_t round16(int64_t n) { return (n + 15) / 16 * 16; }

// One scratch buffer, carved into the vectors of a step; sized for the largest layer.
struct Scratch {
  int64_t x, qkv, attn, mo, gu, act, xsum, xp, scores, total;
  Scratch(const BsLayer* layers, int64_t n) {
    int64_t nx = 0, nqkv = 0, nattn = 0, nmo = 0, ngu = 0, nact = 0, nsum = 0, nxp = 0, nsc = 0;
    for (int64_t l = 0; l < n; ++l) {
      const BsLayer& L = layers[l];
      const BsMat* mats[4] = {&L.qkv, &L.o, &L.gate_up, &L.down};
      for (const BsMat* m : mats) {
        nsum = m->in > 0 ? std::max(nsum, bs::gemv_groups(matrix(*m))) : nsum;
        nxp = std::max(nxp, m->in);
        nx = std::max(nx, std::max(m->in, m->out));
      }
      nqkv = std::max(nqkv, L.qkv.out);
      nattn = std::max(nattn, L.heads * L.head_dim);
      nmo = std::max(nmo, std::max(L.o.out, L.down.out));
      ngu = std::max(ngu, L.gate_up.out);
      nact = std::max(nact, L.down.in);
      nsc = std::max(nsc, L.heads * L.max_len);
    }
    int64_t at = 0;
    x = at; at += round16(nx);
    qkv = at; at += round16(nqkv);
    attn = at; at += round16(nattn);
    mo = at; at += round16(nmo);
    gu = at; at += round16(ngu);
    act = at; at += round16(nact);
    xsum = at; at += round16(nsum);
    xp = at; at += round16(nxp);
    scores = at; at += round16(nsc);
    total = at;
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

// out [D] = softmax(scaling * q . K[s]) @ V[s] over the cached positions s in [lo, stop).
void attend_head(const float* q, const float* K, const float* V, int64_t lo, int64_t stop, int64_t D, float scaling,
                 float* scores, float* out) {
  const int64_t S = stop - lo;
  float mx = -INFINITY;
  for (int64_t s = 0; s < S; ++s) {
    const float* k = K + (lo + s) * D;
    float dot = 0.f;
#pragma omp simd reduction(+ : dot)
    for (int64_t d = 0; d < D; ++d) dot += q[d] * k[d];
    scores[s] = dot * scaling;
    mx = scores[s] > mx ? scores[s] : mx;
  }
  float sum = 0.f;
#pragma omp simd reduction(+ : sum)
  for (int64_t s = 0; s < S; ++s) {
    scores[s] = exp_fast(scores[s] - mx);
    sum += scores[s];
  }
  const float inv = 1.f / sum;
  for (int64_t d = 0; d < D; ++d) out[d] = 0.f;
  for (int64_t s = 0; s < S; ++s) {
    const float p = scores[s] * inv;
    const float* v = V + (lo + s) * D;
#pragma omp simd
    for (int64_t d = 0; d < D; ++d) out[d] += p * v[d];
  }
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

// Floats of scratch bs_decode_step needs for these layers.
int64_t bs_decode_scratch(const BsLayer* layers, int64_t n) { return Scratch(layers, n).total; }

// h [hidden] (the embedded token at position `pos`) -> the last layer's output, in place; every
// layer's K/V cache gets position `pos` written. scratch: bs_decode_scratch(layers, n) floats.
void bs_decode_step(const BsLayer* layers, int64_t n, float* h, int64_t pos, float* scratch, int64_t threads) {
  const Scratch s(layers, n);
  float* x = scratch + s.x;
  float* qkv = scratch + s.qkv;
  float* attn = scratch + s.attn;
  float* mo = scratch + s.mo;
  float* gu = scratch + s.gu;
  float* act = scratch + s.act;
  float* xsum = scratch + s.xsum;
  float* xp = scratch + s.xp;
  float* scores = scratch + s.scores;
#pragma omp parallel num_threads((int)threads)
  {
    for (int64_t l = 0; l < n; ++l) {
      const BsLayer& L = layers[l];
      const bs::Matrix mqkv = matrix(L.qkv), mo_ = matrix(L.o), mgu = matrix(L.gate_up), mdown = matrix(L.down);
      const int64_t hidden = L.o.out, D = L.head_dim, qn = L.heads * D, kn = L.kv_heads * D;
      const int64_t stop = pos + 1;
      const int64_t lo = L.window > 0 && stop > L.window ? stop - L.window : 0;
#pragma omp single
      {
        rms_norm(h, L.in_norm, hidden, x);
        bs::gemv_prepare(mqkv, x, 1, xsum, xp);
      }
      bs::gemv_rows(mqkv, x, xp, xsum, 1, qkv);
#pragma omp single
      {
        add_bias(qkv, L.qkv.bias, L.qkv.out);
        float* q = qkv;
        float* k = qkv + qn;
        const float* v = qkv + qn + kn;
        const float* cos = L.cos + pos * D;
        const float* sin = L.sin + pos * D;
        for (int64_t hh = 0; hh < L.heads; ++hh) {
          if (L.q_norm.weight) rms_norm(q + hh * D, L.q_norm, D, q + hh * D);
          rope(q + hh * D, cos, sin, D, x);
        }
        for (int64_t g = 0; g < L.kv_heads; ++g) {
          if (L.k_norm.weight) rms_norm(k + g * D, L.k_norm, D, k + g * D);
          rope(k + g * D, cos, sin, D, x);
          std::memcpy(L.keys + (g * L.max_len + pos) * D, k + g * D, D * sizeof(float));
          std::memcpy(L.values + (g * L.max_len + pos) * D, v + g * D, D * sizeof(float));
        }
      }
      const int64_t rep = L.heads / L.kv_heads;
#pragma omp for schedule(static)
      for (int64_t hh = 0; hh < L.heads; ++hh) {
        const int64_t g = hh / rep;
        attend_head(qkv + hh * D, L.keys + g * L.max_len * D, L.values + g * L.max_len * D, lo, stop, D,
                    (float)L.scaling, scores + hh * L.max_len, attn + hh * D);
      }
#pragma omp single
      bs::gemv_prepare(mo_, attn, 1, xsum, xp);
      bs::gemv_rows(mo_, attn, xp, xsum, 1, mo);
#pragma omp single
      {
        add_bias(mo, L.o.bias, hidden);
        if (L.post_attn_norm.weight) rms_norm(mo, L.post_attn_norm, hidden, mo);
        for (int64_t i = 0; i < hidden; ++i) h[i] += mo[i];
        rms_norm(h, L.pre_mlp_norm, hidden, x);
        bs::gemv_prepare(mgu, x, 1, xsum, xp);
      }
      bs::gemv_rows(mgu, x, xp, xsum, 1, gu);
#pragma omp single
      {
        add_bias(gu, L.gate_up.bias, L.gate_up.out);
        const int64_t inter = L.down.in;
        gated(gu, gu + inter, inter, L.act, act);
        bs::gemv_prepare(mdown, act, 1, xsum, xp);
      }
      bs::gemv_rows(mdown, act, xp, xsum, 1, mo);
#pragma omp single
      {
        add_bias(mo, L.down.bias, hidden);
        if (L.post_mlp_norm.weight) rms_norm(mo, L.post_mlp_norm, hidden, mo);
        for (int64_t i = 0; i < hidden; ++i) h[i] += mo[i];
      }
    }
  }
}

}  // extern "C"
