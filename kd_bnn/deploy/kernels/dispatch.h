// kd_bnn kernels: what each ISA file provides, and the per-ISA kernel table (dispatch.cpp).
//
// The drivers (pack.cpp, xnor.cpp, bwn.cpp) never name an ISA-specific function: they ask
// isa_kernels(code) for the kernels of a path, so an ISA is added by a new file plus an entry in
// dispatch.cpp.

#pragma once

#include "common.h"

namespace kdbnn {

// ---------------------------------------------------------------- provided by the ISA files
// xnor_scalar.cpp (portable)
extern const XnorKernel kXnorScalar;
// pack.cpp (portable; SSE2 where the compiler targets it)
void pack_row_nchw(const float* src, int64_t plane, int64_t C, int64_t W, uint64_t* dst);

#if KDBNN_X86
// xnor_x86.cpp
extern const XnorKernel kXnorPopcnt;  // scalar POPCNT
extern const XnorKernel kXnorAvx2;    // AVX2 PSHUFB nibble-lookup popcount
extern const XnorKernel kXnorAvx512;  // AVX-512 VPOPCNTDQ
// xnor_epilogue_x86.cpp
extern const XnorEpilogue kXnorEpilogueAvx2;
// pack_x86.cpp
void pack_row_nchw_avx2(const float* src, int64_t plane, int64_t C, int64_t W, uint64_t* dst);
// bwn_x86.cpp, bwn_avx512.cpp (one source, bwn_lut.h)
extern const BwnLutKernel kBwnLutAvx2;
extern const BwnLutKernel kBwnLutAvx512;
#endif

// ---------------------------------------------------------------- dispatch (dispatch.cpp)
// Kernels of one ISA path; a null member means "use the driver's portable code".
struct IsaKernels {
  const XnorKernel* xnor;               // XNOR micro-kernel (never null)
  const XnorEpilogue* xnor_epilogue;    // pixel-major vector epilogue, or null
  PackRowFn pack_row;                   // binarize + pack one row (never null)
  const BwnLutKernel* bwn_lut;          // BWN lookup-table kernel, or null: direct conv
};

// Whether this CPU (and build) can run ISA path `isa`; false for unknown codes.
bool cpu_has(int64_t isa);

// Kernels of ISA path `isa`; throws (c10::Error) on an unknown code or a path the CPU lacks.
const IsaKernels& isa_kernels(int64_t isa);

// Row packer of the best path this CPU has (packing takes no ISA argument).
PackRowFn best_pack_row();

}  // namespace kdbnn
