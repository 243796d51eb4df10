#include "hiquant/packed_matmul.hpp"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <string>

#include "hiquant/errors.hpp"
#include "hiquant/gemm.hpp"
#include "hiquant/parallel.hpp"
#include "hiquant/quantizer.hpp"

#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "the packed kernels read little-endian bit streams with native loads"
#endif

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define HQ_PACKED_X86 1
#include <immintrin.h>
#define HQ_AVX2 __attribute__((target("avx2,fma,f16c")))
// full unrolling of the loops over rows, tokens and accumulator sets keeps the accumulators in
// registers (GCC otherwise keeps such arrays in memory, a store per FMA)
#define HQ_UNROLL _Pragma("GCC unroll 16")
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
constexpr int64_t kRowBlock = 32;  // rows per parallel task
// From kGemmTokens tokens on, the AVX2 path dequantizes blocks of kGemmRows rows and runs the
// float32 GEMM micro-kernel (the decode once per call, not once per token tile).
constexpr int64_t kGemmTokens = 24;
constexpr int64_t kGemmRows = 48;

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
  int64_t n_par = 0;                     // scales (and zero points): d_out * ng
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

HQ_AVX2 inline __m128i load128(const void* p) {
  return _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
}
HQ_AVX2 inline __m256i load256(const void* p) {
  return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
}
// 8 bytes as 8 floats
HQ_AVX2 inline __m256 bytes8_ps(const uint8_t* p) {
  return _mm256_cvtepi32_ps(
      _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}

// ---- Row-block kernel: R output rows x T tokens per pass.
//
// Each row's codes are turned into dequantized float32 weights s * (code - zero) in registers and
// multiplied into R * T accumulators, so the x loads of a chunk of eight columns are shared by the
// R rows and each decoded chunk by the T tokens; there is no zero-point term and no per-group
// reduction. 2/3-bit codes index a per-(row, group) table of the eight values s * (k - zero)
// (one register permute per eight weights); 4/6/8-bit codes are converted and scaled by one FMA,
// s * code - s * zero. Inside a row the eight codes of a chunk are read with one 4-byte broadcast
// load at the chunk's byte and per-lane shifts (shift + k * BITS), which holds them whenever
// shift + 8 * BITS <= 32 (2 and 3 bits at any bit offset, 4 bits at a byte boundary); otherwise
// an 8-byte load. Before the pass, each row's scales and zero points are decoded eight groups at
// a time (row_params). Groups of whole 8-column chunks take block_part_uniform (a short last group
// ends with one masked chunk; the next row block's bytes are prefetched); other group sizes, and
// the rows whose last chunk would read past the stream, block_part_avx2 (bounded loads). Rows
// are processed in blocks of kRowBlock = 32 per parallel task.

// Scales and zero points of row r, all groups, as floats.
template <int BITS>
HQ_AVX2 void row_params(const PartRun& q, int64_t r, float* sc, float* zc) {
  const PackedPart& p = *q.p;
  const float sup = row_super(q, r);
  const int64_t ng = q.ng, i0 = r * ng;
  const int64_t n_par = q.n_par;
  const __m256 supv = _mm256_set1_ps(sup);
  for (int64_t g = 0; g < ng; g += 8) {
    // 8 groups (those past the row's last belong to the next rows; only `m` are kept)
    const int64_t m = std::min<int64_t>(8, ng - g);
    __m256 s;
    if (p.scale_bits == 6) {
      s = _mm256_mul_ps(supv, decode8<6>(load_bits(p.scale_codes, q.nb_s, (i0 + g) * 6)));
    } else if (i0 + g + 8 > n_par) {  // the last groups of the layer: one at a time
      for (int64_t k = 0; k < m; ++k) {
        sc[g + k] = group_scale(q, r, g + k, sup);
        zc[g + k] = group_zero(q, r, g + k);
      }
      continue;
    } else if (p.scale_bits == 16) {
      s = _mm256_cvtph_ps(load128(p.scales_f16 + i0 + g));
    } else {
      s = _mm256_mul_ps(supv, bytes8_ps(p.scale_codes + i0 + g));
    }
    const __m256 z = decode8<BITS>(load_bits(p.qzeros, q.nb_z, (i0 + g) * BITS));
    if (m == 8) {
      _mm256_storeu_ps(sc + g, s);
      _mm256_storeu_ps(zc + g, z);
    } else {
      alignas(32) float sb[8], zb[8];
      _mm256_store_ps(sb, s);
      _mm256_store_ps(zb, z);
      for (int64_t k = 0; k < m; ++k) {
        sc[g + k] = sb[k];
        zc[g + k] = zb[k];
      }
    }
  }
}


// Lane codes of a chunk, unmasked above BITS for BITS <= 3 (the table permute reads 3 bits).
template <int BITS>
HQ_AVX2 inline __m256i lanes_dword(const uint8_t* b, __m256i cnt) {
  int32_t d;
  std::memcpy(&d, b, 4);
  return _mm256_srlv_epi32(_mm256_set1_epi32(d), cnt);
}

template <int BITS>
HQ_AVX2 inline __m256 weights_from_lanes(__m256i lanes, __m256 tab, __m256 s, __m256 sz) {
  if constexpr (BITS <= 3) {
    (void)s;
    (void)sz;
    return _mm256_permutevar8x32_ps(tab, lanes);
  } else {
    (void)tab;
    const __m256 c = _mm256_cvtepi32_ps(_mm256_and_si256(lanes, _mm256_set1_epi32((1 << BITS) - 1)));
    return _mm256_fmsub_ps(c, s, sz);
  }
}

// Weights of a chunk from 64 bits whose low 8 * BITS bits are its codes.
template <int BITS>
HQ_AVX2 inline __m256 weights_from_bits(uint64_t v, __m256 tab, __m256 s, __m256 sz) {
  if constexpr (BITS <= 3) {
    const __m256i sh = _mm256_setr_epi32(0, BITS, 2 * BITS, 3 * BITS, 4 * BITS, 5 * BITS,
                                         6 * BITS, 7 * BITS);
    return _mm256_permutevar8x32_ps(tab, _mm256_srlv_epi32(_mm256_set1_epi32(int(uint32_t(v))), sh));
  } else {
    (void)tab;
    return _mm256_fmsub_ps(decode8<BITS>(v), s, sz);
  }
}

// The common case, groups of a multiple of eight columns and no load near the end of the stream:
// every chunk of a row starts at the row's bit shift, so the loop over a group is loads, the
// decode and FMAs only (the per-group table or scale, from sc and zc, once per group and row).
template <int BITS, int R, int T, bool DWORD>
HQ_AVX2 inline __m256 uniform_weights(const uint8_t* b, __m256i cnt, __m256i kstep, int sh,
                                      __m256 tv, __m256 sv, __m256 szv) {
  if constexpr (DWORD) {
    int32_t d;
    std::memcpy(&d, b, 4);
    const __m256i lanes = _mm256_srlv_epi32(_mm256_set1_epi32(d), cnt);
    if constexpr (BITS <= 3) {
      return _mm256_permutevar8x32_ps(tv, lanes);
    } else {
      const __m256 c =
          _mm256_cvtepi32_ps(_mm256_and_si256(lanes, _mm256_set1_epi32((1 << BITS) - 1)));
      return _mm256_fmsub_ps(c, sv, szv);
    }
  } else {
    uint64_t v;
    std::memcpy(&v, b, 8);
    v >>= sh;
    if constexpr (BITS <= 3)
      return _mm256_permutevar8x32_ps(
          tv, _mm256_srlv_epi32(_mm256_set1_epi32(int(uint32_t(v))), kstep));
    else if constexpr (BITS == 8)
      return _mm256_fmsub_ps(
          _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_cvtsi64_si128((long long)v))), sv, szv);
    else
      return _mm256_fmsub_ps(decode8<BITS>(v), sv, szv);
  }
}

