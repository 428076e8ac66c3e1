// torch_binding.cpp - the recurrent op as PyTorch custom operators (namespace asr_prnn).
//
//   h_t = act(u_t + h_{t-1} W^T)     act in relu, clipped_relu (min(max(x,0),20)), tanh
//
// Schemas are defined once, here. Each op has a CPU implementation (time loops of at::addmm_ on
// contiguous slices, in-place activations) and, unless built with -DPRNN_CPU_ONLY, a CUDA
// implementation that calls the C API of prnn.h on the current stream with a workspace from the
// caching allocator. The fake (meta) implementations and autograd are registered from Python
// (asr/ops/custom_op.py). Shapes are the canonical ones of asr/ops/dispatch.py:
//   u, y, du, dy  [T, N, D, H]     w_hh, dw  [D, H, H]     h0, h_last, dh0, dh_last  [N, D, H]
//   lengths       [N] int64 on the same device as u, each in [0, T]
// Direction 1 runs backwards in time within each sequence's own length.
//
// Failures of the persistent path (the planner refuses at run time, the launch fails, a grid barrier
// times out) raise RuntimeError "<op>: persistent kernel: PRNN_STATUS_<name>: <detail>", a form
// asr/ops/dispatch.py recognises to fall back. A grid-barrier timeout is found on the GPU after the
// launch: by default the CUDA implementation checks it asynchronously and a later persistent call
// on the device (or check_status) raises it, marked "...: PRNN_STATUS_TIMEOUT: deferred: ...";
// PRNN_SYNC_CHECK=1 (or PRNN_DEBUG=1) makes every call check its own launch before it returns. The
// exact guarantee is under "Status checks" below. PRNN_FAULT (prnn_fault.h) injects these failures;
// the CPU implementation honours it too (and raises at the call), so that CI exercises the callers.
//
// Ops:
//   recurrence_forward(u, w_hh, h0, lengths, activation) -> (y, h_last)
//   recurrence_backward_data(w_hh, y, dy, dh_last, lengths, activation) -> (du, dh0)
//   recurrence_backward_weight(y, h0, du, lengths) -> dw            batched GEMMs over all steps
//   cuda_available() -> bool                                         was this build made with nvcc?
//   persistent_support(T, N, D, H, activation, dtype, device) -> (bool, str)
//   measure_barrier(device, blocks, iterations) -> float             microseconds per grid barrier
//   check_status(device=-1, wait=False) -> int                       raise a deferred failure; launches unchecked
//   status_check_mode() -> str                                       "async" or "sync" (PRNN_SYNC_CHECK)
//   simulate_status_checks(capacity, script) -> str                  the check bookkeeping, simulated (tests)

#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <mutex>
#include <optional>
#include <sstream>
#include <string>
#include <tuple>
#include <vector>

#include "prnn_fault.h"

#ifndef PRNN_CPU_ONLY
// c10's stream and guard headers need only the CUDA runtime; ATen/cuda/CUDAContext.h would also
// pull in cuBLAS/cuSPARSE headers that a bare toolkit may lack.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include "prnn.h"
#endif

