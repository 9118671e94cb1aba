// kd_bnn kernels: the lookup-table BWN conv, written once over a 16-pixel vector type.
//
// Included by each x86 ISA file (bwn_x86.cpp: AVX2, bwn_avx512.cpp: AVX-512) inside its own
// anonymous namespace, after it defines
//   KDBNN_LUT_FN   the function attributes of that ISA (target)
//   KDBNN_LUT_INL  the same with always_inline (the whole tile is one function: no calls, whose
//                  vector-register clobbers and vzeroupper cost more than the builds' stores)
//   struct V       16 output pixels of fp32 as one value (a zmm, or two ymm) and its operations:
//                  T, M (lane mask), kNB (channels per register block), kStep (block granularity,
//                  divides 8 and kNB, kNB <= 4 * kStep), mask(bits), zero, load/loadu/store
//                  (aligned/unaligned 64-byte), add, neg, load_runs, gather, epi, storeu, store_mask.
// No torch here (see common.h). Everything is compiled with the includer's target attributes, so
// the same source gives the AVX2 and the AVX-512 kernel.
//
// Method (BiQGEMM-style lookup tables, Jeon et al., SC 2020; the "g-bit table" arithmetic of the
// kd_bnn kernel issue). With binary weights, output channel o at a tile of 16 output pixels is
//   alpha[o] * sum_{tap, group j} T_{tap,j}[s_{o,tap,j}] + bias[o],
// where a group is g consecutive input channels at one kernel tap, s is the g weight bits of
// channel o for that group (bit i set = +1), and T[s] = sum_i (bit i of s ? +x_i : -x_i) is the
// 16-pixel vector of one signed sum. A table of 2^g vectors (64 B each) is built once per
// (tile, tap, group) and every output channel adds the entry its bits select: one
// `vaddps zmm, zmm, [table + s*64]` does 16 pixels x g multiply-adds, exactly (float adds of
// +-x, only the order of the sum differs from a direct conv).
//   build: T[i + 2^a k] = P[i] + Q[k] with P the 2^a sign sums of the low a = ceil(g/2) inputs and
//          Q those of the high g/2 inputs with the top bit clear; the other half is
//          T[~s] = -T[s] (sign flip). 2^(g-1) adds (on the FMA pipes, as x*1 + y, leaving the
//          adders to the lookups) + 2^(g-1) flips + 2^g stores per table.
//   g:     4, 5 or 6 (the ISA file's plan(): a table costs 2^g stores and saves g-fold lookups,
//          so wider layers take larger g; measured, g = 6 never won: its 4 KB tables halve the
//          tables per pass).
//   passes: the groups of all taps (u = tap * ngrp + j) are consumed in passes of pg tables
//          (16-32 KB, L1-resident), built at the start of the pass. Output channels run in register
//          blocks of kNB accumulators (one 16-pixel vector per channel), kept in a per-thread buffer
//          between passes; the last pass applies alpha, bias and the activation and stores the
//          output. (Building the next pass's tables between the channel blocks of the current one,
//          double-buffered, measured no faster: the stores compete with the lookups for L1 either
//          way.)
//   indices: lut_prep_idx turns the packed weights into one offset per (u, channel),
//          s * 8 (the kernel addresses table + offset * 8): uint8 for g <= 5, uint16 for g = 6,
//          rows of co_pad channels (one offset byte per g weights: 1/16..1/24 of a float copy),
//          once per layer (bwn_prepare in bwn.cpp) or per call.
//          The lookups take their offsets from loads issued a few tables ahead (an xmm ring on
//          AVX-512, a qword/dword one table ahead on AVX2): on Zen 5 a vaddps whose address comes
//          from a load issued shortly before runs at ~1.4 lookups/cycle, ~1.7 with the ring.
//   input:  read in place (no padded copy). Tiles are 16 consecutive output pixels in flattened
//          (n, oh, ow) order; per tile and tap a plan says how to load the 16 input pixels: one
//          full run (plain load), up to kMaxRuns masked runs (row ends, padding, image ends) or a
//          masked gather (stride > 1, narrow rows). Padding and lanes past the end read 0.
//   r4:    a second kernel for stride 1 shares the tables of one kernel row between its KW taps
//          (64-position tiles in 4 interleaved vectors; see "kw-sharing kernel" below).
//   rows:  a third, for stride 1 and KH 3 or 5, shares the tables of one kernel column between
//          its KH taps: tiles of 16 columns x R output rows, (R + KH - 1) * KW tables per group
//          instead of R * KH * KW (3x3, R = 2: 12 for 18 uses); see "kh-sharing kernel" below.
//   cost:  (Zen 5, 1 thread, measured by disabling parts) the lookups run at ~1.6 per cycle
//          (r = 1), close to the 1.7 of a microbenchmark, and take ~65% of a call; the table builds
//          ~27% at every benchmark shape (128->128 @40: 0.22 of 0.77 ms, of which 0.09 ms loading
//          the inputs and the rest the 2^g stores: 64-byte stores stream at ~0.65 per cycle on this
//          Zen 5, 42 B/cycle against ~90 B/cycle of lookup loads); prep, plans and epilogue the
//          rest. The r4 kernel halves the builds but its lookups ran at ~1.35/cycle at 128 channels
//          (0.91 vs 0.77 ms), so the plans take it only for rows >= 48 wide and <= 128 output
//          channels. The rows kernel (R = 2) cuts the builds to 2/3 (128@40: 0.15 vs 0.23 ms with
//          the lookups switched off) at the same lookup speed (0.58-0.62 vs 0.57 ms with the
//          builds off): 128@40 0.71 vs 0.76 ms, 64@80 0.85 vs 0.90 (r4). At >= 256 output channels
//          it does not win (its 2 accumulator vectors per channel, 32 KB+, and 32 KB of tables
//          overflow L1; 256@20 0.687 vs 0.693 ms, 512@10 0.77 vs 0.67) and R = 3 or 4 (more
//          accumulators, fewer units per pass) was no faster at any benchmark shape; see lut_plan.

#define KDBNN_LC_INL KDBNN_LUT_INL
#include "lut_common.h"

constexpr int kLutPx = 16;    // output pixels per tile (one V)
constexpr int kMaxRuns = 4;   // masked-load runs per tap before falling back to a gather
constexpr int64_t kLutSkew = 16 * 5;  // floats between the tables and the accumulators

template <int G>
struct LutIdxT {
  using type = uint8_t;  // offsets s * 8 <= 248
};
template <>
struct LutIdxT<6> {
  using type = uint16_t;  // offsets s * 8 <= 504
};

// How to load the 16 input pixels of one tile at one kernel tap, relative to channel c of image 0
// (X + c * H * W); lane offsets include n * C * H * W.
struct alignas(64) LutTapPlan {
  int32_t pos[kLutPx];     // gather: per-lane offsets (0 for invalid lanes)
  V::M m[kMaxRuns];        // runs: lanes of each run; gather: m[0] = valid lanes
  int64_t base[kMaxRuns];  // runs: offset of lane 0 if the run extended to it
  int kind;                // 0: one run of all 16 lanes, 1: nr masked runs, 2: gather, 3: no lane
  int nr;
};

