// Bindings of the learned-quantization kernels: LWC and AdaRound parts, Adam state, the
// layer-wise Gram objective and its training loop, GPTQ, and the packed GEMM (for tests and
// benchmarks). Public wrappers live in python/hiquant/learners.py.
#include <atomic>
#include <memory>

#include "binding_util.hpp"
#include "hiquant/adaround.hpp"
#include "hiquant/gemm.hpp"
#include "hiquant/gptq.hpp"
#include "hiquant/layerwise.hpp"
#include "hiquant/lwc.hpp"
#include "hiquant/optim.hpp"
#include "hiquant/quant_math.hpp"
#include "hiquant/quantizer.hpp"

namespace hiquant_py {

namespace {

// Objects hold state that kernels mutate with the GIL released: a second thread using the same
// object at the same time gets a clear error instead of a data race.
class BusyGuard {
 public:
  BusyGuard(std::atomic<bool>& flag, const char* what) : flag_(flag) {
    if (flag_.exchange(true))
      throw InvalidArgument(std::string(what) +
                            " is in use by another thread; use one object per thread");
  }
  ~BusyGuard() { flag_.store(false); }
  BusyGuard(const BusyGuard&) = delete;
  BusyGuard& operator=(const BusyGuard&) = delete;

 private:
  std::atomic<bool>& flag_;
};

struct LwcHandle {
  std::unique_ptr<hiquant::LwcPart> part;
  std::atomic<bool> busy{false};
};
struct AdaHandle {
  std::unique_ptr<hiquant::AdaRoundPart> part;
  std::atomic<bool> busy{false};
};
struct AdamHandle {
  hiquant::Adam adam;
  std::atomic<bool> busy{false};
};
struct ObjectiveHandle {
  py::array_t<double, py::array::c_style> H;  // kept alive: the objective borrows it
  std::unique_ptr<hiquant::LayerwiseObjective> obj;
  std::atomic<bool> busy{false};
};
struct QuadHandle {
  py::object obj, part;  // kept alive: the evaluator borrows both
  ObjectiveHandle* oh;
  LwcHandle* lh;
  std::unique_ptr<hiquant::LwcQuadratic> q;
  std::atomic<bool> busy{false};
};

void check_bits(int bits, const char* name = "bits") {
  if (bits < 2 || bits > 8)
    throw InvalidArgument(std::string(name) + " must be an integer in 2..8, got " +
                          std::to_string(bits));
}

void check_group(int64_t group_size) {
  if (group_size < -1)
    throw InvalidArgument("group_size must be a positive integer, or 0 / -1 for one group per "
                          "output row; got " + std::to_string(group_size));
}

// A float32 (rows x cols) output: a fresh array, or a caller's buffer checked for shape.
py::array_t<float, py::array::c_style> out_or_new(const py::object& out_, py::ssize_t rows,
                                                  py::ssize_t cols) {
  if (out_.is_none()) return new_array<float>({rows, cols});
  auto out = require_array<float>(out_, "out", 2);
  require_shape(out, "out", {rows, cols}, "pass a float32 array of the part's shape");
  if (!out.writeable()) throw InvalidArgument("out is read-only; pass a writeable array");
  return out;
}

// dL/dW_q for a part: float32 (rows x cols), or a wider matrix whose columns [col0, col0+cols)
// are the part's (so a whole layer's gradient can be passed without a copy).
struct GradView {
  py::array_t<float, py::array::c_style> arr;
  const float* ptr;
  int64_t ld;
};
GradView require_grad(const py::object& g_, int64_t rows, int64_t cols, int64_t col0) {
  auto g = require_array<float>(g_, "dwq", 2);
  if (g.shape(0) != rows || col0 < 0 || g.shape(1) < col0 + cols)
    throw InvalidArgument("dwq has shape " + shape_str(g) + " but the part needs (" +
                          std::to_string(rows) + ", " + std::to_string(cols) + ")" +
                          (col0 ? " starting at column " + std::to_string(col0) : std::string()) +
                          "; pass dL/dW_q of the part's weights");
  GradView v{g, g.data() + col0, g.shape(1)};
  const int64_t bad = [&] {
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t b = hiquant::first_nonfinite(v.ptr + r * v.ld, cols);
      if (b >= 0) return r * cols + b;
    }
    return int64_t(-1);
  }();
  if (bad >= 0)
    throw hiquant::NumericalError("dwq is not finite at row " + std::to_string(bad / cols) +
                                  ", column " + std::to_string(bad % cols));
  return v;
}

py::array_t<float> params_copy(const float* p, std::vector<py::ssize_t> shape) {
  auto a = new_array<float>(shape);
  std::copy(p, p + a.size(), a.mutable_data());
  return a;
}

void set_params_from(const py::object& v_, float* dst, const std::vector<py::ssize_t>& shape,
                     const char* what) {
  auto v = require_array<float>(v_, "values", static_cast<int>(shape.size()));
  require_shape(v, "values", shape, std::string("pass an array shaped like ") + what);
  const int64_t bad = hiquant::first_nonfinite(v.data(), v.size());
  if (bad >= 0) throw hiquant::NumericalError(std::string(what) + " values must be finite");
  std::copy(v.data(), v.data() + v.size(), dst);
}

hiquant::AdamConfig adam_config(double lr, double beta1, double beta2, double eps,
                                double weight_decay, bool decoupled) {
  hiquant::AdamConfig c;
  c.lr = lr;
  c.beta1 = beta1;
  c.beta2 = beta2;
  c.eps = eps;
  c.weight_decay = weight_decay;
  c.decoupled = decoupled;
  hiquant::validate_adam(c);
  return c;
}

py::dict fit_log_dict(const hiquant::FitLog& log) {
  py::dict d;
  auto vec = [](const std::vector<double>& v) {
    auto a = new_array<double>({static_cast<py::ssize_t>(v.size())});
    std::copy(v.begin(), v.end(), a.mutable_data());
    return a;
  };
  d["loss"] = vec(log.loss);
  d["reg"] = vec(log.reg);
  d["b"] = vec(log.b);
  auto ch = new_array<int64_t>({static_cast<py::ssize_t>(log.changes.size())});
  std::copy(log.changes.begin(), log.changes.end(), ch.mutable_data());
  d["changes"] = ch;
  d["incremental"] = log.incremental;
  d["seconds"] = log.seconds;
  return d;
}

}  // namespace