namespace asr_prnn {
namespace {

constexpr double kClipCeiling = 20.0;  // clipped ReLU ceiling, as in Deep Speech 2

enum class Activation { kRelu, kClippedRelu, kTanh };

Activation parse_activation(const std::string& name) {
  if (name == "relu") return Activation::kRelu;
  if (name == "clipped_relu") return Activation::kClippedRelu;
  if (name == "tanh") return Activation::kTanh;
  TORCH_CHECK(false, "recurrence: activation must be relu, clipped_relu or tanh, got '", name, "'");
}

void activate_(at::Tensor& x, Activation activation) {
  switch (activation) {
    case Activation::kRelu: x.relu_(); break;
    case Activation::kClippedRelu: x.clamp_(0.0, kClipCeiling); break;
    case Activation::kTanh: x.tanh_(); break;
  }
}

// act'(pre-activation) expressed through the activation's output y (all three are invertible
// enough for that): relu y>0, clipped relu 0<y<20, tanh 1-y^2.
at::Tensor activation_derivative_from_output(const at::Tensor& y, Activation activation) {
  switch (activation) {
    case Activation::kRelu: return y.gt(0).to(y.scalar_type());
    case Activation::kClippedRelu: return y.gt(0).logical_and_(y.lt(kClipCeiling)).to(y.scalar_type());
    case Activation::kTanh: return 1 - y * y;
  }
  return at::Tensor();
}

// Shape checks shared by the implementations; returns {T, N, D, H}.
std::tuple<int64_t, int64_t, int64_t, int64_t> check_problem(const at::Tensor& u_like, const at::Tensor& w_hh,
                                                             const at::Tensor& lengths, const char* op) {
  TORCH_CHECK(u_like.dim() == 4, op, ": expected a [T, N, D, H] tensor, got ", u_like.sizes());
  const int64_t T = u_like.size(0), N = u_like.size(1), D = u_like.size(2), H = u_like.size(3);
  TORCH_CHECK(D == 1 || D == 2, op, ": D must be 1 or 2, got ", D);
  TORCH_CHECK(w_hh.dim() == 3 && w_hh.size(0) == D && w_hh.size(1) == H && w_hh.size(2) == H, op,
              ": w_hh must be [D, H, H] = [", D, ", ", H, ", ", H, "], got ", w_hh.sizes());
  TORCH_CHECK(w_hh.scalar_type() == u_like.scalar_type(), op, ": w_hh is ", w_hh.scalar_type(), ", expected ",
              u_like.scalar_type());
  TORCH_CHECK(lengths.dim() == 1 && lengths.size(0) == N, op, ": lengths must be [N] = [", N, "], got ",
              lengths.sizes());
  TORCH_CHECK(lengths.scalar_type() == at::kLong, op, ": lengths must be int64, got ", lengths.scalar_type());
  TORCH_CHECK(lengths.device() == u_like.device(), op, ": lengths on ", lengths.device(), ", tensors on ",
              u_like.device());
  return {T, N, D, H};
}

void check_state(const at::Tensor& state, int64_t N, int64_t D, int64_t H, const at::Tensor& like, const char* name,
                 const char* op) {
  TORCH_CHECK(state.dim() == 3 && state.size(0) == N && state.size(1) == D && state.size(2) == H, op, ": ", name,
              " must be [N, D, H] = [", N, ", ", D, ", ", H, "], got ", state.sizes());
  TORCH_CHECK(state.scalar_type() == like.scalar_type() && state.device() == like.device(), op, ": ", name, " is ",
              state.scalar_type(), " on ", state.device(), ", expected ", like.scalar_type(), " on ", like.device());
}

// The argument checks shared by the CPU and CUDA backward-data implementations.
std::tuple<int64_t, int64_t, int64_t, int64_t> check_backward_data_args(const at::Tensor& w, const at::Tensor& y,
                                                                        const at::Tensor& dy, const at::Tensor& dh_last,
                                                                        const at::Tensor& lengths, const char* op) {
  auto dims = check_problem(y, w, lengths, op);
  auto [T, N, D, H] = dims;
  TORCH_CHECK(dy.sizes() == y.sizes() && dy.scalar_type() == y.scalar_type(), op,
              ": dy must match y ", y.sizes(), ", got ", dy.sizes());
  check_state(dh_last, N, D, H, y, "dh_last", op);
  return dims;
}

// The marker dispatch.py looks for; every run-time failure of the persistent path carries it.
constexpr const char* kKernelFailure = ": persistent kernel: ";

// PRNN_FAULT on the CPU implementation: fail as the CUDA path would, with the same status names.
void raise_injected_fault(const char* op, bool backward) {
  const prnn::Fault fault = prnn::injected_fault(backward);
  if (fault == prnn::Fault::kNone) return;
  const char* pass = backward ? "backward" : "forward";
  const char* value = prnn::fault_env();
  TORCH_CHECK(fault != prnn::Fault::kInvalid, op, ": PRNN_FAULT=", value, ": ", prnn::kFaultUsage);
  TORCH_CHECK(fault != prnn::Fault::kPlan, op, kKernelFailure, "PRNN_STATUS_NOT_SUPPORTED: ", pass,
              ": fault injected (PRNN_FAULT=", value, "): the planner refused the problem");
  TORCH_CHECK(fault != prnn::Fault::kLaunch, op, kKernelFailure, "PRNN_STATUS_CUDA_ERROR: cooperative launch (", pass,
              "): fault injected (PRNN_FAULT=", value, "): the launch failed");
  TORCH_CHECK(fault != prnn::Fault::kTimeout, op, kKernelFailure, "PRNN_STATUS_TIMEOUT: ", pass,
              " kernel: fault injected (PRNN_FAULT=", value, "): a block never arrived at grid barrier 1 and the "
              "others gave up");
}

// ---------------------------------------------------------------------------------------------
// Status checks of the persistent launches (the bookkeeping is host-only and in both builds)
// ---------------------------------------------------------------------------------------------
//
// A persistent launch whose grid barrier times out gives up and leaves a status record in its
// workspace (prnn.h); its outputs are undefined. The CUDA implementation learns of it in one of
// two modes, chosen per call from the environment:
//
//   asynchronous (default): after each launch (outside graph capture) the binding enqueues on the
//     launch's stream a copy of the record into a pinned host slot of its device (kStatusSlots per
//     device) and an event after it; the call returns without synchronising. A failed launch is
//     reported, as RuntimeError "<reporter>: persistent kernel: PRNN_STATUS_TIMEOUT: deferred:
//     launch #<n> (<op> on cuda:<d>, <problem>) failed ...", by the first of
//       (a) a persistent call (forward or backward, any thread or stream) on the same device that
//           starts after the failed kernel has finished on the GPU (a non-blocking cudaEventQuery
//           of every pending slot; not during graph capture);
//       (b) check_status(device, wait) after it has finished; with wait=True check_status waits
//           for every launch enqueued so far (their events only, not the whole stream);
//       (c) the launch kStatusSlots launches later on the device: when every slot is pending, the
//           call waits for the oldest one first (so the CPU runs at most kStatusSlots persistent
//           launches ahead of the checks).
//     Each failure is reported once. Until then the failed call's outputs have been returned and
//     may have been used: the report says so, and dispatch.py does not fall back silently on it.
//   synchronous: PRNN_SYNC_CHECK=1 (or PRNN_DEBUG=1): the call waits for its stream and reads the
//     record before it returns, so a timeout is raised by the call that caused it (one stream
//     synchronisation per call; what the tests that expect an immediate error use).
//
// Planner refusals and failed launches are raised by the call itself in both modes.

// PRNN_SYNC_CHECK / PRNN_DEBUG, read on every call; an unknown value is refused.
bool sync_check_requested(const char* op) {
  const char* value = getenv("PRNN_SYNC_CHECK");
  bool sync = false;
  if (value != nullptr && value[0] != '\0') {
    TORCH_CHECK(strcmp(value, "0") == 0 || strcmp(value, "1") == 0, op, ": PRNN_SYNC_CHECK=", value,
                ": must be 1 (check each persistent launch before the call returns) or 0 (asynchronously, the "
                "default)");
    sync = value[0] == '1';
  }
  const char* debug = getenv("PRNN_DEBUG");
  return sync || (debug != nullptr && strcmp(debug, "1") == 0);
}

std::string status_check_mode() { return sync_check_requested("status_check_mode") ? "sync" : "async"; }

// What a pending check is about, kept as plain values and put into words only for a report.
struct LaunchInfo {
  const char* op = "";
  int device = 0;
  int64_t T = 0, N = 0, D = 0, H = 0;
  const char* dtype = "";
  const char* activation = "";
};

std::string describe(const LaunchInfo& l) {
  std::ostringstream out;
  out << l.op << " on cuda:" << l.device << ", T=" << l.T << " N=" << l.N << " D=" << l.D << " H=" << l.H << " "
      << l.dtype << " " << l.activation;
  return out.str();
}

struct KernelFailure {
  std::string status;  // "PRNN_STATUS_TIMEOUT"
  std::string detail;  // the record's fields in words (prnnLastErrorMessage)
};

// The launches of one device whose status copies are in flight, in slots 0..capacity-1. Events
// and records are the caller's (callables), so that the CPU-only build has it too and
// simulate_status_checks can drive it without a GPU. Not thread-safe: the caller locks.
class PendingChecks {
 public:
  explicit PendingChecks(int capacity) : slots_(static_cast<size_t>(capacity)) {}