// Where the 16 output pixels of one tile go: runs of consecutive outputs (a tile crosses image
// boundaries when OH*OW is not a multiple of 16), channel 0 offsets.
struct LutOutPlan {
  V::M m[kLutPx];
  int64_t base[kLutPx];
  int nr;
  bool full;  // one run of all 16 lanes
};

struct LutEpi {
  const LutArgs* A;
  const LutOutPlan* op;
};

// ---------------------------------------------------------------- table build
template <int K>
KDBNN_LUT_INL V::T lut_x(const float* p, const LutTapPlan& t) {
  if constexpr (K == 0) return V::loadu(p + t.base[0]);
  else if constexpr (K == 1) return V::load_runs(p, t.m, t.base, t.nr);
  else if constexpr (K == 2) return V::gather(p, t.pos, t.m[0]);
  else return V::zero();
}

KDBNN_LUT_INL V::T lut_x(const float* p, const LutTapPlan& t) {
  switch (t.kind) {
    case 0: return lut_x<0>(p, t);
    case 1: return lut_x<1>(p, t);
    case 2: return lut_x<2>(p, t);
    default: return V::zero();
  }
}

// The 2^G entries of one table, T[s] = sum_i (bit i of s ? +x_i : -x_i), from its G input vectors.
template <int G>
KDBNN_LUT_INL void lut_table(const V::T* x, float* T) {
  using VT = V::T;
  constexpr int a = G - G / 2, b = G / 2, E = 1 << G;
  // P: all sign sums of x[0..a-1] (bit i of the index = +x_i)
  VT P[1 << a];
  lut_low_sums<a>(x, P);
  // Q: sign sums of x[a..G-1] with the top input negative (the top bit of s clear)
  VT Q[1 << (b - 1)];
  if constexpr (b == 2) {
    Q[0] = V::neg(V::add(x[a], x[a + 1]));
    Q[1] = V::sub(x[a], x[a + 1]);
  } else {
    const VT q3 = V::add(x[a], x[a + 1]), q1 = V::sub(x[a], x[a + 1]);
    Q[0] = V::sub(V::neg(q3), x[a + 2]);
    Q[1] = V::sub(q1, x[a + 2]);
    Q[2] = V::sub(V::neg(q1), x[a + 2]);
    Q[3] = V::sub(q3, x[a + 2]);
  }
#pragma GCC unroll 4
  for (int k = 0; k < (1 << (b - 1)); ++k) {
#pragma GCC unroll 8
    for (int i = 0; i < (1 << a); ++i) {
      const int s = i + (k << a);
      const VT y = V::add_fma(P[i], Q[k]);  // on the FMA pipes: the lookups keep the adders
      V::store(T + s * kLutPx, y);
      V::store(T + (E - 1 - s) * kLutPx, V::neg(y));
    }
  }
}

// One table from the G inputs of channels c0..c0+G-1 at one tap (channels past C read as 0).
template <int G, int K>
KDBNN_LUT_INL void lut_build(const float* xc, int64_t HW, int nvalid, const LutTapPlan& t, float* T) {
  V::T x[G];
#pragma GCC unroll 8
  for (int i = 0; i < G; ++i) x[i] = i < nvalid ? lut_x<K>(xc + i * HW, t) : V::zero();
  lut_table<G>(x, T);
}

template <int G>
KDBNN_LUT_INL void lut_build_at(const float* xc, int64_t HW, int nvalid, const LutTapPlan& t, float* T) {
  switch (t.kind) {
    case 0: lut_build<G, 0>(xc, HW, nvalid, t, T); break;
    case 1: lut_build<G, 1>(xc, HW, nvalid, t, T); break;
    case 2: lut_build<G, 2>(xc, HW, nvalid, t, T); break;
    default: lut_build<G, 3>(xc, HW, nvalid, t, T); break;
  }
}

// Table u = kk * ngrp + j of the r = 1 kernel: group j at tap kk.
template <int G>
KDBNN_LUT_INL void lut_build_group(const LutArgs& A, const LutTapPlan* tp, int64_t u, float* T) {
  const int64_t kk = u / A.ngrp, j = u % A.ngrp, c0 = j * G, HW = A.H * A.W;
  lut_build_at<G>(A.X + c0 * HW, HW, (int)std::min<int64_t>(G, A.C - c0), tp[kk], T);
}

// alpha * acc + bias and the activation of output channel o, stored at the tile's output runs.
KDBNN_LUT_INL void lut_out(const LutArgs& A, const LutOutPlan& op, int64_t o, V::T acc) {
  const V::T y = V::epi(acc, A.alpha[o], A.bias[o], A.act);
  float* dst = A.O + o * (A.OH * A.OW);
  if (op.full) {
    V::storeu(dst + op.base[0], y);
  } else {
    for (int r = 0; r < op.nr; ++r) V::store_mask(dst + op.base[r], op.m[r], y);
  }
}

// ---------------------------------------------------------------- lookups
// One register block of NB output channels over ng tables of a pass: acc (+)= T_j[s], then either
// back to the accumulator buffer or, in the last pass, alpha * acc + bias, activation, output.
template <int G, int NB>
KDBNN_LUT_INL void lut_block(const float* T, int64_t ng, const typename LutIdxT<G>::type* ir, int64_t co_pad,
                            float* accp, bool first, const LutEpi* epi, int64_t c0) {
  using VT = V::T;
  using I = typename LutIdxT<G>::type;
  constexpr int64_t kTabBytes = (int64_t(1) << G) * kLutPx * sizeof(float);
  VT a[NB];
#pragma GCC unroll 32
  for (int c = 0; c < NB; ++c) a[c] = first ? V::zero() : V::load(accp + c * kLutPx);
  const char* Tj = reinterpret_cast<const char*>(T);
  if constexpr (sizeof(I) == 1 && NB == 16) {
    // 16 offsets per table as one xmm loaded kOffAhead tables ahead, moved to two qwords by
    // vmovq/vpextrq: measured 1.7 lookups/cycle in a Zen 5 microbenchmark, against 1.5 with the
    // qwords loaded one table ahead and 1.4 loaded just before use (a lookup whose address was
    // loaded shortly before issues slowly)
    constexpr int kOffAhead = 3;
    const int64_t last = ng - 1;
    __m128i ring[kOffAhead];
#pragma GCC unroll 4
    for (int d = 0; d < kOffAhead; ++d)
      ring[d] = _mm_loadu_si128(reinterpret_cast<const __m128i*>(ir + std::min<int64_t>(d, last) * co_pad));
    for (int64_t j = 0; j < ng; ++j, Tj += kTabBytes) {
      const __m128i v = ring[0];
#pragma GCC unroll 4
      for (int d = 0; d + 1 < kOffAhead; ++d) ring[d] = ring[d + 1];
      ring[kOffAhead - 1] =
          _mm_loadu_si128(reinterpret_cast<const __m128i*>(ir + std::min<int64_t>(j + kOffAhead, last) * co_pad));
      const uint64_t q[2] = {(uint64_t)_mm_cvtsi128_si64(v), (uint64_t)_mm_extract_epi64(v, 1)};
#pragma GCC unroll 2
      for (int w = 0; w < 2; ++w)
#pragma GCC unroll 8
        for (int e = 0; e < 8; ++e)
          a[w * 8 + e] = V::add(a[w * 8 + e], V::load(reinterpret_cast<const float*>(Tj + (size_t)((q[w] >> (8 * e)) & 255u) * 8)));
    }
  } else if constexpr (sizeof(I) == 1) {
    // the offset qwords of table j + 1 are loaded while table j's lookups run (measured 3-4%
    // faster on Zen 5 than loading them just before use: lookups whose address waits on a load
    // issue more slowly). NB not a multiple of 8 reads up to 7 bytes past the block (the index
    // buffer has 8 zero bytes after its last row: kLutIdxSlack in bwn.cpp).
    constexpr int NQ = (NB + 7) / 8;
    uint64_t q[NQ];
    std::memcpy(q, ir, 8 * NQ);
    for (int64_t j = 0; j < ng; ++j, Tj += kTabBytes) {
      ir += j + 1 < ng ? co_pad : 0;
      uint64_t qn[NQ];
      std::memcpy(qn, ir, 8 * NQ);
#pragma GCC unroll 8
      for (int w = 0; w < NQ; ++w)
#pragma GCC unroll 8
        for (int e = 0; e < 8; ++e)
          if (w * 8 + e < NB) a[w * 8 + e] = V::add(a[w * 8 + e], V::load(reinterpret_cast<const float*>(Tj + (size_t)((q[w] >> (8 * e)) & 255u) * 8)));
#pragma GCC unroll 8
      for (int w = 0; w < NQ; ++w) q[w] = qn[w];
    }
  } else {
    for (int64_t j = 0; j < ng; ++j, Tj += kTabBytes, ir += co_pad) {
      uint32_t off[NB];
      lut_offsets<NB>(ir, off);
#pragma GCC unroll 32
      for (int c = 0; c < NB; ++c) {
        a[c] = V::add(a[c], V::load(reinterpret_cast<const float*>(Tj + (size_t)off[c] * 8)));
      }
    }
  }
  if (epi == nullptr) {
#pragma GCC unroll 32
    for (int c = 0; c < NB; ++c) V::store(accp + c * kLutPx, a[c]);
    return;
  }
#pragma GCC unroll 32
  for (int c = 0; c < NB; ++c) {
    if (c0 + c >= epi->A->c_out) break;
    lut_out(*epi->A, *epi->op, c0 + c, a[c]);
  }
}

