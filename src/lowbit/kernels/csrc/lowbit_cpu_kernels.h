// lowbit's CPU kernels for integer weights, reading the packed codes as they are stored.
//
// w[n, k] = (c[n, k] - z[n, g]) * s[n, g],  g = k / group, with the codes c in lowbit's
// LSB-first packing (4 bits: byte j holds c[2j] in its low nibble and c[2j+1] in its high
// one; 2 bits: four codes per byte; 8 bits: one per byte; 3 bits: eight codes in every three
// bytes, code 8d + q in bits 3q..3q+2 of the 24-bit little-endian "triple" d) and z the packed
// zero point (asymmetric) or 2^(bits-1) (symmetric). For a 4-bit lookup format (NF4, FP4) a
// 16-entry table of levels replaces the affine map: w[n, k] = levels[c[n, k]] * s[n, g].
// Scales are float16, bfloat16 or float32, or QLoRA's double-quantised int8 codes e with a
// float32 scale b per block of 256 and one offset o: s = max(e * b + o, FLT_MIN), decoded
// where it is used, as lowbit's Python decodes it (mul, then add: built without contraction).
//
// int_gemv_cpu, y[m, n] = sum_k x[m, k] w[n, k] for a few tokens (decode): no float weight is
// written. x is split once per call into the lanes of a packed byte (lane l of byte j is
// x[j * per_byte + l]) so that every code of a byte meets its x at the same index. With
// AVX-512 (F, BW, VL), 16 bytes per step are widened to 16 int32; 2/4-bit codes are mapped
// through a per-group 16-entry table of (c - z) * s with vpermps (the reference's float
// weights exactly); 8-bit ones are converted as (c - z) and the group's sum scaled once.
// Several rows and tokens are done per pass, so each x vector and each converted weight
// vector is reused from registers, and the weight bytes are prefetched ahead. Elsewhere a
// portable loop computes the same sums. 4-bit affine codes in groups of 32, 64 or a multiple
// of 128 columns (or per channel) are multiplied in integers where AVX-512 VNNI is built in:
// each token's x as block floating point (23 bits and a sign) in three byte planes, against
// the codes by vpdpbusd, each row's codes split once for all tokens (`Planes`, `block_vnni`;
// LOWBIT_CPU_FLOAT_GEMV=1 keeps the float path).
//
// x86 CPUs with AVX2 and FMA but no AVX-512 (AMD Zen 2/3, Intel's client CPUs) get 8-lane versions of the float
// kernels instead of the portable loops: 4- and 3-bit words, 8-bit bytes, 2/4-bit lookup tables (NF4, FP4, int2)
// and act-order rows, for the GEMV (`block_words2` and the rest), and for the dequantise act-order rows and 8 codes
// a step looked up in the group's table by lane permutes (`dequant_rows_bits`).
//
// 3-bit codes need K and the group to be multiples of 8 (whole triples per group).
//
// Act-order weights (GPTQ's desc_act) carry g_idx, the group of each column, so a group's
// columns lie anywhere in the row: g = g_idx[k]. Both ops take it:
//   y = sum_k value(c) s[g_idx[k]] x[k],  value(c) = c - z[g_idx[k]] or levels[c].
// The GEMV puts 16 rows in the 16 lanes (a block of rows' words loaded and transposed in
// registers), so a column's zero points and scales for those rows are a load each from the
// block's tables transposed to (G, 16), whatever G is, and x[k] is a broadcast. The
// dequantise reads codes in column order with byte permutes (AVX-512 VBMI) and fetches each
// column's scale by permutes of the row's table held in registers up to 128 groups, a gather above.
//
// dequant_cpu writes w itself (N, K) in one pass, bit for bit the reference's dequantise().
// dequant_linear_cpu is prefill, where a GEMM on float weights wins: F.linear on the weight
// dequantised a block of rows at a time, the blocks shared out between the threads, each thread
// dequantising its own into a workspace it keeps and multiplying it while it is in cache (for
// one block, the whole weight: the reference's own call).
//
// float_gemv_cpu is the same few-token GEMV for a weight kept in float32, bfloat16 or float16
// (a quantised model's tied output projection; `float_gemv`).
//
// Rows are split between threads with at::parallel_for (by the ops, lowbit_cpu.cpp).
//
// The kernels are templates on the scales' type S. Their entry points for each S (`LOWBIT_KERNELS`) are compiled in
// lowbit_cpu_scales16.cpp (float16, bfloat16) and lowbit_cpu_scales32.cpp (float32, int8), declared extern in
// lowbit_cpu.cpp: three translation units that the first build compiles side by side (one took 83 s on this
// project's 2-core AVX2 machine).
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <type_traits>
#include <utility>
#include <optional>
#include <vector>
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#include <immintrin.h>
#define LOWBIT_AVX512 1
#if defined(__AVX512VBMI__)
#define LOWBIT_VBMI 1  // byte permutes: act-order's column-order decode
#endif
#if defined(__AVX512VNNI__)
#define LOWBIT_VNNI 1  // byte dot products: the 4-bit decode GEMV in integers (`block_vnni`)
#endif
#elif defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define LOWBIT_AVX2 1  // x86 without AVX-512 (AMD Zen 2/3, Intel's client CPUs): 8-lane kernels for 4- and 8-bit codes
#endif

// Before a loop over an array of vector registers (rows R, tokens T, lanes PER: compile-time counts). GCC keeps
// such an array in registers only if the loops that index it are unrolled before it decides, and without this it
// kept the accumulators of the R × T kernels on the stack, a store per multiply-add (seen in the assembly,
// 2026-11-28); the arithmetic is the same either way.
#define LOWBIT_UNROLL _Pragma("GCC unroll 16")

namespace lowbit {

// fn.template operator()<T>(m0) over the tokens [0, M): passes of T = 4, then one of the 3, 2 or 1 left (the
// kernels' token counts are compile-time, so that their R × T sums stay in registers)
template <typename Fn>
inline void token_passes(int64_t M, Fn&& fn) {
  int64_t m = 0;
  for (; m + 4 <= M; m += 4) fn.template operator()<4>(m);
  switch (M - m) {
    case 3: fn.template operator()<3>(m); break;
    case 2: fn.template operator()<2>(m); break;
    case 1: fn.template operator()<1>(m); break;
    default: break;
  }
}

// Code k of a row of any width (2, 3, 4 or 8 bits, LSB first; a 3-bit code may straddle two bytes),
// reading no byte past the row.
inline int code_at(const uint8_t* row, int64_t row_bytes, int64_t k, int bits) {
  const int64_t bit = k * bits, byte = bit >> 3;
  const int pair = row[byte] | (byte + 1 < row_bytes ? row[byte + 1] << 8 : 0);
  return (pair >> (bit & 7)) & ((1 << bits) - 1);
}

// One packed weight: N rows of row_bytes codes, G groups of `group` columns per row.
template <typename S>
struct Packed {
  const uint8_t* q;
  int64_t row_bytes;
  const S* scale;        // (N, G); int8 codes when the scales are double-quantised
  const float* block_scale;  // double-quantised: per 256 scales (else unused)
  float scale_offset;
  const uint8_t* zero;   // (N, zero_row_bytes) packed codes, or null: symmetric, offset 2^(bits-1)
  int64_t zero_row_bytes;
  int64_t K, G, group;
  int bits;
  const float* levels;   // 16 levels of a lookup format (4 bits, no zero point), or null: affine codes
  const int32_t* g_idx;  // (K,) the group of each column (act-order), or null: g = k / group

  int zero_code(int64_t n, int64_t g) const {  // zero points are packed as the codes are
    return zero ? code_at(zero + n * zero_row_bytes, zero_row_bytes, g, bits) : 1 << (bits - 1);
  }
  // table[c] = value(c) * s for the 2^bits codes (bits <= 4) of group g of row n, where value(c) is c - z
  // or levels[c]: the weights a group's codes stand for, the zero point read once
  void fill_table(int64_t n, int64_t g, float s, float* table) const {
    const float z = levels ? 0.0f : static_cast<float>(zero_code(n, g));
    for (int c = 0; c < (1 << bits); ++c) table[c] = (levels ? levels[c] : static_cast<float>(c) - z) * s;
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
    data.assign(M * per_byte * L + 8, 0.0f);  // + 8: a step of 8 lanes may start at any byte before L
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

// x (M, K), K a multiple of 8, for the 3- and 4-bit word path (`block_words`): per token, lane q holds
// x[8d + q] for every 32-bit word d of a row, zero past the row; and the sum of x over each
// group of `group` columns, and over each word's 8.
struct Words {
  std::vector<float> data, sums, word_sums;
  int64_t D, G;
  Words(const float* x, int64_t M, int64_t K, int64_t group) : D((K / 8 + 15) / 16 * 16), G((K + group - 1) / group) {
    data.assign(M * 8 * D + 8, 0.0f);  // + 8: a step of 8 lanes may start at any word before D
    sums.assign(M * G, 0.0f);
    word_sums.assign(M * D, 0.0f);
    for (int64_t m = 0; m < M; ++m) {  // (no division per column: this runs on every call, ~2 µs for 576 columns)
      const float* xm = x + m * K;
      float* lanes = data.data() + m * 8 * D;
      for (int64_t d = 0; d < K / 8; ++d) {
        float sum = 0.0f;
        for (int q = 0; q < 8; ++q) lanes[q * D + d] = xm[8 * d + q], sum += xm[8 * d + q];
        word_sums[m * D + d] = sum;
      }
      for (int64_t g = 0; g < G; ++g) {
        float sum = 0.0f;
        for (int64_t k = g * group; k < std::min(K, (g + 1) * group); ++k) sum += xm[k];
        sums[m * G + g] = sum;
      }
    }
  }
  const float* at(int64_t m, int q) const { return data.data() + (m * 8 + q) * D; }
  float group_sum(int64_t m, int64_t g) const { return sums[m * G + g]; }
  // sum of x over the 8 columns of word d, for words d.. (zero past the row)
  const float* word_sum(int64_t m) const { return word_sums.data() + m * D; }
};

template <typename S>
inline float scale_at(const Packed<S>& w, int64_t n, int64_t g) {
  const int64_t i = n * w.G + g;
  if constexpr (std::is_same_v<S, int8_t>) {
    constexpr int64_t kBlock = 256;  // lowbit.tensor.DOUBLE_QUANT_BLOCK
    const float product = static_cast<float>(w.scale[i]) * w.block_scale[i / kBlock];
    return std::max(product + w.scale_offset, std::numeric_limits<float>::min());
  } else {
    return static_cast<float>(w.scale[i]);
  }
}

// Row n's G scales as float32 into s and its zero points into z (0 for a lookup format), for act-order's
// lookups by column.
template <typename S>
void row_tables(const Packed<S>& w, int64_t n, float* s, float* z) {
  for (int64_t g = 0; g < w.G; ++g) {
    s[g] = scale_at(w, n, g);
    z[g] = w.levels ? 0.0f : static_cast<float>(w.zero_code(n, g));
  }
}

// The weight of column k of an act-order row (scalar): (c - z) s or levels[c] s, g = g_idx[k], from the
// row's `row_tables`, as the reference computes it.
template <typename S>
inline float scattered_weight(const Packed<S>& w, const uint8_t* qrow, int64_t k, const float* s, const float* z) {
  const int c = code_at(qrow, w.row_bytes, k, w.bits);
  const int64_t g = w.g_idx[k];
  return (w.levels ? w.levels[c] : static_cast<float>(c) - z[g]) * s[g];
}

// Portable path: per group and lane of a byte, sum value(c) x, then scale by s.
template <typename S>
void rows_portable(const Packed<S>& w, const Lanes& xl, int64_t M, float* y, int64_t N, int64_t n0, int64_t n1) {
  const int per_byte = 8 / w.bits, mask = (1 << w.bits) - 1;
  float table[16];  // value(c) of this group, for 2 and 4 bits
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* qrow = w.q + n * w.row_bytes;
    for (int64_t m = 0; m < M; ++m) {
      float total = 0.0f;
      for (int64_t g = 0; g < w.G; ++g) {
        const int64_t b0 = w.first_byte(g), b1 = w.end_byte(g);
        const float s = scale_at(w, n, g);
        const int z = w.zero_code(n, g);
        if (w.bits < 8) w.fill_table(n, g, 1.0f, table);
        float acc = 0.0f;
        for (int lane = 0; lane < per_byte; ++lane) {
          const float* xv = xl.at(m, lane);
          const int shift = lane * w.bits;
          float part = 0.0f;
          if (w.bits == 8) {
#pragma omp simd reduction(+ : part)
            for (int64_t b = b0; b < b1; ++b) part += xv[b] * static_cast<float>(qrow[b] - z);
          } else {
            for (int64_t b = b0; b < b1; ++b) part += xv[b] * table[(qrow[b] >> shift) & mask];
          }
          acc += part;
        }
        total += s * acc;
      }
      y[m * N + n] = total;
    }
  }
}

// The 24-bit triple d of a 3-bit row: codes 8d .. 8d + 7.
inline uint32_t triple(const uint8_t* row, int64_t d) {
  const uint8_t* p = row + 3 * d;
  return p[0] | (p[1] << 8) | (p[2] << 16);
}

// Portable 3-bit path, x in the `Words` layout: per group, sum c x over the raw codes, then
// s (sum c x - z sum x), as `block_words` does.
template <typename S>
void rows_portable_tri(const Packed<S>& w, const Words& xw, int64_t M, float* y, int64_t N, int64_t n0, int64_t n1) {
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* qrow = w.q + n * w.row_bytes;
    for (int64_t m = 0; m < M; ++m) {
      float total = 0.0f;
      for (int64_t g = 0; g < w.G; ++g) {
        const int64_t d0 = g * w.group / 8, d1 = std::min(w.K, (g + 1) * w.group) / 8;
        float acc = 0.0f;
        for (int64_t d = d0; d < d1; ++d) {
          const uint32_t v = triple(qrow, d);
          for (int q = 0; q < 8; ++q) acc += xw.at(m, q)[d] * static_cast<float>((v >> (3 * q)) & 7);
        }
        total += scale_at(w, n, g) * (acc - static_cast<float>(w.zero_code(n, g)) * xw.group_sum(m, g));
      }
      y[m * N + n] = total;
    }
  }
}

// Portable act-order path: sum_k (c - z[g]) s[g] x[k] (or levels[c] s[g] x[k]), g = g_idx[k].
template <typename S>
void rows_portable_scattered(const Packed<S>& w, const float* x, int64_t M, float* y, int64_t N, int64_t n0,
                             int64_t n1) {
  std::vector<float> s(w.G), z(w.G);
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* qrow = w.q + n * w.row_bytes;
    row_tables(w, n, s.data(), z.data());
    for (int64_t m = 0; m < M; ++m) {
      float total = 0.0f;
      for (int64_t k = 0; k < w.K; ++k) total += scattered_weight(w, qrow, k, s.data(), z.data()) * x[m * w.K + k];
      y[m * N + n] = total;
    }
  }
}

