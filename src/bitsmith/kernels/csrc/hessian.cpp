// bitsmith calibration statistics: the GPTQ Hessian's rank-k update H += X^T X for bfloat16 inputs X
// [T, n], summed in float32, on AMX tiles, or without AMX on AVX512-BF16 (vdpbf16ps, the same packed
// tiles; block_update's second form) (calib.stats declares and calls it). On a Zen 5 without AMX the
// fallback it replaces, a float32 addmm at ~200 GFLOP/s, was two thirds of GPTQ's time on SmolLM2.
//
// Why a kernel of our own: torch 2.13 has no CPU bf16 x bf16 -> fp32 matmul (mm(out_dtype=) is not
// implemented), so the exact path was a float32 GEMM in oneDNN's bf16 "fpmath" mode: the bf16 batch was
// first widened to a float32 copy (2x the bytes, freshly page-faulted every batch) and oneDNN rounded
// it back to bf16 inside. Here the bf16 values go to TDPBF16PS directly: products of two bf16 are exact
// in float32 and are accumulated in float32, so the result equals the float32 product of the widened
// inputs up to summation order (the tests hold it to a float64 oracle). H is symmetric: only the
// 32 x 32 blocks on or above the diagonal are computed (about half of the multiply-adds); the caller
// mirrors the upper triangle.
//
// Layout: per chunk of KC tokens, X is packed twice, zero-padded to whole 32 x 32 tiles, each
// 32-feature panel contiguous: as A tiles (16 features x 32 tokens) and as B tiles in the VNNI layout
// TDPBF16PS reads (16 token pairs x 16 features x 2), so a tile load reads 16 rows from within 2 KB,
// not 16 rows a matrix row apart (pages). The micro-kernel keeps a 32 x 32 block of H in four
// accumulator tiles (two A and two B tiles beside them: all eight tiles). Row blocks are taken GROUP
// at a time per task, so each B panel read from memory serves up to GROUP row blocks from the L2
// cache. Every block of H is summed by one thread in token order, so the result does not depend on
// the thread count.

#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__linux__)
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
#define BS_HAVE_AMX 1
#define BS_HESSIAN 1
#elif defined(__AVX512BF16__) && defined(__AVX512BW__) && defined(__AVX512F__)
#include <immintrin.h>
#define BS_HAVE_DPBF16 1  // no AMX: the same packed tiles through AVX512-BF16 vdpbf16ps (block_update below)
#define BS_HESSIAN 1
#endif

namespace {

constexpr int64_t BLK = 32;     // a block of H: 2 x 2 tiles of 16 x 16 floats
constexpr int64_t KC = 1024;    // tokens per packed chunk (64 KB per 32-feature panel and layout)
constexpr int64_t GROUP = 8;    // row blocks per task: 8 A panels (512 KB) stay in L2 while B panels stream

inline int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }

#ifdef BS_HAVE_AMX
struct TileConfig {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
};

bool amx_permitted() {
    // the kernel must grant this process the AMX tile state once (ARCH_REQ_XCOMP_PERM, XTILEDATA)
    static const bool ok = syscall(SYS_arch_prctl, 0x1023, 18) == 0;
    return ok;
}

void configure_tiles() {  // per thread: eight tiles of 16 rows x 64 bytes
    TileConfig cfg;
    std::memset(&cfg, 0, sizeof cfg);
    cfg.palette = 1;
    for (int t = 0; t < 8; ++t) {
        cfg.colsb[t] = 64;
        cfg.rows[t] = 16;
    }
    _tile_loadconfig(&cfg);
}
#endif

#ifdef BS_HESSIAN

// Pack tokens [k0, k0 + kc) of x, zero-padded, panel by panel (each 32-feature panel contiguous, so a
// tile's 16 rows are 1 KB of consecutive bytes rather than 16 rows a whole matrix row apart):
//   xa: A tiles, [np/32][kp/32][32 features][32 tokens]
//   xb: B tiles (VNNI), [np/32][kp/2][32 features][2 tokens]
// One panel's 32 tokens at a time (pack_group); the element-by-element form below is the reference.
void pack_group_scalar(const uint16_t* x, int64_t ldx, int64_t width, int64_t rows, uint16_t* a, uint16_t* b) {
    for (int64_t t = 0; t < BLK; ++t)
        for (int64_t i = 0; i < BLK; ++i) {
            const uint16_t v = t < rows && i < width ? x[t * ldx + i] : 0;
            a[i * BLK + t] = v;                  // A: feature-major, the 32 tokens of feature i in a row
            b[(t / 2) * BLK * 2 + i * 2 + t % 2] = v;  // B: token pairs, each feature's pair side by side
        }
}

