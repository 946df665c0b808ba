// bitsmith: the 3-bit mixed layout (strided.h, session 17) outside vbmi.cpp's one-row decode: the repack
// at load and back (bs_mixed3_repack), T >= 2 rows of int8 activations (serve's batched decode), and a
// row's dequantization (prefill). A row's whole 256-code superblocks are 96 repacked bytes each; the
// tail (in % 256 codes) keeps the natural packing, so a row has the same bytes as before.

#include <cstdint>
#include <cstring>
#include <vector>

#include "gemv.h"

#if defined(__AVX512VBMI__) && defined(__AVX512VNNI__) && defined(__AVX512BW__) && defined(__AVX512VL__) && \
    defined(__F16C__) && defined(__GFNI__)
#include <immintrin.h>
#define BS_MIX 1
#else
#define BS_MIX 0
#endif

namespace {

#if BS_MIX
constexpr int64_t kMaxGroups = 512;  // as vbmi.cpp (vbmi_takes bounds the groups)

#include "unpack.h"
#include "strided.h"

constexpr int kSpan = 256, kBytes = 96;

// c(k, p) of strided.h's layout notes: the natural index of dot k's byte p
struct Sources {
  uint8_t n[4][64];
  Sources() {
    for (int k = 0; k < 4; ++k)
      for (int p = 0; p < 64; ++p) n[k][p] = (uint8_t)strided_source(3, 64 * k + p);
  }
};

// natural 96 bytes -> mixed, in place: the natural codes (4 x 64, Unpack), into the dots' order (x's own
// permutation table: byte 64k + p becomes c(k, p)), then A and B with byte-safe 16-bit shifts (codes <= 7)
void superblock_to_mixed(uint8_t* sb, const Unpack& u, const PermTable& order) {
  alignas(64) uint8_t c[kSpan];
  for (int j = 0; j < 4; ++j) _mm512_store_si512(c + 64 * j, u.codes(sb + 24 * j, 3));
  order.apply(c, c);
  const __m512i c0 = _mm512_load_si512(c), c1 = _mm512_load_si512(c + 64), c2 = _mm512_load_si512(c + 128),
                c3 = _mm512_load_si512(c + 192);
  const __m512i a = _mm512_or_si512(_mm512_or_si512(c0, _mm512_slli_epi16(c1, 3)),
                                    _mm512_slli_epi16(_mm512_and_si512(c3, _mm512_set1_epi8(3)), 6));
  const __m512i hi = _mm512_and_si512(_mm512_srli_epi16(c3, 2), _mm512_set1_epi8(1));  // the high bits, 0 or 1
  const __m256i b = _mm256_or_si256(
      _mm256_or_si256(_mm512_castsi512_si256(hi), _mm256_slli_epi16(_mm512_extracti64x4_epi64(hi, 1), 1)),
      _mm256_or_si256(_mm256_slli_epi16(_mm512_castsi512_si256(c2), 2),
                      _mm256_slli_epi16(_mm512_extracti64x4_epi64(c2, 1), 5)));
  _mm512_storeu_si512(sb, a);
  _mm256_storeu_si256((__m256i*)(sb + 64), b);
}

void superblock_to_natural(uint8_t* sb, const Sources& src) {
  uint8_t c[kSpan];
  for (int p = 0; p < 64; ++p) {
    const unsigned a = sb[p], b = sb[64 + p % 32], high = (p < 32 ? b : b >> 1) & 1;
    c[src.n[0][p]] = (uint8_t)(a & 7);
    c[src.n[1][p]] = (uint8_t)(a >> 3 & 7);
    c[src.n[2][p]] = (uint8_t)((p < 32 ? b >> 2 : b >> 5) & 7);
    c[src.n[3][p]] = (uint8_t)(a >> 6 | high << 2);
  }
  std::memset(sb, 0, kBytes);
  for (int i = 0; i < kSpan; ++i) {
    const int bit = 3 * i;
    sb[bit / 8] |= (uint8_t)(c[i] << (bit % 8));
    if (bit % 8 > 5) sb[bit / 8 + 1] |= (uint8_t)(c[i] >> (8 - bit % 8));
  }
}

// y[t, o] for activation rows t0 .. t0 + TT and weight row o: each superblock's codes decoded once for
// the TT rows (mixed3_codes), the weight scale applied per superblock; the tail chunk by chunk.
template <int TT>
void rows_tile(const bs::Matrix& m, const Unpack& u, const Strided& st, int64_t o, int64_t t0, const float* xv,
               const int8_t* xq, const float* xsum, float* y) {
  const int64_t groups = st.groups, row_bytes = m.in / 8 * 3, blocks = m.in / kSpan, G = m.group;
  const uint8_t* row = m.packed + o * row_bytes;
  float sc[kMaxGroups + 16];  // readable 16 past the groups (the lanes' gather)
  __m512 total[TT];
  for (int t = 0; t < TT; ++t) total[t] = -row_scales(m, o, groups, 4.f, xsum + (t0 + t) * groups, sc);
  for (int64_t b = 0; b < blocks; ++b) {
    __m512i d[4];
    mixed3_codes(row + b * kBytes, st, d);
    const __m512 w = G < kSpan ? _mm512_permutexvar_ps(st.lanes, _mm512_loadu_ps(sc + b * st.step))
                               : _mm512_set1_ps(sc[b * kSpan / G]);
    for (int t = 0; t < TT; ++t) {
      const int8_t* q = xq + (t0 + t) * m.in + b * kSpan;
      __m512i acc = _mm512_dpbusd_epi32(_mm512_setzero_si512(), d[0], _mm512_loadu_si512(q));
      for (int k = 1; k < 4; ++k) acc = _mm512_dpbusd_epi32(acc, d[k], _mm512_loadu_si512(q + 64 * k));
      const __m512 v = _mm512_loadu_ps(xv + (t0 + t) * (m.in / 4) + b * (kSpan / 4));
      total[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc), _mm512_mul_ps(v, w), total[t]);
    }
  }
  for (int64_t k = blocks * kSpan; k < m.in; k += 64) {  // the natural tail
    const __m512i c = u.codes(row + k / 8 * 3, 3);
    const __m512 ws = _mm512_set1_ps(sc[k / G]);
    for (int t = 0; t < TT; ++t) {
      const __m512i dot = _mm512_dpbusd_epi32(_mm512_setzero_si512(), c, _mm512_loadu_si512(xq + (t0 + t) * m.in + k));
      const __m512 v = _mm512_loadu_ps(xv + (t0 + t) * (m.in / 4) + k / 4);
      total[t] = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(dot), v), ws, total[t]);
    }
  }
  for (int t = 0; t < TT; ++t) y[(t0 + t) * m.out + o] = _mm512_reduce_add_ps(total[t]);
}
#endif

}  // namespace

