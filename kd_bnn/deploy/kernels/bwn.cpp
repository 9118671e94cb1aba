// kd_bnn kernels: BWN convolution driver (float activations x packed binary weights).
//
// BWN conv (Xu et al., ICRA 2019; the BWN case of XNOR-Net): out = conv2d(x, alpha[c]*sign(W))
// + bias, then an activation, with the weights held bit-packed (32x smaller); neither path keeps
// a float copy of a whole layer's weights. Sums are re-associated, so results match F.conv2d to
// float rounding, not bit for bit.
//
// ISAs with a lookup-table kernel (avx2: bwn_x86.cpp, avx512: bwn_avx512.cpp, one source in
// bwn_lut.h, BiQGEMM-style): per tile of 16 output pixels and group of g = 4..6 input channels at
// one tap, the 2^g signed sums +-x0+-x1... are tabulated once and every output channel adds the
// entry its g weight bits select (one add per g MACs x 16 pixels). This file prepares the kernel's
// inputs: the plan (g, tables per pass, r = 1, the kw-sharing r4 or the kh-sharing rows kernel)
// and the table offsets (one byte per g weights, about 1/16 of a float copy; prepared once per
// layer by bwn_prepare, or per call); the kernels read the input in place; per thread one pass of
// tables (16-32 KB) plus the accumulators.
//
// Other paths (scalar, popcnt; portable C++): direct conv on a zero-padded NHWC float copy; each
// 16-output-channel weight panel is unpacked from bits to +-alpha floats on the fly into a
// thread-local buffer (K*16 floats) and consumed by a 6-pixel x 16-channel micro-kernel.

#include "dispatch.h"
#include "lut_prep.h"
#include "lut_split.h"
#include "ops.h"

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>

#include <climits>
#include <cstdlib>
#include <memory>
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

// ---------------------------------------------------------------- lookup-table kernel set-up
constexpr int64_t kLutIdxSlack = 8;  // bytes after the index rows (see lut_block in bwn_lut.h)

// Tables (r4, rows: units) per pass when a tuning variable overrides the plan's kernel: r = 1 16
// tables, r4 about 24 KB, rows lut_rows_pg.
void lut_default_pg(LutArgs& A) {
  const int64_t table = int64_t(64) << A.g;
  A.pg = A.r4 ? std::max<int64_t>(1, 24576 / ((4 + A.KW - 1) * table)) : A.rows ? lut_rows_pg(A) : 16;
}

// Table size and kernel: the ISA's plan, or (tuning) KDBNN_BWN_G (4..6), KDBNN_BWN_PG (>= 1),
// KDBNN_BWN_R4 (0/1; where the r4 kernel applies) and KDBNN_BWN_ROWS (R, 0 = off; where it applies).
void lut_choose(const BwnLutKernel& k, LutArgs& A) {
  k.plan(A);
  const int64_t g0 = A.g;
  if (const char* e = std::getenv("KDBNN_BWN_G")) {
    const long v = std::strtol(e, nullptr, 10);
    if (v >= 4 && v <= 6) A.g = v;
  }
  if (const char* e = std::getenv("KDBNN_BWN_R4")) A.r4 = std::strtol(e, nullptr, 10) != 0;
  if (A.r4 && !lut_r4_ok(A)) A.r4 = 0;
  if (const char* e = std::getenv("KDBNN_BWN_ROWS")) A.rows = std::strtol(e, nullptr, 10);
  if (A.r4 || !lut_rows_ok(A, A.rows)) A.rows = 0;
  if (A.g != g0 || std::getenv("KDBNN_BWN_R4") || std::getenv("KDBNN_BWN_ROWS")) lut_default_pg(A);
  if (const char* e = std::getenv("KDBNN_BWN_PG")) {
    const long v = std::strtol(e, nullptr, 10);
    if (v >= 1 && v <= 256) A.pg = v;
  }
}

// ---------------------------------------------------------------- prepared table offsets
// The table offsets depend only on the weights and the plan (g, r4, rows: bwn_lut.h lays rows out
// by them), so a caller can compute them once per layer (bwn_prepare; lut_prep.h says when it pays) instead of per call
// (measured 6-8% of a 512->512 @10x10 call, 2-3% at 256@20, Zen 5 AVX-512, 1 thread). The
// prepared tensor has lut_prep.h's format: header {magic, g, r4 + 16 * rows, C, KH, KW, c_out,
// bytes}, then the offset rows and kLutIdxSlack zero bytes; bwn_conv uses it when its header
// matches the call's plan and prepares per call otherwise.
constexpr int64_t kPrepMagic = 0x6b64626e6e4c5554;  // "kdbnnLUT"

