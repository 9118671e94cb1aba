// kd_bnn binary convolution kernels (CPU).
//
// XNOR conv (binary activations x binary weights, Rastegari et al., "XNOR-Net", ECCV 2016):
//   activations and weights are bit-packed along channels (bit 1 = +1, LSB first, padding bits 0,
//   see kd_bnn/deploy/pack.py), and the dot product over K = C_in*KH*KW terms is
//   dot = K - 2 * popcount(a XOR w). The packed input is NHWC, pre-padded with the pad value's
//   words, so a KW-wide window row is KW*nw contiguous words for any stride: a direct conv with
//   no im2col. The weights are laid out as a panel (KH*KW*nw, C_out rounded up to 16) so one
//   vector load gives one word of 8 (AVX-512) or 4 (AVX2) output channels; the micro-kernel
//   broadcasts an input word and XOR/popcounts it against 16 output channels for P pixels.
//   Fused epilogue: out = dot*scale[c] + bias[c], activation, then float NCHW output or
//   re-binarized packed NHWC output (optionally pre-padded for the next XNOR layer).
//
// ISA paths live in one build via function-level target attributes and are picked at run time
// from the CPU's flags: avx512 (AVX-512F/BW + VPOPCNTDQ), avx2 (PSHUFB nibble popcount,
// W. Mula et al., "Faster Population Counts Using AVX2 Instructions", 2016), popcnt (scalar
// POPCNT), scalar (portable C++).
//
//   Input binarize+pack (AVX2: movemask + 8x8 bit transposes) and the float/int epilogue (AVX2
//   transform + 8x8 transposed stores into NCHW rows) are vectorized too.
//
// BWN conv (float activations x packed binary weights, Xu et al. ICRA 2019 / XNOR-Net BWN):
//   avx2 and avx512 paths: lookup-table conv (BiQGEMM-style, see bwn_lut_range_avx2; AVX2 code,
//   which every AVX-512 CPU runs): for 16 output pixels and 4 input channels at one tap, the 16
//   signed sums +-x0+-x1+-x2+-x3 are tabulated once and every output channel adds the entry its
//   4 weight bits select (one add per 4 MACs x 8 pixels); weights stay bit-packed, only per-call
//   byte offsets (one byte per 4 weights, 1/16 of a float copy) are derived. scalar/popcnt
//   paths (portable C++): direct conv on zero-padded NHWC float input; each 16-output-channel
//   weight panel is unpacked from bits to +-alpha floats on the fly into a thread-local buffer
//   (K*16 floats) and consumed by a 6-pixel x 16-channel micro-kernel. Neither path keeps a
//   float copy of the weights.

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cmath>
#include <cstring>
#include <vector>

namespace {

constexpr int kCoBlock = 16;  // output channels per micro-kernel tile
constexpr int kMaxP = 8;      // max pixels per micro-kernel tile

enum Isa : int64_t { ISA_SCALAR = 0, ISA_POPCNT = 1, ISA_AVX2 = 2, ISA_AVX512 = 3 };
enum Act : int64_t { ACT_NONE = 0, ACT_RELU = 1, ACT_LEAKY = 2 };
enum Mode : int64_t { MODE_INT = 0, MODE_FLOAT = 1, MODE_PACKED = 2 };

// Arguments of one XNOR micro-kernel call.
struct XTile {
  const uint64_t* in[kMaxP];  // first word of each pixel's window (row kh = 0)
  int64_t row_stride;         // words between input rows (Wp * nw)
  int64_t kh;                 // kernel rows
  int64_t len;                // contiguous words per window row (KW * nw)
  const uint64_t* w;          // panel + co_block offset; row k at w + k * w_stride
  int64_t w_stride;           // panel row stride (C_out padded)
  uint32_t* out;              // [P][16] popcounts
};

using XTileFn = void (*)(const XTile&);

// ---------------------------------------------------------------- portable / scalar popcnt
template <int P>
inline void xtile_generic(const XTile& t) {
  uint32_t acc[P][kCoBlock];
  std::memset(acc, 0, sizeof(acc));
  for (int64_t r = 0; r < t.kh; ++r) {
    const uint64_t* wr = t.w + r * t.len * t.w_stride;
    const int64_t off = r * t.row_stride;
    for (int64_t j = 0; j < t.len; ++j) {
      const uint64_t* wk = wr + j * t.w_stride;
      for (int p = 0; p < P; ++p) {
        const uint64_t a = t.in[p][off + j];
        for (int c = 0; c < kCoBlock; ++c) acc[p][c] += (uint32_t)__builtin_popcountll(a ^ wk[c]);
      }
    }
  }
  std::memcpy(t.out, acc, sizeof(acc));
}

constexpr int kPScalar = 2;
void xtile_scalar(const XTile& t) { xtile_generic<kPScalar>(t); }

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

bool cpu_has(int64_t isa) {
  __builtin_cpu_init();
  switch (isa) {
    case ISA_SCALAR: return true;
    case ISA_POPCNT: return __builtin_cpu_supports("popcnt");
    case ISA_AVX2: return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("popcnt");
    case ISA_AVX512:
      return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
             __builtin_cpu_supports("avx512vpopcntdq") && __builtin_cpu_supports("popcnt");
  }
  return false;
}

void xtile_select(int64_t isa, XTileFn* fn, int* p) {
  TORCH_CHECK(isa >= ISA_SCALAR && isa <= ISA_AVX512, "kd_bnn: unknown ISA code ", isa);
  TORCH_CHECK(cpu_has(isa), "kd_bnn: this CPU lacks the instructions of ISA path ", isa);
  switch (isa) {
    case ISA_AVX512: *fn = xtile_avx512; *p = kPAvx512; return;
    case ISA_AVX2: *fn = xtile_avx2; *p = kPAvx2; return;
    case ISA_POPCNT: *fn = xtile_popcnt; *p = kPPopcnt; return;
    default: *fn = xtile_scalar; *p = kPScalar; return;
  }
}

inline uint64_t last_word_mask(int64_t channels) {
  const int64_t rem = channels % 64;
  return rem == 0 ? ~0ULL : ((1ULL << rem) - 1ULL);
}

// Fill the words of one padded position: valid bits = 1 for +1 padding, all 0 for -1.
inline void fill_pad(uint64_t* dst, int64_t nw, int64_t channels, bool plus) {
  for (int64_t i = 0; i < nw; ++i) dst[i] = plus ? (i == nw - 1 ? last_word_mask(channels) : ~0ULL) : 0ULL;
}

void check_pad_value(double v) {
  TORCH_CHECK(v == 1.0 || v == -1.0, "kd_bnn: binary padding value must be +1 or -1, found ", v);
}


// Fused output transform of 16 channels: v = (K - 2*cnt) * scale + bias, then activation
// (leaky: max(v,0) + 0.1*min(v,0), which equals v > 0 ? v : 0.1*v up to the sign of zero).
// Returns the sign mask (bit c set where v[c] >= 0). Plain SSE2 (baseline x86-64): no FMA, so
// the rounding matches torch's dot.float() * scale + bias exactly.
inline uint32_t transform16(const uint32_t* cnt, float K, const float* sc, const float* bi, int64_t act,
                            float* v) {
#if defined(__SSE2__)
  const __m128 kv = _mm_set1_ps(K), two = _mm_set1_ps(2.0f), z = _mm_setzero_ps(), slope = _mm_set1_ps(0.1f);
  uint32_t m = 0;
  for (int g = 0; g < kCoBlock; g += 4) {
    const __m128 c = _mm_cvtepi32_ps(_mm_loadu_si128((const __m128i*)(cnt + g)));
    __m128 y = _mm_add_ps(_mm_mul_ps(_mm_sub_ps(kv, _mm_mul_ps(two, c)), _mm_loadu_ps(sc + g)), _mm_loadu_ps(bi + g));
    if (act == ACT_RELU) y = _mm_max_ps(y, z);
    else if (act == ACT_LEAKY) y = _mm_add_ps(_mm_max_ps(y, z), _mm_mul_ps(slope, _mm_min_ps(y, z)));
    _mm_storeu_ps(v + g, y);
    m |= (uint32_t)_mm_movemask_ps(_mm_cmpge_ps(y, z)) << g;
  }
  return m;
#else
  uint32_t m = 0;
  for (int c = 0; c < kCoBlock; ++c) {
    float y = (K - 2.0f * (float)cnt[c]) * sc[c] + bi[c];
    if (act == ACT_RELU) y = std::max(y, 0.f);
    else if (act == ACT_LEAKY) y = std::max(y, 0.f) + 0.1f * std::min(y, 0.f);
    v[c] = y;
    m |= (uint32_t)(y >= 0.f) << c;
  }
  return m;
#endif
}

// One NCHW image row (channel c at src + c*plane) -> W pixels of packed words, padding bits 0.
// Four pixels at a time: one SSE compare + movemask per channel gives the channel's bit for 4
// pixels, spread into 4 register-held words (no NHWC transpose of the float input).
inline void pack_row_nchw(const float* src, int64_t plane, int64_t C, int64_t W, uint64_t* dst) {
  const int64_t nw = (C + 63) / 64;
  int64_t w = 0;
#if defined(__SSE2__)
  const __m128 z = _mm_setzero_ps();
  for (; w + 4 <= W; w += 4) {
    for (int64_t wi = 0; wi < nw; ++wi) {
      const int64_t c1 = std::min<int64_t>(C, wi * 64 + 64);
      uint64_t q0 = 0, q1 = 0, q2 = 0, q3 = 0;
      for (int64_t c = wi * 64; c < c1; ++c) {
        const uint64_t m = (uint64_t)_mm_movemask_ps(_mm_cmpge_ps(_mm_loadu_ps(src + c * plane + w), z));
        const int sh = (int)(c & 63);
        q0 |= (m & 1ULL) << sh;
        q1 |= ((m >> 1) & 1ULL) << sh;
        q2 |= ((m >> 2) & 1ULL) << sh;
        q3 |= ((m >> 3) & 1ULL) << sh;
      }
      dst[w * nw + wi] = q0;
      dst[(w + 1) * nw + wi] = q1;
      dst[(w + 2) * nw + wi] = q2;
      dst[(w + 3) * nw + wi] = q3;
    }
  }
#endif
  for (; w < W; ++w) {
    for (int64_t wi = 0; wi < nw; ++wi) {
      const int64_t c1 = std::min<int64_t>(C, wi * 64 + 64);
      uint64_t q = 0;
      for (int64_t c = wi * 64; c < c1; ++c) q |= (uint64_t)(src[c * plane + w] >= 0.0f) << (c & 63);
      dst[w * nw + wi] = q;
    }
  }
}

// AVX2 version of pack_row_nchw: 8 pixels x 8 channels per step. One compare + movemask per
// channel gives its bits for 8 pixels; the 8x8 bit matrix (byte = channel, bit = pixel) is
// transposed with three delta swaps (H. S. Warren, "Hacker's Delight", 7-3), then an SSE byte
// transpose turns the 8 octets of a 64-channel word into the 8 pixels' words.
__attribute__((target("avx2"))) void pack_row_nchw_avx2(const float* src, int64_t plane, int64_t C, int64_t W,
                                                        uint64_t* dst) {
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
          m |= (uint64_t)_mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(src + (c0 + k) * plane + w), z, _CMP_GE_OQ))
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
  if (w < W) pack_row_nchw(src + w, plane, C, W - w, dst + w * nw);
}