template <int BITS, int R, int T, bool DWORD>
HQ_AVX2 void block_part_uniform(const PartRun& q, int64_t r0, int64_t t0, const float* sc,
                                const float* zc, float* out) {
  // the eight lane values k of the table s * (k - zero) (2 bits: 0..3 twice, so that a third
  // bit, the next code's, is ignored)
  const __m256 tbase = BITS == 2 ? _mm256_setr_ps(0, 1, 2, 3, 0, 1, 2, 3)
                                 : _mm256_setr_ps(0, 1, 2, 3, 4, 5, 6, 7);
  const PackedPart& p = *q.p;
  const int64_t n = p.n_cols, ng = q.ng;
  const float* xs[T];
  HQ_UNROLL
  for (int t = 0; t < T; ++t) xs[t] = q.x + (t0 + t) * q.ldx;
  // U accumulator sets: at least eight independent FMA chains hide the FMA latency
  constexpr int U = R * T >= 8 ? 1 : 2;
  __m256 acc[U][R][T];
  HQ_UNROLL
  for (int u = 0; u < U; ++u)
    HQ_UNROLL
    for (int i = 0; i < R; ++i)
      HQ_UNROLL
      for (int t = 0; t < T; ++t) acc[u][i][t] = _mm256_setzero_ps();
  const __m256i kstep = _mm256_setr_epi32(0, BITS, 2 * BITS, 3 * BITS, 4 * BITS, 5 * BITS,
                                          6 * BITS, 7 * BITS);
  const uint8_t* rp[R];
  int sh[R];
  __m256i cnt[R];
  HQ_UNROLL
  for (int i = 0; i < R; ++i) {
    const int64_t bit = (r0 + i) * n * BITS;
    rp[i] = p.qweight + (bit >> 3);
    sh[i] = int(bit & 7);
    cnt[i] = _mm256_add_epi32(kstep, _mm256_set1_epi32(sh[i]));
  }
  const int64_t gbytes = q.g / 8 * BITS;  // bytes of a full group
  const int64_t pf = R * n * BITS / 8;     // bytes of R rows
  for (int64_t g = 0; g < ng; ++g) {
    const int64_t c0 = g * q.g;
    const int64_t nfull = (std::min(n, c0 + q.g) - c0) / 8;
    __m256 tv[R], sv[R], szv[R];
    HQ_UNROLL
    for (int i = 0; i < R; ++i) {
      const float s = sc[i * ng + g], z = zc[i * ng + g];
      if constexpr (BITS <= 3) {
        tv[i] = _mm256_mul_ps(_mm256_sub_ps(tbase, _mm256_set1_ps(z)), _mm256_set1_ps(s));
        sv[i] = szv[i] = tv[i];
      } else {
        tv[i] = sv[i] = _mm256_set1_ps(s);
        szv[i] = _mm256_set1_ps(s * z);
      }
    }
    const float* xg[T];
    HQ_UNROLL
    for (int t = 0; t < T; ++t) xg[t] = xs[t] + c0;
    const uint8_t* gp[R];
    HQ_UNROLL
    for (int i = 0; i < R; ++i) gp[i] = rp[i] + g * gbytes;
#ifndef HQ_NOPF
    // the same group of the next R rows, one block ahead (rows are short streams)
    HQ_UNROLL
    for (int i = 0; i < R; ++i) _mm_prefetch(reinterpret_cast<const char*>(gp[i] + pf), _MM_HINT_T0);
#endif
    int64_t m = 0;
    for (; m + U <= nfull; m += U) {
      HQ_UNROLL
      for (int u = 0; u < U; ++u) {
        __m256 xv[T];
        HQ_UNROLL
        for (int t = 0; t < T; ++t) xv[t] = _mm256_loadu_ps(xg[t] + 8 * (m + u));
        HQ_UNROLL
        for (int i = 0; i < R; ++i) {
          const __m256 w = uniform_weights<BITS, R, T, DWORD>(gp[i] + (m + u) * BITS, cnt[i],
                                                              kstep, sh[i], tv[i], sv[i], szv[i]);
          HQ_UNROLL
          for (int t = 0; t < T; ++t) acc[u][i][t] = _mm256_fmadd_ps(w, xv[t], acc[u][i][t]);
        }
      }
    }
    for (; m < nfull; ++m) {
      __m256 xv[T];
      HQ_UNROLL
      for (int t = 0; t < T; ++t) xv[t] = _mm256_loadu_ps(xg[t] + 8 * m);
      HQ_UNROLL
      for (int i = 0; i < R; ++i) {
        const __m256 w = uniform_weights<BITS, R, T, DWORD>(gp[i] + m * BITS, cnt[i], kstep,
                                                            sh[i], tv[i], sv[i], szv[i]);
        HQ_UNROLL
        for (int t = 0; t < T; ++t) acc[0][i][t] = _mm256_fmadd_ps(w, xv[t], acc[0][i][t]);
      }
    }
  }
  HQ_UNROLL
  for (int u = 1; u < U; ++u)
    HQ_UNROLL
    for (int i = 0; i < R; ++i)
      HQ_UNROLL
      for (int t = 0; t < T; ++t) acc[0][i][t] = _mm256_add_ps(acc[0][i][t], acc[u][i][t]);
  // the columns after the last full chunk (a last group of a length not a multiple of 8): one
  // chunk of codes read with a bounded load, the activations past the part's end masked to zero
  const int64_t cl = (ng - 1) * q.g + (n - (ng - 1) * q.g) / 8 * 8;
  if (cl < n) {
    const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    const __m256i live = _mm256_cmpgt_epi32(_mm256_set1_epi32(int(n - cl)), lane);
    __m256 xv[T];
    HQ_UNROLL
    for (int t = 0; t < T; ++t) xv[t] = _mm256_maskload_ps(xs[t] + cl, live);
    HQ_UNROLL
    for (int i = 0; i < R; ++i) {
      const float s = sc[i * ng + ng - 1], z = zc[i * ng + ng - 1];
      __m256 tv, sv, szv;
      if constexpr (BITS <= 3) {
        tv = sv = szv = _mm256_mul_ps(_mm256_sub_ps(tbase, _mm256_set1_ps(z)), _mm256_set1_ps(s));
      } else {
        tv = sv = _mm256_set1_ps(s);
        szv = _mm256_set1_ps(s * z);
      }
      const uint64_t v = load_bits(p.qweight, q.nb_w, ((r0 + i) * n + cl) * BITS);
      const __m256 w = weights_from_bits<BITS>(v, tv, sv, szv);
      HQ_UNROLL
      for (int t = 0; t < T; ++t) acc[0][i][t] = _mm256_fmadd_ps(w, xv[t], acc[0][i][t]);
    }
  }
  HQ_UNROLL
  for (int i = 0; i < R; ++i)
    HQ_UNROLL
    for (int t = 0; t < T; ++t) out[i * T + t] += hsum8(acc[0][i][t]);
}

