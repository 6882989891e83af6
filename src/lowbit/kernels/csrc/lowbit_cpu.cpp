// lowbit's CPU kernels for integer weights, reading the packed codes as they are stored.
//
// w[n, k] = (c[n, k] - z[n, g]) * s[n, g],  g = k / group, with the codes c in lowbit's
// LSB-first packing (4 bits: byte j holds c[2j] in its low nibble and c[2j+1] in its high
// one; 2 bits: four codes per byte; 8 bits: one per byte) and z the packed zero point
// (asymmetric) or 2^(bits-1) (symmetric).
//
// int_gemv_cpu, y[m, n] = sum_k x[m, k] w[n, k] for a few tokens (decode): no float weight is
// written. x is split once per call into the lanes of a packed byte (lane l of byte j is
// x[j * per_byte + l]) so that every code of a byte meets its x at the same index. With
// AVX-512 (F, BW, VL), 16 bytes per step are widened to 16 int32; 2/4-bit codes are mapped
// through a per-group 16-entry table of (c - z) * s with vpermps (the reference's float
// weights exactly); 8-bit ones are converted as (c - z) and the group's sum scaled once.
// Several rows and tokens are done per pass, so each x vector and each converted weight
// vector is reused from registers, and the weight bytes are prefetched ahead. Elsewhere a
// portable loop computes the same sums.
//
// dequant_cpu writes w itself (N, K) in one pass, bit for bit the reference's dequantise(),
// for prefill, where a GEMM on the float weight wins.
//
// Rows are split between threads with at::parallel_for.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <vector>
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#include <immintrin.h>
#define LOWBIT_AVX512 1
#endif

namespace lowbit {

// One packed weight: N rows of row_bytes codes, G groups of `group` columns per row.
template <typename S>
struct Packed {
  const uint8_t* q;
  int64_t row_bytes;
  const S* scale;        // (N, G)
  const uint8_t* zero;   // (N, zero_row_bytes) packed codes, or null: symmetric, offset 2^(bits-1)
  int64_t zero_row_bytes;
  int64_t K, G, group;
  int bits;

  int zero_code(int64_t n, int64_t g) const {
    if (!zero) return 1 << (bits - 1);
    const uint8_t* z = zero + n * zero_row_bytes;
    if (bits == 8) return z[g];
    if (bits == 4) return (z[g >> 1] >> ((g & 1) * 4)) & 15;
    return (z[g >> 2] >> ((g & 3) * 2)) & 3;
  }
  // the group's packed bytes [b0, b1) of a row (groups start on a byte boundary)
  int64_t first_byte(int64_t g) const { return g * group * bits / 8; }
  int64_t end_byte(int64_t g) const { return (std::min(K, (g + 1) * group) * bits + 7) / 8; }
};

// x (M, K) rearranged per token into the lanes of a packed byte: lanes[(m * per_byte + l) * L + j] =
// x[m, j * per_byte + l], zero past K; L is the row's byte count rounded up to 16.
struct Lanes {
  std::vector<float> data;
  int64_t L;
  int per_byte;
  Lanes(const float* x, int64_t M, int64_t K, int64_t row_bytes, int bits)
      : L((row_bytes + 15) / 16 * 16), per_byte(8 / bits) {
    data.assign(M * per_byte * L, 0.0f);
    switch (per_byte) {  // a constant divisor: this runs on every call
      case 1: split<1>(x, M, K); break;
      case 2: split<2>(x, M, K); break;
      default: split<4>(x, M, K);
    }
  }
  template <int PER>
  void split(const float* x, int64_t M, int64_t K) {
    for (int64_t m = 0; m < M; ++m)
      for (int64_t k = 0; k < K; ++k) data[(m * PER + k % PER) * L + k / PER] = x[m * K + k];
  }
  const float* at(int64_t m, int lane) const { return data.data() + (m * per_byte + lane) * L; }
};

// x (M, K), K a multiple of 8, for the 4-bit word path (`block_nib`): per token, lane q holds
// x[8d + q] for every 32-bit word d of a row, zero past the row; and the sum of x over each
// group of `group` columns.
struct Words {
  std::vector<float> data, sums;
  int64_t D, G;
  Words(const float* x, int64_t M, int64_t K, int64_t group) : D((K / 8 + 15) / 16 * 16), G((K + group - 1) / group) {
    data.assign(M * 8 * D, 0.0f);
    sums.assign(M * G, 0.0f);
    for (int64_t m = 0; m < M; ++m)
      for (int64_t k = 0; k < K; ++k) {
        data[(m * 8 + k % 8) * D + k / 8] = x[m * K + k];
        sums[m * G + k / group] += x[m * K + k];
      }
  }
  const float* at(int64_t m, int q) const { return data.data() + (m * 8 + q) * D; }
  float group_sum(int64_t m, int64_t g) const { return sums[m * G + g]; }
};

template <typename S>
inline float scale_at(const Packed<S>& w, int64_t n, int64_t g) { return static_cast<float>(w.scale[n * w.G + g]); }

// Portable path: per group and lane of a byte, sum (c - z) x, then scale by s.
template <typename S>
void rows_portable(const Packed<S>& w, const Lanes& xl, int64_t M, float* y, int64_t N, int64_t n0, int64_t n1) {
  const int per_byte = 8 / w.bits, mask = (1 << w.bits) - 1;
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* qrow = w.q + n * w.row_bytes;
    for (int64_t m = 0; m < M; ++m) {
      float total = 0.0f;
      for (int64_t g = 0; g < w.G; ++g) {
        const int64_t b0 = w.first_byte(g), b1 = w.end_byte(g);
        const float s = scale_at(w, n, g);
        const int z = w.zero_code(n, g);
        float acc = 0.0f;
        for (int lane = 0; lane < per_byte; ++lane) {
          const float* xv = xl.at(m, lane);
          const int shift = lane * w.bits;
          float part = 0.0f;
#pragma omp simd reduction(+ : part)
          for (int64_t b = b0; b < b1; ++b) part += xv[b] * static_cast<float>(((qrow[b] >> shift) & mask) - z);
          acc += part;
        }
        total += s * acc;
      }
      y[m * N + n] = total;
    }
  }
}

