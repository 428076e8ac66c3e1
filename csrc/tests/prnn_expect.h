// prnn_expect.h - the failure counter and EXPECT macro shared by the C/C++ test programs.
#pragma once

#include <stdio.h>

inline int g_failures = 0;

#define EXPECT(cond, ...)                          \
  do {                                             \
    if (!(cond)) {                                 \
      ++g_failures;                                \
      printf("FAIL %s:%d: ", __FILE__, __LINE__);  \
      printf(__VA_ARGS__);                         \
      printf("\n");                                \
    }                                              \
  } while (0)
