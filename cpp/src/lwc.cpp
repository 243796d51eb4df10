#include "hiquant/lwc.hpp"

#include <algorithm>
#include <cmath>

#include "hiquant/errors.hpp"
#include "hiquant/quant_math.hpp"
#include "hiquant/quantizer.hpp"

namespace hiquant {

LwcPart::LwcPart(const float* W, int64_t ldw, int64_t rows, int64_t cols, const LwcSpec& spec,
                 int n_threads)
    : spec_(spec), rows_(rows), cols_(cols) {
  HQ_CHECK(spec.bits >= 2 && spec.bits <= 8, "LWC bits must be in 2..8, got ", spec.bits);
  HQ_CHECK(rows > 0 && cols > 0, "LWC part needs a non-empty weight matrix, got ", rows, " x ",
           cols);
  HQ_CHECK(ldw >= cols, "LWC: leading dimension ", ldw, " < cols ", cols);
  HQ_CHECK(std::isfinite(spec.init), "LWC init must be finite, got ", spec.init);
  ng_ = hiquant::n_groups(cols, spec.group_size);
  gw_ = group_width(cols, spec.group_size);
  maxq_ = (1 << spec.bits) - 1;
  W_.resize(static_cast<size_t>(rows * cols));
  lo_.resize(static_cast<size_t>(rows * ng_));
  hi_.resize(static_cast<size_t>(rows * ng_));
  params_.assign(static_cast<size_t>(2 * rows * ng_), static_cast<float>(spec.init));
  parallel_for(rows, n_threads, [&](int64_t r) {
    std::copy(W + r * ldw, W + r * ldw + cols, W_.data() + r * cols);
    for (int64_t g = 0; g < ng_; ++g) {
      const int64_t c0 = g * gw_, n = std::min(gw_, cols - c0);
      const GroupRange gr = group_range(W_.data() + r * cols + c0, n, r, c0);
      lo_[r * ng_ + g] = gr.lo;
      hi_[r * ng_ + g] = gr.hi;
    }
  });
}

void LwcPart::check_params() const {
  const int64_t bad = first_nonfinite(params_.data(), n_params());
  if (bad >= 0)
    throw NumericalError(detail::concat(
        "LWC parameter ", bad < rows_ * ng_ ? "gamma" : "beta", " became non-finite (row ",
        (bad % (rows_ * ng_)) / ng_, ", group ", bad % ng_,
        "); lower the learning rate or check the gradients fed to the part"));
}

LwcPart::GroupParams LwcPart::group_params(int64_t r, int64_t g) const {
  GroupParams p;
  const int64_t i = r * ng_ + g;
  p.sg = sigmoid_d(params_[i]);
  p.sb = sigmoid_d(params_[rows_ * ng_ + i]);
  const double hi_c = double(hi_[i]) * p.sg;
  p.lo_c = double(lo_[i]) * p.sb;
  double s = (hi_c - p.lo_c) / maxq_;
  p.clamped = !(s >= kLwcMinScale && s <= kLwcMaxScale);
  s = std::min(std::max(s, kLwcMinScale), kLwcMaxScale);  // NaN -> kLwcMinScale
  p.scale = static_cast<float>(s);
  const double z = rint_d(-p.lo_c / double(p.scale));
  p.zero = std::min(std::max(z, 0.0), double(maxq_));
  return p;
}

namespace {

// code = clamp(rint(w / s) + z, 0, maxq) with the quotient clamped to +-512 first (keeps
// rint_d exact; cannot change a code since z, maxq <= 255). `in` reports whether the unclamped
// value lies in [0, maxq] (the straight-through mask).
inline double lwc_code(float w, double s, double z, double maxq, double* q_over_s, bool* in) {
  const double qs = double(w) / s;
  double q = qs < -512.0 ? -512.0 : (qs > 512.0 ? 512.0 : qs);
  const double v = rint_d(q) + z;
  *q_over_s = qs;
  *in = v >= 0.0 && v <= maxq;
  return v < 0.0 ? 0.0 : (v > maxq ? maxq : v);
}

}  // namespace

void LwcPart::forward(float* out, int64_t ldo, int n_threads) const {
  check_params();
  const double maxq = maxq_;
  parallel_for(rows_, threads_for(rows_ * cols_, n_threads), [&](int64_t r) {
    for (int64_t g = 0; g < ng_; ++g) {
      const GroupParams p = group_params(r, g);
      const int64_t c0 = g * gw_, n = std::min(gw_, cols_ - c0);
      const float* w = W_.data() + r * cols_ + c0;
      float* o = out + r * ldo + c0;
      const double s = p.scale;
      const float sf = p.scale, zf = static_cast<float>(p.zero);
      for (int64_t c = 0; c < n; ++c) {
        const double qs = double(w[c]) / s;
        const double q = qs < -512.0 ? -512.0 : (qs > 512.0 ? 512.0 : qs);
        double v = rint_d(q) + p.zero;
        v = v < 0.0 ? 0.0 : (v > maxq ? maxq : v);
        o[c] = sf * (static_cast<float>(v) - zf);
      }
    }
  });
}

void LwcPart::backward(const float* dwq, int64_t ldd, float* grad, int n_threads) const {
  check_params();
  const double maxq = maxq_;
  const int64_t np = rows_ * ng_;
  parallel_for(rows_, threads_for(rows_ * cols_, n_threads), [&](int64_t r) {
    for (int64_t g = 0; g < ng_; ++g) {
      const GroupParams p = group_params(r, g);
      const int64_t c0 = g * gw_, n = std::min(gw_, cols_ - c0);
      const float* w = W_.data() + r * cols_ + c0;
      const float* d = dwq + r * ldd + c0;
      const double s = p.scale;
      double ds = 0.0;
      for (int64_t c = 0; c < n; ++c) {
        double qs;
        bool in;
        const double code = lwc_code(w[c], s, p.zero, maxq, &qs, &in);
        const double dwq_ds = (code - p.zero) - (in ? qs : 0.0);
        ds += double(d[c]) * dwq_ds;
      }
      const int64_t i = r * ng_ + g;
      if (p.clamped) {
        grad[i] = grad[np + i] = 0.0f;
      } else {
        grad[i] = static_cast<float>(ds * double(hi_[i]) * p.sg * (1.0 - p.sg) / maxq);
        grad[np + i] = static_cast<float>(-ds * double(lo_[i]) * p.sb * (1.0 - p.sb) / maxq);
      }
    }
  });
}

void LwcPart::scales(float* scale, uint8_t* zero, int n_threads) const {
  check_params();
  parallel_for(rows_, threads_for(rows_ * cols_, n_threads), [&](int64_t r) {
    for (int64_t g = 0; g < ng_; ++g) {
      const GroupParams p = group_params(r, g);
      scale[r * ng_ + g] = p.scale;
      zero[r * ng_ + g] = static_cast<uint8_t>(p.zero);
    }
  });
}

void LwcPart::export_codes(uint8_t* codes, float* scale, uint8_t* zero, float* wq, int64_t ldq,
                           int n_threads) const {
  check_params();
  const double maxq = maxq_;
  parallel_for(rows_, threads_for(rows_ * cols_, n_threads), [&](int64_t r) {
    for (int64_t g = 0; g < ng_; ++g) {
      const GroupParams p = group_params(r, g);
      const float s16 = fp16_round_scale(p.scale);
      const double zd = std::min(std::max(rint_d(-p.lo_c / double(s16)), 0.0), maxq);
      const int64_t c0 = g * gw_, n = std::min(gw_, cols_ - c0);
      const float* w = W_.data() + r * cols_ + c0;
      const float zf = static_cast<float>(zd);
      scale[r * ng_ + g] = s16;
      zero[r * ng_ + g] = static_cast<uint8_t>(zd);
      for (int64_t c = 0; c < n; ++c) {
        double qs;
        bool in;
        const double code = lwc_code(w[c], s16, zd, maxq, &qs, &in);
        codes[r * cols_ + c0 + c] = static_cast<uint8_t>(code);
        // scale * (float(code) - zero), as hiquant.quantizer.dequantize computes it
        wq[r * ldq + c0 + c] = s16 * (static_cast<float>(code) - zf);
      }
    }
  });
}

}  // namespace hiquant
