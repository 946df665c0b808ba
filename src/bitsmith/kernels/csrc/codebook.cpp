// Vector-codebook (vq spec) kernels, issue 19: y = x W^T with W[r, v*d + t] = scale[r, g] * cb[idx[r, v], t],
// read straight from the packed indices (formats/packing.py layout: runs of 8 indices of `bits` bits
// in `bits` little-endian bytes; the caller pads the buffer by 8 bytes so a run is read as one 64-bit
// word). The codebook arrives as float32 [entries, d] (at most 256 x 4 =
// 4 KB, so every gather hits L1); the scales stay fp16 as stored.
//
//   bs_vq_gemv     decode (m = 1): a lookup table of codebook . x per vector, then one gathered table
//                  read per weight vector (gemv1_lut); small batches (m <= 8 activation rows): per
//                  output row, gather each index's d floats and multiply them into x, group by group.
//                  AVX2: two 4-dim entries (or four 2-dim ones) fill one 8-float FMA.
//   bs_vq_dequant  rows [start, start+n) of W as float32 (the prefill path hands blocks to BLAS).
//
// Both are tested against the dequantize-then-matmul oracle (tests/kernels/test_codebook.py).
#include <cstdint>
#include <cstdlib>
#include <cstring>
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define BS_VQ_AVX2 1
#endif

#include "gemv.h"

