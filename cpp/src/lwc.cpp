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
  gw_ = hiquant::group_width(cols, spec.group_size);
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

constexpr int64_t kChunk = 64;
constexpr float kTieMargin = 1e-4f;

// Codes clamp(rint(w / s) + z, 0, maxq) (integer-valued floats) and the straight-through mask
// [0 <= rint(w / s) + z <= maxq] of n <= kChunk weights. The quotient is estimated as w * (1/s)
// in float32 (error <= 512 * 2^-23 < kTieMargin after the +-512 clamp, which cannot change a code
// since z, maxq <= 255); a chunk holding an element within kTieMargin of a half-integer (or a
// NaN) is recomputed with the exact double division, so codes equal the float64 reference's
// (the same scheme as hiquant::quantize). Four lanes at a time (see quant_math.hpp).
template <typename F>
inline F encode_lane(F w, F inv, F z, F maxq, F* res, F* dist) {
  const F lim = vm::splat(512.0f, w), zero = vm::splat(0.0f, w);
  const F magic = vm::splat(12582912.0f, w);  // 1.5 * 2^23: round half to even
  const F q = vm::clamp_(w * inv, zero - lim, lim);
  const F r = (q + magic) - magic;
  *dist = vm::sel(vm::gt(q, r), q - r, r - q);
  const F v = r + z;
  const F code = vm::clamp_(v, zero, maxq);
  // d w_q / d scale: (code - zero) - [in range] w / scale, i.e. r - q in range (exact: r and q
  // are within 1/2), else code - zero.
  *res = vm::sel(vm::ge(v, zero) & vm::le(v, maxq), r - q, code - z);
  return code;
}

// Codes of n <= kChunk weights into `code`, and the straight-through derivative of w_q / scale
// into `res` (see encode_lane).
inline void encode_chunk(const float* w, int64_t n, float s, float inv, float z, float maxq,
                         float* code, float* res) {
  const float lim = 0.5f - kTieMargin;
  bool near = false;
  int64_t c = 0;
#if defined(HQ_HAVE_V4)
  {
    const vm::v4f x{};
    const vm::v4f iv = vm::splat(inv, x), zv = vm::splat(z, x), mv = vm::splat(maxq, x);
    const vm::v4f lv = vm::splat(lim, x);
    vm::v4i far = {-1, -1, -1, -1};
    for (; c + 4 <= n; c += 4) {
      vm::v4f rs, dist;
      vm::store(code + c, encode_lane(vm::load(w + c), iv, zv, mv, &rs, &dist));
      vm::store(res + c, rs);
      far &= vm::lt(dist, lv);  // false for NaN too
    }
    near = !(far[0] & far[1] & far[2] & far[3]);
  }
#endif
  for (; c < n; ++c) {
    float dist;
    code[c] = encode_lane(w[c], inv, z, maxq, &res[c], &dist);
    near |= !(dist < lim);
  }
  if (near) {
    for (c = 0; c < n; ++c) {
      double q = double(w[c]) / double(s);
      q = q < -512.0 ? -512.0 : (q > 512.0 ? 512.0 : q);
      const double r = rint_d(q), v = r + double(z);
      const double cd = v < 0.0 ? 0.0 : (v > maxq ? double(maxq) : v);
      code[c] = static_cast<float>(cd);
      res[c] = static_cast<float>((v >= 0.0 && v <= double(maxq)) ? r - q : cd - double(z));
    }
  }
}

}  // namespace

void LwcPart::forward(float* out, int64_t ldo, int n_threads) const {
  check_params();
  const float maxq = float(maxq_);
  parallel_for(rows_, threads_for(rows_ * cols_, n_threads), [&](int64_t r) {
    float code[kChunk], res[kChunk];
    for (int64_t g = 0; g < ng_; ++g) {
      const GroupParams p = group_params(r, g);
      const int64_t c0 = g * gw_, n = std::min(gw_, cols_ - c0);
      const float* w = W_.data() + r * cols_ + c0;
      float* o = out + r * ldo + c0;
      const float sf = p.scale, zf = static_cast<float>(p.zero), inv = 1.0f / sf;
      for (int64_t k0 = 0; k0 < n; k0 += kChunk) {
        const int64_t m = std::min(kChunk, n - k0);
        encode_chunk(w + k0, m, sf, inv, zf, maxq, code, res);
        for (int64_t c = 0; c < m; ++c) o[k0 + c] = sf * (code[c] - zf);
      }
    }
  });
}