#if defined(__AVX512BW__) && defined(__AVX512F__)
// The same bytes with 512-bit moves: each B row (a token pair over the 32 features) interleaves two
// token rows; seen as 32-bit lanes (one token pair of one feature each), A is the transpose of B, so
// each A row is gathered from B's 16 pair rows in L1. Before this the scalar form (its 64-byte row
// copies a memmove call each) took longer than the tile products on 576-wide inputs.
void pack_group(const uint16_t* x, int64_t ldx, int64_t width, int64_t rows, uint16_t* a, uint16_t* b) {
    const __mmask32 cols = width >= BLK ? ~__mmask32(0) : (__mmask32)((1u << width) - 1);
    const __m512i lo = _mm512_set_epi16(47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9, 40, 8,
                                        39, 7, 38, 6, 37, 5, 36, 4, 35, 3, 34, 2, 33, 1, 32, 0);
    const __m512i hi = _mm512_add_epi16(lo, _mm512_set1_epi16(16));
    for (int64_t t = 0; t < BLK; t += 2) {
        const __m512i r0 = t < rows ? _mm512_maskz_loadu_epi16(cols, x + t * ldx) : _mm512_setzero_si512();
        const __m512i r1 = t + 1 < rows ? _mm512_maskz_loadu_epi16(cols, x + (t + 1) * ldx) : _mm512_setzero_si512();
        _mm512_storeu_si512(b + t * BLK, _mm512_permutex2var_epi16(r0, lo, r1));           // features 0-15
        _mm512_storeu_si512(b + t * BLK + BLK, _mm512_permutex2var_epi16(r0, hi, r1));     // features 16-31
    }
    const __m512i pairs = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                             _mm512_set1_epi32(BLK));  // pair q's row starts at 32-bit lane q * 32
    for (int64_t i = 0; i < BLK; ++i) {
        const __m512i idx = _mm512_add_epi32(pairs, _mm512_set1_epi32((int)i));
        _mm512_storeu_si512(a + i * BLK, _mm512_i32gather_epi32(idx, (const int*)b, 4));
    }
}
#else
void pack_group(const uint16_t* x, int64_t ldx, int64_t width, int64_t rows, uint16_t* a, uint16_t* b) {
    pack_group_scalar(x, ldx, width, rows, a, b);
}
#endif

void pack(const uint16_t* x, int64_t ldx, int64_t n, int64_t k0, int64_t kc, int64_t np, int64_t kp,
          uint16_t* xa, uint16_t* xb, int threads, bool scalar) {
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t i0 = 0; i0 < np; i0 += BLK) {
        const int64_t width = n - i0 < BLK ? n - i0 : BLK;
        for (int64_t t0 = 0; t0 < kp; t0 += BLK) {
            const uint16_t* src = x + (k0 + t0) * ldx + i0;
            const int64_t rows = kc - t0 < BLK ? kc - t0 : BLK;  // tokens left in the chunk (>= 1)
            uint16_t* a = xa + i0 * kp + t0 * BLK;  // this panel's A tile for tokens t0..t0+31
            uint16_t* b = xb + i0 * kp + t0 * BLK;  // and its 16 B rows of token pairs
            if (scalar)
                pack_group_scalar(src, ldx, width, rows, a, b);
            else
                pack_group(src, ldx, width, rows, a, b);
        }
    }
}

// The 32 x 32 block of H at (i0, j0) as block_update reads and writes it: in place (row stride ld = ldh),
// or, for an edge block, a zero-padded copy (ld = 32) that finish() writes back.
struct HBlock {
    alignas(64) float local[BLK * BLK];
    float* h;
    int64_t ldh, n, i0, j0;
    bool inside;
    float* c;
    int64_t ld;
    HBlock(float* h_, int64_t ldh_, int64_t n_, int64_t i0_, int64_t j0_)
        : h(h_), ldh(ldh_), n(n_), i0(i0_), j0(j0_), inside(i0_ + BLK <= n_ && j0_ + BLK <= n_),
          c(inside ? h_ + i0_ * ldh_ + j0_ : local), ld(inside ? ldh_ : BLK) {
        if (inside) return;
        std::memset(local, 0, sizeof local);
        for (int64_t i = i0; i < n && i < i0 + BLK; ++i)
            for (int64_t j = j0; j < n && j < j0 + BLK; ++j) local[(i - i0) * BLK + (j - j0)] = h[i * ldh + j];
    }
    void finish() {
        if (inside) return;
        for (int64_t i = i0; i < n && i < i0 + BLK; ++i)
            for (int64_t j = j0; j < n && j < j0 + BLK; ++j) h[i * ldh + j] = local[(i - i0) * BLK + (j - j0)];
    }
};