// ---------------------------------------------------------------- one tile
// The passes of one tile for channels [co_b, co_e): per pass its tables, then the channel blocks.
// part == nullptr: all passes, the last applies the epilogue; else (input split) the share kp of
// A.kparts of the passes, its sums left in part (co_pad vectors).
template <int G>
KDBNN_LUT_FN void lut_tile(const LutArgs& A, const LutTapPlan* tp, const LutOutPlan& op, float* work, int64_t co_b,
                           int64_t co_e, int64_t kp = 0, float* part = nullptr) {
  constexpr int64_t kTab = (int64_t(1) << G) * kLutPx;  // floats per table
  constexpr int NB = V::kNB, S = V::kStep;
  using I = typename LutIdxT<G>::type;
  const int64_t U = A.KH * A.KW * A.ngrp, pg = A.pg, co_pad = A.co_pad;
  const int64_t n_pass = (U + pg - 1) / pg;
  const int64_t p0 = part ? n_pass * kp / A.kparts : 0, p1 = part ? n_pass * (kp + 1) / A.kparts : n_pass;
  float* tab = work;
  float* acc = part ? part : work + pg * kTab + kLutSkew;
  const I* idx = static_cast<const I*>(A.idx);
  const int64_t nb_end = co_b + (co_e - co_b) / NB * NB;
  const LutEpi epi{&A, &op};
  for (int64_t p = p0; p < p1; ++p) {
    const int64_t u0 = p * pg, ng = std::min(pg, U - u0);
    for (int64_t i = 0; i < ng; ++i) lut_build_group<G>(A, tp, u0 + i, tab + i * kTab);
    const bool first = p == p0;
    const LutEpi* e = !part && p == n_pass - 1 ? &epi : nullptr;
    const I* ir = idx + u0 * co_pad;
    int64_t cb = co_b;
    for (; cb < nb_end; cb += NB) lut_block<G, NB>(tab, ng, ir + cb, co_pad, acc + cb * kLutPx, first, e, cb);
    if (cb < co_e) {  // tail: a multiple of S below NB
      const int64_t rest = co_e - cb;
      if constexpr (NB > S) {
        if (rest == S) lut_block<G, S>(tab, ng, ir + cb, co_pad, acc + cb * kLutPx, first, e, cb);
      }
      if constexpr (NB > 2 * S) {
        if (rest == 2 * S) lut_block<G, 2 * S>(tab, ng, ir + cb, co_pad, acc + cb * kLutPx, first, e, cb);
      }
      if constexpr (NB > 3 * S) {
        if (rest == 3 * S) lut_block<G, 3 * S>(tab, ng, ir + cb, co_pad, acc + cb * kLutPx, first, e, cb);
      }
    }
  }
}

// ---------------------------------------------------------------- tile plans
// Lanes [l0, l1) of one output row (image n, row oh, first column ow0).
struct LutSeg {
  int l0, l1;
  int64_t n, oh, ow0;
};

// The segments of the tile of np positions from q0, in flattened (n, band, ow) order of bands of R
// output rows (R = 1: output pixels); oh = the band's first output row. Returns their count.
KDBNN_LUT_FN int lut_segs(const LutArgs& A, int64_t q0, int np, int64_t R, LutSeg* seg) {
  const int64_t OB = (A.OH + R - 1) / R, plane = OB * A.OW;
  int ns = 0;
  int64_t n = q0 / plane, rem = q0 % plane, b = rem / A.OW, ow = rem % A.OW;  // one division per tile
  for (int l = 0; l < np;) {
    const int len = (int)std::min<int64_t>(np - l, A.OW - ow);
    seg[ns++] = {l, l + len, n, b * R, ow};
    l += len, ow = 0;
    if (++b == OB) b = 0, ++n;
  }
  return ns;
}

// Output runs of row oh + r of each segment (rows past OH: none); rows of one image are contiguous.
KDBNN_LUT_FN void lut_plan_out(const LutArgs& A, const LutSeg* seg, int ns, int64_t r, LutOutPlan& op) {
  const int64_t plane = A.OH * A.OW;
  int nr = 0, next_l = -1;
  int64_t next = -1;
  uint32_t bits[kLutPx] = {};
  for (int i = 0; i < ns; ++i) {
    const LutSeg& g = seg[i];
    if (g.oh + r >= A.OH) continue;
    const int64_t o = g.n * A.c_out * plane + (g.oh + r) * A.OW + g.ow0;
    if (nr == 0 || o != next || g.l0 != next_l) op.base[nr++] = o - g.l0;
    bits[nr - 1] |= ((1u << (g.l1 - g.l0)) - 1u) << g.l0;
    next = o + (g.l1 - g.l0), next_l = g.l1;
  }
  op.nr = nr;
  for (int i = 0; i < nr; ++i) op.m[i] = V::mask(bits[i]);
  op.full = nr == 1 && bits[0] == 0xFFFFu;
}

