// bitsmith: the superblock layouts of vbmi.cpp's one-row decode of 2-, 3- and 4-bit codes (moved out of
// vbmi.cpp in session 17): x's permutation, the per-call constants and the int32 dot of one superblock,
// for vbmi.cpp's row loop and mixed3.cpp's (the 3-bit mixed layout, T activation rows, dequantization).
// Included inside each file's anonymous namespace after unpack.h, where AVX-512 VBMI is compiled in.
#pragma once

// ---- Superblock decode of 2-, 3- and 4-bit rows (one activation row) ----------------------------
// vbmi.cpp's chunk loop (rows_vbmi1) spends, per 64 codes and row, an unpack (vpermb + vpmultishiftqb + vpand),
// one vpdpbusd, one conversion and one FMA: about as many instructions for a 2-bit chunk (16 bytes)
// as for an 8-bit one (64 bytes), so 2- and 3-bit rows decoded compute-bound, not in proportion to
// their bytes. Here x's int8 codes are permuted once per call (vbmi_permute) to follow the order in
// which the packed bytes unpack most cheaply, and a superblock of S codes (128 bytes of 2-bit codes,
// 64 of 4-bit, 96 of 3-bit) is gathered into ONE int32 accumulator whose lane l always covers codes of the
// same 32-block of x (so of one x scale and one weight group): one conversion and one FMA per
// superblock instead of one per 64 codes, and an unpack of a few shifts and masks:
//   2 bits (S = 512): natural dword d (bytes 4d..4d+3, codes 16d..16d+15) lies in x block d/2; each
//     64-byte half v is summed as it lies (lane l: dword 16v+l), then two vpermt2d of the two int32
//     sums put dwords 2l and 2l+1 in lane l, so lane l sums the 32 codes of x block l. In each half,
//     byte b's code s is b & 3 (s = 0) or one vgf2p8affineqb moving bits 2s, 2s+1 to bits 0, 1
//     (session 15: ~3% less compute than a shift and three vpermb lookups); xq per superblock as dot
//     4v+s reads code s of natural dword 16v+l's byte e in byte 4l+e. One conversion and scale step per 512 codes: with 256 it was ~30% of the
//     2-bit time (session 12).
//   4 bits (S = 128): b & 15 are the even codes, (b >> 4) & 15 the odd ones; xq as [x_{2j} | x_{2j+1}];
//     lane l sums codes 8l..8l+7 (x block l/4).
//   3 bits (S = 256, 32 runs of 8 codes in 3 bytes): vpermi2b gathers the run pair (4j+c, 4j+2+c) into
//     qword j (bytes 0-2 | 3-5) for c = 0, 1, and two vpmultishiftqb + vpand unpack codes 0-3 and 4-7
//     of both runs from that one gather (2 gathers per superblock, not 4); xq per superblock as dot
//     k = 2c + h reads codes 4h..4h+3 of run 4j+c in bytes 0-3 of qword j and of run 4j+2+c in bytes
//     4-7; lane l sums codes 16l..16l+15 (x block l/2).
// The integer products are the same as the chunk path's (exact), only the float summation order
// differs. A row's last in % S codes (whole 64-code chunks) keep the natural order and the chunk code.
// Groups: G a multiple of S (one scale per superblock) or S a multiple of G (G = 64, 128: the lanes'
// weight scales gathered with one vpermps).
//
// The 3-bit mixed layout (session 17; kMixed3 in gemv.h): kernels/cpu.py repacks the 96 bytes of each
// whole 256-code superblock of a 3-bit row at load (mixed3.cpp bs_mixed3_repack; the row's tail and
// the file on disk keep the natural packing) so that the four dots of strided_dot<3> read codes with
// five instructions instead of ten (two vpermi2b, four vpmultishiftqb, four vpand). Dot k reads code
// c(k, p) = the natural code strided_source(3, 64k + p) in byte p, as the natural body does (x's
// permutation, lanes and scales are unchanged). Bytes 0-63 (A): byte p holds c(0, p) at bits 0-2,
// c(1, p) at bits 3-5 and the low two bits of c(3, p) at bits 6-7. Bytes 64-95 (B): byte j holds the
// high bit of c(3, j) at bit 0 and of c(3, j + 32) at bit 1, c(2, j) at bits 2-4, c(2, j + 32) at
// bits 5-7. With B loaded into both halves of a register: dot 0 = A & 7; dot 1 = one vgf2p8affineqb
// of A; dot 2 = one of B (another bit matrix in qwords 4-7); dot 3 = one vpternlogd (A's bits 6-7,
// B's others) and one vgf2p8affineqb. In cache, 1 thread: 0.68-0.79x the natural body's cost per
// byte (bench/w3_layout_ab.cpp, bench/gemv_stream.py --in-cache; session 17).

