// bitsmith evaluation: per row of logits [rows, V] (float32), the log-sum-exp (float64) and the first
// index of the maximum, in two passes over the row (eval.refcache and eval.metrics declare and call it).
//
// Why a kernel of our own: scoring a 512-token window against a reference needs, per position, the
// model's log-normaliser and its argmax, then a few gathered log-probabilities. torch computes them as
// a full log-softmax (a [T, V] tensor written and read back) and a max with indices, which on this CPU
// took longer than the rest of the scoring together (1 thread, 511 x 49,152: max with indices 165 ms,
// logsumexp 377 ms, a plain sum 34 ms). Here a row is read twice from the L2 cache: pass 1 finds the
// maximum and its first index (16 lanes, each keeping its first maximum; the lowest index wins ties),
// pass 2 sums exp(x - max) with a vectorised exp (Cody-Waite range reduction, degree-7 polynomial:
// relative error ~1e-7, float32 rounding) into float64 accumulators. Rows are independent, so the
// result does not depend on the thread count. A row holding a NaN makes the call return 1 (the caller
// then takes torch's path, which propagates NaN the way torch does); without AVX-512 it returns -1.

#include <cmath>
#include <cstdint>

#if defined(__AVX512F__)
#include <immintrin.h>
#define BS_SCORE_AVX512 1
#endif

namespace {

#ifdef BS_SCORE_AVX512
inline __m512 exp_nonpositive(__m512 x) {
    // x <= 0 (x - max); below -104 exp underflows to 0 in float32 anyway, and NaN (inf - inf) maps there too
    x = _mm512_max_ps(x, _mm512_set1_ps(-104.0f));
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);   // ln 2, high part (exact product)
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);       // ln 2, low part
    __m512 p = _mm512_set1_ps(1.0f / 5040.0f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 720.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(p, n);  // p * 2^n, flushing to 0 below the float range
}

inline __mmask16 tail_mask(int64_t left) { return left >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << left) - 1u); }

// Returns false when the row holds a NaN.
bool score_row(const float* x, int64_t v, double* lse, int64_t* argmax) {
    const __m512 neg_inf = _mm512_set1_ps(-INFINITY);
    __m512 best = neg_inf;
    __m512i best_idx = _mm512_setzero_si512();
    __m512i idx = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    const __m512i step = _mm512_set1_epi32(16);
    __mmask16 nan = 0;
    for (int64_t j = 0; j < v; j += 16) {
        const __mmask16 m = tail_mask(v - j);
        const __m512 a = _mm512_mask_loadu_ps(neg_inf, m, x + j);
        nan |= _mm512_cmp_ps_mask(a, a, _CMP_UNORD_Q);
        const __mmask16 gt = _mm512_cmp_ps_mask(a, best, _CMP_GT_OQ);  // strictly: a lane keeps its first max
        best = _mm512_mask_mov_ps(best, gt, a);
        best_idx = _mm512_mask_mov_epi32(best_idx, gt, idx);
        idx = _mm512_add_epi32(idx, step);
    }
    if (nan) return false;
    const float peak = _mm512_reduce_max_ps(best);
    const __mmask16 at_peak = _mm512_cmp_ps_mask(best, _mm512_set1_ps(peak), _CMP_EQ_OQ);
    const __m512i big = _mm512_set1_epi32(INT32_MAX);
    *argmax = at_peak ? _mm512_reduce_min_epi32(_mm512_mask_mov_epi32(big, at_peak, best_idx)) : 0;
    if (std::isinf(peak)) {  // all -inf (log 0), or a +inf logit: log-sum-exp is that infinity
        *lse = peak;
        return true;
    }
    const __m512 shift = _mm512_set1_ps(peak);
    __m512d acc_lo = _mm512_setzero_pd(), acc_hi = _mm512_setzero_pd();
    for (int64_t j = 0; j < v; j += 16) {
        const __mmask16 m = tail_mask(v - j);
        const __m512 e = _mm512_maskz_mov_ps(m, exp_nonpositive(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, x + j), shift)));
        acc_lo = _mm512_add_pd(acc_lo, _mm512_cvtps_pd(_mm512_castps512_ps256(e)));
        acc_hi = _mm512_add_pd(acc_hi, _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(e), 1))));
    }
    *lse = double(peak) + std::log(_mm512_reduce_add_pd(_mm512_add_pd(acc_lo, acc_hi)));
    return true;
}
#endif

}  // namespace

extern "C" {

// lse[r] = log sum_j exp(x[r, j]) (float64), argmax[r] = the first j with x[r, j] maximal, for each
// row r of x [rows, v] (row stride ``stride`` floats). 0 on success, 1 if a row holds a NaN, -1
// without AVX-512 (the outputs are then not meaningful).
int bs_row_lse_argmax(const float* x, int64_t rows, int64_t v, int64_t stride, double* lse, int64_t* argmax,
                      int threads) {
#ifdef BS_SCORE_AVX512
    int bad = 0;
#pragma omp parallel for num_threads(threads) schedule(static) reduction(| : bad)
    for (int64_t r = 0; r < rows; ++r) {
        if (!score_row(x + r * stride, v, lse + r, argmax + r)) bad = 1;
    }
    return bad;
#else
    (void)x; (void)rows; (void)v; (void)stride; (void)lse; (void)argmax; (void)threads;
    return -1;
#endif
}

}  // extern "C"
