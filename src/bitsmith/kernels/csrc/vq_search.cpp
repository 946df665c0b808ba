// bitsmith vq encoding: the nearest codebook entry of every vector (methods.vq.nearest_codes).
//
// torch does it as a [chunk, entries] matrix x @ c^T - |c|^2 / 2 written to memory and an argmax
// over it read back: on d = 4 vectors the GEMM has an inner dimension of 4, so both passes are
// memory traffic, ~1 s per million vectors at one thread, half of a vq quantize on Qwen2.5-1.5B.
// Here each vector's scores stay in a 256-float buffer in L1 and the argmax runs over it at once.
//
// Same rule as the torch path: the entry maximising x . c_e - h_e (h = |c|^2 / 2, given by the caller
// so both paths use the same values), the first one on a tie. The dot products sum in another order
// than the GEMM (and may contract to FMA), so a near-tie can resolve either way; the Python tests hold
// the distances reached to the brute-force ones.

#include <cmath>
#include <cstdint>
#include <vector>
#ifdef __AVX512F__
#include <immintrin.h>
#endif

namespace {

// The first index of the largest of s[0..entries), NaN counting as largest (torch.argmax's rule).
int64_t first_max(const float* s, int64_t entries) {
#ifdef __AVX512F__
    if (entries % 16 == 0) {  // every vq codebook (64 or 256 entries)
        __m512 m = _mm512_loadu_ps(s);
        __mmask16 nan = _mm512_cmp_ps_mask(m, m, _CMP_UNORD_Q);
        for (int64_t e = 16; e < entries; e += 16) {
            const __m512 v = _mm512_loadu_ps(s + e);
            nan |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
            m = _mm512_max_ps(m, v);
        }
        if (!nan) {
            const __m512 top = _mm512_set1_ps(_mm512_reduce_max_ps(m));
            for (int64_t e = 0; e < entries; e += 16) {
                const __mmask16 hit = _mm512_cmp_ps_mask(_mm512_loadu_ps(s + e), top, _CMP_EQ_OQ);
                if (hit) return e + __builtin_ctz((unsigned)hit);
            }
        }
    }
#endif
    int64_t best = 0;
    float top = s[0];
    for (int64_t e = 1; e < entries && !std::isnan(top); ++e)
        if (s[e] > top || std::isnan(s[e])) { top = s[e]; best = e; }
    return best;
}

}  // namespace

extern "C" {

//   x     [n, d] float, row-major vectors
//   cbt   [d, entries] float: the codebook transposed (entry e's j-th coordinate at cbt[j * entries + e])
//   half  [entries] float: |c_e|^2 / 2
//   out   [n] int64: the chosen entry per vector
void bs_vq_nearest(const float* x, int64_t n, int64_t d, const float* cbt, const float* half, int64_t entries,
                   int64_t* out, int64_t threads) {
#pragma omp parallel num_threads((int)threads)
    {
        std::vector<float> score((size_t)entries);
        float* s = score.data();
#pragma omp for schedule(static)
        for (int64_t i = 0; i < n; ++i) {
            const float* xi = x + i * d;
            for (int64_t e = 0; e < entries; ++e) s[e] = -half[e];
            for (int64_t j = 0; j < d; ++j) {
                const float xj = xi[j];
                const float* c = cbt + j * entries;
                for (int64_t e = 0; e < entries; ++e) s[e] += xj * c[e];
            }
            out[i] = first_max(s, entries);
        }
    }
}

}  // extern "C"
