// bitsmith CPU kernels: the int8 prefill GEMM, y [T, out] = x [T, in] @ W^T for many activation rows
// (prefill, chunked serving, the calibrated passes), straight from the packed codes, on AVX-512 VNNI.
//
// Why: the exact prefill dequantizes weight blocks to float32 and runs sgemm: 2 flops per weight per
// row at float32 FMA rate. vpdpbusd multiplies 64 u8 codes by 64 int8 activations per instruction,
// four times the products of a float32 FMA, and the codes never become floats. The arithmetic is the
// int8 decode's (vbmi.cpp, qmatmul_int8.h), llama.cpp's trade for every matmul: x rounded to int8 with
// one scale per block of 32 inputs (max|x| / 127, round half to even), then the exact product of the
// dequantized weights with that rounded x; tests/kernels/int8_oracle.py is the oracle for both.
//
// Per tile of NR = 32 weight rows (one thread's unit of work):
//   1. the rows' codes are unpacked once (Unpack: any width 2-8, natural order; the 3-bit mixed layout
//      through mixed3_codes_row) and laid out interleaved, wb [in / 4][32 rows][4 codes], so one zmm is
//      16 rows x 4 consecutive codes and an int32 lane of vpdpbusd is one output row: no horizontal
//      sums (llama.cpp repacks Q4_0 rows 8 by 8 at load time for the same reason; here the packed file
//      stays as it is and each call pays the unpack, about 1/T of the products);
//   2. for MR = 4 activation rows at a time, per 32-block: 8 vpdpbusd steps (4 codes each) into 8 int32
//      accumulators (4 rows x 2 halves of the tile), converted and scaled by the block's x scale into
//      float group sums; per group: times the rows' weight scales, minus scale * zero * xsum (the
//      zero-point term: sum over the group's blocks of xs_b * sum(q_b), as the decode computes it).
// Shapes: in a multiple of 64 (whole Unpack chunks), group a multiple of 32 (a 32-block never splits
// a group; the last group may be short: SmolLM2's 576 = 4.5 groups of 128). kernels/cpu.py asks
// bs_gemm_int8_takes and keeps the exact path otherwise.

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "gemv.h"

#if defined(__AVX512VBMI__) && defined(__AVX512VNNI__) && defined(__AVX512BW__) && defined(__AVX512VL__) && \
    defined(__AVX512DQ__) && defined(__F16C__)
#include <immintrin.h>
#define BS_GEMM8 1
#else
#define BS_GEMM8 0
#endif

namespace {

#if BS_GEMM8
#include "unpack.h"

#include "gemm_tile.h"

// The packed scalar codes of a bs::Matrix as gemm_tiles reads them (one per thread: its Unpack).
struct ScalarRows {
  using Args = bs::Matrix;
  static constexpr bool kDivide = false;
  const bs::Matrix& m;
  const Unpack u;
  const int64_t row_bytes, groups;
  const float mid;
  explicit ScalarRows(const bs::Matrix& matrix)
      : m(matrix), u((int)matrix.bits), row_bytes((matrix.in + 7) / 8 * matrix.bits), groups(bs::gemv_groups(matrix)),
        mid((float)((1 << matrix.bits) / 2)) {}
  void codes(int64_t o, uint8_t* c) const {
    if (m.layout == bs::kMixed3) return bs::mixed3_codes_row(m, o, c);
    const uint8_t* row = m.packed + o * row_bytes;
    for (int64_t k = 0; k < m.in; k += 64) _mm512_storeu_si512(c + k, u.codes(row + k / 8 * m.bits, (int)m.bits));
  }
  void scales(int64_t o, int64_t g, float* s, float* sz) const {
    *s = bs::half_to_float(m.scale[o * groups + g]);
    *sz = *s * (m.zero ? bs::half_to_float(m.zero[o * groups + g]) : mid);
  }
};
#endif

}  // namespace

extern "C" {

// Whether bs_gemm_int8 runs a matrix of `in` inputs, `bits`-bit codes (| layout << kLayoutShift) and
// group `group` on this build.
int64_t bs_gemm_int8_takes(int64_t in, int64_t bits, int64_t group) {
  const int64_t layout = bits >> bs::kLayoutShift;
  bits &= (1 << bs::kLayoutShift) - 1;
  return BS_GEMM8 && bits >= 2 && bits <= 8 && in > 0 && in % 64 == 0 && group > 0 && group % 32 == 0 &&
         (layout == bs::kNatural || (layout == bs::kMixed3 && bits == 3));
}

// y [T, out] = x [T, in] @ W^T with x rounded to int8 per 32-block (see the top). The caller checked
// bs_gemm_int8_takes.
void bs_gemm_int8(const uint8_t* packed, const uint16_t* scale, const uint16_t* zero, int64_t out, int64_t in,
                  int64_t bits, int64_t group, const float* x, int64_t T, float* y, int64_t threads) {
#if BS_GEMM8
  const bs::Matrix m{packed, scale, zero, out, in, bits & ((1 << bs::kLayoutShift) - 1), group, true,
                     bits >> bs::kLayoutShift};
  gemm_tiles<ScalarRows>(m, out, in, group, x, T, y, threads);
#else
  (void)packed, (void)scale, (void)zero, (void)out, (void)in, (void)bits, (void)group, (void)x, (void)T, (void)y,
      (void)threads;
#endif
}

}  // extern "C"
