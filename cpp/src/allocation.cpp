// The allocation IQP: exact path (component enumeration + exact multiple-choice knapsack over
// Pareto fronts) and general path (local search + certified lower bounds). See allocation.hpp.
#include "hiquant/allocation.hpp"

// GCC 12 flags a false "maybe uninitialized" inside Eigen's tridiagonalization.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
#include <Eigen/Eigenvalues>
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>
#include <limits>
#include <numeric>
#include <unordered_map>
#include <utility>

#include "hiquant/common.hpp"
#include "hiquant/errors.hpp"

namespace hiquant {

namespace {

constexpr double kInf = std::numeric_limits<double>::infinity();
using Clock = std::chrono::steady_clock;

// ------------------------------------------------------------------------------------------
// Multiple-choice knapsack over Pareto fronts (one front per group, pick one point per group)
// ------------------------------------------------------------------------------------------

struct Point {
  int64_t cost;
  double obj;
  int64_t id;  // what the point stands for (a combination code, an option index)
};
// Sorted by cost (strictly increasing) with objective strictly decreasing.
using Front = std::vector<Point>;

Front pareto_front(std::vector<Point> pts) {
  std::sort(pts.begin(), pts.end(), [](const Point& a, const Point& b) {
    if (a.cost != b.cost) return a.cost < b.cost;
    if (a.obj != b.obj) return a.obj < b.obj;
    return a.id < b.id;
  });
  Front f;
  double best = kInf;
  for (const auto& p : pts)
    if (p.obj < best) {
      f.push_back(p);
      best = p.obj;
    }
  return f;
}

// Indices (into the front) of its lower convex hull; slopes strictly increase along it.
std::vector<int32_t> lower_hull(const Front& f) {
  std::vector<int32_t> h;
  for (int32_t i = 0; i < static_cast<int32_t>(f.size()); ++i) {
    while (h.size() >= 2) {
      const Point& a = f[h[h.size() - 2]];
      const Point& b = f[h.back()];
      const Point& c = f[i];
      // Drop b unless it lies strictly below the segment a-c (collinear points go too).
      const double lhs = (b.obj - a.obj) * static_cast<double>(c.cost - b.cost);
      const double rhs = (c.obj - b.obj) * static_cast<double>(b.cost - a.cost);
      if (lhs >= rhs)
        h.pop_back();
      else
        break;
    }
    h.push_back(i);
  }
  return h;
}

struct Segment {
  double slope;  // dobj / dcost < 0
  int64_t dcost;
  double dobj;
  int32_t group;
  int32_t to;  // front index reached by taking the segment
};

bool segment_less(const Segment& a, const Segment& b) {
  if (a.slope != b.slope) return a.slope < b.slope;
  if (a.group != b.group) return a.group < b.group;
  return a.to < b.to;
}

std::vector<Segment> hull_segments(const Front& f, int32_t group) {
  const auto h = lower_hull(f);
  std::vector<Segment> s;
  for (size_t t = 0; t + 1 < h.size(); ++t) {
    const Point& a = f[h[t]];
    const Point& b = f[h[t + 1]];
    const int64_t dc = b.cost - a.cost;
    const double dobj = b.obj - a.obj;
    s.push_back({dobj / static_cast<double>(dc), dc, dobj, group, h[t + 1]});
  }
  return s;
}

// LP relaxation of the knapsack, solved exactly by the greedy over hull segments: every group
// starts at its cheapest point, then segments are taken by increasing slope while they fit; the
// first that does not fit is taken fractionally. The integer part is a feasible solution.
struct LpResult {
  double bound = 0.0;   // LP optimum
  double lambda = 0.0;  // optimal budget multiplier (>= 0)
  bool integral = true; // budget not binding: `pick` is optimal
  std::vector<int32_t> pick;
  int64_t cost = 0;
  double obj = 0.0;
  // fractional group: x = (1 - theta) * front[pick] + theta * front[frac_to]
  int32_t frac_group = -1;
  int32_t frac_to = -1;
  double theta = 0.0;
};

LpResult lp_knapsack(const std::vector<Front>& fronts, int64_t budget) {
  LpResult r;
  const size_t G = fronts.size();
  r.pick.assign(G, 0);
  std::vector<Segment> segs;
  for (size_t j = 0; j < G; ++j) {
    r.cost += fronts[j][0].cost;
    r.obj += fronts[j][0].obj;
    auto s = hull_segments(fronts[j], static_cast<int32_t>(j));
    segs.insert(segs.end(), s.begin(), s.end());
  }
  std::sort(segs.begin(), segs.end(), segment_less);
  int64_t rem = budget - r.cost;  // the caller checked feasibility: rem >= 0
  for (const auto& s : segs) {
    if (s.dcost <= rem) {
      rem -= s.dcost;
      r.cost += s.dcost;
      r.obj += s.dobj;
      r.pick[s.group] = s.to;
      continue;
    }
    r.integral = false;
    r.lambda = -s.slope;
    r.theta = static_cast<double>(rem) / static_cast<double>(s.dcost);
    r.bound = r.obj + s.dobj * r.theta;
    r.frac_group = s.group;
    r.frac_to = s.to;
    return r;
  }
  r.bound = r.obj;
  return r;
}

// Greedy improvement of a feasible pick: repeatedly move the group whose best affordable point
// lowers the objective most.
void fill_budget(const std::vector<Front>& fronts, int64_t budget, std::vector<int32_t>& pick,
                 int64_t& cost, double& obj) {
  for (;;) {
    double best_gain = 0.0;
    int32_t bj = -1, bp = -1;
    for (size_t j = 0; j < fronts.size(); ++j) {
      const Front& f = fronts[j];
      const int64_t room = budget - cost + f[pick[j]].cost;
      // The last affordable point of a front has the lowest objective.
      int32_t p = static_cast<int32_t>(
                      std::upper_bound(f.begin(), f.end(), room,
                                       [](int64_t v, const Point& q) { return v < q.cost; }) -
                      f.begin()) - 1;
      if (p <= pick[j]) continue;
      const double gain = f[pick[j]].obj - f[p].obj;
      if (gain > best_gain) {
        best_gain = gain;
        bj = static_cast<int32_t>(j);
        bp = p;
      }
    }
    if (bj < 0) return;
    cost += fronts[bj][bp].cost - fronts[bj][pick[bj]].cost;
    obj += fronts[bj][bp].obj - fronts[bj][pick[bj]].obj;
    pick[bj] = bp;
  }
}

// LP bound of groups j..G-1 as a function of their budget (a convex piecewise-linear function:
// each suffix's hull segments merged by slope, with prefix sums).
class SuffixBound {
 public:
  explicit SuffixBound(const std::vector<Front>& fronts) {
    const size_t G = fronts.size();
    base_cost_.assign(G + 1, 0);
    base_obj_.assign(G + 1, 0.0);
    slope_.resize(G + 1);
    cum_cost_.resize(G + 1);
    cum_obj_.resize(G + 1);
    std::vector<Segment> suffix;
    cum_cost_[G] = {0};
    cum_obj_[G] = {0.0};
    for (size_t jj = G; jj-- > 0;) {
      base_cost_[jj] = base_cost_[jj + 1] + fronts[jj][0].cost;
      base_obj_[jj] = base_obj_[jj + 1] + fronts[jj][0].obj;
      auto s = hull_segments(fronts[jj], static_cast<int32_t>(jj));
      std::vector<Segment> merged;
      merged.reserve(suffix.size() + s.size());
      std::merge(suffix.begin(), suffix.end(), s.begin(), s.end(), std::back_inserter(merged),
                 segment_less);
      suffix.swap(merged);
      auto& sl = slope_[jj];
      auto& cc = cum_cost_[jj];
      auto& co = cum_obj_[jj];
      sl.resize(suffix.size());
      cc.resize(suffix.size() + 1);
      co.resize(suffix.size() + 1);
      cc[0] = 0;
      co[0] = 0.0;
      for (size_t q = 0; q < suffix.size(); ++q) {
        sl[q] = suffix[q].slope;
        cc[q + 1] = cc[q] + suffix[q].dcost;
        co[q + 1] = co[q] + suffix[q].dobj;
      }
    }
  }
  int64_t base_cost(size_t j) const { return base_cost_[j]; }
  // LP lower bound of the objective of groups j.. under `room` cost units; +inf if infeasible.
  double operator()(size_t j, int64_t room) const {
    if (room < base_cost_[j]) return kInf;
    const int64_t rr = room - base_cost_[j];
    const auto& cc = cum_cost_[j];
    const size_t q = static_cast<size_t>(std::upper_bound(cc.begin(), cc.end(), rr) - cc.begin()) - 1;
    double v = base_obj_[j] + cum_obj_[j][q];
    if (q < slope_[j].size()) v += slope_[j][q] * static_cast<double>(rr - cc[q]);
    return v;
  }

