// bitsmith CPU kernels: the prefill's dequantization, (code - zero) * scale for a block of weight rows
// into a float32 (or bfloat16) buffer, exactly the reference reconstruction, for a BLAS matmul done by
// the caller; and the activations' matching permutation and bf16 conversions. Layout: qmatmul.h.

#include "qmatmul.h"

namespace {

// Row o of the weights, (code - zero) * scale in float32, into dst [in]: the reference arithmetic.
// permuted (4-bit only): each full 32-block as [16 even | 16 odd] codes (see bs_dequant).
void dequant_row(const Weights& w, int64_t o, float* dst, bool permuted) {
  if (w.layout == bs::kMixed3)
    return bs::mixed3_dequant_row(bs::Matrix{w.packed, w.scale, w.zero, w.out, w.in, w.bits, w.group, true, w.layout}, o, dst);
  const int64_t in = w.in, group = w.group, bits = w.bits;
  const uint8_t* row = w.packed + o * w.row_bytes;
  for (int64_t g = 0; g < w.groups; ++g) {
    int64_t start = g * group;
    int64_t end = start + group < in ? start + group : in;
    float s = w.scale_at(o, g), z = w.zero_at(o, g);
    vf vs = Vec::set(s), vz = Vec::set(z);
    int64_t i = start;
    if (bits == 8) {
      for (; i + L <= end; i += L) Vec::store(dst + i, Vec::mul(Vec::sub(Vec::u8(row + i), vz), vs));
    } else if (bits == 4 && permuted) {
      for (; i + 32 <= end; i += 32)
        for (int h = 0; h < 16; h += L) {
          vf even, odd;
          Vec::nibbles(row + i / 2 + h, even, odd);
          Vec::store(dst + i + h, Vec::mul(Vec::sub(even, vz), vs));
          Vec::store(dst + i + 16 + h, Vec::mul(Vec::sub(odd, vz), vs));
        }
    } else if (bits == 4) {
      for (; i + 2 <= end; i += 2) {
        uint8_t b = row[i >> 1];
        dst[i] = ((float)(b & 0xF) - z) * s;
        dst[i + 1] = ((float)(b >> 4) - z) * s;
      }
    } else {
      for (; i + L <= end && L >= 8; i += L) {
        vf c;
        switch (bits) {
          case 2: c = Vec::codes<2>(row, i); break;
          case 3: c = Vec::codes<3>(row, i); break;
          case 5: c = Vec::codes<5>(row, i); break;
          case 6: c = Vec::codes<6>(row, i); break;
          default: c = Vec::codes<7>(row, i); break;
        }
        Vec::store(dst + i, Vec::mul(Vec::sub(c, vz), vs));
      }
    }
    for (; i < end; ++i) dst[i] = ((float)code_at(row, i, (int)bits) - z) * s;
  }
}

#if BS_SIMD == 512 && defined(__AVX512BF16__)
// 16 floats -> 16 bfloat16, round to nearest even (the same rounding as torch's .to(bfloat16)).
inline void store_bf16x16(uint16_t* p, __m512 v) { _mm256_storeu_si256((__m256i*)p, (__m256i)_mm512_cvtneps_pbh(v)); }
#endif

// One float -> bfloat16 bits, round to nearest even; NaN stays a (quiet) NaN.
inline uint16_t to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);
  return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

// The weights as the C entry points below receive them: ``bits`` is the code width | layout <<
// kLayoutShift (gemv.h).
inline Weights abi_weights(const uint8_t* packed, const uint16_t* scale, const uint16_t* zero, int64_t out,
                           int64_t in, int64_t bits, int64_t group) {
  const int64_t layout = bits >> bs::kLayoutShift;
  bits &= (1 << bs::kLayoutShift) - 1;
  return Weights{packed, scale, zero, out, in, bits, group, (in + group - 1) / group, (in + 7) / 8 * bits,
                 (float)((1 << bits) / 2), layout};
}

}  // namespace

