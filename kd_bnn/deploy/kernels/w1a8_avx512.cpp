// kd_bnn kernels: AVX-512 W1A8 lookup-table conv (the avx512 path of w1a8_conv).
//
// The method and the exactness argument are in w1a8_lut.h; this file supplies its 32-position
// vector: one zmm of int16, so a table entry is one 64-byte line and each lookup is one
// `vpaddw zmm, zmm, [table + s*64]` (32 positions x 4 multiply-adds). 16 output channels per
// register block. Output runs use masked stores (AVX-512BW/VL), which suppress faults on masked
// lanes. Needs AVX-512F/BW/VL; w1a8.cpp selects it when the CPU has them. Empty on a non-x86 build.

#include "w1a8.h"

#if KDBNN_X86

#include <vector>

namespace kdbnn {

namespace {

#define KDBNN_W8_FN __attribute__((target("avx512f,avx512bw,avx512vl,avx2")))
#define KDBNN_W8_INL __attribute__((target("avx512f,avx512bw,avx512vl,avx2"), always_inline)) inline

struct V {
  using T = __m512i;
  static constexpr int kNB = 16;     // output channels per register block
  static constexpr int kStep = 8;    // c_out is padded to 8: tail blocks of 8
  static constexpr int kPrepCh = 16; // index preparation: channels per step
  KDBNN_W8_INL static T zero() { return _mm512_setzero_si512(); }
  KDBNN_W8_INL static T load(const int16_t* p) { return _mm512_load_si512(p); }
  KDBNN_W8_INL static void store(int16_t* p, T v) { _mm512_store_si512(p, v); }
  KDBNN_W8_INL static T add(T a, T b) { return _mm512_add_epi16(a, b); }
  KDBNN_W8_INL static T sub(T a, T b) { return _mm512_sub_epi16(a, b); }
  KDBNN_W8_INL static T neg(T a) { return sub(zero(), a); }
  KDBNN_W8_INL static T load_x(const int8_t* p) {
    return _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  }
  KDBNN_W8_INL static __m512i lo32(T a) { return _mm512_cvtepi16_epi32(_mm512_castsi512_si256(a)); }
  KDBNN_W8_INL static __m512i hi32(T a) { return _mm512_cvtepi16_epi32(_mm512_extracti64x4_epi64(a, 1)); }
  KDBNN_W8_INL static void widen_store(int32_t* b, T a) {
    _mm512_store_si512(b, lo32(a));
    _mm512_store_si512(b + 16, hi32(a));
  }
  KDBNN_W8_INL static void widen_add(int32_t* b, T a) {
    _mm512_store_si512(b, _mm512_add_epi32(_mm512_load_si512(b), lo32(a)));
    _mm512_store_si512(b + 16, _mm512_add_epi32(_mm512_load_si512(b + 16), hi32(a)));
  }
  // y = float(acc) * sc, then + bi (the product kept in a register: never fused), activation.
  KDBNN_W8_INL static __m512 transform(__m512i acc, __m512 sc, __m512 bi, int64_t act) {
    __m512 y = _mm512_mul_ps(_mm512_cvtepi32_ps(acc), sc);
    __asm__("" : "+v"(y));
    y = _mm512_add_ps(y, bi);
    const __m512 z = _mm512_setzero_ps();
    if (act == ACT_RELU) {
      y = _mm512_max_ps(y, z);
    } else if (act == ACT_LEAKY) {
      const __mmask16 pos = _mm512_cmp_ps_mask(y, z, _CMP_GT_OQ);
      y = _mm512_mask_blend_ps(pos, _mm512_mul_ps(y, _mm512_set1_ps(0.1f)), y);
    }
    return y;
  }
  // clamp(rint(y * inv), -127, 127) as 16 bytes (clamped in float: the same for all non-NaN y)
  KDBNN_W8_INL static __m128i quant(__m512 y, __m512 inv) {
    __m512 z = _mm512_mul_ps(y, inv);
    z = _mm512_min_ps(_mm512_max_ps(z, _mm512_set1_ps(-127.0f)), _mm512_set1_ps(127.0f));
    return _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(z));
  }
  KDBNN_W8_INL static void epi(const int32_t* b, T a, float sc, float bi, int64_t act, int64_t quant_out, float inv,
                               void* O, int64_t ooff, const W8OutPlan& op) {
    __m512i lo = lo32(a), hi = hi32(a);
    if (b != nullptr) lo = _mm512_add_epi32(lo, _mm512_load_si512(b)), hi = _mm512_add_epi32(hi, _mm512_load_si512(b + 16));
    const __m512 vs = _mm512_set1_ps(sc), vb = _mm512_set1_ps(bi);
    const __m512 ylo = transform(lo, vs, vb, act), yhi = transform(hi, vs, vb, act);
    if (quant_out) {
      const __m512 vi = _mm512_set1_ps(inv);
      const __m256i q = _mm256_inserti128_si256(_mm256_castsi128_si256(quant(ylo, vi)), quant(yhi, vi), 1);
      int8_t* dst = static_cast<int8_t*>(O) + ooff;
      if (op.full) {
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + op.base[0]), q);
      } else {
        for (int r = 0; r < op.nr; ++r) _mm256_mask_storeu_epi8(dst + op.base[r], (__mmask32)op.bits[r], q);
      }
    } else {
      float* dst = static_cast<float*>(O) + ooff;
      if (op.full) {
        _mm512_storeu_ps(dst + op.base[0], ylo);
        _mm512_storeu_ps(dst + op.base[0] + 16, yhi);
      } else {
        for (int r = 0; r < op.nr; ++r) {
          _mm512_mask_storeu_ps(dst + op.base[r], (__mmask16)(op.bits[r] & 0xFFFFu), ylo);
          _mm512_mask_storeu_ps(dst + op.base[r] + 16, (__mmask16)(op.bits[r] >> 16), yhi);
        }
      }
    }
  }
  // bytes 8 * (g bits of channel e from bit sh of w[e], continued in next[e] when non-null), for
  // the nc (8 or 16) channels e
  KDBNN_W8_INL static void prep(const uint32_t* w, const uint32_t* next, int sh, int g, uint8_t* dst, int nc) {
    __m512i v = _mm512_srl_epi32(_mm512_load_si512(w), _mm_cvtsi32_si128(sh));
    if (next != nullptr) v = _mm512_or_si512(v, _mm512_sll_epi32(_mm512_load_si512(next), _mm_cvtsi32_si128(32 - sh)));
    v = _mm512_slli_epi32(_mm512_and_si512(v, _mm512_set1_epi32((1 << g) - 1)), 3);
    const __m128i b = _mm512_cvtepi32_epi8(v);
    if (nc == 16) _mm_storeu_si128(reinterpret_cast<__m128i*>(dst), b);
    else _mm_storel_epi64(reinterpret_cast<__m128i*>(dst), b);
  }
  // ---- r4 kernel (w1a8_lut.h): 4 channels per register block (16 zmm of sums)
  static constexpr int kNB4 = 4;
  // ---- rows kernel (w1a8_lut.h): 8 channels x 2 vectors per register block
  static constexpr int kNBRows = 8;
  // out[v] lane l = p[4l + v], v < NV (<= 6): a 4x4 byte transpose per 128-bit lane (vpshufb),
  // then dword gathers across two registers (vpermt2d); AVX-512F/BW only.
  template <int NV>
  KDBNN_W8_INL static void deint(const int8_t* p, T* out) {
    const __m512i S = _mm512_broadcast_i32x4(_mm_setr_epi8(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15));
    const __m512i I01 = _mm512_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28, 1, 5, 9, 13, 17, 21, 25, 29);
    const __m512i I23 = _mm512_setr_epi32(2, 6, 10, 14, 18, 22, 26, 30, 3, 7, 11, 15, 19, 23, 27, 31);
    const __m512i a = _mm512_shuffle_epi8(_mm512_loadu_si512(p), S), b = _mm512_shuffle_epi8(_mm512_loadu_si512(p + 64), S);
    const __m512i r01 = _mm512_permutex2var_epi32(a, I01, b), r23 = _mm512_permutex2var_epi32(a, I23, b);
    out[0] = lo_x(r01), out[1] = hi_x(r01), out[2] = lo_x(r23), out[3] = hi_x(r23);
    if constexpr (NV > 4) {  // the same streams one lane later
      const __m512i c = _mm512_shuffle_epi8(_mm512_loadu_si512(p + 4), S), d = _mm512_shuffle_epi8(_mm512_loadu_si512(p + 68), S);
      const __m512i r45 = _mm512_permutex2var_epi32(c, I01, d);
      out[4] = lo_x(r45);
      if constexpr (NV > 5) out[5] = hi_x(r45);
    }
  }
  KDBNN_W8_INL static T lo_x(__m512i v) { return _mm512_cvtepi8_epi16(_mm512_castsi512_si256(v)); }
  KDBNN_W8_INL static T hi_x(__m512i v) { return _mm512_cvtepi8_epi16(_mm512_extracti64x4_epi64(v, 1)); }
  // The epilogue of one channel of an r4 tile: a[r] lane l = position 4l + r (+ the int32 sums b).
  KDBNN_W8_INL static void epi4(const int32_t* b, const T* a, float sc, float bi, int64_t act, int64_t quant_out,
                                float inv, void* O, int64_t ooff, const R4OutPlan& op) {
    const __m512 vs = _mm512_set1_ps(sc), vb = _mm512_set1_ps(bi), vi = _mm512_set1_ps(inv);
    __m512 f[4][2];
#pragma GCC unroll 4
    for (int r = 0; r < 4; ++r) {
      __m512i lo = lo32(a[r]), hi = hi32(a[r]);
      if (b != nullptr)
        lo = _mm512_add_epi32(lo, _mm512_load_si512(b + r * 32)), hi = _mm512_add_epi32(hi, _mm512_load_si512(b + r * 32 + 16));
      f[r][0] = transform(lo, vs, vb, act), f[r][1] = transform(hi, vs, vb, act);
    }
    // output vector m = 4h + k, lane i (position 16m + i) = f[i % 4][h] lane 4k + i / 4
    const __m512i q4 = _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3);
    const __m512i j1 = _mm512_setr_epi32(0, 16, 0, 0, 0, 16, 0, 0, 0, 16, 0, 0, 0, 16, 0, 0);
    const __m512i j3 = _mm512_setr_epi32(0, 0, 0, 16, 0, 0, 0, 16, 0, 0, 0, 16, 0, 0, 0, 16);
