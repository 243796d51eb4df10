// Helpers shared by the binding initializers (one per concern, pyvinecopulib-style). Only files
// under cpp/bindings/ include pybind11; the core under cpp/src knows nothing of Python.
#pragma once
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <string>
#include <vector>

#include "hiquant/errors.hpp"
#include "hiquant/parallel.hpp"

namespace hiquant_py {
namespace py = pybind11;

// Binding checks throw the core's exception classes; the one translator in module.cpp maps them to
// hiquant.InvalidArgumentError (a ValueError) and hiquant.InvalidTypeError (a TypeError).
using hiquant::InvalidArgument;
using hiquant::InvalidType;

template <typename T>
const char* dtype_name();
template <> inline const char* dtype_name<float>() { return "float32"; }
template <> inline const char* dtype_name<double>() { return "float64"; }
template <> inline const char* dtype_name<uint8_t>() { return "uint8"; }
template <> inline const char* dtype_name<int64_t>() { return "int64"; }
template <> inline const char* dtype_name<int32_t>() { return "int32"; }

inline std::string shape_str(const py::array& a) {
  std::string s = "(";
  for (py::ssize_t i = 0; i < a.ndim(); ++i) {
    s += std::to_string(a.shape(i));
    if (a.ndim() == 1 || i + 1 < a.ndim()) s += a.ndim() == 1 ? "," : ", ";
  }
  return s + ")";
}

// Checks that `obj` is a NumPy array of exactly dtype T, C-contiguous, with `ndim` dimensions
// (ndim < 0: any), and returns it without copying. Throws hiquant::InvalidType (not an array, wrong
// dtype: hiquant.InvalidTypeError in Python) or hiquant::InvalidArgument (layout, rank, empty:
// hiquant.InvalidArgumentError) naming the argument and what to do.
template <typename T>
py::array_t<T, py::array::c_style> require_array(const py::handle& obj, const char* name, int ndim,
                                                 bool allow_empty = false) {
  if (!py::isinstance<py::array>(obj))
    throw InvalidType(std::string(name) + " must be a numpy.ndarray of " + dtype_name<T>() +
                      ", got " + std::string(py::str(py::type::of(obj).attr("__name__"))));
  py::array a = py::reinterpret_borrow<py::array>(obj);
  if (!a.dtype().is(py::dtype::of<T>()))
    throw InvalidType(std::string(name) + " must have dtype " + dtype_name<T>() + ", got " +
                      std::string(py::str(a.dtype())) + "; convert it with " + name +
                      ".astype(numpy." + dtype_name<T>() + ")");
  if (ndim >= 0 && a.ndim() != ndim)
    throw InvalidArgument(std::string(name) + " must be " + std::to_string(ndim) +
                          "-dimensional, got shape " + shape_str(a));
  if (!(a.flags() & py::array::c_style))
    throw InvalidArgument(std::string(name) +
                          " must be C-contiguous; pass numpy.ascontiguousarray(" + name + ")");
  if (!allow_empty && a.size() == 0)
    throw InvalidArgument(std::string(name) + " is empty (shape " + shape_str(a) +
                          "); pass a non-empty array");
  return py::reinterpret_borrow<py::array_t<T, py::array::c_style>>(a);
}

template <typename T>
void require_shape(const py::array_t<T, py::array::c_style>& a, const char* name,
                   const std::vector<py::ssize_t>& shape, const std::string& hint) {
  bool ok = a.ndim() == static_cast<py::ssize_t>(shape.size());
  for (size_t i = 0; ok && i < shape.size(); ++i) ok = a.shape(i) == shape[i];
  if (!ok) {
    std::string want = "(";
    for (size_t i = 0; i < shape.size(); ++i)
      want += std::to_string(shape[i]) + (i + 1 < shape.size() || shape.size() == 1 ? ", " : "");
    if (shape.size() == 1) want.pop_back();
    want += ")";
    throw InvalidArgument(std::string(name) + " has shape " + shape_str(a) + " but " + want +
                          " is required; " + hint);
  }
}

template <typename T>
py::array_t<T> new_array(const std::vector<py::ssize_t>& shape) {
  return py::array_t<T>(shape);
}

// A run control whose check polls Python's signal handlers (Ctrl-C) with the GIL re-acquired,
// and whose progress calls a Python callable(done, total) if one is given.
hiquant::RunControl python_run_control(py::object progress = py::none());

void init_quantizer(py::module_& m);
void init_stats(py::module_& m);
void init_allocation(py::module_& m);
void init_kernels(py::module_& m);
void init_packed_matmul(py::module_& m);

}  // namespace hiquant_py
