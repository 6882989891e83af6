// lowbit W4A16 / W8A16 / W3A16 for few tokens (decode, M <= 32) on NVIDIA tensor cores (sm_80 and newer).
//
// y (M, N) = x (M, K) @ W (N, K)^T (+ bias), W the stored codes of lowbit's int3, int4 or int8 format read
// in place: qweight (N, K * BITS / 32) int32, each row an LSB-first bitstream of BITS-bit codes
// (unsigned: symmetric codes are offset by 2^(BITS - 1); 3-bit codes straddle words), scales (G, N), zero
// points (G, N) uint8 or none. Group sizes that are multiples of 128 (and per-channel), K a multiple of 128,
// N of 16.
//
// The weight is the MMA's left operand (m16n8k16: 16 weight rows by 8 tokens), so one token
// wastes no weight bandwidth and the decoded codes go from the loaded word straight into the
// A fragment's registers, never through shared memory (the bottleneck of the Triton kernels,
// bench/results/gpu_kernels_notes.md). The same trick as Marlin (Frantar et al., 2024,
// "MARLIN: Mixed-Precision Auto-Regressive Parallel Inference on Large Language Models")
// turns codes into 16-bit floats: or-ing a nibble into the mantissa of 128.0 (bf16) or 1024.0
// (fp16) gives 128 + q exactly, and one packed FMA takes 128 + z off, leaving q - z exactly.
// Unlike Marlin no pre-shuffled copy of the weight is made: the MMA only needs each k slot of
// A and B to meet the same column, so the kernel permutes K instead of the weight. Thread
// (g, t) of a warp (g = lane / 4, t = lane % 4) reads, per 128-column block, one 16-byte
// vector of words of rows g and g + 8 (columns 32t .. 32t + 31), and lane pair slot
// (2t, 2t + 1) of an MMA step holds nibbles (p, p + 4) of one word — the two that one mask
// lifts into a packed pair without shifting either — while x's matching pair is assembled
// with one byte permute. Scales multiply each block's fp32 partial sums (one group per block),
// so codes are decoded to exact integers and the scale is applied in fp32, not rounded into
// the weight. 8-bit codes take two 16-byte vectors per row and block; each MMA step takes one
// word's byte pairs (0, 1) and (2, 3), which meet x's words as they are (decode_byte_pair). 3-bit
// codes take 3 words per row and block, regrouped into four 24-bit groups of 8 codes that stand where
// int4's words do (decode_pair3).
//
// Each warp owns R tiles of 16 rows and walks its split's range of 128-column blocks with the
// words of the S blocks ahead loaded while this one is decoded. Splits of K (gridDim.y > 1) write fp32
// partials to a workspace; the last block of a column of splits to finish (a counter per
// blockIdx.x, reset by that block) sums them in split order and writes y: one launch, the
// same sum every run.
//
// No CUDA headers are needed (NVRTC compiles this as is): 16-bit values travel as raw bits
// and the few instructions used are written as PTX.

typedef unsigned int u32;
typedef unsigned short u16;

struct U4 { u32 x, y, z, w; };

#ifdef LOWBIT_HOST
// The same primitives in C++ on the CPU, each warp's lanes as threads that meet at every MMA: the
// tests run this source there (tests/kernels/w4a16_host.h). Not part of a GPU build.
#include "w4a16_host.h"
#else
// -- the PTX primitives ---------------------------------------------------------------------------

__device__ __forceinline__ U4 load_stream(const u32* p) {  // read once: keep it out of L1
  U4 v;
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
  return v;
}

