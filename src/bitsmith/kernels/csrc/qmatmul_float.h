// The float32 decode tiles of qmatmul.cpp's gemv (bs::gemv_rows): one output row times 1-4 activation
// rows, widening codes to float (layout and arithmetic: qmatmul.h). Internal to qmatmul.cpp.
#pragma once
#include "qmatmul.h"

namespace {

// Partial sums over codes [start, start + width) of code * x[t][i]: full blocks into the vectors
// acc[2t], acc[2t+1] (two independent FMA chains, fresh per group), leftover codes into tail[t].
template <int TT>
inline void dot8(const uint8_t* row, int64_t start, int64_t width, const float* const* x, vf* acc, float* tail) {
  const uint8_t* p = row + start;
  int64_t n = width / (2 * L) * (2 * L), k = 0;
  for (; k < n; k += 2 * L) {
    vf w0 = Vec::u8(p + k), w1 = Vec::u8(p + k + L);
    for (int t = 0; t < TT; ++t) {
      acc[2 * t] = Vec::fma(w0, Vec::load(x[t] + start + k), acc[2 * t]);
      acc[2 * t + 1] = Vec::fma(w1, Vec::load(x[t] + start + k + L), acc[2 * t + 1]);
    }
  }
  for (; k < width; ++k)
    for (int t = 0; t < TT; ++t) tail[t] += (float)p[k] * x[t][start + k];
}

// xp: x permuted per 32-block into [16 even | 16 odd] (permute_for_4bit), matching the nibbles:
// byte j of a block holds code 2j (low) and code 2j+1 (high).
template <int TT>
inline void dot4(const uint8_t* row, int64_t start, int64_t width, const float* const* x, const float* const* xp,
                 vf* acc, float* tail) {
  const uint8_t* p = row + start / 2;
  int64_t n = width / 32 * 32, k = 0;
  for (; k < n; k += 32) {
    for (int h = 0; h < 16; h += L) {
      vf even, odd;
      Vec::nibbles(p + k / 2 + h, even, odd);
      for (int t = 0; t < TT; ++t) {
        acc[2 * t] = Vec::fma(even, Vec::load(xp[t] + start + k + h), acc[2 * t]);
        acc[2 * t + 1] = Vec::fma(odd, Vec::load(xp[t] + start + k + 16 + h), acc[2 * t + 1]);
      }
    }
  }
  for (; k < width; ++k) {
    float c = (float)((p[k >> 1] >> ((k & 1) * 4)) & 0xF);
    for (int t = 0; t < TT; ++t) tail[t] += c * x[t][start + k];
  }
}

// Any width: each run of 8 codes is one 64-bit word split into lanes by per-lane shifts.
template <int TT, int BITS>
inline void dot_runs(const uint8_t* row, int64_t start, int64_t width, const float* const* x, vf* acc,
                     float* tail) {
  int64_t n = width / (2 * L) * (2 * L), k = 0;
  for (; k < n; k += 2 * L) {
    vf w0 = Vec::codes<BITS>(row, start + k), w1 = Vec::codes<BITS>(row, start + k + L);
    for (int t = 0; t < TT; ++t) {
      acc[2 * t] = Vec::fma(w0, Vec::load(x[t] + start + k), acc[2 * t]);
      acc[2 * t + 1] = Vec::fma(w1, Vec::load(x[t] + start + k + L), acc[2 * t + 1]);
    }
  }
  for (; k < width; ++k) {
    float c = (float)code_at(row, start + k, BITS);
    for (int t = 0; t < TT; ++t) tail[t] += c * x[t][start + k];
  }
}

template <int TT>
inline void group_dot(const Weights& w, const uint8_t* row, int64_t start, int64_t width, const float* const* x,
                      const float* const* xp, vf* acc, float* tail) {
  switch (w.bits) {
    case 8: dot8<TT>(row, start, width, x, acc, tail); return;
    case 4: dot4<TT>(row, start, width, x, xp, acc, tail); return;
    case 2: dot_runs<TT, 2>(row, start, width, x, acc, tail); return;
    case 3: dot_runs<TT, 3>(row, start, width, x, acc, tail); return;
    case 5: dot_runs<TT, 5>(row, start, width, x, acc, tail); return;
    case 6: dot_runs<TT, 6>(row, start, width, x, acc, tail); return;
    default: dot_runs<TT, 7>(row, start, width, x, acc, tail); return;
  }
}

// y[t0 .. t0+TT, o] for one output row: sum_g scale_g * dot_g - sum_g scale_g * zero_g * xsum_g.
template <int TT>
void row_tile(const Weights& w, int64_t o, int64_t t0, const float* x, const float* xp, const float* xsum,
              const float* sc, const float* zr, float* y) {
  const float* xr[TT];
  const float* xpr[TT];
  vf total[TT];  // scale-weighted group dots, summed across lanes once at the end
  float offset[TT];
  for (int t = 0; t < TT; ++t) {
    xr[t] = x + (t0 + t) * w.in;
    xpr[t] = xp + (t0 + t) * w.in;
    total[t] = Vec::zero();
    offset[t] = 0.f;
  }
  const uint8_t* row = w.packed + o * w.row_bytes;
  for (int64_t g = 0; g < w.groups; ++g) {
    int64_t start = g * w.group;
    int64_t width = start + w.group <= w.in ? w.group : w.in - start;
    vf acc[2 * TT];
    float tail[TT];
    for (int t = 0; t < TT; ++t) {
      acc[2 * t] = acc[2 * t + 1] = Vec::zero();
      tail[t] = 0.f;
    }
    group_dot<TT>(w, row, start, width, xr, xpr, acc, tail);
    float s = sc[g], z = zr[g];
    for (int t = 0; t < TT; ++t) {
      total[t] = Vec::fma(Vec::set(s), Vec::add(acc[2 * t], acc[2 * t + 1]), total[t]);
      offset[t] += s * (z * xsum[(t0 + t) * w.groups + g] - tail[t]);
    }
  }
  for (int t = 0; t < TT; ++t) y[(t0 + t) * w.out + o] = Vec::sum(total[t]) - offset[t];
}

// 4-bit rows made only of whole groups that are whole 32-blocks (group % 32 == 0, in % group == 0):
// the common case (w4g32, w4g128) without the general path's per-group dispatch and tail handling.
// One fresh FMA chain per group, scaled into two alternating totals (so consecutive groups do not
// wait on each other); the zero-point term sum_g scale*zero*xsum is a separate loop over groups.
template <int TT>
void row_tile4(const Weights& w, int64_t o, int64_t t0, const float* xp, const float* xsum, const float* sc,
               const float* zr, float* y) {
  const float* xpr[TT];
  vf total[2 * TT];
  for (int t = 0; t < TT; ++t) {
    xpr[t] = xp + (t0 + t) * w.in;
    total[2 * t] = total[2 * t + 1] = Vec::zero();
  }
  const uint8_t* row = w.packed + o * w.row_bytes;
  const int64_t group = w.group;
  for (int64_t g = 0; g < w.groups; ++g) {
    const int64_t start = g * group;
    vf acc[TT];
    for (int t = 0; t < TT; ++t) acc[t] = Vec::zero();
    for (int64_t k = start; k < start + group; k += 32) {
      const uint8_t* p = row + k / 2;
      for (int h = 0; h < 16; h += L) {
        vf even, odd;
        Vec::nibbles(p + h, even, odd);
        for (int t = 0; t < TT; ++t) {
          acc[t] = Vec::fma(even, Vec::load(xpr[t] + k + h), acc[t]);
          acc[t] = Vec::fma(odd, Vec::load(xpr[t] + k + 16 + h), acc[t]);
        }
      }
    }
    const vf s = Vec::set(sc[g]);
    const int half = (int)(g & 1);
    for (int t = 0; t < TT; ++t) total[2 * t + half] = Vec::fma(acc[t], s, total[2 * t + half]);
  }
  for (int t = 0; t < TT; ++t)
    y[(t0 + t) * w.out + o] = Vec::sum(Vec::add(total[2 * t], total[2 * t + 1])) -
                              zero_offset(sc, zr, xsum + (t0 + t) * w.groups, w.groups);
}

}  // namespace
