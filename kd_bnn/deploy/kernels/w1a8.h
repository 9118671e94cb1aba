// kd_bnn kernels: W1A8 convolution (binary weights x int8 activations), shared declarations.
//
// Files: w1a8.cpp (the op: checks, input copy, table offsets, threads, the portable direct conv,
// quantize_act), w1a8_lut.h (the lookup-table kernel over a 32-position int16 vector; the method
// and the exactness argument are there), w1a8_avx512.cpp (one zmm per vector, plus the kw-sharing
// (r4) and kh-sharing (rows) kernels), w1a8_x86.cpp (AVX2: two ymm). No torch here (see common.h).
//
// Input domain: the driver copies the int8 input once per call into a zero-padded, stride-phase
// split layout, so every tap of every kernel reads plain contiguous bytes:
//   image n, channel c (rounded up to a multiple of g with zero planes), phase (a, b) of the
//   stride s (a, b < s), row i < Hq, column j < Wq:  Xpad[s*i + a][s*j + b]  (0 outside the input),
//   with Hq = ceil(Hp / s), Wq = ceil(Wp / s), Hp = H + 2 pad, Wp = W + 2 pad.
// Output position (oh, ow) is q = oh * Wq + ow of that "phase-row" domain, and tap (kh, kw) of
// position q reads the byte at q + toff[kh*KW + kw] of the channel's block, toff = ((kh % s) * s +
// kw % s) * Hq * Wq + (kh / s) * Wq + kw / s. Positions with ow >= OW are computed and dropped.

#pragma once

#include "common.h"