  int pending() const {
    return static_cast<int>(std::count_if(slots_.begin(), slots_.end(), [](const Slot& s) { return s.pending; }));
  }

  // A slot whose copy is not in flight, -1 if every slot is pending.
  int free_slot() const {
    for (size_t i = 0; i < slots_.size(); ++i)
      if (!slots_[i].pending) return static_cast<int>(i);
    return -1;
  }

  // Marks `slot` (from free_slot) pending for `launch`; returns the launch's sequence number (from 1).
  uint64_t add(int slot, const LaunchInfo& launch) {
    Slot& s = slots_.at(static_cast<size_t>(slot));
    s.pending = true;
    s.sequence = next_sequence_++;
    s.launch = launch;
    return s.sequence;
  }

  // Settles the pending launches whose copies have landed. landed(slot, wait) says whether the
  // slot's copy has landed, waiting until it has if `wait`; failure(slot) reads the landed record.
  // wait_all: wait for every pending launch; make_room: if every slot is pending, wait for the
  // oldest. Returns the report of the failures among the settled launches ("" if none): the
  // oldest in full, the number of the others.
  template <class Landed, class Failure>
  std::string settle(const char* reporter, bool wait_all, bool make_room, Landed&& landed, Failure&& failure) {
    int oldest = -1;
    if (make_room && free_slot() < 0) {
      for (size_t i = 0; i < slots_.size(); ++i)
        if (oldest < 0 || slots_[i].sequence < slots_[static_cast<size_t>(oldest)].sequence)
          oldest = static_cast<int>(i);
    }
    const Slot* first = nullptr;
    KernelFailure first_failure;
    int failures = 0;
    std::vector<Slot> settled;  // copies: `first` must survive the slot's reuse
    settled.reserve(slots_.size());
    for (size_t i = 0; i < slots_.size(); ++i) {
      Slot& s = slots_[i];
      if (!s.pending || !landed(static_cast<int>(i), wait_all || static_cast<int>(i) == oldest)) continue;
      s.pending = false;
      std::optional<KernelFailure> f = failure(static_cast<int>(i));
      if (!f) continue;
      ++failures;
      settled.push_back(s);
      if (first == nullptr || s.sequence < first->sequence) {
        first = &settled.back();
        first_failure = *f;
      }
    }
    if (failures == 0) return "";
    std::ostringstream out;
    out << reporter << kKernelFailure << first_failure.status << ": deferred: launch #" << first->sequence << " ("
        << describe(first->launch) << ") failed on the GPU after the call had returned: " << first_failure.detail
        << "; its outputs were undefined and anything computed from them since is unreliable";
    if (failures > 1) out << " (" << failures - 1 << " later launch(es) failed too)";
    return out.str();
  }

