// kd_bnn kernels: the Python module (pybind11). The only file that includes <torch/extension.h>
// (its parse is most of the build time); the ops are in pack.cpp, xnor.cpp, bwn.cpp and block.cpp, the ISA
// detection in dispatch.cpp. Called from kd_bnn/deploy/kernels/__init__.py, which validates the
// arguments and keeps a pure-torch fallback with the same results.

#include <torch/extension.h>

#include "dispatch.h"
#include "ops.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "kd_bnn binary convolution kernels (XNOR popcount conv, BWN conv)";
  m.def("has_isa", &kdbnn::cpu_has, "whether the CPU supports ISA path code (0 scalar, 1 popcnt, 2 avx2, 3 avx512)");
  m.def("pack_input", &kdbnn::pack_input, "binarize and pack (N,C,H,W) float -> padded NHWC int64 words",
        py::arg("x"), py::arg("pad"), py::arg("pad_value"), py::arg("thr") = py::none(), py::arg("isa") = -1);
  m.def("pad_packed", &kdbnn::pad_packed, "pad packed NHWC words with +1/-1 pad words");
  m.def("concat_packed", &kdbnn::concat_packed,
        "packed words of a channel concatenation of packed NHWC parts, padded with +1/-1 pad words");
  m.def("xnor_conv", &kdbnn::xnor_conv, "XNOR popcount convolution on packed NHWC input");
  m.def("xnor_conv_ex", &kdbnn::xnor_conv_ex,
        "XNOR conv with a residual add and float + packed outputs from one epilogue pass",
        py::arg("xpad"), py::arg("panel"), py::arg("c_out"), py::arg("c_in"), py::arg("KH"), py::arg("KW"),
        py::arg("stride"), py::arg("scale"), py::arg("bias"), py::arg("act"), py::arg("residual"), py::arg("want_float"),
        py::arg("want_packed"),
        py::arg("lo"), py::arg("hi"), py::arg("table"), py::arg("affine_a"), py::arg("affine_b"), py::arg("out_pad"), py::arg("out_pad_value"), py::arg("isa"));
  m.def("bwn_conv", &kdbnn::bwn_conv, "float x packed-binary-weight convolution", py::arg("x"), py::arg("wpacked"),
        py::arg("alpha"), py::arg("bias"), py::arg("KH"), py::arg("KW"), py::arg("stride"), py::arg("pad"),
        py::arg("act"), py::arg("isa"), py::arg("prepared") = py::none());
  m.def("bwn_prepare", &kdbnn::bwn_prepare, "table offsets of a BWN layer for the lookup-table kernel (reused per call)",
        py::arg("wpacked"), py::arg("C"), py::arg("H"), py::arg("W"), py::arg("KH"), py::arg("KW"), py::arg("stride"),
        py::arg("pad"), py::arg("isa"));
  m.def("w1a8_conv", &kdbnn::w1a8_conv, "int8 x packed-binary-weight convolution (exact integer sums)",
        py::arg("xq"), py::arg("wpacked"), py::arg("scale"), py::arg("bias"), py::arg("KH"), py::arg("KW"),
        py::arg("stride"), py::arg("pad"), py::arg("act"), py::arg("out_scale_inv"), py::arg("isa"),
        py::arg("prepared") = py::none());
  m.def("w1a8_prepare", &kdbnn::w1a8_prepare, "table offsets of a W1A8 layer for the lookup-table kernel (reused per call)",
        py::arg("wpacked"), py::arg("C"), py::arg("H"), py::arg("W"), py::arg("KH"), py::arg("KW"), py::arg("stride"),
        py::arg("pad"), py::arg("isa"));
  m.def("quantize_act", &kdbnn::quantize_act, "float32 -> int8 clamp(rint(x * inv_scale), -127, 127)",
        py::arg("x"), py::arg("inv_scale"), py::arg("isa") = -1);
  m.def("stem_conv", &kdbnn::stem_conv, "float conv with few input channels (stem), bias + activation fused",
        py::arg("x"), py::arg("w"), py::arg("bias"), py::arg("stride"), py::arg("pad"), py::arg("act"), py::arg("isa"),
        py::arg("pool_pad") = -1);
  m.def("stem_block", &kdbnn::stem_block, "output channels per block of the stem row kernel of an ISA path");
  m.def("pointwise_conv", &kdbnn::pointwise_conv, "1x1 float conv on the stem row kernels, bias + activation fused");
  m.def("block_epilogue", &kdbnn::block_epilogue, "binary block epilogue: shortcut add + (R)PReLU, in place");
}