__device__ __forceinline__ U4 load_cached(const u32* p) {  // x: read by every warp of the block
  U4 v;
  asm volatile("ld.global.nc.v4.u32 {%0, %1, %2, %3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
  return v;
}

__device__ __forceinline__ u32 load_word(const u32* p) {  // 3-bit codes: a lane's 3 words share sectors, L1 keeps them
  u32 v;
  asm volatile("ld.global.nc.u32 %0, [%1];" : "=r"(v) : "l"(p));
  return v;
}

__device__ __forceinline__ float load_cg(const float* p) {  // another block's partial, past L1
  float v;
  asm volatile("ld.global.cg.f32 %0, [%1];" : "=f"(v) : "l"(p));
  return v;
}

__device__ __forceinline__ void store_u4(u16* p, U4 v) {
  asm volatile("st.global.v4.u32 [%0], {%1, %2, %3, %4};" :: "l"(p), "r"(v.x), "r"(v.y), "r"(v.z), "r"(v.w) : "memory");
}

__device__ __forceinline__ void fence_acq_rel() { asm volatile("fence.acq_rel.gpu;" ::: "memory"); }

__device__ __forceinline__ u32 arrive(u32* counter) {  // the count before this block's arrival
  u32 old;
  asm volatile("atom.acq_rel.gpu.global.add.u32 %0, [%1], 1;" : "=r"(old) : "l"(counter) : "memory");
  return old;
}

__device__ __forceinline__ float bits_float(u32 b) {
  float f;
  asm("mov.b32 %0, %1;" : "=f"(f) : "r"(b));
  return f;
}

__device__ __forceinline__ float f16_to_float(u16 h) {
  float f;
  asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
  return f;
}

__device__ __forceinline__ u16 float_to_bf16(float f) {
  u16 h;
  asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(f));
  return h;
}

__device__ __forceinline__ u16 float_to_f16(float f) {
  u16 h;
  asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
  return h;
}

__device__ __forceinline__ u32 pack_bf16x2(float lo, float hi) {  // both exact here: no rounding
  u32 d;
  asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(d) : "f"(hi), "f"(lo));
  return d;
}

