// The instruction-set limit of the CPU kernels (target.h): which of their AVX-512, AVX2 and
// portable builds may run. Plain code, built for the baseline ISA: it runs before any kernel
// and decides whether one may execute AVX-512 instructions at all.
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <string>

#include "target.h"

namespace ppml::cpu {
namespace {

Isa lower(Isa a, Isa b) { return static_cast<int>(a) < static_cast<int>(b) ? a : b; }

struct EnvLimit {
  Isa isa = Isa::kPortable;
  std::string problem;
};

// PPML_FAST_CPU_ISA, capped by the CPU; unset, empty, "auto" or a value parse_isa rejects
// (reported by isa_env_problem) mean the CPU's best.
const EnvLimit& env_limit() {
  static const EnvLimit limit = [] {
    EnvLimit l;
    l.isa = cpu_isa();
    const char* text = std::getenv("PPML_FAST_CPU_ISA");
    Isa wanted;
    bool automatic = false;
    if (text == nullptr) return l;
    if (!parse_isa(text, &wanted, &automatic)) {
      l.problem = std::string("PPML_FAST_CPU_ISA must be one of 'auto', 'avx512', 'avx2', "
                              "'portable' (or 'scalar'); got '") +
                  text + "', so it was ignored (the kernels use " + isa_name(l.isa) + ")";
      return l;
    }
    if (!automatic) l.isa = lower(wanted, l.isa);
    return l;
  }();
  return limit;
}

std::atomic<int>& limit_flag() {
  static std::atomic<int> limit{static_cast<int>(env_limit().isa)};
  return limit;
}

}  // namespace

bool parse_isa(const char* text, Isa* isa, bool* automatic) {
  std::string s(text);
  for (char& c : s) c = static_cast<char>(c >= 'A' && c <= 'Z' ? c - 'A' + 'a' : c);
  *automatic = false;
  if (s.empty() || s == "auto") {
    *automatic = true;
    *isa = Isa::kAvx512;
  } else if (s == "avx512" || s == "avx-512") {
    *isa = Isa::kAvx512;
  } else if (s == "avx2") {
    *isa = Isa::kAvx2;
  } else if (s == "portable" || s == "scalar" || s == "generic") {
    *isa = Isa::kPortable;
  } else {
    return false;
  }
  return true;
}

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::kAvx512: return "avx512";
    case Isa::kAvx2: return "avx2";
    case Isa::kPortable: break;
  }
  return "portable";
}

const char* isa_env_problem() { return env_limit().problem.c_str(); }

Isa isa_limit() { return static_cast<Isa>(limit_flag().load(std::memory_order_relaxed)); }

Isa set_isa_limit(Isa isa) {
  return static_cast<Isa>(limit_flag().exchange(static_cast<int>(lower(isa, cpu_isa()))));
}

}  // namespace ppml::cpu
