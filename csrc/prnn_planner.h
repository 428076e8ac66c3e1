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
  // Thread-block clusters (sm_90+; 0 on older devices): the largest cluster a kernel may be launched
  // with (16 on H100/H200 with the non-portable size allowed), and how many clusters of the planned
  // shape run at once (cudaOccupancyMaxActiveClusters; 0 = not yet known: SMs / cluster size assumed).
  int max_cluster_blocks = 0;
  int max_active_clusters = 0;
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

// ---- Kernel v2: tensor cores and a data-flow exchange (prnn_v2.cuh) -------------------------------
//
// Tiling, per direction d and pass (forward W, backward-data W^T):
//   * blocks_per_dir blocks own consecutive slices of rows_per_block output rows (a multiple of 16,
//     the MMA M; the last block may own fewer valid rows, the rest are zero). One block per SM.
//   * A block's rows form m_tiles tiles of 16; the reduction axis (H padded to hidden_padded, a
//     multiple of 16) is cut into k_steps steps of k_tile (16 for bf16/fp16 m16n8k16, 8 for tf32
//     m16n8k8), and the steps into k_splits contiguous ranges of k_steps_per_warp.
//     Warp w owns m tile w / k_splits and k range w % k_splits, and keeps its A fragments for the whole
//     launch: reg_steps steps in registers (a template value), the rest (smem_steps) in shared memory.
//   * The batch is the MMA N dimension, in tiles of 8 sequences; n tiles are processed chunk_tiles
//     at a time (partials of the k_splits warps are summed through shared memory).
//   * No grid barrier: a block publishes its slice of the new state into a two-slot ring in the
//     workspace as 8-byte words, 32 bits of payload (two bf16/fp16 or one fp32) and a 32-bit tag
//     (24 bits of step, 8 bits of payload check), written with one store; readers wait until each
//     word they need carries their step. All threads of a block copy a chunk's words into shared
//     memory at once with cp.async (one L2 round trip per chunk and step, no registers held), check
//     their tags there, re-poll only the words that were not ready, and the warps read their B
//     fragments from the staged words.
//
// Two exchange modes (PlanV2::mode):
//   * ring (mode G, any device with mma.sync): the ring above, in global memory; one block per SM,
//     every block of a direction reads every other's rows, so all blocks must be resident.
//   * cluster (mode C, sm_90 thread-block clusters): a direction's blocks_per_dir blocks (2 to
//     max_cluster_blocks) form one cluster and each keeps its own two-slot ring in shared memory of
//     bare 4-byte payloads (no tags): a block pushes each payload of its rows into every peer's ring
//     with st.async, whose completion counts its bytes on the receiving block's mbarrier of that
//     slot, plus a 4-byte heartbeat from every block each step; the receiver arms the barrier with the
//     bytes the step brings and waits for the phase (one wait per step instead of a poll per word). No
//     global memory in the loop. The batch is cut into `groups` of group_tiles tiles of 8 sequences; each (group,
//     direction) pair is its own cluster with its own copy of the weights, so clusters never talk
//     to each other and need not all be resident (in `auto` the planner asks for one wave).
//     Block b: rank b % blocks_per_dir (its rows), direction (b / blocks_per_dir) % D, group
//     b / (blocks_per_dir * D). In ring mode groups = 1 and the same formulas hold.
enum V2Precision : int { kV2Mma16 = 0, kV2Tf32 = 1, kV2Tf32x3 = 3 };
enum V2Mode : int { kV2ModeAuto = -1, kV2ModeRing = 0, kV2ModeCluster = 1 };
// Kernel instantiations (reg_steps template values). 16 register steps (64 A registers) spill under
// the 128-register cap of __launch_bounds__(512, 1) (ptxas, sm_80 and sm_90), so steps past 8 live in
// shared memory.
constexpr int kV2RegStepChoices[] = {4, 8};
constexpr int kV2MaxRegSteps = 8;
constexpr int kV2MaxWarps = 16;                  // __launch_bounds__(512, 1)
constexpr int kV2RowTile = 16;
constexpr int kV2BatchTile = 8;
constexpr int kV2RingSlots = 2;
constexpr int kV2MaxSteps = (1 << 24) - 1;  // the exchange tag keeps the step in 24 bits

