// kd_bnn kernels: the W1A8 lookup-table conv (binary weights x int8 activations), written once
// over a 32-pixel int16 vector type.
//
// Included by each x86 ISA file (w1a8_avx512.cpp: one zmm, w1a8_x86.cpp: two ymm) inside its own
// anonymous namespace, after it defines
//   KDBNN_W8_FN / KDBNN_W8_INL  the function attributes of that ISA (target; and always_inline)
//   struct V  32 output positions of int16 as one value T and its operations: kNB (channels per
//             register block), kStep (tail granularity, divides 8 and kNB), zero, load/store
//             (64-byte aligned), add, sub, load_x (32 int8 -> int16, sign-extended), widen_store /
//             widen_add (int16 -> the 32 int32 accumulators of a channel), epi (the float
//             epilogue and the store of one channel), prep (index fields, see w8_prep_idx).
//
// Method: table lookup instead of multiply (the idea of BiQGEMM, Jeon et al., SC 2020, and of
// T-MAC, Wei et al., EuroSys 2025: with low-bit weights, precompute the sums of activations that
// every weight pattern selects, then each output needs one lookup per pattern), transposed to
// integers. For binary weights, output channel o at a tile of 32 output positions is
//   acc[o] = sum_{tap kk, group j} T_{kk,j}[s_{o,kk,j}],
//   T[s] = sum_{i<g} (bit i of s ? +x_i : -x_i),
// where group j is the g (4 or 5) input channels gj..gj+g-1 at tap kk, x_i the 32 input bytes of
// channel gj+i that the tile's positions read at that tap (sign-extended to int16), and s the g
// weight bits of channel o for those channels (bit set = +1; pack_signs' layout: bits gj.. of the
// packed word row). The 2^g entries of one table (32 int16 = 64 bytes each: 1 or 2 KB) are built
// once per (tile, tap, group) and every output channel adds the entry its bits select: one
// `vpaddw zmm, zmm, [table + s*64]` = 32 positions x g multiply-adds.
//   build: P = the 2^a sign sums of x0..x(a-1) (a = 2 or 3), Q = those of the last two inputs with
//          the top one negative; T[i + 2^a k] = P[i] + Q[k] for the indices with the top bit clear
//          and T[~s] = -T[s] (sign flip) for the others: 2^g int16 ops and 2^g stores per table.
//   passes: the tables of all (tap, group) pairs u = kk * ngrp + j are consumed in passes of pg
//          tables (21-24 KB, L1-resident), built at the start of the pass. Output channels run in
//          register blocks of kNB int16 accumulators. The int16 sums of a channel persist across
//          the passes of a window (win passes, a per-thread int16 buffer between passes) and are
//          widened into int32 sums (a per-thread buffer) once per window; the last pass applies
//          the epilogue and stores.
//   exactness: every table entry is a sum of g values +-x with |x| <= 128, so |entry| <= 128 g
//          (exact in int16); an int16 sum adds at most w8_max_pass(g) = floor(32767 / (128 g))
//          entries (63 for g = 4, 51 for g = 5) starting from 0: |sum| <= 32256 resp. 32640 <=
//          32767, never wrapping (the driver clamps pg and win so that win * pg * (r4: KW, rows:
//          KH * KW) <= w8_max_pass(g); the r4 and rows kernels add several lookups per offset byte,
//          but each into a different accumulator, so every int16 sum still gets one entry per
//          (tap, group)); the int32 sums hold |acc| <= 128 * Cg * KH * KW < 2^31 (checked by
//          the driver). So acc is the exact integer dot product for every int8 input, -128
//          included (tests: all +-127 / -128 inputs with all-equal weights, the longest windows).
//   epilogue (float32, one rounding per op, no contraction: the vector files keep the product in
//          a register through an empty asm, so it cannot become an FMA):
//          y = float(acc) * scale[o]; y = y + bias[o]; act (relu: max(y, 0), leaky: y > 0 ? y :
//          y * 0.1f); float out y, or int8 out clamp(rint(y * inv), -127, 127) (clamped in float,
//          then converted with round-half-even: the same value as rint then clamp).
//   input: the driver's padded phase-split copy (w1a8.h): a tile is 32 consecutive positions q of
//          one image, tap kk reads 32 contiguous bytes at q0 + toff[kk].
//   indices: one byte per (u, output channel), 8 * s (the kernel addresses table + 8 * byte),
//          loaded a few rows ahead of their lookups (lut_lookups / lut_r4_lookups in lut_common.h,
//          the schedules of bwn_lut.h: an xmm ring on AVX-512, the next row's qword on AVX2);
//          measured against loading them just before use: AVX-512 -8..-11% (64@80 0.623 ->
//          0.575 ms, 256@20 0.487 -> 0.441), AVX2 -2..-4% (64@80 0.888 -> 0.849).
//          Built per call (what the runtime does) or once per layer by a caller (w1a8_prepare,
//          w1a8.cpp): prepared, measured (interleaved rounds, thread CPU time) AVX-512 512@10 0.46 ->
//          0.42 ms (-9..-12%), 256@20 -2%, 128@40 and 64@80 within noise (+-2%); AVX2 -3% at
//          64..256 channels, -13% at 512@10.
//   r4:    a second kernel for stride 1 (avx512) shares the tables of one kernel row between its
//          KW taps (128-position tiles as 4 interleaved vectors, see "kw-sharing kernel" below).
//   rows:  a third (avx512, stride 1, 3x3) shares the tables of one input row between the KH taps
//          that read it: tiles of 32 positions x 2 output rows, 12 tables per group for 18 uses
//          (see "kh-sharing kernel" below). The plan takes it for <= 128 output channels on rows
//          >= 16 wide (w1a8_avx512.cpp: -7..-14% at 16..128 channels, 128 @40 0.40-0.43 ms).
//   speed: the lookups are load-bound (about 4.5-5 G `vpaddw zmm, [mem]` per second measured on
//          one Zen 5 core, i.e. ~0.6 T int8 MAC/s at g = 4); building the tables costs 2^g stores
//          per table, amortized over the output channels (hence g = 5 only for >= 256 channels,
//          and r4, which halves the builds of a 3x3 conv, for narrow layers (<= 32 channels) on
//          wide rows; the plan functions of the ISA files list the measurements). Profile of
//          128->128 @40 (AVX-512, g = 4): lookups ~70% of the kernel, table builds ~18%, the rest
//          (int16 windows, widening, epilogue) ~12%. Figures (1 thread, int8 in/out, ms, ratio to
//          torch fp32): AVX-512 64 @80 0.51-0.53 (3.4x), 128 @40 0.44-0.45 (3.8-3.9x), 256 @20
//          0.43 (4.2x), 512 @10 0.47-0.51 (5.2-5.5x); AVX2 (torch capped to AVX2) 0.82-0.84 (4.1x),
//          0.75 (4.5x), 0.69 (4.9x), 0.80 (4.7x).
//          Measured and dropped: loads ahead on AVX2 from an xmm ring (+4-5%: 16 ymm), ring depth
//          2 or 4 instead of 3 (+2-9%), bmi/bmi2 in the AVX-512 target (no change), an empty asm
//          against the compiler's reassociation of the r4 sums (+25%).

