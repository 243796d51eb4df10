// Bindings of the allocation IQP solver (hiquant.allocate calls these; users never do).
#include "hiquant/allocation.hpp"

#include "binding_util.hpp"

namespace hiquant_py {

namespace {

hiquant::IqpMethod parse_method(const std::string& s) {
  if (s == "auto") return hiquant::IqpMethod::Auto;
  if (s == "exact") return hiquant::IqpMethod::Exact;
  if (s == "general") return hiquant::IqpMethod::General;
  throw InvalidArgument("method must be 'auto', 'exact' or 'general', got '" + s + "'");
}

struct Checked {
  py::array_t<double, py::array::c_style> M;
  py::array_t<int64_t, py::array::c_style> costs;
  py::ssize_t L = 0, K = 0;
};

Checked check_problem(const py::object& M_, const py::object& costs_) {
  Checked c;
  c.costs = require_array<int64_t>(costs_, "costs", 2);
  c.L = c.costs.shape(0);
  c.K = c.costs.shape(1);
  c.M = require_array<double>(M_, "M", 2);
  const py::ssize_t n = c.L * c.K;
  require_shape(c.M, "M", {n, n},
                "M must be (n_layers * n_options) square, variables ordered layer-major");
  return c;
}

}  // namespace

void init_allocation(py::module_& m) {
  m.def(
      "solve_iqp",
      [](const py::object& M_, const py::object& costs_, int64_t budget, const py::object& blocks_,
         const std::string& method, int64_t max_enumeration, int64_t max_states,
         int64_t fw_iterations, int64_t max_moves, int64_t restarts, uint64_t seed,
         double gap_tolerance, int n_threads, const py::object& progress) {
        Checked c = check_problem(M_, costs_);
        py::array_t<int64_t, py::array::c_style> blocks;
        hiquant::IqpProblem p;
        p.n_layers = c.L;
        p.n_options = c.K;
        p.M = c.M.data();
        p.costs = c.costs.data();
        p.budget = budget;
        if (!blocks_.is_none()) {
          blocks = require_array<int64_t>(blocks_, "blocks", 1);
          require_shape(blocks, "blocks", {c.L}, "pass one block id per layer");
          p.blocks = blocks.data();
        }
        hiquant::IqpOptions o;
        o.method = parse_method(method);
        o.max_enumeration = max_enumeration;
        o.max_states = max_states;
        o.fw_iterations = fw_iterations;
        o.max_moves = max_moves;
        o.restarts = restarts;
        o.seed = seed;
        o.gap_tolerance = gap_tolerance;
        o.n_threads = n_threads;
        const hiquant::RunControl rc = python_run_control(progress);
        hiquant::IqpResult r;
        {
          py::gil_scoped_release nogil;
          r = hiquant::solve_iqp(p, o, rc);
        }
        auto choice = new_array<int64_t>({c.L});
        std::copy(r.choice.begin(), r.choice.end(), choice.mutable_data());
        py::dict d;
        d["status"] = r.status;
        d["method"] = r.method;
        d["bound_method"] = r.bound;
        d["objective"] = r.objective;
        d["lower_bound"] = r.lower_bound;
        d["gap"] = r.gap;
        d["abs_gap"] = r.abs_gap;
        d["cost"] = r.cost;
        d["budget"] = r.budget;
        d["min_cost"] = r.min_cost;
        d["choice"] = choice;
        d["iterations"] = r.iterations;
        d["nodes"] = r.nodes;
        d["n_components"] = r.n_components;
        d["largest_component"] = r.largest_component;
        d["seconds"] = r.seconds;
        return d;
      },
      py::arg("M"), py::arg("costs"), py::arg("budget"), py::arg("blocks") = py::none(),
      py::arg("method") = "auto", py::arg("max_enumeration") = int64_t(1) << 21,
      py::arg("max_states") = 20000000, py::arg("fw_iterations") = 400,
      py::arg("max_moves") = 100000, py::arg("restarts") = 32, py::arg("seed") = 0,
      py::arg("gap_tolerance") = 1e-9, py::arg("n_threads") = 0,
      py::arg("progress") = py::none());

  m.def(
      "iqp_objective",
      [](const py::object& M_, const py::object& costs_, const py::object& choice_) {
        Checked c = check_problem(M_, costs_);
        auto choice = require_array<int64_t>(choice_, "choice", 1);
        require_shape(choice, "choice", {c.L}, "pass one option index per layer");
        return hiquant::iqp_objective(c.M.data(), c.L, c.K, choice.data());
      },
      py::arg("M"), py::arg("costs"), py::arg("choice"));

  m.def(
      "iqp_components",
      [](const py::object& M_, int64_t n_options) {
        auto M = require_array<double>(M_, "M", 2);
        if (n_options < 1 || M.shape(0) % n_options != 0 || M.shape(0) != M.shape(1))
          throw InvalidArgument("M must be square with a side divisible by n_options");
        const int64_t L = M.shape(0) / n_options;
        std::vector<int64_t> comp;
        {
          py::gil_scoped_release nogil;
          comp = hiquant::iqp_components(M.data(), L, n_options);
        }
        auto out = new_array<int64_t>({static_cast<py::ssize_t>(L)});
        std::copy(comp.begin(), comp.end(), out.mutable_data());
        return out;
      },
      py::arg("M"), py::arg("n_options"));
}

}  // namespace hiquant_py
