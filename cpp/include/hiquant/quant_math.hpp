// Small exact helpers shared by the learned quantizers (LWC, AdaRound) and GPTQ.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "hiquant/errors.hpp"

namespace hiquant {

// Stored scales are float16 (hiquant.layers): a scale is clipped to float16's normal range
// [2^-14, 65504] and rounded to the nearest float16 (ties to even), then used as a float32. Every
// method applies this before computing its final codes, so that an fp16-scale export reproduces
// the dequantized weights exactly. Same result as numpy's float32 -> float16 -> float32 after
// hiquant.layers.fp16_scales' clip.
constexpr float kFp16Tiny = 6.103515625e-05f;  // 2^-14
constexpr float kFp16Max = 65504.0f;

inline float fp16_round_scale(float s) {
  if (!(s >= kFp16Tiny)) s = kFp16Tiny;  // also maps NaN to the smallest scale
  if (s > kFp16Max) s = kFp16Max;
  uint32_t b;
  std::memcpy(&b, &s, sizeof b);
  // Drop 13 of float32's 23 mantissa bits with round-to-nearest-even; a carry into the exponent
  // is the correct rounding up to the next power of two (65504 itself is representable).
  b += 0x0FFFu + ((b >> 13) & 1u);
  b &= 0xFFFFE000u;
  std::memcpy(&s, &b, sizeof s);
  return s;
}

// Threads for an elementwise pass over `work` elements: one below ~64K elements, where starting a
// parallel region (and, on a busy machine, waiting at its barrier) costs more than it saves.
// Elementwise passes give the same result for any thread count, so this changes only speed.
inline int threads_for(int64_t work, int n_threads) {
  return work < (int64_t(1) << 16) ? 1 : n_threads;
}

inline int64_t group_width(int64_t cols, int64_t group_size) {
  return (group_size <= 0 || group_size >= cols) ? cols : group_size;
}

// The min-max range of a group with 0 included (as hiquant.quantizer and GPTQ's Quantizer); an
// all-zero group gets [-1, 1]. Throws NumericalError on a non-finite weight.
struct GroupRange {
  float lo, hi;
};

inline GroupRange group_range(const float* w, int64_t n, int64_t row, int64_t col0) {
  float lo = 0.0f, hi = 0.0f, bad = 0.0f;
  for (int64_t c = 0; c < n; ++c) {
    const float v = w[c];
    lo = v < lo ? v : lo;
    hi = v > hi ? v : hi;
    bad += v - v;  // NaN for NaN/Inf
  }
  if (bad != 0.0f) {
    for (int64_t c = 0; c < n; ++c)
      if (!std::isfinite(w[c]))
        throw NumericalError(detail::concat("weight is not finite (", w[c], ") at row ", row,
                                            ", column ", col0 + c,
                                            "; check the checkpoint or the preceding computation"));
  }
  if (lo == 0.0f && hi == 0.0f) {
    lo = -1.0f;
    hi = 1.0f;
  }
  return {lo, hi};
}

inline double sigmoid_d(double x) {
  return x >= 0 ? 1.0 / (1.0 + std::exp(-x)) : std::exp(x) / (1.0 + std::exp(x));
}

// Round-half-to-even of a double with |x| < 2^51 (see quantizer.hpp's rint_exact).
inline double rint_d(double x) {
  constexpr double kMagic = 6755399441055744.0;  // 1.5 * 2^52
  return (x + kMagic) - kMagic;
}

// ---------------------------------------------------------------------------------------------
// float32 exp / log / sigmoid for the elementwise passes (std::exp and std::pow are library calls
// per element: the AdaRound passes spent most of their time in them). Cephes' expf and logf
// polynomials, relative error below 2e-7 over the ranges used here. Written once as templates
// over a lane type: `float` (scalar tails) and, with GCC/Clang, a four-lane vector (SSE2 on
// x86-64, NEON on ARM64), with the same operations in the same order, so that an element gets
// the same bits in a vector lane or in a tail. The auto-vectorizer does not manage these loops
// (nested selects plus reductions), hence the explicit vectors.

#if defined(__GNUC__) || defined(__clang__)
#define HQ_VM_INLINE inline __attribute__((always_inline))
#else
#define HQ_VM_INLINE inline
#endif

namespace vm {

inline float splat(float x, float) { return x; }
inline bool lt(float a, float b) { return a < b; }
inline bool gt(float a, float b) { return a > b; }
inline bool ge(float a, float b) { return a >= b; }
inline bool le(float a, float b) { return a <= b; }
inline float sel(bool m, float a, float b) { return m ? a : b; }
inline float fabs_(float x) { return std::fabs(x); }
inline int32_t to_int(float x) { return static_cast<int32_t>(x); }
inline float to_float(int32_t i) { return static_cast<float>(i); }
inline float from_bits(int32_t i) {
  float f;
  std::memcpy(&f, &i, sizeof f);
  return f;
}
inline int32_t to_bits(float f) {
  int32_t i;
  std::memcpy(&i, &f, sizeof i);
  return i;
}
inline int32_t isplat(int32_t x, float) { return x; }

#if defined(__GNUC__) || defined(__clang__)
#define HQ_HAVE_V4 1
typedef float v4f __attribute__((vector_size(16)));
typedef int32_t v4i __attribute__((vector_size(16)));
inline v4f splat(float x, v4f) { return v4f{x, x, x, x}; }
inline v4i lt(v4f a, v4f b) { return a < b; }
inline v4i gt(v4f a, v4f b) { return a > b; }
inline v4i ge(v4f a, v4f b) { return a >= b; }
inline v4i le(v4f a, v4f b) { return a <= b; }
inline v4f sel(v4i m, v4f a, v4f b) { return (v4f)((m & (v4i)a) | (~m & (v4i)b)); }
inline v4f fabs_(v4f x) {
  const v4i mask = {0x7fffffff, 0x7fffffff, 0x7fffffff, 0x7fffffff};
  return (v4f)((v4i)x & mask);
}
inline v4i to_int(v4f x) { return __builtin_convertvector(x, v4i); }
inline v4f to_float(v4i i) { return __builtin_convertvector(i, v4f); }
inline v4f from_bits(v4i i) { return (v4f)i; }
inline v4i to_bits(v4f f) { return (v4i)f; }
inline v4i isplat(int32_t x, v4f) { return v4i{x, x, x, x}; }
inline v4f load(const float* p) {
  v4f v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
inline void store(float* p, v4f v) { std::memcpy(p, &v, sizeof v); }
#endif

#if defined(HQ_HAVE_V4) && defined(__x86_64__)
// Eight lanes, for the AVX2 variants of the elementwise kernels (hiquant/simd.hpp): used only
// inside functions compiled with target("avx2"), into which every function below and the lane
// templates that use them are always inlined (so no 32-byte vector crosses a call).
#define HQ_HAVE_V8 1
#pragma GCC diagnostic push  // popped after the lane templates below
#pragma GCC diagnostic ignored "-Wpsabi"
typedef float v8f __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));
HQ_VM_INLINE v8f splat(float x, v8f) { return v8f{x, x, x, x, x, x, x, x}; }
HQ_VM_INLINE v8i lt(v8f a, v8f b) { return a < b; }
HQ_VM_INLINE v8i gt(v8f a, v8f b) { return a > b; }
HQ_VM_INLINE v8i ge(v8f a, v8f b) { return a >= b; }
HQ_VM_INLINE v8i le(v8f a, v8f b) { return a <= b; }
HQ_VM_INLINE v8f sel(v8i m, v8f a, v8f b) { return (v8f)((m & (v8i)a) | (~m & (v8i)b)); }
HQ_VM_INLINE v8f fabs_(v8f x) {
  const v8i mask = {0x7fffffff, 0x7fffffff, 0x7fffffff, 0x7fffffff,
                    0x7fffffff, 0x7fffffff, 0x7fffffff, 0x7fffffff};
  return (v8f)((v8i)x & mask);
}
HQ_VM_INLINE v8i to_int(v8f x) { return __builtin_convertvector(x, v8i); }
HQ_VM_INLINE v8f to_float(v8i i) { return __builtin_convertvector(i, v8f); }
HQ_VM_INLINE v8f from_bits(v8i i) { return (v8f)i; }
HQ_VM_INLINE v8i to_bits(v8f f) { return (v8i)f; }
HQ_VM_INLINE v8i isplat(int32_t x, v8f) { return v8i{x, x, x, x, x, x, x, x}; }
HQ_VM_INLINE v8f load8(const float* p) {
  v8f v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
HQ_VM_INLINE void store8(float* p, v8f v) { std::memcpy(p, &v, sizeof v); }
#endif

// lo if v < lo, hi if v > hi, else v (NaN passes through), as the scalar ternary chain.
template <typename F>
HQ_VM_INLINE F clamp_(F v, F lo, F hi) {
  return sel(lt(v, lo), lo, sel(gt(v, hi), hi, v));
}

// exp(x), x clamped to [-87, 88] (results stay normal floats).
template <typename F>
HQ_VM_INLINE F exp_approx(F x) {
  const F lo = splat(-87.0f, x), hi = splat(88.0f, x);
  x = sel(lt(x, lo), lo, x);
  x = sel(gt(x, hi), hi, x);
  const F magic = splat(12582912.0f, x);  // 1.5 * 2^23: adding it rounds to an integer
  const F n = (x * splat(1.44269504088896341f, x) + magic) - magic;
  F r = x - n * splat(0.693359375f, x);  // Cody-Waite: ln 2 in a short and a small part
  r = r - n * splat(-2.12194440e-4f, x);
  F p = splat(1.9875691500E-4f, x);
  p = p * r + splat(1.3981999507E-3f, x);
  p = p * r + splat(8.3334519073E-3f, x);
  p = p * r + splat(4.1665795894E-2f, x);
  p = p * r + splat(1.6666665459E-1f, x);
  p = p * r + splat(5.0000001201E-1f, x);
  const F y = p * r * r + r + splat(1.0f, x);
  return y * from_bits((to_int(n) + isplat(127, x)) << 23);
}

// log(x) for normal x > 0.
template <typename F>
HQ_VM_INLINE F log_approx(F x) {
  const auto b = to_bits(x);
  const auto e = ((b >> 23) & isplat(0xff, x)) - isplat(126, x);
  F m = from_bits((b & isplat(0x007fffff, x)) | isplat(0x3f000000, x));  // mantissa in [0.5, 1)
  const auto small = lt(m, splat(0.707106781186547524f, x));
  const F one = splat(1.0f, x), zero = splat(0.0f, x);
  const F ef = to_float(e) - sel(small, one, zero);
  m = sel(small, m + m - one, m - one);
  const F z = m * m;
  F y = splat(7.0376836292E-2f, x);
  y = y * m - splat(1.1514610310E-1f, x);
  y = y * m + splat(1.1676998740E-1f, x);
  y = y * m - splat(1.2420140846E-1f, x);
  y = y * m + splat(1.4249322787E-1f, x);
  y = y * m - splat(1.6668057665E-1f, x);
  y = y * m + splat(2.0000714765E-1f, x);
  y = y * m - splat(2.4999993993E-1f, x);
  y = y * m + splat(3.3333331174E-1f, x);
  y = y * m * z;
  y = y + splat(-2.12194440e-4f, x) * ef;
  y = y + splat(-0.5f, x) * z;
  return m + y + splat(0.693359375f, x) * ef;
}

// The logistic function, accurate for any x (exp of a non-positive argument only).
template <typename F>
HQ_VM_INLINE F sigmoid_approx(F x) {
  const F e = exp_approx(splat(0.0f, x) - fabs_(x));
  const F s = splat(1.0f, x) / (splat(1.0f, x) + e);
  return sel(ge(x, splat(0.0f, x)), s, e * s);
}

#if defined(HQ_HAVE_V8)
#pragma GCC diagnostic pop
#endif

}  // namespace vm

// Checks a float buffer for NaN/Inf in one pass; returns the first bad index or -1.
inline int64_t first_nonfinite(const float* x, int64_t n) {
  float bad = 0.0f;
  for (int64_t i = 0; i < n; ++i) bad += x[i] - x[i];
  if (bad == 0.0f) return -1;
  for (int64_t i = 0; i < n; ++i)
    if (!std::isfinite(x[i])) return i;
  return -1;
}

}  // namespace hiquant