 private:
  std::vector<int64_t> base_cost_;
  std::vector<double> base_obj_;
  std::vector<std::vector<double>> slope_;
  std::vector<std::vector<int64_t>> cum_cost_;
  std::vector<std::vector<double>> cum_obj_;
};

struct KnapsackResult {
  std::vector<int32_t> pick;  // front index per group
  double obj = 0.0;
  int64_t cost = 0;
  double lp_bound = 0.0;
  bool optimal = false;  // false only when the state limit stopped the program
  int64_t states = 0;
  int64_t stages = 0;
};

// Exact multiple-choice knapsack over Pareto fronts (see allocation.hpp). Feasibility (the sum of
// the cheapest points within budget) is checked by the caller. When a stage would exceed
// max_states the program stops: it throws if `throw_on_limit`, else returns the incumbent with
// optimal = false.
KnapsackResult solve_knapsack(const std::vector<Front>& fronts, int64_t budget, int64_t max_states,
                              bool throw_on_limit, const RunControl& rc) {
  const size_t G = fronts.size();
  KnapsackResult out;
  LpResult lp = lp_knapsack(fronts, budget);
  out.lp_bound = lp.bound;
  out.pick = lp.pick;
  out.cost = lp.cost;
  out.obj = lp.obj;
  if (lp.integral) {  // every group at its best point fits: nothing to decide
    out.optimal = true;
    return out;
  }
  fill_budget(fronts, budget, out.pick, out.cost, out.obj);
  const double ub = out.obj;

  // Rounding slack: objectives are sums of G terms of these magnitudes.
  double scale = std::abs(ub);
  for (const auto& f : fronts) scale += std::max(std::abs(f.front().obj), std::abs(f.back().obj));
  const double tol = 1e-12 * scale + 1e-300;

  // Reduced-cost fixing. For any lambda >= 0 and any feasible solution x,
  //   obj(x) = L(lambda) + Σ_j rc_j(x_j) + lambda * (budget - cost(x)),
  // L(lambda) = Σ_j min_p (p.obj + lambda p.cost) - lambda budget, rc_j >= 0. A solution better
  // than the incumbent therefore only uses points with rc_j <= ub - L(lambda).
  const double lambda = lp.lambda;
  std::vector<double> minr(G);
  double L = -lambda * static_cast<double>(budget);
  for (size_t j = 0; j < G; ++j) {
    double m = kInf;
    for (const auto& p : fronts[j]) m = std::min(m, p.obj + lambda * static_cast<double>(p.cost));
    minr[j] = m;
    L += m;
  }
  const double allow = std::max(0.0, ub - L) + tol;
  std::vector<Front> kept(G);
  std::vector<std::vector<int32_t>> kept_idx(G);
  for (size_t j = 0; j < G; ++j) {
    for (size_t p = 0; p < fronts[j].size(); ++p) {
      const auto& q = fronts[j][p];
      if (q.obj + lambda * static_cast<double>(q.cost) - minr[j] <= allow) {
        kept[j].push_back(q);
        kept_idx[j].push_back(static_cast<int32_t>(p));
      }
    }
  }
  const SuffixBound bound(kept);

  struct State {
    int64_t cost;
    double obj;
  };
  struct Cand {
    int64_t cost;
    double obj;
    int32_t parent;
    int32_t point;
  };
  std::vector<State> cur{{0, 0.0}};
  std::vector<std::vector<std::pair<int32_t, int32_t>>> back(G);
  std::vector<Cand> cand;
  for (size_t j = 0; j < G; ++j) {
    rc.poll();
    cand.clear();
    const Front& f = kept[j];
    const int64_t rest_min = bound.base_cost(j + 1);
    for (size_t si = 0; si < cur.size(); ++si) {
      const State& s = cur[si];
      for (size_t p = 0; p < f.size(); ++p) {
        const int64_t nc = s.cost + f[p].cost;
        if (nc + rest_min > budget) break;  // fronts are sorted by cost
        const double no = s.obj + f[p].obj;
        if (no + bound(j + 1, budget - nc) > ub + tol) continue;
        cand.push_back({nc, no, static_cast<int32_t>(si), static_cast<int32_t>(p)});
      }
      if (static_cast<int64_t>(cand.size()) > 4 * max_states) break;
    }
    std::sort(cand.begin(), cand.end(), [](const Cand& a, const Cand& b) {
      if (a.cost != b.cost) return a.cost < b.cost;
      if (a.obj != b.obj) return a.obj < b.obj;
      if (a.parent != b.parent) return a.parent < b.parent;
      return a.point < b.point;
    });
    std::vector<State> next;
    auto& bk = back[j];
    double best = kInf;
    for (const auto& c : cand) {
      if (c.obj < best) {
        best = c.obj;
        next.push_back({c.cost, c.obj});
        bk.emplace_back(c.parent, c.point);
      }
    }
    out.states += static_cast<int64_t>(next.size());
    out.stages = static_cast<int64_t>(j + 1);
    if (static_cast<int64_t>(next.size()) > max_states ||
        static_cast<int64_t>(cand.size()) > 4 * max_states) {
      if (throw_on_limit)
        throw Error(detail::concat(
            "the exact knapsack needed more than max_states = ", max_states,
            " states at stage ", j + 1, " of ", G,
            "; raise max_states or use method='general'"));
      return out;  // incumbent, optimal = false
    }
    if (next.empty()) {  // nothing beats the incumbent
      out.optimal = true;
      return out;
    }
    cur.swap(next);
    rc.report(static_cast<int64_t>(j + 1), static_cast<int64_t>(G));
  }
  // Every surviving state is complete; the best one (lowest objective, then cost) wins if it
  // beats the incumbent.
  size_t bi = 0;
  for (size_t i = 1; i < cur.size(); ++i)
    if (cur[i].obj < cur[bi].obj) bi = i;
  if (cur[bi].obj < ub) {
    out.obj = cur[bi].obj;
    out.cost = cur[bi].cost;
    int32_t s = static_cast<int32_t>(bi);
    for (size_t jj = G; jj-- > 0;) {
      const auto& pr = back[jj][s];
      out.pick[jj] = kept_idx[jj][pr.second];
      s = pr.first;
    }
  }
  out.optimal = true;
  return out;
}

// ------------------------------------------------------------------------------------------
// Problem set-up
// ------------------------------------------------------------------------------------------

struct Instance {
  int64_t L = 0, K = 0, n = 0;
  RowMatrixXd S;  // (M + Mᵀ) / 2
  const int64_t* c = nullptr;
  int64_t budget = 0;
  int64_t min_cost = 0;
  double scale = 0.0;  // typical magnitude of objectives, for tolerances
};

Instance make_instance(const IqpProblem& p) {
  HQ_CHECK(p.n_layers >= 1, "the problem has no layers (n_layers = ", p.n_layers, ")");
  HQ_CHECK(p.n_options >= 1, "every layer needs at least one option (n_options = ", p.n_options,
           ")");
  HQ_CHECK(p.M != nullptr && p.costs != nullptr, "M and costs are required");
  HQ_CHECK(p.n_layers <= (int64_t(1) << 24) && p.n_options <= (int64_t(1) << 16) &&
               p.n_layers * p.n_options <= (int64_t(1) << 16),
           "the problem is too large for a dense M: ", p.n_layers, " layers x ", p.n_options,
           " options");
  Instance I;
  I.L = p.n_layers;
  I.K = p.n_options;
  I.n = I.L * I.K;
  I.c = p.costs;
  I.budget = p.budget;
  HQ_CHECK(p.budget >= 0, "budget must be >= 0 bits, got ", p.budget);
  // Costs: non-negative, and every sum of one option per layer must fit in int64.
  int64_t max_sum = 0;
  for (int64_t l = 0; l < I.L; ++l) {
    int64_t lo = std::numeric_limits<int64_t>::max(), hi = 0;
    for (int64_t m = 0; m < I.K; ++m) {
      const int64_t v = p.costs[l * I.K + m];
      HQ_CHECK(v >= 0, "costs[", l, ", ", m, "] = ", v, " is negative; costs are bit counts");
      HQ_CHECK(v <= (int64_t(1) << 56), "costs[", l, ", ", m, "] = ", v, " is too large");
      lo = std::min(lo, v);
      hi = std::max(hi, v);
    }
    I.min_cost += lo;
    max_sum += hi;
    HQ_CHECK(max_sum <= (int64_t(1) << 61), "the total of the costs overflows 64-bit integers");
  }
  const int64_t n = I.n;
  for (int64_t i = 0; i < n * n; ++i)
    HQ_CHECK_FINITE(std::isfinite(p.M[i]), "M[", i / n, ", ", i % n, "] = ", p.M[i],
                    " is not finite; the sensitivity matrix must be finite");
  I.S.resize(n, n);
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < n; ++j) I.S(i, j) = 0.5 * (p.M[i * n + j] + p.M[j * n + i]);
  for (int64_t i = 0; i < n; ++i)
    HQ_CHECK_FINITE(std::isfinite(I.S(i, i)) && std::isfinite(I.S.row(i).sum()),
                    "M overflows double precision when symmetrized (row ", i, ")");
  double sc = 0.0;
  for (int64_t i = 0; i < n; ++i) sc += std::abs(I.S(i, i));
  I.scale = sc / static_cast<double>(I.K) + 1e-300;
  return I;
}

bool layers_coupled(const RowMatrixXd& S, int64_t K, int64_t l, int64_t l2) {
  for (int64_t m = 0; m < K; ++m)
    for (int64_t m2 = 0; m2 < K; ++m2)
      if (S(l * K + m, l2 * K + m2) != 0.0) return true;
  return false;
}

std::vector<int64_t> components_of(const RowMatrixXd& S, int64_t L, int64_t K) {
  std::vector<int64_t> parent(L);
  std::iota(parent.begin(), parent.end(), 0);
  auto find = [&](int64_t x) {
    while (parent[x] != x) x = parent[x] = parent[parent[x]];
    return x;
  };
  for (int64_t l = 0; l < L; ++l)
    for (int64_t l2 = l + 1; l2 < L; ++l2)
      if (find(l) != find(l2) && layers_coupled(S, K, l, l2)) {
        const int64_t a = find(l), b = find(l2);
        parent[std::max(a, b)] = std::min(a, b);
      }
  // Number components in order of their first layer.
  std::vector<int64_t> id(L, -1), comp(L);
  int64_t next = 0;
  for (int64_t l = 0; l < L; ++l) {
    const int64_t r = find(l);
    if (id[r] < 0) id[r] = next++;
    comp[l] = id[r];
  }
  return comp;
}

double objective_of(const RowMatrixXd& S, int64_t K, const std::vector<int64_t>& choice) {
  const int64_t L = static_cast<int64_t>(choice.size());
  double f = 0.0;
  for (int64_t l = 0; l < L; ++l) {
    const int64_t v = l * K + choice[l];
    for (int64_t l2 = 0; l2 < L; ++l2) f += S(v, l2 * K + choice[l2]);
  }
  return f;
}

int64_t cost_of(const Instance& I, const std::vector<int64_t>& choice) {
  int64_t c = 0;
  for (int64_t l = 0; l < I.L; ++l) c += I.c[l * I.K + choice[l]];
  return c;
}

// ------------------------------------------------------------------------------------------
// Exact path
// ------------------------------------------------------------------------------------------

// All K^s option combinations of a component's layers, reduced to their Pareto front. A point's
// id encodes the combination in base K (first layer most significant).
Front enumerate_component(const Instance& I, const std::vector<int64_t>& layers) {
  const int64_t s = static_cast<int64_t>(layers.size());
  const int64_t K = I.K;
  int64_t total = 1;
  for (int64_t t = 0; t < s; ++t) total *= K;
  // Only the best point of each distinct cost can be on the front (layers of equal shape give
  // many combinations the same cost), so reduce per cost in a hash map before sorting.
  std::unordered_map<int64_t, Point> best_at;
  best_at.reserve(static_cast<size_t>(std::min<int64_t>(total, 1 << 16)));
  std::vector<int64_t> m(s, -1), var(s, 0), code(s + 1, 0), pc(s + 1, 0);
  std::vector<double> po(s + 1, 0.0);
  int64_t t = 0;
  while (t >= 0) {
    if (t == s) {
      auto it = best_at.try_emplace(pc[s], Point{pc[s], po[s], code[s]});
      Point& b = it.first->second;
      // Same tie rule as pareto_front: lowest objective, then lowest id.
      if (!it.second && (po[s] < b.obj || (po[s] == b.obj && code[s] < b.id)))
        b = Point{pc[s], po[s], code[s]};
      --t;
      continue;
    }
    if (++m[t] == K) {
      m[t] = -1;
      --t;
      continue;
    }
    const int64_t v = layers[t] * K + m[t];
    var[t] = v;
    // Objective added by this layer: its diagonal entry and both halves of each cross term.
    double add = I.S(v, v);
    for (int64_t u = 0; u < t; ++u) add += 2.0 * I.S(v, var[u]);
    pc[t + 1] = pc[t] + I.c[v];
    po[t + 1] = po[t] + add;
    code[t + 1] = code[t] * K + m[t];
    ++t;
  }
  std::vector<Point> pts;
  pts.reserve(best_at.size());
  for (const auto& kv : best_at) pts.push_back(kv.second);
  return pareto_front(std::move(pts));
}

void solve_exact(const Instance& I, const std::vector<int64_t>& comp, const IqpOptions& opt,
                 const RunControl& rc, IqpResult& res) {
  const int64_t n_comp = *std::max_element(comp.begin(), comp.end()) + 1;
  std::vector<std::vector<int64_t>> layers(n_comp);
  for (int64_t l = 0; l < I.L; ++l) layers[comp[l]].push_back(l);
  std::vector<Front> fronts(n_comp);
  // Components are independent: enumerate them in parallel, in chunks so that Ctrl-C is polled.
  const int64_t chunk = std::max<int64_t>(4 * resolve_threads(opt.n_threads), 8);
  for (int64_t c0 = 0; c0 < n_comp; c0 += chunk) {
    rc.poll();
    const int64_t c1 = std::min(n_comp, c0 + chunk);
    parallel_for(c1 - c0, opt.n_threads,
                 [&](int64_t i) { fronts[c0 + i] = enumerate_component(I, layers[c0 + i]); });
    rc.report(c1, n_comp + n_comp);
  }
  for (int64_t c = 0; c < n_comp; ++c) res.nodes += static_cast<int64_t>(fronts[c].size());
  const KnapsackResult kr = solve_knapsack(fronts, I.budget, opt.max_states, true, rc);
  res.nodes += kr.states;
  res.iterations = kr.stages;
  res.choice.assign(I.L, 0);
  for (int64_t c = 0; c < n_comp; ++c) {
    int64_t code = fronts[c][kr.pick[c]].id;
    for (size_t t = layers[c].size(); t-- > 0;) {
      res.choice[layers[c][t]] = code % I.K;
      code /= I.K;
    }
  }
  res.method = "exact";
  res.bound = "exact (component enumeration + exact knapsack)";
}

// ------------------------------------------------------------------------------------------
// General path
// ------------------------------------------------------------------------------------------

// Exact knapsack of a linear objective w (one value per variable); returns the choice. When the
// state limit stops it, `exact` is false and the choice is the LP-greedy incumbent.
struct LinearResult {
  std::vector<int64_t> choice;
  double value = 0.0;  // Σ w over the choice
  double bound = 0.0;  // a valid lower bound on the linear optimum (= value when exact)
  bool exact = false;
  int64_t states = 0;
};

std::vector<Front> linear_fronts(const Instance& I, const double* w) {
  std::vector<Front> fronts(I.L);
  std::vector<Point> pts(I.K);
  for (int64_t l = 0; l < I.L; ++l) {
    for (int64_t m = 0; m < I.K; ++m) pts[m] = {I.c[l * I.K + m], w[l * I.K + m], m};
    fronts[l] = pareto_front(pts);
  }
  return fronts;
}

LinearResult linear_knapsack(const Instance& I, const double* w, int64_t max_states,
                             const RunControl& rc) {
  const auto fronts = linear_fronts(I, w);
  const KnapsackResult kr = solve_knapsack(fronts, I.budget, max_states, false, rc);
  LinearResult r;
  r.choice.resize(I.L);
  for (int64_t l = 0; l < I.L; ++l) r.choice[l] = fronts[l][kr.pick[l]].id;
  r.value = kr.obj;
  r.exact = kr.optimal;
  r.bound = kr.optimal ? kr.obj : kr.lp_bound;
  r.states = kr.states;
  return r;
}

// Best-improvement local search over single option changes and paired changes of two layers,
// always within budget. R(i, l) = S(i, current variable of layer l); h = row sums of R.
class LocalSearch {
 public:
  explicit LocalSearch(const Instance& I) : I_(I) {}