// The plan of the lookup-table kernel for one layer geometry: A's geometry fields, g, pg, r4,
// ngrp, co_pad; the bytes of its offset rows.
int64_t lut_setup(const BwnLutKernel& k, LutArgs& A, int64_t N, int64_t C, int64_t H, int64_t W, int64_t KH,
                  int64_t KW, int64_t stride, int64_t pad, int64_t c_out) {
  const int64_t OH = (H + 2 * pad - KH) / stride + 1, OW = (W + 2 * pad - KW) / stride + 1;
  A.C = C, A.H = H, A.W = W, A.pad = pad, A.stride = stride, A.KH = KH, A.KW = KW, A.OH = OH, A.OW = OW;
  A.c_out = c_out, A.total = N * OH * OW;
  lut_choose(k, A);
  A.ngrp = (C + A.g - 1) / A.g;
  A.co_pad = (c_out + 7) / 8 * 8;
  A.Hp = H + 2 * pad, A.Wp = W + 2 * pad;
  return KH * KW * A.ngrp * A.co_pad * (A.g == 6 ? 2 : 1);
}

void lut_header(const LutArgs& A, int64_t bytes, LutPrepHead& h) {
  const LutPrepHead v = {kPrepMagic, A.g, A.r4 + 16 * A.rows, A.C, A.KH, A.KW, A.c_out, bytes};
  std::memcpy(h, v, sizeof(v));
}

// All offset rows of the layer into idx (+ kLutIdxSlack zero bytes).
void lut_prepare(const BwnLutKernel& k, const LutArgs& A, const at::Tensor& wpk, int64_t nw, int64_t bytes,
                 uint8_t* idx) {
  std::memset(idx + bytes, 0, kLutIdxSlack);
  const uint64_t* wp = reinterpret_cast<const uint64_t*>(wpk.data_ptr<int64_t>());
  const int64_t KK = A.KH * A.KW;
  at::parallel_for(0, KK, std::max<int64_t>(1, 16384 / std::max<int64_t>(1, A.ngrp * A.co_pad)),
                   [&](int64_t b, int64_t e) { k.prep_idx(wp, A, nw, b, e, idx); });
}

void check_packed(const at::Tensor& wpacked, int64_t C, int64_t KK) {
  TORCH_CHECK(wpacked.dim() == 3 && wpacked.scalar_type() == at::kLong,
              "kd_bnn.bwn_conv: packed weight must be int64 (C_out, KH*KW, nw), found ", wpacked.sizes());
  TORCH_CHECK(wpacked.size(1) == KK && wpacked.size(2) == (C + 63) / 64, "kd_bnn.bwn_conv: packed weight ",
              wpacked.sizes(), " does not match input channels ", C, " and kernel ", KK, " taps");
}

}  // namespace

// The prepared table offsets of a layer for inputs of C x H x W (see kPrepMagic); an empty tensor
// when ISA path isa has no lookup-table kernel.
at::Tensor bwn_prepare(at::Tensor wpacked, int64_t C, int64_t H, int64_t W, int64_t KH, int64_t KW, int64_t stride,
                       int64_t pad, int64_t isa) {
  check_packed(wpacked, C, KH * KW);
  TORCH_CHECK(stride >= 1 && pad >= 0 && H + 2 * pad >= KH && W + 2 * pad >= KW, "kd_bnn.bwn_prepare: bad geometry");
  TORCH_CHECK(isa == ISA_SCALAR || cpu_has(isa), "kd_bnn: this CPU lacks the instructions of ISA path ", isa);
  const BwnLutKernel* lut = isa_kernels(isa).bwn_lut;
  if (lut == nullptr) return at::empty({0}, at::kByte);
  LutArgs A{};
  const int64_t bytes = lut_setup(*lut, A, 1, C, H, W, KH, KW, stride, pad, wpacked.size(0));
  LutPrepHead h;
  lut_header(A, bytes, h);
  uint8_t* rows = nullptr;
  auto out = lut_prep_alloc(h, bytes, kLutIdxSlack, rows);
  lut_prepare(*lut, A, wpacked.contiguous(), (C + 63) / 64, bytes, rows);
  return out;
}

