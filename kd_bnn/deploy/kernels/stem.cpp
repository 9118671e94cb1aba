// kd_bnn kernels: float conv with few input channels (a detector's "stem"), driver + portable
// row kernel.
//
//   out[n, co, oh, ow] = act(bias[co] + sum_{c, kh, kw} w[co, c, kh, kw] * x[n, c, oh*s - p + kh, ow*s - p + kw])
//
// C_in <= 8, KH, KW <= 7, stride 1 or 2, symmetric zero padding, float NCHW in and out. General
// conv code (im2col + GEMM, or mkldnn) is poor at C_in = 3: its reduction is only 27 long. Here
// the conv is direct and vectorised over the output width instead: per output row, the KH input
// rows of every input channel are copied once into zero-padded "phase rows" (stride 2: the even
// and the odd columns as two rows), so tap (c, kh, kw) of 16 (8, 4) consecutive outputs is one
// contiguous unaligned load, borders included. The row kernel keeps a block of output channels x
// a few vectors of outputs in registers, broadcasts each weight and accumulates with FMA, then
// adds the bias, applies the activation and stores (stem_x86.cpp: AVX-512F with 8 channels x 3
// zmm, AVX2+FMA with 4 channels x 3 ymm; this file: SSE2 (or plain C++) with 4 channels x 2
// vectors of 4, multiply then add). Column tiles are the outer loop and the channel blocks the
// inner one, so one tile's input window stays in L1 for all of them.
//
// Work items: (n, output row, chunk of channel blocks) with the chunks inner (one chunk, all
// blocks, unless there are fewer than 4 rows per thread); a thread rebuilds its phase rows when
// its row changes.
//
// Rounding: each output is a sequential sum of its K = C_in*KH*KW products (one FMA, or a
// multiply and an add, per product), then + bias, then the activation (leaky: y < 0 ? y*0.1f : y),
// so |out - exact| <= (2K + 4) * 2^-24 * (sum |w||x| + |bias|) with exact computed in real
// arithmetic (slope 0.1f); F.conv2d re-associates differently, so the two agree within the sum of
// their bounds, not bit for bit.

#include "dispatch.h"
#include "ops.h"

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>

#include <memory>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace kdbnn {

// A fresh float (N, C, H, W) output (declared in ops.h, used by the stem, pointwise and XNOR
// float outputs). One of kHugeMin bytes or more is cut at a 2 MB boundary from an allocation 2 MB
// larger, and that range advised MADV_HUGEPAGE (Linux; transparent huge pages in "madvise" or
// "always" mode, else a no-op): first-touch page faults were most of the time of the big early
// layers (a fresh mapping on every call above glibc's mmap threshold; a 1x32x384x1248 output,
// 61 MB: ~15 k faults of 4 KB, ~20 ms on one Zen 5 VM thread, vs ~4 ms of compute with AVX-512;
// 2 MB pages: ~30 faults, ~3 ms; a 30 MB XNOR output: ~10 ms -> ~2 ms). The tensor is then a
// contiguous view with a storage offset.
at::Tensor new_output(int64_t N, int64_t C, int64_t H, int64_t W) {
  const int64_t numel = N * C * H * W;
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr int64_t kHuge = int64_t(2) << 20, kHugeMin = int64_t(4) << 20;
  if (numel * int64_t(sizeof(float)) >= kHugeMin) {
    auto raw = at::empty({numel + kHuge / int64_t(sizeof(float))}, at::kFloat);
    const uintptr_t p = reinterpret_cast<uintptr_t>(raw.data_ptr<float>());
    const uintptr_t a = (p + kHuge - 1) & ~uintptr_t(kHuge - 1);  // p is 64-byte aligned
    madvise(reinterpret_cast<void*>(a), size_t(numel * int64_t(sizeof(float))) & ~size_t(kHuge - 1),
            MADV_HUGEPAGE);  // advice only: failure (no THP) changes nothing
    return raw.narrow(0, int64_t(a - p) / int64_t(sizeof(float)), numel).view({N, C, H, W});
  }
#endif
  return at::empty({N, C, H, W}, at::kFloat);
}