// AVX2 epilogue of the XNOR conv. transform_px_avx2: counts [np][16] -> transformed floats
// [np][16], the same float ops in the same order as transform16 (mul then add, no FMA: this
// function is compiled without it, so results are bit-identical). write_rows_avx2: a pixel-major
// block src [i][16] (floats or int32 bits) -> `nc` NCHW channel rows of `run` pixels, through
// 8x8 register transposes.
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

// Packed (re-binarized) output in integer form. With finite scale and bias, "transform(dot) >= 0"
// is monotonic in the popcount c (dot = K - 2c; float multiply, add and the activations are
// monotonic; a finite product plus a finite bias is never NaN), so per channel it holds exactly
// on an interval lo <= c <= hi, found by bisection with the same float ops as transform16 (this
// function is compiled without FMA, like transform16, so no contraction changes a rounding).
// Returns false (caller keeps the float epilogue) when some scale or bias is not finite.
bool sign_bounds(int64_t K, const float* sc, const float* bi, int64_t act, int64_t c_out, int32_t* lo, int32_t* hi) {
  for (int64_t c = 0; c < c_out; ++c)
    if (!std::isfinite(sc[c]) || !std::isfinite(bi[c])) return false;
  const float Kf = (float)K;
  for (int64_t c = 0; c < c_out; ++c) {
    const float s = sc[c], b = bi[c];
    auto pred = [&](int64_t n) {
      const float y = (Kf - 2.0f * (float)n) * s + b;
      float v = y;
      if (act == ACT_RELU) v = y > 0.f ? y : 0.f;
      else if (act == ACT_LEAKY) v = (y > 0.f ? y : 0.f) + 0.1f * (y < 0.f ? y : 0.f);
      return v >= 0.f;
    };
    if (s == 0.f) {  // constant
      lo[c] = pred(0) ? 0 : 1;
      hi[c] = pred(0) ? (int32_t)K : 0;
    } else if (s > 0.f) {  // true for small c: largest c with pred, or none
      if (!pred(0)) { lo[c] = 1; hi[c] = 0; continue; }
      int64_t a = 0, z = K;  // pred(a) true; find last true in [a, z]
      while (a < z) {
        const int64_t m = (a + z + 1) / 2;
        if (pred(m)) a = m; else z = m - 1;
      }
      lo[c] = 0; hi[c] = (int32_t)a;
    } else {  // true for large c: smallest c with pred, or none
      if (!pred(K)) { lo[c] = 1; hi[c] = 0; continue; }
      int64_t a = 0, z = K;  // pred(z) true; find first true in [a, z]
      while (a < z) {
        const int64_t m = (a + z) / 2;
        if (pred(m)) z = m; else a = m + 1;
      }
      lo[c] = (int32_t)z; hi[c] = (int32_t)K;
    }
  }
  return true;
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

__attribute__((target("avx2"))) void write_rows_avx2(const float* src, int64_t run, int64_t nc, float* out,
                                                     int64_t plane) {
  int64_t i = 0;
  for (; i + 8 <= run; i += 8) {
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
      float* o = out + cg * plane + i;
      _mm256_storeu_ps(o + 0 * plane, _mm256_permute2f128_ps(u0, u4, 0x20));
      _mm256_storeu_ps(o + 1 * plane, _mm256_permute2f128_ps(u1, u5, 0x20));
      _mm256_storeu_ps(o + 2 * plane, _mm256_permute2f128_ps(u2, u6, 0x20));
      _mm256_storeu_ps(o + 3 * plane, _mm256_permute2f128_ps(u3, u7, 0x20));
      _mm256_storeu_ps(o + 4 * plane, _mm256_permute2f128_ps(u0, u4, 0x31));
      _mm256_storeu_ps(o + 5 * plane, _mm256_permute2f128_ps(u1, u5, 0x31));
      _mm256_storeu_ps(o + 6 * plane, _mm256_permute2f128_ps(u2, u6, 0x31));
      _mm256_storeu_ps(o + 7 * plane, _mm256_permute2f128_ps(u3, u7, 0x31));
    }
    for (; cg < nc; ++cg)
      for (int64_t k = 0; k < 8; ++k) out[cg * plane + i + k] = src[(i + k) * kCoBlock + cg];
  }
  for (; i < run; ++i)
    for (int64_t c = 0; c < nc; ++c) out[c * plane + i] = src[i * kCoBlock + c];
}

}  // namespace

