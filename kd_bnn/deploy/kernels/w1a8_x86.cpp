// kd_bnn kernels: AVX2 W1A8 lookup-table conv (the avx2 path of w1a8_conv).
//
// The method and the exactness argument are in w1a8_lut.h; this file supplies its 32-position
// vector as two ymm of int16, so a table entry is one 64-byte line read by two `vpaddw ymm` per
// lookup. 6 output channels per register block (12 ymm accumulators of the 16). Full output runs
// are stored directly, partial ones through a small buffer (AVX2 has no byte-masked store).
// Compiled without FMA in its target, and the product kept in a register before the bias add, so
// the epilogue is never contracted. Empty on a non-x86 build.

#include "w1a8.h"

#if KDBNN_X86

#include <vector>

namespace kdbnn {

namespace {

#define KDBNN_W8_FN __attribute__((target("avx2")))
#define KDBNN_W8_INL __attribute__((target("avx2"), always_inline)) inline

struct V {
  struct T {
    __m256i a, b;
  };
  static constexpr int kNB = 6;     // output channels per register block
  static constexpr int kStep = 2;   // c_out is padded to 8: tail blocks of 2 or 4
  static constexpr int kPrepCh = 8; // index preparation: channels per step
  KDBNN_W8_INL static T zero() { return {_mm256_setzero_si256(), _mm256_setzero_si256()}; }
  KDBNN_W8_INL static T load(const int16_t* p) {
    return {_mm256_load_si256(reinterpret_cast<const __m256i*>(p)), _mm256_load_si256(reinterpret_cast<const __m256i*>(p + 16))};
  }
  KDBNN_W8_INL static void store(int16_t* p, T v) {
    _mm256_store_si256(reinterpret_cast<__m256i*>(p), v.a);
    _mm256_store_si256(reinterpret_cast<__m256i*>(p + 16), v.b);
  }
  KDBNN_W8_INL static T add(T x, T y) { return {_mm256_add_epi16(x.a, y.a), _mm256_add_epi16(x.b, y.b)}; }
  KDBNN_W8_INL static T sub(T x, T y) { return {_mm256_sub_epi16(x.a, y.a), _mm256_sub_epi16(x.b, y.b)}; }
  KDBNN_W8_INL static T neg(T x) { return sub(zero(), x); }
  KDBNN_W8_INL static T load_x(const int8_t* p) {
    return {_mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))),
            _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 16)))};
  }
  // the 4 int32 vectors (positions 0-7, 8-15, 16-23, 24-31) of a
  KDBNN_W8_INL static void widen(T a, __m256i* w) {
    w[0] = _mm256_cvtepi16_epi32(_mm256_castsi256_si128(a.a));
    w[1] = _mm256_cvtepi16_epi32(_mm256_extracti128_si256(a.a, 1));
    w[2] = _mm256_cvtepi16_epi32(_mm256_castsi256_si128(a.b));
    w[3] = _mm256_cvtepi16_epi32(_mm256_extracti128_si256(a.b, 1));
  }
  KDBNN_W8_INL static void widen_store(int32_t* b, T a) {
    __m256i w[4];
    widen(a, w);
#pragma GCC unroll 4
    for (int i = 0; i < 4; ++i) _mm256_store_si256(reinterpret_cast<__m256i*>(b + 8 * i), w[i]);
  }
  KDBNN_W8_INL static void widen_add(int32_t* b, T a) {
    __m256i w[4];
    widen(a, w);
#pragma GCC unroll 4
    for (int i = 0; i < 4; ++i) {
      __m256i* p = reinterpret_cast<__m256i*>(b + 8 * i);
      _mm256_store_si256(p, _mm256_add_epi32(_mm256_load_si256(p), w[i]));
    }
  }
  KDBNN_W8_INL static __m256 transform(__m256i acc, __m256 sc, __m256 bi, int64_t act) {
    __m256 y = _mm256_mul_ps(_mm256_cvtepi32_ps(acc), sc);
    __asm__("" : "+x"(y));
    y = _mm256_add_ps(y, bi);
    const __m256 z = _mm256_setzero_ps();
    if (act == ACT_RELU) {
      y = _mm256_max_ps(y, z);
    } else if (act == ACT_LEAKY) {
      const __m256 pos = _mm256_cmp_ps(y, z, _CMP_GT_OQ);
      y = _mm256_blendv_ps(_mm256_mul_ps(y, _mm256_set1_ps(0.1f)), y, pos);
    }
    return y;
  }
  KDBNN_W8_INL static __m256i quant(__m256 y, __m256 inv) {
    __m256 z = _mm256_mul_ps(y, inv);
    z = _mm256_min_ps(_mm256_max_ps(z, _mm256_set1_ps(-127.0f)), _mm256_set1_ps(127.0f));
    return _mm256_cvtps_epi32(z);
  }
  KDBNN_W8_INL static void epi(const int32_t* b, T a, float sc, float bi, int64_t act, int64_t quant_out, float inv,
                               void* O, int64_t ooff, const W8OutPlan& op) {
    __m256i w[4];
    widen(a, w);
    if (b != nullptr) {
#pragma GCC unroll 4
      for (int i = 0; i < 4; ++i) w[i] = _mm256_add_epi32(w[i], _mm256_load_si256(reinterpret_cast<const __m256i*>(b + 8 * i)));
    }
    const __m256 vs = _mm256_set1_ps(sc), vb = _mm256_set1_ps(bi);
    __m256 y[4];
#pragma GCC unroll 4
    for (int i = 0; i < 4; ++i) y[i] = transform(w[i], vs, vb, act);
    if (quant_out) {
      const __m256 vi = _mm256_set1_ps(inv);
      const __m256i q0 = quant(y[0], vi), q1 = quant(y[1], vi), q2 = quant(y[2], vi), q3 = quant(y[3], vi);
      const __m256i h0 = _mm256_permute4x64_epi64(_mm256_packs_epi32(q0, q1), 0xD8);  // positions 0-15
      const __m256i h1 = _mm256_permute4x64_epi64(_mm256_packs_epi32(q2, q3), 0xD8);  // 16-31
      const __m256i q = _mm256_permute4x64_epi64(_mm256_packs_epi16(h0, h1), 0xD8);
      int8_t* dst = static_cast<int8_t*>(O) + ooff;
      if (op.full) {
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + op.base[0]), q);
        return;
      }
      alignas(32) int8_t buf[kW8Px];
      _mm256_store_si256(reinterpret_cast<__m256i*>(buf), q);
      for (int r = 0; r < op.nr; ++r) {
        const int l0 = __builtin_ctz(op.bits[r]), len = __builtin_popcount(op.bits[r]);
        std::memcpy(dst + op.base[r] + l0, buf + l0, (size_t)len);
      }
    } else {
      float* dst = static_cast<float*>(O) + ooff;
      if (op.full) {
#pragma GCC unroll 4
        for (int i = 0; i < 4; ++i) _mm256_storeu_ps(dst + op.base[0] + 8 * i, y[i]);
        return;
      }
      alignas(32) float buf[kW8Px];
#pragma GCC unroll 4
      for (int i = 0; i < 4; ++i) _mm256_store_ps(buf + 8 * i, y[i]);
      for (int r = 0; r < op.nr; ++r) {
        const int l0 = __builtin_ctz(op.bits[r]), len = __builtin_popcount(op.bits[r]);
        std::memcpy(dst + op.base[r] + l0, buf + l0, sizeof(float) * (size_t)len);
      }
    }
  }
  // bytes 8 * (g bits of channel e from bit sh of w[e], continued in next[e] when non-null), for
  // the 8 channels e
  KDBNN_W8_INL static void prep(const uint32_t* w, const uint32_t* next, int sh, int g, uint8_t* dst, int /*nc: 8*/) {
    __m256i v = _mm256_srl_epi32(_mm256_load_si256(reinterpret_cast<const __m256i*>(w)), _mm_cvtsi32_si128(sh));
    if (next != nullptr)
      v = _mm256_or_si256(v, _mm256_sll_epi32(_mm256_load_si256(reinterpret_cast<const __m256i*>(next)), _mm_cvtsi32_si128(32 - sh)));
    v = _mm256_slli_epi32(_mm256_and_si256(v, _mm256_set1_epi32((1 << g) - 1)), 3);
    const __m256i p = _mm256_packus_epi32(v, v);  // 16-bit: [v0..v3 v0..v3 | v4..v7 v4..v7]
    const __m256i q = _mm256_packus_epi16(p, p);  // bytes: [v0..v3 x4 | v4..v7 x4]
    const __m256i r = _mm256_permutevar8x32_epi32(q, _mm256_setr_epi32(0, 4, 0, 0, 0, 0, 0, 0));
    _mm_storel_epi64(reinterpret_cast<__m128i*>(dst), _mm256_castsi256_si128(r));
  }
};

