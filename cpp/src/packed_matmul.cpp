#include "hiquant/packed_matmul.hpp"

#include <algorithm>
#include <cstring>
#include <string>

#include "hiquant/errors.hpp"
#include "hiquant/parallel.hpp"
#include "hiquant/quantizer.hpp"

#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "the packed kernels read little-endian bit streams with native loads"
#endif

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define HQ_PACKED_X86 1
#include <immintrin.h>
#define HQ_AVX2 __attribute__((target("avx2,fma,f16c")))
#endif

namespace hiquant {

float half_to_float(uint16_t h) {
  const uint32_t sign = uint32_t(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t mant = h & 0x3ffu;
  uint32_t f;
  if (exp == 0) {
    if (mant == 0) {
      f = sign;
    } else {  // subnormal: normalize
      int e = -1;
      do {
        ++e;
        mant <<= 1;
      } while (!(mant & 0x400u));
      f = sign | (uint32_t(127 - 15 - e) << 23) | ((mant & 0x3ffu) << 13);
    }
  } else if (exp == 31) {
    f = sign | 0x7f800000u | (mant << 13);
  } else {
    f = sign | ((exp + 127 - 15) << 23) | (mant << 13);
  }
  float out;
  std::memcpy(&out, &f, sizeof out);
  return out;
}

namespace {

constexpr int64_t kTile = 8;       // tokens per tile (accumulators per row)
constexpr int64_t kRowBlock = 8;   // rows per parallel task

// 64 bits of the stream starting at bit `bitpos`, shifted down so that bit 0 is bitpos. Holds
// 8 codes of up to 7 bits at any bit offset, 8 of 8 bits (always byte-aligned). Never reads past
// nbytes.
inline uint64_t load_bits(const uint8_t* p, int64_t nbytes, int64_t bitpos) {
  const int64_t byte = bitpos >> 3;
  uint64_t v = 0;
  if (byte + 8 <= nbytes)
    std::memcpy(&v, p + byte, 8);
  else
    std::memcpy(&v, p + byte, size_t(nbytes - byte));
  return v >> (bitpos & 7);
}

inline uint32_t code_at(const uint8_t* p, int64_t nbytes, int64_t idx, int bits) {
  return uint32_t(load_bits(p, nbytes, idx * bits)) & ((1u << bits) - 1u);
}

// One part as a call uses it: its activations (gathered when the part has column indices) and
// the per-token sums of each group's activations.
struct PartRun {
  const PackedPart* p = nullptr;
  int64_t ng = 0, g = 0;  // groups per row, columns per group (the last may be shorter)
  int64_t nb_w = 0, nb_z = 0, nb_s = 0;  // bytes of codes, zero points, 6-bit scale codes
  const float* x = nullptr;  // (n_tok, ldx)
  int64_t ldx = 0;
  const float* gs = nullptr;  // (n_tok, ng)
};

inline float row_super(const PartRun& q, int64_t r) {
  const PackedPart& p = *q.p;
  return p.scale_bits == 16 ? 1.0f : half_to_float(p.scales_super[r / p.super_rows]);
}

inline float group_scale(const PartRun& q, int64_t r, int64_t g, float sup) {
  const PackedPart& p = *q.p;
  const int64_t i = r * q.ng + g;
  if (p.scale_bits == 16) return half_to_float(p.scales_f16[i]);
  if (p.scale_bits == 8) return sup * float(p.scale_codes[i]);
  return sup * float(code_at(p.scale_codes, q.nb_s, i, 6));
}

inline float group_zero(const PartRun& q, int64_t r, int64_t g) {
  return float(code_at(q.p->qzeros, q.nb_z, r * q.ng + g, q.p->bits));
}

// ------------------------------------------------------------------------------ portable kernel
void rows_portable(const std::vector<PartRun>& runs, int64_t r, int64_t t0, int64_t T, float* y,
                   int64_t d_out) {
  float out[kTile] = {};
  for (const PartRun& q : runs) {
    const PackedPart& p = *q.p;
    const int64_t n = p.n_cols;
    if (n == 0) continue;
    if (p.bits == 16) {
      const uint16_t* h = p.fp16 + r * n;
      for (int64_t t = 0; t < T; ++t) {
        const float* x = q.x + (t0 + t) * q.ldx;
        float lane[8] = {};
        int64_t c = 0;
        for (; c + 8 <= n; c += 8)
          for (int k = 0; k < 8; ++k) lane[k] += half_to_float(h[c + k]) * x[c + k];
        float s = 0;
        for (; c < n; ++c) s += half_to_float(h[c]) * x[c];
        for (int k = 0; k < 8; ++k) s += lane[k];
        out[t] += s;
      }
      continue;
    }
    const int bits = p.bits;
    const uint64_t mask = (uint64_t(1) << bits) - 1;
    const float sup = row_super(q, r);
    const int64_t base = r * n;
    for (int64_t gi = 0; gi < q.ng; ++gi) {
      const int64_t c0 = gi * q.g, c1 = std::min(n, c0 + q.g);
      const float s = group_scale(q, r, gi, sup), z = group_zero(q, r, gi);
      float lane[kTile][8] = {};
      float tail[kTile] = {};
      int64_t c = c0;
      for (; c + 8 <= c1; c += 8) {
        const uint64_t v = load_bits(p.qweight, q.nb_w, (base + c) * bits);
        float w[8];
        for (int k = 0; k < 8; ++k) w[k] = float((v >> (k * bits)) & mask);
        for (int64_t t = 0; t < T; ++t) {
          const float* x = q.x + (t0 + t) * q.ldx + c;
          for (int k = 0; k < 8; ++k) lane[t][k] += w[k] * x[k];
        }
      }
      for (; c < c1; ++c) {
        const float w = float(code_at(p.qweight, q.nb_w, base + c, bits));
        for (int64_t t = 0; t < T; ++t) tail[t] += w * q.x[(t0 + t) * q.ldx + c];
      }
      for (int64_t t = 0; t < T; ++t) {
        float dot = tail[t];
        for (int k = 0; k < 8; ++k) dot += lane[t][k];
        out[t] += s * (dot - z * q.gs[(t0 + t) * q.ng + gi]);
      }
    }
  }
  for (int64_t t = 0; t < T; ++t) y[(t0 + t) * d_out + r] = out[t];
}

// --------------------------------------------------------------------------- AVX2+FMA+F16C kernel
#if defined(HQ_PACKED_X86)
bool cpu_has_avx2_fma_f16c() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
         __builtin_cpu_supports("f16c");
}

// Eight codes (v's low 8 * BITS bits) as eight float lanes.
template <int BITS>
HQ_AVX2 inline __m256 decode8(uint64_t v) {
  const __m256i mask = _mm256_set1_epi32((1 << BITS) - 1);
  if constexpr (BITS <= 3) {
    // A permute by the low 3 bits of each lane is the code-to-float table (no mask, no convert):
    // for 2 bits the third bit belongs to the next code, which the repeated table ignores.
    const __m256i sh = _mm256_setr_epi32(0, BITS, 2 * BITS, 3 * BITS, 4 * BITS, 5 * BITS,
                                         6 * BITS, 7 * BITS);
    const __m256 table = BITS == 2 ? _mm256_setr_ps(0, 1, 2, 3, 0, 1, 2, 3)
                                   : _mm256_setr_ps(0, 1, 2, 3, 4, 5, 6, 7);
    const __m256i q = _mm256_srlv_epi32(_mm256_set1_epi32(int(uint32_t(v))), sh);
    return _mm256_permutevar8x32_ps(table, q);
  } else if constexpr (BITS == 4) {
    const __m256i sh = _mm256_setr_epi32(0, BITS, 2 * BITS, 3 * BITS, 4 * BITS, 5 * BITS,
                                         6 * BITS, 7 * BITS);
    const __m256i q = _mm256_srlv_epi32(_mm256_set1_epi32(int(uint32_t(v))), sh);
    return _mm256_cvtepi32_ps(_mm256_and_si256(q, mask));
  } else {
    // Code k starts at bit k * BITS: bytes (k * BITS) / 8 and the next into lane k, then shift.
#define HQ_B(k) char((k * BITS) / 8), char((k * BITS) / 8 + 1), char(-128), char(-128)
    const __m256i idx = _mm256_setr_epi8(HQ_B(0), HQ_B(1), HQ_B(2), HQ_B(3), HQ_B(4), HQ_B(5),
                                         HQ_B(6), HQ_B(7));
#undef HQ_B
    const __m256i sh = _mm256_setr_epi32(0, BITS % 8, (2 * BITS) % 8, (3 * BITS) % 8,
                                         (4 * BITS) % 8, (5 * BITS) % 8, (6 * BITS) % 8,
                                         (7 * BITS) % 8);
    const __m256i b = _mm256_broadcastsi128_si256(_mm_cvtsi64_si128((long long)v));
    const __m256i q = _mm256_srlv_epi32(_mm256_shuffle_epi8(b, idx), sh);
    return _mm256_cvtepi32_ps(_mm256_and_si256(q, mask));
  }
}

HQ_AVX2 inline float hsum8(__m256 v) {
  const __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 s2 = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s2, _mm_movehdup_ps(s2)));
}

