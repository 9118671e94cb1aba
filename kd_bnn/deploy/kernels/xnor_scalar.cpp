// kd_bnn kernels: portable XNOR micro-kernel (the scalar path, and the reference for the others).
//
// Activations and weights are bit-packed along channels (bit 1 = +1, LSB first, padding bits 0,
// see kd_bnn/deploy/pack.py); the dot product over K = C_in*KH*KW terms is
// dot = K - 2 * popcount(a XOR w) (Rastegari et al., "XNOR-Net", ECCV 2016). A micro-kernel
// returns the popcounts of P pixels x 16 output channels (XTile in common.h); xnor.cpp turns
// them into outputs.

#include "dispatch.h"

namespace kdbnn {

namespace {

template <int P>
inline void xtile_generic(const XTile& t) {
  uint32_t acc[P][kCoBlock];
  std::memset(acc, 0, sizeof(acc));
  for (int64_t r = 0; r < t.kh; ++r) {
    const uint64_t* wr = t.w + r * t.len * t.w_stride;
    const int64_t off = r * t.row_stride;
    for (int64_t j = 0; j < t.len; ++j) {
      const uint64_t* wk = wr + j * t.w_stride;
      for (int p = 0; p < P; ++p) {
        const uint64_t a = t.in[p][off + j];
        for (int c = 0; c < kCoBlock; ++c) acc[p][c] += (uint32_t)__builtin_popcountll(a ^ wk[c]);
      }
    }
  }
  std::memcpy(t.out, acc, sizeof(acc));
}

constexpr int kPScalar = 2;
void xtile_scalar(const XTile& t) { xtile_generic<kPScalar>(t); }

}  // namespace

const XnorKernel kXnorScalar = {xtile_scalar, kPScalar};

}  // namespace kdbnn