// ================================================================== packing
// x: float (N, C, H, W) -> int64 (N, H+2p, W+2p, nw), sign bits (x >= 0 -> 1), border = pad words.
torch::Tensor pack_input(torch::Tensor x, int64_t pad, double pad_value) {
  TORCH_CHECK(x.dim() == 4, "kd_bnn.pack_input: expected (N, C, H, W), found ", x.sizes());
  TORCH_CHECK(pad >= 0, "kd_bnn.pack_input: pad must be >= 0, found ", pad);
  check_pad_value(pad_value);
  x = x.to(torch::kFloat32).contiguous();
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const float* xp = x.data_ptr<float>();
  const int64_t nw = (C + 63) / 64, Hp = H + 2 * pad, Wp = W + 2 * pad;
  auto out = torch::empty({N, Hp, Wp, nw}, torch::kInt64);
  uint64_t* o = reinterpret_cast<uint64_t*>(out.data_ptr<int64_t>());
  const bool plus = pad_value > 0;
  const bool avx2 = cpu_has(ISA_AVX2);
  // rows per task: >= ~64K input floats, so small layers stay on one thread (a parallel region
  // costs more than the copy there)
  at::parallel_for(0, N * Hp, std::max<int64_t>(1, 65536 / std::max<int64_t>(1, W * C)), [&](int64_t b, int64_t e) {
    for (int64_t nh = b; nh < e; ++nh) {
      const int64_t n = nh / Hp, hp = nh % Hp, h = hp - pad;
      uint64_t* row = o + nh * Wp * nw;
      if (h < 0 || h >= H) {
        for (int64_t w = 0; w < Wp; ++w) fill_pad(row + w * nw, nw, C, plus);
        continue;
      }
      for (int64_t w = 0; w < pad; ++w) {
        fill_pad(row + w * nw, nw, C, plus);
        fill_pad(row + (Wp - 1 - w) * nw, nw, C, plus);
      }
      uint64_t* inner = row + pad * nw;
      if (avx2) pack_row_nchw_avx2(xp + n * C * H * W + h * W, H * W, C, W, inner);
      else pack_row_nchw(xp + n * C * H * W + h * W, H * W, C, W, inner);
    }
  });
  return out;
}

// xp: int64 (N, H, W, nw) packed (unpadded) -> (N, H+2p, W+2p, nw) with pad words on the border.
torch::Tensor pad_packed(torch::Tensor xp, int64_t channels, int64_t pad, double pad_value) {
  TORCH_CHECK(xp.dim() == 4 && xp.scalar_type() == torch::kInt64,
              "kd_bnn.pad_packed: expected int64 (N, H, W, nw), found ", xp.sizes(), " ", xp.scalar_type());
  check_pad_value(pad_value);
  const int64_t nw = (channels + 63) / 64;
  TORCH_CHECK(xp.size(3) == nw, "kd_bnn.pad_packed: ", channels, " channels need ", nw, " words, found ", xp.size(3));
  xp = xp.contiguous();
  const int64_t N = xp.size(0), H = xp.size(1), W = xp.size(2), Hp = H + 2 * pad, Wp = W + 2 * pad;
  auto out = torch::empty({N, Hp, Wp, nw}, torch::kInt64);
  const uint64_t* s = reinterpret_cast<const uint64_t*>(xp.data_ptr<int64_t>());
  uint64_t* o = reinterpret_cast<uint64_t*>(out.data_ptr<int64_t>());
  const bool plus = pad_value > 0;
  at::parallel_for(0, N * Hp, 1, [&](int64_t b, int64_t e) {
    for (int64_t nh = b; nh < e; ++nh) {
      const int64_t n = nh / Hp, h = nh % Hp - pad;
      uint64_t* row = o + nh * Wp * nw;
      for (int64_t w = 0; w < Wp; ++w) {
        const int64_t wi = w - pad;
        if (h < 0 || h >= H || wi < 0 || wi >= W)
          fill_pad(row + w * nw, nw, channels, plus);
        else
          std::memcpy(row + w * nw, s + ((n * H + h) * W + wi) * nw, sizeof(uint64_t) * nw);
      }
    }
  });
  return out;
}

