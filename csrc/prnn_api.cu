// prnn_api.cu - the C API of the persistent recurrent kernel (prnn.h): validation, device limits,
// planning, co-residency checks, cooperative launch, and the grid-barrier microbenchmark.
//
// Environment:
//   PRNN_DEBUG=1      log each launch's plan to stderr and synchronise after it, so that a device
//                     fault is reported by the call that caused it (skipped during stream capture).
//   PRNN_BARRIER=cg   use cooperative_groups grid.sync() instead of the counter barrier (unbounded).
//   PRNN_BARRIER_TIMEOUT_MS=n  the longest a block waits at one grid barrier before the launch gives
//                     up with PRNN_STATUS_TIMEOUT (default 10000; read at every launch).
//   PRNN_FAULT=...    make planning, the launch or a barrier fail on purpose (prnn_fault.h).
//   PRNN_VARIANT=v1|v2|auto  which kernel runs: v1 (default; the grid-barrier kernel of
//                     prnn_kernels.cuh, verified on a GPU), v2 (tensor cores and the data-flow exchange
//                     of prnn_v2.cuh; refused with the planner's reason where it does not fit), auto
//                     (v2 where it plans, else v1). Read at every call. v2 has not yet run on a GPU.
//   PRNN_V2_FP32=3xtf32|tf32  how v2 multiplies fp32 problems (default 3xtf32: about fp32 accuracy).
//   PRNN_V2_MODE=auto|ring|cluster  v2's exchange: auto (default: cluster mode on sm_90 where the layer
//                     fits one cluster and the batch one wave of clusters, else ring), or forced.
//                     Cluster mode (st.async pushes counted by mbarriers) has not yet run on a GPU.
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <mutex>

#include "prnn.h"
#include "prnn_fault.h"
#include "prnn_kernels.cuh"
#include "prnn_planner.h"
#include "prnn_v2.cuh"

