// The 3-bit superblock decode body three ways on the same random codes, in cache (issue 18, session 17):
//   lib    vbmi.cpp's rows_strided<3, 4, true> as the library runs it (natural 3-bit packing);
//   base   a copy of that row loop calling today's superblock body (an A/A check on the copy);
//   plane  the superblock stored as a 2-bit plane (64 bytes) and a 1-bit plane (32 bytes): the low two
//          bits decoded as w2's codes (vpand or one vgf2p8affineqb), the high bit added as 4 by one
//          masked vpaddb per 64 codes with a mask loaded from the 1-bit plane;
//   mixed  the superblock as 64 bytes A (two whole codes at bits 0-2 and 3-5, the low two bits of a
//          third code at bits 6-7) and 32 bytes B (two whole codes at bits 2-4 and 5-7, the high bits of
//          two of A's split codes at bits 0 and 1), B broadcast to both halves of a register: dot 0 is
//          A & 7, dots 1 and 2 one vgf2p8affineqb each, dot 3 one vpternlogd (A's bits 6-7 with B's 0-1)
//          and one vgf2p8affineqb. Five unpack instructions per 256 codes where today's body has ten.
//   libmix rows_strided<3, 4, true, true>: the mixed layout as the library runs it (csrc/strided.h).
// All three keep x's superblock order (vbmi_permute), its lane scales and the 96 bytes per 256 codes,
// so a repack is a byte permutation inside each superblock. Same float steps and order: outputs must be
// bit-identical to lib's; each is also compared with a double-precision oracle on the natural codes.
// Rows of the shape's width adding up to about KB kilobytes per layout (all three stay in L2), w3g128
// with fp16 scales and zeros; thread CPU time of one call over all rows, the layouts in turn (the order
// reversing every turn), medians and 10th percentiles. Prints what it measured, asserts nothing.
//
//   g++ -O3 -march=native -fopenmp -std=c++17 -Isrc/bitsmith/kernels/csrc bench/w3_layout_ab.cpp \
//       src/bitsmith/kernels/csrc/mixed3.cpp -o w3_layout_ab
//   OMP_NUM_THREADS=1 ./w3_layout_ab 1536 320 400     # in, KB per layout, turns
// Switches: -DMIX_MS=1 (2) unpacks the copy's mixed dots 1 (and 2) by vpmultishiftqb + vpand instead of
// vgf2p8affineqb; -DNO_PF leaves the copies' prefetches out (both tried in session 17: neither faster).
#include <time.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "vbmi.cpp"  // today's kernel: its file-local templates are what "lib" runs

#if BS_VBMI
namespace {

double thread_seconds() {
  timespec t;
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t);
  return t.tv_sec + 1e-9 * t.tv_nsec;
}

enum Layout { kBase, kPlane, kMixed };

// gf2p8affineqb matrix taking source bits src[0..n) of each byte to result bits 0..n (result bit i is the
// parity of matrix byte 7 - i AND the source byte)
uint64_t bit_matrix(std::initializer_list<int> src) {
  uint64_t m = 0;
  int i = 0;
  for (int s : src) m |= (uint64_t)(1u << s) << (8 * (7 - i++));
  return m;
}

struct Consts {
  __m512i lo[3];           // plane: bits 2s, 2s+1 -> 0, 1 (s = 1..3)
  __m512i d1, d2, d3, sel;  // mixed: A bits 3-5; B bits 2-4 | 5-7; (A 6-7, B 0 | 1); A's bits 6-7
  __m512i ms1, ms2;         // mixed, -DMIX_MS: vpmultishiftqb offsets of A's bits 3-5, B's 2-4 | 5-7
  Consts() {
    alignas(64) uint8_t g[64];
    for (int i = 0; i < 64; ++i) g[i] = (uint8_t)(8 * (i % 8) + 3);
    ms1 = _mm512_load_si512(g);
    for (int i = 0; i < 64; ++i) g[i] = (uint8_t)(8 * (i % 8) + (i < 32 ? 2 : 5));
    ms2 = _mm512_load_si512(g);
    for (int s = 1; s < 4; ++s) lo[s - 1] = _mm512_set1_epi64((int64_t)bit_matrix({2 * s, 2 * s + 1}));
    d1 = _mm512_set1_epi64((int64_t)bit_matrix({3, 4, 5}));
    const int64_t d2lo = (int64_t)bit_matrix({2, 3, 4}), d2hi = (int64_t)bit_matrix({5, 6, 7});
    d2 = _mm512_set_epi64(d2hi, d2hi, d2hi, d2hi, d2lo, d2lo, d2lo, d2lo);  // qwords 0-3: bytes 0-31
    const int64_t d3lo = (int64_t)bit_matrix({6, 7, 0}), d3hi = (int64_t)bit_matrix({6, 7, 1});
    d3 = _mm512_set_epi64(d3hi, d3hi, d3hi, d3hi, d3lo, d3lo, d3lo, d3lo);
    sel = _mm512_set1_epi8((char)0xC0);
  }
};

