// bitsmith decode-step building blocks shared by the one-token step (decode.cpp) and the speculative
// verify step (verify.cpp): the ctypes-mirrored layer structs and the float elementwise code (norms, RoPE,
// bias, KV store, attention units, gated activation). One source for both, because greedy speculative
// output equals plain decoding only while the two steps do the same float arithmetic bit for bit
// (tests/infer/test_verify.py). Internal to those files (anonymous namespace, like attention.h).
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

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
  return bs::abi_matrix(m.packed, m.scale, m.zero, m.out, m.in, m.bits, m.group, int8);
}

inline int64_t round16(int64_t n) { return (n + 15) / 16 * 16; }

// The largest vector each part of a step needs over all layers (and the head), unrounded: the one-token
// step's Scratch (decode.cpp) and the verify's Sizes (verify.cpp) size their buffers from it.
struct StepMax {
  int64_t nh = 0, nx = 0, nsum = 0, nxp = 0, nact = 0;  // per thread: hidden, gemv input/output, sums, x
  int64_t qkv = 0, attn = 0, mo = 0, gu = 0, scores = 0;  // shared: gemv outputs, attention, scores
  StepMax(const BsLayer* layers, int64_t n, const BsHead* head) {
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
      qkv = std::max(qkv, L.qkv.out);
      attn = std::max(attn, L.heads * L.head_dim);
      mo = std::max(mo, std::max(L.o.out, L.down.out));
      gu = std::max(gu, L.gate_up.out);
      nact = std::max(nact, L.down.in);
      scores = std::max(scores, L.heads * L.max_len);
    }
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
#if defined(__AVX512F__)
#define BS_GROUP(N) return attend_group_v<8, N>(qh, K, V, k_now, v_now, lo, pos, sc, sh, st, oh)
  if (D == 128) {
    switch (nh) { case 3: BS_GROUP(3); case 4: BS_GROUP(4); case 5: BS_GROUP(5); case 6: BS_GROUP(6); }
  }
#undef BS_GROUP
#endif
#undef BS_GROUPED
  for (int64_t h = 0; h < nh; ++h)  // one head at a time
    attend_head(qh + h * D, K, V, k_now, v_now, lo, pos, D, sc, sh + h * st, oh + h * D);
}

// y[i] = act(gate[i]) * up[i]
void gated(const float* gate, const float* up, int64_t n, int64_t act, float* y) {
#if defined(__AVX512F__)
  if (act == ACT_SILU || act == ACT_GELU_TANH) {  // the scalar loops' arithmetic, 16 lanes at a time
    const __m512 one = _mm512_set1_ps(1.f);
    for (int64_t i = 0; i < n; i += 16) {
      const __mmask16 k = tail16(i, n);
      const __m512 g = _mm512_maskz_loadu_ps(k, gate + i);
      __m512 a;
      if (act == ACT_SILU) {
        a = _mm512_div_ps(g, _mm512_add_ps(one, exp16(_mm512_sub_ps(_mm512_setzero_ps(), g))));
      } else {
        const __m512 u = _mm512_mul_ps(_mm512_set1_ps(0.7978845608028654f),
                                       _mm512_fmadd_ps(_mm512_mul_ps(_mm512_mul_ps(_mm512_set1_ps(0.044715f), g), g), g, g));
        a = _mm512_sub_ps(g, _mm512_div_ps(g, _mm512_add_ps(exp16(_mm512_add_ps(u, u)), one)));
      }
      _mm512_mask_storeu_ps(y + i, k, _mm512_mul_ps(a, _mm512_maskz_loadu_ps(k, up + i)));
    }
    return;
  }
#endif
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