namespace prnn {
namespace {

constexpr size_t kErrorMessageBytes = 1024;
// Workspace header: the barrier counter at 0, the status record at kStatusOffsetBytes (its own
// 128-byte line, away from the counter every block polls); padded to keep the state aligned.
constexpr size_t kWorkspaceHeaderBytes = 256;
constexpr size_t kStatusOffsetBytes = 128;
static_assert(kStatusOffsetBytes + kStatusWords * sizeof(unsigned int) <= kWorkspaceHeaderBytes, "header");
static_assert(kStatusWords * sizeof(unsigned int) <= PRNN_STATUS_RECORD_BYTES, "status record");
static_assert(kStatusOffsetBytes + PRNN_STATUS_RECORD_BYTES <= kWorkspaceHeaderBytes, "header");
constexpr unsigned long long kDefaultBarrierTimeoutMs = 10000;  // a real wait is micro- to milliseconds
constexpr unsigned long long kFaultBarrierTimeoutMs = 100;      // PRNN_FAULT=timeout: keep tests short
constexpr int kMaxDevices = 64;
constexpr int kBarrierBenchThreads = 128;

thread_local char g_last_error[kErrorMessageBytes] = "";

prnnStatus_t fail(prnnStatus_t status, const char* fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(g_last_error, sizeof(g_last_error), fmt, ap);
  va_end(ap);
  return status;
}

prnnStatus_t cuda_fail(cudaError_t err, const char* what) {
  return fail(PRNN_STATUS_CUDA_ERROR, "%s: %s (%s)", what, cudaGetErrorString(err), cudaGetErrorName(err));
}

bool env_flag(const char* name, const char* value) {
  const char* v = getenv(name);
  return v != nullptr && strcmp(v, value) == 0;
}

bool debug_enabled() {
  static const bool enabled = env_flag("PRNN_DEBUG", "1");
  return enabled;
}

bool use_cg_barrier() {
  static const bool enabled = env_flag("PRNN_BARRIER", "cg");
  return enabled;
}

// PRNN_BARRIER_TIMEOUT_MS, or the default; read per launch so that a test can change it.
unsigned long long barrier_timeout_ns(bool fault) {
  const char* v = getenv("PRNN_BARRIER_TIMEOUT_MS");
  unsigned long long ms = fault ? kFaultBarrierTimeoutMs : kDefaultBarrierTimeoutMs;
  if (v != nullptr && v[0] != '\0') {
    char* end = nullptr;
    const unsigned long long parsed = strtoull(v, &end, 10);
    if (end != nullptr && *end == '\0' && parsed > 0) ms = parsed;
  }
  return ms * 1000000ull;
}

unsigned int* status_record(void* workspace) {
  return reinterpret_cast<unsigned int*>(static_cast<unsigned char*>(workspace) + kStatusOffsetBytes);
}

// Turns a status record copied back from the device into the API's status and message.
prnnStatus_t status_from_record(const unsigned int* r, const char* what) {
  if (r[kStatusCode] == kKernelOk) return PRNN_STATUS_SUCCESS;
  if (r[kStatusCode] == kKernelBarrierTimeout)
    return fail(PRNN_STATUS_TIMEOUT,
                "%s: block %u waited more than %u ms at grid barrier %u (%u of %u blocks had arrived); "
                "the launch gave up and its outputs are undefined",
                what, r[kStatusBlock], r[kStatusTimeoutMs], r[kStatusGeneration], r[kStatusArrived], r[kStatusGrid]);
  if (r[kStatusCode] == kKernelExchangeTimeout && r[kStatusArrived] == static_cast<unsigned int>(kV2UnknownProducer))
    return fail(PRNN_STATUS_TIMEOUT,
                "%s (v2 cluster mode): block %u waited more than %u ms at step %u for its cluster's pushes of the "
                "previous state (the slot's mbarrier counts bytes, not senders: the missing block is not known; grid "
                "%u); the launch gave up and its outputs are undefined",
                what, r[kStatusBlock], r[kStatusTimeoutMs], r[kStatusGeneration], r[kStatusGrid]);
  if (r[kStatusCode] == kKernelExchangeTimeout)
    return fail(PRNN_STATUS_TIMEOUT,
                "%s (v2): block %u waited more than %u ms at step %u for the state rows of block %u (grid %u); "
                "the launch gave up and its outputs are undefined",
                what, r[kStatusBlock], r[kStatusTimeoutMs], r[kStatusGeneration], r[kStatusArrived], r[kStatusGrid]);
  if (r[kStatusCode] == kKernelExchangeProtocol)
    return fail(PRNN_STATUS_CUDA_ERROR,
                "%s (v2): exchange protocol broken: block %u at step %u read tag %u from block %u's rows "
                "(a slot reused too early); the launch gave up and its outputs are undefined",
                what, r[kStatusBlock], r[kStatusGeneration], r[kStatusTimeoutMs], r[kStatusArrived]);
  return fail(PRNN_STATUS_CUDA_ERROR, "%s: unknown kernel status %u", what, r[kStatusCode]);
}

// Waits for `stream` and reads the status record a launch left at `record` (device memory).
prnnStatus_t read_status_record(const unsigned int* record, cudaStream_t stream, const char* what) {
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  cudaError_t err = cudaStreamIsCapturing(stream, &capture);
  if (err != cudaSuccess) return cuda_fail(err, "cudaStreamIsCapturing");
  if (capture != cudaStreamCaptureStatusNone)
    return fail(PRNN_STATUS_INVALID_VALUE, "%s: the kernel status cannot be read during stream capture", what);
  unsigned int host[kStatusWords] = {};
  err = cudaMemcpyAsync(host, record, sizeof(host), cudaMemcpyDeviceToHost, stream);
  if (err == cudaSuccess) err = cudaStreamSynchronize(stream);
  if (err != cudaSuccess) return cuda_fail(err, what);
  return status_from_record(host, what);
}

const char* dtype_name(prnnDataType_t t) {
  switch (t) {
    case PRNN_DATA_FLOAT: return "fp32";
    case PRNN_DATA_HALF: return "fp16";
    case PRNN_DATA_BFLOAT16: return "bf16";
  }
  return "?";
}

int dtype_bytes(prnnDataType_t t) { return t == PRNN_DATA_FLOAT ? 4 : 2; }

prnnStatus_t validate_problem(const prnnProblem_t* p) {
  if (p == nullptr) return fail(PRNN_STATUS_INVALID_VALUE, "problem is NULL");
  if (p->time_steps < 0 || p->batch < 0 || p->hidden < 1 || (p->directions != 1 && p->directions != 2))
    return fail(PRNN_STATUS_INVALID_VALUE,
                "invalid problem: time_steps=%d batch=%d directions=%d hidden=%d "
                "(need T >= 0, N >= 0, D in {1, 2}, H >= 1)",
                p->time_steps, p->batch, p->directions, p->hidden);
  if (p->activation != PRNN_ACT_RELU && p->activation != PRNN_ACT_CLIPPED_RELU && p->activation != PRNN_ACT_TANH)
    return fail(PRNN_STATUS_INVALID_VALUE, "invalid activation %d", static_cast<int>(p->activation));
  if (p->dtype != PRNN_DATA_FLOAT && p->dtype != PRNN_DATA_HALF && p->dtype != PRNN_DATA_BFLOAT16)
    return fail(PRNN_STATUS_INVALID_VALUE, "invalid dtype %d", static_cast<int>(p->dtype));
  const double elems = static_cast<double>(p->time_steps) * p->batch * p->directions * p->hidden;
  if (elems >= 9.0e18) return fail(PRNN_STATUS_INVALID_VALUE, "problem too large");
  return PRNN_STATUS_SUCCESS;
}

struct DeviceInfo {
  DeviceLimits limits;
  bool cooperative;
  int cc_major;  // compute capability (v2's mma.sync needs 8.0)
};

// Device properties, read once per device.
prnnStatus_t device_info(int device, DeviceInfo* info) {
  static std::mutex mutex;
  static bool known[kMaxDevices] = {};
  static DeviceInfo cache[kMaxDevices];
  int count = 0;
  cudaError_t err = cudaGetDeviceCount(&count);
  if (err != cudaSuccess) return cuda_fail(err, "cudaGetDeviceCount");
  if (device < 0 || device >= count || device >= kMaxDevices)
    return fail(PRNN_STATUS_INVALID_VALUE, "device %d does not exist (%d devices)", device, count);
  std::lock_guard<std::mutex> lock(mutex);
  if (!known[device]) {
    DeviceInfo d = {};
    int v[10] = {};
    const cudaDeviceAttr attrs[10] = {
        cudaDevAttrMultiProcessorCount,          cudaDevAttrMaxRegistersPerMultiprocessor,
        cudaDevAttrMaxRegistersPerBlock,         cudaDevAttrMaxThreadsPerMultiProcessor,
        cudaDevAttrMaxThreadsPerBlock,           cudaDevAttrMaxBlocksPerMultiprocessor,
        cudaDevAttrMaxSharedMemoryPerMultiprocessor, cudaDevAttrMaxSharedMemoryPerBlockOptin,
        cudaDevAttrReservedSharedMemoryPerBlock, cudaDevAttrCooperativeLaunch};
    for (int i = 0; i < 10; ++i) {
      err = cudaDeviceGetAttribute(&v[i], attrs[i], device);
      if (err != cudaSuccess) return cuda_fail(err, "cudaDeviceGetAttribute");
    }
    d.limits.sm_count = v[0];
    d.limits.regs_per_sm = v[1];
    d.limits.regs_per_block = v[2];
    d.limits.max_threads_per_sm = v[3];
    d.limits.max_threads_per_block = v[4];
    d.limits.max_blocks_per_sm = v[5];
    d.limits.smem_per_sm = static_cast<size_t>(v[6]);
    d.limits.smem_per_block_optin = static_cast<size_t>(v[7]);
    d.limits.smem_reserved_per_block = static_cast<size_t>(v[8]);
    d.cooperative = v[9] != 0;
    err = cudaDeviceGetAttribute(&d.cc_major, cudaDevAttrComputeCapabilityMajor, device);
    if (err != cudaSuccess) return cuda_fail(err, "cudaDeviceGetAttribute");
    // Thread-block clusters: sm_90 allows 8 blocks portably and 16 with the non-portable size, which
    // the launch asks for; how many run at once is the runtime's answer per plan (plan_pass_v2).
    int cluster_launch = 0;
    if (d.cc_major >= 9 && cudaDeviceGetAttribute(&cluster_launch, cudaDevAttrClusterLaunch, device) == cudaSuccess &&
        cluster_launch != 0)
      d.limits.max_cluster_blocks = 16;
    cudaGetLastError();  // an attribute this driver does not know is not an error of the next call
    cache[device] = d;
    known[device] = true;
  }
  *info = cache[device];
  return PRNN_STATUS_SUCCESS;
}

prnnStatus_t current_device(int* device) {
  const cudaError_t err = cudaGetDevice(device);
  return err == cudaSuccess ? PRNN_STATUS_SUCCESS : cuda_fail(err, "cudaGetDevice");
}

// The kernel as built against its plan: its registers and thread limit (and, with no_local, no
// local memory), the dynamic shared-memory opt-in, and how many of its blocks fit on one SM
// (*resident, the runtime's occupancy answer). NOT_SUPPORTED with the numbers when it does not fit.
prnnStatus_t confirm_kernel(const void* fn, int regs, int threads, int smem_bytes, bool no_local, const char* label,
                            int* resident, char* reason, size_t reason_len) {
  cudaFuncAttributes attr;
  cudaError_t err = cudaFuncGetAttributes(&attr, fn);
  if (err != cudaSuccess) return cuda_fail(err, "cudaFuncGetAttributes");
  if (attr.numRegs > regs || attr.maxThreadsPerBlock < threads || (no_local && attr.localSizeBytes > 0)) {
    snprintf(reason, reason_len,
             "%skernel uses %d registers/thread (planned %d), %zu bytes of local memory, allows %d threads (planned %d)",
             label, attr.numRegs, regs, static_cast<size_t>(attr.localSizeBytes), attr.maxThreadsPerBlock, threads);
    return PRNN_STATUS_NOT_SUPPORTED;
  }
  err = cudaFuncSetAttribute(fn, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_bytes);
  if (err != cudaSuccess) return cuda_fail(err, "cudaFuncSetAttribute(MaxDynamicSharedMemorySize)");
  err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(resident, fn, threads, smem_bytes);
  if (err != cudaSuccess) return cuda_fail(err, "cudaOccupancyMaxActiveBlocksPerMultiprocessor");
  return PRNN_STATUS_SUCCESS;
}

// Plans problem p for one pass on `device` and confirms co-residency with the runtime's own
// occupancy calculation. NOT_SUPPORTED (with the reason in `reason`) when it cannot run.
prnnStatus_t plan_pass(const prnnProblem_t* p, int device, bool backward, Plan* plan, const void** kernel,
                       char* reason, size_t reason_len) {
  DeviceInfo info;
  prnnStatus_t st = device_info(device, &info);
  if (st != PRNN_STATUS_SUCCESS) return st;
  if (!info.cooperative) {
    snprintf(reason, reason_len, "device %d does not support cooperative launch", device);
    return PRNN_STATUS_NOT_SUPPORTED;
  }
  const Fault fault = injected_fault(backward);
  if (fault == Fault::kInvalid) return fail(PRNN_STATUS_INVALID_VALUE, "PRNN_FAULT=%s: %s", fault_env(), kFaultUsage);
  if (fault == Fault::kPlan) {
    snprintf(reason, reason_len, "%s %s: fault injected (PRNN_FAULT=%s): the planner refused the problem",
             dtype_name(p->dtype), backward ? "backward" : "forward", fault_env());
    return PRNN_STATUS_NOT_SUPPORTED;
  }
  const ProblemShape shape = {p->time_steps, p->batch > 0 ? p->batch : 1, p->directions, p->hidden,
                              dtype_bytes(p->dtype)};
  char why[512] = "";
  if (!make_plan(info.limits, shape, kKernelMaxRegsPerThread, plan, why, sizeof(why))) {
    snprintf(reason, reason_len, "%s %s: %s", dtype_name(p->dtype), backward ? "backward" : "forward", why);
    return PRNN_STATUS_NOT_SUPPORTED;
  }
  const void* fn = backward ? backward_kernel(p->dtype, plan->row_group) : forward_kernel(p->dtype, plan->row_group);
  if (fn == nullptr) return fail(PRNN_STATUS_INVALID_VALUE, "no kernel for row group %d", plan->row_group);
  // The runtime's own occupancy answer for the kernel as built: a grid that cannot be resident all
  // at once is refused here, before any launch (the cooperative launch would refuse it too).
  int resident = 0;
  st = confirm_kernel(fn, plan->regs_per_thread, plan->threads, plan->smem_bytes, false, "", &resident, reason, reason_len);
  if (st != PRNN_STATUS_SUCCESS) return st;
  if (!check_co_residency(*plan, resident, info.limits.sm_count, reason, reason_len))
    return PRNN_STATUS_NOT_SUPPORTED;
  *kernel = fn;
  return PRNN_STATUS_SUCCESS;
}

enum class Variant { kV1, kV2, kAuto, kInvalid };

Variant requested_variant() {
  const char* v = getenv("PRNN_VARIANT");
  if (v == nullptr || v[0] == '\0' || strcmp(v, "v1") == 0) return Variant::kV1;
  if (strcmp(v, "v2") == 0) return Variant::kV2;
  if (strcmp(v, "auto") == 0) return Variant::kAuto;
  return Variant::kInvalid;
}

// PRNN_V2_FP32: how v2 multiplies fp32 (3xTF32 by default); -1 for a value not understood.
int v2_fp32_precision() {
  const char* v = getenv("PRNN_V2_FP32");
  if (v == nullptr || v[0] == '\0' || strcmp(v, "3xtf32") == 0) return kV2Tf32x3;
  if (strcmp(v, "tf32") == 0) return kV2Tf32;
  return -1;
}

// PRNN_V2_MODE: kV2ModeAuto / Ring / Cluster; -2 for a value not understood.
int v2_requested_mode() {
  const char* v = getenv("PRNN_V2_MODE");
  if (v == nullptr || v[0] == '\0' || strcmp(v, "auto") == 0) return kV2ModeAuto;
  if (strcmp(v, "ring") == 0) return kV2ModeRing;
  if (strcmp(v, "cluster") == 0) return kV2ModeCluster;
  return -2;
}

// Cluster mode: the launch configuration, and how many such clusters the runtime can run at once.
cudaLaunchConfig_t cluster_config(const PlanV2& plan, cudaStream_t stream, cudaLaunchAttribute* attr) {
  cudaLaunchConfig_t config = {};
  config.gridDim = dim3(plan.blocks);
  config.blockDim = dim3(plan.threads);
  config.dynamicSmemBytes = static_cast<size_t>(plan.smem_bytes);
  config.stream = stream;
  attr->id = cudaLaunchAttributeClusterDimension;
  attr->val.clusterDim.x = plan.blocks_per_dir;
  attr->val.clusterDim.y = 1;
  attr->val.clusterDim.z = 1;
  config.attrs = attr;
  config.numAttrs = 1;
  return config;
}

prnnStatus_t active_clusters(const void* fn, const PlanV2& plan, int* active) {
  if (plan.blocks_per_dir > 8) {
    const cudaError_t err = cudaFuncSetAttribute(fn, cudaFuncAttributeNonPortableClusterSizeAllowed, 1);
    if (err != cudaSuccess) return cuda_fail(err, "cudaFuncSetAttribute(NonPortableClusterSizeAllowed)");
  }
  cudaLaunchAttribute attr;
  const cudaLaunchConfig_t config = cluster_config(plan, nullptr, &attr);
  const cudaError_t err = cudaOccupancyMaxActiveClusters(active, fn, &config);
  if (err != cudaSuccess) {
    cudaGetLastError();
    *active = 0;  // this cluster shape cannot launch: the caller plans without it
  }
  return PRNN_STATUS_SUCCESS;
}

// Kernel v2's plan for one pass, confirmed against the kernel as built (registers, occupancy).
prnnStatus_t plan_pass_v2(const prnnProblem_t* p, int device, bool backward, PlanV2* plan, const void** kernel,
                          char* reason, size_t reason_len) {
  DeviceInfo info;
  prnnStatus_t st = device_info(device, &info);
  if (st != PRNN_STATUS_SUCCESS) return st;
  const char* pass = backward ? "backward" : "forward";
  if (!info.cooperative || info.cc_major < 8) {
    snprintf(reason, reason_len, "v2 %s: device %d (compute capability %d.x%s) lacks mma.sync or cooperative launch",
             pass, device, info.cc_major, info.cooperative ? "" : ", no cooperative launch");
    return PRNN_STATUS_NOT_SUPPORTED;
  }
  const Fault fault = injected_fault(backward);
  if (fault == Fault::kInvalid) return fail(PRNN_STATUS_INVALID_VALUE, "PRNN_FAULT=%s: %s", fault_env(), kFaultUsage);
  if (fault == Fault::kPlan) {
    snprintf(reason, reason_len, "%s %s: fault injected (PRNN_FAULT=%s): the planner refused the problem",
             dtype_name(p->dtype), pass, fault_env());
    return PRNN_STATUS_NOT_SUPPORTED;
  }
  int precision = kV2Mma16;
  if (p->dtype == PRNN_DATA_FLOAT) {
    precision = v2_fp32_precision();
    if (precision < 0)
      return fail(PRNN_STATUS_INVALID_VALUE, "PRNN_V2_FP32=%s: must be 3xtf32 or tf32", getenv("PRNN_V2_FP32"));
  }
  const ProblemShape shape = {p->time_steps, p->batch > 0 ? p->batch : 1, p->directions, p->hidden,
                              dtype_bytes(p->dtype)};
  const int mode = v2_requested_mode();
  if (mode == -2) return fail(PRNN_STATUS_INVALID_VALUE, "PRNN_V2_MODE=%s: must be auto, ring or cluster", getenv("PRNN_V2_MODE"));
  char why[1024] = "";
  DeviceLimits limits = info.limits;
  const void* fn = nullptr;
  char label[32];
  snprintf(label, sizeof(label), "v2 %s: ", pass);
  int resident = 0;
  // At most twice: a cluster plan made on the SMs / cluster-size estimate is re-made with the
  // runtime's count of clusters that run at once (which may give larger groups, or ring mode).
  for (int attempt = 0;; ++attempt) {
    if (!make_plan_v2_mode(limits, shape, precision, kKernelMaxRegsPerThread, mode, plan, why, sizeof(why))) {
      snprintf(reason, reason_len, "%s %s: %s", dtype_name(p->dtype), pass, why);
      return PRNN_STATUS_NOT_SUPPORTED;
    }
    fn = backward ? backward_kernel_v2(p->dtype, precision, plan->reg_steps)
                  : forward_kernel_v2(p->dtype, precision, plan->reg_steps);
    if (fn == nullptr) return fail(PRNN_STATUS_INVALID_VALUE, "v2: no kernel for %d register steps", plan->reg_steps);
    st = confirm_kernel(fn, plan->regs_per_thread, plan->threads, plan->smem_bytes, true, label, &resident, reason, reason_len);
    if (st != PRNN_STATUS_SUCCESS) return st;
    if (plan->mode != kV2ModeCluster) break;
    int active = 0;
    st = active_clusters(fn, *plan, &active);
    if (st != PRNN_STATUS_SUCCESS) return st;
    if (active < 1 && mode == kV2ModeAuto) {  // this cluster size cannot launch here: ring mode
      limits.max_cluster_blocks = 0;
      continue;
    }
    if (active < 1) {
      snprintf(reason, reason_len, "v2 %s: clusters of %d blocks (%d threads, %d B shared memory) cannot launch on device %d",
               pass, plan->blocks_per_dir, plan->threads, plan->smem_bytes, device);
      return PRNN_STATUS_NOT_SUPPORTED;
    }
    if (active == limits.max_active_clusters || attempt > 0) break;
    limits.max_active_clusters = active;
  }
  if (plan->mode == kV2ModeCluster) {  // clusters are independent: only each cluster's blocks must be co-resident
    *kernel = fn;
    return PRNN_STATUS_SUCCESS;
  }
  if (resident < 1 || static_cast<long long>(resident) * info.limits.sm_count < plan->blocks) {
    snprintf(reason, reason_len, "v2 %s: %d blocks of %d threads with %d B shared memory cannot all be resident (%d per SM x %d SMs)",
             pass, plan->blocks, plan->threads, plan->smem_bytes, resident, info.limits.sm_count);
    return PRNN_STATUS_NOT_SUPPORTED;
  }
  *kernel = fn;
  return PRNN_STATUS_SUCCESS;
}

// The plan of one pass in whichever variant PRNN_VARIANT asks for.
struct PassPlan {
  int variant = 1;
  Plan v1 = {};
  PlanV2 v2 = {};
  const void* kernel = nullptr;
  void describe(char* out, size_t len) const {
    if (variant == 2) {
      describe_plan_v2(v2, out, len);
    } else {
      char text[512];
      describe_plan(v1, text, sizeof(text));
      snprintf(out, len, "v1 %s", text);
    }
  }
};

prnnStatus_t plan_launch(const prnnProblem_t* p, int device, bool backward, PassPlan* out, char* reason,
                         size_t reason_len) {
  const Variant v = requested_variant();
  if (v == Variant::kInvalid)
    return fail(PRNN_STATUS_INVALID_VALUE, "PRNN_VARIANT=%s: must be v1, v2 or auto", getenv("PRNN_VARIANT"));
  if (v == Variant::kV2 || v == Variant::kAuto) {
    const prnnStatus_t st = plan_pass_v2(p, device, backward, &out->v2, &out->kernel, reason, reason_len);
    if (st == PRNN_STATUS_SUCCESS) {
      out->variant = 2;
      return st;
    }
    if (v == Variant::kV2 || st != PRNN_STATUS_NOT_SUPPORTED) return st;  // auto: v1 next
  }
  out->variant = 1;
  return plan_pass(p, device, backward, &out->v1, &out->kernel, reason, reason_len);
}

size_t workspace_bytes_for(const prnnProblem_t* p) {
  const size_t v1_state = 2 * static_cast<size_t>(p->batch) * p->directions * p->hidden * sizeof(float);
  const size_t v2_ring = static_cast<size_t>(v2_ring_bytes_for(p->batch, p->directions, p->hidden, dtype_bytes(p->dtype)));
  return kWorkspaceHeaderBytes + (v1_state > v2_ring ? v1_state : v2_ring);
}

// Common part of prnnForward / prnnBackwardData once pointers are checked.
prnnStatus_t run_pass(const prnnProblem_t* p, bool backward, KernelArgs args, void* workspace,
                      cudaStream_t stream) {
  int device = 0;
  prnnStatus_t st = current_device(&device);
  if (st != PRNN_STATUS_SUCCESS) return st;
  PassPlan plan;
  char reason[768] = "";
  st = plan_launch(p, device, backward, &plan, reason, sizeof(reason));
  if (st == PRNN_STATUS_NOT_SUPPORTED) return fail(st, "%s", reason);
  if (st != PRNN_STATUS_SUCCESS) return st;

  const char* what = backward ? "backward kernel" : "forward kernel";
  const Fault fault = injected_fault(backward);
  if (fault == Fault::kInvalid) return fail(PRNN_STATUS_INVALID_VALUE, "PRNN_FAULT=%s: %s", fault_env(), kFaultUsage);
  if (fault == Fault::kLaunch)
    return fail(PRNN_STATUS_CUDA_ERROR, "cooperative launch (%s): fault injected (PRNN_FAULT=%s): the launch failed",
                backward ? "backward" : "forward", fault_env());
  if (plan.variant == 2 && reinterpret_cast<uintptr_t>(workspace) % 16 != 0)
    return fail(PRNN_STATUS_INVALID_VALUE, "kernel v2 needs a 16-byte aligned workspace (it copies exchange words in pairs)");
  const int blocks = plan.variant == 2 ? plan.v2.blocks : plan.v1.blocks;
  const int threads = plan.variant == 2 ? plan.v2.threads : plan.v1.threads;
  const int smem = plan.variant == 2 ? plan.v2.smem_bytes : plan.v1.smem_bytes;
  unsigned char* body = static_cast<unsigned char*>(workspace) + kWorkspaceHeaderBytes;
  args.barrier_counter = static_cast<unsigned int*>(workspace);
  args.status = status_record(workspace);
  args.barrier_timeout_ns = barrier_timeout_ns(fault == Fault::kTimeout);
  args.fault_skip_block = fault == Fault::kTimeout ? blocks - 1 : -1;
  args.state = reinterpret_cast<float*>(body);
  args.ring = reinterpret_cast<unsigned long long*>(body);
  args.activation = static_cast<int>(p->activation);
  args.use_cg_barrier = use_cg_barrier() ? 1 : 0;

  // One memset zeroes the counter and the status record (and, for v2, the ring: its tags start at 0).
  const size_t zero_bytes = kWorkspaceHeaderBytes + (plan.variant == 2 ? static_cast<size_t>(v2_ring_bytes(plan.v2)) : 0);
  cudaError_t err = cudaMemsetAsync(workspace, 0, zero_bytes, stream);
  if (err != cudaSuccess) return cuda_fail(err, "cudaMemsetAsync(workspace header)");
  void* params_v1[] = {&plan.v1, &args};
  void* params_v2[] = {&plan.v2, &args};
  if (plan.variant == 2 && plan.v2.mode == kV2ModeCluster) {
    cudaLaunchAttribute attr;
    const cudaLaunchConfig_t config = cluster_config(plan.v2, stream, &attr);
    err = cudaLaunchKernelExC(&config, plan.kernel, params_v2);
    if (err != cudaSuccess) return cuda_fail(err, backward ? "cluster launch (backward)" : "cluster launch (forward)");
  } else {
    err = cudaLaunchCooperativeKernel(plan.kernel, dim3(blocks), dim3(threads), plan.variant == 2 ? params_v2 : params_v1,
                                      static_cast<size_t>(smem), stream);
    if (err != cudaSuccess) return cuda_fail(err, backward ? "cooperative launch (backward)" : "cooperative launch (forward)");
  }
  if (debug_enabled()) {
    char text[768];
    plan.describe(text, sizeof(text));
    fprintf(stderr, "[prnn] %s %s %s barrier=%s\n", backward ? "backward" : "forward", dtype_name(p->dtype),
            text, plan.variant == 2 ? (plan.v2.mode == kV2ModeCluster ? "none (v2 exchange through DSMEM)" : "none (v2 exchange)")
                                    : args.use_cg_barrier ? "cg" : "counter");
    cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
    if (cudaStreamIsCapturing(stream, &capture) == cudaSuccess && capture == cudaStreamCaptureStatusNone)
      return read_status_record(args.status, stream, what);
  }
  return PRNN_STATUS_SUCCESS;
}

// Copies `src` (or zeros when src is null) into `dst` of n elements of p's dtype.
prnnStatus_t copy_or_zero(const prnnProblem_t* p, void* dst, const void* src, size_t n, cudaStream_t stream) {
  if (dst == nullptr || n == 0) return PRNN_STATUS_SUCCESS;
  const size_t bytes = n * dtype_bytes(p->dtype);
  const cudaError_t err = src != nullptr ? cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice, stream)
                                         : cudaMemsetAsync(dst, 0, bytes, stream);  // 0 bits are +0.0
  return err == cudaSuccess ? PRNN_STATUS_SUCCESS : cuda_fail(err, "copy of the final state");
}

__global__ void barrier_benchmark_kernel(KernelArgs a, int iterations) {
  for (int i = 0; i < iterations; ++i)
    if (!grid_barrier(a, static_cast<unsigned int>(i + 1))) return;
}

}  // namespace
}  // namespace prnn