#ifdef LOWBIT_AVX512
inline __mmask16 tail_mask(int64_t left) { return left >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << left) - 1); }

// The hardware prefetchers stop at 4 KiB pages and the weights stream from DRAM once per
// token: ask for the bytes this far ahead (a cache line per 64 bytes read); on this
// project's 2-core machine this doubled the GEMV's speed at M = 1.
constexpr int64_t kPrefetchBytes = 4096;
inline void prefetch(const uint8_t* p) { _mm_prefetch(reinterpret_cast<const char*>(p + kPrefetchBytes), _MM_HINT_T0); }

// 2/4 bits: 16 packed bytes widened to 16 int32 lanes; a lane's code c sits in bits
// [shift, shift + bits) and vpermps, which reads an index's low 4 bits, maps it through a
// 16-entry table holding (c - z) * s for every pattern of those bits.
// R rows × T tokens per pass, so each converted weight vector is used T times and each
// x vector R times.
template <int R, int T, int BITS, typename S>
void block_lut(const Packed<S>& w, const Lanes& xl, int64_t m0, float* y, int64_t N, int64_t n) {
  constexpr int PER = 8 / BITS;
  __m512 acc[R][T];
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < T; ++t) acc[r][t] = _mm512_setzero_ps();
  const __m512i iota = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
  const __m512 codes = _mm512_cvtepi32_ps(_mm512_and_si512(iota, _mm512_set1_epi32((1 << BITS) - 1)));
  for (int64_t g = 0; g < w.G; ++g) {
    const int64_t b0 = w.first_byte(g), b1 = w.end_byte(g);
    __m512 lut[R];
    for (int r = 0; r < R; ++r)
      lut[r] = _mm512_mul_ps(_mm512_sub_ps(codes, _mm512_set1_ps(static_cast<float>(w.zero_code(n + r, g)))),
                             _mm512_set1_ps(scale_at(w, n + r, g)));
    for (int64_t b = b0; b < b1; b += 16) {
      const __mmask16 k = tail_mask(b1 - b);
      __m512 xv[T][PER];
      for (int t = 0; t < T; ++t)
        for (int l = 0; l < PER; ++l) xv[t][l] = _mm512_maskz_loadu_ps(k, xl.at(m0 + t, l) + b);
      for (int r = 0; r < R; ++r) {
        const uint8_t* p = w.q + (n + r) * w.row_bytes + b;
        if (((b - b0) & 63) == 0) prefetch(p);
        const __m512i c = _mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(k, p));
        for (int l = 0; l < PER; ++l) {
          const __m512 wv = _mm512_permutexvar_ps(l ? _mm512_srli_epi32(c, l * BITS) : c, lut[r]);
          for (int t = 0; t < T; ++t) acc[r][t] = _mm512_fmadd_ps(wv, xv[t][l], acc[r][t]);
        }
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < T; ++t) y[(m0 + t) * N + n + r] = _mm512_reduce_add_ps(acc[r][t]);
}

