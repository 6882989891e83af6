// lowbit's CPU ops: the tensors checked, the threads' shares of the rows, and the registration. The kernels they
// call, and what each op computes, are in lowbit_cpu_kernels.h.
#include "lowbit_cpu_kernels.h"

#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/linear.h>
#include <torch/library.h>

LOWBIT_KERNELS(extern, int8_t)
LOWBIT_KERNELS(extern, float)
LOWBIT_KERNELS(extern, at::Half)
LOWBIT_KERNELS(extern, at::BFloat16)

namespace {

// rows per at::parallel_for task: enough bytes that waking a second thread pays off
int64_t grain_rows(int64_t row_bytes, int64_t M) {
  constexpr int64_t kBytesPerTask = 16384;
  return std::max<int64_t>(4, kBytesPerTask / std::max<int64_t>(1, row_bytes * M));
}

// The stored tensors of an (N, K) weight, checked against each other.
struct Weight {
  at::Tensor q, scale, zero, levels;  // zero undefined for symmetric codes, levels for affine ones (no table)
  at::Tensor block_scale;              // double-quantised scales only, with scale_offset
  float scale_offset = 0.0f;
  int64_t N, K, G, group;
  int bits;
  at::Tensor g_idx;  // act-order weights only: (K,) int32, the group of each column