#if defined(LOWBIT_AVX512) || defined(LOWBIT_AVX2)
// The hardware prefetchers stop at 4 KiB pages and the weights stream from DRAM once per
// token: ask for the bytes this far ahead (a cache line per 64 bytes read); on this
// project's 2-core machine this doubled the GEMV's speed at M = 1.
constexpr int64_t kPrefetchBytes = 4096;
inline void prefetch(const uint8_t* p) { _mm_prefetch(reinterpret_cast<const char*>(p + kPrefetchBytes), _MM_HINT_T0); }

// rows [n0, n1) for tokens [m0, m0 + T): blocks of R rows, then single rows
template <class B, int R, int T, typename S, typename X>
void rows_t(const Packed<S>& w, const X& x, int64_t m0, float* y, int64_t N, int64_t n0, int64_t n1) {
  int64_t n = n0;
  for (; n + R <= n1; n += R) B::template run<R, T>(w, x, m0, y, N, n);
  for (; n < n1; ++n) B::template run<1, T>(w, x, m0, y, N, n);
}
#endif

#ifdef LOWBIT_AVX512
inline __mmask16 tail_mask(int64_t left) { return left >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << left) - 1); }

// lane j holds j >> shift: the group of word j in a 16-word step whose groups are 2^shift words each
inline __m512i lane_groups(int shift) {
  return _mm512_srli_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0), shift);
}

// 2/4 bits: 16 packed bytes widened to 16 int32 lanes; a lane's code c sits in bits
// [shift, shift + bits) and vpermps, which reads an index's low 4 bits, maps it through a
// 16-entry table holding value(c) * s ((c - z) * s, or levels[c] * s) for every pattern of
// those bits.
// R rows × T tokens per pass, so each converted weight vector is used T times and each
// x vector R times.
template <int R, int T, int BITS, typename S>
void block_lut(const Packed<S>& w, const Lanes& xl, int64_t m0, float* y, int64_t N, int64_t n) {
  constexpr int PER = 8 / BITS;
  __m512 acc[R][T];
  LOWBIT_UNROLL for (int r = 0; r < R; ++r)
    LOWBIT_UNROLL for (int t = 0; t < T; ++t) acc[r][t] = _mm512_setzero_ps();
  const __m512i iota = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
  const __m512 codes = _mm512_cvtepi32_ps(_mm512_and_si512(iota, _mm512_set1_epi32((1 << BITS) - 1)));
  const __m512 levels = w.levels ? _mm512_loadu_ps(w.levels) : codes;  // 16 levels: 4-bit lookup formats only
  for (int64_t g = 0; g < w.G; ++g) {
    const int64_t b0 = w.first_byte(g), b1 = w.end_byte(g);
    __m512 lut[R];
    LOWBIT_UNROLL for (int r = 0; r < R; ++r) {
      const __m512 v = w.levels ? levels
                                : _mm512_sub_ps(codes, _mm512_set1_ps(static_cast<float>(w.zero_code(n + r, g))));
      lut[r] = _mm512_mul_ps(v, _mm512_set1_ps(scale_at(w, n + r, g)));
    }
    for (int64_t b = b0; b < b1; b += 16) {
      const __mmask16 k = tail_mask(b1 - b);
      __m512 xv[T][PER];
      LOWBIT_UNROLL for (int t = 0; t < T; ++t)
        LOWBIT_UNROLL for (int l = 0; l < PER; ++l) xv[t][l] = _mm512_maskz_loadu_ps(k, xl.at(m0 + t, l) + b);
      LOWBIT_UNROLL for (int r = 0; r < R; ++r) {
        const uint8_t* p = w.q + (n + r) * w.row_bytes + b;
        if (((b - b0) & 63) == 0) prefetch(p);
        const __m512i c = _mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(k, p));
        LOWBIT_UNROLL for (int l = 0; l < PER; ++l) {
          const __m512 wv = _mm512_permutexvar_ps(l ? _mm512_srli_epi32(c, l * BITS) : c, lut[r]);
          LOWBIT_UNROLL for (int t = 0; t < T; ++t) acc[r][t] = _mm512_fmadd_ps(wv, xv[t][l], acc[r][t]);
        }
      }
    }
  }
  LOWBIT_UNROLL for (int r = 0; r < R; ++r)
    LOWBIT_UNROLL for (int t = 0; t < T; ++t) y[(m0 + t) * N + n + r] = _mm512_reduce_add_ps(acc[r][t]);
}

// 8 bits: (c - z) widened to float per code, summed against x per group, then scaled.
template <int R, int T, typename S>
void block_int8(const Packed<S>& w, const Lanes& xl, int64_t m0, float* y, int64_t N, int64_t n) {
  __m512 acc[R][T];
  LOWBIT_UNROLL for (int r = 0; r < R; ++r)
    LOWBIT_UNROLL for (int t = 0; t < T; ++t) acc[r][t] = _mm512_setzero_ps();
  for (int64_t g = 0; g < w.G; ++g) {
    const int64_t b0 = w.first_byte(g), b1 = w.end_byte(g);
    __m512i z[R];
    __m512 part[R][T];
    LOWBIT_UNROLL for (int r = 0; r < R; ++r) {
      z[r] = _mm512_set1_epi32(w.zero_code(n + r, g));
      LOWBIT_UNROLL for (int t = 0; t < T; ++t) part[r][t] = _mm512_setzero_ps();
    }
    for (int64_t b = b0; b < b1; b += 16) {
      const __mmask16 k = tail_mask(b1 - b);
      __m512 xv[T];
      LOWBIT_UNROLL for (int t = 0; t < T; ++t) xv[t] = _mm512_maskz_loadu_ps(k, xl.at(m0 + t, 0) + b);
      LOWBIT_UNROLL for (int r = 0; r < R; ++r) {
        const uint8_t* p = w.q + (n + r) * w.row_bytes + b;
        if (((b - b0) & 63) == 0) prefetch(p);
        const __m512i c = _mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(k, p));
        const __m512 wv = _mm512_cvtepi32_ps(_mm512_sub_epi32(c, z[r]));
        LOWBIT_UNROLL for (int t = 0; t < T; ++t) part[r][t] = _mm512_fmadd_ps(wv, xv[t], part[r][t]);
      }
    }
    LOWBIT_UNROLL for (int r = 0; r < R; ++r) {
      const __m512 s = _mm512_set1_ps(scale_at(w, n + r, g));
      LOWBIT_UNROLL for (int t = 0; t < T; ++t) acc[r][t] = _mm512_fmadd_ps(part[r][t], s, acc[r][t]);
    }
  }
  LOWBIT_UNROLL for (int r = 0; r < R; ++r)
    LOWBIT_UNROLL for (int t = 0; t < T; ++t) y[(m0 + t) * N + n + r] = _mm512_reduce_add_ps(acc[r][t]);
}

// 16 words of 8 codes each from a row's `words` (d .. d + left - 1, left <= 16), word j in 32-bit
// lane j. 4 bits: a word is 4 bytes, loaded as is. 3 bits: a word is a 3-byte triple; 48 bytes
// are loaded and spread one triple to a lane — a dword permute gives each 128-bit lane its 12
// bytes, a byte shuffle moves each triple into a dword of its own, top byte zero. Masked loads:
// no byte past the row is read.
template <int BITS>
inline __m512i load_words(const uint8_t* row, int64_t d, int64_t left) {
  if constexpr (BITS == 4) {
    return _mm512_maskz_loadu_epi32(tail_mask(left), row + 4 * d);
  } else {
    static_assert(BITS == 3, "8 codes per word: 3 or 4 bits");
    const __m512i spread_dwords = _mm512_set_epi32(0, 11, 10, 9, 0, 8, 7, 6, 0, 5, 4, 3, 0, 2, 1, 0);
    const __m512i spread_bytes =
        _mm512_broadcast_i32x4(_mm_set_epi8(-1, 11, 10, 9, -1, 8, 7, 6, -1, 5, 4, 3, -1, 2, 1, 0));
    const __mmask64 bytes = (~0ull) >> (64 - 3 * std::min<int64_t>(16, left));
    const __m512i raw = _mm512_maskz_loadu_epi8(bytes, row + 3 * d);
    return _mm512_shuffle_epi8(_mm512_permutexvar_epi32(spread_dwords, raw), spread_bytes);
  }
}

// Code q of 16 words v[r] (bits BITS·q ..) times x lane q of words d.., summed into part[r][t]:
// shift, mask, convert, multiply-add. The body of `block_words` and `block_word_spans`.
#define LOWBIT_WORD_LANE(Q)                                                                         \
  {                                                                                                \
    __m512 xv[T];                                                                                  \
    LOWBIT_UNROLL for (int t = 0; t < T; ++t) xv[t] = _mm512_maskz_loadu_ps(k, xw.at(m0 + t, Q) + d); \
    LOWBIT_UNROLL for (int r = 0; r < R; ++r) {                                                     \
      __m512i c = (Q) ? _mm512_srli_epi32(v[r], BITS * (Q)) : v[r];                                \
      if ((Q) < 7) c = _mm512_and_si512(c, field);                                                 \
      const __m512 wv = _mm512_cvtepi32_ps(c);                                                     \
      LOWBIT_UNROLL for (int t = 0; t < T; ++t) part[r][t] = _mm512_fmadd_ps(wv, xv[t], part[r][t]); \
    }                                                                                              \
  }
#define LOWBIT_WORD_LANES                                                                           \
  LOWBIT_WORD_LANE(0) LOWBIT_WORD_LANE(1) LOWBIT_WORD_LANE(2) LOWBIT_WORD_LANE(3)                  \
  LOWBIT_WORD_LANE(4) LOWBIT_WORD_LANE(5) LOWBIT_WORD_LANE(6) LOWBIT_WORD_LANE(7)

// The sums of R rows × T tokens of the word kernels: the scaled partial sums, and the zero
// points' correction z s sum(x) per row and token, taken off as y is written.
template <int R, int T>
struct WordSums {
  __m512 acc[R][T];
  float corr[R][T];
  WordSums() {
    LOWBIT_UNROLL for (int r = 0; r < R; ++r)
      LOWBIT_UNROLL for (int t = 0; t < T; ++t) acc[r][t] = _mm512_setzero_ps(), corr[r][t] = 0.0f;
  }
  void store(float* y, int64_t m0, int64_t N, int64_t n) const {
    LOWBIT_UNROLL for (int r = 0; r < R; ++r)
      LOWBIT_UNROLL for (int t = 0; t < T; ++t) y[(m0 + t) * N + n + r] = _mm512_reduce_add_ps(acc[r][t]) - corr[r][t];
  }
};

