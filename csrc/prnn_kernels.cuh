// prnn_kernels.cuh - the persistent recurrent kernel (forward and backward-data), as templates.
//
// One kernel body serves both passes. Per pass and direction the block owns `rows` output units and
// keeps the matching weight tile in shared memory for the whole launch:
//   forward:        h_t   = act(u_t + W h_{t-1})            tile = W[rows, :]
//   backward-data:  du_t  = (dy_t + W^T du_{t+1}) * act'(y_t) tile = W^T[rows, :] = W[:, rows]^T
// Every step is "acc = tile . x" for x = the previous step's state of all sequences (fp32, in a
// ping-pong buffer of the workspace), followed by a per-element epilogue and a grid-wide barrier.
//
// Positions: sequence n of length L visits positions p = 0..L-1 in the forward pass; direction 0
// maps p to time t = p, direction 1 to t = L-1-p. Forward step s handles p = s; backward step s
// handles p = T-1-s, and one extra backward step (s = T) turns W^T du_0 into dh0.
//
// Status: compiled in CI and, for fp32, run on CPU threads by csrc/tests/prnn_emulation_test.cpp;
// not yet run on a GPU at the time of writing (see csrc/README.md).
#pragma once

#include <stdint.h>

#ifndef PRNN_HOST_EMULATION
#include <cooperative_groups.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#endif  // PRNN_HOST_EMULATION: csrc/tests/prnn_emulation_test.cpp runs the fp32 kernel on CPU threads

#include "prnn.h"
#include "prnn_planner.h"

namespace prnn {

// Kernel arguments (raw pointers; unused ones are null).
struct KernelArgs {
  // forward
  const void* u;        // [T,N,D,H]
  const void* h0;       // [N,D,H] or null
  void* y;              // [T,N,D,H]
  void* h_last;         // [N,D,H] or null
  // backward-data
  const void* y_in;     // [T,N,D,H] forward output
  const void* dy;       // [T,N,D,H]
  const void* dh_last;  // [N,D,H] or null
  void* du;             // [T,N,D,H]
  void* dh0;            // [N,D,H] or null
  // both
  const void* w;        // [D,H,H]
  const int32_t* lengths;  // [N] or null
  float* state;         // workspace: 2 x [N,D,H] fp32 ping-pong (v1)
  unsigned long long* ring;       // workspace: kernel v2's exchange ring (prnn_v2.cuh), zeroed before launch
  unsigned int* barrier_counter;  // workspace: zeroed before launch
  unsigned int* status;           // workspace: kStatusWords, zeroed before launch (see KernelStatus)
  unsigned long long barrier_timeout_ns;  // longest wait at one grid barrier before giving up
  int fault_skip_block; // test fault (PRNN_FAULT=timeout): this block never arrives; -1: none
  int activation;       // prnnActivation_t
  int use_cg_barrier;   // 1: cooperative_groups grid.sync(), 0: counter barrier
};

// The status record a launch leaves in the workspace; the host reads it after the launch
// (prnnWorkspaceStatus). Only the first block to fail writes it.
enum KernelStatus : unsigned int { kKernelOk = 0, kKernelBarrierTimeout = 1 };
enum StatusWord { kStatusCode, kStatusBlock, kStatusGeneration, kStatusArrived, kStatusGrid, kStatusTimeoutMs,
                  kStatusWords };

// A spinning block reads the clock (and the status word, to leave early once another block has
// given up) only every this many polls of the counter, so the common case costs what it did.
constexpr unsigned int kBarrierPollsPerClockCheck = 256;

template <typename T> __device__ __forceinline__ float to_float(T v);
template <> __device__ __forceinline__ float to_float<float>(float v) { return v; }
#ifndef PRNN_HOST_EMULATION
template <> __device__ __forceinline__ float to_float<__half>(__half v) { return __half2float(v); }
template <> __device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 v) {
  return __bfloat162float(v);
}
#endif
template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ float from_float<float>(float v) { return v; }
#ifndef PRNN_HOST_EMULATION
template <> __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}
#endif

__device__ __forceinline__ float activate(int act, float x) {
  if (act == PRNN_ACT_TANH) return tanhf(x);
  x = fmaxf(x, 0.0f);
  if (act == PRNN_ACT_CLIPPED_RELU) x = fminf(x, PRNN_CLIPPED_RELU_CEILING);
  return x;
}

