#include "hiquant/stats.hpp"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <vector>

#include "hiquant/errors.hpp"

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#include <immintrin.h>
#define HQ_X86_DISPATCH 1
#endif

namespace hiquant {

namespace {

// Register block of the micro-kernel (6 rows × 16 columns of float32 = 12 AVX registers) and the
// tile one thread owns. kTile is a multiple of both, so packed panels need no edge cases.
constexpr int kMR = 6;
constexpr int kNR = 16;
constexpr int64_t kTile = 96;

// Pack rows [r0, r0+R) of X into micro-panels of width mw over all d columns, zero-padded:
// out[(p * R + k) * mw + t] = X[r0 + k, p * mw + t] (0 past column d). Zeros add exactly nothing.
void pack_rows(const float* X, int64_t d, int64_t r0, int64_t R, int mw, int64_t p, float* out) {
  float* dst = out + p * R * mw;
  const int64_t c0 = p * mw;
  const int64_t cnt = std::min<int64_t>(mw, d - c0);
  for (int64_t k = 0; k < R; ++k) {
    const float* src = X + (r0 + k) * d + c0;
    float* row = dst + k * mw;
    for (int64_t t = 0; t < cnt; ++t) row[t] = src[t];
    for (int64_t t = cnt; t < mw; ++t) row[t] = 0.0f;
  }
}

// C (kMR × kNR, row-major) = Σ_k a_k b_kᵀ over R rows of packed micro-panels, summed in float32.
void micro_portable(const float* a, const float* b, int64_t R, float* C) {
  float acc[kMR][kNR] = {};
  for (int64_t k = 0; k < R; ++k) {
    const float* ak = a + k * kMR;
    const float* bk = b + k * kNR;
    for (int i = 0; i < kMR; ++i)
      for (int j = 0; j < kNR; ++j) acc[i][j] += ak[i] * bk[j];
  }
  for (int i = 0; i < kMR; ++i)
    for (int j = 0; j < kNR; ++j) C[i * kNR + j] = acc[i][j];
}

#ifdef HQ_X86_DISPATCH
__attribute__((target("avx2,fma"))) void micro_avx2(const float* a, const float* b, int64_t R,
                                                    float* C) {
  __m256 c00 = _mm256_setzero_ps(), c01 = _mm256_setzero_ps();
  __m256 c10 = _mm256_setzero_ps(), c11 = _mm256_setzero_ps();
  __m256 c20 = _mm256_setzero_ps(), c21 = _mm256_setzero_ps();
  __m256 c30 = _mm256_setzero_ps(), c31 = _mm256_setzero_ps();
  __m256 c40 = _mm256_setzero_ps(), c41 = _mm256_setzero_ps();
  __m256 c50 = _mm256_setzero_ps(), c51 = _mm256_setzero_ps();
  for (int64_t k = 0; k < R; ++k) {
    const float* ak = a + k * kMR;
    const __m256 b0 = _mm256_loadu_ps(b + k * kNR);
    const __m256 b1 = _mm256_loadu_ps(b + k * kNR + 8);
    __m256 x = _mm256_broadcast_ss(ak + 0);
    c00 = _mm256_fmadd_ps(x, b0, c00);
    c01 = _mm256_fmadd_ps(x, b1, c01);
    x = _mm256_broadcast_ss(ak + 1);
    c10 = _mm256_fmadd_ps(x, b0, c10);
    c11 = _mm256_fmadd_ps(x, b1, c11);
    x = _mm256_broadcast_ss(ak + 2);
    c20 = _mm256_fmadd_ps(x, b0, c20);
    c21 = _mm256_fmadd_ps(x, b1, c21);
    x = _mm256_broadcast_ss(ak + 3);
    c30 = _mm256_fmadd_ps(x, b0, c30);
    c31 = _mm256_fmadd_ps(x, b1, c31);
    x = _mm256_broadcast_ss(ak + 4);
    c40 = _mm256_fmadd_ps(x, b0, c40);
    c41 = _mm256_fmadd_ps(x, b1, c41);
    x = _mm256_broadcast_ss(ak + 5);
    c50 = _mm256_fmadd_ps(x, b0, c50);
    c51 = _mm256_fmadd_ps(x, b1, c51);
  }
  _mm256_storeu_ps(C + 0 * kNR, c00);
  _mm256_storeu_ps(C + 0 * kNR + 8, c01);
  _mm256_storeu_ps(C + 1 * kNR, c10);
  _mm256_storeu_ps(C + 1 * kNR + 8, c11);
  _mm256_storeu_ps(C + 2 * kNR, c20);
  _mm256_storeu_ps(C + 2 * kNR + 8, c21);
  _mm256_storeu_ps(C + 3 * kNR, c30);
  _mm256_storeu_ps(C + 3 * kNR + 8, c31);
  _mm256_storeu_ps(C + 4 * kNR, c40);
  _mm256_storeu_ps(C + 4 * kNR + 8, c41);
  _mm256_storeu_ps(C + 5 * kNR, c50);
  _mm256_storeu_ps(C + 5 * kNR + 8, c51);
}

bool cpu_has_avx2_fma() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
}
#endif

using MicroFn = void (*)(const float*, const float*, int64_t, float*);

MicroFn select_micro() {
#ifdef HQ_X86_DISPATCH
  static const bool avx2 = cpu_has_avx2_fma();
  if (avx2) return micro_avx2;
#endif
  return micro_portable;
}

bool all_finite(const float* x, int64_t n, int n_threads) {
  constexpr int64_t kBlock = 1 << 16;
  const int64_t blocks = (n + kBlock - 1) / kBlock;
  std::atomic<bool> ok{true};
  parallel_for(blocks, n_threads, [&](int64_t b) {
    const int64_t lo = b * kBlock, hi = std::min(n, lo + kBlock);
    float acc = 0.0f;  // x - x is 0 for finite x and NaN otherwise; NaN survives the sum
    for (int64_t i = lo; i < hi; ++i) acc += x[i] - x[i];
    if (acc != 0.0f) ok.store(false, std::memory_order_relaxed);
  });
  return ok.load();
}

// Rows [0, R) of the packed panels, tile (ti, tj) with ti <= tj: the upper-triangle entries of
// G[I, J] += float32 sums over those R rows (float64 accumulation into G).
void gram_tile(double* G, int64_t d, const float* ap, const float* bp, int64_t R, int64_t stride_a,
               int64_t stride_b, int64_t ti, int64_t tj, MicroFn micro) {
  const int64_t np_a = (d + kMR - 1) / kMR, np_b = (d + kNR - 1) / kNR;
  const int64_t pa0 = ti * (kTile / kMR), pa1 = std::min(np_a, pa0 + kTile / kMR);
  const int64_t pb0 = tj * (kTile / kNR), pb1 = std::min(np_b, pb0 + kTile / kNR);
  float C[kMR * kNR];
  for (int64_t pa = pa0; pa < pa1; ++pa) {
    const int64_t gi0 = pa * kMR;
    for (int64_t pb = pb0; pb < pb1; ++pb) {
      const int64_t gj0 = pb * kNR;
      if (gj0 + kNR <= gi0) continue;  // entirely below the diagonal
      micro(ap + pa * stride_a, bp + pb * stride_b, R, C);
      for (int a = 0; a < kMR; ++a) {
        const int64_t gi = gi0 + a;
        if (gi >= d) break;
        double* grow = G + gi * d;
        for (int b = 0; b < kNR; ++b) {
          const int64_t gj = gj0 + b;
          if (gj >= gi && gj < d) grow[gj] += C[a * kNR + b];
        }
      }
    }
  }
}

// Blocked pass over the strict lower triangle: check (mirror=false) that it equals the upper
// one, or (mirror=true) copy the upper one into it.
bool lower_vs_upper(double* G, int64_t d, bool mirror, int n_threads) {
  constexpr int64_t kB = 64;
  const int64_t nb = (d + kB - 1) / kB;
  std::atomic<bool> same{true};
  parallel_for(nb, n_threads, [&](int64_t bi) {
    const int64_t i0 = bi * kB, i1 = std::min(d, i0 + kB);
    for (int64_t j0 = 0; j0 <= i0; j0 += kB) {
      const int64_t j1 = std::min(d, j0 + kB);
      for (int64_t i = i0; i < i1; ++i)
        for (int64_t j = j0; j < std::min(j1, i); ++j) {
          if (mirror) {
            G[i * d + j] = G[j * d + i];
          } else if (G[i * d + j] != G[j * d + i]) {
            same.store(false, std::memory_order_relaxed);
          }
        }
    }
  });
  return same.load();
}

}  // namespace