 private:
  struct Slot {
    bool pending = false;
    uint64_t sequence = 0;
    LaunchInfo launch;
  };
  std::vector<Slot> slots_;
  uint64_t next_sequence_ = 1;
};

// PendingChecks against a simulated device, for tests/test_ops_faults.py (any build). `script` is
// tokens separated by spaces; each appends one line to the result:
//   L<op>   a launch of <op> queues its status copy: "L<op>:slot<i>#<sequence>", or "L<op>:sync"
//           when every slot is pending (the CUDA path then checks that launch synchronously)
//   D<n>    launch #n finished (its copy landed), F<n> finished with a barrier timeout: "D<n>"
//   S<op>   the start of a persistent call to <op>: non-blocking settle making room: "S:ok" / report
//   W       check_status(wait=True): waits for every pending launch (unfinished ones finish ok)
//   C       check_status(wait=False)
//   P       "P:<pending launches>"
std::string simulate_status_checks(int64_t capacity, std::string script) {
  TORCH_CHECK(capacity >= 1 && capacity <= 1024, "simulate_status_checks: capacity must be in [1, 1024]");
  PendingChecks book(static_cast<int>(capacity));
  std::vector<uint64_t> slot_sequence(static_cast<size_t>(capacity), 0);
  std::vector<int> finished;  // per sequence: 0 running, 1 ok, 2 timed out
  std::deque<std::string> names;  // LaunchInfo keeps const char*: a deque never moves its elements
  std::istringstream in(script);
  std::ostringstream out;
  std::string token;
  auto landed = [&](int slot, bool wait) {
    int& state = finished.at(slot_sequence.at(static_cast<size_t>(slot)));
    if (state == 0 && wait) state = 1;
    return state != 0;
  };
  auto failure = [&](int slot) -> std::optional<KernelFailure> {
    if (finished.at(slot_sequence.at(static_cast<size_t>(slot))) != 2) return std::nullopt;
    return KernelFailure{"PRNN_STATUS_TIMEOUT", "simulated timeout"};
  };
  auto settle = [&](const char* reporter, bool wait_all, bool make_room) {
    const std::string report = book.settle(reporter, wait_all, make_room, landed, failure);
    return report.empty() ? std::string("ok") : report;
  };
  finished.push_back(0);  // sequence 0 is never used
  while (in >> token) {
    const char kind = token[0];
    const std::string arg = token.substr(1);
    if (kind == 'L') {
      names.push_back(arg);
      LaunchInfo launch;
      launch.op = names.back().c_str();
      launch.dtype = "Float";
      launch.activation = "tanh";
      const int slot = book.free_slot();
      finished.push_back(0);
      if (slot < 0) {
        out << token << ":sync\n";
        continue;
      }
      const uint64_t sequence = book.add(slot, launch);
      TORCH_CHECK(sequence == finished.size() - 1, "simulate_status_checks: sequence numbers out of step");
      slot_sequence[static_cast<size_t>(slot)] = sequence;
      out << token << ":slot" << slot << "#" << sequence << "\n";
    } else if (kind == 'D' || kind == 'F') {
      const size_t n = static_cast<size_t>(std::stoul(arg));
      TORCH_CHECK(n >= 1 && n < finished.size(), "simulate_status_checks: no launch #", n);
      finished[n] = kind == 'D' ? 1 : 2;
      out << token << "\n";
    } else if (kind == 'S') {
      names.push_back(arg);  // the reporter's name must outlive the call too
      out << "S:" << settle(names.back().c_str(), false, true) << "\n";
    } else if (kind == 'W' || kind == 'C') {
      out << kind << ":" << settle("check_status", kind == 'W', false) << "\n";
    } else if (kind == 'P') {
      out << "P:" << book.pending() << "\n";
    } else {
      TORCH_CHECK(false, "simulate_status_checks: unknown token '", token, "'");
    }
  }
  return out.str();
}

// [T, N] mask of the steps inside each sequence.
at::Tensor valid_steps(const at::Tensor& lengths, int64_t T) {
  return at::arange(T, lengths.options()).unsqueeze(1).lt(lengths.unsqueeze(0));  // (T, N)
}

// ---------------------------------------------------------------------------------------------
// CPU
// ---------------------------------------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor> forward_cpu(const at::Tensor& u_in, const at::Tensor& w_in, const at::Tensor& h0_in,
                                               const at::Tensor& lengths, std::string activation_name) {
  const char* op = "recurrence_forward";
  auto [T, N, D, H] = check_problem(u_in, w_in, lengths, op);
  check_state(h0_in, N, D, H, u_in, "h0", op);
  const Activation activation = parse_activation(activation_name);
  raise_injected_fault(op, false);
  const at::Tensor w = w_in.contiguous();
  const at::Tensor h0 = h0_in.contiguous();
  // y starts as a copy of u; each step adds h_{t-1} W^T in place and applies the activation.
  // Steps past a sequence's length are computed like the others (their rows never feed a valid
  // row: rows of a matmul are independent) and zeroed once at the end. The reverse direction
  // starts a sequence of length L < T at t = L-1 from h0: h0 is written into the padding slot
  // y[L, n] right after that slot's own (discarded) step, so step L-1 reads it as its state.
  at::Tensor y = u_in.contiguous().clone();  // (T, N, D, H)
  at::Tensor h_last = at::empty_like(h0);    // (N, D, H)
  if (T == 0 || N == 0 || H == 0) {
    h_last.copy_(h0);
    return {y, h_last};
  }
  const at::Tensor lengths_host = lengths.contiguous();
  const int64_t* length_of = lengths_host.data_ptr<int64_t>();
  std::vector<std::vector<int64_t>> rows_with_length(T + 1);
  for (int64_t n = 0; n < N; ++n) {
    TORCH_CHECK(length_of[n] >= 0 && length_of[n] <= T, op, ": lengths must lie in [0, ", T, "], got ",
                length_of[n]);
    rows_with_length[length_of[n]].push_back(n);
  }
  const bool ragged = rows_with_length[T].size() != static_cast<size_t>(N);
  const at::Tensor batch_index = at::arange(N, lengths.options());
  const at::Tensor last_index = (lengths - 1).clamp_min(0);  // (N,)
  const at::Tensor empty = lengths.eq(0).view({N, 1});       // (N, 1)
  for (int64_t d = 0; d < D; ++d) {
    at::Tensor y_d = y.select(2, d);  // (T, N, H), row stride D*H
    const at::Tensor w_t = w[d].t();  // (H, H) = W^T
    const at::Tensor h0_d = h0.select(1, d);
    at::Tensor h_last_d = h_last.select(1, d);
    if (d == 0) {
      for (int64_t t = 0; t < T; ++t) {
        at::Tensor y_t = y_d[t];
        y_t.addmm_(t == 0 ? h0_d : y_d[t - 1], w_t);
        activate_(y_t, activation);
      }
      h_last_d.copy_(y_d.index({last_index, batch_index}));  // state at t = len-1
    } else {
      for (int64_t t = T - 1; t >= 0; --t) {
        at::Tensor y_t = y_d[t];
        y_t.addmm_(t == T - 1 ? h0_d : y_d[t + 1], w_t);
        activate_(y_t, activation);
        if (t > 0 && !rows_with_length[t].empty()) {  // these sequences start at t-1
          const at::Tensor rows = at::tensor(rows_with_length[t], lengths.options());
          y_t.index_copy_(0, rows, h0_d.index_select(0, rows));
        }
      }
      h_last_d.copy_(y_d[0]);  // state at t = 0
    }
    h_last_d.copy_(at::where(empty, h0_d, h_last_d));
  }
  if (ragged) {
    y.masked_fill_(valid_steps(lengths, T).logical_not().view({T, N, 1, 1}), 0);
  }
  return {y, h_last};
}

std::tuple<at::Tensor, at::Tensor> backward_data_cpu(const at::Tensor& w_in, const at::Tensor& y_in,
                                                     const at::Tensor& dy_in, const at::Tensor& dh_last_in,
                                                     const at::Tensor& lengths, std::string activation_name) {
  const char* op = "recurrence_backward_data";
  auto [T, N, D, H] = check_backward_data_args(w_in, y_in, dy_in, dh_last_in, lengths, op);
  const Activation activation = parse_activation(activation_name);
  raise_injected_fault(op, true);
  const at::Tensor w = w_in.contiguous();
  const at::Tensor y = y_in.contiguous();
  const at::Tensor dh_last = dh_last_in.contiguous();
  at::Tensor dh0 = at::empty_like(dh_last);  // (N, D, H)
  if (T == 0 || N == 0 || H == 0) {
    dh0.copy_(dh_last);
    return {at::zeros_like(y), dh0};
  }
  // du starts as dy plus dh_last injected at each sequence's last step (t = len-1 forward,
  // t = 0 reverse); steps then add du_{next} W and multiply by act'. The derivative is zero
  // outside each length, which keeps padding out of the recurrence.
  at::Tensor derivative = activation_derivative_from_output(y, activation);  // (T, N, D, H)
  const at::Tensor valid = valid_steps(lengths, T);                           // (T, N)
  derivative.masked_fill_(valid.logical_not().view({T, N, 1, 1}), 0);
  at::Tensor du = dy_in.contiguous().clone();  // (T, N, D, H)
  const at::Tensor non_empty = lengths.gt(0).nonzero().squeeze(1);  // rows with at least one step
  const at::Tensor last_index = (lengths - 1).clamp_min(0);
  const at::Tensor empty = lengths.eq(0).view({N, 1});
  for (int64_t d = 0; d < D; ++d) {
    at::Tensor du_d = du.select(2, d);  // (T, N, H)
    const at::Tensor deriv_d = derivative.select(2, d);
    const at::Tensor w_d = w[d];  // (H, H): dh_{prev} = du W
    const at::Tensor dh_last_d = dh_last.select(1, d);
    const at::Tensor final_step = d == 0 ? last_index.index_select(0, non_empty) : at::zeros_like(non_empty);
    du_d.index_put_({final_step, non_empty}, dh_last_d.index_select(0, non_empty), /*accumulate=*/true);
    at::Tensor first_step_du;  // du at the step that read h0
    if (d == 0) {
      for (int64_t t = T - 1; t >= 0; --t) {
        at::Tensor du_t = du_d[t];
        if (t < T - 1) du_t.addmm_(du_d[t + 1], w_d);
        du_t.mul_(deriv_d[t]);
      }
      first_step_du = du_d[0];
    } else {
      for (int64_t t = 0; t < T; ++t) {
        at::Tensor du_t = du_d[t];
        if (t > 0) du_t.addmm_(du_d[t - 1], w_d);
        du_t.mul_(deriv_d[t]);
      }
      first_step_du = du_d.index({last_index, at::arange(N, lengths.options())});  // (N, H)
    }
    at::Tensor dh0_d = dh0.select(1, d);
    dh0_d.copy_(at::where(empty, dh_last_d, at::mm(first_step_du, w_d)));
  }
  return {du, dh0};
}

// ---------------------------------------------------------------------------------------------
// dW, any device: dW_d = sum_t du_t,d^T h_{t-1},d  as batched GEMMs over all T*N rows.
// ---------------------------------------------------------------------------------------------

// A GEMM may add its K terms one after another into one accumulator, so its rounding error grows
// with sqrt(K), and K = T*N reaches tens of thousands (on an H100, one fp32 GEMM over 7,680 rows
// gave 6.7x the error of PyTorch's per-step sum, as that would predict). In fp32/fp64 the rows
// are therefore taken in chunks of kWeightChunkRows (or sqrt(K) if larger): one GEMM per chunk,
// accumulated in the output, so the error grows with sqrt(chunk) + sqrt(K / chunk) instead. fp16/bf16 GEMMs already
// accumulate in fp32 and round once at the end; chunking would round the running sum each time,
// so they stay one GEMM.
constexpr int64_t kWeightChunkRows = 256;

// h_prev[t] is the state that step t read: forward h0 at t=0 else y[t-1]; reverse y[t+1], or h0 at
// t = len-1. Entries outside each length are left as they come: du is zero there.
at::Tensor previous_states(const at::Tensor& y, const at::Tensor& h0, const at::Tensor& lengths) {
  const int64_t T = y.size(0), N = y.size(1), D = y.size(2);
  at::Tensor h_prev = at::empty_like(y);  // (T, N, D, H)
  at::Tensor fwd = h_prev.select(2, 0);
  fwd[0].copy_(h0.select(1, 0));
  if (T > 1) fwd.narrow(0, 1, T - 1).copy_(y.select(2, 0).narrow(0, 0, T - 1));
  if (D == 2) {
    at::Tensor rev = h_prev.select(2, 1);
    if (T > 1) rev.narrow(0, 0, T - 1).copy_(y.select(2, 1).narrow(0, 1, T - 1));
    rev[T - 1].copy_(h0.select(1, 1));
    const at::Tensor start = (lengths - 1).clamp_min(0);
    rev.index_put_({start, at::arange(N, lengths.options())}, h0.select(1, 1));
  }
  return h_prev;
}

at::Tensor backward_weight(const at::Tensor& y_in, const at::Tensor& h0_in, const at::Tensor& du_in,
                           const at::Tensor& lengths) {
  const char* op = "recurrence_backward_weight";
  TORCH_CHECK(y_in.dim() == 4 && du_in.sizes() == y_in.sizes(), op, ": y and du must be [T, N, D, H] alike, got ",
              y_in.sizes(), " and ", du_in.sizes());
  const int64_t T = y_in.size(0), N = y_in.size(1), D = y_in.size(2), H = y_in.size(3);
  check_state(h0_in, N, D, H, y_in, "h0", op);
  TORCH_CHECK(lengths.dim() == 1 && lengths.size(0) == N && lengths.scalar_type() == at::kLong &&
                  lengths.device() == y_in.device(),
              op, ": lengths must be int64 [N] on ", y_in.device());
  if (T == 0 || N == 0) return at::zeros({D, H, H}, y_in.options());
  const at::Tensor y = y_in.contiguous(), h0 = h0_in.contiguous(), du = du_in.contiguous();
  const at::Tensor h_prev = previous_states(y, h0, lengths);
  const at::Tensor du_rows = du.view({T * N, D, H}).permute({1, 2, 0});        // (D, H, T*N)
  const at::Tensor h_prev_rows = h_prev.view({T * N, D, H}).permute({1, 0, 2});  // (D, T*N, H)
  const int64_t rows = T * N;
  const bool full_precision = y.scalar_type() == at::kFloat || y.scalar_type() == at::kDouble;
  const int64_t chunk = std::max<int64_t>(kWeightChunkRows, static_cast<int64_t>(std::ceil(std::sqrt(double(rows)))));
  if (!full_precision || rows <= chunk) return at::bmm(du_rows, h_prev_rows);  // (D, H, H)
  at::Tensor dw = at::bmm(du_rows.narrow(2, 0, chunk), h_prev_rows.narrow(1, 0, chunk));
  for (int64_t start = chunk; start < rows; start += chunk) {
    const int64_t count = std::min(chunk, rows - start);
    dw.baddbmm_(du_rows.narrow(2, start, count), h_prev_rows.narrow(1, start, count));
  }
  return dw;
}

// ---------------------------------------------------------------------------------------------
// CUDA: the persistent kernel through the C API
// ---------------------------------------------------------------------------------------------

#ifndef PRNN_CPU_ONLY

#define PRNN_TORCH_CHECK(op, call)                                                                       \
  do {                                                                                                   \
    prnnStatus_t prnn_status_ = (call);                                                                  \
    TORCH_CHECK(prnn_status_ == PRNN_STATUS_SUCCESS, op, kKernelFailure, prnnStatusString(prnn_status_), \
                ": ", prnnLastErrorMessage(), " (from ", #call, " at ", __FILE__, ":", __LINE__, ")");  \
  } while (0)

// The asynchronous status checks of one device (see "Status checks" above). Created on first use
// and never freed: the events and pinned slots live as long as the process.
constexpr int kStatusSlots = 32;
constexpr int kMaxCheckedDevices = 64;

struct DeviceChecks {
  std::mutex mutex;
  PendingChecks book{kStatusSlots};
  unsigned char* records = nullptr;  // pinned host memory: kStatusSlots x PRNN_STATUS_RECORD_BYTES
  cudaEvent_t events[kStatusSlots] = {};
};

DeviceChecks& device_checks(int device, const char* op) {
  TORCH_CHECK(device >= 0 && device < kMaxCheckedDevices, op, ": device index ", device, " out of range");
  static DeviceChecks* all = new DeviceChecks[kMaxCheckedDevices];
  return all[device];
}

bool stream_is_capturing(cudaStream_t stream, const char* op) {
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  const cudaError_t err = cudaStreamIsCapturing(stream, &capture);
  TORCH_CHECK(err == cudaSuccess, op, kKernelFailure, "PRNN_STATUS_CUDA_ERROR: cudaStreamIsCapturing: ",
              cudaGetErrorString(err));
  return capture != cudaStreamCaptureStatusNone;
}

// Settles `device`'s pending checks (PendingChecks::settle) and raises the report of any failure.
// The caller has made `device` current. Host-side waits only on the checks' own events.
void settle_checks(int device, const char* reporter, bool wait_all, bool make_room) {
  DeviceChecks& d = device_checks(device, reporter);
  std::string report;
  {
    const std::lock_guard<std::mutex> lock(d.mutex);
    if (d.book.pending() == 0) return;
    auto landed = [&](int slot, bool wait) {
      const cudaError_t err = wait ? cudaEventSynchronize(d.events[slot]) : cudaEventQuery(d.events[slot]);
      if (err == cudaErrorNotReady) {
        (void)cudaGetLastError();  // not an error: clear it, as c10's CUDAEvent::query does
        return false;
      }
      TORCH_CHECK(err == cudaSuccess, reporter, ": waiting for the status check of an earlier persistent launch: ",
                  cudaGetErrorString(err), " (", cudaGetErrorName(err), ")");
      return true;
    };
    auto failure = [&](int slot) -> std::optional<KernelFailure> {
      const prnnStatus_t st = prnnStatusFromRecord(d.records + static_cast<size_t>(slot) * PRNN_STATUS_RECORD_BYTES);
      if (st == PRNN_STATUS_SUCCESS) return std::nullopt;
      return KernelFailure{prnnStatusString(st), prnnLastErrorMessage()};
    };
    report = d.book.settle(reporter, wait_all, make_room, landed, failure);
  }
  TORCH_CHECK(report.empty(), report);
}

// At the start of a persistent call: reports failures of earlier launches that have finished, and
// makes room for this launch's check. Not during graph capture (cudaEventQuery is not allowed).
void check_before_launch(int device, cudaStream_t stream, const char* op) {
  if (stream_is_capturing(stream, op)) return;
  settle_checks(device, op, /*wait_all=*/false, /*make_room=*/true);
}

// After a launch (`sync`: sync_check_requested, read before the launch): in synchronous mode how it
// ended (PRNN_STATUS_TIMEOUT for a barrier timeout), at the cost of one stream synchronisation;
// otherwise its record copy and event are queued and the call returns. Skipped during graph
// capture, where a timed-out launch leaves undefined outputs and its status unread.
void check_after_launch(const at::Tensor& ws, cudaStream_t stream, bool sync, const LaunchInfo& launch) {
  const char* op = launch.op;
  if (stream_is_capturing(stream, op)) return;
  if (!sync) {
    DeviceChecks& d = device_checks(launch.device, op);
    const std::lock_guard<std::mutex> lock(d.mutex);
    if (d.records == nullptr) {  // first launch on this device (current: the caller's guard)
      void* records = nullptr;
      cudaError_t err = cudaHostAlloc(&records, kStatusSlots * PRNN_STATUS_RECORD_BYTES, cudaHostAllocPortable);
      for (int i = 0; i < kStatusSlots && err == cudaSuccess; ++i)
        err = cudaEventCreateWithFlags(&d.events[i], cudaEventDisableTiming);
      TORCH_CHECK(err == cudaSuccess, op, kKernelFailure, "PRNN_STATUS_CUDA_ERROR: setting up the status checks: ",
                  cudaGetErrorString(err));
      d.records = static_cast<unsigned char*>(records);
    }
    const int slot = d.book.free_slot();
    if (slot >= 0) {  // else another thread took the room this call made: check synchronously
      PRNN_TORCH_CHECK(op, prnnWorkspaceStatusAsync(ws.data_ptr(),
                                                    d.records + static_cast<size_t>(slot) * PRNN_STATUS_RECORD_BYTES,
                                                    stream));
      const cudaError_t err = cudaEventRecord(d.events[slot], stream);
      TORCH_CHECK(err == cudaSuccess, op, kKernelFailure, "PRNN_STATUS_CUDA_ERROR: cudaEventRecord(status check): ",
                  cudaGetErrorString(err));
      d.book.add(slot, launch);
      return;
    }
  }
  PRNN_TORCH_CHECK(op, prnnWorkspaceStatus(ws.data_ptr(), stream));
}

const char* activation_name(Activation activation) {
  switch (activation) {
    case Activation::kRelu: return "relu";
    case Activation::kClippedRelu: return "clipped_relu";
    case Activation::kTanh: return "tanh";
  }
  return "?";
}

LaunchInfo launch_info(const char* op, int device, int64_t T, int64_t N, int64_t D, int64_t H, at::ScalarType type,
                       Activation activation) {
  LaunchInfo l;
  l.op = op;
  l.device = device;
  l.T = T, l.N = N, l.D = D, l.H = H;
  l.dtype = c10::toString(type);
  l.activation = activation_name(activation);
  return l;
}

prnnDataType_t prnn_dtype(at::ScalarType type, const char* op) {
  switch (type) {
    case at::kFloat: return PRNN_DATA_FLOAT;
    case at::kHalf: return PRNN_DATA_HALF;
    case at::kBFloat16: return PRNN_DATA_BFLOAT16;
    default: TORCH_CHECK(false, op, ": the persistent kernel supports float32, float16 and bfloat16, got ", type);
  }
}

prnnActivation_t prnn_activation(Activation activation) {
  switch (activation) {
    case Activation::kRelu: return PRNN_ACT_RELU;
    case Activation::kClippedRelu: return PRNN_ACT_CLIPPED_RELU;
    case Activation::kTanh: return PRNN_ACT_TANH;
  }
  return PRNN_ACT_RELU;
}

prnnProblem_t make_problem(int64_t T, int64_t N, int64_t D, int64_t H, Activation activation, at::ScalarType type,
                           const char* op) {
  constexpr int64_t kIntMax = 2147483647;
  TORCH_CHECK(T <= kIntMax && N <= kIntMax && H <= kIntMax, op, ": sizes exceed the C API's int range");
  prnnProblem_t p;
  p.time_steps = static_cast<int>(T);
  p.batch = static_cast<int>(N);
  p.directions = static_cast<int>(D);
  p.hidden = static_cast<int>(H);
  p.activation = prnn_activation(activation);
  p.dtype = prnn_dtype(type, op);
  return p;
}

// Workspace from PyTorch's caching allocator, so it is stream-ordered and graph-capturable.
at::Tensor workspace(size_t bytes, const at::Tensor& like) {
  return at::empty({static_cast<int64_t>(bytes > 0 ? bytes : 1)}, like.options().dtype(at::kByte));
}

std::tuple<at::Tensor, at::Tensor> forward_cuda(const at::Tensor& u_in, const at::Tensor& w_in,
                                                const at::Tensor& h0_in, const at::Tensor& lengths,
                                                std::string activation_name) {
  const char* op = "recurrence_forward";
  auto [T, N, D, H] = check_problem(u_in, w_in, lengths, op);
  check_state(h0_in, N, D, H, u_in, "h0", op);
  const c10::cuda::CUDAGuard guard(u_in.device());
  const Activation activation = parse_activation(activation_name);
  const prnnProblem_t p = make_problem(T, N, D, H, activation, u_in.scalar_type(), op);
  const int device = u_in.get_device();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const bool sync = sync_check_requested(op);
  check_before_launch(device, stream, op);  // raises a failure of an earlier launch that has finished
  const at::Tensor u = u_in.contiguous(), w = w_in.contiguous(), h0 = h0_in.contiguous();
  const at::Tensor lengths32 = lengths.to(at::kInt);
  at::Tensor y = at::empty_like(u);
  at::Tensor h_last = at::empty_like(h0);
  if (u.numel() == 0) {
    h_last.copy_(h0);
    return {y, h_last};
  }
  size_t bytes = 0;
  PRNN_TORCH_CHECK(op, prnnForwardWorkspaceSize(&p, device, &bytes));
  at::Tensor ws = workspace(bytes, u);
  PRNN_TORCH_CHECK(op, prnnForward(&p, u.data_ptr(), w.data_ptr(), h0.data_ptr(), lengths32.data_ptr<int32_t>(),
                                   y.data_ptr(), h_last.data_ptr(), ws.data_ptr(), bytes, stream));
  check_after_launch(ws, stream, sync, launch_info(op, device, T, N, D, H, u.scalar_type(), activation));
  return {y, h_last};
}

std::tuple<at::Tensor, at::Tensor> backward_data_cuda(const at::Tensor& w_in, const at::Tensor& y_in,
                                                      const at::Tensor& dy_in, const at::Tensor& dh_last_in,
                                                      const at::Tensor& lengths, std::string activation_name) {
  const char* op = "recurrence_backward_data";
  auto [T, N, D, H] = check_backward_data_args(w_in, y_in, dy_in, dh_last_in, lengths, op);
  const c10::cuda::CUDAGuard guard(y_in.device());
  const Activation activation = parse_activation(activation_name);
  const prnnProblem_t p = make_problem(T, N, D, H, activation, y_in.scalar_type(), op);
  const int device = y_in.get_device();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const bool sync = sync_check_requested(op);
  check_before_launch(device, stream, op);  // raises a failure of an earlier launch that has finished
  const at::Tensor w = w_in.contiguous(), y = y_in.contiguous(), dy = dy_in.contiguous();
  const at::Tensor dh_last = dh_last_in.contiguous();
  const at::Tensor lengths32 = lengths.to(at::kInt);
  at::Tensor du = at::empty_like(y);
  at::Tensor dh0 = at::empty_like(dh_last);
  if (y.numel() == 0) {
    du.zero_();
    dh0.copy_(dh_last);
    return {du, dh0};
  }
  size_t bytes = 0;
  PRNN_TORCH_CHECK(op, prnnBackwardDataWorkspaceSize(&p, device, &bytes));
  at::Tensor ws = workspace(bytes, y);
  PRNN_TORCH_CHECK(op, prnnBackwardData(&p, w.data_ptr(), y.data_ptr(), dy.data_ptr(), dh_last.data_ptr(),
                                        lengths32.data_ptr<int32_t>(), du.data_ptr(), dh0.data_ptr(), ws.data_ptr(),
                                        bytes, stream));
  check_after_launch(ws, stream, sync, launch_info(op, device, T, N, D, H, y.scalar_type(), activation));
  return {du, dh0};
}

#endif  // PRNN_CPU_ONLY

// ---------------------------------------------------------------------------------------------
// Device-independent queries (no tensor arguments: registered as catch-all kernels)
// ---------------------------------------------------------------------------------------------

bool cuda_available() {
#ifdef PRNN_CPU_ONLY
  return false;
#else
  return true;
#endif
}

std::tuple<bool, std::string> persistent_support(int64_t T, int64_t N, int64_t D, int64_t H,
                                                 std::string activation_name, at::ScalarType type, int64_t device) {
#ifdef PRNN_CPU_ONLY
  (void)T, (void)N, (void)D, (void)H, (void)activation_name, (void)type, (void)device;
  return {false, "this build of the extension is CPU-only (made without nvcc)"};
#else
  if (type != at::kFloat && type != at::kHalf && type != at::kBFloat16) {
    return {false, std::string("the persistent kernel supports float32, float16 and bfloat16, not ") +
                       c10::toString(type)};
  }
  const prnnProblem_t p = make_problem(T, N, D, H, parse_activation(activation_name), type, "persistent_support");
  int supported = 0;
  char reason[512] = {0};
  PRNN_TORCH_CHECK("persistent_support", prnnCheckSupport(&p, static_cast<int>(device), &supported, reason,
                                                           sizeof(reason)));
  return {supported != 0, std::string(reason)};
#endif
}

// The kernel variant and tiling a persistent call would use (prnnDescribePlan; PRNN_VARIANT applies).
std::string plan_description(int64_t T, int64_t N, int64_t D, int64_t H, std::string activation_name,
                             at::ScalarType type, int64_t device, bool backward) {
#ifdef PRNN_CPU_ONLY
  (void)T, (void)N, (void)D, (void)H, (void)activation_name, (void)type, (void)device, (void)backward;
  return "cpu loop (this build of the extension is CPU-only)";
#else
  const prnnProblem_t p = make_problem(T, N, D, H, parse_activation(activation_name), type, "plan_description");
  char text[1024] = {0};
  PRNN_TORCH_CHECK("plan_description",
                   prnnDescribePlan(&p, static_cast<int>(device), backward ? 1 : 0, text, sizeof(text)));
  return std::string(text);
#endif
}

// Reports (raises) a failure of any persistent launch on `device` (-1: every device) whose status
// check has landed; wait: first wait for the checks of every launch enqueued so far (their events,
// not the streams). Returns how many launches are still unchecked. The CPU implementation raises at
// the call itself, so the CPU-only build has nothing pending and returns 0.
int64_t check_status(int64_t device, bool wait) {
#ifdef PRNN_CPU_ONLY
  (void)device, (void)wait;
  return 0;
#else
  const char* op = "check_status";
  TORCH_CHECK(device >= -1 && device < kMaxCheckedDevices, op, ": device must be -1 (all) or an index, got ", device);
  int64_t pending = 0;
  for (int d = device < 0 ? 0 : static_cast<int>(device); d < (device < 0 ? kMaxCheckedDevices : device + 1); ++d) {
    DeviceChecks& checks = device_checks(d, op);
    {
      const std::lock_guard<std::mutex> lock(checks.mutex);
      if (checks.book.pending() == 0) continue;
    }
    const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(d));
    settle_checks(d, op, wait, /*make_room=*/false);
    const std::lock_guard<std::mutex> lock(checks.mutex);
    pending += checks.book.pending();
  }
  return pending;
#endif
}

double measure_barrier(int64_t device, int64_t blocks, int64_t iterations) {
#ifdef PRNN_CPU_ONLY
  (void)device, (void)blocks, (void)iterations;
  TORCH_CHECK(false, "measure_barrier: this build of the extension is CPU-only (made without nvcc)");
#else
  const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device));
  float microseconds = 0.0f;
  PRNN_TORCH_CHECK("measure_barrier", prnnMeasureBarrier(static_cast<int>(device), static_cast<int>(blocks),
                                                         static_cast<int>(iterations),
                                                         c10::cuda::getCurrentCUDAStream(), &microseconds));
  return static_cast<double>(microseconds);
