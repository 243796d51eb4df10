#include "binding_util.hpp"

namespace hiquant_py {

void init_stats(py::module_& m) { (void)m; }

}  // namespace hiquant_py
