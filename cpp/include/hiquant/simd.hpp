// Run-time choice of the 8-lane (AVX2) variants of the elementwise kernels: the min-max quantizer
// (quantizer.cpp), the AdaRound forward / backward (adaround.cpp) and Adam (optim.cpp).
//
// Those variants are compiled with a target attribute on their own functions only (the library
// targets baseline x86-64; no -march=native, see STYLE.md) and with "avx2" but never "fma": every
// element goes through the same IEEE single operations (multiply, add, compare, select) in the
// same order as the portable four-lane / scalar code, only eight at a time, so both give the same
// bits. Reductions keep their order (min / max, which do not depend on it, or per-row partial
// sums folded in the portable order). Tests compare the two element for element
// (tests/test_elementwise_simd.py).
#pragma once

namespace hiquant {

enum class ElementwiseKernel : int { Auto = 0, Portable = 1 };

// Whether the AVX2 variants are compiled in and this CPU has AVX2 (CPUID read once).
bool elementwise_avx2_available();
// Whether the kernels use them now: available, and not turned off with
// set_elementwise_kernel(Portable).
bool elementwise_avx2();
// Process-wide choice, for tests and benchmarks (the default is Auto).
void set_elementwise_kernel(ElementwiseKernel k);
// "avx2" or "portable": what the kernels use now.
const char* elementwise_kernel_name();

}  // namespace hiquant

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define HQ_ELEM_X86 1
// AVX2 without FMA: GCC must not contract a multiply and an add into one rounding.
#define HQ_ELEM_AVX2 __attribute__((target("avx2")))
#endif
