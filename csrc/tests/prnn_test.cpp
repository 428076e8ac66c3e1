// prnn_test.cpp - checks the C API of the persistent recurrent kernel against a CPU loop in double.
//
// Links libprnn (the kernels + C API) and the CUDA runtime; uses nothing but prnn.h and
// cuda_runtime_api.h. Without a usable GPU it prints "prnn_test: no GPU" and exits with 77, which
// tests/test_csrc.py reads as "compiled and linked; not run".
//
// Every case poisons the outputs (all bytes 0xFF, a NaN in every dtype), runs forward and
// backward-data, and compares every timestep of y and du, plus h_last and dh0, with the CPU loop.
// PRNN_DEBUG=1 prints the error of every timestep (and makes the library log its plans).
// Exit status: 0 all passed, 1 a check failed, 77 no GPU.
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cuda_runtime_api.h>

#include <random>
#include <string>
#include <vector>

#include "prnn.h"
#include "prnn_expect.h"
#include "prnn_oracle.h"

namespace {

constexpr int kNoGpuExit = 77;
constexpr int kBackToBackLaunches = 2000;
constexpr int kBarrierIterations = 2000;

bool g_debug = false;

#define CHECK_CUDA(call)                                                                     \
  do {                                                                                       \
    cudaError_t err_ = (call);                                                               \
    if (err_ != cudaSuccess) {                                                               \
      printf("FAIL %s:%d: %s: %s\n", __FILE__, __LINE__, #call, cudaGetErrorString(err_));  \
      exit(1);                                                                               \
    }                                                                                        \
  } while (0)


// ---- storage conversions (host side, round to nearest even) ------------------------------------
uint16_t float_to_half_bits(float f) {
  uint32_t x;
  memcpy(&x, &f, 4);
  const uint32_t sign = (x >> 16) & 0x8000u;
  const int exp = static_cast<int>((x >> 23) & 0xff) - 127 + 15;
  uint32_t mant = x & 0x7fffffu;
  if (((x >> 23) & 0xff) == 0xff) return static_cast<uint16_t>(sign | 0x7c00u | (mant ? 0x200u : 0));
  if (exp >= 31) return static_cast<uint16_t>(sign | 0x7c00u);
  if (exp <= 0) {
    if (exp < -10) return static_cast<uint16_t>(sign);
    mant |= 0x800000u;
    const int shift = 14 - exp;
    uint32_t h = mant >> shift;
    const uint32_t rem = mant & ((1u << shift) - 1), half = 1u << (shift - 1);
    if (rem > half || (rem == half && (h & 1))) ++h;
    return static_cast<uint16_t>(sign | h);
  }
  uint32_t h = (static_cast<uint32_t>(exp) << 10) | (mant >> 13);
  const uint32_t rem = mant & 0x1fffu;
  if (rem > 0x1000u || (rem == 0x1000u && (h & 1))) ++h;
  return static_cast<uint16_t>(sign | h);
}

float half_bits_to_float(uint16_t h) {
  const uint32_t sign = (h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1f, mant = h & 0x3ffu;
  float f;
  if (exp == 0) {
    f = ldexpf(static_cast<float>(mant), -24);
    return sign ? -f : f;
  }
  if (exp == 31) {
    const uint32_t x = sign | 0x7f800000u | (mant << 13);
    memcpy(&f, &x, 4);
    return f;
  }
  const uint32_t x = sign | ((exp - 15 + 127) << 23) | (mant << 13);
  memcpy(&f, &x, 4);
  return f;
}

uint16_t float_to_bf16_bits(float f) {
  uint32_t x;
  memcpy(&x, &f, 4);
  if ((x & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((x >> 16) | 0x40);
  x += 0x7fffu + ((x >> 16) & 1);
  return static_cast<uint16_t>(x >> 16);
}

float bf16_bits_to_float(uint16_t b) {
  const uint32_t x = static_cast<uint32_t>(b) << 16;
  float f;
  memcpy(&f, &x, 4);
  return f;
}

size_t dtype_size(prnnDataType_t t) { return t == PRNN_DATA_FLOAT ? 4 : 2; }

const char* dtype_name(prnnDataType_t t) {
  return t == PRNN_DATA_FLOAT ? "fp32" : t == PRNN_DATA_HALF ? "fp16" : "bf16";
}

const char* act_name(prnnActivation_t a) {
  return a == PRNN_ACT_RELU ? "relu" : a == PRNN_ACT_CLIPPED_RELU ? "clipped_relu" : "tanh";
}

// Host tensor of a storage dtype; `values` holds exactly the representable values.
struct HostTensor {
  prnnDataType_t dtype;
  std::vector<float> values;
  std::vector<unsigned char> bytes;

  HostTensor(prnnDataType_t t, const std::vector<float>& v) : dtype(t), values(v), bytes(v.size() * dtype_size(t)) {
    for (size_t i = 0; i < v.size(); ++i) {
      if (t == PRNN_DATA_FLOAT) {
        memcpy(&bytes[i * 4], &values[i], 4);
      } else {
        const uint16_t b = t == PRNN_DATA_HALF ? float_to_half_bits(v[i]) : float_to_bf16_bits(v[i]);
        values[i] = t == PRNN_DATA_HALF ? half_bits_to_float(b) : bf16_bits_to_float(b);
        memcpy(&bytes[i * 2], &b, 2);
      }
    }
  }
};

std::vector<float> decode(prnnDataType_t t, const std::vector<unsigned char>& bytes) {
  const size_t n = bytes.size() / dtype_size(t);
  std::vector<float> out(n);
  for (size_t i = 0; i < n; ++i) {
    if (t == PRNN_DATA_FLOAT) {
      memcpy(&out[i], &bytes[i * 4], 4);
    } else {
      uint16_t b;
      memcpy(&b, &bytes[i * 2], 2);
      out[i] = t == PRNN_DATA_HALF ? half_bits_to_float(b) : bf16_bits_to_float(b);
    }
  }
  return out;
}

// Device buffer; poisoned (0xFF bytes: NaN in fp32, fp16 and bf16) at creation.
struct DeviceBuffer {
  void* ptr = nullptr;
  size_t bytes = 0;
  explicit DeviceBuffer(size_t n) : bytes(n) {
    if (n) {
      CHECK_CUDA(cudaMalloc(&ptr, n));
      CHECK_CUDA(cudaMemset(ptr, 0xFF, n));
    }
  }
  DeviceBuffer(const void* host, size_t n) : DeviceBuffer(n) {
    if (n) CHECK_CUDA(cudaMemcpy(ptr, host, n, cudaMemcpyHostToDevice));
  }
  ~DeviceBuffer() {
    if (ptr) cudaFree(ptr);
  }
  std::vector<unsigned char> download() const {
    std::vector<unsigned char> out(bytes);
    if (bytes) CHECK_CUDA(cudaMemcpy(out.data(), ptr, bytes, cudaMemcpyDeviceToHost));
    return out;
  }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
};

struct Case {
  int T, N, D, H;
  prnnActivation_t act;
  prnnDataType_t dtype;
  bool ragged, with_h0, with_dh_last;
};

// Relative tolerance on max |error| / max(1, max |reference|), per storage type. The kernel keeps
// its state in fp32, so low-precision error is mostly the rounding of the stored outputs.
double tolerance(prnnDataType_t t) { return t == PRNN_DATA_FLOAT ? 1e-4 : t == PRNN_DATA_HALF ? 5e-3 : 3e-2; }

// Max abs error per timestep of [T, N*D*H] tensors, and the overall verdict.
bool compare_steps(const char* what, const Case& c, const std::vector<float>& got, const std::vector<double>& ref,
                   int steps, size_t step_elems) {
  double ref_max = 1.0;
  for (double r : ref) ref_max = fmax(ref_max, fabs(r));
  const double tol = tolerance(c.dtype) * ref_max;
  bool ok = true;
  for (int t = 0; t < steps; ++t) {
    double err = 0;
    size_t worst = 0;
    for (size_t e = 0; e < step_elems; ++e) {
      const size_t i = static_cast<size_t>(t) * step_elems + e;
      const double d = fabs(static_cast<double>(got[i]) - ref[i]);
      if (!(d <= err)) {  // also catches NaN (poison left in place)
        err = isnan(d) ? INFINITY : d;
        worst = e;
      }
    }
    if (g_debug) printf("    %s step %d: max error %.3g (tolerance %.3g)\n", what, t, err, tol);
    if (!(err <= tol)) {
      if (ok)
        printf("FAIL %s: first bad step %d, element %zu: got %g expected %g (tolerance %.3g)\n", what, t, worst,
               got[static_cast<size_t>(t) * step_elems + worst], ref[static_cast<size_t>(t) * step_elems + worst], tol);
      ok = false;
    }
  }
  return ok;
}

void run_case(const Case& c, std::mt19937& rng, cudaStream_t stream) {
  char label[160];
  snprintf(label, sizeof(label), "T=%d N=%d D=%d H=%d %s %s%s%s%s", c.T, c.N, c.D, c.H, dtype_name(c.dtype),
           act_name(c.act), c.ragged ? " ragged" : "", c.with_h0 ? " h0" : "", c.with_dh_last ? " dh_last" : "");
  const prnnProblem_t p = {c.T, c.N, c.D, c.H, c.act, c.dtype};
  int supported = 0;
  char reason[512] = "";
  prnnStatus_t st = prnnCheckSupport(&p, 0, &supported, reason, sizeof(reason));
  if (st != PRNN_STATUS_SUCCESS || !supported) {
    EXPECT(false, "%s: not supported (%s): %s", label, prnnStatusString(st), reason);
    return;
  }
  const size_t step = static_cast<size_t>(c.N) * c.D * c.H, total = step * c.T;
  std::uniform_real_distribution<float> uni(-1.0f, 1.0f);
  const float w_scale = (c.act == PRNN_ACT_TANH ? 1.5f : 0.9f) / sqrtf(static_cast<float>(c.H)) * sqrtf(3.0f);
  std::vector<float> u(total), w(static_cast<size_t>(c.D) * c.H * c.H), h0(step), dy(total), dh_last(step);
  for (float& v : u) v = uni(rng);
  for (float& v : w) v = uni(rng) * w_scale;
  for (float& v : h0) v = uni(rng);
  for (float& v : dy) v = uni(rng);
  for (float& v : dh_last) v = uni(rng);
  std::vector<int32_t> lengths(c.N, c.T);
  if (c.ragged)
    for (int n = 0; n < c.N; ++n) lengths[n] = n == 0 ? c.T : static_cast<int32_t>(rng() % (c.T + 1));
  const HostTensor tu(c.dtype, u), tw(c.dtype, w), th0(c.dtype, h0), tdy(c.dtype, dy), tdhl(c.dtype, dh_last);

  // CPU loop in double on the representable inputs.
  std::vector<double> y_ref(total, 0.0), hl_ref(step, 0.0), du_ref(total, 0.0), dh0_ref(step, 0.0);
  std::vector<double> h(c.H), hn(c.H), g(c.H), dh(c.H), du(c.H);
  for (int d = 0; d < c.D; ++d) {
    const float* W = tw.values.data() + static_cast<size_t>(d) * c.H * c.H;
    for (int n = 0; n < c.N; ++n) {
      const int L = lengths[n];
      const size_t nd = (static_cast<size_t>(n) * c.D + d) * c.H;
      for (int i = 0; i < c.H; ++i) h[i] = c.with_h0 ? th0.values[nd + i] : 0.0;
      for (int pos = 0; pos < L; ++pos) {
        const int t = d == 0 ? pos : L - 1 - pos;
        for (int i = 0; i < c.H; ++i) {
          double z = tu.values[t * step + nd + i];
          for (int k = 0; k < c.H; ++k) z += static_cast<double>(W[static_cast<size_t>(i) * c.H + k]) * h[k];
          hn[i] = act(c.act, z);
        }
        for (int i = 0; i < c.H; ++i) y_ref[t * step + nd + i] = h[i] = hn[i];
      }
      for (int i = 0; i < c.H; ++i) hl_ref[nd + i] = h[i];
      std::fill(g.begin(), g.end(), 0.0);
      for (int pos = L - 1; pos >= 0; --pos) {
        const int t = d == 0 ? pos : L - 1 - pos;
        for (int i = 0; i < c.H; ++i) {
          dh[i] = tdy.values[t * step + nd + i] + g[i] + (pos == L - 1 && c.with_dh_last ? tdhl.values[nd + i] : 0.0);
          du[i] = dh[i] * act_grad(c.act, y_ref[t * step + nd + i]);
          du_ref[t * step + nd + i] = du[i];
        }
        for (int k = 0; k < c.H; ++k) {
          double s = 0;
          for (int i = 0; i < c.H; ++i) s += static_cast<double>(W[static_cast<size_t>(i) * c.H + k]) * du[i];
          g[k] = s;
        }
      }
      for (int i = 0; i < c.H; ++i) dh0_ref[nd + i] = g[i] + (L == 0 && c.with_dh_last ? tdhl.values[nd + i] : 0.0);
    }
  }

  DeviceBuffer du_(tu.bytes.data(), tu.bytes.size()), dw(tw.bytes.data(), tw.bytes.size());
  DeviceBuffer dh0_in(th0.bytes.data(), th0.bytes.size()), ddy(tdy.bytes.data(), tdy.bytes.size());
  DeviceBuffer ddhl(tdhl.bytes.data(), tdhl.bytes.size());
  DeviceBuffer dlen(lengths.data(), lengths.size() * sizeof(int32_t));
  DeviceBuffer dy_out(total * dtype_size(c.dtype)), dhl_out(step * dtype_size(c.dtype));
  DeviceBuffer ddu_out(total * dtype_size(c.dtype)), ddh0_out(step * dtype_size(c.dtype));
  size_t ws_fwd = 0, ws_bwd = 0;
  EXPECT(prnnForwardWorkspaceSize(&p, 0, &ws_fwd) == PRNN_STATUS_SUCCESS, "%s: workspace size", label);
  EXPECT(prnnBackwardDataWorkspaceSize(&p, 0, &ws_bwd) == PRNN_STATUS_SUCCESS, "%s: workspace size", label);
  DeviceBuffer ws(ws_fwd > ws_bwd ? ws_fwd : ws_bwd);

  st = prnnForward(&p, du_.ptr, dw.ptr, c.with_h0 ? dh0_in.ptr : nullptr, c.ragged ? static_cast<int32_t*>(dlen.ptr) : nullptr,
                   dy_out.ptr, dhl_out.ptr, ws.ptr, ws.bytes, stream);
  EXPECT(st == PRNN_STATUS_SUCCESS, "%s: prnnForward %s: %s", label, prnnStatusString(st), prnnLastErrorMessage());
  const cudaError_t fe = cudaStreamSynchronize(stream);
  EXPECT(fe == cudaSuccess, "%s: forward kernel: %s", label, cudaGetErrorString(fe));
  // Backward from the kernel's own y, as the autograd path does.
  st = prnnBackwardData(&p, dw.ptr, dy_out.ptr, ddy.ptr, c.with_dh_last ? ddhl.ptr : nullptr,
                        c.ragged ? static_cast<int32_t*>(dlen.ptr) : nullptr, ddu_out.ptr, ddh0_out.ptr, ws.ptr, ws.bytes, stream);
  EXPECT(st == PRNN_STATUS_SUCCESS, "%s: prnnBackwardData %s: %s", label, prnnStatusString(st), prnnLastErrorMessage());
  const cudaError_t be = cudaStreamSynchronize(stream);
  EXPECT(be == cudaSuccess, "%s: backward kernel: %s", label, cudaGetErrorString(be));
  if (fe != cudaSuccess || be != cudaSuccess) exit(1);  // the context is unusable after a fault

  char plan_text[768] = "";
  prnnDescribePlan(&p, 0, 0, plan_text, sizeof(plan_text));
  if (g_debug) printf("  %s\n", label);
  bool ok = compare_steps("y", c, decode(c.dtype, dy_out.download()), y_ref, c.T, step);
  ok &= compare_steps("h_last", c, decode(c.dtype, dhl_out.download()), hl_ref, 1, step);
  ok &= compare_steps("du", c, decode(c.dtype, ddu_out.download()), du_ref, c.T, step);
  ok &= compare_steps("dh0", c, decode(c.dtype, ddh0_out.download()), dh0_ref, 1, step);
  if (!ok) ++g_failures;
  printf("%s %s [%.40s]\n", ok ? "ok  " : "FAIL", label, plan_text);
}

void check_errors_and_edges(cudaStream_t stream) {
  // Far beyond on-chip capacity: refused with a reason, never launched.
  const prnnProblem_t huge = {10, 4, 2, 8192, PRNN_ACT_RELU, PRNN_DATA_FLOAT};
  int supported = 1;
  char reason[512] = "";
  EXPECT(prnnCheckSupport(&huge, 0, &supported, reason, sizeof(reason)) == PRNN_STATUS_SUCCESS && !supported &&
             strlen(reason) > 0,
         "hidden 8192 x 2 fp32 should be refused with a reason (supported=%d)", supported);
  printf("ok   refusal: %s\n", reason);
  DeviceBuffer ws(1 << 20), any(1 << 20);
  size_t need = 0;
  prnnForwardWorkspaceSize(&huge, 0, &need);
  DeviceBuffer big_ws(need);
  EXPECT(prnnForward(&huge, any.ptr, any.ptr, nullptr, nullptr, any.ptr, nullptr, big_ws.ptr, big_ws.bytes, stream) ==
             PRNN_STATUS_NOT_SUPPORTED,
         "prnnForward on an unfit problem must return NOT_SUPPORTED");
  // Invalid values and a short workspace.
  const prnnProblem_t bad = {4, 2, 3, 64, PRNN_ACT_RELU, PRNN_DATA_FLOAT};
  EXPECT(prnnForward(&bad, any.ptr, any.ptr, nullptr, nullptr, any.ptr, nullptr, ws.ptr, ws.bytes, stream) ==
             PRNN_STATUS_INVALID_VALUE,
         "3 directions must be INVALID_VALUE");
  const prnnProblem_t small = {4, 2, 1, 64, PRNN_ACT_RELU, PRNN_DATA_FLOAT};
  EXPECT(prnnForward(&small, any.ptr, any.ptr, nullptr, nullptr, any.ptr, nullptr, ws.ptr, 16, stream) ==
             PRNN_STATUS_WORKSPACE_TOO_SMALL,
         "a 16-byte workspace must be WORKSPACE_TOO_SMALL");
  EXPECT(strlen(prnnLastErrorMessage()) > 0, "no error message after a failure");
  // T = 0: h_last = h0.
  const prnnProblem_t empty = {0, 2, 1, 8, PRNN_ACT_TANH, PRNN_DATA_FLOAT};
  std::vector<float> h0(16);
  for (int i = 0; i < 16; ++i) h0[i] = 0.25f * i;
  DeviceBuffer dh0(h0.data(), 64), hl(64);
  EXPECT(prnnForward(&empty, nullptr, nullptr, dh0.ptr, nullptr, nullptr, hl.ptr, nullptr, 0, stream) == PRNN_STATUS_SUCCESS,
         "T=0 forward failed: %s", prnnLastErrorMessage());
  CHECK_CUDA(cudaStreamSynchronize(stream));
  std::vector<float> got = decode(PRNN_DATA_FLOAT, hl.download());
  EXPECT(got == h0, "T=0: h_last != h0");
}

void check_back_to_back(cudaStream_t stream) {
  const prnnProblem_t p = {8, 4, 2, 256, PRNN_ACT_TANH, PRNN_DATA_HALF};
  const size_t elems = 8 * 4 * 2 * 256;
  std::vector<uint16_t> zeros_u(elems, 0), w(2 * 256 * 256, 0);
  DeviceBuffer u(zeros_u.data(), elems * 2), dw(w.data(), w.size() * 2), y(elems * 2), hl(4 * 2 * 256 * 2);
  size_t need = 0;
  prnnForwardWorkspaceSize(&p, 0, &need);
  DeviceBuffer ws(need);
  for (int i = 0; i < kBackToBackLaunches; ++i) {
    const prnnStatus_t st = prnnForward(&p, u.ptr, dw.ptr, nullptr, nullptr, y.ptr, hl.ptr, ws.ptr, ws.bytes, stream);
    if (st != PRNN_STATUS_SUCCESS) {
      EXPECT(false, "launch %d: %s", i, prnnLastErrorMessage());
      return;
    }
  }
  const cudaError_t err = cudaStreamSynchronize(stream);
  EXPECT(err == cudaSuccess, "back-to-back launches: %s", cudaGetErrorString(err));
  // Zero inputs through tanh give exact zeros.
  std::vector<float> out = decode(PRNN_DATA_HALF, y.download());
  bool zero = true;
  for (float v : out) zero &= v == 0.0f;
  EXPECT(zero, "back-to-back launches: outputs are not all zero");
  printf("%s %d back-to-back launches\n", err == cudaSuccess && zero ? "ok  " : "FAIL", kBackToBackLaunches);
}

// Bounded waits and injected faults on the real kernel (PRNN_FAULT, prnn_fault.h): a block that
// never arrives makes the others give up with TIMEOUT instead of hanging the GPU, the context stays
// usable, and plan / launch faults come back as NOT_SUPPORTED / CUDA_ERROR before any launch.
void check_faults(cudaStream_t stream) {
  const prnnProblem_t p = {6, 4, 2, 256, PRNN_ACT_TANH, PRNN_DATA_FLOAT};
  const size_t elems = 6 * 4 * 2 * 256;
  std::vector<float> zeros(elems, 0.0f), w(2 * 256 * 256, 0.0f);
  DeviceBuffer u(zeros.data(), elems * 4), dw(w.data(), w.size() * 4), y(elems * 4), hl(4 * 2 * 256 * 4);
  size_t need = 0;
  prnnForwardWorkspaceSize(&p, 0, &need);
  DeviceBuffer ws(need);
  setenv("PRNN_FAULT", "timeout", 1);
  setenv("PRNN_BARRIER_TIMEOUT_MS", "200", 1);
  prnnStatus_t st = prnnForward(&p, u.ptr, dw.ptr, nullptr, nullptr, y.ptr, hl.ptr, ws.ptr, ws.bytes, stream);
  EXPECT(st == PRNN_STATUS_SUCCESS, "timeout fault: the launch itself must succeed: %s", prnnLastErrorMessage());
  st = prnnWorkspaceStatus(ws.ptr, stream);
  EXPECT(st == PRNN_STATUS_TIMEOUT && strstr(prnnLastErrorMessage(), "grid barrier 1") != nullptr,
         "timeout fault: prnnWorkspaceStatus %s: %s", prnnStatusString(st), prnnLastErrorMessage());
  printf("%s timeout: %s\n", st == PRNN_STATUS_TIMEOUT ? "ok  " : "FAIL", prnnLastErrorMessage());
  // The same through the asynchronous check: the record copied to pinned memory, read after the stream.
  void* record = nullptr;
  EXPECT(cudaHostAlloc(&record, PRNN_STATUS_RECORD_BYTES, cudaHostAllocDefault) == cudaSuccess, "cudaHostAlloc");
  st = prnnForward(&p, u.ptr, dw.ptr, nullptr, nullptr, y.ptr, hl.ptr, ws.ptr, ws.bytes, stream);
  if (st == PRNN_STATUS_SUCCESS) st = prnnWorkspaceStatusAsync(ws.ptr, record, stream);
  EXPECT(st == PRNN_STATUS_SUCCESS, "timeout fault: launch + async status: %s", prnnLastErrorMessage());
  EXPECT(cudaStreamSynchronize(stream) == cudaSuccess, "cudaStreamSynchronize");
  st = prnnStatusFromRecord(record);
  EXPECT(st == PRNN_STATUS_TIMEOUT && strstr(prnnLastErrorMessage(), "waited more than 200 ms") != nullptr,
         "timeout fault: prnnStatusFromRecord %s: %s", prnnStatusString(st), prnnLastErrorMessage());
  printf("%s timeout (asynchronous status): %s\n", st == PRNN_STATUS_TIMEOUT ? "ok  " : "FAIL", prnnLastErrorMessage());
  setenv("PRNN_FAULT", "plan", 1);
  int supported = 1;
  char reason[512] = "";
  EXPECT(prnnCheckSupport(&p, 0, &supported, reason, sizeof(reason)) == PRNN_STATUS_SUCCESS && !supported &&
             strstr(reason, "PRNN_FAULT=plan") != nullptr,
         "plan fault: supported=%d reason=%s", supported, reason);
  st = prnnForward(&p, u.ptr, dw.ptr, nullptr, nullptr, y.ptr, hl.ptr, ws.ptr, ws.bytes, stream);
  EXPECT(st == PRNN_STATUS_NOT_SUPPORTED, "plan fault: prnnForward returned %s", prnnStatusString(st));
  setenv("PRNN_FAULT", "launch:backward", 1);
  st = prnnForward(&p, u.ptr, dw.ptr, nullptr, nullptr, y.ptr, hl.ptr, ws.ptr, ws.bytes, stream);
  EXPECT(st == PRNN_STATUS_SUCCESS, "launch:backward fault hit the forward pass: %s", prnnLastErrorMessage());
  st = prnnBackwardData(&p, dw.ptr, y.ptr, u.ptr, nullptr, nullptr, y.ptr, nullptr, ws.ptr, ws.bytes, stream);
  EXPECT(st == PRNN_STATUS_CUDA_ERROR, "launch:backward fault: prnnBackwardData returned %s", prnnStatusString(st));
  unsetenv("PRNN_FAULT");
  unsetenv("PRNN_BARRIER_TIMEOUT_MS");
  // The context survives: a normal launch afterwards completes with SUCCESS.
  st = prnnForward(&p, u.ptr, dw.ptr, nullptr, nullptr, y.ptr, hl.ptr, ws.ptr, ws.bytes, stream);
  if (st == PRNN_STATUS_SUCCESS) st = prnnWorkspaceStatus(ws.ptr, stream);
  EXPECT(st == PRNN_STATUS_SUCCESS, "after the faults: %s: %s", prnnStatusString(st), prnnLastErrorMessage());
  st = prnnWorkspaceStatusAsync(ws.ptr, record, stream);
  if (st == PRNN_STATUS_SUCCESS && cudaStreamSynchronize(stream) == cudaSuccess) st = prnnStatusFromRecord(record);
  EXPECT(st == PRNN_STATUS_SUCCESS, "after the faults, asynchronous status: %s: %s", prnnStatusString(st),
         prnnLastErrorMessage());
  cudaFreeHost(record);
  printf("%s faults (timeout, plan, launch:backward), then a normal launch\n", st == PRNN_STATUS_SUCCESS ? "ok  " : "FAIL");
}

}  // namespace

int main() {
  int count = 0;
  const cudaError_t err = cudaGetDeviceCount(&count);
  if (err != cudaSuccess || count == 0) {
    printf("prnn_test: no GPU (%s)\n", err != cudaSuccess ? cudaGetErrorString(err) : "0 devices");
    return kNoGpuExit;
  }
  const char* dbg = getenv("PRNN_DEBUG");
  g_debug = dbg != nullptr && strcmp(dbg, "1") == 0;
  cudaDeviceProp prop;
  CHECK_CUDA(cudaGetDeviceProperties(&prop, 0));
  printf("prnn_test on %s (%d SMs)\n", prop.name, prop.multiProcessorCount);
  CHECK_CUDA(cudaSetDevice(0));
  cudaStream_t stream;
  CHECK_CUDA(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));

  std::mt19937 rng(1234);
  const Case cases[] = {
      {5, 3, 1, 37, PRNN_ACT_RELU, PRNN_DATA_FLOAT, false, false, false},
      {17, 5, 1, 129, PRNN_ACT_TANH, PRNN_DATA_FLOAT, true, true, true},
      {9, 4, 2, 300, PRNN_ACT_CLIPPED_RELU, PRNN_DATA_FLOAT, true, true, true},
      {20, 4, 2, 1152, PRNN_ACT_RELU, PRNN_DATA_FLOAT, true, false, true},
      {6, 64, 1, 1152, PRNN_ACT_TANH, PRNN_DATA_FLOAT, true, true, false},
      {12, 8, 2, 512, PRNN_ACT_TANH, PRNN_DATA_HALF, true, true, true},
      {10, 6, 2, 700, PRNN_ACT_RELU, PRNN_DATA_BFLOAT16, true, true, true},
      {6, 2, 1, 2048, PRNN_ACT_RELU, PRNN_DATA_BFLOAT16, false, true, false},
      {4, 1, 1, 2560, PRNN_ACT_CLIPPED_RELU, PRNN_DATA_HALF, false, false, true},
      {1, 1, 1, 1, PRNN_ACT_TANH, PRNN_DATA_FLOAT, false, true, true},
      // Shapes kernel v2 must support on sm_90 (PRNN_VARIANT=v2 fails them when refused), long and wide.
      {8, 4, 2, 1152, PRNN_ACT_CLIPPED_RELU, PRNN_DATA_BFLOAT16, true, true, true},
      {8, 64, 2, 1152, PRNN_ACT_RELU, PRNN_DATA_BFLOAT16, true, true, true},
      {5, 4, 2, 2048, PRNN_ACT_RELU, PRNN_DATA_BFLOAT16, true, false, true},
      {5, 4, 1, 2048, PRNN_ACT_TANH, PRNN_DATA_FLOAT, true, true, true},
      {1000, 3, 1, 64, PRNN_ACT_TANH, PRNN_DATA_HALF, true, true, true},
      {4, 70, 2, 128, PRNN_ACT_CLIPPED_RELU, PRNN_DATA_FLOAT, true, true, true},
  };
  for (const Case& c : cases) run_case(c, rng, stream);
  check_errors_and_edges(stream);
  check_back_to_back(stream);
  check_faults(stream);

  float us = 0.0f;
  const prnnStatus_t st = prnnMeasureBarrier(0, 0, kBarrierIterations, stream, &us);
  EXPECT(st == PRNN_STATUS_SUCCESS, "prnnMeasureBarrier: %s", prnnLastErrorMessage());
  if (st == PRNN_STATUS_SUCCESS) printf("grid barrier: %.2f us per barrier (%d SMs, one block each)\n", us, prop.multiProcessorCount);

  CHECK_CUDA(cudaStreamDestroy(stream));
  printf("prnn_test: %d failures\n", g_failures);
  return g_failures == 0 ? 0 : 1;
}
