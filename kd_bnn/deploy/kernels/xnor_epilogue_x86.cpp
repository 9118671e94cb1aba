// kd_bnn kernels: AVX2 epilogue of the XNOR conv (used by the avx2 and avx512 paths).
//
// The micro-kernel leaves popcounts of P pixels x 16 channels, pixel-major [p][16]; these
// functions (the XnorEpilogue of common.h) turn them into outputs 8 channels per instruction:
//   transform_px_avx2: counts [np][16] -> transformed floats [np][16], the same float ops in the
//     same order as transform16 in xnor.cpp (mul then add, no FMA: this file's functions are
//     compiled for "avx2" without "fma", so no contraction and results are bit-identical);
//   sign_mask_px_avx2 / bounds_mask_px_avx2: the sign bits of the transformed outputs for the
//     re-binarized (packed) output, by the float test or by per-channel popcount bounds
//     (sign_bounds in xnor.cpp);
//   write_rows_avx2: a pixel-major block src [i][16] (floats or int32 bits) -> `nc` NCHW channel
//     rows of `run` pixels, through 8x8 register transposes;
//   affine_px_avx2 (AVX2 + FMA CPUs): a per-channel fused multiply-add of the outputs, the form of
//     a BatchNorm after the conv (kernels.output_affine).
// The whole file is empty on a non-x86 build.

#include "dispatch.h"

#if KDBNN_X86

namespace kdbnn {

namespace {

// One 8-channel half (h = 0 or 1) of pixel p's transform: (K - 2*count) * scale + bias, then the
// activation; mul then add in transform16's order.
__attribute__((target("avx2"))) static inline __m256 transform8_avx2(const uint32_t* cnt, int64_t p, int h,
                                                                      float K, const float* sc,
                                                                      const float* bi, int64_t act) {
  const __m256 z = _mm256_setzero_ps();
  const __m256 c = _mm256_cvtepi32_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(cnt + p * kCoBlock + 8 * h)));
  __m256 y = _mm256_add_ps(_mm256_mul_ps(_mm256_sub_ps(_mm256_set1_ps(K), _mm256_mul_ps(_mm256_set1_ps(2.0f), c)),
                                         _mm256_loadu_ps(sc + 8 * h)),
                           _mm256_loadu_ps(bi + 8 * h));
  if (act == ACT_RELU) y = _mm256_max_ps(y, z);
  else if (act == ACT_LEAKY) y = _mm256_add_ps(_mm256_max_ps(y, z), _mm256_mul_ps(_mm256_set1_ps(0.1f), _mm256_min_ps(y, z)));
  return y;
}

__attribute__((target("avx2"))) void transform_px_avx2(const uint32_t* cnt, int64_t np, float K, const float* sc,
                                                       const float* bi, int64_t act, float* dst) {
  for (int64_t p = 0; p < np; ++p)
    for (int h = 0; h < 2; ++h) _mm256_storeu_ps(dst + p * kCoBlock + 8 * h, transform8_avx2(cnt, p, h, K, sc, bi, act));
}

// Bit c of masks[p] = lo[c] <= cnt[p][c] <= hi[c], 16 channels per pixel.
__attribute__((target("avx2"))) void bounds_mask_px_avx2(const uint32_t* cnt, int64_t np, const int32_t* lo,
                                                         const int32_t* hi, uint32_t* masks) {
  const __m256i l0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(lo)),
                l1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(lo + 8)),
                h0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(hi)),
                h1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(hi + 8));
  for (int64_t p = 0; p < np; ++p) {
    const __m256i c0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(cnt + p * kCoBlock));
    const __m256i c1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(cnt + p * kCoBlock + 8));
    const __m256i out0 = _mm256_or_si256(_mm256_cmpgt_epi32(l0, c0), _mm256_cmpgt_epi32(c0, h0));
    const __m256i out1 = _mm256_or_si256(_mm256_cmpgt_epi32(l1, c1), _mm256_cmpgt_epi32(c1, h1));
    const uint32_t m = (uint32_t)_mm256_movemask_ps(_mm256_castsi256_ps(out0)) |
                       ((uint32_t)_mm256_movemask_ps(_mm256_castsi256_ps(out1)) << 8);
    masks[p] = ~m & 0xFFFFu;
  }
}