namespace {

// the 8 indices of run `run` of one packed row, read as one 64-bit word (6 bytes read as 6 made the
// 6-bit kernels 6x slower here, measured)
template <int BITS>
inline void run_indices_t(const uint8_t* row, int64_t run, uint32_t* out) {
  if (BITS == 8) {
    for (int k = 0; k < 8; ++k) out[k] = row[run * 8 + k];
    return;
  }
  uint64_t word = 0;
  std::memcpy(&word, row + run * BITS, 8);  // whole word (the buffer is padded); little-endian
  constexpr uint64_t mask = (1ull << BITS) - 1;
  for (int k = 0; k < 8; ++k) out[k] = (uint32_t)((word >> (k * BITS)) & mask);
}

inline void run_indices(const uint8_t* row, int64_t run, int64_t bits, uint32_t* out) {
  switch (bits) {
    case 8: run_indices_t<8>(row, run, out); return;
    case 6: run_indices_t<6>(row, run, out); return;
  }
  uint64_t word = 0;
  std::memcpy(&word, row + run * bits, (size_t)bits);
  const uint64_t mask = (1ull << bits) - 1;
  for (int k = 0; k < 8; ++k) out[k] = (uint32_t)((word >> (k * bits)) & mask);
}

struct Shape {
  int64_t in, codes, row_bytes, bits, d, group_codes;  // group_codes: indices per scale group
};

inline Shape make_shape(int64_t in, int64_t d, int64_t bits, int64_t group) {
  Shape s;
  s.in = in;
  s.d = d;
  s.bits = bits;
  s.codes = in / d;
  s.row_bytes = (s.codes + 7) / 8 * bits;
  s.group_codes = group / d;
  return s;
}

// portable path: any d, any number of activation rows
void row_dot_scalar(const Shape& s, const uint8_t* row, const uint16_t* scale, const float* cb, const float* x,
                    int64_t m, float* acc /* [m] */) {
  float part[8];
  uint32_t idx[8];
  for (int64_t i = 0; i < m; ++i) acc[i] = 0.f;
  for (int64_t i = 0; i < m; ++i) part[i] = 0.f;
  const int64_t runs = (s.codes + 7) / 8;
  for (int64_t run = 0; run < runs; ++run) {
    run_indices(row, run, s.bits, idx);
    const int64_t n = s.codes - run * 8 < 8 ? s.codes - run * 8 : 8;
    for (int64_t k = 0; k < n; ++k) {
      const int64_t v = run * 8 + k;
      const float* c = cb + idx[k] * s.d;
      for (int64_t i = 0; i < m; ++i) {
        const float* xv = x + i * s.in + v * s.d;
        float dot = 0.f;
        for (int64_t t = 0; t < s.d; ++t) dot += c[t] * xv[t];
        part[i] += dot;
      }
      if ((v + 1) % s.group_codes == 0 || v + 1 == s.codes) {
        const float sc = bs::half_to_float(scale[v / s.group_codes]);
        for (int64_t i = 0; i < m; ++i) {
          acc[i] += sc * part[i];
          part[i] = 0.f;
        }
      }
    }
  }
}

#if defined(BS_VQ_AVX2)
// 8 weights = 8 / D codebook entries side by side in one register
template <int D>
inline __m256 gather8(const float* cb, const uint32_t* idx) {
  if (D == 4) return _mm256_loadu2_m128(cb + idx[1] * 4, cb + idx[0] * 4);
  __m128d lo = _mm_loadh_pd(_mm_load_sd((const double*)(cb + idx[0] * 2)), (const double*)(cb + idx[1] * 2));
  __m128d hi = _mm_loadh_pd(_mm_load_sd((const double*)(cb + idx[2] * 2)), (const double*)(cb + idx[3] * 2));
  return _mm256_castpd_ps(_mm256_set_m128d(hi, lo));
}

// D in {2, 4}, M activation rows; needs whole runs (codes % 8 == 0) and group_codes % 8 == 0
template <int D, int M>
void row_dot_avx2(const Shape& s, const uint8_t* row, const uint16_t* scale, const float* cb, const float* x,
                  float* acc) {
  constexpr int PER = 8 / D;  // entries per register
  __m256 total[M], part[M];
  uint32_t idx[8];
  for (int i = 0; i < M; ++i) total[i] = _mm256_setzero_ps();
  const int64_t runs = s.codes / 8, runs_per_group = s.group_codes / 8;
  for (int64_t run = 0; run < runs; ++run) {
    if (run % runs_per_group == 0)
      for (int i = 0; i < M; ++i) part[i] = _mm256_setzero_ps();
    run_indices(row, run, s.bits, idx);
    const float* xr = x + run * 8 * D;
    for (int k = 0; k < 8; k += PER) {
      const __m256 w = gather8<D>(cb, idx + k);
      for (int i = 0; i < M; ++i) part[i] = _mm256_fmadd_ps(w, _mm256_loadu_ps(xr + i * s.in + k * D), part[i]);
    }
    if ((run + 1) % runs_per_group == 0 || run + 1 == runs) {  // a short last group ends with the row
      const __m256 sc = _mm256_set1_ps(bs::half_to_float(scale[run / runs_per_group]));
      for (int i = 0; i < M; ++i) total[i] = _mm256_fmadd_ps(sc, part[i], total[i]);
    }
  }
  for (int i = 0; i < M; ++i) acc[i] = bs::hsum8(total[i]);
}

template <int D>
bool row_dot_fast(const Shape& s, const uint8_t* row, const uint16_t* scale, const float* cb, const float* x,
                  int64_t m, float* acc) {
  switch (m) {
    case 1: row_dot_avx2<D, 1>(s, row, scale, cb, x, acc); return true;
    case 2: row_dot_avx2<D, 2>(s, row, scale, cb, x, acc); return true;
    case 3: row_dot_avx2<D, 3>(s, row, scale, cb, x, acc); return true;
    case 4: row_dot_avx2<D, 4>(s, row, scale, cb, x, acc); return true;
    case 5: row_dot_avx2<D, 5>(s, row, scale, cb, x, acc); return true;
    case 6: row_dot_avx2<D, 6>(s, row, scale, cb, x, acc); return true;
    case 7: row_dot_avx2<D, 7>(s, row, scale, cb, x, acc); return true;
    case 8: row_dot_avx2<D, 8>(s, row, scale, cb, x, acc); return true;
  }
  return false;
}
#endif

// One activation row, lookup-table form (the AQLM/QuIP# CPU trick): for a slab of vectors v the
// table lut[v][k] = cb[k] . x_v (entries x d multiply-adds per vector, once per call, not per output
// row) turns each weight vector of every row into one table read: scalar loads in 4 chains of adds
// (AVX2 gathers were no faster on this machine's Xeon, measured; plain C++, so every CPU gets it).
// Slabs keep the table at <= LUT_FLOATS; a group's partial sum is scaled where the group or the slab ends (the sum is linear, so a slab
// need not align with groups).
constexpr int64_t LUT_FLOATS = 1 << 13;  // 32 KB: the table stays in L1

template <int BITS>
void gemv1_lut(const Shape& s, int64_t entries, const float* x, const uint8_t* packed, const uint16_t* scale,
               const float* cb, int64_t out, float* y, int64_t threads) {
  const int64_t groups = (s.in + s.group_codes * s.d - 1) / (s.group_codes * s.d);
  const int64_t slab = LUT_FLOATS / entries / 8 * 8;  // vectors per slab, whole runs
  float* lut = static_cast<float*>(std::aligned_alloc(64, (size_t)(slab * entries * sizeof(float))));
  float cbt[4 * 256];  // the codebook transposed, [d][entries]
  for (int64_t k = 0; k < entries; ++k)
    for (int64_t j = 0; j < s.d; ++j) cbt[j * entries + k] = cb[k * s.d + j];
  for (int64_t r = 0; r < out; ++r) y[r] = 0.f;
#pragma omp parallel num_threads((int)threads) if (threads > 1)
  for (int64_t v0 = 0; v0 < s.codes; v0 += slab) {
    const int64_t v1 = v0 + slab < s.codes ? v0 + slab : s.codes;
#pragma omp for schedule(static)
    for (int64_t v = v0; v < v1; ++v) {  // the table: entries dot products of d floats per vector
      const float* xv = x + v * s.d;
      float* t = lut + (v - v0) * entries;
      for (int64_t k = 0; k < entries; ++k) t[k] = cbt[k] * xv[0];  // over k: vectorizes
      for (int64_t j = 1; j < s.d; ++j)
        for (int64_t k = 0; k < entries; ++k) t[k] += cbt[j * entries + k] * xv[j];
    }  // implicit barrier: the table is complete
#pragma omp for schedule(static)
    for (int64_t r = 0; r < out; ++r) {
      const uint8_t* row = packed + r * s.row_bytes;
      const uint16_t* sr = scale + r * groups;
      float total = 0.f, p0 = 0.f, p1 = 0.f, p2 = 0.f, p3 = 0.f;  // 4 chains of adds in flight
      for (int64_t run = v0 / 8; run < v1 / 8; ++run) {
        const float* t = lut + (run * 8 - v0) * entries;  // the table rows of this run's 8 vectors
        if (BITS == 8) {  // byte indices: one load-with-index per vector, no shifts
          const uint8_t* b = row + run * 8;
          p0 += t[b[0]] + t[4 * entries + b[4]];
          p1 += t[entries + b[1]] + t[5 * entries + b[5]];
          p2 += t[2 * entries + b[2]] + t[6 * entries + b[6]];
          p3 += t[3 * entries + b[3]] + t[7 * entries + b[7]];
        } else {
          uint64_t word;
          std::memcpy(&word, row + run * BITS, 8);  // whole word: the packed buffer has 8 bytes of padding
          constexpr uint64_t mask = (1ull << BITS) - 1;
          p0 += t[(word & mask)] + t[4 * entries + ((word >> (4 * BITS)) & mask)];
          p1 += t[entries + ((word >> BITS) & mask)] + t[5 * entries + ((word >> (5 * BITS)) & mask)];
          p2 += t[2 * entries + ((word >> (2 * BITS)) & mask)] + t[6 * entries + ((word >> (6 * BITS)) & mask)];
          p3 += t[3 * entries + ((word >> (3 * BITS)) & mask)] + t[7 * entries + ((word >> (7 * BITS)) & mask)];
        }
        const int64_t next = run * 8 + 8;
        if (next % s.group_codes == 0 || next == v1) {
          total += bs::half_to_float(sr[(next - 1) / s.group_codes]) * ((p0 + p1) + (p2 + p3));
          p0 = p1 = p2 = p3 = 0.f;
        }
      }
      y[r] += total;
    }  // implicit barrier before the next slab overwrites the table
  }
  std::free(lut);
}

void row_dot(const Shape& s, const uint8_t* row, const uint16_t* scale, const float* cb, const float* x, int64_t m,
             float* acc) {
#if defined(BS_VQ_AVX2)
  if (s.codes % 8 == 0 && s.group_codes % 8 == 0) {
    if (s.d == 4 && row_dot_fast<4>(s, row, scale, cb, x, m, acc)) return;
    if (s.d == 2 && row_dot_fast<2>(s, row, scale, cb, x, m, acc)) return;
  }
#endif
  row_dot_scalar(s, row, scale, cb, x, m, acc);
}

}  // namespace