// How to load the tile's input at input row oh * stride + kh - pad, column ow * stride + kw - pad of
// each segment (stride 1: runs; else, or more than kMaxRuns runs, a gather).
KDBNN_LUT_FN void lut_plan_tap(const LutArgs& A, const LutSeg* seg, int ns, int64_t kh, int64_t kw, LutTapPlan& t) {
  const int64_t HW = A.H * A.W, CHW = A.C * HW;
  int nr = 0;
  uint32_t valid = 0, bits[kLutPx] = {};
  int64_t rb[kLutPx];
  if (A.stride == 1) {
    // per row: the lanes whose input column is inside the image form one run
    int64_t next = -1;
    int next_l = -1;
    for (int i = 0; i < ns; ++i) {
      const LutSeg& g = seg[i];
      const int64_t ih = g.oh + kh - A.pad;
      if (ih < 0 || ih >= A.H) continue;
      const int64_t d = kw - A.pad;  // iw = ow + d
      const int64_t owa = std::max(g.ow0, -d), owb = std::min<int64_t>(g.ow0 + (g.l1 - g.l0), A.W - d);
      if (owa >= owb) continue;
      const int la = g.l0 + (int)(owa - g.ow0), lb = g.l0 + (int)(owb - g.ow0);
      const int64_t pos = g.n * CHW + ih * A.W + owa + d;
      if (nr == 0 || pos != next || la != next_l) rb[nr++] = pos - la;
      bits[nr - 1] |= ((1u << (lb - la)) - 1u) << la;
      valid |= ((1u << (lb - la)) - 1u) << la;
      next = pos + (lb - la), next_l = lb;
    }
  }
  if (A.stride != 1 || nr > kMaxRuns) {
    // per-lane offsets for a gather
    nr = kMaxRuns + 1;
    valid = 0;
    for (int l = 0; l < kLutPx; ++l) t.pos[l] = 0;
    for (int i = 0; i < ns; ++i) {
      const LutSeg& g = seg[i];
      const int64_t ih = g.oh * A.stride + kh - A.pad;
      if (ih < 0 || ih >= A.H) continue;
      for (int l = g.l0; l < g.l1; ++l) {
        const int64_t iw = (g.ow0 + (l - g.l0)) * A.stride + kw - A.pad;
        if (iw < 0 || iw >= A.W) continue;
        t.pos[l] = (int32_t)(g.n * CHW + ih * A.W + iw);
        valid |= 1u << l;
      }
    }
    if (valid == 0) nr = 0;
  }
  t.nr = nr;
  if (nr == 0) {
    t.kind = 3;
  } else if (nr <= kMaxRuns) {
    t.kind = nr == 1 && valid == 0xFFFFu ? 0 : 1;
    for (int r = 0; r < nr; ++r) t.base[r] = rb[r], t.m[r] = V::mask(bits[r]);
  } else {
    t.kind = 2;
    t.m[0] = V::mask(valid);
  }
}

KDBNN_LUT_FN void lut_plan_tile(const LutArgs& A, int64_t q0, int np, LutTapPlan* tp, LutOutPlan& op) {
  LutSeg seg[kLutPx];
  const int ns = lut_segs(A, q0, np, 1, seg);
  lut_plan_out(A, seg, ns, 0, op);
  for (int64_t kk = 0; kk < A.KH * A.KW; ++kk) lut_plan_tap(A, seg, ns, kk / A.KW, kk % A.KW, tp[kk]);
}

// Work items [tb, te) over tiles of 16 output pixels in flattened (n, oh, ow) order (see
// BwnLutKernel::range for the (tile, channel chunk) items).
KDBNN_LUT_FN void lut_range1(const LutArgs& A, int64_t tb, int64_t te, float* work) {
  std::vector<LutTapPlan> tp(A.KH * A.KW);
  LutOutPlan op;
  if (A.kparts > 1) {  // items (tile t / kparts, part t % kparts), all channels
    int64_t planned = -1;
    for (int64_t t = tb; t < te; ++t) {
      const int64_t tile = t / A.kparts, kp = t % A.kparts, q0 = tile * kLutPx;
      if (tile != planned) lut_plan_tile(A, q0, (int)std::min<int64_t>(kLutPx, A.total - q0), tp.data(), op), planned = tile;
      float* part = A.part + t * A.co_pad * kLutPx;
      switch (A.g) {
        case 4: lut_tile<4>(A, tp.data(), op, work, 0, A.co_pad, kp, part); break;
        case 5: lut_tile<5>(A, tp.data(), op, work, 0, A.co_pad, kp, part); break;
        default: lut_tile<6>(A, tp.data(), op, work, 0, A.co_pad, kp, part); break;
      }
    }
    return;
  }
  LutItems items(A.co_pad, A.co_chunk);
  for (int64_t t = tb; t < te; ++t) {
    int64_t tile, co_b, co_e;
    if (items.at(t, tile, co_b, co_e)) {
      const int64_t q0 = tile * kLutPx;
      lut_plan_tile(A, q0, (int)std::min<int64_t>(kLutPx, A.total - q0), tp.data(), op);
    }
    switch (A.g) {
      case 4: lut_tile<4>(A, tp.data(), op, work, co_b, co_e); break;
      case 5: lut_tile<5>(A, tp.data(), op, work, co_b, co_e); break;
      default: lut_tile<6>(A, tp.data(), op, work, co_b, co_e); break;
    }
  }
}

// ---------------------------------------------------------------- kw-sharing kernel (r4)
// Stride 1, KW <= 5. A tile is 64 consecutive positions q of the padded-width output domain
// (q = oh * Wp + ow, columns ow >= OW are computed and dropped), held as 4 vectors with lane l of
// vector r = position q0 + 4l + r. Tap (kh, kw) of vector r then reads padded-input positions
// q0 + kh*Wp + 4l + (r + kw): "input vector" r + kw of the same interleaved layout, so the
// 4 + KW - 1 input vectors of one kernel row are tabulated once and serve all KW taps (6 tables
// instead of 12 for 3x3), and each weight index byte selects 4 lookups (one per vector).
// Input vectors: 64 + 16 consecutive padded-domain positions per channel and kernel row, loaded
// in place (per tile, r4_plan_in: plain loads, masked runs at row ends and padding, a gather for
// rows narrower than the runs allow) and de-interleaved by V::deint; the output is re-interleaved
// by V::inter before the epilogue. (Measured against a zero-padded copy of the input per call, as
// before: the same speed, 64->64 @80x80 0.945 vs 0.950 ms AVX-512, 1.472 vs 1.464 ms AVX2, without
// the copy's N*C*Hp*Wp floats.) A pass unit is (kernel row, group): 4 + KW - 1
// tables; pg units per pass. (kR = 4: lut_common.h.)

constexpr int kR4In = kR + 1;  // 16-float input vectors per channel and kernel row: 64 + 16 positions

// Where the 64 positions of one r4 tile go: per output vector m (positions q0 + 16m + [0, 16)),
// runs of valid positions (ow < OW, oh < OH) of one output row.
struct LutR4OutPlan {
  V::M m[kR][kLutPx];
  int64_t base[kR][kLutPx];
  int nr[kR];
  bool full[kR];
};

