// Runs w4a16_mma_body on the CPU (see w4a16_host.h): one block at a time, its threads as std::threads.
// Compiled by test_cuda.py with -DLOWBIT_HOST and the specialisation's template arguments as
// -DV_DT= -DV_SDT= -DV_R= -DV_NT= -DV_ZP= -DV_BIAS= -DV_WARPS= -DV_S= -DV_BITS=.
#include <memory>
#include <thread>
#include <vector>

#include "w4a16_mma.cu"

extern "C" void run(const u32* x, const u32* qw, const void* scales, const unsigned char* zeros, const u16* bias,
                    u16* y, float* ws, u32* counters, int M, int N, int K, int group, int kb_split, int blocks_x,
                    int splits) {
  blockDim = Dim3{32 * V_WARPS, 1, 1};
  gridDim = Dim3{static_cast<unsigned>(blocks_x), static_cast<unsigned>(splits), 1};
  for (int by = 0; by < splits; ++by) {
    for (int bx = 0; bx < blocks_x; ++bx) {
      std::barrier<> block(32 * V_WARPS);
      std::unique_ptr<host::Warp[]> warps(new host::Warp[V_WARPS]);
      host::block_barrier = &block;
      host::warps = warps.get();
      std::vector<std::thread> threads;
      for (unsigned tid = 0; tid < 32 * V_WARPS; ++tid) {
        threads.emplace_back([=] {
          threadIdx = Dim3{tid, 0, 0};
          blockIdx = Dim3{static_cast<unsigned>(bx), static_cast<unsigned>(by), 0};
          w4a16_mma_body<V_DT, V_SDT, V_R, V_NT, V_ZP, V_BIAS, V_S, V_BITS>(x, qw, scales, zeros, bias, y, ws,
                                                                            counters, M, N, K, group, kb_split);
        });
      }
      for (auto& thread : threads) thread.join();
    }
  }
}

// dequant_body for every (block, thread) in turn: no barrier or MMA, so one host thread runs them all.
extern "C" void run_dequant(const u32* qw, const void* scales, const unsigned char* zeros, u16* w, int rows, int K,
                            int group, int n_stride, int row0, int blocks, int threads) {
  blockDim = Dim3{static_cast<unsigned>(threads), 1, 1};
  gridDim = Dim3{static_cast<unsigned>(blocks), 1, 1};
  for (int b = 0; b < blocks; ++b) {
    for (int tid = 0; tid < threads; ++tid) {
      threadIdx = Dim3{static_cast<unsigned>(tid), 0, 0};
      blockIdx = Dim3{static_cast<unsigned>(b), 0, 0};
      dequant_body<V_DT, V_SDT, V_ZP, V_BITS>(qw, scales, zeros, w, rows, K, group, n_stride, row0);
    }
  }
}