#pragma GCC unroll 2
    for (int h = 0; h < 2; ++h) {
#pragma GCC unroll 4
      for (int k = 0; k < 4; ++k) {
        const int m = 4 * h + k;
        if (op.nr[m] == 0) continue;
        const __m512i base = _mm512_add_epi32(q4, _mm512_set1_epi32(4 * k));
        const __m512 b01 = _mm512_permutex2var_ps(f[0][h], _mm512_add_epi32(base, j1), f[1][h]);
        const __m512 b23 = _mm512_permutex2var_ps(f[2][h], _mm512_add_epi32(base, j3), f[3][h]);
        const __m512 y = _mm512_mask_blend_ps((__mmask16)0xCCCC, b01, b23);
        if (quant_out) {
          const __m128i q = quant(y, vi);
          int8_t* dst = static_cast<int8_t*>(O) + ooff;
          if (op.full[m]) _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + op.base[m][0]), q);
          else
            for (int r = 0; r < op.nr[m]; ++r) _mm_mask_storeu_epi8(dst + op.base[m][r], (__mmask16)op.bits[m][r], q);
        } else {
          float* dst = static_cast<float*>(O) + ooff;
          if (op.full[m]) _mm512_storeu_ps(dst + op.base[m][0], y);
          else
            for (int r = 0; r < op.nr[m]; ++r) _mm512_mask_storeu_ps(dst + op.base[m][r], (__mmask16)op.bits[m][r], y);
        }
      }
    }
  }
};

