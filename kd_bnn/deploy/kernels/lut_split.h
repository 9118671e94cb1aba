// kd_bnn kernels: the work split of the lookup-table conv drivers (bwn.cpp: BWN, w1a8.cpp: W1A8).
//
// Work items are tiles, or (tile, output-channel chunk) pairs when there are fewer than 4 tiles
// per thread (the tables are then built once per chunk; chunks keep >= 32 channels and are a
// multiple of 8); item t is tile t / n_chunks for channels [c * co_chunk, (c + 1) * co_chunk),
// c = t % n_chunks (LutItems in lut_common.h walks them). Each thread gets its own scratch
// buffer, 64-byte aligned.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <memory>

namespace kdbnn {

// Sets co_chunk (the caller's args, read by range), then runs range(b, e, work) over the work
// items of n_tiles tiles and co_pad output channels, work = work_elems() elements of type E per
// thread (written before read; the count includes 64 bytes of alignment slack).
template <class E, class WorkElems, class Range>
void lut_parallel_items(int64_t n_tiles, int64_t co_pad, int64_t& co_chunk, const WorkElems& work_elems,
                        const Range& range) {
  const int64_t threads = at::get_num_threads();
  int64_t n_chunks = 1;
  if (threads > 1 && n_tiles < 4 * threads)
    n_chunks = std::max<int64_t>(1, std::min((4 * threads + n_tiles - 1) / n_tiles, co_pad / 32));
  co_chunk = (co_pad / n_chunks + 7) / 8 * 8;
  n_chunks = (co_pad + co_chunk - 1) / co_chunk;
  at::parallel_for(0, n_tiles * n_chunks, 1, [&](int64_t b, int64_t e) {
    std::unique_ptr<E[]> buf(new E[work_elems()]);
    E* work = reinterpret_cast<E*>((reinterpret_cast<uintptr_t>(buf.get()) + 63) & ~uintptr_t(63));
    range(b, e, work);
  });
}

}  // namespace kdbnn