// 3 and 4 bits, groups of a multiple of 8 columns (so every group starts on a word of 8 codes:
// 32 bits at 4 bits, a 3-byte triple at 3): the codes are read 16 words (128 codes) at a time
// and code q of each word (bits BITS·q .. BITS·q + BITS − 1, column 8d + q of word d) is
// isolated with a shift and a mask, converted, and multiplied with x8 lane q (x[8d + q]): no
// shuffle, which this loop is otherwise bound by. The sum runs over the raw codes c; the
// group's zero point comes off once per group as z * sum(x over the group), then the group's
// scale multiplies:
//   sum_k (c - z) s x = s (sum_k c x - z sum_k x).
// Groups under 128 columns that divide 128 leave most of a 16-word step's lanes idle here:
// see `block_word_spans`.
template <int R, int T, int BITS, typename S>
void block_words(const Packed<S>& w, const Words& xw, int64_t m0, float* y, int64_t N, int64_t n) {
  WordSums<R, T> total;
  const __m512i field = _mm512_set1_epi32((1 << BITS) - 1);
  for (int64_t g = 0; g < w.G; ++g) {
    const int64_t d0 = g * w.group / 8, d1 = std::min(w.K, (g + 1) * w.group) / 8;
    __m512 part[R][T];
    LOWBIT_UNROLL for (int r = 0; r < R; ++r)
      LOWBIT_UNROLL for (int t = 0; t < T; ++t) part[r][t] = _mm512_setzero_ps();
    for (int64_t d = d0; d < d1; d += 16) {
      const __mmask16 k = tail_mask(d1 - d);
      __m512i v[R];
      LOWBIT_UNROLL for (int r = 0; r < R; ++r) {
        const uint8_t* row = w.q + (n + r) * w.row_bytes;
        prefetch(row + BITS * d);
        v[r] = load_words<BITS>(row, d, d1 - d);
      }
      LOWBIT_WORD_LANES
    }
    LOWBIT_UNROLL for (int r = 0; r < R; ++r) {
      const float s = scale_at(w, n + r, g), sz = s * static_cast<float>(w.zero_code(n + r, g));
      const __m512 sv = _mm512_set1_ps(s);
      LOWBIT_UNROLL for (int t = 0; t < T; ++t) {
        total.acc[r][t] = _mm512_fmadd_ps(part[r][t], sv, total.acc[r][t]);
        total.corr[r][t] += sz * xw.group_sum(m0 + t, g);
      }
    }
  }
  total.store(y, m0, N, n);
}

// The scales of groups g0 .. g0 + count - 1 (count <= 16) of row n in lanes 0 .. count - 1, zero past them.
template <typename S>
inline __m512 load_scales(const Packed<S>& w, int64_t n, int64_t g0, int64_t count) {
  const __mmask16 k = tail_mask(count);
  const S* p = w.scale + n * w.G + g0;
  if constexpr (std::is_same_v<S, float>) {
    return _mm512_maskz_loadu_ps(k, p);
  } else if constexpr (std::is_same_v<S, at::Half>) {
    return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(k, p));
  } else if constexpr (std::is_same_v<S, at::BFloat16>) {  // a bfloat16 is a float's top half
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(k, p)), 16));
  } else {  // double-quantised codes
    alignas(64) float s[16] = {};
    for (int64_t i = 0; i < count; ++i) s[i] = scale_at(w, n, g0 + i);
    return _mm512_load_ps(s);
  }
}

// The zero codes of groups g0 .. g0 + count - 1 (count <= 16) of row n, as floats in lanes 0 ..
// count - 1 (lanes past them hold other codes): the packed zero row's bits read once as a
// 64-bit field (count · BITS + 7 <= 64) and each lane shifted to its own.
template <int BITS, typename S>
inline __m512 load_zeros(const Packed<S>& w, int64_t n, int64_t g0, int64_t count) {
  // 3 bits: 16 zero points and a byte's offset fit 55 bits; 4 bits: the span's groups start on a byte (g0 is
  // even, as the span holds 2 or more groups), so 16 of them fit exactly
  static_assert(BITS == 3 || BITS == 4, "3 or 4 bits");
  if (!w.zero) return _mm512_set1_ps(static_cast<float>(1 << (BITS - 1)));
  const uint8_t* z = w.zero + n * w.zero_row_bytes;
  const int64_t bit = g0 * BITS, byte = bit >> 3;
  const int64_t avail = std::min<int64_t>(8, w.zero_row_bytes - byte);  // no byte past the row is read
  const uint64_t field = _mm_cvtsi128_si64(_mm_maskz_loadu_epi8(static_cast<__mmask16>((1u << avail) - 1), z + byte));
  const __m512i all = _mm512_set1_epi64(static_cast<int64_t>(field >> (bit & 7)));
  constexpr int B = BITS;
  const __m512i lo = _mm512_srlv_epi64(all, _mm512_set_epi64(7 * B, 6 * B, 5 * B, 4 * B, 3 * B, 2 * B, B, 0));
  const __m512i hi =
      _mm512_srlv_epi64(all, _mm512_set_epi64(15 * B, 14 * B, 13 * B, 12 * B, 11 * B, 10 * B, 9 * B, 8 * B));
  const __m512i codes = _mm512_inserti64x4(_mm512_castsi256_si512(_mm512_cvtepi64_epi32(lo)),
                                           _mm512_cvtepi64_epi32(hi), 1);
  return _mm512_cvtepi32_ps(_mm512_and_si512(codes, _mm512_set1_epi32((1 << BITS) - 1)));
}

// `block_words` for groups of 8, 16, 32 or 64 columns: every 16-word span of a row holds whole
// groups, so the spans run along the row and all 16 lanes stay busy. Each span's scales and
// zero points are read as vectors (lane i: group g0 + i) and spread to the words' lanes (lane j:
// the group of word d + j); the zero point comes off each word lane as z · (sum of x over the
// word's 8 columns), and the span's sums are scaled lane by lane. (Measured on this project's
// 2-core machine against `block_words` and `block_lut` in these groups: from 2x to 4x faster at
// 8 columns, on par or faster at 32 and 64.)
template <int R, int T, int BITS, typename S>
void block_word_spans(const Packed<S>& w, const Words& xw, int64_t m0, float* y, int64_t N, int64_t n) {
  WordSums<R, T> total;
  const __m512i field = _mm512_set1_epi32((1 << BITS) - 1);
  const int64_t words = w.K / 8, shift = __builtin_ctzll(w.group / 8);  // log2 of words per group
  const __m512i lane_group = lane_groups(static_cast<int>(shift));
  for (int64_t d = 0; d < words; d += 16) {
    const __mmask16 k = tail_mask(words - d);
    __m512i v[R];
    __m512 part[R][T];
    LOWBIT_UNROLL for (int r = 0; r < R; ++r) {
      const uint8_t* row = w.q + (n + r) * w.row_bytes;
      prefetch(row + BITS * d);
      v[r] = load_words<BITS>(row, d, words - d);
      LOWBIT_UNROLL for (int t = 0; t < T; ++t) part[r][t] = _mm512_setzero_ps();
    }
    LOWBIT_WORD_LANES
    const int64_t g0 = d >> shift, groups = std::min<int64_t>(16 >> shift, w.G - g0);
    __m512 xsum[T];
    LOWBIT_UNROLL for (int t = 0; t < T; ++t) xsum[t] = _mm512_maskz_loadu_ps(k, xw.word_sum(m0 + t) + d);
    LOWBIT_UNROLL for (int r = 0; r < R; ++r) {
      const __m512 sv = _mm512_permutexvar_ps(lane_group, load_scales(w, n + r, g0, groups));
      const __m512 zv = _mm512_permutexvar_ps(lane_group, load_zeros<BITS>(w, n + r, g0, groups));
      LOWBIT_UNROLL for (int t = 0; t < T; ++t)
        total.acc[r][t] = _mm512_fmadd_ps(_mm512_fnmadd_ps(zv, xsum[t], part[r][t]), sv, total.acc[r][t]);
    }
  }
  total.store(y, m0, N, n);
}
#undef LOWBIT_WORD_LANES
#undef LOWBIT_WORD_LANE

#ifdef LOWBIT_VBMI
// Where code i of 16 in column order sits (BITS = 2, 3, 4, 8): its two bytes (code i's first bit
// is bit i·BITS of the 16 codes' bytes, byte (i·BITS)/8) and its shift within them.
template <int BITS>
struct CodeSpread {
  alignas(64) uint8_t index[64];
  alignas(64) int32_t shift[16];
  constexpr CodeSpread() : index{}, shift{} {
    for (int i = 0; i < 16; ++i) {
      const int bit = i * BITS;
      index[4 * i] = static_cast<uint8_t>(bit >> 3);
      index[4 * i + 1] = static_cast<uint8_t>((bit >> 3) + 1);
      shift[i] = bit & 7;
    }
  }
};
template <int BITS>
inline constexpr CodeSpread<BITS> kSpread{};

// Codes k0 .. k0 + 15 of a row (k0 a multiple of 16, so they start on a byte), code i in 32-bit
// lane i: a byte permute puts each code's two bytes in its lane, a variable shift and a mask
// isolate it. No byte past the row is read.
template <int BITS>
inline __m512i load_codes(const uint8_t* row, int64_t row_bytes, int64_t k0) {
  const int64_t byte0 = k0 * BITS / 8;
  const __m128i raw = _mm_maskz_loadu_epi8(tail_mask(row_bytes - byte0), row + byte0);
  const __m512i spread = _mm512_maskz_permutexvar_epi8(0x3333333333333333ull, _mm512_load_si512(kSpread<BITS>.index),
                                                       _mm512_zextsi128_si512(raw));
  return _mm512_and_si512(_mm512_srlv_epi32(spread, _mm512_load_si512(kSpread<BITS>.shift)),
                          _mm512_set1_epi32((1 << BITS) - 1));
}
#endif

// Transposes 16 × 16 32-bit words in place (v[i] lane j ↔ v[j] lane i): four stages that swap
// the off-diagonal blocks of 8, 4, 2 and 1, one in-register shuffle per vector each.
inline void transpose16(__m512i v[16]) {
  for (int i = 0; i < 8; ++i) {  // blocks of 8: 256-bit halves
    const __m512i a = v[i], b = v[i + 8];
    v[i] = _mm512_shuffle_i64x2(a, b, 0x44);
    v[i + 8] = _mm512_shuffle_i64x2(a, b, 0xEE);
  }
  for (int i = 0; i < 16; ++i) {  // blocks of 4: 128-bit lanes
    if (i & 4) continue;
    const __m512i a = v[i], b = v[i + 4];
    v[i] = _mm512_mask_shuffle_i32x4(a, 0xF0F0, b, b, 0x80);
    v[i + 4] = _mm512_mask_shuffle_i32x4(b, 0x0F0F, a, a, 0x31);
  }
  for (int i = 0; i < 16; ++i) {  // blocks of 2: 64-bit pairs
    if (i & 2) continue;
    const __m512i a = v[i], b = v[i + 2];
    v[i] = _mm512_unpacklo_epi64(a, b);
    v[i + 2] = _mm512_unpackhi_epi64(a, b);
  }
  for (int i = 0; i < 16; i += 2) {  // single words
    const __m512i a = v[i], b = v[i + 1];
    v[i] = _mm512_mask_shuffle_epi32(a, 0xAAAA, b, _MM_PERM_CDAB);
    v[i + 1] = _mm512_mask_shuffle_epi32(b, 0x5555, a, _MM_PERM_CDAB);
  }
}