#define KDBNN_LC_INL KDBNN_W8_INL
#include "lut_common.h"
static_assert(kLutAhead <= kW8IdxAhead, "w1a8: the index buffer's slack rows cover the loads ahead");

template <int G>
constexpr int64_t kW8Tab = (int64_t(1) << G) * kW8Px;  // int16 per table (G = 4: 1 KB, 5: 2 KB)

struct W8Epi {
  const W8Args* A;
  const W8OutPlan* op;  // one per vector of the tile (rows kernel: kW8Band)
};

// ---------------------------------------------------------------- table build
// The 2^G entries of one table from the 32-byte rows of its G input channels (cplane apart).
// P: the 2^a sign sums of x[0..a-1] (bit i of the index set = +x_i), Q: those of x[a..G-1] with
// the top input negative; T[i + 2^a k] = P[i] + Q[k], T[~s] = -T[s].
template <int G>
KDBNN_W8_INL void w8_table_x(const V::T* x, int16_t* T) {
  using VT = V::T;
  constexpr int a = G - G / 2, E = 1 << G;
  static_assert(G == 4 || G == 5, "w1a8 tables: G = 4 or 5");
  const VT z = V::zero();
  VT P[1 << a];
  lut_low_sums<a>(x, P);
  const VT q = V::add(x[a], x[a + 1]);
  const VT Q[2] = {V::sub(z, q), V::sub(x[a], x[a + 1])};
#pragma GCC unroll 2
  for (int k = 0; k < 2; ++k) {
#pragma GCC unroll 8
    for (int i = 0; i < (1 << a); ++i) {
      const int s = i + (k << a);
      const VT y = V::add(P[i], Q[k]);
      V::store(T + s * kW8Px, y);
      V::store(T + (E - 1 - s) * kW8Px, V::sub(z, y));
    }
  }
}

template <int G>
KDBNN_W8_INL void w8_table(const int8_t* src, int64_t cplane, int16_t* T) {
  V::T x[G];
#pragma GCC unroll 8
  for (int i = 0; i < G; ++i) x[i] = V::load_x(src + i * cplane);
  w8_table_x<G>(x, T);
}