namespace {

// ---------------------------------------------------------------- portable row kernel
// 4 floats: SSE2 where the compiler targets it (x86-64 always), else plain C++.
struct V4 {
  using T = V4;
  static constexpr int L = 4;
#if KDBNN_SSE2
  __m128 v;
  static V4 zero() { return {_mm_setzero_ps()}; }
  static V4 loadu(const float* p) { return {_mm_loadu_ps(p)}; }
  static V4 set1(float a) { return {_mm_set1_ps(a)}; }
  static V4 madd(V4 a, V4 b, V4 c) { return {_mm_add_ps(_mm_mul_ps(a.v, b.v), c.v)}; }
  // bias + activation (relu: y < 0 ? 0 : y, leaky: y < 0 ? y*0.1f : y; NaN kept), then store the
  // first n lanes (n <= 4)
  static void store_act(float* p, V4 acc, float bias, int64_t act, int n) {
    __m128 y = _mm_add_ps(acc.v, _mm_set1_ps(bias));
    const __m128 z = _mm_setzero_ps();
    if (act == ACT_RELU) {
      y = _mm_max_ps(z, y);  // the second operand when unordered: NaN stays NaN
    } else if (act == ACT_LEAKY) {
      const __m128 neg = _mm_cmplt_ps(y, z);
      y = _mm_or_ps(_mm_and_ps(neg, _mm_mul_ps(y, _mm_set1_ps(0.1f))), _mm_andnot_ps(neg, y));
    }
    if (n == L) {
      _mm_storeu_ps(p, y);
    } else {
      alignas(16) float t[L];
      _mm_store_ps(t, y);
      for (int l = 0; l < n; ++l) p[l] = t[l];
    }
  }
#else
  float v[4];
  static V4 zero() { return {{0.f, 0.f, 0.f, 0.f}}; }
  static V4 loadu(const float* p) { return {{p[0], p[1], p[2], p[3]}}; }
  static V4 set1(float a) { return {{a, a, a, a}}; }
  static V4 madd(V4 a, V4 b, V4 c) {
    V4 r;
    for (int l = 0; l < 4; ++l) r.v[l] = a.v[l] * b.v[l] + c.v[l];
    return r;
  }
  static void store_act(float* p, V4 acc, float bias, int64_t act, int n) {
    for (int l = 0; l < n; ++l) {
      const float y = acc.v[l] + bias;
      p[l] = act == ACT_RELU ? (y < 0.f ? 0.f : y) : act == ACT_LEAKY ? (y < 0.f ? y * 0.1f : y) : y;
    }
  }
#endif
};

#define KDBNN_STEM_TILE_INL inline
#define KDBNN_STEM_TILE_FN
#include "stem_tile.h"
#undef KDBNN_STEM_TILE_FN
#undef KDBNN_STEM_TILE_INL

constexpr int kPortCB = 4, kPortNV = 2;

void row_portable(const StemRow& r) { stem_row<V4, kPortCB, kPortNV>(r); }

}  // namespace

const StemKernel kStemPortable = {row_portable, kPortCB};