void init_kernels(py::module_& m) {
  // ---------------------------------------------------------------------------------- GEMM
  m.def("gemm_avx2_available", &hiquant::gemm_avx2_available);
  m.def("gemm_kernel_name", [](int kernel) {
    return std::string(hiquant::gemm_kernel_name(static_cast<hiquant::GemmKernel>(kernel)));
  }, py::arg("kernel") = 0);
  m.def("gemm", [](const py::object& A_, const py::object& B_, int kernel, int n_threads) {
    auto A = require_array<float>(A_, "A", 2);
    auto B = require_array<float>(B_, "B", 2);
    if (A.shape(1) != B.shape(0))
      throw InvalidArgument("A has shape " + shape_str(A) + " and B " + shape_str(B) +
                            "; A's columns must equal B's rows");
    if (kernel < 0 || kernel > 2) throw InvalidArgument("kernel must be 0 (auto), 1 or 2");
    const auto M = A.shape(0), K = A.shape(1), N = B.shape(1);
    auto C = new_array<float>({M, N});
    const float* a = A.data();
    const float* b = B.data();
    float* c = C.mutable_data();
    {
      py::gil_scoped_release nogil;
      hiquant::gemm(a, K, b, N, c, N, M, N, K, false, n_threads,
                    static_cast<hiquant::GemmKernel>(kernel));
    }
    return C;
  }, py::arg("A"), py::arg("B"), py::arg("kernel") = 0, py::arg("n_threads") = 0,
     "C = A @ B in float32 with the packed kernel (0 auto, 1 portable, 2 AVX2+FMA).");

  // ---------------------------------------------------------------------------------- Adam
  py::class_<AdamHandle>(m, "Adam")
      .def(py::init([](int64_t n, double lr, double beta1, double beta2, double eps,
                       double weight_decay, bool decoupled) {
             if (n < 0) throw InvalidArgument("n_params must be >= 0");
             auto h = std::make_unique<AdamHandle>();
             h->adam = hiquant::Adam(n, adam_config(lr, beta1, beta2, eps, weight_decay,
                                                    decoupled));
             return h;
           }),
           py::arg("n_params"), py::arg("lr"), py::arg("beta1") = 0.9, py::arg("beta2") = 0.999,
           py::arg("eps") = 1e-8, py::arg("weight_decay") = 0.0, py::arg("decoupled") = true)
      .def_property_readonly("n_params", [](const AdamHandle& h) { return h.adam.size(); })
      .def_property_readonly("steps", [](const AdamHandle& h) { return h.adam.steps(); })
      .def_property("lr", [](const AdamHandle& h) { return h.adam.config().lr; },
                    [](AdamHandle& h, double lr) {
                      BusyGuard g(h.busy, "this Adam state");
                      auto c = h.adam.config();
                      c.lr = lr;
                      hiquant::validate_adam(c);
                      h.adam.config() = c;
                    })
      .def("reset", [](AdamHandle& h) {
        BusyGuard g(h.busy, "this Adam state");
        h.adam.reset();
      })
      .def("state", [](const AdamHandle& h) {
        return py::make_tuple(params_copy(h.adam.exp_avg().data(), {h.adam.size()}),
                              params_copy(h.adam.exp_avg_sq().data(), {h.adam.size()}));
      });

  // ---------------------------------------------------------------------------------- LWC
  py::class_<LwcHandle>(m, "LwcPart")
      .def(py::init([](const py::object& W_, int bits, int64_t group_size, double init,
                       int n_threads) {
             check_bits(bits);
             check_group(group_size);
             auto W = require_array<float>(W_, "W", 2);
             hiquant::LwcSpec spec{bits, group_size, init};
             auto h = std::make_unique<LwcHandle>();
             const float* w = W.data();
             const int64_t rows = W.shape(0), cols = W.shape(1);
             {
               py::gil_scoped_release nogil;
               h->part = std::make_unique<hiquant::LwcPart>(w, cols, rows, cols, spec, n_threads);
             }
             return h;
           }),
           py::arg("W"), py::arg("bits"), py::arg("group_size"), py::arg("init") = 4.0,
           py::arg("n_threads") = 0)
      .def_property_readonly("rows", [](const LwcHandle& h) { return h.part->rows(); })
      .def_property_readonly("cols", [](const LwcHandle& h) { return h.part->cols(); })
      .def_property_readonly("n_groups", [](const LwcHandle& h) { return h.part->n_groups(); })
      .def_property_readonly("n_params", [](const LwcHandle& h) { return h.part->n_params(); })
      .def_property_readonly("bits", [](const LwcHandle& h) { return h.part->bits(); })
      .def_property_readonly("group_size", [](const LwcHandle& h) { return h.part->group_size(); })
      .def("get_params", [](const LwcHandle& h) {
        return params_copy(h.part->params(), {2, h.part->rows(), h.part->n_groups()});
      }, "A copy of (gamma, beta) as one float32 array of shape (2, rows, n_groups).")
      .def("set_params", [](LwcHandle& h, const py::object& v) {
        BusyGuard g(h.busy, "this LWC part");
        set_params_from(v, h.part->params(), {2, h.part->rows(), h.part->n_groups()},
                        "(gamma, beta)");
      }, py::arg("values"))
      .def("forward", [](LwcHandle& h, const py::object& out_, int n_threads) {
        BusyGuard g(h.busy, "this LWC part");
        auto out = out_or_new(out_, h.part->rows(), h.part->cols());
        float* o = out.mutable_data();
        {
          py::gil_scoped_release nogil;
          h.part->forward(o, h.part->cols(), n_threads);
        }
        return out;
      }, py::arg("out") = py::none(), py::arg("n_threads") = 0)
      .def("backward", [](LwcHandle& h, const py::object& dwq_, int64_t col0, int n_threads) {
        BusyGuard g(h.busy, "this LWC part");
        auto d = require_grad(dwq_, h.part->rows(), h.part->cols(), col0);
        auto grad = new_array<float>({2, h.part->rows(), h.part->n_groups()});
        float* gp = grad.mutable_data();
        {
          py::gil_scoped_release nogil;
          h.part->backward(d.ptr, d.ld, gp, n_threads);
        }
        return grad;
      }, py::arg("dwq"), py::arg("col0") = 0, py::arg("n_threads") = 0)
      .def("scales", [](LwcHandle& h, int n_threads) {
        BusyGuard g(h.busy, "this LWC part");
        auto s = new_array<float>({h.part->rows(), h.part->n_groups()});
        auto z = new_array<uint8_t>({h.part->rows(), h.part->n_groups()});
        float* sp = s.mutable_data();
        uint8_t* zp = z.mutable_data();
        {
          py::gil_scoped_release nogil;
          h.part->scales(sp, zp, n_threads);
        }
        return py::make_tuple(s, z);
      }, py::arg("n_threads") = 0)
      .def("export", [](LwcHandle& h, int n_threads) {
        BusyGuard g(h.busy, "this LWC part");
        const auto rows = h.part->rows(), cols = h.part->cols(), ng = h.part->n_groups();
        auto codes = new_array<uint8_t>({rows, cols});
        auto s = new_array<float>({rows, ng});
        auto z = new_array<uint8_t>({rows, ng});
        auto wq = new_array<float>({rows, cols});
        uint8_t* cp = codes.mutable_data();
        float* sp = s.mutable_data();
        uint8_t* zp = z.mutable_data();
        float* wp = wq.mutable_data();
        {
          py::gil_scoped_release nogil;
          h.part->export_codes(cp, sp, zp, wp, cols, n_threads);
        }
        return py::make_tuple(codes, s, z, wq);
      }, py::arg("n_threads") = 0);

  // ---------------------------------------------------------------------------------- AdaRound
  py::class_<AdaHandle>(m, "AdaRoundPart")
      .def(py::init([](const py::object& W_, int bits, int64_t group_size, int n_threads,
                       const py::object& scale_) {
             check_bits(bits);
             check_group(group_size);
             auto W = require_array<float>(W_, "W", 2);
             hiquant::AdaRoundSpec spec{bits, group_size};
             auto h = std::make_unique<AdaHandle>();
             const float* w = W.data();
             const int64_t rows = W.shape(0), cols = W.shape(1);
             py::array_t<float, py::array::c_style> scale;
             const float* sp = nullptr;
             if (!scale_.is_none()) {
               scale = require_array<float>(scale_, "scale", 2);
               const int64_t ng = hiquant::n_groups(cols, group_size);
               if (scale.shape(0) != rows || scale.shape(1) != ng)
                 throw InvalidArgument("scale must have shape (" + std::to_string(rows) + ", " +
                                       std::to_string(ng) + "): one per row and group");
               sp = scale.data();
               for (int64_t i = 0; i < rows * ng; ++i)
                 if (!(std::isfinite(sp[i]) && sp[i] > 0.0f))
                   throw hiquant::NumericalError("scale must be finite and positive; entry " +
                                                 std::to_string(i) + " is not");
             }
             {
               py::gil_scoped_release nogil;
               h->part = std::make_unique<hiquant::AdaRoundPart>(w, cols, rows, cols, spec,
                                                                 n_threads, sp);
             }
             return h;
           }),
           py::arg("W"), py::arg("bits"), py::arg("group_size"), py::arg("n_threads") = 0,
           py::arg("scale") = py::none())
      .def_property_readonly("rows", [](const AdaHandle& h) { return h.part->rows(); })
      .def_property_readonly("cols", [](const AdaHandle& h) { return h.part->cols(); })
      .def_property_readonly("n_groups", [](const AdaHandle& h) { return h.part->n_groups(); })
      .def_property_readonly("n_params", [](const AdaHandle& h) { return h.part->n_params(); })
      .def_property_readonly("bits", [](const AdaHandle& h) { return h.part->bits(); })
      .def_property_readonly("group_size", [](const AdaHandle& h) { return h.part->group_size(); })
      .def("get_params", [](const AdaHandle& h) {
        return params_copy(h.part->params(), {h.part->rows(), h.part->cols()});
      }, "A copy of V, float32 (rows, cols).")
      .def("set_params", [](AdaHandle& h, const py::object& v) {
        BusyGuard g(h.busy, "this AdaRound part");
        set_params_from(v, h.part->params(), {h.part->rows(), h.part->cols()}, "V");
      }, py::arg("values"))
      .def("forward", [](AdaHandle& h, bool hard, const py::object& out_, int n_threads) {
        BusyGuard g(h.busy, "this AdaRound part");
        auto out = out_or_new(out_, h.part->rows(), h.part->cols());
        float* o = out.mutable_data();
        {
          py::gil_scoped_release nogil;
          h.part->forward(o, h.part->cols(), hard, n_threads);
        }
        return out;
      }, py::arg("hard") = false, py::arg("out") = py::none(), py::arg("n_threads") = 0)
      .def("backward", [](AdaHandle& h, const py::object& dwq_, double lam, double b,
                          int64_t col0, int n_threads) {
        BusyGuard g(h.busy, "this AdaRound part");
        auto d = require_grad(dwq_, h.part->rows(), h.part->cols(), col0);
        auto grad = new_array<float>({h.part->rows(), h.part->cols()});
        float* gp = grad.mutable_data();
        double reg;
        {
          py::gil_scoped_release nogil;
          reg = h.part->backward(d.ptr, d.ld, lam, b, gp, n_threads);
        }
        return py::make_tuple(grad, reg);
      }, py::arg("dwq"), py::arg("lam") = 0.0, py::arg("b") = 20.0, py::arg("col0") = 0,
         py::arg("n_threads") = 0)
      .def("reg_loss", [](AdaHandle& h, double lam, double b, int n_threads) {
        BusyGuard g(h.busy, "this AdaRound part");
        py::gil_scoped_release nogil;
        return h.part->reg_loss(lam, b, n_threads);
      }, py::arg("lam"), py::arg("b"), py::arg("n_threads") = 0)
      .def("soft_fraction", [](AdaHandle& h, int n_threads) {
        BusyGuard g(h.busy, "this AdaRound part");
        py::gil_scoped_release nogil;
        return h.part->soft_fraction(n_threads);
      }, py::arg("n_threads") = 0)
      .def("export", [](AdaHandle& h, int n_threads) {
        BusyGuard g(h.busy, "this AdaRound part");
        const auto rows = h.part->rows(), cols = h.part->cols(), ng = h.part->n_groups();
        auto codes = new_array<uint8_t>({rows, cols});
        auto s = new_array<float>({rows, ng});
        auto z = new_array<uint8_t>({rows, ng});
        auto wq = new_array<float>({rows, cols});
        uint8_t* cp = codes.mutable_data();
        float* sp = s.mutable_data();
        uint8_t* zp = z.mutable_data();
        float* wp = wq.mutable_data();
        {
          py::gil_scoped_release nogil;
          h.part->export_codes(cp, sp, zp, wp, cols, n_threads);
        }
        return py::make_tuple(codes, s, z, wq);
      }, py::arg("n_threads") = 0);

  // Adam steps on a part's parameters (the optimizer state is separate from the part).
  m.def("adam_step", [](AdamHandle& a, const py::object& part, const py::object& grad_,
                        int n_threads) {
    BusyGuard ga(a.busy, "this Adam state");
    auto grad = require_array<float>(grad_, "grad", -1);
    float* p = nullptr;
    int64_t n = 0;
    std::unique_ptr<BusyGuard> gp;
    if (py::isinstance<LwcHandle>(part)) {
      auto& h = part.cast<LwcHandle&>();
      gp = std::make_unique<BusyGuard>(h.busy, "this LWC part");
      p = h.part->params();
      n = h.part->n_params();
    } else if (py::isinstance<AdaHandle>(part)) {
      auto& h = part.cast<AdaHandle&>();
      gp = std::make_unique<BusyGuard>(h.busy, "this AdaRound part");
      p = h.part->params();
      n = h.part->n_params();
    } else {
      throw InvalidType("part must be an LwcPart or an AdaRoundPart");
    }
    if (grad.size() != n || a.adam.size() != n)
      throw InvalidArgument("grad has " + std::to_string(grad.size()) + " values and the Adam "
                            "state " + std::to_string(a.adam.size()) + " but the part has " +
                            std::to_string(n) + " parameters; pass the part's own gradient");
    if (hiquant::first_nonfinite(grad.data(), n) >= 0)
      throw hiquant::NumericalError("grad is not finite; check the loss and the learning rate");
    const float* g = grad.data();
    {
      py::gil_scoped_release nogil;
      a.adam.step(p, g, n_threads);
    }
  }, py::arg("adam"), py::arg("part"), py::arg("grad"), py::arg("n_threads") = 0);

  // ---------------------------------------------------------------------------- objective
  py::class_<ObjectiveHandle>(m, "LayerwiseObjective")
      .def(py::init([](const py::object& W_, const py::object& H_, double n_tokens,
                       int n_threads) {
             auto W = require_array<float>(W_, "W", 2);
             auto H = require_array<double>(H_, "H", 2);
             const auto d_out = W.shape(0), d_in = W.shape(1);
             require_shape(H, "H", {d_in, d_in},
                           "pass the Gram matrix of this layer's inputs (d_in x d_in)");
             auto h = std::make_unique<ObjectiveHandle>();
             h->H = H;
             const float* w = W.data();
             const double* hp = H.data();
             {
               py::gil_scoped_release nogil;
               h->obj = std::make_unique<hiquant::LayerwiseObjective>(w, d_out, d_in, hp,
                                                                      n_tokens, n_threads);
             }
             return h;
           }),
           py::arg("W"), py::arg("H"), py::arg("n_tokens"), py::arg("n_threads") = 0)
      .def_property_readonly("d_out", [](const ObjectiveHandle& h) { return h.obj->d_out(); })
      .def_property_readonly("d_in", [](const ObjectiveHandle& h) { return h.obj->d_in(); })
      .def_property_readonly("active", [](const ObjectiveHandle& h) {
        return py::make_tuple(h.obj->a0(), h.obj->a1());
      })
      .def_property_readonly("step_flops",
                             [](const ObjectiveHandle& h) { return h.obj->step_flops(); })
      .def("get_wq", [](const ObjectiveHandle& h) {
        return params_copy(h.obj->wq(), {h.obj->d_out(), h.obj->d_in()});
      })
      .def("set_columns", [](ObjectiveHandle& h, int64_t col0, const py::object& v_) {
        BusyGuard g(h.busy, "this objective");
        auto v = require_array<float>(v_, "values", 2);
        const int64_t rows = h.obj->d_out(), d_in = h.obj->d_in();
        if (v.shape(0) != rows || col0 < 0 || col0 + v.shape(1) > d_in)
          throw InvalidArgument("values of shape " + shape_str(v) + " at column " +
                                std::to_string(col0) + " do not fit the layer (" +
                                std::to_string(rows) + ", " + std::to_string(d_in) + ")");
        if (hiquant::first_nonfinite(v.data(), v.size()) >= 0)
          throw hiquant::NumericalError("values must be finite");
        const int64_t m = v.shape(1);
        for (int64_t r = 0; r < rows; ++r)
          std::copy(v.data() + r * m, v.data() + (r + 1) * m, h.obj->wq() + r * d_in + col0);
      }, py::arg("col0"), py::arg("values"),
         "Write W_q[:, col0:col0+m] (frozen columns, or a part's initial values).")
      .def("set_active", [](ObjectiveHandle& h, int64_t a0, int64_t a1, int n_threads) {
        BusyGuard g(h.busy, "this objective");
        py::gil_scoped_release nogil;
        h.obj->set_active(a0, a1, n_threads);
      }, py::arg("a0"), py::arg("a1"), py::arg("n_threads") = 0)
      .def("evaluate", [](ObjectiveHandle& h, int n_threads) {
        BusyGuard g(h.busy, "this objective");
        double loss;
        {
          py::gil_scoped_release nogil;
          loss = h.obj->evaluate(n_threads);
        }
        const int64_t na = h.obj->a1() - h.obj->a0();
        return py::make_tuple(loss, params_copy(h.obj->grad(), {h.obj->d_out(), na}));
      }, py::arg("n_threads") = 0,
         "(loss, dL/dW_q of the active columns) at the current W_q.")
      .def("full_loss", [](ObjectiveHandle& h, int n_threads) {
        BusyGuard g(h.busy, "this objective");
        py::gil_scoped_release nogil;
        return h.obj->full_loss(n_threads);
      }, py::arg("n_threads") = 0);

  // The incremental LWC evaluator on its own (tests compare it with the product path step by
  // step; fit_layerwise uses it internally).
  py::class_<QuadHandle>(m, "LwcQuadratic")
      .def(py::init([](const py::object& obj, const py::object& part, int n_threads) {
             if (!py::isinstance<ObjectiveHandle>(obj) || !py::isinstance<LwcHandle>(part))
               throw InvalidType("LwcQuadratic(objective, part): a LayerwiseObjective and an "
                                 "LwcPart");
             auto h = std::make_unique<QuadHandle>();
             h->obj = obj;
             h->part = part;
             h->oh = &obj.cast<ObjectiveHandle&>();
             h->lh = &part.cast<LwcHandle&>();
             BusyGuard g1(h->oh->busy, "this objective");
             BusyGuard g2(h->lh->busy, "this LWC part");
             {
               py::gil_scoped_release nogil;
               h->q = std::make_unique<hiquant::LwcQuadratic>(*h->oh->obj, *h->lh->part,
                                                              n_threads);
             }
             return h;
           }),
           py::arg("objective"), py::arg("part"), py::arg("n_threads") = 0)
      .def("evaluate", [](QuadHandle& h, int n_threads) {
        BusyGuard g0(h.busy, "this evaluator");
        BusyGuard g1(h.oh->busy, "this objective");
        BusyGuard g2(h.lh->busy, "this LWC part");
        auto grad = new_array<float>({2, h.lh->part->rows(), h.lh->part->n_groups()});
        float* gp = grad.mutable_data();
        double loss;
        {
          py::gil_scoped_release nogil;
          loss = h.q->evaluate(gp, n_threads);
        }
        return py::make_tuple(loss, grad, h.q->last_changes(), h.q->refreshes());
      }, py::arg("n_threads") = 0,
         "(loss, dL/d(gamma, beta), weights changed since the last call, refreshes so far)");

  m.def("fit_layerwise", [](ObjectiveHandle& oh, const py::object& lwc_, const py::object& lwc_adam_,
                            int64_t lwc_col0, const py::object& ada_, const py::object& ada_adam_,
                            int64_t ada_col0, int64_t iters, double warmup, double b_start,
                            double b_end, double lam, int n_threads, const py::object& progress,
                            int lwc_eval) {
    if (lwc_eval < 0 || lwc_eval > 2)
      throw InvalidArgument("lwc_eval must be 0 (auto), 1 (gemm) or 2 (incremental)");
    BusyGuard go(oh.busy, "this objective");
    std::vector<std::unique_ptr<BusyGuard>> guards;
    hiquant::LwcSlot ls{nullptr, nullptr, lwc_col0};
    hiquant::AdaRoundSlot as{nullptr, nullptr, ada_col0};
    if (!lwc_.is_none()) {
      if (!py::isinstance<LwcHandle>(lwc_) || !py::isinstance<AdamHandle>(lwc_adam_))
        throw InvalidType("lwc must be an LwcPart with an Adam state in lwc_adam (or None)");
      auto& h = lwc_.cast<LwcHandle&>();
      auto& a = lwc_adam_.cast<AdamHandle&>();
      guards.push_back(std::make_unique<BusyGuard>(h.busy, "this LWC part"));
      guards.push_back(std::make_unique<BusyGuard>(a.busy, "the LWC Adam state"));
      ls.part = h.part.get();
      ls.adam = &a.adam;
    }
    if (!ada_.is_none()) {
      if (!py::isinstance<AdaHandle>(ada_) || !py::isinstance<AdamHandle>(ada_adam_))
        throw InvalidType("ada must be an AdaRoundPart with an Adam state in ada_adam (or None)");
      auto& h = ada_.cast<AdaHandle&>();
      auto& a = ada_adam_.cast<AdamHandle&>();
      guards.push_back(std::make_unique<BusyGuard>(h.busy, "this AdaRound part"));
      guards.push_back(std::make_unique<BusyGuard>(a.busy, "the AdaRound Adam state"));
      as.part = h.part.get();
      as.adam = &a.adam;
    }
    hiquant::AdaRoundSchedule sched;
    sched.iters = iters;
    sched.warmup = warmup;
    sched.b_start = b_start;
    sched.b_end = b_end;
    sched.lam = lam;
    hiquant::FitLog log;
    hiquant::RunControl rc = python_run_control(progress);
    {
      py::gil_scoped_release nogil;
      hiquant::fit_layerwise(*oh.obj, ls, as, iters, sched, log, rc, n_threads,
                             static_cast<hiquant::LwcEval>(lwc_eval));
    }
    return fit_log_dict(log);
  }, py::arg("objective"), py::arg("lwc"), py::arg("lwc_adam"), py::arg("lwc_col0"),
     py::arg("ada"), py::arg("ada_adam"), py::arg("ada_col0"), py::arg("iters"),
     py::arg("warmup") = 0.2, py::arg("b_start") = 20.0, py::arg("b_end") = 2.0,
     py::arg("lam") = 0.01, py::arg("n_threads") = 0, py::arg("progress") = py::none(),
     py::arg("lwc_eval") = 0);

  // ---------------------------------------------------------------------------------- GPTQ
  m.def("inverse_cholesky_upper", [](const py::object& H_, int n_threads) {
    auto H = require_array<double>(H_, "H", 2);
    const auto n = H.shape(0);
    require_shape(H, "H", {n, n}, "pass a square matrix");
    auto U = new_array<double>({n, n});
    const double* h = H.data();
    double* u = U.mutable_data();
    {
      py::gil_scoped_release nogil;
      hiquant::inverse_cholesky_upper(h, n, u, n_threads);
    }
    return U;
  }, py::arg("H"), py::arg("n_threads") = 0);

  m.def("gptq", [](const py::object& W_, const py::object& H_, int bits, int64_t group_size,
                   double percdamp, int64_t blocksize, bool act_order, bool fp16_scales,
                   int n_threads, const py::object& progress, const py::object& grid_scale_,
                   const py::object& grid_zero_, int64_t n_quant) {
    check_bits(bits);
    check_group(group_size);
    if (blocksize < 1) throw InvalidArgument("blocksize must be >= 1, got " +
                                             std::to_string(blocksize));
    auto W = require_array<float>(W_, "W", 2);
    auto H = require_array<double>(H_, "H", 2);
    const auto rows = W.shape(0), cols = W.shape(1);
    require_shape(H, "H", {cols, cols},
                  "pass the Gram matrix of this layer's inputs (d_in x d_in)");
    if (n_quant < 0 || n_quant > cols)
      throw InvalidArgument("n_quant must be in 0..cols (" + std::to_string(cols) + "), got " +
                            std::to_string(n_quant));
    const int64_t nq = n_quant > 0 ? n_quant : cols;
    if (grid_scale_.is_none() != grid_zero_.is_none())
      throw InvalidArgument("a fixed grid needs both scale and zero (or neither)");
    const auto ng = hiquant::n_groups(nq, group_size);
    py::array_t<float, py::array::c_style> grid_scale;
    py::array_t<uint8_t, py::array::c_style> grid_zero;
    if (!grid_scale_.is_none()) {
      grid_scale = require_array<float>(grid_scale_, "scale", 2);
      grid_zero = require_array<uint8_t>(grid_zero_, "zero", 2);
      require_shape(grid_scale, "scale", {rows, ng},
                    "pass one scale per (row, group of the quantized columns)");
      require_shape(grid_zero, "zero", {rows, ng},
                    "pass one zero point per (row, group of the quantized columns)");
    }
    auto codes = new_array<uint8_t>({rows, nq});
    auto scale = new_array<float>({rows, ng});
    auto zero = new_array<uint8_t>({rows, ng});
    auto wq = new_array<float>({rows, nq});
    hiquant::GptqSpec spec;
    spec.bits = bits;
    spec.group_size = group_size;
    spec.percdamp = percdamp;
    spec.blocksize = blocksize;
    spec.act_order = act_order;
    spec.fp16_scales = fp16_scales;
    spec.n_quant = nq;
    if (!grid_scale_.is_none()) {
      spec.grid_scale = grid_scale.data();
      spec.grid_zero = grid_zero.data();
    }
    hiquant::GptqOutput out{codes.mutable_data(), scale.mutable_data(), zero.mutable_data(),
                            wq.mutable_data()};
    const float* w = W.data();
    const double* h = H.data();
    hiquant::RunControl rc = python_run_control(progress);
    hiquant::GptqStats st;
    {
      py::gil_scoped_release nogil;
      st = hiquant::gptq(w, rows, cols, h, spec, out, rc, n_threads);
    }
    auto perm = new_array<int64_t>({cols});
    std::copy(st.perm.begin(), st.perm.end(), perm.mutable_data());
    py::dict d;
    d["codes"] = codes;
    d["scale"] = scale;
    d["zero"] = zero;
    d["wq"] = wq;
    d["loss"] = st.loss;
    d["damp"] = st.damp;
    d["n_dead"] = st.n_dead;
    d["perm"] = perm;
    d["seconds_factor"] = st.seconds_factor;
    d["seconds_loop"] = st.seconds_loop;
    return d;
  }, py::arg("W"), py::arg("H"), py::arg("bits"), py::arg("group_size"),
     py::arg("percdamp") = 0.01, py::arg("blocksize") = 128, py::arg("act_order") = false,
     py::arg("fp16_scales") = true, py::arg("n_threads") = 0, py::arg("progress") = py::none(),
     py::arg("scale") = py::none(), py::arg("zero") = py::none(), py::arg("n_quant") = 0);
}

}  // namespace hiquant_py