// out[i * T + t] += row (r0 + i) of this part times token t0 + t, for i < R, t < T.
template <int BITS, int R, int T>
HQ_AVX2 void block_part_avx2(const PartRun& q, int64_t r0, int64_t t0, const float* sc,
                             const float* zc, float* out) {
  const PackedPart& p = *q.p;
  const int64_t n = p.n_cols, ng = q.ng;
  const float* xs[T];
  HQ_UNROLL
  for (int t = 0; t < T; ++t) xs[t] = q.x + (t0 + t) * q.ldx;
  __m256 acc[R][T];
  float tail[R][T];
  HQ_UNROLL
  for (int i = 0; i < R; ++i)
    HQ_UNROLL
    for (int t = 0; t < T; ++t) {
      acc[i][t] = _mm256_setzero_ps();
      tail[i][t] = 0.0f;
    }
  const __m256 base = _mm256_setr_ps(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256i kstep = _mm256_setr_epi32(0, BITS, 2 * BITS, 3 * BITS, 4 * BITS, 5 * BITS,
                                          6 * BITS, 7 * BITS);
  // 2 bits: the table's lanes 4..7 repeat 0..3 so that a third bit (the next code's) is ignored
  const __m256 base2 = _mm256_setr_ps(0, 1, 2, 3, 0, 1, 2, 3);
  for (int64_t g = 0; g < ng; ++g) {
    const int64_t c0 = g * q.g, c1 = std::min(n, c0 + q.g);
    const int64_t nfull = (c1 - c0) / 8;
    const uint8_t* rp[R];
    __m256i cnt[R];
    __m256 tab[R], sv[R], szv[R];
    bool fast = true, dword = true;
    HQ_UNROLL
    for (int i = 0; i < R; ++i) {
      const int64_t bit = ((r0 + i) * n + c0) * BITS;
      rp[i] = p.qweight + (bit >> 3);
      const int sh = int(bit & 7);
      cnt[i] = _mm256_add_epi32(kstep, _mm256_set1_epi32(sh));
      if (sh + 8 * BITS > 32) dword = false;
      if (nfull > 0 && (bit >> 3) + (nfull - 1) * BITS + 8 > q.nb_w) fast = false;
      const float s = sc[i * ng + g], z = zc[i * ng + g];
      sv[i] = _mm256_set1_ps(s);
      szv[i] = _mm256_set1_ps(s * z);
      if constexpr (BITS <= 3)
        tab[i] = _mm256_mul_ps(_mm256_sub_ps(BITS == 2 ? base2 : base, _mm256_set1_ps(z)), sv[i]);
      else
        tab[i] = base;
    }
    if (fast && dword) {
      for (int64_t m = 0; m < nfull; ++m) {
        const int64_t c = c0 + 8 * m;
        __m256 xv[T];
        HQ_UNROLL
        for (int t = 0; t < T; ++t) xv[t] = _mm256_loadu_ps(xs[t] + c);
        HQ_UNROLL
        for (int i = 0; i < R; ++i) {
          const __m256 w = weights_from_lanes<BITS>(lanes_dword<BITS>(rp[i] + m * BITS, cnt[i]),
                                                    tab[i], sv[i], szv[i]);
          HQ_UNROLL
          for (int t = 0; t < T; ++t) acc[i][t] = _mm256_fmadd_ps(w, xv[t], acc[i][t]);
        }
      }
    } else if (fast) {
      for (int64_t m = 0; m < nfull; ++m) {
        const int64_t c = c0 + 8 * m;
        __m256 xv[T];
        HQ_UNROLL
        for (int t = 0; t < T; ++t) xv[t] = _mm256_loadu_ps(xs[t] + c);
        HQ_UNROLL
        for (int i = 0; i < R; ++i) {
          const int64_t bit = ((r0 + i) * n + c0) * BITS;
          uint64_t v;
          std::memcpy(&v, rp[i] + m * BITS, 8);
          const __m256 w = weights_from_bits<BITS>(v >> (bit & 7), tab[i], sv[i], szv[i]);
          HQ_UNROLL
          for (int t = 0; t < T; ++t) acc[i][t] = _mm256_fmadd_ps(w, xv[t], acc[i][t]);
        }
      }
    } else {  // near the end of the stream: bounded loads
      for (int64_t m = 0; m < nfull; ++m) {
        const int64_t c = c0 + 8 * m;
        __m256 xv[T];
        HQ_UNROLL
        for (int t = 0; t < T; ++t) xv[t] = _mm256_loadu_ps(xs[t] + c);
        HQ_UNROLL
        for (int i = 0; i < R; ++i) {
          const uint64_t v = load_bits(p.qweight, q.nb_w, ((r0 + i) * n + c) * BITS);
          const __m256 w = weights_from_bits<BITS>(v, tab[i], sv[i], szv[i]);
          HQ_UNROLL
          for (int t = 0; t < T; ++t) acc[i][t] = _mm256_fmadd_ps(w, xv[t], acc[i][t]);
        }
      }
    }
    for (int64_t c = c0 + 8 * nfull; c < c1; ++c) {
      HQ_UNROLL
      for (int i = 0; i < R; ++i) {
        const float s = sc[i * ng + g], z = zc[i * ng + g];
        const float code = float(code_at(p.qweight, q.nb_w, (r0 + i) * n + c, BITS));
        const float w = BITS <= 3 ? (code - z) * s : code * s - s * z;
        HQ_UNROLL
        for (int t = 0; t < T; ++t) tail[i][t] += w * xs[t][c];
      }
    }
  }
  HQ_UNROLL
  for (int i = 0; i < R; ++i)
    HQ_UNROLL
    for (int t = 0; t < T; ++t) out[i * T + t] += hsum8(acc[i][t]) + tail[i][t];
}

template <int R, int T>
HQ_AVX2 void block_fp16_avx2(const PartRun& q, int64_t r0, int64_t t0, float* out) {
  const int64_t n = q.p->n_cols;
  const float* xs[T];
  HQ_UNROLL
  for (int t = 0; t < T; ++t) xs[t] = q.x + (t0 + t) * q.ldx;
  __m256 acc[R][T];
  HQ_UNROLL
  for (int i = 0; i < R; ++i)
    HQ_UNROLL
    for (int t = 0; t < T; ++t) acc[i][t] = _mm256_setzero_ps();
  int64_t c = 0;
  for (; c + 8 <= n; c += 8) {
    __m256 xv[T];
    HQ_UNROLL
    for (int t = 0; t < T; ++t) xv[t] = _mm256_loadu_ps(xs[t] + c);
    HQ_UNROLL
    for (int i = 0; i < R; ++i) {
      const __m256 w = _mm256_cvtph_ps(load128(q.p->fp16 + (r0 + i) * n + c));
      HQ_UNROLL
      for (int t = 0; t < T; ++t) acc[i][t] = _mm256_fmadd_ps(w, xv[t], acc[i][t]);
    }
  }
  HQ_UNROLL
  for (int i = 0; i < R; ++i) {
    float tail[T] = {};
    for (int64_t cc = c; cc < n; ++cc) {
      const float w = half_to_float(q.p->fp16[(r0 + i) * n + cc]);
      HQ_UNROLL
      for (int t = 0; t < T; ++t) tail[t] += w * xs[t][cc];
    }
    HQ_UNROLL
    for (int t = 0; t < T; ++t) out[i * T + t] += hsum8(acc[i][t]) + tail[t];
  }
}

// One quantized part for rows r0 .. r0 + R - 1: the rows' scales and zero points, then the uniform
// kernel where it applies, else the general one.
template <int BITS, int R, int T>
HQ_AVX2 void part_block_avx2(const PartRun& q, int64_t r0, int64_t t0, float* out,
                             std::vector<float>& scratch) {
  const int64_t ng = q.ng, n = q.p->n_cols;
  if (int64_t(scratch.size()) < 2 * R * ng) scratch.resize(size_t(2 * R * ng));
  float* sc = scratch.data();
  float* zc = sc + R * ng;
  HQ_UNROLL
  for (int i = 0; i < R; ++i) row_params<BITS>(q, r0 + i, sc + i * ng, zc + i * ng);
  // uniform: groups of whole chunks (so every chunk of a row has the row's bit shift) and the
  // last row's last 8-byte chunk load inside the stream
  const int64_t last_bit = ((r0 + R - 1) * n + std::max<int64_t>(0, n / 8 * 8 - 8)) * BITS;
  if (q.g % 8 == 0 && (last_bit >> 3) + 8 <= q.nb_w) {
    bool dword = true;
    HQ_UNROLL
    for (int i = 0; i < R; ++i)
      if (int(((r0 + i) * n * BITS) & 7) + 8 * BITS > 32) dword = false;
    if (dword)
      block_part_uniform<BITS, R, T, true>(q, r0, t0, sc, zc, out);
    else
      block_part_uniform<BITS, R, T, false>(q, r0, t0, sc, zc, out);
    return;
  }
  block_part_avx2<BITS, R, T>(q, r0, t0, sc, zc, out);
}

// Rows r0 .. r0 + R - 1, tokens t0 .. t0 + T - 1, all parts.
template <int R, int T>
HQ_AVX2 void block_avx2(const std::vector<PartRun>& runs, int64_t r0, int64_t t0, float* y,
                        int64_t d_out, std::vector<float>& scratch, const char* skip) {
  float out[R * T] = {};
  for (size_t pi = 0; pi < runs.size(); ++pi) {
    const PartRun& q = runs[pi];
    if (q.p->n_cols == 0 || (skip != nullptr && skip[pi])) continue;
    const int bits = q.p->bits;
    if (bits == 16) {
      block_fp16_avx2<R, T>(q, r0, t0, out);
      continue;
    }
    switch (bits) {
      case 2: part_block_avx2<2, R, T>(q, r0, t0, out, scratch); break;
      case 3: part_block_avx2<3, R, T>(q, r0, t0, out, scratch); break;
      case 4: part_block_avx2<4, R, T>(q, r0, t0, out, scratch); break;
      case 6: part_block_avx2<6, R, T>(q, r0, t0, out, scratch); break;
      default: part_block_avx2<8, R, T>(q, r0, t0, out, scratch); break;
    }
  }
  for (int i = 0; i < R; ++i)
    for (int t = 0; t < T; ++t) y[(t0 + t) * d_out + r0 + i] = out[i * T + t];
}

// ---- Many tokens (prefill): the dequantized weights of a block of rows, then the float32 GEMM
// (gemm.hpp, the shared 6 x 16 micro-kernel), so the decode is done once per call instead of once
// per token tile.

// Row r of part q, dequantized into tmp[0, n_cols) (tmp holds n_cols + 8 floats).
template <int BITS>
HQ_AVX2 void dequant_part_row_avx2(const PartRun& q, int64_t r, float* sc, float* zc, float* tmp) {
  const PackedPart& p = *q.p;
  const int64_t n = p.n_cols;
  row_params<BITS>(q, r, sc, zc);
  const __m256 tbase = BITS == 2 ? _mm256_setr_ps(0, 1, 2, 3, 0, 1, 2, 3)
                                 : _mm256_setr_ps(0, 1, 2, 3, 4, 5, 6, 7);
  for (int64_t g = 0; g < q.ng; ++g) {
    const int64_t c0 = g * q.g, c1 = std::min(n, c0 + q.g);
    const __m256 sv = _mm256_set1_ps(sc[g]), szv = _mm256_set1_ps(sc[g] * zc[g]);
    const __m256 tv = _mm256_mul_ps(_mm256_sub_ps(tbase, _mm256_set1_ps(zc[g])), sv);
    // 8 weights at a time; a last partial chunk writes past c1 into the next group's (rewritten
    // next) or into tmp's 8 spare floats
    for (int64_t c = c0; c < c1; c += 8)
      _mm256_storeu_ps(tmp + c, weights_from_bits<BITS>(
                                    load_bits(p.qweight, q.nb_w, (r * n + c) * BITS), tv, sv, szv));
  }
}

// Rows [r0, r1) of W with its columns in the parts' order (part after part, each in its own
// column order; `offs` the first column of each), dense float32 (r1 - r0, kk).
HQ_AVX2 void dequant_rows_avx2(const std::vector<PartRun>& runs, const std::vector<int64_t>& offs,
                               int64_t r0, int64_t r1, int64_t kk, float* w,
                               std::vector<float>& scratch) {
  int64_t need = 0;
  for (const PartRun& q : runs) need = std::max(need, 2 * q.ng + q.p->n_cols + 8);
  if (int64_t(scratch.size()) < need) scratch.resize(size_t(need));
  for (size_t pi = 0; pi < runs.size(); ++pi) {
    const PartRun& q = runs[pi];
    const PackedPart& p = *q.p;
    const int64_t n = p.n_cols;
    if (n == 0) continue;
    float* sc = scratch.data();
    float* zc = sc + q.ng;
    float* tmp = zc + q.ng;
    for (int64_t r = r0; r < r1; ++r) {
      switch (p.bits) {
        case 2: dequant_part_row_avx2<2>(q, r, sc, zc, tmp); break;
        case 3: dequant_part_row_avx2<3>(q, r, sc, zc, tmp); break;
        case 4: dequant_part_row_avx2<4>(q, r, sc, zc, tmp); break;
        case 6: dequant_part_row_avx2<6>(q, r, sc, zc, tmp); break;
        case 8: dequant_part_row_avx2<8>(q, r, sc, zc, tmp); break;
        default: {
          const uint16_t* h = p.fp16 + r * n;
          int64_t j = 0;
          for (; j + 8 <= n; j += 8)
            _mm256_storeu_ps(tmp + j, _mm256_cvtph_ps(load128(h + j)));
          for (; j < n; ++j) tmp[j] = half_to_float(h[j]);
        }
      }
      std::memcpy(w + (r - r0) * kk + offs[pi], tmp, size_t(n) * sizeof(float));
    }
  }
}

// Rows of this token tile: R rows per pass where R * T accumulators fit the registers, the
// remaining rows one at a time. Parts with skip[i] set are left out (the table kernel's).
template <int T>
void rows_tile_avx2(const std::vector<PartRun>& runs, int64_t r0, int64_t r1, int64_t t0,
                    float* y, int64_t d_out, std::vector<float>& scratch, const char* skip) {
  constexpr int R = T <= 2 ? 4 : 2;
  int64_t r = r0;
  for (; r + R <= r1; r += R) block_avx2<R, T>(runs, r, t0, y, d_out, scratch, skip);
  for (; r < r1; ++r) block_avx2<1, T>(runs, r, t0, y, d_out, scratch, skip);
}

void rows_avx2(const std::vector<PartRun>& runs, int64_t r0, int64_t r1, int64_t t0, int64_t T,
               float* y, int64_t d_out, std::vector<float>& scratch, const char* skip) {
  switch (T) {
    case 1: rows_tile_avx2<1>(runs, r0, r1, t0, y, d_out, scratch, skip); break;
    case 2: rows_tile_avx2<2>(runs, r0, r1, t0, y, d_out, scratch, skip); break;
    case 3: rows_tile_avx2<3>(runs, r0, r1, t0, y, d_out, scratch, skip); break;
    case 4: rows_tile_avx2<4>(runs, r0, r1, t0, y, d_out, scratch, skip); break;
    default:  // five to eight tokens: four, then the rest (8 accumulators per pass at most)
      rows_tile_avx2<4>(runs, r0, r1, t0, y, d_out, scratch, skip);
      rows_avx2(runs, r0, r1, t0 + 4, T - 4, y, d_out, scratch, skip);
      break;
  }
}

// ---- Table-lookup decode kernel (PackedPlanes; see packed_matmul.hpp).

constexpr int kTabPerChunk = 11 * 8;  // ten triple tables and one pair table, 8 floats each

// The chunk tables of one token's part activations xs (part columns), tab[c * 88 + 8 * k + e].
void lut_tables(const PackedPlanes::Part& L, int64_t n_cols, const float* xs, float* tab) {
  for (int64_t c = 0; c < L.n_chunks; ++c) {
    const int64_t c0 = L.chunk_col[c], len = L.chunk_len(c, n_cols);
    float xc[32];
    for (int64_t j = 0; j < 32; ++j) xc[j] = j < len ? xs[c0 + j] : 0.0f;
    float* t = tab + c * kTabPerChunk;
    for (int k = 0; k < 10; ++k) {
      const float a = xc[3 * k], b = xc[3 * k + 1], d = xc[3 * k + 2];
      float* e = t + 8 * k;
      e[0] = 0.0f;
      e[1] = a;
      e[2] = b;
      e[3] = a + b;
      e[4] = d;
      e[5] = a + d;
      e[6] = b + d;
      e[7] = (a + b) + d;
    }
    const float a = xc[30], b = xc[31];
    float* e = t + 80;
    e[0] = e[4] = 0.0f;
    e[1] = e[5] = a;
    e[2] = e[6] = b;
    e[3] = e[7] = a + b;
  }
}

// acc + s * (dot - zero * gsum) for the 8 rows at offset o of a part's reordered scales and zero
// points (PackedPlanes::Part): scales float16 (s16 non-null) or codes (s8) times the rows'
// super-scales sup; zero points z8.
HQ_AVX2 inline __m256 add_group(const uint16_t* s16, const uint8_t* s8, const uint8_t* z8,
                                int64_t o, __m256 sup, float gsum, __m256 dot, __m256 acc) {
  const __m256 s =
      s16 != nullptr ? _mm256_cvtph_ps(load128(s16 + o)) : _mm256_mul_ps(sup, bytes8_ps(s8 + o));
  return _mm256_fmadd_ps(s, _mm256_fnmadd_ps(bytes8_ps(z8 + o), _mm256_set1_ps(gsum), dot), acc);
}

// yv[i] += row 8 * rb + i of the part times the token whose chunk tables are tab and group sums
// gs (rows past d_out have zero codes, scales and zero points). supv: the rows' super-scales
// (8 / 6-bit scale codes).
template <int BITS>
HQ_AVX2 void lut_block(const PackedPlanes::Part& L, int64_t rb, int64_t ng, const float* tab,
                       const float* gs, __m256 supv, __m256& yv) {
  const uint32_t* W = L.words.data() + rb * L.n_chunks * BITS * 8;
  const uint8_t* z8 = L.zero8.data() + rb * ng * 8;
  const bool f16 = !L.scale16.empty();
  const uint16_t* s16 = f16 ? L.scale16.data() + rb * ng * 8 : nullptr;
  const uint8_t* s8 = f16 ? nullptr : L.scale8.data() + rb * ng * 8;
  for (int64_t g = 0; g < ng; ++g) {
    __m256 a[BITS][2];
    HQ_UNROLL
    for (int p = 0; p < BITS; ++p) a[p][0] = a[p][1] = _mm256_setzero_ps();
    for (int64_t c = L.group_chunk[g]; c < L.group_chunk[g + 1]; ++c) {
      __m256i w[BITS];
      HQ_UNROLL
      for (int p = 0; p < BITS; ++p)
        w[p] = load256(W + (c * BITS + p) * 8);
      const float* t = tab + c * kTabPerChunk;
      HQ_UNROLL
      for (int k = 0; k < 11; ++k) {
        const __m256 tv = _mm256_loadu_ps(t + 8 * k);
        HQ_UNROLL
        for (int p = 0; p < BITS; ++p) {
          a[p][k & 1] = _mm256_add_ps(a[p][k & 1], _mm256_permutevar8x32_ps(tv, w[p]));
          w[p] = _mm256_srli_epi32(w[p], 3);
        }
      }
    }
    // sum_j code_j x_j = sum_p 2^p plane_p (the powers of two exact)
    __m256 dot = _mm256_add_ps(a[BITS - 1][0], a[BITS - 1][1]);
    HQ_UNROLL
    for (int p = BITS - 2; p >= 0; --p)
      dot = _mm256_fmadd_ps(dot, _mm256_set1_ps(2.0f), _mm256_add_ps(a[p][0], a[p][1]));
    yv = add_group(s16, s8, z8, g * 8, supv, gs[g], dot, yv);
  }
}

// y[t * d_out + r] += part q's rows [r0, r1) (a multiple of 8 apart, or ending at d_out) times
// token t, for the tokens [0, n_tok), from the tables tab (per token tab_stride floats) and group
// sums gs (per token q.ng).
template <int BITS>
HQ_AVX2 void lut_rows(const PartRun& q, const PackedPlanes::Part& L, int64_t r0, int64_t r1,
                      int64_t d_out, int64_t n_tok, const float* tab, int64_t tab_stride,
                      float* y) {
  const int64_t ng = q.ng;
  for (int64_t rb0 = r0; rb0 < r1; rb0 += 8) {
    const int64_t m = std::min<int64_t>(8, d_out - rb0);
    alignas(32) float sup[8] = {};
    for (int64_t i = 0; i < m; ++i) sup[i] = row_super(q, rb0 + i);
    const __m256 supv = _mm256_load_ps(sup);
    for (int64_t t = 0; t < n_tok; ++t) {
      __m256 yv = _mm256_setzero_ps();
      lut_block<BITS>(L, rb0 / 8, ng, tab + t * tab_stride, q.gs + t * ng, supv, yv);
      alignas(32) float o[8];
      _mm256_store_ps(o, yv);
      for (int64_t i = 0; i < m; ++i) y[t * d_out + rb0 + i] += o[i];
    }
  }
}

// Lane i: all ones where bit b of i is set (table entry i holds x_b).
HQ_AVX2 inline __m256 entry_mask(int b) {
  const __m256i idx = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  return _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_and_si256(idx, _mm256_set1_epi32(1 << b)),
                                                _mm256_setzero_si256()));
}