#include "w1a8_lut.h"

#undef KDBNN_W8_INL
#undef KDBNN_W8_FN

// As the avx512 path without r4: 5-input tables (12 per pass) for >= 256 output channels, else
// 4-input tables (21 per pass: int16 windows of 3 passes). Measured (ms, 1 thread): 64->64 @80
// g4/pg21 0.842, g4/pg32 0.886, g5/pg12 0.94; 128->128 @40 g4/pg21 0.771, g5/pg12 0.778;
// 256->256 @20 g5/pg12 0.743, g4/pg21 0.778.
void plan_avx2(W8Args& A) {
  A.g = A.c_out >= 256 ? 5 : 4;
  A.pg = A.g == 5 ? 12 : 21;
}

}  // namespace

const W1a8Kernel kW1a8Avx2 = {w8_range, w8_prep_idx, plan_avx2, false};

__attribute__((target("avx2"))) void quantize_avx2(const float* x, int64_t n, float inv, int8_t* q) {
  const __m256 vi = _mm256_set1_ps(inv), lo = _mm256_set1_ps(-127.0f), hi = _mm256_set1_ps(127.0f);
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m256 z0 = _mm256_min_ps(_mm256_max_ps(_mm256_mul_ps(_mm256_loadu_ps(x + i), vi), lo), hi);
    const __m256 z1 = _mm256_min_ps(_mm256_max_ps(_mm256_mul_ps(_mm256_loadu_ps(x + i + 8), vi), lo), hi);
    const __m256i w = _mm256_permute4x64_epi64(_mm256_packs_epi32(_mm256_cvtps_epi32(z0), _mm256_cvtps_epi32(z1)), 0xD8);
    const __m128i b = _mm_packs_epi16(_mm256_castsi256_si128(w), _mm256_extracti128_si256(w, 1));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q + i), b);
  }
  for (; i < n; ++i) q[i] = w8_quant1(x[i], inv);
}

}  // namespace kdbnn

#endif  // KDBNN_X86