// ---------------------------------------------------------------- lookups
// The end of a register block of NB channels x R vectors, a[c][r] (R = 1: w8_block, kR:
// r4_block, kW8Band: rows_block): out 0 stores the int16 sums to a16p, 1 widens and stores them to
// the int32 sums a32p, 2 widens and adds, 3 applies the epilogue and stores the output (adding the
// int32 sums when add32; Epi: W8Epi, one output plan per vector, for R = 1 and kW8Band, R4Epi for
// kR). (VV: V, a parameter so that V::epi4 is looked up only where R = kR: the AVX2 V has none.)
template <int NB, int R, class Epi, class VV = V>
KDBNN_W8_INL void w8_finish(const typename VV::T (&a)[NB][R], int16_t* a16p, int32_t* a32p, int out, bool add32, const Epi* epi,
                            int64_t c0) {
  if (out == 0) {
#pragma GCC unroll 32
    for (int c = 0; c < NB; ++c)
#pragma GCC unroll 4
      for (int r = 0; r < R; ++r) V::store(a16p + (c * R + r) * kW8Px, a[c][r]);
    return;
  }
  if (out == 1) {
#pragma GCC unroll 32
    for (int c = 0; c < NB; ++c)
#pragma GCC unroll 4
      for (int r = 0; r < R; ++r) V::widen_store(a32p + (c * R + r) * kW8Px, a[c][r]);
    return;
  }
  if (out == 2) {
#pragma GCC unroll 32
    for (int c = 0; c < NB; ++c)
#pragma GCC unroll 4
      for (int r = 0; r < R; ++r) V::widen_add(a32p + (c * R + r) * kW8Px, a[c][r]);
    return;
  }
  const W8Args& A = *epi->A;
  const int64_t plane = A.OH * A.OW;
#pragma GCC unroll 32
  for (int c = 0; c < NB; ++c) {
    const int64_t o = c0 + c;
    if (o >= A.c_out) break;
    const int32_t* b = add32 ? a32p + c * R * kW8Px : nullptr;
    if constexpr (R == kR) {
      VV::epi4(b, a[c], A.scale[o], A.bias[o], A.act, A.quant, A.inv, A.O, o * plane, *epi->op);
    } else {
#pragma GCC unroll 2
      for (int r = 0; r < R; ++r)
        VV::epi(b != nullptr ? b + r * kW8Px : nullptr, a[c][r], A.scale[o], A.bias[o], A.act, A.quant, A.inv, A.O,
                o * plane, epi->op[r]);
    }
  }
}

// One register block of NB output channels over ng tables. The int16 sums start at 0 or from
// a16p (load16); then out: 0 back to a16p, 1 widened and stored to the int32 sums a32p, 2 widened
// and added, 3 the epilogue and the output (adding the int32 sums when add32).
template <int G, int NB>
KDBNN_W8_INL void w8_block(const int16_t* T, int64_t ng, const uint8_t* ir, int64_t co_pad, int16_t* a16p,
                           int32_t* a32p, bool load16, int out, bool add32, const W8Epi* epi, int64_t c0) {
  using VT = V::T;
  VT a[NB][1];
#pragma GCC unroll 32
  for (int c = 0; c < NB; ++c) a[c][0] = load16 ? V::load(a16p + c * kW8Px) : V::zero();
  lut_lookups<NB, 1, 1, kW8Tab<G>, kW8Tab<G>>(a, T, ng, ir, co_pad);
  w8_finish<NB, 1>(a, a16p, a32p, out, add32, epi, c0);
}

template <int G, int NB>
KDBNN_W8_INL void w8_blocks(const int16_t* tab, int64_t ng, const uint8_t* ir, int64_t co_pad, int16_t* a16,
                            int32_t* a32, bool load16, int out, bool add32, const W8Epi* e, int64_t co_b, int64_t co_e) {
  constexpr int S = V::kStep;
  int64_t cb = co_b;
  for (; cb + NB <= co_e; cb += NB)
    w8_block<G, NB>(tab, ng, ir + cb, co_pad, a16 + cb * kW8Px, a32 + cb * kW8Px, load16, out, add32, e, cb);
  const int64_t rest = co_e - cb;  // a multiple of S below NB
  if constexpr (NB > S) {
    if (rest == S) w8_block<G, S>(tab, ng, ir + cb, co_pad, a16 + cb * kW8Px, a32 + cb * kW8Px, load16, out, add32, e, cb);
  }
  if constexpr (NB > 2 * S) {
    if (rest == 2 * S)
      w8_block<G, 2 * S>(tab, ng, ir + cb, co_pad, a16 + cb * kW8Px, a32 + cb * kW8Px, load16, out, add32, e, cb);
  }
  if constexpr (NB > 3 * S) {
    if (rest == 3 * S)
      w8_block<G, 3 * S>(tab, ng, ir + cb, co_pad, a16 + cb * kW8Px, a32 + cb * kW8Px, load16, out, add32, e, cb);
  }
}

