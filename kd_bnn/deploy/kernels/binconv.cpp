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
// BWN conv (float activations x packed binary weights, Xu et al. ICRA 2019 / XNOR-Net BWN):
//   direct conv on zero-padded NHWC float input; each 16-output-channel weight panel is
//   unpacked from bits to +-alpha floats on the fly into a thread-local buffer (the weights are
//   held 32x smaller at rest; the transient panel is K*16 floats) and consumed by an FMA
//   micro-kernel (6 pixels x 16 channels).

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
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
constexpr int kPAvx2 = 2;
__attribute__((target("avx2,popcnt"))) void xtile_avx2(const XTile& t) {
  const __m256i lut = _mm256_setr_epi8(0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4,
                                       0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4);
  const __m256i low = _mm256_set1_epi8(0x0f);
  const __m256i zero = _mm256_setzero_si256();
  __m256i tot[kPAvx2][4];
  for (int p = 0; p < kPAvx2; ++p)
    for (int v = 0; v < 4; ++v) tot[p][v] = zero;
  __m256i b[kPAvx2][4];
  for (int64_t r = 0; r < t.kh; ++r) {
    const uint64_t* wr = t.w + r * t.len * t.w_stride;
    const int64_t off = r * t.row_stride;
    const uint64_t* a0p = t.in[0] + off;
    const uint64_t* a1p = t.in[1] + off;
    // byte counters grow by <= 8 per step: flush to 64-bit lanes at least every 31 steps
    for (int64_t j0 = 0; j0 < t.len; j0 += 31) {
      const int64_t j1 = std::min<int64_t>(t.len, j0 + 31);
      for (int v = 0; v < 4; ++v) b[0][v] = b[1][v] = zero;
      for (int64_t j = j0; j < j1; ++j) {
        const uint64_t* wk = wr + j * t.w_stride;
        const __m256i a0 = _mm256_set1_epi64x((long long)a0p[j]);
        const __m256i a1 = _mm256_set1_epi64x((long long)a1p[j]);
        for (int v = 0; v < 4; ++v) {
          const __m256i wv = _mm256_loadu_si256((const __m256i*)(wk + 4 * v));
          const __m256i x0 = _mm256_xor_si256(a0, wv);
          const __m256i x1 = _mm256_xor_si256(a1, wv);
          b[0][v] = _mm256_add_epi8(b[0][v], _mm256_add_epi8(_mm256_shuffle_epi8(lut, _mm256_and_si256(x0, low)),
                                             _mm256_shuffle_epi8(lut, _mm256_and_si256(_mm256_srli_epi16(x0, 4), low))));
          b[1][v] = _mm256_add_epi8(b[1][v], _mm256_add_epi8(_mm256_shuffle_epi8(lut, _mm256_and_si256(x1, low)),
                                             _mm256_shuffle_epi8(lut, _mm256_and_si256(_mm256_srli_epi16(x1, 4), low))));
        }
      }
      for (int v = 0; v < 4; ++v) {
        tot[0][v] = _mm256_add_epi64(tot[0][v], _mm256_sad_epu8(b[0][v], zero));
        tot[1][v] = _mm256_add_epi64(tot[1][v], _mm256_sad_epu8(b[1][v], zero));
      }
    }
  }
  alignas(32) uint64_t buf[4];
  for (int p = 0; p < kPAvx2; ++p)
    for (int v = 0; v < 4; ++v) {
      _mm256_store_si256((__m256i*)buf, tot[p][v]);
      for (int i = 0; i < 4; ++i) t.out[p * kCoBlock + 4 * v + i] = (uint32_t)buf[i];
    }
}

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
  at::parallel_for(0, N * Hp, 1, [&](int64_t b, int64_t e) {
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
      pack_row_nchw(xp + n * C * H * W + h * W, H * W, C, W, inner);
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
  at::parallel_for(0, n_blocks, 1, [&](int64_t b, int64_t e) {
    alignas(64) uint32_t cnt[kMaxP * kCoBlock];
    std::vector<uint64_t> bits;  // packed output of the block: block * nwo words
    if (mode == MODE_PACKED) bits.resize(block * nwo);
    int64_t obase[kMaxP];
    for (int64_t blk = b; blk < e; ++blk) {
      const int64_t q_begin = blk * block, q_end = std::min<int64_t>(total, q_begin + block);
      if (mode == MODE_PACKED) std::fill(bits.begin(), bits.end(), 0ULL);
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
        for (int64_t q0 = q_begin; q0 < q_end; q0 += P) {
          const int64_t np = std::min<int64_t>(P, q_end - q0);
          for (int p = 0; p < P; ++p) {
            const int64_t q = q0 + std::min<int64_t>(p, np - 1);
            const int64_t n = q / plane, rem = q % plane, oh = rem / OW, ow = rem % OW;
            t.in[p] = X + ((n * Hp + oh * stride) * Wp + ow * stride) * nw;
            obase[p] = (n * c_out + co) * plane + rem;
          }
          fn(t);
          for (int64_t p = 0; p < np; ++p) {
            const uint32_t* cp = cnt + p * kCoBlock;
            if (mode == MODE_INT) {
              for (int64_t c = 0; c < nc; ++c) out_i[obase[p] + c * plane] = (int32_t)(K - 2 * (int64_t)cp[c]);
              continue;
            }
            alignas(64) float v[kCoBlock];
            const uint32_t sm = transform16(cp, Kf, scp, bip, act_c, v);
            if (mode == MODE_FLOAT) {
              for (int64_t c = 0; c < nc; ++c) out_f[obase[p] + c * plane] = v[c];
            } else {
              uint64_t m = sm;
              if (nc < kCoBlock) m &= (1ULL << nc) - 1ULL;
              bits[(q0 - q_begin + p) * nwo + (co >> 6)] |= m << (co & 63);
            }
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

__attribute__((target("avx2"))) void unpack_panel_avx2(const uint64_t* wp, int64_t c_out, int64_t co, int64_t KK,
                                                       int64_t nw, int64_t c_in, const float* alpha, float* dst) {
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
using FTileFn = void (*)(const FTile&);

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

__attribute__((target("avx2,fma"))) void ftile_avx2(const FTile& t) {
  // 12 accumulators as named locals so they stay in registers (arrays got spilled every step)
  __m256 c00 = _mm256_setzero_ps(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00;
  __m256 c30 = c00, c31 = c00, c40 = c00, c41 = c00, c50 = c00, c51 = c00;
  if (t.accumulate) {
    const float* o = t.out;
    c00 = _mm256_loadu_ps(o + 0); c01 = _mm256_loadu_ps(o + 8);
    c10 = _mm256_loadu_ps(o + 16); c11 = _mm256_loadu_ps(o + 24);
    c20 = _mm256_loadu_ps(o + 32); c21 = _mm256_loadu_ps(o + 40);
    c30 = _mm256_loadu_ps(o + 48); c31 = _mm256_loadu_ps(o + 56);
    c40 = _mm256_loadu_ps(o + 64); c41 = _mm256_loadu_ps(o + 72);
    c50 = _mm256_loadu_ps(o + 80); c51 = _mm256_loadu_ps(o + 88);
  }
  for (int64_t r = 0; r < t.kh; ++r) {
    const float* wr = t.w + r * t.len * kCoBlock;
    const int64_t off = r * t.row_stride;
    const float* i0 = t.in[0] + off; const float* i1 = t.in[1] + off; const float* i2 = t.in[2] + off;
    const float* i3 = t.in[3] + off; const float* i4 = t.in[4] + off; const float* i5 = t.in[5] + off;
    for (int64_t j = t.j0; j < t.j1; ++j) {
      const __m256 w0 = _mm256_loadu_ps(wr + j * kCoBlock);
      const __m256 w1 = _mm256_loadu_ps(wr + j * kCoBlock + 8);
      __m256 a;
      a = _mm256_broadcast_ss(i0 + j); c00 = _mm256_fmadd_ps(a, w0, c00); c01 = _mm256_fmadd_ps(a, w1, c01);
      a = _mm256_broadcast_ss(i1 + j); c10 = _mm256_fmadd_ps(a, w0, c10); c11 = _mm256_fmadd_ps(a, w1, c11);
      a = _mm256_broadcast_ss(i2 + j); c20 = _mm256_fmadd_ps(a, w0, c20); c21 = _mm256_fmadd_ps(a, w1, c21);
      a = _mm256_broadcast_ss(i3 + j); c30 = _mm256_fmadd_ps(a, w0, c30); c31 = _mm256_fmadd_ps(a, w1, c31);
      a = _mm256_broadcast_ss(i4 + j); c40 = _mm256_fmadd_ps(a, w0, c40); c41 = _mm256_fmadd_ps(a, w1, c41);
      a = _mm256_broadcast_ss(i5 + j); c50 = _mm256_fmadd_ps(a, w0, c50); c51 = _mm256_fmadd_ps(a, w1, c51);
    }
  }
  float* o = t.out;
  _mm256_storeu_ps(o + 0, c00); _mm256_storeu_ps(o + 8, c01);
  _mm256_storeu_ps(o + 16, c10); _mm256_storeu_ps(o + 24, c11);
  _mm256_storeu_ps(o + 32, c20); _mm256_storeu_ps(o + 40, c21);
  _mm256_storeu_ps(o + 48, c30); _mm256_storeu_ps(o + 56, c31);
  _mm256_storeu_ps(o + 64, c40); _mm256_storeu_ps(o + 72, c41);
  _mm256_storeu_ps(o + 80, c50); _mm256_storeu_ps(o + 88, c51);
}

__attribute__((target("avx512f"))) void ftile_avx512(const FTile& t) {
  __m512 c0 = _mm512_setzero_ps(), c1 = c0, c2 = c0, c3 = c0, c4 = c0, c5 = c0;
  if (t.accumulate) {
    c0 = _mm512_loadu_ps(t.out + 0); c1 = _mm512_loadu_ps(t.out + 16); c2 = _mm512_loadu_ps(t.out + 32);
    c3 = _mm512_loadu_ps(t.out + 48); c4 = _mm512_loadu_ps(t.out + 64); c5 = _mm512_loadu_ps(t.out + 80);
  }
  for (int64_t r = 0; r < t.kh; ++r) {
    const float* wr = t.w + r * t.len * kCoBlock;
    const int64_t off = r * t.row_stride;
    const float* i0 = t.in[0] + off; const float* i1 = t.in[1] + off; const float* i2 = t.in[2] + off;
    const float* i3 = t.in[3] + off; const float* i4 = t.in[4] + off; const float* i5 = t.in[5] + off;
    for (int64_t j = t.j0; j < t.j1; ++j) {
      const __m512 w0 = _mm512_loadu_ps(wr + j * kCoBlock);
      c0 = _mm512_fmadd_ps(_mm512_set1_ps(i0[j]), w0, c0);
      c1 = _mm512_fmadd_ps(_mm512_set1_ps(i1[j]), w0, c1);
      c2 = _mm512_fmadd_ps(_mm512_set1_ps(i2[j]), w0, c2);
      c3 = _mm512_fmadd_ps(_mm512_set1_ps(i3[j]), w0, c3);
      c4 = _mm512_fmadd_ps(_mm512_set1_ps(i4[j]), w0, c4);
      c5 = _mm512_fmadd_ps(_mm512_set1_ps(i5[j]), w0, c5);
    }
  }
  float* o = t.out;
  _mm512_storeu_ps(o + 0, c0); _mm512_storeu_ps(o + 16, c1); _mm512_storeu_ps(o + 32, c2);
  _mm512_storeu_ps(o + 48, c3); _mm512_storeu_ps(o + 64, c4); _mm512_storeu_ps(o + 80, c5);
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
  FTileFn fn = isa == ISA_AVX512 ? ftile_avx512 : (isa >= ISA_AVX2 ? ftile_avx2 : ftile_scalar);


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
      (isa >= ISA_AVX2 ? unpack_panel_avx2 : unpack_panel_base)(Wb, c_out, co, KK, nw, C, A, panel);
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
        fn(t);
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
