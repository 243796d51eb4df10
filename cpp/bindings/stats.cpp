#include "hiquant/stats.hpp"

#include "binding_util.hpp"

namespace hiquant_py {

namespace {

template <typename T>
T* writable_data(py::array_t<T, py::array::c_style>& a, const char* name) {
  if (!a.writeable())
    throw InvalidArgument(std::string(name) + " is read-only; pass a writable array (it is "
                          "updated in place)");
  return a.mutable_data();
}

}  // namespace

void init_stats(py::module_& m) {
  m.def("gram_accumulate", [](const py::object& G_, const py::object& X_, int n_threads,
                              int64_t chunk_rows, const py::object& progress) {
    auto G = require_array<double>(G_, "G", 2);
    auto X = require_array<float>(X_, "X", 2, /*allow_empty=*/true);
    const auto n = X.shape(0), d = X.shape(1);
    if (d == 0) throw InvalidArgument("X has no columns (shape " + shape_str(X) + ")");
    require_shape(G, "G", {d, d}, "pass the (d_in, d_in) accumulator of this layer's inputs");
    if (chunk_rows < 1) throw InvalidArgument("chunk_rows must be >= 1");
    double* g = writable_data(G, "G");
    const float* x = X.data();
    auto rc = python_run_control(progress);
    {
      py::gil_scoped_release nogil;
      hiquant::gram_accumulate(g, x, n, d, n_threads, &rc, chunk_rows);
    }
  }, py::arg("G"), py::arg("X"), py::arg("n_threads") = 0,
     py::arg("chunk_rows") = hiquant::kGramChunkRows, py::arg("progress") = py::none(),
     "G += X.T @ X in place (G float64 (d, d), X float32 (n, d)).");

  m.def("fisher_accumulate", [](const py::object& F_, const py::object& g_, int n_threads) {
    auto F = require_array<float>(F_, "F", -1);
    auto g = require_array<float>(g_, "grad", -1);
    if (F.ndim() != g.ndim())
      throw InvalidArgument("grad has shape " + shape_str(g) + " but F has " + shape_str(F) +
                            "; pass the gradient of the same layer");
    std::vector<py::ssize_t> shape(F.shape(), F.shape() + F.ndim());
    require_shape(g, "grad", shape, "pass the gradient of the same layer");
    float* f = writable_data(F, "F");
    const float* gp = g.data();
    const int64_t n = F.size();
    {
      py::gil_scoped_release nogil;
      hiquant::fisher_accumulate(f, gp, n, n_threads);
    }
  }, py::arg("F"), py::arg("grad"), py::arg("n_threads") = 0,
     "F += grad * grad in place (float32, same shape).");

  m.def("gram_kernel_name", &hiquant::gram_kernel_name);
}

}  // namespace hiquant_py