  // Moves `choice` (feasible or not) to a feasible local optimum; returns the moves made.
  int64_t run(std::vector<int64_t>& choice, int64_t max_moves, const RunControl& rc) {
    init(choice);
    int64_t moves = 0;
    while (cost_ > I_.budget) {  // repair: cheapest objective increase per bit saved
      int64_t bv = -1;
      double br = kInf;
      for (int64_t v = 0; v < I_.n; ++v) {
        const int64_t dc = dcost(v);
        if (dc >= 0) continue;
        const double r = delta1(v) / static_cast<double>(-dc);
        if (r < br) {
          br = r;
          bv = v;
        }
      }
      apply(bv);
      ++moves;
    }
    const double tol = 1e-12 * I_.scale;
    while (moves < max_moves) {
      if (moves % 64 == 0) rc.poll();
      // single changes
      int64_t bv = -1;
      double bd = -tol;
      for (int64_t v = 0; v < I_.n; ++v) {
        if (v == cur_[v / I_.K] || cost_ + dcost(v) > I_.budget) continue;
        const double d = delta1(v);
        if (d < bd) {
          bd = d;
          bv = v;
        }
      }
      if (bv >= 0) {
        apply(bv);
        ++moves;
        continue;
      }
      // paired changes (e.g. one layer up, another down)
      int64_t pv = -1, pw = -1;
      if (!best_pair(tol, pv, pw)) break;
      apply(pv);
      apply(pw);
      moves += 2;
    }
    for (int64_t l = 0; l < I_.L; ++l) choice[l] = cur_[l] - l * I_.K;
    return moves;
  }

