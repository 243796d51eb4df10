#include "hiquant/stats.hpp"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <vector>

#include "hiquant/errors.hpp"
#include "hiquant/microkernel.hpp"

namespace hiquant {

namespace {

// Register block of the shared micro-kernel (hiquant/microkernel.hpp: 6 rows × 16 columns of
// float32) and the tile one thread owns. kTile is a multiple of both, so packed panels need no edge
// cases.
constexpr int kMR = static_cast<int>(kMicroMR);
constexpr int kNR = static_cast<int>(kMicroNR);
constexpr int64_t kTile = 96;
static_assert(kTile % kMR == 0 && kTile % kNR == 0, "a tile holds whole micro-panels");

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
               int64_t stride_b, int64_t ti, int64_t tj, MicroKernelFn micro) {
  const int64_t np_a = (d + kMR - 1) / kMR, np_b = (d + kNR - 1) / kNR;
  const int64_t pa0 = ti * (kTile / kMR), pa1 = std::min(np_a, pa0 + kTile / kMR);
  const int64_t pb0 = tj * (kTile / kNR), pb1 = std::min(np_b, pb0 + kTile / kNR);
  float C[kMR * kNR];
  for (int64_t pa = pa0; pa < pa1; ++pa) {
    const int64_t gi0 = pa * kMR;
    for (int64_t pb = pb0; pb < pb1; ++pb) {
      const int64_t gj0 = pb * kNR;
      if (gj0 + kNR <= gi0) continue;  // entirely below the diagonal
      // C (kMR × kNR, row-major) = Σ_k a_k b_kᵀ over the R rows, summed in float32
      micro(R, ap + pa * stride_a, bp + pb * stride_b, C, kNR, /*acc=*/false);
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
  return micro_kernel_name(micro_kernel_auto());
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
  const MicroKernelFn micro = micro_kernel_auto();
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
