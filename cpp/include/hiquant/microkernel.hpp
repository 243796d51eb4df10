// The 6 x 16 float32 register-tile micro-kernel shared by the packed GEMM (gemm.cpp) and the Gram
// accumulation (stats.cpp), and the one run-time CPU check that chooses its variant.
//
// Both variants compute, for a full tile (i < kMR, j < kNR),
//   c[i*ldc + j] = sum_k a[k*kMR + i] * b[k*kNR + j]          (acc = false)
//   c[i*ldc + j] = sum_k a[k*kMR + i] * b[k*kNR + j] + c[i*ldc + j]   (acc = true)
// with the sum over k = 0 .. kc-1 formed in that order in float32 from zero, and the old C added
// last. `a` is a packed micro-panel of kMR rows (k-major), `b` one of kNR columns (k-major);
// neither needs any alignment.
//
// AVX2+FMA: compiled with a target attribute on that one function, so the library itself targets
// baseline x86-64 (no -march=native by default, see STYLE.md); chosen only when the CPU reports
// AVX2 and FMA. Portable: separate multiply and add (four-lane vector extension on GCC/Clang,
// plain loops elsewhere), so its last bits differ from the fused kernel's.
#pragma once
#include <cstdint>

namespace hiquant {

constexpr int64_t kMicroMR = 6;   // rows of a tile: 6 x 16 uses 12 of the 16 AVX2 registers
constexpr int64_t kMicroNR = 16;  // columns of a tile: two AVX2 registers

using MicroKernelFn = void (*)(int64_t kc, const float* a, const float* b, float* c, int64_t ldc,
                               bool acc);

// The portable kernel (any CPU).
void micro_kernel_portable(int64_t kc, const float* a, const float* b, float* c, int64_t ldc,
                           bool acc);

// Whether the AVX2+FMA kernel is compiled in (x86-64 with GCC or Clang).
bool micro_kernel_avx2_compiled();
// Whether it is compiled in and this CPU has AVX2 and FMA (CPUID is read once).
bool micro_kernel_avx2_available();
// The AVX2+FMA kernel, or nullptr where it is not compiled in. Call it only when
// micro_kernel_avx2_available().
MicroKernelFn micro_kernel_avx2();

// The fastest kernel this CPU runs: AVX2+FMA where available, portable otherwise.
MicroKernelFn micro_kernel_auto();
// "avx2-fma" or "portable".
const char* micro_kernel_name(MicroKernelFn fn);

}  // namespace hiquant
