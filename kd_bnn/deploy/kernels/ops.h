// kd_bnn kernels: the tensor-level ops bound to Python in module.cpp.
//
// Only the light ATen core headers (not <torch/extension.h>, which takes ~30 s to parse): the
// drivers that include this header stay quick to compile.

#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <c10/util/Optional.h>

#include <cstdint>
#include <vector>

namespace kdbnn {

// pack.cpp
// x: float (N, C, H, W) -> int64 (N, H+2p, W+2p, nw), sign bits (x >= thr[c] -> 1, thr undefined:
// x >= 0), border = pad words; isa -1: the best row packer, else that path's.
at::Tensor pack_input(at::Tensor x, int64_t pad, double pad_value, c10::optional<at::Tensor> thr, int64_t isa);
// xp: int64 (N, H, W, nw) packed (unpadded) -> (N, H+2p, W+2p, nw) with pad words on the border.
at::Tensor pad_packed(at::Tensor xp, int64_t channels, int64_t pad, double pad_value);
at::Tensor concat_packed(std::vector<at::Tensor> parts, std::vector<int64_t> channels, int64_t pad, double pad_value,
                         std::vector<at::Tensor> thr, std::vector<at::Tensor> le);

// xnor.cpp: XNOR popcount convolution of packed NHWC input (modes, layouts: see xnor.cpp).
at::Tensor xnor_conv(at::Tensor xpad, at::Tensor panel, int64_t c_out, int64_t c_in, int64_t KH, int64_t KW,
                     int64_t stride, c10::optional<at::Tensor> scale, c10::optional<at::Tensor> bias, int64_t act,
                     int64_t mode, int64_t out_pad, double out_pad_value, int64_t isa);

// xnor.cpp: the fused epilogue of packed chains: float act(transform(dot)) + residual, and with
// want_packed the packed signs of it (or popcount bounds lo <= cnt <= hi) from the same pass.
std::vector<at::Tensor> xnor_conv_ex(at::Tensor xpad, at::Tensor panel, int64_t c_out, int64_t c_in, int64_t KH,
                                     int64_t KW, int64_t stride, c10::optional<at::Tensor> scale,
                                     c10::optional<at::Tensor> bias, int64_t act, c10::optional<at::Tensor> residual,
                                     bool want_float, bool want_packed, c10::optional<at::Tensor> lo, c10::optional<at::Tensor> hi,
                                     c10::optional<at::Tensor> table, c10::optional<at::Tensor> affine_a,
                                     c10::optional<at::Tensor> affine_b, int64_t out_pad, double out_pad_value,
                                     int64_t isa);

// bwn.cpp: float input x packed binary weights, conv2d(x, alpha * sign(W), bias) -> activation;
// prepared: bwn_prepare's table offsets for the layer (else rebuilt per call).
at::Tensor bwn_conv(at::Tensor x, at::Tensor wpacked, at::Tensor alpha, c10::optional<at::Tensor> bias, int64_t KH,
                    int64_t KW, int64_t stride, int64_t pad, int64_t act, int64_t isa,
                    c10::optional<at::Tensor> prepared);
at::Tensor bwn_prepare(at::Tensor wpacked, int64_t C, int64_t H, int64_t W, int64_t KH, int64_t KW, int64_t stride,
                       int64_t pad, int64_t isa);

// w1a8.cpp: int8 input (N, C, H, W) x packed binary weights, exact int32 sums, then the float32
// epilogue float(acc) * scale + bias -> activation; float out, or int8 (clamp(rint(y * inv),
// -127, 127)) when out_scale_inv is given; prepared: w1a8_prepare's index rows for the layer (else
// rebuilt per call).
at::Tensor w1a8_conv(at::Tensor xq, at::Tensor wpacked, at::Tensor scale, c10::optional<at::Tensor> bias, int64_t KH,
                     int64_t KW, int64_t stride, int64_t pad, int64_t act, c10::optional<double> out_scale_inv,
                     int64_t isa, c10::optional<at::Tensor> prepared);
at::Tensor w1a8_prepare(at::Tensor wpacked, int64_t C, int64_t H, int64_t W, int64_t KH, int64_t KW, int64_t stride,
                        int64_t pad, int64_t isa);
// w1a8.cpp: float32 -> int8 clamp(rint(x * inv_scale), -127, 127) (round half to even); isa -1:
// the best path.
at::Tensor quantize_act(at::Tensor x, double inv_scale, int64_t isa);

// stem.cpp: float conv with few input channels (C <= 8, KH, KW <= 7, stride 1/2, zero padding),
// act(conv2d(x, w, bias, stride, pad)) -> float (N, C_out, OH, OW); pool_pad 0/1: then Darknet's
// 2x2 stride-2 max-pool with that padding, only the pooled map written (-1: no pool).
at::Tensor stem_conv(at::Tensor x, at::Tensor w, c10::optional<at::Tensor> bias, int64_t stride, int64_t pad,
                     int64_t act, int64_t isa, int64_t pool_pad);

// stem.cpp: 1x1 float conv on the stem row kernels; wb: float (nblk, C, cb) with cb = stem_block(isa).
int64_t stem_block(int64_t isa);
at::Tensor pointwise_conv(at::Tensor x, at::Tensor wb, c10::optional<at::Tensor> bias, int64_t c_out, int64_t act,
                          int64_t isa);

// block.cpp: y = prelu(y + shortcut(s) - gamma, slope) + zeta in place (kinds: see block.cpp).
void block_epilogue(at::Tensor y, at::Tensor s, int64_t kind, at::Tensor gamma, at::Tensor slope, at::Tensor zeta);

// stem.cpp: a fresh float (N, C, H, W) tensor; big ones 2 MB aligned and advised MADV_HUGEPAGE
// (fewer first-touch page faults), then a contiguous view with a storage offset.
at::Tensor new_output(int64_t N, int64_t C, int64_t H, int64_t W);

inline void check_pad_value(double v) {
  TORCH_CHECK(v == 1.0 || v == -1.0, "kd_bnn: binary padding value must be +1 or -1, found ", v);
}

}  // namespace kdbnn