namespace {

// 2x2 max of conv rows r0, r1 (r1 null: the row below the map, -inf in Darknet) -> PW outputs;
// column 2*PW - 1 >= OW (the overhanging window of an odd width) is -inf too. NaN propagates (as
// torch.maximum).
inline float max_nan(float a, float b) { return (a > b || a != a) ? a : b; }

void pool_row(const float* r0, const float* r1, int64_t OW, int64_t PW, float* out) {
  const int64_t full = std::min(PW, OW / 2);  // windows with both columns inside
  int64_t p = 0;
#if KDBNN_SSE2
  for (; p + 4 <= full; p += 4) {
    __m128 a = _mm_loadu_ps(r0 + 2 * p), b = _mm_loadu_ps(r0 + 2 * p + 4);
    if (r1 != nullptr) {
      const __m128 c = _mm_loadu_ps(r1 + 2 * p), d = _mm_loadu_ps(r1 + 2 * p + 4);
      // max keeping NaN of either operand: max(x, y) returns y when unordered, so pick x where x is NaN
      __m128 m = _mm_max_ps(a, c);
      a = _mm_or_ps(_mm_and_ps(_mm_cmpunord_ps(a, a), a), _mm_andnot_ps(_mm_cmpunord_ps(a, a), m));
      m = _mm_max_ps(b, d);
      b = _mm_or_ps(_mm_and_ps(_mm_cmpunord_ps(b, b), b), _mm_andnot_ps(_mm_cmpunord_ps(b, b), m));
    }
    const __m128 ev = _mm_shuffle_ps(a, b, _MM_SHUFFLE(2, 0, 2, 0)), od = _mm_shuffle_ps(a, b, _MM_SHUFFLE(3, 1, 3, 1));
    const __m128 m = _mm_max_ps(ev, od);
    const __m128 nan = _mm_cmpunord_ps(ev, ev);
    _mm_storeu_ps(out + p, _mm_or_ps(_mm_and_ps(nan, ev), _mm_andnot_ps(nan, m)));
  }
#endif
  for (; p < PW; ++p) {
    const int64_t c0 = 2 * p;
    float v = r0[c0];
    if (r1 != nullptr) v = max_nan(v, r1[c0]);
    if (c0 + 1 < OW) {
      v = max_nan(v, r0[c0 + 1]);
      if (r1 != nullptr) v = max_nan(v, r1[c0 + 1]);
    }
    out[p] = v;
  }
}

}  // namespace

