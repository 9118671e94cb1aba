// kd_bnn kernels: XNOR convolution driver (binary activations x binary weights).
//
// XNOR-Net (Rastegari et al., ECCV 2016): activations and weights are bit-packed along channels
// (bit 1 = +1, LSB first, padding bits 0, see kd_bnn/deploy/pack.py), and the dot product over
// K = C_in*KH*KW terms is dot = K - 2 * popcount(a XOR w). The packed input is NHWC, pre-padded
// with the pad value's words (pack.cpp), so a KW-wide window row is KW*nw contiguous words for
// any stride: a direct conv with no im2col. The weights are laid out as a panel
// (KH*KW*nw, C_out rounded up to 16) so one vector load gives one word of several output
// channels; the ISA's micro-kernel (xnor_scalar.cpp, xnor_x86.cpp) returns the popcounts of P
// pixels x 16 output channels.
//
// Fused epilogue: out = dot*scale[c] + bias[c], activation, then float NCHW output, int32 dot
// products, or re-binarized packed NHWC output (optionally pre-padded for the next XNOR layer).
// xnor_conv_ex adds, for packed chains: a per-channel map of the output (a fused multiply-add, or
// a table looked up by popcount), a residual added and the signs of the sums taken in the
// transposed stores (write_rows_ex), float and packed outputs from one pass, given popcount bounds.
// Paths with a vector epilogue (AVX2: xnor_epilogue_x86.cpp) work on pixel-major tiles and
// write NCHW rows through register transposes; the portable epilogue (transform16 below, SSE2 on
// x86-64) goes through a channel-major buffer. The re-packed output of a vector epilogue compares
// each popcount with per-channel integer bounds that are exactly equivalent to
// "transform(dot) >= 0" (sign_bounds; finite scale/bias, else the float test).

#include "dispatch.h"
#include "ops.h"

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>

#include <cmath>
#include <vector>

