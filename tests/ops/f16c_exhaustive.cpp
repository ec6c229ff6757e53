// Exhaustive check of the vector 16-bit conversions of csrc/cpu/f16c.h (the ones the kernels use)
// against the portable integer conversions of csrc/include/ppml/common.h (the reference), built
// and run by test_f16c.py:
//   - every float16 pattern (2^16): f16c::load8 gives half_to_float's bits, except that a
//     signalling NaN comes back quiet (quiet bit set, payload kept); after the float -> double
//     conversion that every use performs (or any arithmetic) both are the same bits;
//   - every bfloat16 pattern: f16c::bf16_load8 gives bf16_to_float's bits;
//   - every float pattern (2^32): f16c::to_half8 == float_to_half, f16c::to_bf16_8 ==
//     float_to_bf16 (rounding, overflow, subnormals, NaN payloads);
// each with the default MXCSR and with FTZ | DAZ set (torch.set_flush_denormal(True)), two threads.
// Prints one line per check and "OK" at the end, or the first mismatches and "FAIL".
#include <immintrin.h>

#include <atomic>
#include <cstdint>
#include <cstdio>
#include <initializer_list>
#include <thread>

#include "f16c.h"
#include "target.h"

using namespace ppml;
using namespace ppml::cpu;

namespace {

std::atomic<long> g_bad{0};

void report(const char* what, uint32_t in, uint32_t want, uint32_t got) {
  if (g_bad.fetch_add(1) < 8)
    std::printf("  %s: input %08x portable %08x vector %08x\n", what, in, want, got);
}

PPML_TARGET_AVX2_F16C void check_loads(unsigned mxcsr) {
  _mm_setcsr(mxcsr);
  for (uint32_t h = 0; h < 65536; h += 8) {
    alignas(16) uint16_t in[8];
    for (int k = 0; k < 8; ++k) in[k] = static_cast<uint16_t>(h + k);
    alignas(32) float half_out[8], bf_out[8];
    _mm256_store_ps(half_out, f16c::load8(reinterpret_cast<const Half*>(in)));
    _mm256_store_ps(bf_out, f16c::bf16_load8(reinterpret_cast<const BFloat16*>(in)));
    for (int k = 0; k < 8; ++k) {
      const uint32_t want = float_to_bits(half_to_float(in[k]));
      const uint32_t got = float_to_bits(half_out[k]);
      const bool snan = (in[k] & 0x7c00u) == 0x7c00u && (in[k] & 0x3ffu) && !(in[k] & 0x200u);
      if (got != (snan ? (want | 0x00400000u) : want)) report("half->float", in[k], want, got);
      volatile float a = half_to_float(in[k]), b = half_out[k];
      const double da = a, db = b;
      if (double_to_bits(da) != double_to_bits(db))
        report("half->float->double", in[k], static_cast<uint32_t>(double_to_bits(da) >> 32),
               static_cast<uint32_t>(double_to_bits(db) >> 32));
      const uint32_t bwant = float_to_bits(bf16_to_float(in[k]));
      if (float_to_bits(bf_out[k]) != bwant)
        report("bf16->float", in[k], bwant, float_to_bits(bf_out[k]));
    }
  }
  _mm_setcsr(0x1f80);
}

PPML_TARGET_AVX2_F16C void check_stores(unsigned mxcsr, uint64_t begin, uint64_t end) {
  _mm_setcsr(mxcsr);
  for (uint64_t u = begin; u < end; u += 8) {
    alignas(32) uint32_t in[8];
    for (int k = 0; k < 8; ++k) in[k] = static_cast<uint32_t>(u + k);
    const __m256 f = _mm256_castsi256_ps(_mm256_load_si256(reinterpret_cast<const __m256i*>(in)));
    alignas(16) uint16_t h[8], b[8];
    _mm_store_si128(reinterpret_cast<__m128i*>(h), f16c::to_half8(f));
    _mm_store_si128(reinterpret_cast<__m128i*>(b), f16c::to_bf16_8(f));
    for (int k = 0; k < 8; ++k) {
      const float x = bits_to_float(in[k]);
      const uint16_t hw = float_to_half(x), bw = float_to_bf16(x);
      if (h[k] != hw) report("float->half", in[k], hw, h[k]);
      if (b[k] != bw) report("float->bf16", in[k], bw, b[k]);
    }
  }
  _mm_setcsr(0x1f80);
}

}  // namespace

int main() {
  if (!cpu_has_f16c()) {
    std::printf("SKIP: no AVX2 + F16C\n");
    return 0;
  }
  for (unsigned mxcsr : {0x1f80u, 0x1f80u | 0x8040u}) {  // default; FTZ | DAZ
    const long before = g_bad.load();
    check_loads(mxcsr);
    std::printf("mxcsr %04x: 2^16 float16 and bfloat16 loads: %ld mismatches\n", mxcsr,
                g_bad.load() - before);
    const long before_stores = g_bad.load();
    const uint64_t half = uint64_t(1) << 31;
    std::thread t([&] { check_stores(mxcsr, 0, half); });
    check_stores(mxcsr, half, uint64_t(1) << 32);
    t.join();
    std::printf("mxcsr %04x: 2^32 float -> float16 and bfloat16 stores: %ld mismatches\n", mxcsr,
                g_bad.load() - before_stores);
  }
  std::printf(g_bad.load() ? "FAIL\n" : "OK\n");
  return g_bad.load() ? 1 : 0;
}