extern "C" {

// x [m, in] float32 (m <= 8), packed [out, row_bytes], scale fp16 [out, G], cb float32 [entries, d],
// group = weights per scale (in for per-channel) -> y [m, out] float32
void bs_vq_gemv(const float* x, int64_t m, const uint8_t* packed, const uint16_t* scale, const float* cb, int64_t out,
                int64_t in, int64_t d, int64_t bits, int64_t group, float* y, int64_t threads) {
  const Shape s = make_shape(in, d, bits, group);
  const int64_t groups = (in + group - 1) / group;
  const int64_t entries = (int64_t)1 << bits;
  if (m == 1 && s.codes % 8 == 0 && s.group_codes % 8 == 0 && entries * d <= 4 * 256 && (bits == 8 || bits == 6)) {
    if (bits == 8) gemv1_lut<8>(s, entries, x, packed, scale, cb, out, y, threads);
    else gemv1_lut<6>(s, entries, x, packed, scale, cb, out, y, threads);
    return;
  }
#pragma omp parallel for schedule(static) num_threads((int)threads) if (threads > 1)
  for (int64_t r = 0; r < out; ++r) {
    float acc[8];
    row_dot(s, packed + r * s.row_bytes, scale + r * groups, cb, x, m, acc);
    for (int64_t i = 0; i < m; ++i) y[i * out + r] = acc[i];
  }
}

// rows [start, start + n) of W as float32 [n, in]
void bs_vq_dequant(const uint8_t* packed, const uint16_t* scale, const float* cb, int64_t in, int64_t d, int64_t bits,
                   int64_t group, int64_t start, int64_t n, float* dst, int64_t threads) {
  const Shape s = make_shape(in, d, bits, group);
  const int64_t groups = (in + group - 1) / group, runs = (s.codes + 7) / 8;
#pragma omp parallel for schedule(static) num_threads((int)threads) if (threads > 1)
  for (int64_t r = 0; r < n; ++r) {
    const uint8_t* row = packed + (start + r) * s.row_bytes;
    const uint16_t* sr = scale + (start + r) * groups;
    float* out_row = dst + r * in;
    uint32_t idx[8];
    for (int64_t run = 0; run < runs; ++run) {
      run_indices(row, run, bits, idx);
      for (int64_t k = 0; k < 8 && run * 8 + k < s.codes; ++k) {
        const int64_t v = run * 8 + k;
        const float sc = bs::half_to_float(sr[v / s.group_codes]);
        for (int64_t t = 0; t < d; ++t) out_row[v * d + t] = sc * cb[idx[k] * d + t];
      }
    }
  }
}

}  // extern "C"
