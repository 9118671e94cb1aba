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
};

#include "w1a8_lut.h"

#undef KDBNN_W8_INL
#undef KDBNN_W8_FN

// Per layer (measured on Zen 5, 1 thread): g = 5 where >= 256 output channels amortize the
// 32-entry tables, else 4; 32 KB of tables per pass (32 x 1 KB or 16 x 2 KB), L1-resident.
void plan_avx512(W8Args& A) {
  A.g = A.c_out >= 256 ? 5 : 4;
  A.pg = A.g == 5 ? 16 : 32;
}

}  // namespace

const W1a8Kernel kW1a8Avx512 = {w8_range, w8_prep_idx, plan_avx512};

}  // namespace kdbnn

#endif  // KDBNN_X86
