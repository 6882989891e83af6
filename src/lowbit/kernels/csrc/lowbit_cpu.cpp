// lowbit's CPU kernels: weight-only integer GEMV/GEMM reading the packed codes directly.
//
// y[m, n] = sum_k x[m, k] * w[n, k],  w[n, k] = s[n, g] * c[n, k] - o[n, g],  g = k / group.
// With the codes c read from lowbit's LSB-first packing (4 bits: byte j holds c[2j] in its
// low nibble, c[2j+1] in its high one; 8 bits: one code per byte), and o = s * zero point,
// the sum splits per group into  s * sum_k c x  -  o * sum_k x : the inner loop is a dot
// product of small integers with x, which the compiler vectorises, and no float weight is
// ever written. Rows of W are split across threads (at::parallel_for).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <vector>

namespace {

inline float to_float(const at::Half v) { return static_cast<float>(v); }
inline float to_float(const at::BFloat16 v) { return static_cast<float>(v); }
inline float to_float(const float v) { return v; }

// codes of a zero point stored packed at `bits` per group, LSB-first
inline int zero_code(const uint8_t* zrow, int64_t g, int bits) {
  if (bits == 8) return zrow[g];
  if (bits == 4) return (zrow[g >> 1] >> ((g & 1) * 4)) & 15;
  if (bits == 2) return (zrow[g >> 2] >> ((g & 3) * 2)) & 3;
  return 0;
}

template <typename S>
void gemv_kernel(const float* x, int64_t M, int64_t K, const uint8_t* q, int64_t row_bytes, const S* scale,
                 const uint8_t* zero, int64_t zero_row_bytes, int64_t G, int64_t group, int bits, int sym_offset,
                 float* y, int64_t N) {
  // per token: x split into the lanes of one packed byte, and per-group sums of x
  const int per_byte = 8 / bits;
  const int64_t lanes_len = (K + per_byte - 1) / per_byte;
  std::vector<float> lanes(M * per_byte * lanes_len, 0.0f);
  std::vector<float> xsum(M * G, 0.0f);
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t k = 0; k < K; ++k) {
      lanes[(m * per_byte + k % per_byte) * lanes_len + k / per_byte] = x[m * K + k];
      xsum[m * G + k / group] += x[m * K + k];
    }
  }
  const int mask = (1 << bits) - 1;
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      const uint8_t* qrow = q + n * row_bytes;
      const S* srow = scale + n * G;
      for (int64_t m = 0; m < M; ++m) {
        float total = 0.0f;
        for (int64_t g = 0; g < G; ++g) {
          const int64_t k0 = g * group, k1 = std::min(K, k0 + group);
          // groups start on a byte boundary (checked by the caller)
          const int64_t b0 = k0 / per_byte, b1 = (k1 + per_byte - 1) / per_byte;
          float acc = 0.0f;
          for (int lane = 0; lane < per_byte; ++lane) {
            const float* xl = lanes.data() + (m * per_byte + lane) * lanes_len;
            const int shift = lane * bits;
            float part = 0.0f;
#pragma omp simd reduction(+ : part)
            for (int64_t b = b0; b < b1; ++b) part += xl[b] * static_cast<float>((qrow[b] >> shift) & mask);
            acc += part;
          }
          const float s = to_float(srow[g]);
          const int z = zero ? zero_code(zero + n * zero_row_bytes, g, bits) : sym_offset;
          total += s * acc - s * static_cast<float>(z) * xsum[m * G + g];
        }
        y[m * N + n] = total;
      }
    }
  });
}

}  // namespace

// x (M, K) float32; qdata (N, row_bytes) uint8; scale (N, G) float16/bfloat16/float32;
// zero_point (N, zero_row_bytes) uint8 or empty for symmetric codes (offset 2^(bits-1)).
torch::Tensor int_gemv(torch::Tensor x, torch::Tensor qdata, torch::Tensor scale, torch::Tensor zero_point,
                       int64_t bits, int64_t group, int64_t out_features) {
  TORCH_CHECK(bits == 2 || bits == 4 || bits == 8, "int_gemv: bits must be 2, 4 or 8");
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(), "int_gemv: x must be (M, K) float32");
  TORCH_CHECK(qdata.scalar_type() == at::kByte && qdata.is_contiguous(), "int_gemv: qdata must be contiguous uint8");
  TORCH_CHECK(group % (8 / bits) == 0, "int_gemv: group size must fill whole bytes");
  const int64_t M = x.size(0), K = x.size(1), N = out_features, G = scale.size(1);
  TORCH_CHECK(qdata.size(0) == N && scale.size(0) == N, "int_gemv: weight rows disagree");
  TORCH_CHECK(G == (K + group - 1) / group, "int_gemv: scale has the wrong number of groups");
  auto y = torch::empty({M, N}, x.options());
  auto sc = scale.contiguous();
  const bool asym = zero_point.numel() > 0;
  auto zp = zero_point.contiguous();
  const int sym_offset = 1 << (bits - 1);
  const uint8_t* zptr = asym ? zp.data_ptr<uint8_t>() : nullptr;
  const int64_t zbytes = asym ? zp.size(1) : 0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, sc.scalar_type(), "int_gemv", [&] {
    gemv_kernel<scalar_t>(x.data_ptr<float>(), M, K, qdata.data_ptr<uint8_t>(), qdata.size(1), sc.data_ptr<scalar_t>(),
                          zptr, zbytes, G, group, static_cast<int>(bits), sym_offset, y.data_ptr<float>(), N);
  });
  return y;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("int_gemv", &int_gemv, "packed integer weight GEMV (CPU)"); }