// Act-order weights, 16 rows in the 16 lanes (rows n .. n + 15, fewer at the end), T tokens: the rows'
// next 16 words are loaded and transposed, so that one vector holds a word of every row; code q of
// word d is column k = d·CPW + q, whose 16 rows' zero points and scales are one load each from the
// block's tables transposed to (G, 16), at row g_idx[k] — no per-lane lookup, whatever G is. The
// weights (c - z) s are the reference's exactly, each times x[k] broadcast.
template <int T, int BITS, bool LUT, typename S>
void rows16_scattered(const Packed<S>& w, const float* xm, int64_t m0, float* y, int64_t N, int64_t n) {
  constexpr int CPW = BITS == 3 ? 8 : 32 / BITS;  // codes per word (3 bits: a 3-byte word)
  const int rows = static_cast<int>(std::min<int64_t>(16, N - n));
  thread_local std::vector<float> block;  // per group, the 16 rows' scales s, then their z s
  block.assign(w.G * 32, 0.0f);
  float* table = block.data();
  for (int r = 0; r < rows; ++r)
    for (int64_t g = 0; g < w.G; ++g) {
      const float sc = scale_at(w, n + r, g);
      table[g * 32 + r] = sc;
      table[g * 32 + 16 + r] = LUT ? 0.0f : static_cast<float>(w.zero_code(n + r, g)) * sc;
    }
  constexpr int A = T >= 4 ? 1 : 4 / T;  // sums per token: at least 4 chains of multiply-adds in flight
  __m512 acc[T][A];
  LOWBIT_UNROLL for (int t = 0; t < T; ++t)
    LOWBIT_UNROLL for (int a = 0; a < A; ++a) acc[t][a] = _mm512_setzero_ps();
  const __m512 levels = LUT ? _mm512_loadu_ps(w.levels) : _mm512_setzero_ps();
  const __m512i field = _mm512_set1_epi32((1 << BITS) - 1);
  const int64_t words = BITS == 3 ? w.K / 8 : (w.row_bytes + 3) / 4;
  const float* x[T];
  LOWBIT_UNROLL for (int t = 0; t < T; ++t) x[t] = xm + (m0 + t) * w.K;
  for (int64_t d = 0; d < words; d += 16) {
    __m512i v[16];
    for (int r = 0; r < 16; ++r) {
      if (r >= rows) {
        v[r] = _mm512_setzero_si512();
        continue;
      }
      const uint8_t* row = w.q + (n + r) * w.row_bytes;
      if constexpr (BITS == 3) {
        prefetch(row + 3 * d);
        v[r] = load_words<3>(row, d, words - d);
      } else {
        prefetch(row + 4 * d);
        const int64_t left = std::min<int64_t>(64, w.row_bytes - 4 * d);
        v[r] = _mm512_maskz_loadu_epi8(~0ull >> (64 - left), row + 4 * d);
      }
    }
    transpose16(v);
    const int64_t count = std::min<int64_t>(16, words - d);
    for (int64_t i = 0; i < count; ++i) {
      const int64_t k0 = (d + i) * CPW;
      const int last = static_cast<int>(std::min<int64_t>(CPW, w.K - k0));
      // code q of the 16 rows' word: column k0 + q, weights (c - z) s = c s - z s, times x[k0 + q]
      auto code = [&](auto q) {
        if (q >= last) return;
        __m512i c = q ? _mm512_srli_epi32(v[i], q * BITS) : v[i];
        if constexpr (q < CPW - 1) c = _mm512_and_si512(c, field);
        const float* sz = table + w.g_idx[k0 + q] * 32;
        const __m512 wv = LUT ? _mm512_mul_ps(_mm512_permutexvar_ps(c, levels), _mm512_loadu_ps(sz))
                              : _mm512_fmsub_ps(_mm512_cvtepi32_ps(c), _mm512_loadu_ps(sz), _mm512_loadu_ps(sz + 16));
        LOWBIT_UNROLL for (int t = 0; t < T; ++t)
          acc[t][q % A] = _mm512_fmadd_ps(wv, _mm512_set1_ps(x[t][k0 + q]), acc[t][q % A]);
      };
      [&]<int... Q>(std::integer_sequence<int, Q...>) {
        (code(std::integral_constant<int, Q>{}), ...);
      }(std::make_integer_sequence<int, CPW>{});
    }
  }
  LOWBIT_UNROLL for (int t = 0; t < T; ++t) {
    for (int a = 1; a < A; ++a) acc[t][0] = _mm512_add_ps(acc[t][0], acc[t][a]);
    _mm512_mask_storeu_ps(y + (m0 + t) * N + n, tail_mask(rows), acc[t][0]);
  }
}

template <int T, typename S>
void rows16_by_bits(const Packed<S>& w, const float* x, int64_t m0, float* y, int64_t N, int64_t n) {
  switch (w.bits) {
    case 2: rows16_scattered<T, 2, false>(w, x, m0, y, N, n); break;
    case 3: rows16_scattered<T, 3, false>(w, x, m0, y, N, n); break;
    case 4:
      w.levels ? rows16_scattered<T, 4, true>(w, x, m0, y, N, n) : rows16_scattered<T, 4, false>(w, x, m0, y, N, n);
      break;
    default: rows16_scattered<T, 8, false>(w, x, m0, y, N, n);
  }
}

// blocks of 16 rows [n0, n1) for all M tokens, up to 4 at a time
template <typename S>
void rows16_all(const Packed<S>& w, const float* x, int64_t M, float* y, int64_t N, int64_t n0, int64_t n1) {
  for (int64_t n = n0; n < n1; n += 16) {
    int64_t m = 0;
    for (; m + 4 <= M; m += 4) rows16_by_bits<4>(w, x, m, y, N, n);
    switch (M - m) {
      case 3: rows16_by_bits<3>(w, x, m, y, N, n); break;
      case 2: rows16_by_bits<2>(w, x, m, y, N, n); break;
      case 1: rows16_by_bits<1>(w, x, m, y, N, n); break;
    }
  }
}

#ifdef LOWBIT_VNNI
// One token's x for `block_vnni`, per block of 128 columns b: the block as integers x_i = round(x[k] 2^e_b)
// with e_b the block's own exponent (|x_i| <= 2^22), written in three signed base-256 digits,
// x_i = 65536 t + 256 m + l with t, m, l in [−128, 127] (t in [−64, 64]), each digit plane two runs
// of 64 bytes: the even columns (the codes in the packed bytes' low nibbles) and the odd ones (the
// high nibbles). Also
// 2^−e_b and each group's sum of x_i 2^−e_b. This is block floating point: each value is rounded to a
// multiple of 2^−e_b, within 2^−22 of the block's largest magnitude (which keeps 22 or 23 of float32's
// 24 significant bits); the products are then exact.
struct Planes {
  static constexpr int64_t kCols = 128;
  std::vector<uint8_t> bytes;  // (blocks, 3 digits, 2 runs, 64): t, m, l
  std::vector<float> unit, sums;  // per block; sums: per group, zero to a multiple of 16 groups
  int64_t blocks, steps;           // steps: blocks per group
  bool finite = true;  // false: x holds an inf or NaN, which this integer form cannot carry
  Planes(const float* x, int64_t K, int64_t group)
      : blocks((K + kCols - 1) / kCols), steps(group >= K ? blocks : std::max<int64_t>(1, group / kCols)) {
    bytes.assign(blocks * 6 * 64, 0);
    unit.assign(blocks, 0.0f);
    sums.assign(((K + group - 1) / group + 15) / 16 * 16, 0.0f);
    const __m512i even = _mm512_set_epi32(30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
    const __m512i odd = _mm512_add_epi32(even, _mm512_set1_epi32(1));
    const int64_t span = std::min(group, K);  // a group's columns (32 or more)
    for (int64_t b = 0; b < blocks; ++b) {
      const int64_t k0 = b * kCols, cols = std::min(K - k0, kCols);
      __m512 v[8];
      __m512 top = _mm512_setzero_ps();
      __mmask16 bad = 0;
      for (int i = 0; i < 8; ++i) {
        v[i] = _mm512_maskz_loadu_ps(tail_mask(std::max<int64_t>(0, cols - 16 * i)), x + k0 + 16 * i);
        bad |= _mm512_cmp_ps_mask(v[i], v[i], _CMP_UNORD_Q);
        top = _mm512_max_ps(top, _mm512_abs_ps(v[i]));
      }
      const float most = _mm512_reduce_max_ps(top);
      if (bad || !std::isfinite(most)) {
        finite = false;
        return;
      }
      if (most == 0.0f) continue;
      int exponent;
      std::frexp(most, &exponent);  // most < 2^exponent
      const int e = std::min(22 - exponent, 126);  // tiny blocks: multiples of 2^−126 (2^±126 are floats)
      const __m512 up = _mm512_set1_ps(std::ldexp(1.0f, e));  // a power of two: x 2^e is exact
      unit[b] = std::ldexp(1.0f, -e);
      uint8_t* p = bytes.data() + b * 6 * 64;
      for (int i = 0; i < 8; i += 2) {  // 32 columns a pass, 16 bytes of each digit's two runs
        const __m512i a = _mm512_cvtps_epi32(_mm512_mul_ps(v[i], up));
        const __m512i c = _mm512_cvtps_epi32(_mm512_mul_ps(v[i + 1], up));
        sums[(k0 + 16 * i) / span] += static_cast<float>(_mm512_reduce_add_epi32(_mm512_add_epi32(a, c))) * unit[b];
        const __m512i runs[2] = {_mm512_permutex2var_epi32(a, even, c), _mm512_permutex2var_epi32(a, odd, c)};
        for (int h = 0; h < 2; ++h) {  // run h: columns 16 i + 2 j + h, j = 0 .. 15
          const __m512i l = _mm512_srai_epi32(_mm512_slli_epi32(runs[h], 24), 24);  // low byte, signed
          const __m512i rest = _mm512_srai_epi32(_mm512_sub_epi32(runs[h], l), 8);
          const __m512i m = _mm512_srai_epi32(_mm512_slli_epi32(rest, 24), 24);
          const __m512i t = _mm512_srai_epi32(_mm512_sub_epi32(rest, m), 8);
          const __m512i digits[3] = {t, m, l};
          for (int q = 0; q < 3; ++q)
            _mm_storeu_si128(reinterpret_cast<__m128i*>(p + (2 * q + h) * 64 + 8 * i), _mm512_cvtepi32_epi8(digits[q]));
        }
      }
    }
  }
  const uint8_t* at(int64_t b) const { return bytes.data() + b * 6 * 64; }
};

// A row's 4-bit codes for one block of 128 columns (64 bytes) against `Planes`, in integers: the
// bytes split into low and high nibbles (the even and odd columns' codes, 0 .. 15), vpdpbusd
// multiplies them with each signed digit plane, 64 products an instruction where a float
// multiply-add does 16, and the digit sums are joined as 65536 P_t + 256 P_m + P_l (each below
// 2^24, exact as floats) and scaled by 2^−e_b. So y = sum_g s (sum_k c x − z sum_k x) with the
// products exact in integers. Lane j of the result holds columns 8j .. 8j + 7.
struct VnniCodes {
  __m512i c[2];  // the even and odd columns' codes
  VnniCodes(const uint8_t* row, int64_t b, int64_t row_bytes) {
    const uint8_t* p = row + 64 * b;
    prefetch(p);
    const int64_t left = row_bytes - 64 * b;
    const __m512i nibble = _mm512_set1_epi8(0x0F);
    const __m512i packed = _mm512_maskz_loadu_epi8(left >= 64 ? ~0ull : (1ull << left) - 1, p);
    c[0] = _mm512_and_si512(packed, nibble);
    c[1] = _mm512_and_si512(_mm512_srli_epi16(packed, 4), nibble);
  }
  // the block's sums against one token's planes of block b
  __m512 dot(const Planes& xp, int64_t b) const {
    const uint8_t* x = xp.at(b);
    __m512i sum[3];
    LOWBIT_UNROLL for (int q = 0; q < 3; ++q) {
      const __m512i even = _mm512_loadu_si512(x + 64 * (2 * q)), odd = _mm512_loadu_si512(x + 64 * (2 * q + 1));
      sum[q] = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), c[0], even), c[1], odd);
    }
    const __m512 byte = _mm512_set1_ps(256.0f);
    const __m512 v = _mm512_fmadd_ps(_mm512_fmadd_ps(_mm512_cvtepi32_ps(sum[0]), byte, _mm512_cvtepi32_ps(sum[1])),
                                     byte, _mm512_cvtepi32_ps(sum[2]));
    return _mm512_mul_ps(v, _mm512_set1_ps(xp.unit[b]));
  }
};