// x: float (N, C, H, W), C <= 8; w: float (C_out, C, KH, KW), KH, KW <= 7; bias: (C_out) or none.
// Returns float (N, C_out, OH, OW) = act(conv2d(x, w, bias, stride, pad)), stride 1 or 2.
// pool_pad 0 or 1: then Darknet's size-2 stride-2 max-pool with that padding (windows at 2*o,
// taps past the map -inf) is applied too, and only the pooled map (N, C_out, (OH + pool_pad - 2)
// / 2 + 1, same for W) is written: each work item computes the two conv rows of one pooled row
// into per-thread scratch and stores their 2x2 maxima (max is exact: the same values as conv ->
// activation -> pool). pool_pad -1: no pool.
at::Tensor stem_conv(at::Tensor x, at::Tensor w, c10::optional<at::Tensor> bias, int64_t stride, int64_t pad,
                     int64_t act, int64_t isa, int64_t pool_pad) {
  TORCH_CHECK(x.dim() == 4, "kd_bnn.stem_conv: expected input (N, C, H, W), found ", x.sizes());
  TORCH_CHECK(w.dim() == 4, "kd_bnn.stem_conv: expected weight (C_out, C, KH, KW), found ", w.sizes());
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const int64_t c_out = w.size(0), KH = w.size(2), KW = w.size(3);
  TORCH_CHECK(w.size(1) == C, "kd_bnn.stem_conv: weight ", w.sizes(), " does not match input channels ", C);
  TORCH_CHECK(C >= 1 && C <= 8, "kd_bnn.stem_conv: input channels must be 1..8, found ", C);
  TORCH_CHECK(KH >= 1 && KH <= 7 && KW >= 1 && KW <= 7, "kd_bnn.stem_conv: kernel must be at most 7x7, found ",
              KH, "x", KW);
  TORCH_CHECK(stride == 1 || stride == 2, "kd_bnn.stem_conv: stride must be 1 or 2, found ", stride);
  TORCH_CHECK(pad >= 0 && pad <= 64, "kd_bnn.stem_conv: padding must be 0..64, found ", pad);
  TORCH_CHECK(act >= ACT_NONE && act <= ACT_LEAKY, "kd_bnn.stem_conv: bad activation ", act);
  TORCH_CHECK(pool_pad >= -1 && pool_pad <= 1, "kd_bnn.stem_conv: pool padding must be -1 (none), 0 or 1, found ",
              pool_pad);
  const int64_t Hp = H + 2 * pad, Wp = W + 2 * pad;
  TORCH_CHECK(Hp >= KH && Wp >= KW, "kd_bnn.stem_conv: padded input smaller than kernel");
  const int64_t OH = (Hp - KH) / stride + 1, OW = (Wp - KW) / stride + 1;
  const bool pooled = pool_pad >= 0;
  const int64_t PH = pooled ? (OH + pool_pad - 2) / 2 + 1 : OH, PW = pooled ? (OW + pool_pad - 2) / 2 + 1 : OW;
  TORCH_CHECK(PH >= 1 && PW >= 1, "kd_bnn.stem_conv: conv output ", OH, "x", OW, " too small for the pool");
  const StemKernel& ker = *isa_kernels(isa).stem;  // checks the code and the CPU

  auto out = new_output(N, c_out, PH, PW);
  if (N == 0 || c_out == 0) return out;
  auto xf = x.to(at::kFloat).contiguous();
  auto wf = w.to(at::kFloat).contiguous();
  const int64_t CB = ker.cb, nblk = (c_out + CB - 1) / CB, K = C * KH * KW;

  // weights [block][tap][CB] and biases [block][CB], zero past c_out
  std::vector<float> wb(nblk * K * CB, 0.0f), bb(nblk * CB, 0.0f);
  const float* W0 = wf.data_ptr<float>();
  for (int64_t co = 0; co < c_out; ++co)
    for (int64_t k = 0; k < K; ++k) wb[((co / CB) * K + k) * CB + co % CB] = W0[co * K + k];
  if (bias.has_value() && bias->defined()) {
    auto s = bias->to(at::kFloat).contiguous();
    TORCH_CHECK(s.numel() == c_out, "kd_bnn.stem_conv: bias has ", s.numel(), " values, expected ", c_out);
    const float* B0 = s.data_ptr<float>();
    for (int64_t co = 0; co < c_out; ++co) bb[co] = B0[co];
  }

  // phase rows: kernels read up to 16 lanes past the last output and (KW - 1) / stride further
  const int64_t Lp = (OW + (KW - 1) / stride + 15) / 16 * 16 + 16;
  const int64_t n_phase = C * KH * stride;
  std::vector<int64_t> off(K);
  for (int64_t c = 0; c < C; ++c)
    for (int64_t kh = 0; kh < KH; ++kh)
      for (int64_t kw = 0; kw < KW; ++kw)
        off[(c * KH + kh) * KW + kw] = ((c * KH + kh) * stride + kw % stride) * Lp + kw / stride;

  const float* X = xf.data_ptr<float>();
  float* O = out.data_ptr<float>();
  const int64_t plane = PH * PW, threads = at::get_num_threads();
  const int64_t rows = N * PH;  // work rows: output rows, or pooled rows (two conv rows each)
  // channel-block chunks only when there are too few rows for the threads (never when pooled)
  int64_t n_chunks = 1;
  if (!pooled && threads > 1 && rows < 4 * threads) n_chunks = std::min<int64_t>(nblk, (4 * threads + rows - 1) / rows);
  const int64_t per_chunk = (nblk + n_chunks - 1) / n_chunks;
  n_chunks = (nblk + per_chunk - 1) / per_chunk;
  const int64_t OWs = (OW + 15) / 16 * 16;  // scratch row stride of the pooled path

  // the phase rows of conv output row (n, oh) into buf
  auto build_phase = [&](float* buf, int64_t n, int64_t oh) {
    for (int64_t c = 0; c < C; ++c) {
      for (int64_t kh = 0; kh < KH; ++kh) {
        const int64_t ih = oh * stride - pad + kh;
        const float* src = X + ((n * C + c) * H + std::max<int64_t>(0, std::min(ih, H - 1))) * W;
        for (int64_t p = 0; p < stride; ++p) {
          float* dst = buf + ((c * KH + kh) * stride + p) * Lp;
          if (ih < 0 || ih >= H) {
            std::memset(dst, 0, sizeof(float) * Lp);
          } else if (stride == 1) {
            const int64_t lo = std::min(pad, Lp), hi = std::min(pad + W, Lp);
            std::memset(dst, 0, sizeof(float) * lo);
            std::memcpy(dst + lo, src, sizeof(float) * (hi - lo));
            std::memset(dst + hi, 0, sizeof(float) * (Lp - hi));
          } else {
            for (int64_t j = 0; j < Lp; ++j) {
              const int64_t iw = stride * j + p - pad;
              dst[j] = iw >= 0 && iw < W ? src[iw] : 0.0f;
            }
          }
        }
      }
    }
  };

  at::parallel_for(0, rows * n_chunks, 1, [&](int64_t b, int64_t e) {
    std::unique_ptr<float[]> mem(new float[n_phase * Lp + 16]);  // every phase row written before read
    float* buf = reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(mem.get()) + 63) & ~uintptr_t(63));
    std::unique_ptr<float[]> scratch(pooled ? new float[c_out * 2 * OWs] : nullptr);  // [c][2 rows][OWs]
    StemRow r;
    r.buf = buf;
    r.off = off.data();
    r.K = K;
    r.OW = OW;
    r.act = act;
    int64_t cur = -1;
    for (int64_t it = b; it < e; ++it) {
      const int64_t row = it / n_chunks, ch = it % n_chunks, n = row / PH, oh = row % PH;
      if (pooled) {
        r.w = wb.data();
        r.bias = bb.data();
        r.nb = nblk;
        r.nc = c_out;
        r.plane = 2 * OWs;
        const bool two = 2 * oh + 1 < OH;  // else the row below is -inf (odd OH, pool_pad 1)
        for (int64_t k = 0; k < (two ? 2 : 1); ++k) {
          build_phase(buf, n, 2 * oh + k);
          r.out = scratch.get() + k * OWs;
          ker.row(r);
        }
        for (int64_t c = 0; c < c_out; ++c) {
          const float* s0 = scratch.get() + c * 2 * OWs;
          pool_row(s0, two ? s0 + OWs : nullptr, OW, PW, O + (n * c_out + c) * plane + oh * PW);
        }
        continue;
      }
      if (row != cur) {  // the phase rows of output row (n, oh)
        cur = row;
        build_phase(buf, n, oh);
      }
      const int64_t b0 = ch * per_chunk, nb = std::min(per_chunk, nblk - b0);
      r.w = wb.data() + b0 * K * CB;
      r.bias = bb.data() + b0 * CB;
      r.nb = nb;
      r.nc = c_out - b0 * CB;
      r.out = O + (n * c_out + b0 * CB) * plane + oh * OW;
      r.plane = plane;
      ker.row(r);
    }
  });
  return out;
}

}  // namespace kdbnn

