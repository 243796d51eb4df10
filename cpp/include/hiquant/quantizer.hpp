// Uniform asymmetric b-bit quantization of a float32 weight matrix W (rows = d_out, cols = d_in).
//
// Grouping: group_size g <= 0 (or g >= cols) gives one group per output row. Otherwise group j of
// a row covers columns [j*g, min((j+1)*g, cols)); when g does not divide cols the LAST group is
// shorter (cols % g columns) and gets its own parameters, as GPTQ's column loop forms groups.
// Parameters are stored row-major with shape (rows, n_groups(cols, g)).
//
// The exact arithmetic (mirrored by hiquant._reference.quantizer in float64 NumPy):
//   lo = min(0, min_group(w)), hi = max(0, max_group(w))    (the range always includes 0, as
//                                                            GPTQ's Quantizer; lo = -1, hi = 1 when
//                                                            the group is all zeros)
//   scale = float32((double(hi) - double(lo)) / maxq),     maxq = 2^bits - 1
//   zero  = clamp(rint(-double(lo) / double(scale)), 0, maxq)
//   code  = clamp(rint(double(w) / double(scale)) + zero, 0, maxq)
//   w_hat = float32(scale * float32(code - zero))
// rint is round-half-to-even (numpy.rint). Divisions run in double so that codes are identical
// to the float64 reference, not just close.
#pragma once
#include <cstdint>

#include "hiquant/parallel.hpp"

namespace hiquant {

struct QuantSpec {
  int bits = 4;            // 2..8
  int64_t group_size = 0;  // <= 0: per output row
};

int64_t n_groups(int64_t cols, int64_t group_size);
void validate_spec(const QuantSpec& spec, int64_t cols);

// Min-max parameters: scale (float32) and zero (uint8 integer code), each (rows, n_groups).
void minmax_params(const float* W, int64_t rows, int64_t cols, const QuantSpec& spec, float* scale,
                   uint8_t* zero, int n_threads = 0);

// Integer codes in [0, 2^bits - 1] under the given parameters.
void quantize(const float* W, int64_t rows, int64_t cols, const QuantSpec& spec, const float* scale,
              const uint8_t* zero, uint8_t* codes, int n_threads = 0);

// w_hat = scale * (code - zero).
void dequantize(const uint8_t* codes, int64_t rows, int64_t cols, const QuantSpec& spec,
                const float* scale, const uint8_t* zero, float* out, int n_threads = 0);

// minmax_params + quantize + dequantize fused in one pass over W (parameters optional outputs).
void fake_quantize(const float* W, int64_t rows, int64_t cols, const QuantSpec& spec, float* out,
                   float* scale_out = nullptr, uint8_t* zero_out = nullptr, int n_threads = 0);

// Round-half-to-even of a double with |x| < 2^51, exact and branch-free (vectorizes on SSE2,
// where std::nearbyint would be a library call): adding and subtracting 1.5 * 2^52 leaves the
// value rounded by the FPU's default round-to-nearest-even mode. Correct only without
// -ffast-math / -fassociative-math, which the build never enables.
inline double rint_exact(double x) {
  constexpr double kMagic = 6755399441055744.0;  // 1.5 * 2^52
  return (x + kMagic) - kMagic;
}

// Bit-packing of codes < 2^bits, bits in {2, 3, 4, 6, 8}: code i occupies bits [i*b, (i+1)*b) of a
// little-endian bit stream (LSB first), so 3-bit codes pack densely (8 codes in 3 bytes).
int64_t packed_size(int64_t n_codes, int bits);
void pack_codes(const uint8_t* codes, int64_t n, int bits, uint8_t* out, int n_threads = 0);
void unpack_codes(const uint8_t* packed, int64_t n, int bits, uint8_t* out, int n_threads = 0);

}  // namespace hiquant
