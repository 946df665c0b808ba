// bitsmith decode gemv for every code width (2-8 bits) with int8 activations, on AVX-512 VBMI + VNNI.
//
// The float decode of 2/3/5/6/7-bit codes (qmatmul_float.h dot_runs) widens each run of 8 codes with
// per-lane 64-bit shifts and converts it to float: a dozen instructions per 8 codes, so a 2- or 3-bit
// matrix decoded slower than a 4-bit one although it is fewer bytes. Here one 64-code chunk of any
// width b is 8*b packed bytes, and becomes 64 codes in natural order in three instructions:
//   vpermb       byte-gathers run j (bytes j*b .. j*b+b-1 of the chunk) into 64-bit lane j;
//   vpmultishiftqb  picks, for byte i of each lane, the 8 bits starting at bit i*b (code i of the run);
//   vpand        keeps the low b bits.
// The codes then meet the int8 activations in one vpdpbusd (64 u8 x s8 products into 16 int32 lanes,
// lanes 0-7 the chunk's first 32-block, 8-15 its second), are converted once per chunk and scaled by
// the per-lane activation scales and, per group, by the weight scale. The arithmetic is the same as
// qmatmul.cpp's int8 path (prepare_int8's natural-order layout: xq [T, in] int8, xv [T, in / 4] with
// each 32-block's scale repeated 8 times, xsum [T, groups] for the zero-point term), so both are held
// to the same oracle: the exact product of the dequantized weights with the int8-rounded x.
//
// Shapes: in and group multiples of 64 (a group never splits a chunk; the last group may be short,
// as SmolLM2's 576 = 4.5 groups of 128). Anything else, or a CPU without VBMI/VNNI/GFNI, takes the other
// paths in qmatmul.cpp (AVX2 and portable scalar code).

#include <cstdint>

#include "gemv.h"

// GFNI: the 2-bit superblock's bit-field step (every CPU with VBMI but one, Cannon Lake, has it).
#if defined(__AVX512VBMI__) && defined(__AVX512VNNI__) && defined(__AVX512BW__) && defined(__AVX512VL__) && \
    defined(__F16C__) && defined(__GFNI__)
#include <immintrin.h>
#define BS_VBMI 1
#else
#define BS_VBMI 0
#endif

// Software prefetch distance, in passes of R rows: the hardware streamers stop at every 4 KB boundary
// and a pass reads R short streams, so the loop asks for the bytes it will read BS_AHEAD passes
// later. Measured on this machine (1 thread, 17920x1536 gemv, CPU time): 4-bit 2.55 -> 1.47 ms,
// 2-bit 1.79 -> 1.12, 8-bit 2.51 -> 1.98 with BS_AHEAD 2 (1 to 4 are within a few percent).
#ifndef BS_AHEAD
#define BS_AHEAD 2
#endif
// ... and at least this many bytes ahead (the distance in passes shrinks with the row's bytes: a 2-bit
// SmolLM2 row of 576 codes is 144 bytes, two passes 1.2 KB). 0, i.e. passes only: a 4 KB minimum was
// no faster on SmolLM2 w2g64/w4g128 decode (session 10, bench/results/speed/README.md); -D to retry.
#ifndef BS_AHEAD_BYTES
#define BS_AHEAD_BYTES 0
#endif
// A second, far prefetch of the superblock rows (rows_strided), BS_PF_FAR passes ahead, with hint
// BS_PF_FAR_HINT (_MM_HINT_T1 or _MM_HINT_T2: into L2); -DBS_PF_FAR=0 leaves it out. A T0 prefetch
// holds one of the core's ~16 L1 fill buffers until its line arrives, which caps one core near 16 lines
// per memory latency (~10-11 GB/s here, the 1-thread read rate); an L2 prefetch far ahead lets the near
// T0 prefetch find its line in L2. Quiet, 2 threads, 7 alternating rounds (bench/gemv_stream.py, session
// 14), time against the build without it: w4g128 17920x1536 0.907, 2048x1536 0.901, 1536x8960 1.002;
// w3g128 0.973 / 0.981 / 1.005; w2g64 1.006 / 0.971 / 0.979 (T1 hint, 8 passes: no better). On by default
// since; the 1-thread figures of session 13 agreed for w4 (0.91x) and saw the rest within +-3%.
// 2-bit rows of one superblock (and a tail) prefetch their pass as one stream of lines, a share at each
// row's superblock, instead of two lines ahead of each row's superblock and the tail's lines again: on
// SmolLM2's 576-wide rows (144 bytes: one superblock and a 16-byte tail) that issued ~2.7 prefetches per
// line. In cache, 1 thread (session 27): 0.69x the cost per byte on 576-wide w2g64 rows. The same loop
// on 1536-wide rows cost 1.1x and on 4-bit rows 1.15-1.6x, so longer rows and 3/4 bits keep the per-row
// prefetch. -DBS_PF_STREAM=0 turns it off.
#ifndef BS_PF_STREAM
#define BS_PF_STREAM 1
#endif
#ifndef BS_PF_FAR
#define BS_PF_FAR 4
#endif
#ifndef BS_PF_FAR1
#define BS_PF_FAR1 BS_PF_FAR
#endif
#ifndef BS_PF_FAR_HINT
#define BS_PF_FAR_HINT _MM_HINT_T2
#endif