__device__ __forceinline__ u32 fma_bf16x2(u32 a, u32 b, u32 c) {
  u32 d;
  asm("fma.rn.bf16x2 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
  return d;
}

__device__ __forceinline__ u32 fma_f16x2(u32 a, u32 b, u32 c) {
  u32 d;
  asm("fma.rn.f16x2 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
  return d;
}

__device__ __forceinline__ u32 and_or(u32 a, u32 b, u32 c) {  // (a & b) | c in one instruction
  u32 d;
  asm("lop3.b32 %0, %1, %2, %3, 0xEA;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
  return d;
}

template <int SEL> __device__ __forceinline__ u32 byte_perm(u32 lo, u32 hi) {
  u32 d;
  asm("prmt.b32 %0, %1, %2, %3;" : "=r"(d) : "r"(lo), "r"(hi), "n"(SEL));
  return d;
}

// d = a (16 x 16, row-major fragments) * b (16 x 8, column-major) + d, fp32 accumulation.
template <int DT>
__device__ __forceinline__ void mma(float* c, u32 a0, u32 a1, u32 a2, u32 a3, u32 b0, u32 b1) {
  if (DT == 0) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
  } else {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
  }
}
#endif

// -- the kernel -------------------------------------------------------------------------------------

__device__ __forceinline__ int imin(int a, int b) { return a < b ? a : b; }

template <int DT> struct Half16;  // DT 0: bfloat16, 1: float16
template <> struct Half16<0> {
  static constexpr u32 MAGIC = 0x43004300u;  // 128.0 in each half; 128 + q for q < 16 exactly
  static constexpr u32 NEG_MAGIC = 0xC300u;  // -128.0
  static constexpr u32 ONE = 0x3F803F80u;
};
template <> struct Half16<1> {
  static constexpr u32 MAGIC = 0x64006400u;  // 1024.0; 1024 + q for q < 1024 exactly
  static constexpr u32 NEG_MAGIC = 0xE400u;
  static constexpr u32 ONE = 0x3C003C00u;
};
constexpr u32 FLOAT_MAGIC = 0x4B000000u;  // 2^23 in float32: 2^23 + q for any byte q exactly
constexpr u32 NEG_FLOAT_MAGIC = 0xCB000000u;

template <int DT> __device__ __forceinline__ float half_to_float(u16 h) {
  return DT == 0 ? bits_float((u32)h << 16) : f16_to_float(h);
}

template <int DT> __device__ __forceinline__ u16 float_to_half(float f) {
  return DT == 0 ? float_to_bf16(f) : float_to_f16(f);
}

// Scale dtypes (SDT): 0 float32, 1 bfloat16, 2 float16.
template <int SDT> __device__ __forceinline__ float load_scale(const void* p, long long i);
template <> __device__ __forceinline__ float load_scale<0>(const void* p, long long i) {
  return static_cast<const float*>(p)[i];
}
template <> __device__ __forceinline__ float load_scale<1>(const void* p, long long i) {
  return half_to_float<0>(static_cast<const u16*>(p)[i]);
}
template <> __device__ __forceinline__ float load_scale<2>(const void* p, long long i) {
  return half_to_float<1>(static_cast<const u16*>(p)[i]);
}

template <int DT> __device__ __forceinline__ u32 fma2(u32 a, u32 b, u32 c) {
  return DT == 0 ? fma_bf16x2(a, b, c) : fma_f16x2(a, b, c);
}

// Nibbles p and p + 4 of word w as the packed pair (q_p - z, q_{p+4} - z); neg_c = -(MAGIC + z).
template <int DT, int P> __device__ __forceinline__ u32 decode_pair(u32 w, u32 neg_c) {
  const u32 v = and_or(P ? (w >> (4 * P)) : w, 0x000F000Fu, Half16<DT>::MAGIC);
  return fma2<DT>(v, Half16<DT>::ONE, neg_c);
}

// 3-bit codes: eight to 24 bits, LSB first; a lane's 32 codes are 96 bits in 3 words, group j (codes
// 8j .. 8j + 7) bits 24j .. 24j + 23.
__device__ __forceinline__ u32 group_of3(const u32 (&w)[3], int j) {
  return j == 0 ? w[0] : j == 1 ? (w[0] >> 24) | (w[1] << 8) : j == 2 ? (w[1] >> 16) | (w[2] << 16) : w[2] >> 8;
}

// Codes p and p + 4 of a 3-bit group (bits 3p and 3p + 12) as the packed pair (q_p - z, q_{p+4} - z):
// two shifts bring them to bits 0 and 16, two lop3 mask them into 128.0's (1024.0's) mantissa.
template <int DT, int P> __device__ __forceinline__ u32 decode_pair3(u32 g, u32 neg_c) {
  const u32 lo = g >> (3 * P);
  const u32 hi = 3 * P <= 4 ? g << (4 - 3 * P) : g >> (3 * P - 4);  // code p + 4 to bit 16
  const u32 v = and_or(hi, 0x00070000u, and_or(lo, 0x7u, Half16<DT>::MAGIC));
  return fma2<DT>(v, Half16<DT>::ONE, neg_c);
}

// Bytes i and i + 1 of word w (8-bit codes) as the packed pair (q_i - z, q_{i+1} - z). fp16: prmt puts
// each byte under 1024.0's exponent byte, one packed FMA takes 1024 + z off (neg_c). bf16's 8-bit
// mantissa cannot hold 128 + q for q >= 128, so each byte goes under float32's 2^23 instead, a float
// add takes 2^23 + z off (neg_c is that float's bits) and the exact pair is packed to bf16.
template <int DT, int I> __device__ __forceinline__ u32 decode_byte_pair(u32 w, u32 neg_c) {
  if constexpr (DT == 1) {
    const u32 v = byte_perm<0x7050 | ((I + 1) << 8) | I>(w, Half16<1>::MAGIC);
    return fma2<1>(v, Half16<1>::ONE, neg_c);
  }
  const float c = bits_float(neg_c);
  const float lo = bits_float(byte_perm<0x7440 | I>(w, FLOAT_MAGIC)) + c;
  const float hi = bits_float(byte_perm<0x7440 | (I + 1)>(w, FLOAT_MAGIC)) + c;
  return pack_bf16x2(lo, hi);
}

// x's elements (p, p + 4) of one 8-element run held in two words: lo = elements 0..3's word
// (p even: the pair's own word), hi = elements 4..7's; SEL picks the low (0x5410) or high (0x7632) half of each.
template <int SEL> __device__ __forceinline__ u32 pair_of(u32 lo, u32 hi) { return byte_perm<SEL>(lo, hi); }

// One 128-column block of one thread: its weight words (rows g and g + 8 of each of R tiles; BITS / 4
// vectors of 4 words per row), x's words (token g of each of NT tiles of 8 tokens), scales and the
// zero points' -(MAGIC + z).
template <int R, int NT, int BITS> struct Block {
  u32 wlo[R][BITS], whi[R][BITS];
  U4 x[NT][4];
  float slo[R], shi[R];
  u32 clo[R], chi[R];
};

// A lane's BITS words of one row and block: 16-byte vectors (4- and 8-bit codes), or 3 words (3-bit codes:
// 12 bytes, 4-byte aligned).
template <int BITS> __device__ __forceinline__ void load_words(u32 (&w)[BITS], const u32* p) {
  if constexpr (BITS % 4 == 0) {
#pragma unroll
    for (int v = 0; v < BITS / 4; ++v) {
      const U4 q = load_stream(p + 4 * v);
      w[4 * v] = q.x, w[4 * v + 1] = q.y, w[4 * v + 2] = q.z, w[4 * v + 3] = q.w;
    }
  } else {
#pragma unroll
    for (int i = 0; i < BITS; ++i) w[i] = load_word(p + i);
  }
}

// What the decode adds to a code's magic-number value to leave q - z: -(MAGIC + z) in both halves, or
// for bf16 with 8-bit codes the float32 -(2^23 + z).
template <int DT, int BITS> __device__ __forceinline__ u32 neg_offset(u32 z) {
  if constexpr (BITS == 8 && DT == 0) return NEG_FLOAT_MAGIC + z;
  return (Half16<DT>::NEG_MAGIC + z) * 0x00010001u;
}

template <int DT, int SDT, int R, int NT, bool ZP, int BITS>
__device__ __forceinline__ void load_block(Block<R, NT, BITS>& b, const u32* __restrict__ x, const u32* __restrict__ qw,
                                           const void* __restrict__ scales, const unsigned char* __restrict__ zeros,
                                           int kb, int row0, int g, int t, int M, int N, int K, int group) {
  const int KW = K * BITS / 32;
  const int grp = (kb << 7) / group;  // a block lies in one group (group % 128 == 0)
  const int word0 = kb * 4 * BITS + t * BITS;  // this lane's columns 32 t .. 32 t + 31 of the block
#pragma unroll
  for (int r = 0; r < R; ++r) {
    const int n = row0 + 16 * r + g;
    if (row0 + 16 * r < N) {
      load_words<BITS>(b.wlo[r], qw + (long long)n * KW + word0);
      load_words<BITS>(b.whi[r], qw + (long long)(n + 8) * KW + word0);
      b.slo[r] = load_scale<SDT>(scales, (long long)grp * N + n);
      b.shi[r] = load_scale<SDT>(scales, (long long)grp * N + n + 8);
      const u32 zlo = ZP ? zeros[(long long)grp * N + n] : 1u << (BITS - 1);
      const u32 zhi = ZP ? zeros[(long long)grp * N + n + 8] : 1u << (BITS - 1);
      b.clo[r] = neg_offset<DT, BITS>(zlo);
      b.chi[r] = neg_offset<DT, BITS>(zhi);
    } else {
#pragma unroll
      for (int i = 0; i < BITS; ++i) b.wlo[r][i] = b.whi[r][i] = 0;
      b.slo[r] = b.shi[r] = 0.f;
      b.clo[r] = b.chi[r] = neg_offset<DT, BITS>(0);
    }
  }
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) {
    const int token = 8 * nt + g;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      // x as 32-bit words: row `token` starts at token * K / 2; this thread's 32 columns at (kb * 128 + 32 t) / 2
      b.x[nt][j] = token < M ? load_cached(x + (long long)token * (K >> 1) + (kb << 6) + (t << 4) + (j << 2))
                             : U4{0, 0, 0, 0};
    }
  }
}

