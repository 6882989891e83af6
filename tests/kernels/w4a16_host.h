// The PTX primitives of src/lowbit/kernels/csrc/w4a16_mma.cu in C++, so that the kernel's own source runs on
// the CPU in the tests (compiled with -DLOWBIT_HOST; see test_cuda.py): each block's threads are std::threads,
// __syncthreads a barrier of the block, and an MMA a meeting of its warp's 32 lanes, each depositing its
// fragments and reading the others' by PTX's m16n8k16 layouts (ISA, "Matrix Fragments for mma.m16n8k16").
// Packed 16-bit FMAs round through float (exact for the kernel's integer operands).
#pragma once
#include <atomic>
#include <barrier>
#include <cmath>
#include <cstring>

#define __device__
#define __global__
#define __forceinline__ inline
#define __launch_bounds__(n)
#define __shared__ static

struct Dim3 {
  unsigned x = 0, y = 0, z = 0;
};
inline thread_local Dim3 threadIdx, blockIdx;
inline Dim3 blockDim, gridDim;

namespace host {
struct Warp {
  std::barrier<> meet{32};
  u32 a[32][4];
  u32 b[32][2];
};
inline std::barrier<>* block_barrier = nullptr;
inline Warp* warps = nullptr;  // the running block's
}  // namespace host

inline void __syncthreads() { host::block_barrier->arrive_and_wait(); }

inline U4 load_stream(const u32* p) { return U4{p[0], p[1], p[2], p[3]}; }
inline U4 load_cached(const u32* p) { return U4{p[0], p[1], p[2], p[3]}; }
inline u32 load_word(const u32* p) { return *p; }
inline void store_u4(u16* p, U4 v) { std::memcpy(p, &v, 16); }
inline float load_cg(const float* p) { return std::atomic_ref<const float>(*p).load(std::memory_order_relaxed); }
inline void fence_acq_rel() { std::atomic_thread_fence(std::memory_order_acq_rel); }
inline u32 arrive(u32* counter) { return std::atomic_ref<u32>(*counter).fetch_add(1, std::memory_order_acq_rel); }

inline float bits_float(u32 b) {
  float f;
  std::memcpy(&f, &b, 4);
  return f;
}
inline float f16_to_float(u16 h) {
  _Float16 v;
  std::memcpy(&v, &h, 2);
  return static_cast<float>(v);
}
inline u16 float_to_bf16(float f) {  // round to nearest even (no NaN among the kernel's values)
  u32 u;
  std::memcpy(&u, &f, 4);
  u += 0x7FFFu + ((u >> 16) & 1u);
  return static_cast<u16>(u >> 16);
}
inline u16 float_to_f16(float f) {
  _Float16 v = static_cast<_Float16>(f);
  u16 h;
  std::memcpy(&h, &v, 2);
  return h;
}
inline float half_value(u16 h, bool bf16) { return bf16 ? bits_float(static_cast<u32>(h) << 16) : f16_to_float(h); }

inline u32 fma_x2(u32 a, u32 b, u32 c, bool bf16) {
  u32 d = 0;
  for (int i = 0; i < 2; ++i) {
    const auto half = [&](u32 v) { return half_value(static_cast<u16>(v >> (16 * i)), bf16); };
    const float r = std::fma(half(a), half(b), half(c));
    d |= static_cast<u32>(bf16 ? float_to_bf16(r) : float_to_f16(r)) << (16 * i);
  }
  return d;
}
inline u32 fma_bf16x2(u32 a, u32 b, u32 c) { return fma_x2(a, b, c, true); }
inline u32 pack_bf16x2(float lo, float hi) { return float_to_bf16(lo) | (static_cast<u32>(float_to_bf16(hi)) << 16); }
inline u32 fma_f16x2(u32 a, u32 b, u32 c) { return fma_x2(a, b, c, false); }
inline u32 and_or(u32 a, u32 b, u32 c) { return (a & b) | c; }

template <int SEL> inline u32 byte_perm(u32 lo, u32 hi) {  // prmt.b32, default mode
  const unsigned long long v = lo | (static_cast<unsigned long long>(hi) << 32);
  u32 d = 0;
  for (int i = 0; i < 4; ++i) d |= static_cast<u32>((v >> (8 * ((SEL >> (4 * i)) & 7))) & 0xFF) << (8 * i);
  return d;
}

template <int DT> inline void mma(float* c, u32 a0, u32 a1, u32 a2, u32 a3, u32 b0, u32 b1) {
  const int lane = threadIdx.x & 31;
  host::Warp& w = host::warps[threadIdx.x >> 5];
  w.a[lane][0] = a0, w.a[lane][1] = a1, w.a[lane][2] = a2, w.a[lane][3] = a3;
  w.b[lane][0] = b0, w.b[lane][1] = b1;
  w.meet.arrive_and_wait();
  const auto A = [&](int row, int k) {  // a0: (g, 2t..), a1: (g + 8, 2t..), a2: (g, 2t + 8..), a3: (g + 8, 2t + 8..)
    const u32 v = w.a[(row & 7) * 4 + ((k & 7) >> 1)][(row >= 8) + 2 * (k >= 8)];
    return half_value(static_cast<u16>(v >> (16 * (k & 1))), DT == 0);
  };
  const auto B = [&](int k, int col) {  // b0: (2t.., g), b1: (2t + 8.., g)
    const u32 v = w.b[col * 4 + ((k & 7) >> 1)][k >= 8];
    return half_value(static_cast<u16>(v >> (16 * (k & 1))), DT == 0);
  };
  const int g = lane >> 2, t = lane & 3;
  float d[4];
  for (int i = 0; i < 4; ++i) {  // c0: (g, 2t), c1: (g, 2t + 1), c2: (g + 8, 2t), c3: (g + 8, 2t + 1)
    const int row = g + 8 * (i >> 1), col = 2 * t + (i & 1);
    d[i] = c[i];
    for (int k = 0; k < 16; ++k) d[i] += A(row, k) * B(k, col);
  }
  w.meet.arrive_and_wait();  // every lane has read the others' fragments
  for (int i = 0; i < 4; ++i) c[i] = d[i];
}
