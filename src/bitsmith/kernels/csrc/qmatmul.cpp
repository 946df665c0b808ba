// bitsmith CPU kernels: the decode gemv straight from the packed codes (layout and arithmetic:
// qmatmul.h): bs::gemv_prepare and bs::gemv_rows (gemv.h) over the float tiles (qmatmul_float.h) or the
// int8-activation ones (qmatmul_int8.h), and the C entries bs_gemv, bs_simd_width and bs_int8_widths.
// Prefill dequantization: dequant.cpp.

#include "qmatmul.h"
#include "qmatmul_float.h"
#include "qmatmul_int8.h"

namespace bs {

void gemv_prepare(const Matrix& m, const float* x, int64_t T, float* xsum, float* xp) {
  const int64_t groups = gemv_groups(m);
#if BS_INT8
  if (int8_ok(m)) {  // xp [T, in] floats hold xv [T, in / 4] floats then xq [T, in] bytes
    prepare_int8(m, x, T, xsum, xp, (int8_t*)(xp + T * (m.in / 4)));
    if (strided_takes(m) && (T == 1 || m.layout == kMixed3))  // the mixed layout reads permuted rows at any T
      for (int64_t t = 0; t < T; ++t) vbmi_permute(m, (int8_t*)(xp + T * (m.in / 4)) + t * m.in, xp + t * (m.in / 4));
    if (avx2_takes(m))
      for (int64_t t = 0; t < T; ++t) avx2_permute(m, (int8_t*)(xp + T * (m.in / 4)) + t * m.in, xp + t * (m.in / 4));
    return;
  }
#endif
  for (int64_t t = 0; t < T; ++t)
    for (int64_t g = 0; g < groups; ++g) {
      int64_t end = (g + 1) * m.group < m.in ? (g + 1) * m.group : m.in;
      float s = 0.f;
      for (int64_t i = g * m.group; i < end; ++i) s += x[t * m.in + i];
      xsum[t * groups + g] = s;
    }
  if (m.bits == 4)
    for (int64_t t = 0; t < T; ++t) permute_for_4bit(x + t * m.in, xp + t * m.in, m.in);
}

void gemv_rows(const Matrix& m, const float* x, const float* xp, const float* xs, int64_t T, float* y) {
  const Weights w{m.packed, m.scale, m.zero, m.out, m.in, m.bits, m.group, gemv_groups(m),
                  (m.in + 7) / 8 * m.bits, (float)((1 << m.bits) / 2)};
  if (m.bits != 4 && !int8_ok(m)) xp = x;
  const bool whole4 = m.bits == 4 && m.group % 32 == 0 && m.in % m.group == 0;
#if BS_INT8
  if (int8_ok(m) && vbmi_takes(m))  // before the scratch below: vbmi.cpp needs none (one malloc per thread per call)
    return vbmi_rows(m, xp, (const int8_t*)(xp + T * (m.in / 4)), xs, T, y);
  if (int8_ok(m) && avx2_takes(m)) return avx2_rows(m, xp, (const int8_t*)(xp + T * (m.in / 4)), xs, T, y);
#endif
  std::vector<float> params(2 * w.groups);  // this thread's row scales and zeros as floats
  float* sc = params.data();
  float* zr = sc + w.groups;
#if BS_INT8
  if (int8_ok(m)) {
    const int8_t* xq = (const int8_t*)(xp + T * (m.in / 4));
#pragma omp for schedule(static)
    for (int64_t o = 0; o < m.out; ++o) {
      w.row_params(o, sc, zr);
      if (m.bits == 8 && !BS_VNNI)  // row_tile_int8 multiplies code - 128 there
        for (int64_t g = 0; g < w.groups; ++g) zr[g] -= 128.f;
      int64_t t = 0;
      for (; t + 4 <= T; t += 4) row_tile_int8<4>(w, o, t, xp, xq, xs, sc, zr, y);
      switch (T - t) {
        case 3: row_tile_int8<3>(w, o, t, xp, xq, xs, sc, zr, y); break;
        case 2: row_tile_int8<2>(w, o, t, xp, xq, xs, sc, zr, y); break;
        case 1: row_tile_int8<1>(w, o, t, xp, xq, xs, sc, zr, y); break;
      }
    }
    return;
  }
#endif
#pragma omp for schedule(static)
  for (int64_t o = 0; o < m.out; ++o) {
    w.row_params(o, sc, zr);
    int64_t t = 0;
    if (whole4) {
      for (; t + 4 <= T; t += 4) row_tile4<4>(w, o, t, xp, xs, sc, zr, y);
      switch (T - t) {
        case 3: row_tile4<3>(w, o, t, xp, xs, sc, zr, y); break;
        case 2: row_tile4<2>(w, o, t, xp, xs, sc, zr, y); break;
        case 1: row_tile4<1>(w, o, t, xp, xs, sc, zr, y); break;
      }
      continue;
    }
    for (; t + 4 <= T; t += 4) row_tile<4>(w, o, t, x, xp, xs, sc, zr, y);
    switch (T - t) {
      case 3: row_tile<3>(w, o, t, x, xp, xs, sc, zr, y); break;
      case 2: row_tile<2>(w, o, t, x, xp, xs, sc, zr, y); break;
      case 1: row_tile<1>(w, o, t, x, xp, xs, sc, zr, y); break;
    }
  }
}

}  // namespace bs

extern "C" {

// y [T, out] = x [T, in] @ W^T for small T (decode).
// int8 != 0: 4- and 8-bit codes take the int8-activation path where this build and shape allow it.
void bs_gemv(const uint8_t* packed, const uint16_t* scale, const uint16_t* zero, int64_t out, int64_t in,
             int64_t bits, int64_t group, const float* x, int64_t T, float* y, int64_t threads, int64_t int8) {
  const bs::Matrix m = bs::abi_matrix(packed, scale, zero, out, in, bits, group, int8 != 0);
  std::vector<float> xsum(T * bs::gemv_groups(m), 0.f);
  std::vector<float> xp(T * in);  // 4-bit permuted x, or int8 x and its scales (T * in / 2 floats)
  bs::gemv_prepare(m, x, T, xsum.data(), xp.data());
#pragma omp parallel num_threads((int)threads)
  bs::gemv_rows(m, x, xp.data(), xsum.data(), T, y);
}

int bs_simd_width() { return BS_SIMD; }

// The bit widths this build runs on the int8-activation path (qmatmul_int8.h) when a call asks for
// it, as a mask (1 << bits).
int bs_int8_widths() {
  int mask = BS_INT8 ? 1 << 4 | 1 << 8 : 0;
  const bs::Matrix probe{nullptr, nullptr, nullptr, 1, 64, 2, 64, true};
  for (int bits = 2; bits <= 8; ++bits) {
    bs::Matrix m = probe;
    m.bits = bits;
    if (bs::vbmi_takes(m)) mask |= 1 << bits;  // vbmi.cpp: every width on AVX-512 VBMI + VNNI
    m.in = m.group = 128;
    if (bs::avx2_takes(m)) mask |= 1 << bits;  // avx2_int8.cpp: 2 and 3 bits on AVX2 without AVX-512
  }
  return mask;
}

}  // extern "C"
