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

#include "step.h"

namespace {

// The vectors of a step, sized for the largest layer: shared ones are carved out of the caller's
// scratch buffer (offsets), each thread's own are allocated per call (sizes); all multiples of 16.
struct Scratch {
  int64_t qkv, attn, mo, gu, scores, total;  // shared: gemv outputs, attention output and scores
  int64_t nh, nx, nq, nsum, nxp, nact, own;  // per thread
  Scratch(const BsLayer* layers, int64_t n, const BsHead* head) {
    const StepMax m(layers, n, head);
    int64_t at = 0;
    qkv = at; at += round16(m.qkv);
    attn = at; at += round16(m.attn);
    mo = at; at += round16(m.mo);
    gu = at; at += round16(m.gu);
    scores = at; at += round16(m.scores);
    total = at;
    nh = round16(m.nh); nx = round16(m.nx); nq = round16(m.qkv); nsum = round16(m.nsum); nxp = round16(m.nxp);
    nact = round16(m.nact);
    own = nh + nx + nq + nsum + nxp + nact;
  }
};

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