struct PlanV2 {
  int time_steps, batch, directions, hidden, elem_bytes;
  int precision;        // V2Precision
  int k_tile;           // 16 (m16n8k16) or 8 (m16n8k8 tf32)
  int elems_per_word;   // payload elements per exchange word: 2 (16-bit) or 1 (fp32)
  int hidden_padded;    // H rounded up to 16
  int k_steps;          // hidden_padded / k_tile
  int blocks_per_dir, blocks;
  int rows_per_block;   // multiple of 16
  int m_tiles;          // rows_per_block / 16
  int k_splits;         // warps per m tile
  int k_steps_per_warp; // every split but possibly the last has this many steps
  int reg_steps;        // register-resident steps per warp (template value)
  int smem_steps;       // steps per warp kept in shared memory (k_steps_per_warp - reg_steps, >= 0)
  int warps, threads;
  int batch_padded;     // N rounded up to 8
  int n_tiles;          // batch_padded / 8
  int chunk_tiles;      // n tiles per pass through the partials buffer
  int regs_per_thread;  // the register count the plan assumes (kKernelMaxRegsPerThread)
  int blocks_per_sm;
  int smem_a_offset;    // uint32 [warps][smem_steps][32][4]
  int smem_red_offset;  // float [k_splits][chunk_tiles * 8][rows_per_block]
  int smem_b_offset;    // words of b_word_bytes [rows][b_row_words]: ring mode the staged exchange words
                        // (chunk_tiles * 8 rows), cluster mode the block's ring (v2_cluster_ring_rows)
  int b_word_bytes;     // 8 (ring mode: tagged exchange words) or 4 (cluster mode: bare payloads)
  int b_row_words;      // hidden_padded / elems_per_word + 2 (8-byte words) or + 4 (4-byte words): the
                        // pad puts the 8 sequences of a B fragment in different banks
  int smem_len_offset;  // int [batch_padded] sequence lengths, then int [n_tiles] per-step tile flags
  int smem_bar_offset;  // cluster mode: kV2ClusterBarBytes (the slots' mbarriers, then heartbeats); else 0
  int smem_bytes;
  long long ring_words; // ring mode: kV2RingSlots * D * batch_padded * (hidden_padded / elems_per_word); cluster: 0
  int mode;             // V2Mode (kV2ModeRing or kV2ModeCluster)
  int groups;           // sequence groups (clusters per direction); 1 in ring mode
  int group_tiles;      // n tiles per group (the last group may have fewer); n_tiles in ring mode
  int waves;            // cluster mode: ceil(groups * D / resident clusters); 1 in ring mode
  // Cluster mode: the region at smem_b_offset is the block's ring, kV2RingSlots slots of
  // group_tiles * 8 rows of b_row_words 4-byte payloads; the B fragments are read from it in place.
};
// mbarrier transaction counts are limited to 2^20 - 1 bytes per phase (PTX ISA, mbarrier contents).
constexpr long long kV2MaxTxBytes = (1 << 20) - 1;
// Cluster mode: the region at smem_bar_offset holds the slots' mbarriers, then per slot one 4-byte
// heartbeat word per block of the cluster (at most 16), pushed every step so that every step's phase
// waits for every peer.
constexpr int kV2MaxClusterBlocks = 16;
constexpr int kV2ClusterBarBytes = kV2RingSlots * 8 + kV2RingSlots * kV2MaxClusterBlocks * 4;

