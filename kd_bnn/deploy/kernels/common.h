// kd_bnn binary convolution kernels (CPU): shared types, constants and helpers.
//
// The extension is split by concern (see kd_bnn/deploy/kernels/__init__.py for the build):
//
//   common.h              this file: ISA guard, codes, tile signatures, padding helpers (no torch)
//   dispatch.h            the kernels each ISA file provides and the per-ISA kernel table
//   ops.h                 the tensor-level ops bound to Python (ATen only)
//   dispatch.cpp          CPU feature detection and the ISA -> kernels table
//   pack.cpp              binarize + pack of float input, padding of packed input (portable)
//   pack_x86.cpp          AVX2 binarize + pack of one image row
//   xnor.cpp              XNOR conv driver: tiling, threads, portable epilogue
//   xnor_scalar.cpp       portable XNOR micro-kernel
//   xnor_x86.cpp          POPCNT, AVX2 and AVX-512 VPOPCNTDQ XNOR micro-kernels
//   xnor_epilogue_x86.cpp AVX2 XNOR epilogue (transform, sign masks, transposed stores)
//   bwn.cpp               BWN conv driver: portable direct conv, lookup-table set-up
//   bwn_x86.cpp           AVX2 lookup-table BWN kernel
//   module.cpp            pybind11 module
//
// Kernel translation units include only this header (and dispatch.h), not torch, so they compile
// in about a second each. Everything x86-specific (<immintrin.h>, __attribute__((target)),
// __builtin_cpu_supports) is compiled only when KDBNN_X86 is 1, so on other architectures the
// library builds with the portable paths alone. Adding an ISA (e.g. ARM NEON): a new
// xnor_<isa>.cpp (and optionally an epilogue / packer / BWN kernel), its declarations in
// dispatch.h, an Isa code below, a cpu_has case and a table entry in dispatch.cpp, and its name
// in ISAS of kernels/__init__.py (names are indexed by code).

#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>

// x86-64 with a GNU-compatible compiler (GCC, Clang): function-level target attributes and
// __builtin_cpu_supports are GNU extensions. -DKDBNN_X86=0 forces the portable build on x86 too
// (used to check that the non-x86 build still compiles).
#if !defined(KDBNN_X86)
#if (defined(__x86_64__) || defined(_M_X64)) && defined(__GNUC__)
#define KDBNN_X86 1
#else
#define KDBNN_X86 0
#endif
#endif

// SSE2 is part of the x86-64 baseline: the portable paths use it where the compiler targets it
// (no run-time check needed), and plain C++ otherwise.
#if KDBNN_X86 && defined(__SSE2__)
#define KDBNN_SSE2 1
#else
#define KDBNN_SSE2 0
#endif

#if KDBNN_X86
#include <immintrin.h>
#endif

