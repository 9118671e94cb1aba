// kd_bnn kernels: the work split of the lookup-table conv drivers (bwn.cpp: BWN, w1a8.cpp: W1A8).
//
// Work items are tiles, or (tile, output-channel chunk) pairs where that gives the threads less
// work each (lut_chunks; the tables are then built once per chunk; chunks keep >= 32 channels and
// are a multiple of 8); item t is tile t / n_chunks for channels [c * co_chunk, (c + 1) *
// co_chunk), c = t % n_chunks (LutItems in lut_common.h walks them). (BWN layers of few tiles
// split each tile's passes into input parts instead: lut_kparts in common.h.) Each thread gets its
// own scratch buffer, 64-byte aligned.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <memory>

namespace kdbnn {

// Output-channel chunks per tile for n_tiles tiles of co_pad channels and tables of `entries`
// entries on `threads` threads: the split with the least work on the busiest thread. A chunk item
// costs b + (1 - b) / c of a tile, b the tile's share of table builds, estimated as 2E / (2E +
// co_pad) (a table of E entries costs about two lookups per entry to build and is read once per
// output channel: ~27% at g = 4, 128 channels, as profiled on Zen 5). Chunks keep >= 32 channels.
// (The rule before, chunks whenever a thread had fewer than 4 tiles, split balanced work too:
// at 2 threads, Zen 5, W1A8 3x3 512->512 @10x10 (4 tiles) 0.292 ms chunked vs 0.274 not; a 1x1
// 512->1024 BWN layer (7 tiles) is still chunked: 0.097 vs 0.103 ms.)
inline int64_t lut_chunks(int64_t n_tiles, int64_t co_pad, int64_t entries, int64_t threads) {
  if (threads <= 1 || n_tiles <= 0) return 1;
  const double b = 2.0 * (double)entries / (2.0 * (double)entries + (double)co_pad);
  int64_t best = 1;
  double best_cost = (double)((n_tiles + threads - 1) / threads);
  for (int64_t c = 2; c <= co_pad / 32 && c <= 4 * threads; ++c) {
    const double cost = (double)((n_tiles * c + threads - 1) / threads) * (b + (1.0 - b) / (double)c);
    if (cost < 0.99 * best_cost) best = c, best_cost = cost;
  }
  return best;
}

// Sets co_chunk (the caller's args, read by range), then runs range(b, e, work) over the work
// items of n_tiles tiles, co_pad output channels and tables of `entries` entries (chunks: whether
// items may be channel chunks), work = work_elems() elements of type E per thread (written before
// read; the count includes 64 bytes of alignment slack).
template <class E, class WorkElems, class Range>
void lut_parallel_items(int64_t n_tiles, int64_t co_pad, int64_t entries, int64_t& co_chunk,
                        const WorkElems& work_elems, const Range& range, bool chunks = true) {
  int64_t n_chunks = chunks ? lut_chunks(n_tiles, co_pad, entries, at::get_num_threads()) : 1;
  co_chunk = (co_pad / n_chunks + 7) / 8 * 8;
  n_chunks = (co_pad + co_chunk - 1) / co_chunk;
  at::parallel_for(0, n_tiles * n_chunks, 1, [&](int64_t b, int64_t e) {
    std::unique_ptr<E[]> buf(new E[work_elems()]);
    E* work = reinterpret_cast<E*>((reinterpret_cast<uintptr_t>(buf.get()) + 63) & ~uintptr_t(63));
    range(b, e, work);
  });
}

}  // namespace kdbnn
