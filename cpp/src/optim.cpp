#include "hiquant/optim.hpp"

#include <algorithm>
#include <cmath>

#include "hiquant/errors.hpp"
#include "hiquant/parallel.hpp"
#include "hiquant/simd.hpp"

namespace hiquant {

void validate_adam(const AdamConfig& c) {
  HQ_CHECK(std::isfinite(c.lr) && c.lr > 0, "lr (the learning rate) must be a positive number, got ", c.lr);
  HQ_CHECK(c.beta1 >= 0 && c.beta1 < 1, "beta1 must be in [0, 1), got ", c.beta1);
  HQ_CHECK(c.beta2 >= 0 && c.beta2 < 1, "beta2 must be in [0, 1), got ", c.beta2);
  HQ_CHECK(std::isfinite(c.eps) && c.eps > 0, "eps must be a positive number, got ", c.eps);
  HQ_CHECK(std::isfinite(c.weight_decay) && c.weight_decay >= 0,
           "weight_decay must be a non-negative number, got ", c.weight_decay);
}

Adam::Adam(int64_t n, const AdamConfig& cfg) : cfg_(cfg) {
  validate_adam(cfg);
  HQ_CHECK(n >= 0, "Adam: negative parameter count");
  m_.assign(static_cast<size_t>(n), 0.0f);
  v_.assign(static_cast<size_t>(n), 0.0f);
}

void Adam::reset() {
  t_ = 0;
  std::fill(m_.begin(), m_.end(), 0.0f);
  std::fill(v_.begin(), v_.end(), 0.0f);
}

namespace {

struct AdamScalars {
  float step_size, bc2_sqrt, omb1, b2, omb2, eps, wd, decay;
  bool decoupled, has_wd;
};

// One span of the update; written as a plain loop that GCC vectorizes (four lanes in the
// portable build, eight in the AVX2 clone below: the same IEEE operations per element, and no
// FMA, so the same bits; see hiquant/simd.hpp).
#if defined(__GNUC__) || defined(__clang__)
__attribute__((always_inline))
#endif
inline void adam_span(const AdamScalars& k, float* p, const float* g, float* m, float* v,
                      int64_t a, int64_t b) {
  for (int64_t i = a; i < b; ++i) {
    float gi = g[i];
    float pi = p[i];
    if (k.has_wd) {
      if (k.decoupled)
        pi *= k.decay;
      else
        gi += k.wd * pi;
    }
    const float mi = m[i] + k.omb1 * (gi - m[i]);  // torch's lerp_(grad, 1 - beta1)
    const float vi = k.b2 * v[i] + k.omb2 * (gi * gi);
    m[i] = mi;
    v[i] = vi;
    p[i] = pi - k.step_size * (mi / (std::sqrt(vi) / k.bc2_sqrt + k.eps));
  }
}

void adam_span_portable(const AdamScalars& k, float* p, const float* g, float* m, float* v,
                        int64_t a, int64_t b) {
  adam_span(k, p, g, m, v, a, b);
}

#if defined(HQ_ELEM_X86)
HQ_ELEM_AVX2 void adam_span_avx2(const AdamScalars& k, float* p, const float* g, float* m,
                                 float* v, int64_t a, int64_t b) {
  adam_span(k, p, g, m, v, a, b);
}
#endif

}  // namespace

void Adam::step(float* p, const float* g, int n_threads) {
  validate_adam(cfg_);
  ++t_;
  const double bc1 = 1.0 - std::pow(cfg_.beta1, double(t_));
  const double bc2 = 1.0 - std::pow(cfg_.beta2, double(t_));
  // torch passes these as Python floats to float32 tensor ops: they act as float32 scalars.
  AdamScalars k;
  k.step_size = static_cast<float>(cfg_.lr / bc1);
  k.bc2_sqrt = static_cast<float>(std::sqrt(bc2));
  k.omb1 = static_cast<float>(1.0 - cfg_.beta1);
  k.b2 = static_cast<float>(cfg_.beta2);
  k.omb2 = static_cast<float>(1.0 - cfg_.beta2);
  k.eps = static_cast<float>(cfg_.eps);
  k.wd = static_cast<float>(cfg_.weight_decay);
  k.decay = static_cast<float>(1.0 - cfg_.lr * cfg_.weight_decay);
  k.decoupled = cfg_.decoupled;
  k.has_wd = cfg_.weight_decay != 0.0;
  float* m = m_.data();
  float* v = v_.data();
  const int64_t n = size();
  auto span = adam_span_portable;
#if defined(HQ_ELEM_X86)
  if (elementwise_avx2()) span = adam_span_avx2;
#endif
  constexpr int64_t kChunk = 1 << 15;
  const int64_t n_chunks = (n + kChunk - 1) / kChunk;
  parallel_for(n_chunks, n_chunks > 1 ? n_threads : 1, [&](int64_t c) {
    const int64_t a = c * kChunk, b = std::min(n, a + kChunk);
    span(k, p, g, m, v, a, b);
  });
}

}  // namespace hiquant
