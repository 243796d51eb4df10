#include "hiquant/quantizer.hpp"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "hiquant/errors.hpp"

namespace hiquant {

int64_t n_groups(int64_t cols, int64_t group_size) {
  if (group_size <= 0 || group_size >= cols) return cols > 0 ? 1 : 0;
  return (cols + group_size - 1) / group_size;
}

void validate_spec(const QuantSpec& spec, int64_t cols) {
  HQ_CHECK(spec.bits >= 2 && spec.bits <= 8, "bits must be in 2..8, got ", spec.bits);
  HQ_CHECK(cols > 0, "the weight matrix has no columns");
  (void)cols;
}

namespace {

inline int64_t group_width(int64_t cols, int64_t group_size) {
  return (group_size <= 0 || group_size >= cols) ? cols : group_size;
}

struct GroupParams {
  float scale;
  uint8_t zero;
};

// Min-max parameters of one group; throws NumericalError on a non-finite weight.
inline GroupParams group_minmax(const float* w, int64_t n, int maxq, int64_t row, int64_t col0) {
  float lo = 0.0f, hi = 0.0f;  // the range always includes 0
  bool finite = true;
  for (int64_t c = 0; c < n; ++c) {
    const float v = w[c];
    finite &= std::isfinite(v);
    lo = std::min(lo, v);
    hi = std::max(hi, v);
  }
  if (!finite) {
    for (int64_t c = 0; c < n; ++c)
      if (!std::isfinite(w[c]))
        throw NumericalError(detail::concat("weight is not finite (", w[c], ") at row ", row,
                                            ", column ", col0 + c,
                                            "; check the checkpoint or the preceding computation"));
  }
  if (lo == 0.0f && hi == 0.0f) {
    lo = -1.0f;
    hi = 1.0f;
  }
  const float scale = static_cast<float>((double(hi) - double(lo)) / maxq);
  const double z = rint_exact(-double(lo) / double(scale));
  return {scale, static_cast<uint8_t>(std::clamp(z, 0.0, double(maxq)))};
}

// code = clamp(rint(w / scale) + zero, 0, maxq). The quotient is clamped to +-512 first so that
// rint_exact stays in its exact range for any scale; this cannot change the clamped code because
// zero and maxq are at most 255.
inline uint8_t encode(float w, double scale, double zero, double maxq) {
  double q = double(w) / scale;
  q = std::clamp(q, -512.0, 512.0);
  q = rint_exact(q) + zero;
  return static_cast<uint8_t>(std::clamp(q, 0.0, maxq));
}

void check_params(const float* scale, const uint8_t* zero, int64_t rows, int64_t ng, int maxq) {
  for (int64_t i = 0; i < rows * ng; ++i) {
    HQ_CHECK(std::isfinite(scale[i]) && scale[i] > 0.0f, "scale must be finite and positive; got ",
             scale[i], " at row ", i / ng, ", group ", i % ng);
    HQ_CHECK(zero[i] <= maxq, "zero must be an integer in [0, ", maxq, "]; got ", int(zero[i]),
             " at row ", i / ng, ", group ", i % ng);
  }
}

}  // namespace

void minmax_params(const float* W, int64_t rows, int64_t cols, const QuantSpec& spec, float* scale,
                   uint8_t* zero, int n_threads) {
  validate_spec(spec, cols);
  const int64_t ng = n_groups(cols, spec.group_size), gw = group_width(cols, spec.group_size);
  const int maxq = (1 << spec.bits) - 1;
  parallel_for(rows, n_threads, [&](int64_t r) {
    for (int64_t g = 0; g < ng; ++g) {
      const int64_t c0 = g * gw, n = std::min(gw, cols - c0);
      const GroupParams p = group_minmax(W + r * cols + c0, n, maxq, r, c0);
      scale[r * ng + g] = p.scale;
      zero[r * ng + g] = p.zero;
    }
  });
}

void quantize(const float* W, int64_t rows, int64_t cols, const QuantSpec& spec, const float* scale,
              const uint8_t* zero, uint8_t* codes, int n_threads) {
  validate_spec(spec, cols);
  const int64_t ng = n_groups(cols, spec.group_size), gw = group_width(cols, spec.group_size);
  const int maxq = (1 << spec.bits) - 1;
  check_params(scale, zero, rows, ng, maxq);
  parallel_for(rows, n_threads, [&](int64_t r) {
    for (int64_t g = 0; g < ng; ++g) {
      const int64_t c0 = g * gw, n = std::min(gw, cols - c0);
      const float* w = W + r * cols + c0;
      for (int64_t c = 0; c < n; ++c)
        if (!std::isfinite(w[c]))
          throw NumericalError(detail::concat("weight is not finite (", w[c], ") at row ", r,
                                              ", column ", c0 + c));
      const double s = scale[r * ng + g], z = zero[r * ng + g];
      uint8_t* q = codes + r * cols + c0;
      for (int64_t c = 0; c < n; ++c) q[c] = encode(w[c], s, z, maxq);
    }
  });
}

void dequantize(const uint8_t* codes, int64_t rows, int64_t cols, const QuantSpec& spec,
                const float* scale, const uint8_t* zero, float* out, int n_threads) {
  validate_spec(spec, cols);
  const int64_t ng = n_groups(cols, spec.group_size), gw = group_width(cols, spec.group_size);
  const int maxq = (1 << spec.bits) - 1;
  check_params(scale, zero, rows, ng, maxq);
  for (int64_t i = 0; i < rows * cols; ++i)
    HQ_CHECK(codes[i] <= maxq, "codes must be < 2^bits = ", maxq + 1, "; got ", int(codes[i]),
             " at flat index ", i);
  parallel_for(rows, n_threads, [&](int64_t r) {
    for (int64_t g = 0; g < ng; ++g) {
      const int64_t c0 = g * gw, n = std::min(gw, cols - c0);
      const float s = scale[r * ng + g], z = float(zero[r * ng + g]);
      const uint8_t* q = codes + r * cols + c0;
      float* o = out + r * cols + c0;
      for (int64_t c = 0; c < n; ++c) o[c] = s * (float(q[c]) - z);
    }
  });
}

void fake_quantize(const float* W, int64_t rows, int64_t cols, const QuantSpec& spec, float* out,
                   float* scale_out, uint8_t* zero_out, int n_threads) {
  validate_spec(spec, cols);
  const int64_t ng = n_groups(cols, spec.group_size), gw = group_width(cols, spec.group_size);
  const int maxq = (1 << spec.bits) - 1;
  parallel_for(rows, n_threads, [&](int64_t r) {
    for (int64_t g = 0; g < ng; ++g) {
      const int64_t c0 = g * gw, n = std::min(gw, cols - c0);
      const float* w = W + r * cols + c0;
      const GroupParams p = group_minmax(w, n, maxq, r, c0);
      if (scale_out) scale_out[r * ng + g] = p.scale;
      if (zero_out) zero_out[r * ng + g] = p.zero;
      const double s = p.scale, z = p.zero;
      const float sf = p.scale, zf = float(p.zero);
      float* o = out + r * cols + c0;
      for (int64_t c = 0; c < n; ++c) o[c] = sf * (float(encode(w[c], s, z, maxq)) - zf);
    }
  });
}

// ---------------------------------------------------------------------------------------------
// Packing. A run of 8 codes of b bits is exactly b bytes, so chunks of 8 codes are independent
// and pack in parallel; the tail (n % 8 codes) goes through the generic bit loop.

int64_t packed_size(int64_t n_codes, int bits) {
  HQ_CHECK(bits == 2 || bits == 3 || bits == 4 || bits == 8,
           "packing supports bits in {2, 3, 4, 8}; got ", bits);
  HQ_CHECK(n_codes >= 0, "negative code count ", n_codes);
  return (n_codes * bits + 7) / 8;
}

namespace {
inline void pack8(const uint8_t* c, int bits, uint8_t* o) {
  uint64_t acc = 0;
  for (int k = 0; k < 8; ++k) acc |= uint64_t(c[k]) << (k * bits);
  for (int b = 0; b < bits; ++b) o[b] = uint8_t(acc >> (8 * b));
}
inline void unpack8(const uint8_t* p, int bits, uint8_t* c) {
  uint64_t acc = 0;
  for (int b = 0; b < bits; ++b) acc |= uint64_t(p[b]) << (8 * b);
  const uint64_t mask = (1u << bits) - 1;
  for (int k = 0; k < 8; ++k) c[k] = uint8_t((acc >> (k * bits)) & mask);
}
constexpr int64_t kChunk = 1 << 14;  // codes per parallel task (a multiple of 8)
}  // namespace

void pack_codes(const uint8_t* codes, int64_t n, int bits, uint8_t* out, int n_threads) {
  const int64_t nbytes = packed_size(n, bits);
  const int maxq = (1 << bits) - 1;
  // Validate first: a code that does not fit would be silently truncated (lossy packing).
  for (int64_t i = 0; i < n; ++i)
    HQ_CHECK(codes[i] <= maxq, "codes must be < 2^bits = ", maxq + 1, " to pack losslessly; got ",
             int(codes[i]), " at flat index ", i);
  const int64_t full = n / 8;
  const int64_t n_tasks = (full * 8 + kChunk - 1) / kChunk;
  parallel_for(n_tasks, n_threads, [&](int64_t t) {
    const int64_t b0 = t * (kChunk / 8), b1 = std::min(full, b0 + kChunk / 8);
    for (int64_t k = b0; k < b1; ++k) pack8(codes + 8 * k, bits, out + bits * k);
  });
  // Tail: generic bit loop into the remaining bytes.
  const int64_t tail0 = full * 8;
  std::memset(out + bits * full, 0, size_t(nbytes - bits * full));
  for (int64_t i = tail0; i < n; ++i) {
    const int64_t bit = (i - tail0) * bits;
    uint8_t* dst = out + bits * full;
    const uint32_t v = uint32_t(codes[i]) << (bit % 8);
    dst[bit / 8] |= uint8_t(v);
    if ((bit % 8) + bits > 8) dst[bit / 8 + 1] |= uint8_t(v >> 8);
  }
}

void unpack_codes(const uint8_t* packed, int64_t n, int bits, uint8_t* out, int n_threads) {
  (void)packed_size(n, bits);
  const int64_t full = n / 8;
  const int64_t n_tasks = (full * 8 + kChunk - 1) / kChunk;
  parallel_for(n_tasks, n_threads, [&](int64_t t) {
    const int64_t b0 = t * (kChunk / 8), b1 = std::min(full, b0 + kChunk / 8);
    for (int64_t k = b0; k < b1; ++k) unpack8(packed + bits * k, bits, out + 8 * k);
  });
  const uint8_t* src = packed + bits * full;
  const uint32_t mask = (1u << bits) - 1;
  for (int64_t i = full * 8; i < n; ++i) {
    const int64_t bit = (i - full * 8) * bits;
    uint32_t v = src[bit / 8];
    if ((bit % 8) + bits > 8) v |= uint32_t(src[bit / 8 + 1]) << 8;
    out[i] = uint8_t((v >> (bit % 8)) & mask);
  }
}

}  // namespace hiquant