template <int L>
inline __m512i body(const uint8_t* p, const int8_t* q, const Strided& st, const Consts& c) {
  if constexpr (L == kBase) {
    return strided_dot<3>(p, q, st);
  } else if constexpr (L == kPlane) {
    const __m512i lo = _mm512_loadu_si512(p), four = _mm512_set1_epi8(4);
    __m512i acc = _mm512_setzero_si512();
    for (int k = 0; k < 4; ++k) {
      __m512i d = k == 0 ? _mm512_and_si512(lo, _mm512_set1_epi8(3)) : _mm512_gf2p8affine_epi64_epi8(lo, c.lo[k - 1], 0);
      d = _mm512_mask_add_epi8(d, _load_mask64((__mmask64*)(p + 64 + 8 * k)), d, four);
      acc = _mm512_dpbusd_epi32(acc, d, _mm512_loadu_si512(q + 64 * k));
    }
    return acc;
  } else {
    const __m512i a = _mm512_loadu_si512(p);
    const __m512i b = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i*)(p + 64)));
    __m512i acc = _mm512_dpbusd_epi32(_mm512_setzero_si512(), _mm512_and_si512(a, _mm512_set1_epi8(7)), _mm512_loadu_si512(q));
#ifndef MIX_MS
#define MIX_MS 0
#endif
    const __m512i m7 = _mm512_set1_epi8(7);
    const __m512i d1 = MIX_MS >= 1 ? _mm512_and_si512(_mm512_multishift_epi64_epi8(c.ms1, a), m7) : _mm512_gf2p8affine_epi64_epi8(a, c.d1, 0);
    const __m512i d2 = MIX_MS >= 2 ? _mm512_and_si512(_mm512_multishift_epi64_epi8(c.ms2, b), m7) : _mm512_gf2p8affine_epi64_epi8(b, c.d2, 0);
    acc = _mm512_dpbusd_epi32(acc, d1, _mm512_loadu_si512(q + 64));
    acc = _mm512_dpbusd_epi32(acc, d2, _mm512_loadu_si512(q + 128));
    const __m512i split = _mm512_ternarylogic_epi32(a, b, c.sel, 0xE4);  // sel ? a : b, bit by bit
    return _mm512_dpbusd_epi32(acc, _mm512_gf2p8affine_epi64_epi8(split, c.d3, 0), _mm512_loadu_si512(q + 192));
  }
}

// rows_strided<3, R, true> of vbmi.cpp with the superblock body chosen by L (no tail: in % 256 == 0 here)
template <int L, int R>
__attribute__((noinline)) void rows_w3(const bs::Matrix& m, const Strided& st, const Consts& c, int64_t o0, const float* xv, const int8_t* xq,
             const float* xsum, float* y) {
  constexpr int S = 256, SB = 96;
  const int64_t groups = st.groups, row_bytes = m.in / 8 * 3, blocks = m.in / S, step = st.step;
  const int64_t after = (m.out - o0 - R) * row_bytes;
  const int64_t near_pf = prefetch_ahead(R, row_bytes), far_pf = (int64_t)BS_PF_FAR * R * row_bytes;
  const int64_t ahead = near_pf <= after ? near_pf : 0, far = far_pf <= after ? far_pf : 0;
  float scales[R * (kMaxGroups + 16)];
  const uint8_t* row[R];
  const float* sc[R];
  __m512 total[R];
  for (int r = 0; r < R; ++r) {
    row[r] = m.packed + (o0 + r) * row_bytes;
    sc[r] = scales + r * (kMaxGroups + 16);
    total[r] = -row_scales(m, o0 + r, groups, 4.f, xsum, scales + r * (kMaxGroups + 16));
  }
  for (int64_t b = 0; b < blocks; ++b) {
    const __m512 v = _mm512_loadu_ps(xv + b * (S / 4));
    const int8_t* q = xq + b * S;
    for (int r = 0; r < R; ++r) {
      const uint8_t* p = row[r] + b * SB;
#ifndef NO_PF
      _mm_prefetch((const char*)(p + ahead), _MM_HINT_T0);
      _mm_prefetch((const char*)(p + ahead + 64), _MM_HINT_T0);
      if (far) {
        _mm_prefetch((const char*)(p + far), BS_PF_FAR_HINT);
        _mm_prefetch((const char*)(p + far + 64), BS_PF_FAR_HINT);
      }
#endif
      const __m512 d = _mm512_cvtepi32_ps(body<L>(p, q, st, c));
      const __m512 w = _mm512_permutexvar_ps(st.lanes, _mm512_loadu_ps(sc[r] + b * step));
      total[r] = _mm512_fmadd_ps(d, _mm512_mul_ps(v, w), total[r]);
    }
  }
  store_sums<R>(total, y + o0);
}

