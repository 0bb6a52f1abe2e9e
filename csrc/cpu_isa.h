// Runtime choice of the CPU kernels' instruction set (attention, LayerNorm, GELU).
//
// Each such kernel is compiled three times from one always_inline template body: for AVX-512
// (avx512f + fma), for AVX2 + FMA, and for the baseline x86-64 (SSE2). `dispatch` runs the copy
// for cpu_isa(): the best this CPU supports (cpuid, read once), or the one the environment
// variable FASTGPT_CPU_ISA names (avx512, avx2 or baseline; read at every call, so tests can
// force each path and compare). A forced set this CPU lacks is an error, never a SIGILL.
//
// Why not GCC's target_clones: its copies are picked once by the loader and cannot be forced,
// and its "avx2" copy has no FMA (AVX2 and FMA are separate flags).
#pragma once

namespace fastgpt {

enum class Isa : int { kBaseline = 0, kAvx2 = 1, kAvx512 = 2 };

// the set the kernels use now (FASTGPT_CPU_ISA or the best available); throws on a bad value
Isa cpu_isa();
const char* isa_name(Isa isa);

// lanes of one fp32 register of instruction set I (vec_cpu.h's Vec<L> is sized with it)
template <Isa I>
constexpr int kIsaLanes = I == Isa::kAvx512 ? 16 : I == Isa::kAvx2 ? 8 : 4;

#define FASTGPT_TARGET_AVX512 __attribute__((target("avx512f,avx2,fma")))
#define FASTGPT_TARGET_AVX2 __attribute__((target("avx2,fma")))

// body.template operator()<I>() compiled for instruction set I: the body (an always_inline
// lambda) is inlined into a function with I's target attribute
template <class Body>
FASTGPT_TARGET_AVX512 void run_avx512(Body& body) {
  body.template operator()<Isa::kAvx512>();
}
template <class Body>
FASTGPT_TARGET_AVX2 void run_avx2(Body& body) {
  body.template operator()<Isa::kAvx2>();
}
template <class Body>
void run_baseline(Body& body) {
  body.template operator()<Isa::kBaseline>();
}

template <class Body>
void dispatch(Body&& body) {
  switch (cpu_isa()) {
    case Isa::kAvx512: run_avx512(body); break;
    case Isa::kAvx2: run_avx2(body); break;
    default: run_baseline(body); break;
  }
}

}  // namespace fastgpt