// The NV tables of one pass unit (kernel row kh, group j): the G channels' input vectors
// p[0..79] (padded domain, from q0 + kh * Wp) loaded in place by the tile's plans tk[0..4]
// (padding and channels >= C read 0), de-interleaved (V::deint), then table v from the v-th
// vectors.
template <int G, int NV>
KDBNN_LUT_INL void r4_build(const float* xc, int64_t HW, int nvalid, const LutTapPlan* tk, float* T) {
  constexpr int NL = NV > 4 ? 5 : 4;  // 16-float vectors of input per channel
  constexpr int64_t kTab = (int64_t(1) << G) * kLutPx;
  V::T x[G][NV];
#pragma GCC unroll 8
  for (int i = 0; i < G; ++i) {
    V::T a[5];
#pragma GCC unroll 5
    for (int m = 0; m < NL; ++m) a[m] = i < nvalid ? lut_x(xc + i * HW, tk[m]) : V::zero();
    V::template deint<NV>(a, x[i]);
  }
#pragma GCC unroll 8
  for (int v = 0; v < NV; ++v) {
    V::T xv[G];
#pragma GCC unroll 8
    for (int i = 0; i < G; ++i) xv[i] = x[i][v];
    lut_table<G>(xv, T + v * kTab);
  }
}

template <int G, int NB, int KW>
KDBNN_LUT_INL void r4_block(const float* T, int64_t nu, const uint8_t* ir, int64_t co_pad, float* accp, bool first,
                            const LutArgs* epi, const LutR4OutPlan* op, int64_t c0) {
  using VT = V::T;
  constexpr int NV = kR + KW - 1;
  constexpr int64_t kVec = (int64_t(1) << G) * kLutPx;  // floats per table (one input vector)
  VT a[NB][kR];
#pragma GCC unroll 32
  for (int c = 0; c < NB; ++c)
#pragma GCC unroll 4
    for (int r = 0; r < kR; ++r) a[c][r] = first ? V::zero() : V::load(accp + (c * kR + r) * kLutPx);
  if constexpr (NB == 4) {
    // (AVX-512) the 4 offsets of an index row are loaded (one dword, movd into an xmm) 3 rows
    // ahead and moved to a GPR when used: lookups whose address was loaded shortly before issue
    // slowly on Zen 5 (64->64 @80x80: byte loads just before use 1.05 ms, a dword one row ahead
    // 0.95 ms, 3 rows ahead via xmm 0.93 ms; 6 rows ahead spills)
    const int64_t nrow = nu * KW;
    constexpr int D = 3;
    __m128i ring[D];
#pragma GCC unroll 4
    for (int d = 0; d < D; ++d) ring[d] = _mm_loadu_si32(ir + std::min<int64_t>(d, nrow - 1) * co_pad);
    int64_t row = 0;
    for (int64_t u = 0; u < nu; ++u) {
      const float* Tu = T + u * NV * kVec;
#pragma GCC unroll 5
      for (int kw = 0; kw < KW; ++kw) {
        ++row;
        const uint32_t q = (uint32_t)_mm_cvtsi128_si32(ring[0]);
#pragma GCC unroll 4
        for (int d = 0; d + 1 < D; ++d) ring[d] = ring[d + 1];
        ring[D - 1] = _mm_loadu_si32(ir + std::min<int64_t>(row - 1 + D, nrow - 1) * co_pad);
#pragma GCC unroll 4
        for (int c = 0; c < NB; ++c) {
          const char* e = reinterpret_cast<const char*>(Tu + kw * kVec) + (size_t)((q >> (8 * c)) & 255u) * 8;
#pragma GCC unroll 4
          for (int r = 0; r < kR; ++r) a[c][r] = V::add(a[c][r], V::load(reinterpret_cast<const float*>(e) + r * kVec));
        }
      }
    }
  } else if constexpr (NB < 4) {
    // (AVX2) the offsets of the next index row are loaded (one dword) while this row's lookups
    // run (the xmm ring above measured 12% slower here: 16 ymm registers)
    const int64_t nrow = nu * KW;
    uint32_t q;
    std::memcpy(&q, ir, 4);
    int64_t row = 0;
    for (int64_t u = 0; u < nu; ++u) {
      const float* Tu = T + u * NV * kVec;
#pragma GCC unroll 5
      for (int kw = 0; kw < KW; ++kw) {
        ++row;
        uint32_t qn;
        std::memcpy(&qn, ir + (row < nrow ? row : 0) * co_pad, 4);
#pragma GCC unroll 4
        for (int c = 0; c < NB; ++c) {
          const char* e = reinterpret_cast<const char*>(Tu + kw * kVec) + (size_t)((q >> (8 * c)) & 255u) * 8;
#pragma GCC unroll 4
          for (int r = 0; r < kR; ++r) a[c][r] = V::add(a[c][r], V::load(reinterpret_cast<const float*>(e) + r * kVec));
        }
        q = qn;
      }
    }
  } else {
    lut_r4_lookups<NB, KW, kVec>(a, T, nu, ir, co_pad);
  }
  if (epi == nullptr) {
#pragma GCC unroll 32
    for (int c = 0; c < NB; ++c)
#pragma GCC unroll 4
      for (int r = 0; r < kR; ++r) V::store(accp + (c * kR + r) * kLutPx, a[c][r]);
    return;
  }
  const LutArgs& A = *epi;
  const int64_t plane = A.OH * A.OW;
#pragma GCC unroll 32
  for (int c = 0; c < NB; ++c) {
    const int64_t o = c0 + c;
    if (o >= A.c_out) break;
    VT y[kR];
    V::inter(a[c], y);
    float* dst = A.O + o * plane;
#pragma GCC unroll 4
    for (int m = 0; m < kR; ++m) {
      const VT z = V::epi(y[m], A.alpha[o], A.bias[o], A.act);
      if (op->full[m]) {
        V::storeu(dst + op->base[m][0], z);
      } else {
        for (int r = 0; r < op->nr[m]; ++r) V::store_mask(dst + op->base[m][r], op->m[m][r], z);
      }
    }
  }
}

template <int G, int KW>
KDBNN_LUT_FN void r4_tile(const LutArgs& A, const float* xn, const LutTapPlan* tin, const LutR4OutPlan& op,
                          float* work, int64_t co_b, int64_t co_e) {
  constexpr int NV = kR + KW - 1, NB = V::kNB4;
  constexpr int64_t kUnit = NV * (int64_t(1) << G) * kLutPx;  // floats per pass unit
  const int64_t U = A.KH * A.ngrp, pg = A.pg, co_pad = A.co_pad, HW = A.H * A.W;
  const int64_t n_pass = (U + pg - 1) / pg;
  float* tab = work;
  float* acc = work + pg * kUnit + kLutSkew;
  const uint8_t* idx = static_cast<const uint8_t*>(A.idx);
  for (int64_t p = 0; p < n_pass; ++p) {
    const int64_t u0 = p * pg, nu = std::min(pg, U - u0);
    for (int64_t i = 0; i < nu; ++i) {
      const int64_t u = u0 + i, kh = u / A.ngrp, j = u % A.ngrp;
      r4_build<G, NV>(xn + j * G * HW, HW, (int)std::min<int64_t>(G, A.C - j * G), tin + kh * kR4In, tab + i * kUnit);
    }
    const bool first = p == 0;
    const LutArgs* e = p == n_pass - 1 ? &A : nullptr;
    const uint8_t* ir = idx + u0 * KW * co_pad;
    for (int64_t cb = co_b; cb < co_e; cb += NB)
      r4_block<G, NB, KW>(tab, nu, ir + cb, co_pad, acc + cb * kR * kLutPx, first, e, &op, cb);
  }
}

