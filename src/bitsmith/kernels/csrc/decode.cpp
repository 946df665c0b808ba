// bitsmith fused decode step: every decoder layer for one new token in one C call.
//
// The lean Python path (infer/lean.py) spends a small model's decode step on ~35 torch ops per layer,
// each far cheaper than its dispatch. Here the whole stack runs in one OpenMP parallel region: the
// matrix products share out their output rows over the team (bs::gemv_rows, the same code bs_gemv
// runs), attention shares out its heads (a KV group's heads together where that balances the threads:
// attention.h), and the small elementwise steps (norms, RoPE, bias, residual, activation) run on one
// thread between them (`omp single`, whose barrier orders the steps).
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
#include "attention.h"

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

// Heads per unit of attention work: the chunk of a KV group's heads one thread attends together. Fewer
// heads per unit balance the threads better, more share each K/V row load: the choice minimises the
// busiest thread's work, counting one K/V pass plus one pass per head for each unit.
int64_t heads_per_unit(const BsLayer& L, int64_t threads) {
  const int64_t rep = L.heads / L.kv_heads;
  int64_t best = 1, best_cost = -1;
  for (int64_t nh = 1; nh <= std::min(rep, max_grouped(L.head_dim)); ++nh) {
    const int64_t units = L.kv_heads * ((rep + nh - 1) / nh), cost = (units + threads - 1) / threads * (1 + nh);
    if (best_cost < 0 || cost <= best_cost) best = nh, best_cost = cost;
  }
  return best;
}

// Unit u of the layer (heads_per_unit heads of one KV group, the last chunk of a group maybe fewer).
template <typename KV>
void attend_unit_kv(const BsLayer& L, int64_t h0, int64_t nh, const float* q, const float* kv, int64_t lo,
                    int64_t pos, float* scores, float* attn) {
  const int64_t D = L.head_dim, g = h0 / (L.heads / L.kv_heads), at = g * L.max_len * D;
  const KV* K = static_cast<const KV*>(L.keys) + at;
  const KV* V = static_cast<const KV*>(L.values) + at;
  const float* k_now = kv + g * D;
  const float* v_now = kv + L.kv_heads * D + g * D;
  const float sc = (float)L.scaling;
  const float* qh = q + h0 * D;
  float* sh = scores + h0 * L.max_len;
  float* oh = attn + h0 * D;
  const int64_t st = L.max_len;
#define BS_GROUPED(C, N) return attend_heads_v<C, N>(qh, K, V, k_now, v_now, lo, pos, sc, sh, st, oh)
  if (D == 64) {
    switch (nh) { case 2: BS_GROUPED(4, 2); case 3: BS_GROUPED(4, 3); case 4: BS_GROUPED(4, 4); }
  } else if (D == 32) {
    switch (nh) { case 2: BS_GROUPED(2, 2); case 3: BS_GROUPED(2, 3); case 4: BS_GROUPED(2, 4); }
  } else if (D == 16) {
    switch (nh) { case 2: BS_GROUPED(1, 2); case 3: BS_GROUPED(1, 3); case 4: BS_GROUPED(1, 4); }
  } else if (D == 128 && nh == 2) {
    BS_GROUPED(8, 2);
  }
#undef BS_GROUPED
  for (int64_t h = 0; h < nh; ++h)  // one head at a time
    attend_head(qh + h * D, K, V, k_now, v_now, lo, pos, D, sc, sh + h * st, oh + h * D);
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
      const int64_t per = heads_per_unit(L, omp_get_num_threads()), rep = L.heads / L.kv_heads;
      const int64_t chunks = (rep + per - 1) / per;
#pragma omp for schedule(static)
      for (int64_t u = 0; u < L.kv_heads * chunks; ++u) {  // barrier at the end
        const int64_t h0 = u / chunks * rep + u % chunks * per, nh = std::min(per, rep - u % chunks * per);
        if (L.kv_half) attend_unit_kv<uint16_t>(L, h0, nh, q, k, lo, pos, scores, attn);
        else attend_unit_kv<float>(L, h0, nh, q, k, lo, pos, scores, attn);
      }
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