  template <typename S>
  lowbit::Packed<S> packed() const {
    const bool asym = zero.defined();
    return {q.data_ptr<uint8_t>(), q.size(1), scale.data_ptr<S>(),
            block_scale.defined() ? block_scale.data_ptr<float>() : nullptr, scale_offset,
            asym ? zero.data_ptr<uint8_t>() : nullptr, asym ? zero.size(1) : 0, K, G, group, bits,
            levels.defined() ? levels.data_ptr<float>() : nullptr,
            g_idx.defined() ? g_idx.data_ptr<int32_t>() : nullptr};
  }
  // fn(S{}) with S the scales' element type: float16, bfloat16, float32, or int8 (double-quantised); `check_weight`
  // admits no other
  template <typename Fn>
  void with_scale_type(Fn&& fn) const {
    switch (scale.scalar_type()) {
      case at::kChar: fn(int8_t{}); break;
      case at::kFloat: fn(float{}); break;
      case at::kHalf: fn(at::Half{}); break;
      default: fn(at::BFloat16{});
    }
  }
  // 3 bits always, and affine 4-bit codes in groups of whole 32-bit words with AVX-512 or AVX2: x in the `Words` layout
  // (the lookup path, `block_lut`, keeps NF4 / FP4 and 4-bit groups that start inside a word)
  bool by_words() const {
#if defined(LOWBIT_AVX512) || defined(LOWBIT_AVX2)
    if (bits == 4 && !levels.defined() && group % 8 == 0 && K % 8 == 0) return true;
#endif
    return bits == 3;
  }
  // 4-bit affine codes with AVX-512 VNNI: groups of whole 128-column blocks, of 32 or 64 columns, or one per row
  bool by_vnni() const {
    return bits == 4 && !levels.defined() && (group % 128 == 0 || group == 32 || group == 64 || group >= K);
  }
};

// qdata (N, ceil(K * bits / 8)) uint8; scale (N, G) float16/bfloat16/float32, G = ceil(K / group),
// or int8 codes of double-quantised scales with scale_scale (ceil(N G / 256),) and scale_offset ()
// float32; zero_point (N, ceil(G * bits / 8)) uint8 packed at `bits`, or none for symmetric codes;
// levels (16,) float32 for a 4-bit lookup format (then no zero point), or none; g_idx (K,) int32 with
// values in [0, G) for act-order weights (any group; 3-bit codes still in whole words of 8), or none.
Weight check_weight(const at::Tensor& qdata, const at::Tensor& scale, const std::optional<at::Tensor>& zero_point,
                    const std::optional<at::Tensor>& levels, const std::optional<at::Tensor>& scale_scale,
                    const std::optional<at::Tensor>& scale_offset, const std::optional<at::Tensor>& g_idx,
                    int64_t bits, int64_t group, int64_t K, int64_t N) {
  TORCH_CHECK(bits == 2 || bits == 3 || bits == 4 || bits == 8, "lowbit CPU kernels: bits must be 2, 3, 4 or 8");
  const bool scattered = g_idx.has_value() && g_idx->defined();
  if (scattered) {  // any group: g_idx says where each column's is
    TORCH_CHECK(group > 0 && (bits != 3 || K % 8 == 0),
                "lowbit CPU kernels: 3-bit codes need K to be a multiple of 8");
  } else if (bits == 3) {
    TORCH_CHECK(group > 0 && group % 8 == 0 && K % 8 == 0,
                "lowbit CPU kernels: 3-bit codes need K and the group size to be multiples of 8");
  } else {
    TORCH_CHECK(group > 0 && (group % (8 / bits) == 0 || group >= K),
                "lowbit CPU kernels: groups must fill whole bytes");
  }
  TORCH_CHECK(qdata.dim() == 2 && qdata.scalar_type() == at::kByte && qdata.size(0) == N &&
                  qdata.size(1) == (K * bits + 7) / 8,
              "lowbit CPU kernels: qdata must be (N, ceil(K * bits / 8)) uint8");
  const int64_t G = (K + group - 1) / group;
  const at::ScalarType st = scale.scalar_type();
  TORCH_CHECK(st == at::kHalf || st == at::kBFloat16 || st == at::kFloat || st == at::kChar,
              "lowbit CPU kernels: scale must be float16, bfloat16, float32, or int8 (double-quantised)");
  TORCH_CHECK(scale.dim() == 2 && scale.size(0) == N && scale.size(1) == G,
              "lowbit CPU kernels: scale must be (N, ceil(K / group))");
  Weight w{qdata.contiguous(), scale.contiguous(), {}, {}, {}, 0.0f, N, K, G, group, static_cast<int>(bits)};
  if (zero_point.has_value() && zero_point->defined()) {
    const at::Tensor& z = *zero_point;
    TORCH_CHECK(z.dim() == 2 && z.scalar_type() == at::kByte && z.size(0) == N && z.size(1) == (G * bits + 7) / 8,
                "lowbit CPU kernels: zero_point must be (N, ceil(G * bits / 8)) uint8");
    w.zero = z.contiguous();
  }
  if (levels.has_value() && levels->defined()) {
    const at::Tensor& l = *levels;
    TORCH_CHECK(bits == 4 && !w.zero.defined() && l.dim() == 1 && l.numel() == 16 && l.scalar_type() == at::kFloat,
                "lowbit CPU kernels: levels must be (16,) float32, for 4-bit codes without a zero point");
    w.levels = l.contiguous();
  }
  const bool double_quant = scale.scalar_type() == at::kChar;
  TORCH_CHECK(double_quant == (scale_scale.has_value() && scale_scale->defined()) &&
                  double_quant == (scale_offset.has_value() && scale_offset->defined()),
              "lowbit CPU kernels: int8 scales come with scale_scale and scale_offset, other scales without");
  if (double_quant) {
    const at::Tensor &b = *scale_scale, &o = *scale_offset;
    TORCH_CHECK(b.dim() == 1 && b.scalar_type() == at::kFloat && b.size(0) == (N * G + 255) / 256 &&
                    o.numel() == 1 && o.scalar_type() == at::kFloat,
                "lowbit CPU kernels: scale_scale must be (ceil(N * G / 256),) float32 and scale_offset one float32");
    w.block_scale = b.contiguous();
    w.scale_offset = o.item<float>();
  }
  if (scattered) {
    const at::Tensor& g = *g_idx;
    TORCH_CHECK(g.dim() == 1 && g.scalar_type() == at::kInt && g.size(0) == K,
                "lowbit CPU kernels: g_idx must be (K,) int32");
    w.g_idx = g.contiguous();
    const int32_t* p = w.g_idx.data_ptr<int32_t>();
    TORCH_CHECK(std::all_of(p, p + K, [G](int32_t v) { return v >= 0 && v < G; }),
                "lowbit CPU kernels: g_idx names a group outside [0, ceil(K / group))");
  }
  return w;
}

// What this build was compiled with, as 0/1: AVX-512 (F, BW, VL), VBMI, VNNI (the integer decode path), and
// AVX2 with FMA where AVX-512 is not (the 8-lane kernels).
std::vector<int64_t> build_features_cpu(const at::Tensor&) {
  bool avx512 = false, vbmi = false, vnni = false, avx2 = false;
#ifdef LOWBIT_AVX2
  avx2 = true;
#endif
#ifdef LOWBIT_AVX512
  avx512 = true;
#endif
#ifdef LOWBIT_VBMI
  vbmi = true;
#endif
#ifdef LOWBIT_VNNI
  vnni = true;
#endif
  return {avx512, vbmi, vnni, avx2};
}

// LOWBIT_CPU_FLOAT_GEMV=1: the decode GEMV in float32 arithmetic throughout, never `block_vnni`'s integers
bool integer_dot() {
  const char* v = std::getenv("LOWBIT_CPU_FLOAT_GEMV");
  return !(v && std::strcmp(v, "1") == 0);
}

// x (M, K) quantised per token to `bits`-bit symmetric codes and back, as lowbit's dynamic activations are
// (`lowbit.tensor.fake_quantize`, W8A8's): s = amax|x| / qmax (float32 division; 0 becomes FLT_MIN, a NaN in the
// token makes it NaN), codes round(x / s) (half to even) clamped to [qmin, qmax], x = code * s. The same float
// operations as torch's, so the same values.
at::Tensor fake_quantize_tokens(const at::Tensor& x, int64_t M, int64_t K, int64_t bits) {
  TORCH_CHECK(bits >= 2 && bits <= 8, "int_gemv_cpu: x_bits must be 0 (float x) or 2 .. 8");
  at::Tensor out = at::empty_like(x);
  const float* in = x.data_ptr<float>();
  float* o = out.data_ptr<float>();
  const float qmax = static_cast<float>((1 << (bits - 1)) - 1), qmin = -static_cast<float>(1 << (bits - 1));
  for (int64_t m = 0; m < M; ++m) {
    const float* xm = in + m * K;
    float amax = 0.0f;
    bool nan = false;
    for (int64_t k = 0; k < K; ++k) {
      nan |= std::isnan(xm[k]);
      amax = std::max(amax, std::fabs(xm[k]));
    }
    float s = nan ? std::numeric_limits<float>::quiet_NaN() : amax / qmax;
    if (s == 0.0f) s = std::numeric_limits<float>::min();
    for (int64_t k = 0; k < K; ++k) {
      const float q = std::nearbyint(xm[k] / s);
      o[m * K + k] = (q < qmin ? qmin : q > qmax ? qmax : q) * s;  // a NaN stays NaN, as torch's clamp keeps it
    }
  }
  return out;
}

// y (..., N) = x (..., K) @ dequant(W).T for float32 x, with a few tokens M = x.numel() / K in mind; x_bits > 0:
// x quantised per token first (`fake_quantize_tokens`).
at::Tensor int_gemv_cpu(const at::Tensor& x, const at::Tensor& qdata, const at::Tensor& scale,
                        const std::optional<at::Tensor>& zero_point, int64_t bits, int64_t group,
                        int64_t out_features, const std::optional<at::Tensor>& levels,
                        const std::optional<at::Tensor>& scale_scale, const std::optional<at::Tensor>& scale_offset,
                        const std::optional<at::Tensor>& g_idx, int64_t x_bits) {
  TORCH_CHECK(x.dim() >= 1 && x.scalar_type() == at::kFloat, "int_gemv_cpu: x must be float32 (..., K)");
  const int64_t K = x.size(-1), M = K ? x.numel() / K : 0, N = out_features;
  const Weight wt =
      check_weight(qdata, scale, zero_point, levels, scale_scale, scale_offset, g_idx, bits, group, K, N);
  auto sizes = x.sizes().vec();
  sizes.back() = N;
  at::Tensor y = at::empty(sizes, x.options());
  if (M == 0 || N == 0) return y;
  const at::Tensor xc = x_bits ? fake_quantize_tokens(x.contiguous(), M, K, x_bits) : x.contiguous();
  float* out = y.data_ptr<float>();
  const int64_t grain = grain_rows(wt.q.size(1), M);
  if (wt.g_idx.defined()) {
    wt.with_scale_type([&](auto s) {
      const auto w = wt.packed<decltype(s)>();
      at::parallel_for(0, (N + 15) / 16, (grain + 15) / 16, [&](int64_t b0, int64_t b1) {
        lowbit::gemv_scattered(w, xc.data_ptr<float>(), M, out, N, 16 * b0, std::min(N, 16 * b1));
      });
    });
    return y;
  }
#ifdef LOWBIT_VNNI
  std::vector<lowbit::Planes> planes;  // one per token, until one holds an inf or NaN (then the float path)
  bool integers = wt.by_vnni() && integer_dot();
  if (integers) planes.reserve(M);
  for (int64_t m = 0; integers && m < M; ++m)
    integers = planes.emplace_back(xc.data_ptr<float>() + m * K, K, wt.group).finite;
  if (integers) {
    wt.with_scale_type([&](auto s) {
      const auto w = wt.packed<decltype(s)>();
      at::parallel_for(0, N, grain,
                       [&](int64_t n0, int64_t n1) { lowbit::gemv_vnni(w, planes.data(), M, out, N, n0, n1); });
    });
    return y;
  }
#endif
  if (wt.by_words()) {
    const lowbit::Words words(xc.data_ptr<float>(), M, K, wt.group);
    wt.with_scale_type([&](auto s) {
      const auto w = wt.packed<decltype(s)>();
      at::parallel_for(0, N, grain, [&](int64_t n0, int64_t n1) { lowbit::gemv_words(w, words, M, out, N, n0, n1); });
    });
    return y;
  }
  const lowbit::Lanes lanes(xc.data_ptr<float>(), M, K, wt.q.size(1), wt.bits);
  wt.with_scale_type([&](auto s) {
    const auto w = wt.packed<decltype(s)>();
    at::parallel_for(0, N, grain, [&](int64_t n0, int64_t n1) { lowbit::gemv_rows(w, lanes, M, out, N, n0, n1); });
  });
  return y;
}

// Rows [r0, r1) of the float weight, written to o (r1 - r0 rows of K), the rows split between threads.
void dequant_into(const Weight& wt, float* o, int64_t r0, int64_t r1) {
  wt.with_scale_type([&](auto s) {
    const auto w = wt.packed<decltype(s)>();
    at::parallel_for(r0, r1, grain_rows(wt.q.size(1), 1),
                     [&](int64_t n0, int64_t n1) { lowbit::dequant_rows(w, o, r0, n0, n1); });
  });
}

// The float weight (N, K) that the packed codes stand for, as the reference dequantises it.
at::Tensor dequant_cpu(const at::Tensor& qdata, const at::Tensor& scale, const std::optional<at::Tensor>& zero_point,
                       int64_t bits, int64_t group, int64_t in_features, const std::optional<at::Tensor>& levels,
                       const std::optional<at::Tensor>& scale_scale, const std::optional<at::Tensor>& scale_offset,
                       const std::optional<at::Tensor>& g_idx) {
  const Weight wt = check_weight(qdata, scale, zero_point, levels, scale_scale, scale_offset, g_idx, bits, group,
                                 in_features, qdata.size(0));
  at::Tensor out = at::empty({wt.N, wt.K}, qdata.options().dtype(at::kFloat));
  dequant_into(wt, out.data_ptr<float>(), 0, wt.N);
  return out;
}

// This thread's workspace of at least n floats, kept for its next call and grown when asked for more;
// 64-byte aligned as torch's own CPU tensors are (a GEMM's sums can depend on its operand's alignment).
float* workspace(int64_t n) {
  struct Space {
    float* p = nullptr;
    int64_t n = 0;
    ~Space() { std::free(p); }
  };
  thread_local Space space;
  if (n > space.n) {
    std::free(space.p);
    space.p = static_cast<float*>(std::aligned_alloc(64, (n * sizeof(float) + 63) / 64 * 64));
    TORCH_CHECK(space.p != nullptr, "lowbit CPU kernels: out of memory for a ", n * sizeof(float), "-byte workspace");
    space.n = n;
  }
  return space.p;
}

// y (..., N) = F.linear(x, dequant(W), bias) for x (..., K) float32, bfloat16 or float16 (prefill).
// With one block (block_rows >= N) it is the reference's own call, F.linear on the whole float
// weight. Otherwise the weight is dequantised block_rows rows at a time into a workspace kept by
// each thread, and each block's GEMM runs while the block is fresh in cache. No float copy of the
// layer is made: a large layer's (N, K) float weight would be freshly mapped memory on every call,
// faulted in page by page and then read back from DRAM, which cost more than the GEMM itself at
// tens of tokens.
at::Tensor dequant_linear_cpu(const at::Tensor& x, const at::Tensor& qdata, const at::Tensor& scale,
                              const std::optional<at::Tensor>& zero_point, int64_t bits, int64_t group,
                              int64_t out_features, const std::optional<at::Tensor>& levels,
                              const std::optional<at::Tensor>& scale_scale,
                              const std::optional<at::Tensor>& scale_offset, const std::optional<at::Tensor>& g_idx,
                              const std::optional<at::Tensor>& bias, int64_t block_rows) {
  TORCH_CHECK(x.dim() >= 1 && at::isFloatingType(x.scalar_type()) && x.scalar_type() != at::kDouble,
              "dequant_linear_cpu: x must be float32, bfloat16 or float16 (..., K)");
  TORCH_CHECK(block_rows > 0, "dequant_linear_cpu: block_rows must be positive");
  const int64_t K = x.size(-1), N = out_features;
  const Weight wt =
      check_weight(qdata, scale, zero_point, levels, scale_scale, scale_offset, g_idx, bits, group, K, N);
  TORCH_CHECK(!bias.has_value() || !bias->defined() || (bias->dim() == 1 && bias->size(0) == N),
              "dequant_linear_cpu: bias must be (N,)");
  const at::ScalarType dtype = x.scalar_type();
  const std::optional<at::Tensor> b =
      bias.has_value() && bias->defined() ? std::optional<at::Tensor>(bias->to(dtype)) : std::nullopt;
  auto as_x = [&](const at::Tensor& w) { return dtype == at::kFloat ? w : w.to(dtype); };
  const int64_t rows = std::min(N, block_rows);
  if (rows == N) {  // one block: the reference's call, on all threads
    at::Tensor w = at::empty({N, K}, qdata.options().dtype(at::kFloat));
    dequant_into(wt, w.data_ptr<float>(), 0, N);
    return at::linear(x, as_x(w), b);
  }
  auto sizes = x.sizes().vec();
  sizes.back() = N;
  at::Tensor y = at::empty(sizes, x.options());
  const at::Tensor x2 = x.reshape({-1, K}), y2 = y.view({-1, N});
  // Blocks are shared out between the threads, each dequantising and multiplying its own in its own
  // workspace (the GEMM single-threaded inside the parallel region): one parallel region per call, not
  // two per block, so threads are not woken and parked tens of times per layer.
  const at::ThreadLocalState caller;  // inference mode and the rest, for the ATen calls on worker threads
  at::parallel_for(0, (N + rows - 1) / rows, 1, [&](int64_t b0, int64_t b1) {
    const at::ThreadLocalStateGuard as_caller(caller);
    float* space = workspace(rows * K);
    for (int64_t r0 = b0 * rows; r0 < std::min(N, b1 * rows); r0 += rows) {
      const int64_t r1 = std::min(N, r0 + rows);
      dequant_into(wt, space, r0, r1);  // serial here: nested in this region
      const at::Tensor w = at::from_blob(space, {r1 - r0, K}, at::TensorOptions().dtype(at::kFloat));
      const std::optional<at::Tensor> part =
          b.has_value() ? std::optional<at::Tensor>(b->narrow(0, r0, r1 - r0)) : std::nullopt;
      y2.narrow(1, r0, r1 - r0).copy_(at::linear(x2, as_x(w), part));
    }
  });
  return y;
}

// y (..., N) = x (..., K) @ weight.T (+ bias) for a float32, bfloat16 or float16 weight (N, K) and x of any of
// those types, with a few tokens in mind (`float_gemv`): float32 sums, y in x's type.
at::Tensor float_gemv_cpu(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  auto is_float = [](const at::Tensor& t) {
    return t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16 || t.scalar_type() == at::kHalf;
  };
  TORCH_CHECK(x.dim() >= 1 && is_float(x), "float_gemv_cpu: x must be float32, bfloat16 or float16 (..., K)");
  TORCH_CHECK(weight.dim() == 2 && is_float(weight) && weight.size(1) == x.size(-1),
              "float_gemv_cpu: weight must be float32, bfloat16 or float16 (N, K) with K = x.size(-1)");
  const int64_t K = x.size(-1), M = K ? x.numel() / K : 0, N = weight.size(0);
  TORCH_CHECK(!bias.has_value() || !bias->defined() || (bias->dim() == 1 && bias->size(0) == N),
              "float_gemv_cpu: bias must be (N,)");
  auto sizes = x.sizes().vec();
  sizes.back() = N;
  at::Tensor y = at::empty(sizes, x.options().dtype(at::kFloat));
  auto finish = [&](at::Tensor& sums) {  // + bias, in x's type
    if (bias.has_value() && bias->defined()) sums.add_(bias->to(at::kFloat));
    return x.scalar_type() == at::kFloat ? sums : sums.to(x.scalar_type());
  };
  if (K == 0) y.zero_();
  if (y.numel() == 0 || K == 0) return finish(y);
  const at::Tensor xf = x.to(at::kFloat).contiguous(), w = weight.contiguous();
  float* out = y.data_ptr<float>();
  const int64_t grain = grain_rows(K * static_cast<int64_t>(w.element_size()), M);
  auto run = [&](auto* wp) {
    at::parallel_for(0, N, grain, [&](int64_t n0, int64_t n1) {
      lowbit::float_gemv(wp, xf.data_ptr<float>(), out, M, N, K, n0, n1);
    });
  };
  switch (w.scalar_type()) {
    case at::kBFloat16: run(w.data_ptr<c10::BFloat16>()); break;
    case at::kHalf: run(w.data_ptr<c10::Half>()); break;
    default: run(w.data_ptr<float>());
  }
  return finish(y);
}

}  // namespace

// The schemas are defined in Python (lowbit/kernels/cpu.py), with their fake implementations.
TORCH_LIBRARY_IMPL(lowbit, CPU, m) {
  m.impl("int_gemv_cpu", &int_gemv_cpu);
  m.impl("dequant_cpu", &dequant_cpu);
  m.impl("dequant_linear_cpu", &dequant_linear_cpu);
  m.impl("build_features_cpu", &build_features_cpu);
  m.impl("float_gemv_cpu", &float_gemv_cpu);
}
