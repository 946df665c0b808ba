// bitsmith verify step: speculative decoding's check of T = k + 1 tokens of one sequence in one native
// call, every row's logits bit for bit what T successive one-token fused steps (decode.cpp
// bs_decode_step) would compute, while each weight row is read once for the T rows.
//
// Why a whole step and not only a multi-row matmul: plain decoding runs with int8 activations by
// default (qmatmul.cpp, vbmi.cpp), and int8 rounding amplifies any float difference before a matmul
// (a norm summed in another order moves an activation across a rounding boundary: ~1e-3 on the
// output). So the verify must repeat the one-token step's float arithmetic exactly around its matrix
// products, not only in them: the same norms, RoPE, attention (attention.h), activation and residual
// code, on buffers of the same alignment: both files take that code from step.h (one source), and
// tests/infer/test_verify.py holds this step to bs_decode_step bit for bit.
//
// The matrix products (verify_rows): each activation row is prepared alone (bs::gemv_prepare with one
// row: int8 quantization per 32-block, and vbmi.cpp's permutation where its superblock decode takes
// the matrix), so every row's integer dot products are the one-row decode's; then
//   * 4-bit superblock layouts (vbmi.cpp rows_strided<4, R>) and 4..8-bit chunk layouts (rows_vbmi1<R>)
//     run here: a weight row's codes are unpacked once and multiplied into the T rows' int8 x, with
//     each row's float epilogue (per-lane x scales, per-group weight scales, zero-point lanes, and the
//     four-row transposing lane sum or the single-row one, as the one-row kernel groups its output rows)
//     in the one-row order;
//   * everything else (2- and 3-bit codes, exact float decode, builds without VBMI) calls the one-row
//     gemv once per row: exact by construction, without the saving.
// Plain C ABI (ctypes, infer/verify.py); the structs are step.h's, shared with decode.cpp.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>

#include <omp.h>

#include "gemv.h"
#include "attention.h"


#include "step.h"

namespace bsv {  // verify_rows.cpp
constexpr int64_t kMaxRows = 8;
void verify_rows(const bs::Matrix& m, const float* const* x, const float* const* xp, const float* const* xs,
                 int64_t T, float* y, int64_t ystride);
}  // namespace bsv

