#include "hiquant/quantizer.hpp"
#include "hiquant/simd.hpp"

#include "binding_util.hpp"

namespace hiquant_py {

namespace {

hiquant::QuantSpec make_spec(int bits, int64_t group_size) {
  if (bits < 2 || bits > 8)
    throw InvalidArgument("bits must be an integer in 2..8, got " + std::to_string(bits));
  if (group_size < -1)
    throw InvalidArgument("group_size must be a positive integer, or 0 / -1 for one group per "
                          "output row; got " + std::to_string(group_size));
  return {bits, group_size};
}

struct Params {
  py::array_t<float, py::array::c_style> scale;
  py::array_t<uint8_t, py::array::c_style> zero;
};

Params require_params(const py::handle& scale, const py::handle& zero, py::ssize_t rows,
                      py::ssize_t ng) {
  Params p{require_array<float>(scale, "scale", 2), require_array<uint8_t>(zero, "zero", 2)};
  const std::string hint = "pass the parameters computed for this weight shape and group_size";
  require_shape(p.scale, "scale", {rows, ng}, hint);
  require_shape(p.zero, "zero", {rows, ng}, hint);
  return p;
}

}  // namespace

void init_quantizer(py::module_& m) {
  // The elementwise kernels' 8-lane variants (hiquant/simd.hpp): same bits, chosen at run time.
  m.def("elementwise_kernel_name", [] { return std::string(hiquant::elementwise_kernel_name()); });
  m.def("elementwise_avx2_available", &hiquant::elementwise_avx2_available);
  m.def("set_elementwise_kernel", [](const std::string& k) {
    if (k == "auto")
      hiquant::set_elementwise_kernel(hiquant::ElementwiseKernel::Auto);
    else if (k == "portable")
      hiquant::set_elementwise_kernel(hiquant::ElementwiseKernel::Portable);
    else
      throw InvalidArgument("kernel must be 'auto' or 'portable', got '" + k + "'");
  }, py::arg("kernel"),
     "Process-wide choice of the elementwise kernels (tests and benchmarks): 'auto' uses AVX2 "
     "where the CPU has it, 'portable' the four-lane code. Results are identical.");

  m.def("n_groups", [](int64_t cols, int64_t group_size) {
    if (cols <= 0) throw InvalidArgument("cols must be positive");
    return hiquant::n_groups(cols, group_size);
  }, py::arg("cols"), py::arg("group_size"));

  m.def("minmax_params", [](const py::object& W_, int bits, int64_t group_size, int n_threads) {
    const auto spec = make_spec(bits, group_size);
    auto W = require_array<float>(W_, "W", 2);
    const auto rows = W.shape(0), cols = W.shape(1);
    const auto ng = hiquant::n_groups(cols, group_size);
    auto scale = new_array<float>({rows, ng});
    auto zero = new_array<uint8_t>({rows, ng});
    const float* w = W.data();
    float* s = scale.mutable_data();
    uint8_t* z = zero.mutable_data();
    {
      py::gil_scoped_release nogil;
      hiquant::minmax_params(w, rows, cols, spec, s, z, n_threads);
    }
    return py::make_tuple(scale, zero);
  }, py::arg("W"), py::arg("bits"), py::arg("group_size"), py::arg("n_threads") = 0);

  m.def("quantize", [](const py::object& W_, const py::object& scale_, const py::object& zero_,
                       int bits, int64_t group_size, int n_threads) {
    const auto spec = make_spec(bits, group_size);
    auto W = require_array<float>(W_, "W", 2);
    const auto rows = W.shape(0), cols = W.shape(1);
    auto p = require_params(scale_, zero_, rows, hiquant::n_groups(cols, group_size));
    auto codes = new_array<uint8_t>({rows, cols});
    const float* w = W.data();
    const float* s = p.scale.data();
    const uint8_t* z = p.zero.data();
    uint8_t* q = codes.mutable_data();
    {
      py::gil_scoped_release nogil;
      hiquant::quantize(w, rows, cols, spec, s, z, q, n_threads);
    }
    return codes;
  }, py::arg("W"), py::arg("scale"), py::arg("zero"), py::arg("bits"), py::arg("group_size"),
     py::arg("n_threads") = 0);

  m.def("dequantize", [](const py::object& codes_, const py::object& scale_,
                         const py::object& zero_, int bits, int64_t group_size, int n_threads) {
    const auto spec = make_spec(bits, group_size);
    auto codes = require_array<uint8_t>(codes_, "codes", 2);
    const auto rows = codes.shape(0), cols = codes.shape(1);
    auto p = require_params(scale_, zero_, rows, hiquant::n_groups(cols, group_size));
    auto out = new_array<float>({rows, cols});
    const uint8_t* q = codes.data();
    const float* s = p.scale.data();
    const uint8_t* z = p.zero.data();
    float* o = out.mutable_data();
    {
      py::gil_scoped_release nogil;
      hiquant::dequantize(q, rows, cols, spec, s, z, o, n_threads);
    }
    return out;
  }, py::arg("codes"), py::arg("scale"), py::arg("zero"), py::arg("bits"), py::arg("group_size"),
     py::arg("n_threads") = 0);

  m.def("fake_quantize", [](const py::object& W_, int bits, int64_t group_size, int n_threads,
                            const py::object& out_) {
    const auto spec = make_spec(bits, group_size);
    auto W = require_array<float>(W_, "W", 2);
    const auto rows = W.shape(0), cols = W.shape(1);
    const auto ng = hiquant::n_groups(cols, group_size);
    py::array_t<float, py::array::c_style> out;
    if (out_.is_none()) {
      out = new_array<float>({rows, cols});
    } else {
      // A caller-provided buffer saves the page faults of a fresh allocation in loops.
      out = require_array<float>(out_, "out", 2);
      require_shape(out, "out", {rows, cols}, "pass a float32 array of W's shape");
      if (!out.writeable()) throw InvalidArgument("out is read-only; pass a writeable array");
    }
    auto scale = new_array<float>({rows, ng});
    auto zero = new_array<uint8_t>({rows, ng});
    const float* w = W.data();
    float* o = out.mutable_data();
    float* s = scale.mutable_data();
    uint8_t* z = zero.mutable_data();
    {
      py::gil_scoped_release nogil;
      hiquant::fake_quantize(w, rows, cols, spec, o, s, z, n_threads);
    }
    return py::make_tuple(out, scale, zero);
  }, py::arg("W"), py::arg("bits"), py::arg("group_size"), py::arg("n_threads") = 0,
     py::arg("out") = py::none());

  m.def("packed_size", [](int64_t n, int bits) { return hiquant::packed_size(n, bits); },
        py::arg("n_codes"), py::arg("bits"));

  m.def("pack_codes", [](const py::object& codes_, int bits, int n_threads) {
    auto codes = require_array<uint8_t>(codes_, "codes", -1, /*allow_empty=*/true);
    const int64_t n = codes.size();
    auto out = new_array<uint8_t>({static_cast<py::ssize_t>(hiquant::packed_size(n, bits))});
    const uint8_t* q = codes.data();
    uint8_t* o = out.mutable_data();
    {
      py::gil_scoped_release nogil;
      hiquant::pack_codes(q, n, bits, o, n_threads);
    }
    return out;
  }, py::arg("codes"), py::arg("bits"), py::arg("n_threads") = 0);

  m.def("unpack_codes", [](const py::object& packed_, int bits, int64_t n, int n_threads) {
    if (n < 0) throw InvalidArgument("n_codes must be >= 0, got " + std::to_string(n));
    auto packed = require_array<uint8_t>(packed_, "packed", 1, /*allow_empty=*/true);
    const int64_t need = hiquant::packed_size(n, bits);
    if (packed.size() != need)
      throw InvalidArgument("packed has " + std::to_string(packed.size()) + " bytes but " +
                            std::to_string(n) + " codes of " + std::to_string(bits) +
                            " bits need exactly " + std::to_string(need) +
                            "; pass the n_codes and bits it was packed with");
    auto out = new_array<uint8_t>({static_cast<py::ssize_t>(n)});
    const uint8_t* p = packed.data();
    uint8_t* o = out.mutable_data();
    {
      py::gil_scoped_release nogil;
      hiquant::unpack_codes(p, n, bits, o, n_threads);
    }
    return out;
  }, py::arg("packed"), py::arg("bits"), py::arg("n_codes"), py::arg("n_threads") = 0);
}

}  // namespace hiquant_py