namespace {

constexpr int64_t kMaxGroups = 512;  // groups per row this path takes (in = 32768 at group 64)

// The prefetch distance of a pass of R rows: BS_AHEAD passes, or more passes when that is under
// BS_AHEAD_BYTES (the rows after this pass are contiguous, so this is a distance in the byte stream).
inline int64_t prefetch_ahead(int64_t R, int64_t row_bytes) {
  if (BS_AHEAD_BYTES <= 0) return BS_AHEAD * R * row_bytes;  // no run-time division per pass
  const int64_t pass = R * row_bytes, passes = (BS_AHEAD_BYTES + pass - 1) / pass;
  return (passes > BS_AHEAD ? passes : BS_AHEAD) * pass;
}

#if BS_VBMI
#include "unpack.h"

// y[t0 .. t0+TT, o] for one output row.
template <int TT>
void row_vbmi(const bs::Matrix& m, const Unpack& u, int64_t o, int64_t t0, const float* xv, const int8_t* xq,
              const float* xsum, float* y) {
  const int bits = (int)m.bits;
  const int64_t groups = bs::gemv_groups(m), row_bytes = m.in / 8 * bits, chunk_bytes = 8 * bits;
  const uint8_t* row = m.packed + o * row_bytes;
  const uint16_t* sc = m.scale + o * groups;
  const uint16_t* zr = m.zero ? m.zero + o * groups : nullptr;
  const float mid = (float)((1 << bits) / 2);
  __m512 total[TT];
  float offset[TT];
  for (int t = 0; t < TT; ++t) {
    total[t] = _mm512_setzero_ps();
    offset[t] = 0.f;
  }
  for (int64_t g = 0; g < groups; ++g) {
    const int64_t start = g * m.group, end = start + m.group < m.in ? start + m.group : m.in;
    __m512 f[TT];
    for (int t = 0; t < TT; ++t) f[t] = _mm512_setzero_ps();
    for (int64_t k = start; k < end; k += 64) {
      const __m512i c = u.codes(row + k / 64 * chunk_bytes, bits);
      for (int t = 0; t < TT; ++t) {
        const int64_t r = (t0 + t);
        const __m512i dot = _mm512_dpbusd_epi32(_mm512_setzero_si512(), c, _mm512_loadu_si512(xq + r * m.in + k));
        f[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_loadu_ps(xv + r * (m.in / 4) + k / 4), f[t]);
      }
    }
    const float s = _cvtsh_ss(sc[g]), z = zr ? _cvtsh_ss(zr[g]) : mid;
    for (int t = 0; t < TT; ++t) {
      total[t] = _mm512_fmadd_ps(f[t], _mm512_set1_ps(s), total[t]);
      offset[t] += s * z * xsum[(t0 + t) * groups + g];
    }
  }
  for (int t = 0; t < TT; ++t) y[(t0 + t) * m.out + o] = _mm512_reduce_add_ps(total[t]) - offset[t];
}

// y[0..R) = the lane sums of total[0..R): four rows' sums in one transposing reduction (bs::sum4),
// fewer rows one by one.
template <int R>
inline void store_sums(const __m512* total, float* y) {
  if constexpr (R == 4) {
    _mm_storeu_ps(y, bs::sum4(total));
  } else {
    for (int r = 0; r < R; ++r) y[r] = _mm512_reduce_add_ps(total[r]);
  }
}

// Decode (one activation row): y[o0 .. o0+R) = R weight rows at once. Each chunk's activations are
// loaded once for the R rows, and the R rows' multiply-add chains are independent, so the core
// overlaps them instead of waiting on one row's chain (4 rows: ~2x the single-row loop on this CPU).
template <int R>
void rows_vbmi1(const bs::Matrix& m, const Unpack& u, int64_t o0, const float* xv, const int8_t* xq,
                const float* xsum, float* y) {
  const int bits = (int)m.bits;
  const int64_t groups = bs::gemv_groups(m), row_bytes = m.in / 8 * bits, chunk_bytes = 8 * bits;
  const float mid = (float)((1 << bits) / 2);
  // as rows_strided: the near prefetch, and the far one into L2 (BS_PF_FAR1), neither past the matrix's end
  const int64_t after = (m.out - o0 - R) * row_bytes, near_pf = prefetch_ahead(R, row_bytes);
  const int64_t far_pf = (int64_t)BS_PF_FAR1 * R * row_bytes;
  const int64_t ahead = near_pf <= after ? near_pf : 0, far = far_pf <= after ? far_pf : 0;
  float scales[R * kMaxGroups];  // [R, groups] of this pass, as floats (vbmi_takes bounds groups)
  const uint8_t* row[R];
  const float* sc[R];
  __m512 total[R];
  for (int r = 0; r < R; ++r) {
    row[r] = m.packed + (o0 + r) * row_bytes;
    sc[r] = scales + r * groups;
    total[r] = -row_scales(m, o0 + r, groups, mid, xsum, scales + r * groups);  // the zero-point term
  }
  for (int64_t g = 0; g < groups; ++g) {
    const int64_t start = g * m.group, end = start + m.group < m.in ? start + m.group : m.in;
    __m512 f[R];
    for (int r = 0; r < R; ++r) f[r] = _mm512_setzero_ps();
    for (int64_t k = start; k < end; k += 64) {
      const __m512i q = _mm512_loadu_si512(xq + k);
      const __m512 v = _mm512_loadu_ps(xv + k / 4);
      for (int r = 0; r < R; ++r) {
        const uint8_t* p = row[r] + k / 64 * chunk_bytes;
        _mm_prefetch((const char*)(p + ahead), _MM_HINT_T0);
        if (far) _mm_prefetch((const char*)(p + far), BS_PF_FAR_HINT);
        const __m512i dot = _mm512_dpbusd_epi32(_mm512_setzero_si512(), u.codes(p, bits), q);
        f[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), v, f[r]);
      }
    }
    for (int r = 0; r < R; ++r) total[r] = _mm512_fmadd_ps(f[r], _mm512_set1_ps(sc[r][g]), total[r]);
  }
  store_sums<R>(total, y + o0);
}
#include "strided.h"