// R rows × T tokens (`Planes` xp[0 .. T)) of `VnniCodes`, each row's codes split once per block and used for
// every token. Groups of a multiple of 128 columns, or one group per row (per-channel scales): each group's
// sum, then its scale. Groups of 32 or 64 columns (SPANS): a block holds 4 or 2 groups, and each lane is
// scaled by its own group's scale as it is added.
template <int R, int T, bool SPANS, typename S>
void block_vnni(const Packed<S>& w, const Planes* xp, float* y, int64_t N, int64_t m0, int64_t n) {
  __m512 total[R][T];
  LOWBIT_UNROLL for (int r = 0; r < R; ++r)
    LOWBIT_UNROLL for (int t = 0; t < T; ++t) total[r][t] = _mm512_setzero_ps();
  const int64_t per = SPANS ? Planes::kCols / w.group : 1;  // groups per block
  const __m512i lane_group = lane_groups(SPANS ? __builtin_ctzll(w.group / 8) : 0);
  for (int64_t g0 = 0; g0 < w.G; g0 += 16) {  // 16 groups' scales and zero points a vector per row
    const int64_t count = std::min<int64_t>(16, w.G - g0);
    __m512 scales[R];
    LOWBIT_UNROLL for (int r = 0; r < R; ++r) {
      scales[r] = load_scales(w, n + r, g0, count);  // s z sum_k x off the total at once (lanes: groups)
      const __m512 sz = _mm512_mul_ps(scales[r], load_zeros<4>(w, n + r, g0, count));
      LOWBIT_UNROLL for (int t = 0; t < T; ++t)
        total[r][t] = _mm512_fnmadd_ps(sz, _mm512_loadu_ps(xp[t].sums.data() + g0), total[r][t]);
    }
    if constexpr (SPANS) {
      for (int64_t b = g0 / per; b < std::min(xp[0].blocks, (g0 + count + per - 1) / per); ++b) {
        const __m512i lane = _mm512_add_epi32(lane_group, _mm512_set1_epi32(static_cast<int32_t>(b * per - g0)));
        LOWBIT_UNROLL for (int r = 0; r < R; ++r) {
          const VnniCodes codes(w.q + (n + r) * w.row_bytes, b, w.row_bytes);
          const __m512 s = _mm512_permutexvar_ps(lane, scales[r]);
          LOWBIT_UNROLL for (int t = 0; t < T; ++t) total[r][t] = _mm512_fmadd_ps(codes.dot(xp[t], b), s, total[r][t]);
        }
      }
    } else {
      for (int64_t g = g0; g < g0 + count; ++g) {
        __m512 part[R][T];
        LOWBIT_UNROLL for (int r = 0; r < R; ++r)
          LOWBIT_UNROLL for (int t = 0; t < T; ++t) part[r][t] = _mm512_setzero_ps();
        for (int64_t b = g * xp[0].steps; b < std::min(xp[0].blocks, (g + 1) * xp[0].steps); ++b) {
          LOWBIT_UNROLL for (int r = 0; r < R; ++r) {
            const VnniCodes codes(w.q + (n + r) * w.row_bytes, b, w.row_bytes);
            LOWBIT_UNROLL for (int t = 0; t < T; ++t) part[r][t] = _mm512_add_ps(codes.dot(xp[t], b), part[r][t]);
          }
        }
        const __m512i lane = _mm512_set1_epi32(static_cast<int32_t>(g - g0));
        LOWBIT_UNROLL for (int r = 0; r < R; ++r) {
          const __m512 s = _mm512_permutexvar_ps(lane, scales[r]);
          LOWBIT_UNROLL for (int t = 0; t < T; ++t) total[r][t] = _mm512_fmadd_ps(part[r][t], s, total[r][t]);
        }
      }
    }
  }
  LOWBIT_UNROLL for (int r = 0; r < R; ++r)
    LOWBIT_UNROLL for (int t = 0; t < T; ++t) y[(m0 + t) * N + n + r] = _mm512_reduce_add_ps(total[r][t]);
}

// Rows [n0, n1) for all M tokens: 4 rows a pass at one token, 2 at more (the R × T sums and parts in registers).
template <bool SPANS, typename S>
void gemv_vnni_groups(const Packed<S>& w, const Planes* xp, int64_t M, float* y, int64_t N, int64_t n0, int64_t n1) {
  token_passes(M, [&]<int T>(int64_t m0) {
    constexpr int kRows = T == 1 ? 4 : 2;
    int64_t n = n0;
    for (; n + kRows <= n1; n += kRows) block_vnni<kRows, T, SPANS>(w, xp + m0, y, N, m0, n);
    for (; n < n1; ++n) block_vnni<1, T, SPANS>(w, xp + m0, y, N, m0, n);
  });
}

// y (M, N) rows [n0, n1) from the tokens' planes
template <typename S>
void gemv_vnni(const Packed<S>& w, const Planes* xp, int64_t M, float* y, int64_t N, int64_t n0, int64_t n1) {
  if (w.group < Planes::kCols && w.group < w.K) {
    gemv_vnni_groups<true>(w, xp, M, y, N, n0, n1);
  } else {
    gemv_vnni_groups<false>(w, xp, M, y, N, n0, n1);
  }
}
#endif

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
    const bool spans = w.group < 128 && 128 % w.group == 0;
    if (w.bits == 4)
      spans ? block_word_spans<R, T, 4>(w, xw, m0, y, N, n) : block_words<R, T, 4>(w, xw, m0, y, N, n);
    else
      spans ? block_word_spans<R, T, 3>(w, xw, m0, y, N, n) : block_words<R, T, 3>(w, xw, m0, y, N, n);
  }
};

// rows [n0, n1) for all M tokens: four at a time, then the rest (one token: four rows per pass)
template <class B, typename S, typename X>
void rows_avx512(const Packed<S>& w, const X& x, int64_t M, float* y, int64_t N, int64_t n0, int64_t n1) {
  token_passes(M, [&]<int T>(int64_t m0) { rows_t<B, T == 1 ? 4 : 2, T>(w, x, m0, y, N, n0, n1); });
}
#endif

#ifdef LOWBIT_AVX2
// ---- AVX2 with FMA, no AVX-512: the same sums at 8 lanes ----
//
// 4-bit affine codes in groups of a multiple of 8 columns (`block_words2`, x in the `Words` layout) and 8-bit
// codes (`block_int8_2`, x as it is) do `block_words`' and `block_int8`'s arithmetic 8 lanes at a time, a group's
// last step masked; other formats keep the portable loops. Without these, a 4-bit layer ran slower than torch's
// float32 F.linear on an AMD EPYC (Zen 3) without AVX-512 (2026-11-28: 612 µs against 552 for 1536 × 576).
// AVX2 has 16 vector registers: R × T is at most 4 × 1 or 2 × 2 (1 × 3, 1 × 4), the partial and total sums of
// each in registers.

// dword lanes 0 .. left - 1 selected (left < 8), for maskload and for masking a step's tail
inline __m256i lanes_below(int64_t left) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(left)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

// 8 float32, float16 or bfloat16 values from p as float32 (a bfloat16 is a float32's top half)
inline __m256 floats8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 floats8(const at::Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
inline __m256 floats8(const at::BFloat16* p) {
  const __m256i bits = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(bits, 16));
}

// the 8 BITS-bit fields of word, LSB first, one per lane (codes 0 .. 7 of a packed 2/3/4-bit word)
template <int BITS>
inline __m256i fields8(uint32_t word) {
  const __m256i shifts = _mm256_setr_epi32(0, BITS, 2 * BITS, 3 * BITS, 4 * BITS, 5 * BITS, 6 * BITS, 7 * BITS);
  return _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(static_cast<int32_t>(word)), shifts),
                          _mm256_set1_epi32((1 << BITS) - 1));
}

// table[c] for 4-bit codes c, the 16-entry table in two registers: c's low 3 bits index both, bit 3 chooses
inline __m256 lookup16(__m256 low, __m256 high, __m256i c) {
  return _mm256_blendv_ps(_mm256_permutevar8x32_ps(low, c), _mm256_permutevar8x32_ps(high, c),
                          _mm256_castsi256_ps(_mm256_slli_epi32(c, 28)));
}

inline float reduce_add8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

// bytes p[0 .. min(left, 8)) in the low 8 bytes, zero past them: a group's last step reads no byte past the row.
// (A byte loop, not memcpy: a call in the kernels' loops made GCC keep their sums on the stack, a store and a
// reload per multiply-add, which halved the 8-bit kernel's speed.)
inline uint64_t bytes_le(const uint8_t* p, int64_t count) {
  uint64_t v = 0;
  for (int64_t i = 0; i < count; ++i) v |= static_cast<uint64_t>(p[i]) << (8 * i);
  return v;
}

inline __m128i load8(const uint8_t* p, int64_t left) {
  if (left >= 8) return _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
  return _mm_cvtsi64_si128(static_cast<int64_t>(bytes_le(p, left)));
}

// R rows × T tokens of 8 lanes: the scaled group sums, and (4 bits) the zero points' z s sum(x), taken off at the end
template <int R, int T>
struct Sums8 {
  __m256 acc[R][T];
  float corr[R][T];
  Sums8() {
    LOWBIT_UNROLL for (int r = 0; r < R; ++r)
      LOWBIT_UNROLL for (int t = 0; t < T; ++t) acc[r][t] = _mm256_setzero_ps(), corr[r][t] = 0.0f;
  }
  void store(float* y, int64_t m0, int64_t N, int64_t n) const {
    LOWBIT_UNROLL for (int r = 0; r < R; ++r)
      LOWBIT_UNROLL for (int t = 0; t < T; ++t) y[(m0 + t) * N + n + r] = reduce_add8(acc[r][t]) - corr[r][t];
  }
};

// 8 words of 8 codes each from a row's words d .. d + min(left, 8) - 1, word j in dword lane j, zero past them (no
// byte past the row is read). 4 bits: a word is 4 bytes. 3 bits: a 3-byte triple; 24 bytes are loaded, a dword
// permute gives each 128-bit half its 12 bytes and a byte shuffle moves each triple into a dword of its own.
template <int BITS>
inline __m256i load_words2(const uint8_t* row, int64_t d, int64_t left) {
  const uint8_t* p = row + BITS * d;
  if constexpr (BITS == 4) {
    return left >= 8 ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))
                     : _mm256_maskload_epi32(reinterpret_cast<const int*>(p), lanes_below(left));
  } else {
    static_assert(BITS == 3, "8 codes per word: 3 or 4 bits");
    __m256i raw;
    if (left >= 8) {
      raw = _mm256_maskload_epi32(reinterpret_cast<const int*>(p), lanes_below(6));
    } else {  // up to 7 triples: 21 bytes
      const int64_t bytes = 3 * left;
      raw = _mm256_setr_epi64x(static_cast<int64_t>(bytes_le(p, std::min<int64_t>(8, bytes))),
                               static_cast<int64_t>(bytes > 8 ? bytes_le(p + 8, std::min<int64_t>(8, bytes - 8)) : 0),
                               static_cast<int64_t>(bytes > 16 ? bytes_le(p + 16, bytes - 16) : 0), 0);
    }
    const __m256i halves = _mm256_permutevar8x32_epi32(raw, _mm256_setr_epi32(0, 1, 2, 2, 3, 4, 5, 5));
    const __m128i spread = _mm_setr_epi8(0, 1, 2, -1, 3, 4, 5, -1, 6, 7, 8, -1, 9, 10, 11, -1);
    return _mm256_shuffle_epi8(halves, _mm256_broadcastsi128_si256(spread));
  }
}

// Code q of 8 words v[r] (bits BITS·q ..) times x lane q of words d .., summed into part[r][t]: shift, mask,
// convert, multiply-add. The body of `block_words2` and `block_word_spans2`.
template <int R, int T, int BITS>
inline void word_lanes2(const __m256i (&v)[R], const Words& xw, int64_t m0, int64_t d, __m256 (&part)[R][T]) {
  const __m256i field = _mm256_set1_epi32((1 << BITS) - 1);
  LOWBIT_UNROLL for (int q = 0; q < 8; ++q) {
    __m256 xv[T];
    LOWBIT_UNROLL for (int t = 0; t < T; ++t) xv[t] = _mm256_loadu_ps(xw.at(m0 + t, q) + d);
    LOWBIT_UNROLL for (int r = 0; r < R; ++r) {
      __m256i c = q ? _mm256_srli_epi32(v[r], BITS * q) : v[r];
      if (q < 7) c = _mm256_and_si256(c, field);
      const __m256 wv = _mm256_cvtepi32_ps(c);
      LOWBIT_UNROLL for (int t = 0; t < T; ++t) part[r][t] = _mm256_fmadd_ps(wv, xv[t], part[r][t]);
    }
  }
}

// `block_words` at 8 words (64 codes) a step: code q of each word shifted out, masked, converted and multiplied
// with x lane q, the sum over raw codes; per group s (sum c x - z sum x).
template <int R, int T, int BITS, typename S>
void block_words2(const Packed<S>& w, const Words& xw, int64_t m0, float* y, int64_t N, int64_t n) {
  Sums8<R, T> total;
  for (int64_t g = 0; g < w.G; ++g) {
    const int64_t d0 = g * w.group / 8, d1 = std::min(w.K, (g + 1) * w.group) / 8;
    __m256 part[R][T];
    LOWBIT_UNROLL for (int r = 0; r < R; ++r)
      LOWBIT_UNROLL for (int t = 0; t < T; ++t) part[r][t] = _mm256_setzero_ps();
    for (int64_t d = d0; d < d1; d += 8) {
      __m256i v[R];
      LOWBIT_UNROLL for (int r = 0; r < R; ++r) {
        const uint8_t* row = w.q + (n + r) * w.row_bytes;
        prefetch(row + BITS * d);
        v[r] = load_words2<BITS>(row, d, d1 - d);
      }
      word_lanes2<R, T, BITS>(v, xw, m0, d, part);  // x past the group meets codes of zero (`Words` has slack)
    }
    LOWBIT_UNROLL for (int r = 0; r < R; ++r) {
      const float s = scale_at(w, n + r, g), sz = s * static_cast<float>(w.zero_code(n + r, g));
      const __m256 sv = _mm256_set1_ps(s);
      LOWBIT_UNROLL for (int t = 0; t < T; ++t) {
        total.acc[r][t] = _mm256_fmadd_ps(part[r][t], sv, total.acc[r][t]);
        total.corr[r][t] += sz * xw.group_sum(m0 + t, g);
      }
    }
  }
  total.store(y, m0, N, n);
}