// precision: kV2Mma16 for 16-bit storage (elem_bytes 2), kV2Tf32 or kV2Tf32x3 for fp32.
// make_plan_v2 is mode kV2ModeAuto: cluster mode where the device has clusters, the layer fits one
// cluster and the batch needs one wave of clusters; else ring mode. A forced mode that cannot plan
// is refused with its reason (cluster mode forced may take several waves).
bool make_plan_v2(const DeviceLimits& dev, const ProblemShape& shape, int precision, int regs_per_thread,
                  PlanV2* plan, char* reason, size_t reason_len);
bool make_plan_v2_mode(const DeviceLimits& dev, const ProblemShape& shape, int precision, int regs_per_thread,
                       int mode, PlanV2* plan, char* reason, size_t reason_len);
bool check_plan_v2(const DeviceLimits& dev, const PlanV2& plan, char* reason, size_t reason_len);
void describe_plan_v2(const PlanV2& plan, char* out, size_t out_len);
// Bytes of the exchange ring (the workspace holds it after its header).
inline long long v2_ring_bytes(const PlanV2& p) { return p.ring_words * 8; }
// The ring size for a problem without a device (the workspace size query has none): the largest
// any plan of the shape can need (the ring does not depend on the tiling).
long long v2_ring_bytes_for(int batch, int directions, int hidden, int elem_bytes);

PRNN_HD int v2_direction(const PlanV2& p, int block) { return (block / p.blocks_per_dir) % p.directions; }
PRNN_HD int v2_group(const PlanV2& p, int block) { return block / (p.blocks_per_dir * p.directions); }
PRNN_HD int v2_tile_begin(const PlanV2& p, int group) { return group * p.group_tiles; }
PRNN_HD int v2_tile_end(const PlanV2& p, int group) {
  const int e = (group + 1) * p.group_tiles;
  return e < p.n_tiles ? e : p.n_tiles;
}
PRNN_HD int v2_row_begin(const PlanV2& p, int block) { return (block % p.blocks_per_dir) * p.rows_per_block; }
PRNN_HD int v2_rows_in_block(const PlanV2& p, int block) {
  const int rest = p.hidden - v2_row_begin(p, block);
  return rest < p.rows_per_block ? rest : p.rows_per_block;
}
PRNN_HD int v2_warp_m_tile(const PlanV2& p, int warp) { return warp / p.k_splits; }
PRNN_HD int v2_warp_k_split(const PlanV2& p, int warp) { return warp % p.k_splits; }
PRNN_HD int v2_k_step_begin(const PlanV2& p, int k_split) { return k_split * p.k_steps_per_warp; }
PRNN_HD int v2_k_steps_in_split(const PlanV2& p, int k_split) {
  const int rest = p.k_steps - v2_k_step_begin(p, k_split);
  return rest < p.k_steps_per_warp ? (rest > 0 ? rest : 0) : p.k_steps_per_warp;
}
// The block that produces state row `row` of direction d for sequence group g (the owner of that row).
PRNN_HD int v2_producer_block(const PlanV2& p, int g, int d, int row) {
  return (g * p.directions + d) * p.blocks_per_dir + row / p.rows_per_block;
}
// Cluster mode: rows of exchange words in a block's ring (both slots of group_tiles * 8 sequences).
PRNN_HD int v2_cluster_ring_rows(const PlanV2& p) { return kV2RingSlots * p.group_tiles * 8; }
// Cluster mode: payload index (4-byte units), from the start of a block's ring (smem_b_offset), of
// slot `slot`, row `local_seq` (the sequence's index within its group) and word `kword` along k.
PRNN_HD int v2_cluster_word(const PlanV2& p, int slot, int local_seq, int kword) {
  return (slot * p.group_tiles * 8 + local_seq) * p.b_row_words + kword;
}
// Word index in the ring: slot, direction, sequence, word along k (k / elems_per_word).
PRNN_HD long long v2_ring_index(const PlanV2& p, int slot, int d, int n, int kword) {
  const long long words_per_row = p.hidden_padded / p.elems_per_word;
  return ((static_cast<long long>(slot) * p.directions + d) * p.batch_padded + n) * words_per_row + kword;
}

}  // namespace prnn