namespace {

constexpr int64_t kVerifyMaxRows = bsv::kMaxRows;

// The per-row vectors of a verify step, each row's at the one-token step's 64-byte alignment.
struct Sizes {
  int64_t nh = 0, nx = 0, nq = 0, nsum = 0, nxp = 0, nact = 0;   // per thread, per row
  int64_t qkv = 0, attn = 0, mo = 0, gu = 0, scores = 0;          // shared, per row
  Sizes(const BsLayer* layers, int64_t n, const BsHead* head) {
    const StepMax m(layers, n, head);
    nh = round16(m.nh), nx = round16(m.nx), nsum = round16(m.nsum), nxp = round16(m.nxp), nact = round16(m.nact);
    nq = qkv = round16(m.qkv), attn = round16(m.attn), mo = round16(m.mo), gu = round16(m.gu);
    scores = round16(m.scores);
  }
  int64_t own() const { return nh + nx + nq + nsum + nxp + nact; }
  int64_t shared() const { return qkv + attn + mo + gu + scores; }
};

// One thread's row-t buffers.
struct Own {
  float *h, *x, *q, *xsum, *xp, *act;
};

// y [T rows, m.out apart by `ystride`] = each row of x (rows `xstride` apart) times m: every thread
// prepares every row into its own buffers (as the one-token step does), then the rows are shared out.
void matmul(const bs::Matrix& m, Own* own, const float* const* x, int64_t T, float* y, int64_t ystride) {
  for (int64_t t = 0; t < T; ++t) bs::gemv_prepare(m, x[t], 1, own[t].xsum, own[t].xp);
  const float* xp[kVerifyMaxRows];
  const float* xs[kVerifyMaxRows];
  for (int64_t t = 0; t < T; ++t) xp[t] = own[t].xp, xs[t] = own[t].xsum;
  bsv::verify_rows(m, x, xp, xs, T, y, ystride);  // barrier
}

// project_add of decode.cpp for T rows: y = m in (+ bias, post-norm) added to each row's residual.
void project_add(const bs::Matrix& m, const float* bias, const BsNorm& post_norm, Own* own, const float* const* x,
                 float* out, int64_t outstride, int64_t T) {
  matmul(m, own, x, T, out, outstride);
  const int64_t hidden = m.out;
  for (int64_t t = 0; t < T; ++t) {
    float* tmp = own[t].x;
    std::memcpy(tmp, out + t * outstride, hidden * sizeof(float));
    add_bias(tmp, bias, hidden);
    if (post_norm.weight) rms_norm(tmp, post_norm, hidden, tmp);
    for (int64_t i = 0; i < hidden; ++i) own[t].h[i] += tmp[i];
  }
}

// x[t] = rms_norm(row t's residual h) into its own x buffer, for the T rows before a matmul.
void norm_rows(Own* own, const BsNorm& norm, int64_t hidden, int64_t T, const float** x) {
  for (int64_t t = 0; t < T; ++t) {
    rms_norm(own[t].h, norm, hidden, own[t].x);
    x[t] = own[t].x;
  }
}

struct Step {
  const BsLayer* layers;
  int64_t n, pos, T;
  bool int8;
  const BsHead* head;
  float* logits;
  Sizes s;
  float *qkv, *attn, *mo, *gu, *scores;  // shared [T, per-row size]
};

// The attention half of layer l for the T rows: q/k/v, RoPE at positions pos + t, the cache rows
// written (thread 0), then every row's heads against its own prefix of the cache.
void attention(const Step& st, const BsLayer& L, Own* own, bool first) {
  const int64_t T = st.T, D = L.head_dim, qn = L.heads * D, hidden = L.o.out;
  const float* x[kVerifyMaxRows];
  norm_rows(own, L.in_norm, hidden, T, x);
  matmul(matrix(L.qkv, st.int8), own, x, T, st.qkv, st.s.qkv);
  for (int64_t t = 0; t < T; ++t) {
    float* q = own[t].q;
    std::memcpy(q, st.qkv + t * st.s.qkv, L.qkv.out * sizeof(float));
    add_bias(q, L.qkv.bias, L.qkv.out);
    float* k = q + qn;
    const float* cos = L.cos + (st.pos + t) * D;
    const float* sin = L.sin + (st.pos + t) * D;
    for (int64_t i = 0; i < L.heads; ++i) {
      if (L.q_norm.weight) rms_norm(q + i * D, L.q_norm, D, q + i * D);
      rope(q + i * D, cos, sin, D, own[t].x);
    }
    for (int64_t g = 0; g < L.kv_heads; ++g) {
      if (L.k_norm.weight) rms_norm(k + g * D, L.k_norm, D, k + g * D);
      rope(k + g * D, cos, sin, D, own[t].x);
    }
    store_kv(L, k, st.pos + t, first);
  }
#pragma omp barrier
  // row t reads cache rows pos .. pos + t - 1, written just above: the values its one-token step read
  const int64_t per = heads_per_unit(L, omp_get_num_threads()), rep = L.heads / L.kv_heads;
  const int64_t chunks = (rep + per - 1) / per, units = L.kv_heads * chunks;
#pragma omp for schedule(static)
  for (int64_t w = 0; w < T * units; ++w) {
    const int64_t t = w / units, u = w % units, p = st.pos + t;
    const int64_t lo = L.window > 0 && p + 1 > L.window ? p + 1 - L.window : 0;
    const int64_t h0 = u / chunks * rep + u % chunks * per, nh = std::min(per, rep - u % chunks * per);
    const float* q = own[t].q;
    float* sc = st.scores + t * st.s.scores;
    float* at = st.attn + t * st.s.attn;
    if (L.kv_half) attend_unit_kv<uint16_t>(L, h0, nh, q, q + qn, lo, p, sc, at);
    else attend_unit_kv<float>(L, h0, nh, q, q + qn, lo, p, sc, at);
  }
  const float* in[kVerifyMaxRows];
  for (int64_t t = 0; t < T; ++t) in[t] = st.attn + t * st.s.attn;
  project_add(matrix(L.o, st.int8), L.o.bias, L.post_attn_norm, own, in, st.mo, st.s.mo, T);
}

void mlp(const Step& st, const BsLayer& L, Own* own) {
  const int64_t T = st.T, hidden = L.o.out, inter = L.down.in;
  const float* x[kVerifyMaxRows];
  norm_rows(own, L.pre_mlp_norm, hidden, T, x);
  matmul(matrix(L.gate_up, st.int8), own, x, T, st.gu, st.s.gu);
  for (int64_t t = 0; t < T; ++t) {
    const float* gu = st.gu + t * st.s.gu;
    if (L.gate_up.bias) {
      std::memcpy(own[t].x, gu, L.gate_up.out * sizeof(float));
      add_bias(own[t].x, L.gate_up.bias, L.gate_up.out);
      gated(own[t].x, own[t].x + inter, inter, L.act, own[t].act);
    } else {
      gated(gu, gu + inter, inter, L.act, own[t].act);
    }
  }
  const float* in[kVerifyMaxRows];
  for (int64_t t = 0; t < T; ++t) in[t] = own[t].act;
  project_add(matrix(L.down, st.int8), L.down.bias, L.post_mlp_norm, own, in, st.mo, st.s.mo, T);
}

void final_head(const Step& st, Own* own, bool first) {
  const BsHead* head = st.head;
  const int64_t width = head->head.in, vocab = head->head.out;
  const float* x[kVerifyMaxRows];
  norm_rows(own, head->norm, width, st.T, x);
  matmul(matrix(head->head, st.int8), own, x, st.T, st.logits, vocab);
  for (int64_t t = 0; t < st.T; ++t) add_bias(st.logits + t * vocab, first ? head->head.bias : nullptr, vocab);
}

}  // namespace

