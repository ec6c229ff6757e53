// CPU kernel of add_gaussian_noise_ and noisy_scale_: x <- (x + std * z) [/ denominator].
//
// Element i of tensor k gets sample (i & 1) of block first_block_k + i / 2 of the Philox
// stream (include/ppml/noise.h), so the numbers depend on (seed, offset, sizes) only: not on the
// thread count, the split into chunks, or the device. Threads take chunks of the concatenated
// block space from a shared counter.
//
// Three paths give the same bits: with AVX-512 (noise_avx512.h) Philox, Box-Muller and the update
// of float32 / float64 run eight blocks per vector; with AVX2 (noise_avx2.h) four (16-bit
// storage: where the CPU also has F16C; AVX-512 CPUs take this for 16-bit storage too); elsewhere,
// with PPML_FAST_CPU_ISA=portable or PPML_FAST_DISABLE_AVX2=1, the portable code of
// include/ppml (eight Philox blocks at a time, then Box-Muller per block), built for the baseline
// ISA (and for AVX2, which secure mode uses where the CPU has it). Secure mode (ChaCha20) always
// takes the portable code.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <type_traits>
#include <vector>

#include "../include/ppml/kernels.h"
#include "../include/ppml/noise.h"
#include "noise_avx2.h"
#include "noise_avx512.h"
#include "parallel.h"
#include "philox_x8.h"
#include "target.h"

