// Calibration statistics: Gram matrices of linear-layer inputs and the empirical Fisher diagonal.
//
// gram_accumulate: G (d×d, float64, row-major, symmetric) += Xᵀ X for X (n×d, float32, row-major).
//   The products are float32 fused multiply-adds summed over `chunk_rows` consecutive rows (256 by
//   default) in registers, then added to G in float64. Measured on llama-bench activations (65,536
//   tokens; errors relative to float64, table in hiquant/stats.py): ≤ 8.2e-8 of sqrt(G_ii G_jj) per
//   entry, against 3.6e-5 for one float32 sum over all rows, at the speed of float32 arithmetic
//   (twice the SIMD width of float64). Work is split into fixed 96×96 tiles of the upper triangle, one thread
//   per tile, so G is bitwise identical for any thread count; the lower triangle is mirrored from
//   the same sums, so G stays exactly symmetric. On x86-64 CPUs with AVX2+FMA an AVX2 kernel is
//   chosen at run time (the binary itself targets baseline x86-64); elsewhere a portable kernel
//   (separate multiply and add) runs, whose last bits differ. Both are the GEMM's micro-kernels
//   (hiquant/microkernel.hpp).
//
// fisher_accumulate: F += g ⊙ g elementwise (float32), the per-sequence empirical Fisher diagonal.
#pragma once
#include <cstdint>

#include "hiquant/parallel.hpp"

namespace hiquant {

constexpr int64_t kGramChunkRows = 256;

// Throws NumericalError (G untouched) if X holds NaN/Inf; InvalidArgument on bad sizes.
void gram_accumulate(double* G, const float* X, int64_t n, int64_t d, int n_threads = 0,
                     const RunControl* rc = nullptr, int64_t chunk_rows = kGramChunkRows);

// Throws NumericalError (F untouched) if grad holds NaN/Inf.
void fisher_accumulate(float* F, const float* grad, int64_t n, int n_threads = 0);

// Name of the Gram kernel this CPU runs ("avx2-fma" or "portable").
const char* gram_kernel_name();

}  // namespace hiquant