constexpr int strided_span(int bits) { return bits == 4 ? 128 : bits == 2 ? 512 : 256; }

// codes of superblock position p (natural index within the superblock) for permuted byte p
inline int strided_source(int bits, int p) {
  if (bits == 2) {  // dot k = 4v + s reads codes 4e+s of natural dword 16v+l in byte e of lane l
    const int k = p / 64, l = (p % 64) / 4, e = p % 4;
    return 256 * (k / 4) + 16 * l + 4 * e + k % 4;
  }
  if (bits == 4) return 2 * (p % 64) + p / 64;
  // 3 bits: dot k = p / 64 reads gather k / 2, codes 0-3 (k even) or 4-7 of its runs; byte e of qword j
  const int k = p / 64, j = (p % 64) / 8, e = p % 8, run = 4 * j + (e < 4 ? 0 : 2) + k / 2;
  return 8 * run + e % 4 + 4 * (k % 2);
}

// A vgf2p8affineqb matrix taking source bits a, b, c of each byte to result bits 0, 1, 2 (result bit j is
// the parity of matrix byte 7 - j AND the source byte)
constexpr uint64_t bit_matrix(int a, int b, int c) {
  return (uint64_t)(1u << a) << 56 | (uint64_t)(1u << b) << 48 | (uint64_t)(1u << c) << 40;
}

struct Strided {
  __m512i gather3[2];  // 3 bits: vpermi2b indices of run pair g over bytes [0, 64) | [32, 96)
  __m512i half3[2];    // 3 bits: vpmultishiftqb offsets of codes 0-3 (h = 0) or 4-7 (h = 1) of both runs
  __m512i dwords2[2];  // 2 bits: vpermt2d indices of lanes 0, 2, .., 30 | 1, 3, .., 31 of the two halves' sums
  __m512i plane2[3];   // 2 bits: gf2p8affineqb matrices taking bits 2s, 2s+1 of a byte to bits 0, 1 (s = 1..3)
  __m512i mix[3];      // 3-bit mixed layout, dots 1-3: A's bits 3-5; B's 2-4 | 5-7; (A's 6-7, B's 0 | 1)
  __m512i lanes;       // S > G: lane -> group offset within the superblock
  int64_t groups, step;  // a row's groups; S / G groups per superblock (G < S) or G / S superblocks per group
  explicit Strided(const bs::Matrix& m) {
    const int S = strided_span((int)m.bits);
    groups = bs::gemv_groups(m);  // once per call, not per pass (each is a 64-bit division)
    step = m.group < S ? S / m.group : m.group / S;
    alignas(64) int32_t idx[16];
    for (int l = 0; l < 16; ++l) idx[l] = m.group < S ? (int32_t)(l * (S / 16) / m.group) : 0;
    lanes = _mm512_load_si512(idx);
    alignas(64) uint8_t g[64];
    for (int v = 0; v < 2; ++v) {
      for (int l = 0; l < 16; ++l) idx[l] = 2 * l + v;
      dwords2[v] = _mm512_load_si512(idx);
    }
    for (int s = 1; s < 4; ++s)  // result bit j is the parity of matrix byte 7 - j AND the source byte
      plane2[s - 1] = _mm512_set1_epi64((int64_t)((uint64_t)(1u << (2 * s)) << 56 | (uint64_t)(2u << (2 * s)) << 48));
    // qwords 0-3 (bytes 0-31 of B's broadcast) read bit set `lo`, qwords 4-7 bit set `hi`
    auto halves = [](uint64_t lo, uint64_t hi) { const auto l = (long long)lo, h = (long long)hi;
      return _mm512_set_epi64(h, h, h, h, l, l, l, l); };
    mix[0] = halves(bit_matrix(3, 4, 5), bit_matrix(3, 4, 5));
    mix[1] = halves(bit_matrix(2, 3, 4), bit_matrix(5, 6, 7));
    mix[2] = halves(bit_matrix(6, 7, 0), bit_matrix(6, 7, 1));
    for (int h = 0; h < 2; ++h) {
      for (int i = 0; i < 64; ++i) g[i] = (uint8_t)((i % 8 < 4 ? 0 : 24) + 3 * (i % 4 + 4 * h));
      half3[h] = _mm512_load_si512(g);
    }
    for (int c = 0; c < 2; ++c) {  // qword j = run 4j+c (bytes 0-2) | run 4j+2+c (bytes 3-5)
      for (int j = 0; j < 8; ++j)
        for (int e = 0; e < 8; ++e) {
          const int run = e < 3 ? 4 * j + c : 4 * j + 2 + c, a = 3 * run + (e < 3 ? e : e < 6 ? e - 3 : 2);
          g[8 * j + e] = (uint8_t)(a < 64 ? a : 64 + (a - 32));  // bytes 6-7 are never read
        }
      gather3[c] = _mm512_load_si512(g);
    }
  }
};

