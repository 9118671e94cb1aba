// kd_bnn kernels: the stem conv's register tile and row loop, written once over a vector type.
//
// Included (no include guard) inside the namespace of each ISA's stem code: stem.cpp (portable
// V4) and stem_x86.cpp (once per ISA pass), after the includer defines
//   KDBNN_STEM_TILE_INL  the tile's attributes (that ISA's target, always_inline)
//   KDBNN_STEM_TILE_FN   the row's attributes (that ISA's target)
// V provides T (one vector of L floats), zero, loadu, set1, madd(a, b, c) = a * b + c (fused
// where the ISA has FMA), store_act(p, acc, bias, act, n) (bias, activation, the first n lanes).
// Layout of the phase rows and weights: dispatch.h, StemRow.

// CB channels x NV vectors of outputs from column ow0 (the last vector stores `nlast` lanes);
// nc: valid channels from this block's first (only the first min(nc, CB) are stored). CB x NV
// accumulators stay in registers; per tap NV input vectors are loaded and each of the CB weights
// is broadcast once.
template <class V, int CB, int NV>
KDBNN_STEM_TILE_INL void stem_tile(const StemRow& r, const float* w, const float* bias, int64_t nc, float* out,
                                   int64_t ow0, int nlast) {
  typename V::T acc[CB][NV];
#pragma GCC unroll 8
  for (int j = 0; j < CB; ++j)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) acc[j][v] = V::zero();
  const float* base = r.buf + ow0;
  for (int64_t k = 0; k < r.K; ++k) {
    const float* s = base + r.off[k];
    const float* wk = w + k * CB;
    typename V::T x[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) x[v] = V::loadu(s + v * V::L);
#pragma GCC unroll 8
    for (int j = 0; j < CB; ++j) {
      const typename V::T b = V::set1(wk[j]);
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[j][v] = V::madd(x[v], b, acc[j][v]);
    }
  }
#pragma GCC unroll 8
  for (int j = 0; j < CB; ++j) {
    if (j < nc) {
      float* o = out + j * r.plane + ow0;
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) V::store_act(o + v * V::L, acc[j][v], bias[j], r.act, v == NV - 1 ? nlast : V::L);
    }
  }
}

// One output row for all channel blocks: tiles of NV vectors, then tiles of one vector for the tail.
template <class V, int CB, int NV>
KDBNN_STEM_TILE_FN void stem_row(const StemRow& r) {
  constexpr int T = NV * V::L;
  const int64_t wblk = r.K * CB;
  int64_t ow = 0;
  for (; ow + T <= r.OW; ow += T)
    for (int64_t b = 0; b < r.nb; ++b)
      stem_tile<V, CB, NV>(r, r.w + b * wblk, r.bias + b * CB, r.nc - b * CB, r.out + b * CB * r.plane, ow, V::L);
  for (; ow < r.OW; ow += V::L)
    for (int64_t b = 0; b < r.nb; ++b)
      stem_tile<V, CB, 1>(r, r.w + b * wblk, r.bias + b * CB, r.nc - b * CB, r.out + b * CB * r.plane, ow,
                          (int)std::min<int64_t>(V::L, r.OW - ow));
}