// ================================================================== XNOR conv
// xpad: int64 (N, Hp, Wp, nw) packed input, already padded.
// panel: int64 (KH*KW*nw, CoP) weight panel, CoP = C_out rounded up to 16 (see pack.py / ops.py).
// Returns: MODE_INT int32 (N, C_out, OH, OW) dot products; MODE_FLOAT float32 (N, C_out, OH, OW)
// after scale/bias/activation; MODE_PACKED int64 (N, OH+2*op, OW+2*op, ceil(C_out/64)) signs of
// the transformed output, padded with out_pad_value words.
torch::Tensor xnor_conv(torch::Tensor xpad, torch::Tensor panel, int64_t c_out, int64_t c_in,
                        int64_t KH, int64_t KW, int64_t stride, c10::optional<torch::Tensor> scale,
                        c10::optional<torch::Tensor> bias, int64_t act, int64_t mode, int64_t out_pad,
                        double out_pad_value, int64_t isa) {
  TORCH_CHECK(xpad.dim() == 4 && xpad.scalar_type() == torch::kInt64,
              "kd_bnn.xnor_conv: packed input must be int64 (N, Hp, Wp, nw), found ", xpad.sizes(), " ",
              xpad.scalar_type());
  TORCH_CHECK(panel.dim() == 2 && panel.scalar_type() == torch::kInt64,
              "kd_bnn.xnor_conv: weight panel must be int64 2-D, found ", panel.sizes());
  const int64_t nw = (c_in + 63) / 64;
  TORCH_CHECK(xpad.size(3) == nw, "kd_bnn.xnor_conv: input has ", xpad.size(3), " words per pixel, ",
              c_in, " channels need ", nw);
  TORCH_CHECK(panel.size(0) == KH * KW * nw && panel.size(1) % kCoBlock == 0 && panel.size(1) >= c_out,
              "kd_bnn.xnor_conv: weight panel shape ", panel.sizes(), " does not match (", KH * KW * nw,
              ", C_out rounded up to 16 >= ", c_out, ")");
  TORCH_CHECK(stride >= 1, "kd_bnn.xnor_conv: stride must be >= 1, found ", stride);
  TORCH_CHECK(mode >= MODE_INT && mode <= MODE_PACKED, "kd_bnn.xnor_conv: bad mode ", mode);
  TORCH_CHECK(act >= ACT_NONE && act <= ACT_LEAKY, "kd_bnn.xnor_conv: bad activation ", act);
  if (mode == MODE_PACKED) check_pad_value(out_pad_value);
  xpad = xpad.contiguous();
  panel = panel.contiguous();
  const int64_t N = xpad.size(0), Hp = xpad.size(1), Wp = xpad.size(2);
  TORCH_CHECK(Hp >= KH && Wp >= KW, "kd_bnn.xnor_conv: padded input ", Hp, "x", Wp, " smaller than kernel ",
              KH, "x", KW);
  const int64_t OH = (Hp - KH) / stride + 1, OW = (Wp - KW) / stride + 1;
  const int64_t CoP = panel.size(1);
  const int64_t K = c_in * KH * KW;

  // scale/bias padded to a multiple of 16 so the epilogue runs full 16-channel vectors
  std::vector<float> sc(c_out + kCoBlock, 1.0f), bi(c_out + kCoBlock, 0.0f);
  if (scale.has_value() && scale->defined()) {
    auto s = scale->to(torch::kFloat32).contiguous();
    TORCH_CHECK(s.numel() == c_out, "kd_bnn.xnor_conv: scale has ", s.numel(), " values, expected ", c_out);
    std::memcpy(sc.data(), s.data_ptr<float>(), sizeof(float) * c_out);
  }
  if (bias.has_value() && bias->defined()) {
    auto s = bias->to(torch::kFloat32).contiguous();
    TORCH_CHECK(s.numel() == c_out, "kd_bnn.xnor_conv: bias has ", s.numel(), " values, expected ", c_out);
    std::memcpy(bi.data(), s.data_ptr<float>(), sizeof(float) * c_out);
  }

  XTileFn fn;
  int P;
  xtile_select(isa, &fn, &P);

  torch::Tensor out;
  const int64_t nwo = (c_out + 63) / 64;
  const int64_t OHp = OH + 2 * out_pad, OWp = OW + 2 * out_pad;
  if (mode == MODE_INT) out = torch::empty({N, c_out, OH, OW}, torch::kInt32);
  else if (mode == MODE_FLOAT) out = torch::empty({N, c_out, OH, OW}, torch::kFloat32);
  else out = torch::empty({N, OHp, OWp, nwo}, torch::kInt64);

  int32_t* out_i = mode == MODE_INT ? out.data_ptr<int32_t>() : nullptr;
  float* out_f = mode == MODE_FLOAT ? out.data_ptr<float>() : nullptr;
  const uint64_t* X = reinterpret_cast<const uint64_t*>(xpad.data_ptr<int64_t>());
  const uint64_t* Wt = reinterpret_cast<const uint64_t*>(panel.data_ptr<int64_t>());
  const int64_t row_stride = Wp * nw, len = KW * nw;
  const bool plus_out = out_pad_value > 0;

  if (mode == MODE_PACKED && out_pad > 0) {
    uint64_t* o = reinterpret_cast<uint64_t*>(out.data_ptr<int64_t>());
    for (int64_t n = 0; n < N; ++n)
      for (int64_t h = 0; h < OHp; ++h)
        for (int64_t w = 0; w < OWp; ++w)
          if (h < out_pad || h >= OH + out_pad || w < out_pad || w >= OW + out_pad)
            fill_pad(o + ((n * OHp + h) * OWp + w) * nwo, nwo, c_out, plus_out);
  }

  const float Kf = (float)K;
  const int64_t act_c = act;
  // Work unit: a block of consecutive output pixels in flattened (n, oh, ow) order, so tiles of
  // P pixels cross row ends (no wasted micro-kernel work when OW % P != 0). A thread owns whole
  // pixels, so packed output words are never shared between threads. Within a block the
  // 16-channel panel slice stays in L1 across the block's tiles.
  const int64_t plane = OH * OW, total = N * plane;
  const int64_t block = (int64_t)P * std::max<int64_t>(1, 48 / P);
  const int64_t n_blocks = (total + block - 1) / block;
  uint64_t* out_pk = mode == MODE_PACKED ? reinterpret_cast<uint64_t*>(out.data_ptr<int64_t>()) : nullptr;
  // AVX2 paths (and AVX-512 CPUs, which have AVX2) transform and transpose with AVX2; the
  // scalar/popcnt paths keep the SSE2 epilogue with a channel-major buffer
  const bool avx2_epi = isa >= ISA_AVX2 && cpu_has(ISA_AVX2);
  std::vector<int32_t> lo_b(c_out + kCoBlock, 1), hi_b(c_out + kCoBlock, 0);
  const bool use_bounds =
      avx2_epi && mode == MODE_PACKED && sign_bounds(K, sc.data(), bi.data(), act, c_out, lo_b.data(), hi_b.data());
  at::parallel_for(0, n_blocks, 1, [&](int64_t b, int64_t e) {
    alignas(64) uint32_t cnt[kMaxP * kCoBlock];
    std::vector<uint64_t> bits;  // packed output of the block: block * nwo words
    if (mode == MODE_PACKED) bits.resize(block * nwo);
    // float / int results of one 16-channel slice: pixel-major [i][16] on the AVX2 epilogue
    // (written out through 8x8 transposes), channel-major [c][block] otherwise (one contiguous
    // copy per channel run)
    std::vector<float> fbuf(mode == MODE_FLOAT ? kCoBlock * block : 0);
    std::vector<int32_t> ibuf(mode == MODE_INT ? kCoBlock * block : 0);
    std::vector<const uint64_t*> inp(block + kMaxP);
    for (int64_t blk = b; blk < e; ++blk) {
      const int64_t q_begin = blk * block, q_end = std::min<int64_t>(total, q_begin + block), nb = q_end - q_begin;
      if (mode == MODE_PACKED) std::fill(bits.begin(), bits.end(), 0ULL);
      for (int64_t i = 0; i < nb + P; ++i) {
        const int64_t q = q_begin + std::min<int64_t>(i, nb - 1);
        const int64_t n = q / plane, rem = q % plane, oh = rem / OW, ow = rem % OW;
        inp[i] = X + ((n * Hp + oh * stride) * Wp + ow * stride) * nw;
      }
      for (int64_t co = 0; co < c_out; co += kCoBlock) {
        const int64_t nc = std::min<int64_t>(kCoBlock, c_out - co);
        const float* scp = sc.data() + co;
        const float* bip = bi.data() + co;
        XTile t;
        t.row_stride = row_stride;
        t.kh = KH;
        t.len = len;
        t.w = Wt + co;
        t.w_stride = CoP;
        t.out = cnt;
        for (int64_t i0 = 0; i0 < nb; i0 += P) {
          const int64_t np = std::min<int64_t>(P, nb - i0);
          for (int p = 0; p < P; ++p) t.in[p] = inp[i0 + p];
          fn(t);
          if (avx2_epi) {
            if (mode == MODE_PACKED) {
              uint32_t masks[kMaxP];
              if (use_bounds) bounds_mask_px_avx2(cnt, np, lo_b.data() + co, hi_b.data() + co, masks);
              else sign_mask_px_avx2(cnt, np, Kf, scp, bip, act_c, masks);
              const uint64_t keep = nc < kCoBlock ? (1ULL << nc) - 1ULL : 0xFFFFULL;
              for (int64_t p = 0; p < np; ++p) bits[(i0 + p) * nwo + (co >> 6)] |= ((uint64_t)masks[p] & keep) << (co & 63);
            } else if (mode == MODE_FLOAT) {
              transform_px_avx2(cnt, np, Kf, scp, bip, act_c, fbuf.data() + i0 * kCoBlock);
            } else {
              for (int64_t p = 0; p < np; ++p)
                for (int c = 0; c < kCoBlock; ++c)
                  ibuf[(i0 + p) * kCoBlock + c] = (int32_t)(K - 2 * (int64_t)cnt[p * kCoBlock + c]);
            }
            continue;
          }
          for (int64_t p = 0; p < np; ++p) {
            const uint32_t* cp = cnt + p * kCoBlock;
            if (mode == MODE_INT) {
              for (int64_t c = 0; c < nc; ++c) ibuf[c * block + i0 + p] = (int32_t)(K - 2 * (int64_t)cp[c]);
              continue;
            }
            alignas(64) float v[kCoBlock];
            const uint32_t sm = transform16(cp, Kf, scp, bip, act_c, v);
            if (mode == MODE_FLOAT) {
              for (int64_t c = 0; c < nc; ++c) fbuf[c * block + i0 + p] = v[c];
            } else {
              uint64_t m = sm;
              if (nc < kCoBlock) m &= (1ULL << nc) - 1ULL;
              bits[(i0 + p) * nwo + (co >> 6)] |= m << (co & 63);
            }
          }
        }
        if (mode != MODE_PACKED) {
          // runs of the block inside one image are contiguous in each output channel plane
          for (int64_t q = q_begin; q < q_end;) {
            const int64_t n = q / plane, rem = q % plane, run = std::min<int64_t>(q_end, (n + 1) * plane) - q;
            const int64_t o = (n * c_out + co) * plane + rem, i = q - q_begin;
            if (avx2_epi) {
              // pixel-major buffers; int32 counts move through the float transpose bit for bit
              const float* src = mode == MODE_FLOAT ? fbuf.data() : reinterpret_cast<const float*>(ibuf.data());
              float* dst = mode == MODE_FLOAT ? out_f + o : reinterpret_cast<float*>(out_i + o);
              write_rows_avx2(src + i * kCoBlock, run, nc, dst, plane);
            } else {
              for (int64_t c = 0; c < nc; ++c) {
                if (mode == MODE_FLOAT) std::memcpy(out_f + o + c * plane, fbuf.data() + c * block + i, sizeof(float) * run);
                else std::memcpy(out_i + o + c * plane, ibuf.data() + c * block + i, sizeof(int32_t) * run);
              }
            }
            q += run;
          }
        }
      }
      if (mode == MODE_PACKED) {
        for (int64_t q = q_begin; q < q_end; ++q) {
          const int64_t n = q / plane, rem = q % plane, oh = rem / OW, ow = rem % OW;
          std::memcpy(out_pk + ((n * OHp + oh + out_pad) * OWp + ow + out_pad) * nwo, bits.data() + (q - q_begin) * nwo,
                      sizeof(uint64_t) * nwo);
        }
      }
    }
  });
  return out;
}