// ---------------------------------------------------------------- one tile
// Passes of pg tables; windows of win passes share one int16 sum per channel (win * pg <=
// w8_max_pass(g)), widened into the int32 sums at the end of each window.
template <int G>
KDBNN_W8_FN void w8_tile(const W8Args& A, const int8_t* xq, const W8OutPlan& op, int32_t* work, int64_t co_b,
                         int64_t co_e) {
  const int64_t U = A.KH * A.KW * A.ngrp, pg = A.pg, co_pad = A.co_pad, win = A.win;
  const int64_t n_pass = (U + pg - 1) / pg;
  int16_t* tab = reinterpret_cast<int16_t*>(work);
  int16_t* a16 = tab + pg * kW8Tab<G>;
  int32_t* a32 = reinterpret_cast<int32_t*>(a16 + co_pad * kW8Px);
  const W8Epi epi{&A, &op};
  for (int64_t p = 0; p < n_pass; ++p) {
    const int64_t u0 = p * pg, ng = std::min(pg, U - u0);
    // tables of u = kk * ngrp + j, u0 <= u < u0 + ng (one division per pass)
    int64_t kk = u0 / A.ngrp, j = u0 % A.ngrp;
    const int8_t* src = xq + G * j * A.cplane + A.toff[kk];
    for (int64_t i = 0; i < ng; ++i) {
      w8_table<G>(src, A.cplane, tab + i * kW8Tab<G>);
      if (++j == A.ngrp) j = 0, ++kk, src = xq + A.toff[kk < A.KH * A.KW ? kk : 0];
      else src += G * A.cplane;
    }
    const bool last = p == n_pass - 1, load16 = p % win != 0, add32 = p >= win;
    const int out = last ? 3 : p % win == win - 1 ? (add32 ? 2 : 1) : 0;
    w8_blocks<G, V::kNB>(tab, ng, A.idx + u0 * co_pad, co_pad, a16, a32, load16, out, add32, last ? &epi : nullptr,
                         co_b, co_e);
  }
}

// Output runs of the tile at position q0 of image n.
inline void w8_plan_out(const W8Args& A, int64_t n, int64_t q0, W8OutPlan& op) {
  const int64_t obase = n * A.c_out * A.OH * A.OW;
  int nr = 0, last_l = -2;
  int64_t next = -1;
  int64_t oh = q0 / A.Wq, ow = q0 % A.Wq;  // of position q0 + l (one division per tile)
  for (int l = 0; l < kW8Px; ++l, ow = ow + 1 == A.Wq ? (++oh, 0) : ow + 1) {
    const int64_t q = q0 + l;
    if (q >= A.qtot || ow >= A.OW) continue;
    const int64_t o = oh * A.OW + ow;
    if (nr == 0 || o != next || l != last_l + 1) op.base[nr] = obase + o - l, op.bits[nr] = 0, ++nr;
    op.bits[nr - 1] |= 1u << l;
    next = o + 1, last_l = l;
  }
  op.nr = nr;
  op.full = nr == 1 && op.bits[0] == 0xFFFFFFFFu;
}

KDBNN_W8_FN void w8_range1(const W8Args& A, int64_t tb, int64_t te, int32_t* work) {
  const int64_t per_img = w8_tiles_per_image(A);
  W8OutPlan op;
  LutItems items(A.co_pad, A.co_chunk);
  for (int64_t t = tb; t < te; ++t) {
    int64_t tile, co_b, co_e;
    const bool replan = items.at(t, tile, co_b, co_e);
    const int64_t n = tile / per_img, q0 = tile % per_img * kW8Px;
    if (replan) w8_plan_out(A, n, q0, op);
    if (A.g == 5) w8_tile<5>(A, A.X + n * A.img + q0, op, work, co_b, co_e);
    else w8_tile<4>(A, A.X + n * A.img + q0, op, work, co_b, co_e);
  }
}