// The scales of groups g0 .. g0 + count - 1 (count <= 8) of row n in lanes 0 .. count - 1 (lanes past them: other
// groups' or zero): one vector load of 8 where they lie in the row, else one at a time.
template <typename S>
inline __m256 load_scales8(const Packed<S>& w, int64_t n, int64_t g0, int64_t count) {
  const S* p = w.scale + n * w.G + g0;
  if constexpr (requires { floats8(p); }) {  // float32/16, bfloat16; the rest (double-quantised int8) one at a time
    if (g0 + 8 <= w.G) return floats8(p);
  }
  alignas(32) float v[8] = {};
  for (int64_t i = 0; i < count; ++i) v[i] = scale_at(w, n, g0 + i);
  return _mm256_load_ps(v);
}

// The zero codes of groups g0 .. g0 + count - 1 (count <= 8, g0 even) of row n as floats in lanes 0 .. count - 1:
// 2^(BITS-1) for symmetric codes; packed ones read as one 32-bit field where the row holds it, else one at a time.
template <int BITS, typename S>
inline __m256 load_zeros8(const Packed<S>& w, int64_t n, int64_t g0, int64_t count) {
  if (!w.zero) return _mm256_set1_ps(static_cast<float>(1 << (BITS - 1)));
  const uint8_t* z = w.zero + n * w.zero_row_bytes;
  const int64_t bit = g0 * BITS, byte = bit >> 3;
  if (byte + 4 <= w.zero_row_bytes) {  // 8 codes and the field's offset (0, or 2, 4, 6 at 3 bits) fit 32 bits
    uint32_t field;
    std::memcpy(&field, z + byte, 4);
    return _mm256_cvtepi32_ps(fields8<BITS>(field >> (bit & 7)));
  }
  alignas(32) float v[8] = {};
  for (int64_t i = 0; i < count; ++i) v[i] = static_cast<float>(w.zero_code(n, g0 + i));
  return _mm256_load_ps(v);
}

// `block_word_spans` at 8 words a step, for groups of 8, 16 or 32 columns (Q4_0's), which `block_words2` would run
// a half-empty step per group: every step holds whole groups, lane j's in group d / per + (j >> shift); each lane's
// zero point comes off as z · (sum of x over its word), and each lane is scaled by its group's scale.
template <int R, int T, int BITS, typename S>
void block_word_spans2(const Packed<S>& w, const Words& xw, int64_t m0, float* y, int64_t N, int64_t n) {
  Sums8<R, T> total;
  const int64_t words = w.K / 8;
  const int shift = __builtin_ctzll(w.group / 8), per = 8 >> shift;  // log2 of words per group; groups per step
  const __m256i lane_group = _mm256_srli_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), shift);
  for (int64_t d = 0; d < words; d += 8) {
    __m256i v[R];
    __m256 part[R][T];
    LOWBIT_UNROLL for (int r = 0; r < R; ++r) {
      const uint8_t* row = w.q + (n + r) * w.row_bytes;
      prefetch(row + BITS * d);
      v[r] = load_words2<BITS>(row, d, words - d);
      LOWBIT_UNROLL for (int t = 0; t < T; ++t) part[r][t] = _mm256_setzero_ps();
    }
    word_lanes2<R, T, BITS>(v, xw, m0, d, part);
    const int64_t g0 = d >> shift, groups = std::min<int64_t>(per, w.G - g0);
    __m256 xsum[T];  // `Words` keeps word sums up to D, a multiple of 16 words: d + 8 <= D
    LOWBIT_UNROLL for (int t = 0; t < T; ++t) xsum[t] = _mm256_loadu_ps(xw.word_sum(m0 + t) + d);
    LOWBIT_UNROLL for (int r = 0; r < R; ++r) {
      const __m256 sv = _mm256_permutevar8x32_ps(load_scales8(w, n + r, g0, groups), lane_group);
      const __m256 zv = _mm256_permutevar8x32_ps(load_zeros8<BITS>(w, n + r, g0, groups), lane_group);
      LOWBIT_UNROLL for (int t = 0; t < T; ++t)
        total.acc[r][t] = _mm256_fmadd_ps(_mm256_fnmadd_ps(zv, xsum[t], part[r][t]), sv, total.acc[r][t]);
    }
  }
  total.store(y, m0, N, n);
}

// `block_int8` at 8 codes a step: (c - z) widened to float, summed against x per group, then scaled; a group's
// last step (its codes read through a zeroed copy, never past the row) masked so that x past the group adds nothing.
template <int R, int T, typename S>
void block_int8_2(const Packed<S>& w, const Lanes& xl, int64_t m0, float* y, int64_t N, int64_t n) {
  Sums8<R, T> total;
  for (int64_t g = 0; g < w.G; ++g) {
    const int64_t b0 = w.first_byte(g), b1 = w.end_byte(g);
    __m256i z[R];
    __m256 part[R][T];
    LOWBIT_UNROLL for (int r = 0; r < R; ++r) {
      z[r] = _mm256_set1_epi32(w.zero_code(n + r, g));
      LOWBIT_UNROLL for (int t = 0; t < T; ++t) part[r][t] = _mm256_setzero_ps();
    }
    for (int64_t b = b0; b < b1; b += 8) {
      const int64_t left = b1 - b;
      __m256 xv[T];
      LOWBIT_UNROLL for (int t = 0; t < T; ++t) xv[t] = _mm256_loadu_ps(xl.at(m0 + t, 0) + b);
      LOWBIT_UNROLL for (int r = 0; r < R; ++r) {
        const uint8_t* p = w.q + (n + r) * w.row_bytes + b;
        if (((b - b0) & 63) == 0) prefetch(p);
        __m256 wv = _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_cvtepu8_epi32(load8(p, left)), z[r]));
        if (left < 8) wv = _mm256_and_ps(wv, _mm256_castsi256_ps(lanes_below(left)));
        LOWBIT_UNROLL for (int t = 0; t < T; ++t) part[r][t] = _mm256_fmadd_ps(wv, xv[t], part[r][t]);
      }
    }
    LOWBIT_UNROLL for (int r = 0; r < R; ++r) {
      const __m256 s = _mm256_set1_ps(scale_at(w, n + r, g));
      LOWBIT_UNROLL for (int t = 0; t < T; ++t) total.acc[r][t] = _mm256_fmadd_ps(part[r][t], s, total.acc[r][t]);
    }
  }
  total.store(y, m0, N, n);
}

// 2/4 bits, `block_lut` at 8 codes a step: each packed byte widened to a dword, code l of it (bits l·BITS ..) mapped
// through the group's table of value(c) · s. vpermps reads 8 entries: 2-bit codes index a table of their 4 held
// twice; 4-bit codes index the low and the high 8 entries at once and bit 3 of the code, moved to the sign bit,
// picks one (vblendvps).
template <int R, int T, int BITS, typename S>
void block_lut2(const Packed<S>& w, const Lanes& xl, int64_t m0, float* y, int64_t N, int64_t n) {
  constexpr int PER = 8 / BITS;
  Sums8<R, T> total;
  const __m256 iota = _mm256_setr_ps(0, 1, 2, 3, 4, 5, 6, 7);
  for (int64_t g = 0; g < w.G; ++g) {
    const int64_t b0 = w.first_byte(g), b1 = w.end_byte(g);
    __m256 low[R], high[R];  // value(c) s for c = 0 .. 7 and 8 .. 15 (2 bits: c = 0 .. 3, twice)
    LOWBIT_UNROLL for (int r = 0; r < R; ++r) {
      const __m256 s = _mm256_set1_ps(scale_at(w, n + r, g));
      if (w.levels) {
        low[r] = _mm256_mul_ps(_mm256_loadu_ps(w.levels), s);
        high[r] = _mm256_mul_ps(_mm256_loadu_ps(w.levels + 8), s);
      } else {
        const __m256 z = _mm256_set1_ps(static_cast<float>(w.zero_code(n + r, g)));
        const __m256 codes = BITS == 2 ? _mm256_setr_ps(0, 1, 2, 3, 0, 1, 2, 3) : iota;
        low[r] = _mm256_mul_ps(_mm256_sub_ps(codes, z), s);
        high[r] = _mm256_mul_ps(_mm256_sub_ps(_mm256_add_ps(iota, _mm256_set1_ps(8.0f)), z), s);
      }
    }
    for (int64_t b = b0; b < b1; b += 8) {
      const int64_t left = b1 - b;
      __m256 xv[T][PER];
      LOWBIT_UNROLL for (int t = 0; t < T; ++t)
        LOWBIT_UNROLL for (int l = 0; l < PER; ++l) xv[t][l] = _mm256_loadu_ps(xl.at(m0 + t, l) + b);
      const __m256 keep = _mm256_castsi256_ps(lanes_below(left));  // a group's last step: its bytes only
      LOWBIT_UNROLL for (int r = 0; r < R; ++r) {
        const uint8_t* p = w.q + (n + r) * w.row_bytes + b;
        if (((b - b0) & 63) == 0) prefetch(p);
        const __m256i c = _mm256_cvtepu8_epi32(load8(p, left));
        LOWBIT_UNROLL for (int l = 0; l < PER; ++l) {
          const __m256i idx = l ? _mm256_srli_epi32(c, l * BITS) : c;
          __m256 wv = _mm256_permutevar8x32_ps(low[r], idx);
          if constexpr (BITS == 4)
            wv = _mm256_blendv_ps(wv, _mm256_permutevar8x32_ps(high[r], idx),
                                  _mm256_castsi256_ps(_mm256_slli_epi32(c, 28 - 4 * l)));
          if (left < 8) wv = _mm256_and_ps(wv, keep);
          LOWBIT_UNROLL for (int t = 0; t < T; ++t) total.acc[r][t] = _mm256_fmadd_ps(wv, xv[t][l], total.acc[r][t]);
        }
      }
    }
  }
  total.store(y, m0, N, n);
}

struct ByteBlocks2 {
  template <int R, int T, typename S>
  static void run(const Packed<S>& w, const Lanes& xl, int64_t m0, float* y, int64_t N, int64_t n) {
    switch (w.bits) {
      case 2: block_lut2<R, T, 2>(w, xl, m0, y, N, n); break;
      case 4: block_lut2<R, T, 4>(w, xl, m0, y, N, n); break;
      default: block_int8_2<R, T>(w, xl, m0, y, N, n);
    }
  }
};

struct WordBlocks2 {
  template <int R, int T, typename S>
  static void run(const Packed<S>& w, const Words& xw, int64_t m0, float* y, int64_t N, int64_t n) {
    if (w.group < 64 && 64 % w.group == 0)
      w.bits == 4 ? block_word_spans2<R, T, 4>(w, xw, m0, y, N, n) : block_word_spans2<R, T, 3>(w, xw, m0, y, N, n);
    else
      w.bits == 4 ? block_words2<R, T, 4>(w, xw, m0, y, N, n) : block_words2<R, T, 3>(w, xw, m0, y, N, n);
  }
};