// d act / d pre-activation, from the activation's output y.
__device__ __forceinline__ float activation_grad_from_output(int act, float y) {
  if (act == PRNN_ACT_TANH) return 1.0f - y * y;
  if (act == PRNN_ACT_CLIPPED_RELU) return (y > 0.0f && y < PRNN_CLIPPED_RELU_CEILING) ? 1.0f : 0.0f;
  return y > 0.0f ? 1.0f : 0.0f;
}

#ifndef PRNN_HOST_EMULATION  // the emulation test supplies these for CPU threads
__device__ __forceinline__ unsigned int load_acquire_gpu(const unsigned int* p) {
  unsigned int v;
  asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
  return v;
}

__device__ __forceinline__ unsigned long long global_timer_ns() {
  unsigned long long t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

__device__ __forceinline__ void barrier_poll_pause() {}  // a GPU thread spins; a CPU thread yields

__device__ __forceinline__ unsigned char* dynamic_smem() {
  extern __shared__ __align__(16) unsigned char smem_bytes[];
  return smem_bytes;
}
#endif

// Records that this block gave up at barrier `generation` (first failure wins) for the host.
__device__ __forceinline__ void record_barrier_timeout(const KernelArgs& a, unsigned int generation,
                                                       unsigned int counter) {
  if (atomicCAS(a.status + kStatusCode, 0u, static_cast<unsigned int>(kKernelBarrierTimeout)) == 0u) {
    a.status[kStatusBlock] = blockIdx.x;
    a.status[kStatusGeneration] = generation;
    a.status[kStatusArrived] = counter - (generation - 1) * gridDim.x;
    a.status[kStatusGrid] = gridDim.x;
    a.status[kStatusTimeoutMs] = static_cast<unsigned int>(a.barrier_timeout_ns / 1000000ull);
    __threadfence();
  }
}

// Thread 0's half of the counter barrier. False when the block must give up: it waited longer
// than barrier_timeout_ns (a peer never arrived: the grid was not co-resident, or a peer died),
// or another block already gave up. The deadline counts from the first clock check, i.e. up to
// kBarrierPollsPerClockCheck polls late, which is noise against a bound of seconds.
__device__ __forceinline__ bool counter_barrier_wait(const KernelArgs& a, unsigned int generation) {
  const unsigned int target = generation * gridDim.x;
  __threadfence();  // this block's writes (ordered before thread 0 by __syncthreads) go first
  if (static_cast<int>(blockIdx.x) != a.fault_skip_block) atomicAdd(a.barrier_counter, 1u);
  unsigned int polls = 0;
  unsigned long long first_check_ns = 0;
  unsigned int counter;
  while ((counter = load_acquire_gpu(a.barrier_counter)) < target) {
    barrier_poll_pause();
    if (++polls % kBarrierPollsPerClockCheck != 0) continue;
    if (load_acquire_gpu(a.status + kStatusCode) != kKernelOk) return false;
    const unsigned long long now = global_timer_ns();
    if (first_check_ns == 0) {
      first_check_ns = now;
    } else if (now - first_check_ns > a.barrier_timeout_ns) {
      record_barrier_timeout(a, generation, counter);
      return false;
    }
  }
  __threadfence();
  return true;
}

// Grid-wide barrier over a monotonically increasing arrival counter (zeroed before the launch):
// barrier number `generation` (1, 2, ...) completes when all blocks have arrived `generation` times.
// Needs every block co-resident, which the cooperative launch guarantees; the wait is bounded all
// the same, so a broken guarantee ends the launch with a status instead of hanging the GPU.
// Returns false when the launch is being abandoned; every thread of the block gets the same answer
// and the block must return. (PRNN_BARRIER=cg's grid.sync() has no bound: it is a diagnostic.)
__device__ __forceinline__ bool grid_barrier(const KernelArgs& a, unsigned int generation) {
#ifndef PRNN_HOST_EMULATION
  if (a.use_cg_barrier) {
    cooperative_groups::this_grid().sync();
    return true;
  }
#endif
  __syncthreads();
  int give_up = 0;
  if (threadIdx.x == 0) give_up = !counter_barrier_wait(a, generation);
  return !__syncthreads_or(give_up);
}

__device__ __forceinline__ int sequence_length(const KernelArgs& a, int n, int T) {
  // Lengths outside [0, T] are clamped, so that no write can leave the tensors.
  return a.lengths != nullptr ? min(max(__ldg(a.lengths + n), 0), T) : T;
}

// Weight tile -> shared memory, zero-padded to rows_padded rows.
template <typename T, bool kBackward>
__device__ void load_weight_tile(const Plan& p, const KernelArgs& a, T* w_s, int d, int row0, int rows) {
  const int H = p.hidden;
  const T* w = static_cast<const T*>(a.w) + static_cast<size_t>(d) * H * H;
  const int count = p.rows_padded * H;
  for (int idx = threadIdx.x; idx < count; idx += blockDim.x) {
    int r, k;
    if (!kBackward) {  // W[row0 + r][k], contiguous in k
      r = idx / H;
      k = idx - r * H;
    } else {           // W^T[row0 + r][k] = W[k][row0 + r], contiguous in r
      k = idx / p.rows_padded;
      r = idx - k * p.rows_padded;
    }
    T v = from_float<T>(0.0f);
    if (r < rows) v = kBackward ? w[static_cast<size_t>(k) * H + row0 + r] : w[static_cast<size_t>(row0 + r) * H + k];
    w_s[r * H + k] = v;
  }
}

// Epilogue operands of one (row, sequence) element, loaded ahead of the matrix product so that
// their global-memory latency overlaps it.
constexpr int kStageUnroll = 8;  // loads in flight per thread while staging the state

struct EpilogueInputs {
  float a;      // forward: u; backward: dy
  float b;      // backward: y
  int length;
};

template <typename T, int RG, bool kBackward>
__global__ void __launch_bounds__(kKernelMaxThreads, 1)
persistent_rnn_kernel(const Plan p, const KernelArgs a) {
  unsigned char* smem = dynamic_smem();
  T* w_s = reinterpret_cast<T*>(smem + p.smem_w_offset);              // [rows_padded][H]
  float* x_s = reinterpret_cast<float*>(smem + p.smem_x_offset);      // [batch_chunk][H]
  float* red_s = reinterpret_cast<float*>(smem + p.smem_red_offset);  // [k_splits][batch_chunk][rows_padded]

  const int H = p.hidden, N = p.batch, D = p.directions, T_steps = p.time_steps;
  const int d = plan_direction(p, blockIdx.x);
  const int row0 = plan_row_begin(p, blockIdx.x);
  const int rows = plan_rows_in_block(p, blockIdx.x);
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  const int group = plan_warp_row_group(p, warp), k_split = plan_warp_k_split(p, warp);
  const int k_begin = plan_k_begin(p, k_split), k_end = plan_k_end(p, k_split);
  const size_t state_elems = static_cast<size_t>(N) * D * H;
  const size_t step_elems = state_elems;  // one timestep of u / y / dy / du

  load_weight_tile<T, kBackward>(p, a, w_s, d, row0, rows);

  if (!kBackward && a.h_last != nullptr) {
    // Sequences of length 0 never step: their last state is h0.
    for (int idx = threadIdx.x; idx < rows * N; idx += blockDim.x) {
      const int n = idx / rows, i = row0 + idx - (idx / rows) * rows;
      if (sequence_length(a, n, T_steps) == 0) {
        const size_t o = (static_cast<size_t>(n) * D + d) * H + i;
        static_cast<T*>(a.h_last)[o] = a.h0 != nullptr ? static_cast<const T*>(a.h0)[o] : from_float<T>(0.0f);
      }
    }
  }
  __syncthreads();

  const int steps = kBackward ? (a.dh0 != nullptr ? T_steps + 1 : T_steps) : T_steps;
  for (int s = 0; s < steps; ++s) {
    const float* src = a.state + static_cast<size_t>(s & 1) * state_elems;
    float* dst = a.state + static_cast<size_t>((s + 1) & 1) * state_elems;
    const int pos = kBackward ? T_steps - 1 - s : s;  // position handled by this step (-1: dh0 step)

    for (int n0 = 0; n0 < N; n0 += p.batch_chunk) {
      const int nb = min(p.batch_chunk, N - n0);
      const int nb_rounded = (nb + kBatchGroup - 1) / kBatchGroup * kBatchGroup;
      const int epi_count = rows * nb;

      // Prefetch this thread's first epilogue element (element index = threadIdx.x).
      EpilogueInputs pre = {0.0f, 0.0f, 0};
      if (static_cast<int>(threadIdx.x) < epi_count) {
        const int j = threadIdx.x / rows, r = threadIdx.x - j * rows;
        const int n = n0 + j, i = row0 + r;
        pre.length = sequence_length(a, n, T_steps);
        if (pos >= 0 && pos < pre.length) {
          const int t = d == 0 ? pos : pre.length - 1 - pos;
          const size_t o = static_cast<size_t>(t) * step_elems + (static_cast<size_t>(n) * D + d) * H + i;
          if (!kBackward) {
            pre.a = to_float(static_cast<const T*>(a.u)[o]);
          } else {
            pre.a = to_float(static_cast<const T*>(a.dy)[o]);
            pre.b = to_float(static_cast<const T*>(a.y_in)[o]);
          }
        }
      }

      // Stage the previous state of sequences n0 .. n0+nb-1 (zeros past nb and at the first step).
      // Each thread issues kStageUnroll independent loads before its first store, so the L2
      // latency is paid about once per step rather than once per element.
      {
        const int total = nb_rounded * H;  // x_s is [j][k], so element idx is x_s[idx]
        for (int base = threadIdx.x; base < total; base += blockDim.x * kStageUnroll) {
          float v[kStageUnroll];
#pragma unroll
          for (int q = 0; q < kStageUnroll; ++q) {
            const int idx = base + q * blockDim.x;
            v[q] = 0.0f;
            if (idx < total) {
              const int j = idx / H, k = idx - j * H;
              const size_t o = (static_cast<size_t>(n0 + j) * D + d) * H + k;
              if (j < nb) {
                if (s > 0) {
                  v[q] = __ldcg(src + o);  // written by other blocks: read through L2, not L1
                } else if (!kBackward && a.h0 != nullptr) {
                  v[q] = to_float(static_cast<const T*>(a.h0)[o]);
                }
              }
            }
          }
#pragma unroll
          for (int q = 0; q < kStageUnroll; ++q) {
            const int idx = base + q * blockDim.x;
            if (idx < total) x_s[idx] = v[q];
          }
        }
      }
      __syncthreads();

      // Partial products: warp (group, k_split), lanes stride over k.
      const T* w_rows = w_s + group * RG * H;
      for (int jb = 0; jb < nb_rounded; jb += kBatchGroup) {
        float acc[RG][kBatchGroup];
#pragma unroll
        for (int rr = 0; rr < RG; ++rr)
#pragma unroll
          for (int b = 0; b < kBatchGroup; ++b) acc[rr][b] = 0.0f;
        const float* x_group = x_s + jb * H;
        for (int k = k_begin + lane; k < k_end; k += kWarpSize) {
          float wv[RG];
#pragma unroll
          for (int rr = 0; rr < RG; ++rr) wv[rr] = to_float(w_rows[rr * H + k]);
#pragma unroll
          for (int b = 0; b < kBatchGroup; ++b) {
            const float xv = x_group[b * H + k];
#pragma unroll
            for (int rr = 0; rr < RG; ++rr) acc[rr][b] = fmaf(wv[rr], xv, acc[rr][b]);
          }
        }
        // Butterfly sums: every lane ends with all RG x kBatchGroup totals of the warp.
#pragma unroll
        for (int rr = 0; rr < RG; ++rr)
#pragma unroll
          for (int b = 0; b < kBatchGroup; ++b)
#pragma unroll
            for (int off = kWarpSize / 2; off > 0; off /= 2)
              acc[rr][b] += __shfl_xor_sync(0xffffffffu, acc[rr][b], off);
        // Lane q stores total q (selected with constant indices to keep acc in registers).
        float mine = 0.0f;
#pragma unroll
        for (int q = 0; q < RG * kBatchGroup; ++q)
          if (lane == q) mine = acc[q / kBatchGroup][q % kBatchGroup];
        if (lane < RG * kBatchGroup) {
          const int rr = lane / kBatchGroup, b = lane % kBatchGroup;
          red_s[(k_split * p.batch_chunk + jb + b) * p.rows_padded + group * RG + rr] = mine;
        }
      }
      __syncthreads();

      // Epilogue: sum the k-split partials, apply the activation (or its derivative), write out.
      for (int idx = threadIdx.x; idx < epi_count; idx += blockDim.x) {
        const int j = idx / rows, r = idx - j * rows;
        const int n = n0 + j, i = row0 + r;
        float acc = 0.0f;
        for (int ks = 0; ks < p.k_splits; ++ks) acc += red_s[(ks * p.batch_chunk + j) * p.rows_padded + r];
        EpilogueInputs in = pre;
        const size_t nd = (static_cast<size_t>(n) * D + d) * H + i;  // offset within a [N,D,H] slab
        if (idx != static_cast<int>(threadIdx.x)) {                  // not prefetched
          in.length = sequence_length(a, n, T_steps);
          if (pos >= 0 && pos < in.length) {
            const int t = d == 0 ? pos : in.length - 1 - pos;
            const size_t o = static_cast<size_t>(t) * step_elems + nd;
            if (!kBackward) {
              in.a = to_float(static_cast<const T*>(a.u)[o]);
            } else {
              in.a = to_float(static_cast<const T*>(a.dy)[o]);
              in.b = to_float(static_cast<const T*>(a.y_in)[o]);
            }
          }
        }
        const int L = in.length;
        if (!kBackward) {
          if (pos < L) {
            const int t = d == 0 ? pos : L - 1 - pos;
            const float h = activate(a.activation, in.a + acc);
            const T h_stored = from_float<T>(h);
            static_cast<T*>(a.y)[static_cast<size_t>(t) * step_elems + nd] = h_stored;
            dst[nd] = h;
            if (pos == L - 1 && a.h_last != nullptr) static_cast<T*>(a.h_last)[nd] = h_stored;
          } else {
            static_cast<T*>(a.y)[static_cast<size_t>(pos) * step_elems + nd] = from_float<T>(0.0f);
            dst[nd] = 0.0f;
          }
        } else if (pos < 0) {  // the extra step: dh0 = W^T du_0 (+ dh_last for empty sequences)
          float g = acc;
          if (L == 0 && a.dh_last != nullptr) g += to_float(static_cast<const T*>(a.dh_last)[nd]);
          static_cast<T*>(a.dh0)[nd] = from_float<T>(g);
        } else if (pos < L) {
          const int t = d == 0 ? pos : L - 1 - pos;
          float g = in.a + acc;
          if (pos == L - 1 && a.dh_last != nullptr) g += to_float(static_cast<const T*>(a.dh_last)[nd]);
          const float du = g * activation_grad_from_output(a.activation, in.b);
          static_cast<T*>(a.du)[static_cast<size_t>(t) * step_elems + nd] = from_float<T>(du);
          dst[nd] = du;
        } else {
          static_cast<T*>(a.du)[static_cast<size_t>(pos) * step_elems + nd] = from_float<T>(0.0f);
          dst[nd] = 0.0f;
        }
      }
      __syncthreads();  // x_s and red_s are reused by the next chunk
    }
    if (s + 1 < steps && !grid_barrier(a, static_cast<unsigned int>(s + 1))) return;  // timed out
  }
}

// Kernel entry points, by storage type and row group (defined in prnn_forward.cu / prnn_backward.cu).
// Null for an unknown dtype or row group. Launched by prnn_api.cu (cooperative launch).
const void* forward_kernel(prnnDataType_t dtype, int row_group);
const void* backward_kernel(prnnDataType_t dtype, int row_group);

#ifndef PRNN_HOST_EMULATION
template <bool kBackward>
const void* select_kernel(prnnDataType_t dtype, int row_group) {
#define PRNN_SELECT_ROW_GROUP(T)                                              \
  switch (row_group) {                                                        \
    case 4: return reinterpret_cast<const void*>(&persistent_rnn_kernel<T, 4, kBackward>); \
    case 2: return reinterpret_cast<const void*>(&persistent_rnn_kernel<T, 2, kBackward>); \
    case 1: return reinterpret_cast<const void*>(&persistent_rnn_kernel<T, 1, kBackward>); \
    default: return nullptr;                                                  \
  }
  switch (dtype) {
    case PRNN_DATA_FLOAT: PRNN_SELECT_ROW_GROUP(float)
    case PRNN_DATA_HALF: PRNN_SELECT_ROW_GROUP(__half)
    case PRNN_DATA_BFLOAT16: PRNN_SELECT_ROW_GROUP(__nv_bfloat16)
    default: return nullptr;
  }
#undef PRNN_SELECT_ROW_GROUP
}
#endif  // PRNN_HOST_EMULATION

}  // namespace prnn