// ================================================================== BWN conv
namespace {

// Unpack one 16-channel panel: dst[k*16 + c] = alpha[co+c] * (bit ? +1 : -1) for k over
// (kh, kw, c_in) in NHWC window order; channels beyond c_out are 0. The sign is applied by
// XOR-ing the float sign bit, so the inner 16-channel loop is branch-free and vectorizes.
inline void unpack_panel_impl(const uint64_t* wp, int64_t c_out, int64_t co, int64_t KK, int64_t nw,
                              int64_t c_in, const float* alpha, float* dst) {
  const int64_t nc = std::min<int64_t>(kCoBlock, c_out - co);
  uint32_t abits[kCoBlock];
  for (int c = 0; c < kCoBlock; ++c) {
    const float a = c < nc ? alpha[co + c] : 0.f;
    std::memcpy(&abits[c], &a, sizeof(float));
  }
  uint64_t wd[kCoBlock];
  for (int64_t kk = 0; kk < KK; ++kk) {
    for (int64_t wi = 0; wi < nw; ++wi) {
      for (int c = 0; c < kCoBlock; ++c) wd[c] = c < nc ? wp[((co + c) * KK + kk) * nw + wi] : ~0ULL;
      const int64_t nb = std::min<int64_t>(64, c_in - wi * 64);
      uint32_t* d = reinterpret_cast<uint32_t*>(dst + (kk * c_in + wi * 64) * kCoBlock);
      for (int64_t b = 0; b < nb; ++b) {
        for (int c = 0; c < kCoBlock; ++c)
          d[b * kCoBlock + c] = abits[c] ^ ((uint32_t)(~(wd[c] >> b) & 1ULL) << 31);
      }
    }
  }
}

void unpack_panel_base(const uint64_t* wp, int64_t c_out, int64_t co, int64_t KK, int64_t nw, int64_t c_in,
                       const float* alpha, float* dst) {
  unpack_panel_impl(wp, c_out, co, KK, nw, c_in, alpha, dst);
}

struct FTile {
  const float* in[kMaxP];
  int64_t row_stride;  // floats between input rows (Wp * C)
  int64_t kh, len;     // kernel rows, contiguous floats per window row (KW * C)
  int64_t j0, j1;      // this call covers window columns [j0, j1) of every row (K blocking)
  bool accumulate;     // add to out (later K blocks) instead of overwriting it
  const float* w;      // panel [K][16]
  float* out;          // [P][16]
};

constexpr int kPF = 6;

void ftile_scalar(const FTile& t) {
  float acc[kPF][kCoBlock] = {};
  if (t.accumulate) std::memcpy(acc, t.out, sizeof(acc));
  for (int64_t r = 0; r < t.kh; ++r) {
    const float* wr = t.w + r * t.len * kCoBlock;
    const int64_t off = r * t.row_stride;
    for (int64_t j = t.j0; j < t.j1; ++j) {
      for (int p = 0; p < kPF; ++p) {
        const float a = t.in[p][off + j];
        for (int c = 0; c < kCoBlock; ++c) acc[p][c] += a * wr[j * kCoBlock + c];
      }
    }
  }
  std::memcpy(t.out, acc, sizeof(acc));
}

// ---------------------------------------------------------------- BWN, AVX2: lookup-table conv
// With binary weights every output is a signed sum of inputs, so for a group of 4 input values
// (4 channels at one kernel tap, for a tile of output pixels) all 16 sign patterns are formed
// once, T[s] = sum_i (bit i of s ? +x_i : -x_i), and each output channel adds the entry its 4
// weight bits select: one load + one add per 4 MACs and 8 pixels instead of 4 FMAs
// (lookup-table GEMM for binary-coded weights: Jeon et al., "BiQGEMM", SC 2020). One
// 64-channel weight word of one tap gives 16 tables (L1-resident), consumed by register blocks
// of output channels; alpha scales the sum once in the epilogue, then bias and activation.
// VP = ymm vectors (8 pixels each) per tile; the weight nibbles are pre-scaled to byte offsets.
// 16-pixel tiles (VP = 2: 6 channels x 2 vectors of accumulators) measured ~20% faster here than
// 8-pixel tiles (12 x 1): each offset byte then serves two table loads.
constexpr int kLutVP = 2;

struct LutArgs {
  const float* X;       // zero-padded NCHW input: N x Cp x Hp x Wp (+ slack), Cp = C rounded up to 4
  int64_t Cp, Hp, Wp, OH, OW, stride, KH, KW, C, nw, c_out, total;
  const uint8_t* idx;   // [(kk*nw + wi)][c][16]: weight nibble j of word (c, kk, wi) * 4 * VP (lut_indices)
  const float* alpha;
  const float* bias;
  int64_t act;
  float* O;             // (N, c_out, OH, OW)
};

template <int VP, int NB>
__attribute__((target("avx2,fma"), always_inline)) inline void lut_block(const float* T, int ng, const uint8_t* ir,
                                                                         int64_t irs, float* accp, bool first) {
  __m256 a[NB * VP];
#pragma GCC unroll 16
  for (int c = 0; c < NB * VP; ++c) a[c] = first ? _mm256_setzero_ps() : _mm256_load_ps(accp + 8 * c);
  constexpr int64_t kTab = 16 * 8 * VP * sizeof(float);  // bytes per table
  const char* Tj = reinterpret_cast<const char*>(T);
  (void)irs;
  for (int j = 0; j < ng; ++j, Tj += kTab, ++ir) {
#pragma GCC unroll 16
    for (int c = 0; c < NB; ++c) {
      const float* e = reinterpret_cast<const float*>(Tj + (size_t)ir[16 * c] * 8);
#pragma GCC unroll 4
      for (int v = 0; v < VP; ++v) a[c * VP + v] = _mm256_add_ps(a[c * VP + v], _mm256_load_ps(e + 8 * v));
    }
  }
#pragma GCC unroll 16
  for (int c = 0; c < NB * VP; ++c) _mm256_store_ps(accp + 8 * c, a[c]);
}

using LutBlockFn = void (*)(const float*, int, const uint8_t*, int64_t, float*, bool);
template <int VP, int NB>
__attribute__((target("avx2,fma"))) void lut_block_fn(const float* T, int ng, const uint8_t* ir, int64_t irs,
                                                      float* accp, bool first) {
  lut_block<VP, NB>(T, ng, ir, irs, accp, first);
}
template <int VP>
LutBlockFn lut_tail(int64_t nb) {
  switch (nb) {
    case 1: return lut_block_fn<VP, 1>;
    case 2: return lut_block_fn<VP, 2>;
    case 3: return lut_block_fn<VP, 3>;
    case 4: return lut_block_fn<VP, 4>;
    case 5: return lut_block_fn<VP, 5>;
    case 6: return lut_block_fn<VP, 6>;
    case 7: return lut_block_fn<VP, 7>;
    case 8: return lut_block_fn<VP, 8>;
    case 9: return lut_block_fn<VP, 9>;
    case 10: return lut_block_fn<VP, 10>;
    default: return lut_block_fn<VP, 11>;
  }
}

// Tiles [tb, te) of 8*VP output pixels in flattened (n, oh, ow) order. T: 16 tables of 16 x 8*VP
// floats (32-byte aligned); acc: c_out x 8*VP floats (32-byte aligned).
template <int VP>
__attribute__((target("avx2,fma"))) void bwn_lut_range_avx2(const LutArgs& A, int64_t tb, int64_t te, float* T,
                                                            float* acc) {
  constexpr int PX = 8 * VP, NB = 12 / VP;
  const int64_t plane = A.OH * A.OW, HWp = A.Hp * A.Wp, KK = A.KH * A.KW, c_out = A.c_out;
  const __m256 sign = _mm256_set1_ps(-0.0f), zero = _mm256_setzero_ps(), slope = _mm256_set1_ps(0.1f);
  const LutBlockFn tail = c_out % NB ? lut_tail<VP>(c_out % NB) : nullptr;
  alignas(32) int32_t po[PX];
  int64_t ob[PX];
  int mode[VP];
  int64_t baseA[VP], baseB[VP];
  __m256 bmask[VP];
  __m256i vidx[VP];
  for (int64_t t = tb; t < te; ++t) {
    const int64_t q0 = t * PX, np = std::min<int64_t>(PX, A.total - q0);
    for (int l = 0; l < PX; ++l) {
      const int64_t q = q0 + std::min<int64_t>(l, np - 1);
      const int64_t n = q / plane, rem = q % plane, oh = rem / A.OW, ow = rem % A.OW;
      po[l] = (int32_t)(n * A.Cp * HWp + oh * A.stride * A.Wp + ow * A.stride);
      ob[l] = n * c_out * plane + rem;
    }
    // input lanes of each vector: one contiguous run (mode 1), two runs blended (2), a gather (3)
    for (int v = 0; v < VP; ++v) {
      const int32_t* pv = po + 8 * v;
      const int nl = (int)std::max<int64_t>(1, std::min<int64_t>(8, np - 8 * v));
      int m = 1, brk = 8;
      if (A.stride == 1) {
        for (int l = 1; l < nl; ++l)
          if (pv[l] != pv[l - 1] + 1) {
            if (brk == 8) brk = l, m = 2;
            else m = 3;
          }
      } else if (nl > 1) {
        m = 3;
      }
      mode[v] = m;
      baseA[v] = pv[0];
      baseB[v] = m == 2 ? pv[brk] - brk : 0;
      bmask[v] = _mm256_castsi256_ps(
          _mm256_cmpgt_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), _mm256_set1_epi32(brk - 1)));
      vidx[v] = _mm256_load_si256(reinterpret_cast<const __m256i*>(pv));
    }
#define KDBNN_LUT_LOAD(P, V)                                                                                  \
  (mode[V] == 1   ? _mm256_loadu_ps((P) + baseA[V])                                                          \
   : mode[V] == 2 ? _mm256_blendv_ps(_mm256_loadu_ps((P) + baseA[V]), _mm256_loadu_ps((P) + baseB[V]), bmask[V]) \
                  : _mm256_i32gather_ps((P), vidx[V], 4))
    for (int64_t kk = 0; kk < KK; ++kk) {
      const int64_t koff = (kk / A.KW) * A.Wp + (kk % A.KW);
      for (int64_t wi = 0; wi < A.nw; ++wi) {
        const int ng = (int)((std::min<int64_t>(64, A.C - wi * 64) + 3) / 4);
        const float* xb = A.X + wi * 64 * HWp + koff;
        for (int j = 0; j < ng; ++j, xb += 4 * HWp) {
          float* Tj = T + j * 16 * PX;
#pragma GCC unroll 4
          for (int v = 0; v < VP; ++v) {
            const __m256 x0 = KDBNN_LUT_LOAD(xb, v), x1 = KDBNN_LUT_LOAD(xb + HWp, v);
            const __m256 x2 = KDBNN_LUT_LOAD(xb + 2 * HWp, v), x3 = KDBNN_LUT_LOAD(xb + 3 * HWp, v);
            // pairs: p[i] for bits (b0, b1) of i; q[k] for bits (b2, b3); T[i + 4k] = p[i] + q[k]
            const __m256 p3 = _mm256_add_ps(x0, x1), p1 = _mm256_sub_ps(x0, x1);
            const __m256 p0 = _mm256_xor_ps(p3, sign), p2 = _mm256_xor_ps(p1, sign);
            const __m256 q3 = _mm256_add_ps(x2, x3), q1 = _mm256_sub_ps(x2, x3);
            const __m256 q0 = _mm256_xor_ps(q3, sign);
            float* e = Tj + 8 * v;
            // T[15 - s] = -T[s]: 8 adds, 8 sign flips
            __m256 y;
            y = _mm256_add_ps(p0, q0); _mm256_store_ps(e + 0 * PX, y); _mm256_store_ps(e + 15 * PX, _mm256_xor_ps(y, sign));
            y = _mm256_add_ps(p1, q0); _mm256_store_ps(e + 1 * PX, y); _mm256_store_ps(e + 14 * PX, _mm256_xor_ps(y, sign));
            y = _mm256_add_ps(p2, q0); _mm256_store_ps(e + 2 * PX, y); _mm256_store_ps(e + 13 * PX, _mm256_xor_ps(y, sign));
            y = _mm256_add_ps(p3, q0); _mm256_store_ps(e + 3 * PX, y); _mm256_store_ps(e + 12 * PX, _mm256_xor_ps(y, sign));
            y = _mm256_add_ps(p0, q1); _mm256_store_ps(e + 4 * PX, y); _mm256_store_ps(e + 11 * PX, _mm256_xor_ps(y, sign));
            y = _mm256_add_ps(p1, q1); _mm256_store_ps(e + 5 * PX, y); _mm256_store_ps(e + 10 * PX, _mm256_xor_ps(y, sign));
            y = _mm256_add_ps(p2, q1); _mm256_store_ps(e + 6 * PX, y); _mm256_store_ps(e + 9 * PX, _mm256_xor_ps(y, sign));
            y = _mm256_add_ps(p3, q1); _mm256_store_ps(e + 7 * PX, y); _mm256_store_ps(e + 8 * PX, _mm256_xor_ps(y, sign));
          }
        }
        const uint8_t* ir = A.idx + (kk * A.nw + wi) * c_out * 16;
        const bool first = kk == 0 && wi == 0;
        int64_t cb = 0;
        for (; cb + NB <= c_out; cb += NB) lut_block<VP, NB>(T, ng, ir + cb * 16, 16, acc + cb * PX, first);
        if (tail) tail(T, ng, ir + cb * 16, 16, acc + cb * PX, first);
      }
    }
#undef KDBNN_LUT_LOAD
    // epilogue: y = alpha * sum + bias, activation; 8 pixels of one channel per store
    bool contiguous[VP];
    for (int v = 0; v < VP; ++v) {
      contiguous[v] = np >= 8 * (v + 1);
      for (int l = 1; l < 8 && contiguous[v]; ++l) contiguous[v] = ob[8 * v + l] == ob[8 * v] + l;
    }
    for (int64_t c = 0; c < c_out; ++c) {
      const __m256 al = _mm256_set1_ps(A.alpha[c]), bi = _mm256_set1_ps(A.bias[c]);
      for (int v = 0; v < VP; ++v) {
        __m256 y = _mm256_fmadd_ps(_mm256_load_ps(acc + c * PX + 8 * v), al, bi);
        if (A.act == ACT_RELU) y = _mm256_max_ps(y, zero);
        else if (A.act == ACT_LEAKY) y = _mm256_add_ps(_mm256_max_ps(y, zero), _mm256_mul_ps(slope, _mm256_min_ps(y, zero)));
        if (contiguous[v]) {
          _mm256_storeu_ps(A.O + ob[8 * v] + c * plane, y);
        } else {
          alignas(32) float tmp[8];
          _mm256_store_ps(tmp, y);
          for (int64_t l = 8 * v; l < std::min<int64_t>(np, 8 * v + 8); ++l) A.O[ob[l] + c * plane] = tmp[l - 8 * v];
        }
      }
    }
  }
}

