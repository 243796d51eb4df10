// The layer-wise objective and the training loops of the learned quantizer parts.
//
//   L(W_q) = tr((W_q - W) H (W_q - W)^T) / N,     dL/dW_q = 2 (W_q - W) H / N
// H = X^T X is the calibration Gram matrix (float64 from the statistics, packed here as float32 for
// the products) and N its token count: a step costs the same whatever the number of tokens, and
// L equals the explicit ||(W_q - W) X^T||^2 / N.
//
// Active window: only the columns [a0, a1) are being learned; the others are frozen at their
// current W_q. With E = W_q - W, E_a its active columns and E_0 = E with the active columns zeroed,
//   N L = sum(E_a o (E_a H_aa + 2 C0)) + c_fix,   C0 = E_0 H[:, a],  c_fix = sum(E_0 o (E_0 H))
//   N dL/dE_a = 2 (E_a H_aa + C0)
// C0 and c_fix are computed once per window (set_active), so a step costs one product of
// d_out x n_a x n_a: AdaRound on the high columns of a layer whose low part is already quantized
// costs O(d_out k^2) per step instead of O(d_out d_in^2).
#pragma once
#include <cstdint>
#include <vector>

#include "hiquant/adaround.hpp"
#include "hiquant/gemm.hpp"
#include "hiquant/lwc.hpp"
#include "hiquant/optim.hpp"
#include "hiquant/parallel.hpp"

namespace hiquant {

// Validates a Gram matrix (d x d, float64): finite, symmetric, non-negative diagonal.
void check_gram(const double* H, int64_t d, int n_threads = 0);

class LayerwiseObjective {
 public:
  // W: d_out x d_in float32; H: d_in x d_in float64 (symmetric); n_tokens > 0. W_q starts as W.
  LayerwiseObjective(const float* W, int64_t d_out, int64_t d_in, const double* H,
                     double n_tokens, int n_threads = 0);

  int64_t d_out() const { return d_out_; }
  int64_t d_in() const { return d_in_; }
  double n_tokens() const { return n_tokens_; }
  const float* weights() const { return W_.data(); }
  float* wq() { return Wq_.data(); }
  const float* wq() const { return Wq_.data(); }
  int64_t a0() const { return a0_; }
  int64_t a1() const { return a1_; }

  // Learn columns [a0, a1); the others stay at their current W_q (see the header comment).
  void set_active(int64_t a0, int64_t a1, int n_threads = 0);
  // Loss at the current W_q, and dL/dW_q of the active columns into grad() (d_out x n_active).
  double evaluate(int n_threads = 0);
  const float* grad() const { return G_.data(); }
  // Loss at the current W_q over the whole layer (one full product; does not touch grad()).
  double full_loss(int n_threads = 0) const;
  // Floating-point operations of one evaluate() (the product), for throughput reports.
  double step_flops() const { return 2.0 * double(d_out_) * double(na_) * double(na_); }

 private:
  friend class LwcQuadratic;
  int64_t d_out_, d_in_;
  double n_tokens_;
  const double* H_;  // borrowed: the caller keeps it alive (the binding holds a reference)
  std::vector<float> W_, Wq_;
  int64_t a0_ = 0, a1_ = 0, na_ = 0;
  PackedB Haa_;
  std::vector<float> Ea_, G_, C0_;
  std::vector<double> row_loss_;
  double c_fix_ = 0.0;
};

// Loss history of a fit: the objective before each step, and the regularizer (AdaRound).
struct FitLog {
  std::vector<double> loss;
  std::vector<double> reg;
  std::vector<double> b;
  std::vector<int64_t> changes;  // incremental LWC: weights whose code or mask changed per step
  double seconds = 0.0;
  bool incremental = false;
};

// A part placed at column col0 of the objective's (column-permuted) layer.
struct LwcSlot {
  LwcPart* part;
  Adam* adam;
  int64_t col0;
};
struct AdaRoundSlot {
  AdaRoundPart* part;
  Adam* adam;
  int64_t col0;
};

// How fit_layerwise evaluates an LWC-only fit. Gemm: one product per step (E_a H_aa). Incremental:
// the same loss and gradients from per-row quadratic forms in the group scales (LwcQuadratic),
// updated only where a code or straight-through mask changed since the previous step — about
// 0.01-0.2% of the weights per step at lr 1e-2 — with the product recomputed every 256 steps or
// when many codes change. Auto: incremental when it applies (an LWC part alone covering the
// active window, its state within 1 GiB).
enum class LwcEval : int { Auto = 0, Gemm = 1, Incremental = 2 };

// Exact incremental evaluation of the layer-wise loss of an LWC part covering the objective's
// active window [a0, a1) (n columns, groups of the part). With m = code - zero, a = [in] * w per
// weight, s_g the group scales, w_q = s m, and per row
//   K[g][g'] = m_g H m_g'^T,  J[g][g'] = m_g H a_g'^T,  beta_g = m_g . D_g,  lam_g = a_g . D_g,
//   D = W_a H_aa - C0 (C0: the frozen columns' product, see LayerwiseObjective)
// the loss and the straight-through gradient are
//   N L = sum_rows (s^T K s - 2 s^T beta + w H w^T - 2 w . C0) + c_fix
//   N/2 dL/ds_g = (K s)_g - beta_g - ((J^T s)_g - lam_g) / s_g
// A changed m or a at column c updates K, J, beta, lam with one pass over row c of H.
class LwcQuadratic {
 public:
  // Built for the objective's current active window (set_active first); the objective must
  // stay alive and its window unchanged while the evaluator is used.
  LwcQuadratic(const LayerwiseObjective& obj, const LwcPart& part, int n_threads = 0);
  // Loss at the part's current parameters; dL/d(gamma, beta) into grad (part.n_params()).
  double evaluate(float* grad, int n_threads = 0);
  int64_t last_changes() const { return last_changes_; }
  int64_t refreshes() const { return refreshes_; }
  static double state_bytes(int64_t rows, int64_t n_groups) {
    return 16.0 * double(rows) * double(n_groups) * double(n_groups);
  }

 private:
  void refresh(int n_threads);
  const LayerwiseObjective& obj_;
  const LwcPart& part_;
  int64_t R_, n_, ng_, gw_;
  double n_tok_, c_fix_;  // copied: the evaluator reflects the window it was built for
  std::vector<float> Hf_, D_, m_, a_, m_new_, a_new_;
  std::vector<double> K_, J_, bet_, lam_, g0_, row_loss_;
  std::vector<int64_t> row_changes_;
  int64_t since_refresh_ = 0, last_changes_ = 0, refreshes_ = 0;
  bool ready_ = false;
};

// Runs `iters` steps on the objective's active window, which must cover exactly the learned
// parts (and may be the whole layer, for joint learning). Either slot may be absent (nullptr
// part). AdaRound follows `schedule` (step t = 1..schedule.iters; iters must equal it when an
// AdaRound part is present). After the loop the parts' current soft forward is left in W_q.
void fit_layerwise(LayerwiseObjective& obj, const LwcSlot& lwc, const AdaRoundSlot& ada,
                   int64_t iters, const AdaRoundSchedule& schedule, FitLog& log,
                   const RunControl& rc, int n_threads = 0, LwcEval lwc_eval = LwcEval::Auto);

}  // namespace hiquant
