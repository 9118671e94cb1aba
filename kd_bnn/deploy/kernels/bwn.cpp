// kd_bnn kernels: BWN convolution driver (float activations x packed binary weights).
//
// BWN conv (Xu et al., ICRA 2019; the BWN case of XNOR-Net): out = conv2d(x, alpha[c]*sign(W))
// + bias, then an activation, with the weights held bit-packed (32x smaller); neither path keeps
// a float copy of a whole layer's weights. Sums are re-associated, so results match F.conv2d to
// float rounding, not bit for bit.
//
// ISAs with a lookup-table kernel (avx2 and avx512: the AVX2 one in bwn_x86.cpp, BiQGEMM-style):
// for a tile of output pixels and 4 input channels at one tap, the 16 signed sums +-x0+-x1+-x2+-x3
// are tabulated once and every output channel adds the entry its 4 weight bits select (one add per
// 4 MACs x 8 pixels). This file prepares its inputs: a zero-padded NCHW copy of the input and the
// per-call byte offsets (one byte per 4 weights, 1/16 of a float copy); per thread 16 tables of
// 16 x px floats + c_out x px accumulators.
//
// Other paths (scalar, popcnt; portable C++): direct conv on a zero-padded NHWC float copy; each
// 16-output-channel weight panel is unpacked from bits to +-alpha floats on the fly into a
// thread-local buffer (K*16 floats) and consumed by a 6-pixel x 16-channel micro-kernel.

#include "dispatch.h"
#include "ops.h"

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>

#include <climits>
#include <vector>