// Sign mask of the transformed outputs of P pixels (bit c of word p: v[p][c] >= 0), for the
// packed (re-binarized) output; same float ops as transform16.
__attribute__((target("avx2"))) void sign_mask_px_avx2(const uint32_t* cnt, int64_t np, float K, const float* sc,
                                                       const float* bi, int64_t act, uint32_t* masks) {
  const __m256 z = _mm256_setzero_ps();
  for (int64_t p = 0; p < np; ++p) {
    uint32_t m = 0;
    for (int h = 0; h < 2; ++h)
      m |= (uint32_t)_mm256_movemask_ps(_mm256_cmp_ps(transform8_avx2(cnt, p, h, K, sc, bi, act), z, _CMP_GE_OQ))
           << (8 * h);
    masks[p] = m;
  }
}

// write_rows with the fused epilogue's row work: each row vector gets the residual's (same float
// add as y + r) before it is stored, and masks[i] (bit c: final value of channel c >= 0) collects
// the signs of the stored values; res and masks may each be null.
template <bool kRes, bool kMask>
__attribute__((target("avx2"))) static inline void write_rows_t(const float* src, int64_t run, int64_t nc, float* out,
                                                                int64_t plane, const float* res, uint32_t* masks) {
  int64_t i = 0;
  const __m256 z = _mm256_setzero_ps();
  for (; i + 8 <= run; i += 8) {
    __m256i acc = _mm256_setzero_si256();
    int64_t cg = 0;
    for (; cg + 8 <= nc; cg += 8) {
      const float* s = src + i * kCoBlock + cg;
      const __m256 r0 = _mm256_loadu_ps(s), r1 = _mm256_loadu_ps(s + 16), r2 = _mm256_loadu_ps(s + 32),
                   r3 = _mm256_loadu_ps(s + 48), r4 = _mm256_loadu_ps(s + 64), r5 = _mm256_loadu_ps(s + 80),
                   r6 = _mm256_loadu_ps(s + 96), r7 = _mm256_loadu_ps(s + 112);
      const __m256 t0 = _mm256_unpacklo_ps(r0, r1), t1 = _mm256_unpackhi_ps(r0, r1);
      const __m256 t2 = _mm256_unpacklo_ps(r2, r3), t3 = _mm256_unpackhi_ps(r2, r3);
      const __m256 t4 = _mm256_unpacklo_ps(r4, r5), t5 = _mm256_unpackhi_ps(r4, r5);
      const __m256 t6 = _mm256_unpacklo_ps(r6, r7), t7 = _mm256_unpackhi_ps(r6, r7);
      const __m256 u0 = _mm256_shuffle_ps(t0, t2, 0x44), u1 = _mm256_shuffle_ps(t0, t2, 0xEE);
      const __m256 u2 = _mm256_shuffle_ps(t1, t3, 0x44), u3 = _mm256_shuffle_ps(t1, t3, 0xEE);
      const __m256 u4 = _mm256_shuffle_ps(t4, t6, 0x44), u5 = _mm256_shuffle_ps(t4, t6, 0xEE);
      const __m256 u6 = _mm256_shuffle_ps(t5, t7, 0x44), u7 = _mm256_shuffle_ps(t5, t7, 0xEE);
      const __m256 rows[8] = {_mm256_permute2f128_ps(u0, u4, 0x20), _mm256_permute2f128_ps(u1, u5, 0x20),
                              _mm256_permute2f128_ps(u2, u6, 0x20), _mm256_permute2f128_ps(u3, u7, 0x20),
                              _mm256_permute2f128_ps(u0, u4, 0x31), _mm256_permute2f128_ps(u1, u5, 0x31),
                              _mm256_permute2f128_ps(u2, u6, 0x31), _mm256_permute2f128_ps(u3, u7, 0x31)};
      float* o = out + cg * plane + i;
      for (int j = 0; j < 8; ++j) {
        __m256 v = rows[j];
        if (kRes) v = _mm256_add_ps(v, _mm256_loadu_ps(res + (cg + j) * plane + i));
        _mm256_storeu_ps(o + j * plane, v);
        if (kMask)
          acc = _mm256_or_si256(acc, _mm256_and_si256(_mm256_castps_si256(_mm256_cmp_ps(v, z, _CMP_GE_OQ)),
                                                      _mm256_set1_epi32(1 << (cg + j))));
      }
    }
    if (kMask) _mm256_storeu_si256(reinterpret_cast<__m256i*>(masks + i), acc);
    for (; cg < nc; ++cg)  // channels past the last group of 8
      for (int64_t k = 0; k < 8; ++k) {
        float v = src[(i + k) * kCoBlock + cg];
        if (kRes) v = v + res[cg * plane + i + k];
        out[cg * plane + i + k] = v;
        if (kMask) masks[i + k] |= (uint32_t)(v >= 0.f) << cg;
      }
  }
  for (; i < run; ++i) {
    uint32_t m = 0;
    for (int64_t c = 0; c < nc; ++c) {
      float v = src[i * kCoBlock + c];
      if (kRes) v = v + res[c * plane + i];
      out[c * plane + i] = v;
      m |= (uint32_t)(v >= 0.f) << c;
    }
    if (kMask) masks[i] = m;
  }
}