const char* gram_kernel_name() {
  return select_micro() == micro_portable ? "portable" : "avx2-fma";
}

void gram_accumulate(double* G, const float* X, int64_t n, int64_t d, int n_threads,
                     const RunControl* rc, int64_t chunk_rows) {
  HQ_CHECK(n >= 0 && d > 0, "gram_accumulate: X must have shape (n, d) with d > 0, got (", n,
           ", ", d, ")");
  HQ_CHECK(chunk_rows > 0, "chunk_rows must be positive, got ", chunk_rows);
  if (n == 0) return;
  HQ_CHECK_FINITE(all_finite(X, n * d, n_threads),
                  "X contains NaN or Inf; the layer inputs are not finite (check the model and "
                  "the calibration data)");
  HQ_CHECK(lower_vs_upper(G, d, /*mirror=*/false, n_threads),
           "G is not symmetric; pass a Gram accumulator (zeros, or the result of earlier calls)");
  const MicroFn micro = select_micro();
  const int64_t nt = (d + kTile - 1) / kTile;
  std::vector<std::pair<int64_t, int64_t>> tiles;
  for (int64_t i = 0; i < nt; ++i)
    for (int64_t j = i; j < nt; ++j) tiles.emplace_back(i, j);
  const int64_t n_tiles = static_cast<int64_t>(tiles.size());
  const int64_t np_a = (d + kMR - 1) / kMR, np_b = (d + kNR - 1) / kNR;
  // Rows are packed once per chunk for every tile; the run control is polled between chunks.
  const int64_t R = std::min(chunk_rows, n);
  std::vector<float> ap(static_cast<size_t>(np_a * kMR * R)), bp(static_cast<size_t>(np_b * kNR * R));
  const int threads = resolve_threads(n_threads);
  for (int64_t r0 = 0; r0 < n; r0 += R) {
    if (rc) rc->poll();
    const int64_t rows = std::min(R, n - r0);
    parallel_for(np_a + np_b, threads, [&](int64_t p) {
      if (p < np_a) pack_rows(X, d, r0, rows, kMR, p, ap.data());
      else pack_rows(X, d, r0, rows, kNR, p - np_a, bp.data());
    });
    // one thread per tile and a fixed tiling: G is the same for any thread count
    parallel_for(n_tiles, threads, [&](int64_t t) {
      gram_tile(G, d, ap.data(), bp.data(), rows, rows * kMR, rows * kNR, tiles[t].first,
                tiles[t].second, micro);
    });
    if (rc) rc->report(r0 + rows, n);
  }
  lower_vs_upper(G, d, /*mirror=*/true, threads);
}

void fisher_accumulate(float* F, const float* grad, int64_t n, int n_threads) {
  HQ_CHECK(n >= 0, "fisher_accumulate: negative size");
  if (n == 0) return;
  HQ_CHECK_FINITE(all_finite(grad, n, n_threads),
                  "the gradient contains NaN or Inf; the loss is not finite for this sequence");
  constexpr int64_t kBlock = 1 << 15;
  const int64_t blocks = (n + kBlock - 1) / kBlock;
  parallel_for(blocks, n_threads, [&](int64_t b) {
    const int64_t lo = b * kBlock, hi = std::min(n, lo + kBlock);
    for (int64_t i = lo; i < hi; ++i) F[i] += grad[i] * grad[i];
  });
}

}  // namespace hiquant
