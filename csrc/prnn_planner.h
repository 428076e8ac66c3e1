// prnn_planner.h - the tile planner of the persistent recurrent kernel: device limits -> tiling.
//
// Host-only C++ (compiles with g++ alone) except for the small inline mapping functions at the
// bottom, which the kernel calls too (so the planner test checks the very mapping the kernel uses).
//
// Tiling, per direction d and per pass (forward uses W, backward-data uses W^T):
//   * blocks_per_dir blocks own consecutive slices of rows_per_block output rows (the last block
//     may own fewer). A block keeps its rows x H weight tile in shared memory for the whole launch.
//   * Inside a block the rows form row_groups groups of row_group rows (padded with zero rows), and
//     the reduction axis k (length H) is cut into k_splits chunks of k_chunk (a multiple of 32).
//     Warp (g, s) owns rows of group g and k-chunk s; lane l owns k = s*k_chunk + l + 32*i.
//     So every weight element is multiplied by exactly one thread.
//   * Per timestep the block stages h_{t-1} (fp32) of batch_chunk sequences at a time in shared
//     memory, each warp produces partial sums for its rows x batch_group sequences, and the block
//     adds the k_splits partials and applies the epilogue (activation / its derivative).
//   * One block per SM, all blocks co-resident (one wave), a grid-wide barrier between timesteps.
#pragma once

#include <stddef.h>
#include <stdint.h>

#ifdef __CUDACC__
#define PRNN_HD __host__ __device__ __forceinline__
#else
#define PRNN_HD inline
#endif

namespace prnn {

constexpr int kWarpSize = 32;
constexpr int kBatchGroup = 4;              // sequences per warp inner-loop pass (compile-time)
constexpr int kKernelMaxThreads = 512;      // the kernels' __launch_bounds__(512, 1)
constexpr int kKernelMaxRegsPerThread = 128; // implied by __launch_bounds__(512, 1) on 64K-reg SMs
constexpr int kMinKPerLane = 8;             // keep k chunks >= 8*32 unless H is smaller
constexpr int kRegAllocUnit = 256;          // registers are allocated per warp in units of 256
constexpr int kSmemAlign = 16;              // bytes
constexpr int kRowGroupChoices[] = {4, 2, 1};  // kernel instantiations (row_group template values)
constexpr double kMaxRowPaddingFraction = 0.125;

// What the planner needs to know about a device (cudaGetDeviceProperties / cudaDeviceGetAttribute).
struct DeviceLimits {
  int sm_count;
  int regs_per_sm;
  int regs_per_block;
  int max_threads_per_sm;
  int max_threads_per_block;
  int max_blocks_per_sm;
  size_t smem_per_sm;             // bytes, whole SM
  size_t smem_per_block_optin;    // bytes, after cudaFuncSetAttribute(MaxDynamicSharedMemorySize)
  size_t smem_reserved_per_block; // bytes the runtime keeps per block (1 KiB on sm_80+)
};

struct ProblemShape {
  int time_steps;
  int batch;
  int directions;
  int hidden;
  int elem_bytes;  // storage bytes of one weight element (4 fp32, 2 fp16/bf16)
};

// A plan is plain data; it is passed by value to the kernels.
struct Plan {
  int time_steps, batch, directions, hidden, elem_bytes;
  int blocks_per_dir;   // blocks per direction
  int blocks;           // grid size = blocks_per_dir * directions
  int rows_per_block;   // R (the last block of a direction may own fewer)
  int row_group;        // RG, rows per warp pass (kernel template value)
  int row_groups;       // G = ceil(R / RG)
  int rows_padded;      // G * RG rows of weights stored per block
  int k_splits;         // KS
  int k_chunk;          // KC, a multiple of 32; KS * KC >= H > (KS - 1) * KC
  int warps;            // G * KS
  int threads;          // warps * 32
  int batch_chunk;      // NB, a multiple of kBatchGroup, sequences staged per pass
  int regs_per_thread;  // the kernel's register count the plan was made with
  int blocks_per_sm;    // co-resident blocks per SM the resources allow (>= 1)
  // Dynamic shared memory layout (bytes from the start).
  int smem_w_offset;    // weights, storage type, [rows_padded][H]
  int smem_x_offset;    // staged state, fp32, [batch_chunk][H]
  int smem_red_offset;  // partial sums, fp32, [k_splits][batch_chunk][rows_padded]
  int smem_bytes;
};

// Builds the plan. Returns false and writes a one-line reason when the problem cannot run
// persistently on this device (the caller then falls back). regs_per_thread: the kernel's register
// count (cudaFuncGetAttributes), or kKernelMaxRegsPerThread when unknown.
bool make_plan(const DeviceLimits& dev, const ProblemShape& shape, int regs_per_thread, Plan* plan,
               char* reason, size_t reason_len);

// Re-checks every budget of a plan against a device (used by make_plan, the runtime and tests).
bool check_plan(const DeviceLimits& dev, const Plan& plan, char* reason, size_t reason_len);

// Can the plan's whole grid be resident at once, given how many of its blocks fit on one SM
// (`resident_per_sm`: the runtime's cudaOccupancyMaxActiveBlocksPerMultiprocessor for the kernel as
// built, which knows its real registers) and the SMs the launch may use? The persistent kernel's
// grid barrier needs every block running, so the API refuses such a grid before launching it.
bool check_co_residency(const Plan& plan, int resident_per_sm, int sm_count, char* reason, size_t reason_len);

// Co-resident blocks per SM for a kernel of this shape (the occupancy rule, host-side).
int blocks_per_sm_for(const DeviceLimits& dev, int threads, int regs_per_thread, size_t smem_bytes);

// One line describing the plan, for logs.
void describe_plan(const Plan& plan, char* out, size_t out_len);

// ---- The mapping shared by planner test and kernels -------------------------------------------

PRNN_HD int plan_direction(const Plan& p, int block) { return block / p.blocks_per_dir; }
PRNN_HD int plan_row_begin(const Plan& p, int block) {
  return (block % p.blocks_per_dir) * p.rows_per_block;
}
PRNN_HD int plan_rows_in_block(const Plan& p, int block) {
  const int rest = p.hidden - plan_row_begin(p, block);
  return rest < p.rows_per_block ? rest : p.rows_per_block;
}
PRNN_HD int plan_warp_row_group(const Plan& p, int warp) { return warp / p.k_splits; }
PRNN_HD int plan_warp_k_split(const Plan& p, int warp) { return warp % p.k_splits; }
PRNN_HD int plan_k_begin(const Plan& p, int k_split) { return k_split * p.k_chunk; }
PRNN_HD int plan_k_end(const Plan& p, int k_split) {
  const int e = (k_split + 1) * p.k_chunk;
  return e < p.hidden ? e : p.hidden;
}

}  // namespace prnn
