// kd_bnn kernels: AVX2 lookup-table BWN conv (the avx2 and avx512 paths of bwn_conv).
//
// BWN conv = float activations x binary weights alpha[c]*sign(W) (Xu et al., ICRA 2019; the BWN
// case of XNOR-Net). bwn.cpp prepares the zero-padded NCHW input and the per-call weight
// offsets (LutArgs in common.h) and runs this kernel over tiles of output pixels; weights stay
// bit-packed, only one offset byte per 4 weights (1/16 of a float copy) is derived per call.
// Every AVX-512 CPU has AVX2, so the avx512 path runs this code too.
// The whole file is empty on a non-x86 build.

#include "dispatch.h"

#if KDBNN_X86

namespace kdbnn {

namespace {

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

}  // namespace

const BwnLutKernel kBwnLutAvx2 = {bwn_lut_range_avx2<kLutVP>, 8 * kLutVP};

}  // namespace kdbnn

#endif  // KDBNN_X86