__attribute__((target("avx2"))) void write_rows_ex_avx2(const float* src, int64_t run, int64_t nc, float* out,
                                                        int64_t plane, const float* res, uint32_t* masks) {
  if (res != nullptr) {
    if (masks != nullptr) write_rows_t<true, true>(src, run, nc, out, plane, res, masks);
    else write_rows_t<true, false>(src, run, nc, out, plane, res, masks);
  } else {
    if (masks != nullptr) write_rows_t<false, true>(src, run, nc, out, plane, res, masks);
    else write_rows_t<false, false>(src, run, nc, out, plane, res, masks);
  }
}

__attribute__((target("avx2"))) void write_rows_avx2(const float* src, int64_t run, int64_t nc, float* out,
                                                     int64_t plane) {
  write_rows_t<false, false>(src, run, nc, out, plane, nullptr, nullptr);
}

// v[p][c] = fma(v[p][c], a[c], b[c]) on [np][16] (the one function here compiled with FMA: a fused
// multiply-add rounds once, as std::fma and as the per-channel affine it stands for was checked).
__attribute__((target("avx2,fma"))) void affine_px_avx2(float* v, int64_t np, const float* a, const float* b) {
  const __m256 a0 = _mm256_loadu_ps(a), a1 = _mm256_loadu_ps(a + 8), b0 = _mm256_loadu_ps(b),
               b1 = _mm256_loadu_ps(b + 8);
  for (int64_t p = 0; p < np; ++p) {
    float* r = v + p * kCoBlock;
    _mm256_storeu_ps(r, _mm256_fmadd_ps(_mm256_loadu_ps(r), a0, b0));
    _mm256_storeu_ps(r + 8, _mm256_fmadd_ps(_mm256_loadu_ps(r + 8), a1, b1));
  }
}

}  // namespace

const XnorEpilogue kXnorEpilogueAvx2 = {transform_px_avx2, sign_mask_px_avx2, bounds_mask_px_avx2, write_rows_avx2,
                                        write_rows_ex_avx2, affine_px_avx2};
const XnorEpilogue kXnorEpilogueAvx2NoFma = {transform_px_avx2, sign_mask_px_avx2, bounds_mask_px_avx2,
                                             write_rows_avx2, write_rows_ex_avx2, nullptr};

}  // namespace kdbnn

#endif  // KDBNN_X86
