// Binding of the packed-format matrix product (cpp/src/packed_matmul.cpp): a PackedMatrix holds a
// layer's packed NumPy buffers (kept alive, never copied) and multiplies activations by it.
// Public wrapper: python/hiquant/packed_matmul.py.
#include <memory>

#include "binding_util.hpp"
#include "hiquant/packed_matmul.hpp"
#include "hiquant/quantizer.hpp"

namespace hiquant_py {

namespace {

struct PackedMatrixHandle {
  int64_t d_out = 0, d_in = 0;
  std::vector<hiquant::PackedPart> parts;
  std::vector<py::object> keep;  // the buffers the parts point into
  hiquant::PackedPlanes planes;  // the table kernel's copy of some parts
};

hiquant::PackedKernel parse_kernel(const std::string& k) {
  if (k == "auto") return hiquant::PackedKernel::Auto;
  if (k == "portable") return hiquant::PackedKernel::Portable;
  if (k == "avx2") return hiquant::PackedKernel::Avx2;
  if (k == "lut") return hiquant::PackedKernel::Lut;
  throw InvalidArgument("kernel must be 'auto', 'portable', 'avx2' or 'lut', got '" + k + "'");
}

// A float16 array (any shape, C-contiguous) of exactly n elements, as raw bits.
const uint16_t* require_f16(const py::handle& obj, const std::string& name, int64_t n,
                            std::vector<py::object>& keep) {
  if (!py::isinstance<py::array>(obj))
    throw InvalidType(name + " must be a numpy.ndarray of float16");
  py::array a = py::reinterpret_borrow<py::array>(obj);
  if (!a.dtype().equal(py::dtype("float16")))
    throw InvalidType(name + " must have dtype float16, got " + std::string(py::str(a.dtype())));
  if (!(a.flags() & py::array::c_style))
    throw InvalidArgument(name + " must be C-contiguous; pass numpy.ascontiguousarray(...)");
  if (a.size() != n)
    throw InvalidArgument(name + " has " + std::to_string(a.size()) + " elements but " +
                          std::to_string(n) + " are required");
  keep.push_back(a);
  return static_cast<const uint16_t*>(a.data());
}

const uint8_t* require_u8(const py::handle& obj, const std::string& name, int64_t n,
                          std::vector<py::object>& keep) {
  auto a = require_array<uint8_t>(obj, name.c_str(), -1, /*allow_empty=*/true);
  if (a.size() != n)
    throw InvalidArgument(name + " has " + std::to_string(a.size()) + " bytes but " +
                          std::to_string(n) + " are required; pass the buffer packed for this "
                          "part's shape and widths");
  keep.push_back(a);
  return a.data();
}

py::object get(const py::dict& d, const char* key) {
  return d.contains(key) ? py::reinterpret_borrow<py::object>(d[key]) : py::none();
}

std::unique_ptr<PackedMatrixHandle> make_packed(int64_t d_out, int64_t d_in,
                                                const py::list& parts, int n_threads,
                                                const std::string& tables) {
  hiquant::PlaneTables plane_tables;
  if (tables == "float32")
    plane_tables = hiquant::PlaneTables::Float32;
  else if (tables == "int8")
    plane_tables = hiquant::PlaneTables::Int8;
  else
    throw InvalidArgument("tables must be 'float32' or 'int8', got '" + tables + "'");
  if (d_out < 1 || d_in < 1)
    throw InvalidArgument("d_out and d_in must be >= 1, got (" + std::to_string(d_out) + ", " +
                          std::to_string(d_in) + ")");
  auto h = std::make_unique<PackedMatrixHandle>();
  h->d_out = d_out;
  h->d_in = d_in;
  for (size_t i = 0; i < parts.size(); ++i) {
    if (!py::isinstance<py::dict>(parts[i]))
      throw InvalidType("parts[" + std::to_string(i) + "] must be a dict");
    py::dict d = py::reinterpret_borrow<py::dict>(parts[i]);
    const std::string where = "parts[" + std::to_string(i) + "]";
    hiquant::PackedPart p;
    p.bits = get(d, "bits").cast<int>();
    p.n_cols = get(d, "n_cols").cast<int64_t>();
    if (p.n_cols < 0 || p.n_cols > d_in)
      throw InvalidArgument(where + " has n_cols " + std::to_string(p.n_cols) + "; expected 0.." +
                            std::to_string(d_in));
    if (p.bits != 16 && p.bits != 2 && p.bits != 3 && p.bits != 4 && p.bits != 6 && p.bits != 8)
      throw InvalidArgument(where + " has bits " + std::to_string(p.bits) +
                            "; expected 2, 3, 4, 6, 8 or 16");
    if (p.n_cols == 0) {
      h->parts.push_back(p);
      continue;
    }
    py::object cols = get(d, "cols");
    if (!cols.is_none()) {
      auto c = require_array<int64_t>(cols, (where + ".cols").c_str(), 1);
      require_shape(c, (where + ".cols").c_str(), {py::ssize_t(p.n_cols)},
                    "pass one input column per part column");
      h->keep.push_back(c);
      p.cols = c.data();
    }
    if (p.bits == 16) {
      p.fp16 = require_f16(get(d, "weight"), where + ".weight", d_out * p.n_cols, h->keep);
      h->parts.push_back(p);
      continue;
    }
    p.group_size = get(d, "group_size").cast<int64_t>();
    if (p.group_size < -1)
      throw InvalidArgument(where + " has group_size " + std::to_string(p.group_size));
    const int64_t ng = hiquant::n_groups(p.n_cols, p.group_size);
    p.qweight = require_u8(get(d, "qweight"), where + ".qweight",
                           hiquant::packed_size(d_out * p.n_cols, p.bits), h->keep);
    p.qzeros = require_u8(get(d, "qzeros"), where + ".qzeros",
                          hiquant::packed_size(d_out * ng, p.bits), h->keep);
    p.scale_bits = get(d, "scale_bits").cast<int>();
    if (p.scale_bits == 16) {
      p.scales_f16 = require_f16(get(d, "scales"), where + ".scales", d_out * ng, h->keep);
    } else if (p.scale_bits == 8 || p.scale_bits == 6) {
      p.scale_codes = require_u8(get(d, "scales"), where + ".scales",
                                 p.scale_bits == 8 ? d_out * ng : hiquant::packed_size(d_out * ng, 6),
                                 h->keep);
      p.super_rows = get(d, "super_rows").cast<int64_t>();
      if (p.super_rows < 1)
        throw InvalidArgument(where + " has super_rows " + std::to_string(p.super_rows) +
                              "; expected >= 1");
      p.scales_super = require_f16(get(d, "scales_super"), where + ".scales_super",
                                   (d_out + p.super_rows - 1) / p.super_rows, h->keep);
    } else {
      throw InvalidArgument(where + " has scale_bits " + std::to_string(p.scale_bits) +
                            "; expected 16, 8 or 6");
    }
    h->parts.push_back(p);
  }
  hiquant::validate_packed_parts(d_out, d_in, h->parts);
  {
    py::gil_scoped_release nogil;
    h->planes = hiquant::make_packed_planes(d_out, d_in, h->parts, n_threads, plane_tables);
  }
  return h;
}

}  // namespace

void init_packed_matmul(py::module_& m) {
  py::class_<PackedMatrixHandle>(m, "PackedMatrix")
      .def(py::init(&make_packed), py::arg("d_out"), py::arg("d_in"), py::arg("parts"),
           py::arg("n_threads") = 0, py::arg("tables") = "float32")
      .def_property_readonly("tables", [](const PackedMatrixHandle& h) {
        return std::string(h.planes.tables == hiquant::PlaneTables::Int8 ? "int8" : "float32");
      })
      .def_property_readonly("d_out", [](const PackedMatrixHandle& h) { return h.d_out; })
      .def_property_readonly("d_in", [](const PackedMatrixHandle& h) { return h.d_in; })
      .def_property_readonly("nbytes", [](const PackedMatrixHandle& h) {
        return hiquant::packed_bytes(h.d_out, h.parts);
      })
      .def_property_readonly("planes_nbytes", [](const PackedMatrixHandle& h) {
        return h.planes.nbytes();
      })
      .def_property_readonly("decode_nbytes", [](const PackedMatrixHandle& h) {
        return hiquant::packed_decode_bytes(h.d_out, h.parts, &h.planes);
      })
      .def("matmul", [](const PackedMatrixHandle& h, const py::object& x_, int n_threads,
                        const std::string& kernel) {
        const auto k = parse_kernel(kernel);
        auto x = require_array<float>(x_, "x", -1, /*allow_empty=*/true);
        if (x.ndim() != 1 && x.ndim() != 2)
          throw InvalidArgument("x must be (d_in,) or (n_tokens, d_in), got shape " + shape_str(x));
        const py::ssize_t cols = x.shape(x.ndim() - 1);
        if (cols != h.d_in)
          throw InvalidArgument("x has shape " + shape_str(x) + " but the layer takes d_in = " +
                                std::to_string(h.d_in) + " inputs");
        const int64_t n_tok = x.ndim() == 1 ? 1 : x.shape(0);
        py::array_t<float> y = x.ndim() == 1 ? new_array<float>({py::ssize_t(h.d_out)})
                                             : new_array<float>({py::ssize_t(n_tok),
                                                                 py::ssize_t(h.d_out)});
        const float* xp = x.data();
        float* yp = y.mutable_data();
        {
          py::gil_scoped_release nogil;
          hiquant::packed_matmul(h.d_out, h.d_in, h.parts, xp, n_tok, yp, n_threads, k,
                                 &h.planes);
        }
        return y;
      }, py::arg("x"), py::arg("n_threads") = 0, py::arg("kernel") = "auto");

  m.def("packed_kernel_name", [](const std::string& kernel) {
    return std::string(hiquant::packed_kernel_name(parse_kernel(kernel)));
  }, py::arg("kernel") = "auto");
}

}  // namespace hiquant_py
