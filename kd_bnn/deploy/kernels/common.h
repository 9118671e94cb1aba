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
//   bwn_lut.h             the lookup-table BWN kernel, written once over a 16-pixel vector type
//   bwn_x86.cpp           AVX2 lookup-table BWN kernel (bwn_lut.h with two ymm per vector)
//   bwn_avx512.cpp        AVX-512 lookup-table BWN kernel (bwn_lut.h with one zmm per vector)
//   block.cpp             binary block epilogue: real shortcut add + (R)PReLU, in place (portable)
//   stem.cpp              small-C_in float conv (a detector's stem): driver, portable/SSE2 row kernel
//   stem_x86.cpp          AVX2+FMA and AVX-512F row kernels of the stem conv
//   module.cpp            pybind11 module
//
// Kernel translation units include only this header (and dispatch.h), not torch, so they compile
// in about a second each. Everything x86-specific (<immintrin.h>, __attribute__((target)),
// __builtin_cpu_supports) is compiled only when KDBNN_X86 is 1, so on other architectures the
// library builds with the portable paths alone. Adding an ISA (e.g. ARM NEON): a new
// xnor_<isa>.cpp (and optionally an epilogue / packer / BWN kernel: for x86 a struct V of vector
// operations plus #include "bwn_lut.h", as bwn_avx512.cpp does), its declarations in
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
  // write_rows adding res (NCHW rows like out, or null) to each value before it is stored, and
  // setting masks[i] (or null) to the signs of the stored values of pixel i (bit c: value >= 0)
  void (*write_rows_ex)(const float* src, int64_t run, int64_t nc, float* out, int64_t plane, const float* res,
                        uint32_t* masks);
  // in place, v[p][c] = fma(v[p][c], a[c], b[c]) (one rounding, as std::fma), or null where the CPU
  // has no FMA (the driver then calls std::fma)
  void (*affine_px)(float* v, int64_t np, const float* a, const float* b);
};

// ---------------------------------------------------------------- input packing
// One NCHW image row (channel c at src + c*plane) -> W pixels of packed words, padding bits 0;
// bit c of a pixel: x >= thr[c] (thr null: x >= 0). A per-channel threshold -b is RSign's
// sign(x + b) without the shifted map: round(x + b) >= 0 exactly when x >= -b (rounding is
// monotonic, 0 is exact and a nonzero exact sum never rounds to 0), for all but x, b infinite.
using PackRowFn = void (*)(const float* src, int64_t plane, int64_t C, int64_t W, const float* thr, uint64_t* dst);

// ---------------------------------------------------------------- BWN lookup-table kernel
// Arguments of the lookup-table BWN conv (bwn.cpp prepares them; the method is described in
// bwn_lut.h, shared by the AVX2 and AVX-512 kernels).
struct LutArgs {
  const float* X;       // float NCHW input (N, C, H, W), read in place (padding reads as 0)
  int64_t C, H, W, pad, stride, KH, KW, OH, OW, c_out;
  int64_t total;        // N * OH * OW output pixels (tiles of 16 in flattened (n, oh, ow) order)
  int64_t g;            // weight bits per table: 4, 5 or 6 (2^g entries of 16 floats)
  int64_t ngrp;         // groups of g input channels per tap: ceil(C / g)
  int64_t pg;           // tables per pass (see bwn_lut.h)
  int64_t co_pad;       // c_out rounded up to 8: the length of an index row
  int64_t co_chunk;     // output channels per work item (a multiple of 8; co_pad unless there are
                        // too few tiles for the threads: then items are (tile, channel chunk))
  // input split (r = 1 kernel, few tiles; lut_kparts): kparts > 1 splits each tile's passes into
  // kparts work items whose sums go to part [tile][kpart][co_pad][16] and are added, epilogue
  // and store, by the kernel's combine; 1 = off
  int64_t kparts;
  float* part;
  const void* idx;      // [kk * ngrp + j][co_pad] table offsets s * 8, uint8 (g <= 5) / uint16 (g = 6);
                        // r4: rows ordered [kh][j][kw]
  // kw-sharing variant (r4 = 1; stride 1, KW <= 5, see bwn_lut.h): tiles of 64 positions of the
  // zero-padded domain Hp x Wp (its input vectors are loaded from X in place, padding reads 0)
  int64_t r4;
  int64_t Hp, Wp;
  // kh-sharing variant (rows = R in 2..kLutMaxRows, lut_rows_ok; see bwn_lut.h): tiles of 16
  // columns x R output rows; 0 = off. idx rows ordered [kw][j][kh]
  int64_t rows;
  const float* alpha;   // per output channel scale, then bias, then the activation
  const float* bias;
  int64_t act;
  float* O;             // (N, c_out, OH, OW)
};

// Floats of per-thread scratch the kernel needs (one pass of tables + the accumulators, 80 floats
// of skew between them, 16 for 64-byte alignment).
// r4: a pass unit is (4 + KW - 1) tables and each channel has 4 accumulator vectors.
// rows: a pass unit is (R + KH - 1) tables and each channel has R accumulator vectors.
inline int64_t lut_work_floats(const LutArgs& A) {
  const int64_t unit = A.r4 ? 4 + A.KW - 1 : A.rows ? A.rows + A.KH - 1 : 1, accv = A.r4 ? 4 : A.rows ? A.rows : 1;
  return A.pg * unit * (int64_t(16) << A.g) + A.co_pad * 16 * accv + 80 + 16;
}

