#include "hiquant/adaround.hpp"

#include <algorithm>
#include <cmath>

#include "hiquant/errors.hpp"
#include "hiquant/quant_math.hpp"
#include "hiquant/quantizer.hpp"
#include "hiquant/simd.hpp"

// The lane templates also take eight-lane vectors; they are always inlined into the AVX2
// functions, so the ABI note GCC gives for 32-byte vector arguments does not apply.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

namespace hiquant {

double AdaRoundSchedule::b(int64_t t) const {
  const double start = warmup * double(iters);
  if (double(t) < start) return b_start;
  const double rel = (double(t) - start) / (double(iters) - start);
  return b_end + (b_start - b_end) * std::max(0.0, 1.0 - rel);
}

void validate_schedule(const AdaRoundSchedule& s) {
  HQ_CHECK(s.iters >= 0, "AdaRound iterations must be >= 0, got ", s.iters);
  HQ_CHECK(s.warmup >= 0 && s.warmup < 1, "AdaRound warmup must be a fraction in [0, 1), got ",
           s.warmup);
  HQ_CHECK(std::isfinite(s.b_start) && std::isfinite(s.b_end) && s.b_start >= 1 && s.b_end >= 1,
           "AdaRound exponents b_start, b_end must be >= 1, got ", s.b_start, ", ", s.b_end);
  HQ_CHECK(std::isfinite(s.lam) && s.lam >= 0, "AdaRound lambda must be >= 0, got ", s.lam);
}

namespace {

inline float sigmoid_f(float x) { return vm::sigmoid_approx(x); }

constexpr int64_t kChunk = 64;

// Per-lane bodies (F = float or a four-lane vector; see quant_math.hpp).
template <typename F>
HQ_VM_INLINE F soft_lane(F V, F base, F s, F z, F maxq) {
  const F zero = vm::splat(0.0f, V), one = vm::splat(1.0f, V);
  const F h = vm::clamp_(vm::sigmoid_approx(V) * vm::splat(kAdaZeta - kAdaGamma, V) +
                             vm::splat(kAdaGamma, V), zero, one);
  return s * (vm::clamp_(base + h, zero, maxq) - z);
}

template <typename F>
HQ_VM_INLINE F hard_lane(F V, F base, F s, F z, F maxq) {
  const F zero = vm::splat(0.0f, V), one = vm::splat(1.0f, V);
  return s * (vm::clamp_(base + vm::sel(vm::ge(V, zero), one, zero), zero, maxq) - z);
}

// dL/dV for one lane: the straight-through chain through h(V) plus, when `reg` is nonzero, the
// regularizer R = lam (1 - |2h - 1|^b), dR/dh = -2 lam b |2h - 1|^(b-1) sign(2h - 1), with
// |x|^b = exp(b log|x|) (0 at x = 0, where the gradient is 0 too). *one_minus_p = 1 - |2h-1|^b.
template <typename F>
HQ_VM_INLINE F grad_lane(F V, F base, F d, F s, F maxq, F lam, F b, F reg, F* one_minus_p) {
  const F zero = vm::splat(0.0f, V), one = vm::splat(1.0f, V), two = vm::splat(2.0f, V);
  const F span = vm::splat(kAdaZeta - kAdaGamma, V);
  const F sig = vm::sigmoid_approx(V);
  const F u = sig * span + vm::splat(kAdaGamma, V);
  const F h = vm::clamp_(u, zero, one);
  const F v = base + h;
  F dh = vm::sel(vm::ge(v, zero) & vm::le(v, maxq), d * s, zero);
  const F x = two * h - one;
  const F ax = vm::fabs_(x);
  const F tiny = vm::splat(1e-30f, V);
  const F axs = vm::sel(vm::gt(ax, tiny), ax, tiny);
  const auto pos = vm::gt(ax, zero);
  const F p = vm::sel(pos, vm::exp_approx(b * vm::log_approx(axs)), zero);
  const F dr = (zero - lam) * b * (p / axs) * vm::sel(vm::gt(x, zero), two, zero - two);
  dh = dh + vm::sel(pos, dr * reg, zero);
  *one_minus_p = one - p;
  return vm::sel(vm::ge(u, zero) & vm::le(u, one), dh * span * sig * (one - sig), zero);
}

// One row of forward() / backward(): eight lanes (AVX2 variant), then four, then one; every
// element goes through the same operations whatever its lane width, so the bits do not depend
// on the variant (hiquant/simd.hpp).
template <bool kAvx2>
HQ_VM_INLINE void forward_span(const float* V, const float* base, float s, float z, float maxq,
                               bool hard, int64_t m, float* o) {
  int64_t c = 0;
#if defined(HQ_HAVE_V8)
  if (kAvx2) {
    const vm::v8f sv = vm::splat(s, vm::v8f{}), zv = vm::splat(z, vm::v8f{});
    const vm::v8f mv = vm::splat(maxq, vm::v8f{});
    for (; c + 8 <= m; c += 8) {
      const vm::v8f Vv = vm::load8(V + c), bv = vm::load8(base + c);
      vm::store8(o + c, hard ? hard_lane(Vv, bv, sv, zv, mv) : soft_lane(Vv, bv, sv, zv, mv));
    }
  }
#endif
#if defined(HQ_HAVE_V4)
  const vm::v4f sv = vm::splat(s, vm::v4f{}), zv = vm::splat(z, vm::v4f{});
  const vm::v4f mv = vm::splat(maxq, vm::v4f{});
  for (; c + 4 <= m; c += 4) {
    const vm::v4f Vv = vm::load(V + c), bv = vm::load(base + c);
    vm::store(o + c, hard ? hard_lane(Vv, bv, sv, zv, mv) : soft_lane(Vv, bv, sv, zv, mv));
  }
#endif
  for (; c < m; ++c)
    o[c] = hard ? hard_lane(V[c], base[c], s, z, maxq) : soft_lane(V[c], base[c], s, z, maxq);
}

template <bool kAvx2>
HQ_VM_INLINE void grad_span(const float* V, const float* base, const float* d, float s,
                            float maxq, float lamf, float bf, float regf, int64_t m, float* gr,
                            float* omp) {
  int64_t c = 0;
#if defined(HQ_HAVE_V8)
  if (kAvx2) {
    const vm::v8f x{};
    const vm::v8f sv = vm::splat(s, x), mv = vm::splat(maxq, x), lv = vm::splat(lamf, x);
    const vm::v8f bv = vm::splat(bf, x), rv = vm::splat(regf, x);
    for (; c + 8 <= m; c += 8) {
      vm::v8f o;
      vm::store8(gr + c, grad_lane(vm::load8(V + c), vm::load8(base + c), vm::load8(d + c), sv,
                                   mv, lv, bv, rv, &o));
      vm::store8(omp + c, o);
    }
  }
#endif
#if defined(HQ_HAVE_V4)
  {
    const vm::v4f x{};
    const vm::v4f sv = vm::splat(s, x), mv = vm::splat(maxq, x), lv = vm::splat(lamf, x);
    const vm::v4f bv = vm::splat(bf, x), rv = vm::splat(regf, x);
    for (; c + 4 <= m; c += 4) {
      vm::v4f o;
      vm::store(gr + c, grad_lane(vm::load(V + c), vm::load(base + c), vm::load(d + c), sv, mv,
                                  lv, bv, rv, &o));
      vm::store(omp + c, o);
    }
  }
#endif
  for (; c < m; ++c) gr[c] = grad_lane(V[c], base[c], d[c], s, maxq, lamf, bf, regf, &omp[c]);
}

struct AdaRowArgs {
  const float* base;   // this row's base codes
  const float* V;      // this row's parameters
  const float* scale;  // this row's scales (n_groups)
  const uint8_t* zero;
  int64_t cols, ng, gw;
  float maxq;
};

template <bool kAvx2>
HQ_VM_INLINE void forward_row_t(const AdaRowArgs& a, bool hard, float* o) {
  for (int64_t g = 0; g < a.ng; ++g) {
    const int64_t c0 = g * a.gw, m = std::min(a.gw, a.cols - c0);
    forward_span<kAvx2>(a.V + c0, a.base + c0, a.scale[g], float(a.zero[g]), a.maxq, hard, m,
                        o + c0);
  }
}

// The regularizer's partial sum of one row (four double accumulators, in column order).
template <bool kAvx2>
HQ_VM_INLINE double backward_row_t(const AdaRowArgs& a, const float* d, float lamf, float bf,
                                   float regf, bool lam_on, float* gr) {
  double acc[4] = {0.0, 0.0, 0.0, 0.0};
  float omp[kChunk];
  for (int64_t g = 0; g < a.ng; ++g) {
    const int64_t c0 = g * a.gw, n = std::min(a.gw, a.cols - c0);
    const float s = a.scale[g];
    for (int64_t k0 = 0; k0 < n; k0 += kChunk) {
      const int64_t m = std::min(kChunk, n - k0);
      grad_span<kAvx2>(a.V + c0 + k0, a.base + c0 + k0, d + c0 + k0, s, a.maxq, lamf, bf, regf,
                       m, gr + c0 + k0, omp);
      if (lam_on)
        for (int64_t i = 0; i < m; ++i) acc[i & 3] += double(omp[i]);
    }
  }
  return (acc[0] + acc[1]) + (acc[2] + acc[3]);
}

void forward_row(const AdaRowArgs& a, bool hard, float* o) { forward_row_t<false>(a, hard, o); }
double backward_row(const AdaRowArgs& a, const float* d, float lamf, float bf, float regf,
                    bool lam_on, float* gr) {
  return backward_row_t<false>(a, d, lamf, bf, regf, lam_on, gr);
}
#if defined(HQ_HAVE_V8) && defined(HQ_ELEM_X86)
HQ_ELEM_AVX2 void forward_row_avx2(const AdaRowArgs& a, bool hard, float* o) {
  forward_row_t<true>(a, hard, o);
}
HQ_ELEM_AVX2 double backward_row_avx2(const AdaRowArgs& a, const float* d, float lamf, float bf,
                                      float regf, bool lam_on, float* gr) {
  return backward_row_t<true>(a, d, lamf, bf, regf, lam_on, gr);
}
#define HQ_ADA_AVX2 1
#endif

inline float clip01(float u) { return u < 0.0f ? 0.0f : (u > 1.0f ? 1.0f : u); }

}  // namespace

AdaRoundPart::AdaRoundPart(const float* W, int64_t ldw, int64_t rows, int64_t cols,
                           const AdaRoundSpec& spec, int n_threads, const float* scale_in)
    : spec_(spec), rows_(rows), cols_(cols) {
  HQ_CHECK(spec.bits >= 2 && spec.bits <= 8, "AdaRound bits must be in 2..8, got ", spec.bits);
  HQ_CHECK(rows > 0 && cols > 0, "AdaRound part needs a non-empty weight matrix, got ", rows,
           " x ", cols);
  HQ_CHECK(ldw >= cols, "AdaRound: leading dimension ", ldw, " < cols ", cols);
  ng_ = hiquant::n_groups(cols, spec.group_size);
  gw_ = group_width(cols, spec.group_size);
  maxq_ = (1 << spec.bits) - 1;
  const size_t n = static_cast<size_t>(rows * cols);
  W_.resize(n);
  base_.resize(n);
  V_.resize(n);
  scale_.resize(static_cast<size_t>(rows * ng_));
  zero_.resize(static_cast<size_t>(rows * ng_));
  const double zeta = kAdaZeta, gamma = kAdaGamma;
  parallel_for(rows, n_threads, [&](int64_t r) {
    std::copy(W + r * ldw, W + r * ldw + cols, W_.data() + r * cols);
    for (int64_t g = 0; g < ng_; ++g) {
      const int64_t c0 = g * gw_, m = std::min(gw_, cols - c0);
      const float* w = W_.data() + r * cols + c0;
      const GroupRange gr = group_range(w, m, r, c0);
      const float s = scale_in ? scale_in[r * ng_ + g]
                               : fp16_round_scale(
                                     static_cast<float>((double(gr.hi) - double(gr.lo)) / maxq_));
      const double z = std::min(std::max(rint_d(-double(gr.lo) / double(s)), 0.0), double(maxq_));
      scale_[r * ng_ + g] = s;
      zero_[r * ng_ + g] = static_cast<uint8_t>(z);
      for (int64_t c = 0; c < m; ++c) {
        const double q = double(w[c]) / double(s);
        const double fl = std::floor(q);
        const double rest = q - fl;  // [0, 1)
        base_[r * cols + c0 + c] = static_cast<float>(fl + z);
        // sigmoid(V) = (rest - gamma) / (zeta - gamma)  =>  V = log((rest - gamma) / (zeta - rest))
        V_[r * cols + c0 + c] = static_cast<float>(std::log((rest - gamma) / (zeta - rest)));
      }
    }
  });
}

void AdaRoundPart::check_params() const {
  const int64_t bad = first_nonfinite(V_.data(), n_params());
  if (bad >= 0)
    throw NumericalError(detail::concat("AdaRound parameter V became non-finite at row ",
                                        bad / cols_, ", column ", bad % cols_,
                                        "; lower the learning rate or check the gradients"));
}

void AdaRoundPart::forward(float* out, int64_t ldo, bool hard, int n_threads) const {
  check_params();
  const float maxq = float(maxq_);
#if defined(HQ_ADA_AVX2)
  const bool avx2 = elementwise_avx2();
#endif
  parallel_for(rows_, threads_for(rows_ * cols_, n_threads), [&](int64_t r) {
    const AdaRowArgs a{base_.data() + r * cols_, V_.data() + r * cols_, scale_.data() + r * ng_,
                       zero_.data() + r * ng_, cols_, ng_, gw_, maxq};
#if defined(HQ_ADA_AVX2)
    if (avx2) {
      forward_row_avx2(a, hard, out + r * ldo);
      return;
    }
#endif
    forward_row(a, hard, out + r * ldo);
  });
}

double AdaRoundPart::backward(const float* dwq, int64_t ldd, double lam, double b, float* grad,
                              int n_threads) const {
  check_params();
  HQ_CHECK(lam >= 0 && std::isfinite(lam), "AdaRound lambda must be >= 0");
  HQ_CHECK(b >= 1 && std::isfinite(b), "AdaRound exponent b must be >= 1, got ", b);
  const float maxq = float(maxq_);
  const float lamf = static_cast<float>(lam), bf = static_cast<float>(b);
  const float regf = lam > 0.0 ? 1.0f : 0.0f;
  const bool lam_on = lam > 0.0;
#if defined(HQ_ADA_AVX2)
  const bool avx2 = elementwise_avx2();
#endif
  std::vector<double> reg_rows(static_cast<size_t>(rows_), 0.0);
  parallel_for(rows_, threads_for(rows_ * cols_, n_threads), [&](int64_t r) {
    const AdaRowArgs a{base_.data() + r * cols_, V_.data() + r * cols_, scale_.data() + r * ng_,
                       zero_.data() + r * ng_, cols_, ng_, gw_, maxq};
    const float* d = dwq + r * ldd;
    float* gr = grad + r * cols_;
#if defined(HQ_ADA_AVX2)
    if (avx2) {
      reg_rows[r] = backward_row_avx2(a, d, lamf, bf, regf, lam_on, gr);
      return;
    }
#endif
    reg_rows[r] = backward_row(a, d, lamf, bf, regf, lam_on, gr);
  });
  if (!lam_on) return 0.0;
  double total = 0.0;
  for (double x : reg_rows) total += x;  // fixed order: identical for any thread count
  return lam * total;
}

double AdaRoundPart::reg_loss(double lam, double b, int n_threads) const {
  check_params();
  HQ_CHECK(b >= 1 && std::isfinite(b), "AdaRound exponent b must be >= 1, got ", b);
  // The regularizer's value through the same lane code as backward (gradient discarded).
  const float bf = static_cast<float>(b), maxq = float(maxq_);
  std::vector<double> reg_rows(static_cast<size_t>(rows_), 0.0);
  parallel_for(rows_, threads_for(rows_ * cols_, n_threads), [&](int64_t r) {
    double acc[4] = {0.0, 0.0, 0.0, 0.0};
    const float* V = V_.data() + r * cols_;
    const float* base = base_.data() + r * cols_;
    for (int64_t c = 0; c < cols_; ++c) {
      float omp;
      (void)grad_lane(V[c], base[c], 0.0f, 1.0f, maxq, 0.0f, bf, 1.0f, &omp);
      acc[c & 3] += double(omp);
    }
    reg_rows[r] = (acc[0] + acc[1]) + (acc[2] + acc[3]);
  });
  double total = 0.0;
  for (double x : reg_rows) total += x;
  return lam * total;
}

double AdaRoundPart::soft_fraction(int n_threads) const {
  const float span = kAdaZeta - kAdaGamma;
  std::vector<int64_t> cnt(static_cast<size_t>(rows_), 0);
  parallel_for(rows_, threads_for(rows_ * cols_, n_threads), [&](int64_t r) {
    const float* V = V_.data() + r * cols_;
    int64_t k = 0;
    for (int64_t c = 0; c < cols_; ++c) {
      const float u = sigmoid_f(V[c]) * span + kAdaGamma;
      k += (u > 0.0f && u < 1.0f) ? 1 : 0;
    }
    cnt[r] = k;
  });
  int64_t total = 0;
  for (int64_t x : cnt) total += x;
  return double(total) / double(rows_ * cols_);
}

void AdaRoundPart::export_codes(uint8_t* codes, float* scale, uint8_t* zero, float* wq,
                                int64_t ldq, int n_threads) const {
  check_params();
  const float maxq = float(maxq_);
  parallel_for(rows_, threads_for(rows_ * cols_, n_threads), [&](int64_t r) {
    for (int64_t g = 0; g < ng_; ++g) {
      const int64_t c0 = g * gw_, m = std::min(gw_, cols_ - c0);
      const float s = scale_[r * ng_ + g], z = float(zero_[r * ng_ + g]);
      scale[r * ng_ + g] = s;
      zero[r * ng_ + g] = zero_[r * ng_ + g];
      for (int64_t c = 0; c < m; ++c) {
        const int64_t i = r * cols_ + c0 + c;
        float v = base_[i] + (V_[i] >= 0.0f ? 1.0f : 0.0f);
        v = v < 0.0f ? 0.0f : (v > maxq ? maxq : v);
        codes[i] = static_cast<uint8_t>(v);
        wq[r * ldq + c0 + c] = s * (v - z);
      }
    }
  });
}

}  // namespace hiquant
