// Definitions shared by the CPU and CUDA kernels: the host/device macro, dtype tags and
// exact conversions between float16 / bfloat16 bit patterns and float.
//
// The conversions are written with integer operations only, so the CPU and the GPU round
// identically (the noise ops promise bit-identical results on both).
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define PPML_HD __host__ __device__ __forceinline__
#else
#define PPML_HD inline
#endif

#if defined(__CUDA_ARCH__)
#define PPML_UNROLL _Pragma("unroll")
#elif defined(__CUDACC__)
#define PPML_UNROLL  // nvcc's host pass: neither spelling is understood by both front ends
#elif defined(__GNUC__) && !defined(__clang__)
#define PPML_UNROLL _Pragma("GCC unroll 16")
#else
#define PPML_UNROLL
#endif

namespace ppml {

// Dtype tags passed from Python (ppml_fast/ops/_native.py keeps the same table).
enum class DType : int { kFloat32 = 0, kFloat64 = 1, kFloat16 = 2, kBFloat16 = 3 };

PPML_HD int dtype_size(DType t) {
  return t == DType::kFloat64 ? 8 : (t == DType::kFloat32 ? 4 : 2);
}

PPML_HD float bits_to_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, 4);
  return f;
#endif
}

PPML_HD uint32_t float_to_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
#endif
}

PPML_HD double bits_to_double(uint64_t u) {
#if defined(__CUDA_ARCH__)
  return __longlong_as_double(static_cast<long long>(u));
#else
  double d;
  std::memcpy(&d, &u, 8);
  return d;
#endif
}

PPML_HD uint64_t double_to_bits(double d) {
#if defined(__CUDA_ARCH__)
  return static_cast<uint64_t>(__double_as_longlong(d));
#else
  uint64_t u;
  std::memcpy(&u, &d, 8);
  return u;
#endif
}

PPML_HD float bf16_to_float(uint16_t h) { return bits_to_float(static_cast<uint32_t>(h) << 16); }

// Round to nearest even; NaN stays a (quiet) NaN.
PPML_HD uint16_t float_to_bf16(float f) {
  uint32_t u = float_to_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x0040u);
  uint32_t rounding = 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>((u + rounding) >> 16);
}

PPML_HD float half_to_float(uint16_t h) {
  uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t man = h & 0x3ffu;
  if (exp == 0x1fu) return bits_to_float(sign | 0x7f800000u | (man << 13));  // inf / nan
  if (exp == 0) {
    // zero or subnormal: value = man * 2^-24, exact in float
    float v = static_cast<float>(man) * 5.9604644775390625e-08f;
    return sign ? -v : v;
  }
  return bits_to_float(sign | ((exp + 112u) << 23) | (man << 13));
}

// Round to nearest even, overflow to inf, NaN stays NaN.
PPML_HD uint16_t float_to_half(float f) {
  uint32_t u = float_to_bits(f);
  uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000u);
  uint32_t a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return static_cast<uint16_t>(sign | 0x7e00u);
  if (a >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u);  // >= 65520 rounds to inf
  if (a < 0x38800000u) {                                                  // below 2^-14: subnormal
    if (a < 0x33000000u) return sign;                                     // below 2^-25: rounds to 0
    uint32_t exp = a >> 23;
    uint32_t man = (a & 0x7fffffu) | 0x800000u;
    uint32_t shift = 126u - exp;  // 14..24 for the range handled here
    uint32_t half_man = man >> shift;
    uint32_t rem = man & ((1u << shift) - 1u);
    uint32_t halfway = 1u << (shift - 1u);
    if (rem > halfway || (rem == halfway && (half_man & 1u))) ++half_man;
    return static_cast<uint16_t>(sign | half_man);
  }
  uint32_t rounded = a + 0x0fffu + ((a >> 13) & 1u);
  return static_cast<uint16_t>(sign | ((rounded - 0x38000000u) >> 13));
}

// Loads and stores in the accumulation type of each storage type.
template <typename T> struct Storage;
template <> struct Storage<float> {
  using acc = float;
  PPML_HD static float load(const float* p, int64_t i) { return p[i]; }
  PPML_HD static void store(float* p, int64_t i, double v) { p[i] = static_cast<float>(v); }
};
template <> struct Storage<double> {
  using acc = double;
  PPML_HD static double load(const double* p, int64_t i) { return p[i]; }
  PPML_HD static void store(double* p, int64_t i, double v) { p[i] = v; }
};
struct Half { uint16_t bits; };
struct BFloat16 { uint16_t bits; };
template <> struct Storage<Half> {
  using acc = float;
  PPML_HD static float load(const Half* p, int64_t i) { return half_to_float(p[i].bits); }
  PPML_HD static void store(Half* p, int64_t i, double v) { p[i].bits = float_to_half(static_cast<float>(v)); }
};
template <> struct Storage<BFloat16> {
  using acc = float;
  PPML_HD static float load(const BFloat16* p, int64_t i) { return bf16_to_float(p[i].bits); }
  PPML_HD static void store(BFloat16* p, int64_t i, double v) {
    p[i].bits = float_to_bf16(static_cast<float>(v));
  }
};

}  // namespace ppml