template <int BITS, int T>
HQ_AVX2 void part_row_avx2(const PartRun& q, int64_t r, int64_t t0, __m256* racc, float* rs) {
  const PackedPart& p = *q.p;
  const int64_t n = p.n_cols;
  const float sup = row_super(q, r);
  const int64_t base = r * n;
  const float* xs[T];
  for (int t = 0; t < T; ++t) xs[t] = q.x + (t0 + t) * q.ldx;
  // The row's scales, eight groups at a time, and the zero-point term
  // sum_g s_g z_g sum_{j in g} x_j of each token, before the code sums.
  static thread_local std::vector<float> scratch;
  if (int64_t(scratch.size()) < q.ng + 8) scratch.resize(size_t(q.ng + 8));
  float* sc = scratch.data();
  int64_t g8 = 0;
  if (p.scale_bits == 16) {
    for (; g8 + 8 <= q.ng; g8 += 8)
      _mm256_storeu_ps(sc + g8, _mm256_cvtph_ps(_mm_loadu_si128(
                                    reinterpret_cast<const __m128i*>(p.scales_f16 + r * q.ng + g8))));
  }
  for (; g8 < q.ng; ++g8) sc[g8] = group_scale(q, r, g8, sup);
  {
    float zt[T] = {};
    for (int64_t gi = 0; gi < q.ng; ++gi) {
      const float sz = sc[gi] * group_zero(q, r, gi);
      for (int t = 0; t < T; ++t) zt[t] += sz * q.gs[(t0 + t) * q.ng + gi];
    }
    for (int t = 0; t < T; ++t) rs[t] -= zt[t];
  }
  for (int64_t gi = 0; gi < q.ng; ++gi) {
    const int64_t c0 = gi * q.g, c1 = std::min(n, c0 + q.g);
    const float s = sc[gi];
    // U independent accumulator sets hide the FMA latency when there are few tokens.
    constexpr int U = T <= 2 ? 4 : (T <= 4 ? 2 : 1);
    __m256 acc[U][T];
    for (int u = 0; u < U; ++u)
      for (int t = 0; t < T; ++t) acc[u][t] = _mm256_setzero_ps();
    const int64_t nfull = (c1 - c0) / 8;
    const int64_t bit0 = (base + c0) * BITS;
    if (((bit0 + nfull * 8 * BITS) >> 3) + 8 <= q.nb_w) {
      // Eight codes are BITS bytes further on at the same bit shift: plain 8-byte loads.
      const uint8_t* wp = p.qweight + (bit0 >> 3);
      const int sh = int(bit0 & 7);
      int64_t m = 0;
      for (; m + U <= nfull; m += U) {
        for (int u = 0; u < U; ++u) {
          uint64_t v;
          std::memcpy(&v, wp + (m + u) * BITS, 8);
          const __m256 w = decode8<BITS>(v >> sh);
          const int64_t c = c0 + 8 * (m + u);
          for (int t = 0; t < T; ++t)
            acc[u][t] = _mm256_fmadd_ps(w, _mm256_loadu_ps(xs[t] + c), acc[u][t]);
        }
      }
      for (; m < nfull; ++m) {
        uint64_t v;
        std::memcpy(&v, wp + m * BITS, 8);
        const __m256 w = decode8<BITS>(v >> sh);
        const int64_t c = c0 + 8 * m;
        for (int t = 0; t < T; ++t)
          acc[0][t] = _mm256_fmadd_ps(w, _mm256_loadu_ps(xs[t] + c), acc[0][t]);
      }
    } else {  // near the end of the stream: bounded loads
      for (int64_t m = 0; m < nfull; ++m) {
        const int64_t c = c0 + 8 * m;
        const __m256 w = decode8<BITS>(load_bits(p.qweight, q.nb_w, (base + c) * BITS));
        for (int t = 0; t < T; ++t)
          acc[0][t] = _mm256_fmadd_ps(w, _mm256_loadu_ps(xs[t] + c), acc[0][t]);
      }
    }
    for (int u = 1; u < U; ++u)
      for (int t = 0; t < T; ++t) acc[0][t] = _mm256_add_ps(acc[0][t], acc[u][t]);
    int64_t c = c0 + 8 * nfull;
    float tail[T] = {};
    for (; c < c1; ++c) {
      const float w = float(code_at(p.qweight, q.nb_w, base + c, BITS));
      for (int t = 0; t < T; ++t) tail[t] += w * xs[t][c];
    }
    const __m256 sv = _mm256_set1_ps(s);
    for (int t = 0; t < T; ++t) {
      racc[t] = _mm256_fmadd_ps(sv, acc[0][t], racc[t]);
      rs[t] += s * tail[t];
    }
  }
}