// The four dots of a 3-bit mixed-layout superblock (above), each 64 codes for bytes of x's dot k.
inline void mixed3_codes(const uint8_t* p, const Strided& st, __m512i* d) {
  const __m512i a = _mm512_loadu_si512(p), b = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i*)(p + 64)));
  d[0] = _mm512_and_si512(a, _mm512_set1_epi8(7));
  d[1] = _mm512_gf2p8affine_epi64_epi8(a, st.mix[0], 0);
  d[2] = _mm512_gf2p8affine_epi64_epi8(b, st.mix[1], 0);
  const __m512i split = _mm512_ternarylogic_epi32(a, b, _mm512_set1_epi8((char)0xC0), 0xE4);  // A's bits 6-7, B's others
  d[3] = _mm512_gf2p8affine_epi64_epi8(split, st.mix[2], 0);
}

// The int32 lanes of one superblock of row bytes p against permuted xq q (see above); MIX: the 3-bit
// mixed layout.
template <int BITS, bool MIX = false>
inline __m512i strided_dot(const uint8_t* p, const int8_t* q, const Strided& st) {
  if constexpr (MIX) {
    __m512i d[4];
    mixed3_codes(p, st, d);
    __m512i acc = _mm512_dpbusd_epi32(_mm512_setzero_si512(), d[0], _mm512_loadu_si512(q));
    for (int k = 1; k < 4; ++k) acc = _mm512_dpbusd_epi32(acc, d[k], _mm512_loadu_si512(q + 64 * k));
    return acc;
  } else if constexpr (BITS == 2) {
    // 512 codes in 128 bytes, each half (v) read as it lies: lane l of half v is natural dword 16v + l
    // (codes 16(16v+l) ..+15, x block 8v + l/2). The two halves' int32 sums are then folded by two
    // vpermt2d + an add so that lane l holds x block l (natural dwords 2l and 2l+1): one conversion per
    // 512 codes, and the permutes come after the multiply chains rather than in front of them
    // (session 27: 0.82x the cost per byte on 576-wide rows, where a row is one superblock)
    const __m512i m3 = _mm512_set1_epi8(3);
    __m512i acc[2];
    for (int v = 0; v < 2; ++v) {
      const __m512i raw = _mm512_loadu_si512(p + 64 * v);
      const int8_t* qv = q + 256 * v;
      acc[v] = _mm512_dpbusd_epi32(_mm512_setzero_si512(), _mm512_and_si512(raw, m3), _mm512_loadu_si512(qv));
      for (int s = 1; s < 4; ++s)  // code s of each byte (bits 2s, 2s+1) into bits 0, 1: one GF(2) affine step
        acc[v] = _mm512_dpbusd_epi32(acc[v], _mm512_gf2p8affine_epi64_epi8(raw, st.plane2[s - 1], 0),
                                     _mm512_loadu_si512(qv + 64 * s));
    }
    return _mm512_add_epi32(_mm512_permutex2var_epi32(acc[0], st.dwords2[0], acc[1]),
                            _mm512_permutex2var_epi32(acc[0], st.dwords2[1], acc[1]));
  } else if constexpr (BITS == 4) {
    const __m512i raw = _mm512_loadu_si512(p), m15 = _mm512_set1_epi8(15);
    const __m512i lo = _mm512_and_si512(raw, m15), hi = _mm512_and_si512(_mm512_srli_epi16(raw, 4), m15);
    return _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), lo, _mm512_loadu_si512(q)), hi,
                               _mm512_loadu_si512(q + 64));
  } else {
    // two runs per qword: one byte gather feeds two unpacks (codes 0-3 and 4-7 of both runs)
    const __m512i a = _mm512_loadu_si512(p), b = _mm512_loadu_si512(p + 32), m7 = _mm512_set1_epi8(7);
    __m512i acc = _mm512_setzero_si512();
    for (int c = 0; c < 2; ++c) {
      const __m512i runs = _mm512_permutex2var_epi8(a, st.gather3[c], b);
      for (int h = 0; h < 2; ++h) {
        const __m512i codes = _mm512_and_si512(_mm512_multishift_epi64_epi8(st.half3[h], runs), m7);
        acc = _mm512_dpbusd_epi32(acc, codes, _mm512_loadu_si512(q + 64 * (2 * c + h)));
      }
    }
    return acc;
  }
}