// H[i0:i0+32, j0:j0+32] += A(i0) . B(j0) over the chunk's kp tokens.
#ifdef BS_HAVE_AMX
void block_update(const uint16_t* xa, const uint16_t* xb, int64_t kp, int64_t i0, int64_t j0,
                  float* h, int64_t ldh, int64_t n) {
    HBlock blk(h, ldh, n, i0, j0);
    float* c = blk.c;
    const int64_t ldc = blk.ld * (int64_t)sizeof(float);
    _tile_loadd(0, c, ldc);
    _tile_loadd(1, c + 16, ldc);
    _tile_loadd(2, (char*)c + 16 * ldc, ldc);
    _tile_loadd(3, (char*)c + 16 * ldc + 64, ldc);
    const uint16_t* a = xa + i0 * kp;  // 32 x 32 tiles of 2 KB, one per 32 tokens
    const uint16_t* b = xb + j0 * kp;  // 16 token pairs x 32 features x 2 per 32 tokens: 2 KB
    for (int64_t k = 0; k < kp; k += BLK, a += BLK * BLK, b += BLK * BLK) {
        _tile_loadd(4, a, 64);
        _tile_loadd(5, a + 16 * BLK, 64);
        _tile_loadd(6, b, 128);
        _tile_loadd(7, b + 32, 128);
        _tile_dpbf16ps(0, 4, 6);
        _tile_dpbf16ps(1, 4, 7);
        _tile_dpbf16ps(2, 5, 6);
        _tile_dpbf16ps(3, 5, 7);
    }
    _tile_stored(0, c, ldc);
    _tile_stored(1, c + 16, ldc);
    _tile_stored(2, (char*)c + 16 * ldc, ldc);
    _tile_stored(3, (char*)c + 16 * ldc + 64, ldc);
    blk.finish();
}
#else
// Without AMX: 4 rows of the block at a time. Per token pair p, the B row (the pair for 32 features: two zmm
// of 16 features x 2 tokens, the layout vdpbf16ps pairs lane by lane) meets row i's pair from A (one 32-bit
// broadcast): lane l gains x[2p][i] x[2p][j0+l] + x[2p+1][i] x[2p+1][j0+l], products of bf16 exact in
// float32. Each 32 tokens are summed into fresh accumulators and then added to the block's: one float32
// chain over all of a chunk's tokens left 2-6e-6 of the diagonal's size against the float64 oracle, twice
// MKL's float32 addmm (tests/methods/test_native_hessian.py).
void block_update(const uint16_t* xa, const uint16_t* xb, int64_t kp, int64_t i0, int64_t j0,
                  float* h, int64_t ldh, int64_t n) {
    HBlock blk(h, ldh, n, i0, j0);
    float* c = blk.c;
    const int64_t ldc = blk.ld;
    constexpr int R = 4;
    for (int64_t r0 = 0; r0 < BLK; r0 += R) {
        __m512 acc[R][2];
        for (int r = 0; r < R; ++r) {
            acc[r][0] = _mm512_loadu_ps(c + (r0 + r) * ldc);
            acc[r][1] = _mm512_loadu_ps(c + (r0 + r) * ldc + 16);
        }
        const uint16_t* a = xa + i0 * kp;
        const uint16_t* b = xb + j0 * kp;
        for (int64_t k = 0; k < kp; k += BLK, a += BLK * BLK, b += BLK * BLK) {
            __m512 part[R][2];
            for (int r = 0; r < R; ++r) part[r][0] = part[r][1] = _mm512_setzero_ps();
            for (int p = 0; p < BLK / 2; ++p) {
                const __m512bh b0 = (__m512bh)_mm512_loadu_si512(b + p * 2 * BLK);
                const __m512bh b1 = (__m512bh)_mm512_loadu_si512(b + p * 2 * BLK + BLK);
                for (int r = 0; r < R; ++r) {
                    int32_t pair;
                    std::memcpy(&pair, a + (r0 + r) * BLK + 2 * p, 4);
                    const __m512bh av = (__m512bh)_mm512_set1_epi32(pair);
                    part[r][0] = _mm512_dpbf16_ps(part[r][0], av, b0);
                    part[r][1] = _mm512_dpbf16_ps(part[r][1], av, b1);
                }
            }
            for (int r = 0; r < R; ++r) {
                acc[r][0] = _mm512_add_ps(acc[r][0], part[r][0]);
                acc[r][1] = _mm512_add_ps(acc[r][1], part[r][1]);
            }
        }
        for (int r = 0; r < R; ++r) {
            _mm512_storeu_ps(c + (r0 + r) * ldc, acc[r][0]);
            _mm512_storeu_ps(c + (r0 + r) * ldc + 16, acc[r][1]);
        }
    }
    blk.finish();
}
#endif

