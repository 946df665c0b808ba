// Decode (1 to 8 activation rows) of vector-codebook (vq) layers with int8 activations and an int8
// codebook, on AVX-512 VBMI + VNNI (issue 19's "fast CPU decode kernel").
//
// Why not codebook.cpp's lookup table: a 256-entry table of codebook . x per vector costs 256 x d
// multiply-adds per vector of x on every call, and then one scalar load per weight vector of every
// row; at batch 1 that made w2g64vq decode half as fast as the scalar 2-bit kernel while reading fewer
// bytes. Here the codebook itself is the table, held in registers: the codebook is rounded once, at
// load time, to int8 with one per-codebook scale (kernels/codebook.py), stored as d planes of
// `entries` bytes (plane t = component t of every entry, offset by +128 so it is unsigned). A chunk of
// 64 indices then becomes d registers of 64 weights each with byte shuffles:
//   64 entries (6-bit indices)   one vpermb per plane;
//   256 entries (8-bit indices)  four vpermb (64 entries each) merged on bits 6 and 7.
// 6-bit indices are first unpacked to bytes (vpermb spreads each 6-byte run to a 64-bit lane,
// vpmultishiftqb picks its 8 codes; the lookup ignores the top 2 bits, so no mask is needed).
// The activations are prepared once per call in the matching planar order: x rounded to int8 per
// 32-weight block (scale amax / 127, the same rounding as the other int8 decode paths), plane t of
// chunk c holding component t of its 64 vectors, so vpdpbusd (u8 weights x s8 activations, 4 adjacent
// bytes into one int32 lane) sums, per lane, 4 vectors x d components = 4d consecutive weights (one
// activation block, one weight group: the shapes this path takes). The +128 offset of the weights
// is taken out by starting each lane at -128 x (its sum of int8 activations).
//
// Exact against its oracle: the dequantized weights with the int8 codebook times the int8-rounded x
// (kernels/codebook.py int8_oracle; tests/kernels/test_codebook.py), on ragged rows and groups.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "gemv.h"

#if defined(__AVX512VBMI__) && defined(__AVX512VNNI__) && defined(__AVX512BW__) && defined(__AVX512VL__) && \
    defined(__F16C__)
#include <immintrin.h>
#define BS_VQ8 1
#else
#define BS_VQ8 0
#endif

// Software prefetch distance in bytes of the index stream (the rows are contiguous).
#ifndef BS_VQ8_AHEAD
#define BS_VQ8_AHEAD 1024
#endif

// 256-entry lookups (8-bit indices) as two vpermi2b and a blend (1), as four vpermb (0), or chosen by
// the CPU at run time (-1, the default): see lookup() and use_permi2b().
#ifndef BS_VQ8_PERMI2B
#define BS_VQ8_PERMI2B -1
#endif

// Weight rows per pass of the batched (2-8 activation rows) decode: each activation plane loaded once
// serves this many weight rows. Qwen2.5-Coder-1.5B shapes, 8 activation rows, 1 thread (loaded machine,
// medians of 5 alternating): 4 rows took 0.28-0.67x the time of 1 and 0.9-1.1x that of 8; 2 activation
// rows: 0.84-0.92x of 1 row.
#ifndef BS_VQ8_BATCH_ROWS
#define BS_VQ8_BATCH_ROWS 4
#endif

