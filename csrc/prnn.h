/*
 * prnn.h - C API of the persistent recurrent kernel.
 *
 * The recurrence  h_t = act(u_t + h_{t-1} W^T)  over all timesteps of a padded batch, for one or two
 * directions, in one persistent launch per pass: each thread block loads its tile of W once, keeps
 * it on chip for the whole launch and steps through every timestep, with a grid-wide barrier
 * between timesteps. Backward-data is a second persistent kernel over W^T; dW is left to the caller
 * (one GEMM over all timesteps).
 *
 * Plain C: raw device pointers, a stream, a caller-owned workspace, status codes. No PyTorch types.
 * Every entry point uses the device that is current on the calling thread (cudaSetDevice) unless it
 * takes an explicit `device` argument; pointers must belong to that device.
 */
#ifndef PRNN_H_
#define PRNN_H_

#include <stddef.h>
#include <stdint.h>
#include <cuda_runtime_api.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef enum {
  PRNN_STATUS_SUCCESS = 0,
  PRNN_STATUS_INVALID_VALUE = 1,
  PRNN_STATUS_NOT_SUPPORTED = 2,
  PRNN_STATUS_WORKSPACE_TOO_SMALL = 3,
  PRNN_STATUS_CUDA_ERROR = 4,
  PRNN_STATUS_TIMEOUT = 5  /* a grid barrier waited past its bound; the launch gave up, outputs undefined */
} prnnStatus_t;

typedef enum { PRNN_ACT_RELU = 0, PRNN_ACT_CLIPPED_RELU = 1, PRNN_ACT_TANH = 2 } prnnActivation_t;

typedef enum { PRNN_DATA_FLOAT = 0, PRNN_DATA_HALF = 1, PRNN_DATA_BFLOAT16 = 2 } prnnDataType_t;

/* Clip value of PRNN_ACT_CLIPPED_RELU: min(max(x, 0), 20), as in Deep Speech 2. */
#define PRNN_CLIPPED_RELU_CEILING 20.0f

typedef struct {
  int time_steps;              /* T */
  int batch;                   /* N */
  int directions;              /* D: 1 or 2 (direction 1 runs backwards within each length) */
  int hidden;                  /* H */
  prnnActivation_t activation;
  prnnDataType_t dtype;        /* storage type of every tensor; accumulation is fp32 */
} prnnProblem_t;

const char* prnnStatusString(prnnStatus_t status);
/* Thread-local detail of this thread's last failure ("" if none yet). */
const char* prnnLastErrorMessage(void);

/* Can the persistent kernel run p on `device`? If not, *supported = 0 and `reason` says why
   (e.g. "hidden 4096 fp32 needs 64.0 MiB of weights on chip, this device has 29.3 MiB").
   Returns SUCCESS whenever the question could be answered (supported or not). */
prnnStatus_t prnnCheckSupport(const prnnProblem_t* p, int device, int* supported, char* reason,
                              size_t reason_len);

/* One line naming the kernel variant and tiling that prnnForward (backward = 0) or prnnBackwardData
   (backward = 1) would use for p on `device` under the current environment (PRNN_VARIANT: v1, the
   default; v2, tensor cores and a data-flow exchange; auto, v2 where it plans), or "not supported:
   <reason>". SUCCESS whenever the question could be answered. */
prnnStatus_t prnnDescribePlan(const prnnProblem_t* p, int device, int backward, char* out, size_t out_len);

/* Workspace bytes: enough for either variant (v1's fp32 state ping-pong or v2's exchange ring). */
prnnStatus_t prnnForwardWorkspaceSize(const prnnProblem_t* p, int device, size_t* bytes);

/* u [T,N,D,H], w [D,H,H] row-major (h_t = act(u_t + h_{t-1} w^T)), h0 [N,D,H] or NULL (zeros),
   lengths: device int32 [N] or NULL (all T); each length must lie in [0, T].
   Writes y [T,N,D,H] (zero at t >= length) and h_last [N,D,H] (may be NULL: not written).
   All pointers device memory, contiguous, of the current device. Runs on `stream`. */
prnnStatus_t prnnForward(const prnnProblem_t* p, const void* u, const void* w, const void* h0,
                         const int32_t* lengths, void* y, void* h_last, void* workspace,
                         size_t workspace_bytes, cudaStream_t stream);

prnnStatus_t prnnBackwardDataWorkspaceSize(const prnnProblem_t* p, int device, size_t* bytes);

/* From forward's y, dy [T,N,D,H] and dh_last [N,D,H] (or NULL), writes du [T,N,D,H] (grad wrt the
   pre-activation, which equals grad wrt u; zero at t >= length) and dh0 [N,D,H] (may be NULL).
   The activation derivative is taken from y (relu: y>0; clipped relu: 0<y<20; tanh: 1-y^2).
   dW = sum_t du_t^T h_{t-1} is one GEMM left to the caller. */
prnnStatus_t prnnBackwardData(const prnnProblem_t* p, const void* w, const void* y, const void* dy,
                              const void* dh_last, const int32_t* lengths, void* du, void* dh0,
                              void* workspace, size_t workspace_bytes, cudaStream_t stream);

/* How the last prnnForward / prnnBackwardData launched with `workspace` on `stream` ended: SUCCESS,
   or TIMEOUT when a block waited at a grid barrier longer than the bound (PRNN_BARRIER_TIMEOUT_MS,
   default 10000) and the launch gave up instead of hanging; the message names the block and barrier.
   The launches themselves stay asynchronous; this call synchronises `stream` (so it cannot be
   captured in a CUDA graph: INVALID_VALUE during capture) and must come before the workspace is
   reused. With PRNN_DEBUG=1 the launches check it themselves. prnnWorkspaceStatusAsync below is
   the form without the wait (what the torch binding uses by default). */
prnnStatus_t prnnWorkspaceStatus(const void* workspace, cudaStream_t stream);

/* Bytes of a launch's status record: the part of the workspace header prnnWorkspaceStatus reads. */
#define PRNN_STATUS_RECORD_BYTES 32

/* prnnWorkspaceStatus without the wait: enqueues on `stream` a copy of the status record of the last
   launch with `workspace` into `host_record` (PRNN_STATUS_RECORD_BYTES bytes of host memory; pinned,
   e.g. from cudaHostAlloc, or the copy is not asynchronous) and returns at once. Call it right after
   the launch, on the launch's stream, before the workspace is reused. Once the stream has passed
   that point (an event recorded after this call has completed), prnnStatusFromRecord(host_record)
   says how the launch ended. */
prnnStatus_t prnnWorkspaceStatusAsync(const void* workspace, void* host_record, cudaStream_t stream);

/* How the launch whose record prnnWorkspaceStatusAsync copied to `host_record` ended: SUCCESS, or
   TIMEOUT with the same message as prnnWorkspaceStatus. Host only; reads nothing on the device. */
prnnStatus_t prnnStatusFromRecord(const void* host_record);

/* The grid-wide barrier alone: average microseconds per barrier with `blocks` co-resident blocks
   (blocks <= 0: as many as the planner would use for one SM-filling grid). Synchronises `stream`.
   TIMEOUT when the barrier gave up (see prnnWorkspaceStatus). */
prnnStatus_t prnnMeasureBarrier(int device, int blocks, int iterations, cudaStream_t stream,
                                float* microseconds);

#ifdef __cplusplus
} /* extern "C" */
#endif

#endif /* PRNN_H_ */