 private:
  void init(const std::vector<int64_t>& choice) {
    const int64_t n = I_.n, L = I_.L, K = I_.K;
    cur_.resize(L);
    cost_ = 0;
    for (int64_t l = 0; l < L; ++l) {
      cur_[l] = l * K + choice[l];
      cost_ += I_.c[cur_[l]];
    }
    R_.resize(n, L);
    h_.assign(n, 0.0);
    for (int64_t i = 0; i < n; ++i) {
      double s = 0.0;
      for (int64_t l = 0; l < L; ++l) {
        R_(i, l) = I_.S(i, cur_[l]);
        s += R_(i, l);
      }
      h_[i] = s;
    }
    d1_.assign(n, 0.0);
    dc_.assign(n, 0);
    refresh_d1();
  }
  int64_t dcost(int64_t v) const { return dc_[v]; }
  double delta1(int64_t v) const { return d1_[v]; }
  void refresh_d1() {
    for (int64_t v = 0; v < I_.n; ++v) {
      const int64_t a = cur_[v / I_.K];
      dc_[v] = I_.c[v] - I_.c[a];
      d1_[v] = v == a ? 0.0
                      : 2.0 * (h_[v] - h_[a]) - 2.0 * I_.S(v, a) + I_.S(v, v) + I_.S(a, a);
    }
  }
  void apply(int64_t v) {
    const int64_t l = v / I_.K, a = cur_[l];
    if (v == a) return;
    for (int64_t i = 0; i < I_.n; ++i) {
      const double nv = I_.S(i, v);
      h_[i] += nv - R_(i, l);
      R_(i, l) = nv;
    }
    cost_ += I_.c[v] - I_.c[a];
    cur_[l] = v;
    refresh_d1();
  }
  // Best pair (v, w) of non-current variables in layers l < l2 within budget; Δ of the pair is
  // Δ1(v) + Δ1(w) + 2 (S(v,w) - S(v,a2) - S(w,a) + S(a,a2)). Each layer's best is kept, then
  // reduced in layer order. Serial: a scan takes about a millisecond for 1,120 variables, too
  // little for threads to pay off on a shared machine.
  bool best_pair(double tol, int64_t& pv, int64_t& pw) {
    const int64_t L = I_.L, K = I_.K;
    const int64_t slack = I_.budget - cost_;
    std::vector<double> bd(L, -tol);
    std::vector<int64_t> bv(L, -1), bw(L, -1);
    for (int64_t l = 0; l < L; ++l) {
      const int64_t a = cur_[l];
      for (int64_t v = l * K; v < (l + 1) * K; ++v) {
        if (v == a) continue;
        const int64_t dcv = dcost(v);
        const double d1v = d1_[v];
        const double* Sv = &I_.S(v, 0);
        const double* Rv = &R_(v, 0);
        for (int64_t l2 = l + 1; l2 < L; ++l2) {
          const int64_t a2 = cur_[l2];
          const double base = d1v - 2.0 * Rv[l2] + 2.0 * R_(a, l2);
          for (int64_t w = l2 * K; w < (l2 + 1) * K; ++w) {
            if (w == a2 || dcv + dcost(w) > slack) continue;
            const double d = base + d1_[w] + 2.0 * (Sv[w] - R_(w, l));
            if (d < bd[l]) {
              bd[l] = d;
              bv[l] = v;
              bw[l] = w;
            }
          }
        }
      }
    }
    double best = -tol;
    pv = pw = -1;
    for (int64_t l = 0; l < L; ++l)
      if (bv[l] >= 0 && bd[l] < best) {
        best = bd[l];
        pv = bv[l];
        pw = bw[l];
      }
    return pv >= 0;
  }

