#include "hiquant/quantizer.hpp"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "hiquant/errors.hpp"
#include "hiquant/simd.hpp"

#if defined(HQ_ELEM_X86)
#include <immintrin.h>
#endif

namespace hiquant {

int64_t n_groups(int64_t cols, int64_t group_size) {
  if (group_size <= 0 || group_size >= cols) return cols > 0 ? 1 : 0;
  return (cols + group_size - 1) / group_size;
}

void validate_spec(const QuantSpec& spec, int64_t cols) {
  HQ_CHECK(spec.bits >= 2 && spec.bits <= 8, "bits must be in 2..8, got ", spec.bits);
  HQ_CHECK(cols > 0, "the weight matrix has no columns");
  (void)cols;
}

namespace {

inline int64_t group_width(int64_t cols, int64_t group_size) {
  return (group_size <= 0 || group_size >= cols) ? cols : group_size;
}

struct GroupParams {
  float scale;
  uint8_t zero;
};

// The range [lo, hi] of one group with 0 included, and `bad`: 0 for finite weights, NaN
// otherwise (`v - v` is 0 for finite v and NaN otherwise, so one pass flags any NaN/Inf). min and
// max do not depend on the order of the elements, so the lane width does not change the result.
#if defined(__GNUC__) || defined(__clang__)
#define HQ_VM_ROW_INLINE inline __attribute__((always_inline))
#else
#define HQ_VM_ROW_INLINE inline
#endif

struct RangeAcc {
  float lo, hi, bad;
};

HQ_VM_ROW_INLINE RangeAcc range_portable(const float* w, int64_t n) {
  float lo = 0.0f, hi = 0.0f, bad = 0.0f;  // the range always includes 0
  int64_t c = 0;
#if defined(__GNUC__)
  {
    typedef float f4 __attribute__((vector_size(16)));
    f4 lo4 = {0, 0, 0, 0}, hi4 = {0, 0, 0, 0}, bad4 = {0, 0, 0, 0};
    for (; c + 4 <= n; c += 4) {
      f4 v;
      __builtin_memcpy(&v, w + c, sizeof v);
      lo4 = v < lo4 ? v : lo4;
      hi4 = v > hi4 ? v : hi4;
      bad4 += v - v;
    }
    for (int k = 0; k < 4; ++k) {
      lo = std::min(lo, lo4[k]);
      hi = std::max(hi, hi4[k]);
      bad += bad4[k];
    }
  }
#endif
  for (; c < n; ++c) {
    const float v = w[c];
    lo = v < lo ? v : lo;
    hi = v > hi ? v : hi;
    bad += v - v;
  }
  return {lo, hi, bad};
}

// Min-max parameters of one group from its range; throws NumericalError on a non-finite weight.
HQ_VM_ROW_INLINE GroupParams params_from_range(RangeAcc a, const float* w, int64_t n, int maxq,
                                     int64_t row, int64_t col0) {
  float lo = a.lo, hi = a.hi;
  if (a.bad != 0.0f) {
    for (int64_t i = 0; i < n; ++i)
      if (!std::isfinite(w[i]))
        throw NumericalError(detail::concat("weight is not finite (", w[i], ") at row ", row,
                                            ", column ", col0 + i,
                                            "; check the checkpoint or the preceding computation"));
  }
  if (lo == 0.0f && hi == 0.0f) {
    lo = -1.0f;
    hi = 1.0f;
  }
  const float scale = static_cast<float>((double(hi) - double(lo)) / maxq);
  const double z = rint_exact(-double(lo) / double(scale));
  return {scale, static_cast<uint8_t>(std::clamp(z, 0.0, double(maxq)))};
}

// code = clamp(rint(w / scale) + zero, 0, maxq), returned as an exact integer-valued double.
// The quotient is clamped to +-512 first so that rint_exact stays in its exact range for any
// scale; this cannot change the clamped code because zero and maxq are at most 255. Written with
// plain comparisons (no std::clamp, no integer conversion) so that GCC vectorizes the loops.
inline double encode_d(float w, double scale, double zero, double maxq) {
  double q = double(w) / scale;
  q = q < -512.0 ? -512.0 : (q > 512.0 ? 512.0 : q);
  q = rint_exact(q) + zero;
  return q < 0.0 ? 0.0 : (q > maxq ? maxq : q);
}

// The fast path: the quotient estimated in float32 as w * (1/scale). Its error is at most
// |q| * 2^-23 <= 512 * 1.2e-7 = 6.1e-5, so wherever the estimate lies more than kTieMargin from
// a half-integer, rounding it gives the same integer as rounding the exact double quotient. The
// few elements within the margin (about 2e-4 of them, or any NaN from an extreme scale) are
// recomputed with the double division, so codes stay identical to the float64 reference.
constexpr float kTieMargin = 1e-4f;

inline float rint_exact_f(float x) {  // round-half-to-even for |x| < 2^22
  constexpr float kMagic = 12582912.0f;  // 1.5 * 2^23
  return (x + kMagic) - kMagic;
}

// Writes integer-valued float codes of w[0..n) into `code`; returns whether any element lies
// within the tie margin (or is NaN) and so needs the exact path.
// kDequant: write scale * (code - zero) instead of the code (fake quantization in one pass).
template <bool kDequant>
inline float encode_one_fast(float w, float inv_scale, float scale, float zero, float maxq,
                             float* code) {
  float q = w * inv_scale;
  q = q < -512.0f ? -512.0f : (q > 512.0f ? 512.0f : q);
  const float r = rint_exact_f(q);
  const float d = q > r ? q - r : r - q;
  float v = r + zero;
  v = v < 0.0f ? 0.0f : (v > maxq ? maxq : v);
  *code = kDequant ? scale * (v - zero) : v;
  return (d < 0.5f - kTieMargin) ? 0.0f : 1.0f;  // 1 also for NaN (comparison false)
}

#if defined(__GNUC__)
// GCC/Clang vector extensions: four lanes on any x86-64 (SSE2) or ARM64 (NEON) target, wider
// registers are used when the build enables them. The auto-vectorizer does not manage this
// loop (select chains plus a flag reduction), and it runs on every weight.
typedef float hq_f4 __attribute__((vector_size(16)));
typedef int hq_i4 __attribute__((vector_size(16)));

template <bool kDequant>
inline bool encode_fast(const float* w, int64_t n, float inv_scale, float scale, float zero,
                        float maxq, float* code) {
  const hq_f4 vinv = {inv_scale, inv_scale, inv_scale, inv_scale};
  const hq_f4 vscale = {scale, scale, scale, scale};
  const hq_f4 vzero = {zero, zero, zero, zero}, vmaxq = {maxq, maxq, maxq, maxq};
  const hq_f4 lo = {-512.f, -512.f, -512.f, -512.f}, hi = {512.f, 512.f, 512.f, 512.f};
  const hq_f4 magic = {12582912.f, 12582912.f, 12582912.f, 12582912.f};
  const hq_f4 fzero = {0.f, 0.f, 0.f, 0.f};
  const float lim = 0.5f - kTieMargin;
  const hq_f4 vlim = {lim, lim, lim, lim};
  hq_i4 near = {0, 0, 0, 0};
  int64_t c = 0;
  for (; c + 4 <= n; c += 4) {
    hq_f4 x;
    __builtin_memcpy(&x, w + c, sizeof x);
    hq_f4 q = x * vinv;
    q = q < lo ? lo : q;
    q = q > hi ? hi : q;
    const hq_f4 r = (q + magic) - magic;
    const hq_f4 d = q > r ? q - r : r - q;
    near |= ~(d < vlim);  // all-ones where not clearly away from a tie, NaN included
    hq_f4 v = r + vzero;
    v = v < fzero ? fzero : v;
    v = v > vmaxq ? vmaxq : v;
    if (kDequant) v = vscale * (v - vzero);
    __builtin_memcpy(code + c, &v, sizeof v);
  }
  float tail = 0.0f;
  for (; c < n; ++c)
    tail += encode_one_fast<kDequant>(w[c], inv_scale, scale, zero, maxq, code + c);
  return (near[0] | near[1] | near[2] | near[3]) != 0 || tail != 0.0f;
}
#else
template <bool kDequant>
inline bool encode_fast(const float* w, int64_t n, float inv_scale, float scale, float zero,
                        float maxq, float* code) {
  float near_tie = 0.0f;
  for (int64_t c = 0; c < n; ++c)
    near_tie += encode_one_fast<kDequant>(w[c], inv_scale, scale, zero, maxq, code + c);
  return near_tie != 0.0f;
}
#endif

#if defined(HQ_ELEM_X86)
// The same two passes, eight lanes at a time (AVX2 without FMA: the same IEEE operations per
// element as encode_fast / range_portable, see hiquant/simd.hpp). Tails go through the portable
// code, which gives an element the same bits.
HQ_ELEM_AVX2 RangeAcc range_avx2(const float* w, int64_t n) {
  __m256 lo8 = _mm256_setzero_ps(), hi8 = _mm256_setzero_ps(), bad8 = _mm256_setzero_ps();
  int64_t c = 0;
  for (; c + 8 <= n; c += 8) {
    const __m256 v = _mm256_loadu_ps(w + c);
    lo8 = _mm256_min_ps(v, lo8);  // v < lo ? v : lo
    hi8 = _mm256_max_ps(v, hi8);  // v > hi ? hi : v
    bad8 = _mm256_add_ps(bad8, _mm256_sub_ps(v, v));
  }
  // Lanes hold +0 or values strictly below (above) it, never -0 or NaN, so reducing them in any
  // order gives the minimum (maximum) range_portable finds.
  __m128 l = _mm_min_ps(_mm256_castps256_ps128(lo8), _mm256_extractf128_ps(lo8, 1));
  __m128 h = _mm_max_ps(_mm256_castps256_ps128(hi8), _mm256_extractf128_ps(hi8, 1));
  l = _mm_min_ps(l, _mm_shuffle_ps(l, l, 0x4E));
  h = _mm_max_ps(h, _mm_shuffle_ps(h, h, 0x4E));
  l = _mm_min_ss(l, _mm_shuffle_ps(l, l, 0xB1));
  h = _mm_max_ss(h, _mm_shuffle_ps(h, h, 0xB1));
  RangeAcc t = range_portable(w + c, n - c);
  const float lo = _mm_cvtss_f32(l), hi = _mm_cvtss_f32(h);
  t.lo = std::min(t.lo, lo);
  t.hi = std::max(t.hi, hi);
  // bad is only tested against 0: NaN in any lane (a non-finite weight) makes it NaN.
  if (_mm256_movemask_ps(_mm256_cmp_ps(bad8, bad8, _CMP_UNORD_Q)) != 0) t.bad = bad8[0] + NAN;
  return t;
}

template <bool kDequant>
HQ_ELEM_AVX2 bool encode_fast_avx2(const float* w, int64_t n, float inv_scale, float scale,
                                   float zero, float maxq, float* code) {
  const __m256 vinv = _mm256_set1_ps(inv_scale), vscale = _mm256_set1_ps(scale);
  const __m256 vzero = _mm256_set1_ps(zero), vmaxq = _mm256_set1_ps(maxq);
  const __m256 lo = _mm256_set1_ps(-512.f), hi = _mm256_set1_ps(512.f);
  const __m256 magic = _mm256_set1_ps(12582912.f), fzero = _mm256_setzero_ps();
  const __m256 vlim = _mm256_set1_ps(0.5f - kTieMargin), sign = _mm256_set1_ps(-0.0f);
  __m256 near = _mm256_setzero_ps();
  int64_t c = 0;
  for (; c + 8 <= n; c += 8) {
    const __m256 x = _mm256_loadu_ps(w + c);
    // max_ps(a, b) is exactly `a > b ? a : b` and min_ps(a, b) `a < b ? a : b` (the second
    // operand when either is NaN), so each select chain of encode_fast is one instruction.
    __m256 q = _mm256_mul_ps(x, vinv);
    q = _mm256_max_ps(lo, q);  // q < lo ? lo : q
    q = _mm256_min_ps(hi, q);  // q > hi ? hi : q
    const __m256 r = _mm256_sub_ps(_mm256_add_ps(q, magic), magic);
    // |q - r|: r - q is exactly -(q - r), so this is encode_fast's `q > r ? q - r : r - q`.
    const __m256 d = _mm256_andnot_ps(sign, _mm256_sub_ps(q, r));
    near = _mm256_or_ps(near, _mm256_cmp_ps(d, vlim, _CMP_NLT_UQ));  // !(d < lim), NaN included
    __m256 v = _mm256_add_ps(r, vzero);
    v = _mm256_max_ps(fzero, v);  // v < 0 ? 0 : v
    v = _mm256_min_ps(vmaxq, v);  // v > maxq ? maxq : v
    if (kDequant) v = _mm256_mul_ps(vscale, _mm256_sub_ps(v, vzero));
    _mm256_storeu_ps(code + c, v);
  }
  const bool tail = c < n && encode_fast<kDequant>(w + c, n - c, inv_scale, scale, zero, maxq,
                                                   code + c);
  return _mm256_movemask_ps(near) != 0 || tail;
}
#endif

// Recomputes the near-tie elements of one chunk with the exact double division.
template <bool kDequant>
inline void fix_near_ties(const float* w, int64_t n, float inv_scale, float scale, uint8_t zero,
                          int maxq, float* code) {
  for (int64_t c = 0; c < n; ++c) {
    float q = w[c] * inv_scale;
    q = q < -512.0f ? -512.0f : (q > 512.0f ? 512.0f : q);
    const float r = rint_exact_f(q);
    const float d = q > r ? q - r : r - q;
    if (!(d < 0.5f - kTieMargin)) {
      const float v = float(encode_d(w[c], scale, zero, maxq));
      code[c] = kDequant ? scale * (v - float(zero)) : v;
    }
  }
}

// Codes (or, with kDequant, dequantized values) of one group as floats in `code`. Checked in
// chunks of 64 so that a near tie sends only its own chunk (about 1% of them) through the exact
// path, even for long per-row groups.
template <bool kDequant, bool kAvx2>
HQ_VM_ROW_INLINE void encode_group(const float* w, int64_t n, float scale, uint8_t zero, int maxq,
                         float* code) {
  const float inv = 1.0f / scale;
  constexpr int64_t kChunk = 64;
  for (int64_t c0 = 0; c0 < n; c0 += kChunk) {
    const int64_t m = std::min(kChunk, n - c0);
#if defined(HQ_ELEM_X86)
    const bool near = kAvx2 ? encode_fast_avx2<kDequant>(w + c0, m, inv, scale, float(zero),
                                                         float(maxq), code + c0)
                            : encode_fast<kDequant>(w + c0, m, inv, scale, float(zero),
                                                    float(maxq), code + c0);
#else
    const bool near = encode_fast<kDequant>(w + c0, m, inv, scale, float(zero), float(maxq),
                                            code + c0);
#endif
    if (near) fix_near_ties<kDequant>(w + c0, m, inv, scale, zero, maxq, code + c0);
  }
}

template <bool kAvx2>
HQ_VM_ROW_INLINE RangeAcc group_range_acc(const float* w, int64_t n) {
#if defined(HQ_ELEM_X86)
  if (kAvx2) return range_avx2(w, n);
#endif
  return range_portable(w, n);
}

template <bool kAvx2>
HQ_VM_ROW_INLINE GroupParams group_minmax(const float* w, int64_t n, int maxq, int64_t row, int64_t col0) {
  return params_from_range(group_range_acc<kAvx2>(w, n), w, n, maxq, row, col0);
}

// One row of fake_quantize: every group's parameters first (their divisions are independent, so
// they overlap instead of stalling each group's encode), then the dequantized values.
template <bool kAvx2>
HQ_VM_ROW_INLINE void fake_quantize_row(const float* w, int64_t r, int64_t cols, int64_t gw,
                                        int64_t ng, int maxq, float* out, float* scale_out,
                                        uint8_t* zero_out) {
  for (int64_t g = 0; g < ng; ++g) {
    const int64_t c0 = g * gw, n = std::min(gw, cols - c0);
    const GroupParams p = group_minmax<kAvx2>(w + c0, n, maxq, r, c0);
    scale_out[g] = p.scale;
    zero_out[g] = p.zero;
  }
  // (code - zero) is exact in float, so the values equal dequantize()'s
  // scale * (float(code) - zero) bit for bit.
  for (int64_t g = 0; g < ng; ++g) {
    const int64_t c0 = g * gw, n = std::min(gw, cols - c0);
    encode_group<true, kAvx2>(w + c0, n, scale_out[g], zero_out[g], maxq, out + c0);
  }
}

void fake_quantize_row_portable(const float* w, int64_t r, int64_t cols, int64_t gw, int64_t ng,
                                int maxq, float* out, float* scale_out, uint8_t* zero_out) {
  fake_quantize_row<false>(w, r, cols, gw, ng, maxq, out, scale_out, zero_out);
}

#if defined(HQ_ELEM_X86)
HQ_ELEM_AVX2 void fake_quantize_row_avx2(const float* w, int64_t r, int64_t cols, int64_t gw,
                                         int64_t ng, int maxq, float* out, float* scale_out,
                                         uint8_t* zero_out) {
  fake_quantize_row<true>(w, r, cols, gw, ng, maxq, out, scale_out, zero_out);
}
#endif

void check_params(const float* scale, const uint8_t* zero, int64_t rows, int64_t ng, int maxq) {
  for (int64_t i = 0; i < rows * ng; ++i) {
    HQ_CHECK(std::isfinite(scale[i]) && scale[i] > 0.0f, "scale must be finite and positive; got ",
             scale[i], " at row ", i / ng, ", group ", i % ng);
    HQ_CHECK(zero[i] <= maxq, "zero must be an integer in [0, ", maxq, "]; got ", int(zero[i]),
             " at row ", i / ng, ", group ", i % ng);
  }
}

}  // namespace

void minmax_params(const float* W, int64_t rows, int64_t cols, const QuantSpec& spec, float* scale,
                   uint8_t* zero, int n_threads) {
  validate_spec(spec, cols);
  const int64_t ng = n_groups(cols, spec.group_size), gw = group_width(cols, spec.group_size);
  const int maxq = (1 << spec.bits) - 1;
  const bool avx2 = elementwise_avx2();
  parallel_for(rows, n_threads, [&](int64_t r) {
    for (int64_t g = 0; g < ng; ++g) {
      const int64_t c0 = g * gw, n = std::min(gw, cols - c0);
      const GroupParams p = avx2 ? group_minmax<true>(W + r * cols + c0, n, maxq, r, c0)
                                 : group_minmax<false>(W + r * cols + c0, n, maxq, r, c0);
      scale[r * ng + g] = p.scale;
      zero[r * ng + g] = p.zero;
    }
  });
}

void quantize(const float* W, int64_t rows, int64_t cols, const QuantSpec& spec, const float* scale,
              const uint8_t* zero, uint8_t* codes, int n_threads) {
  validate_spec(spec, cols);
  const int64_t ng = n_groups(cols, spec.group_size), gw = group_width(cols, spec.group_size);
  const int maxq = (1 << spec.bits) - 1;
  check_params(scale, zero, rows, ng, maxq);
  const bool avx2 = elementwise_avx2();
  parallel_for(rows, n_threads, [&](int64_t r) {
    std::vector<float> buf(static_cast<size_t>(gw));
    for (int64_t g = 0; g < ng; ++g) {
      const int64_t c0 = g * gw, n = std::min(gw, cols - c0);
      const float* w = W + r * cols + c0;
      for (int64_t c = 0; c < n; ++c)
        if (!std::isfinite(w[c]))
          throw NumericalError(detail::concat("weight is not finite (", w[c], ") at row ", r,
                                              ", column ", c0 + c));
      if (avx2)
        encode_group<false, true>(w, n, scale[r * ng + g], zero[r * ng + g], maxq, buf.data());
      else
        encode_group<false, false>(w, n, scale[r * ng + g], zero[r * ng + g], maxq, buf.data());
      uint8_t* q = codes + r * cols + c0;
      for (int64_t c = 0; c < n; ++c) q[c] = static_cast<uint8_t>(buf[c]);
    }
  });
}

void dequantize(const uint8_t* codes, int64_t rows, int64_t cols, const QuantSpec& spec,
                const float* scale, const uint8_t* zero, float* out, int n_threads) {
  validate_spec(spec, cols);
  const int64_t ng = n_groups(cols, spec.group_size), gw = group_width(cols, spec.group_size);
  const int maxq = (1 << spec.bits) - 1;
  check_params(scale, zero, rows, ng, maxq);
  for (int64_t i = 0; i < rows * cols; ++i)
    HQ_CHECK(codes[i] <= maxq, "codes must be < 2^bits = ", maxq + 1, "; got ", int(codes[i]),
             " at flat index ", i);
  parallel_for(rows, n_threads, [&](int64_t r) {
    for (int64_t g = 0; g < ng; ++g) {
      const int64_t c0 = g * gw, n = std::min(gw, cols - c0);
      const float s = scale[r * ng + g], z = float(zero[r * ng + g]);
      const uint8_t* q = codes + r * cols + c0;
      float* o = out + r * cols + c0;
      for (int64_t c = 0; c < n; ++c) o[c] = s * (float(q[c]) - z);
    }
  });
}

void fake_quantize(const float* W, int64_t rows, int64_t cols, const QuantSpec& spec, float* out,
                   float* scale_out, uint8_t* zero_out, int n_threads) {
  validate_spec(spec, cols);
  const int64_t ng = n_groups(cols, spec.group_size), gw = group_width(cols, spec.group_size);
  const int maxq = (1 << spec.bits) - 1;
  auto row = fake_quantize_row_portable;
#if defined(HQ_ELEM_X86)
  if (elementwise_avx2()) row = fake_quantize_row_avx2;
#endif
  // Parameters go to the caller's arrays, or to scratch when it does not want them.
  std::vector<float> s_tmp(scale_out ? 0 : static_cast<size_t>(rows * ng));
  std::vector<uint8_t> z_tmp(zero_out ? 0 : static_cast<size_t>(rows * ng));
  float* sp = scale_out ? scale_out : s_tmp.data();
  uint8_t* zp = zero_out ? zero_out : z_tmp.data();
  // Blocks of rows taken dynamically (a shared core does not stall the others); rows are
  // independent, so the results do not depend on the schedule.
  const int64_t block = std::max<int64_t>(1, (int64_t(1) << 15) / cols);
  const int64_t n_blocks = (rows + block - 1) / block;
  parallel_for_dynamic(n_blocks, n_threads, [&](int64_t b) {
    for (int64_t r = b * block; r < std::min(rows, (b + 1) * block); ++r)
      row(W + r * cols, r, cols, gw, ng, maxq, out + r * cols, sp + r * ng, zp + r * ng);
  });
}

// ---------------------------------------------------------------------------------------------
// Packing. A run of 8 codes of b bits is exactly b bytes, so chunks of 8 codes are independent
// and pack in parallel; the tail (n % 8 codes) goes through the generic bit loop.

int64_t packed_size(int64_t n_codes, int bits) {
  HQ_CHECK(bits == 2 || bits == 3 || bits == 4 || bits == 6 || bits == 8,
           "packing supports bits in {2, 3, 4, 6, 8}; got ", bits);
  HQ_CHECK(n_codes >= 0, "negative code count ", n_codes);
  return (n_codes * bits + 7) / 8;
}

namespace {
inline void pack8(const uint8_t* c, int bits, uint8_t* o) {
  uint64_t acc = 0;
  for (int k = 0; k < 8; ++k) acc |= uint64_t(c[k]) << (k * bits);
  for (int b = 0; b < bits; ++b) o[b] = uint8_t(acc >> (8 * b));
}
inline void unpack8(const uint8_t* p, int bits, uint8_t* c) {
  uint64_t acc = 0;
  for (int b = 0; b < bits; ++b) acc |= uint64_t(p[b]) << (8 * b);
  const uint64_t mask = (1u << bits) - 1;
  for (int k = 0; k < 8; ++k) c[k] = uint8_t((acc >> (k * bits)) & mask);
}
constexpr int64_t kChunk = 1 << 14;  // codes per parallel task (a multiple of 8)
}  // namespace

void pack_codes(const uint8_t* codes, int64_t n, int bits, uint8_t* out, int n_threads) {
  const int64_t nbytes = packed_size(n, bits);
  const int maxq = (1 << bits) - 1;
  // Validate first: a code that does not fit would be silently truncated (lossy packing).
  for (int64_t i = 0; i < n; ++i)
    HQ_CHECK(codes[i] <= maxq, "codes must be < 2^bits = ", maxq + 1, " to pack losslessly; got ",
             int(codes[i]), " at flat index ", i);
  const int64_t full = n / 8;
  const int64_t n_tasks = (full * 8 + kChunk - 1) / kChunk;
  parallel_for(n_tasks, n_threads, [&](int64_t t) {
    const int64_t b0 = t * (kChunk / 8), b1 = std::min(full, b0 + kChunk / 8);
    for (int64_t k = b0; k < b1; ++k) pack8(codes + 8 * k, bits, out + bits * k);
  });
  // Tail: generic bit loop into the remaining bytes.
  const int64_t tail0 = full * 8;
  std::memset(out + bits * full, 0, size_t(nbytes - bits * full));
  for (int64_t i = tail0; i < n; ++i) {
    const int64_t bit = (i - tail0) * bits;
    uint8_t* dst = out + bits * full;
    const uint32_t v = uint32_t(codes[i]) << (bit % 8);
    dst[bit / 8] |= uint8_t(v);
    if ((bit % 8) + bits > 8) dst[bit / 8 + 1] |= uint8_t(v >> 8);
  }
}

void unpack_codes(const uint8_t* packed, int64_t n, int bits, uint8_t* out, int n_threads) {
  (void)packed_size(n, bits);
  const int64_t full = n / 8;
  const int64_t n_tasks = (full * 8 + kChunk - 1) / kChunk;
  parallel_for(n_tasks, n_threads, [&](int64_t t) {
    const int64_t b0 = t * (kChunk / 8), b1 = std::min(full, b0 + kChunk / 8);
    for (int64_t k = b0; k < b1; ++k) unpack8(packed + bits * k, bits, out + 8 * k);
  });
  const uint8_t* src = packed + bits * full;
  const uint32_t mask = (1u << bits) - 1;
  for (int64_t i = full * 8; i < n; ++i) {
    const int64_t bit = (i - full * 8) * bits;
    uint32_t v = src[bit / 8];
    if ((bit % 8) + bits > 8) v |= uint32_t(src[bit / 8 + 1]) << 8;
    out[i] = uint8_t((v >> (bit % 8)) & mask);
  }
}

}  // namespace hiquant