namespace ppml::cpu {
namespace {

constexpr int kLanes = 8;  // blocks generated together by the portable path (philox_x8_scalar)

// The AVX2 path is on when the CPU has AVX2, unless PPML_FAST_DISABLE_AVX2 is set (the tests
// compare both paths; set_noise_simd switches it for them in-process).
std::atomic<bool>& simd_flag() {
  static std::atomic<bool> on{avx2_on_by_default()};
  return on;
}

// Within the AVX2 path, float16 and bfloat16 tensors are updated by vectors where the CPU has
// F16C (the conversions of f16c.h), unless PPML_FAST_DISABLE_F16C is set or set_noise_f16c
// turned it off: then element by element, as before. Both give the same bits.
std::atomic<bool>& f16c_flag() {
  static std::atomic<bool> on{f16c_on_by_default()};
  return on;
}

// Portable path: local blocks [b0, b1) of a tensor of numel elements whose stream starts at
// block first_block (relative to p.offset, in both modes).
template <typename T>
PPML_ALWAYS_INLINE void noise_range(T* x, int64_t numel, uint64_t first_block, uint64_t b0,
                                    uint64_t b1, const NoiseProblem& p) {
  double z[2 * kLanes];
  uint64_t b = b0;
  for (; b < b1; b += kLanes) {
    const int lanes = static_cast<int>(std::min<uint64_t>(kLanes, b1 - b));
    if (p.secure) {
      for (int v = 0; v < lanes; ++v)
        secure_normal_pair(p.key, p.offset + first_block + b + v, &z[2 * v], &z[2 * v + 1]);
    } else {
      uint32_t w[4][kLanes];
      philox_x8_scalar(p.seed, p.offset + first_block + b, w);
      double z0[kLanes], z1[kLanes];
      for (int v = 0; v < kLanes; ++v) box_muller(w[0][v], w[1][v], w[2][v], w[3][v], &z0[v], &z1[v]);
      for (int v = 0; v < kLanes; ++v) {
        z[2 * v] = z0[v];
        z[2 * v + 1] = z1[v];
      }
    }
    const int64_t e0 = static_cast<int64_t>(2 * b);
    const int64_t e1 = std::min<int64_t>(numel, e0 + 2 * lanes);
    for (int64_t e = e0; e < e1; ++e)
      apply_noise(x, e, z[e - e0], p.stddev, p.denominator, p.divide);
  }
}

// The portable code, built for the baseline ISA and (where the compiler can target it) for AVX2,
// which vectorises its Box-Muller loop over the eight blocks: the secure stream always runs
// here, and so does the reproducible one when the hand-written AVX2 path is off.
template <typename T>
void noise_portable(T* x, int64_t n, uint64_t f, uint64_t b0, uint64_t b1, const NoiseProblem& p) {
  noise_range(x, n, f, b0, b1, p);
}
#if PPML_HAVE_AVX2_TARGET
template <typename T>
PPML_TARGET_AVX2 void noise_portable_avx2(T* x, int64_t n, uint64_t f, uint64_t b0, uint64_t b1,
                                          const NoiseProblem& p) {
  noise_range(x, n, f, b0, b1, p);
}
#endif

#if defined(PPML_HAVE_NOISE_AVX2)
// Whether den is a power of two (of either sign) whose reciprocal is a finite double; then
// *inv = 1 / den exactly, and v / den == v * *inv for every double v (avx2::Scale).
bool exact_reciprocal(double den, double* inv) {
  int exponent;
  const double m = std::frexp(den, &exponent);  // den = m * 2^exponent, |m| in [0.5, 1)
  if (!(m == 0.5 || m == -0.5)) return false;     // also rejects 0, infinities and NaN
  *inv = 1.0 / den;
  return std::isfinite(*inv);
}

// The vector loop of one scaling mode, in a function of its own (not inlined): compiled inside
// noise_range_avx2 next to the other modes and the tail, its registers were allocated for the
// whole function and it spilled twice as much (M1's fused noise: 2.04 ms instead of 1.64).
template <avx2::Scale kScale, typename T>
__attribute__((target("avx2"), noinline)) void update_groups_avx2(T* x, uint64_t index,
                                                                  int64_t groups,
                                                                  const avx2::PhiloxKeys& keys,
                                                                  double stddev, double f) {
  avx2::update_groups<kScale>(x, index, groups, keys, stddev, f);
}

// The same for 16-bit storage (avx2::update_groups_16), compiled for "avx2,f16c": float16 needs
// F16C's conversions; bfloat16's are AVX2 integer code but share the loop (every AVX2 CPU has
// F16C; where a hypervisor hides it, both 16-bit types are updated element by element).
template <avx2::Scale kScale, typename T>
__attribute__((target("avx2,f16c"), noinline)) void update_groups_16_f16c(
    T* x, uint64_t index, int64_t groups, const avx2::PhiloxKeys& keys, double stddev, double f) {
  avx2::update_groups_16<kScale>(x, index, groups, keys, stddev, f);
}

template <avx2::Scale kScale, typename T>
void update_groups_any(T* x, uint64_t index, int64_t groups, const avx2::PhiloxKeys& keys,
                       double stddev, double f) {
  if constexpr (std::is_same_v<T, Half> || std::is_same_v<T, BFloat16>) {
    update_groups_16_f16c<kScale>(x, index, groups, keys, stddev, f);
  } else {
    update_groups_avx2<kScale>(x, index, groups, keys, stddev, f);
  }
}

// AVX2 path of the reproducible stream, same arguments as noise_range. Whole groups of
// avx2::kGroupBlocks blocks whose elements all exist go through avx2::update_groups (16-bit
// storage: update_groups_16, where f16c); the rest (the range's last partial group, a tensor's
// odd last element, 16-bit storage without F16C) computes the same samples a group at a time and
// updates element by element with the scalar apply_noise, which performs the same operations.
template <typename T>
__attribute__((target("avx2"))) void noise_range_avx2(T* x, int64_t numel, uint64_t first_block,
                                                      uint64_t b0, uint64_t b1,
                                                      const NoiseProblem& p,
                                                      const avx2::PhiloxKeys& keys, bool f16c) {
  constexpr uint64_t kG = avx2::kGroupBlocks;
  constexpr bool k16 = std::is_same_v<T, Half> || std::is_same_v<T, BFloat16>;
  const uint64_t index = p.offset + first_block;  // Philox block of local block 0
  uint64_t b = b0;
  if (!k16 || f16c) {
    // blocks [b0, full) have both elements
    const uint64_t full = std::min<uint64_t>(b1, static_cast<uint64_t>(numel) / 2);
    if (full > b0) {
      const int64_t groups = static_cast<int64_t>((full - b0) / kG);
      T* xb = x + 2 * b0;
      double inv;
      if (!p.divide) {
        update_groups_any<avx2::Scale::kNone>(xb, index + b0, groups, keys, p.stddev, 1.0);
      } else if (exact_reciprocal(p.denominator, &inv)) {
        update_groups_any<avx2::Scale::kMulReciprocal>(xb, index + b0, groups, keys, p.stddev,
                                                       inv);
      } else {
        update_groups_any<avx2::Scale::kDivide>(xb, index + b0, groups, keys, p.stddev,
                                                p.denominator);
      }
      b = b0 + kG * static_cast<uint64_t>(groups);
    }
  }
  alignas(32) double z[2 * kG];
  for (; b < b1; b += kG) {
    __m256d e[2 * avx2::kN];
    avx2::normals(keys, index + b, e);
    for (int v = 0; v < 2 * avx2::kN; ++v) _mm256_storeu_pd(z + 4 * v, e[v]);
    const int64_t e_begin = static_cast<int64_t>(2 * b);
    const int64_t e_end = std::min<int64_t>(numel, static_cast<int64_t>(2 * std::min(b + kG, b1)));
    for (int64_t i = e_begin; i < e_end; ++i)
      apply_noise(x, i, z[i - e_begin], p.stddev, p.denominator, p.divide);
  }
}
#endif

#if defined(PPML_HAVE_NOISE_AVX512)
// The AVX-512 vector loop of one scaling mode (not inlined, as update_groups_avx2).
template <avx2::Scale kScale, typename T>
__attribute__((target(PPML_AVX512_ISA), noinline)) void update_groups_avx512(
    T* x, uint64_t index, int64_t groups, const avx512::PhiloxKeys& keys, double stddev,
    double f) {
  avx512::update_groups<kScale>(x, index, groups, keys, stddev, f);
}

// AVX-512 path of the reproducible stream for float32 / float64, same arguments as noise_range:
// whole groups of avx512::kGroupBlocks blocks whose elements all exist, eight blocks per vector;
// the rest of the range (its last partial group, a tensor's odd last element) on the AVX2 path,
// which computes the same samples.
template <typename T>
__attribute__((target(PPML_AVX512_ISA))) void noise_range_avx512(
    T* x, int64_t numel, uint64_t first_block, uint64_t b0, uint64_t b1, const NoiseProblem& p,
    const avx512::PhiloxKeys& keys, const avx2::PhiloxKeys& keys2) {
  constexpr uint64_t kG = avx512::kGroupBlocks;
  const uint64_t index = p.offset + first_block;
  uint64_t b = b0;
  const uint64_t full = std::min<uint64_t>(b1, static_cast<uint64_t>(numel) / 2);
  if (full > b0) {
    const int64_t groups = static_cast<int64_t>((full - b0) / kG);
    T* xb = x + 2 * b0;
    double inv;
    if (!p.divide) {
      update_groups_avx512<avx2::Scale::kNone>(xb, index + b0, groups, keys, p.stddev, 1.0);
    } else if (exact_reciprocal(p.denominator, &inv)) {
      update_groups_avx512<avx2::Scale::kMulReciprocal>(xb, index + b0, groups, keys, p.stddev,
                                                        inv);
    } else {
      update_groups_avx512<avx2::Scale::kDivide>(xb, index + b0, groups, keys, p.stddev,
                                                 p.denominator);
    }
    b = b0 + kG * static_cast<uint64_t>(groups);
  }
  if (b < b1) noise_range_avx2(x, numel, first_block, b, b1, p, keys2, false);
}
#endif

// Round keys of the hand-written vector paths (null where a path is not taken).
struct SimdKeys {
  const void* avx2 = nullptr;    // avx2::PhiloxKeys
  const void* avx512 = nullptr;  // avx512::PhiloxKeys
};

// Local blocks [b0, b1) of tensor t: on the hand-written AVX-512 path (float32 / float64) when
// keys.avx512 is given, on the AVX2 one when keys.avx2 is, else on the portable code, its AVX2
// build when avx2 is true.
template <typename T>
void noise_typed(T* x, int64_t numel, uint64_t first, uint64_t b0, uint64_t b1,
                 const NoiseProblem& p, const SimdKeys& keys, bool avx2, bool f16c) {
#if defined(PPML_HAVE_NOISE_AVX512)
  if constexpr (std::is_same_v<T, float> || std::is_same_v<T, double>) {
    if (keys.avx512)
      return noise_range_avx512(x, numel, first, b0, b1, p,
                                *static_cast<const avx512::PhiloxKeys*>(keys.avx512),
                                *static_cast<const avx2::PhiloxKeys*>(keys.avx2));
  }
#endif
#if defined(PPML_HAVE_NOISE_AVX2)
  if (keys.avx2)
    return noise_range_avx2(x, numel, first, b0, b1, p,
                            *static_cast<const avx2::PhiloxKeys*>(keys.avx2), f16c);
#endif
#if PPML_HAVE_AVX2_TARGET
  if (avx2) return noise_portable_avx2(x, numel, first, b0, b1, p);
#endif
  noise_portable(x, numel, first, b0, b1, p);
}

void noise_tensor(const NoiseTensor& t, uint64_t first, uint64_t b0, uint64_t b1,
                  const NoiseProblem& p, const SimdKeys& simd_keys, bool avx2, bool f16c) {
  switch (t.dtype) {
    case DType::kFloat32:
      return noise_typed(static_cast<float*>(t.ptr), t.numel, first, b0, b1, p, simd_keys, avx2,
                         f16c);
    case DType::kFloat64:
      return noise_typed(static_cast<double*>(t.ptr), t.numel, first, b0, b1, p, simd_keys, avx2,
                         f16c);
    case DType::kFloat16:
      return noise_typed(static_cast<Half*>(t.ptr), t.numel, first, b0, b1, p, simd_keys, avx2,
                         f16c);
    case DType::kBFloat16:
      return noise_typed(static_cast<BFloat16*>(t.ptr), t.numel, first, b0, b1, p, simd_keys,
                         avx2, f16c);
  }
}

}  // namespace

bool set_noise_simd(bool enabled) {
  return simd_flag().exchange(enabled && cpu_has_avx2());
}

bool set_noise_f16c(bool enabled) { return f16c_flag().exchange(enabled && cpu_has_f16c()); }

void gaussian_noise(const NoiseProblem& p) {
  // first block of each tensor, relative to the stream's start (p.offset)
  std::vector<uint64_t> first(p.tensors.size() + 1, 0);
  for (size_t k = 0; k < p.tensors.size(); ++k)
    first[k + 1] = first[k] + noise_blocks(p.tensors[k].numel);
  const uint64_t total = first.back();
  if (total == 0) return;
  // The instruction set: AVX-512 or AVX2 where the switch is on and isa_limit() allows it.
  const bool switch_on = simd_flag().load(std::memory_order_relaxed);
  const bool simd = use_avx2(switch_on);
  const bool f16c = simd && f16c_flag().load(std::memory_order_relaxed);
  SimdKeys simd_keys;
#if defined(PPML_HAVE_NOISE_AVX2)
  avx2::PhiloxKeys keys;
  if (!p.secure && simd) {
    avx2::philox_keys(p.seed, &keys);
    simd_keys.avx2 = &keys;
  }
#endif
#if defined(PPML_HAVE_NOISE_AVX512)
  avx512::PhiloxKeys keys512;
  if (!p.secure && use_avx512(switch_on)) {
    avx512::philox_keys(p.seed, &keys512);
    simd_keys.avx512 = &keys512;
  }
#endif
  // blocks [g0, g1) of the concatenated tensors
  auto run = [&](uint64_t g0, uint64_t g1) {
    size_t k = std::upper_bound(first.begin(), first.end(), g0) - first.begin() - 1;
    for (; k < p.tensors.size() && first[k] < g1; ++k) {
      uint64_t lo = std::max(g0, first[k]), hi = std::min(g1, first[k + 1]);
      if (lo >= hi) continue;
      noise_tensor(p.tensors[k], first[k], lo - first[k], hi - first[k], p, simd_keys, simd,
                   f16c);
    }
  };
  int nthreads = p.num_threads;
  if (total < 8192) nthreads = 1;
  // Threads take chunks of kChunkBlocks from a shared counter, not fixed shares: on a busy
  // machine a team thread that starts late (or is descheduled) leaves its work to the others
  // instead of holding up the caller. Chunk boundaries do not change the numbers.
  // ~8192 elements, ~25 us on one Zen 3 core; a multiple of the AVX2 group (avx2::kGroupBlocks)
  // and of the portable path's kLanes, so a chunk inside one tensor leaves no partial group
  constexpr uint64_t kChunkBlocks = 4080;
#if defined(PPML_HAVE_NOISE_AVX2)
  static_assert(kChunkBlocks % avx2::kGroupBlocks == 0, "chunks of whole AVX2 groups");
#endif
#if defined(PPML_HAVE_NOISE_AVX512)
  static_assert(kChunkBlocks % avx512::kGroupBlocks == 0, "chunks of whole AVX-512 groups");
#endif
  static_assert(kChunkBlocks % kLanes == 0, "chunks of whole portable groups");
  std::atomic<uint64_t> next{0};
  parallel_run(nthreads, [&](int t, int nt) {
    if (nt == 1) return run(0, total);
    for (;;) {
      const uint64_t g0 = next.fetch_add(kChunkBlocks, std::memory_order_relaxed);
      if (g0 >= total) break;
      run(g0, std::min(total, g0 + kChunkBlocks));
    }
  });
}

}  // namespace ppml::cpu