namespace {

constexpr int64_t kChunk = 64;  // indices per chunk: one register of bytes

// The per-call activation layout (see the top), chunk by chunk.
struct Prep {
  int64_t chunks = 0;
  std::vector<int8_t> xp;    // [chunks][d][64] int8 x, planar per chunk, zero past the row
  std::vector<float> xs;     // [chunks][16] each lane's activation scale
  std::vector<int32_t> off;  // [chunks][16] -128 x each lane's sum of int8 x
  std::vector<int32_t> gl;   // [chunks][16] each lane's weight group, less the chunk's first group
  std::vector<int64_t> g0;   // [chunks] the chunk's first group
  std::vector<int8_t> xq;    // scratch: x rounded, natural order
  std::vector<float> bs;     // scratch: the 32-blocks' scales
};

#if BS_VQ8
// x [in] float -> xq int8 in natural order, per 32-weight block (scale amax / 127, x / scale rounded
// half to even as torch.round; a short last block has its own scale), bs the blocks' scales.
void quantize_blocks(const float* x, int64_t in, int8_t* xq, float* bs) {
  for (int64_t lo = 0; lo < in; lo += 32) {
    const int64_t n = in - lo < 32 ? in - lo : 32;
    const __mmask16 m0 = n >= 16 ? 0xFFFFu : (__mmask16)((1u << n) - 1);
    const __mmask16 m1 = n >= 32 ? 0xFFFFu : n > 16 ? (__mmask16)((1u << (n - 16)) - 1) : 0;
    const __m512 a = _mm512_maskz_loadu_ps(m0, x + lo), b = _mm512_maskz_loadu_ps(m1, x + lo + 16);
    const float scale = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(a), _mm512_abs_ps(b))) / 127.f;
    bs[lo / 32] = scale;
    if (!(scale > 0.f)) continue;  // xq is zero-filled
    const __m512 s = _mm512_set1_ps(scale);
    _mm512_mask_cvtepi32_storeu_epi8(xq + lo, m0, _mm512_cvtps_epi32(_mm512_div_ps(a, s)));
    _mm512_mask_cvtepi32_storeu_epi8(xq + lo + 16, m1, _mm512_cvtps_epi32(_mm512_div_ps(b, s)));
  }
}

// Chunk c's D planes from its 64 * D natural-order bytes: register i (64 / D vectors) is byte-permuted
// so that its segment t holds component t of those vectors, and segment t goes to plane t.
template <int D>
void planes(const int8_t* xq, int8_t* xp) {
  constexpr int V = 64 / D;  // vectors per register
  alignas(64) static const auto perm = [] {
    struct P { uint8_t b[64]; } p{};
    for (int k = 0; k < 64; ++k) p.b[k] = (uint8_t)(D * (k % V) + k / V);
    return p;
  }();
  for (int i = 0; i < D; ++i) {
    alignas(64) int8_t seg[64];
    _mm512_store_si512(seg, _mm512_permutexvar_epi8(_mm512_load_si512(perm.b), _mm512_loadu_si512(xq + i * 64)));
    for (int t = 0; t < D; ++t) std::memcpy(xp + t * kChunk + i * V, seg + t * V, V);
  }
}

// The per-call layout of x (see Prep) for vectors of d weights and groups of group_codes vectors.
void prepare(const float* x, int64_t in, int64_t d, int64_t group_codes, int64_t groups, Prep& p) {
  const int64_t codes = in / d;
  p.chunks = (codes + kChunk - 1) / kChunk;
  p.xq.assign((size_t)(p.chunks * kChunk * d), 0);
  p.bs.assign((size_t)((in + 31) / 32), 0.f);
  quantize_blocks(x, in, p.xq.data(), p.bs.data());
  p.xp.resize((size_t)(p.chunks * d * kChunk));
  p.xs.assign((size_t)(p.chunks * 16), 0.f);
  p.off.assign((size_t)(p.chunks * 16), 0);
  p.gl.assign((size_t)(p.chunks * 16), 0);
  p.g0.assign((size_t)p.chunks, 0);
  for (int64_t c = 0; c < p.chunks; ++c) {
    const int8_t* xc = p.xq.data() + c * kChunk * d;
    if (d == 4) planes<4>(xc, p.xp.data() + c * d * kChunk);
    else planes<2>(xc, p.xp.data() + c * d * kChunk);
    const int64_t first = groups == 1 ? 0 : c * kChunk / group_codes;
    p.g0[c] = first;
    alignas(64) uint64_t sad[32];  // sums of 8 bytes (each + 128) of the chunk, in order
    for (int64_t i = 0; i < d; ++i) {
      const __m512i u = _mm512_xor_si512(_mm512_loadu_si512(xc + i * 64), _mm512_set1_epi8((char)0x80));
      _mm512_store_si512(sad + 8 * i, _mm512_sad_epu8(u, _mm512_setzero_si512()));
    }
    for (int64_t j = 0; j < 16; ++j) {
      const int64_t v = c * kChunk + 4 * j;  // the lane's first vector; its 4d bytes are d / 2 sums of 8
      if (v >= codes) continue;
      int64_t sum = 0;
      for (int64_t k = 0; k < d / 2; ++k) sum += (int64_t)sad[j * d / 2 + k] - 8 * 128;
      p.off[c * 16 + j] = (int32_t)(-128 * sum);
      p.xs[c * 16 + j] = p.bs[v * d / 32];
      p.gl[c * 16 + j] = (int32_t)((groups == 1 ? 0 : v / group_codes) - first);
    }
  }
}

