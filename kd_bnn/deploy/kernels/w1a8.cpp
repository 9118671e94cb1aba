// kd_bnn kernels: W1A8 convolution driver (int8 activations x packed binary weights, exact).
//
// acc[n, o, p] = sum_{c, kh, kw} sign(W[o, c, kh, kw]) * xq[n, c, ih, iw] in int32 (exact), then
// the float32 epilogue y = float(acc) * scale[o]; y = y + bias[o]; activation (none / relu /
// leaky 0.1), one rounding per op and never contracted into an FMA; float out y, or int8 out
// clamp(rint(y * inv), -127, 127) for the next W1A8 layer (round half to even). Bit-exact with
// the torch reference in kernels/__init__.py (w1a8_conv2d).
//
// This file: argument checks, the zero-padded stride-phase-split int8 copy of the input (w1a8.h),
// the table offsets (one byte per g weights: per call, or once per layer by w1a8_prepare, whose
// tensor w1a8_conv takes as prepared; the format of lut_prep.h), the work split over threads, and
// the portable path (scalar / popcnt ISA codes: a direct int32 conv over the same copy). The avx2
// and avx512 paths are the lookup-table kernel of w1a8_lut.h. Also quantize_act: float -> int8.

#include "ops.h"
#include "w1a8.h"
#include "dispatch.h"
#include "lut_prep.h"
#include "lut_split.h"

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>

#include <climits>
#include <cmath>
#include <cstdlib>
#include <memory>
#include <vector>

