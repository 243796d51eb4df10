#include "hiquant/microkernel.hpp"

#include <cstring>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define HQ_MICRO_X86 1
#include <immintrin.h>
#endif

namespace hiquant {

namespace {

constexpr int64_t kMR = kMicroMR;
constexpr int64_t kNR = kMicroNR;

#if defined(HQ_MICRO_X86)
__attribute__((target("avx2,fma"))) void kernel_avx2(int64_t kc, const float* a, const float* b,
                                                     float* c, int64_t ldc, bool acc) {
  __m256 c00 = _mm256_setzero_ps(), c01 = _mm256_setzero_ps();
  __m256 c10 = _mm256_setzero_ps(), c11 = _mm256_setzero_ps();
  __m256 c20 = _mm256_setzero_ps(), c21 = _mm256_setzero_ps();
  __m256 c30 = _mm256_setzero_ps(), c31 = _mm256_setzero_ps();
  __m256 c40 = _mm256_setzero_ps(), c41 = _mm256_setzero_ps();
  __m256 c50 = _mm256_setzero_ps(), c51 = _mm256_setzero_ps();
  for (int64_t k = 0; k < kc; ++k) {
    // Unaligned loads: the GEMM's packed B is 64-byte aligned, the Gram's panels need not be;
    // on AVX2 CPUs an unaligned load of aligned data costs the same as an aligned one.
    const __m256 b0 = _mm256_loadu_ps(b), b1 = _mm256_loadu_ps(b + 8);
    __m256 ai = _mm256_broadcast_ss(a);
    c00 = _mm256_fmadd_ps(ai, b0, c00);
    c01 = _mm256_fmadd_ps(ai, b1, c01);
    ai = _mm256_broadcast_ss(a + 1);
    c10 = _mm256_fmadd_ps(ai, b0, c10);
    c11 = _mm256_fmadd_ps(ai, b1, c11);
    ai = _mm256_broadcast_ss(a + 2);
    c20 = _mm256_fmadd_ps(ai, b0, c20);
    c21 = _mm256_fmadd_ps(ai, b1, c21);
    ai = _mm256_broadcast_ss(a + 3);
    c30 = _mm256_fmadd_ps(ai, b0, c30);
    c31 = _mm256_fmadd_ps(ai, b1, c31);
    ai = _mm256_broadcast_ss(a + 4);
    c40 = _mm256_fmadd_ps(ai, b0, c40);
    c41 = _mm256_fmadd_ps(ai, b1, c41);
    ai = _mm256_broadcast_ss(a + 5);
    c50 = _mm256_fmadd_ps(ai, b0, c50);
    c51 = _mm256_fmadd_ps(ai, b1, c51);
    a += kMR;
    b += kNR;
  }
  float* r0 = c;
  float* r1 = c + ldc;
  float* r2 = c + 2 * ldc;
  float* r3 = c + 3 * ldc;
  float* r4 = c + 4 * ldc;
  float* r5 = c + 5 * ldc;
  if (acc) {
    c00 = _mm256_add_ps(c00, _mm256_loadu_ps(r0));
    c01 = _mm256_add_ps(c01, _mm256_loadu_ps(r0 + 8));
    c10 = _mm256_add_ps(c10, _mm256_loadu_ps(r1));
    c11 = _mm256_add_ps(c11, _mm256_loadu_ps(r1 + 8));
    c20 = _mm256_add_ps(c20, _mm256_loadu_ps(r2));
    c21 = _mm256_add_ps(c21, _mm256_loadu_ps(r2 + 8));
    c30 = _mm256_add_ps(c30, _mm256_loadu_ps(r3));
    c31 = _mm256_add_ps(c31, _mm256_loadu_ps(r3 + 8));
    c40 = _mm256_add_ps(c40, _mm256_loadu_ps(r4));
    c41 = _mm256_add_ps(c41, _mm256_loadu_ps(r4 + 8));
    c50 = _mm256_add_ps(c50, _mm256_loadu_ps(r5));
    c51 = _mm256_add_ps(c51, _mm256_loadu_ps(r5 + 8));
  }
  _mm256_storeu_ps(r0, c00);
  _mm256_storeu_ps(r0 + 8, c01);
  _mm256_storeu_ps(r1, c10);
  _mm256_storeu_ps(r1 + 8, c11);
  _mm256_storeu_ps(r2, c20);
  _mm256_storeu_ps(r2 + 8, c21);
  _mm256_storeu_ps(r3, c30);
  _mm256_storeu_ps(r3 + 8, c31);
  _mm256_storeu_ps(r4, c40);
  _mm256_storeu_ps(r4 + 8, c41);
  _mm256_storeu_ps(r5, c50);
  _mm256_storeu_ps(r5 + 8, c51);
}

bool cpu_has_avx2_fma() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
}
#endif

}  // namespace