// Whether 256-entry lookups take two vpermi2b (AMD: Zen 4, in this file's decode, 1.23-1.33x faster than four
// vpermb, session 29) or four vpermb (elsewhere: on an Intel Xeon two vpermi2b and a blend cost more than twice
// a vpermb, 7% slower in all). BS_VQ8_PERMI2B 0 or 1 fixes the choice at build time (A/B benchmarks).
inline bool use_permi2b() {
#if BS_VQ8_PERMI2B >= 0
  return BS_VQ8_PERMI2B != 0;
#else
  static const bool amd = (__builtin_cpu_init(), __builtin_cpu_is("amd"));
  return amd;
#endif
}

// 64 indices, one per byte (the low 6 bits meaningful for 6-bit indices), from a row's chunk of
// `avail` readable bytes (masked loads past the row's end: nothing past it is touched).
template <int IB>
inline __m512i load_indices(const uint8_t* p, int64_t avail) {
  constexpr int64_t full = kChunk * IB / 8;
  const int64_t n = avail < full ? avail : full;
  const __m512i raw = _mm512_maskz_loadu_epi8(n >= 64 ? ~0ull : ((1ull << n) - 1), p);
  if (IB == 8) return raw;
  // IB == 6: run q (6 bytes at 6q) into 64-bit lane q, then code k of the run = bits 6k.. of the lane
  alignas(64) static const uint8_t spread[64] = {
      0,  1,  2,  3,  4,  5,  0, 0, 6,  7,  8,  9,  10, 11, 0, 0, 12, 13, 14, 15, 16, 17, 0, 0,
      18, 19, 20, 21, 22, 23, 0, 0, 24, 25, 26, 27, 28, 29, 0, 0, 30, 31, 32, 33, 34, 35, 0, 0,
      36, 37, 38, 39, 40, 41, 0, 0, 42, 43, 44, 45, 46, 47, 0, 0};
  const __m512i runs = _mm512_permutexvar_epi8(_mm512_load_si512(spread), raw);
  return _mm512_multishift_epi64_epi8(_mm512_set1_epi64(0x2A241E18120C0600ll), runs);
}

// Component t of the 64 vectors' codebook entries (unsigned bytes), from the planes in registers.
// 8-bit indices: P2, two 128-entry vpermi2b (bit 6 picks the register) and a blend on bit 7, else four
// vpermb. Which is faster depends on the core (use_permi2b).
template <int IB, bool P2>
inline __m512i lookup(__m512i idx, const __m512i* plane) {
  if (IB == 6) return _mm512_permutexvar_epi8(idx, plane[0]);
  if constexpr (P2) {
    const __m512i lo = _mm512_permutex2var_epi8(plane[0], idx, plane[1]);
    const __m512i hi = _mm512_permutex2var_epi8(plane[2], idx, plane[3]);
    return _mm512_mask_blend_epi8(_mm512_movepi8_mask(idx), lo, hi);
  }
  // four 64-entry vpermb (bit 6 picks within a pair, bit 7 between pairs): on an Intel Xeon 7% faster than
  // two vpermi2b and a blend, which cost more than twice a vpermb there (measured); slower on Zen 4
  const __mmask64 high = _mm512_movepi8_mask(idx);
  const __mmask64 b6 = _mm512_movepi8_mask(_mm512_add_epi8(idx, idx));  // not vptestmb: port 5
  const __m512i lo = _mm512_mask_permutexvar_epi8(_mm512_permutexvar_epi8(idx, plane[0]), b6, idx, plane[1]);
  const __m512i hi = _mm512_mask_permutexvar_epi8(_mm512_permutexvar_epi8(idx, plane[2]), b6, idx, plane[3]);
  return _mm512_mask_blend_epi8(high, lo, hi);
}