#ifdef KDBNN_W8_R4
// ---------------------------------------------------------------- kw-sharing kernel (r4)
// Stride 1 only (the ISA file defines KDBNN_W8_R4 and V::deint / V::inter / V::kNB4). A tile is
// 128 consecutive positions q0.. of the position domain held as 4 vectors: lane l of vector r is
// position q0 + 4l + r. Tap (kh, kw) of vector r then reads the bytes at q0 + kh*Wq + 4l + (r + kw):
// "input vector" r + kw of the same interleaved layout, so the 4 + KW - 1 input vectors of one
// kernel row and group are tabulated once and serve all KW taps (6 tables instead of 12 for 3x3),
// and each weight index byte selects 4 lookups (one per vector). A pass unit is (kernel row,
// group): 4 + KW - 1 tables; pg units per pass. The int16 sums of a channel persist across the
// passes of a window (a per-thread int16 buffer) and are widened to int32 once per window: win
// passes of pg * KW entries per vector, win * pg * KW <= w8_max_pass(g) (the same bound as above).
// The epilogue re-interleaves the 4 vectors into position order (V::inter). (kR = 4: lut_common.h.)

struct R4Epi {
  const W8Args* A;
  const R4OutPlan* op;
};

// The table builder of lut_r4_build (the NV tables of one pass unit).
struct W8Tab {
  template <int G>
  KDBNN_W8_INL static void build(const V::T* x, int16_t* T) { w8_table_x<G>(x, T); }
};

// out: as w8_finish.
template <int G, int NB, int KW>
KDBNN_W8_INL void r4_block(const int16_t* T, int64_t nu, const uint8_t* ir, int64_t co_pad, int16_t* a16p,
                           int32_t* a32p, bool load16, int out, bool add32, const R4Epi* epi, int64_t c0) {
  using VT = V::T;
  constexpr int NV = kR + KW - 1;
  constexpr int64_t kVec = kW8Tab<G>;  // int16 per table
  VT a[NB][kR];
#pragma GCC unroll 32
  for (int c = 0; c < NB; ++c)
#pragma GCC unroll 4
    for (int r = 0; r < kR; ++r) a[c][r] = load16 ? V::load(a16p + (c * kR + r) * kW8Px) : V::zero();
  lut_r4_lookups<NB, KW, kVec>(a, T, nu, ir, co_pad);
  w8_finish<NB, kR>(a, a16p, a32p, out, add32, epi, c0);
}

template <int G, int KW>
KDBNN_W8_FN void r4_tile(const W8Args& A, const int8_t* xq, const R4OutPlan& op, int32_t* work, int64_t co_b,
                         int64_t co_e) {
  constexpr int NV = kR + KW - 1, NB = V::kNB4;
  constexpr int64_t kUnit = NV * kW8Tab<G>;  // int16 per pass unit
  const int64_t U = A.KH * A.ngrp, pg = A.pg, co_pad = A.co_pad, win = A.win;
  const int64_t n_pass = (U + pg - 1) / pg;
  int16_t* tab = reinterpret_cast<int16_t*>(work);
  int16_t* a16 = tab + pg * kUnit;
  int32_t* a32 = reinterpret_cast<int32_t*>(a16 + co_pad * kR * kW8Px);
  const R4Epi epi{&A, &op};
  for (int64_t p = 0; p < n_pass; ++p) {
    const int64_t u0 = p * pg, nu = std::min(pg, U - u0);
    int64_t kh = u0 / A.ngrp, j = u0 % A.ngrp;  // unit u = kh * ngrp + j (one division per pass)
    for (int64_t i = 0; i < nu; ++i) {
      lut_r4_build<G, NV, kW8Tab<G>, W8Tab>(xq + G * j * A.cplane + kh * A.Wq, A.cplane, tab + i * kUnit);
      if (++j == A.ngrp) j = 0, ++kh;
    }
    const bool last = p == n_pass - 1, load16 = p % win != 0, add32 = p >= win;
    const int out = last ? 3 : p % win == win - 1 ? (add32 ? 2 : 1) : 0;
    const uint8_t* ir = A.idx + u0 * KW * co_pad;
    for (int64_t cb = co_b; cb < co_e; cb += NB)
      r4_block<G, NB, KW>(tab, nu, ir + cb, co_pad, a16 + cb * kR * kW8Px, a32 + cb * kR * kW8Px, load16, out, add32,
                          last ? &epi : nullptr, cb);
  }
}