#if defined(__GNUC__) || defined(__clang__)
// Four-lane vectors: SSE2 on any x86-64, NEON on ARM64. The 6 x 16 tile is done in two halves of
// 6 x 8 so that the 12 accumulators fit the 16 vector registers of SSE2.
typedef float hq_v4f __attribute__((vector_size(16)));

void micro_kernel_portable(int64_t kc, const float* a, const float* b, float* c, int64_t ldc,
                           bool acc) {
  for (int half = 0; half < 2; ++half) {
    hq_v4f s[kMR][2];
    for (int i = 0; i < kMR; ++i) s[i][0] = s[i][1] = hq_v4f{0, 0, 0, 0};
    const float* ap = a;
    const float* bp = b + 8 * half;
    for (int64_t k = 0; k < kc; ++k) {
      hq_v4f b0, b1;
      std::memcpy(&b0, bp, sizeof b0);
      std::memcpy(&b1, bp + 4, sizeof b1);
      for (int i = 0; i < kMR; ++i) {
        const hq_v4f ai = hq_v4f{ap[i], ap[i], ap[i], ap[i]};
        s[i][0] += ai * b0;
        s[i][1] += ai * b1;
      }
      ap += kMR;
      bp += kNR;
    }
    for (int i = 0; i < kMR; ++i) {
      float* ci = c + i * ldc + 8 * half;
      if (acc) {
        hq_v4f o0, o1;
        std::memcpy(&o0, ci, sizeof o0);
        std::memcpy(&o1, ci + 4, sizeof o1);
        s[i][0] += o0;
        s[i][1] += o1;
      }
      std::memcpy(ci, &s[i][0], sizeof s[i][0]);
      std::memcpy(ci + 4, &s[i][1], sizeof s[i][1]);
    }
  }
}
#else
void micro_kernel_portable(int64_t kc, const float* a, const float* b, float* c, int64_t ldc,
                           bool acc) {
  float s[kMR][kNR] = {};
  for (int64_t k = 0; k < kc; ++k)
    for (int i = 0; i < kMR; ++i)
      for (int j = 0; j < kNR; ++j) s[i][j] += a[k * kMR + i] * b[k * kNR + j];
  for (int i = 0; i < kMR; ++i)
    for (int j = 0; j < kNR; ++j) c[i * ldc + j] = acc ? s[i][j] + c[i * ldc + j] : s[i][j];
}
#endif

bool micro_kernel_avx2_compiled() {
#if defined(HQ_MICRO_X86)
  return true;
#else
  return false;
#endif
}

bool micro_kernel_avx2_available() {
#if defined(HQ_MICRO_X86)
  static const bool ok = cpu_has_avx2_fma();
  return ok;
#else
  return false;
#endif
}

MicroKernelFn micro_kernel_avx2() {
#if defined(HQ_MICRO_X86)
  return kernel_avx2;
#else
  return nullptr;
#endif
}

MicroKernelFn micro_kernel_auto() {
  return micro_kernel_avx2_available() ? micro_kernel_avx2() : micro_kernel_portable;
}

const char* micro_kernel_name(MicroKernelFn fn) {
  return fn == micro_kernel_portable ? "portable" : "avx2-fma";
}

}  // namespace hiquant
