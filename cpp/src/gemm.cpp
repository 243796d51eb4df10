#include "hiquant/gemm.hpp"

#include <algorithm>
#include <new>

#include "hiquant/errors.hpp"
#include "hiquant/microkernel.hpp"
#include "hiquant/parallel.hpp"

namespace hiquant {

namespace {

constexpr int64_t kMR = kMicroMR;  // rows of a micro-tile (hiquant/microkernel.hpp)
constexpr int64_t kNR = PackedB::kNR;
static_assert(kNR == kMicroNR, "a packed B panel is one micro-tile wide");
constexpr int64_t kKC = PackedB::kKC;
constexpr int64_t kMC = 144;  // rows per A block: 144 x 256 floats = 144 KiB (fits L2)

float* aligned_floats(size_t n) {
  // 64-byte alignment: a cache line, and enough for any vector load.
  const size_t bytes = ((n * sizeof(float) + 63) / 64) * 64;
  void* p = std::aligned_alloc(64, bytes > 0 ? bytes : 64);
  if (!p) throw std::bad_alloc();
  return static_cast<float*>(p);
}

using KernelFn = MicroKernelFn;

KernelFn resolve_kernel(GemmKernel kernel) {
  switch (kernel) {
    case GemmKernel::Portable:
      return micro_kernel_portable;
    case GemmKernel::Avx2:
      if (!micro_kernel_avx2_compiled())
        throw InvalidArgument("the AVX2+FMA GEMM kernel is not compiled in on this platform");
      HQ_CHECK(micro_kernel_avx2_available(),
               "the AVX2+FMA GEMM kernel is not available on this CPU");
      return micro_kernel_avx2();
    case GemmKernel::Auto:
    default:
      return micro_kernel_auto();
  }
}

// Packs rows [0, mc) x k block [k0, k0 + kcp) of A into micro-panels of MR rows (k-major inside a
// panel), zero-padding the last panel to MR rows.
void pack_a(const float* A, int64_t lda, int64_t mc, int64_t k0, int64_t kcp, float* out) {
  for (int64_t i0 = 0; i0 < mc; i0 += kMR) {
    const int64_t mr = std::min(kMR, mc - i0);
    float* o = out + i0 * kcp;
    if (mr == kMR) {
      const float* r[kMR];
      for (int i = 0; i < kMR; ++i) r[i] = A + (i0 + i) * lda + k0;
      for (int64_t k = 0; k < kcp; ++k)
        for (int i = 0; i < kMR; ++i) o[k * kMR + i] = r[i][k];
    } else {
      for (int64_t k = 0; k < kcp; ++k)
        for (int i = 0; i < kMR; ++i)
          o[k * kMR + i] = i < mr ? A[(i0 + i) * lda + k0 + k] : 0.0f;
    }
  }
}

// A per-thread scratch buffer, grown on demand and kept: no allocation per product in loops.
struct Scratch {
  std::unique_ptr<float, FreeDeleter> p;
  size_t n = 0;
  float* get(size_t want) {
    if (want > n) {
      p.reset(aligned_floats(want));
      n = want;
    }
    return p.get();
  }
};

// C rows [r0, r1) for the columns of panels [jp0, jp1).
void gemm_rows(const float* A, int64_t lda, int64_t r0, int64_t r1, const PackedB& B, float* C,
               int64_t ldc, bool accumulate, KernelFn kern, int64_t jp0, int64_t jp1) {
  static thread_local Scratch scratch;
  const int64_t K = B.rows(), N = B.cols();
  const int64_t n_kb = (K + kKC - 1) / kKC;
  float* apack = scratch.get(static_cast<size_t>(kMC * kKC));
  alignas(64) float tile[kMR * kNR];
  for (int64_t ic = r0; ic < r1; ic += kMC) {
    const int64_t mc = std::min(kMC, r1 - ic);
    for (int64_t p = 0; p < n_kb; ++p) {
      const int64_t k0 = p * kKC, kcp = std::min(kKC, K - k0);
      pack_a(A + ic * lda, lda, mc, k0, kcp, apack);
      const bool acc = accumulate || p > 0;
      for (int64_t jp = jp0; jp < jp1; ++jp) {
        const float* bp = B.panel(p, jp);
        const int64_t j0 = jp * kNR, nr = std::min(kNR, N - j0);
        for (int64_t i0 = 0; i0 < mc; i0 += kMR) {
          const int64_t mr = std::min(kMR, mc - i0);
          float* c = C + (ic + i0) * ldc + j0;
          if (mr == kMR && nr == kNR) {
            kern(kcp, apack + i0 * kcp, bp, c, ldc, acc);
          } else {
            // Edge tile: compute into a full scratch tile, then add/copy the valid part. The
            // sum is formed from zero and added to C last, exactly as the in-place kernel does.
            kern(kcp, apack + i0 * kcp, bp, tile, kNR, false);
            for (int64_t i = 0; i < mr; ++i)
              for (int64_t j = 0; j < nr; ++j)
                c[i * ldc + j] = acc ? tile[i * kNR + j] + c[i * ldc + j] : tile[i * kNR + j];
          }
        }
      }
    }
  }
}

}  // namespace

bool gemm_avx2_available() { return micro_kernel_avx2_available(); }

const char* gemm_kernel_name(GemmKernel kernel) {
  return micro_kernel_name(resolve_kernel(kernel));
}

template <typename T>
void PackedB::pack_impl(const T* B, int64_t ldb, int64_t K, int64_t N, int n_threads) {
  HQ_CHECK(K >= 0 && N >= 0 && ldb >= N, "PackedB: bad shape ", K, " x ", N, " with ldb ", ldb);
  K_ = K;
  N_ = N;
  Np_ = ((N + kNR - 1) / kNR) * kNR;
  const size_t need = static_cast<size_t>(K * Np_);
  if (need > capacity_ || !data_) {
    data_.reset(aligned_floats(need));
    capacity_ = need;
  }
  if (need == 0) return;
  const int64_t n_kb = (K + kKC - 1) / kKC, n_panels = Np_ / kNR;
  float* base = data_.get();
  parallel_for(n_kb * n_panels, n_threads, [&](int64_t t) {
    const int64_t p = t / n_panels, jp = t % n_panels;
    const int64_t k0 = p * kKC, kcp = std::min(kKC, K - k0);
    const int64_t j0 = jp * kNR, nr = std::min(kNR, N - j0);
    float* o = base + p * kKC * Np_ + jp * kcp * kNR;
    for (int64_t k = 0; k < kcp; ++k) {
      const T* src = B + (k0 + k) * ldb + j0;
      float* dst = o + k * kNR;
      int64_t j = 0;
      for (; j < nr; ++j) dst[j] = static_cast<float>(src[j]);
      for (; j < kNR; ++j) dst[j] = 0.0f;
    }
  });
}

void PackedB::pack(const float* B, int64_t ldb, int64_t K, int64_t N, int n_threads) {
  pack_impl(B, ldb, K, N, n_threads);
}

void PackedB::pack(const double* B, int64_t ldb, int64_t K, int64_t N, int n_threads) {
  pack_impl(B, ldb, K, N, n_threads);
}

void gemm_packed(const float* A, int64_t lda, int64_t M, const PackedB& B, float* C, int64_t ldc,
                 bool accumulate, int n_threads, GemmKernel kernel) {
  const int64_t K = B.rows(), N = B.cols();
  HQ_CHECK(M >= 0 && lda >= K && ldc >= N, "gemm: bad leading dimensions (lda ", lda, ", ldc ",
           ldc, ") for K = ", K, ", N = ", N);
  if (M == 0 || N == 0) return;
  if (K == 0) {
    if (!accumulate)
      for (int64_t i = 0; i < M; ++i) std::fill(C + i * ldc, C + i * ldc + N, 0.0f);
    return;
  }
  const KernelFn kern = resolve_kernel(kernel);
  // Tasks of up to kMC rows (whole micro-tiles) by a range of column panels, taken dynamically
  // so that a thread slowed by another process on its core does not hold the product up. The
  // split does not change any element's summation order (see the header), so results do not
  // depend on n_threads or on which thread runs a task.
  const int64_t n_tiles = (M + kMR - 1) / kMR;
  const int64_t n_panels = (N + kNR - 1) / kNR;
  const int64_t work = n_tiles * n_panels * K;
  int nt = resolve_threads(n_threads);
  if (work < (int64_t(1) << 18)) nt = 1;  // small products: threads cost more than they save
  if (nt == 1) {
    gemm_rows(A, lda, 0, M, B, C, ldc, accumulate, kern, 0, n_panels);
    return;
  }
  const int64_t tiles_per_block = kMC / kMR;
  const int64_t n_rb = (n_tiles + tiles_per_block - 1) / tiles_per_block;
  // Column ranges of at least 64 panels (1024 columns): each task streams its part of B once.
  const int64_t n_cb = std::max<int64_t>(1, std::min<int64_t>(
      (8 * nt + n_rb - 1) / n_rb, n_panels / 64));
  parallel_for_dynamic(n_rb * n_cb, nt, [&](int64_t t) {
    const int64_t rb = t / n_cb, cb = t % n_cb;
    const int64_t r0 = rb * tiles_per_block * kMR, r1 = std::min(M, r0 + tiles_per_block * kMR);
    const int64_t jp0 = n_panels * cb / n_cb, jp1 = n_panels * (cb + 1) / n_cb;
    gemm_rows(A, lda, r0, r1, B, C, ldc, accumulate, kern, jp0, jp1);
  });
}

void gemm(const float* A, int64_t lda, const float* B, int64_t ldb, float* C, int64_t ldc,
          int64_t M, int64_t N, int64_t K, bool accumulate, int n_threads, GemmKernel kernel) {
  PackedB pb(B, ldb, K, N, n_threads);
  gemm_packed(A, lda, M, pb, C, ldc, accumulate, n_threads, kernel);
}

}  // namespace hiquant