inline void r4_plan_out(const W8Args& A, int64_t n, int64_t q0, R4OutPlan& op) {
  const int64_t obase = n * A.c_out * A.OH * A.OW;
  for (int m = 0; m < 8; ++m) {
    int nr = 0, last_l = -2;
    int64_t next = -1;
    int64_t oh = (q0 + 16 * m) / A.Wq, ow = (q0 + 16 * m) % A.Wq;
    for (int l = 0; l < 16; ++l, ow = ow + 1 == A.Wq ? (++oh, 0) : ow + 1) {
      const int64_t q = q0 + 16 * m + l;
      if (q >= A.qtot || ow >= A.OW) continue;
      const int64_t o = oh * A.OW + ow;
      if (nr == 0 || o != next || l != last_l + 1) op.base[m][nr] = obase + o - l, op.bits[m][nr] = 0, ++nr;
      op.bits[m][nr - 1] |= 1u << l;
      next = o + 1, last_l = l;
    }
    op.nr[m] = nr;
    op.full[m] = nr == 1 && op.bits[m][0] == 0xFFFFu;
  }
}

KDBNN_W8_FN void r4_range(const W8Args& A, int64_t tb, int64_t te, int32_t* work) {
  const int64_t per_img = w8_r4_tiles_per_image(A);
  R4OutPlan op;
  LutItems items(A.co_pad, A.co_chunk);
  for (int64_t t = tb; t < te; ++t) {
    int64_t tile, co_b, co_e;
    const bool replan = items.at(t, tile, co_b, co_e);
    const int64_t n = tile / per_img, q0 = tile % per_img * (kR * kW8Px);
    if (replan) r4_plan_out(A, n, q0, op);
    const int8_t* xq = A.X + n * A.img + q0;
    switch (A.KW * 8 + A.g) {
      case 2 * 8 + 4: r4_tile<4, 2>(A, xq, op, work, co_b, co_e); break;
      case 3 * 8 + 4: r4_tile<4, 3>(A, xq, op, work, co_b, co_e); break;
      case 2 * 8 + 5: r4_tile<5, 2>(A, xq, op, work, co_b, co_e); break;
      case 3 * 8 + 5: r4_tile<5, 3>(A, xq, op, work, co_b, co_e); break;
      default: break;  // w8_r4_ok() admits only the cases above
    }
  }
}

// ---------------------------------------------------------------- kh-sharing kernel (rows)
// Stride 1, 3x3 (w8_rows_ok; the ISA file defines KDBNN_W8_R4). The output rows are taken in
// bands of kW8Band = 2; a tile is 32 consecutive positions d0.. of the image's (band, ow) domain
// d = band * OW + ow (no junk columns; the last band of an odd OH has one real row) held as 2
// vectors per channel: lane l of vector r is output (kW8Band * band + r, ow) of position d0 + l.
// Tap (kh, kw) of vector r reads input row kW8Band * band + r + kh, i.e. "input row" v = r + kh of
// the tile at column shift kw: per group j the (kW8Band + KH - 1) * KW tables (v, kw) (4 x 3 = 12
// for 3x3) are built once and serve the 18 (tap, vector) uses, each offset byte selecting 2 lookups
// (tables kW8Tab * KW apart). Lanes read the padded copy in runs of one band (W8RowsInPlan): a
// vector that spans two bands (or narrow rows: several) loads its bytes with one masked byte load
// per run (AVX-512BW, masked lanes not read); input rows past the padded height and lanes past the
// image's last band read 0. A pass unit is a group j (index rows j * KK + kk); pg units per pass.
// Exactness: each int16 sum still adds one entry per (tap, group), KH * KW per unit, so the
// driver clamps win * pg * KH * KW <= w8_max_pass(g) (the bound of the method above).

// The int8 bytes of input row v of one tile (column shift folded into p) as 32 int16: plain
// (K = 0), or one masked byte load per run (K = 1: two runs, K = 2: ip.nr).
template <int K>
KDBNN_W8_INL V::T rows_x(const int8_t* p, const W8RowsInPlan& ip, int v, int64_t vWq) {
  if constexpr (K == 0) return V::load_x(p + ip.off[0] + vWq);
  __m256i b = _mm256_maskz_loadu_epi8((__mmask32)ip.bits[v][0], p + ip.off[0] + vWq);
  if constexpr (K == 1) {
    b = _mm256_mask_loadu_epi8(b, (__mmask32)ip.bits[v][1], p + ip.off[1] + vWq);
  } else {
    for (int i = 1; i < ip.nr; ++i) b = _mm256_mask_loadu_epi8(b, (__mmask32)ip.bits[v][i], p + ip.off[i] + vWq);
  }
  return _mm512_cvtepi8_epi16(b);
}