using namespace prnn;

extern "C" {

const char* prnnStatusString(prnnStatus_t status) {
  switch (status) {
    case PRNN_STATUS_SUCCESS: return "PRNN_STATUS_SUCCESS";
    case PRNN_STATUS_INVALID_VALUE: return "PRNN_STATUS_INVALID_VALUE";
    case PRNN_STATUS_NOT_SUPPORTED: return "PRNN_STATUS_NOT_SUPPORTED";
    case PRNN_STATUS_WORKSPACE_TOO_SMALL: return "PRNN_STATUS_WORKSPACE_TOO_SMALL";
    case PRNN_STATUS_CUDA_ERROR: return "PRNN_STATUS_CUDA_ERROR";
    case PRNN_STATUS_TIMEOUT: return "PRNN_STATUS_TIMEOUT";
  }
  return "PRNN_STATUS_UNKNOWN";
}

const char* prnnLastErrorMessage(void) { return g_last_error; }

prnnStatus_t prnnCheckSupport(const prnnProblem_t* p, int device, int* supported, char* reason, size_t reason_len) {
  if (supported == nullptr) return fail(PRNN_STATUS_INVALID_VALUE, "supported is NULL");
  *supported = 0;
  char local[768] = "";
  if (reason == nullptr || reason_len == 0) {
    reason = local;
    reason_len = sizeof(local);
  }
  reason[0] = '\0';
  prnnStatus_t st = validate_problem(p);
  if (st != PRNN_STATUS_SUCCESS) {
    snprintf(reason, reason_len, "%s", g_last_error);
    return st;
  }
  for (int pass = 0; pass < 2; ++pass) {
    PassPlan plan;
    st = plan_launch(p, device, pass == 1, &plan, reason, reason_len);
    if (st == PRNN_STATUS_NOT_SUPPORTED) return PRNN_STATUS_SUCCESS;  // answered: not supported
    if (st != PRNN_STATUS_SUCCESS) {
      snprintf(reason, reason_len, "%s", g_last_error);
      return st;
    }
  }
  *supported = 1;
  return PRNN_STATUS_SUCCESS;
}

prnnStatus_t prnnDescribePlan(const prnnProblem_t* p, int device, int backward, char* out, size_t out_len) {
  if (out == nullptr || out_len == 0) return fail(PRNN_STATUS_INVALID_VALUE, "prnnDescribePlan: out is NULL");
  out[0] = '\0';
  prnnStatus_t st = validate_problem(p);
  if (st != PRNN_STATUS_SUCCESS) return st;
  PassPlan plan;
  char reason[768] = "";
  st = plan_launch(p, device, backward != 0, &plan, reason, sizeof(reason));
  if (st == PRNN_STATUS_NOT_SUPPORTED) {
    snprintf(out, out_len, "not supported: %s", reason);
    return PRNN_STATUS_SUCCESS;
  }
  if (st != PRNN_STATUS_SUCCESS) return st;
  plan.describe(out, out_len);
  return PRNN_STATUS_SUCCESS;
}

prnnStatus_t prnnForwardWorkspaceSize(const prnnProblem_t* p, int device, size_t* bytes) {
  (void)device;  // the workspace does not depend on the device's tiling
  prnnStatus_t st = validate_problem(p);
  if (st != PRNN_STATUS_SUCCESS) return st;
  if (bytes == nullptr) return fail(PRNN_STATUS_INVALID_VALUE, "bytes is NULL");
  *bytes = workspace_bytes_for(p);
  return PRNN_STATUS_SUCCESS;
}

prnnStatus_t prnnBackwardDataWorkspaceSize(const prnnProblem_t* p, int device, size_t* bytes) {
  return prnnForwardWorkspaceSize(p, device, bytes);
}

prnnStatus_t prnnForward(const prnnProblem_t* p, const void* u, const void* w, const void* h0,
                         const int32_t* lengths, void* y, void* h_last, void* workspace,
                         size_t workspace_bytes, cudaStream_t stream) {
  prnnStatus_t st = validate_problem(p);
  if (st != PRNN_STATUS_SUCCESS) return st;
  if (p->batch == 0) return PRNN_STATUS_SUCCESS;
  const size_t state_elems = static_cast<size_t>(p->batch) * p->directions * p->hidden;
  if (p->time_steps == 0) return copy_or_zero(p, h_last, h0, state_elems, stream);
  if (u == nullptr || w == nullptr || y == nullptr)
    return fail(PRNN_STATUS_INVALID_VALUE, "prnnForward: u, w and y must not be NULL");
  if (workspace == nullptr || workspace_bytes < workspace_bytes_for(p))
    return fail(PRNN_STATUS_WORKSPACE_TOO_SMALL, "prnnForward: workspace of %zu bytes given, %zu needed",
                workspace_bytes, workspace_bytes_for(p));
  KernelArgs args = {};
  args.u = u;
  args.h0 = h0;
  args.y = y;
  args.h_last = h_last;
  args.w = w;
  args.lengths = lengths;
  return run_pass(p, false, args, workspace, stream);
}

prnnStatus_t prnnBackwardData(const prnnProblem_t* p, const void* w, const void* y, const void* dy,
                              const void* dh_last, const int32_t* lengths, void* du, void* dh0,
                              void* workspace, size_t workspace_bytes, cudaStream_t stream) {
  prnnStatus_t st = validate_problem(p);
  if (st != PRNN_STATUS_SUCCESS) return st;
  if (p->batch == 0) return PRNN_STATUS_SUCCESS;
  const size_t state_elems = static_cast<size_t>(p->batch) * p->directions * p->hidden;
  if (p->time_steps == 0) return copy_or_zero(p, dh0, dh_last, state_elems, stream);
  if (w == nullptr || y == nullptr || dy == nullptr || du == nullptr)
    return fail(PRNN_STATUS_INVALID_VALUE, "prnnBackwardData: w, y, dy and du must not be NULL");
  if (workspace == nullptr || workspace_bytes < workspace_bytes_for(p))
    return fail(PRNN_STATUS_WORKSPACE_TOO_SMALL, "prnnBackwardData: workspace of %zu bytes given, %zu needed",
                workspace_bytes, workspace_bytes_for(p));
  KernelArgs args = {};
  args.y_in = y;
  args.dy = dy;
  args.dh_last = dh_last;
  args.du = du;
  args.dh0 = dh0;
  args.w = w;
  args.lengths = lengths;
  return run_pass(p, true, args, workspace, stream);
}

prnnStatus_t prnnWorkspaceStatus(const void* workspace, cudaStream_t stream) {
  if (workspace == nullptr) return fail(PRNN_STATUS_INVALID_VALUE, "prnnWorkspaceStatus: workspace is NULL");
  return read_status_record(status_record(const_cast<void*>(workspace)), stream, "persistent kernel");
}

prnnStatus_t prnnWorkspaceStatusAsync(const void* workspace, void* host_record, cudaStream_t stream) {
  if (workspace == nullptr || host_record == nullptr)
    return fail(PRNN_STATUS_INVALID_VALUE, "prnnWorkspaceStatusAsync: workspace and host_record must not be NULL");
  const cudaError_t err = cudaMemcpyAsync(host_record, status_record(const_cast<void*>(workspace)),
                                          PRNN_STATUS_RECORD_BYTES, cudaMemcpyDeviceToHost, stream);
  if (err != cudaSuccess) return cuda_fail(err, "cudaMemcpyAsync(status record)");
  return PRNN_STATUS_SUCCESS;
}

prnnStatus_t prnnStatusFromRecord(const void* host_record) {
  if (host_record == nullptr) return fail(PRNN_STATUS_INVALID_VALUE, "prnnStatusFromRecord: host_record is NULL");
  unsigned int words[kStatusWords];
  memcpy(words, host_record, sizeof(words));
  return status_from_record(words, "persistent kernel");
}

prnnStatus_t prnnMeasureBarrier(int device, int blocks, int iterations, cudaStream_t stream, float* microseconds) {
  if (microseconds == nullptr || iterations < 1)
    return fail(PRNN_STATUS_INVALID_VALUE, "prnnMeasureBarrier: need iterations >= 1 and a result pointer");
  DeviceInfo info;
  prnnStatus_t st = device_info(device, &info);
  if (st != PRNN_STATUS_SUCCESS) return st;
  if (!info.cooperative) return fail(PRNN_STATUS_NOT_SUPPORTED, "device %d lacks cooperative launch", device);
  int previous = 0;
  cudaError_t err = cudaGetDevice(&previous);
  if (err != cudaSuccess) return cuda_fail(err, "cudaGetDevice");
  if (previous != device && (err = cudaSetDevice(device)) != cudaSuccess) return cuda_fail(err, "cudaSetDevice");

  if (blocks <= 0) blocks = info.limits.sm_count;  // the planner's grid: one block per SM
  const void* fn = reinterpret_cast<const void*>(&barrier_benchmark_kernel);
  int resident = 0;
  err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&resident, fn, kBarrierBenchThreads, 0);
  if (err != cudaSuccess) return cuda_fail(err, "cudaOccupancyMaxActiveBlocksPerMultiprocessor");
  if (static_cast<long long>(resident) * info.limits.sm_count < blocks) {
    if (previous != device) cudaSetDevice(previous);
    return fail(PRNN_STATUS_NOT_SUPPORTED, "%d blocks cannot all be resident (%d per SM x %d SMs)", blocks,
                resident, info.limits.sm_count);
  }
  KernelArgs args = {};
  args.use_cg_barrier = use_cg_barrier() ? 1 : 0;
  args.barrier_timeout_ns = barrier_timeout_ns(false);
  args.fault_skip_block = -1;
  cudaEvent_t start = nullptr, stop = nullptr;
  float ms_zero = 0.0f, ms_full = 0.0f;
  st = PRNN_STATUS_SUCCESS;
  void* header = nullptr;
  err = cudaMalloc(&header, kWorkspaceHeaderBytes);
  if (err == cudaSuccess) {
    args.barrier_counter = static_cast<unsigned int*>(header);
    args.status = status_record(header);
  }
  if (err == cudaSuccess) err = cudaEventCreate(&start);
  if (err == cudaSuccess) err = cudaEventCreate(&stop);
  // Run 0 iterations (launch cost alone), then `iterations`; report the difference per barrier.
  for (int run = 0; run < 3 && err == cudaSuccess; ++run) {  // run 0 warms up
    int count = run == 1 ? 0 : iterations;
    err = cudaMemsetAsync(header, 0, kWorkspaceHeaderBytes, stream);
    if (err == cudaSuccess) err = cudaEventRecord(start, stream);
    void* params[] = {&args, &count};
    if (err == cudaSuccess)
      err = cudaLaunchCooperativeKernel(fn, dim3(blocks), dim3(kBarrierBenchThreads), params, 0, stream);
    if (err == cudaSuccess) err = cudaEventRecord(stop, stream);
    if (err == cudaSuccess) err = cudaEventSynchronize(stop);
    if (err == cudaSuccess) err = cudaEventElapsedTime(run == 1 ? &ms_zero : &ms_full, start, stop);
    if (err == cudaSuccess && (st = read_status_record(args.status, stream, "barrier benchmark")) != PRNN_STATUS_SUCCESS)
      break;
  }
  if (err != cudaSuccess) st = cuda_fail(err, "barrier benchmark");
  if (start) cudaEventDestroy(start);
  if (stop) cudaEventDestroy(stop);
  if (header) cudaFree(header);
  if (previous != device) cudaSetDevice(previous);
  if (st == PRNN_STATUS_SUCCESS) {
    const float diff = ms_full - ms_zero;
    *microseconds = (diff > 0.0f ? diff : ms_full) * 1000.0f / static_cast<float>(iterations);
  }
  return st;
}

}  // extern "C"