#define KDBNN_W8_R4 1
#include "w1a8_lut.h"
#undef KDBNN_W8_R4

#undef KDBNN_W8_INL
#undef KDBNN_W8_FN

// Per layer (measured on Zen 5, 1 thread, interleaved A/B runs, with the offsets loaded ahead):
// 4-input tables, 21 per pass (21 KB, int16 windows of 3 passes = 63 entries, the int16 bound)
// below 256 output channels; 5-input tables, 12 per pass (24 KB, windows of 4 passes) from 256 on;
// the kw-sharing kernel (r4, 4-input tables, 4 units = 24 KB per pass) for stride-1 layers of
// <= 32 output channels on rows >= 64 wide, where building tables costs most next to the few
// lookups per table. Measured (ms): 64->64 @80 g4/pg21 0.529, g4/pg32 0.542, g5/pg12 0.586,
// r4 g4 0.546, r4 g5 0.571; 128->128 @40 g4/pg21 0.463, g5/pg12 0.478; 256->256 @20 g5/pg12 0.448,
// g4/pg21 0.453; 512->512 @10 g5/pg12 0.496, g4/pg21 0.524; 16->16 @320 r4 g4 1.09, g4/pg21 1.17,
// r4 g5 1.39; 32->32 @160 r4 g4 0.709, g4/pg21 0.716.
// The kh-sharing kernel (rows, 4-input tables, 2 units = 24 KB per pass) for 3x3 stride-1 layers of
// <= 128 output channels on rows >= 16 wide (before r4, which it beat at every shape it covers).
// Measured (ms, interleaved rounds): 128->128 @40 rows 0.40-0.43 vs g4/pg21 0.45-0.47, 64->64 @80
// 0.47-0.49 vs 0.52-0.55 (pg 3 units: 0.43 / 0.48), 32->32 @160 0.61-0.63 vs r4 0.69-0.73, 16->16
// @320 0.99-1.05 vs r4 1.10-1.13; 256->256 @20 0.44 vs g5/pg12 0.43-0.45 (not taken).
void plan_avx512(W8Args& A) {
  A.rows = w8_rows_ok(A) && A.c_out <= 128 && A.OW >= 16;
  A.r4 = !A.rows && w8_r4_ok(A) && A.c_out <= 32 && A.OW >= 64;
  A.g = !A.r4 && !A.rows && A.c_out >= 256 ? 5 : 4;
  A.pg = A.g == 5 ? 12 : 21;
  if (A.r4) A.pg = std::max<int64_t>(1, 24576 / ((A.KW + 3) * (int64_t(64) << A.g)));
  if (A.rows) A.pg = w8_rows_pg(A);
}

}  // namespace

const W1a8Kernel kW1a8Avx512 = {w8_range, w8_prep_idx, plan_avx512, true};

__attribute__((target("avx512f"))) void quantize_avx512(const float* x, int64_t n, float inv, int8_t* q) {
  const __m512 vi = _mm512_set1_ps(inv), lo = _mm512_set1_ps(-127.0f), hi = _mm512_set1_ps(127.0f);
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m512 z = _mm512_min_ps(_mm512_max_ps(_mm512_mul_ps(_mm512_loadu_ps(x + i), vi), lo), hi);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q + i), _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(z)));
  }
  for (; i < n; ++i) q[i] = w8_quant1(x[i], inv);
}

}  // namespace kdbnn

#endif  // KDBNN_X86
