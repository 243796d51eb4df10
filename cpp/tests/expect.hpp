// The C++ tests' check macro: EXPECT(cond) reports a failed condition with its file and line and
// counts it; a test's main returns test_result("name") (non-zero when any check failed).
#pragma once
#include <cstdio>

static int failures = 0;

#define EXPECT(cond)                                                                   \
  do {                                                                                 \
    if (!(cond)) {                                                                     \
      std::fprintf(stderr, "%s:%d: EXPECT failed: %s\n", __FILE__, __LINE__, #cond); \
      ++failures;                                                                      \
    }                                                                                  \
  } while (0)

// 0 and a line on stdout when every check passed, else 1 and the failure count on stderr.
inline int test_result(const char* name) {
  if (failures) {
    std::fprintf(stderr, "%s: %d failure(s)\n", name, failures);
    return 1;
  }
  std::printf("%s: all checks passed\n", name);
  return 0;
}