extern "C" {

int64_t bs_verify_max_rows() { return kVerifyMaxRows; }

// h [T, hidden]: the embedded tokens at positions pos .. pos + T - 1 (2 <= T <= bs_verify_max_rows()).
// logits [T, vocab] out: row t is what bs_decode_step(.., pos + t, .., head) writes after the steps for
// the rows before it; every layer's cache gets rows pos .. pos + T - 1. head must not be null.
// int8 and threads as bs_decode_step's. Returns 0, or -1 when the arguments are outside it (nothing done).
int64_t bs_verify_step(const BsLayer* layers, int64_t n, const float* h, int64_t pos, int64_t T, int64_t threads,
                       int64_t int8, const BsHead* head, float* logits) {
  if (T < 1 || T > kVerifyMaxRows || !head || n < 1) return -1;
  Step st{layers, n, pos, T, int8 != 0, head, logits, Sizes(layers, n, head), nullptr, nullptr, nullptr, nullptr,
          nullptr};
  const int64_t per_row = st.s.shared();
  float* shared = static_cast<float*>(std::aligned_alloc(64, T * per_row * sizeof(float)));
  st.qkv = shared;
  st.attn = st.qkv + T * st.s.qkv;
  st.mo = st.attn + T * st.s.attn;
  st.gu = st.mo + T * st.s.mo;
  st.scores = st.gu + T * st.s.gu;
  const int64_t hidden = layers[0].o.out;
#pragma omp parallel num_threads((int)threads)
  {
    const int64_t row = st.s.own();
    float* buf = static_cast<float*>(std::aligned_alloc(64, T * row * sizeof(float)));
    Own own[kVerifyMaxRows];
    for (int64_t t = 0; t < T; ++t) {  // the one-token step's layout, one block per row
      float* b = buf + t * row;
      own[t] = Own{b, b + st.s.nh, b + st.s.nh + st.s.nx, b + st.s.nh + st.s.nx + st.s.nq,
                   b + st.s.nh + st.s.nx + st.s.nq + st.s.nsum, b + st.s.nh + st.s.nx + st.s.nq + st.s.nsum + st.s.nxp};
      std::memcpy(own[t].h, h + t * hidden, hidden * sizeof(float));
    }
    const bool first = omp_get_thread_num() == 0;
    for (int64_t l = 0; l < n; ++l) {
      attention(st, layers[l], own, first);
      mlp(st, layers[l], own);
    }
    final_head(st, own, first);
    std::free(buf);
  }
  std::free(shared);
  return 0;
}

// y [T, out] = x [T, in] @ W^T through the verify's matrix products (tests: each row against the one-row
// gemv). T <= bs_verify_max_rows().
void bs_verify_gemm(const uint8_t* packed, const uint16_t* scale, const uint16_t* zero, int64_t out, int64_t in,
                    int64_t bits, int64_t group, const float* x, int64_t T, float* y, int64_t threads, int64_t int8) {
  const bs::Matrix m = bs::abi_matrix(packed, scale, zero, out, in, bits, group, int8 != 0);
  const int64_t nsum = round16(bs::gemv_groups(m)), nxp = round16(in);
#pragma omp parallel num_threads((int)threads)
  {
    float* buf = static_cast<float*>(std::aligned_alloc(64, T * (nsum + nxp) * sizeof(float)));
    Own own[kVerifyMaxRows];
    const float* rows[kVerifyMaxRows];
    for (int64_t t = 0; t < T; ++t) {
      own[t].xsum = buf + t * (nsum + nxp);
      own[t].xp = own[t].xsum + nsum;
      rows[t] = x + t * in;
    }
    matmul(m, own, rows, T, y, out);
    std::free(buf);
  }
}

}  // extern "C"