constexpr int64_t kTab8PerChunk = 2 * 16;  // two 16-entry int8 tables (column quads 0-3, 4-7)

// Int8 tables: per chunk two 16-entry tables (column quads 0-3, 4-7), tab8[(c * 2 + h) * 16 +
// idx], and per group the tables' scale xs[g]. Entries are the float32 subset sums (formed as
// ((x0 [idx & 1] + x1 [idx & 2]) + x2 [idx & 4]) + x3 [idx & 8], an absent term adding zero),
// divided by the group's scale and rounded to the nearest integer, ties to even (see
// PlaneTables::Int8; the twin int8_tables forms the same); a group with a non-finite table entry
// gets xs NaN and zero tables, so its rows come out NaN as the exact product's would.
HQ_AVX2 void lut8_tables(const PackedPlanes::Part& L, int64_t n_cols, const float* xs,
                         int8_t* tab8, float* xscale) {
  const int64_t ng = int64_t(L.group_chunk.size()) - 1;
  int64_t max_chunks = 0;  // the float32 entries of one group, before rounding
  for (int64_t g = 0; g < ng; ++g)
    max_chunks = std::max(max_chunks, L.group_chunk[g + 1] - L.group_chunk[g]);
  std::vector<float> entries(size_t(max_chunks * kTab8PerChunk));
  const __m256 m0 = entry_mask(0), m1 = entry_mask(1), m2 = entry_mask(2);
  const __m256 sign = _mm256_set1_ps(-0.0f);
  const __m256 inf = _mm256_set1_ps(std::numeric_limits<float>::infinity());
  for (int64_t g = 0; g < ng; ++g) {
    __m256 mx = _mm256_setzero_ps(), fin = _mm256_castsi256_ps(_mm256_set1_epi32(-1));
    for (int64_t c = L.group_chunk[g]; c < L.group_chunk[g + 1]; ++c) {
      const int64_t c0 = L.chunk_col[c], len = L.chunk_len(c, n_cols);
      for (int h = 0; h < 2; ++h) {
        float v[4];
        for (int i = 0; i < 4; ++i) v[i] = 4 * h + i < len ? xs[c0 + 4 * h + i] : 0.0f;
        const __m256 lo = _mm256_add_ps(_mm256_add_ps(_mm256_and_ps(m0, _mm256_set1_ps(v[0])),
                                                      _mm256_and_ps(m1, _mm256_set1_ps(v[1]))),
                                        _mm256_and_ps(m2, _mm256_set1_ps(v[2])));
        const __m256 hi = _mm256_add_ps(lo, _mm256_set1_ps(v[3]));
        float* e = entries.data() + (c - L.group_chunk[g]) * kTab8PerChunk + h * 16;
        _mm256_storeu_ps(e, lo);
        _mm256_storeu_ps(e + 8, hi);
        const __m256 alo = _mm256_andnot_ps(sign, lo), ahi = _mm256_andnot_ps(sign, hi);
        mx = _mm256_max_ps(mx, _mm256_max_ps(alo, ahi));
        fin = _mm256_and_ps(fin, _mm256_and_ps(_mm256_cmp_ps(alo, inf, _CMP_LT_OQ),
                                               _mm256_cmp_ps(ahi, inf, _CMP_LT_OQ)));
      }
    }
    alignas(32) float mv[8];
    _mm256_store_ps(mv, mx);
    float m = 0.0f;
    for (float v : mv) m = std::max(m, v);
    const bool finite = _mm256_movemask_ps(fin) == 0xff;
    xscale[g] = finite ? m / 127.0f : std::numeric_limits<float>::quiet_NaN();
    const __m256 inv = _mm256_set1_ps(finite && m > 0.0f ? 127.0f / m : 0.0f);
    for (int64_t c = L.group_chunk[g]; c < L.group_chunk[g + 1]; ++c)
      for (int h = 0; h < 2; ++h) {
        const float* t = entries.data() + (c - L.group_chunk[g]) * kTab8PerChunk + h * 16;
        // rounded to the nearest integer, ties to even (the default rounding mode)
        const __m256i qlo = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(t), inv));
        const __m256i qhi = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(t + 8), inv));
        const __m256i w = _mm256_permute4x64_epi64(_mm256_packs_epi32(qlo, qhi), 0xd8);
        const __m128i q8 =
            _mm_packs_epi16(_mm256_castsi256_si128(w), _mm256_extracti128_si256(w, 1));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(tab8 + c * kTab8PerChunk + h * 16), q8);
      }
  }
}

