// kd_bnn kernels: x86 XNOR micro-kernels (POPCNT, AVX2, AVX-512 VPOPCNTDQ).
//
// Each computes popcount(a XOR w) of P pixels x 16 output channels (XTile in common.h). The
// weight panel (KH*KW*nw, C_out rounded up to 16) gives one word of 16 consecutive output
// channels per row, so one vector load holds one word of 8 (AVX-512) or 4 (AVX2) channels; the
// kernels broadcast an input word and XOR/popcount it against the 16 channels for P pixels.
// Compiled with function-level target attributes; dispatch.cpp only selects a kernel when the
// CPU has its instructions. The whole file is empty on a non-x86 build.

#include "dispatch.h"

#if KDBNN_X86

namespace kdbnn {

namespace {

// ---------------------------------------------------------------- scalar POPCNT
constexpr int kPPopcnt = 2;
__attribute__((target("popcnt"))) void xtile_popcnt(const XTile& t) {
  uint64_t acc[kPPopcnt][kCoBlock];
  std::memset(acc, 0, sizeof(acc));
  for (int64_t r = 0; r < t.kh; ++r) {
    const uint64_t* wr = t.w + r * t.len * t.w_stride;
    const int64_t off = r * t.row_stride;
    for (int64_t j = 0; j < t.len; ++j) {
      const uint64_t* wk = wr + j * t.w_stride;
      const uint64_t a0 = t.in[0][off + j];
      const uint64_t a1 = t.in[1][off + j];
      for (int c = 0; c < kCoBlock; ++c) {
        acc[0][c] += (uint64_t)_mm_popcnt_u64(a0 ^ wk[c]);
        acc[1][c] += (uint64_t)_mm_popcnt_u64(a1 ^ wk[c]);
      }
    }
  }
  for (int p = 0; p < kPPopcnt; ++p)
    for (int c = 0; c < kCoBlock; ++c) t.out[p * kCoBlock + c] = (uint32_t)acc[p][c];
}

// ---------------------------------------------------------------- AVX2 (nibble lookup popcount)
// Byte counters (PSHUFB nibble lookup) grow by <= 8 per word step, so they are widened with
// VPSADBW (one 64-bit sum per output channel) every 31 steps, counted across window rows, and
// folded into 32-bit counts with two shifts/ORs and a lane permute. The weight words are
// XOR-ed straight from memory and the pixel words re-broadcast per use, so the 4*P byte
// counters and the lookup constants fit the 16 ymm registers.
template <int P>
__attribute__((target("avx2,popcnt"))) void xtile_avx2_t(const XTile& t) {
  const __m256i lut = _mm256_setr_epi8(0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4,
                                       0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4);
  const __m256i low = _mm256_set1_epi8(0x0f);
  const __m256i zero = _mm256_setzero_si256();
  const __m256i perm = _mm256_setr_epi32(0, 2, 4, 6, 1, 3, 5, 7);
  __m256i b[P][4];
  // 32-bit totals live in memory (t.out): only the flush touches them, so the hot loop keeps
  // all byte counters in registers
  uint32_t* tot = t.out;
  bool flushed = false;  // the first flush stores, later ones add (no memset + reload per tile)
#pragma GCC unroll 4
  for (int p = 0; p < P; ++p) {
#pragma GCC unroll 4
    for (int v = 0; v < 4; ++v) b[p][v] = zero;
  }
  // 64-bit sums of channels (0-3, 4-7) -> 32-bit lanes (0..7)
#define KDBNN_FOLD(S0, S1) \
  _mm256_permutevar8x32_epi32(_mm256_or_si256((S0), _mm256_slli_epi64((S1), 32)), perm)
#define KDBNN_FLUSH_P(p)                                                                                 \
  {                                                                                                      \
    __m256i* o_ = reinterpret_cast<__m256i*>(tot + (p) * kCoBlock);                                      \
    __m256i lo_ = KDBNN_FOLD(_mm256_sad_epu8(b[p][0], zero), _mm256_sad_epu8(b[p][1], zero));           \
    __m256i hi_ = KDBNN_FOLD(_mm256_sad_epu8(b[p][2], zero), _mm256_sad_epu8(b[p][3], zero));           \
    if (flushed) {                                                                                       \
      lo_ = _mm256_add_epi32(lo_, _mm256_loadu_si256(o_));                                               \
      hi_ = _mm256_add_epi32(hi_, _mm256_loadu_si256(o_ + 1));                                           \
    }                                                                                                    \
    _mm256_storeu_si256(o_, lo_);                                                                        \
    _mm256_storeu_si256(o_ + 1, hi_);                                                                    \
    b[p][0] = b[p][1] = b[p][2] = b[p][3] = zero;                                                        \
  }
  int steps = 0;
  for (int64_t r = 0; r < t.kh; ++r) {
    const uint64_t* wr = t.w + r * t.len * t.w_stride;
    const int64_t off = r * t.row_stride;
    const uint64_t* ap[P];
#pragma GCC unroll 4
    for (int p = 0; p < P; ++p) ap[p] = t.in[p] + off;
    for (int64_t j = 0; j < t.len;) {
      // a branch-free run of word steps up to the next flush point
      const int64_t j1 = std::min<int64_t>(t.len, j + (31 - steps));
      steps += (int)(j1 - j);
      for (; j < j1; ++j) {
        const __m256i* wk = reinterpret_cast<const __m256i*>(wr + j * t.w_stride);
#pragma GCC unroll 4
        for (int v = 0; v < 4; ++v) {
          const __m256i w = _mm256_loadu_si256(wk + v);
#pragma GCC unroll 4
          for (int p = 0; p < P; ++p) {
            const __m256i x = _mm256_xor_si256(_mm256_set1_epi64x((long long)ap[p][j]), w);
            b[p][v] = _mm256_add_epi8(b[p][v], _mm256_add_epi8(
                _mm256_shuffle_epi8(lut, _mm256_and_si256(x, low)),
                _mm256_shuffle_epi8(lut, _mm256_and_si256(_mm256_srli_epi16(x, 4), low))));
          }
        }
      }
      if (steps == 31) {
        steps = 0;
#pragma GCC unroll 4
        for (int p = 0; p < P; ++p) KDBNN_FLUSH_P(p)
        flushed = true;
      }
    }
  }
#pragma GCC unroll 4
  for (int p = 0; p < P; ++p) KDBNN_FLUSH_P(p)
#undef KDBNN_FLUSH_P
#undef KDBNN_FOLD
}
constexpr int kPAvx2 = 2;
__attribute__((target("avx2,popcnt"))) void xtile_avx2(const XTile& t) { xtile_avx2_t<kPAvx2>(t); }

// ---------------------------------------------------------------- AVX-512 VPOPCNTDQ
constexpr int kPAvx512 = 6;
#define KDBNN_XSTEP(A, C0, C1)                                                        \
  {                                                                                \
    const __m512i a_ = _mm512_set1_epi64((long long)(A));                           \
    C0 = _mm512_add_epi64(C0, _mm512_popcnt_epi64(_mm512_xor_si512(a_, w0)));      \
    C1 = _mm512_add_epi64(C1, _mm512_popcnt_epi64(_mm512_xor_si512(a_, w1)));      \
  }
__attribute__((target("avx512f,avx512bw,avx512vpopcntdq,popcnt"))) void xtile_avx512(const XTile& t) {
  // 6 pixels x 16 channels; accumulators are named locals so they stay in zmm registers
  __m512i c00 = _mm512_setzero_si512(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00;
  __m512i c30 = c00, c31 = c00, c40 = c00, c41 = c00, c50 = c00, c51 = c00;
  for (int64_t r = 0; r < t.kh; ++r) {
    const uint64_t* wr = t.w + r * t.len * t.w_stride;
    const int64_t off = r * t.row_stride;
    const uint64_t* i0 = t.in[0] + off; const uint64_t* i1 = t.in[1] + off; const uint64_t* i2 = t.in[2] + off;
    const uint64_t* i3 = t.in[3] + off; const uint64_t* i4 = t.in[4] + off; const uint64_t* i5 = t.in[5] + off;
    for (int64_t j = 0; j < t.len; ++j) {
      const uint64_t* wk = wr + j * t.w_stride;
      const __m512i w0 = _mm512_loadu_si512((const void*)wk);
      const __m512i w1 = _mm512_loadu_si512((const void*)(wk + 8));
      KDBNN_XSTEP(i0[j], c00, c01);
      KDBNN_XSTEP(i1[j], c10, c11);
      KDBNN_XSTEP(i2[j], c20, c21);
      KDBNN_XSTEP(i3[j], c30, c31);
      KDBNN_XSTEP(i4[j], c40, c41);
      KDBNN_XSTEP(i5[j], c50, c51);
    }
  }
  uint32_t* o = t.out;
  _mm256_storeu_si256((__m256i*)(o + 0), _mm512_cvtepi64_epi32(c00));
  _mm256_storeu_si256((__m256i*)(o + 8), _mm512_cvtepi64_epi32(c01));
  _mm256_storeu_si256((__m256i*)(o + 16), _mm512_cvtepi64_epi32(c10));
  _mm256_storeu_si256((__m256i*)(o + 24), _mm512_cvtepi64_epi32(c11));
  _mm256_storeu_si256((__m256i*)(o + 32), _mm512_cvtepi64_epi32(c20));
  _mm256_storeu_si256((__m256i*)(o + 40), _mm512_cvtepi64_epi32(c21));
  _mm256_storeu_si256((__m256i*)(o + 48), _mm512_cvtepi64_epi32(c30));
  _mm256_storeu_si256((__m256i*)(o + 56), _mm512_cvtepi64_epi32(c31));
  _mm256_storeu_si256((__m256i*)(o + 64), _mm512_cvtepi64_epi32(c40));
  _mm256_storeu_si256((__m256i*)(o + 72), _mm512_cvtepi64_epi32(c41));
  _mm256_storeu_si256((__m256i*)(o + 80), _mm512_cvtepi64_epi32(c50));
  _mm256_storeu_si256((__m256i*)(o + 88), _mm512_cvtepi64_epi32(c51));
}
#undef KDBNN_XSTEP

}  // namespace

const XnorKernel kXnorPopcnt = {xtile_popcnt, kPPopcnt};
const XnorKernel kXnorAvx2 = {xtile_avx2, kPAvx2};
const XnorKernel kXnorAvx512 = {xtile_avx512, kPAvx512};

}  // namespace kdbnn

#endif  // KDBNN_X86
