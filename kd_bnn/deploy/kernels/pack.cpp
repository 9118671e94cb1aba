// kd_bnn kernels: binarize + pack float input, pad packed input (portable).
//
// Packed layout (shared with kd_bnn/deploy/pack.py): activations are bit-packed along channels
// into int64 words, bit 1 = +1 (x >= 0), LSB first, padding bits 0; tensors are NHWC words
// (N, H, W, nw = ceil(C/64)). The XNOR conv reads a pre-padded input whose border holds the
// words of the pad value (+1: all valid bits set, -1: all zero), so a KW-wide window row is KW*nw
// contiguous words for any stride. The row packer is per ISA (dispatch.cpp picks the best the
// CPU has; the AVX2 one is in pack_x86.cpp); the portable one below uses SSE2 on x86-64.

#include "dispatch.h"
#include "ops.h"

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>

namespace kdbnn {

// One NCHW image row (channel c at src + c*plane) -> W pixels of packed words, padding bits 0.
// Four pixels at a time: one SSE compare + movemask per channel gives the channel's bit for 4
// pixels, spread into 4 register-held words (no NHWC transpose of the float input).
void pack_row_nchw(const float* src, int64_t plane, int64_t C, int64_t W, const float* thr, uint64_t* dst) {
  const int64_t nw = (C + 63) / 64;
  int64_t w = 0;
#if KDBNN_SSE2
  const __m128 z = _mm_setzero_ps();
  for (; w + 4 <= W; w += 4) {
    for (int64_t wi = 0; wi < nw; ++wi) {
      const int64_t c1 = std::min<int64_t>(C, wi * 64 + 64);
      uint64_t q0 = 0, q1 = 0, q2 = 0, q3 = 0;
      for (int64_t c = wi * 64; c < c1; ++c) {
        const __m128 t = thr != nullptr ? _mm_set1_ps(thr[c]) : z;
        const uint64_t m = (uint64_t)_mm_movemask_ps(_mm_cmpge_ps(_mm_loadu_ps(src + c * plane + w), t));
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
#endif  // KDBNN_SSE2
  for (; w < W; ++w) {
    for (int64_t wi = 0; wi < nw; ++wi) {
      const int64_t c1 = std::min<int64_t>(C, wi * 64 + 64);
      uint64_t q = 0;
      for (int64_t c = wi * 64; c < c1; ++c)
        q |= (uint64_t)(src[c * plane + w] >= (thr != nullptr ? thr[c] : 0.0f)) << (c & 63);
      dst[w * nw + wi] = q;
    }
  }
}

// x: float (N, C, H, W) -> int64 (N, H+2p, W+2p, nw), sign bits (x >= thr[c] -> 1; thr undefined:
// x >= 0), border = pad words. isa: the row packer of that path, -1: the best this CPU has.
at::Tensor pack_input(at::Tensor x, int64_t pad, double pad_value, c10::optional<at::Tensor> thr, int64_t isa) {
  TORCH_CHECK(x.dim() == 4, "kd_bnn.pack_input: expected (N, C, H, W), found ", x.sizes());
  TORCH_CHECK(pad >= 0, "kd_bnn.pack_input: pad must be >= 0, found ", pad);
  check_pad_value(pad_value);
  x = x.to(at::kFloat).contiguous();
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const float* xp = x.data_ptr<float>();
  const int64_t nw = (C + 63) / 64, Hp = H + 2 * pad, Wp = W + 2 * pad;
  auto out = at::empty({N, Hp, Wp, nw}, at::kLong);
  uint64_t* o = reinterpret_cast<uint64_t*>(out.data_ptr<int64_t>());
  const bool plus = pad_value > 0;
  const PackRowFn pack_row = isa < 0 ? best_pack_row() : isa_kernels(isa).pack_row;
  at::Tensor tf;
  const float* tp = nullptr;
  if (thr.has_value() && thr->defined()) {
    tf = thr->to(at::kFloat).contiguous();
    TORCH_CHECK(tf.numel() == C, "kd_bnn.pack_input: threshold has ", tf.numel(), " values, expected ", C);
    tp = tf.data_ptr<float>();
  }
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
      pack_row(xp + n * C * H * W + h * W, H * W, C, W, tp, inner);
    }
  });
  return out;
}

namespace {

// One NCHW row of C channels -> W pixels of packed words (padding bits 0): bit c is
// x >= thr[c], or x <= thr[c] where le[c] (a threshold from below: a decreasing map's sign).
// NaN gives 0 either way. SSE2 where the compiler targets it (x86-64 always).
void pack_row_dir(const float* src, int64_t plane, int64_t C, int64_t W, const float* thr, const uint8_t* le,
                  uint64_t* dst) {
  const int64_t nw = (C + 63) / 64;
  std::fill(dst, dst + W * nw, 0ULL);
  for (int64_t c = 0; c < C; ++c) {
    const float* x = src + c * plane;
    const float t = thr[c];
    const bool below = le[c] != 0;
    uint64_t* d = dst + (c >> 6);
    const int sh = (int)(c & 63);
    int64_t w = 0;
#if KDBNN_SSE2
    const __m128 tv = _mm_set1_ps(t);
    for (; w + 4 <= W; w += 4) {
      const __m128 v = _mm_loadu_ps(x + w);
      const uint64_t m = (uint64_t)_mm_movemask_ps(below ? _mm_cmple_ps(v, tv) : _mm_cmpge_ps(v, tv));
      d[w * nw] |= (m & 1ULL) << sh;
      d[(w + 1) * nw] |= ((m >> 1) & 1ULL) << sh;
      d[(w + 2) * nw] |= ((m >> 2) & 1ULL) << sh;
      d[(w + 3) * nw] |= ((m >> 3) & 1ULL) << sh;
    }
#endif
    for (; w < W; ++w) d[w * nw] |= (uint64_t)(below ? x[w] <= t : x[w] >= t) << sh;
  }
}

}  // namespace

// parts: int64 (N, H, W, ceil(channels[i] / 64)) packed (unpadded, padding bits 0), or float
// (N, channels[i], H, W) maps binarized here: x >= 0 -> 1 (the row packer of the best ISA), or
// with thr[i] (float (channels[i],); empty: none) x >= thr[i][c], and x <= thr[i][c] where
// le[i][c] (uint8 (channels[i],); empty: none set) -> the packed words of their channel
// concatenation, (N, H+2p, W+2p, ceil(sum channels / 64)) with pad words on the border, in one
// pass: a part starting on a 64-channel boundary is copied word for word, any other is shifted
// into place (each source word spans two output words).
at::Tensor concat_packed(std::vector<at::Tensor> parts, std::vector<int64_t> channels, int64_t pad, double pad_value,
                         std::vector<at::Tensor> thr, std::vector<at::Tensor> le) {
  TORCH_CHECK(!parts.empty() && parts.size() == channels.size(), "kd_bnn.concat_packed: ", parts.size(), " parts, ",
              channels.size(), " channel counts");
  check_pad_value(pad_value);
  TORCH_CHECK(pad >= 0, "kd_bnn.concat_packed: pad must be >= 0, found ", pad);
  const int64_t np = (int64_t)parts.size();
  TORCH_CHECK((thr.empty() || (int64_t)thr.size() == np) && (le.empty() || (int64_t)le.size() == np),
              "kd_bnn.concat_packed: thresholds and directions need one entry per part (empty: none)");
  std::vector<const uint64_t*> src(np);
  std::vector<const float*> fsrc(np, nullptr), fthr(np, nullptr);
  std::vector<const uint8_t*> fle(np, nullptr);
  std::vector<int64_t> off(np), pw(np), fbuf_at(np, 0);
  int64_t total = 0, N = -1, H = -1, W = -1, fwords = 0;
  for (int64_t i = 0; i < np; ++i) {
    at::Tensor& t = parts[i];
    const bool is_float = t.scalar_type() == at::kFloat;
    TORCH_CHECK(t.dim() == 4 && (is_float || t.scalar_type() == at::kLong), "kd_bnn.concat_packed: part ", i,
                " must be int64 words (N, H, W, nw) or float (N, C, H, W), found ", t.sizes(), " ", t.scalar_type());
    const int64_t words = (channels[i] + 63) / 64;
    TORCH_CHECK(channels[i] >= 1 && (is_float ? t.size(1) == channels[i] : t.size(3) == words),
                "kd_bnn.concat_packed: part ", i, " ", t.sizes(), " does not hold ", channels[i], " channels");
    const int64_t n = t.size(0), h = is_float ? t.size(2) : t.size(1), w = is_float ? t.size(3) : t.size(2);
    if (i == 0) N = n, H = h, W = w;
    TORCH_CHECK(n == N && h == H && w == W, "kd_bnn.concat_packed: part ", i, " is ", t.sizes(),
                ", not of part 0's batch and size");
    t = t.contiguous();
    const bool has_thr = !thr.empty() && thr[i].defined() && thr[i].numel() > 0;
    const bool has_le = !le.empty() && le[i].defined() && le[i].numel() > 0;
    TORCH_CHECK(is_float || !(has_thr || has_le), "kd_bnn.concat_packed: part ", i,
                " is packed: thresholds apply to float parts only");
    if (has_thr) {
      thr[i] = thr[i].to(at::kFloat).contiguous();
      TORCH_CHECK(thr[i].numel() == channels[i], "kd_bnn.concat_packed: part ", i, " thresholds: ", thr[i].numel(),
                  " values for ", channels[i], " channels");
      fthr[i] = thr[i].data_ptr<float>();
    }
    if (has_le) {
      TORCH_CHECK(has_thr, "kd_bnn.concat_packed: part ", i, " directions without thresholds");
      le[i] = le[i].to(at::kByte).contiguous();
      TORCH_CHECK(le[i].numel() == channels[i], "kd_bnn.concat_packed: part ", i, " directions: ", le[i].numel(),
                  " values for ", channels[i], " channels");
      const uint8_t* l = le[i].data_ptr<uint8_t>();
      if (std::any_of(l, l + channels[i], [](uint8_t v) { return v != 0; })) fle[i] = l;
    }
    if (is_float) {
      fsrc[i] = t.data_ptr<float>();
      fbuf_at[i] = fwords;
      fwords += W * words;
    } else {
      src[i] = reinterpret_cast<const uint64_t*>(t.data_ptr<int64_t>());
    }
    off[i] = total;
    pw[i] = words;
    total += channels[i];
  }
  const int64_t nw = (total + 63) / 64, Hp = H + 2 * pad, Wp = W + 2 * pad;
  auto out = at::empty({N, Hp, Wp, nw}, at::kLong);
  uint64_t* o = reinterpret_cast<uint64_t*>(out.data_ptr<int64_t>());
  const bool plus = pad_value > 0;
  const PackRowFn pack_row = best_pack_row();
  at::parallel_for(0, N * Hp, std::max<int64_t>(1, 16384 / std::max<int64_t>(1, Wp * nw)), [&](int64_t b, int64_t e) {
    std::vector<uint64_t> rowbits(fwords);  // this row of every float part, packed
    for (int64_t nh = b; nh < e; ++nh) {
      const int64_t n = nh / Hp, h = nh % Hp - pad;
      uint64_t* row = o + nh * Wp * nw;
      const bool inside = h >= 0 && h < H;
      // one float part alone is packed straight into the output row (pack_input's loop)
      const bool direct = np == 1 && fsrc[0] != nullptr;
      if (inside)
        for (int64_t i = 0; i < np; ++i)
          if (fsrc[i] != nullptr) {
            const float* x = fsrc[i] + (n * channels[i] * H + h) * W;
            uint64_t* dst = direct ? row + pad * nw : rowbits.data() + fbuf_at[i];
            if (fle[i] != nullptr) pack_row_dir(x, H * W, channels[i], W, fthr[i], fle[i], dst);
            else pack_row(x, H * W, channels[i], W, fthr[i], dst);
          }
      if (inside && direct) {
        for (int64_t w = 0; w < pad; ++w) {
          fill_pad(row + w * nw, nw, total, plus);
          fill_pad(row + (Wp - 1 - w) * nw, nw, total, plus);
        }
        continue;
      }
      for (int64_t w = 0; w < Wp; ++w) {
        const int64_t wi = w - pad;
        uint64_t* d = row + w * nw;
        if (!inside || wi < 0 || wi >= W) {
          fill_pad(d, nw, total, plus);
          continue;
        }
        const int64_t px = (n * H + h) * W + wi;
        if (nw == 1) {  // every part within one word (at most 64 channels in all)
          uint64_t v = 0;
          for (int64_t i = 0; i < np; ++i)
            v |= (fsrc[i] != nullptr ? rowbits[fbuf_at[i] + wi] : src[i][px]) << off[i];
          *d = v;
          continue;
        }
        std::fill(d, d + nw, 0ULL);
        for (int64_t i = 0; i < np; ++i) {
          const uint64_t* s = fsrc[i] != nullptr ? rowbits.data() + fbuf_at[i] + wi * pw[i] : src[i] + px * pw[i];
          const int64_t d0 = off[i] >> 6, sh = off[i] & 63;
          if (sh == 0) {
            for (int64_t j = 0; j < pw[i]; ++j) d[d0 + j] |= s[j];
          } else {
            for (int64_t j = 0; j < pw[i]; ++j) {
              d[d0 + j] |= s[j] << sh;
              if (d0 + j + 1 < nw) d[d0 + j + 1] |= s[j] >> (64 - sh);
            }
          }
        }
      }
    }
  });
  return out;
}

// xp: int64 (N, H, W, nw) packed (unpadded) -> (N, H+2p, W+2p, nw) with pad words on the border.
at::Tensor pad_packed(at::Tensor xp, int64_t channels, int64_t pad, double pad_value) {
  TORCH_CHECK(xp.dim() == 4 && xp.scalar_type() == at::kLong,
              "kd_bnn.pad_packed: expected int64 (N, H, W, nw), found ", xp.sizes(), " ", xp.scalar_type());
  return concat_packed({xp}, {channels}, pad, pad_value, {}, {});
}

}  // namespace kdbnn