namespace kdbnn {

namespace {

// The lookup-table kernel of ISA path `isa`, or null (portable direct conv).
const W1a8Kernel* w1a8_kernel(int64_t isa) {
#if KDBNN_X86
  __builtin_cpu_init();
  if (isa == ISA_AVX512 && __builtin_cpu_supports("avx512vl")) return &kW1a8Avx512;
  if ((isa == ISA_AVX512 || isa == ISA_AVX2) && cpu_has(ISA_AVX2)) return &kW1a8Avx2;
#endif
  (void)isa;
  return nullptr;
}

// y = float(acc) * sc; y = y + bi; activation. The product goes through a volatile, so it is
// rounded to float before the add on every compiler and flag set (no contraction).
inline float w8_transform(int32_t acc, float sc, float bi, int64_t act) {
  volatile float prod = (float)acc * sc;
  float y = prod + bi;
  if (act == ACT_RELU) y = y > 0.0f ? y : 0.0f;
  else if (act == ACT_LEAKY) y = y > 0.0f ? y : y * 0.1f;
  return y;
}

inline int8_t w8_quant(float y, float inv) {
  float z = y * inv;
  z = std::min(std::max(z, -127.0f), 127.0f);
  return (int8_t)std::nearbyint(z);  // the default rounding mode: half to even
}

// Portable path: per (image, output channel) an int32 row over the position domain.
void w8_direct(const W8Args& A, int64_t N, const uint64_t* wp, int64_t nw) {
  const int64_t KK = A.KH * A.KW, plane = A.OH * A.OW;
  at::parallel_for(0, N * A.c_out, 1, [&](int64_t b, int64_t e) {
    std::vector<int32_t> acc(A.qtot);
    for (int64_t no = b; no < e; ++no) {
      const int64_t n = no / A.c_out, o = no % A.c_out;
      std::fill(acc.begin(), acc.end(), 0);
      int32_t* a = acc.data();
      for (int64_t kk = 0; kk < KK; ++kk) {
        const uint64_t* w = wp + (o * KK + kk) * nw;
        for (int64_t c = 0; c < A.C; ++c) {
          const int8_t* src = A.X + n * A.img + c * A.cplane + A.toff[kk];
          if ((w[c >> 6] >> (c & 63)) & 1ULL) {
            for (int64_t q = 0; q < A.qtot; ++q) a[q] += src[q];
          } else {
            for (int64_t q = 0; q < A.qtot; ++q) a[q] -= src[q];
          }
        }
      }
      const float sc = A.scale[o], bi = A.bias[o];
      for (int64_t oh = 0; oh < A.OH; ++oh) {
        const int32_t* ar = a + oh * A.Wq;
        const int64_t ob = (n * A.c_out + o) * plane + oh * A.OW;
        if (A.quant) {
          int8_t* dst = static_cast<int8_t*>(A.O) + ob;
          for (int64_t ow = 0; ow < A.OW; ++ow) dst[ow] = w8_quant(w8_transform(ar[ow], sc, bi, A.act), A.inv);
        } else {
          float* dst = static_cast<float*>(A.O) + ob;
          for (int64_t ow = 0; ow < A.OW; ++ow) dst[ow] = w8_transform(ar[ow], sc, bi, A.act);
        }
      }
    }
  });
}

// Stride 1, one channel: rows of [pad zeros][W bytes][pad zeros], contiguous. Each row but the
// last is copied in CH-byte chunks whose last one runs on into the gap and the next row, then CH
// zero bytes go to the gap (over the next row's start, written next): no call per row (the
// memset/memcpy/memset of the general path cost ~4% of a 64 @80 layer). Needs W >= CH >= 2 pad.
template <int CH>
void w8_pad_rows(const int8_t* src, int64_t H, int64_t W, int64_t pad, int64_t Wq, int64_t cplane, int8_t* d) {
  static constexpr int8_t kZero[CH] = {};
  std::memset(d, 0, pad * Wq + pad);  // top rows and the first lead
  for (int64_t ih = 0; ih + 1 < H; ++ih) {
    int8_t* row = d + (ih + pad) * Wq + pad;
    const int8_t* sr = src + ih * W;
    for (int64_t k = 0; k < W; k += CH) std::memcpy(row + k, sr + k, CH);
    std::memcpy(row + W, kZero, CH);
  }
  int8_t* row = d + (H - 1 + pad) * Wq + pad;
  std::memcpy(row, src + (H - 1) * W, W);
  std::memset(row + W, 0, cplane - (row + W - d));  // the last gap and the bottom rows
}

// The padded stride-phase-split copy (w1a8.h) of int8 NCHW x, plus kW8Slack zero bytes.
void w8_pad_input(const int8_t* x, int64_t N, int64_t C, int64_t H, int64_t W, int64_t pad, const W8Args& A,
                  int8_t* dst) {
  const int64_t s = A.stride, Hq = A.Hq, Wq = A.Wq;
  std::memset(dst + N * A.img, 0, kW8Slack);
  at::parallel_for(0, N * A.Cg, std::max<int64_t>(1, 65536 / std::max<int64_t>(1, A.cplane)), [&](int64_t b, int64_t e) {
    for (int64_t nc = b; nc < e; ++nc) {
      const int64_t n = nc / A.Cg, c = nc % A.Cg;
      int8_t* d = dst + n * A.img + c * A.cplane;
      if (c >= C) {
        std::memset(d, 0, A.cplane);
        continue;
      }
      const int8_t* src = x + (n * C + c) * H * W;
      if (s == 1 && W >= 8 && 2 * pad <= (W >= 16 ? 16 : 8)) {
        if (W >= 16) w8_pad_rows<16>(src, H, W, pad, Wq, A.cplane, d);
        else w8_pad_rows<8>(src, H, W, pad, Wq, A.cplane, d);
        continue;
      }
      for (int64_t ph = 0; ph < s * s; ++ph) {
        const int64_t pa = ph / s, pb = ph % s;
        for (int64_t i = 0; i < Hq; ++i) {
          int8_t* row = d + (ph * Hq + i) * Wq;
          const int64_t ih = s * i + pa - pad;
          if (ih < 0 || ih >= H) {
            std::memset(row, 0, Wq);
            continue;
          }
          const int8_t* sr = src + ih * W;
          if (s == 1) {
            const int64_t lead = std::min(pad, Wq), body = std::max<int64_t>(0, std::min(W, Wq - pad));
            std::memset(row, 0, lead);
            std::memcpy(row + lead, sr, body);
            std::memset(row + lead + body, 0, Wq - lead - body);
          } else {
            for (int64_t j = 0; j < Wq; ++j) {
              const int64_t iw = s * j + pb - pad;
              row[j] = (iw >= 0 && iw < W) ? sr[iw] : (int8_t)0;
            }
          }
        }
      }
    }
  });
}

// ---------------------------------------------------------------- plan and table offsets
// The plan of kernel k (null: the portable path) for one layer geometry: A's geometry fields, g,
// r4, pg, win (the int16 bound, w1a8_lut.h), Cg, ngrp, co_pad and the position domain (w1a8.h).
// Returns the bytes of the layer's index rows.
int64_t w8_setup(const W1a8Kernel* k, W8Args& A, int64_t C, int64_t H, int64_t W, int64_t KH, int64_t KW,
                 int64_t stride, int64_t pad, int64_t c_out) {
  const int64_t Hp = H + 2 * pad, Wp = W + 2 * pad, KK = KH * KW;
  A.C = C, A.KH = KH, A.KW = KW, A.stride = stride, A.c_out = c_out;
  A.OH = (Hp - KH) / stride + 1, A.OW = (Wp - KW) / stride + 1;
  A.g = 4;
  if (k != nullptr) {
    k->plan(A);
    // tuning overrides: KDBNN_W1A8_G (4/5), KDBNN_W1A8_R4 (0/1, where the r4 kernel applies),
    // KDBNN_W1A8_ROWS (0/1, where the rows kernel applies; the one set to 1 clears the other, ROWS
    // read last), KDBNN_W1A8_PG (tables, r4 / rows: units, per pass; clamped to the int16 bound
    // below)
    const char* eg = std::getenv("KDBNN_W1A8_G");
    const char* er = std::getenv("KDBNN_W1A8_R4");
    if (eg != nullptr) {
      const long v = std::strtol(eg, nullptr, 10);
      if (v == 4 || v == 5) A.g = v;
    }
    const char* ew = std::getenv("KDBNN_W1A8_ROWS");
    if (er != nullptr) {
      A.r4 = std::strtol(er, nullptr, 10) != 0 && w8_r4_ok(A) && k->has_r4;
      if (A.r4) A.rows = 0;
    }
    if (ew != nullptr) {
      A.rows = std::strtol(ew, nullptr, 10) != 0 && w8_rows_ok(A) && k->has_r4;
      if (A.rows) A.r4 = 0;
    }
    if (eg != nullptr || er != nullptr || ew != nullptr)
      A.pg = A.r4 ? std::max<int64_t>(1, 24576 / ((A.KW + 3) * (int64_t(64) << A.g)))
                  : A.rows ? w8_rows_pg(A) : A.g == 5 ? 12 : 21;
    if (const char* e = std::getenv("KDBNN_W1A8_PG")) {
      const long v = std::strtol(e, nullptr, 10);
      if (v >= 1) A.pg = v;
    }
    // the int16 bound (w1a8_lut.h): at most w8_max_pass(g) entries per int16 sum
    if (A.rows) {  // each int16 sum adds KH * KW entries per unit (group)
      A.pg = std::min<int64_t>(A.pg, w8_max_pass(A.g) / KK);
      A.win = w8_max_pass(A.g) / (A.pg * KK);
    } else if (A.r4) {
      A.pg = std::min<int64_t>(A.pg, w8_max_pass(A.g) / A.KW);
      A.win = w8_max_pass(A.g) / (A.pg * A.KW);
    } else {
      A.pg = std::min<int64_t>(A.pg, w8_max_pass(A.g));
      A.win = w8_max_pass(A.g) / A.pg;
    }
  }
  A.Cg = (C + A.g - 1) / A.g * A.g;
  TORCH_CHECK(128 * A.Cg * KK < (int64_t)INT32_MAX, "kd_bnn.w1a8_conv: C_in*KH*KW too large for int32 sums");
  A.Hq = (Hp + stride - 1) / stride, A.Wq = (Wp + stride - 1) / stride;
  A.cplane = stride * stride * A.Hq * A.Wq, A.img = A.Cg * A.cplane;
  A.qtot = (A.OH - 1) * A.Wq + A.OW;
  A.ngrp = A.Cg / A.g;
  A.co_pad = (c_out + 7) / 8 * 8;
  return KK * A.ngrp * A.co_pad;
}

// Zero bytes after the index rows: the lookups read kLutAhead rows ahead and up to 7 bytes past a
// block's offsets (lut_lookups).
inline int64_t w8_idx_slack(const W8Args& A) { return kW8IdxAhead * A.co_pad + 16; }

// The header of prepared index rows (lut_prep.h): what their layout depends on.
constexpr int64_t kW8PrepMagic = 0x6b64626e6e573841;  // "kdbnnW8A"
void w8_header(const W8Args& A, int64_t bytes, LutPrepHead& h) {
  const LutPrepHead v = {kW8PrepMagic, A.g, A.r4 + 2 * A.rows, A.C, A.KH, A.KW, A.c_out, bytes};
  std::memcpy(h, v, sizeof(v));
}

// All index rows of the layer into idx (the slack after them is the caller's).
void w8_prep_rows(const W1a8Kernel& k, const W8Args& A, const at::Tensor& wpk, uint8_t* idx) {
  const uint64_t* wp = reinterpret_cast<const uint64_t*>(wpk.data_ptr<int64_t>());
  const int64_t nw = (A.C + 63) / 64, KK = A.KH * A.KW;
  at::parallel_for(0, KK, std::max<int64_t>(1, 16384 / std::max<int64_t>(1, A.ngrp * A.co_pad)),
                   [&](int64_t b, int64_t e) { k.prep_idx(wp, A, nw, b, e, idx); });
}

void w8_check_packed(const at::Tensor& wpacked, int64_t C, int64_t KH, int64_t KW) {
  TORCH_CHECK(wpacked.dim() == 3 && wpacked.scalar_type() == at::kLong,
              "kd_bnn.w1a8_conv: packed weight must be int64 (C_out, KH*KW, nw), found ", wpacked.sizes());
  TORCH_CHECK(KH >= 1 && KW >= 1 && wpacked.size(1) == KH * KW && wpacked.size(2) == (C + 63) / 64,
              "kd_bnn.w1a8_conv: packed weight ", wpacked.sizes(), " does not match input channels ", C, " and kernel ",
              KH, "x", KW);
}

}  // namespace

// The prepared index rows of a layer for inputs of C x H x W (lut_prep.h); an empty tensor when
// ISA path isa has no lookup-table kernel.
at::Tensor w1a8_prepare(at::Tensor wpacked, int64_t C, int64_t H, int64_t W, int64_t KH, int64_t KW, int64_t stride,
                        int64_t pad, int64_t isa) {
  w8_check_packed(wpacked, C, KH, KW);
  TORCH_CHECK(C >= 1 && wpacked.size(0) >= 1 && stride >= 1 && pad >= 0 && H + 2 * pad >= KH && W + 2 * pad >= KW,
              "kd_bnn.w1a8_prepare: bad geometry");
  TORCH_CHECK(isa == ISA_SCALAR || cpu_has(isa), "kd_bnn: this CPU lacks the instructions of ISA path ", isa);
  const W1a8Kernel* k = w1a8_kernel(isa);
  if (k == nullptr) return at::empty({0}, at::kByte);
  W8Args A{};
  const int64_t bytes = w8_setup(k, A, C, H, W, KH, KW, stride, pad, wpacked.size(0));
  LutPrepHead h;
  w8_header(A, bytes, h);
  uint8_t* rows = nullptr;
  auto out = lut_prep_alloc(h, bytes, w8_idx_slack(A), rows);
  w8_prep_rows(*k, A, wpacked.contiguous(), rows);
  return out;
}

at::Tensor w1a8_conv(at::Tensor xq, at::Tensor wpacked, at::Tensor scale, c10::optional<at::Tensor> bias, int64_t KH,
                     int64_t KW, int64_t stride, int64_t pad, int64_t act, c10::optional<double> out_scale_inv,
                     int64_t isa, c10::optional<at::Tensor> prepared) {
  TORCH_CHECK(xq.dim() == 4 && xq.scalar_type() == at::kChar,
              "kd_bnn.w1a8_conv: expected int8 input (N, C, H, W), found ", xq.scalar_type(), " ", xq.sizes());
  const int64_t N = xq.size(0), C = xq.size(1), H = xq.size(2), W = xq.size(3);
  w8_check_packed(wpacked, C, KH, KW);
  const int64_t nw = (C + 63) / 64, KK = KH * KW, c_out = wpacked.size(0);
  TORCH_CHECK(scale.numel() == c_out && scale.scalar_type() == at::kFloat,
              "kd_bnn.w1a8_conv: scale must be float32 with ", c_out, " values, found ", scale.numel());
  TORCH_CHECK(act >= ACT_NONE && act <= ACT_LEAKY, "kd_bnn.w1a8_conv: bad activation ", act);
  TORCH_CHECK(stride >= 1 && pad >= 0, "kd_bnn.w1a8_conv: bad stride/pad ", stride, "/", pad);
  TORCH_CHECK(H + 2 * pad >= KH && W + 2 * pad >= KW, "kd_bnn.w1a8_conv: padded input smaller than kernel");
  TORCH_CHECK(N >= 1 && C >= 1 && c_out >= 1, "kd_bnn.w1a8_conv: empty input or weight");
  TORCH_CHECK(isa == ISA_SCALAR || cpu_has(isa), "kd_bnn: this CPU lacks the instructions of ISA path ", isa);

  W8Args A{};
  const W1a8Kernel* k = w1a8_kernel(isa);
  const int64_t idx_bytes = w8_setup(k, A, C, H, W, KH, KW, stride, pad, c_out);
  std::vector<int64_t> toff(KK);
  for (int64_t kh = 0; kh < KH; ++kh)
    for (int64_t kw = 0; kw < KW; ++kw)
      toff[kh * KW + kw] = ((kh % stride) * stride + kw % stride) * A.Hq * A.Wq + (kh / stride) * A.Wq + kw / stride;
  A.toff = toff.data();

  auto xc = xq.contiguous();
  auto wpk = wpacked.contiguous();
  auto sc = scale.contiguous();
  std::vector<float> bi(c_out, 0.0f);
  if (bias.has_value() && bias->defined()) {
    auto s = bias->to(at::kFloat).contiguous();
    TORCH_CHECK(s.numel() == c_out, "kd_bnn.w1a8_conv: bias has ", s.numel(), " values, expected ", c_out);
    std::memcpy(bi.data(), s.data_ptr<float>(), sizeof(float) * c_out);
  }
  A.scale = sc.data_ptr<float>(), A.bias = bi.data(), A.act = act;
  A.quant = out_scale_inv.has_value() ? 1 : 0;
  A.inv = A.quant ? (float)*out_scale_inv : 1.0f;
  auto out = at::empty({N, c_out, A.OH, A.OW}, A.quant ? at::kChar : at::kFloat);
  A.O = out.data_ptr();

  std::unique_ptr<int8_t[]> xbuf(new int8_t[N * A.img + kW8Slack]);  // all written
  w8_pad_input(xc.data_ptr<int8_t>(), N, C, H, W, pad, A, xbuf.get());
  A.X = xbuf.get();

  if (k == nullptr) {
    w8_direct(A, N, reinterpret_cast<const uint64_t*>(wpk.data_ptr<int64_t>()), nw);
    return out;
  }
  // index rows: prepared (w1a8_prepare) when they match this call's plan, else rebuilt
  LutPrepHead h;
  w8_header(A, idx_bytes, h);
  const int64_t slack = w8_idx_slack(A);
  A.idx = lut_prep_rows(prepared, h, idx_bytes, slack);
  std::unique_ptr<uint8_t[]> idx;
  if (A.idx == nullptr) {
    idx.reset(new uint8_t[idx_bytes + slack]);
    std::memset(idx.get() + idx_bytes, 0, slack);
    w8_prep_rows(*k, A, wpk, idx.get());
    A.idx = idx.get();
  }
  // work items: tiles or (tile, output-channel chunk) pairs (lut_split.h)
  const int64_t n_tiles =
      N * (A.r4 ? w8_r4_tiles_per_image(A) : A.rows ? w8_rows_tiles_per_image(A) : w8_tiles_per_image(A));
  lut_parallel_items<int32_t>(
      n_tiles, A.co_pad, int64_t(1) << A.g, A.co_chunk, [&] { return w8_work_ints(A); },
      [&](int64_t b, int64_t e, int32_t* work) { k->range(A, b, e, work); });
  return out;
}

// float x -> int8 clamp(rint(x * inv), -127, 127) (w8_quant1; the vector paths: clamp in float,
// then the round-half-even conversion, the same values); ISA path isa, or the best one (-1).
at::Tensor quantize_act(at::Tensor x, double inv_scale, int64_t isa) {
  TORCH_CHECK(x.scalar_type() == at::kFloat, "kd_bnn.quantize_act: expected float32 input, found ", x.scalar_type());
  auto xc = x.contiguous();
  auto out = at::empty(xc.sizes(), at::kChar);
  const float* src = xc.data_ptr<float>();
  int8_t* dst = out.data_ptr<int8_t>();
  const float inv = (float)inv_scale;
  QuantizeFn fn = nullptr;
#if KDBNN_X86
  if (isa < 0) isa = cpu_has(ISA_AVX512) ? ISA_AVX512 : cpu_has(ISA_AVX2) ? ISA_AVX2 : ISA_SCALAR;
  TORCH_CHECK(isa == ISA_SCALAR || cpu_has(isa), "kd_bnn: this CPU lacks the instructions of ISA path ", isa);
  if (isa == ISA_AVX512) fn = quantize_avx512;
  else if (isa == ISA_AVX2) fn = quantize_avx2;
#endif
  at::parallel_for(0, xc.numel(), 65536, [&](int64_t b, int64_t e) {
    if (fn != nullptr) return fn(src + b, e - b, inv, dst + b);
    for (int64_t i = b; i < e; ++i) dst[i] = w8_quant1(src[i], inv);
  });
  return out;
}

}  // namespace kdbnn