// 8 bits: (c - z) widened to float per code, summed against x per group, then scaled.
template <int R, int T, typename S>
void block_int8(const Packed<S>& w, const Lanes& xl, int64_t m0, float* y, int64_t N, int64_t n) {
  __m512 acc[R][T];
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < T; ++t) acc[r][t] = _mm512_setzero_ps();
  for (int64_t g = 0; g < w.G; ++g) {
    const int64_t b0 = w.first_byte(g), b1 = w.end_byte(g);
    __m512i z[R];
    __m512 part[R][T];
    for (int r = 0; r < R; ++r) {
      z[r] = _mm512_set1_epi32(w.zero_code(n + r, g));
      for (int t = 0; t < T; ++t) part[r][t] = _mm512_setzero_ps();
    }
    for (int64_t b = b0; b < b1; b += 16) {
      const __mmask16 k = tail_mask(b1 - b);
      __m512 xv[T];
      for (int t = 0; t < T; ++t) xv[t] = _mm512_maskz_loadu_ps(k, xl.at(m0 + t, 0) + b);
      for (int r = 0; r < R; ++r) {
        const uint8_t* p = w.q + (n + r) * w.row_bytes + b;
        if (((b - b0) & 63) == 0) prefetch(p);
        const __m512i c = _mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(k, p));
        const __m512 wv = _mm512_cvtepi32_ps(_mm512_sub_epi32(c, z[r]));
        for (int t = 0; t < T; ++t) part[r][t] = _mm512_fmadd_ps(wv, xv[t], part[r][t]);
      }
    }
    for (int r = 0; r < R; ++r) {
      const __m512 s = _mm512_set1_ps(scale_at(w, n + r, g));
      for (int t = 0; t < T; ++t) acc[r][t] = _mm512_fmadd_ps(part[r][t], s, acc[r][t]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < T; ++t) y[(m0 + t) * N + n + r] = _mm512_reduce_add_ps(acc[r][t]);
}