namespace kdbnn {

namespace {

// ---------------------------------------------------------------- portable direct conv
// Unpack one 16-channel panel: dst[k*16 + c] = alpha[co+c] * (bit ? +1 : -1) for k over
// (kh, kw, c_in) in NHWC window order; channels beyond c_out are 0. The sign is applied by
// XOR-ing the float sign bit, so the inner 16-channel loop is branch-free and vectorizes.
inline void unpack_panel_impl(const uint64_t* wp, int64_t c_out, int64_t co, int64_t KK, int64_t nw,
                              int64_t c_in, const float* alpha, float* dst) {
  const int64_t nc = std::min<int64_t>(kCoBlock, c_out - co);
  uint32_t abits[kCoBlock];
  for (int c = 0; c < kCoBlock; ++c) {
    const float a = c < nc ? alpha[co + c] : 0.f;
    std::memcpy(&abits[c], &a, sizeof(float));
  }
  uint64_t wd[kCoBlock];
  for (int64_t kk = 0; kk < KK; ++kk) {
    for (int64_t wi = 0; wi < nw; ++wi) {
      for (int c = 0; c < kCoBlock; ++c) wd[c] = c < nc ? wp[((co + c) * KK + kk) * nw + wi] : ~0ULL;
      const int64_t nb = std::min<int64_t>(64, c_in - wi * 64);
      uint32_t* d = reinterpret_cast<uint32_t*>(dst + (kk * c_in + wi * 64) * kCoBlock);
      for (int64_t b = 0; b < nb; ++b) {
        for (int c = 0; c < kCoBlock; ++c)
          d[b * kCoBlock + c] = abits[c] ^ ((uint32_t)(~(wd[c] >> b) & 1ULL) << 31);
      }
    }
  }
}

void unpack_panel_base(const uint64_t* wp, int64_t c_out, int64_t co, int64_t KK, int64_t nw, int64_t c_in,
                       const float* alpha, float* dst) {
  unpack_panel_impl(wp, c_out, co, KK, nw, c_in, alpha, dst);
}

struct FTile {
  const float* in[kMaxP];
  int64_t row_stride;  // floats between input rows (Wp * C)
  int64_t kh, len;     // kernel rows, contiguous floats per window row (KW * C)
  int64_t j0, j1;      // this call covers window columns [j0, j1) of every row (K blocking)
  bool accumulate;     // add to out (later K blocks) instead of overwriting it
  const float* w;      // panel [K][16]
  float* out;          // [P][16]
};

constexpr int kPF = 6;

void ftile_scalar(const FTile& t) {
  float acc[kPF][kCoBlock] = {};
  if (t.accumulate) std::memcpy(acc, t.out, sizeof(acc));
  for (int64_t r = 0; r < t.kh; ++r) {
    const float* wr = t.w + r * t.len * kCoBlock;
    const int64_t off = r * t.row_stride;
    for (int64_t j = t.j0; j < t.j1; ++j) {
      for (int p = 0; p < kPF; ++p) {
        const float a = t.in[p][off + j];
        for (int c = 0; c < kCoBlock; ++c) acc[p][c] += a * wr[j * kCoBlock + c];
      }
    }
  }
  std::memcpy(t.out, acc, sizeof(acc));
}

// ---------------------------------------------------------------- lookup-table kernel inputs
// Float NCHW input -> zero-padded NCHW copy with channels rounded up to 4 and slack for the
// 8-wide loads past the last pixel.
at::Tensor lut_pad_input(const at::Tensor& xf, int64_t pad, int64_t Cp) {
  const int64_t N = xf.size(0), C = xf.size(1), H = xf.size(2), W = xf.size(3), Hp = H + 2 * pad, Wp = W + 2 * pad;
  auto xp = at::empty({N * Cp * Hp * Wp + 32}, at::kFloat);
  const float* src = xf.data_ptr<float>();
  float* dst = xp.data_ptr<float>();
  std::memset(dst + N * Cp * Hp * Wp, 0, sizeof(float) * 32);
  at::parallel_for(0, N * Cp, std::max<int64_t>(1, 65536 / (Hp * Wp)), [&](int64_t b, int64_t e) {
    for (int64_t nc = b; nc < e; ++nc) {
      const int64_t n = nc / Cp, c = nc % Cp;
      float* d = dst + nc * Hp * Wp;
      if (c >= C) {
        std::memset(d, 0, sizeof(float) * Hp * Wp);
        continue;
      }
      const float* s = src + (n * C + c) * H * W;
      std::memset(d, 0, sizeof(float) * (pad * Wp + pad));
      for (int64_t h = 0; h < H; ++h) {
        float* row = d + (h + pad) * Wp + pad;
        std::memcpy(row, s + h * W, sizeof(float) * W);
        if (h + 1 < H) std::memset(row + W, 0, sizeof(float) * 2 * pad);
      }
      std::memset(d + (H + pad - 1) * Wp + pad + W, 0, sizeof(float) * (pad * Wp + pad));
    }
  });
  return xp;
}

// Packed weights (C_out, KK, nw) -> lookup offsets [(kk*nw + wi)][c][16]: nibble j of word
// (c, kk, wi) times entry_bytes / 8 (the kernel addresses T + offset * 8). Nibble j of a word is
// the low (j even) or high half of byte j/2: mask, shift and interleave, 16 bytes per word.
std::vector<uint8_t> lut_indices(const uint64_t* wp, int64_t c_out, int64_t KK, int64_t nw, int entry_bytes) {
  std::vector<uint8_t> idx(KK * nw * c_out * 16);
  const int sh = entry_bytes == 64 ? 3 : 2;
  TORCH_CHECK(entry_bytes == 32 || entry_bytes == 64, "kd_bnn: bad LUT entry size ", entry_bytes);
  // ~16 bytes written per weight word: serial below 64K words (tens of microseconds)
  at::parallel_for(0, KK * nw, std::max<int64_t>(1, 65536 / std::max<int64_t>(1, c_out)), [&](int64_t b, int64_t e) {
    for (int64_t kw = b; kw < e; ++kw) {
      uint8_t* row = idx.data() + kw * c_out * 16;
      for (int64_t c = 0; c < c_out; ++c) {
        const uint64_t w = wp[c * KK * nw + kw];
#if KDBNN_SSE2
        const __m128i m = _mm_set1_epi8(0x0f), v = _mm_cvtsi64_si128((long long)w);
        const __m128i x = _mm_unpacklo_epi8(_mm_and_si128(v, m), _mm_and_si128(_mm_srli_epi16(v, 4), m));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(row + c * 16), _mm_slli_epi16(x, sh));
#else
        for (int j = 0; j < 16; ++j) row[c * 16 + j] = (uint8_t)(((w >> (4 * j)) & 15ULL) << sh);
#endif  // KDBNN_SSE2
      }
    }
  });
  return idx;
}

}  // namespace