// Whether the r4 kernel handles the layer (stride 1, KW <= 5, g 4 or 5), and its tiles per image:
// 64 positions of the padded-width output domain, (OH - 1) * Wp + OW of them.
inline bool lut_r4_ok(const LutArgs& A) { return A.stride == 1 && A.KW <= 5 && (A.g == 4 || A.g == 5); }
inline int64_t lut_r4_tiles(const LutArgs& A) {
  const int64_t Wp = A.W + 2 * A.pad;
  return ((A.OH - 1) * Wp + A.OW + 63) / 64;
}

// Whether the row-sharing kernel handles the layer with R rows per tile (stride 1, KH 3 or 5, g 4
// or 5; R: bwn_lut.h instantiates 2..kLutMaxRows), and its positions: N * ceil(OH / R) * OW
// (columns of R output rows, flattened (n, row band, ow); tiles of 16).
constexpr int64_t kLutMaxRows = 3;
inline bool lut_rows_ok(const LutArgs& A, int64_t R) {
  return A.stride == 1 && (A.KH == 3 || A.KH == 5) && (A.g == 4 || A.g == 5) && R >= 2 && R <= kLutMaxRows;
}
// Units per pass of the rows kernel: about 32 KB of tables (3x3, g = 4, R = 2: 8 units; measured
// at 64->64 @80x80 and 128->128 @40x40, Zen 5: 6 units 3-4% slower, 10 units 3%, 12 units 10%).
inline int64_t lut_rows_pg(const LutArgs& A) {
  return std::max<int64_t>(1, 32768 / ((A.rows + A.KH - 1) * (int64_t(64) << A.g)));
}
inline int64_t lut_rows_total(const LutArgs& A) {
  return A.total / (A.OH * A.OW) * ((A.OH + A.rows - 1) / A.rows) * A.OW;
}
// Work tiles of the layer's kernel (r = 1: 16 output pixels, r4: 64 positions, rows: 16 columns).
inline int64_t lut_tiles(const LutArgs& A) {
  if (A.r4) return A.total / (A.OH * A.OW) * lut_r4_tiles(A);
  return ((A.rows ? lut_rows_total(A) : A.total) + 15) / 16;
}

struct BwnLutKernel {
  // Work items [tb, te): item t is tile t / n_chunks (16 output pixels; r4: 64 positions) for
  // output channels [c * co_chunk, (c + 1) * co_chunk) with c = t % n_chunks, n_chunks =
  // ceil(co_pad / co_chunk); work: lut_work_floats(A) floats, 64-byte aligned.
  void (*range)(const LutArgs& A, int64_t tb, int64_t te, float* work);
  // Index rows of taps [kb, ke) from packed weights (C_out, KH*KW, nw) into A.idx.
  void (*prep_idx)(const uint64_t* wp, const LutArgs& A, int64_t nw, int64_t kb, int64_t ke, void* idx);
  // Table size g, tables (r4, rows: units) per pass pg and the kernel (r4, rows) for the layer
  // whose geometry (C .. total) A holds.
  void (*plan)(LutArgs& A);
  // Tiles [tb, te) of an input-split call (A.kparts > 1): the sum of their parts, alpha, bias,
  // activation, output.
  void (*combine)(const LutArgs& A, int64_t tb, int64_t te);
};

// Input parts per tile of the r = 1 kernel (the work split when a layer has few tiles: each part
// runs a share of the passes for all output channels into its own sums, which are then added, so
// the tables are built once, where output-channel chunks rebuild them per chunk). A function of
// the layer alone, not of the thread count, so every thread count gives the same sums bit for bit:
// at least 8 work items where the passes allow, an even number of parts (items split evenly over 2
// threads) and at most 4, at least one pass per part. Layers of fewer than 256 tables per tile (1x1
// convs) keep whole tiles: their part sums cost more than their table builds (1 thread, Zen 5, 1x1
// 512->1024 @10x10: 0.164-0.169 ms split vs 0.151-0.154; their channel chunks rebuild little).
// Measured at 2 threads (Zen 5, shared machine, best of interleaved runs): 3x3 512->512 @10x10
// 0.373 vs 0.422 ms (2 channel chunks), 1024->1024 @6x6 0.633 vs 0.685; 1 thread within noise.
inline int64_t lut_kparts(const LutArgs& A, int64_t n_tiles) {
  if (A.r4 || A.rows || n_tiles <= 0 || n_tiles >= 8 || A.KH * A.KW * A.ngrp < 256) return 1;
  const int64_t n_pass = (A.KH * A.KW * A.ngrp + A.pg - 1) / A.pg;
  const int64_t k = (8 + n_tiles - 1) / n_tiles;
  return std::max<int64_t>(1, std::min<int64_t>({k + (k & 1), int64_t(4), n_pass}));
}

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