template <int R, int NT> __device__ __forceinline__ void zero(float (&a)[R][NT][4]) {
#pragma unroll
  for (int r = 0; r < R; ++r)
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int i = 0; i < 4; ++i) a[r][nt][i] = 0.f;
}

template <int DT, int R, int NT, int BITS>
__device__ __forceinline__ void compute_block(const Block<R, NT, BITS>& b, float (&acc)[R][NT][4]) {
  float part[R][NT][4];
  zero(part);

  // 4-bit: step s = 2 j + h takes word j of the lane's four, nibble pairs (2h, 2h + 4) and (2h + 1, 2h + 5),
  // and x's matching pairs made by prmt; 3-bit: the same with the 24-bit group j for word j. 8-bit: step s
  // takes word s of the lane's eight, byte pairs (0, 1) and (2, 3), which meet x's words as they are.
#pragma unroll
  for (int s = 0; s < 8; ++s) {
    const int j = s >> 1, h = s & 1;
    u32 b0[NT], b1[NT];
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
      const U4& xv = b.x[nt][j];  // x0x1 x2x3 x4x5 x6x7 of 8 columns
      if constexpr (BITS != 8) {  // 4- and 3-bit: pairs of columns (p, p + 4)
        const u32 lo = h ? xv.y : xv.x, hi = h ? xv.w : xv.z;
        b0[nt] = pair_of<0x5410>(lo, hi);  // (x_{2h}, x_{2h+4})
        b1[nt] = pair_of<0x7632>(lo, hi);  // (x_{2h+1}, x_{2h+5})
      } else {
        b0[nt] = h ? xv.z : xv.x;  // word s = columns 4s .. 4s + 3 of the lane's 32
        b1[nt] = h ? xv.w : xv.y;
      }
    }
#pragma unroll
    for (int r = 0; r < R; ++r) {
      u32 a0, a1, a2, a3;
      if constexpr (BITS == 8) {
        const u32 wl = b.wlo[r][s], wh = b.whi[r][s];
        a0 = decode_byte_pair<DT, 0>(wl, b.clo[r]);
        a1 = decode_byte_pair<DT, 0>(wh, b.chi[r]);
        a2 = decode_byte_pair<DT, 2>(wl, b.clo[r]);
        a3 = decode_byte_pair<DT, 2>(wh, b.chi[r]);
      } else if constexpr (BITS == 4) {
        const u32 wl = b.wlo[r][j], wh = b.whi[r][j];
        a0 = h ? decode_pair<DT, 2>(wl, b.clo[r]) : decode_pair<DT, 0>(wl, b.clo[r]);
        a1 = h ? decode_pair<DT, 2>(wh, b.chi[r]) : decode_pair<DT, 0>(wh, b.chi[r]);
        a2 = h ? decode_pair<DT, 3>(wl, b.clo[r]) : decode_pair<DT, 1>(wl, b.clo[r]);
        a3 = h ? decode_pair<DT, 3>(wh, b.chi[r]) : decode_pair<DT, 1>(wh, b.chi[r]);
      } else {  // 3-bit: group j stands where int4's word j does
        const u32 gl = group_of3(b.wlo[r], j), gh = group_of3(b.whi[r], j);
        a0 = h ? decode_pair3<DT, 2>(gl, b.clo[r]) : decode_pair3<DT, 0>(gl, b.clo[r]);
        a1 = h ? decode_pair3<DT, 2>(gh, b.chi[r]) : decode_pair3<DT, 0>(gh, b.chi[r]);
        a2 = h ? decode_pair3<DT, 3>(gl, b.clo[r]) : decode_pair3<DT, 1>(gl, b.clo[r]);
        a3 = h ? decode_pair3<DT, 3>(gh, b.chi[r]) : decode_pair3<DT, 1>(gh, b.chi[r]);
      }
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) mma<DT>(part[r][nt], a0, a1, a2, a3, b0[nt], b1[nt]);
    }
  }