// Float NCHW input -> zero-padded NCHW copy with channels rounded up to 4 and slack for the
// 8-wide loads past the last pixel.
torch::Tensor lut_pad_input(const torch::Tensor& xf, int64_t pad, int64_t Cp) {
  const int64_t N = xf.size(0), C = xf.size(1), H = xf.size(2), W = xf.size(3), Hp = H + 2 * pad, Wp = W + 2 * pad;
  auto xp = torch::empty({N * Cp * Hp * Wp + 32}, torch::kFloat32);
  const float* src = xf.data_ptr<float>();
  float* dst = xp.data_ptr<float>();
  std::memset(dst + N * Cp * Hp * Wp, 0, sizeof(float) * 32);
  at::parallel_for(0, N * Cp, std::max<int64_t>(1, 65536 / (Hp * Wp)), [&](int64_t b, int64_t e) {
    for (int64_t nc = b; nc < e; ++nc) {
      const int64_t n = nc / Cp, c = nc % Cp;
      float* d = dst + nc * Hp * Wp;
      if (c >= C) {
        std::memset(d, 0, sizeof(float) * Hp * Wp);
        continue;
      }
      const float* s = src + (n * C + c) * H * W;
      std::memset(d, 0, sizeof(float) * (pad * Wp + pad));
      for (int64_t h = 0; h < H; ++h) {
        float* row = d + (h + pad) * Wp + pad;
        std::memcpy(row, s + h * W, sizeof(float) * W);
        if (h + 1 < H) std::memset(row + W, 0, sizeof(float) * 2 * pad);
      }
      std::memset(d + (H + pad - 1) * Wp + pad + W, 0, sizeof(float) * (pad * Wp + pad));
    }
  });
  return xp;
}