// 4 bits, groups of a multiple of 8 columns (so every group starts on a 32-bit word): the
// codes are read 16 words (128 codes) at a time and code q of each word (bits 4q..4q+3,
// column 8d + q of word d) is isolated with a shift and a mask, converted, and multiplied
// with x8 lane q (x[8d + q]): no shuffle, which this loop is otherwise bound by. The sum
// runs over the raw codes c; the group's zero point comes off once per group as
// z * sum(x over the group), then the group's scale multiplies:
//   sum_k (c - z) s x = s (sum_k c x - z sum_k x).
template <int R, int T, typename S>
void block_nib(const Packed<S>& w, const Words& xw, int64_t m0, float* y, int64_t N, int64_t n) {
  __m512 acc[R][T];
  float corr[R][T];
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < T; ++t) acc[r][t] = _mm512_setzero_ps(), corr[r][t] = 0.0f;
  const __m512i nib = _mm512_set1_epi32(15);
  for (int64_t g = 0; g < w.G; ++g) {
    const int64_t d0 = g * w.group / 8, d1 = std::min(w.K, (g + 1) * w.group) / 8;
    __m512 part[R][T];
    for (int r = 0; r < R; ++r)
      for (int t = 0; t < T; ++t) part[r][t] = _mm512_setzero_ps();
    for (int64_t d = d0; d < d1; d += 16) {
      const __mmask16 k = tail_mask(d1 - d);
      __m512i v[R];
      for (int r = 0; r < R; ++r) {
        const uint8_t* p = w.q + (n + r) * w.row_bytes + 4 * d;
        prefetch(p);
        v[r] = _mm512_maskz_loadu_epi32(k, p);
      }
#define LOWBIT_NIB_LANE(Q)                                                                          \
      {                                                                                            \
        __m512 xv[T];                                                                              \
        for (int t = 0; t < T; ++t) xv[t] = _mm512_maskz_loadu_ps(k, xw.at(m0 + t, Q) + d);       \
        for (int r = 0; r < R; ++r) {                                                              \
          __m512i c = (Q) ? _mm512_srli_epi32(v[r], 4 * (Q)) : v[r];                               \
          if ((Q) < 7) c = _mm512_and_si512(c, nib);                                               \
          const __m512 wv = _mm512_cvtepi32_ps(c);                                                 \
          for (int t = 0; t < T; ++t) part[r][t] = _mm512_fmadd_ps(wv, xv[t], part[r][t]);         \
        }                                                                                          \
      }
      LOWBIT_NIB_LANE(0) LOWBIT_NIB_LANE(1) LOWBIT_NIB_LANE(2) LOWBIT_NIB_LANE(3)
      LOWBIT_NIB_LANE(4) LOWBIT_NIB_LANE(5) LOWBIT_NIB_LANE(6) LOWBIT_NIB_LANE(7)
#undef LOWBIT_NIB_LANE
    }
    for (int r = 0; r < R; ++r) {
      const float s = scale_at(w, n + r, g), sz = s * static_cast<float>(w.zero_code(n + r, g));
      const __m512 sv = _mm512_set1_ps(s);
      for (int t = 0; t < T; ++t) {
        acc[r][t] = _mm512_fmadd_ps(part[r][t], sv, acc[r][t]);
        corr[r][t] += sz * xw.group_sum(m0 + t, g);
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < T; ++t) y[(m0 + t) * N + n + r] = _mm512_reduce_add_ps(acc[r][t]) - corr[r][t];
}

// The two ways to do R rows × T tokens, by the layout x was rearranged into (`Lanes` or `Words`).
struct ByteBlocks {
  template <int R, int T, typename S>
  static void run(const Packed<S>& w, const Lanes& xl, int64_t m0, float* y, int64_t N, int64_t n) {
    switch (w.bits) {
      case 2: block_lut<R, T, 2>(w, xl, m0, y, N, n); break;
      case 4: block_lut<R, T, 4>(w, xl, m0, y, N, n); break;
      default: block_int8<R, T>(w, xl, m0, y, N, n);
    }
  }
};

struct WordBlocks {
  template <int R, int T, typename S>
  static void run(const Packed<S>& w, const Words& xw, int64_t m0, float* y, int64_t N, int64_t n) {
    block_nib<R, T>(w, xw, m0, y, N, n);
  }
};

// rows [n0, n1) for tokens [m0, m0 + T): blocks of R rows, then single rows
template <class B, int R, int T, typename S, typename X>
void rows_t(const Packed<S>& w, const X& x, int64_t m0, float* y, int64_t N, int64_t n0, int64_t n1) {
  int64_t n = n0;
  for (; n + R <= n1; n += R) B::template run<R, T>(w, x, m0, y, N, n);
  for (; n < n1; ++n) B::template run<1, T>(w, x, m0, y, N, n);
}

// rows [n0, n1) for all M tokens: four at a time, then the rest (one token: four rows per pass)
template <class B, typename S, typename X>
void rows_avx512(const Packed<S>& w, const X& x, int64_t M, float* y, int64_t N, int64_t n0, int64_t n1) {
  int64_t m = 0;
  for (; m + 4 <= M; m += 4) rows_t<B, 2, 4>(w, x, m, y, N, n0, n1);
  switch (M - m) {
    case 3: rows_t<B, 2, 3>(w, x, m, y, N, n0, n1); break;
    case 2: rows_t<B, 2, 2>(w, x, m, y, N, n0, n1); break;
    case 1: rows_t<B, 4, 1>(w, x, m, y, N, n0, n1); break;
  }
}
#endif

// y (M, N) = x (M, K) @ dequant(w).T for rows [n0, n1)
template <typename S>
void gemv_rows(const Packed<S>& w, const Lanes& xl, int64_t M, float* y, int64_t N, int64_t n0, int64_t n1) {
#ifdef LOWBIT_AVX512
  rows_avx512<ByteBlocks>(w, xl, M, y, N, n0, n1);
#else
  rows_portable(w, xl, M, y, N, n0, n1);
#endif
}


// w[n, :] = (c - z) * s for rows [n0, n1), written to out (N, K): the reference's float weights
template <int BITS, typename S>
void dequant_rows_bits(const Packed<S>& w, float* out, int64_t n0, int64_t n1) {
  constexpr int PER = 8 / BITS, MASK = (1 << BITS) - 1;
  float lut[MASK + 1];
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* qrow = w.q + n * w.row_bytes;
    float* orow = out + n * w.K;
    for (int64_t g = 0; g < w.G; ++g) {
      const int64_t k0 = g * w.group, k1 = std::min(w.K, k0 + w.group);
      const float s = scale_at(w, n, g), z = static_cast<float>(w.zero_code(n, g));
      if constexpr (BITS == 8) {
        for (int64_t k = k0; k < k1; ++k) orow[k] = (static_cast<float>(qrow[k]) - z) * s;
      } else {
        for (int c = 0; c <= MASK; ++c) lut[c] = (static_cast<float>(c) - z) * s;
        int64_t k = k0;
#ifdef LOWBIT_AVX512
        if constexpr (BITS == 4) {  // 16 bytes: low and high nibbles looked up, then interleaved
          const __m512 table = _mm512_loadu_ps(lut);
          const __m512i first = _mm512_set_epi32(23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
          const __m512i second = _mm512_add_epi32(first, _mm512_set1_epi32(8));
          for (; k < k1; k += 32) {
            const int64_t left = k1 - k;
            const __m512i c = _mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(tail_mask((left + 1) / 2), qrow + k / 2));
            const __m512 lo = _mm512_permutexvar_ps(c, table);
            const __m512 hi = _mm512_permutexvar_ps(_mm512_srli_epi32(c, 4), table);
            _mm512_mask_storeu_ps(orow + k, tail_mask(left), _mm512_permutex2var_ps(lo, first, hi));
            if (left > 16) {
              _mm512_mask_storeu_ps(orow + k + 16, tail_mask(left - 16), _mm512_permutex2var_ps(lo, second, hi));
            }
          }
        }
#endif
        for (; k + PER <= k1; k += PER) {  // whole bytes (a group starts on one)
          const int byte = qrow[k / PER];
          for (int l = 0; l < PER; ++l) orow[k + l] = lut[(byte >> (l * BITS)) & MASK];
        }
        for (; k < k1; ++k) orow[k] = lut[(qrow[k / PER] >> ((k % PER) * BITS)) & MASK];
      }
    }
  }
}

