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
// Ops:
//   recurrence_forward(u, w_hh, h0, lengths, activation) -> (y, h_last)
//   recurrence_backward_data(w_hh, y, dy, dh_last, lengths, activation) -> (du, dh0)
//   recurrence_backward_weight(y, h0, du, lengths) -> dw            batched GEMMs over all steps
//   cuda_available() -> bool                                         was this build made with nvcc?
//   persistent_support(T, N, D, H, activation, dtype, device) -> (bool, str)
//   measure_barrier(device, blocks, iterations) -> float             microseconds per grid barrier

#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <string>
#include <tuple>
#include <vector>

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

#define PRNN_TORCH_CHECK(call)                                                                     \
  do {                                                                                             \
    prnnStatus_t prnn_status_ = (call);                                                            \
    TORCH_CHECK(prnn_status_ == PRNN_STATUS_SUCCESS, #call, " failed at ", __FILE__, ":", __LINE__, \
                ": ", prnnStatusString(prnn_status_), ": ", prnnLastErrorMessage());              \
  } while (0)

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
  const prnnProblem_t p = make_problem(T, N, D, H, parse_activation(activation_name), u_in.scalar_type(), op);
  const at::Tensor u = u_in.contiguous(), w = w_in.contiguous(), h0 = h0_in.contiguous();
  const at::Tensor lengths32 = lengths.to(at::kInt);
  at::Tensor y = at::empty_like(u);
  at::Tensor h_last = at::empty_like(h0);
  if (u.numel() == 0) {
    h_last.copy_(h0);
    return {y, h_last};
  }
  const int device = u.get_device();
  size_t bytes = 0;
  PRNN_TORCH_CHECK(prnnForwardWorkspaceSize(&p, device, &bytes));
  at::Tensor ws = workspace(bytes, u);
  PRNN_TORCH_CHECK(prnnForward(&p, u.data_ptr(), w.data_ptr(), h0.data_ptr(), lengths32.data_ptr<int32_t>(),
                               y.data_ptr(), h_last.data_ptr(), ws.data_ptr(), bytes,
                               c10::cuda::getCurrentCUDAStream()));
  return {y, h_last};
}

std::tuple<at::Tensor, at::Tensor> backward_data_cuda(const at::Tensor& w_in, const at::Tensor& y_in,
                                                      const at::Tensor& dy_in, const at::Tensor& dh_last_in,
                                                      const at::Tensor& lengths, std::string activation_name) {
  const char* op = "recurrence_backward_data";
  auto [T, N, D, H] = check_backward_data_args(w_in, y_in, dy_in, dh_last_in, lengths, op);
  const c10::cuda::CUDAGuard guard(y_in.device());
  const prnnProblem_t p = make_problem(T, N, D, H, parse_activation(activation_name), y_in.scalar_type(), op);
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
  const int device = y.get_device();
  size_t bytes = 0;
  PRNN_TORCH_CHECK(prnnBackwardDataWorkspaceSize(&p, device, &bytes));
  at::Tensor ws = workspace(bytes, y);
  PRNN_TORCH_CHECK(prnnBackwardData(&p, w.data_ptr(), y.data_ptr(), dy.data_ptr(), dh_last.data_ptr(),
                                    lengths32.data_ptr<int32_t>(), du.data_ptr(), dh0.data_ptr(), ws.data_ptr(),
                                    bytes, c10::cuda::getCurrentCUDAStream()));
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
  PRNN_TORCH_CHECK(prnnCheckSupport(&p, static_cast<int>(device), &supported, reason, sizeof(reason)));
  return {supported != 0, std::string(reason)};
#endif
}

double measure_barrier(int64_t device, int64_t blocks, int64_t iterations) {
#ifdef PRNN_CPU_ONLY
  (void)device, (void)blocks, (void)iterations;
  TORCH_CHECK(false, "measure_barrier: this build of the extension is CPU-only (made without nvcc)");
#else
  const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device));
  float microseconds = 0.0f;
  PRNN_TORCH_CHECK(prnnMeasureBarrier(static_cast<int>(device), static_cast<int>(blocks),
                                      static_cast<int>(iterations), c10::cuda::getCurrentCUDAStream(),
                                      &microseconds));
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
  m.def("measure_barrier(int device, int blocks, int iterations) -> float", &measure_barrier);
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
