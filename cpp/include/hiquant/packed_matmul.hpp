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
// micro-kernel (gemm.hpp). All paths but the opt-in int8 tables (PlaneTables::Int8) equal
// dequantize-then-multiply within float32 rounding
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

// Auto: the table kernel (Lut) for decode (up to kLutTokens / kLutTokensInt8 tokens) where the
// layer has a plane layout, else Avx2 where the CPU has it, else Portable. Lut: the table kernel
// for the laid-out parts at every token count (the other parts on Avx2); it needs a PackedPlanes
// and AVX2, and runs the layout's tables (float32 or int8, see PlaneTables).
enum class PackedKernel { Auto = 0, Portable = 1, Avx2 = 2, Lut = 3 };

// The table kernel's tables. Float32: every result within float32 rounding of
// dequantize-then-multiply, as the other kernels. Int8 (T-MAC's route, opt-in): per token, each
// group's activations are quantized with the tables (one scale per group and token, xs = the
// group's largest |table entry| / 127, entries rounded to the nearest integer), so the result
// differs from the exact product by at most |s| * xs / 2 * (2^bits - 1) * ceil(g / 4) per (row,
// group) of a laid-out part (s the group's scale, g its column count), the error of 8-bit
// activations; the exact kernels are unchanged.
enum class PlaneTables { Float32 = 0, Int8 = 1 };

// Bit-plane layout of some of a layer's parts (make_packed_planes says which) for the
// table-lookup decode kernel (T-MAC's scheme, Wei et al. 2024). A part's columns are cut into
// chunks of consecutive columns inside one group (a group of g columns gives ceil(g / W) chunks
// of up to W columns; the last chunk of a group may be short; bits past a short chunk are 0);
// rows in blocks of R, rows past d_out zero.
//  * Float32 tables (W = 32, R = 8): for each row block rb, chunk c and bit plane p, one 32-bit
//    word per row holds bit p of the chunk's codes (bit j = column j of the chunk):
//    words[((rb * n_chunks + c) * bits + p) * 8 + (r % 8)]. Per token the kernel forms, for each
//    chunk, ten 8-entry tables of the subset sums of its column triples (3j, 3j + 1, 3j + 2) and
//    one of its last pair (30, 31), float32; a row's plane-p sum over the chunk is then 11 table
//    lookups by 3-bit fields of its word (one register permute for 8 rows each).
//  * Int8 tables (W = 8, R = 16): planes in pairs (2q, 2q + 1; a 3-bit part's plane 3 is zero):
//    for each row block, chunk and pair q, 32 bytes, byte 2 * (r % 16) + e holding bit 2q + e of
//    row r's codes (bit j = column j of the chunk): nibbles[((rb * n_chunks + c) * n_pairs + q)
//    * 32 + 2 * (r % 16) + e]. Per token the kernel forms, for each chunk, two 16-entry int8
//    tables of the subset sums of its column quads (0-3: low nibbles, 4-7: high nibbles); one
//    byte shuffle looks up 16 rows' two planes, and one multiply-add of byte pairs by (4^q,
//    2 * 4^q) adds them as 16-bit integers.
// The chunk's integer dot product sum_j code_j x_j = sum_p 2^p plane_p, and a group's
// contribution s * (dot - zero * sum_j x_j), as the portable kernel's. Scales and zero points
// are copied in the same row-block order, [(rb * n_groups + g) * R + r % R], a byte per zero
// point and 6-bit code. Built once per layer.
struct PackedPlanes {
  struct Part {
    int bits = 0;                       // 0: the part is not laid out (other kernels run it)
    int64_t n_chunks = 0;
    std::vector<int64_t> chunk_col;     // (n_chunks,) first part column of each chunk
    std::vector<int64_t> group_chunk;   // (n_groups + 1,) first chunk of each group
    std::vector<uint32_t> words;        // Float32 tables' plane words
    std::vector<uint8_t> nibbles;       // Int8 tables' plane bytes
    // the part's scales and zero points in the row-block order: scale_bits 16: float16 bits
    // (scale16); 8 and 6: the codes, one byte each (scale8, times the row's super-scale); zero
    // points one byte each
    std::vector<uint16_t> scale16;
    std::vector<uint8_t> scale8, zero8;
    // columns of chunk c of a part of n_cols columns
    int64_t chunk_len(int64_t c, int64_t n_cols) const {
      return (c + 1 < n_chunks ? chunk_col[c + 1] : n_cols) - chunk_col[c];
    }
    // bytes of the plane codes, scales and zero points
    int64_t nbytes() const {
      return int64_t(words.size() * sizeof(uint32_t) + nibbles.size() +
                     scale16.size() * sizeof(uint16_t) + scale8.size() + zero8.size());
    }
  };
  PlaneTables tables = PlaneTables::Float32;
  std::vector<Part> parts;  // one per PackedPart, in order
  int64_t nbytes() const;   // bytes of the plane codes and the reordered scales and zero points
  // columns per chunk and rows per block of the layout
  int64_t chunk_cols() const { return tables == PlaneTables::Int8 ? 8 : 32; }
  int64_t block_rows() const { return tables == PlaneTables::Int8 ? 16 : 8; }
};

