// FASTGPT_CPU_ISA and cpuid: which copy of the CPU kernels runs (see cpu_isa.h).

#include "cpu_isa.h"

#include <c10/util/Exception.h>

#include <cstdlib>
#include <cstring>
#include <string>

namespace fastgpt {
namespace {

Isa best_supported() {
  static const Isa best = [] {
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx2") &&
        __builtin_cpu_supports("fma"))
      return Isa::kAvx512;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Isa::kAvx2;
    return Isa::kBaseline;
  }();
  return best;
}

std::string allowed_here() {
  std::string names;
  for (int i = int(best_supported()); i >= 0; --i) {
    if (!names.empty()) names += ", ";
    names += isa_name(Isa(i));
  }
  return names;
}

}  // namespace

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::kAvx512: return "avx512";
    case Isa::kAvx2: return "avx2";
    default: return "baseline";
  }
}

Isa cpu_isa() {
  const char* forced = std::getenv("FASTGPT_CPU_ISA");
  if (forced == nullptr || *forced == '\0') return best_supported();
  for (int i = 0; i <= int(Isa::kAvx512); ++i) {
    if (std::strcmp(forced, isa_name(Isa(i))) != 0) continue;
    TORCH_CHECK_VALUE(i <= int(best_supported()), "FASTGPT_CPU_ISA=", forced, " asks for "
                      "instructions this CPU lacks (", forced == std::string("avx512")
                          ? "avx512f" : "avx2 and fma", "); allowed on this CPU: ",
                      allowed_here());
    return Isa(i);
  }
  TORCH_CHECK_VALUE(false, "FASTGPT_CPU_ISA must be one of avx512, avx2, baseline (or unset: "
                    "the best this CPU has); got '", forced, "'");
}

}  // namespace fastgpt