namespace bs {

bool mixed3_takes(const Matrix& m) {
  Matrix probe = m;
  probe.int8 = true;
  return BS_MIX && m.bits == 3 && strided_takes(probe);
}

void mixed3_rows(const Matrix& m, const float* xv, const int8_t* xq, const float* xsum, int64_t T, float* y) {
#if BS_MIX
  const Unpack u(3);
  const Strided st(m);
#pragma omp for schedule(static)
  for (int64_t o = 0; o < m.out; ++o) {
    int64_t t = 0;
    for (; t + 4 <= T; t += 4) rows_tile<4>(m, u, st, o, t, xv, xq, xsum, y);
    switch (T - t) {
      case 3: rows_tile<3>(m, u, st, o, t, xv, xq, xsum, y); break;
      case 2: rows_tile<2>(m, u, st, o, t, xv, xq, xsum, y); break;
      case 1: rows_tile<1>(m, u, st, o, t, xv, xq, xsum, y); break;
    }
  }
#else
  (void)m, (void)xv, (void)xq, (void)xsum, (void)T, (void)y;
#endif
}

void mixed3_codes_row(const Matrix& m, int64_t o, uint8_t* c) {
#if BS_MIX
  static const PermTable natural(kSpan, [](int n) {  // permuted byte of natural code n
    for (int p = 0; p < kSpan; ++p)
      if (strided_source(3, p) == n) return p;
    return 0;
  });
  static const Strided st(Matrix{nullptr, nullptr, nullptr, 1, kSpan, 3, kSpan, true});  // its bit matrices only
  const int64_t row_bytes = m.in / 8 * 3, blocks = m.in / kSpan;
  const uint8_t* row = m.packed + o * row_bytes;
  const Unpack u(3);
  for (int64_t b = 0; b < blocks; ++b) {
    alignas(64) uint8_t codes[kSpan];
    __m512i d[4];
    mixed3_codes(row + b * kBytes, st, d);
    for (int j = 0; j < 4; ++j) _mm512_store_si512(codes + 64 * j, d[j]);
    natural.apply(codes, c + b * kSpan);
  }
  for (int64_t k = blocks * kSpan; k < m.in; k += 64) _mm512_storeu_si512(c + k, u.codes(row + k / 8 * 3, 3));
#else
  (void)m, (void)o, (void)c;
#endif
}

void mixed3_dequant_row(const Matrix& m, int64_t o, float* dst) {
#if BS_MIX
  std::vector<uint8_t> codes((size_t)m.in);
  mixed3_codes_row(m, o, codes.data());
  const int64_t groups = gemv_groups(m);
  for (int64_t k = 0; k < m.in; k += 64) {
    const int64_t g = k / m.group;
    const __m512 s = _mm512_set1_ps(half_to_float(m.scale[o * groups + g]));
    const __m512 z = _mm512_set1_ps(m.zero ? half_to_float(m.zero[o * groups + g]) : 4.f);
    for (int i = 0; i < 64; i += 16) {
      const __m512 cf = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(codes.data() + k + i))));
      _mm512_storeu_ps(dst + k + i, _mm512_mul_ps(_mm512_sub_ps(cf, z), s));
    }
  }
#else
  (void)m, (void)o, (void)dst;
#endif
}

}  // namespace bs

extern "C" {

// Whether NativeKernel may hold a 3-bit matrix of `in` inputs and group `group` in the mixed layout.
int64_t bs_mixed3_takes(int64_t in, int64_t group) {
  return bs::mixed3_takes(bs::Matrix{nullptr, nullptr, nullptr, 1, in, 3, group, true});
}

// Every whole superblock of `rows` 3-bit rows of `in` codes, in place: natural -> mixed (to_mixed != 0)
// or back. Returns -1 (nothing done) where bs_mixed3_takes(in, ..) could not hold.
int64_t bs_mixed3_repack(uint8_t* packed, int64_t rows, int64_t in, int64_t to_mixed, int64_t threads) {
#if BS_MIX
  static const Sources src;
  static const PermTable order(kSpan, [](int p) { return strided_source(3, p); });
  const Unpack u(3);
  const int64_t row_bytes = in / 8 * 3, blocks = in / kSpan;
  if (in % 64 || blocks == 0) return -1;
#pragma omp parallel for schedule(static) num_threads((int)threads)
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t b = 0; b < blocks; ++b) {
      uint8_t* sb = packed + r * row_bytes + b * kBytes;
      to_mixed ? superblock_to_mixed(sb, u, order) : superblock_to_natural(sb, src);
    }
  return 0;
#else
  (void)packed, (void)rows, (void)in, (void)to_mixed, (void)threads;
  return -1;
#endif
}

}  // extern "C"