// The (kW8Band + KH - 1) * KW tables (v, kw) of one unit (group of G channels at src, cplane apart).
template <int G, int KH, int KW, int K>
KDBNN_W8_INL void rows_build(const int8_t* src, int64_t cplane, int64_t Wq, const W8RowsInPlan& ip, int16_t* T) {
  constexpr int NV = kW8Band + KH - 1;
  static_assert(NV <= kW8RowsNV, "rows: W8RowsInPlan holds kW8RowsNV input rows");
#pragma GCC unroll 1
  for (int v = 0; v < NV; ++v) {
#pragma GCC unroll 3
    for (int kw = 0; kw < KW; ++kw) {
      V::T x[G];
#pragma GCC unroll 8
      for (int i = 0; i < G; ++i) x[i] = rows_x<K>(src + i * cplane + kw, ip, v, v * Wq);
      w8_table_x<G>(x, T + (v * KW + kw) * kW8Tab<G>);
    }
  }
}

template <int G, int NB, int KH, int KW>
KDBNN_W8_INL void rows_block(const int16_t* T, int64_t nu, const uint8_t* ir, int64_t co_pad, int16_t* a16p,
                             int32_t* a32p, bool load16, int out, bool add32, const W8Epi* epi, int64_t c0) {
  constexpr int R = kW8Band, NV = R + KH - 1;
  constexpr int64_t kTab = kW8Tab<G>;
  V::T a[NB][R];
#pragma GCC unroll 32
  for (int c = 0; c < NB; ++c)
#pragma GCC unroll 2
    for (int r = 0; r < R; ++r) a[c][r] = load16 ? V::load(a16p + (c * R + r) * kW8Px) : V::zero();
  lut_lookups<NB, R, KH * KW, kTab, NV * KW * kTab, KW * kTab>(a, T, nu, ir, co_pad);
  w8_finish<NB, R>(a, a16p, a32p, out, add32, epi, c0);
}

template <int G, int KH, int KW>
KDBNN_W8_FN void rows_tile(const W8Args& A, const int8_t* xq, const W8RowsInPlan& ip, const W8OutPlan* op,
                           int32_t* work, int64_t co_b, int64_t co_e) {
  constexpr int R = kW8Band, NB = V::kNBRows;
  constexpr int64_t kUnit = (R + KH - 1) * KW * kW8Tab<G>;  // int16 per pass unit
  const int64_t U = A.ngrp, pg = A.pg, co_pad = A.co_pad, win = A.win;
  const int64_t n_pass = (U + pg - 1) / pg;
  int16_t* tab = reinterpret_cast<int16_t*>(work);
  int16_t* a16 = tab + pg * kUnit;
  int32_t* a32 = reinterpret_cast<int32_t*>(a16 + co_pad * R * kW8Px);
  const W8Epi epi{&A, op};
  for (int64_t p = 0; p < n_pass; ++p) {
    const int64_t u0 = p * pg, nu = std::min(pg, U - u0);
    for (int64_t i = 0; i < nu; ++i) {
      const int8_t* src = xq + G * (u0 + i) * A.cplane;
      if (ip.kind == 0) rows_build<G, KH, KW, 0>(src, A.cplane, A.Wq, ip, tab + i * kUnit);
      else if (ip.kind == 1) rows_build<G, KH, KW, 1>(src, A.cplane, A.Wq, ip, tab + i * kUnit);
      else rows_build<G, KH, KW, 2>(src, A.cplane, A.Wq, ip, tab + i * kUnit);
    }
    const bool last = p == n_pass - 1, load16 = p % win != 0, add32 = p >= win;
    const int out = last ? 3 : p % win == win - 1 ? (add32 ? 2 : 1) : 0;
    const uint8_t* ir = A.idx + u0 * KH * KW * co_pad;
    for (int64_t cb = co_b; cb < co_e; cb += NB)
      rows_block<G, NB, KH, KW>(tab, nu, ir + cb, co_pad, a16 + cb * R * kW8Px, a32 + cb * R * kW8Px, load16, out,
                                add32, last ? &epi : nullptr, cb);
  }
}