// Tokens per call up to which Auto takes the table kernel: float32 tables, one (decode; from two
// tokens on the register kernel is as fast, sharing each decoded weight across tokens); int8
// tables, eight (decode steps of up to 8 sequences; measured 1.3-4x faster than the register
// kernel at 2..8 tokens, bench/RESULTS.md). Longer products (prefill, evaluation) stay exact.
constexpr int64_t kLutTokens = 1;
constexpr int64_t kLutTokensInt8 = 8;

// The plane layout for `tables`: Float32, every 2-bit part and every 3-bit part with column
// indices over at most half of d_in (other parts get bits 0: full-width 3-bit and 4-bit parts
// decode as fast or faster on the register kernel); Int8, every 2-, 3- and 4-bit part. Empty (no
// parts) where the CPU lacks AVX2, which the table kernel needs. Parallel over row blocks.
PackedPlanes make_packed_planes(int64_t d_out, int64_t d_in, const std::vector<PackedPart>& parts,
                                int n_threads = 0, PlaneTables tables = PlaneTables::Float32);

// Validates a layer's parts (widths, sizes, columns in range; the buffers' sizes are the
// caller's to check against packed_size) and throws InvalidArgument naming what is wrong.
void validate_packed_parts(int64_t d_out, int64_t d_in, const std::vector<PackedPart>& parts);

// Bytes of weight data one product reads (codes, scales, zero points, super-scales, float16
// values, column indices): what a call moves from memory.
int64_t packed_bytes(int64_t d_out, const std::vector<PackedPart>& parts);

// Bytes of weight data a one-token (decode) product reads when the table kernel runs the parts
// `planes` lays out: their plane words, reordered scales and zero points, super-scales and column
// indices, and the other parts' packed_bytes. planes nullptr or empty: packed_bytes.
int64_t packed_decode_bytes(int64_t d_out, const std::vector<PackedPart>& parts,
                            const PackedPlanes* planes);

// y (n_tok, d_out) = x (n_tok, d_in) W^T, row-major. `kernel`: Auto picks AVX2+FMA (with F16C)
// where the CPU has it, else the portable kernel; Avx2 on a CPU without it throws InvalidArgument.
// `planes`: the layer's plane layout (make_packed_planes), or nullptr (no table kernel).
void packed_matmul(int64_t d_out, int64_t d_in, const std::vector<PackedPart>& parts,
                   const float* x, int64_t n_tok, float* y, int n_threads = 0,
                   PackedKernel kernel = PackedKernel::Auto,
                   const PackedPlanes* planes = nullptr);

// Whether the AVX2+FMA+F16C kernel is compiled in and this CPU runs it.
bool packed_avx2_available();
// "avx2-fma", "avx2-lut" or "portable": the kernel `kernel` resolves to on this CPU (Auto names
// the instruction set, "avx2-fma", also when decode takes the table kernel).
const char* packed_kernel_name(PackedKernel kernel);

// float16 bits to float32, exact (subnormals, infinities, NaN).
float half_to_float(uint16_t h);

}  // namespace hiquant