namespace kdbnn {

// The portable transform below (and sign_bounds) must round like torch's dot.float() * scale +
// bias: no fused multiply-add. On x86-64 nothing here is compiled with FMA; elsewhere (e.g.
// AArch64, where compilers contract a*b+c by default) contraction is switched off for this file.
#if !KDBNN_X86
#if defined(__clang__)
#pragma clang fp contract(off)
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=off")
#endif
#endif

namespace {

// Fused output transform of 16 channels: v = (K - 2*cnt) * scale + bias, then activation
// (leaky: max(v,0) + 0.1*min(v,0), which equals v > 0 ? v : 0.1*v up to the sign of zero).
// Returns the sign mask (bit c set where v[c] >= 0). Plain SSE2 (baseline x86-64): no FMA, so
// the rounding matches torch's dot.float() * scale + bias exactly.
inline uint32_t transform16(const uint32_t* cnt, float K, const float* sc, const float* bi, int64_t act,
                            float* v) {
#if KDBNN_SSE2
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
#endif  // KDBNN_SSE2
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

}  // namespace

namespace {

// What one call writes besides the mode's output (xnor_conv_ex): a residual added to the float
// output, the float and the packed outputs together, explicit popcount bounds for the packed bits.
struct XnorExtras {
  const float* res = nullptr;   // float (N, C_out, OH, OW) added after the activation, or null
  bool both = false;            // float output and packed signs of it in one pass
  const int32_t* lo = nullptr;  // packed bit = lo[c] <= popcount <= hi[c] (given bounds), or null
  const int32_t* hi = nullptr;
  // A per-channel function f of the transformed output, instead of it (then the residual):
  // f(v) = fma(v, aff_a[c], aff_b[c]) where aff_a[c] is a number, else table row row_of[c] looked
  // up by popcount, table[row_of[c] * (K + 1) + popcount] (xnor_conv_ex)
  bool mapped = false;
  const float* aff_a = nullptr;  // c_out values, or null: every channel tabulated
  const float* aff_b = nullptr;
  const float* table = nullptr;
  const int32_t* row_of = nullptr;  // c_out values, -1 for an affine channel
};

std::vector<at::Tensor> xnor_conv_impl(at::Tensor xpad, at::Tensor panel, int64_t c_out, int64_t c_in, int64_t KH,
                                       int64_t KW, int64_t stride, const c10::optional<at::Tensor>& scale,
                                       const c10::optional<at::Tensor>& bias, int64_t act, int64_t mode,
                                       int64_t out_pad, double out_pad_value, int64_t isa, const XnorExtras& ex) {
  TORCH_CHECK(xpad.dim() == 4 && xpad.scalar_type() == at::kLong,
              "kd_bnn.xnor_conv: packed input must be int64 (N, Hp, Wp, nw), found ", xpad.sizes(), " ",
              xpad.scalar_type());
  TORCH_CHECK(panel.dim() == 2 && panel.scalar_type() == at::kLong,
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
  const bool want_float = mode == MODE_FLOAT || ex.both, want_packed = mode == MODE_PACKED || ex.both;
  if (want_packed) check_pad_value(out_pad_value);
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
    auto s = scale->to(at::kFloat).contiguous();
    TORCH_CHECK(s.numel() == c_out, "kd_bnn.xnor_conv: scale has ", s.numel(), " values, expected ", c_out);
    std::memcpy(sc.data(), s.data_ptr<float>(), sizeof(float) * c_out);
  }
  if (bias.has_value() && bias->defined()) {
    auto s = bias->to(at::kFloat).contiguous();
    TORCH_CHECK(s.numel() == c_out, "kd_bnn.xnor_conv: bias has ", s.numel(), " values, expected ", c_out);
    std::memcpy(bi.data(), s.data_ptr<float>(), sizeof(float) * c_out);
  }

  const IsaKernels& kern = isa_kernels(isa);
  const XTileFn fn = kern.xnor->fn;
  const int P = kern.xnor->p;

  at::Tensor out, out_p;
  const int64_t nwo = (c_out + 63) / 64;
  const int64_t OHp = OH + 2 * out_pad, OWp = OW + 2 * out_pad;
  if (mode == MODE_INT) out = at::empty({N, c_out, OH, OW}, at::kInt);
  else if (want_float) out = new_output(N, c_out, OH, OW);
  if (want_packed) out_p = at::empty({N, OHp, OWp, nwo}, at::kLong);

  int32_t* out_i = mode == MODE_INT ? out.data_ptr<int32_t>() : nullptr;
  float* out_f = want_float ? out.data_ptr<float>() : nullptr;
  const uint64_t* X = reinterpret_cast<const uint64_t*>(xpad.data_ptr<int64_t>());
  const uint64_t* Wt = reinterpret_cast<const uint64_t*>(panel.data_ptr<int64_t>());
  const int64_t row_stride = Wp * nw, len = KW * nw;
  const bool plus_out = out_pad_value > 0;

  if (want_packed && out_pad > 0) {
    uint64_t* o = reinterpret_cast<uint64_t*>(out_p.data_ptr<int64_t>());
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
  uint64_t* out_pk = want_packed ? reinterpret_cast<uint64_t*>(out_p.data_ptr<int64_t>()) : nullptr;
  // ISAs with a vector epilogue (avx2, avx512: the AVX2 one) transform and transpose pixel-major
  // tiles with it; the others (scalar, popcnt) keep the portable (SSE2) epilogue with a
  // channel-major buffer
  const XnorEpilogue* epi = kern.xnor_epilogue;
  const bool vec_epi = epi != nullptr;
  std::vector<int32_t> lo_b(c_out + kCoBlock, 1), hi_b(c_out + kCoBlock, 0);
  const bool given_bounds = ex.lo != nullptr;
  if (given_bounds) {
    std::memcpy(lo_b.data(), ex.lo, sizeof(int32_t) * c_out);
    std::memcpy(hi_b.data(), ex.hi, sizeof(int32_t) * c_out);
  }
  // packed bits in the tile loop: by popcount bounds (given, or sign_bounds of the transform on
  // a vector epilogue) or by the float test (portable epilogue); "both" without given bounds
  // takes the signs of the final float outputs (residual added) in the row pass instead
  const bool tile_bits = mode == MODE_PACKED || (ex.both && given_bounds);
  const bool use_bounds =
      given_bounds ||
      (vec_epi && mode == MODE_PACKED && sign_bounds(K, sc.data(), bi.data(), act, c_out, lo_b.data(), hi_b.data()));
  const bool row_bits = ex.both && !given_bounds;
  // mapped output: per-channel affine coefficients (padded to whole 16-channel blocks) and, per
  // block, the mask of tabulated channels
  std::vector<float> aff_a(ex.mapped ? c_out + kCoBlock : 0, 0.f), aff_b(aff_a.size(), 0.f);
  std::vector<uint32_t> tab_mask(ex.mapped ? (c_out + kCoBlock - 1) / kCoBlock : 0, 0u);
  if (ex.mapped) {
    for (int64_t c = 0; c < c_out; ++c) {
      if (ex.row_of[c] >= 0) {
        tab_mask[c / kCoBlock] |= 1u << (c % kCoBlock);
      } else {
        aff_a[c] = ex.aff_a[c];
        aff_b[c] = ex.aff_b[c];
      }
    }
    for (int64_t c = c_out; c < (int64_t)tab_mask.size() * kCoBlock; ++c) tab_mask[c / kCoBlock] |= 1u << (c % kCoBlock);
  }
  at::parallel_for(0, n_blocks, 1, [&](int64_t b, int64_t e) {
    alignas(64) uint32_t cnt[kMaxP * kCoBlock];
    std::vector<uint64_t> bits;  // packed output of the block: block * nwo words
    if (want_packed) bits.resize(block * nwo);
    std::vector<uint32_t> rmask(row_bits ? block : 0);  // sign masks of one 16-channel slice, per pixel
    // float / int results of one 16-channel slice: pixel-major [i][16] on a vector epilogue
    // (written out through 8x8 transposes), channel-major [c][block] otherwise (one contiguous
    // copy per channel run)
    std::vector<float> fbuf(want_float ? kCoBlock * block : 0);
    std::vector<int32_t> ibuf(mode == MODE_INT ? kCoBlock * block : 0);
    std::vector<const uint64_t*> inp(block + kMaxP);
    for (int64_t blk = b; blk < e; ++blk) {
      const int64_t q_begin = blk * block, q_end = std::min<int64_t>(total, q_begin + block), nb = q_end - q_begin;
      if (want_packed) std::fill(bits.begin(), bits.end(), 0ULL);
      {  // window pointers of the block's pixels (the last one repeated for a partial tile); the
         // pixel's (n, oh, ow) advanced by a counter, not divided out per pixel
        int64_t n = q_begin / plane, oh = (q_begin % plane) / OW, ow = q_begin % OW;
        for (int64_t i = 0; i < nb; ++i) {
          inp[i] = X + ((n * Hp + oh * stride) * Wp + ow * stride) * nw;
          if (++ow == OW) {
            ow = 0;
            if (++oh == OH) oh = 0, ++n;
          }
        }
        for (int64_t i = nb; i < nb + P; ++i) inp[i] = inp[nb - 1];
      }
      for (int64_t co = 0; co < c_out; co += kCoBlock) {
        const int64_t nc = std::min<int64_t>(kCoBlock, c_out - co);
        const float* scp = sc.data() + co;
        const float* bip = bi.data() + co;
        const uint64_t keep = nc < kCoBlock ? (1ULL << nc) - 1ULL : 0xFFFFULL;
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
          if (tile_bits && (vec_epi || use_bounds)) {
            uint32_t masks[kMaxP];
            if (use_bounds) {
              if (vec_epi) {
                epi->bounds_mask_px(cnt, np, lo_b.data() + co, hi_b.data() + co, masks);
              } else {
                for (int64_t p = 0; p < np; ++p) {
                  uint32_t m = 0;
                  for (int c = 0; c < kCoBlock; ++c) {
                    const int32_t v = (int32_t)cnt[p * kCoBlock + c];
                    m |= (uint32_t)(lo_b[co + c] <= v && v <= hi_b[co + c]) << c;
                  }
                  masks[p] = m;
                }
              }
            } else {
              epi->sign_mask_px(cnt, np, Kf, scp, bip, act_c, masks);
            }
            for (int64_t p = 0; p < np; ++p) bits[(i0 + p) * nwo + (co >> 6)] |= ((uint64_t)masks[p] & keep) << (co & 63);
            if (mode == MODE_PACKED) continue;
          }
          if (ex.mapped) {  // a per-channel function of the output: affine (vector) or tabulated
            const uint32_t tab = tab_mask[co / kCoBlock];
            if (vec_epi) {
              float* dst = fbuf.data() + i0 * kCoBlock;
              epi->transform_px(cnt, np, Kf, scp, bip, act_c, dst);
              if (tab != 0xFFFFu) {
                if (epi->affine_px != nullptr) {
                  epi->affine_px(dst, np, aff_a.data() + co, aff_b.data() + co);
                } else {
                  for (int64_t p = 0; p < np; ++p)
                    for (int c = 0; c < kCoBlock; ++c)
                      dst[p * kCoBlock + c] = std::fma(dst[p * kCoBlock + c], aff_a[co + c], aff_b[co + c]);
                }
              }
              for (uint32_t t = tab & ((1u << nc) - 1u); t != 0; t &= t - 1) {
                const int c = __builtin_ctz(t);
                const float* row = ex.table + (int64_t)ex.row_of[co + c] * (K + 1);
                for (int64_t p = 0; p < np; ++p) dst[p * kCoBlock + c] = row[cnt[p * kCoBlock + c]];
              }
            } else {
              for (int64_t p = 0; p < np; ++p) {
                alignas(64) float v[kCoBlock];
                transform16(cnt + p * kCoBlock, Kf, scp, bip, act_c, v);
                for (int64_t c = 0; c < nc; ++c)
                  fbuf[c * block + i0 + p] =
                      (tab >> c) & 1u ? ex.table[(int64_t)ex.row_of[co + c] * (K + 1) + cnt[p * kCoBlock + c]]
                                      : std::fma(v[c], aff_a[co + c], aff_b[co + c]);
              }
            }
            continue;
          }
          if (vec_epi) {
            if (want_float) {
              epi->transform_px(cnt, np, Kf, scp, bip, act_c, fbuf.data() + i0 * kCoBlock);
            } else if (mode == MODE_INT) {
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
            if (want_float) {
              for (int64_t c = 0; c < nc; ++c) fbuf[c * block + i0 + p] = v[c];
            } else if (!use_bounds) {
              bits[(i0 + p) * nwo + (co >> 6)] |= ((uint64_t)sm & keep) << (co & 63);
            }
          }
        }
        if (mode != MODE_PACKED) {
          // runs of the block inside one image are contiguous in each output channel plane
          for (int64_t q = q_begin; q < q_end;) {
            const int64_t n = q / plane, rem = q % plane, run = std::min<int64_t>(q_end, (n + 1) * plane) - q;
            const int64_t o = (n * c_out + co) * plane + rem, i = q - q_begin;
            if (vec_epi && (ex.res != nullptr || row_bits)) {
              // the residual added and the signs taken in the transposed stores
              epi->write_rows_ex(fbuf.data() + i * kCoBlock, run, nc, out_f + o, plane,
                                 ex.res != nullptr ? ex.res + o : nullptr, row_bits ? rmask.data() : nullptr);
              if (row_bits)
                for (int64_t k = 0; k < run; ++k) bits[(i + k) * nwo + (co >> 6)] |= (uint64_t)rmask[k] << (co & 63);
              q += run;
              continue;
            }
            if (vec_epi) {
              // pixel-major buffers; int32 counts move through the float transpose bit for bit
              const float* src = want_float ? fbuf.data() : reinterpret_cast<const float*>(ibuf.data());
              float* dst = want_float ? out_f + o : reinterpret_cast<float*>(out_i + o);
              epi->write_rows(src + i * kCoBlock, run, nc, dst, plane);
            } else {
              for (int64_t c = 0; c < nc; ++c) {
                if (want_float) std::memcpy(out_f + o + c * plane, fbuf.data() + c * block + i, sizeof(float) * run);
                else std::memcpy(out_i + o + c * plane, ibuf.data() + c * block + i, sizeof(int32_t) * run);
              }
            }
            if (ex.res != nullptr || row_bits) {
              // residual add after the activation (the same float add as torch's y + r), then the
              // sign bits of the final values: one pass over the rows just written (L1-hot)
              if (row_bits) std::fill(rmask.begin(), rmask.begin() + run, 0u);
              for (int64_t c = 0; c < nc; ++c) {
                float* __restrict row = out_f + o + c * plane;
                if (ex.res != nullptr) {
                  const float* __restrict rr = ex.res + o + c * plane;
                  for (int64_t k = 0; k < run; ++k) row[k] = row[k] + rr[k];
                }
                if (row_bits) {
                  uint32_t* __restrict m = rmask.data();
                  for (int64_t k = 0; k < run; ++k) m[k] |= (uint32_t)(row[k] >= 0.f) << c;
                }
              }
              if (row_bits)
                for (int64_t k = 0; k < run; ++k) bits[(i + k) * nwo + (co >> 6)] |= (uint64_t)rmask[k] << (co & 63);
            }
            q += run;
          }
        }
      }
      if (want_packed) {  // the block's words into the (padded) packed output, a row run at a time
        int64_t n = q_begin / plane, oh = (q_begin % plane) / OW, ow = q_begin % OW;
        for (int64_t q = q_begin; q < q_end;) {
          const int64_t run = std::min<int64_t>(q_end - q, OW - ow);
          std::memcpy(out_pk + ((n * OHp + oh + out_pad) * OWp + ow + out_pad) * nwo, bits.data() + (q - q_begin) * nwo,
                      sizeof(uint64_t) * nwo * run);
          q += run;
          ow = 0;
          if (++oh == OH) oh = 0, ++n;
        }
      }
    }
  });
  if (ex.both) return {out, out_p};
  return {mode == MODE_PACKED ? out_p : out};
}

}  // namespace

// xpad: int64 (N, Hp, Wp, nw) packed input, already padded.
// panel: int64 (KH*KW*nw, CoP) weight panel, CoP = C_out rounded up to 16 (weight_panel in kernels/__init__.py).
// Returns: MODE_INT int32 (N, C_out, OH, OW) dot products; MODE_FLOAT float32 (N, C_out, OH, OW)
// after scale/bias/activation; MODE_PACKED int64 (N, OH+2*op, OW+2*op, ceil(C_out/64)) signs of
// the transformed output, padded with out_pad_value words.
at::Tensor xnor_conv(at::Tensor xpad, at::Tensor panel, int64_t c_out, int64_t c_in,
                     int64_t KH, int64_t KW, int64_t stride, c10::optional<at::Tensor> scale,
                     c10::optional<at::Tensor> bias, int64_t act, int64_t mode, int64_t out_pad,
                     double out_pad_value, int64_t isa) {
  return xnor_conv_impl(xpad, panel, c_out, c_in, KH, KW, stride, scale, bias, act, mode, out_pad, out_pad_value, isa,
                        XnorExtras{})[0];
}

// The fused epilogue for packed chains: float output act(transform(dot)) + residual (when given,
// float (N, C_out, OH, OW)), and with both=true also the packed signs of that float output in the
// same pass, or, with bounds (int32 (C_out,) lo, hi), packed bits lo[c] <= popcount <= hi[c]
// (a sign test of any monotone function of the output, e.g. the next layer's BatchNorm), or only
// those packed bits (want_float false). Returns [float], [packed] or [float, packed], packed
// (N, OH+2*op, OW+2*op, nwo). A per-channel function f of the float output v = act(transform(dot))
// replaces it (then the residual): with affine_a/affine_b (float (C_out,)), f(v) = fma(v, a[c], b[c])
// in channels where a[c] is a number (the caller checked that this equals f on every value v can
// take: kernels.output_affine), and in the channels where a[c] is NaN, in channel order, the rows
// of table (float (rows, K + 1)): f(v) = table[row][popcount]; without affine_a, table is
// (C_out, K + 1), one row per channel (any f tabulated exactly; scale, bias and activation are
// then still applied first).
std::vector<at::Tensor> xnor_conv_ex(at::Tensor xpad, at::Tensor panel, int64_t c_out, int64_t c_in, int64_t KH,
                                     int64_t KW, int64_t stride, c10::optional<at::Tensor> scale,
                                     c10::optional<at::Tensor> bias, int64_t act, c10::optional<at::Tensor> residual,
                                     bool want_float, bool want_packed, c10::optional<at::Tensor> lo, c10::optional<at::Tensor> hi,
                                     c10::optional<at::Tensor> table, c10::optional<at::Tensor> affine_a,
                                     c10::optional<at::Tensor> affine_b, int64_t out_pad, double out_pad_value,
                                     int64_t isa) {
  TORCH_CHECK(want_float || want_packed, "kd_bnn.xnor_conv_ex: nothing to output");
  XnorExtras ex;
  ex.both = want_float && want_packed;
  at::Tensor res, lo_t, hi_t;
  const int64_t nw = (c_in + 63) / 64;
  TORCH_CHECK(xpad.dim() == 4 && xpad.size(3) == nw, "kd_bnn.xnor_conv_ex: bad packed input ", xpad.sizes());
  const int64_t OH = (xpad.size(1) - KH) / std::max<int64_t>(stride, 1) + 1;
  const int64_t OW = (xpad.size(2) - KW) / std::max<int64_t>(stride, 1) + 1;
  if (residual.has_value() && residual->defined()) {
    res = residual->to(at::kFloat).contiguous();
    TORCH_CHECK(res.dim() == 4 && res.size(0) == xpad.size(0) && res.size(1) == c_out && res.size(2) == OH &&
                    res.size(3) == OW,
                "kd_bnn.xnor_conv_ex: residual must be float (", xpad.size(0), ", ", c_out, ", ", OH, ", ", OW,
                "), found ", residual->sizes());
    ex.res = res.data_ptr<float>();
  }
  const bool has_lo = lo.has_value() && lo->defined(), has_hi = hi.has_value() && hi->defined();
  TORCH_CHECK(has_lo == has_hi, "kd_bnn.xnor_conv_ex: give both popcount bounds or neither");
  if (has_lo) {
    TORCH_CHECK(want_packed, "kd_bnn.xnor_conv_ex: popcount bounds define a packed output: want_packed must be set");
    TORCH_CHECK(ex.res == nullptr, "kd_bnn.xnor_conv_ex: popcount bounds cannot see a residual");
    lo_t = lo->to(at::kInt).contiguous();
    hi_t = hi->to(at::kInt).contiguous();
    TORCH_CHECK(lo_t.numel() == c_out && hi_t.numel() == c_out, "kd_bnn.xnor_conv_ex: bounds need ", c_out,
                " values each");
    ex.lo = lo_t.data_ptr<int32_t>();
    ex.hi = hi_t.data_ptr<int32_t>();
  }
  TORCH_CHECK(want_float || ex.res == nullptr, "kd_bnn.xnor_conv_ex: a residual needs the float output");
  at::Tensor tab, aff_a, aff_b;
  const bool has_table = table.has_value() && table->defined();
  const bool has_aff = affine_a.has_value() && affine_a->defined();
  TORCH_CHECK(has_aff == (affine_b.has_value() && affine_b->defined()),
              "kd_bnn.xnor_conv_ex: give both affine coefficients or neither");
  std::vector<int32_t> row_of;
  if (has_table || has_aff) {
    TORCH_CHECK(want_float && !has_lo, "kd_bnn.xnor_conv_ex: an output table needs the float output and no bounds");
    row_of.assign(c_out, -1);
    int64_t rows = c_out;
    if (has_aff) {
      aff_a = affine_a->to(at::kFloat).contiguous();
      aff_b = affine_b->to(at::kFloat).contiguous();
      TORCH_CHECK(aff_a.numel() == c_out && aff_b.numel() == c_out, "kd_bnn.xnor_conv_ex: affine coefficients need ",
                  c_out, " values each");
      const float* a = aff_a.data_ptr<float>();
      rows = 0;
      for (int64_t c = 0; c < c_out; ++c)
        if (std::isnan(a[c])) row_of[c] = (int32_t)rows++;
      ex.aff_a = a;
      ex.aff_b = aff_b.data_ptr<float>();
    } else {
      for (int64_t c = 0; c < c_out; ++c) row_of[c] = (int32_t)c;
    }
    if (rows > 0) {
      TORCH_CHECK(has_table, "kd_bnn.xnor_conv_ex: ", rows, " tabulated channels need an output table");
      tab = table->to(at::kFloat).contiguous();
      TORCH_CHECK(tab.dim() == 2 && tab.size(0) == rows && tab.size(1) == c_in * KH * KW + 1,
                  "kd_bnn.xnor_conv_ex: output table must be float (", rows, ", ", c_in * KH * KW + 1, "), found ",
                  tab.sizes());
      ex.table = tab.data_ptr<float>();
    }
    ex.mapped = true;
    ex.row_of = row_of.data();
  }
  return xnor_conv_impl(xpad, panel, c_out, c_in, KH, KW, stride, scale, bias, act, want_float ? MODE_FLOAT : MODE_PACKED,
                        out_pad, out_pad_value, isa, ex);
}

}  // namespace kdbnn
