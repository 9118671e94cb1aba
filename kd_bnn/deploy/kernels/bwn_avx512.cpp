// kd_bnn kernels: AVX-512 lookup-table BWN conv (the avx512 path of bwn_conv).
//
// The method (g-bit sign-sum tables, passes, pipelined builds, in-place input) is in bwn_lut.h;
// this file supplies its 16-pixel vector: one zmm, so a table entry is one 64-byte line and each
// lookup is one `vaddps zmm, zmm, [table + s*64]` (16 pixels x g multiply-adds). 16 output
// channels per register block (16 zmm accumulators). Runs of the input use masked loads, which
// suppress faults on masked lanes, so row ends and padding need no padded copy.
// Needs AVX-512F (and the AVX2/FMA every AVX-512 CPU has); dispatch.cpp selects it when the CPU
// has AVX-512F/BW. The whole file is empty on a non-x86 build.

#include "dispatch.h"

#if KDBNN_X86

#include <climits>
#include <vector>

namespace kdbnn {

namespace {

#define KDBNN_LUT_FN __attribute__((target("avx512f,avx512bw,avx2,fma")))
#define KDBNN_LUT_INL __attribute__((target("avx512f,avx512bw,avx2,fma"), always_inline)) inline

struct V {
  using T = __m512;
  using M = __mmask16;
  static constexpr int kNB = 16;   // output channels per register block
  static constexpr int kStep = 8;  // c_out is padded to 8: tail blocks of 8
  // rows kernel (bwn_lut.h, rows_lookups): offsets loaded 3 rows ahead via an xmm ring; 8 channels
  // per register block (R = 2, 3: 16 or 24 accumulators)
  static constexpr bool kOffRing = true;
  static constexpr int nb_rows(int) { return 8; }
  KDBNN_LUT_INL static M mask(uint32_t bits) { return (M)bits; }
  KDBNN_LUT_INL static T zero() { return _mm512_setzero_ps(); }
  KDBNN_LUT_INL static T load(const float* p) { return _mm512_load_ps(p); }
  KDBNN_LUT_INL static T loadu(const float* p) { return _mm512_loadu_ps(p); }
  KDBNN_LUT_INL static void store(float* p, T v) { _mm512_store_ps(p, v); }
  KDBNN_LUT_INL static void storeu(float* p, T v) { _mm512_storeu_ps(p, v); }
  KDBNN_LUT_INL static void store_mask(float* p, M m, T v) { _mm512_mask_storeu_ps(p, m, v); }
  KDBNN_LUT_INL static T add(T a, T b) { return _mm512_add_ps(a, b); }
  KDBNN_LUT_INL static T sub(T a, T b) { return _mm512_sub_ps(a, b); }
  // a + b on the FMA pipes (a * 1 + b: exact, the same value as add)
  KDBNN_LUT_INL static T add_fma(T a, T b) { return _mm512_fmadd_ps(a, _mm512_set1_ps(1.0f), b); }
  KDBNN_LUT_INL static T neg(T a) {
    return _mm512_castsi512_ps(_mm512_xor_si512(_mm512_castps_si512(a), _mm512_set1_epi32(INT_MIN)));
  }
  // lanes of run r from p + base[r] (masked: other lanes are not read), 0 elsewhere
  KDBNN_LUT_INL static T load_runs(const float* p, const M* m, const int64_t* base, int nr) {
    T v = _mm512_maskz_loadu_ps(m[0], p + base[0]);
    for (int r = 1; r < nr; ++r) v = _mm512_mask_loadu_ps(v, m[r], p + base[r]);
    return v;
  }
  KDBNN_LUT_INL static T gather(const float* p, const int32_t* pos, M valid) {
    return _mm512_mask_i32gather_ps(_mm512_setzero_ps(), valid, _mm512_load_si512(pos), p, 4);
  }
  // index preparation (bwn_lut.h, lut_prep_idx): the G-bit fields at bit `bit` of 16 channels'
  // words (w32[k * 16 + lane]) as offsets field * 8, the first n (8 or 16) stored to dst
  static constexpr int kPrepLanes = 16;
  template <int G, class I>
  KDBNN_LUT_INL static void prep_fields(const uint32_t* w32, int64_t nk, int64_t bit, I* dst, int n) {
    const int64_t k = bit >> 5;
    const int sh = (int)(bit & 31);
    __m512i v = _mm512_srl_epi32(_mm512_loadu_si512(w32 + 16 * k), _mm_cvtsi32_si128(sh));
    if (sh > 32 - G && k + 1 < nk)
      v = _mm512_or_si512(v, _mm512_sll_epi32(_mm512_loadu_si512(w32 + 16 * (k + 1)), _mm_cvtsi32_si128(32 - sh)));
    v = _mm512_slli_epi32(_mm512_and_si512(v, _mm512_set1_epi32((1 << G) - 1)), 3);
    const __mmask16 m = n == 16 ? (__mmask16)0xFFFF : (__mmask16)0x00FF;
    if constexpr (sizeof(I) == 2) _mm512_mask_cvtepi32_storeu_epi16(dst, m, v);
    else _mm512_mask_cvtepi32_storeu_epi8(dst, m, v);
  }
  // r4 kernel (bwn_lut.h): from a[0..4] = p[0..79] (a[4] read only if NV > 4), out[r] lane l =
  // p[4l + r] for r < 4, and out[4 + k] lane l = p[4l + 4 + k]
  static constexpr int kNB4 = 4;  // channels per register block: 4 x 4 accumulators
  template <int NV>
  KDBNN_LUT_INL static void deint(const T* a, T* out) {
    const __m512i j0 = _mm512_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28, 1, 5, 9, 13, 17, 21, 25, 29);
    const __m512i j1 = _mm512_setr_epi32(2, 6, 10, 14, 18, 22, 26, 30, 3, 7, 11, 15, 19, 23, 27, 31);
    const __m512 t0 = _mm512_permutex2var_ps(a[0], j0, a[1]), t1 = _mm512_permutex2var_ps(a[0], j1, a[1]);
    const __m512 t2 = _mm512_permutex2var_ps(a[2], j0, a[3]), t3 = _mm512_permutex2var_ps(a[2], j1, a[3]);
    out[0] = _mm512_shuffle_f32x4(t0, t2, 0x44), out[1] = _mm512_shuffle_f32x4(t0, t2, 0xEE);
    out[2] = _mm512_shuffle_f32x4(t1, t3, 0x44), out[3] = _mm512_shuffle_f32x4(t1, t3, 0xEE);
    if constexpr (NV > 4) {
      const __m512i a4 = _mm512_castps_si512(a[4]);
#pragma GCC unroll 4
      for (int k = 0; k < NV - 4; ++k) {
        // lane l: out[k] lane l + 1; lane 15: p[64 + k]
        const __m512i hi = k == 0 ? a4 : _mm512_alignr_epi32(a4, a4, k);
        out[4 + k] = _mm512_castsi512_ps(_mm512_alignr_epi32(hi, _mm512_castps_si512(out[k]), 1));
      }
    }
  }
  // inverse: y[m] lane i = a[i % 4] lane 4m + i / 4 (positions 16m + i)
  KDBNN_LUT_INL static void inter(const T* a, T* y) {
    const __m512 t0 = _mm512_shuffle_f32x4(a[0], a[1], 0x44), t1 = _mm512_shuffle_f32x4(a[2], a[3], 0x44);
    const __m512 t2 = _mm512_shuffle_f32x4(a[0], a[1], 0xEE), t3 = _mm512_shuffle_f32x4(a[2], a[3], 0xEE);
    const __m512i k0 = _mm512_setr_epi32(0, 8, 16, 24, 1, 9, 17, 25, 2, 10, 18, 26, 3, 11, 19, 27);
    const __m512i k1 = _mm512_add_epi32(k0, _mm512_set1_epi32(4));
    y[0] = _mm512_permutex2var_ps(t0, k0, t1), y[1] = _mm512_permutex2var_ps(t0, k1, t1);
    y[2] = _mm512_permutex2var_ps(t2, k0, t3), y[3] = _mm512_permutex2var_ps(t2, k1, t3);
  }
  // alpha * acc + bias, then the activation (leaky: max(y, 0) + 0.1 * min(y, 0))
  KDBNN_LUT_INL static T epi(T acc, float alpha, float bias, int64_t act) {
    T y = _mm512_fmadd_ps(acc, _mm512_set1_ps(alpha), _mm512_set1_ps(bias));
    if (act == ACT_RELU) {
      y = _mm512_max_ps(y, _mm512_setzero_ps());
    } else if (act == ACT_LEAKY) {
      const T z = _mm512_setzero_ps();
      y = _mm512_add_ps(_mm512_max_ps(y, z), _mm512_mul_ps(_mm512_set1_ps(0.1f), _mm512_min_ps(y, z)));
    }
    return y;
  }
};

#include "bwn_lut.h"

#undef KDBNN_LUT_INL
#undef KDBNN_LUT_FN

}  // namespace

const BwnLutKernel kBwnLutAvx512 = {lut_range, lut_prep_idx, lut_plan, lut_combine};

}  // namespace kdbnn

#endif  // KDBNN_X86