KDBNN_LUT_FN void r4_plan_out(const LutArgs& A, int64_t n, int64_t q0, LutR4OutPlan& op) {
  const int64_t plane = A.OH * A.OW, obase = n * A.c_out * plane;
  for (int m = 0; m < kR; ++m) {
    int nr = 0, last_l = -2;
    int64_t next = -1;
    uint32_t bits[kLutPx] = {};
    for (int l = 0; l < kLutPx; ++l) {
      const int64_t q = q0 + 16 * m + l, oh = q / A.Wp, ow = q % A.Wp;
      if (oh >= A.OH || ow >= A.OW) continue;
      const int64_t o = oh * A.OW + ow;
      if (nr == 0 || o != next || l != last_l + 1) op.base[m][nr++] = obase + o - l;
      bits[nr - 1] |= 1u << l;
      next = o + 1, last_l = l;
    }
    op.nr[m] = nr;
    for (int r = 0; r < nr; ++r) op.m[m][r] = V::mask(bits[r]);
    op.full[m] = nr == 1 && bits[0] == 0xFFFFu;
  }
}

// Where the input vectors of one r4 tile come from: per kernel row kh, tk[kh * kR4In + m] loads the
// 16 padded-domain positions P = q0 + kh * Wp + 16m + [0, 16) of channel 0 of the tile's image
// (runs of positions inside the image; the padding reads 0).
KDBNN_LUT_FN void r4_plan_in(const LutArgs& A, int64_t q0, LutTapPlan* tk) {
  for (int64_t kh = 0; kh < A.KH; ++kh) {
    for (int m = 0; m < kR4In; ++m) {
      LutTapPlan& t = tk[kh * kR4In + m];
      const int64_t P = q0 + kh * A.Wp + kLutPx * m;
      int64_t hp = P / A.Wp, wp = P % A.Wp;  // padded row and column of lane 0
      int nr = 0;
      uint32_t valid = 0, bits[kLutPx] = {};
      int64_t rb[kLutPx];
      // one segment of lanes per padded row: its columns inside the image form one run
      for (int l = 0; l < kLutPx; wp = 0, ++hp) {
        const int len = (int)std::min<int64_t>(kLutPx - l, A.Wp - wp);
        const int64_t ih = hp - A.pad, c0 = std::max(wp, A.pad), c1 = std::min(wp + len, A.pad + A.W);
        if (ih >= 0 && ih < A.H && c0 < c1) {
          const int la = l + (int)(c0 - wp), lb = l + (int)(c1 - wp);
          const int64_t base = ih * A.W + (c0 - A.pad) - la;
          if (nr == 0 || base != rb[nr - 1]) rb[nr++] = base;
          bits[nr - 1] |= ((1u << (lb - la)) - 1u) << la;
          valid |= ((1u << (lb - la)) - 1u) << la;
        }
        l += len;
      }
      t.nr = nr;
      if (nr == 0) {
        t.kind = 3;
      } else if (nr <= kMaxRuns) {
        t.kind = nr == 1 && valid == 0xFFFFu ? 0 : 1;
        for (int r = 0; r < nr; ++r) t.base[r] = rb[r], t.m[r] = V::mask(bits[r]);
      } else {  // narrow rows: a gather (lane l of run r reads base[r] + l)
        t.kind = 2;
        t.m[0] = V::mask(valid);
        for (int l = 0; l < kLutPx; ++l) t.pos[l] = 0;
        for (int r = 0; r < nr; ++r)
          for (int l = 0; l < kLutPx; ++l)
            if (bits[r] >> l & 1u) t.pos[l] = (int32_t)(rb[r] + l);
      }
    }
  }
}

// Work items [tb, te) over tiles of 64 padded-domain positions (lut_r4_tiles per image).
KDBNN_LUT_FN void r4_range(const LutArgs& A, int64_t tb, int64_t te, float* work) {
  const int64_t per_img = lut_r4_tiles(A), img = A.C * A.H * A.W;
  std::vector<LutTapPlan> tin(A.KH * kR4In);
  LutR4OutPlan op;
  LutItems items(A.co_pad, A.co_chunk);
  for (int64_t t = tb; t < te; ++t) {
    int64_t tile, co_b, co_e;
    const bool replan = items.at(t, tile, co_b, co_e);
    const int64_t n = tile / per_img, q0 = (tile % per_img) * kR * kLutPx;
    if (replan) r4_plan_out(A, n, q0, op), r4_plan_in(A, q0, tin.data());
    const float* xn = A.X + n * img;
    switch (A.KW * 8 + A.g) {
      case 1 * 8 + 4: r4_tile<4, 1>(A, xn, tin.data(), op, work, co_b, co_e); break;
      case 2 * 8 + 4: r4_tile<4, 2>(A, xn, tin.data(), op, work, co_b, co_e); break;
      case 3 * 8 + 4: r4_tile<4, 3>(A, xn, tin.data(), op, work, co_b, co_e); break;
      case 4 * 8 + 4: r4_tile<4, 4>(A, xn, tin.data(), op, work, co_b, co_e); break;
      case 5 * 8 + 4: r4_tile<4, 5>(A, xn, tin.data(), op, work, co_b, co_e); break;
      case 1 * 8 + 5: r4_tile<5, 1>(A, xn, tin.data(), op, work, co_b, co_e); break;
      case 2 * 8 + 5: r4_tile<5, 2>(A, xn, tin.data(), op, work, co_b, co_e); break;
      case 3 * 8 + 5: r4_tile<5, 3>(A, xn, tin.data(), op, work, co_b, co_e); break;
      case 4 * 8 + 5: r4_tile<5, 4>(A, xn, tin.data(), op, work, co_b, co_e); break;
      case 5 * 8 + 5: r4_tile<5, 5>(A, xn, tin.data(), op, work, co_b, co_e); break;
      default: break;  // lut_r4_ok() admits only the cases above
    }
  }
}

// ---------------------------------------------------------------- kh-sharing kernel (rows)
// Stride 1, KH 3 or 5. A tile is 16 columns of R output rows: positions q in flattened
// (n, band, ow) order, band = R output rows (the last band of an image may be partial), R vectors
// per channel (vector r, lane l = output row band * R + r of position q0 + l). Tap (kh, kw) of
// vector r reads input row band * R + r + kh - pad, which is the "input row" v = r + kh of the
// tile: per group j and column shift kw the R + KH - 1 tables of input rows v = 0 .. R + KH - 2
// (planned like r = 1 taps, lut_plan_tap with kh = v) are built once and serve all KH taps of
// that kernel column ((R + KH - 1) * KW tables instead of R * KH * KW: 3x3, R = 2: 12 for 18
// uses), and each offset byte selects R lookups. A pass unit is
// (kw, j): u = kw * ngrp + j, index rows u * KH + kh; pg units per pass.

