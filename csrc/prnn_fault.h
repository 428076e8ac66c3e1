// prnn_fault.h - fault injection for tests: PRNN_FAULT makes the persistent path fail on purpose.
//
//   PRNN_FAULT=<kind>[:<pass>]   kind: plan | launch | timeout; pass: forward | backward (default both)
//     plan     the planner refuses the problem (NOT_SUPPORTED; prnnCheckSupport says so too)
//     launch   the launch fails (CUDA_ERROR) without reaching the GPU
//     timeout  the last block never arrives at the grid barriers, so the others time out (TIMEOUT)
//
// Read on every call (not cached), so a test can set and restore it within one process. The C API
// (prnn_api.cu) acts on it for CUDA problems; the torch binding's CPU implementation, which has no
// planner or launch, fails with the same status and message so that callers see one behaviour.
// Header-only and free of CUDA, so the CPU-only build of the binding includes it too.
#pragma once

#include <stdlib.h>
#include <string.h>

namespace prnn {

enum class Fault { kNone, kPlan, kLaunch, kTimeout, kInvalid };

inline const char* fault_env() {
  const char* v = getenv("PRNN_FAULT");
  return v != nullptr ? v : "";
}

// The fault injected into this pass, kInvalid for a value that is not understood.
inline Fault injected_fault(bool backward) {
  const char* v = fault_env();
  if (v[0] == '\0') return Fault::kNone;
  const char* colon = strchr(v, ':');
  const size_t kind_len = colon != nullptr ? static_cast<size_t>(colon - v) : strlen(v);
  Fault kind = Fault::kInvalid;
  if (kind_len == 4 && strncmp(v, "plan", 4) == 0) kind = Fault::kPlan;
  if (kind_len == 6 && strncmp(v, "launch", 6) == 0) kind = Fault::kLaunch;
  if (kind_len == 7 && strncmp(v, "timeout", 7) == 0) kind = Fault::kTimeout;
  if (kind == Fault::kInvalid || colon == nullptr) return kind;
  if (strcmp(colon + 1, "forward") == 0) return backward ? Fault::kNone : kind;
  if (strcmp(colon + 1, "backward") == 0) return backward ? kind : Fault::kNone;
  return Fault::kInvalid;
}

constexpr const char* kFaultUsage = "PRNN_FAULT must be plan, launch or timeout, optionally :forward or :backward";

}  // namespace prnn
