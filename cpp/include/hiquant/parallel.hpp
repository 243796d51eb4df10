// Thread-count policy, exception-safe OpenMP loops and the run-control hook.
//
// Policy (sklearn semantics): every kernel takes n_threads; 0 means hiquant's default, which is
// set_default_threads() if called, else OMP_NUM_THREADS, else the cores available. The global
// omp_set_num_threads is never called, so hiquant does not change other libraries' threading.
#pragma once
#include <cstdint>
#include <exception>
#include <functional>
#include <mutex>

namespace hiquant {

int default_threads();
void set_default_threads(int n);  // n <= 0 restores the automatic choice
int resolve_threads(int n_threads);
bool openmp_enabled();

// Run control for long kernels: `check` is called from the master thread, outside parallel
// regions; it may throw (e.g. Interrupted on Ctrl-C). `progress(done, total)` reports work done.
struct RunControl {
  std::function<void()> check;
  std::function<void(int64_t, int64_t)> progress;
  void poll() const {
    if (check) check();
  }
  void report(int64_t done, int64_t total) const {
    if (progress) progress(done, total);
  }
};

// Captures the first exception thrown inside an OpenMP region so it can be rethrown after the
// region ends: an exception escaping a parallel region terminates the process.
class ExceptionCapture {
 public:
  template <typename F>
  void run(F&& f) noexcept {
    try {
      f();
    } catch (...) {
      std::lock_guard<std::mutex> lock(mu_);
      if (!first_) first_ = std::current_exception();
    }
  }
  bool failed() const { return static_cast<bool>(first_); }
  void rethrow() const {
    if (first_) std::rethrow_exception(first_);
  }

 private:
  std::mutex mu_;
  std::exception_ptr first_;
};

// parallel_for over [0, n) with static scheduling; body(i) may throw.
template <typename Body>
void parallel_for(int64_t n, int n_threads, Body&& body) {
  ExceptionCapture capture;
  const int nt = resolve_threads(n_threads);
#pragma omp parallel for schedule(static) num_threads(nt) if (nt > 1 && n > 1)
  for (int64_t i = 0; i < n; ++i) {
    if (capture.failed()) continue;
    capture.run([&] { body(i); });
  }
  capture.rethrow();
}

// parallel_for with dynamic scheduling: threads take the next index as they finish, so a thread
// slowed down by another process on its core (a shared machine) does not hold the others up at
// the barrier. Only for bodies whose results do not depend on which thread runs them.
template <typename Body>
void parallel_for_dynamic(int64_t n, int n_threads, Body&& body) {
  ExceptionCapture capture;
  const int nt = resolve_threads(n_threads);
#pragma omp parallel for schedule(dynamic, 1) num_threads(nt) if (nt > 1 && n > 1)
  for (int64_t i = 0; i < n; ++i) {
    if (capture.failed()) continue;
    capture.run([&] { body(i); });
  }
  capture.rethrow();
}

}  // namespace hiquant
