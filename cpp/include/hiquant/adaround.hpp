// AdaRound (Nagel et al. 2020, as in BRECQ's AdaRoundQuantizer) as a quantizer part.
//
// A part covers `cols` columns (its own copy of the weights). Scales are fixed min-max ones per
// group of g columns of the part (range including 0, as hiquant.quantizer), rounded through
// float16 at construction so that training and the exported model use the same grid:
//   scale = fp16_round_scale((hi - lo) / maxq),  zero = clamp(rint(-lo / scale), 0, maxq)
//   base  = floor(w / scale)                                 (division in double)
// One learnable V per weight, with the rectified sigmoid h(V) = clip(sigmoid(V)(zeta - gamma) +
// gamma, 0, 1), zeta = 1.1, gamma = -0.1, initialized so that h(V) = w / scale - base:
//   soft:  w_q = scale * (clamp(base + h(V) + zero, 0, maxq) - zero)
//   hard:  h replaced by [V >= 0] (h >= 1/2), BRECQ's alpha >= 0; final codes are integers.
// Rounding regularizer (BRECQ's 'relaxation' round loss) with exponent b:
//   R = lambda * sum(1 - |2 h(V) - 1|^b)
// Gradients: d w_q / d h = scale * [0 <= base + h + zero <= maxq], d h / d V = (zeta - gamma)
// sigmoid (1 - sigmoid) where the clip is inactive (clip bounds inclusive, as torch.clamp).
#pragma once
#include <cstdint>
#include <vector>

#include "hiquant/parallel.hpp"

namespace hiquant {

struct AdaRoundSpec {
  int bits = 3;
  int64_t group_size = 0;
};

constexpr float kAdaZeta = 1.1f;
constexpr float kAdaGamma = -0.1f;

// BRECQ's schedule (LinearTempDecay + the warm-up of LossFunction) for step t = 1..T:
// regularization off while t < warmup * T; b = b_start until then, then linear to b_end at T.
struct AdaRoundSchedule {
  int64_t iters = 5000;
  double warmup = 0.2;
  double b_start = 20.0;
  double b_end = 2.0;
  double lam = 0.01;
  bool active(int64_t t) const { return double(t) >= warmup * double(iters); }
  double b(int64_t t) const;
};
void validate_schedule(const AdaRoundSchedule& s);

class AdaRoundPart {
 public:
  // scale_in (optional, rows x n_groups): use these scales as given instead of min-max ones
  // rounded through float16 (the caller's stored precision, e.g. 8-bit double-quantized scales);
  // zero points are then recomputed from each group's range, as for min-max scales.
  AdaRoundPart(const float* W, int64_t ldw, int64_t rows, int64_t cols, const AdaRoundSpec& spec,
               int n_threads = 0, const float* scale_in = nullptr);

  int64_t rows() const { return rows_; }
  int64_t cols() const { return cols_; }
  int64_t n_groups() const { return ng_; }
  int bits() const { return spec_.bits; }
  int64_t group_size() const { return spec_.group_size; }
  const float* weights() const { return W_.data(); }

  int64_t n_params() const { return rows_ * cols_; }
  float* params() { return V_.data(); }
  const float* params() const { return V_.data(); }
  void check_params() const;

  // Soft (h(V)) or hard ([V >= 0]) quantized weights into out (rows x cols, leading dim ldo).
  void forward(float* out, int64_t ldo, bool hard, int n_threads = 0) const;
  // Gradient w.r.t. V from dL/dw_q (leading dim ldd), plus the regularizer's gradient when
  // lam > 0. Returns the regularizer's value (0 when lam == 0).
  double backward(const float* dwq, int64_t ldd, double lam, double b, float* grad,
                  int n_threads = 0) const;
  double reg_loss(double lam, double b, int n_threads = 0) const;
  // Fraction of weights whose soft h(V) is not yet 0 or 1 (for progress reports).
  double soft_fraction(int n_threads = 0) const;
  // Hard codes, the (fp16-rounded) scales and zeros, and the dequantized weights.
  void export_codes(uint8_t* codes, float* scale, uint8_t* zero, float* wq, int64_t ldq,
                    int n_threads = 0) const;

 private:
  AdaRoundSpec spec_;
  int64_t rows_, cols_, ng_, gw_;
  int maxq_;
  std::vector<float> W_;       // rows x cols
  std::vector<float> scale_;   // rows x n_groups, fp16-rounded
  std::vector<uint8_t> zero_;  // rows x n_groups
  std::vector<float> base_;    // rows x cols: floor(w / scale) + zero (integer-valued)
  std::vector<float> V_;       // rows x cols
};

}  // namespace hiquant