void LwcPart::backward(const float* dwq, int64_t ldd, float* grad, int n_threads) const {
  check_params();
  const float maxq = float(maxq_);
  const int64_t np = rows_ * ng_;
  parallel_for(rows_, threads_for(rows_ * cols_, n_threads), [&](int64_t r) {
    float code[kChunk], res[kChunk];
    for (int64_t g = 0; g < ng_; ++g) {
      const GroupParams p = group_params(r, g);
      const int64_t c0 = g * gw_, n = std::min(gw_, cols_ - c0);
      const float* w = W_.data() + r * cols_ + c0;
      const float* d = dwq + r * ldd + c0;
      const float sf = p.scale, zf = static_cast<float>(p.zero), inv = 1.0f / sf;
      // dL/dscale = sum dL/dw_q * d w_q / d scale: float lanes within a chunk, chunks added in
      // double (a fixed order: no dependence on threads).
      double ds = 0.0;
      for (int64_t k0 = 0; k0 < n; k0 += kChunk) {
        const int64_t m = std::min(kChunk, n - k0);
        encode_chunk(w + k0, m, sf, inv, zf, maxq, code, res);
        float part[4] = {0.0f, 0.0f, 0.0f, 0.0f};
        int64_t c = 0;
#if defined(HQ_HAVE_V4)
        vm::v4f acc{};
        for (; c + 4 <= m; c += 4) acc += vm::load(d + k0 + c) * vm::load(res + c);
        vm::store(part, acc);
#endif
        for (; c < m; ++c) part[c & 3] += d[k0 + c] * res[c];
        ds += (double(part[0]) + double(part[1])) + (double(part[2]) + double(part[3]));
      }
      const int64_t i = r * ng_ + g;
      if (p.clamped) {
        grad[i] = grad[np + i] = 0.0f;
      } else {
        grad[i] = static_cast<float>(ds * double(hi_[i]) * p.sg * (1.0 - p.sg) / maxq_);
        grad[np + i] = static_cast<float>(-ds * double(lo_[i]) * p.sb * (1.0 - p.sb) / maxq_);
      }
    }
  });
}

void LwcPart::row_codes(int64_t r, float* m, float* a) const {
  const float maxq = float(maxq_);
  float code[kChunk], res[kChunk];
  for (int64_t g = 0; g < ng_; ++g) {
    const GroupParams p = group_params(r, g);
    const int64_t c0 = g * gw_, n = std::min(gw_, cols_ - c0);
    const float* w = W_.data() + r * cols_ + c0;
    const float sf = p.scale, zf = static_cast<float>(p.zero), inv = 1.0f / sf;
    for (int64_t k0 = 0; k0 < n; k0 += kChunk) {
      const int64_t cnt = std::min(kChunk, n - k0);
      encode_chunk(w + k0, cnt, sf, inv, zf, maxq, code, res);
      for (int64_t c = 0; c < cnt; ++c) {
        const float mc = code[c] - zf;
        m[c0 + k0 + c] = mc;
        // res = m - [in] * w / scale exactly when in range (r - q), and m when clamped
        a[c0 + k0 + c] = (res[c] == mc) ? 0.0f : w[k0 + c];
      }
    }
  }
}

void LwcPart::scale_grad_to_params(int64_t r, int64_t g, const GroupParams& p, double ds,
                                   float* grad) const {
  const int64_t i = r * ng_ + g, np = rows_ * ng_;
  if (p.clamped) {
    grad[i] = grad[np + i] = 0.0f;
  } else {
    grad[i] = static_cast<float>(ds * double(hi_[i]) * p.sg * (1.0 - p.sg) / maxq_);
    grad[np + i] = static_cast<float>(-ds * double(lo_[i]) * p.sb * (1.0 - p.sb) / maxq_);
  }
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
        double q = double(w[c]) / double(s16);  // exact, as hiquant::quantize
        q = q < -512.0 ? -512.0 : (q > 512.0 ? 512.0 : q);
        double code = rint_d(q) + zd;
        code = code < 0.0 ? 0.0 : (code > maxq ? maxq : code);
        codes[r * cols_ + c0 + c] = static_cast<uint8_t>(code);
        // scale * (float(code) - zero), as hiquant.quantizer.dequantize computes it
        wq[r * ldq + c0 + c] = s16 * (static_cast<float>(code) - zf);
      }
    }
  });
}

}  // namespace hiquant
