#include "hiquant/layerwise.hpp"

#include <algorithm>
#include <chrono>
#include <cmath>

#include "hiquant/errors.hpp"
#include "hiquant/quant_math.hpp"

namespace hiquant {

namespace {

// Sum of per-row partials in row order: identical for any thread count.
double ordered_sum(const std::vector<double>& v) {
  double s = 0.0;
  for (double x : v) s += x;
  return s;
}

// The columns outside [a0, a1), in ascending order.
std::vector<int64_t> fixed_columns(int64_t d_in, int64_t a0, int64_t a1) {
  std::vector<int64_t> f;
  f.reserve(static_cast<size_t>(d_in - (a1 - a0)));
  for (int64_t c = 0; c < a0; ++c) f.push_back(c);
  for (int64_t c = a1; c < d_in; ++c) f.push_back(c);
  return f;
}

}  // namespace

void check_gram(const double* H, int64_t d, int n_threads) {
  // One pass: NaN/Inf, and symmetry (the gradient 2 E H / N and the frozen-column algebra rely
  // on it) up to the rounding of an accumulated X^T X.
  std::vector<int64_t> bad(static_cast<size_t>(d), -1), asym(static_cast<size_t>(d), -1);
  parallel_for(d, n_threads, [&](int64_t i) {
    const double* h = H + i * d;
    for (int64_t j = 0; j < d; ++j) {
      if (!std::isfinite(h[j])) {
        bad[i] = j;
        return;
      }
    }
    for (int64_t j = i + 1; j < d; ++j) {
      const double tol = 1e-6 * std::sqrt(std::fabs(h[i]) * std::fabs(H[j * d + j])) + 1e-30;
      if (std::fabs(h[j] - H[j * d + i]) > tol) {
        asym[i] = j;
        return;
      }
    }
  });
  for (int64_t i = 0; i < d; ++i) {
    if (bad[i] >= 0)
      throw NumericalError(detail::concat("H is not finite at (", i, ", ", bad[i],
                                          "); recompute the calibration statistics"));
    HQ_CHECK(H[i * d + i] >= 0.0, "H has a negative diagonal entry H[", i, ", ", i, "] = ",
             H[i * d + i], "; pass the Gram matrix X^T X of the layer's inputs");
    HQ_CHECK(asym[i] < 0, "H is not symmetric: H[", i, ", ", asym[i], "] = ", H[i * d + asym[i]],
             " but H[", asym[i], ", ", i, "] = ", H[asym[i] * d + i],
             "; pass the Gram matrix X^T X (or (H + H.T) / 2)");
  }
}

LayerwiseObjective::LayerwiseObjective(const float* W, int64_t d_out, int64_t d_in,
                                       const double* H, double n_tokens, int n_threads)
    : d_out_(d_out), d_in_(d_in), n_tokens_(n_tokens), H_(H) {
  HQ_CHECK(d_out > 0 && d_in > 0, "the layer weight is empty (", d_out, " x ", d_in, ")");
  HQ_CHECK(std::isfinite(n_tokens) && n_tokens > 0,
           "n_tokens must be a positive number (the calibration token count of H), got ",
           n_tokens);
  const int64_t bad = first_nonfinite(W, d_out * d_in);
  if (bad >= 0)
    throw NumericalError(detail::concat("weight is not finite at row ", bad / d_in, ", column ",
                                        bad % d_in, "; check the checkpoint"));
  check_gram(H, d_in, n_threads);
  W_.assign(W, W + d_out * d_in);
  Wq_ = W_;
  row_loss_.assign(static_cast<size_t>(d_out), 0.0);
  set_active(0, d_in, n_threads);
}

void LayerwiseObjective::set_active(int64_t a0, int64_t a1, int n_threads) {
  HQ_CHECK(0 <= a0 && a0 <= a1 && a1 <= d_in_, "active window [", a0, ", ", a1,
           ") is not inside [0, ", d_in_, ")");
  a0_ = a0;
  a1_ = a1;
  na_ = a1 - a0;
  Haa_.pack(H_ + a0 * d_in_ + a0, d_in_, na_, na_, n_threads);
  Ea_.assign(static_cast<size_t>(d_out_ * na_), 0.0f);
  G_.assign(static_cast<size_t>(d_out_ * na_), 0.0f);
  C0_.assign(static_cast<size_t>(d_out_ * na_), 0.0f);
  c_fix_ = 0.0;
  const std::vector<int64_t> fix = fixed_columns(d_in_, a0, a1);
  const int64_t nf = static_cast<int64_t>(fix.size());
  if (nf == 0) return;
  // E_f: the frozen columns' error, compacted; Hf: rows `fix` of H restricted to the columns
  // `fix` (Hff) and to the active window (Hfa), as float32.
  std::vector<float> Ef(static_cast<size_t>(d_out_ * nf));
  parallel_for(d_out_, n_threads, [&](int64_t r) {
    for (int64_t j = 0; j < nf; ++j)
      Ef[r * nf + j] = Wq_[r * d_in_ + fix[j]] - W_[r * d_in_ + fix[j]];
  });
  std::vector<float> Hff(static_cast<size_t>(nf * nf)), Hfa(static_cast<size_t>(nf * na_));
  parallel_for(nf, n_threads, [&](int64_t i) {
    const double* h = H_ + fix[i] * d_in_;
    for (int64_t j = 0; j < nf; ++j) Hff[i * nf + j] = static_cast<float>(h[fix[j]]);
    for (int64_t j = 0; j < na_; ++j) Hfa[i * na_ + j] = static_cast<float>(h[a0 + j]);
  });
  if (na_ > 0) gemm(Ef.data(), nf, Hfa.data(), na_, C0_.data(), na_, d_out_, na_, nf, false,
                    n_threads);
  std::vector<float> P(static_cast<size_t>(d_out_ * nf));
  gemm(Ef.data(), nf, Hff.data(), nf, P.data(), nf, d_out_, nf, nf, false, n_threads);
  std::vector<double> rows(static_cast<size_t>(d_out_), 0.0);
  parallel_for(d_out_, n_threads, [&](int64_t r) {
    double s = 0.0;
    for (int64_t j = 0; j < nf; ++j) s += double(Ef[r * nf + j]) * double(P[r * nf + j]);
    rows[r] = s;
  });
  c_fix_ = ordered_sum(rows);
}

double LayerwiseObjective::evaluate(int n_threads) {
  const int64_t na = na_;
  if (na == 0) return c_fix_ / n_tokens_;
  const int nt_elem = threads_for(d_out_ * na, n_threads);
  parallel_for(d_out_, nt_elem, [&](int64_t r) {
    const float* q = Wq_.data() + r * d_in_ + a0_;
    const float* w = W_.data() + r * d_in_ + a0_;
    float* e = Ea_.data() + r * na;
    for (int64_t c = 0; c < na; ++c) e[c] = q[c] - w[c];
  });
  gemm_packed(Ea_.data(), na, d_out_, Haa_, G_.data(), na, false, n_threads);
  const float two_over_n = static_cast<float>(2.0 / n_tokens_);
  const bool has_c0 = na_ < d_in_;
  parallel_for(d_out_, nt_elem, [&](int64_t r) {
    const float* e = Ea_.data() + r * na;
    const float* c0 = C0_.data() + r * na;
    float* g = G_.data() + r * na;
    double s = 0.0;
    if (has_c0) {
      for (int64_t c = 0; c < na; ++c) {
        s += double(e[c]) * (double(g[c]) + 2.0 * double(c0[c]));
        g[c] = two_over_n * (g[c] + c0[c]);
      }
    } else {
      for (int64_t c = 0; c < na; ++c) {
        s += double(e[c]) * double(g[c]);
        g[c] = two_over_n * g[c];
      }
    }
    row_loss_[r] = s;
  });
  const double loss = (ordered_sum(row_loss_) + c_fix_) / n_tokens_;
  if (!std::isfinite(loss))
    throw NumericalError("the layer-wise loss became non-finite; check the weights and H");
  return loss;
}

double LayerwiseObjective::full_loss(int n_threads) const {
  std::vector<float> E(static_cast<size_t>(d_out_ * d_in_)), P(E.size());
  parallel_for(d_out_, n_threads, [&](int64_t r) {
    for (int64_t c = 0; c < d_in_; ++c)
      E[r * d_in_ + c] = Wq_[r * d_in_ + c] - W_[r * d_in_ + c];
  });
  PackedB Hp;
  Hp.pack(H_, d_in_, d_in_, d_in_, n_threads);
  gemm_packed(E.data(), d_in_, d_out_, Hp, P.data(), d_in_, false, n_threads);
  std::vector<double> rows(static_cast<size_t>(d_out_), 0.0);
  parallel_for(d_out_, n_threads, [&](int64_t r) {
    double s = 0.0;
    for (int64_t c = 0; c < d_in_; ++c) s += double(E[r * d_in_ + c]) * double(P[r * d_in_ + c]);
    rows[r] = s;
  });
  return ordered_sum(rows) / n_tokens_;
}

void fit_layerwise(LayerwiseObjective& obj, const LwcSlot& lwc, const AdaRoundSlot& ada,
                   int64_t iters, const AdaRoundSchedule& schedule, FitLog& log,
                   const RunControl& rc, int n_threads) {
  HQ_CHECK(iters >= 0, "iterations must be >= 0, got ", iters);
  const int64_t d_in = obj.d_in(), a0 = obj.a0(), a1 = obj.a1();
  auto check_slot = [&](const char* what, int64_t rows, int64_t col0, int64_t cols,
                        const Adam* adam, int64_t n_params) {
    HQ_CHECK(rows == obj.d_out(), what, " part has ", rows, " rows but the layer has ",
             obj.d_out());
    HQ_CHECK(col0 >= a0 && col0 + cols <= a1, what, " part columns [", col0, ", ", col0 + cols,
             ") are outside the active window [", a0, ", ", a1, ")");
    HQ_CHECK(adam != nullptr && adam->size() == n_params, what,
             " optimizer state does not match the part's parameter count");
  };
  if (lwc.part) check_slot("LWC", lwc.part->rows(), lwc.col0, lwc.part->cols(), lwc.adam,
                           lwc.part->n_params());
  if (ada.part) {
    check_slot("AdaRound", ada.part->rows(), ada.col0, ada.part->cols(), ada.adam,
               ada.part->n_params());
    validate_schedule(schedule);
    HQ_CHECK(schedule.iters == iters, "the AdaRound schedule is for ", schedule.iters,
             " steps but ", iters, " were asked for");
  }
  if (lwc.part && ada.part)
    HQ_CHECK(lwc.col0 + lwc.part->cols() <= ada.col0 || ada.col0 + ada.part->cols() <= lwc.col0,
             "the LWC and AdaRound parts overlap");
  const int64_t na = a1 - a0;
  std::vector<float> g_lwc(lwc.part ? static_cast<size_t>(lwc.part->n_params()) : 0);
  std::vector<float> g_ada(ada.part ? static_cast<size_t>(ada.part->n_params()) : 0);
  log.loss.reserve(log.loss.size() + static_cast<size_t>(iters));
  const auto t_start = std::chrono::steady_clock::now();
  const int64_t report_every = std::max<int64_t>(1, iters / 200);
  for (int64_t t = 1; t <= iters; ++t) {
    rc.poll();
    if (lwc.part) lwc.part->forward(obj.wq() + lwc.col0, d_in, n_threads);
    if (ada.part) ada.part->forward(obj.wq() + ada.col0, d_in, false, n_threads);
    const double loss = obj.evaluate(n_threads);
    log.loss.push_back(loss);
    if (lwc.part) {
      lwc.part->backward(obj.grad() + (lwc.col0 - a0), na, g_lwc.data(), n_threads);
      lwc.adam->step(lwc.part->params(), g_lwc.data(), n_threads);
    }
    if (ada.part) {
      const bool on = schedule.active(t);
      const double b = schedule.b(t);
      const double reg = ada.part->backward(obj.grad() + (ada.col0 - a0), na,
                                            on ? schedule.lam : 0.0, b, g_ada.data(), n_threads);
      ada.adam->step(ada.part->params(), g_ada.data(), n_threads);
      log.reg.push_back(reg);
      log.b.push_back(on ? b : 0.0);
    }
    if (t % report_every == 0 || t == iters) rc.report(t, iters);
  }
  if (lwc.part) lwc.part->forward(obj.wq() + lwc.col0, d_in, n_threads);
  if (ada.part) ada.part->forward(obj.wq() + ada.col0, d_in, false, n_threads);
  log.seconds += std::chrono::duration<double>(std::chrono::steady_clock::now() - t_start).count();
}

}  // namespace hiquant