template <int L>
void call(const bs::Matrix& m, const Unpack& u, const Strided& st, const Consts& c, const float* xv, const int8_t* xq,
          const float* xsum, float* y) {
  for (int64_t o = 0; o + 4 <= m.out; o += 4) {
    if constexpr (L == -1) rows_strided<3, 4, true>(m, u, st, o, xv, xq, xsum, y);
    else if constexpr (L == -2) rows_strided<3, 4, true, true>(m, u, st, o, xv, xq, xsum, y);
    else rows_w3<L, 4>(m, st, c, o, xv, xq, xsum, y);
  }
}

// Superblock codes n (natural order) -> the 96 bytes of layout L; dot k reads x's permuted byte 64k + p,
// i.e. natural code strided_source(3, 64k + p), as today's body does.
void repack(const uint8_t* codes, int layout, uint8_t* out) {
  auto src = [&](int k, int p) { return (int)codes[strided_source(3, 64 * k + p)]; };
  std::memset(out, 0, 96);
  if (layout == kBase) {
    for (int n = 0; n < 256; ++n) {
      const int bit = 3 * n;
      out[bit / 8] |= (uint8_t)(codes[n] << (bit % 8));
      if (bit % 8 > 5) out[bit / 8 + 1] |= (uint8_t)(codes[n] >> (8 - bit % 8));
    }
  } else if (layout == kPlane) {
    for (int k = 0; k < 4; ++k)
      for (int p = 0; p < 64; ++p) {
        out[p] |= (uint8_t)((src(k, p) & 3) << (2 * k));
        out[64 + 8 * k + p / 8] |= (uint8_t)((src(k, p) >> 2) << (p % 8));
      }
  } else {
    for (int p = 0; p < 64; ++p) out[p] = (uint8_t)(src(0, p) | src(1, p) << 3 | (src(3, p) & 3) << 6);
    for (int j = 0; j < 32; ++j)
      out[64 + j] = (uint8_t)(src(3, j) >> 2 | (src(3, j + 32) >> 2) << 1 | src(2, j) << 2 | src(2, j + 32) << 5);
  }
}


constexpr int kVariants = 5, G = 128;
const char* const kNames[kVariants] = {"lib", "base", "plane", "mixed", "libmix"};
const int kLayoutOf[kVariants] = {kBase, kBase, kPlane, kMixed, kMixed};

// One random w3g128 matrix in every layout, x as prepare_int8 then vbmi_permute leave it, and the oracle.
struct Case {
  int64_t in, out, groups, row_bytes;
  std::vector<uint8_t> codes;
  std::vector<uint16_t> scale, zero;
  std::vector<std::vector<uint8_t>> packed;
  std::vector<int8_t> xq;
  std::vector<float> xv, xs, xsum;
  std::vector<double> oracle;
  Case(int64_t in_, int64_t kb) : in(in_), groups(in_ / G), row_bytes(in_ / 8 * 3) {
    out = std::max<int64_t>(4, kb * 1000 / row_bytes / 4 * 4);
    srand(17);
    codes.resize(out * in);
    for (auto& c : codes) c = (uint8_t)(rand() % 8);
    scale.resize(out * groups), zero.resize(out * groups);
    for (size_t i = 0; i < scale.size(); ++i) {
      scale[i] = bs::float_to_half(0.01f + 0.02f * rand() / (float)RAND_MAX);
      zero[i] = bs::float_to_half((float)(rand() % 8));
    }
    packed.assign(3, std::vector<uint8_t>(out * row_bytes + 64));
    for (int l = 0; l < 3; ++l)
      for (int64_t o = 0; o < out; ++o)
        for (int64_t b = 0; b < in / 256; ++b) repack(&codes[o * in + b * 256], l, &packed[l][o * row_bytes + b * 96]);
    make_x();
  }
  bs::Matrix matrix(int layout) const {
    return bs::Matrix{packed[layout].data(), scale.data(), zero.data(), out, in, 3, G, true};
  }
  // natural xq, each 32-block's scale x8 in xv, xsum per group; the oracle; then x's superblock order
  void make_x() {
    xq.resize(in), xv.resize(in / 4), xs.resize(in / 32), xsum.assign(groups, 0.f);
    for (auto& q : xq) q = (int8_t)(rand() % 255 - 127);
    for (int64_t k = 0; k < in / 32; ++k) xs[k] = 0.001f + 0.01f * rand() / (float)RAND_MAX;
    for (int64_t k = 0; k < in / 4; ++k) xv[k] = xs[k / 8];
    for (int64_t k = 0; k < in; ++k) xsum[k / G] += xs[k / 32] * xq[k];
    oracle.assign(out, 0.0);
    for (int64_t o = 0; o < out; ++o)
      for (int64_t k = 0; k < in; ++k)
        oracle[o] += ((double)codes[o * in + k] - bs::half_to_float(zero[o * groups + k / G])) *
                     bs::half_to_float(scale[o * groups + k / G]) * xq[k] * xs[k / 32];
    bs::vbmi_permute(matrix(kBase), xq.data(), xv.data());
  }
};

