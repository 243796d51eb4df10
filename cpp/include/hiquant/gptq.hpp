// GPTQ (Frantar et al. 2023), the published algorithm of IST-DASLab/gptq gptq.py on one layer:
//
//   dead columns (H_ii = 0): H_ii = 1, W[:, i] = 0
//   act_order: columns in order of decreasing H_ii (stable sort: ties keep column order)
//   H += percdamp * mean(diag H) * I
//   U = upper Cholesky factor of H^-1   (U^T U = H^-1)
//   for blocks of `blocksize` columns, for each column i of the block:
//     q = quantize(w_i); err = (w_i - q) / U_ii; later columns of the block -= err * U[i, :]
//   after each block, the columns after it -= Err_block * U[block, after]   (lazy batch update)
//
// Quantizer: min-max range including 0 (hiquant.quantizer's arithmetic, division in double).
// Without groups the parameters come from the original row, as gptq.py's find_params(W) before
// the loop. With groups (g > 0) they are formed as the column loop reaches a group, from the
// current W as gptq.py reads it: W[:, i:i+g] of the global matrix, in which the columns of the
// current block still hold their values from the start of the block (the in-block updates go to
// a copy) and later columns have all lazy updates so far. With act_order, a group is still g
// consecutive columns of the ORIGINAL order (the storage format needs that); its parameters are
// formed when the loop first reaches any of its columns, from the current values of all its
// columns (none is quantized yet at that point). Without act_order this is exactly gptq.py.
//
// Scales: with fp16_scales (default) a group's scale is rounded through float16 when it is formed
// and its zero recomputed from that scale, so that a float16-scale export reproduces the codes
// exactly; without it, the float32 scale of gptq.py is kept.
//
// Fixed grid (grid_scale / grid_zero given): the per (row, group) scales and zero points are the
// caller's (e.g. LWC's learned clipping range) instead of formed from W; GPTQ only chooses the
// codes — error-compensating rounding on a given grid. Only the first n_quant columns are
// quantized (n_quant <= 0: all); the later ones take part in H, so each quantized column's error
// is compensated as if the later columns were free too (the caller learns them afterwards, as the
// hybrid quantizer does its high-impact columns with AdaRound). With act_order only the first
// n_quant columns are reordered (by decreasing H_ii); the free ones stay after them. On a fixed
// grid the order is free: every group's parameters are given, so act_order only changes which
// column's error the others compensate (the hybrid quantizer's low part uses it).
//
// Numerics: H^-1's Cholesky factor is computed in float64 (Eigen) through the reversed Cholesky
// of H (H = R R^T with R upper, U = R^-1: one factorization and one triangular inverse instead of
// gptq.py's three factorizations); the column loop runs in float32 like gptq.py. Rows are
// independent given U, so threads split the rows and results do not depend on n_threads.
#pragma once
#include <cstdint>
#include <vector>

#include "hiquant/parallel.hpp"

namespace hiquant {

struct GptqSpec {
  int bits = 4;
  int64_t group_size = 0;  // <= 0: one group per row
  double percdamp = 0.01;
  int64_t blocksize = 128;
  bool act_order = false;
  bool fp16_scales = true;
  const float* grid_scale = nullptr;   // fixed grid: rows x n_groups(n_quant), finite and > 0
  const uint8_t* grid_zero = nullptr;  // fixed grid: rows x n_groups(n_quant), <= 2^bits - 1
  int64_t n_quant = 0;                 // columns to quantize (the first ones); <= 0: all
};

// Caller-allocated outputs: codes and wq are rows x n_quant, scale and zero rows x
// n_groups(n_quant) (the grid itself when it was given).
struct GptqOutput {
  uint8_t* codes;
  float* scale;
  uint8_t* zero;
  float* wq;
};

struct GptqStats {
  double loss = 0.0;          // gptq.py's error: sum over weights of (w - q)^2 / U_ii^2 / 2
  double damp = 0.0;          // the value added to the diagonal
  int64_t n_dead = 0;         // columns with H_ii = 0
  std::vector<int64_t> perm;  // column order of the loop (identity without act_order)
  double seconds_factor = 0.0;
  double seconds_loop = 0.0;
};

// U (n x n, row-major, upper triangle filled, zero below) with U^T U = (H + damp I)^-1, from the
// reversed Cholesky factorization. Throws NumericalError when H + damp I is not positive
// definite. Exposed for tests.
void inverse_cholesky_upper(const double* H, int64_t n, double* U, int n_threads = 0);

GptqStats gptq(const float* W, int64_t rows, int64_t cols, const double* H, const GptqSpec& spec,
               const GptqOutput& out, const RunControl& rc, int n_threads = 0);

}  // namespace hiquant