#pragma unroll
  for (int r = 0; r < R; ++r)
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
      acc[r][nt][0] += b.slo[r] * part[r][nt][0];
      acc[r][nt][1] += b.slo[r] * part[r][nt][1];
      acc[r][nt][2] += b.shi[r] * part[r][nt][2];
      acc[r][nt][3] += b.shi[r] * part[r][nt][3];
    }
}

template <int DT, bool BIAS>
__device__ __forceinline__ void store(u16* __restrict__ y, const u16* __restrict__ bias, float v, int token, int n,
                                      int N) {
  if (BIAS) v += half_to_float<DT>(bias[n]);
  y[(long long)token * N + n] = float_to_half<DT>(v);
}

// put(value, token, row) for each of the thread's outputs: the C fragment acc[r][nt] holds rows
// (row0 + 16 r + g, + 8) × tokens (8 nt + 2 t, + 1).
template <int R, int NT, class Put>
__device__ __forceinline__ void for_each_output(const float (&acc)[R][NT][4], int row0, int g, int t, int M, int N,
                                                Put put) {
#pragma unroll
  for (int r = 0; r < R; ++r) {
    const int n = row0 + 16 * r + g;
    if (row0 + 16 * r >= N) continue;
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
      const int token = 8 * nt + 2 * t;
      if (token < M) {
        put(acc[r][nt][0], token, n);
        put(acc[r][nt][2], token, n + 8);
      }
      if (token + 1 < M) {
        put(acc[r][nt][1], token + 1, n);
        put(acc[r][nt][3], token + 1, n + 8);
      }
    }
  }
}

