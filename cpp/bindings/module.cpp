// The extension module hiquant._core: exception translation, thread settings, and one
// initializer per concern (cpp/bindings/<concern>.cpp). Users import hiquant, never _core.
#include <Python.h>

#include "binding_util.hpp"

namespace hiquant_py {

hiquant::RunControl python_run_control(py::object progress) {
  hiquant::RunControl rc;
  rc.check = [] {
    py::gil_scoped_acquire gil;
    if (PyErr_CheckSignals() != 0) {
      PyErr_Clear();  // re-raised as KeyboardInterrupt by the translator below
      throw hiquant::Interrupted("interrupted by a signal (Ctrl-C)");
    }
  };
  if (!progress.is_none()) {
    // The callable is only ever used with the GIL held; keep a reference while the kernel runs.
    auto cb = std::make_shared<py::object>(progress);
    rc.progress = [cb](int64_t done, int64_t total) {
      py::gil_scoped_acquire gil;
      (*cb)(done, total);
    };
  }
  return rc;
}

}  // namespace hiquant_py

namespace py = pybind11;

PYBIND11_MODULE(_core, m) {
  m.doc() = "hiquant native core (internal: use the hiquant package)";

  // The one exception translator: every error a binding or the core raises on purpose reaches
  // Python as a class of python/hiquant/errors.py (InvalidArgument and InvalidType also thrown by
  // the binding checks in binding_util.hpp).
  py::register_exception_translator([](std::exception_ptr p) {
    if (!p) return;
    auto raise = [](const char* cls_name, const char* what) {
      py::object cls = py::module_::import("hiquant.errors").attr(cls_name);
      PyErr_SetString(cls.ptr(), what);
    };
    try {
      std::rethrow_exception(p);
    } catch (const hiquant::InfeasibleBudget& e) {
      py::object cls = py::module_::import("hiquant.errors").attr("InfeasibleBudgetError");
      py::object exc = cls(e.what(), e.min_feasible);
      PyErr_SetObject(cls.ptr(), exc.ptr());
    } catch (const hiquant::InvalidArgument& e) {
      raise("InvalidArgumentError", e.what());
    } catch (const hiquant::InvalidType& e) {
      raise("InvalidTypeError", e.what());
    } catch (const py::cast_error& e) {
      // A Python object of the wrong type met a cast in a binding body.
      raise("InvalidTypeError", e.what());
    } catch (const hiquant::NumericalError& e) {
      raise("NumericalError", e.what());
    } catch (const hiquant::Interrupted& e) {
      PyErr_SetString(PyExc_KeyboardInterrupt, e.what());
    } catch (const hiquant::Error& e) {
      raise("HiquantError", e.what());
    } catch (const std::bad_alloc&) {
      PyErr_SetString(PyExc_MemoryError, "hiquant: out of memory in a native kernel");
    }
  });

  m.def("openmp_enabled", &hiquant::openmp_enabled);
  m.def("get_num_threads", &hiquant::default_threads,
        "hiquant's default thread count for native kernels.");
  m.def("set_num_threads", [](int n) { hiquant::set_default_threads(n); }, py::arg("n"),
        "Set hiquant's default thread count (n <= 0: automatic). Does not touch the global "
        "OpenMP setting.");
  m.attr("build_flags") = HIQUANT_BUILD_FLAGS;

  hiquant_py::init_quantizer(m);
  hiquant_py::init_stats(m);
  hiquant_py::init_allocation(m);
  hiquant_py::init_kernels(m);
  hiquant_py::init_packed_matmul(m);
}
