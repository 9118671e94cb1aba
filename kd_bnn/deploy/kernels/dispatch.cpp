// kd_bnn kernels: run-time ISA detection and the ISA -> kernels table.
//
// All ISA paths live in one build: the x86 kernels are compiled with function-level target
// attributes (no -march flag), and the path is picked per call from the CPU's flags:
//   avx512  AVX-512F/BW + VPOPCNTDQ XNOR micro-kernel, AVX-512 lookup-table BWN kernel; AVX2
//           epilogue and packing (every AVX-512 CPU has AVX2)
//   avx2    PSHUFB nibble-popcount XNOR micro-kernel (W. Mula et al., "Faster Population Counts
//           Using AVX2 Instructions", 2016), AVX2 epilogue and packing, lookup-table BWN kernel
//   popcnt  scalar POPCNT XNOR micro-kernel; portable epilogue and BWN direct conv
//   scalar  portable C++ everywhere (the only path of a non-x86 build)
// The small-C_in float conv (stem.cpp) has an AVX-512F (avx512) and an AVX2+FMA (avx2, where the
// CPU has FMA) row kernel in stem_x86.cpp; popcnt and scalar use the portable (SSE2) one.
//
// A new ISA: an Isa code in common.h, a cpu_has case and a make_entry case here (kernels the
// ISA lacks stay the portable ones), and its name in kernels/__init__.py ISAS.

#include "dispatch.h"

#include <c10/util/Exception.h>

namespace kdbnn {

bool cpu_has(int64_t isa) {
  if (isa == ISA_SCALAR) return true;
#if KDBNN_X86
  __builtin_cpu_init();
  switch (isa) {
    case ISA_POPCNT: return __builtin_cpu_supports("popcnt");
    case ISA_AVX2: return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("popcnt");
    case ISA_AVX512:
      return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
             __builtin_cpu_supports("avx512vpopcntdq") && __builtin_cpu_supports("popcnt");
  }
#endif
  return false;
}

namespace {

// The kernels of one ISA path, starting from the portable ones.
IsaKernels make_entry(int64_t isa) {
  IsaKernels k{&kXnorScalar, nullptr, pack_row_nchw, nullptr, &kStemPortable};
  switch (isa) {
#if KDBNN_X86
    case ISA_POPCNT:
      k.xnor = &kXnorPopcnt;
      break;
    case ISA_AVX2:
      k.xnor = &kXnorAvx2;
      k.xnor_epilogue = __builtin_cpu_supports("fma") ? &kXnorEpilogueAvx2 : &kXnorEpilogueAvx2NoFma;
      k.pack_row = pack_row_nchw_avx2;
      k.bwn_lut = &kBwnLutAvx2;
      if (__builtin_cpu_supports("fma")) k.stem = &kStemAvx2;  // AVX2 CPUs have FMA in practice
      break;
    case ISA_AVX512:
      k.xnor = &kXnorAvx512;
      if (cpu_has(ISA_AVX2)) {  // always true on real AVX-512 CPUs
        k.xnor_epilogue = __builtin_cpu_supports("fma") ? &kXnorEpilogueAvx2 : &kXnorEpilogueAvx2NoFma;
        k.pack_row = pack_row_nchw_avx2;
        k.bwn_lut = &kBwnLutAvx512;  // AVX-512F/BW (cpu_has above) plus AVX2/FMA
      }
      k.stem = &kStemAvx512;  // AVX-512F only
      break;
#endif
    default:
      break;
  }
  return k;
}

struct Table {
  IsaKernels entry[kNumIsas];
  Table() {
    for (int64_t i = 0; i < kNumIsas; ++i) entry[i] = make_entry(i);
  }
};

const Table& table() {
  static const Table t;  // built once (thread-safe static initialization)
  return t;
}

}  // namespace

const IsaKernels& isa_kernels(int64_t isa) {
  TORCH_CHECK(isa >= ISA_SCALAR && isa < kNumIsas, "kd_bnn: unknown ISA code ", isa);
  TORCH_CHECK(cpu_has(isa), "kd_bnn: this CPU lacks the instructions of ISA path ", isa);
  return table().entry[isa];
}

PackRowFn best_pack_row() {
  for (int64_t isa = kNumIsas - 1; isa > ISA_SCALAR; --isa)
    if (cpu_has(isa)) return table().entry[isa].pack_row;
  return table().entry[ISA_SCALAR].pack_row;
}

}  // namespace kdbnn