// Row blocks per task: GROUP on one thread; on several, fewer, so the dynamic schedule has about four
// tasks per thread. The tasks are triangular (earlier rows have more blocks): on 576 inputs (18 row
// blocks) GROUP made three tasks of 116, 52 and 3 blocks, and at two threads one thread did two thirds
// of the work while the other waited. Which thread sums a block changes no value (one thread per block).
int64_t row_group(int64_t nb, int threads) {
    if (threads <= 1) return GROUP;
    const int64_t per = nb / (4 * (int64_t)threads);
    return per < 1 ? 1 : (per > GROUP ? GROUP : per);
}

void chunk_update(const uint16_t* xa, const uint16_t* xb, int64_t np, int64_t kp, float* h, int64_t ldh,
                  int64_t n, int threads) {
    const int64_t nb = np / BLK, group = row_group(nb, threads), groups = (nb + group - 1) / group;
#pragma omp parallel num_threads(threads)
    {
#ifdef BS_HAVE_AMX
        configure_tiles();
#endif
#pragma omp for schedule(dynamic, 1)
        for (int64_t g = 0; g < groups; ++g) {  // earlier groups have more blocks: dynamic balances them
            const int64_t ib0 = g * group, ib1 = ib0 + group < nb ? ib0 + group : nb;
            for (int64_t jb = ib0; jb < nb; ++jb)
                for (int64_t ib = ib0; ib < ib1 && ib <= jb; ++ib)
                    block_update(xa, xb, kp, ib * BLK, jb * BLK, h, ldh, n);
        }
#ifdef BS_HAVE_AMX
        _tile_release();
#endif
    }
}
#endif

}  // namespace

extern "C" {

// Whether bs_hessian_bf16 can run here (AMX built in and granted by the kernel): 1 or 0.
int bs_hessian_bf16_available() {
#ifdef BS_HAVE_AMX
    return amx_permitted() ? 1 : 0;
#elif defined(BS_HAVE_DPBF16)
    return 1;
#else
    return 0;
#endif
}

// bs_hessian_bf16 with the packing chosen: scalar_pack != 0 packs element by element (pack_group_scalar,
// the reference the tests hold the vector packing to, bit for bit).
int bs_hessian_bf16_packed(const uint16_t* x, int64_t tokens, int64_t n, int64_t ldx, float* h, int64_t ldh,
                           int64_t threads, int64_t scalar_pack) {
#ifdef BS_HESSIAN
#ifdef BS_HAVE_AMX
    if (!amx_permitted()) return -1;
#endif
    const int nt = threads < 1 ? 1 : (int)threads;
    const int64_t np = round_up(n, BLK);
    const int64_t kcap = round_up(tokens < KC ? tokens : KC, BLK);
    std::vector<uint16_t> xa(np * kcap), xb(np * kcap);
    for (int64_t k0 = 0; k0 < tokens; k0 += KC) {
        const int64_t kc = tokens - k0 < KC ? tokens - k0 : KC, kp = round_up(kc, BLK);
        pack(x, ldx, n, k0, kc, np, kp, xa.data(), xb.data(), nt, scalar_pack != 0);
        chunk_update(xa.data(), xb.data(), np, kp, h, ldh, n, nt);
    }
    return 0;
#else
    (void)x; (void)tokens; (void)n; (void)ldx; (void)h; (void)ldh; (void)threads; (void)scalar_pack;
    return -1;
#endif
}

// h [n, ldh] float += x^T x for x [T, ldx] bfloat16 (raw bits), on the 32 x 32 blocks with block column
// >= block row (the upper triangle and the whole diagonal blocks; the rest of h is not touched).
// Returns 0, or -1 where AMX is unavailable (nothing done: the caller takes its GEMM path).
int bs_hessian_bf16(const uint16_t* x, int64_t tokens, int64_t n, int64_t ldx, float* h, int64_t ldh,
                    int64_t threads) {
    return bs_hessian_bf16_packed(x, tokens, n, ldx, h, ldh, threads, 0);
}

}  // extern "C"
