// Packed float32 matrix product C (+)= A · B for the learned-quantization kernels.
//
// Why not plain Eigen: the default build carries no -mavx2 (no -march=native by default, see
// STYLE.md), and Eigen's SSE2 kernels reach about a third of this machine's float32 peak. The
// layer-wise objective spends nearly all of its time in one product per step, so the micro-kernel
// is chosen at run time: AVX2+FMA where the CPU has it (compiled with a target attribute for that
// function only, so no other code of the library needs AVX2), a portable vector-extension
// kernel elsewhere. The 6 x 16 micro-kernel and the CPU check are shared with the Gram
// accumulation (stats.cpp): hiquant/microkernel.hpp.
//
// Layout (BLIS-style): B is packed once into panels of KC x NR (kept between calls: the Gram
// matrix is constant over an optimization), A into panels of MR x KC per block of rows.
//
// Determinism: every C element is summed over k in the same order whatever the thread count or
// the row split: k runs in fixed blocks of KC, sequentially inside a block, the blocks added in
// order. Threads split the rows of C only. Results therefore depend on the kernel (FMA or not),
// never on n_threads.
#pragma once
#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <memory>

namespace hiquant {

enum class GemmKernel : int { Auto = 0, Portable = 1, Avx2 = 2 };

// Whether the AVX2+FMA micro-kernel can run on this CPU (and was compiled in).
bool gemm_avx2_available();
// The kernel Auto resolves to ("avx2-fma" or "portable").
const char* gemm_kernel_name(GemmKernel kernel = GemmKernel::Auto);

struct FreeDeleter {
  void operator()(float* p) const noexcept { std::free(p); }
};

// B (K x N, row-major with leading dimension ldb) packed for repeated products.
class PackedB {
 public:
  static constexpr int64_t kNR = 16;   // panel width (two AVX2 registers)
  static constexpr int64_t kKC = 256;  // depth of a k block: a B panel is 16 KiB (fits L1)

  PackedB() = default;
  PackedB(const float* B, int64_t ldb, int64_t K, int64_t N, int n_threads = 0) {
    pack(B, ldb, K, N, n_threads);
  }
  // Packs B; the storage is reused when the new matrix is not larger than the previous one.
  void pack(const float* B, int64_t ldb, int64_t K, int64_t N, int n_threads = 0);
  // The same from a float64 matrix (each element rounded to float32 once).
  void pack(const double* B, int64_t ldb, int64_t K, int64_t N, int n_threads = 0);
  int64_t rows() const { return K_; }
  int64_t cols() const { return N_; }
  bool empty() const { return K_ == 0 || N_ == 0; }
  // Panel j (columns [j*NR, j*NR+NR)) of k block p: a kcp x NR array, row-major.
  const float* panel(int64_t p, int64_t j) const {
    const int64_t kcp = std::min(kKC, K_ - p * kKC);
    return data_.get() + p * kKC * Np_ + j * kcp * kNR;
  }

 private:
  template <typename T>
  void pack_impl(const T* B, int64_t ldb, int64_t K, int64_t N, int n_threads);
  int64_t K_ = 0, N_ = 0, Np_ = 0;  // Np_: N rounded up to a multiple of NR
  size_t capacity_ = 0;
  std::unique_ptr<float, FreeDeleter> data_;
};

// C (M x N, ldc) = A (M x K, lda) · B, or C += A · B when accumulate. K = B.rows(), N = B.cols().
void gemm_packed(const float* A, int64_t lda, int64_t M, const PackedB& B, float* C, int64_t ldc,
                 bool accumulate, int n_threads = 0, GemmKernel kernel = GemmKernel::Auto);

// Convenience for one-off products: packs B (K x N, ldb) and multiplies.
void gemm(const float* A, int64_t lda, const float* B, int64_t ldb, float* C, int64_t ldc,
          int64_t M, int64_t N, int64_t K, bool accumulate, int n_threads = 0,
          GemmKernel kernel = GemmKernel::Auto);

}  // namespace hiquant