// One chunk of one row: its 16 lanes' int32 sums of int8 weight x int8 activation products.
template <int D, int IB, bool P2>
inline __m512i chunk_dot(__m512i idx, const __m512i (*plane)[IB == 8 ? 4 : 1], const int8_t* xc, __m512i off) {
  __m512i acc0 = off, acc1 = _mm512_setzero_si512();  // two chains: vpdpbusd's latency
  for (int t = 0; t < D; t += 2) {
    acc0 = _mm512_dpbusd_epi32(acc0, lookup<IB, P2>(idx, plane[t]), _mm512_loadu_si512(xc + t * kChunk));
    acc1 = _mm512_dpbusd_epi32(acc1, lookup<IB, P2>(idx, plane[t + 1]), _mm512_loadu_si512(xc + (t + 1) * kChunk));
  }
  return _mm512_add_epi32(acc0, acc1);
}

// Rows [r0, r1): R rows at a time share the activation loads and the lane bookkeeping.
// rows_multi_block<D, IB, 1, R> below computes the same floats (each row's int32 lane sums are exact),
// but not the same code: it looks up all D weight registers of a row before its one vpdpbusd chain,
// where this interleaves the lookups with two chains per row. For 8-bit indices and d = 4 (the codebook
// takes 16 registers) g++ 12 -O3 -march=native (AVX-512) compiles that order at R = 4 with 38
// instructions moving zmm registers to or from the stack against 12 here: not folded into it, so the
// one-row decode keeps this schedule.
template <int D, int IB, int R, bool P2>
void rows_block(const Prep& p, const uint8_t* packed, int64_t row_bytes, const uint16_t* scale, int64_t groups,
                const __m512i (*plane)[IB == 8 ? 4 : 1], float cb_scale, int64_t r, float* y) {
  constexpr int64_t chunk_bytes = kChunk * IB / 8;
  __m512 total[R];
  for (int i = 0; i < R; ++i) total[i] = _mm512_setzero_ps();
  const int8_t* xp = p.xp.data();
  const float* xs = p.xs.data();
  const int32_t* off = p.off.data();
  const int32_t* gl = p.gl.data();
  for (int64_t c = 0; c < p.chunks; ++c) {
    const int64_t avail = row_bytes - c * chunk_bytes, left = groups - p.g0[c];
    const __mmask16 smask = left >= 16 ? 0xFFFFu : (__mmask16)((1u << left) - 1);
    const __m512i lanes = _mm512_loadu_si512(gl + c * 16), o = _mm512_loadu_si512(off + c * 16);
    const __m512 xsc = _mm512_loadu_ps(xs + c * 16);
    for (int i = 0; i < R; ++i) {
      const uint8_t* src = packed + (r + i) * row_bytes + c * chunk_bytes;
      _mm_prefetch((const char*)(src + BS_VQ8_AHEAD), _MM_HINT_T0);
      const __m512i acc = chunk_dot<D, IB, P2>(load_indices<IB>(src, avail), plane, xp + c * D * kChunk, o);
      const __m256i h = _mm256_maskz_loadu_epi16(smask, scale + (r + i) * groups + p.g0[c]);
      const __m512 ws = _mm512_mul_ps(xsc, _mm512_permutexvar_ps(lanes, _mm512_cvtph_ps(h)));
      total[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc), ws, total[i]);
    }
  }
  for (int i = 0; i < R; ++i) y[r + i] = _mm512_reduce_add_ps(total[i]) * cb_scale;
}