namespace kdbnn {

// The stem row kernel's channels per block (the weight layout pointwise_conv takes).
int64_t stem_block(int64_t isa) { return isa_kernels(isa).stem->cb; }

// 1x1 float conv (stride 1, no padding) on the stem row kernels: the flattened H*W plane is one
// "row" and tap k is input channel k (off[k] = k * plane), read in place (no phase rows). A tile
// of 3 vectors x one channel block keeps its accumulators in registers over all C_in taps, so
// each output is one sequential sum of its C_in products (FMA), then + bias, then the activation
// (the stem's rounding bound with K = C_in). Column chunks of whole tiles are the work items; the
// last plane % 16 columns go through a zero-padded copy (the kernels load whole vectors, which
// would read past the last channel's row).
// x: float (N, C, H, W); wb: float (nblk, C, cb) weights blocked as the ISA's stem kernel reads
// them (cb = stem_block(isa), output channels past c_out zero); bias: (nblk * cb) or none.
at::Tensor pointwise_conv(at::Tensor x, at::Tensor wb, c10::optional<at::Tensor> bias, int64_t c_out, int64_t act,
                          int64_t isa) {
  TORCH_CHECK(x.dim() == 4, "kd_bnn.pointwise_conv: expected input (N, C, H, W), found ", x.sizes());
  const StemKernel& ker = *isa_kernels(isa).stem;
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), CB = ker.cb;
  const int64_t nblk = (c_out + CB - 1) / CB;
  TORCH_CHECK(wb.dim() == 3 && wb.size(0) == nblk && wb.size(1) == C && wb.size(2) == CB &&
                  wb.scalar_type() == at::kFloat && wb.is_contiguous(),
              "kd_bnn.pointwise_conv: weights must be contiguous float (", nblk, ", ", C, ", ", CB, "), found ",
              wb.sizes());
  TORCH_CHECK(act >= ACT_NONE && act <= ACT_LEAKY, "kd_bnn.pointwise_conv: bad activation ", act);
  std::vector<float> bb(nblk * CB, 0.0f);
  if (bias.has_value() && bias->defined()) {
    auto s = bias->to(at::kFloat).contiguous();
    TORCH_CHECK(s.numel() == c_out, "kd_bnn.pointwise_conv: bias has ", s.numel(), " values, expected ", c_out);
    std::copy(s.data_ptr<float>(), s.data_ptr<float>() + c_out, bb.begin());
  }
  auto out = new_output(N, c_out, H, W);
  const int64_t P = H * W;
  if (N == 0 || c_out == 0 || P == 0) return out;
  auto xf = x.to(at::kFloat).contiguous();
  const float* X = xf.data_ptr<float>();
  float* O = out.data_ptr<float>();
  constexpr int64_t kTail = 16;
  const int64_t pm = P - P % kTail, rem = P - pm;
  std::vector<int64_t> off(C), off_tail(C);
  for (int64_t k = 0; k < C; ++k) {
    off[k] = k * P;
    off_tail[k] = k * kTail;
  }
  // chunks of 48 columns (a multiple of every kernel's tile), >= 4 items per thread when possible
  const int64_t threads = at::get_num_threads(), tile = 48;
  const int64_t tiles = (pm + tile - 1) / tile;
  const int64_t per = std::max<int64_t>(1, tiles / std::max<int64_t>(1, 4 * threads / std::max<int64_t>(1, N)));
  const int64_t chunks = pm > 0 ? (tiles + per - 1) / per : 0;
  const int64_t items = N * (chunks + (rem > 0 ? 1 : 0));
  at::parallel_for(0, items, 1, [&](int64_t b, int64_t e) {
    std::vector<float> tail;
    for (int64_t it = b; it < e; ++it) {
      const int64_t per_n = chunks + (rem > 0 ? 1 : 0), n = it / per_n, j = it % per_n;
      StemRow r;
      r.K = C;
      r.w = wb.data_ptr<float>();
      r.bias = bb.data();
      r.nb = nblk;
      r.nc = c_out;
      r.act = act;
      r.plane = P;
      if (j < chunks) {
        const int64_t c0 = j * per * tile, c1 = std::min(pm, c0 + per * tile);
        r.buf = X + n * C * P + c0;
        r.off = off.data();
        r.OW = c1 - c0;
        r.out = O + n * c_out * P + c0;
      } else {  // the last rem (< 16) columns from a zero-padded copy
        tail.assign(C * kTail, 0.0f);
        for (int64_t k = 0; k < C; ++k)
          std::memcpy(tail.data() + k * kTail, X + (n * C + k) * P + pm, sizeof(float) * rem);
        r.buf = tail.data();
        r.off = off_tail.data();
        r.OW = rem;
        r.out = O + n * c_out * P + pm;
      }
      ker.row(r);
    }
  });
  return out;
}

}  // namespace kdbnn