// The int8 kernel's codes stream from memory at decode: they are prefetched this far ahead
// (a few row blocks' worth; 1 and 4 KiB measured no better, bench/RESULTS.md).
constexpr int64_t kPrefetchBytes = 2048;

// out[h][i] += row 16 * rb + 8 * h + i of the part times the token whose int8 tables are tab8,
// table scales xs and group sums gs (rows past d_out have zero codes, scales and zero points).
// sup: the rows' super-scales (8 / 6-bit scale codes). NP: plane pairs (1 for 2-bit parts, 2 for
// 3- and 4-bit).
template <int NP>
HQ_AVX2 void lut8_block(const PackedPlanes::Part& L, int64_t rb, int64_t ng, const int8_t* tab8,
                        const float* xs, const float* gs, const __m256 sup[2], __m256 out[2]) {
  // chunks summed in 16 bits before widening: a chunk adds at most 2 * 127 * (4^NP - 1) per row
  constexpr int kFlush = 32767 / (2 * 127 * ((1 << (2 * NP)) - 1));
  const uint8_t* B = L.nibbles.data() + rb * L.n_chunks * NP * 32;
  const uint8_t* z8 = L.zero8.data() + rb * ng * 16;
  const bool f16 = !L.scale16.empty();
  const uint16_t* s16 = f16 ? L.scale16.data() + rb * ng * 16 : nullptr;
  const uint8_t* s8 = f16 ? nullptr : L.scale8.data() + rb * ng * 16;
  const __m256i low4 = _mm256_set1_epi8(0x0f);
  __m256i wq[NP];
  HQ_UNROLL
  for (int q = 0; q < NP; ++q)  // byte pair (plane 2q, plane 2q + 1) weighted (4^q, 2 * 4^q)
    wq[q] = _mm256_set1_epi16(int16_t((2 << (2 * q) << 8) | (1 << (2 * q))));
  for (int64_t g = 0; g < ng; ++g) {
    __m256i acc32[2] = {_mm256_setzero_si256(), _mm256_setzero_si256()};
    __m256i acc = _mm256_setzero_si256();
    int n = 0;
    for (int64_t c = L.group_chunk[g]; c < L.group_chunk[g + 1]; ++c) {
      const __m256i tlo = _mm256_broadcastsi128_si256(load128(tab8 + c * kTab8PerChunk));
      const __m256i thi = _mm256_broadcastsi128_si256(load128(tab8 + c * kTab8PerChunk + 16));
      _mm_prefetch(reinterpret_cast<const char*>(B + c * NP * 32 + kPrefetchBytes), _MM_HINT_T0);
      HQ_UNROLL
      for (int q = 0; q < NP; ++q) {
        const __m256i v = load256(B + (c * NP + q) * 32);
        const __m256i lo = _mm256_and_si256(v, low4);
        const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low4);
        acc = _mm256_add_epi16(acc, _mm256_maddubs_epi16(wq[q], _mm256_shuffle_epi8(tlo, lo)));
        acc = _mm256_add_epi16(acc, _mm256_maddubs_epi16(wq[q], _mm256_shuffle_epi8(thi, hi)));
      }
      if (++n == kFlush || c + 1 == L.group_chunk[g + 1]) {
        acc32[0] = _mm256_add_epi32(acc32[0], _mm256_cvtepi16_epi32(_mm256_castsi256_si128(acc)));
        acc32[1] =
            _mm256_add_epi32(acc32[1], _mm256_cvtepi16_epi32(_mm256_extracti128_si256(acc, 1)));
        acc = _mm256_setzero_si256();
        n = 0;
      }
    }
    const __m256 xg = _mm256_set1_ps(xs[g]);
    HQ_UNROLL
    for (int h = 0; h < 2; ++h) {
      out[h] = add_group(s16, s8, z8, g * 16 + 8 * h, sup[h], gs[g],
                         _mm256_mul_ps(_mm256_cvtepi32_ps(acc32[h]), xg), out[h]);
    }
  }
}