template <int D, int IB, bool P2>
void rows_int8(const Prep& p, const uint8_t* packed, int64_t row_bytes, const uint16_t* scale, int64_t groups,
               const uint8_t* tables, float cb_scale, int64_t out, float* y, int64_t threads) {
  constexpr int REGS = IB == 8 ? 4 : 1;  // registers per plane
  constexpr int R = 4;  // rows per pass: 4 were 3-10% faster than 2 here, and 1 much slower for 6-bit codes
#pragma omp parallel num_threads((int)threads) if (threads > 1)
  {
    __m512i plane[D][REGS];  // per thread: the codebook stays in registers
    for (int t = 0; t < D; ++t)
      for (int k = 0; k < REGS; ++k) plane[t][k] = _mm512_loadu_si512(tables + (t * REGS + k) * 64);
#pragma omp for schedule(static)
    for (int64_t b = 0; b < out / R; ++b)
      rows_block<D, IB, R, P2>(p, packed, row_bytes, scale, groups, plane, cb_scale, b * R, y);
#pragma omp single
    for (int64_t r = out / R * R; r < out; ++r)
      rows_block<D, IB, 1, P2>(p, packed, row_bytes, scale, groups, plane, cb_scale, r, y);
  }
}

// R weight rows [r, r + R) for M activation rows (a batched decode, a speculative verify): each chunk's
// indices are looked up once into D registers of weights per row and multiplied with every activation
// row's planes, each plane loaded once for the R weight rows, so M rows cost one index stream and
// M x D x R vpdpbusd instead of M passes over the weights. The lane bookkeeping (groups) depends on the
// shape only, so every Prep shares p[0]'s.
template <int D, int IB, int M, int R, bool P2>
void rows_multi_block(const Prep* p, const uint8_t* packed, int64_t row_bytes, const uint16_t* scale, int64_t groups,
                      const __m512i (*plane)[IB == 8 ? 4 : 1], float cb_scale, int64_t r, int64_t out, float* y) {
  constexpr int64_t chunk_bytes = kChunk * IB / 8;
  __m512 total[R][M];
  for (int i = 0; i < R; ++i)
    for (int m = 0; m < M; ++m) total[i][m] = _mm512_setzero_ps();
  const Prep& shape = p[0];
  for (int64_t c = 0; c < shape.chunks; ++c) {
    const int64_t avail = row_bytes - c * chunk_bytes, left = groups - shape.g0[c];
    const __mmask16 smask = left >= 16 ? 0xFFFFu : (__mmask16)((1u << left) - 1);
    const __m512i lanes = _mm512_loadu_si512(shape.gl.data() + c * 16);
    __m512i w[R][D];
    __m512 ws[R];
    for (int i = 0; i < R; ++i) {
      const uint8_t* src = packed + (r + i) * row_bytes + c * chunk_bytes;
      _mm_prefetch((const char*)(src + BS_VQ8_AHEAD), _MM_HINT_T0);
      const __m512i idx = load_indices<IB>(src, avail);
      for (int t = 0; t < D; ++t) w[i][t] = lookup<IB, P2>(idx, plane[t]);
      const __m256i h = _mm256_maskz_loadu_epi16(smask, scale + (r + i) * groups + shape.g0[c]);
      ws[i] = _mm512_permutexvar_ps(lanes, _mm512_cvtph_ps(h));
    }
    for (int m = 0; m < M; ++m) {
      const int8_t* xc = p[m].xp.data() + c * D * kChunk;
      const __m512i o = _mm512_loadu_si512(p[m].off.data() + c * 16);
      const __m512 xsc = _mm512_loadu_ps(p[m].xs.data() + c * 16);
      __m512i acc[R];
      for (int i = 0; i < R; ++i) acc[i] = o;
      for (int t = 0; t < D; ++t) {
        const __m512i xt = _mm512_loadu_si512(xc + t * kChunk);
        for (int i = 0; i < R; ++i) acc[i] = _mm512_dpbusd_epi32(acc[i], w[i][t], xt);
      }
      for (int i = 0; i < R; ++i)
        total[i][m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[i]), _mm512_mul_ps(xsc, ws[i]), total[i][m]);
    }
  }
  for (int i = 0; i < R; ++i)
    for (int m = 0; m < M; ++m) y[m * out + r + i] = _mm512_reduce_add_ps(total[i][m]) * cb_scale;
}

