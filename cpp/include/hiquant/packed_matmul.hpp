// y = W x straight from hiquant's stored format (python/hiquant/storage.py), never forming the
// float weight matrix: one token (GEMV, the decode case) or a few (small-batch GEMM).
//
// A layer (d_out, d_in) is a list of column parts. Each part holds n_cols input columns (`cols`,
// the input column of each part column; nullptr: the identity, part column j is input column j)
// stored either
//  * quantized (bits 2, 3, 4, 6, 8): codes packed densely little-endian in row-major order (code
//    i = r * n_cols + j at bits [i * bits, (i + 1) * bits) of `qweight`, quantizer.pack_codes'
//    layout), groups of group_size consecutive columns of the part (n_groups(n_cols, group_size)
//    per row, the last one possibly shorter), per group a zero point packed the same way at
//    `bits` bits (index r * n_groups + g) and a scale stored as
//      scale_bits 16: a float16 (raw bits in scales_f16[r * n_groups + g]);
//      scale_bits 8:  a code c in 1..255 (scale_codes[r * n_groups + g]) times the float16
//                     super-scale scales_super[r / super_rows], the product formed in float32;
//      scale_bits 6:  the same with 6-bit codes packed densely (index r * n_groups + g);
//    the weight is scale * (code - zero);
//  * or float16 (bits 16): values (raw bits) in fp16[r * n_cols + j].
//
// Arithmetic, everything in float32. The AVX2+FMA kernel forms each weight s * (code - zero) in
// registers (2/3-bit codes index a per-(row, group) table of the 2^b values s * (k - zero), one
// rounding each; 4/6/8-bit codes as s * code - s * zero by one FMA) and accumulates w * x over
// eight lanes per (row, token), 4 rows x 1-2 tokens or 2 rows x 3-4 tokens per pass sharing the
// activation loads; the portable kernel forms, per group, s * (sum_j code_j x_j - zero * sum_j x_j)
// with the x sums once per call. From 24 tokens on (prefill), the AVX2 kernel instead dequantizes
// blocks of 48 rows (the same weights, float32) and multiplies them by the float32 GEMM
// micro-kernel (gemm.hpp). All paths equal dequantize-then-multiply within float32 rounding
// (checked against the float64 twin python/hiquant/_reference/packed_matmul.py). Each output row
// is computed by one thread in a fixed order (blocks of 32 or 48 rows), so results are identical for any
// thread count; the two kernels differ in the last bits.
#pragma once
#include <cstdint>
#include <vector>

namespace hiquant {

struct PackedPart {
  int bits = 0;               // 2, 3, 4, 6, 8, or 16 (float16 values)
  int64_t n_cols = 0;
  int64_t group_size = 0;     // <= 0 or >= n_cols: one group per row
  const int64_t* cols = nullptr;    // (n_cols,) input columns, or nullptr for the identity
  const uint8_t* qweight = nullptr; // packed codes, packed_size(d_out * n_cols, bits) bytes
  const uint8_t* qzeros = nullptr;  // packed zero points, packed_size(d_out * n_groups, bits)
  int scale_bits = 16;              // 16, 8 or 6
  const uint16_t* scales_f16 = nullptr;  // scale_bits 16: (d_out * n_groups) float16 bits
  const uint8_t* scale_codes = nullptr;  // 8: d_out * n_groups bytes; 6: packed at 6 bits
  const uint16_t* scales_super = nullptr;  // 8 / 6: ceil(d_out / super_rows) float16 bits
  int64_t super_rows = 1;
  const uint16_t* fp16 = nullptr;   // bits 16: (d_out * n_cols) float16 bits
};

enum class PackedKernel { Auto = 0, Portable = 1, Avx2 = 2 };

// Validates a layer's parts (widths, sizes, columns in range; the buffers' sizes are the
// caller's to check against packed_size) and throws InvalidArgument naming what is wrong.
void validate_packed_parts(int64_t d_out, int64_t d_in, const std::vector<PackedPart>& parts);

// Bytes of weight data one product reads (codes, scales, zero points, super-scales, float16
// values, column indices): what a call moves from memory.
int64_t packed_bytes(int64_t d_out, const std::vector<PackedPart>& parts);

// y (n_tok, d_out) = x (n_tok, d_in) W^T, row-major. `kernel`: Auto picks AVX2+FMA (with F16C)
// where the CPU has it, else the portable kernel; Avx2 on a CPU without it throws InvalidArgument.
void packed_matmul(int64_t d_out, int64_t d_in, const std::vector<PackedPart>& parts,
                   const float* x, int64_t n_tok, float* y, int n_threads = 0,
                   PackedKernel kernel = PackedKernel::Auto);

// Whether the AVX2+FMA+F16C kernel is compiled in and this CPU runs it.
bool packed_avx2_available();
// "avx2-fma" or "portable": the kernel `kernel` resolves to on this CPU.
const char* packed_kernel_name(PackedKernel kernel);

// float16 bits to float32, exact (subnormals, infinities, NaN).
float half_to_float(uint16_t h);

}  // namespace hiquant
