// kd_bnn kernels: the epilogue of a binary block (portable; memory bound, one pass in place).
//
//   y[n, c] = prelu(y[n, c] + S(s)[n, c] - gamma[c], slope[c]) + zeta[c]
//
// y is the binary conv's output with its BN folded in, s the shortcut source (the block input,
// already average-pooled for a strided conv). S maps channels as kd_bnn.binary.blocks does:
// kind 0 none, 1 identity, 2 repeat (c <- c mod C_s), 3 fold (mean of s[j], j mod C_y == c). A
// plain activation after the add is the same formula with zero shifts (leaky: slope 0.1, ReLU 0,
// linear 1), so one loop serves RPReLU and every activation the runtime fuses here.

#include "ops.h"

#include <ATen/Parallel.h>

#include <algorithm>

namespace kdbnn {

namespace {

// out = prelu(out + src - g, a) + z over n floats, branch-free (max/min: vectorised by the compiler;
// a compare-and-branch on activation signs mispredicts half the time). src may be null.
inline void prelu_row(float* __restrict out, const float* __restrict src, int64_t n, float g, float a, float z) {
  if (src != nullptr) {
    for (int64_t i = 0; i < n; ++i) {
      const float v = out[i] + src[i] - g;
      out[i] = std::max(v, 0.f) + a * std::min(v, 0.f) + z;
    }
  } else {
    for (int64_t i = 0; i < n; ++i) {
      const float v = out[i] - g;
      out[i] = std::max(v, 0.f) + a * std::min(v, 0.f) + z;
    }
  }
}

}  // namespace

void block_epilogue(at::Tensor y, at::Tensor s, int64_t kind, at::Tensor gamma, at::Tensor slope, at::Tensor zeta) {
  TORCH_CHECK(y.dim() == 4 && y.scalar_type() == at::kFloat && y.is_contiguous(),
              "kd_bnn.block_epilogue: y must be contiguous float (N, C, H, W), found ", y.sizes());
  TORCH_CHECK(kind >= 0 && kind <= 3, "kd_bnn.block_epilogue: kind must be 0..3, found ", kind);
  const int64_t N = y.size(0), C = y.size(1), HW = y.size(2) * y.size(3);
  int64_t Cs = 0;
  if (kind != 0) {
    TORCH_CHECK(s.dim() == 4 && s.scalar_type() == at::kFloat && s.is_contiguous() && s.size(0) == N &&
                    s.size(2) == y.size(2) && s.size(3) == y.size(3),
                "kd_bnn.block_epilogue: shortcut must be contiguous float (N, C_s, H, W) matching y ", y.sizes(),
                ", found ", s.sizes());
    Cs = s.size(1);
    TORCH_CHECK(kind != 1 || Cs == C, "kd_bnn.block_epilogue: identity shortcut needs ", C, " channels, found ", Cs);
  }
  for (const at::Tensor* t : {&gamma, &slope, &zeta})
    TORCH_CHECK(t->dim() == 1 && t->size(0) == C && t->scalar_type() == at::kFloat && t->is_contiguous(),
                "kd_bnn.block_epilogue: gamma/slope/zeta must be contiguous float (", C, ",)");
  float* py = y.data_ptr<float>();
  const float* ps = kind != 0 ? s.data_ptr<float>() : nullptr;
  const float *pg = gamma.data_ptr<float>(), *pa = slope.data_ptr<float>(), *pz = zeta.data_ptr<float>();
  at::parallel_for(0, N * C, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t n = b / C, c = b % C;
      float* out = py + b * HW;
      const float g = pg[c], a = pa[c], z = pz[c];
      if (kind == 1 || kind == 2) {
        prelu_row(out, ps + (n * Cs + (kind == 1 ? c : c % Cs)) * HW, HW, g, a, z);
      } else if (kind == 3) {
        int64_t count = 0;
        for (int64_t j = c; j < Cs; j += C) ++count;
        const float inv = 1.f / (float)count;
        // y + mean = y + sum * inv: accumulate the folded channels into out, then the activation
        for (int64_t j = c; j < Cs; j += C) {
          const float* __restrict src = ps + (n * Cs + j) * HW;
          for (int64_t i = 0; i < HW; ++i) out[i] += src[i] * inv;
        }
        prelu_row(out, nullptr, HW, g, a, z);
      } else {
        prelu_row(out, nullptr, HW, g, a, z);
      }
    }
  });
}

}  // namespace kdbnn