template <int D, int IB, int M, bool P2>
void rows_multi(const Prep* p, const uint8_t* packed, int64_t row_bytes, const uint16_t* scale, int64_t groups,
                const uint8_t* tables, float cb_scale, int64_t out, float* y, int64_t threads) {
  constexpr int REGS = IB == 8 ? 4 : 1;
  constexpr int R = BS_VQ8_BATCH_ROWS;
#pragma omp parallel num_threads((int)threads) if (threads > 1)
  {
    __m512i plane[D][REGS];
    for (int t = 0; t < D; ++t)
      for (int k = 0; k < REGS; ++k) plane[t][k] = _mm512_loadu_si512(tables + (t * REGS + k) * 64);
#pragma omp for schedule(static)
    for (int64_t b = 0; b < out / R; ++b)
      rows_multi_block<D, IB, M, R, P2>(p, packed, row_bytes, scale, groups, plane, cb_scale, b * R, out, y);
#pragma omp single
    for (int64_t r = out / R * R; r < out; ++r)
      rows_multi_block<D, IB, M, 1, P2>(p, packed, row_bytes, scale, groups, plane, cb_scale, r, out, y);
  }
}

// M (2..8) activation rows of one layout, M a compile-time constant.
template <int D, int IB, bool P2>
void rows_batch(const Prep* p, int64_t rows, const uint8_t* packed, int64_t row_bytes, const uint16_t* scale,
                int64_t groups, const uint8_t* tables, float cb_scale, int64_t out, float* y, int64_t threads) {
  switch (rows) {
    case 2: return rows_multi<D, IB, 2, P2>(p, packed, row_bytes, scale, groups, tables, cb_scale, out, y, threads);
    case 3: return rows_multi<D, IB, 3, P2>(p, packed, row_bytes, scale, groups, tables, cb_scale, out, y, threads);
    case 4: return rows_multi<D, IB, 4, P2>(p, packed, row_bytes, scale, groups, tables, cb_scale, out, y, threads);
    case 5: return rows_multi<D, IB, 5, P2>(p, packed, row_bytes, scale, groups, tables, cb_scale, out, y, threads);
    case 6: return rows_multi<D, IB, 6, P2>(p, packed, row_bytes, scale, groups, tables, cb_scale, out, y, threads);
    case 7: return rows_multi<D, IB, 7, P2>(p, packed, row_bytes, scale, groups, tables, cb_scale, out, y, threads);
    default: return rows_multi<D, IB, 8, P2>(p, packed, row_bytes, scale, groups, tables, cb_scale, out, y, threads);
  }
}

#include "gemm_tile.h"

// A vq matrix's rows as gemm_tiles (the int8 prefill GEMM) reads them: each chunk of 64 indices looked up
// into D planes of unsigned entries (int8 codebook + 128, zero point 128) and interleaved back into
// natural order, so the prefill multiplies exactly the weights the int8 decode does (int8_oracle).
struct VqArgs {
  const uint8_t* packed;
  const uint16_t* scale;
  const uint8_t* tables;
  float cb_scale;
  int64_t in, row_bytes, groups;
};