extern "C" {

// buf [rows, in] = (code - zero) * scale for weight rows [row0, row0 + rows) (prefill), the same
// arithmetic as the reference. permuted != 0 (4-bit only) writes each full 32-block as
// [16 even | 16 odd] codes, the order nibbles come in; the caller permutes x the same way
// (bs_permute4), which leaves x @ W^T unchanged and saves interleaving the weights.
void bs_dequant(const uint8_t* packed, const uint16_t* scale, const uint16_t* zero, int64_t out, int64_t in,
                int64_t bits, int64_t group, int64_t row0, int64_t rows, float* buf, int64_t permuted,
                int64_t threads) {
  const Weights w = abi_weights(packed, scale, zero, out, in, bits, group);
#pragma omp parallel for schedule(static) num_threads((int)threads)
  for (int64_t r = 0; r < rows; ++r) dequant_row(w, row0 + r, buf + r * in, permuted != 0);
}

// The same rows rounded to bfloat16 (round to nearest even, as torch's .to(torch.bfloat16) of the
// float32 rows bs_dequant writes), for a bf16 matmul (AMX / AVX512-BF16 through oneDNN). Each row
// is made in float32 in a per-thread scratch row that stays in L1/L2, then narrowed.
void bs_dequant_bf16(const uint8_t* packed, const uint16_t* scale, const uint16_t* zero, int64_t out, int64_t in,
                     int64_t bits, int64_t group, int64_t row0, int64_t rows, uint16_t* buf, int64_t permuted,
                     int64_t threads) {
  const Weights w = abi_weights(packed, scale, zero, out, in, bits, group);
#pragma omp parallel num_threads((int)threads)
  {
    std::vector<float> row(in);
#pragma omp for schedule(static)
    for (int64_t r = 0; r < rows; ++r) {
      dequant_row(w, row0 + r, row.data(), permuted != 0);
      uint16_t* dst = buf + r * in;
      int64_t i = 0;
#if BS_SIMD == 512 && defined(__AVX512BF16__)
      for (; i + 16 <= in; i += 16) store_bf16x16(dst + i, _mm512_loadu_ps(row.data() + i));
#endif
      for (; i < in; ++i) dst[i] = to_bf16(row[i]);
    }
  }
}

// xp [T, in] = x [T, in] with every full 32-block permuted to [16 even | 16 odd].
void bs_permute4(const float* x, float* xp, int64_t T, int64_t in) {
  for (int64_t t = 0; t < T; ++t) permute_for_4bit(x + t * in, xp + t * in, in);
}

// xb [T, in] = x [T, in] rounded to bfloat16 (nearest even), each full 32-block permuted to
// [16 even | 16 odd] first when permuted != 0: the bf16 prefill's activations in one pass.
void bs_to_bf16(const float* x, uint16_t* xb, int64_t T, int64_t in, int64_t permuted) {
  std::vector<float> row(permuted ? in : 0);
  for (int64_t t = 0; t < T; ++t) {
    const float* src = x + t * in;
    if (permuted) {
      permute_for_4bit(src, row.data(), in);
      src = row.data();
    }
    uint16_t* dst = xb + t * in;
    int64_t i = 0;
#if BS_SIMD == 512 && defined(__AVX512BF16__)
    for (; i + 16 <= in; i += 16) store_bf16x16(dst + i, _mm512_loadu_ps(src + i));
#endif
    for (; i < in; ++i) dst[i] = to_bf16(src[i]);
  }
}

// dst[t * dst_stride + j] = src[t * cols + j] widened from bfloat16 to float32 (exact: the bits shifted
// up), for t < rows, j < cols: the bf16 prefill's block product [T, n] into its columns of the float32
// output. torch's strided copy of the same ran at ~4 ns per element (17% of Qwen2.5-1.5B's prefill).
void bs_widen_bf16(const uint16_t* src, int64_t rows, int64_t cols, float* dst, int64_t dst_stride) {
  for (int64_t t = 0; t < rows; ++t) {
    const uint16_t* s = src + t * cols;
    float* d = dst + t * dst_stride;
    int64_t j = 0;
#if BS_SIMD == 512
    for (; j + 16 <= cols; j += 16) {
      const __m512i w = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)(s + j)));
      _mm512_storeu_ps(d + j, _mm512_castsi512_ps(_mm512_slli_epi32(w, 16)));
    }
#endif
    for (; j < cols; ++j) {
      const uint32_t u = (uint32_t)s[j] << 16;
      std::memcpy(d + j, &u, 4);
    }
  }
}

}  // extern "C"