template <typename S>
void dequant_rows(const Packed<S>& w, float* out, int64_t n0, int64_t n1) {
  switch (w.bits) {
    case 2: dequant_rows_bits<2>(w, out, n0, n1); break;
    case 4: dequant_rows_bits<4>(w, out, n0, n1); break;
    default: dequant_rows_bits<8>(w, out, n0, n1);
  }
}

}  // namespace lowbit

namespace {

// rows per at::parallel_for task: enough bytes that waking a second thread pays off
int64_t grain_rows(int64_t row_bytes, int64_t M) {
  constexpr int64_t kBytesPerTask = 16384;
  return std::max<int64_t>(4, kBytesPerTask / std::max<int64_t>(1, row_bytes * M));
}

// The stored tensors of an (N, K) weight, checked against each other.
struct Weight {
  at::Tensor q, scale, zero;  // zero undefined for symmetric codes
  int64_t N, K, G, group;
  int bits;

  template <typename S>
  lowbit::Packed<S> packed() const {
    const bool asym = zero.defined();
    return {q.data_ptr<uint8_t>(), q.size(1), scale.data_ptr<S>(), asym ? zero.data_ptr<uint8_t>() : nullptr,
            asym ? zero.size(1) : 0, K, G, group, bits};
  }
};

// qdata (N, ceil(K * bits / 8)) uint8; scale (N, G) float16/bfloat16/float32, G = ceil(K / group);
// zero_point (N, ceil(G * bits / 8)) uint8 packed at `bits`, or none for symmetric codes.
Weight check_weight(const at::Tensor& qdata, const at::Tensor& scale, const std::optional<at::Tensor>& zero_point,
                    int64_t bits, int64_t group, int64_t K, int64_t N) {
  TORCH_CHECK(bits == 2 || bits == 4 || bits == 8, "lowbit CPU kernels: bits must be 2, 4 or 8");
  TORCH_CHECK(group > 0 && (group % (8 / bits) == 0 || group >= K),
              "lowbit CPU kernels: groups must fill whole bytes");
  TORCH_CHECK(qdata.dim() == 2 && qdata.scalar_type() == at::kByte && qdata.size(0) == N &&
                  qdata.size(1) == (K * bits + 7) / 8,
              "lowbit CPU kernels: qdata must be (N, ceil(K * bits / 8)) uint8");
  const int64_t G = (K + group - 1) / group;
  TORCH_CHECK(scale.dim() == 2 && scale.size(0) == N && scale.size(1) == G,
              "lowbit CPU kernels: scale must be (N, ceil(K / group))");
  Weight w{qdata.contiguous(), scale.contiguous(), at::Tensor(), N, K, G, group, static_cast<int>(bits)};
  if (zero_point.has_value() && zero_point->defined()) {
    const at::Tensor& z = *zero_point;
    TORCH_CHECK(z.dim() == 2 && z.scalar_type() == at::kByte && z.size(0) == N && z.size(1) == (G * bits + 7) / 8,
                "lowbit CPU kernels: zero_point must be (N, ceil(G * bits / 8)) uint8");
    w.zero = z.contiguous();
  }
  return w;
}

// y (..., N) = x (..., K) @ dequant(W).T for float32 x, with a few tokens M = x.numel() / K in mind.
at::Tensor int_gemv_cpu(const at::Tensor& x, const at::Tensor& qdata, const at::Tensor& scale,
                        const std::optional<at::Tensor>& zero_point, int64_t bits, int64_t group,
                        int64_t out_features) {
  TORCH_CHECK(x.dim() >= 1 && x.scalar_type() == at::kFloat, "int_gemv_cpu: x must be float32 (..., K)");
  const int64_t K = x.size(-1), M = K ? x.numel() / K : 0, N = out_features;
  const Weight wt = check_weight(qdata, scale, zero_point, bits, group, K, N);
  auto sizes = x.sizes().vec();
  sizes.back() = N;
  at::Tensor y = at::empty(sizes, x.options());
  if (M == 0 || N == 0) return y;
  const at::Tensor xc = x.contiguous();
  float* out = y.data_ptr<float>();
#ifdef LOWBIT_AVX512
  if (wt.bits == 4 && wt.group % 8 == 0 && K % 8 == 0) {
    const lowbit::Words words(xc.data_ptr<float>(), M, K, wt.group);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, wt.scale.scalar_type(), "int_gemv_cpu", [&] {
      const auto w = wt.packed<scalar_t>();
      at::parallel_for(0, N, grain_rows(wt.q.size(1), M),
                       [&](int64_t n0, int64_t n1) {
                         lowbit::rows_avx512<lowbit::WordBlocks>(w, words, M, out, N, n0, n1);
                       });
    });
    return y;
  }
#endif
  const lowbit::Lanes lanes(xc.data_ptr<float>(), M, K, wt.q.size(1), wt.bits);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, wt.scale.scalar_type(), "int_gemv_cpu", [&] {
    const auto w = wt.packed<scalar_t>();
    at::parallel_for(0, N, grain_rows(wt.q.size(1), M),
                     [&](int64_t n0, int64_t n1) { lowbit::gemv_rows(w, lanes, M, out, N, n0, n1); });
  });
  return y;
}

// The float weight (N, K) that the packed codes stand for, as the reference dequantises it.
at::Tensor dequant_cpu(const at::Tensor& qdata, const at::Tensor& scale, const std::optional<at::Tensor>& zero_point,
                       int64_t bits, int64_t group, int64_t in_features) {
  const Weight wt = check_weight(qdata, scale, zero_point, bits, group, in_features, qdata.size(0));
  at::Tensor out = at::empty({wt.N, wt.K}, scale.options().dtype(at::kFloat));
  float* o = out.data_ptr<float>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, wt.scale.scalar_type(), "dequant_cpu", [&] {
    const auto w = wt.packed<scalar_t>();
    at::parallel_for(0, wt.N, grain_rows(wt.q.size(1), 1),
                     [&](int64_t n0, int64_t n1) { lowbit::dequant_rows(w, o, n0, n1); });
  });
  return out;
}

}  // namespace

// The schemas are defined in Python (lowbit/kernels/cpu.py), with their fake implementations.
TORCH_LIBRARY_IMPL(lowbit, CPU, m) {
  m.impl("int_gemv_cpu", &int_gemv_cpu);
  m.impl("dequant_cpu", &dequant_cpu);
}