  const Instance& I_;
  std::vector<int64_t> cur_;
  int64_t cost_ = 0;
  RowMatrixXd R_;
  std::vector<double> h_, d1_;
  std::vector<int64_t> dc_;
};

// A vertex of the relaxation's polytope {x_l in simplex, cᵀx <= budget}: one option per layer,
// except at most one layer split between two options.
struct Vertex {
  std::vector<int32_t> opt;
  int32_t frac_layer = -1;
  int32_t frac_opt = -1;
  double theta = 0.0;
  uint64_t hash = 0;
  bool operator==(const Vertex& o) const {
    return frac_layer == o.frac_layer && frac_opt == o.frac_opt && theta == o.theta &&
           opt == o.opt;
  }
};

void hash_vertex(Vertex& v) {
  uint64_t h = 1469598103934665603ull;
  auto mix = [&](uint64_t x) {
    h ^= x;
    h *= 1099511628211ull;
  };
  for (int32_t o : v.opt) mix(static_cast<uint64_t>(o));
  mix(static_cast<uint64_t>(v.frac_layer + 1));
  mix(static_cast<uint64_t>(v.frac_opt + 1));
  uint64_t tb;
  std::memcpy(&tb, &v.theta, sizeof tb);
  mix(tb);
  v.hash = h;
}

// Sparse entries (variable, value) of a vertex.
void vertex_entries(const Vertex& v, int64_t K, std::vector<std::pair<int64_t, double>>& out) {
  out.clear();
  for (size_t l = 0; l < v.opt.size(); ++l) {
    const int64_t base = static_cast<int64_t>(l) * K;
    if (static_cast<int32_t>(l) == v.frac_layer) {
      out.emplace_back(base + v.opt[l], 1.0 - v.theta);
      out.emplace_back(base + v.frac_opt, v.theta);
    } else {
      out.emplace_back(base + v.opt[l], 1.0);
    }
  }
}

// Linear minimization over the polytope: the knapsack LP with per-variable weights g.
Vertex lmo(const Instance& I, const std::vector<double>& g, double& value) {
  const auto fronts = linear_fronts(I, g.data());
  const LpResult lp = lp_knapsack(fronts, I.budget);
  Vertex v;
  v.opt.resize(I.L);
  for (int64_t l = 0; l < I.L; ++l) v.opt[l] = static_cast<int32_t>(fronts[l][lp.pick[l]].id);
  if (!lp.integral && lp.theta > 0.0) {
    v.frac_layer = lp.frac_group;
    v.frac_opt = static_cast<int32_t>(fronts[lp.frac_group][lp.frac_to].id);
    v.theta = lp.theta;
  }
  value = lp.bound;
  hash_vertex(v);
  return v;
}

Vertex vertex_of_choice(const std::vector<int64_t>& choice) {
  Vertex v;
  v.opt.assign(choice.begin(), choice.end());
  hash_vertex(v);
  return v;
}

// One convex relaxation: φ(x) = xᵀQx + qᵀx with Q = Q0 - τ diag(s), q = τ s (see the header).
struct Relaxation {
  std::string name;
  RowMatrixXd Q;
  std::vector<double> q;
};

// Helmert basis of the zero-sum subspace of R^K: K x (K-1), orthonormal columns.
Eigen::MatrixXd helmert(int64_t K) {
  Eigen::MatrixXd H = Eigen::MatrixXd::Zero(K, K - 1);
  for (int64_t a = 1; a < K; ++a) {
    const double s = 1.0 / std::sqrt(static_cast<double>(a * (a + 1)));
    for (int64_t m = 0; m < a; ++m) H(m, a - 1) = s;
    H(a, a - 1) = -static_cast<double>(a) * s;
  }
  return H;
}

// Pᵀ Q0 P for P = blockdiag(H, ..., H): Q0 restricted to {Σ_m x[l,m] = 0 for every l}.
Eigen::MatrixXd project(const RowMatrixXd& Q0, int64_t L, int64_t K, int n_threads) {
  const Eigen::MatrixXd H = helmert(K);
  const int64_t n = L * K, r = L * (K - 1);
  Eigen::MatrixXd T(n, r);  // Q0 P
  parallel_for(n, n_threads, [&](int64_t i) {
    for (int64_t l = 0; l < L; ++l)
      for (int64_t b = 0; b < K - 1; ++b) {
        double s = 0.0;
        for (int64_t m = 0; m < K; ++m) s += Q0(i, l * K + m) * H(m, b);
        T(i, l * (K - 1) + b) = s;
      }
  });
  Eigen::MatrixXd A(r, r);
  parallel_for(r, n_threads, [&](int64_t j) {
    for (int64_t l = 0; l < L; ++l)
      for (int64_t a = 0; a < K - 1; ++a) {
        double s = 0.0;
        for (int64_t m = 0; m < K; ++m) s += H(m, a) * T(l * K + m, j);
        A(l * (K - 1) + a, j) = s;
      }
  });
  return (A + A.transpose()) * 0.5;
}

// Largest τ with Pᵀ Q0 P - τ D_s ⪰ 0 (D_s = diag of the layer scales s), minus a safety margin
// for the eigensolver's rounding: the smallest eigenvalue of D^{-1/2} A D^{-1/2}.
double shift_for(const Eigen::MatrixXd& A, const std::vector<double>& s_layer, int64_t K) {
  const int64_t r = A.rows();
  Eigen::VectorXd isq(r);
  for (int64_t i = 0; i < r; ++i) isq(i) = 1.0 / std::sqrt(s_layer[i / (K - 1)]);
  const Eigen::MatrixXd B = isq.asDiagonal() * A * isq.asDiagonal();
  Eigen::SelfAdjointEigenSolver<Eigen::MatrixXd> es(B, Eigen::EigenvaluesOnly);
  HQ_CHECK_FINITE(es.info() == Eigen::Success, "the eigenvalue solver did not converge on M");
  const auto& ev = es.eigenvalues();
  const double norm = std::max(std::abs(ev(0)), std::abs(ev(r - 1)));
  // Backward-stable solver: eigenvalues are accurate to O(r eps ||B||); stay well below.
  return ev(0) - (1e-10 + 64.0 * static_cast<double>(r) * 2.3e-16) * norm - 1e-300;
}

struct FwResult {
  double bound = -kInf;
  std::vector<double> x;     // last iterate
  std::vector<double> grad;  // gradient at the last iterate
  int64_t iterations = 0;
};

// Pairwise Frank-Wolfe on φ over the polytope, from the vertex of `start`. Every iterate x gives
// the certified bound φ(x) + min_s ∇φ(x)ᵀ(s - x) (convexity on the polytope's affine hull);
// the best is returned. Stops early once the bound reaches `stop_at` (the incumbent).
FwResult frank_wolfe(const Instance& I, const Relaxation& R, const std::vector<int64_t>& start,
                     int64_t iters, double stop_at, const RunControl& rc) {
  const int64_t n = I.n, K = I.K;
  const auto& Q = R.Q;
  FwResult out;
  std::vector<Vertex> verts;
  std::vector<double> alpha;
  std::unordered_map<uint64_t, std::vector<int32_t>> index;
  auto add_vertex = [&](Vertex&& v) -> int32_t {
    auto& bucket = index[v.hash];
    for (int32_t id : bucket)
      if (verts[id] == v) return id;
    verts.push_back(std::move(v));
    alpha.push_back(0.0);
    bucket.push_back(static_cast<int32_t>(verts.size() - 1));
    return static_cast<int32_t>(verts.size() - 1);
  };
  std::vector<double> x(n, 0.0), u(n, 0.0), g(n), d(n, 0.0), Qd(n);
  std::vector<int32_t> active;  // ids with alpha > 0, in order of entry
  std::vector<std::pair<int64_t, double>> ent, dsp, both;
  {
    const int32_t id = add_vertex(vertex_of_choice(start));
    alpha[id] = 1.0;
    active.push_back(id);
    vertex_entries(verts[id], K, ent);
    for (const auto& e : ent) x[e.first] = e.second;
  }
  // y = Q v for a sparse v: Q is symmetric, so y = Σ_e v_e Q.row(e), contiguous rows. Serial on
  // purpose: one product is 10-500 µs, below what an OpenMP barrier costs on a loaded machine.
  auto mul_sparse = [&](const std::vector<std::pair<int64_t, double>>& sp, std::vector<double>& y) {
    double* yy = y.data();
    std::fill(yy, yy + n, 0.0);
    for (const auto& e : sp) {
      const double* row = &Q(e.first, 0);
      const double a = e.second;
      for (int64_t i = 0; i < n; ++i) yy[i] += a * row[i];
    }
  };
  vertex_entries(verts[0], K, ent);
  mul_sparse(ent, u);
  const double tol = 1e-13 * I.scale;
  int64_t t = 0;
  for (; t < iters; ++t) {
    if (t % 16 == 0) rc.poll();
    double phi = 0.0, gx = 0.0;
    for (int64_t i = 0; i < n; ++i) {
      g[i] = 2.0 * u[i] + R.q[i];
      phi += x[i] * (u[i] + R.q[i]);
      gx += g[i] * x[i];
    }
    double gs = 0.0;
    Vertex s = lmo(I, g, gs);
    const double lb = phi + gs - gx;
    out.bound = std::max(out.bound, lb);
    if (gx - gs <= tol || out.bound >= stop_at) {
      ++t;
      break;
    }
    // Away vertex: the active vertex with the largest gradient value.
    int32_t away = -1;
    double gv_max = -kInf;
    for (int32_t id : active) {
      const Vertex& vv = verts[id];
      double gv = 0.0;
      for (int64_t l = 0; l < I.L; ++l) gv += g[l * K + vv.opt[l]];
      if (vv.frac_layer >= 0)
        gv += vv.theta * (g[vv.frac_layer * K + vv.frac_opt] - g[vv.frac_layer * K + vv.opt[vv.frac_layer]]);
      if (gv > gv_max) {
        gv_max = gv;
        away = id;
      }
    }
    const int32_t sid = add_vertex(std::move(s));
    if (sid == away) break;  // x is optimal over the active face and the polytope
    // d = s - v, sparse.
    vertex_entries(verts[sid], K, ent);
    for (const auto& e : ent) d[e.first] += e.second;
    vertex_entries(verts[away], K, ent);
    for (const auto& e : ent) d[e.first] -= e.second;
    // Collect the non-zeros of d (each index once) and clear it for the next iteration.
    dsp.clear();
    vertex_entries(verts[sid], K, both);
    both.insert(both.end(), ent.begin(), ent.end());
    for (const auto& e : both)
      if (d[e.first] != 0.0) {
        dsp.emplace_back(e.first, d[e.first]);
        d[e.first] = 0.0;
      }
    if (dsp.empty()) break;
    mul_sparse(dsp, Qd);
    double gd = 0.0, dQd = 0.0;
    for (const auto& e : dsp) {
      gd += g[e.first] * e.second;
      dQd += Qd[e.first] * e.second;
    }
    if (gd >= 0.0) break;
    const double gmax = alpha[away];
    const double gamma = dQd > 0.0 ? std::min(gmax, -gd / (2.0 * dQd)) : gmax;
    for (const auto& e : dsp) x[e.first] += gamma * e.second;
    for (int64_t i = 0; i < n; ++i) u[i] += gamma * Qd[i];
    if (alpha[sid] == 0.0) active.push_back(sid);
    alpha[sid] += gamma;
    alpha[away] = gamma >= gmax ? 0.0 : alpha[away] - gamma;
    if (alpha[away] == 0.0) active.erase(std::find(active.begin(), active.end(), away));
    if (t % 32 == 31) {  // limit drift of the incrementally updated Qx
      std::vector<std::pair<int64_t, double>> xs;
      for (int64_t i = 0; i < n; ++i)
        if (x[i] != 0.0) xs.emplace_back(i, x[i]);
      mul_sparse(xs, u);
    }
  }
  out.iterations = t;
  out.x = x;
  for (int64_t i = 0; i < n; ++i) g[i] = 2.0 * u[i] + R.q[i];
  out.grad = g;
  return out;
}

std::vector<int64_t> round_relaxed(const Instance& I, const std::vector<double>& x) {
  std::vector<int64_t> ch(I.L);
  for (int64_t l = 0; l < I.L; ++l) {
    int64_t b = 0;
    for (int64_t m = 1; m < I.K; ++m)
      if (x[l * I.K + m] > x[l * I.K + b]) b = m;
    ch[l] = b;
  }
  return ch;
}

// State cap of the knapsacks solved inside the general path: their solutions are only starts
// for local search, and the Gilmore-Lawler bound falls back to the (valid) LP bound when the cap
// stops the program early. Degenerate linearizations can otherwise need 10^5+ states per stage.
constexpr int64_t kLinearStates = 4096;

void solve_general(const Instance& I, const IqpOptions& opt, const RunControl& rc,
                   IqpResult& res) {
  const int64_t n = I.n, L = I.L, K = I.K;
  const int nt = opt.n_threads;
  std::vector<int64_t> best;
  double best_obj = kInf;
  LocalSearch ls(I);
  std::vector<std::vector<int64_t>> tried;
  auto consider = [&](std::vector<int64_t> ch) {
    if (std::find(tried.begin(), tried.end(), ch) != tried.end()) return;
    tried.push_back(ch);
    res.nodes += ls.run(ch, opt.max_moves, rc);
    const double f = objective_of(I.S, K, ch);
    if (f < best_obj) {
      best_obj = f;
      best = ch;
    }
  };
  std::string bound_name = "Gilmore-Lawler";
  double lb = -kInf;

  // Start 1: the exact knapsack on the diagonal alone (cross terms ignored).
  std::vector<double> w(n);
  for (int64_t v = 0; v < n; ++v) w[v] = I.S(v, v);
  consider(linear_knapsack(I, w.data(), kLinearStates, rc).choice);

  // Gilmore-Lawler bound (and start 2): each cross term at its row minimum over the other
  // layer's options, then the exact knapsack of that linear underestimator.
  // f(δ) = Σ_l S(v_l, v_l) + Σ_{l != l'} S(v_l, v_l') over ordered pairs, and each ordered
  // term is at least its row minimum over the other layer's options.
  for (int64_t v = 0; v < n; ++v) {
    const int64_t l = v / K;
    double s = I.S(v, v);
    for (int64_t l2 = 0; l2 < L; ++l2) {
      if (l2 == l) continue;
      double mn = kInf;
      for (int64_t m = 0; m < K; ++m) mn = std::min(mn, I.S(v, l2 * K + m));
      s += mn;
    }
    w[v] = s;
  }
  {
    const LinearResult gl = linear_knapsack(I, w.data(), kLinearStates, rc);
    lb = gl.bound;
    consider(gl.choice);
  }
  rc.report(1, 6);
  const double tol_gap = opt.gap_tolerance * std::max(std::abs(best_obj), 1e-300);
  if (K > 1 && lb < best_obj - tol_gap) {
    // Layer scales for the scaled shift: the mean diagonal magnitude of the layer's options.
    std::vector<double> s_unit(L, 1.0), s_layer(L);
    double mean = 0.0;
    for (int64_t l = 0; l < L; ++l) {
      double a = 0.0;
      for (int64_t m = 0; m < K; ++m) a += std::abs(I.S(l * K + m, l * K + m));
      s_layer[l] = a / static_cast<double>(K);
      mean += s_layer[l] / static_cast<double>(L);
    }
    if (!(mean > 0.0)) mean = 1.0;
    for (auto& s : s_layer) s = std::max(s, 1e-3 * mean);
    // Within-layer blocks: M's own, or the linearized (m 1ᵀ + 1 mᵀ)/2, which is zero on the
    // constraints' affine hull.
    RowMatrixXd Qlin = I.S;
    for (int64_t l = 0; l < L; ++l)
      for (int64_t a = 0; a < K; ++a)
        for (int64_t b = 0; b < K; ++b)
          Qlin(l * K + a, l * K + b) = 0.5 * (I.S(l * K + a, l * K + a) + I.S(l * K + b, l * K + b));
    const Eigen::MatrixXd A_orig = project(I.S, L, K, nt);
    const Eigen::MatrixXd A_lin = project(Qlin, L, K, nt);
    struct Variant {
      const char* name;
      const RowMatrixXd* Q0;
      const Eigen::MatrixXd* A;
      const std::vector<double>* s;
    };
    const Variant variants[] = {
        {"shifted relaxation (M's within-layer blocks, per-layer scaled shift)", &I.S, &A_orig, &s_layer},
        {"shifted relaxation (linearized within-layer blocks, per-layer scaled shift)", &Qlin, &A_lin, &s_layer},
        {"shifted relaxation (M's within-layer blocks, uniform shift)", &I.S, &A_orig, &s_unit},
    };
    int64_t done = 1;
    double diag_max = 1e-300;
    for (int64_t v = 0; v < n; ++v) diag_max = std::max(diag_max, std::abs(I.S(v, v)));
    std::vector<std::pair<const RowMatrixXd*, std::vector<double>>> ran;
    for (const auto& var : variants) {
      rc.poll();
      const double tau = shift_for(*var.A, *var.s, K);
      // Skip a relaxation equal to one already run (e.g. a PSD M: both shifts are ~0).
      std::vector<double> shift(L);
      for (int64_t l = 0; l < L; ++l) shift[l] = tau * (*var.s)[l];
      bool seen = false;
      for (const auto& prev : ran) {
        if (prev.first != var.Q0) continue;
        double diff = 0.0;
        for (int64_t l = 0; l < L; ++l) diff = std::max(diff, std::abs(prev.second[l] - shift[l]));
        seen = seen || diff <= 1e-9 * diag_max;
      }
      if (seen) continue;
      ran.emplace_back(var.Q0, shift);
      Relaxation R;
      R.name = var.name;
      R.Q = *var.Q0;
      R.q.assign(n, 0.0);
      for (int64_t v = 0; v < n; ++v) {
        const double dv = shift[v / K];
        R.Q(v, v) -= dv;
        R.q[v] = dv;
      }
      const double stop_at = best_obj - tol_gap;
      FwResult fw = frank_wolfe(I, R, best, opt.fw_iterations, stop_at, rc);
      res.iterations += fw.iterations;
      if (fw.bound > lb) {
        lb = fw.bound;
        bound_name = var.name;
      }
      consider(round_relaxed(I, fw.x));
      consider(linear_knapsack(I, fw.grad.data(), kLinearStates, rc).choice);
      rc.report(++done, 6);
      if (lb >= best_obj - opt.gap_tolerance * std::max(std::abs(best_obj), 1e-300)) break;
    }
  }
  // Iterated local search: perturb the best solution (a few layers to random options, from a
  // fixed-seed generator), repair and improve it, keep it when better.
  if (lb < best_obj - opt.gap_tolerance * std::max(std::abs(best_obj), 1e-300)) {
    uint64_t state = 0x9E3779B97F4A7C15ull ^ static_cast<uint64_t>(opt.seed);
    auto next = [&]() {  // splitmix64: the same sequence on every platform
      uint64_t z = (state += 0x9E3779B97F4A7C15ull);
      z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
      z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
      return z ^ (z >> 31);
    };
    const int64_t kick = std::max<int64_t>(2, L / 16);
    for (int64_t round = 0; round < opt.restarts; ++round) {
      rc.poll();
      std::vector<int64_t> ch = best;
      for (int64_t t = 0; t < kick; ++t) ch[next() % L] = static_cast<int64_t>(next() % K);
      res.nodes += ls.run(ch, opt.max_moves, rc);
      const double f = objective_of(I.S, K, ch);
      if (f < best_obj) {
        best_obj = f;
        best = ch;
      }
    }
  }
  res.choice = best;
  res.lower_bound = lb;
  res.method = "general";
  res.bound = bound_name + " lower bound";
}

}  // namespace

