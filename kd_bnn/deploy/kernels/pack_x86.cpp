// kd_bnn kernels: AVX2 binarize + pack of one NCHW image row (the avx2 and avx512 paths).
// The whole file is empty on a non-x86 build.

#include "dispatch.h"

#if KDBNN_X86

namespace kdbnn {

// AVX2 version of pack_row_nchw: 8 pixels x 8 channels per step. One compare + movemask per
// channel gives its bits for 8 pixels; the 8x8 bit matrix (byte = channel, bit = pixel) is
// transposed with three delta swaps (H. S. Warren, "Hacker's Delight", 7-3), then an SSE byte
// transpose turns the 8 octets of a 64-channel word into the 8 pixels' words.
__attribute__((target("avx2"))) void pack_row_nchw_avx2(const float* src, int64_t plane, int64_t C, int64_t W,
                                                        const float* thr, uint64_t* dst) {
  const int64_t nw = (C + 63) / 64;
  const __m256 z = _mm256_setzero_ps();
  int64_t w = 0;
  for (; w + 8 <= W; w += 8) {
    for (int64_t wi = 0; wi < nw; ++wi) {
      alignas(16) uint64_t oct[8];
      for (int o = 0; o < 8; ++o) {
        const int64_t c0 = wi * 64 + o * 8;
        uint64_t m = 0;
        for (int k = 0; k < 8; ++k) {
          if (c0 + k >= C) break;
          const __m256 t = thr != nullptr ? _mm256_set1_ps(thr[c0 + k]) : z;
          m |= (uint64_t)_mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(src + (c0 + k) * plane + w), t, _CMP_GE_OQ))
               << (8 * k);
        }
        uint64_t t;
        t = (m ^ (m >> 7)) & 0x00AA00AA00AA00AAULL; m = m ^ t ^ (t << 7);
        t = (m ^ (m >> 14)) & 0x0000CCCC0000CCCCULL; m = m ^ t ^ (t << 14);
        t = (m ^ (m >> 28)) & 0x00000000F0F0F0F0ULL; m = m ^ t ^ (t << 28);
        oct[o] = m;  // byte p: channels c0..c0+7 of pixel w+p
      }
      const __m128i r0 = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(oct + 0));
      const __m128i r1 = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(oct + 1));
      const __m128i r2 = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(oct + 2));
      const __m128i r3 = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(oct + 3));
      const __m128i r4 = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(oct + 4));
      const __m128i r5 = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(oct + 5));
      const __m128i r6 = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(oct + 6));
      const __m128i r7 = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(oct + 7));
      const __m128i a0 = _mm_unpacklo_epi8(r0, r1), a1 = _mm_unpacklo_epi8(r2, r3);
      const __m128i a2 = _mm_unpacklo_epi8(r4, r5), a3 = _mm_unpacklo_epi8(r6, r7);
      const __m128i b0 = _mm_unpacklo_epi16(a0, a1), b1 = _mm_unpackhi_epi16(a0, a1);
      const __m128i b2 = _mm_unpacklo_epi16(a2, a3), b3 = _mm_unpackhi_epi16(a2, a3);
      alignas(16) uint64_t px[8];
      _mm_store_si128(reinterpret_cast<__m128i*>(px + 0), _mm_unpacklo_epi32(b0, b2));
      _mm_store_si128(reinterpret_cast<__m128i*>(px + 2), _mm_unpackhi_epi32(b0, b2));
      _mm_store_si128(reinterpret_cast<__m128i*>(px + 4), _mm_unpacklo_epi32(b1, b3));
      _mm_store_si128(reinterpret_cast<__m128i*>(px + 6), _mm_unpackhi_epi32(b1, b3));
      for (int p = 0; p < 8; ++p) dst[(w + p) * nw + wi] = px[p];
    }
  }
  if (w < W) pack_row_nchw(src + w, plane, C, W - w, thr, dst + w * nw);
}

}  // namespace kdbnn

#endif  // KDBNN_X86