// The input runs and the kW8Band output plans of the tile at position d0 of image n's (band, ow)
// domain.
inline void rows_plan(const W8Args& A, int64_t n, int64_t d0, W8RowsInPlan& ip, W8OutPlan* op) {
  const int64_t obase = n * A.c_out * A.OH * A.OW, dtot = (A.OH + kW8Band - 1) / kW8Band * A.OW;
  int64_t band[kW8Px + 1];
  ip.nr = 0;
  for (int r = 0; r < kW8Band; ++r) op[r].nr = 0;
  int64_t b = d0 / A.OW, ow = d0 % A.OW;
  for (int l = 0; l < kW8Px && d0 + l < dtot; ++l, ow = ow + 1 == A.OW ? (++b, 0) : ow + 1) {
    if (l == 0 || ow == 0) {  // a new run
      const int i = ip.nr++;
      band[i] = b, ip.off[i] = kW8Band * b * A.Wq + ow - l;
      for (int v = 0; v < kW8RowsNV; ++v) ip.bits[v][i] = 0;
      for (int r = 0; r < kW8Band; ++r) {
        if (kW8Band * b + r >= A.OH) continue;
        W8OutPlan& o = op[r];
        o.base[o.nr] = obase + (kW8Band * b + r) * A.OW + ow - l, o.bits[o.nr] = 0, ++o.nr;
      }
    }
    for (int v = 0; v < kW8RowsNV; ++v)
      if (kW8Band * b + v < A.Hq) ip.bits[v][ip.nr - 1] |= 1u << l;
    for (int r = 0; r < kW8Band; ++r)
      if (kW8Band * b + r < A.OH) op[r].bits[op[r].nr - 1] |= 1u << l;
  }
  for (int r = 0; r < kW8Band; ++r) op[r].full = op[r].nr == 1 && op[r].bits[0] == 0xFFFFFFFFu;
  bool all = ip.nr == 1;
  for (int v = 0; v < kW8Band + A.KH - 1; ++v) all = all && ip.bits[v][0] == 0xFFFFFFFFu;
  ip.kind = all ? 0 : ip.nr <= 2 ? 1 : 2;
  if (ip.nr == 1)  // kind 1 reads a second, empty run
    for (int v = 0; v < kW8RowsNV; ++v) ip.bits[v][1] = 0, ip.off[1] = ip.off[0];
}

KDBNN_W8_FN void rows_range(const W8Args& A, int64_t tb, int64_t te, int32_t* work) {
  const int64_t per_img = w8_rows_tiles_per_image(A);
  W8RowsInPlan ip;
  W8OutPlan op[kW8Band];
  LutItems items(A.co_pad, A.co_chunk);
  for (int64_t t = tb; t < te; ++t) {
    int64_t tile, co_b, co_e;
    const bool replan = items.at(t, tile, co_b, co_e);
    const int64_t n = tile / per_img, d0 = tile % per_img * kW8Px;
    if (replan) rows_plan(A, n, d0, ip, op);
    const int8_t* xq = A.X + n * A.img;
    if (A.g == 5) rows_tile<5, 3, 3>(A, xq, ip, op, work, co_b, co_e);
    else rows_tile<4, 3, 3>(A, xq, ip, op, work, co_b, co_e);
  }
}
#endif  // KDBNN_W8_R4

KDBNN_W8_FN void w8_range(const W8Args& A, int64_t tb, int64_t te, int32_t* work) {
#ifdef KDBNN_W8_R4
  if (A.r4) return r4_range(A, tb, te, work);
  if (A.rows) return rows_range(A, tb, te, work);
#endif
  w8_range1(A, tb, te, work);
}

// ---------------------------------------------------------------- index preparation
// idx[(kk * ngrp + j) * co_pad + o] = 8 * (bits gj..gj+g-1 of channel o's packed words at tap kk);
// channels o >= c_out get 0. V::kPrepCh channels at a time (V::prep: 32-bit words -> bytes).
KDBNN_W8_FN void w8_prep_idx(const uint64_t* wp, const W8Args& A, int64_t nw, int64_t kb, int64_t ke, uint8_t* idx) {
  constexpr int CH = V::kPrepCh;
  const int64_t KK = A.KH * A.KW, co_pad = A.co_pad, ngrp = A.ngrp, nk = 2 * nw, g = A.g;
  std::vector<uint32_t> buf(nk * CH + CH + 16);
  uint32_t* w32 = reinterpret_cast<uint32_t*>((reinterpret_cast<uintptr_t>(buf.data()) + 63) & ~uintptr_t(63));
  for (int64_t kk = kb; kk < ke; ++kk) {
    for (int64_t o0 = 0; o0 < co_pad; o0 += CH) {
      const int64_t nc = std::min<int64_t>(CH, co_pad - o0);
      lut_gather_words<CH>(wp, KK, kk, nw, o0, std::min<int64_t>(nc, A.c_out - o0), w32);
      for (int64_t j = 0; j < ngrp; ++j) {
        const int64_t bit = j * g, k = bit >> 5;
        const int sh = (int)(bit & 31);
        const uint32_t* next = (sh > 32 - g && k + 1 < nk) ? w32 + (k + 1) * CH : nullptr;
        const int64_t row = A.r4     ? ((kk / A.KW) * ngrp + j) * A.KW + kk % A.KW
                            : A.rows ? j * KK + kk
                                     : kk * ngrp + j;
        V::prep(w32 + k * CH, next, sh, (int)g, idx + row * co_pad + o0, (int)nc);
      }
    }
  }
}

#undef KDBNN_LC_INL