// Packed weights (C_out, KK, nw) -> lookup offsets [(kk*nw + wi)][c][16]: nibble j of word
// (c, kk, wi) times entry_bytes / 8 (the kernel addresses T + offset * 8). Nibble j of a word is
// the low (j even) or high half of byte j/2: mask, shift and interleave, 16 bytes per word.
std::vector<uint8_t> lut_indices(const uint64_t* wp, int64_t c_out, int64_t KK, int64_t nw, int entry_bytes) {
  std::vector<uint8_t> idx(KK * nw * c_out * 16);
  const int sh = entry_bytes == 64 ? 3 : 2;
  TORCH_CHECK(entry_bytes == 32 || entry_bytes == 64, "kd_bnn: bad LUT entry size ", entry_bytes);
  // ~16 bytes written per weight word: serial below 64K words (tens of microseconds)
  at::parallel_for(0, KK * nw, std::max<int64_t>(1, 65536 / std::max<int64_t>(1, c_out)), [&](int64_t b, int64_t e) {
    for (int64_t kw = b; kw < e; ++kw) {
      uint8_t* row = idx.data() + kw * c_out * 16;
      for (int64_t c = 0; c < c_out; ++c) {
        const uint64_t w = wp[c * KK * nw + kw];
#if defined(__SSE2__)
        const __m128i m = _mm_set1_epi8(0x0f), v = _mm_cvtsi64_si128((long long)w);
        const __m128i x = _mm_unpacklo_epi8(_mm_and_si128(v, m), _mm_and_si128(_mm_srli_epi16(v, 4), m));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(row + c * 16), _mm_slli_epi16(x, sh));
#else
        for (int j = 0; j < 16; ++j) row[c * 16 + j] = (uint8_t)(((w >> (4 * j)) & 15ULL) << sh);
#endif
      }
    }
  });
  return idx;
}

}  // namespace

