// kd_bnn kernels: what each ISA file provides, and the per-ISA kernel table (dispatch.cpp).
//
// The drivers (pack.cpp, xnor.cpp, bwn.cpp) never name an ISA-specific function: they ask
// isa_kernels(code) for the kernels of a path, so an ISA is added by a new file plus an entry in
// dispatch.cpp.

#pragma once

#include "common.h"

namespace kdbnn {

// ---------------------------------------------------------------- small-C_in float conv (stem)
// One output row of stem_conv (stem.cpp) for a run of output-channel blocks: direct conv from
// per-row zero-padded, stride-deinterleaved copies of the KH input rows of every input channel
// (the "phase rows", prepared by stem.cpp), so every tap reads contiguous floats and borders
// need no test in the kernel.
struct StemRow {
  const float* buf;     // phase rows: row ((c*KH + kh)*stride + p) at buf + row*Lp holds
                        // x[c][oh*stride - pad + kh][stride*j + p - pad] at j (0 outside the input)
  const int64_t* off;   // per tap k = (c*KH + kh)*KW + kw: its phase row * Lp + kw / stride
  int64_t K;            // taps: C_in * KH * KW
  const float* w;       // weights of the first block: [nb][K][cb], channels past c_out 0
  const float* bias;    // [nb][cb]
  int64_t nb;           // channel blocks of this call
  int64_t nc;           // output channels from the first block's to c_out (the last block may be partial)
  int64_t OW, act;      // output width; activation (Act)
  float* out;           // output (this row) of the first block's first channel; channel j at out + j*plane
  int64_t plane;        // OH * OW
};

// A stem row kernel and its channels per block (cb).
struct StemKernel {
  void (*row)(const StemRow& r);
  int64_t cb;
};

// ---------------------------------------------------------------- provided by the ISA files
// xnor_scalar.cpp (portable)
extern const XnorKernel kXnorScalar;
// pack.cpp (portable; SSE2 where the compiler targets it)
void pack_row_nchw(const float* src, int64_t plane, int64_t C, int64_t W, const float* thr, uint64_t* dst);
// stem.cpp (portable; SSE2 where the compiler targets it)
extern const StemKernel kStemPortable;

#if KDBNN_X86
// xnor_x86.cpp
extern const XnorKernel kXnorPopcnt;  // scalar POPCNT
extern const XnorKernel kXnorAvx2;    // AVX2 PSHUFB nibble-lookup popcount
extern const XnorKernel kXnorAvx512;  // AVX-512 VPOPCNTDQ
// xnor_epilogue_x86.cpp
extern const XnorEpilogue kXnorEpilogueAvx2;        // with the FMA affine_px
extern const XnorEpilogue kXnorEpilogueAvx2NoFma;   // AVX2 without FMA: affine_px null
// pack_x86.cpp
void pack_row_nchw_avx2(const float* src, int64_t plane, int64_t C, int64_t W, const float* thr, uint64_t* dst);
// bwn_x86.cpp, bwn_avx512.cpp (one source, bwn_lut.h)
extern const BwnLutKernel kBwnLutAvx2;
extern const BwnLutKernel kBwnLutAvx512;
// stem_x86.cpp
extern const StemKernel kStemAvx2;    // AVX2 + FMA
extern const StemKernel kStemAvx512;  // AVX-512F
#endif

// ---------------------------------------------------------------- dispatch (dispatch.cpp)
// Kernels of one ISA path; a null member means "use the driver's portable code".
struct IsaKernels {
  const XnorKernel* xnor;               // XNOR micro-kernel (never null)
  const XnorEpilogue* xnor_epilogue;    // pixel-major vector epilogue, or null
  PackRowFn pack_row;                   // binarize + pack one row (never null)
  const BwnLutKernel* bwn_lut;          // BWN lookup-table kernel, or null: direct conv
  const StemKernel* stem;               // small-C_in float conv row kernel (never null)
};

// Whether this CPU (and build) can run ISA path `isa`; false for unknown codes.
bool cpu_has(int64_t isa);

// Kernels of ISA path `isa`; throws (c10::Error) on an unknown code or a path the CPU lacks.
const IsaKernels& isa_kernels(int64_t isa);

// Row packer of the best path this CPU has (pack_input's default).
PackRowFn best_pack_row();

}  // namespace kdbnn
