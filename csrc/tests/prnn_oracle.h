// prnn_oracle.h - the double-precision activation and its derivative that the kernel tests'
// CPU reference loops use (prnn_test.cpp on a GPU, prnn_emulation_test.cpp on CPU threads).
#pragma once

#include <math.h>

#include "prnn.h"

inline double act(prnnActivation_t a, double x) {
  if (a == PRNN_ACT_TANH) return tanh(x);
  x = x > 0 ? x : 0;
  if (a == PRNN_ACT_CLIPPED_RELU && x > PRNN_CLIPPED_RELU_CEILING) x = PRNN_CLIPPED_RELU_CEILING;
  return x;
}

// d act / d pre-activation, from the activation's output y.
inline double act_grad(prnnActivation_t a, double y) {
  if (a == PRNN_ACT_TANH) return 1 - y * y;
  if (a == PRNN_ACT_CLIPPED_RELU) return (y > 0 && y < PRNN_CLIPPED_RELU_CEILING) ? 1 : 0;
  return y > 0 ? 1 : 0;
}
