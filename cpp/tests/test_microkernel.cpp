// The shared 6 x 16 micro-kernel (hiquant/microkernel.hpp) through its two users, the packed GEMM
// and the Gram accumulation, on edge shapes (ragged tiles, k blocks, a single row), run under the
// sanitizers by tools/sanitize.sh: no out-of-bounds access in the packers or edge tiles, results
// close to a float64 product, the portable and AVX2+FMA variants close to each other, and the
// GEMM identical for any thread count.
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "hiquant/gemm.hpp"
#include "hiquant/microkernel.hpp"
#include "hiquant/stats.hpp"

#include "expect.hpp"

namespace {

// A fixed pseudo-random fill in [-1, 1) (no <random>: the values are the same everywhere).
std::vector<float> fill(size_t n, uint32_t seed) {
  std::vector<float> v(n);
  uint32_t s = seed * 2654435761u + 1u;
  for (auto& x : v) {
    s = s * 1664525u + 1013904223u;
    x = static_cast<float>(s >> 8) / static_cast<float>(1u << 23) - 1.0f;
  }
  return v;
}

// max |got - want| / (1 + |want|) against a float64 product.
double gemm_error(const std::vector<float>& C, const std::vector<float>& A,
                  const std::vector<float>& B, int64_t M, int64_t N, int64_t K) {
  double worst = 0.0;
  for (int64_t i = 0; i < M; ++i)
    for (int64_t j = 0; j < N; ++j) {
      double want = 0.0;
      for (int64_t k = 0; k < K; ++k) want += double(A[i * K + k]) * double(B[k * N + j]);
      worst = std::fmax(worst, std::fabs(C[i * N + j] - want) / (1.0 + std::fabs(want)));
    }
  return worst;
}

void check_gemm(int64_t M, int64_t N, int64_t K) {
  const auto A = fill(size_t(M * K), 1), B = fill(size_t(K * N), 2);
  std::vector<hiquant::GemmKernel> kernels{hiquant::GemmKernel::Portable};
  if (hiquant::gemm_avx2_available()) kernels.push_back(hiquant::GemmKernel::Avx2);
  for (auto kern : kernels) {
    std::vector<float> C1(size_t(M * N), -7.0f), C4(size_t(M * N), -7.0f);
    hiquant::gemm(A.data(), K, B.data(), N, C1.data(), N, M, N, K, false, 1, kern);
    hiquant::gemm(A.data(), K, B.data(), N, C4.data(), N, M, N, K, false, 4, kern);
    EXPECT(C1 == C4);  // bitwise, whatever the thread count
    EXPECT(gemm_error(C1, A, B, M, N, K) < 1e-5 * std::sqrt(double(K) + 1.0));
    // accumulate: C += A B on top of the first product doubles it (up to rounding)
    hiquant::gemm(A.data(), K, B.data(), N, C1.data(), N, M, N, K, true, 2, kern);
    for (size_t i = 0; i < C1.size(); ++i) C4[i] *= 2.0f;
    double worst = 0.0;
    for (size_t i = 0; i < C1.size(); ++i)
      worst = std::fmax(worst, std::fabs(C1[i] - C4[i]) / (1.0 + std::fabs(C4[i])));
    EXPECT(worst < 1e-5);
  }
}

void check_gram(int64_t n, int64_t d, int64_t chunk_rows) {
  const auto X = fill(size_t(n * d), 3);
  std::vector<double> G(size_t(d * d), 0.0);
  hiquant::gram_accumulate(G.data(), X.data(), n, d, 2, nullptr, chunk_rows);
  double worst = 0.0;
  for (int64_t i = 0; i < d; ++i)
    for (int64_t j = 0; j < d; ++j) {
      double want = 0.0;
      for (int64_t r = 0; r < n; ++r) want += double(X[r * d + i]) * double(X[r * d + j]);
      worst = std::fmax(worst, std::fabs(G[i * d + j] - want) / (1.0 + std::fabs(want)));
      EXPECT(G[i * d + j] == G[j * d + i]);  // exactly symmetric
    }
  EXPECT(worst < 1e-5);
}

}  // namespace

int main() {
  // The kernel choice is consistent: the name of the auto kernel says whether AVX2 is used.
  const bool avx2 = hiquant::micro_kernel_avx2_available();
  EXPECT(!avx2 || hiquant::micro_kernel_avx2_compiled());
  EXPECT(hiquant::micro_kernel_auto() == (avx2 ? hiquant::micro_kernel_avx2()
                                               : hiquant::micro_kernel_portable));
  EXPECT(std::string(hiquant::gram_kernel_name()) == hiquant::gemm_kernel_name());

  // One full tile straight through each variant, against a float64 sum, with and without acc.
  {
    const int64_t kc = 37, ldc = 21;
    const auto a = fill(size_t(kc * hiquant::kMicroMR), 4);
    const auto b = fill(size_t(kc * hiquant::kMicroNR), 5);
    std::vector<hiquant::MicroKernelFn> fns{hiquant::micro_kernel_portable};
    if (avx2) fns.push_back(hiquant::micro_kernel_avx2());
    for (auto fn : fns) {
      std::vector<float> c(size_t(hiquant::kMicroMR * ldc), 0.5f);
      fn(kc, a.data(), b.data(), c.data(), ldc, /*acc=*/true);
      for (int64_t i = 0; i < hiquant::kMicroMR; ++i) {
        for (int64_t j = 0; j < hiquant::kMicroNR; ++j) {
          double want = 0.5;
          for (int64_t k = 0; k < kc; ++k)
            want += double(a[k * hiquant::kMicroMR + i]) * double(b[k * hiquant::kMicroNR + j]);
          EXPECT(std::fabs(c[i * ldc + j] - want) < 1e-4);
        }
        for (int64_t j = hiquant::kMicroNR; j < ldc; ++j) EXPECT(c[i * ldc + j] == 0.5f);
      }
    }
  }

  for (auto s : {std::vector<int64_t>{1, 1, 1}, {6, 16, 1}, {7, 17, 3}, {5, 15, 300},
                 {13, 33, 257}, {150, 40, 520}, {1, 100, 9}})
    check_gemm(s[0], s[1], s[2]);
  for (auto s : {std::vector<int64_t>{1, 1, 256}, {5, 7, 2}, {300, 97, 256}, {40, 200, 17},
                 {3, 96, 1}})
    check_gram(s[0], s[1], s[2]);

  return test_result("test_microkernel");
}