// Block: W warps (blockDim.x = 32 W), warp w owning rows row0 = (blockIdx.x * W + w) * 16 R ..;
// blockIdx.y: the split of K, blocks [split * kb_split, ..).
template <int DT, int SDT, int R, int NT, bool ZP, bool BIAS, int S, int BITS>
__device__ __forceinline__ void w4a16_mma_body(const u32* __restrict__ x, const u32* __restrict__ qw,
                                               const void* __restrict__ scales,
                                               const unsigned char* __restrict__ zeros,
                                               const u16* __restrict__ bias, u16* __restrict__ y,
                                               float* __restrict__ ws, u32* __restrict__ counters, int M, int N,
                                               int K, int group, int kb_split) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  const int g = lane >> 2, t = lane & 3;
  const int rows_per_block = warps * 16 * R;
  const int row0 = blockIdx.x * rows_per_block + warp * 16 * R;
  const int splits = gridDim.y;
  const int kb0 = blockIdx.y * kb_split;
  const int kb1 = imin(kb0 + kb_split, K >> 7);

  float acc[R][NT][4];
  zero(acc);

  if (row0 < N && kb0 < kb1) {
    // Block kb lives in buf[(kb - kb0) % (S + 1)]; block kb + S is loaded before block kb is used, into the
    // buffer block kb - 1 has left (indices are compile-time constants: the buffers stay in registers).
    Block<R, NT, BITS> buf[S + 1];
#pragma unroll
    for (int i = 0; i < S; ++i)
      if (kb0 + i < kb1)
        load_block<DT, SDT, R, NT, ZP, BITS>(buf[i], x, qw, scales, zeros, kb0 + i, row0, g, t, M, N, K, group);
    for (int kb = kb0; kb < kb1; kb += S + 1) {
#pragma unroll
      for (int u = 0; u <= S; ++u) {
        if (kb + u < kb1) {
          if (kb + u + S < kb1)
            load_block<DT, SDT, R, NT, ZP, BITS>(buf[(u + S) % (S + 1)], x, qw, scales, zeros, kb + u + S, row0, g,
                                                 t, M, N, K, group);
          compute_block<DT, R, NT, BITS>(buf[u], acc);
        }
      }
    }
  }

  if (splits == 1) {
    for_each_output<R, NT>(acc, row0, g, t, M, N,
                           [&](float v, int token, int n) { store<DT, BIAS>(y, bias, v, token, n, N); });
    return;
  }
  float* part = ws + (long long)blockIdx.y * M * N;
  for_each_output<R, NT>(acc, row0, g, t, M, N,
                         [&](float v, int token, int n) { part[(long long)token * N + n] = v; });
  __shared__ u32 last;
  fence_acq_rel();  // this thread's partials before the count
  __syncthreads();
  if (threadIdx.x == 0) last = arrive(counters + blockIdx.x) == (u32)(splits - 1);
  __syncthreads();
  if (!last) return;
  fence_acq_rel();  // every split's partials are visible from here
  const int first_row = blockIdx.x * rows_per_block;
  const int rows = imin(rows_per_block, N - first_row);
  for (int i = threadIdx.x; i < rows * M; i += blockDim.x) {
    const int token = i / rows, n = first_row + i % rows;
    float v = 0.f;
    for (int s = 0; s < splits; ++s) {
      v += load_cg(ws + ((long long)s * M + token) * N + n);
    }
    store<DT, BIAS>(y, bias, v, token, n, N);
  }
  if (threadIdx.x == 0) counters[blockIdx.x] = 0;  // ready for the next launch on this stream
}