// Every variant once per turn, the order reversing every turn: thread CPU seconds per call, per variant.
std::vector<std::vector<double>> time_variants(const Case& w, int turns, std::vector<std::vector<float>>& y) {
  const Unpack u(3);
  const Strided st(w.matrix(kBase));
  const Consts c;
  std::vector<std::vector<double>> t(kVariants);
  for (int turn = 0; turn < turns; ++turn)
    for (int i = 0; i < kVariants; ++i) {
      const int v = turn % 2 ? kVariants - 1 - i : i;
      const bs::Matrix m = w.matrix(kLayoutOf[v]);
      const float *xv = w.xv.data(), *xs = w.xsum.data();
      const int8_t* xq = w.xq.data();
      const double t0 = thread_seconds();
      switch (v) {
        case 0: call<-1>(m, u, st, c, xv, xq, xs, y[v].data()); break;
        case 1: call<kBase>(m, u, st, c, xv, xq, xs, y[v].data()); break;
        case 2: call<kPlane>(m, u, st, c, xv, xq, xs, y[v].data()); break;
        case 3: call<kMixed>(m, u, st, c, xv, xq, xs, y[v].data()); break;
        default: call<-2>(m, u, st, c, xv, xq, xs, y[v].data()); break;
      }
      t[v].push_back(thread_seconds() - t0);
    }
  return t;
}

}  // namespace

int main(int argc, char** argv) {
  const int64_t in = argc > 1 ? atol(argv[1]) : 1536, kb = argc > 2 ? atol(argv[2]) : 320;
  const int turns = argc > 3 ? atoi(argv[3]) : 400;
  if (in % 256) return printf("in must be a multiple of 256\n"), 1;
  const Case w(in, kb);
  std::vector<std::vector<float>> y(kVariants, std::vector<float>(w.out));
  auto t = time_variants(w, turns, y);
  const double bytes = (double)w.out * w.row_bytes;
  printf("w3g128, %ld x %ld (%.0f KB packed per layout), %d turns, 1 thread, thread CPU time\n", (long)w.out,
         (long)in, bytes / 1e3, turns);
  double med0 = 0;
  for (int v = 0; v < kVariants; ++v) {
    std::sort(t[v].begin(), t[v].end());
    const double med = t[v][t[v].size() / 2], p10 = t[v][t[v].size() / 10];
    if (v == 0) med0 = med;
    float same = 0.f;
    double err = 0.0, norm = 0.0;
    for (int64_t o = 0; o < w.out; ++o) {
      same = std::max(same, std::abs(y[v][o] - y[0][o]));
      err = std::max(err, std::abs(y[v][o] - w.oracle[o]));
      norm = std::max(norm, std::abs(w.oracle[o]));
    }
    printf("%-6s median %7.2f us (%5.1f ps/B, %5.1f GB/s)  p10 %7.2f us (%5.1f GB/s)  time/lib %.3f  "
           "max |y - lib| %.1e  max |y - oracle| / max |oracle| %.1e\n",
           kNames[v], 1e6 * med, 1e12 * med / bytes, bytes / med / 1e9, 1e6 * p10, bytes / p10 / 1e9, med / med0,
           same, err / norm);
  }
  return 0;
}
#else
int main() {
  printf("this build has no AVX-512 VBMI/VNNI/GFNI\n");
  return 0;
}
#endif