#endif
}

}  // namespace

TORCH_LIBRARY(asr_prnn, m) {
  m.def("recurrence_forward(Tensor u, Tensor w_hh, Tensor h0, Tensor lengths, str activation) -> (Tensor, Tensor)");
  m.def(
      "recurrence_backward_data(Tensor w_hh, Tensor y, Tensor dy, Tensor dh_last, Tensor lengths, str activation)"
      " -> (Tensor, Tensor)");
  m.def("recurrence_backward_weight(Tensor y, Tensor h0, Tensor du, Tensor lengths) -> Tensor");
  m.def("cuda_available() -> bool", &cuda_available);
  m.def(
      "persistent_support(int T, int N, int D, int H, str activation, ScalarType dtype, int device)"
      " -> (bool, str)",
      &persistent_support);
  m.def(
      "plan_description(int T, int N, int D, int H, str activation, ScalarType dtype, int device, bool backward)"
      " -> str",
      &plan_description);
  m.def("measure_barrier(int device, int blocks, int iterations) -> float", &measure_barrier);
  m.def("check_status(int device=-1, bool wait=False) -> int", &check_status);
  m.def("status_check_mode() -> str", &status_check_mode);
  m.def("simulate_status_checks(int capacity, str script) -> str", &simulate_status_checks);
}

TORCH_LIBRARY_IMPL(asr_prnn, CPU, m) {
  m.impl("recurrence_forward", &forward_cpu);
  m.impl("recurrence_backward_data", &backward_data_cpu);
  m.impl("recurrence_backward_weight", &backward_weight);
}

#ifndef PRNN_CPU_ONLY
TORCH_LIBRARY_IMPL(asr_prnn, CUDA, m) {
  m.impl("recurrence_forward", &forward_cuda);
  m.impl("recurrence_backward_data", &backward_data_cuda);
  m.impl("recurrence_backward_weight", &backward_weight);
}
#endif

}  // namespace asr_prnn
