// kd_bnn kernels: the pieces the two lookup-table convs share (bwn_lut.h: fp32 tables of 16
// pixels; w1a8_lut.h: int16 tables of 32 positions), written once over the includer's vector V.
//
// Included by bwn_lut.h and w1a8_lut.h, so once per ISA file, inside that file's anonymous
// namespace (no include guard: each ISA file includes it once, and each copy is compiled with
// that file's target attributes), after the including header defines
//   KDBNN_LC_INL  the ISA's function attributes with always_inline (KDBNN_LUT_INL / KDBNN_W8_INL)
//   struct V      the vector type T and add, sub, neg, and for the r4 kernel deint<NV>(src, out)
//                 (out[v] lane l = src[4l + v]) and the channels per r4 register block kNB4.
// Element types are template parameters: float tables and inputs (BWN), int16 tables of int8
// inputs (W1A8). Nothing here changes a value: the same ops in the same order as before the
// headers shared them.

constexpr int kR = 4;  // r4 kernel: vectors per tile (lane l of vector r = position 4l + r)

// ---------------------------------------------------------------- table build
// P[i] = the 2^a sign sums of x[0..a-1] (bit i of the index set = +x_i), a = 2 or 3: the low
// half of a table build (T[i + 2^a k] = P[i] + Q[k], T[~s] = -T[s]).
template <int A>
KDBNN_LC_INL void lut_low_sums(const typename V::T* x, typename V::T* P) {
  using VT = typename V::T;
  static_assert(A == 2 || A == 3, "lut_low_sums: a = 2 or 3");
  const VT p3 = V::add(x[0], x[1]), p1 = V::sub(x[0], x[1]);
  const VT p[4] = {V::neg(p3), p1, V::neg(p1), p3};
  if constexpr (A == 2) {
#pragma GCC unroll 4
    for (int i = 0; i < 4; ++i) P[i] = p[i];
  } else {
#pragma GCC unroll 4
    for (int i = 0; i < 4; ++i) P[i] = V::sub(p[i], x[2]), P[i + 4] = V::add(p[i], x[2]);
  }
}

// r4: the NV tables of one pass unit. Each of the G channels (stride apart) is de-interleaved into
// its NV input vectors, then table v (kTab elements, at T + v * kTab) is built from the v-th
// vectors by Tab::template build<G>(x, T) (the includer's table builder). (VV: V, named as a
// parameter so that a V without deint, of an ISA file without the r4 kernel, still compiles.)
template <int G, int NV, int64_t kTab, class Tab, class E, class O, class VV = V>
KDBNN_LC_INL void lut_r4_build(const E* src, int64_t stride, O* T) {
  typename VV::T x[G][NV];
#pragma GCC unroll 8
  for (int i = 0; i < G; ++i) VV::template deint<NV>(src + i * stride, x[i]);
#pragma GCC unroll 8
  for (int v = 0; v < NV; ++v) {
    typename V::T xv[G];
#pragma GCC unroll 8
    for (int i = 0; i < G; ++i) xv[i] = x[i][v];
    Tab::template build<G>(xv, T + v * kTab);
  }
}

// ---------------------------------------------------------------- lookups
// NB offsets of one index row (qword loads when the row segment is a whole number of qwords).
template <int NB, class I>
KDBNN_LC_INL void lut_offsets(const I* ir, uint32_t* off) {
  constexpr int per = 8 / (int)sizeof(I);
  if constexpr (NB % per == 0) {
#pragma GCC unroll 8
    for (int w = 0; w < NB / per; ++w) {
      uint64_t q;
      std::memcpy(&q, ir + w * per, 8);
#pragma GCC unroll 8
      for (int e = 0; e < per; ++e) off[w * per + e] = (uint32_t)((q >> (8 * sizeof(I) * e)) & ((1u << (8 * sizeof(I))) - 1));
    }
  } else {
#pragma GCC unroll 32
    for (int c = 0; c < NB; ++c) off[c] = ir[c];
  }
}

// a[c][r] += entry (q >> 8(c - lo) & 255) / 8 of the table at Tk + r * kRStride, channels lo <= c <
// hi (q: the offset bytes of channels lo.., 8 of them, or 4 for a dword).
template <int NB, int R, int64_t kRStride, class E>
KDBNN_LC_INL void lut_add_q(typename V::T (&a)[NB][R], const E* Tk, uint64_t q, int lo, int hi) {
#pragma GCC unroll 8
  for (int c = lo; c < hi; ++c) {
    const E* e = reinterpret_cast<const E*>(reinterpret_cast<const char*>(Tk) + (size_t)((q >> (8 * (c - lo))) & 255u) * 8);
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) a[c][r] = V::add(a[c][r], V::load(e + r * kRStride));
  }
}

constexpr int kLutAhead = 3;  // index rows loaded ahead (lut_lookups); see the slack rule there