template <int T>
HQ_AVX2 void fp16_row_avx2(const PartRun& q, int64_t r, int64_t t0, __m256* racc, float* rs) {
  const int64_t n = q.p->n_cols;
  const uint16_t* h = q.p->fp16 + r * n;
  const float* xs[T];
  for (int t = 0; t < T; ++t) xs[t] = q.x + (t0 + t) * q.ldx;
  int64_t c = 0;
  for (; c + 8 <= n; c += 8) {
    const __m256 w = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(h + c)));
    for (int t = 0; t < T; ++t) racc[t] = _mm256_fmadd_ps(w, _mm256_loadu_ps(xs[t] + c), racc[t]);
  }
  for (; c < n; ++c) {
    const float w = half_to_float(h[c]);
    for (int t = 0; t < T; ++t) rs[t] += w * xs[t][c];
  }
}

template <int T>
HQ_AVX2 void rows_avx2_t(const std::vector<PartRun>& runs, int64_t r, int64_t t0, float* y,
                         int64_t d_out) {
  __m256 racc[T];
  float rs[T];
  for (int t = 0; t < T; ++t) {
    racc[t] = _mm256_setzero_ps();
    rs[t] = 0.0f;
  }
  for (const PartRun& q : runs) {
    if (q.p->n_cols == 0) continue;
    switch (q.p->bits) {
      case 2: part_row_avx2<2, T>(q, r, t0, racc, rs); break;
      case 3: part_row_avx2<3, T>(q, r, t0, racc, rs); break;
      case 4: part_row_avx2<4, T>(q, r, t0, racc, rs); break;
      case 6: part_row_avx2<6, T>(q, r, t0, racc, rs); break;
      case 8: part_row_avx2<8, T>(q, r, t0, racc, rs); break;
      default: fp16_row_avx2<T>(q, r, t0, racc, rs); break;
    }
  }
  for (int t = 0; t < T; ++t) y[(t0 + t) * d_out + r] = hsum8(racc[t]) + rs[t];
}

