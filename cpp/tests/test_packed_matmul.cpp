// The packed-format product (hiquant/packed_matmul.hpp) on edge shapes, run under the sanitizers by
// tools/sanitize.sh: every buffer is allocated at exactly its packed size, so a read past a bit
// stream (the kernels' bounded loads, the table kernel's bit-plane builder) is reported. Each
// kernel (portable, AVX2 register, AVX2 table) equals a float64 dequantize-then-multiply within
// float32 rounding, for a 2-bit part over a column subset (groups of 1..100 columns, short last
// groups and chunks, rows not a multiple of 8) beside a 3-bit (or 4-bit) part over the other
// columns, with float16, 8-bit and 6-bit scales, for 1..3 tokens and 1..3 threads; the table
// kernel with int8 tables within the bound of 8-bit activations.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <utility>
#include <vector>

#include "hiquant/errors.hpp"
#include "hiquant/packed_matmul.hpp"
#include "hiquant/quantizer.hpp"

#include "expect.hpp"

namespace {

uint32_t next(uint32_t& s) {
  s = s * 1664525u + 1013904223u;
  return s >> 8;
}

// Code i of a little-endian stream of `bits`-bit codes.
uint32_t code_at(const std::vector<uint8_t>& b, int64_t i, int bits) {
  uint32_t v = 0;
  for (int k = 0; k < bits; ++k) {
    const int64_t bit = i * bits + k;
    v |= uint32_t((b[size_t(bit >> 3)] >> (bit & 7)) & 1u) << k;
  }
  return v;
}

struct Part {
  int bits;
  int64_t n_cols, group;
  int scale_bits;
  std::vector<int64_t> cols;
  std::vector<uint8_t> qweight, qzeros, codes;
  std::vector<uint16_t> f16, super;
  int64_t super_rows = 3;

  Part(int b, std::vector<int64_t> c, int64_t g, int sb, int64_t d_out, uint32_t& s)
      : bits(b), n_cols(int64_t(c.size())), group(g), scale_bits(sb), cols(std::move(c)) {
    const int64_t ng = hiquant::n_groups(n_cols, group);
    qweight.resize(size_t(hiquant::packed_size(d_out * n_cols, bits)));
    qzeros.resize(size_t(hiquant::packed_size(d_out * ng, bits)));
    for (auto& v : qweight) v = uint8_t(next(s));
    for (auto& v : qzeros) v = uint8_t(next(s));
    if (sb == 16) {
      f16.resize(size_t(d_out * ng));
      for (auto& v : f16) v = uint16_t(0x1c00 + next(s) % 0x1800);  // about 0.004 .. 2
    } else {
      codes.resize(size_t(sb == 8 ? d_out * ng : hiquant::packed_size(d_out * ng, 6)));
      for (auto& v : codes) v = uint8_t(next(s) | 0x21u);  // every 6/8-bit code >= 1
      super.resize(size_t((d_out + super_rows - 1) / super_rows));
      for (auto& v : super) v = uint16_t(0x1400 + next(s) % 0x800);
    }
  }

  hiquant::PackedPart view() const {
    hiquant::PackedPart p;
    p.bits = bits;
    p.n_cols = n_cols;
    p.group_size = group;
    p.cols = cols.data();
    p.qweight = qweight.data();
    p.qzeros = qzeros.data();
    p.scale_bits = scale_bits;
    p.scales_f16 = f16.empty() ? nullptr : f16.data();
    p.scale_codes = codes.empty() ? nullptr : codes.data();
    p.scales_super = super.empty() ? nullptr : super.data();
    p.super_rows = super_rows;
    return p;
  }

  double scale(int64_t r, int64_t g, int64_t ng) const {
    const int64_t i = r * ng + g;
    if (scale_bits == 16) return hiquant::half_to_float(f16[size_t(i)]);
    const double sup = hiquant::half_to_float(super[size_t(r / super_rows)]);
    return sup * (scale_bits == 8 ? codes[size_t(i)] : code_at(codes, i, 6));
  }