// y[t * d_out + r] += part q's rows [r0, r1) (a multiple of 16 apart, or ending at d_out) times
// token t, for the tokens [0, n_tok), from the int8 tables tab8 (per token n_chunks *
// kTab8PerChunk bytes), table scales xs and group sums gs (per token q.ng each).
template <int NP>
HQ_AVX2 void lut8_rows(const PartRun& q, const PackedPlanes::Part& L, int64_t r0, int64_t r1,
                       int64_t d_out, int64_t n_tok, const int8_t* tab8, const float* xs,
                       float* y) {
  const int64_t ng = q.ng, tab_stride = L.n_chunks * kTab8PerChunk;
  for (int64_t rb0 = r0; rb0 < r1; rb0 += 16) {
    const int64_t m = std::min<int64_t>(16, d_out - rb0);
    alignas(32) float sup[16] = {};
    for (int64_t i = 0; i < m; ++i) sup[i] = row_super(q, rb0 + i);
    const __m256 supv[2] = {_mm256_load_ps(sup), _mm256_load_ps(sup + 8)};
    for (int64_t t = 0; t < n_tok; ++t) {
      __m256 out[2] = {_mm256_setzero_ps(), _mm256_setzero_ps()};
      lut8_block<NP>(L, rb0 / 16, ng, tab8 + t * tab_stride, xs + t * ng, q.gs + t * ng, supv,
                     out);
      alignas(32) float o[16];
      _mm256_store_ps(o, out[0]);
      _mm256_store_ps(o + 8, out[1]);
      for (int64_t i = 0; i < m; ++i) y[t * d_out + rb0 + i] += o[i];
    }
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
  if (kernel == PackedKernel::Lut) return "avx2-lut";
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

int64_t packed_decode_bytes(int64_t d_out, const std::vector<PackedPart>& parts,
                            const PackedPlanes* planes) {
  if (planes == nullptr || planes->parts.size() != parts.size()) return packed_bytes(d_out, parts);
  int64_t total = 0;
  for (size_t i = 0; i < parts.size(); ++i) {
    const PackedPart& p = parts[i];
    const PackedPlanes::Part& L = planes->parts[i];
    if (L.bits == 0) {
      total += packed_bytes(d_out, {p});
      continue;
    }
    total += L.nbytes();
    if (p.cols != nullptr) total += 8 * p.n_cols;
    if (p.scale_bits != 16) total += 2 * ((d_out + p.super_rows - 1) / p.super_rows);
  }
  return total;
}

int64_t PackedPlanes::nbytes() const {
  int64_t total = 0;
  for (const Part& p : parts) total += p.nbytes();
  return total;
}

namespace {
// Throws InvalidArgument unless `planes` is make_packed_planes' layout of these parts (sizes
// checked, so that the table kernel cannot read past a copy made for another layer).
void check_planes(int64_t d_out, const std::vector<PackedPart>& parts,
                  const PackedPlanes& planes) {
  HQ_CHECK(planes.parts.size() == parts.size(), "the plane layout has ", planes.parts.size(),
           " parts but the layer ", parts.size(), "; build it with make_packed_planes");
  const int64_t R = planes.block_rows(), n_rb = (d_out + R - 1) / R;
  const bool int8 = planes.tables == PlaneTables::Int8;
  for (size_t i = 0; i < parts.size(); ++i) {
    const PackedPlanes::Part& L = planes.parts[i];
    if (L.bits == 0) continue;
    const PackedPart& p = parts[i];
    const int64_t ng = p.n_cols > 0 ? n_groups(p.n_cols, p.group_size) : 0;
    const int64_t n_code = n_rb * L.n_chunks * (int8 ? (L.bits + 1) / 2 * 32 : L.bits * 8);
    const bool ok = L.bits == p.bits && p.n_cols > 0 && int64_t(L.chunk_col.size()) == L.n_chunks &&
                    int64_t(L.group_chunk.size()) == ng + 1 &&
                    L.group_chunk.back() == L.n_chunks &&
                    int64_t(int8 ? L.nibbles.size() : L.words.size()) == n_code &&
                    int64_t(L.zero8.size()) == n_rb * ng * R &&
                    int64_t((p.scale_bits == 16 ? L.scale16.size() : L.scale8.size())) ==
                        n_rb * ng * R;
    HQ_CHECK(ok, "the plane layout of part ", i, " does not match the part (", p.bits, " bits, ",
             p.n_cols, " columns, ", d_out, " rows); build it with make_packed_planes");
  }
}

// Bits 0, 2, 4, ..., 62 of v as bits 0..31.
inline uint32_t even_bits(uint64_t v) {
  v &= 0x5555555555555555ull;
  v = (v | (v >> 1)) & 0x3333333333333333ull;
  v = (v | (v >> 2)) & 0x0f0f0f0f0f0f0f0full;
  v = (v | (v >> 4)) & 0x00ff00ff00ff00ffull;
  v = (v | (v >> 8)) & 0x0000ffff0000ffffull;
  return uint32_t(v | (v >> 16));
}
}  // namespace

PackedPlanes make_packed_planes(int64_t d_out, int64_t d_in, const std::vector<PackedPart>& parts,
                                int n_threads, PlaneTables tables) {
  validate_packed_parts(d_out, d_in, parts);
  PackedPlanes out;
  out.tables = tables;
  if (!packed_avx2_available()) return out;
  out.parts.resize(parts.size());
  const bool int8 = tables == PlaneTables::Int8;
  const int64_t R = out.block_rows(), W = out.chunk_cols(), n_rb = (d_out + R - 1) / R;
  for (size_t pi = 0; pi < parts.size(); ++pi) {
    const PackedPart& p = parts[pi];
    // 2-bit parts, and 3-bit parts over a minority of gathered columns (a hybrid layer's
    // high-impact part, where the register kernel's per-row work weighs most). Measured
    // (bench/RESULTS.md): a full-width 3-bit part, or a 4-bit one, runs as fast or faster on the
    // register kernel, so it keeps no copy.
    // With int8 tables every 2-, 3- and 4-bit part (two plane pairs run faster than the
    // register kernel, bench/RESULTS.md).
    const bool minority3 = p.bits == 3 && p.cols != nullptr && 2 * p.n_cols <= d_in;
    const bool laid_out = int8 ? (p.bits >= 2 && p.bits <= 4) : (p.bits == 2 || minority3);
    if (p.n_cols == 0 || !laid_out) continue;
    PackedPlanes::Part& L = out.parts[pi];
    L.bits = p.bits;
    const int64_t n = p.n_cols, ng = n_groups(n, p.group_size);
    const int64_t g = (p.group_size <= 0 || p.group_size >= n) ? n : p.group_size;
    for (int64_t gi = 0; gi < ng; ++gi) {
      L.group_chunk.push_back(int64_t(L.chunk_col.size()));
      for (int64_t c = gi * g; c < std::min(n, (gi + 1) * g); c += W) L.chunk_col.push_back(c);
    }
    L.n_chunks = int64_t(L.chunk_col.size());
    L.group_chunk.push_back(L.n_chunks);
    const int bits = p.bits, n_pairs = (bits + 1) / 2;
    if (int8)
      L.nibbles.assign(size_t(n_rb * L.n_chunks * n_pairs * 32), 0);
    else
      L.words.assign(size_t(n_rb * L.n_chunks * bits * 8), 0u);
    const int64_t nb = packed_size(d_out * n, bits);
    const int64_t nb_z = packed_size(d_out * ng, bits), nb_s = packed_size(d_out * ng, 6);
    L.zero8.assign(size_t(n_rb * ng * R), 0);
    if (p.scale_bits == 16)
      L.scale16.assign(size_t(n_rb * ng * R), 0);
    else
      L.scale8.assign(size_t(n_rb * ng * R), 0);
    parallel_for(n_rb, n_threads, [&](int64_t rb) {
      for (int64_t r = rb * R; r < std::min(d_out, rb * R + R); ++r)
        for (int64_t c = 0; c < L.n_chunks; ++c) {
          const int64_t c0 = L.chunk_col[c], len = L.chunk_len(c, n);
          if (int8) {  // at most 8 codes of at most 4 bits: one load
            const uint64_t v = load_bits(p.qweight, nb, (r * n + c0) * bits);
            uint8_t plane[4] = {0, 0, 0, 0};
            for (int64_t j = 0; j < len; ++j) {
              const uint32_t code = uint32_t(v >> (j * bits)) & ((1u << bits) - 1u);
              for (int b = 0; b < bits; ++b) plane[b] |= uint8_t(((code >> b) & 1u) << j);
            }
            uint8_t* o = L.nibbles.data() + (rb * L.n_chunks + c) * n_pairs * 32 + 2 * (r % 16);
            for (int b = 0; b < bits; ++b) o[(b / 2) * 32 + (b % 2)] = plane[b];
            continue;
          }
          if (bits == 3) {  // code by code (a minority part)
            uint32_t plane[3] = {0, 0, 0};
            for (int64_t j0 = 0; j0 < len; j0 += 8) {
              const uint64_t v = load_bits(p.qweight, nb, (r * n + c0 + j0) * 3);
              for (int64_t j = j0; j < std::min(len, j0 + 8); ++j) {
                const uint32_t code = uint32_t(v >> ((j - j0) * 3)) & 7u;
                for (int b = 0; b < 3; ++b) plane[b] |= ((code >> b) & 1u) << j;
              }
            }
            uint32_t* w = L.words.data() + ((rb * L.n_chunks + c) * 3) * 8 + (r % 8);
            for (int b = 0; b < 3; ++b) w[b * 8] = plane[b];
            continue;
          }
          // the chunk's 2-bit codes as 64 bits (two loads of 16 codes), those past len zero
          const int64_t bit = (r * n + c0) * 2;
          uint64_t v = (load_bits(p.qweight, nb, bit) & 0xffffffffu) |
                       (len > 16 ? load_bits(p.qweight, nb, bit + 32) << 32 : 0);
          if (len < 32) v &= (uint64_t(1) << (2 * len)) - 1;
          uint32_t* w = L.words.data() + ((rb * L.n_chunks + c) * 2) * 8 + (r % 8);
          w[0] = even_bits(v);
          w[8] = even_bits(v >> 1);
        }
      for (int64_t r = rb * R; r < std::min(d_out, rb * R + R); ++r)
        for (int64_t gi = 0; gi < ng; ++gi) {
          const int64_t i = r * ng + gi, o = (rb * ng + gi) * R + r % R;
          L.zero8[o] = uint8_t(code_at(p.qzeros, nb_z, i, bits));
          if (p.scale_bits == 16)
            L.scale16[o] = p.scales_f16[i];
          else
            L.scale8[o] = p.scale_bits == 8 ? p.scale_codes[i]
                                            : uint8_t(code_at(p.scale_codes, nb_s, i, 6));
        }
    });
  }
  return out;
}

void packed_matmul(int64_t d_out, int64_t d_in, const std::vector<PackedPart>& parts,
                   const float* x, int64_t n_tok, float* y, int n_threads, PackedKernel kernel,
                   const PackedPlanes* planes) {
  validate_packed_parts(d_out, d_in, parts);
  HQ_CHECK(n_tok >= 0, "negative token count ", n_tok);
  bool use_avx2 = false, use_lut = false;
  if (kernel == PackedKernel::Avx2 || kernel == PackedKernel::Lut) {
    HQ_CHECK(packed_avx2_available(), "the AVX2+FMA+F16C kernels are not available on this CPU; "
             "use kernel 'auto' or 'portable'");
    use_avx2 = true;
  } else if (kernel == PackedKernel::Auto) {
    use_avx2 = packed_avx2_available();
  }
  if (kernel == PackedKernel::Lut)
    HQ_CHECK(planes != nullptr && planes->parts.size() == parts.size(),
             "the table kernel needs the layer's plane layout (make_packed_planes)");
  if (planes != nullptr && !planes->parts.empty()) check_planes(d_out, parts, *planes);
  const bool have_planes = use_avx2 && planes != nullptr && planes->parts.size() == parts.size();
  // parts the table kernel runs
  std::vector<char> lut_part(parts.size(), 0);
  if (have_planes && (kernel == PackedKernel::Lut ||
                      (kernel == PackedKernel::Auto &&
                       n_tok <= (planes->tables == PlaneTables::Int8 ? kLutTokensInt8
                                                                      : kLutTokens))))
    for (size_t i = 0; i < parts.size(); ++i)
      if (planes->parts[i].bits != 0 && parts[i].n_cols > 0) {
        lut_part[i] = 1;
        use_lut = true;
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
    q.n_par = d_out * q.ng;
    if (use_avx2 && !lut_part[i]) continue;  // the AVX2 kernel forms dequantized weights
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

#if defined(HQ_PACKED_X86)
  if (use_avx2 && !use_lut && n_tok >= kGemmTokens) {
    // x^T with its rows in the parts' column order (so a dequantized row is its parts side by
    // side, no scatter), packed once for the GEMM; per block of kGemmRows rows: dequantize,
    // multiply, write the block's outputs
    std::vector<int64_t> offs(parts.size());
    int64_t kk = 0;
    for (size_t i = 0; i < parts.size(); ++i) {
      offs[i] = kk;
      kk += parts[i].n_cols;
    }
    std::vector<float> xt(size_t(std::max<int64_t>(kk, 1) * n_tok));
    for (size_t i = 0; i < parts.size(); ++i) {
      const PackedPart& p = parts[i];
      for (int64_t j = 0; j < p.n_cols; ++j) {
        const int64_t col = p.cols == nullptr ? j : p.cols[j];
        float* dst = xt.data() + (offs[i] + j) * n_tok;
        for (int64_t t = 0; t < n_tok; ++t) dst[t] = x[t * d_in + col];
      }
    }
    const PackedB xb(xt.data(), n_tok, kk, n_tok, n_threads);
    const int64_t n_gb = (d_out + kGemmRows - 1) / kGemmRows;
    parallel_for(n_gb, n_threads, [&](int64_t b) {
      const int64_t r0 = b * kGemmRows, r1 = std::min(d_out, r0 + kGemmRows);
      std::vector<float> w(size_t((r1 - r0) * kk)), c(size_t((r1 - r0) * n_tok)), scratch;
      dequant_rows_avx2(runs, offs, r0, r1, kk, w.data(), scratch);
      gemm_packed(w.data(), kk, r1 - r0, xb, c.data(), n_tok, false, 1, GemmKernel::Avx2);
      for (int64_t t = 0; t < n_tok; ++t)
        for (int64_t r = r0; r < r1; ++r) y[t * d_out + r] = c[(r - r0) * n_tok + t];
    });
    return;
  }
#endif
  // the table kernel's chunk tables (and int8 tables' scales), per part and token
  const bool int8 = use_lut && planes->tables == PlaneTables::Int8;
  std::vector<std::vector<float>> tabs(parts.size()), tab_scales(parts.size());
  std::vector<std::vector<int8_t>> tabs8(parts.size());
#if defined(HQ_PACKED_X86)
  for (size_t i = 0; i < parts.size() && use_lut; ++i) {
    if (!lut_part[i]) continue;
    const PackedPlanes::Part& L = planes->parts[i];
    const PartRun& q = runs[i];
    if (int8) {
      const int64_t ts = L.n_chunks * kTab8PerChunk;
      tabs8[i].resize(size_t(n_tok * ts));
      tab_scales[i].resize(size_t(n_tok * q.ng));
      for (int64_t t = 0; t < n_tok; ++t)
        lut8_tables(L, parts[i].n_cols, q.x + t * q.ldx, tabs8[i].data() + t * ts,
                    tab_scales[i].data() + t * q.ng);
      continue;
    }
    const int64_t ts = L.n_chunks * kTabPerChunk;
    tabs[i].resize(size_t(n_tok * ts));
    for (int64_t t = 0; t < n_tok; ++t)
      lut_tables(L, parts[i].n_cols, q.x + t * q.ldx, tabs[i].data() + t * ts);
  }
#endif
  const int64_t n_blocks = (d_out + kRowBlock - 1) / kRowBlock;
  parallel_for(n_blocks, n_threads, [&](int64_t b) {
    const int64_t r0 = b * kRowBlock, r1 = std::min(d_out, (b + 1) * kRowBlock);
#if defined(HQ_PACKED_X86)
    if (use_avx2) {
      std::vector<float> scratch;
      for (int64_t t0 = 0; t0 < n_tok; t0 += kTile)
        rows_avx2(runs, r0, r1, t0, std::min(kTile, n_tok - t0), y, d_out, scratch,
                  use_lut ? lut_part.data() : nullptr);
      if (use_lut)
        for (size_t i = 0; i < parts.size(); ++i) {
          if (!lut_part[i]) continue;
          const PackedPlanes::Part& L = planes->parts[i];
          if (int8) {
            const int8_t* tb = tabs8[i].data();
            const float* xs = tab_scales[i].data();
            if (L.bits == 2)
              lut8_rows<1>(runs[i], L, r0, r1, d_out, n_tok, tb, xs, y);
            else
              lut8_rows<2>(runs[i], L, r0, r1, d_out, n_tok, tb, xs, y);
            continue;
          }
          const float* tb = tabs[i].data();
          const int64_t ts = L.n_chunks * kTabPerChunk;
          if (L.bits == 2)
            lut_rows<2>(runs[i], L, r0, r1, d_out, n_tok, tb, ts, y);
          else
            lut_rows<3>(runs[i], L, r0, r1, d_out, n_tok, tb, ts, y);
        }
      return;
    }
#endif
    for (int64_t t0 = 0; t0 < n_tok; t0 += kTile) {
      const int64_t T = std::min(kTile, n_tok - t0);
      for (int64_t r = r0; r < r1; ++r) rows_portable(runs, r, t0, T, y, d_out);
    }
  });
}

}  // namespace hiquant
