// kd_bnn kernels: AVX2 lookup-table BWN conv (the avx2 path of bwn_conv).
//
// The method (g-bit sign-sum tables, passes, pipelined builds, in-place input) is in bwn_lut.h;
// this file supplies its 16-pixel vector as two ymm, so a table entry is one 64-byte line read by
// two `vaddps ymm` per lookup. 8 output channels per register block (all 16 ymm are
// accumulators). Input runs use vmaskmovps (no faults on masked lanes), strided inputs vgatherdps.
// The avx512 path has its own kernel (bwn_avx512.cpp). The whole file is empty on a non-x86 build.

#include "dispatch.h"

#if KDBNN_X86

#include <vector>

namespace kdbnn {

namespace {

#define KDBNN_LUT_FN __attribute__((target("avx2,fma")))
#define KDBNN_LUT_INL __attribute__((target("avx2,fma"), always_inline)) inline

struct V {
  struct T {
    __m256 a, b;
  };
  struct M {
    __m256i a, b;
  };
  // output channels per register block: 8 = all 16 ymm as accumulators (the lookups add from
  // memory, so no register is needed for the entries), one offset qword per table and no tail
  // blocks (c_out is padded to 8). Measured 1.5-3% faster than 6 channels (12 ymm) at 128->128
  // @40, 256@20 and 512@10 (Zen 5, 1 thread, interleaved A/B): 1/8 instead of 1/6 of the
  // accumulator loads and stores per pass, which compete with the table builds' stores.
  static constexpr int kNB = 8;
  static constexpr int kStep = 8;
  // rows kernel (bwn_lut.h, rows_lookups): offsets loaded one row ahead in a GPR; 4 channels per
  // register block for R = 2, 2 for R = 3 (8 or 6 accumulators = 16 or 12 ymm)
  static constexpr bool kOffRing = false;
  static constexpr int nb_rows(int R) { return R <= 2 ? 4 : 2; }
  KDBNN_LUT_INL static M mask(uint32_t bits) {
    const __m256i sel = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
    const __m256i lo = _mm256_set1_epi32((int)(bits & 255u)), hi = _mm256_set1_epi32((int)((bits >> 8) & 255u));
    return {_mm256_cmpeq_epi32(_mm256_and_si256(lo, sel), sel), _mm256_cmpeq_epi32(_mm256_and_si256(hi, sel), sel)};
  }
  KDBNN_LUT_INL static T zero() { return {_mm256_setzero_ps(), _mm256_setzero_ps()}; }
  KDBNN_LUT_INL static T load(const float* p) { return {_mm256_load_ps(p), _mm256_load_ps(p + 8)}; }
  KDBNN_LUT_INL static T loadu(const float* p) { return {_mm256_loadu_ps(p), _mm256_loadu_ps(p + 8)}; }
  KDBNN_LUT_INL static void store(float* p, T v) { _mm256_store_ps(p, v.a), _mm256_store_ps(p + 8, v.b); }
  KDBNN_LUT_INL static void storeu(float* p, T v) { _mm256_storeu_ps(p, v.a), _mm256_storeu_ps(p + 8, v.b); }
  KDBNN_LUT_INL static void store_mask(float* p, M m, T v) {
    _mm256_maskstore_ps(p, m.a, v.a), _mm256_maskstore_ps(p + 8, m.b, v.b);
  }
  KDBNN_LUT_INL static T add(T x, T y) { return {_mm256_add_ps(x.a, y.a), _mm256_add_ps(x.b, y.b)}; }
  KDBNN_LUT_INL static T sub(T x, T y) { return {_mm256_sub_ps(x.a, y.a), _mm256_sub_ps(x.b, y.b)}; }
  // x + y on the FMA pipes (x * 1 + y: exact, the same value as add)
  KDBNN_LUT_INL static T add_fma(T x, T y) {
    const __m256 one = _mm256_set1_ps(1.0f);
    return {_mm256_fmadd_ps(x.a, one, y.a), _mm256_fmadd_ps(x.b, one, y.b)};
  }
  KDBNN_LUT_INL static T neg(T x) {
    const __m256 s = _mm256_set1_ps(-0.0f);
    return {_mm256_xor_ps(x.a, s), _mm256_xor_ps(x.b, s)};
  }
  // lanes of run r from p + base[r] (vmaskmovps reads 0 elsewhere; runs are disjoint, OR merges)
  KDBNN_LUT_INL static T load_runs(const float* p, const M* m, const int64_t* base, int nr) {
    T v = {_mm256_maskload_ps(p + base[0], m[0].a), _mm256_maskload_ps(p + base[0] + 8, m[0].b)};
    for (int r = 1; r < nr; ++r) {
      v.a = _mm256_or_ps(v.a, _mm256_maskload_ps(p + base[r], m[r].a));
      v.b = _mm256_or_ps(v.b, _mm256_maskload_ps(p + base[r] + 8, m[r].b));
    }
    return v;
  }
  KDBNN_LUT_INL static T gather(const float* p, const int32_t* pos, M valid) {
    const __m256 z = _mm256_setzero_ps();
    return {_mm256_mask_i32gather_ps(z, p, _mm256_load_si256(reinterpret_cast<const __m256i*>(pos)),
                                     _mm256_castsi256_ps(valid.a), 4),
            _mm256_mask_i32gather_ps(z, p, _mm256_load_si256(reinterpret_cast<const __m256i*>(pos + 8)),
                                     _mm256_castsi256_ps(valid.b), 4)};
  }
  // index preparation (bwn_lut.h, lut_prep_idx): the G-bit fields at bit `bit` of 8 channels'
  // words (w32[k * 8 + lane]) as offsets field * 8, stored to dst[0..7]
  static constexpr int kPrepLanes = 8;
  template <int G, class I>
  KDBNN_LUT_INL static void prep_fields(const uint32_t* w32, int64_t nk, int64_t bit, I* dst, int) {
    const int64_t k = bit >> 5;
    const int sh = (int)(bit & 31);
    __m256i v = _mm256_srl_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w32 + 8 * k)), _mm_cvtsi32_si128(sh));
    if (sh > 32 - G && k + 1 < nk)
      v = _mm256_or_si256(v, _mm256_sll_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w32 + 8 * (k + 1))),
                                              _mm_cvtsi32_si128(32 - sh)));
    v = _mm256_slli_epi32(_mm256_and_si256(v, _mm256_set1_epi32((1 << G) - 1)), 3);
    const __m256i p = _mm256_packus_epi32(v, v);  // 16-bit: [v0..v3 v0..v3 | v4..v7 v4..v7]
    if constexpr (sizeof(I) == 2) {
      _mm_storeu_si128(reinterpret_cast<__m128i*>(dst), _mm256_castsi256_si128(_mm256_permute4x64_epi64(p, 0x08)));
    } else {
      const __m256i q = _mm256_packus_epi16(p, p);  // bytes: [v0..v3 x4 | v4..v7 x4]
      const __m256i r = _mm256_permutevar8x32_epi32(q, _mm256_setr_epi32(0, 4, 0, 0, 0, 0, 0, 0));
      _mm_storel_epi64(reinterpret_cast<__m128i*>(dst), _mm256_castsi256_si128(r));
    }
  }
  // r4 kernel (bwn_lut.h): from a[0..4] = p[0..79] (a[4] read only if NV > 4), out[r] lane l =
  // p[4l + r] for r < 4, and out[4 + k] lane l = p[4l + 4 + k]
  static constexpr int kNB4 = 1;  // channels per register block: 4 accumulators = 8 ymm
  // 8 lanes (l = 0..7) of the 4 streams of the 32 floats y[0..3]: 4x4 transposes in each 128-bit half
  KDBNN_LUT_INL static void deint8(const __m256* y, __m256* v) {
    const __m256 u0 = _mm256_permute2f128_ps(y[0], y[2], 0x20), u1 = _mm256_permute2f128_ps(y[0], y[2], 0x31);
    const __m256 u2 = _mm256_permute2f128_ps(y[1], y[3], 0x20), u3 = _mm256_permute2f128_ps(y[1], y[3], 0x31);
    const __m256 t0 = _mm256_unpacklo_ps(u0, u1), t1 = _mm256_unpackhi_ps(u0, u1);
    const __m256 t2 = _mm256_unpacklo_ps(u2, u3), t3 = _mm256_unpackhi_ps(u2, u3);
    v[0] = _mm256_shuffle_ps(t0, t2, 0x44), v[1] = _mm256_shuffle_ps(t0, t2, 0xEE);
    v[2] = _mm256_shuffle_ps(t1, t3, 0x44), v[3] = _mm256_shuffle_ps(t1, t3, 0xEE);
  }
  template <int NV>
  KDBNN_LUT_INL static void deint(const T* a, T* out) {
    const __m256 y[9] = {a[0].a, a[0].b, a[1].a, a[1].b, a[2].a, a[2].b, a[3].a, a[3].b,
                         NV > 4 ? a[4].a : _mm256_setzero_ps()};
    __m256 lo[4], hi[4];
    deint8(y, lo), deint8(y + 4, hi);
#pragma GCC unroll 4
    for (int r = 0; r < 4; ++r) out[r] = {lo[r], hi[r]};
    if constexpr (NV > 4) {  // the same streams one row of 4 later: p[4..67] (128-bit halves shifted)
      __m256 z[8];
#pragma GCC unroll 8
      for (int i = 0; i < 8; ++i) z[i] = _mm256_permute2f128_ps(y[i], y[i + 1], 0x21);
      deint8(z, lo), deint8(z + 4, hi);
#pragma GCC unroll 4
      for (int k = 0; k < NV - 4; ++k) out[4 + k] = {lo[k], hi[k]};
    }
  }
  // 8 positions-rows l of a[0..3] -> positions 4l..4l+3 (w[l] holds rows l and l + 4 of the half)
  KDBNN_LUT_INL static void inter(const T* a, T* y) {
#pragma GCC unroll 2
    for (int h = 0; h < 2; ++h) {
      const __m256 a0 = h ? a[0].b : a[0].a, a1 = h ? a[1].b : a[1].a, a2 = h ? a[2].b : a[2].a,
                   a3 = h ? a[3].b : a[3].a;
      const __m256 t0 = _mm256_unpacklo_ps(a0, a1), t1 = _mm256_unpackhi_ps(a0, a1);
      const __m256 t2 = _mm256_unpacklo_ps(a2, a3), t3 = _mm256_unpackhi_ps(a2, a3);
      const __m256 w0 = _mm256_shuffle_ps(t0, t2, 0x44), w1 = _mm256_shuffle_ps(t0, t2, 0xEE);
      const __m256 w2 = _mm256_shuffle_ps(t1, t3, 0x44), w3 = _mm256_shuffle_ps(t1, t3, 0xEE);
      y[2 * h] = {_mm256_permute2f128_ps(w0, w1, 0x20), _mm256_permute2f128_ps(w2, w3, 0x20)};
      y[2 * h + 1] = {_mm256_permute2f128_ps(w0, w1, 0x31), _mm256_permute2f128_ps(w2, w3, 0x31)};
    }
  }
  // alpha * acc + bias, then the activation (leaky: max(y, 0) + 0.1 * min(y, 0))
  KDBNN_LUT_INL static __m256 epi1(__m256 acc, __m256 al, __m256 bi, int64_t act) {
    __m256 y = _mm256_fmadd_ps(acc, al, bi);
    const __m256 z = _mm256_setzero_ps();
    if (act == ACT_RELU) y = _mm256_max_ps(y, z);
    else if (act == ACT_LEAKY) y = _mm256_add_ps(_mm256_max_ps(y, z), _mm256_mul_ps(_mm256_set1_ps(0.1f), _mm256_min_ps(y, z)));
    return y;
  }
  KDBNN_LUT_INL static T epi(T acc, float alpha, float bias, int64_t act) {
    const __m256 al = _mm256_set1_ps(alpha), bi = _mm256_set1_ps(bias);
    return {epi1(acc.a, al, bi, act), epi1(acc.b, al, bi, act)};
  }
};

#include "bwn_lut.h"

#undef KDBNN_LUT_INL
#undef KDBNN_LUT_FN

}  // namespace

const BwnLutKernel kBwnLutAvx2 = {lut_range, lut_prep_idx, lut_plan, lut_combine};

}  // namespace kdbnn

#endif  // KDBNN_X86