// A byte permutation of S-byte blocks (S = 128, 256 or 512), 64 output bytes at a time: output byte p is
// source byte source(p), fetched by one vpermt2b per 128-byte source window, masked to the bytes of that
// window (a scalar byte loop here cost ~1 ns a code per call: ~0.4 ms per Qwen token). x's int8 codes
// into the superblock order (source = strided_source), and mixed3.cpp's codes back to natural order.
struct PermTable {
  __m512i idx[8][4];
  __mmask64 take[8][4];
  int S;
  template <class Source>
  PermTable(int span, Source source) : S(span) {
    for (int c = 0; c < S / 64; ++c)
      for (int w = 0; w < S / 128; ++w) {
        alignas(64) uint8_t g[64];
        take[c][w] = 0;
        for (int i = 0; i < 64; ++i) {
          const int t = source(64 * c + i);
          g[i] = (uint8_t)(t % 128);
          if (t / 128 == w) take[c][w] |= (__mmask64)1 << i;
        }
        idx[c][w] = _mm512_load_si512(g);
      }
  }
  // dst [S] = src [S] permuted (dst may be src)
  void apply(const void* src_bytes, void* dst_bytes) const {
    const uint8_t* src8 = static_cast<const uint8_t*>(src_bytes);
    uint8_t* dst8 = static_cast<uint8_t*>(dst_bytes);
    __m512i src[8];
    for (int j = 0; j < S / 64; ++j) src[j] = _mm512_loadu_si512(src8 + 64 * j);
    for (int c = 0; c < S / 64; ++c) {
      __m512i out = _mm512_setzero_si512();
      for (int w = 0; w < S / 128; ++w)
        out = _mm512_mask_mov_epi8(out, take[c][w], _mm512_permutex2var_epi8(src[2 * w], idx[c][w], src[2 * w + 1]));
      _mm512_storeu_si512(dst8 + 64 * c, out);
    }
  }
};

template <int BITS>
void permute_codes(int8_t* xq, int64_t blocks) {
  static const PermTable table(strided_span(BITS), [](int p) { return strided_source(BITS, p); });  // once, thread-safe
  for (int64_t b = 0; b < blocks; ++b) table.apply(xq + b * strided_span(BITS), xq + b * strided_span(BITS));
}