void rows_avx2(const std::vector<PartRun>& runs, int64_t r, int64_t t0, int64_t T, float* y,
               int64_t d_out) {
  switch (T) {
    case 1: rows_avx2_t<1>(runs, r, t0, y, d_out); break;
    case 2: rows_avx2_t<2>(runs, r, t0, y, d_out); break;
    case 3: rows_avx2_t<3>(runs, r, t0, y, d_out); break;
    case 4: rows_avx2_t<4>(runs, r, t0, y, d_out); break;
    case 5: rows_avx2_t<5>(runs, r, t0, y, d_out); break;
    case 6: rows_avx2_t<6>(runs, r, t0, y, d_out); break;
    case 7: rows_avx2_t<7>(runs, r, t0, y, d_out); break;
    default: rows_avx2_t<8>(runs, r, t0, y, d_out); break;
  }
}
#endif

bool is_code_width(int b) { return b == 2 || b == 3 || b == 4 || b == 6 || b == 8; }

}  // namespace

bool packed_avx2_available() {
#if defined(HQ_PACKED_X86)
  static const bool ok = cpu_has_avx2_fma_f16c();
  return ok;
#else
  return false;
#endif
}

const char* packed_kernel_name(PackedKernel kernel) {
  if (kernel == PackedKernel::Portable) return "portable";
  if (kernel == PackedKernel::Avx2) return "avx2-fma";
  return packed_avx2_available() ? "avx2-fma" : "portable";
}