// a[c][r] += entry (byte c of q) / 8 of table r (tables kVec floats apart from Tk)
template <int NB, int R, int64_t kVec, class Q>
KDBNN_LUT_INL void rows_add(V::T (&a)[NB][R], const float* Tk, Q q) {
#pragma GCC unroll 8
  for (int c = 0; c < NB; ++c) {
    const char* e = reinterpret_cast<const char*>(Tk) + (size_t)((q >> (8 * c)) & 255u) * 8;
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) a[c][r] = V::add(a[c][r], V::load(reinterpret_cast<const float*>(e) + r * kVec));
  }
}

// The lookups of nu pass units for NB channels: one offset byte of index row u * KH + kh selects
// entry s of tables kh .. kh + R - 1 of unit u (a[c][r] += T_u,r+kh[s]). The NB offsets of a row
// are loaded ahead of their lookups (lookups whose address was loaded shortly before issue slowly
// on Zen 5, see lut_block and r4_block): AVX-512 (V::kOffRing, NB = 8) an xmm ring 3 rows ahead,
// one row per loop iteration (unrolled over the KH rows, the compiler hoisted all their offsets
// and spilled them: 128->128 @40 0.92 vs 0.77 ms); AVX2 (NB <= 4) the next row's offsets while
// this row's lookups run. (r4_block keeps its own copy of these schedules: calling this function
// instead measured 4-10% slower at 64->64 @80, from register allocation.)
template <int G, int NB, int R, int KH>
KDBNN_LUT_INL void rows_lookups(V::T (&a)[NB][R], const float* T, int64_t nu, const uint8_t* ir, int64_t co_pad) {
  static_assert(V::kOffRing ? NB == 8 : NB <= 4, "rows_lookups: one offset qword (ring) or dword per row");
  using Q = std::conditional_t<(NB <= 4), uint32_t, uint64_t>;
  constexpr int NV = R + KH - 1;
  constexpr int64_t kVec = (int64_t(1) << G) * kLutPx;
  const int64_t nrow = nu * KH;
  if constexpr (V::kOffRing) {
    constexpr int D = 3;
    const uint8_t* const last = ir + (nrow - 1) * co_pad;
    const uint8_t* ahead = ir;
    __m128i ring[D];
#pragma GCC unroll 4
    for (int d = 0; d < D; ++d, ahead += co_pad)
      ring[d] = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(std::min(ahead, last)));
    for (int64_t u = 0; u < nu; ++u) {
      const float* Tk = T + u * NV * kVec;
#pragma GCC unroll 1
      for (int k = 0; k < KH; ++k, Tk += kVec, ahead += co_pad) {
        const Q q = (Q)_mm_cvtsi128_si64(ring[0]);
#pragma GCC unroll 4
        for (int d = 0; d + 1 < D; ++d) ring[d] = ring[d + 1];
        ring[D - 1] = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(std::min(ahead, last)));
        rows_add<NB, R, kVec>(a, Tk, q);
      }
    }
  } else {
    Q q;
    std::memcpy(&q, ir, sizeof(Q));
    int64_t row = 0;
    for (int64_t u = 0; u < nu; ++u) {
      const float* Tu = T + u * NV * kVec;
#pragma GCC unroll 5
      for (int k = 0; k < KH; ++k) {
        ++row;
        Q qn;
        std::memcpy(&qn, ir + (row < nrow ? row : 0) * co_pad, sizeof(Q));
        rows_add<NB, R, kVec>(a, Tu + k * kVec, q);
        q = qn;
      }
    }
  }
}

template <int G, int NB, int R, int KH>
KDBNN_LUT_INL void rows_block(const float* T, int64_t nu, const uint8_t* ir, int64_t co_pad, float* accp, bool first,
                              const LutArgs* epi, const LutOutPlan* op, int64_t c0) {
  using VT = V::T;
  VT a[NB][R];
#pragma GCC unroll 8
  for (int c = 0; c < NB; ++c)
#pragma GCC unroll 5
    for (int r = 0; r < R; ++r) a[c][r] = first ? V::zero() : V::load(accp + (c * R + r) * kLutPx);
  rows_lookups<G, NB, R, KH>(a, T, nu, ir, co_pad);
  if (epi == nullptr) {
#pragma GCC unroll 8
    for (int c = 0; c < NB; ++c)
#pragma GCC unroll 5
      for (int r = 0; r < R; ++r) V::store(accp + (c * R + r) * kLutPx, a[c][r]);
    return;
  }
#pragma GCC unroll 8
  for (int c = 0; c < NB; ++c) {
    if (c0 + c >= epi->c_out) break;
#pragma GCC unroll 5
    for (int r = 0; r < R; ++r) lut_out(*epi, op[r], c0 + c, a[c][r]);
  }
}

template <int G, int R, int KH>
KDBNN_LUT_FN void rows_tile(const LutArgs& A, const LutTapPlan* tp, const LutOutPlan* op, float* work, int64_t co_b,
                            int64_t co_e) {
  constexpr int NV = R + KH - 1, NB = V::nb_rows(R);
  constexpr int64_t kTab = (int64_t(1) << G) * kLutPx, kUnit = NV * kTab;
  const int64_t U = A.KW * A.ngrp, pg = A.pg, co_pad = A.co_pad, HW = A.H * A.W;
  const int64_t n_pass = (U + pg - 1) / pg;
  float* tab = work;
  float* acc = work + pg * kUnit + kLutSkew;
  const uint8_t* idx = static_cast<const uint8_t*>(A.idx);
  for (int64_t p = 0; p < n_pass; ++p) {
    const int64_t u0 = p * pg, nu = std::min(pg, U - u0);
    for (int64_t i = 0; i < nu; ++i) {
      const int64_t u = u0 + i, kw = u / A.ngrp, c0 = u % A.ngrp * G;
      const float* xc = A.X + c0 * HW;
      const int nvalid = (int)std::min<int64_t>(G, A.C - c0);
      for (int v = 0; v < NV; ++v) lut_build_at<G>(xc, HW, nvalid, tp[v * A.KW + kw], tab + i * kUnit + v * kTab);
    }
    const bool first = p == 0;
    const LutArgs* e = p == n_pass - 1 ? &A : nullptr;
    const uint8_t* ir = idx + u0 * KH * co_pad;
    for (int64_t cb = co_b; cb < co_e; cb += NB)
      rows_block<G, NB, R, KH>(tab, nu, ir + cb, co_pad, acc + cb * R * kLutPx, first, e, op, cb);
  }
}