// x: float (N, C, H, W); wpacked: int64 (C_out, KH*KW, nw); alpha: float (C_out).
// Returns float (N, C_out, OH, OW) = conv2d(x, alpha * sign(W), bias, stride, pad) -> activation.
// prepared: bwn_prepare's tensor for these weights (used when it matches the call's plan).
at::Tensor bwn_conv(at::Tensor x, at::Tensor wpacked, at::Tensor alpha, c10::optional<at::Tensor> bias,
                    int64_t KH, int64_t KW, int64_t stride, int64_t pad, int64_t act, int64_t isa,
                    c10::optional<at::Tensor> prepared) {
  TORCH_CHECK(x.dim() == 4, "kd_bnn.bwn_conv: expected input (N, C, H, W), found ", x.sizes());
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const int64_t nw = (C + 63) / 64, KK = KH * KW, c_out = wpacked.size(0);
  check_packed(wpacked, C, KK);
  TORCH_CHECK(alpha.numel() == c_out, "kd_bnn.bwn_conv: alpha has ", alpha.numel(), " values, expected ", c_out);
  TORCH_CHECK(act >= ACT_NONE && act <= ACT_LEAKY, "kd_bnn.bwn_conv: bad activation ", act);
  TORCH_CHECK(stride >= 1 && pad >= 0, "kd_bnn.bwn_conv: bad stride/pad ", stride, "/", pad);
  const int64_t Hp = H + 2 * pad, Wp = W + 2 * pad;
  TORCH_CHECK(Hp >= KH && Wp >= KW, "kd_bnn.bwn_conv: padded input smaller than kernel");
  const int64_t OH = (Hp - KH) / stride + 1, OW = (Wp - KW) / stride + 1;
  TORCH_CHECK(isa == ISA_SCALAR || cpu_has(isa), "kd_bnn: this CPU lacks the instructions of ISA path ", isa);
  // ISAs with a lookup-table kernel (avx2, avx512; bwn_lut.h) use it. It reads the input in place;
  // gathered lanes use 32-bit offsets, so an input of 2^31 floats or more takes the portable path.
  const BwnLutKernel* lut = isa_kernels(isa).bwn_lut;
  if (lut != nullptr && N * C * H * W < (int64_t)INT32_MAX) {
    auto xf = x.to(at::kFloat).contiguous();
    auto a = alpha.to(at::kFloat).contiguous();
    std::vector<float> bi(c_out, 0.0f);
    if (bias.has_value() && bias->defined()) {
      auto s = bias->to(at::kFloat).contiguous();
      TORCH_CHECK(s.numel() == c_out, "kd_bnn.bwn_conv: bias has ", s.numel(), " values, expected ", c_out);
      std::memcpy(bi.data(), s.data_ptr<float>(), sizeof(float) * c_out);
    }
    auto out = at::empty({N, c_out, OH, OW}, at::kFloat);
    LutArgs A{};
    A.X = xf.data_ptr<float>();
    const int64_t idx_bytes = lut_setup(*lut, A, N, C, H, W, KH, KW, stride, pad, c_out);
    // table offsets: one byte (g <= 5) or two (g = 6) per g weights, prepared or rebuilt per call
    // (the lookups load offsets a qword at a time and may read up to 7 bytes past the last row:
    // kLutIdxSlack zero bytes there)
    std::unique_ptr<uint8_t[]> idx;
    LutPrepHead h;
    lut_header(A, idx_bytes, h);
    A.idx = lut_prep_rows(prepared, h, idx_bytes, kLutIdxSlack);
    if (A.idx == nullptr) {
      idx.reset(new uint8_t[idx_bytes + kLutIdxSlack]);
      lut_prepare(*lut, A, wpacked.contiguous(), nw, idx_bytes, idx.get());
      A.idx = idx.get();
    }
    A.alpha = a.data_ptr<float>(), A.bias = bi.data(), A.act = act, A.O = out.data_ptr<float>();
    // work items: tiles or (tile, output-channel chunk) pairs (lut_split.h), or for a layer of few
    // tiles (tile, input part) pairs whose sums combine adds (lut_kparts)
    const int64_t n_tiles = lut_tiles(A);
    A.kparts = lut_kparts(A, n_tiles);
    at::Tensor part;
    if (A.kparts > 1) {
      part = at::empty({n_tiles * A.kparts * A.co_pad * 16}, at::kFloat);
      A.part = part.data_ptr<float>();
    }
    lut_parallel_items<float>(
        n_tiles * A.kparts, A.co_pad, int64_t(1) << A.g, A.co_chunk, [&] { return lut_work_floats(A); },
        [&](int64_t b, int64_t e, float* work) { lut->range(A, b, e, work); }, A.kparts == 1);
    if (A.kparts > 1) at::parallel_for(0, n_tiles, 1, [&](int64_t b, int64_t e) { lut->combine(A, b, e); });
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