template <int D, int IB, bool P2>
struct VqRows {
  using Args = VqArgs;
  static constexpr bool kDivide = true;
  static constexpr int REGS = IB == 8 ? 4 : 1;
  static constexpr int64_t chunk_bytes = kChunk * IB / 8;
  const VqArgs& a;
  __m512i plane[D][REGS];
  __m512i order[D];  // D = 2: vpermt2b indices of natural register i; D = 4: of both halves' pair merges
  explicit VqRows(const VqArgs& args) : a(args) {
    for (int t = 0; t < D; ++t)
      for (int k = 0; k < REGS; ++k) plane[t][k] = _mm512_loadu_si512(a.tables + (t * REGS + k) * 64);
    alignas(64) uint8_t g[64];
    for (int i = 0; i < D; ++i) {  // natural register i, byte k: component k % D of vector (64 / D) i + k / D
      for (int k = 0; k < 64; ++k) g[k] = (uint8_t)(((k % D) & 1) << 6 | ((64 / D) * i + k / D));
      order[i] = _mm512_load_si512(g);
    }
  }
  void codes(int64_t o, uint8_t* c) const {
    const uint8_t* row = a.packed + o * a.row_bytes;
    for (int64_t ch = 0; ch * kChunk * D < a.in; ++ch) {
      const __m512i idx = load_indices<IB>(row + ch * chunk_bytes, a.row_bytes - ch * chunk_bytes);
      __m512i w[D];
      for (int t = 0; t < D; ++t) w[t] = lookup<IB, P2>(idx, plane[t]);
      const int64_t left = a.in - ch * kChunk * D;  // natural bytes of this chunk inside the row
      for (int i = 0; i < D; ++i) {
        __m512i nat = _mm512_permutex2var_epi8(w[0], order[i], w[1]);
        if constexpr (D == 4)  // bytes 2, 3 of every 4 from planes 2 and 3
          nat = _mm512_mask_blend_epi8((__mmask64)0xCCCCCCCCCCCCCCCCull, nat,
                                       _mm512_permutex2var_epi8(w[2], order[i], w[3]));
        const int64_t n = left - 64 * i;
        if (n <= 0) break;
        _mm512_mask_storeu_epi8(c + ch * kChunk * D + 64 * i, n >= 64 ? ~0ull : (1ull << n) - 1, nat);
      }
    }
  }
  void scales(int64_t o, int64_t g, float* s, float* sz) const {
    *s = bs::half_to_float(a.scale[o * a.groups + g]) * a.cb_scale;
    *sz = *s * 128.f;
  }
};

// One decode call's operands (bs_vq_gemm_int8), for the lookup variant chosen at run time.
struct DecodeArgs {
  const Prep* p;
  int64_t rows;
  const uint8_t* packed;
  int64_t row_bytes;
  const uint16_t* scale;
  int64_t groups;
  const uint8_t* tables;
  float cb_scale;
  int64_t out;
  float* y;
  int64_t threads;
};

template <int D, int IB, bool P2>
void decode_rows(const DecodeArgs& a) {
  if (a.rows == 1)  // 4 weight rows per pass (rows_int8): faster than the one-row-at-a-time batch loop
    return rows_int8<D, IB, P2>(a.p[0], a.packed, a.row_bytes, a.scale, a.groups, a.tables, a.cb_scale, a.out, a.y,
                                a.threads);
  rows_batch<D, IB, P2>(a.p, a.rows, a.packed, a.row_bytes, a.scale, a.groups, a.tables, a.cb_scale, a.out, a.y,
                        a.threads);
}

// The run-time lookup choice (use_permi2b) as a template argument; 6-bit indices have one lookup.
template <int D, int IB>
void decode(const DecodeArgs& a, bool p2) {
  if constexpr (IB == 8) {
    if (p2) return decode_rows<D, IB, true>(a);
  }
  decode_rows<D, IB, false>(a);
}

template <int D, int IB>
void prefill(const VqArgs& args, bool p2, int64_t out, int64_t in, int64_t group, const float* x, int64_t T, float* y,
             int64_t threads) {
  if constexpr (IB == 8) {
    if (p2) return gemm_tiles<VqRows<D, IB, true>>(args, out, in, group, x, T, y, threads);
  }
  gemm_tiles<VqRows<D, IB, false>>(args, out, in, group, x, T, y, threads);
}
#endif

}  // namespace