// x: float (N, C, H, W); wpacked: int64 (C_out, KH*KW, nw); alpha: float (C_out).
// Returns float (N, C_out, OH, OW) = conv2d(x, alpha * sign(W), bias, stride, pad) -> activation.
torch::Tensor bwn_conv(torch::Tensor x, torch::Tensor wpacked, torch::Tensor alpha, c10::optional<torch::Tensor> bias,
                       int64_t KH, int64_t KW, int64_t stride, int64_t pad, int64_t act, int64_t isa) {
  TORCH_CHECK(x.dim() == 4, "kd_bnn.bwn_conv: expected input (N, C, H, W), found ", x.sizes());
  TORCH_CHECK(wpacked.dim() == 3 && wpacked.scalar_type() == torch::kInt64,
              "kd_bnn.bwn_conv: packed weight must be int64 (C_out, KH*KW, nw), found ", wpacked.sizes());
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const int64_t nw = (C + 63) / 64, KK = KH * KW, c_out = wpacked.size(0);
  TORCH_CHECK(wpacked.size(1) == KK && wpacked.size(2) == nw, "kd_bnn.bwn_conv: packed weight ", wpacked.sizes(),
              " does not match input channels ", C, " and kernel ", KH, "x", KW);
  TORCH_CHECK(alpha.numel() == c_out, "kd_bnn.bwn_conv: alpha has ", alpha.numel(), " values, expected ", c_out);
  TORCH_CHECK(act >= ACT_NONE && act <= ACT_LEAKY, "kd_bnn.bwn_conv: bad activation ", act);
  TORCH_CHECK(stride >= 1 && pad >= 0, "kd_bnn.bwn_conv: bad stride/pad ", stride, "/", pad);
  const int64_t Hp = H + 2 * pad, Wp = W + 2 * pad;
  TORCH_CHECK(Hp >= KH && Wp >= KW, "kd_bnn.bwn_conv: padded input smaller than kernel");
  const int64_t OH = (Hp - KH) / stride + 1, OW = (Wp - KW) / stride + 1;
  TORCH_CHECK(isa == ISA_SCALAR || cpu_has(isa), "kd_bnn: this CPU lacks the instructions of ISA path ", isa);
  // AVX2 and AVX-512 paths: the lookup-table kernel (AVX2 code; every AVX-512 CPU has AVX2)
  // (gathered lanes use 32-bit offsets: an input over 2^31 floats takes the portable path)
  const int64_t Cp = (C + 3) / 4 * 4;
  if (isa >= ISA_AVX2 && N * Cp * Hp * Wp + 32 < (int64_t)INT32_MAX) {
    TORCH_CHECK(cpu_has(ISA_AVX2), "kd_bnn.bwn_conv: the lookup-table kernel needs AVX2");
    auto xp = lut_pad_input(x.to(torch::kFloat32).contiguous(), pad, Cp);
    auto wpk = wpacked.contiguous();
    constexpr int VP = kLutVP;
    const std::vector<uint8_t> idx =
        lut_indices(reinterpret_cast<const uint64_t*>(wpk.data_ptr<int64_t>()), c_out, KK, nw, 32 * VP);
    auto a = alpha.to(torch::kFloat32).contiguous();
    std::vector<float> bi(c_out, 0.0f);
    if (bias.has_value() && bias->defined()) {
      auto s = bias->to(torch::kFloat32).contiguous();
      TORCH_CHECK(s.numel() == c_out, "kd_bnn.bwn_conv: bias has ", s.numel(), " values, expected ", c_out);
      std::memcpy(bi.data(), s.data_ptr<float>(), sizeof(float) * c_out);
    }
    auto out = torch::empty({N, c_out, OH, OW}, torch::kFloat32);
    LutArgs A{xp.data_ptr<float>(), Cp, Hp, Wp, OH, OW, stride, KH, KW, C, nw, c_out, N * OH * OW,
              idx.data(), a.data_ptr<float>(), bi.data(), act, out.data_ptr<float>()};
    const int64_t px = 8 * VP, n_tiles = (A.total + px - 1) / px;
    at::parallel_for(0, n_tiles, 1, [&](int64_t b, int64_t e) {
      std::vector<float> buf(16 * 16 * px + c_out * px + 16);
      float* T = reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(buf.data()) + 31) & ~uintptr_t(31));
      bwn_lut_range_avx2<VP>(A, b, e, T, T + 16 * 16 * px);
    });
    return out;
  }


  // zero-padded NHWC copy of the input
  auto xf = x.to(torch::kFloat32).contiguous();
  auto xp = torch::empty({N, Hp, Wp, C}, torch::kFloat32);
  {
    // zero-padded NHWC copy, transposed in 8-channel x 8-pixel blocks
    const float* src = xf.data_ptr<float>();
    float* dst = xp.data_ptr<float>();
    at::parallel_for(0, N * Hp, 1, [&](int64_t b, int64_t e) {
      for (int64_t nh = b; nh < e; ++nh) {
        const int64_t n = nh / Hp, h = nh % Hp - pad;
        float* row = dst + nh * Wp * C;
        if (h < 0 || h >= H) {
          std::memset(row, 0, sizeof(float) * Wp * C);
          continue;
        }
        std::memset(row, 0, sizeof(float) * pad * C);
        std::memset(row + (pad + W) * C, 0, sizeof(float) * pad * C);
        float* inner = row + pad * C;
        const float* s0 = src + (n * C * H + h) * W;
        for (int64_t c0 = 0; c0 < C; c0 += 8) {
          const int64_t c1 = std::min<int64_t>(C, c0 + 8);
          for (int64_t w0 = 0; w0 < W; w0 += 8) {
            const int64_t w1 = std::min<int64_t>(W, w0 + 8);
            for (int64_t w = w0; w < w1; ++w)
              for (int64_t c = c0; c < c1; ++c) inner[w * C + c] = s0[c * H * W + w];
          }
        }
      }
    });
  }
  auto a = alpha.to(torch::kFloat32).contiguous();
  std::vector<float> bi(c_out, 0.0f);
  if (bias.has_value() && bias->defined()) {
    auto s = bias->to(torch::kFloat32).contiguous();
    TORCH_CHECK(s.numel() == c_out, "kd_bnn.bwn_conv: bias has ", s.numel(), " values, expected ", c_out);
    std::memcpy(bi.data(), s.data_ptr<float>(), sizeof(float) * c_out);
  }
  auto wpk = wpacked.contiguous();
  auto out = torch::empty({N, c_out, OH, OW}, torch::kFloat32);
  const float* X = xp.data_ptr<float>();
  const uint64_t* Wb = reinterpret_cast<const uint64_t*>(wpk.data_ptr<int64_t>());
  const float* A = a.data_ptr<float>();
  float* O = out.data_ptr<float>();
  const int64_t K = KK * C, n_cb = (c_out + kCoBlock - 1) / kCoBlock;
  const int64_t row_stride = Wp * C, len = KW * C;

  // Pixel tiles run over the flattened (n, oh, ow) index, so rows whose width is not a multiple
  // of the tile (10, 20, 40, 80 with P = 6) waste no micro-kernel work.
  const int64_t plane = OH * OW, total = N * plane;
  at::parallel_for(0, n_cb, 1, [&](int64_t b, int64_t e) {
    std::vector<float> panel_buf(K * kCoBlock + 16);
    float* panel = panel_buf.data();
    alignas(64) float res[kMaxP * kCoBlock];
    int64_t obase[kMaxP];
    for (int64_t cb = b; cb < e; ++cb) {
      const int64_t co = cb * kCoBlock, nc = std::min<int64_t>(kCoBlock, c_out - co);
      unpack_panel_base(Wb, c_out, co, KK, nw, C, A, panel);
      FTile t;
      t.row_stride = row_stride;
      t.kh = KH;
      t.len = len;
      t.j0 = 0;
      t.j1 = len;
      t.accumulate = false;
      t.w = panel;
      t.out = res;
      for (int64_t q0 = 0; q0 < total; q0 += kPF) {
        const int64_t np = std::min<int64_t>(kPF, total - q0);
        for (int p = 0; p < kPF; ++p) {
          const int64_t q = q0 + std::min<int64_t>(p, np - 1);
          const int64_t n = q / plane, rem = q % plane, oh = rem / OW, ow = rem % OW;
          t.in[p] = X + ((n * Hp + oh * stride) * Wp + ow * stride) * C;
          obase[p] = (n * c_out + co) * plane + rem;
        }
        ftile_scalar(t);
        for (int64_t c = 0; c < nc; ++c) {
          const float bc = bi[co + c];
          for (int64_t p = 0; p < np; ++p) {
            const float v = res[p * kCoBlock + c] + bc;
            O[obase[p] + c * plane] = act == ACT_RELU    ? std::max(v, 0.f)
                                      : act == ACT_LEAKY ? std::max(v, 0.f) + 0.1f * std::min(v, 0.f)
                                                         : v;
          }
        }
      }
    }
  });
  return out;
}

bool has_isa(int64_t isa) { return cpu_has(isa); }

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "kd_bnn binary convolution kernels (XNOR popcount conv, BWN conv)";
  m.def("has_isa", &has_isa, "whether the CPU supports ISA path code (0 scalar, 1 popcnt, 2 avx2, 3 avx512)");
  m.def("pack_input", &pack_input, "binarize and pack (N,C,H,W) float -> padded NHWC int64 words");
  m.def("pad_packed", &pad_packed, "pad packed NHWC words with +1/-1 pad words");
  m.def("xnor_conv", &xnor_conv, "XNOR popcount convolution on packed NHWC input");
  m.def("bwn_conv", &bwn_conv, "float x packed-binary-weight convolution");
}
