// bitsmith calibrated-quantization inner loops: GPTQ's in-block column walk and the affine range
// (clip) search, in plain C++ that the compiler vectorises (-O3 -march=native).
//
// Both are long chains of small steps over independent output rows. In torch each step is one
// operator call (a few microseconds of dispatch, and a parallel region with a barrier when torch has
// several threads), so a 128-column GPTQ block was ~1,300 calls and the clip search ~200 passes over
// the weights. Here one call does a whole block or a whole search: rows are split into chunks over
// OpenMP threads (rows are independent in both), and each thread runs its chunk's columns or
// candidates start to finish with no barrier in between.
//
// The arithmetic is torch's, operation for operation (bitsmith.methods.gptq._quantize_column and
// bitsmith.methods.rtn.fit_group_ranges): round half to even (nearbyintf in the default rounding
// mode, as torch.round), the same division, clamp and dequantization. Only the order of summation
// differs (the in-block updates are right-looking here, left-looking in torch; the error sums are
// sequential here), so values agree to float rounding; the Python tests hold both against their
// torch oracles.

#include <cmath>
#include <cstdint>

extern "C" {

// GPTQ, one lazy-batch block of B columns on transposed weights (see methods.gptq.gptq_walk).
//   w      [B, ldw] float: row j is the j-th visited column (out values), updated in place
//   u      [B, ldu] float: the block's rows of the upper Cholesky factor, u[j * ldu + k] = U_jk
//          (columns k < B of the block; the caller passes a pointer to U[i1, i1])
//   scale, zero  [G, out] float: per-group parameters; grow[j] is column j's group
//   codes  [B, ldc] uint8 out; errs [B, out] float out: (w_j - q_j) / U_jj, for the caller's GEMM
void bs_gptq_block(float* w, int64_t ldw, int64_t B, int64_t out, const float* u, int64_t ldu,
                   const float* scale, const float* zero, const int64_t* grow, int64_t qmax,
                   uint8_t* codes, int64_t ldc, float* errs, int64_t chunk, int64_t threads) {
    const int64_t nchunks = (out + chunk - 1) / chunk;
    const float fq = (float)qmax;
#pragma omp parallel for schedule(static) num_threads((int)threads)
    for (int64_t c = 0; c < nchunks; ++c) {
        const int64_t o0 = c * chunk, o1 = (o0 + chunk < out) ? o0 + chunk : out;
        for (int64_t j = 0; j < B; ++j) {
            float* wj = w + j * ldw;
            const float* s = scale + grow[j] * out;
            const float* z = zero + grow[j] * out;
            const float d = u[j * ldu + j];
            float* e = errs + j * out;
            uint8_t* cj = codes + j * ldc;
            for (int64_t o = o0; o < o1; ++o) {
                float q = nearbyintf(wj[o] / s[o] + z[o]);
                q = q < 0.0f ? 0.0f : (q > fq ? fq : q);
                cj[o] = (uint8_t)q;
                e[o] = (wj[o] - (q - z[o]) * s[o]) / d;
            }
            for (int64_t k = j + 1; k < B; ++k) {  // right-looking: this column's error into later ones
                const float ujk = u[j * ldu + k];
                float* wk = w + k * ldw;
                for (int64_t o = o0; o < o1; ++o) wk[o] -= e[o] * ujk;
            }
        }
    }
}

// Affine per-group range search (methods.rtn.fit_group_ranges with grid = steps > 0):
//   g      [rows, G, gs] float groups (a short last group holds `last` real weights; padding is ignored)
//   wt     [G * gs] float error weights (importance x mask), or null for plain squared error
//   shrink [steps + 1] float candidate factors, in order (the first least error wins)
//   scale, zero [rows, G] float out
// sym: symmetric (zero = (qmax + 1) / 2, scale = absmax / (qmax / 2)), else asymmetric with a rounded zero.
void bs_range_search(const float* g, int64_t rows, int64_t G, int64_t gs, int64_t last, const float* wt,
                     const float* shrink, int64_t nshrink, int64_t qmax, int64_t sym, float* scale,
                     float* zero, int64_t threads) {
    const float fq = (float)qmax;
    const float half = (float)qmax / 2.0f;
    const float zsym = (float)(qmax + 1) / 2.0f;
#pragma omp parallel for schedule(static) num_threads((int)threads)
    for (int64_t r = 0; r < rows; ++r) {
        for (int64_t gi = 0; gi < G; ++gi) {
            const float* x = g + (r * G + gi) * gs;
            const float* ww = wt ? wt + gi * gs : nullptr;
            const int64_t n = (gi == G - 1) ? last : gs;
            float lo = x[0], hi = x[0];
            for (int64_t i = 1; i < n; ++i) {
                lo = x[i] < lo ? x[i] : lo;
                hi = x[i] > hi ? x[i] : hi;
            }
            float best_s = 0.0f, best_z = 0.0f, best_err = INFINITY;
            for (int64_t t = 0; t < nshrink; ++t) {
                float l = lo * shrink[t], h = hi * shrink[t];
                l = l < 0.0f ? l : 0.0f;
                h = h > 0.0f ? h : 0.0f;
                float s, z;
                if (sym) {
                    float a = -l > h ? -l : h;
                    s = a / half;
                    if (!(s > 0.0f)) s = 1.0f;
                    z = zsym;
                } else {
                    s = (h - l) / fq;
                    if (!(s > 0.0f)) s = 1.0f;
                    z = nearbyintf(-l / s);
                }
                // 16 partial sums, so the loop vectorises (a single float sum is a serial chain)
                float part[16] = {0.0f};
                int64_t i = 0;
                for (; i + 16 <= n; i += 16) {
                    for (int l = 0; l < 16; ++l) {
                        float q = nearbyintf(x[i + l] / s + z);
                        q = q < 0.0f ? 0.0f : (q > fq ? fq : q);
                        float d = (q - z) * s - x[i + l];
                        part[l] += ww ? d * d * ww[i + l] : d * d;
                    }
                }
                for (; i < n; ++i) {
                    float q = nearbyintf(x[i] / s + z);
                    q = q < 0.0f ? 0.0f : (q > fq ? fq : q);
                    float d = (q - z) * s - x[i];
                    part[i % 16] += ww ? d * d * ww[i] : d * d;
                }
                float err = 0.0f;
                for (int l = 0; l < 16; ++l) err += part[l];
                if (t == 0 || err < best_err) {  // t == 0: min/max, kept when every error is NaN
                    best_err = err;
                    best_s = s;
                    best_z = z;
                }
            }
            scale[r * G + gi] = best_s;
            zero[r * G + gi] = best_z;
        }
    }
}

}  // extern "C"
