#include "hiquant/parallel.hpp"

#include <atomic>
#include <cstdlib>
#include <thread>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace hiquant {

namespace {
std::atomic<int> g_default_threads{0};

int automatic_threads() {
  if (const char* env = std::getenv("OMP_NUM_THREADS")) {
    const int n = std::atoi(env);
    if (n > 0) return n;
  }
#ifdef _OPENMP
  return omp_get_num_procs();
#else
  const unsigned n = std::thread::hardware_concurrency();
  return n > 0 ? static_cast<int>(n) : 1;
#endif
}
}  // namespace

int default_threads() {
  const int n = g_default_threads.load();
  return n > 0 ? n : automatic_threads();
}

void set_default_threads(int n) { g_default_threads.store(n > 0 ? n : 0); }

int resolve_threads(int n_threads) {
#ifdef _OPENMP
  return n_threads > 0 ? n_threads : default_threads();
#else
  (void)n_threads;
  return 1;
#endif
}

bool openmp_enabled() {
#ifdef _OPENMP
  return true;
#else
  return false;
#endif
}

}  // namespace hiquant
