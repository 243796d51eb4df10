// High-impact ratio allocation: the integer quadratic program (IQP)
//
//   minimize  δᵀ M δ   subject to   Σ_l Σ_m c[l,m] δ[l,m] <= budget,   Σ_m δ[l,m] = 1 for every l,
//
// over one-hot δ (one option m per layer l). Variables are numbered v = l * n_options + m; M is a
// dense (n, n) row-major float64 matrix, n = n_layers * n_options, and need not be symmetric
// (δᵀMδ = δᵀ((M + Mᵀ)/2)δ, so it is symmetrized first). Because δ is one-hot, the entries of M
// between two options of the SAME layer never contribute; the diagonal acts as a linear term.
// Costs are non-negative integers (bits), so the budget test is exact.
//
// Two paths, chosen per call:
//
// * exact (block-diagonal M). Layers coupled by a non-zero entry of M form components (they refine
//   the caller's `blocks`). Each component's option combinations are enumerated (K^s of them for s
//   layers) and reduced to their cost/objective Pareto front. The multiple-choice knapsack over the
//   fronts is then solved exactly: its LP relaxation (greedy over the fronts' lower convex hulls)
//   gives a bound and a first solution; points whose Lagrangian reduced cost exceeds the gap are
//   dropped; a dynamic program over components keeps only Pareto-optimal partial (cost, objective)
//   states whose objective plus the LP bound of the remaining components (for the remaining
//   budget) can still beat the incumbent. Nothing is approximated: the result is optimal.
//
// * general (any M). A feasible solution: exact knapsacks of linear models of the objective (the
//   diagonal alone; the Gilmore-Lawler underestimator below; the relaxation's gradient) and the
//   rounded relaxed optimum, each improved by best-improvement local search over single and
//   paired option changes that stay in budget, then rounds of iterated local search (a few
//   layers moved to options drawn from a fixed-seed generator, re-optimized, kept if better).
//   Lower bound: the best of
//     - Gilmore-Lawler: δᵀMδ >= Σ_l w[l, m_l] with w[v] = M[v,v] + Σ_{l' != l} min_m' M[v, (l',m')]
//       (each ordered cross term at its row minimum), minimized exactly over the knapsack (or its
//       LP bound if the knapsack needs too many states);
//     - convex relaxations: on one-hot points δᵀMδ = δᵀQδ + qᵀδ whenever Q and M differ only on the
//       within-layer blocks and diag(Q) + q = diag(M). Q = Q0 - τ diag(s), q = τ s, with Q0 = M or
//       M with each within-layer block replaced by (m 1ᵀ + 1 mᵀ)/2 (zero on the constraints), s =
//       per-layer scales (1, or the layer's mean |diagonal|), and τ the smallest eigenvalue of
//       D_s^{-1/2} Pᵀ Q0 P D_s^{-1/2} (P: orthonormal basis of {Σ_m v[l,m] = 0 for all l}) minus a
//       rounding margin, so Q is convex on the polytope's affine hull even for an indefinite M.
//       The relaxed problem over {δ >= 0, Σ_m δ[l,m] = 1, cost <= budget} is minimized by pairwise
//       Frank-Wolfe; every iterate x certifies φ(x) + min_s ∇φ(x)ᵀ(s - x) <= min φ <= optimum (the
//       linear minimization over the polytope is the knapsack LP, solved exactly by its greedy),
//       so the bound is valid however far the iterations got.
//   Status "optimal" when the bound closes the gap (relative gap_tolerance), else "feasible".
//   A rank-deficient M (a Fisher Gram matrix from few sequences) admits cancellations in the
//   relaxation that one-hot choices cannot reach, so its bound can be weak.
//
// Both paths are deterministic and give identical results for any thread count.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "hiquant/parallel.hpp"

namespace hiquant {

enum class IqpMethod { Auto = 0, Exact = 1, General = 2 };

struct IqpProblem {
  int64_t n_layers = 0;
  int64_t n_options = 0;
  const double* M = nullptr;        // (n, n) row-major, n = n_layers * n_options
  const int64_t* costs = nullptr;   // (n_layers, n_options), each >= 0
  int64_t budget = 0;               // total cost allowed (inclusive)
  const int64_t* blocks = nullptr;  // optional (n_layers,): M must vanish between blocks
};

struct IqpOptions {
  IqpMethod method = IqpMethod::Auto;
  // Exact path: largest number of option combinations enumerated for one component. Auto uses
  // the exact path when every component fits.
  int64_t max_enumeration = int64_t(1) << 21;
  // Exact knapsack: most dynamic-programming states kept in one stage before giving up.
  int64_t max_states = 20000000;
  // General path: Frank-Wolfe iterations per relaxation, and local-search moves per start.
  int64_t fw_iterations = 400;
  int64_t max_moves = 100000;
  // General path: rounds of iterated local search (perturb the best solution, re-optimize), and
  // the seed of their pseudo-random perturbations.
  int64_t restarts = 32;
  uint64_t seed = 0;
  // General path: relative gap at which the solution is declared optimal.
  double gap_tolerance = 1e-9;
  int n_threads = 0;
};

struct IqpResult {
  std::string status;  // "optimal" or "feasible"
  std::string method;  // "exact" or "general"
  std::string bound;   // how lower_bound was obtained
  double objective = 0.0;
  double lower_bound = 0.0;
  double gap = 0.0;      // (objective - lower_bound) / max(|objective|, tiny)
  double abs_gap = 0.0;  // objective - lower_bound
  int64_t cost = 0;
  int64_t budget = 0;
  int64_t min_cost = 0;  // smallest feasible budget
  std::vector<int64_t> choice;  // option per layer
  int64_t iterations = 0;       // Frank-Wolfe iterations (general) / knapsack stages (exact)
  int64_t nodes = 0;            // states (exact) / local-search moves (general)
  int64_t n_components = 0;
  int64_t largest_component = 0;  // layers in the largest component
  double seconds = 0.0;
};

IqpResult solve_iqp(const IqpProblem& problem, const IqpOptions& options = {},
                    const RunControl& rc = {});

// δᵀMδ for the one-hot δ of `choice`, summed in a fixed order (symmetrized M).
double iqp_objective(const double* M, int64_t n_layers, int64_t n_options, const int64_t* choice);

// Component id (0-based, in order of each component's first layer) of every layer: layers l and
// l' share a component when M has a non-zero entry between any of their options (transitively).
std::vector<int64_t> iqp_components(const double* M, int64_t n_layers, int64_t n_options);

}  // namespace hiquant