  // W[r, cols[j]] (float64) and |s| (|code| + |zero|) for the bound
  void add_to(std::vector<double>& W, std::vector<double>& A, int64_t d_out, int64_t d_in) const {
    const int64_t ng = hiquant::n_groups(n_cols, group);
    const int64_t g = (group <= 0 || group >= n_cols) ? n_cols : group;
    for (int64_t r = 0; r < d_out; ++r)
      for (int64_t j = 0; j < n_cols; ++j) {
        const double s = scale(r, j / g, ng);
        const double q = code_at(qweight, r * n_cols + j, bits);
        const double z = code_at(qzeros, r * ng + j / g, bits);
        W[size_t(r * d_in + cols[size_t(j)])] = s * (q - z);
        A[size_t(r * d_in + cols[size_t(j)])] = s * (q + z);
      }
  }
};

// The table kernel with int8 tables (PlaneTables::Int8): within the 8-bit activation bound of
// the exact product, |s| * xs / 2 * (2^b - 1) per column quad and group, with xs at most the
// group's 4 max |x| / 127; identical for any thread count.
void check_int8_tables(const std::vector<Part>& parts,
                       const std::vector<hiquant::PackedPart>& views, const std::vector<double>& W, const std::vector<double>& A, int64_t d_out,
                       int64_t d_in, const std::vector<float>& x, int64_t n_tok) {
  const hiquant::PackedPlanes planes =
      hiquant::make_packed_planes(d_out, d_in, views, 2, hiquant::PlaneTables::Int8);
  EXPECT(planes.parts.size() == views.size());
  std::vector<float> y1;
  for (int threads = 1; threads <= 3; ++threads) {
    std::vector<float> y(size_t(n_tok * d_out), -1.0f);
    hiquant::packed_matmul(d_out, d_in, views, x.data(), n_tok, y.data(), threads,
                           hiquant::PackedKernel::Lut, &planes);
    for (int64_t t = 0; t < n_tok; ++t)
      for (int64_t r = 0; r < d_out; ++r) {
        double ref = 0, bound = 0, bound8 = 0;
        for (int64_t c = 0; c < d_in; ++c) {
          ref += W[size_t(r * d_in + c)] * x[size_t(t * d_in + c)];
          bound += A[size_t(r * d_in + c)] * std::fabs(x[size_t(t * d_in + c)]);
        }
        for (size_t i = 0; i < parts.size(); ++i) {
          if (planes.parts[i].bits == 0) continue;
          const Part& p = parts[i];
          const int64_t ng = hiquant::n_groups(p.n_cols, p.group);
          const int64_t g = (p.group <= 0 || p.group >= p.n_cols) ? p.n_cols : p.group;
          for (int64_t gi = 0; gi < ng; ++gi) {
            const int64_t j0 = gi * g, j1 = std::min(p.n_cols, j0 + g);
            double mx = 0;
            for (int64_t j = j0; j < j1; ++j)
              mx = std::max(mx, std::fabs(double(x[size_t(t * d_in + p.cols[size_t(j)])])));
            bound8 += std::fabs(p.scale(r, gi, ng)) * (4 * mx / 127) / 2 *
                      double((1 << p.bits) - 1) * double((j1 - j0 + 3) / 4);
          }
        }
        const double err = std::fabs(double(y[size_t(t * d_out + r)]) - ref);
        if (!(err <= bound8 + 4e-6 * bound + 1e-30)) {
          std::fprintf(stderr, "int8 tables %lldx%lld tokens %lld row %lld: error %g, bound %g\n",
                       (long long)d_out, (long long)d_in, (long long)n_tok, (long long)r, err,
                       bound8);
          ++failures;
          return;
        }
      }
    if (threads == 1)
      y1 = y;
    else
      EXPECT(y == y1);
  }
}

void check_case(int64_t d_out, int64_t d_in, int64_t n_low, int64_t group, int sb, uint32_t seed,
                int high_bits = 3) {
  uint32_t s = seed;
  std::vector<int64_t> perm(static_cast<size_t>(d_in));
  for (int64_t i = 0; i < d_in; ++i) perm[size_t(i)] = i;
  for (int64_t i = d_in - 1; i > 0; --i) std::swap(perm[size_t(i)], perm[next(s) % (i + 1)]);
  std::vector<int64_t> low(perm.begin(), perm.begin() + n_low), high(perm.begin() + n_low, perm.end());
  std::vector<Part> parts;
  parts.emplace_back(2, low, group, sb, d_out, s);
  if (!high.empty()) parts.emplace_back(high_bits, high, group, sb, d_out, s);
  std::vector<hiquant::PackedPart> views;
  for (const Part& p : parts) views.push_back(p.view());
  std::vector<double> W(size_t(d_out * d_in), 0.0), A(size_t(d_out * d_in), 0.0);
  for (const Part& p : parts) p.add_to(W, A, d_out, d_in);
  const hiquant::PackedPlanes planes = hiquant::make_packed_planes(d_out, d_in, views, 2);
  const bool avx2 = hiquant::packed_avx2_available();
  EXPECT(avx2 ? planes.parts.size() == views.size() && planes.parts[0].bits == (n_low ? 2 : 0)
              : planes.parts.empty());
  for (int64_t n_tok = 1; n_tok <= 3; ++n_tok) {
    std::vector<float> x(size_t(n_tok * d_in));
    for (auto& v : x) v = float(int(next(s) % 2001) - 1000) / 1000.0f;
    std::vector<hiquant::PackedKernel> kernels{hiquant::PackedKernel::Portable};
    if (avx2) kernels.insert(kernels.end(), {hiquant::PackedKernel::Avx2, hiquant::PackedKernel::Lut});
    for (auto k : kernels) {
      std::vector<float> y1;
      for (int threads = 1; threads <= 3; ++threads) {
        std::vector<float> y(size_t(n_tok * d_out), -1.0f);
        hiquant::packed_matmul(d_out, d_in, views, x.data(), n_tok, y.data(), threads, k, &planes);
        for (int64_t t = 0; t < n_tok; ++t)
          for (int64_t r = 0; r < d_out; ++r) {
            double ref = 0, bound = 0;
            for (int64_t c = 0; c < d_in; ++c) {
              ref += W[size_t(r * d_in + c)] * x[size_t(t * d_in + c)];
              bound += A[size_t(r * d_in + c)] * std::fabs(x[size_t(t * d_in + c)]);
            }
            const double err = std::fabs(double(y[size_t(t * d_out + r)]) - ref);
            if (!(err <= 4e-6 * bound + 1e-30)) {
              std::fprintf(stderr, "case %lldx%lld low %lld group %lld scale_bits %d kernel %d "
                           "tokens %lld row %lld: error %g, bound %g\n", (long long)d_out,
                           (long long)d_in, (long long)n_low, (long long)group, sb, int(k),
                           (long long)n_tok, (long long)r, err, bound);
              ++failures;
              return;
            }
          }
        if (threads == 1)
          y1 = y;
        else
          EXPECT(y == y1);  // identical for any thread count
      }
    }
    if (avx2) check_int8_tables(parts, views, W, A, d_out, d_in, x, n_tok);
  }
}

// A plane layout made for another layer is refused, not read past its end.
void check_mismatched_planes_refused() {
  if (!hiquant::packed_avx2_available()) return;
  uint32_t s = 7;
  std::vector<int64_t> cols(64);
  for (int64_t j = 0; j < 64; ++j) cols[size_t(j)] = j;
  const Part small(2, cols, 32, 6, 8, s), tall(2, cols, 32, 6, 16, s);
  const std::vector<hiquant::PackedPart> a{small.view()}, b{tall.view()};
  const hiquant::PackedPlanes pa = hiquant::make_packed_planes(8, 64, a, 1);
  std::vector<float> x(64, 1.0f), y(16);
  bool thrown = false;
  try {
    hiquant::packed_matmul(16, 64, b, x.data(), 1, y.data(), 1, hiquant::PackedKernel::Lut, &pa);
  } catch (const hiquant::InvalidArgument&) {
    thrown = true;
  }
  EXPECT(thrown);
}

}  // namespace

int main() {
  check_mismatched_planes_refused();
  uint32_t seed = 1;
  const int64_t shapes[][3] = {{1, 1, 1},    {3, 40, 40},   {8, 64, 64},   {9, 97, 80},
                               {17, 130, 99}, {33, 203, 150}, {40, 64, 0}};  // {d_out, d_in, 2-bit columns}
  const int64_t groups[] = {0, 1, 5, 31, 32, 33, 64, 100};
  for (const auto& sh : shapes)
    for (int64_t g : groups)
      for (int sb : {16, 8, 6}) check_case(sh[0], sh[1], sh[2], g, sb, ++seed);
  // a 4-bit part beside the 2-bit one (the int8 tables lay out 4-bit parts too)
  for (int64_t g : {0, 8, 33, 64}) check_case(17, 130, 99, g, 6, ++seed, 4);
  return test_result("test_packed_matmul");
}