// y[o0 .. o0+R) for one activation row with permuted inputs (vbmi_permute): R rows per pass as
// rows_vbmi1, superblock by superblock, then the row's natural-order tail chunk by chunk. LANES: the
// group is smaller than the superblock (S / G groups per superblock, per-lane weight scales); otherwise
// G / S superblocks share one scale, applied when the group ends. Both are template arguments and the
// scale index a counter or a product, not a run-time division: with `b * S / G` per row and superblock
// the loop ran a 64-bit idiv per row and superblock (~9 in the 4-row loop, ~10-15% of a 3-bit pass) and
// the compiler spilled x's codes to the stack around the branch.
template <int BITS, int R, bool LANES, bool MIX = false, bool STREAM = false>
void rows_strided(const bs::Matrix& m, const Unpack& u, const Strided& st, int64_t o0, const float* xv,
                  const int8_t* xq, const float* xsum, float* y) {
  constexpr int S = strided_span(BITS), SB = S * BITS / 8;
  const int64_t groups = st.groups, row_bytes = m.in / 8 * BITS, blocks = m.in / S, G = m.group, step = st.step;
  const float mid = (float)((1 << BITS) / 2);
  // No prefetch of a pass past the matrix's end: those lines belong to other allocations or none (a
  // 2048x1536 call at 1 thread: 0.96-0.98x the time, session 15); 0 re-touches this pass's own lines.
  const int64_t after = (m.out - o0 - R) * row_bytes;  // bytes of the matrix after this pass
  const int64_t near_pf = prefetch_ahead(R, row_bytes), far_pf = (int64_t)BS_PF_FAR * R * row_bytes;
  const int64_t ahead = near_pf <= after ? near_pf : 0, far = far_pf <= after ? far_pf : 0;
  float scales[R * (kMaxGroups + 16)];  // [R, groups (+16 readable past the end)] of this pass, as floats
  const uint8_t* row[R];
  const float* sc[R];
  __m512 total[R], f[R];
  for (int r = 0; r < R; ++r) {
    row[r] = m.packed + (o0 + r) * row_bytes;
    sc[r] = scales + r * (kMaxGroups + 16);
    total[r] = -row_scales(m, o0 + r, groups, mid, xsum, scales + r * (kMaxGroups + 16));  // the zero-point term
    f[r] = _mm512_setzero_ps();
  }
  // STREAM: the pass's bytes as one stream of lines, a share of them prefetched at each superblock step
  const uintptr_t first = STREAM ? (uintptr_t)row[0] & ~(uintptr_t)63 : 0;
  const int64_t lines = STREAM ? ((int64_t)((uintptr_t)row[0] + R * row_bytes - first) + 63) / 64 : 0;
  const int64_t per = STREAM ? (lines + R - 1) / R : 0;  // STREAM: one superblock a row
  int64_t cursor = 0;  // lines prefetched so far
  int64_t g = 0, left = step;  // !LANES: the current group, and how many of its superblocks are to come
  for (int64_t b = 0; b < blocks; ++b) {
    const __m512 v = _mm512_loadu_ps(xv + b * (S / 4));
    const int8_t* q = xq + b * S;
    for (int r = 0; r < R; ++r) {
      const uint8_t* p = row[r] + b * SB;
      if constexpr (STREAM) {
        for (int64_t i = 0; i < per && cursor < lines; ++i, ++cursor) {
          const char* line = (const char*)(first + 64 * cursor);
          _mm_prefetch(line + ahead, _MM_HINT_T0);
          if (far) _mm_prefetch(line + far, BS_PF_FAR_HINT);
        }
      } else {
        _mm_prefetch((const char*)(p + ahead), _MM_HINT_T0);
        if (SB > 64) _mm_prefetch((const char*)(p + ahead + 64), _MM_HINT_T0);
        if (far) {
          _mm_prefetch((const char*)(p + far), BS_PF_FAR_HINT);
          if (SB > 64) _mm_prefetch((const char*)(p + far + 64), BS_PF_FAR_HINT);
        }
      }
      const __m512 d = _mm512_cvtepi32_ps(strided_dot<BITS, MIX>(p, q, st));
      if constexpr (LANES) {  // the lanes span several groups: per-lane weight scales
        const __m512 w = _mm512_permutexvar_ps(st.lanes, _mm512_loadu_ps(sc[r] + b * step));
        total[r] = _mm512_fmadd_ps(d, _mm512_mul_ps(v, w), total[r]);
      } else {
        f[r] = _mm512_fmadd_ps(d, v, f[r]);
      }
    }
    if constexpr (!LANES) {
      if (--left == 0 || b + 1 == blocks) {  // a group ends (or the superblocks do)
        for (int r = 0; r < R; ++r) {
          total[r] = _mm512_fmadd_ps(f[r], _mm512_set1_ps(sc[r][g]), total[r]);
          f[r] = _mm512_setzero_ps();
        }
        ++g;
        left = step;
      }
    }
  }
  for (int64_t k = blocks * S; k < m.in; k += 64) {  // the tail: natural order, chunk by chunk
    const __m512i q = _mm512_loadu_si512(xq + k);
    const __m512 v = _mm512_loadu_ps(xv + k / 4);
    const int64_t gk = k / G;
    for (int r = 0; r < R; ++r) {
      const uint8_t* p = row[r] + k / 8 * BITS;
      if (!STREAM && k == blocks * S) {  // the superblocks' prefetch stops short of the tail (< SB bytes): its lines too
        for (int64_t line = 0; line < row_bytes - blocks * SB; line += 64) {
          _mm_prefetch((const char*)(p + ahead + line), _MM_HINT_T0);
          if (far) _mm_prefetch((const char*)(p + far + line), BS_PF_FAR_HINT);
        }
      }
      const __m512i dot = _mm512_dpbusd_epi32(_mm512_setzero_si512(), u.codes(p, BITS), q);
      total[r] = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(dot), v), _mm512_set1_ps(sc[r][gk]), total[r]);
    }
  }
  store_sums<R>(total, y + o0);
}

