// Adam / AdamW state for the learned quantizer parameters (LWC clipping factors, AdaRound V).
//
// The update is PyTorch's single-tensor Adam/AdamW, written out so that a step here and a step of
// torch.optim.Adam(W) on the same gradients agree to float rounding:
//   t += 1
//   AdamW: p *= 1 - lr * wd            Adam with wd: g += wd * p
//   m = beta1 * m + (1 - beta1) * g    v = beta2 * v + (1 - beta2) * g^2
//   p -= lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)
// Parameters and moments are float32 (as torch keeps them for float32 parameters); the bias
// corrections are computed in double. Elementwise, so results do not depend on n_threads.
#pragma once
#include <cstdint>
#include <vector>

namespace hiquant {

struct AdamConfig {
  double lr = 1e-3;
  double beta1 = 0.9;
  double beta2 = 0.999;
  double eps = 1e-8;
  double weight_decay = 0.0;
  bool decoupled = true;  // true: AdamW (decoupled weight decay); false: Adam's L2 term
};

void validate_adam(const AdamConfig& cfg);

class Adam {
 public:
  Adam() = default;
  Adam(int64_t n, const AdamConfig& cfg);
  void reset();  // zero moments and step count
  // One update of params[0..n) from grads[0..n).
  void step(float* params, const float* grads, int n_threads = 0);
  int64_t size() const { return static_cast<int64_t>(m_.size()); }
  int64_t steps() const { return t_; }
  AdamConfig& config() { return cfg_; }
  const AdamConfig& config() const { return cfg_; }
  const std::vector<float>& exp_avg() const { return m_; }
  const std::vector<float>& exp_avg_sq() const { return v_; }

 private:
  AdamConfig cfg_;
  int64_t t_ = 0;
  std::vector<float> m_, v_;
};

}  // namespace hiquant
