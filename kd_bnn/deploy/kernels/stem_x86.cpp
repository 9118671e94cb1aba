// kd_bnn kernels: AVX2+FMA and AVX-512F row kernels of the small-C_in float conv (stem.cpp).
//
// One output row for a run of output-channel blocks, from the zero-padded phase rows stem.cpp
// prepares (layout in dispatch.h, StemRow): per tile of NV vectors of consecutive outputs and
// block of CB output channels, CB x NV accumulators stay in registers; each tap loads NV input
// vectors (contiguous, unaligned) and each of its CB weights is broadcast once and multiplied into
// the NV vectors with FMA. Then bias, activation (relu: max(0, y); leaky: y < 0 ? y*0.1f : y, NaN
// kept) and the store, the row's last partial vector masked. Tiles of NV vectors first, then
// tiles of one vector for the row's tail.
//   avx512  16 floats per zmm, CB = 8 channels x NV = 3 vectors: 24 accumulators of the 32 zmm,
//           3 input vectors, the weight broadcasts folded into vfmadd231ps {1to16}
//   avx2    8 floats per ymm, CB = 4 x NV = 3: 12 accumulators + 3 inputs + 1 broadcast of 16 ymm
//
// The tile code (stem_tile.h, shared with the portable path) is compiled twice with different target
// attributes: this file includes itself (KDBNN_STEM_X86_PASS set) once per ISA, into namespaces
// stem_avx2 and stem_avx512 (a template cannot take a target attribute as a parameter, and
// inlining the target-specific intrinsics needs the caller to carry the target). The whole file
// is empty on a non-x86 build.

#include "dispatch.h"

#if KDBNN_X86

#ifndef KDBNN_STEM_X86_PASS  // ------------------------------------------------ first inclusion

namespace kdbnn {

namespace {

#define KDBNN_STEM_INL2 __attribute__((target("avx2,fma"), always_inline)) inline
#define KDBNN_STEM_INL512 __attribute__((target("avx512f"), always_inline)) inline

struct VAvx2 {
  using T = __m256;
  static constexpr int L = 8, kCB = 4, kNV = 3;
  KDBNN_STEM_INL2 static T zero() { return _mm256_setzero_ps(); }
  KDBNN_STEM_INL2 static T loadu(const float* p) { return _mm256_loadu_ps(p); }
  KDBNN_STEM_INL2 static T set1(float a) { return _mm256_set1_ps(a); }
  KDBNN_STEM_INL2 static T madd(T a, T b, T c) { return _mm256_fmadd_ps(a, b, c); }
  // bias + activation, then store the first n lanes (n <= L)
  KDBNN_STEM_INL2 static void store_act(float* p, T acc, float bias, int64_t act, int n) {
    __m256 y = _mm256_add_ps(acc, _mm256_set1_ps(bias));
    const __m256 z = _mm256_setzero_ps();
    if (act == ACT_RELU) {
      y = _mm256_max_ps(z, y);  // the second operand when unordered: NaN stays NaN
    } else if (act == ACT_LEAKY) {
      y = _mm256_blendv_ps(y, _mm256_mul_ps(y, _mm256_set1_ps(0.1f)), _mm256_cmp_ps(y, z, _CMP_LT_OQ));
    }
    if (n == L) {
      _mm256_storeu_ps(p, y);
    } else {
      alignas(32) static const int32_t kMask[16] = {-1, -1, -1, -1, -1, -1, -1, -1, 0, 0, 0, 0, 0, 0, 0, 0};
      _mm256_maskstore_ps(p, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(kMask + 8 - n)), y);
    }
  }
};

struct VAvx512 {
  using T = __m512;
  static constexpr int L = 16, kCB = 8, kNV = 3;
  KDBNN_STEM_INL512 static T zero() { return _mm512_setzero_ps(); }
  KDBNN_STEM_INL512 static T loadu(const float* p) { return _mm512_loadu_ps(p); }
  KDBNN_STEM_INL512 static T set1(float a) { return _mm512_set1_ps(a); }
  KDBNN_STEM_INL512 static T madd(T a, T b, T c) { return _mm512_fmadd_ps(a, b, c); }
  KDBNN_STEM_INL512 static void store_act(float* p, T acc, float bias, int64_t act, int n) {
    __m512 y = _mm512_add_ps(acc, _mm512_set1_ps(bias));
    const __m512 z = _mm512_setzero_ps();
    if (act == ACT_RELU) {
      y = _mm512_max_ps(z, y);  // NaN stays NaN
    } else if (act == ACT_LEAKY) {
      y = _mm512_mask_mul_ps(y, _mm512_cmp_ps_mask(y, z, _CMP_LT_OQ), y, _mm512_set1_ps(0.1f));
    }
    if (n == L) {
      _mm512_storeu_ps(p, y);
    } else {
      _mm512_mask_storeu_ps(p, (__mmask16)((1u << n) - 1u), y);
    }
  }
};

#undef KDBNN_STEM_INL2
#undef KDBNN_STEM_INL512

}  // namespace

}  // namespace kdbnn

#define KDBNN_STEM_X86_PASS 1
#define KDBNN_STEM_FN __attribute__((target("avx2,fma")))
#define KDBNN_STEM_V VAvx2
#define KDBNN_STEM_NS stem_avx2
#include "stem_x86.cpp"
#undef KDBNN_STEM_FN
#undef KDBNN_STEM_V
#undef KDBNN_STEM_NS

#define KDBNN_STEM_FN __attribute__((target("avx512f")))
#define KDBNN_STEM_V VAvx512
#define KDBNN_STEM_NS stem_avx512
#include "stem_x86.cpp"
#undef KDBNN_STEM_FN
#undef KDBNN_STEM_V
#undef KDBNN_STEM_NS

namespace kdbnn {

const StemKernel kStemAvx2 = {stem_avx2::row, VAvx2::kCB};
const StemKernel kStemAvx512 = {stem_avx512::row, VAvx512::kCB};

}  // namespace kdbnn

#else  // KDBNN_STEM_X86_PASS ------------------------------- the tile code, once per ISA pass

namespace kdbnn {

namespace {

namespace KDBNN_STEM_NS {

using V = KDBNN_STEM_V;

#define KDBNN_STEM_TILE_INL KDBNN_STEM_FN __attribute__((always_inline)) inline
#define KDBNN_STEM_TILE_FN KDBNN_STEM_FN
#include "stem_tile.h"
#undef KDBNN_STEM_TILE_FN
#undef KDBNN_STEM_TILE_INL

KDBNN_STEM_FN void row(const StemRow& r) { stem_row<V, V::kCB, V::kNV>(r); }

}  // namespace KDBNN_STEM_NS

}  // namespace

}  // namespace kdbnn

#endif  // KDBNN_STEM_X86_PASS

#endif  // KDBNN_X86