template <int BITS, bool LANES, bool MIX, bool STREAM = false>
void strided_rows_all(const bs::Matrix& m, const Unpack& u, const Strided& st, const float* xv, const int8_t* xq,
                      const float* xsum, float* y) {
  constexpr int R = 4;
  const int64_t quads = m.out / R;
#pragma omp for schedule(static)
  for (int64_t b = 0; b <= quads; ++b) {
    if (b < quads) rows_strided<BITS, R, LANES, MIX, STREAM>(m, u, st, b * R, xv, xq, xsum, y);
    else
      for (int64_t o = quads * R; o < m.out; ++o) rows_strided<BITS, 1, LANES, MIX, STREAM>(m, u, st, o, xv, xq, xsum, y);
  }
}

// Not inlined into strided_all: beside the other instantiation GCC stopped inlining the row loop of
// the 1536-wide 2-bit rows (1.15x their in-cache cost per byte, session 27).
template <int BITS, bool MIX>
__attribute__((noinline)) void stream_rows_all(const bs::Matrix& m, const Unpack& u, const Strided& st, const float* xv,
                                               const int8_t* xq, const float* xsum, float* y) {
  strided_rows_all<BITS, true, MIX, true>(m, u, st, xv, xq, xsum, y);
}

template <int BITS, bool MIX = false>
void strided_all(const bs::Matrix& m, const Unpack& u, const float* xv, const int8_t* xq, const float* xsum, float* y) {
  const Strided st(m);
  if constexpr (BITS == 2 && BS_PF_STREAM) {  // 3- and 4-bit instantiations never emit the stream path
    if (m.in < 2 * strided_span(BITS) && m.group < strided_span(BITS))
      return stream_rows_all<BITS, MIX>(m, u, st, xv, xq, xsum, y);  // one superblock a row (see BS_PF_STREAM)
  }
  if (m.group < strided_span(BITS)) return strided_rows_all<BITS, true, MIX>(m, u, st, xv, xq, xsum, y);
  strided_rows_all<BITS, false, MIX>(m, u, st, xv, xq, xsum, y);
}

