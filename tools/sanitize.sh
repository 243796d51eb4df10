#!/usr/bin/env bash
# Build the C++ core and its tests with AddressSanitizer + UndefinedBehaviorSanitizer and run
# them. Zero findings expected: any report fails the run (halt_on_error).
set -euo pipefail
cd "$(dirname "$0")/.."
build=build/sanitize
cmake -S . -B "$build" -G Ninja -DSKBUILD_PROJECT_VERSION=0.0.0 -DHIQUANT_BUILD_PYTHON=OFF \
  -DHIQUANT_BUILD_TESTS=ON -DHIQUANT_SANITIZE=ON -DCMAKE_BUILD_TYPE=Debug >/dev/null
cmake --build "$build" -j 2 >/dev/null
export ASAN_OPTIONS=halt_on_error=1:detect_leaks=1
export UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1
ctest --test-dir "$build" --output-on-failure