extern "C" {

// Whether this build has the int8 codebook decode (AVX-512 VBMI + VNNI).
int bs_vq8_available() { return BS_VQ8; }

// y [rows, out] = x [rows, in] @ W^T for a vq matrix, rows 1..kMaxRows: packed indices [out, row_bytes]
// (formats/packing.py layout), fp16 scales [out, groups], tables uint8 [d][entries] (int8 codebook + 128),
// cb_scale the codebook's scale. Returns 0, computing nothing, where the shape, the row count or the CPU
// is not one this path takes (the caller then runs codebook.cpp's float kernel).
int bs_vq_gemm_int8(const float* x, int64_t rows, const uint8_t* packed, const uint16_t* scale, const uint8_t* tables,
                    float cb_scale, int64_t out, int64_t in, int64_t d, int64_t bits, int64_t group, float* y,
                    int64_t threads) {
#if BS_VQ8
  constexpr int64_t kMaxRows = 8;
  if (rows < 1 || rows > kMaxRows) return 0;
  if (d <= 0 || in % d != 0 || group <= 0 || group % d != 0) return 0;
  const int64_t codes = in / d, groups = (in + group - 1) / group, group_codes = group / d;
  const int64_t row_bytes = (codes + 7) / 8 * bits;
  // a lane (4 vectors) must lie in one weight group and one 32-weight activation block
  if (!(groups == 1 || group_codes % 4 == 0) || 32 % (4 * d) != 0) return 0;
  const bool six = bits == 6 && d == 2, eight4 = bits == 8 && d == 4, eight2 = bits == 8 && d == 2;
  if (!(six || eight4 || eight2)) return 0;
  const bool p2 = use_permi2b();
  static thread_local Prep p[kMaxRows];  // reused: no allocation per call once the widest layer has run
  for (int64_t m = 0; m < rows; ++m) prepare(x + m * in, in, d, group_codes, groups, p[m]);
  const DecodeArgs a{p, rows, packed, row_bytes, scale, groups, tables, cb_scale, out, y, threads};
  if (six) decode<2, 6>(a, p2);
  if (eight4) decode<4, 8>(a, p2);
  if (eight2) decode<2, 8>(a, p2);
  return 1;
#else
  (void)x, (void)rows, (void)packed, (void)scale, (void)tables, (void)cb_scale, (void)out, (void)in, (void)d;
  (void)bits, (void)group, (void)y, (void)threads;
  return 0;
#endif
}

// Prefill: y [T, out] = x [T, in] @ W^T for any T, through the int8 GEMM's tiles (gemm_tile.h) with the
// same int8 codebook and the same int8 rounding of x as bs_vq_gemm_int8. Returns 0, computing nothing,
// where the shape or the CPU is not one this path takes.
int bs_vq_gemm_prefill(const float* x, int64_t T, const uint8_t* packed, const uint16_t* scale, const uint8_t* tables,
                       float cb_scale, int64_t out, int64_t in, int64_t d, int64_t bits, int64_t group, float* y,
                       int64_t threads) {
#if BS_VQ8
  if (T < 1 || d <= 0 || in % 32 != 0 || in % d != 0 || group <= 0 || group % 32 != 0) return 0;
  const bool six = bits == 6 && d == 2, eight4 = bits == 8 && d == 4, eight2 = bits == 8 && d == 2;
  if (!(six || eight4 || eight2)) return 0;
  const int64_t codes = in / d;
  const VqArgs args{packed, scale, tables, cb_scale, in, (codes + 7) / 8 * bits, (in + group - 1) / group};
  const bool p2 = use_permi2b();
  if (six) prefill<2, 6>(args, p2, out, in, group, x, T, y, threads);
  if (eight4) prefill<4, 8>(args, p2, out, in, group, x, T, y, threads);
  if (eight2) prefill<2, 8>(args, p2, out, in, group, x, T, y, threads);
  return 1;
#else
  (void)x, (void)T, (void)packed, (void)scale, (void)tables, (void)cb_scale, (void)out, (void)in, (void)d;
  (void)bits, (void)group, (void)y, (void)threads;
  return 0;
#endif
}

}  // extern "C"
