// kd_bnn kernels: prepared table offsets of the lookup-table convs (bwn.cpp: bwn_prepare,
// w1a8.cpp: w1a8_prepare).
//
// The table offsets of a layer depend only on its weights and its kernel's plan (table size, row
// layout), so a caller that runs a layer many times on small inputs can compute them once per layer
// and input size instead of per call (the .kdbnn runtime does not: at KITTI size it measured no
// faster and its inference peak grew by 15-26 MB; kd_bnn/deploy/runtime.py). A
// prepared tensor is uint8: a header of kLutPrepHeader int64 values naming the plan ({magic,
// plan fields..., bytes}: the caller's), then the offset rows (64-byte aligned) and the slack
// bytes the kernel reads past them (zero). A call uses the rows when the header equals its own
// plan's and rebuilds them otherwise.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Optional.h>

#include <cstdint>
#include <cstring>

namespace kdbnn {

constexpr int kLutPrepHeader = 8;  // int64 values (64 bytes: the rows stay 64-byte aligned)
using LutPrepHead = int64_t[kLutPrepHeader];

// A prepared tensor for header h with bytes of rows and slack bytes after them; rows: where the
// caller writes them (the slack is zeroed here).
inline at::Tensor lut_prep_alloc(const LutPrepHead& h, int64_t bytes, int64_t slack, uint8_t*& rows) {
  auto out = at::empty({8 * kLutPrepHeader + bytes + slack}, at::kByte);
  uint8_t* p = out.data_ptr<uint8_t>();
  std::memcpy(p, h, sizeof(LutPrepHead));
  rows = p + 8 * kLutPrepHeader;
  std::memset(rows + bytes, 0, slack);
  return out;
}

// The rows of prepared when it is a prepared tensor of header h (bytes + slack after it), else
// null (the caller rebuilds them).
inline const uint8_t* lut_prep_rows(const c10::optional<at::Tensor>& prepared, const LutPrepHead& h, int64_t bytes,
                                    int64_t slack) {
  if (!prepared.has_value() || !prepared->defined() || prepared->scalar_type() != at::kByte ||
      !prepared->is_contiguous() || prepared->numel() != 8 * kLutPrepHeader + bytes + slack)
    return nullptr;
  const uint8_t* p = prepared->data_ptr<uint8_t>();
  return std::memcmp(p, h, sizeof(LutPrepHead)) == 0 ? p + 8 * kLutPrepHeader : nullptr;
}

}  // namespace kdbnn
