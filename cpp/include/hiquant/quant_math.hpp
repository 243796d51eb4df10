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