namespace kdbnn {

constexpr int kCoBlock = 16;  // output channels per micro-kernel tile
constexpr int kMaxP = 8;      // max pixels per micro-kernel tile

// ISA path codes, shared with Python (kernels.ISAS is indexed by code).
enum Isa : int64_t { ISA_SCALAR = 0, ISA_POPCNT = 1, ISA_AVX2 = 2, ISA_AVX512 = 3 };
constexpr int64_t kNumIsas = 4;
enum Act : int64_t { ACT_NONE = 0, ACT_RELU = 1, ACT_LEAKY = 2 };
enum Mode : int64_t { MODE_INT = 0, MODE_FLOAT = 1, MODE_PACKED = 2 };

// ---------------------------------------------------------------- XNOR micro-kernel
// Arguments of one XNOR micro-kernel call: popcount(a XOR w) of P pixels x 16 output channels
// over a KH x (KW*nw words) window (see xnor.cpp for the layouts).
struct XTile {
  const uint64_t* in[kMaxP];  // first word of each pixel's window (row kh = 0)
  int64_t row_stride;         // words between input rows (Wp * nw)
  int64_t kh;                 // kernel rows
  int64_t len;                // contiguous words per window row (KW * nw)
  const uint64_t* w;          // panel + co_block offset; row k at w + k * w_stride
  int64_t w_stride;           // panel row stride (C_out padded)
  uint32_t* out;              // [P][16] popcounts
};

using XTileFn = void (*)(const XTile&);

// A micro-kernel and the number of pixels P (<= kMaxP) it computes per call; it always reads P
// window pointers (the driver repeats the last pixel in a partial tile).
struct XnorKernel {
  XTileFn fn;
  int p;
};

// Vector XNOR epilogue working on pixel-major [p][16] popcount tiles (xnor.cpp uses it when the
// ISA has one; otherwise its portable per-pixel epilogue). All transforms must use the same float
// ops, in the same order and without contraction, as transform16 in xnor.cpp (bit-exact results).
struct XnorEpilogue {
  // counts [np][16] -> transformed floats dst [np][16]: (K - 2*count) * scale + bias, activation
  void (*transform_px)(const uint32_t* cnt, int64_t np, float K, const float* sc, const float* bi, int64_t act,
                       float* dst);
  // bit c of masks[p]: transformed value of (p, c) >= 0
  void (*sign_mask_px)(const uint32_t* cnt, int64_t np, float K, const float* sc, const float* bi, int64_t act,
                       uint32_t* masks);
  // bit c of masks[p]: lo[c] <= cnt[p][c] <= hi[c] (the integer form of the sign test)
  void (*bounds_mask_px)(const uint32_t* cnt, int64_t np, const int32_t* lo, const int32_t* hi, uint32_t* masks);
  // pixel-major block src [i][16] (floats or int32 bits) -> `nc` NCHW channel rows of `run` pixels
  void (*write_rows)(const float* src, int64_t run, int64_t nc, float* out, int64_t plane);
};

// ---------------------------------------------------------------- input packing
// One NCHW image row (channel c at src + c*plane) -> W pixels of packed words, padding bits 0.
using PackRowFn = void (*)(const float* src, int64_t plane, int64_t C, int64_t W, uint64_t* dst);

// ---------------------------------------------------------------- BWN lookup-table kernel
// Arguments of the lookup-table BWN conv (bwn.cpp prepares them, see bwn_x86.cpp for the method).
struct LutArgs {
  const float* X;       // zero-padded NCHW input: N x Cp x Hp x Wp (+ slack), Cp = C rounded up to 4
  int64_t Cp, Hp, Wp, OH, OW, stride, KH, KW, C, nw, c_out, total;
  const uint8_t* idx;   // [(kk*nw + wi)][c][16]: weight nibble j of word (c, kk, wi) * px / 2 (lut_indices)
  const float* alpha;
  const float* bias;
  int64_t act;
  float* O;             // (N, c_out, OH, OW)
};

// Computes tiles [tb, te) of `px` output pixels in flattened (n, oh, ow) order. T: 16 tables of
// 16 x px floats (32-byte aligned); acc: c_out x px floats (32-byte aligned).
using BwnLutRangeFn = void (*)(const LutArgs& A, int64_t tb, int64_t te, float* T, float* acc);

struct BwnLutKernel {
  BwnLutRangeFn range;
  int px;  // output pixels per tile (a table entry is px floats)
};

// ---------------------------------------------------------------- packed padding helpers
inline uint64_t last_word_mask(int64_t channels) {
  const int64_t rem = channels % 64;
  return rem == 0 ? ~0ULL : ((1ULL << rem) - 1ULL);
}

// Fill the words of one padded position: valid bits = 1 for +1 padding, all 0 for -1.
inline void fill_pad(uint64_t* dst, int64_t nw, int64_t channels, bool plus) {
  for (int64_t i = 0; i < nw; ++i) dst[i] = plus ? (i == nw - 1 ? last_word_mask(channels) : ~0ULL) : 0ULL;
}

}  // namespace kdbnn