#endif

}  // namespace

namespace bs {

bool vbmi_takes(const Matrix& m) {
  return BS_VBMI && m.int8 && m.bits >= 2 && m.bits <= 8 && m.in % 64 == 0 && m.group % 64 == 0 &&
         gemv_groups(m) <= kMaxGroups;
}

bool strided_takes(const Matrix& m) {
#if BS_VBMI && !defined(BS_NO_STRIDED)
  if (!vbmi_takes(m) || (m.bits != 2 && m.bits != 3 && m.bits != 4)) return false;
  const int64_t S = strided_span((int)m.bits);
  return m.in >= S && (m.group % S == 0 || S % m.group == 0);
#else
  (void)m;
  return false;
#endif
}

void vbmi_permute(const Matrix& m, int8_t* xq, float* xv) {
#if BS_VBMI
  const int bits = (int)m.bits, S = strided_span(bits);
  float scales[16];
  switch (bits) {
    case 2: permute_codes<2>(xq, m.in / S); break;
    case 3: permute_codes<3>(xq, m.in / S); break;
    default: permute_codes<4>(xq, m.in / S); break;
  }
  for (int64_t b = 0; b < m.in / S; ++b) {
    float* v = xv + b * (S / 4);
    for (int k = 0; k < S / 32; ++k) scales[k] = v[8 * k];  // natural xv: each 32-block's scale x8
    for (int l = 0; l < 16; ++l) v[l] = scales[l * (S / 16) / 32];
  }
#else
  (void)m, (void)xq, (void)xv;
#endif
}

void vbmi_rows(const Matrix& m, const float* xv, const int8_t* xq, const float* xsum, int64_t T, float* y) {
#if BS_VBMI
  const Unpack u((int)m.bits);
  if (T == 1 && strided_takes(m)) {
    switch (m.bits) {
      case 2: return strided_all<2>(m, u, xv, xq, xsum, y);
      case 3: return m.layout == kMixed3 ? strided_all<3, true>(m, u, xv, xq, xsum, y) : strided_all<3>(m, u, xv, xq, xsum, y);
      default: return strided_all<4>(m, u, xv, xq, xsum, y);
    }
  }
  if (m.layout == kMixed3) return mixed3_rows(m, xv, xq, xsum, T, y);  // T >= 2 (T == 1 took strided_all)
  if (T == 1) {
    constexpr int R = 4;
    const int64_t quads = m.out / R;
#pragma omp for schedule(static)
    for (int64_t b = 0; b <= quads; ++b) {
      if (b < quads) rows_vbmi1<R>(m, u, b * R, xv, xq, xsum, y);
      else
        for (int64_t o = quads * R; o < m.out; ++o) rows_vbmi1<1>(m, u, o, xv, xq, xsum, y);
    }
    return;
  }
#pragma omp for schedule(static)
  for (int64_t o = 0; o < m.out; ++o) {
    int64_t t = 0;
    for (; t + 4 <= T; t += 4) row_vbmi<4>(m, u, o, t, xv, xq, xsum, y);
    switch (T - t) {
      case 3: row_vbmi<3>(m, u, o, t, xv, xq, xsum, y); break;
      case 2: row_vbmi<2>(m, u, o, t, xv, xq, xsum, y); break;
      case 1: row_vbmi<1>(m, u, o, t, xv, xq, xsum, y); break;
    }
  }
#else
  (void)m, (void)xv, (void)xq, (void)xsum, (void)T, (void)y;
#endif
}

}  // namespace bs