// An act-order row (a g_idx) in column order, 8 columns at a time (`at`): their groups' scales and zero points
// looked up in the row's tables (`row_tables`) — with vpermps from LOOK registers of 8 (1, 2 or 4: up to 32 groups;
// the default model's shapes have 5 and 12, LLaMA-7B's 4096 columns 32 in groups of 128), else gathered (LOOK = 0;
// vpgatherdd took ~17 cycles per 8 on this project's AVX2 machine) — the codes shifted out of their BITS bytes
// (8 bits: widened), and w = value(c) s formed as the reference does (subtract, then multiply); zero past K.
template <int BITS, int LOOK, typename S>
struct ScatteredRow2 {
  static constexpr int kRegs = LOOK > 0 ? LOOK : 1;
  const Packed<S>& w;
  const uint8_t* qrow;
  const float *s, *z;
  __m256 s_tab[kRegs], z_tab[kRegs], lev_lo, lev_hi;
  ScatteredRow2(const Packed<S>& w_, int64_t n, const float* s_, const float* z_)
      : w(w_), qrow(w_.q + n * w_.row_bytes), s(s_), z(z_) {
    if constexpr (LOOK > 0) {
      alignas(32) float tab[2][kRegs][8] = {};
      for (int64_t g = 0; g < w.G; ++g) tab[0][g >> 3][g & 7] = s[g], tab[1][g >> 3][g & 7] = z[g];
      LOWBIT_UNROLL for (int i = 0; i < kRegs; ++i) s_tab[i] = _mm256_load_ps(tab[0][i]), z_tab[i] = _mm256_load_ps(tab[1][i]);
    }
    lev_lo = w.levels ? _mm256_loadu_ps(w.levels) : _mm256_setzero_ps();
    lev_hi = w.levels ? _mm256_loadu_ps(w.levels + 8) : _mm256_setzero_ps();
  }
  __m256 look(const __m256 (&t)[kRegs], const float* all, __m256i g) const {
    if constexpr (LOOK == 0) {
      return _mm256_i32gather_ps(all, g, 4);
    } else {
      const __m256 bit3 = _mm256_castsi256_ps(_mm256_slli_epi32(g, 28));  // blendv reads the sign bit
      auto pair = [&](int i) {
        return _mm256_blendv_ps(_mm256_permutevar8x32_ps(t[i], g), _mm256_permutevar8x32_ps(t[i + 1], g), bit3);
      };
      if constexpr (LOOK == 1) return _mm256_permutevar8x32_ps(t[0], g);
      if constexpr (LOOK == 2) return pair(0);
      if constexpr (LOOK == 4) return _mm256_blendv_ps(pair(0), pair(2), _mm256_castsi256_ps(_mm256_slli_epi32(g, 27)));
    }
  }
  // the weights of columns k0 .. k0 + 7 (k0 a multiple of 8)
  __m256 at(int64_t k0) const {
    const int64_t left = w.K - k0;
    const __m256i g = left >= 8 ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w.g_idx + k0))
                                : _mm256_maskload_epi32(w.g_idx + k0, lanes_below(left));
    const uint8_t* p = qrow + k0 * BITS / 8;  // 8 codes: BITS bytes
    if (((k0 * BITS / 8) & 63) < BITS) prefetch(p);
    __m256i c;
    if constexpr (BITS == 8) {
      c = _mm256_cvtepu8_epi32(load8(p, left));
    } else {
      const int64_t bytes = std::min<int64_t>(BITS, w.row_bytes - k0 * BITS / 8);
      uint32_t word = 0;
      if (bytes == BITS) {
        std::memcpy(&word, p, BITS);  // a constant size: one or two loads, no call
      } else {
        word = static_cast<uint32_t>(bytes_le(p, bytes));
      }
      c = fields8<BITS>(word);
    }
    __m256 v;
    if (w.levels) {
      v = lookup16(lev_lo, lev_hi, c);
    } else {
      v = _mm256_sub_ps(_mm256_cvtepi32_ps(c), look(z_tab, z, g));
    }
    const __m256 wv = _mm256_mul_ps(v, look(s_tab, s, g));
    return left < 8 ? _mm256_and_ps(wv, _mm256_castsi256_ps(lanes_below(left))) : wv;
  }
};

// One act-order row, T tokens. xp: the tokens' x, each padded with zeros to Kp, a multiple of 8.
template <int T, int BITS, int LOOK, typename S>
void row_scattered2(const Packed<S>& w, int64_t n, const float* xp, int64_t Kp, int64_t m0, float* y, int64_t N,
                    const float* s, const float* z) {
  const ScatteredRow2<BITS, LOOK, S> row(w, n, s, z);
  __m256 acc[T];
  LOWBIT_UNROLL for (int t = 0; t < T; ++t) acc[t] = _mm256_setzero_ps();
  for (int64_t k0 = 0; k0 < w.K; k0 += 8) {
    const __m256 wv = row.at(k0);
    LOWBIT_UNROLL for (int t = 0; t < T; ++t)
      acc[t] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(xp + (m0 + t) * Kp + k0), acc[t]);
  }
  LOWBIT_UNROLL for (int t = 0; t < T; ++t) y[(m0 + t) * N + n] = reduce_add8(acc[t]);
}

// LOOK for a row of G groups (`ScatteredRow2`)
template <typename Fn>
inline void with_look2(int64_t G, Fn&& fn) {
  if (G <= 8) fn.template operator()<1>();
  else if (G <= 16) fn.template operator()<2>();
  else if (G <= 32) fn.template operator()<4>();
  else fn.template operator()<0>();
}

template <int BITS, int LOOK, typename S>
void rows_scattered2_bits(const Packed<S>& w, const float* xp, int64_t Kp, int64_t M, float* y, int64_t N, int64_t n0,
                          int64_t n1) {
  std::vector<float> s(std::max<int64_t>(w.G, 16)), z(std::max<int64_t>(w.G, 16));
  for (int64_t n = n0; n < n1; ++n) {
    row_tables(w, n, s.data(), z.data());
    token_passes(M, [&]<int T>(int64_t m0) { row_scattered2<T, BITS, LOOK>(w, n, xp, Kp, m0, y, N, s.data(), z.data()); });
  }
}

// rows [n0, n1) of act-order weights for all M tokens (x (M, K) as it is)
template <typename S>
void rows_scattered2(const Packed<S>& w, const float* x, int64_t M, float* y, int64_t N, int64_t n0, int64_t n1) {
  const int64_t Kp = (w.K + 7) / 8 * 8;
  std::vector<float> xp(M * Kp, 0.0f);
  for (int64_t m = 0; m < M; ++m) std::copy(x + m * w.K, x + (m + 1) * w.K, xp.begin() + m * Kp);
  with_look2(w.G, [&]<int LOOK>() {
    switch (w.bits) {
      case 2: rows_scattered2_bits<2, LOOK>(w, xp.data(), Kp, M, y, N, n0, n1); break;
      case 3: rows_scattered2_bits<3, LOOK>(w, xp.data(), Kp, M, y, N, n0, n1); break;
      case 4: rows_scattered2_bits<4, LOOK>(w, xp.data(), Kp, M, y, N, n0, n1); break;
      default: rows_scattered2_bits<8, LOOK>(w, xp.data(), Kp, M, y, N, n0, n1);
    }
  });
}

// rows [n0, n1) for all M tokens: R1 rows a pass at one token (4, or 2 where each row holds two tables), two at
// two, one at three or four
template <class B, int R1, typename S, typename X>
void rows_avx2(const Packed<S>& w, const X& x, int64_t M, float* y, int64_t N, int64_t n0, int64_t n1) {
  token_passes(M, [&]<int T>(int64_t m0) { rows_t<B, T == 1 ? R1 : T == 2 ? 2 : 1, T>(w, x, m0, y, N, n0, n1); });
}
#endif

// y (M, N) = x (M, K) @ dequant(w).T for rows [n0, n1)
template <typename S>
void gemv_rows(const Packed<S>& w, const Lanes& xl, int64_t M, float* y, int64_t N, int64_t n0, int64_t n1) {
#if defined(LOWBIT_AVX512)
  rows_avx512<ByteBlocks>(w, xl, M, y, N, n0, n1);
#elif defined(LOWBIT_AVX2)
  w.bits == 4 ? rows_avx2<ByteBlocks2, 2>(w, xl, M, y, N, n0, n1) : rows_avx2<ByteBlocks2, 4>(w, xl, M, y, N, n0, n1);
#else
  rows_portable(w, xl, M, y, N, n0, n1);
#endif
}

// the same from x in the `Words` layout (see `Weight::by_words` for which weights)
template <typename S>
void gemv_words(const Packed<S>& w, const Words& xw, int64_t M, float* y, int64_t N, int64_t n0, int64_t n1) {
#if defined(LOWBIT_AVX512)
  rows_avx512<WordBlocks>(w, xw, M, y, N, n0, n1);
#elif defined(LOWBIT_AVX2)
  rows_avx2<WordBlocks2, 4>(w, xw, M, y, N, n0, n1);
#else
  rows_portable_tri(w, xw, M, y, N, n0, n1);  // only 3-bit codes take this path without AVX-512 or AVX2
#endif
}

// the same for act-order weights, x as it is
template <typename S>
void gemv_scattered(const Packed<S>& w, const float* x, int64_t M, float* y, int64_t N, int64_t n0, int64_t n1) {
#if defined(LOWBIT_AVX512)
  rows16_all(w, x, M, y, N, n0, n1);
#elif defined(LOWBIT_AVX2)
  rows_scattered2(w, x, M, y, N, n0, n1);
#else
  rows_portable_scattered(w, x, M, y, N, n0, n1);
#endif
}

#ifdef LOWBIT_VBMI
// One row's G scales (or zero points) fetched for 16 columns from their groups g. Up to 128 groups the
// row's table is held in REGS registers of 16 and looked up with two-register permutes, the pairs'
// results chosen by bits 5 and 6 of g (REGS = 2: up to 32 groups, 4: 64, 8: 128); above, a gather.
template <int REGS>
struct RowScales {
  __m512 t[REGS > 0 ? REGS : 1];
  const float* all;
  RowScales(const float* s, int64_t G) : all(s) {
    LOWBIT_UNROLL for (int r = 0; r < REGS; ++r) {
      t[r] = 16 * r < G ? _mm512_maskz_loadu_ps(tail_mask(G - 16 * r), s + 16 * r) : _mm512_setzero_ps();
    }
  }
  __m512 at(__m512i g) const {
    if constexpr (REGS == 0) {
      return _mm512_i32gather_ps(g, all, 4);
    } else {
      const __m512 low = _mm512_permutex2var_ps(t[0], g, t[1]);
      if constexpr (REGS == 2) return low;
      const __mmask16 bit5 = _mm512_test_epi32_mask(g, _mm512_set1_epi32(32));
      const __m512 to64 = _mm512_mask_blend_ps(bit5, low, _mm512_permutex2var_ps(t[2], g, t[3]));
      if constexpr (REGS == 4) return to64;
      const __m512 high = _mm512_mask_blend_ps(bit5, _mm512_permutex2var_ps(t[4], g, t[5]),
                                               _mm512_permutex2var_ps(t[6], g, t[7]));
      return _mm512_mask_blend_ps(_mm512_test_epi32_mask(g, _mm512_set1_epi32(64)), to64, high);
    }
  }
};

// One act-order row in column order, 16 columns at a time (the whole row: masked at its end).
template <int BITS, int REGS, typename S>
void dequant_row_scattered(const Packed<S>& w, const uint8_t* qrow, float* orow, const float* s, const float* z) {
  const RowScales<REGS> sv(s, w.G), zv(z, w.G);
  const __m512 levels = w.levels ? _mm512_loadu_ps(w.levels) : _mm512_setzero_ps();
  for (int64_t k0 = 0; k0 < w.K; k0 += 16) {
    const __mmask16 k = tail_mask(w.K - k0);
    const __m512i g = _mm512_maskz_loadu_epi32(k, w.g_idx + k0);
    const __m512i c = load_codes<BITS>(qrow, w.row_bytes, k0);
    const __m512 v = w.levels ? _mm512_permutexvar_ps(c, levels) : _mm512_sub_ps(_mm512_cvtepi32_ps(c), zv.at(g));
    _mm512_mask_storeu_ps(orow + k0, k, _mm512_mul_ps(v, sv.at(g)));
  }
}
#endif

// Act-order weights: w[n, k] = value(c) * s[g_idx[k]], value(c) = c - z[g_idx[k]] or levels[c], the
// reference's arithmetic (subtract, then multiply).
template <int BITS, typename S>
void dequant_rows_scattered(const Packed<S>& w, float* out, int64_t first, int64_t n0, int64_t n1) {
  std::vector<float> s(w.G), z(w.G);
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* qrow = w.q + n * w.row_bytes;
    float* orow = out + (n - first) * w.K;
    row_tables(w, n, s.data(), z.data());
#if defined(LOWBIT_VBMI)
    if (w.G <= 32) dequant_row_scattered<BITS, 2>(w, qrow, orow, s.data(), z.data());
    else if (w.G <= 64) dequant_row_scattered<BITS, 4>(w, qrow, orow, s.data(), z.data());
    else if (w.G <= 128) dequant_row_scattered<BITS, 8>(w, qrow, orow, s.data(), z.data());
    else dequant_row_scattered<BITS, 0>(w, qrow, orow, s.data(), z.data());
#elif defined(LOWBIT_AVX2)
    with_look2(w.G, [&]<int LOOK>() {
      const ScatteredRow2<BITS, LOOK, S> row(w, n, s.data(), z.data());
      int64_t k0 = 0;
      for (; k0 + 8 <= w.K; k0 += 8) _mm256_storeu_ps(orow + k0, row.at(k0));
      if (k0 < w.K) _mm256_maskstore_ps(orow + k0, lanes_below(w.K - k0), row.at(k0));
    });
#else
    for (int64_t k = 0; k < w.K; ++k) orow[k] = scattered_weight(w, qrow, k, s.data(), z.data());
#endif
  }
}