double iqp_objective(const double* M, int64_t n_layers, int64_t n_options, const int64_t* choice) {
  const int64_t n = n_layers * n_options;
  double f = 0.0;
  for (int64_t l = 0; l < n_layers; ++l) {
    HQ_CHECK(choice[l] >= 0 && choice[l] < n_options, "choice[", l, "] = ", choice[l],
             " is not an option index in [0, ", n_options, ")");
  }
  for (int64_t l = 0; l < n_layers; ++l) {
    const int64_t v = l * n_options + choice[l];
    for (int64_t l2 = 0; l2 < n_layers; ++l2) {
      const int64_t w = l2 * n_options + choice[l2];
      f += 0.5 * (M[v * n + w] + M[w * n + v]);
    }
  }
  return f;
}

std::vector<int64_t> iqp_components(const double* M, int64_t n_layers, int64_t n_options) {
  IqpProblem p;
  p.n_layers = n_layers;
  p.n_options = n_options;
  p.M = M;
  std::vector<int64_t> zero(static_cast<size_t>(n_layers * n_options), 0);
  p.costs = zero.data();
  const Instance I = make_instance(p);
  return components_of(I.S, I.L, I.K);
}

IqpResult solve_iqp(const IqpProblem& problem, const IqpOptions& opt, const RunControl& rc) {
  const auto t0 = Clock::now();
  HQ_CHECK(opt.max_enumeration >= 1, "max_enumeration must be >= 1");
  HQ_CHECK(opt.max_states >= 1 && opt.max_states <= (int64_t(1) << 30),
           "max_states must be in [1, 2^30]");
  HQ_CHECK(opt.fw_iterations >= 0, "fw_iterations must be >= 0");
  HQ_CHECK(opt.max_moves >= 0, "max_moves must be >= 0");
  HQ_CHECK(opt.restarts >= 0, "restarts must be >= 0");
  HQ_CHECK(opt.gap_tolerance >= 0.0, "gap_tolerance must be >= 0");
  const Instance I = make_instance(problem);
  IqpResult res;
  res.budget = I.budget;
  res.min_cost = I.min_cost;
  if (I.min_cost > I.budget)
    throw InfeasibleBudget(
        detail::concat("no allocation fits the budget of ", I.budget,
                       " bits: even the cheapest option of every layer needs ", I.min_cost,
                       " bits"),
        static_cast<double>(I.min_cost));

  const std::vector<int64_t> comp = components_of(I.S, I.L, I.K);
  if (problem.blocks != nullptr) {
    for (int64_t l = 0; l < I.L; ++l)
      for (int64_t l2 = l + 1; l2 < I.L; ++l2)
        if (problem.blocks[l] != problem.blocks[l2] && layers_coupled(I.S, I.K, l, l2))
          throw InvalidArgument(detail::concat(
              "M has non-zero entries between layer ", l, " (block ", problem.blocks[l],
              ") and layer ", l2, " (block ", problem.blocks[l2],
              "), so it is not block-diagonal for these blocks; pass blocks=None or zero "
              "those entries"));
  }
  const int64_t n_comp = *std::max_element(comp.begin(), comp.end()) + 1;
  std::vector<int64_t> size(n_comp, 0);
  for (int64_t c : comp) ++size[c];
  res.n_components = n_comp;
  res.largest_component = *std::max_element(size.begin(), size.end());
  // K^s <= max_enumeration, without overflow.
  bool enumerable = true;
  {
    int64_t total = 1;
    for (int64_t t = 0; t < res.largest_component && enumerable; ++t) {
      if (total > opt.max_enumeration / I.K) enumerable = false;
      total *= I.K;
    }
  }
  IqpMethod method = opt.method;
  if (method == IqpMethod::Auto) method = enumerable ? IqpMethod::Exact : IqpMethod::General;
  if (method == IqpMethod::Exact && !enumerable)
    throw InvalidArgument(detail::concat(
        "method='exact' needs every component of M to have at most max_enumeration = ",
        opt.max_enumeration, " option combinations, but one couples ", res.largest_component,
        " layers (", I.K, "^", res.largest_component,
        " combinations); use method='general' or raise max_enumeration"));

  if (method == IqpMethod::Exact) {
    solve_exact(I, comp, opt, rc, res);
  } else {
    solve_general(I, opt, rc, res);
  }
  res.cost = cost_of(I, res.choice);
  HQ_CHECK(res.cost <= I.budget, "internal error: the solution exceeds the budget");
  res.objective = iqp_objective(problem.M, I.L, I.K, res.choice.data());
  if (res.method == "exact") {
    res.lower_bound = res.objective;
  } else {
    res.lower_bound = std::min(res.lower_bound, res.objective);
  }
  res.abs_gap = res.objective - res.lower_bound;
  res.gap = res.abs_gap / std::max(std::abs(res.objective), 1e-300);
  if (res.abs_gap == 0.0) res.gap = 0.0;
  res.status = (res.method == "exact" || res.gap <= opt.gap_tolerance) ? "optimal" : "feasible";
  res.seconds = std::chrono::duration<double>(Clock::now() - t0).count();
  return res;
}

}  // namespace hiquant
