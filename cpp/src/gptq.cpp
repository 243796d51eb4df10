#include "hiquant/gptq.hpp"

#include <Eigen/Cholesky>
#include <Eigen/Core>
#include <algorithm>
#include <chrono>
#include <cmath>
#include <numeric>

#include "hiquant/errors.hpp"
#include "hiquant/gemm.hpp"
#include "hiquant/layerwise.hpp"
#include "hiquant/quant_math.hpp"
#include "hiquant/quantizer.hpp"

namespace hiquant {

namespace {

using ColMatrixXd = Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic, Eigen::ColMajor>;

// M := its lower Cholesky factor L (in place; the strict upper triangle is left untouched), then
// X := L^-1 (lower triangular). Throws NumericalError if M is not positive definite.
void cholesky_and_inverse(ColMatrixXd& M, ColMatrixXd& X, const RunControl& rc, int n_threads) {
  const int64_t n = M.rows();
  Eigen::LLT<Eigen::Ref<ColMatrixXd>, Eigen::Lower> llt(M);
  if (llt.info() != Eigen::Success)
    throw NumericalError(
        "the damped Hessian is not positive definite (Cholesky failed); raise percdamp, or "
        "collect more calibration tokens");
  rc.poll();  // the factorizations are single library calls: Ctrl-C is seen between them
  // Column blocks of L^-1 are independent: block [c0, c1) solves L[c0:, c0:] Y = I[c0:, c0:c1]
  // (rows above c0 are zero). Cost ~ (n - c0)^2 (c1 - c0): dynamic scheduling balances them;
  // each block's arithmetic does not depend on the thread that runs it.
  X.setZero(n, n);
  constexpr int64_t kNb = 64;
  const int64_t n_blocks = (n + kNb - 1) / kNb;
  ExceptionCapture capture;
  const int nt = resolve_threads(n_threads);
#pragma omp parallel for schedule(dynamic, 1) num_threads(nt) if (nt > 1 && n_blocks > 1)
  for (int64_t b = 0; b < n_blocks; ++b) {
    if (capture.failed()) continue;
    capture.run([&] {
      const int64_t c0 = b * kNb, nb = std::min(kNb, n - c0), m = n - c0;
      auto Y = X.block(c0, c0, m, nb);
      for (int64_t j = 0; j < nb; ++j) Y(j, j) = 1.0;
      M.bottomRightCorner(m, m).template triangularView<Eigen::Lower>().solveInPlace(Y);
    });
  }
  capture.rethrow();
}

// Builds M = J A J (the reversal of A, A = Hp + damp I given through `at(i, j)`), factors it and
// returns U = J L^-1 J row-major in `U` (upper triangle; zeros below). Hp = R R^T with
// R = J L J upper, so U = R^-1 is upper with U^T U = Hp^-1 and a positive diagonal: the upper
// Cholesky factor of the inverse, as gptq.py's cholesky(cholesky_inverse(cholesky(H)), upper).
template <typename T, typename At>
void reversed_inverse_cholesky(int64_t n, At at, T* U, const RunControl& rc, int n_threads) {
  ColMatrixXd X;
  {
    ColMatrixXd M(n, n);
    parallel_for(n, n_threads, [&](int64_t j) {
      for (int64_t i = j; i < n; ++i) M(i, j) = at(n - 1 - i, n - 1 - j);  // lower triangle
    });
    cholesky_and_inverse(M, X, rc, n_threads);
  }
  rc.poll();
  parallel_for(n, n_threads, [&](int64_t i) {
    T* u = U + i * n;
    for (int64_t j = 0; j < i; ++j) u[j] = T(0);
    for (int64_t j = i; j < n; ++j) u[j] = static_cast<T>(X(n - 1 - i, n - 1 - j));
  });
}

inline double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

}  // namespace

void inverse_cholesky_upper(const double* H, int64_t n, double* U, int n_threads) {
  HQ_CHECK(n > 0, "inverse_cholesky_upper: empty matrix");
  reversed_inverse_cholesky<double>(n, [&](int64_t i, int64_t j) { return H[i * n + j]; }, U,
                                    RunControl{}, n_threads);
}

GptqStats gptq(const float* W, int64_t rows, int64_t cols, const double* H, const GptqSpec& spec,
               const GptqOutput& out, const RunControl& rc, int n_threads) {
  HQ_CHECK(spec.bits >= 2 && spec.bits <= 8, "GPTQ bits must be in 2..8, got ", spec.bits);
  HQ_CHECK(rows > 0 && cols > 0, "GPTQ needs a non-empty weight matrix, got ", rows, " x ", cols);
  HQ_CHECK(spec.blocksize >= 1, "blocksize must be >= 1, got ", spec.blocksize);
  HQ_CHECK(std::isfinite(spec.percdamp) && spec.percdamp >= 0,
           "percdamp must be a non-negative number, got ", spec.percdamp);
  {
    const int64_t bad = first_nonfinite(W, rows * cols);
    if (bad >= 0)
      throw NumericalError(detail::concat("weight is not finite at row ", bad / cols, ", column ",
                                          bad % cols, "; check the checkpoint"));
  }
  check_gram(H, cols, n_threads);
  HQ_CHECK(spec.n_quant <= cols, "n_quant (", spec.n_quant, ") exceeds the ", cols, " columns");
  const int64_t n = cols, nq = spec.n_quant > 0 ? spec.n_quant : cols;
  const bool fixed_grid = spec.grid_scale != nullptr;
  HQ_CHECK(fixed_grid == (spec.grid_zero != nullptr),
           "a fixed grid needs both its scales and its zero points");
  const int64_t gs = spec.group_size > 0 && spec.group_size < nq ? spec.group_size : 0;
  const int64_t ng = n_groups(nq, spec.group_size);
  const int maxq = (1 << spec.bits) - 1;
  if (fixed_grid)
    for (int64_t i = 0; i < rows * ng; ++i) {
      HQ_CHECK(std::isfinite(spec.grid_scale[i]) && spec.grid_scale[i] > 0.0f,
               "grid scale at row ", i / ng, ", group ", i % ng, " is ", spec.grid_scale[i],
               "; scales must be finite and positive");
      HQ_CHECK(spec.grid_zero[i] <= maxq, "grid zero point at row ", i / ng, ", group ", i % ng,
               " is ", int(spec.grid_zero[i]), ", above 2^bits - 1 = ", maxq);
    }
  rc.poll();
  const auto t0 = std::chrono::steady_clock::now();
  GptqStats st;

  // Dead columns, column order, damping.
  std::vector<double> diag(static_cast<size_t>(n));
  std::vector<char> dead(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) {
    dead[i] = H[i * n + i] == 0.0;
    diag[i] = dead[i] ? 1.0 : H[i * n + i];
    st.n_dead += dead[i];
  }
  std::vector<int64_t>& perm = st.perm;
  perm.resize(static_cast<size_t>(n));
  std::iota(perm.begin(), perm.end(), int64_t(0));
  if (spec.act_order)  // only the quantized columns; the free ones after them keep their place
    std::stable_sort(perm.begin(), perm.begin() + nq,
                     [&](int64_t a, int64_t b) { return diag[a] > diag[b]; });
  double mean = 0.0;
  for (int64_t i = 0; i < n; ++i) mean += diag[perm[i]];
  mean /= double(n);
  st.damp = spec.percdamp * mean;
  const double damp = st.damp;

  // U: upper Cholesky factor of (P H P^T + damp I)^-1, float32 for the column loop.
  std::vector<float> U(static_cast<size_t>(n * n));
  reversed_inverse_cholesky<float>(
      n,
      [&](int64_t i, int64_t j) {
        const int64_t a = perm[i], b = perm[j];
        return (a == b ? diag[a] + damp : H[a * n + b]);
      },
      U.data(), rc, n_threads);
  for (int64_t i = 0; i < n; ++i)
    if (!(U[i * n + i] > 0.0f) || !std::isfinite(U[i * n + i]))
      throw NumericalError(detail::concat("the inverse Hessian factor has a non-positive or "
                                          "non-finite diagonal at column ", perm[i],
                                          " in float32; raise percdamp"));
  st.seconds_factor = seconds_since(t0);
  const auto t1 = std::chrono::steady_clock::now();

  // Working copy in loop order, dead columns zeroed.
  std::vector<float> Wc(static_cast<size_t>(rows * n));
  parallel_for(rows, n_threads, [&](int64_t r) {
    for (int64_t i = 0; i < n; ++i)
      Wc[r * n + i] = dead[perm[i]] ? 0.0f : W[r * n + perm[i]];
  });

  // Group bookkeeping: the loop position at which each group's parameters are formed, and the
  // loop positions of its columns.
  std::vector<int64_t> pos(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) pos[perm[i]] = i;
  std::vector<char> forms_group(static_cast<size_t>(n), 0);
  if (gs > 0) {
    std::vector<char> seen(static_cast<size_t>(ng), 0);
    for (int64_t i = 0; i < nq; ++i) {
      const int64_t g = perm[i] / gs;
      if (!seen[g]) forms_group[i] = seen[g] = 1;
    }
  }

  // Each (row, group)'s parameters go to out.scale / out.zero when formed; a column is quantized
  // with its own group's (with act_order the groups' columns interleave in the loop). Without
  // groups they come from the original row.
  auto form = [&](int64_t r, int64_t g, const float* vals, int64_t m) {
    if (fixed_grid) {
      out.scale[r * ng + g] = spec.grid_scale[r * ng + g];
      out.zero[r * ng + g] = spec.grid_zero[r * ng + g];
      return;
    }
    const GroupRange gr = group_range(vals, m, r, gs > 0 ? g * gs : 0);
    float s = static_cast<float>((double(gr.hi) - double(gr.lo)) / maxq);
    if (spec.fp16_scales) s = fp16_round_scale(s);
    const double z = std::min(std::max(rint_d(-double(gr.lo) / double(s)), 0.0), double(maxq));
    out.scale[r * ng + g] = s;
    out.zero[r * ng + g] = static_cast<uint8_t>(z);
  };
  if (gs == 0)
    parallel_for(rows, n_threads, [&](int64_t r) { form(r, 0, W + r * n, nq); });

  // Only the first nq columns are quantized; the lazy updates stop there too (the later columns
  // are never read), but U covers all n, so the compensation is the one with them free.
  const int64_t bs = std::min<int64_t>(spec.blocksize, nq);
  constexpr int64_t kChunk = 192;  // rows per task: a 128 x 192 block buffer stays in L2
  const int64_t n_chunks = (rows + kChunk - 1) / kChunk;
  std::vector<double> row_loss(static_cast<size_t>(rows), 0.0);
  PackedB Ublk;
  const int64_t n_blocks = (nq + bs - 1) / bs;
  const double dmaxq = maxq;
  for (int64_t blk = 0; blk < n_blocks; ++blk) {
    rc.poll();
    const int64_t i1 = blk * bs, i2 = std::min(nq, i1 + bs), count = i2 - i1;
    if (i2 < nq) Ublk.pack(U.data() + i1 * n + i2, n, count, nq - i2, n_threads);
    parallel_for(n_chunks, n_threads, [&](int64_t ch) {
      const int64_t r0 = ch * kChunk, nr = std::min(kChunk, rows - r0);
      std::vector<float> W1t(static_cast<size_t>(count * nr)), Err(static_cast<size_t>(nr * count));
      std::vector<float> errv(static_cast<size_t>(nr)), gvals(static_cast<size_t>(gs > 0 ? gs : 1));
      for (int64_t k = 0; k < count; ++k)
        for (int64_t j = 0; j < nr; ++j) W1t[k * nr + j] = Wc[(r0 + j) * n + i1 + k];
      for (int64_t i = 0; i < count; ++i) {
        const int64_t col = i1 + i, ocol = perm[col], cg = gs > 0 ? ocol / gs : 0;
        if (gs > 0 && forms_group[col]) {
          const int64_t c0 = cg * gs, m = std::min(gs, nq - c0);
          for (int64_t j = 0; j < nr; ++j) {
            const float* wr = Wc.data() + (r0 + j) * n;
            for (int64_t c = 0; c < m; ++c) gvals[c] = wr[pos[c0 + c]];
            form(r0 + j, cg, gvals.data(), m);
          }
        }
        const float d = U[col * n + col];
        const double d2 = double(d) * double(d);
        float* wi = W1t.data() + i * nr;
        for (int64_t j = 0; j < nr; ++j) {
          const int64_t r = r0 + j;
          const float w = wi[j], s = out.scale[r * ng + cg],
                      z = static_cast<float>(out.zero[r * ng + cg]);
          double q = double(w) / double(s);
          q = q < -512.0 ? -512.0 : (q > 512.0 ? 512.0 : q);
          double v = rint_d(q) + double(z);
          v = v < 0.0 ? 0.0 : (v > dmaxq ? dmaxq : v);
          const float dq = s * (static_cast<float>(v) - z);
          const float e = (w - dq) / d;
          row_loss[r] += double(w - dq) * double(w - dq) / d2;
          out.codes[r * nq + ocol] = static_cast<uint8_t>(v);
          out.wq[r * nq + ocol] = dq;
          errv[j] = e;
          Err[j * count + i] = -e;
        }
        const float* urow = U.data() + col * n + i1;
        for (int64_t k = i + 1; k < count; ++k) {
          const float u = urow[k];
          float* wk = W1t.data() + k * nr;
          for (int64_t j = 0; j < nr; ++j) wk[j] -= u * errv[j];
        }
      }
      if (i2 < nq)
        gemm_packed(Err.data(), count, nr, Ublk, Wc.data() + r0 * n + i2, n, true, 1);
    });
    rc.report(blk + 1, n_blocks);
  }
  double loss = 0.0;
  for (double x : row_loss) loss += x;
  st.loss = loss / 2.0;
  st.seconds_loop = seconds_since(t1);
  return st;
}

}  // namespace hiquant