// Work items [tb, te) over tiles of 16 positions (columns of R rows; lut_rows_total of them).
KDBNN_LUT_FN void rows_range(const LutArgs& A, int64_t tb, int64_t te, float* work) {
  const int64_t R = A.rows, NV = R + A.KH - 1, total = lut_rows_total(A);
  std::vector<LutTapPlan> tp(NV * A.KW);
  LutOutPlan op[kLutMaxRows];
  LutItems items(A.co_pad, A.co_chunk);
  for (int64_t t = tb; t < te; ++t) {
    int64_t tile, co_b, co_e;
    if (items.at(t, tile, co_b, co_e)) {
      const int64_t q0 = tile * kLutPx;
      LutSeg seg[kLutPx];
      const int ns = lut_segs(A, q0, (int)std::min<int64_t>(kLutPx, total - q0), R, seg);
      for (int64_t r = 0; r < R; ++r) lut_plan_out(A, seg, ns, r, op[r]);
      for (int64_t v = 0; v < NV; ++v)
        for (int64_t kw = 0; kw < A.KW; ++kw) lut_plan_tap(A, seg, ns, v, kw, tp[v * A.KW + kw]);
    }
    switch (A.g * 100 + R * 10 + A.KH) {
      case 423: rows_tile<4, 2, 3>(A, tp.data(), op, work, co_b, co_e); break;
      case 433: rows_tile<4, 3, 3>(A, tp.data(), op, work, co_b, co_e); break;
      case 425: rows_tile<4, 2, 5>(A, tp.data(), op, work, co_b, co_e); break;
      case 435: rows_tile<4, 3, 5>(A, tp.data(), op, work, co_b, co_e); break;
      case 523: rows_tile<5, 2, 3>(A, tp.data(), op, work, co_b, co_e); break;
      case 533: rows_tile<5, 3, 3>(A, tp.data(), op, work, co_b, co_e); break;
      case 525: rows_tile<5, 2, 5>(A, tp.data(), op, work, co_b, co_e); break;
      case 535: rows_tile<5, 3, 5>(A, tp.data(), op, work, co_b, co_e); break;
      default: break;  // lut_rows_ok() admits only the cases above
    }
  }
}

// Tiles [tb, te) of an input-split call: per output channel the sum of the tile's kparts part
// sums (in part order, so any thread count gives the same value), then lut_out.
KDBNN_LUT_FN void lut_combine(const LutArgs& A, int64_t tb, int64_t te) {
  LutOutPlan op;
  for (int64_t tile = tb; tile < te; ++tile) {
    const int64_t q0 = tile * kLutPx;
    LutSeg seg[kLutPx];
    const int ns = lut_segs(A, q0, (int)std::min<int64_t>(kLutPx, A.total - q0), 1, seg);
    lut_plan_out(A, seg, ns, 0, op);
    const float* P = A.part + tile * A.kparts * A.co_pad * kLutPx;
    for (int64_t o = 0; o < A.c_out; ++o) {
      V::T s = V::load(P + o * kLutPx);
      for (int64_t k = 1; k < A.kparts; ++k) s = V::add(s, V::load(P + (k * A.co_pad + o) * kLutPx));
      lut_out(A, op, o, s);
    }
  }
}

KDBNN_LUT_FN void lut_range(const LutArgs& A, int64_t tb, int64_t te, float* work) {
  if (A.r4) r4_range(A, tb, te, work);
  else if (A.rows) rows_range(A, tb, te, work);
  else lut_range1(A, tb, te, work);
}

// ---------------------------------------------------------------- index preparation
// Offsets of taps [kb, ke): idx[row(kk, j) * co_pad + o] = (bits j*G .. j*G+G-1 of channel o's packed
// word row at tap kk) * 8; channels o >= c_out get 0. row(kk, j) = kk * ngrp + j, or
// (kh * ngrp + j) * KW + kw for r4. V::kPrepLanes output channels at a time, as the 32-bit lanes
// of one vector (V::prep_fields: 8 lanes on AVX2, 16 on AVX-512).
template <int G>
KDBNN_LUT_FN void lut_prep_idx_t(const uint64_t* wp, const LutArgs& A, int64_t nw, int64_t kb, int64_t ke, void* out) {
  using I = typename LutIdxT<G>::type;
  constexpr int L = V::kPrepLanes;  // output channels per field extraction (8 or 16)
  I* idx = static_cast<I*>(out);
  const int64_t KK = A.KH * A.KW, co_pad = A.co_pad, nk = 2 * nw;
  std::vector<uint32_t> w32(nk * L);  // [32-bit word k][L channels]
  for (int64_t kk = kb; kk < ke; ++kk) {
    const int64_t kh = kk / A.KW, kw = kk % A.KW;
    const int64_t row0 = A.r4 ? kh * A.ngrp * A.KW + kw : A.rows ? kw * A.ngrp * A.KH + kh : kk * A.ngrp;
    const int64_t rstep = A.r4 ? A.KW : A.rows ? A.KH : 1;
    for (int64_t o0 = 0; o0 < co_pad; o0 += L) {
      const int n = (int)std::min<int64_t>(L, co_pad - o0);  // a multiple of 8
      lut_gather_words<L>(wp, KK, kk, nw, o0, A.c_out - o0, w32.data());
      I* dst = idx + row0 * co_pad + o0;
      for (int64_t j = 0; j < A.ngrp; ++j, dst += rstep * co_pad) V::template prep_fields<G>(w32.data(), nk, j * G, dst, n);
    }
  }
}

KDBNN_LUT_FN void lut_prep_idx(const uint64_t* wp, const LutArgs& A, int64_t nw, int64_t kb, int64_t ke, void* out) {
  switch (A.g) {
    case 4: lut_prep_idx_t<4>(wp, A, nw, kb, ke, out); break;
    case 5: lut_prep_idx_t<5>(wp, A, nw, kb, ke, out); break;
    default: lut_prep_idx_t<6>(wp, A, nw, kb, ke, out); break;
  }
}

// ---------------------------------------------------------------- plan
// Per layer, the same for both ISAs (measured on Zen 5, 1 thread, ms, AVX-512 / AVX2): the rows
// kernel (kh-sharing, R = 2, g = 4, 8 units = 32 KB of tables per pass) for stride-1 3x3 layers
// with rows >= 16 wide and <= 128 output channels: 64->64 @80x80 0.85 / 1.36 (r4 0.90 / 1.47),
// 128->128 @40 0.71 / 1.20 (r = 1 0.76 / 1.30), 64@40 0.245 (0.273), 32@80 0.33 (0.35), 128@20
// 0.205 (0.212). Not taken: 256@20 0.687 / 1.17 (r = 1, g = 5: 0.693 / 1.09), 256@40 2.76
// (2.71), 128@10 0.067 (0.065: partial 16-column tiles), 512@10 0.77 (0.67); R = 3 and 4 no
// faster. Elsewhere g = 5 for wide layers (>= 256 output channels amortize the 32-entry tables),
// else 4; the r4 kernel (kw-sharing) where its 4 accumulator vectors per channel stay L1-sized
// (<= 128 output channels), the kernel is wider than 1 and rows are wide enough (>= 48) that junk
// columns and tile tails cost little; elsewhere r = 1. pg: 16 tables per pass (r = 1: 16 KB for
// g = 4, 32 KB for g = 5), about 24 KB of units (r4) or lut_rows_pg.
KDBNN_LUT_FN void lut_plan(LutArgs& A) {
  A.g = 4, A.rows = 2;
  if (lut_rows_ok(A, 2) && A.KH == 3 && A.OW >= 16 && A.c_out <= 128) {
    A.r4 = 0, A.pg = lut_rows_pg(A);
    return;
  }
  A.rows = 0;
  A.g = A.c_out >= 256 ? 5 : 4;
  A.r4 = lut_r4_ok(A) && A.KW >= 2 && A.c_out <= 128 && A.OW >= 48;
  const int64_t table = int64_t(64) << A.g;
  A.pg = A.r4 ? std::max<int64_t>(1, 24576 / ((4 + A.KW - 1) * table)) : 16;
}

#undef KDBNN_LC_INL