void validate_packed_parts(int64_t d_out, int64_t d_in, const std::vector<PackedPart>& parts) {
  HQ_CHECK(d_out >= 1 && d_in >= 1, "a packed layer needs d_out >= 1 and d_in >= 1; got (", d_out,
           ", ", d_in, ")");
  for (size_t i = 0; i < parts.size(); ++i) {
    const PackedPart& p = parts[i];
    HQ_CHECK(p.n_cols >= 0 && p.n_cols <= d_in, "part ", i, " has ", p.n_cols,
             " columns; a part holds 0..d_in = ", d_in);
    HQ_CHECK(p.bits == 16 || is_code_width(p.bits), "part ", i, " has width ", p.bits,
             "; supported: 2, 3, 4, 6, 8 bits or 16 (float16 values)");
    if (p.n_cols == 0) continue;
    if (p.cols != nullptr) {
      for (int64_t j = 0; j < p.n_cols; ++j)
        HQ_CHECK(p.cols[j] >= 0 && p.cols[j] < d_in, "part ", i, " names input column ",
                 p.cols[j], " outside [0, ", d_in, ")");
    }
    if (p.bits == 16) {
      HQ_CHECK(p.fp16 != nullptr, "part ", i, " is float16 but has no values");
      continue;
    }
    HQ_CHECK(p.qweight != nullptr && p.qzeros != nullptr, "part ", i,
             " needs its packed codes and zero points");
    HQ_CHECK(p.scale_bits == 16 || p.scale_bits == 8 || p.scale_bits == 6, "part ", i,
             " has scale_bits ", p.scale_bits, "; expected 16, 8 or 6");
    if (p.scale_bits == 16) {
      HQ_CHECK(p.scales_f16 != nullptr, "part ", i, " needs its float16 scales");
    } else {
      HQ_CHECK(p.scale_codes != nullptr && p.scales_super != nullptr, "part ", i,
               " needs its scale codes and super-scales");
      HQ_CHECK(p.super_rows >= 1, "part ", i, " has super_rows ", p.super_rows,
               "; expected >= 1");
    }
  }
}