// The lookups of nu x K index rows (co_pad apart, NB offset bytes each) for NB channels: row
// u * K + k adds to a[c][r] the entry its offset selects in table T + u * kUStride + k * kTab +
// r * kRStride (elements). K = 1, R = 1: one table per row (the plain kernels); K = KW, R = kR,
// kRStride = kTab: the r4 kernels (tables of input vectors k + r); K = KH * KW, R = 2, kRStride =
// KW * kTab: the W1A8 rows kernel (tables of input row kh + r, shift kw).
// The offsets are loaded ahead of their lookups (on Zen 5 a lookup whose address comes from a load
// issued shortly before issues slowly; bwn_lut.h measured 1.4 lookups/cycle loaded just before
// use, 1.5 one row ahead, 1.7 with an xmm ring three rows ahead): NB = 16 or 4 (AVX-512), the
// 16 bytes / the dword of a row in an xmm ring kLutAhead rows ahead; else (AVX2: the accumulators
// fill the 16 ymm) the qwords (a dword for NB <= 4) of the next row in GPRs. The loads ahead run
// past the last row, unclamped: the index buffer must have kLutAhead rows + 16 readable bytes
// after any block's last row (a qword read also covers up to 7 bytes past the block).
template <int NB, int R, int K, int64_t kTab, int64_t kUStride, int64_t kRStride = kTab, class E>
KDBNN_LC_INL void lut_lookups(typename V::T (&a)[NB][R], const E* T, int64_t nu, const uint8_t* ir, int64_t co_pad) {
  if constexpr (NB == 16 || NB == 4 || (NB == 8 && R > 1)) {
    constexpr int D = kLutAhead;
    auto ld = [](const uint8_t* p) {
      if constexpr (NB == 16) return _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
      else if constexpr (NB == 8) return _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
      else return _mm_loadu_si32(p);
    };
    __m128i ring[D];
#pragma GCC unroll 4
    for (int d = 0; d < D; ++d, ir += co_pad) ring[d] = ld(ir);
    for (int64_t u = 0; u < nu; ++u, T += kUStride) {
#pragma GCC unroll 5
      for (int k = 0; k < K; ++k, ir += co_pad) {
        const __m128i v = ring[0];
#pragma GCC unroll 4
        for (int d = 0; d + 1 < D; ++d) ring[d] = ring[d + 1];
        ring[D - 1] = ld(ir);
        if constexpr (NB == 8) {
          lut_add_q<NB, R, kRStride>(a, T + k * kTab, (uint64_t)_mm_cvtsi128_si64(v), 0, 8);
        } else if constexpr (NB == 16) {
          lut_add_q<NB, R, kRStride>(a, T + k * kTab, (uint64_t)_mm_cvtsi128_si64(v), 0, 8);
          lut_add_q<NB, R, kRStride>(a, T + k * kTab, (uint64_t)_mm_extract_epi64(v, 1), 8, 16);
        } else {
          lut_add_q<NB, R, kRStride>(a, T + k * kTab, (uint32_t)_mm_cvtsi128_si32(v), 0, 4);
        }
      }
    }
  } else {
    constexpr int NQ = (NB + 7) / 8;
    auto ld = [](const uint8_t* p, uint64_t* d) {
      if constexpr (NB <= 4) {
        uint32_t w;
        std::memcpy(&w, p, 4);
        d[0] = w;
      } else {
        std::memcpy(d, p, 8 * NQ);
      }
    };
    uint64_t q[NQ];
    ld(ir, q);
    for (int64_t u = 0; u < nu; ++u, T += kUStride) {
#pragma GCC unroll 5
      for (int k = 0; k < K; ++k) {
        uint64_t qn[NQ];
        ir += co_pad;
        ld(ir, qn);
#pragma GCC unroll 4
        for (int w = 0; w < NQ; ++w) lut_add_q<NB, R, kRStride>(a, T + k * kTab, q[w], 8 * w, std::min(NB, 8 * w + 8));
#pragma GCC unroll 4
        for (int w = 0; w < NQ; ++w) q[w] = qn[w];
      }
    }
  }
}

// r4: the lookups of nu pass units (NV = kR + KW - 1 tables each, index rows u * KW + kw).
template <int NB, int KW, int64_t kTab, class E>
KDBNN_LC_INL void lut_r4_lookups(typename V::T (&a)[NB][kR], const E* T, int64_t nu, const uint8_t* ir,
                                 int64_t co_pad) {
  lut_lookups<NB, kR, KW, kTab, (kR + KW - 1) * kTab>(a, T, nu, ir, co_pad);
}

// ---------------------------------------------------------------- work items
// The (tile, output-channel chunk) work items of a range (lut_split.h): item t is tile
// t / n_chunks for channels [co_b, co_e), co_b = (t % n_chunks) * co_chunk.
struct LutItems {
  int64_t co_pad, co_chunk, n_chunks;
  int64_t planned = -1;  // the tile of the previous item
  LutItems(int64_t co_pad_, int64_t co_chunk_)
      : co_pad(co_pad_), co_chunk(co_chunk_), n_chunks((co_pad_ + co_chunk_ - 1) / co_chunk_) {}
  // item t's tile and channels; true when its tile differs from the previous item's (plan it)
  KDBNN_LC_INL bool at(int64_t t, int64_t& tile, int64_t& co_b, int64_t& co_e) {
    tile = t / n_chunks, co_b = t % n_chunks * co_chunk;
    co_e = std::min(co_pad, co_b + co_chunk);
    if (tile == planned) return false;
    planned = tile;
    return true;
  }
};

// ---------------------------------------------------------------- index preparation
// The packed weight words (C_out, KK, nw) of channels o0..o0+L-1 at tap kk as 32-bit halves,
// w32[k * L + e] = half k of channel o0 + e; channels e >= n_ok read 0.
template <int L>
KDBNN_LC_INL void lut_gather_words(const uint64_t* wp, int64_t KK, int64_t kk, int64_t nw, int64_t o0, int64_t n_ok,
                                   uint32_t* w32) {
  for (int e = 0; e < L; ++e) {
    const uint64_t* src = wp + ((o0 + e) * KK + kk) * nw;
    const bool ok = e < n_ok;
    for (int64_t wi = 0; wi < nw; ++wi) {
      const uint64_t w = ok ? src[wi] : 0ULL;
      w32[(2 * wi) * L + e] = (uint32_t)w, w32[(2 * wi + 1) * L + e] = (uint32_t)(w >> 32);
    }
  }
}
