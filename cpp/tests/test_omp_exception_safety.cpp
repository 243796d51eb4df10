// An exception thrown inside an OpenMP region must reach the caller as that exception, never
// terminate the process (faiss-style capture and rethrow). Also checks the quantizer's errors
// from inside parallel loops, and that the run-control hook interrupts between chunks.
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <limits>
#include <string>
#include <vector>

#include "hiquant/errors.hpp"
#include "hiquant/parallel.hpp"
#include "hiquant/quantizer.hpp"

#include "expect.hpp"

int main() {
  // 1. parallel_for rethrows the first exception after the region, whatever the thread count.
  for (int nt : {1, 2, 4, 8}) {
    bool caught = false;
    try {
      hiquant::parallel_for(1000, nt, [](int64_t i) {
        if (i % 97 == 13) throw hiquant::NumericalError("boom at " + std::to_string(i));
      });
    } catch (const hiquant::NumericalError& e) {
      caught = std::string(e.what()).rfind("boom at ", 0) == 0;
    }
    EXPECT(caught);
  }

  // 2. A NaN deep inside a large matrix: NumericalError from the parallel quantizer loop.
  const int64_t rows = 513, cols = 300;
  std::vector<float> W(rows * cols, 0.25f), out(rows * cols);
  W[400 * cols + 17] = std::numeric_limits<float>::quiet_NaN();
  bool caught = false;
  try {
    hiquant::fake_quantize(W.data(), rows, cols, {3, 64}, out.data(), nullptr, nullptr, 2);
  } catch (const hiquant::NumericalError& e) {
    caught = std::string(e.what()).find("row 400, column 17") != std::string::npos;
  }
  EXPECT(caught);

  // 3. Invalid arguments are reported as InvalidArgument, not a crash.
  caught = false;
  try {
    hiquant::fake_quantize(W.data(), rows, cols, {9, 64}, out.data(), nullptr, nullptr, 2);
  } catch (const hiquant::InvalidArgument&) {
    caught = true;
  }
  EXPECT(caught);

  // 4. Packing rejects codes that do not fit instead of truncating them.
  std::vector<uint8_t> codes(100, 3), packed(hiquant::packed_size(100, 2));
  codes[57] = 4;
  caught = false;
  try {
    hiquant::pack_codes(codes.data(), 100, 2, packed.data(), 2);
  } catch (const hiquant::InvalidArgument&) {
    caught = true;
  }
  EXPECT(caught);

  // 5. A run control that throws Interrupted stops a loop polled from the master thread.
  hiquant::RunControl rc;
  int polls = 0;
  rc.check = [&] {
    if (++polls == 3) throw hiquant::Interrupted("stop");
  };
  caught = false;
  try {
    for (int it = 0; it < 10; ++it) {
      rc.poll();
      hiquant::parallel_for(64, 2, [](int64_t) {});
    }
  } catch (const hiquant::Interrupted&) {
    caught = true;
  }
  EXPECT(caught && polls == 3);

  return test_result("test_omp_exception_safety");
}
