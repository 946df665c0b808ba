// The decode gemv of qmatmul.cpp, split so other kernels in the library (decode.cpp) can run it
// inside their own OpenMP parallel region instead of opening one per matrix.
#pragma once
#include <cstdint>

namespace bs {

// One packed weight matrix (formats/packing.py layout, fp16 scale/zero [out, groups]).
struct Matrix {
  const uint8_t* packed;   // [out, row_bytes], readable 8 bytes past the end
  const uint16_t* scale;   // fp16 [out, groups]
  const uint16_t* zero;    // fp16 [out, groups] or null (symmetric)
  int64_t out, in, bits, group;
};

inline int64_t gemv_groups(const Matrix& m) { return (m.in + m.group - 1) / m.group; }

// Per-call preparation of x [T, in] on one thread: group sums xsum [T, groups] and, for 4-bit codes,
// x permuted per 32-block into xp [T, in] (for other widths xp is not written and may be null).
void gemv_prepare(const Matrix& m, const float* x, int64_t T, float* xsum, float* xp);

// y [T, out] = x @ W^T from prepared inputs. The output rows are shared out with an orphaned
// `omp for` (implicit barrier at the end), so every thread of the enclosing team must call it; outside
// a parallel region it runs on the calling thread alone.
void gemv_rows(const Matrix& m, const float* x, const float* xp, const float* xsum, int64_t T, float* y);

}  // namespace bs