// x: float (N, C, H, W); wpacked: int64 (C_out, KH*KW, nw); alpha: float (C_out).
// Returns float (N, C_out, OH, OW) = conv2d(x, alpha * sign(W), bias, stride, pad) -> activation.
at::Tensor bwn_conv(at::Tensor x, at::Tensor wpacked, at::Tensor alpha, c10::optional<at::Tensor> bias,
                    int64_t KH, int64_t KW, int64_t stride, int64_t pad, int64_t act, int64_t isa) {
  TORCH_CHECK(x.dim() == 4, "kd_bnn.bwn_conv: expected input (N, C, H, W), found ", x.sizes());
  TORCH_CHECK(wpacked.dim() == 3 && wpacked.scalar_type() == at::kLong,
              "kd_bnn.bwn_conv: packed weight must be int64 (C_out, KH*KW, nw), found ", wpacked.sizes());
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const int64_t nw = (C + 63) / 64, KK = KH * KW, c_out = wpacked.size(0);
  TORCH_CHECK(wpacked.size(1) == KK && wpacked.size(2) == nw, "kd_bnn.bwn_conv: packed weight ", wpacked.sizes(),
              " does not match input channels ", C, " and kernel ", KH, "x", KW);
  TORCH_CHECK(alpha.numel() == c_out, "kd_bnn.bwn_conv: alpha has ", alpha.numel(), " values, expected ", c_out);
  TORCH_CHECK(act >= ACT_NONE && act <= ACT_LEAKY, "kd_bnn.bwn_conv: bad activation ", act);
  TORCH_CHECK(stride >= 1 && pad >= 0, "kd_bnn.bwn_conv: bad stride/pad ", stride, "/", pad);
  const int64_t Hp = H + 2 * pad, Wp = W + 2 * pad;
  TORCH_CHECK(Hp >= KH && Wp >= KW, "kd_bnn.bwn_conv: padded input smaller than kernel");
  const int64_t OH = (Hp - KH) / stride + 1, OW = (Wp - KW) / stride + 1;
  TORCH_CHECK(isa == ISA_SCALAR || cpu_has(isa), "kd_bnn: this CPU lacks the instructions of ISA path ", isa);
  // ISAs with a lookup-table kernel (avx2, avx512: the AVX2 one) use it
  // (gathered lanes use 32-bit offsets: an input over 2^31 floats takes the portable path)
  const BwnLutKernel* lut = isa_kernels(isa).bwn_lut;
  const int64_t Cp = (C + 3) / 4 * 4;
  if (lut != nullptr && N * Cp * Hp * Wp + 32 < (int64_t)INT32_MAX) {
    auto xp = lut_pad_input(x.to(at::kFloat).contiguous(), pad, Cp);
    auto wpk = wpacked.contiguous();
    const int64_t px = lut->px;  // output pixels per tile; a table entry is px floats
    const std::vector<uint8_t> idx =
        lut_indices(reinterpret_cast<const uint64_t*>(wpk.data_ptr<int64_t>()), c_out, KK, nw, (int)(4 * px));
    auto a = alpha.to(at::kFloat).contiguous();
    std::vector<float> bi(c_out, 0.0f);
    if (bias.has_value() && bias->defined()) {
      auto s = bias->to(at::kFloat).contiguous();
      TORCH_CHECK(s.numel() == c_out, "kd_bnn.bwn_conv: bias has ", s.numel(), " values, expected ", c_out);
      std::memcpy(bi.data(), s.data_ptr<float>(), sizeof(float) * c_out);
    }
    auto out = at::empty({N, c_out, OH, OW}, at::kFloat);
    LutArgs A{xp.data_ptr<float>(), Cp, Hp, Wp, OH, OW, stride, KH, KW, C, nw, c_out, N * OH * OW,
              idx.data(), a.data_ptr<float>(), bi.data(), act, out.data_ptr<float>()};
    const int64_t n_tiles = (A.total + px - 1) / px;
    at::parallel_for(0, n_tiles, 1, [&](int64_t b, int64_t e) {
      std::vector<float> buf(16 * 16 * px + c_out * px + 16);
      float* T = reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(buf.data()) + 31) & ~uintptr_t(31));
      lut->range(A, b, e, T, T + 16 * 16 * px);
    });
    return out;
  }

  // zero-padded NHWC copy of the input
  auto xf = x.to(at::kFloat).contiguous();
  auto xp = at::empty({N, Hp, Wp, C}, at::kFloat);
  {
    // zero-padded NHWC copy, transposed in 8-channel x 8-pixel blocks
    const float* src = xf.data_ptr<float>();
    float* dst = xp.data_ptr<float>();
    at::parallel_for(0, N * Hp, 1, [&](int64_t b, int64_t e) {
      for (int64_t nh = b; nh < e; ++nh) {
        const int64_t n = nh / Hp, h = nh % Hp - pad;
        float* row = dst + nh * Wp * C;
        if (h < 0 || h >= H) {
          std::memset(row, 0, sizeof(float) * Wp * C);
          continue;
        }
        std::memset(row, 0, sizeof(float) * pad * C);
        std::memset(row + (pad + W) * C, 0, sizeof(float) * pad * C);
        float* inner = row + pad * C;
        const float* s0 = src + (n * C * H + h) * W;
        for (int64_t c0 = 0; c0 < C; c0 += 8) {
          const int64_t c1 = std::min<int64_t>(C, c0 + 8);
          for (int64_t w0 = 0; w0 < W; w0 += 8) {
            const int64_t w1 = std::min<int64_t>(W, w0 + 8);
            for (int64_t w = w0; w < w1; ++w)
              for (int64_t c = c0; c < c1; ++c) inner[w * C + c] = s0[c * H * W + w];
          }
        }
      }
    });
  }
  auto a = alpha.to(at::kFloat).contiguous();
  std::vector<float> bi(c_out, 0.0f);
  if (bias.has_value() && bias->defined()) {
    auto s = bias->to(at::kFloat).contiguous();
    TORCH_CHECK(s.numel() == c_out, "kd_bnn.bwn_conv: bias has ", s.numel(), " values, expected ", c_out);
    std::memcpy(bi.data(), s.data_ptr<float>(), sizeof(float) * c_out);
  }
  auto wpk = wpacked.contiguous();
  auto out = at::empty({N, c_out, OH, OW}, at::kFloat);
  const float* X = xp.data_ptr<float>();
  const uint64_t* Wb = reinterpret_cast<const uint64_t*>(wpk.data_ptr<int64_t>());
  const float* A = a.data_ptr<float>();
  float* O = out.data_ptr<float>();
  const int64_t K = KK * C, n_cb = (c_out + kCoBlock - 1) / kCoBlock;
  const int64_t row_stride = Wp * C, len = KW * C;

  // Pixel tiles run over the flattened (n, oh, ow) index, so rows whose width is not a multiple
  // of the tile (10, 20, 40, 80 with P = 6) waste no micro-kernel work.
  const int64_t plane = OH * OW, total = N * plane;
  at::parallel_for(0, n_cb, 1, [&](int64_t b, int64_t e) {
    std::vector<float> panel_buf(K * kCoBlock + 16);
    float* panel = panel_buf.data();
    alignas(64) float res[kMaxP * kCoBlock];
    int64_t obase[kMaxP];
    for (int64_t cb = b; cb < e; ++cb) {
      const int64_t co = cb * kCoBlock, nc = std::min<int64_t>(kCoBlock, c_out - co);
      unpack_panel_base(Wb, c_out, co, KK, nw, C, A, panel);
      FTile t;
      t.row_stride = row_stride;
      t.kh = KH;
      t.len = len;
      t.j0 = 0;
      t.j1 = len;
      t.accumulate = false;
      t.w = panel;
      t.out = res;
      for (int64_t q0 = 0; q0 < total; q0 += kPF) {
        const int64_t np = std::min<int64_t>(kPF, total - q0);
        for (int p = 0; p < kPF; ++p) {
          const int64_t q = q0 + std::min<int64_t>(p, np - 1);
          const int64_t n = q / plane, rem = q % plane, oh = rem / OW, ow = rem % OW;
          t.in[p] = X + ((n * Hp + oh * stride) * Wp + ow * stride) * C;
          obase[p] = (n * c_out + co) * plane + rem;
        }
        ftile_scalar(t);
        for (int64_t c = 0; c < nc; ++c) {
          const float bc = bi[co + c];
          for (int64_t p = 0; p < np; ++p) {
            const float v = res[p * kCoBlock + c] + bc;
            O[obase[p] + c * plane] = act == ACT_RELU    ? std::max(v, 0.f)
                                      : act == ACT_LEAKY ? std::max(v, 0.f) + 0.1f * std::min(v, 0.f)
                                                         : v;
          }
        }
      }
    }
  });
  return out;
}

}  // namespace kdbnn
