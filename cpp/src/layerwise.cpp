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


// ---------------------------------------------------------------------------------------------
// LwcQuadratic

namespace {

// sum over the columns [c0, c0 + n) of x[c] * y[c]: float lanes within chunks of 64, chunks added
// in double (a fixed order).
inline double dot_f(const float* x, const float* y, int64_t n) {
  double total = 0.0;
  for (int64_t k0 = 0; k0 < n; k0 += 64) {
    const int64_t m = std::min<int64_t>(64, n - k0);
    float part[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    int64_t c = 0;
#if defined(HQ_HAVE_V4)
    vm::v4f acc{};
    for (; c + 4 <= m; c += 4) acc += vm::load(x + k0 + c) * vm::load(y + k0 + c);
    vm::store(part, acc);
#endif
    for (; c < m; ++c) part[c & 3] += x[k0 + c] * y[k0 + c];
    total += (double(part[0]) + double(part[1])) + (double(part[2]) + double(part[3]));
  }
  return total;
}

}  // namespace

LwcQuadratic::LwcQuadratic(const LayerwiseObjective& obj, const LwcPart& part, int n_threads)
    : obj_(obj), part_(part) {
  R_ = obj.d_out_;
  n_ = obj.na_;
  n_tok_ = obj.n_tokens_;
  c_fix_ = obj.c_fix_;
  ng_ = part.n_groups();
  gw_ = part.group_width();
  HQ_CHECK(part.rows() == R_ && part.cols() == n_,
           "incremental LWC evaluation needs the part to cover the active window exactly");
  const int64_t d_in = obj.d_in_, a0 = obj.a0_;
  // H_aa as float32 rows (the incremental updates read one row per changed weight).
  Hf_.resize(static_cast<size_t>(n_ * n_));
  parallel_for(n_, n_threads, [&](int64_t i) {
    const double* h = obj.H_ + (a0 + i) * d_in + a0;
    for (int64_t j = 0; j < n_; ++j) Hf_[i * n_ + j] = static_cast<float>(h[j]);
  });
  // D = W_a H_aa - C0, and the constant per row: w H w^T - 2 w . C0.
  std::vector<float> Wa(static_cast<size_t>(R_ * n_));
  parallel_for(R_, n_threads, [&](int64_t r) {
    std::copy(obj.W_.data() + r * d_in + a0, obj.W_.data() + r * d_in + a0 + n_,
              Wa.data() + r * n_);
  });
  D_.resize(static_cast<size_t>(R_ * n_));
  gemm(Wa.data(), n_, Hf_.data(), n_, D_.data(), n_, R_, n_, n_, false, n_threads);
  g0_.assign(static_cast<size_t>(R_), 0.0);
  parallel_for(R_, n_threads, [&](int64_t r) {
    const float* w = Wa.data() + r * n_;
    float* d = D_.data() + r * n_;
    const float* c0 = obj.C0_.data() + r * n_;
    g0_[r] = dot_f(w, d, n_) - 2.0 * dot_f(w, c0, n_);
    for (int64_t c = 0; c < n_; ++c) d[c] -= c0[c];
  });
  const size_t rn = static_cast<size_t>(R_ * n_), rg = static_cast<size_t>(R_ * ng_);
  m_.assign(rn, 0.0f);
  a_.assign(rn, 0.0f);
  m_new_.assign(rn, 0.0f);
  a_new_.assign(rn, 0.0f);
  K_.assign(rg * static_cast<size_t>(ng_), 0.0);
  J_.assign(rg * static_cast<size_t>(ng_), 0.0);
  bet_.assign(rg, 0.0);
  lam_.assign(rg, 0.0);
  row_loss_.assign(static_cast<size_t>(R_), 0.0);
  row_changes_.assign(static_cast<size_t>(R_), 0);
}

void LwcQuadratic::refresh(int n_threads) {
  // K and J from scratch: per group g, P_g = M[:, g] H[g, :] (one product over all groups
  // together costs as much as one step of the GEMM path), reduced against m and a.
  std::vector<float> P(static_cast<size_t>(R_ * n_));
  PackedB Hg;
  for (int64_t g = 0; g < ng_; ++g) {
    const int64_t c0 = g * gw_, w = std::min(gw_, n_ - c0);
    Hg.pack(Hf_.data() + c0 * n_, n_, w, n_, n_threads);
    gemm_packed(m_.data() + c0, n_, R_, Hg, P.data(), n_, false, n_threads);
    parallel_for(R_, threads_for(R_ * n_, n_threads), [&](int64_t r) {
      const float* pr = P.data() + r * n_;
      double* K = K_.data() + (r * ng_ + g) * ng_;
      double* J = J_.data() + (r * ng_ + g) * ng_;
      for (int64_t h = 0; h < ng_; ++h) {
        const int64_t e0 = h * gw_, we = std::min(gw_, n_ - e0);
        K[h] = dot_f(pr + e0, m_.data() + r * n_ + e0, we);
        J[h] = dot_f(pr + e0, a_.data() + r * n_ + e0, we);
      }
    });
  }
  parallel_for(R_, threads_for(R_ * n_, n_threads), [&](int64_t r) {
    for (int64_t g = 0; g < ng_; ++g) {
      const int64_t c0 = g * gw_, w = std::min(gw_, n_ - c0);
      bet_[r * ng_ + g] = dot_f(m_.data() + r * n_ + c0, D_.data() + r * n_ + c0, w);
      lam_[r * ng_ + g] = dot_f(a_.data() + r * n_ + c0, D_.data() + r * n_ + c0, w);
    }
  });
  since_refresh_ = 0;
  ++refreshes_;
}

double LwcQuadratic::evaluate(float* grad, int n_threads) {
  part_.check_params();
  const int nt = threads_for(R_ * n_, n_threads);
  // 1. Codes and masks at the current parameters; count the weights that changed.
  parallel_for(R_, nt, [&](int64_t r) {
    float* mn = m_new_.data() + r * n_;
    float* an = a_new_.data() + r * n_;
    part_.row_codes(r, mn, an);
    const float* mo = m_.data() + r * n_;
    const float* ao = a_.data() + r * n_;
    int64_t k = 0;
    for (int64_t c = 0; c < n_; ++c) k += (mn[c] != mo[c]) | (an[c] != ao[c]);
    row_changes_[r] = k;
  });
  int64_t changes = 0;
  for (int64_t k : row_changes_) changes += k;
  last_changes_ = changes;
  // 2. Bring K, J, beta, lam up to date: recompute when updating would cost more than the
  // product (each change reads a row of H; a refresh costs one product), else update.
  constexpr int64_t kRefreshEvery = 256;
  if (!ready_ || changes * 32 > R_ * n_ || since_refresh_ >= kRefreshEvery) {
    m_.swap(m_new_);
    a_.swap(a_new_);
    refresh(n_threads);
    ready_ = true;
  } else if (changes > 0) {
    parallel_for(R_, nt, [&](int64_t r) {
      if (row_changes_[r] == 0) return;
      float* m = m_.data() + r * n_;
      float* a = a_.data() + r * n_;
      const float* mn = m_new_.data() + r * n_;
      const float* an = a_new_.data() + r * n_;
      double* K = K_.data() + r * ng_ * ng_;
      double* J = J_.data() + r * ng_ * ng_;
      double* bet = bet_.data() + r * ng_;
      double* lam = lam_.data() + r * ng_;
      const float* D = D_.data() + r * n_;
      std::vector<double> u(static_cast<size_t>(ng_)), v(static_cast<size_t>(ng_));
      for (int64_t c = 0; c < n_; ++c) {
        const double dm = double(mn[c]) - double(m[c]), da = double(an[c]) - double(a[c]);
        if (dm == 0.0 && da == 0.0) continue;
        const int64_t g = c / gw_;
        const float* h = Hf_.data() + c * n_;
        for (int64_t e = 0; e < ng_; ++e) {
          const int64_t e0 = e * gw_, we = std::min(gw_, n_ - e0);
          u[e] = dot_f(h + e0, m + e0, we);  // (m_e H)_c with the current m
          v[e] = dot_f(h + e0, a + e0, we);  // (a_e H)_c
        }
        const double hcc = double(h[c]);
        if (dm != 0.0) {
          for (int64_t e = 0; e < ng_; ++e) {
            K[g * ng_ + e] += dm * u[e];
            K[e * ng_ + g] += dm * u[e];
            J[g * ng_ + e] += dm * v[e];
          }
          K[g * ng_ + g] += dm * dm * hcc;
          bet[g] += dm * double(D[c]);
          m[c] = mn[c];
          u[g] += dm * hcc;  // u with respect to the new m
        }
        if (da != 0.0) {
          for (int64_t e = 0; e < ng_; ++e) J[e * ng_ + g] += da * u[e];
          lam[g] += da * double(D[c]);
          a[c] = an[c];
        }
      }
    });
    ++since_refresh_;
  } else {
    ++since_refresh_;
  }
  // 3. Loss and gradient per row from the quadratic forms.
  const double n_tok = n_tok_;
  parallel_for(R_, nt, [&](int64_t r) {
    std::vector<LwcPart::GroupParams> ps(static_cast<size_t>(ng_));
    std::vector<double> s(static_cast<size_t>(ng_));
    for (int64_t g = 0; g < ng_; ++g) {
      ps[g] = part_.group_params(r, g);
      s[g] = double(ps[g].scale);
    }
    const double* K = K_.data() + r * ng_ * ng_;
    const double* J = J_.data() + r * ng_ * ng_;
    const double* bet = bet_.data() + r * ng_;
    const double* lam = lam_.data() + r * ng_;
    double loss = g0_[r];
    for (int64_t g = 0; g < ng_; ++g) {
      double ks = 0.0, js = 0.0;
      for (int64_t e = 0; e < ng_; ++e) {
        ks += K[g * ng_ + e] * s[e];  // K symmetric: (K s)_g
        js += J[e * ng_ + g] * s[e];  // (J^T s)_g
      }
      loss += s[g] * ks - 2.0 * s[g] * bet[g];
      const double ds = 2.0 / n_tok * (ks - bet[g] - (js - lam[g]) / s[g]);
      part_.scale_grad_to_params(r, g, ps[g], ds, grad);
    }
    row_loss_[r] = loss;
  });
  const double loss = (ordered_sum(row_loss_) + c_fix_) / n_tok;
  if (!std::isfinite(loss))
    throw NumericalError("the layer-wise loss became non-finite; check the weights and H");
  return loss;
}

void fit_layerwise(LayerwiseObjective& obj, const LwcSlot& lwc, const AdaRoundSlot& ada,
                   int64_t iters, const AdaRoundSchedule& schedule, FitLog& log,
                   const RunControl& rc, int n_threads, LwcEval lwc_eval) {
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
  const bool can_inc = lwc.part && !ada.part && lwc.col0 == a0 && lwc.part->cols() == na;
  if (lwc_eval == LwcEval::Incremental)
    HQ_CHECK(can_inc, "incremental LWC evaluation needs an LWC part alone, covering the active "
             "window exactly");
  const bool inc = can_inc && (lwc_eval == LwcEval::Incremental ||
                               (lwc_eval == LwcEval::Auto &&
                                LwcQuadratic::state_bytes(obj.d_out(), lwc.part->n_groups()) <=
                                    double(int64_t(1) << 30)));
  std::vector<float> g_lwc(lwc.part ? static_cast<size_t>(lwc.part->n_params()) : 0);
  std::vector<float> g_ada(ada.part ? static_cast<size_t>(ada.part->n_params()) : 0);
  log.loss.reserve(log.loss.size() + static_cast<size_t>(iters));
  const auto t_start = std::chrono::steady_clock::now();
  const int64_t report_every = std::max<int64_t>(1, iters / 200);
  if (inc && iters > 0) {
    log.incremental = true;
    LwcQuadratic q(obj, *lwc.part, n_threads);
    for (int64_t t = 1; t <= iters; ++t) {
      rc.poll();
      log.loss.push_back(q.evaluate(g_lwc.data(), n_threads));
      log.changes.push_back(q.last_changes());
      lwc.adam->step(lwc.part->params(), g_lwc.data(), n_threads);
      if (t % report_every == 0 || t == iters) rc.report(t, iters);
    }
    iters = 0;  // done: skip the product loop below
  }
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
