// Learnable weight clipping (LWC, OmniQuant's weight-only variant) as a quantizer part.
//
// A part covers `cols` columns of a weight matrix (rows = d_out); it keeps its own copy of those
// weights. Groups: g consecutive columns of the part per row (g <= 0: one per row; ragged last
// group), parameters per (row, group), stored row-major (rows, n_groups).
//
// Forward, per group with learnable gamma, beta (initialized at 4, sigmoid(4) = 0.982):
//   lo = min(0, min w), hi = max(0, max w)       (all-zero group: [-1, 1])
//   lo_c = lo * sigmoid(beta), hi_c = hi * sigmoid(gamma)               (double)
//   scale = float32(clamp((hi_c - lo_c) / maxq, 1e-5, 1e4))            (OmniQuant's clamp)
//   zero = clamp(rint(-lo_c / scale), 0, maxq)
//   code = clamp(rint(w / scale) + zero, 0, maxq)  (division in double, round half to even)
//   w_q = scale * (code - zero)                   (float32)
// The range is forced to include 0, unlike OmniQuant (which clips the raw min and max). This is
// what the RTN baseline and the packed format do: zero then always lies in [0, maxq] and is
// stored in b bits, and with gamma, beta -> +inf (sigmoid = 1) the forward equals
// hiquant.quantizer.fake_quantize bit for bit. It differs from OmniQuant only for groups whose
// weights all have one sign.
//
// Backward (straight-through round, as OmniQuant's round_ste; zero is rounded without a
// straight-through gradient, as OmniQuant's round_zero_point, so no gradient flows through it):
//   d w_q / d scale = (code - zero) - [0 <= rint(w/scale) + zero <= maxq] * w / scale
//   d scale / d gamma = hi * s_g (1 - s_g) / maxq,  d scale / d beta = -lo * s_b (1 - s_b) / maxq
// (zero gradient where the scale clamp is active).
#pragma once
#include <cstdint>
#include <vector>

#include "hiquant/parallel.hpp"

namespace hiquant {

struct LwcSpec {
  int bits = 4;
  int64_t group_size = 0;
  double init = 4.0;  // initial gamma and beta (OmniQuant's init_value)
};

constexpr double kLwcMinScale = 1e-5;  // OmniQuant's CLIPMIN
constexpr double kLwcMaxScale = 1e4;

class LwcPart {
 public:
  // W: rows x cols, row-major with leading dimension ldw (>= cols).
  LwcPart(const float* W, int64_t ldw, int64_t rows, int64_t cols, const LwcSpec& spec,
          int n_threads = 0);

  int64_t rows() const { return rows_; }
  int64_t cols() const { return cols_; }
  int64_t n_groups() const { return ng_; }
  int bits() const { return spec_.bits; }
  int64_t group_size() const { return spec_.group_size; }
  const float* weights() const { return W_.data(); }

  // Parameters: gamma (rows x n_groups) followed by beta (rows x n_groups), one buffer so that
  // one optimizer covers both.
  int64_t n_params() const { return 2 * rows_ * ng_; }
  float* params() { return params_.data(); }
  const float* params() const { return params_.data(); }
  void check_params() const;  // NumericalError on NaN/Inf

  // w_q into out (rows x cols, leading dimension ldo).
  void forward(float* out, int64_t ldo, int n_threads = 0) const;
  // Gradient of the loss w.r.t. the parameters from dL/dw_q (rows x cols, leading dim ldd).
  void backward(const float* dwq, int64_t ldd, float* grad, int n_threads = 0) const;
  // Training-time scale and zero (rows x n_groups).
  void scales(float* scale, uint8_t* zero, int n_threads = 0) const;
  // Final integer form: scales rounded through float16 first (fp16_round_scale), zero and codes
  // recomputed with that scale, and the dequantized weights scale * (code - zero).
  void export_codes(uint8_t* codes, float* scale, uint8_t* zero, float* wq, int64_t ldq,
                    int n_threads = 0) const;

  // Hooks for exact incremental evaluations of a quadratic loss (layerwise.cpp): per group
  // the training parameters; per row the code offsets m = code - zero and a = [in range] * w, so
  // that w_q = scale * m and d w_q / d scale = m - a / scale; and the chain rule from
  // dL/dscale of a group to its gamma and beta.
  struct GroupParams {
    double sg, sb;   // sigmoid(gamma), sigmoid(beta)
    double lo_c;     // clipped min
    float scale;     // float32 scale
    bool clamped;    // scale clamp active (no gradient)
    double zero;     // integer-valued
  };
  GroupParams group_params(int64_t r, int64_t g) const;
  int64_t group_width() const { return gw_; }
  void row_codes(int64_t r, float* m, float* a) const;
  void scale_grad_to_params(int64_t r, int64_t g, const GroupParams& p, double ds,
                            float* grad) const;

 private:

  LwcSpec spec_;
  int64_t rows_, cols_, ng_, gw_;
  int maxq_;
  std::vector<float> W_;       // rows x cols
  std::vector<float> lo_, hi_; // rows x n_groups
  std::vector<float> params_;  // gamma then beta
};

}  // namespace hiquant
