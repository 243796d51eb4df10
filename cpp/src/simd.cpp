#include "hiquant/simd.hpp"

#include <atomic>

namespace hiquant {

namespace {
std::atomic<int> g_kernel{static_cast<int>(ElementwiseKernel::Auto)};

bool cpu_has_avx2() {
#if defined(HQ_ELEM_X86)
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2");
#else
  return false;
#endif
}
}  // namespace

bool elementwise_avx2_available() {
  static const bool ok = cpu_has_avx2();
  return ok;
}

bool elementwise_avx2() {
  return elementwise_avx2_available() &&
         g_kernel.load(std::memory_order_relaxed) == static_cast<int>(ElementwiseKernel::Auto);
}

void set_elementwise_kernel(ElementwiseKernel k) { g_kernel.store(static_cast<int>(k)); }

const char* elementwise_kernel_name() { return elementwise_avx2() ? "avx2" : "portable"; }

}  // namespace hiquant