// w[n, :] = value(c) * s for rows [n0, n1), written to row n - first of out (rows from `first` on, K
// wide): the reference's float weights
template <int BITS, typename S>
void dequant_rows_bits(const Packed<S>& w, float* out, int64_t first, int64_t n0, int64_t n1) {
  if (w.g_idx) return dequant_rows_scattered<BITS>(w, out, first, n0, n1);
  constexpr int PER = BITS == 3 ? 1 : 8 / BITS, MASK = (1 << BITS) - 1;  // PER: codes per byte (2, 4, 8 bits)
  float lut[MASK + 1];
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* qrow = w.q + n * w.row_bytes;
    float* orow = out + (n - first) * w.K;
    for (int64_t g = 0; g < w.G; ++g) {
      const int64_t k0 = g * w.group, k1 = std::min(w.K, k0 + w.group);
      const float s = scale_at(w, n, g);
      if constexpr (BITS == 8) {
        const float z = static_cast<float>(w.zero_code(n, g));
        for (int64_t k = k0; k < k1; ++k) orow[k] = (static_cast<float>(qrow[k]) - z) * s;
      } else if constexpr (BITS == 3) {  // whole triples (K and the group are multiples of 8)
        w.fill_table(n, g, s, lut);
        int64_t k = k0;
#ifdef LOWBIT_AVX512
        {  // two triples, 16 codes: lanes 0-7 hold the first, 8-15 the second, each lane shifts its code down
          const __m512 table = _mm512_maskz_loadu_ps(0xFF, lut);
          const __m512i shifts = _mm512_set_epi32(21, 18, 15, 12, 9, 6, 3, 0, 21, 18, 15, 12, 9, 6, 3, 0);
          for (; k + 16 <= k1; k += 16) {
            const __m512i v = _mm512_mask_set1_epi32(_mm512_set1_epi32(static_cast<int>(triple(qrow, k / 8))),
                                                     0xFF00, static_cast<int>(triple(qrow, k / 8 + 1)));
            const __m512i c = _mm512_and_si512(_mm512_srlv_epi32(v, shifts), _mm512_set1_epi32(7));
            _mm512_storeu_ps(orow + k, _mm512_permutexvar_ps(c, table));
          }
        }
#elif defined(LOWBIT_AVX2)
        {  // one triple, 8 codes, looked up in the 8-entry table
          const __m256 table = _mm256_loadu_ps(lut);
          for (; k + 8 <= k1; k += 8)
            _mm256_storeu_ps(orow + k, _mm256_permutevar8x32_ps(table, fields8<3>(triple(qrow, k / 8))));
        }
#endif
        for (; k < k1; k += 8) {
          const uint32_t v = triple(qrow, k / 8);
          for (int q = 0; q < 8; ++q) orow[k + q] = lut[(v >> (3 * q)) & 7];
        }
      } else {
        w.fill_table(n, g, s, lut);
        int64_t k = k0;
#ifdef LOWBIT_AVX512
        if constexpr (BITS == 2) {  // 16 codes in 4 bytes (a group starts on a byte): each lane shifts its own down
          const __m512 table = _mm512_maskz_loadu_ps(0xF, lut);
          const __m512i shifts = _mm512_set_epi32(30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
          for (; k + 16 <= k1; k += 16) {
            uint32_t word;
            std::memcpy(&word, qrow + k / 4, sizeof word);
            const __m512i c = _mm512_and_si512(_mm512_srlv_epi32(_mm512_set1_epi32(static_cast<int>(word)), shifts),
                                               _mm512_set1_epi32(3));
            _mm512_storeu_ps(orow + k, _mm512_permutexvar_ps(c, table));
          }
        }
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
#elif defined(LOWBIT_AVX2)
        // the codes of a 32-bit word (a group starts on a byte), 8 a step, looked up in the group's table: 2 bits
        // in one register (codes 0 .. 3 read its low half only), 4 bits in two
        if constexpr (BITS == 2) {
          const __m256 table = _mm256_castps128_ps256(_mm_loadu_ps(lut));
          for (; k + 16 <= k1; k += 16) {
            uint32_t word;
            std::memcpy(&word, qrow + k / 4, sizeof word);
            _mm256_storeu_ps(orow + k, _mm256_permutevar8x32_ps(table, fields8<2>(word)));
            _mm256_storeu_ps(orow + k + 8, _mm256_permutevar8x32_ps(table, fields8<2>(word >> 16)));
          }
        }
        if constexpr (BITS == 4) {
          const __m256 low = _mm256_loadu_ps(lut), high = _mm256_loadu_ps(lut + 8);
          for (; k + 8 <= k1; k += 8) {
            uint32_t word;
            std::memcpy(&word, qrow + k / 2, sizeof word);
            _mm256_storeu_ps(orow + k, lookup16(low, high, fields8<4>(word)));
          }
        }
#endif
        for (; k + PER <= k1; k += PER) {  // whole bytes (a group starts on one)
          const int byte = qrow[k / PER];
          LOWBIT_UNROLL for (int l = 0; l < PER; ++l) orow[k + l] = lut[(byte >> (l * BITS)) & MASK];
        }
        for (; k < k1; ++k) orow[k] = lut[(qrow[k / PER] >> ((k % PER) * BITS)) & MASK];
      }
    }
  }
}

template <typename S>
void dequant_rows(const Packed<S>& w, float* out, int64_t first, int64_t n0, int64_t n1) {
  switch (w.bits) {
    case 2: dequant_rows_bits<2>(w, out, first, n0, n1); break;
    case 3: dequant_rows_bits<3>(w, out, first, n0, n1); break;
    case 4: dequant_rows_bits<4>(w, out, first, n0, n1); break;
    default: dequant_rows_bits<8>(w, out, first, n0, n1);
  }
}

// ---- Float weights (an output projection or any layer kept in float32, bfloat16 or float16) ----
//
// float_gemv_cpu, y[m, n] = sum_k x[m, k] w[n, k] for a few tokens, x float32: R rows by T tokens per pass,
// each weight vector loaded once and used for T tokens, each x vector for R rows, the sums in float32
// (16 lanes per row, added across lanes at the end). On this project's 2-core machine torch's own float32
// GEMV read the default model's 49152 × 576 head at 5–10 GB/s, this loop at about 20, a plain sum of the
// weight at 25–40 (bench/results/cpu_float_gemv.md). AVX2 builds run it 8 lanes wide (an AMD EPYC Zen 3,
// 2026-11-29: 1.07–5.9x F.linear from 1 to 12 tokens, bench/results/cpu_float_gemv_avx2.md; the compiler's
// vectorised loop, a row and a token at a time, had been 1.6–2.3x slower than this at 4 tokens).

// 16 weights from p as float32: those whose bit is set in k, zeros for the rest
#ifdef LOWBIT_AVX512
inline __m512 weights16(const float* p, __mmask16 k) { return _mm512_maskz_loadu_ps(k, p); }
inline __m512 weights16(const c10::BFloat16* p, __mmask16 k) {
  const __m512i bits = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(k, p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(bits, 16));  // bfloat16 is float32's top half
}
inline __m512 weights16(const c10::Half* p, __mmask16 k) { return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(k, p)); }

template <int R, int T, typename W>
inline void float_step(const W* row, const float* x, int64_t K, int64_t k, int64_t m0, __mmask16 mask,
                       __m512 (&acc)[R][T]) {
  __m512 xv[T];
  LOWBIT_UNROLL for (int t = 0; t < T; ++t) xv[t] = _mm512_maskz_loadu_ps(mask, x + (m0 + t) * K + k);
  LOWBIT_UNROLL for (int r = 0; r < R; ++r) {
    _mm_prefetch(reinterpret_cast<const char*>(row + (R + r) * K + k), _MM_HINT_T0);  // the next rows
    const __m512 wv = weights16(row + r * K + k, mask);
    LOWBIT_UNROLL for (int t = 0; t < T; ++t) acc[r][t] = _mm512_fmadd_ps(wv, xv[t], acc[r][t]);
  }
}

template <int R, int T, typename W>
inline void float_block(const W* w, const float* x, float* y, int64_t N, int64_t K, int64_t n, int64_t m0) {
  __m512 acc[R][T];
  LOWBIT_UNROLL for (int r = 0; r < R; ++r)
    LOWBIT_UNROLL for (int t = 0; t < T; ++t) acc[r][t] = _mm512_setzero_ps();
  const W* row = w + n * K;
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) float_step<R, T>(row, x, K, k, m0, 0xFFFF, acc);
  if (k < K) float_step<R, T>(row, x, K, k, m0, tail_mask(K - k), acc);
  LOWBIT_UNROLL for (int r = 0; r < R; ++r)
    LOWBIT_UNROLL for (int t = 0; t < T; ++t) y[(m0 + t) * N + n + r] = _mm512_reduce_add_ps(acc[r][t]);
}

// R rows at n, all M tokens, four at a time (the rows stay in cache between the token passes)
template <int R, typename W>
inline void float_rows(const W* w, const float* x, float* y, int64_t M, int64_t N, int64_t K, int64_t n) {
  token_passes(M, [&]<int T>(int64_t m0) { float_block<R, T>(w, x, y, N, K, n, m0); });
}
#elif defined(LOWBIT_AVX2)
// 8 lanes: `float_block`'s sums over whole steps of 8 columns, the K % 8 columns past them added one at a time

template <int R, int T, typename W>
inline void float_block2(const W* w, const float* x, float* y, int64_t N, int64_t K, int64_t n, int64_t m0) {
  __m256 acc[R][T];
  LOWBIT_UNROLL for (int r = 0; r < R; ++r)
    LOWBIT_UNROLL for (int t = 0; t < T; ++t) acc[r][t] = _mm256_setzero_ps();
  const W* row = w + n * K;
  const int64_t whole = K / 8 * 8;
  for (int64_t k = 0; k < whole; k += 8) {
    __m256 xv[T];
    LOWBIT_UNROLL for (int t = 0; t < T; ++t) xv[t] = _mm256_loadu_ps(x + (m0 + t) * K + k);
    LOWBIT_UNROLL for (int r = 0; r < R; ++r) {
      _mm_prefetch(reinterpret_cast<const char*>(row + (R + r) * K + k), _MM_HINT_T0);  // the next rows
      const __m256 wv = floats8(row + r * K + k);
      LOWBIT_UNROLL for (int t = 0; t < T; ++t) acc[r][t] = _mm256_fmadd_ps(wv, xv[t], acc[r][t]);
    }
  }
  LOWBIT_UNROLL for (int r = 0; r < R; ++r)
    LOWBIT_UNROLL for (int t = 0; t < T; ++t) {
      float sum = reduce_add8(acc[r][t]);
      for (int64_t k = whole; k < K; ++k) sum += x[(m0 + t) * K + k] * static_cast<float>(row[r * K + k]);
      y[(m0 + t) * N + n + r] = sum;
    }
}

// R rows at n, all M tokens: four tokens a pass with R = 2 (16 registers: 8 sums, 4 x, a weight), else R
template <int R, typename W>
inline void float_rows(const W* w, const float* x, float* y, int64_t M, int64_t N, int64_t K, int64_t n) {
  token_passes(M, [&]<int T>(int64_t m0) {
    if constexpr (T <= 2 || R == 1) {
      float_block2<R, T>(w, x, y, N, K, n, m0);
    } else {
      for (int r = 0; r < R; r += 2) float_block2<2, T>(w, x, y, N, K, n + r, m0);
    }
  });
}
#endif

// rows [n0, n1) of y (M, N) = x (M, K) @ w (N, K).T
template <typename W>
void float_gemv(const W* w, const float* x, float* y, int64_t M, int64_t N, int64_t K, int64_t n0, int64_t n1) {
  int64_t n = n0;
#if defined(LOWBIT_AVX512) || defined(LOWBIT_AVX2)
  constexpr int kRows = 4;
  for (; n + kRows <= n1; n += kRows) float_rows<kRows>(w, x, y, M, N, K, n);
  for (; n < n1; ++n) float_rows<1>(w, x, y, M, N, K, n);
#endif
  for (; n < n1; ++n)
    for (int64_t m = 0; m < M; ++m) {
      float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
      for (int64_t k = 0; k < K; ++k) sum += x[m * K + k] * static_cast<float>(w[n * K + k]);
      y[m * N + n] = sum;
    }
}

}  // namespace lowbit

// The entry points of the kernels for scales of type S: `LOWBIT_KERNELS(, S)` instantiates them,
// `LOWBIT_KERNELS(extern, S)` says another translation unit does.
#ifdef LOWBIT_VNNI
#define LOWBIT_VNNI_KERNEL(EXTERN, S) \
  EXTERN template void gemv_vnni<S>(const Packed<S>&, const Planes*, int64_t, float*, int64_t, int64_t, int64_t);
#else
#define LOWBIT_VNNI_KERNEL(EXTERN, S)
#endif
#define LOWBIT_KERNELS(EXTERN, S)                                                                                    \
  namespace lowbit {                                                                                                 \
  EXTERN template void gemv_rows<S>(const Packed<S>&, const Lanes&, int64_t, float*, int64_t, int64_t, int64_t);     \
  EXTERN template void gemv_words<S>(const Packed<S>&, const Words&, int64_t, float*, int64_t, int64_t, int64_t);    \
  EXTERN template void gemv_scattered<S>(const Packed<S>&, const float*, int64_t, float*, int64_t, int64_t, int64_t); \
  EXTERN template void dequant_rows<S>(const Packed<S>&, float*, int64_t, int64_t, int64_t);                         \
  LOWBIT_VNNI_KERNEL(EXTERN, S)                                                                                      \
  }