int64_t packed_bytes(int64_t d_out, const std::vector<PackedPart>& parts) {
  int64_t total = 0;
  for (const PackedPart& p : parts) {
    if (p.n_cols == 0) continue;
    if (p.cols != nullptr) total += 8 * p.n_cols;
    if (p.bits == 16) {
      total += 2 * d_out * p.n_cols;
      continue;
    }
    const int64_t ng = n_groups(p.n_cols, p.group_size);
    total += packed_size(d_out * p.n_cols, p.bits) + packed_size(d_out * ng, p.bits);
    if (p.scale_bits == 16)
      total += 2 * d_out * ng;
    else
      total += packed_size(d_out * ng, p.scale_bits) +
               2 * ((d_out + p.super_rows - 1) / p.super_rows);
  }
  return total;
}

void packed_matmul(int64_t d_out, int64_t d_in, const std::vector<PackedPart>& parts,
                   const float* x, int64_t n_tok, float* y, int n_threads, PackedKernel kernel) {
  validate_packed_parts(d_out, d_in, parts);
  HQ_CHECK(n_tok >= 0, "negative token count ", n_tok);
  bool use_avx2 = false;
  if (kernel == PackedKernel::Avx2) {
    HQ_CHECK(packed_avx2_available(), "the AVX2+FMA+F16C kernel is not available on this CPU; "
             "use kernel 'auto' or 'portable'");
    use_avx2 = true;
  } else if (kernel == PackedKernel::Auto) {
    use_avx2 = packed_avx2_available();
  }
  if (n_tok == 0) return;

  // Gather each part's activations (contiguous per token) and its group sums, once per call.
  std::vector<PartRun> runs(parts.size());
  std::vector<std::vector<float>> gathered(parts.size()), sums(parts.size());
  for (size_t i = 0; i < parts.size(); ++i) {
    const PackedPart& p = parts[i];
    PartRun& q = runs[i];
    q.p = &p;
    if (p.n_cols == 0) continue;
    if (p.cols == nullptr) {
      q.x = x;
      q.ldx = d_in;
    } else {
      auto& buf = gathered[i];
      buf.resize(size_t(n_tok * p.n_cols));
      for (int64_t t = 0; t < n_tok; ++t)
        for (int64_t j = 0; j < p.n_cols; ++j) buf[t * p.n_cols + j] = x[t * d_in + p.cols[j]];
      q.x = buf.data();
      q.ldx = p.n_cols;
    }
    if (p.bits == 16) continue;
    q.ng = n_groups(p.n_cols, p.group_size);
    q.g = (p.group_size <= 0 || p.group_size >= p.n_cols) ? p.n_cols : p.group_size;
    q.nb_w = packed_size(d_out * p.n_cols, p.bits);
    q.nb_z = packed_size(d_out * q.ng, p.bits);
    q.nb_s = p.scale_bits == 6 ? packed_size(d_out * q.ng, 6) : 0;
    auto& gs = sums[i];
    gs.assign(size_t(n_tok * q.ng), 0.0f);
    for (int64_t t = 0; t < n_tok; ++t)
      for (int64_t g = 0; g < q.ng; ++g) {
        float s = 0;
        for (int64_t c = g * q.g; c < std::min(p.n_cols, (g + 1) * q.g); ++c)
          s += q.x[t * q.ldx + c];
        gs[t * q.ng + g] = s;
      }
    q.gs = gs.data();
  }

  const int64_t n_blocks = (d_out + kRowBlock - 1) / kRowBlock;
  parallel_for(n_blocks, n_threads, [&](int64_t b) {
    const int64_t r1 = std::min(d_out, (b + 1) * kRowBlock);
    for (int64_t t0 = 0; t0 < n_tok; t0 += kTile) {
      const int64_t T = std::min(kTile, n_tok - t0);
      for (int64_t r = b * kRowBlock; r < r1; ++r) {
#if defined(HQ_PACKED_X86)
        if (use_avx2) {
          rows_avx2(runs, r, t0, T, y, d_out);
          continue;
        }
#endif
        rows_portable(runs, r, t0, T, y, d_out);
      }
    }
  });
}

}  // namespace hiquant