namespace kdbnn {

constexpr int kW8Px = 32;           // positions per tile (one vector of 32 int16)
constexpr int64_t kW8Slack = 512;  // zero bytes after the padded copy (a tile's junk lanes read there)
constexpr int kW8IdxAhead = 3;     // zero index rows (+ 16 bytes) after the last one: read ahead

struct W8Args {
  const int8_t* X;      // padded phase-split copy (see above), N * img bytes + kW8Slack
  int64_t img;          // bytes per image: Cg * s*s * Hq * Wq
  int64_t cplane;       // bytes per channel: s*s * Hq * Wq
  int64_t C, Cg, KH, KW, stride, Hq, Wq, OH, OW, c_out;
  int64_t qtot;         // positions per image: (OH - 1) * Wq + OW
  const int64_t* toff;  // per tap: byte offset in the channel block
  int64_t g;            // input channels per table: 4 or 5 (2^g entries)
  int64_t ngrp;         // groups of g input channels: Cg / g
  int64_t pg;           // tables per pass (<= kW8MaxPass)
  int64_t co_pad;       // c_out rounded up to 8 (an index row)
  int64_t co_chunk;     // output channels per work item (a multiple of 8)
  const uint8_t* idx;   // [kk * ngrp + j][co_pad]: 8 * (the g weight bits of group j at tap kk);
                        // r4: rows ordered [kh][j][kw]; rows: [j][kk]
  int64_t r4;           // 1: the kw-sharing kernel (stride 1, w1a8_lut.h), tiles of 128 positions
  int64_t rows;         // 1: the kh-sharing kernel (stride 1, 3x3, w1a8_lut.h), tiles of 32 positions x
                        // 2 output rows; r4 and rows are never both set
  int64_t win;          // passes per int16 window (w1a8_lut.h)
  const float* scale;   // per output channel, then bias, then the activation
  const float* bias;
  int64_t act;
  int64_t quant;        // 1: int8 output q = clamp(rint(y * inv), -127, 127); 0: float output y
  float inv;
  void* O;              // (N, c_out, OH, OW), float or int8
};

// Where the 32 positions of a tile go: runs of consecutive outputs of one row; lane bits and the
// output offset of lane 0 (channel 0 of the image).
struct W8OutPlan {
  uint32_t bits[kW8Px + 1];
  int64_t base[kW8Px + 1];
  int nr;
  bool full;  // one run of all 32 lanes
};

// r4 kernel: per output vector m (positions q0 + 16m + [0, 16) of a 128-position tile), runs of
// consecutive outputs.
struct R4OutPlan {
  uint32_t bits[8][17];
  int64_t base[8][17];
  int nr[8];
  bool full[8];
};

// The most tables (int16 sums of g inputs, |entry| <= g * 128) added in one int16 accumulator:
// g = 4: 63 * 512 = 32256 <= 32767, g = 5: 51 * 640 = 32640 <= 32767, so no int16 overflow even
// for -128 inputs.
inline int64_t w8_max_pass(int64_t g) { return 32767 / (128 * g); }

inline int64_t w8_tiles_per_image(const W8Args& A) { return (A.qtot + 31) / 32; }
inline int64_t w8_r4_tiles_per_image(const W8Args& A) { return (A.qtot + 127) / 128; }
inline bool w8_r4_ok(const W8Args& A) { return A.stride == 1 && (A.KW == 2 || A.KW == 3); }
// rows kernel: bands of kW8Band output rows, tiles of 32 positions of the (band, ow) domain
constexpr int kW8Band = 2;
inline bool w8_rows_ok(const W8Args& A) { return A.stride == 1 && A.KH == 3 && A.KW == 3; }
// units per pass: about 24 KB of tables
inline int64_t w8_rows_pg(const W8Args& A) {
  return std::max<int64_t>(1, 24576 / ((kW8Band + A.KH - 1) * A.KW * (int64_t(64) << A.g)));
}
inline int64_t w8_rows_tiles_per_image(const W8Args& A) {
  return ((A.OH + kW8Band - 1) / kW8Band * A.OW + kW8Px - 1) / kW8Px;
}

// rows kernel: where the 32 lanes of a tile read their input, as runs of lanes of one band: for
// input row v of the tile (v < kW8RowsNV = kW8Band + KH - 1) the lanes bits[v][i] read (relative
// to the channel block, column shift kw) off[i] + v * Wq + kw + lane (bits[v][i] = 0 where the
// input row lies past the padded height: those lanes read 0). kind 0: one run of all 32 lanes,
// every row valid (plain loads); 1: two runs; 2: nr runs.
constexpr int kW8RowsNV = kW8Band + 2;
struct W8RowsInPlan {
  uint32_t bits[kW8RowsNV][kW8Px + 1];
  int64_t off[kW8Px + 1];
  int nr, kind;
};

// int32 of per-thread scratch: one pass of tables (pg * 2^g entries * 32 int16), the int16 and
// the int32 sums (co_pad * 32 each), plus 64 bytes for alignment.
// r4: pg units of (KW + 3) tables, int16 and int32 sums of 4 vectors per channel.
// rows: pg units of (kW8Band + KH - 1) * KW tables, int16 and int32 sums of kW8Band vectors per channel.
inline int64_t w8_work_ints(const W8Args& A) {
  if (A.rows)
    return A.pg * (kW8Band + A.KH - 1) * A.KW * (int64_t(16) << A.g) + A.co_pad * kW8Band * (16 + 32) + 16;
  if (A.r4) return A.pg * (A.KW + 3) * (int64_t(16) << A.g) + A.co_pad * 4 * (16 + 32) + 16;
  return A.pg * (int64_t(16) << A.g) + A.co_pad * (16 + 32) + 16;
}

struct W1a8Kernel {
  // Work items [tb, te): item t is tile t / n_chunks (32 positions of image tile / tiles_per_image)
  // for output channels [c * co_chunk, (c + 1) * co_chunk), c = t % n_chunks.
  void (*range)(const W8Args& A, int64_t tb, int64_t te, int32_t* work);
  // Index rows of taps [kb, ke) from packed weights (C_out, KH*KW, nw) into idx.
  void (*prep_idx)(const uint64_t* wp, const W8Args& A, int64_t nw, int64_t kb, int64_t ke, uint8_t* idx);
  void (*plan)(W8Args& A);  // g, r4, rows, pg (tables per pass) for the layer whose geometry A holds
  bool has_r4;              // whether range() has the kw-sharing and the kh-sharing (rows) kernels
};

// float -> int8 clamp(rint(x * inv), -127, 127) of n values (round half to even).
using QuantizeFn = void (*)(const float* x, int64_t n, float inv, int8_t* q);

// One value as every path computes it: for |z| <= 127, (z + 1.5 * 2^23) - 1.5 * 2^23 is z rounded
// to an integer, half to even (the sum lies in [2^23, 2^24), whose spacing is 1); NaN unsupported.
inline int8_t w8_quant1(float x, float inv) {
  float z = x * inv;
  z = z > -127.0f ? z : -127.0f;
  z = z < 127.0f ? z : 127.0f;
  const float magic = 12582912.0f;
  return (int8_t)(int32_t)((z + magic) - magic);
}

#if KDBNN_X86
// w1a8_avx512.cpp (AVX-512 F/BW/VL), w1a8_x86.cpp (AVX2)
extern const W1a8Kernel kW1a8Avx512;
extern const W1a8Kernel kW1a8Avx2;
void quantize_avx512(const float* x, int64_t n, float inv, int8_t* q);  // AVX-512F
void quantize_avx2(const float* x, int64_t n, float inv, int8_t* q);
#endif

}  // namespace kdbnn