// -- dequantise, for many tokens: W (rows, K) in x's dtype for a cuBLAS GEMM --------------------------------

// Code i (0..31) of a lane's 32 codes in its BITS words (an LSB-first bitstream; 3-bit codes straddle words).
template <int BITS> __device__ __forceinline__ u32 code_of(const u32 (&w)[BITS], int i) {
  const int bit = i * BITS, word = bit >> 5, off = bit & 31;
  u32 q = w[word] >> off;
  if (off + BITS > 32) q |= w[word + 1] << (32 - off);
  return q & ((1u << BITS) - 1u);
}

// Thread i: row row0 + i / (K / 32), columns 32 (i % (K / 32)) .. + 31 of W, as the reference computes them:
// (q - z) * s in float32, rounded once to x's dtype; written as 64 contiguous bytes. `n_stride` is the
// scales' and zero points' row stride (all of W's rows), `rows` how many this launch writes.
template <int DT, int SDT, bool ZP, int BITS>
__device__ __forceinline__ void dequant_body(const u32* __restrict__ qw, const void* __restrict__ scales,
                                             const unsigned char* __restrict__ zeros, u16* __restrict__ w, int rows,
                                             int K, int group, int n_stride, int row0) {
  const int chunks = K >> 5;
  const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= (long long)rows * chunks) return;
  const int r = (int)(i / chunks), c = (int)(i % chunks), n = row0 + r;
  u32 words[BITS];
  load_words<BITS>(words, qw + (long long)n * (K * BITS / 32) + c * BITS);
  const int grp = (c << 5) / group;
  const float s = load_scale<SDT>(scales, (long long)grp * n_stride + n);
  const float z = (float)(ZP ? zeros[(long long)grp * n_stride + n] : 1u << (BITS - 1));
  u32 packed[16];
#pragma unroll
  for (int k = 0; k < 16; ++k) {
    const u32 lo = float_to_half<DT>(((float)code_of<BITS>(words, 2 * k) - z) * s);
    const u32 hi = float_to_half<DT>(((float)code_of<BITS>(words, 2 * k + 1) - z) * s);
    packed[k] = lo | (hi << 16);
  }
  u16* out = w + (long long)r * K + (c << 5);
#pragma unroll
  for (int v = 0; v < 4; ++v)
    store_u4(out + 8 * v, U4{packed[4 * v], packed[4 * v + 1], packed[4 * v + 2], packed[4 * v + 3]});
}
