// microbench.cu - what a step of the persistent kernel can cost at best on this GPU: latency
// microbenchmarks of the memory paths kernel v2's exchange uses (or could use), one JSON file.
//
//   l2_round_trip            one thread's chain of dependent ld.global.cg loads (pointer chasing over
//                            a random single cycle of 128-byte lines in an 8 MiB buffer: past any L1,
//                            inside the 40/50 MiB L2 of an A100/H100): ns per load
//   handoff_two_blocks       block 0 and block P (one block per SM, cooperative launch, %smid recorded)
//                            ping-pong one 8-byte exchange word each way, in kernel v2's word format
//                            (prnn_v2.cuh: payload, check byte, 24-bit step) with its own relaxed
//                            gpu-scope 64-bit loads and stores: ns per one-way hand-off
//   handoff_all_to_all       G blocks (one per SM, co-resident) each publish a tagged word per step and
//                            wait for the words of all G (a two-slot ring, as v2's): us per step
//   dsmem_handoff_two_blocks sm_90: the same ping-pong between the two blocks of a thread-block cluster,
//                            through distributed shared memory (map_shared_rank, st/ld.relaxed.cluster)
//   dsmem_all_to_all         sm_90: all-to-all inside one cluster of C blocks (8, 16; 16 is non-portable),
//                            each block writing its word into every peer's shared memory: us per step
//   cluster_barrier_exchange sm_90: the same exchange ordered by the hardware cluster barrier instead of
//                            polled tags (barrier.cluster arrive/wait each step): us per step
//   dsmem_tx_exchange        sm_90: kernel v2's cluster-mode exchange with its own primitives (prnn_v2.cuh):
//                            each block pushes W 4-byte payloads into every block of the cluster with
//                            st.async, counted on the receiver's mbarrier of the slot, armed with
//                            arrive.expect_tx, awaited with try_wait.parity; every payload checked. W = 1
//                            (the hand-off floor) and 320 (what one of H=1152 bf16's 15 blocks publishes
//                            for 8 sequences), the latter also 4 payloads per st.async.v4 (whether the
//                            kernel's pushes should be vectors): us per step
//   max_active_clusters      sm_90: cudaOccupancyMaxActiveClusters for clusters of 2, 4, 8, 16 blocks of
//                            kernel v2's block shape (threads and shared memory of its plan for issue
//                            11's bf16 H=1152 targets, N=4 and 64) and of a plain one-block-per-SM shape
//
// Every spin loop is bounded by a watchdog on %globaltimer (checked every 256 polls, as in the v2
// kernel): a block past --timeout-ms records who it waited for, at which step, and every block
// leaves; the figure then says "timeout" with that record instead of the program hanging. (The
// hardware cluster barrier is not a spin loop: a cluster's blocks are co-scheduled, so no block of it
// can be missing.) A feature this device or this build lacks is reported "not_applicable" with the
// reason (clusters on sm_80; a build without sm_90 code), a grid that cannot be co-resident is
// "refused" with the occupancy numbers; nothing is skipped silently.
//
// Build and run (scripts/gpu_check.sh does this first, before the v2 correctness matrix):
//   nvcc -std=c++17 -O3 -I csrc -gencode=arch=compute_80,code=sm_80 -gencode=arch=compute_90a,code=sm_90a
//        -gencode=arch=compute_80,code=compute_80 csrc/microbench/microbench.cu csrc/prnn_planner.cpp
//        -o /tmp/microbench                       (one command line; the PTX serves newer GPUs, without clusters)
//   /tmp/microbench OUTDIR/microbench.json [--repeats N] [--timeout-ms MS] [--quick]
// Exit status: 0 every figure ok / not applicable / refused; 1 a timeout or an error; 2 bad usage;
// 77 no GPU. Status: compiled in CI (sm_80, sm_90a; ptxas: no local memory); NOT yet run on a GPU.
#include <cooperative_groups.h>
#include <cuda_runtime.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <string>
#include <vector>

#include "microbench_host.h"
#include "prnn_planner.h"
#include "prnn_v2.cuh"  // the exchange word and its accesses, %globaltimer, dynamic shared memory

namespace {

using prnn::global_timer_ns;
using prnn::ring_load;
using prnn::ring_store;
using prnn::v2_word;
using prnn::v2_word_intact;
using prnn::v2_word_step;

constexpr int kDefaultRepeats = 11;
constexpr int kDefaultTimeoutMs = 1000;
constexpr size_t kChaseBytes = size_t{8} << 20;  // past every L1 (<= 256 KiB), well inside A100/H100 L2
constexpr size_t kChaseStrideBytes = 128;         // one node per cache line
constexpr int kChaseHops = 20000;
constexpr int kPingRoundTrips = 2000;
constexpr int kAllToAllSteps = 2000;
constexpr int kClusterRoundTrips = 5000;
constexpr int kClusterSteps = 5000;
constexpr int kQuickDivisor = 4;                  // --quick: a quarter of the iterations, 3 repeats
constexpr int kQuickRepeats = 3;
constexpr int kWordStride = 4;                    // 8-byte words per block's slot: one 32-byte sector each
constexpr int kPingLineWords = 16;                // the two ping-pong words sit 128 bytes apart
constexpr int kMaxCluster = 16;
constexpr int kClusterThreads = 32;               // >= kMaxCluster: one thread per peer
constexpr int kClusterSizes[] = {2, 4, 8, 16};
static_assert(kClusterThreads >= 2 * kMaxCluster, "one thread per inbox word zeroes the inbox");
constexpr int kClusterAllToAllSizes[] = {8, 16};
constexpr int kClusterBarrierSizes[] = {2, 8, 16};
constexpr int kTxClusterSizes[] = {8, 15};        // 15: kernel v2's cluster at H=1152 bf16
constexpr int kTxWords[] = {1, 320};              // payloads per block and step (320 = 40 words x 8 sequences)
constexpr int kTxMaxWords = 320;
constexpr int kTxThreads = 512;                   // kernel v2's block size class
constexpr int kTxSmemBytes = 2 * kMaxCluster * kTxMaxWords * 4 + 2 * 8;  // ring slots, then 2 mbarriers
constexpr int kMaxGrid = 1024;
constexpr unsigned int kPollsPerClockCheck = 256;
constexpr int kV2TargetHidden = 1152;             // issue 11's bf16 targets
constexpr int kV2TargetBatches[] = {4, 64};
constexpr int kV2TargetSteps = 200;

// The watchdog's record (device memory, zeroed before every launch; the first failure wins).
struct Watch {
  unsigned int code;   // WatchCode
  unsigned int block;  // the block that gave up
  unsigned int step;   // at which step / round trip
  unsigned int peer;   // whose word it waited for
  unsigned int ran_cluster_code;  // set by the cluster kernel when it was compiled for sm_90+
};
enum WatchCode : unsigned int { kWatchOk = 0, kWatchTimeout = 1, kWatchBadPayload = 2, kWatchBadTag = 3 };

__device__ __forceinline__ unsigned int sm_id() {
  unsigned int v;
  asm volatile("mov.u32 %0, %%smid;" : "=r"(v));
  return v;
}

// Through L2 only: an L1 line can never answer.
__device__ __forceinline__ uint32_t load_cg(const uint32_t* p) {
  uint32_t v;
  asm volatile("ld.global.cg.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
  return v;
}

// A payload the reader can recompute: a wrong or stale one is counted as a protocol error.
__device__ __forceinline__ uint32_t payload_for(unsigned int block, unsigned int step) {
  return (block * 0x9E3779B1u) ^ (step * 0x85EBCA77u);
}

__device__ void watch_fail(Watch* w, unsigned int code, unsigned int step, unsigned int peer) {
  if (atomicCAS(&w->code, 0u, code) == 0u) {
    w->block = blockIdx.x;
    w->step = step;
    w->peer = peer;
    __threadfence();
  }
}

// The bound of one spin loop, checked every kPollsPerClockCheck polls: true once another block has
// given up or this wait passed bound_ns (recorded).
struct Watchdog {
  unsigned int polls = 0;
  unsigned long long first_check_ns = 0;
  __device__ __forceinline__ bool expired(Watch* watch, unsigned long long bound_ns, unsigned int step,
                                          unsigned int peer) {
    if (++polls % kPollsPerClockCheck != 0) return false;
    if (prnn::load_acquire_gpu(&watch->code) != kWatchOk) return true;
    const unsigned long long now = global_timer_ns();
    if (first_check_ns == 0) {
      first_check_ns = now;
    } else if (now - first_check_ns > bound_ns) {
      watch_fail(watch, kWatchTimeout, step, peer);
      return true;
    }
    return false;
  }
};

// Polls load() until it returns a word carrying `step` with an intact check byte. False when this
// wait passed bound_ns (recorded) or another block has already given up.
template <typename Load>
__device__ __forceinline__ bool await_step(Load load, unsigned int step, unsigned int peer, Watch* watch,
                                           unsigned long long bound_ns, unsigned long long* word) {
  Watchdog watchdog;
  for (;;) {
    const unsigned long long w = load();
    if (v2_word_step(w) == step && v2_word_intact(w)) {
      *word = w;
      return true;
    }
    if (watchdog.expired(watch, bound_ns, step, peer)) return false;
  }
}

// ---- 1. L2 round trip ----------------------------------------------------------------------------
__global__ void __launch_bounds__(32) l2_chase_kernel(const uint32_t* __restrict__ next, int hops,
                                                      unsigned long long* out) {
  if (threadIdx.x != 0) return;
  uint32_t i = 0;
  const unsigned long long t0 = global_timer_ns();
  const long long c0 = clock64();
  for (int h = 0; h < hops; ++h) i = load_cg(next + i);
  const long long c1 = clock64();
  const unsigned long long t1 = global_timer_ns();
  out[0] = t1 - t0;
  out[1] = static_cast<unsigned long long>(c1 - c0);
  out[2] = i;  // keeps the chain live
}

// ---- 2. hand-off between two blocks ---------------------------------------------------------------
struct HandoffArgs {
  unsigned long long* words;  // ping-pong: [0] to the partner, [kPingLineWords] back; all-to-all: the ring
  Watch* watch;
  unsigned int* smids;        // [gridDim.x]
  unsigned long long* elapsed_ns;
  int partner;                // ping-pong: block 0's partner
  int iterations;             // round trips or steps
  unsigned long long bound_ns;
};

// One thread of block 0 and one of block `partner` (every block records its SM, then the others
// leave). The clock starts at the second round trip, so launch skew is not counted.
__global__ void __launch_bounds__(32) pingpong_kernel(HandoffArgs a) {
  if (threadIdx.x != 0) return;
  a.smids[blockIdx.x] = sm_id();
  const bool first = blockIdx.x == 0;
  if (!first && static_cast<int>(blockIdx.x) != a.partner) return;
  unsigned long long* to_partner = a.words;
  unsigned long long* to_first = a.words + kPingLineWords;
  unsigned long long t0 = global_timer_ns();
  for (unsigned int i = 1; i <= static_cast<unsigned int>(a.iterations); ++i) {
    unsigned long long w = 0;
    if (first) {
      if (i == 2) t0 = global_timer_ns();
      ring_store(to_partner, v2_word(i, payload_for(0, i)));
      if (!await_step([&] { return ring_load(to_first); }, i, a.partner, a.watch, a.bound_ns, &w)) return;
      if (static_cast<uint32_t>(w) != payload_for(0, i) + 1u) {
        watch_fail(a.watch, kWatchBadPayload, i, a.partner);
        return;
      }
    } else {
      if (!await_step([&] { return ring_load(to_partner); }, i, 0, a.watch, a.bound_ns, &w)) return;
      ring_store(to_first, v2_word(i, static_cast<uint32_t>(w) + 1u));
    }
  }
  if (first) *a.elapsed_ns = global_timer_ns() - t0;
}

// ---- 3. hand-off across all blocks ---------------------------------------------------------------
// Step s: thread 0 publishes the block's word into slot s & 1; thread p waits for block p's word.
// Two slots suffice for the reason they do in kernel v2: a block writes step s only after reading
// step s-1 of every block, each of which wrote s-1 only after finishing its reads of step s-2.
__global__ void __launch_bounds__(kMaxGrid) all_to_all_kernel(HandoffArgs a) {
  const unsigned int b = blockIdx.x, grid = gridDim.x, p = threadIdx.x;
  if (p == 0) a.smids[b] = sm_id();
  unsigned long long t0 = 0;
  for (unsigned int s = 1; s <= static_cast<unsigned int>(a.iterations); ++s) {
    unsigned long long* slot = a.words + static_cast<size_t>(s & 1u) * grid * kWordStride;
    if (p == 0) {
      if (s == 2 && b == 0) t0 = global_timer_ns();
      ring_store(slot + static_cast<size_t>(b) * kWordStride, v2_word(s, payload_for(b, s)));
    }
    bool ok = true;
    if (p < grid) {
      unsigned long long w = 0;
      const unsigned long long* src = slot + static_cast<size_t>(p) * kWordStride;
      ok = await_step([&] { return ring_load(src); }, s, p, a.watch, a.bound_ns, &w);
      if (ok && static_cast<uint32_t>(w) != payload_for(p, s)) {
        watch_fail(a.watch, kWatchBadPayload, s, p);
        ok = false;
      }
    }
    if (__syncthreads_or(!ok)) return;
  }
  if (b == 0 && p == 0) *a.elapsed_ns = global_timer_ns() - t0;
}

// ---- 4. thread-block clusters: DSMEM hand-offs (sm_90) ---------------------------------------------
enum ClusterMode : int { kClusterPingPong = 0, kClusterAllToAll = 1, kClusterBarrier = 2, kClusterTx = 3 };

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
__device__ __forceinline__ unsigned long long load_relaxed_cluster(const unsigned long long* p) {
  unsigned long long v;
  asm volatile("ld.relaxed.cluster.b64 %0, [%1];" : "=l"(v) : "l"(p) : "memory");
  return v;
}
__device__ __forceinline__ void store_relaxed_cluster(unsigned long long* p, unsigned long long v) {
  asm volatile("st.relaxed.cluster.b64 [%0], %1;" ::"l"(p), "l"(v) : "memory");
}

// Ranks 0 and 1, one thread each: every word lands in the receiver's own shared memory.
__device__ void cluster_pingpong(const HandoffArgs& a, unsigned long long* inbox, unsigned int rank) {
  namespace cg = cooperative_groups;
  unsigned long long* peer = cg::this_cluster().map_shared_rank(inbox, static_cast<int>(rank ^ 1u));
  unsigned long long t0 = global_timer_ns();
  for (unsigned int i = 1; i <= static_cast<unsigned int>(a.iterations); ++i) {
    unsigned long long w = 0;
    if (rank == 0) {
      if (i == 2) t0 = global_timer_ns();
      store_relaxed_cluster(peer, v2_word(i, payload_for(0, i)));
      if (!await_step([&] { return load_relaxed_cluster(inbox); }, i, 1, a.watch, a.bound_ns, &w)) return;
      if (static_cast<uint32_t>(w) != payload_for(0, i) + 1u) {
        watch_fail(a.watch, kWatchBadPayload, i, 1);
        return;
      }
    } else {
      if (!await_step([&] { return load_relaxed_cluster(inbox); }, i, 0, a.watch, a.bound_ns, &w)) return;
      store_relaxed_cluster(peer, v2_word(i, static_cast<uint32_t>(w) + 1u));
    }
  }
  if (rank == 0 && blockIdx.x == 0) *a.elapsed_ns = global_timer_ns() - t0;
}

// Thread t < C writes this block's word of step s into slot s & 1 of block t's inbox, then waits for
// block t's word in its own inbox (kBarrier: the cluster barrier orders it instead, no polling).
__device__ void cluster_exchange(const HandoffArgs& a, unsigned long long* inbox, unsigned int rank,
                                 unsigned int size, bool barrier) {
  namespace cg = cooperative_groups;
  cg::cluster_group cluster = cg::this_cluster();
  const unsigned int t = threadIdx.x;
  unsigned long long* peer = cluster.map_shared_rank(inbox, static_cast<int>(t < size ? t : 0u));
  unsigned long long t0 = global_timer_ns();
  for (unsigned int s = 1; s <= static_cast<unsigned int>(a.iterations); ++s) {
    const unsigned int slot = (s & 1u) * kMaxCluster;
    if (s == 2) t0 = global_timer_ns();
    if (t < size) store_relaxed_cluster(peer + slot + rank, v2_word(s, payload_for(rank, s)));
    bool ok = true;
    unsigned long long w = 0;
    if (barrier) {
      cluster.sync();  // barrier.cluster arrive (release) + wait (acquire): every peer's store is visible
      if (t < size) {
        w = load_relaxed_cluster(inbox + slot + t);
        if (!(v2_word_step(w) == s && v2_word_intact(w))) {
          watch_fail(a.watch, kWatchBadTag, s, t);
          ok = false;
        }
      }
    } else if (t < size) {
      ok = await_step([&] { return load_relaxed_cluster(inbox + slot + t); }, s, t, a.watch, a.bound_ns, &w);
    }
    if (ok && t < size && static_cast<uint32_t>(w) != payload_for(t, s)) {
      watch_fail(a.watch, kWatchBadPayload, s, t);
      ok = false;
    }
    // Polling: a block that failed stops (its peers time out or see the record). Barrier: every block
    // keeps calling the barrier for all steps, so that the blocks' barrier phases stay matched.
    if (__syncthreads_or(!ok) && !barrier) break;
  }
  if (rank == 0 && t == 0 && blockIdx.x == 0) *a.elapsed_ns = global_timer_ns() - t0;
}
#endif  // __CUDA_ARCH__ >= 900

// One kernel for the three cluster figures (mode in `partner`); its shared memory starts with the
// inbox words [2 slots][kMaxCluster]. Compiled without sm_90 code it does nothing, and the host sees
// that ran_cluster_code stayed 0.
__global__ void __launch_bounds__(kClusterThreads) cluster_kernel(HandoffArgs a) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  namespace cg = cooperative_groups;
  cg::cluster_group cluster = cg::this_cluster();
  unsigned long long* inbox = reinterpret_cast<unsigned long long*>(prnn::dynamic_smem());
  const unsigned int rank = cluster.block_rank(), size = cluster.num_blocks();
  if (threadIdx.x < 2 * kMaxCluster) inbox[threadIdx.x] = 0;
  if (threadIdx.x == 0) {
    a.smids[blockIdx.x] = sm_id();
    if (blockIdx.x == 0) a.watch->ran_cluster_code = 1;
  }
  cluster.sync();  // every inbox is zeroed before any peer writes into it
  if (blockIdx.x < size) {  // the first cluster measures; any others only wait
    if (a.partner == kClusterPingPong) {
      if (threadIdx.x == 0 && rank < 2) cluster_pingpong(a, inbox, rank);
    } else {
      cluster_exchange(a, inbox, rank, size, a.partner == kClusterBarrier);
    }
  }
  __syncwarp();
  cluster.sync();  // no block leaves while a peer may still write into its shared memory
#endif
}

// Kernel v2's cluster-mode exchange alone (a.partner = W payloads per block and step, negative: -W
// pushed 4 at a time with st.async.v4; W a multiple of 4 then): shared memory
// holds the ring [2 slots][cluster size][W] of 4-byte payloads, then the slots' two mbarriers. Step s
// pushes into slot s & 1 (its (s/2)-th phase) and waits for that phase; the same order as the kernel:
// a slot is read, then __syncthreads and a cluster fence, before the block's next pushes. Compiled
// without sm_90 code it does nothing (ran_cluster_code stays 0).
__global__ void __launch_bounds__(kTxThreads) cluster_tx_kernel(HandoffArgs a) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  namespace cg = cooperative_groups;
  cg::cluster_group cluster = cg::this_cluster();
  const unsigned int rank = cluster.block_rank(), size = cluster.num_blocks();
  const bool vec4 = a.partner < 0;
  const int words = vec4 ? -a.partner : a.partner, slot_words = static_cast<int>(size) * words;
  uint32_t* ring = reinterpret_cast<uint32_t*>(prnn::dynamic_smem());
  unsigned long long* bars = reinterpret_cast<unsigned long long*>(ring + 2 * kMaxCluster * kTxMaxWords);
  for (int i = threadIdx.x; i < 2 * slot_words; i += blockDim.x) ring[i] = 0u;
  if (threadIdx.x == 0) {
    a.smids[blockIdx.x] = sm_id();
    if (blockIdx.x == 0) a.watch->ran_cluster_code = 1;
    prnn::mbar_init(bars, 1);
    prnn::mbar_init(bars + 1, 1);
    prnn::mbar_init_fence();
  }
  cluster.sync();  // rings zeroed and barriers initialised everywhere before any push
  unsigned long long t0 = global_timer_ns();
  for (unsigned int s = 0; s < static_cast<unsigned int>(a.iterations); ++s) {
    if (s == 1) t0 = global_timer_ns();
    const unsigned int slot = s & 1u;
    uint32_t* in = ring + slot * slot_words;
    const int per_push = vec4 ? 4 : 1;
    for (int i = threadIdx.x * per_push; i < slot_words; i += blockDim.x * per_push) {  // (peer, word i % W)
      const int w = i % words;
      const unsigned int peer = static_cast<unsigned int>(i / words), first = rank * words + w;
      if (vec4) {
        const uint32_t v[4] = {payload_for(first, s), payload_for(first + 1, s), payload_for(first + 2, s),
                               payload_for(first + 3, s)};
        prnn::cluster_push4(in + first, bars + slot, peer, v);
      } else {
        prnn::cluster_push(in + first, bars + slot, peer, payload_for(first, s), s >> 1);
      }
    }
    if (threadIdx.x == 0) prnn::mbar_arrive_expect_tx(bars + slot, static_cast<unsigned int>(slot_words) * 4u);
    bool ok = true;
    Watchdog watchdog;
    while (ok && !prnn::mbar_try_wait(bars + slot, (s >> 1) & 1u))
      ok = !watchdog.expired(a.watch, a.bound_ns, s, 0xFFFFFFFFu);  // the barrier counts bytes, not senders
    for (int i = threadIdx.x; ok && i < slot_words; i += blockDim.x)
      if (in[i] != payload_for(static_cast<unsigned int>(i), s)) {
        watch_fail(a.watch, kWatchBadPayload, s, static_cast<unsigned int>(i / words));
        ok = false;
      }
    if (__syncthreads_or(!ok)) break;
    prnn::fence_cluster();  // this block's reads of the slot before its next pushes, as peers see them
  }
  if (rank == 0 && threadIdx.x == 0 && blockIdx.x == 0) *a.elapsed_ns = global_timer_ns() - t0;
  cluster.sync();  // no block leaves while a peer may still push into its shared memory
#endif
}

// The shape whose cluster occupancy is asked (cudaOccupancyMaxActiveClusters); never launched.
__global__ void __launch_bounds__(prnn::kKernelMaxThreads) cluster_occupancy_probe() {}

// ---- host --------------------------------------------------------------------------------------------
struct Options {
  const char* out = nullptr;
  int repeats = kDefaultRepeats;
  int timeout_ms = kDefaultTimeoutMs;
  bool quick = false;
};

struct Device {
  int index = 0;
  std::string name;
  int cc_major = 0, cc_minor = 0;
  int sm_count = 0;
  int clock_khz = 0, memory_clock_khz = 0;
  int l2_bytes = 0;
  int smem_per_sm = 0, smem_optin = 0, smem_reserved = 0;
  int regs_per_sm = 0, regs_per_block = 0, max_threads_sm = 0, max_threads_block = 0, max_blocks_sm = 0;
  bool cooperative = false, cluster_launch = false;
};

struct Scratch {
  Watch* watch = nullptr;
  unsigned int* smids = nullptr;
  unsigned long long* elapsed = nullptr;
  unsigned long long* words = nullptr;
  size_t word_count = 0;
};

std::string cuda_error(const char* what, cudaError_t err) {
  return std::string(what) + ": " + cudaGetErrorName(err) + " (" + cudaGetErrorString(err) + ")";
}

#define TRY(fig, call)                                  \
  do {                                                  \
    const cudaError_t err_ = (call);                    \
    if (err_ != cudaSuccess) {                          \
      (fig).status = "error";                           \
      (fig).reason = cuda_error(#call, err_);           \
      return fig;                                       \
    }                                                   \
  } while (0)

int iterations(const Options& o, int n) { return o.quick ? (n / kQuickDivisor > 2 ? n / kQuickDivisor : 2) : n; }

std::string watch_reason(const Watch& w, int timeout_ms, const char* what) {
  char text[256];
  if (w.code == kWatchTimeout)
    snprintf(text, sizeof text, "%s: block %u waited more than %d ms at step %u for the word of block %u", what,
             w.block, timeout_ms, w.step, w.peer);
  else if (w.code == kWatchBadPayload)
    snprintf(text, sizeof text, "%s: block %u read a wrong payload at step %u from block %u", what, w.block, w.step,
             w.peer);
  else
    snprintf(text, sizeof text, "%s: block %u found no word of step %u from block %u after the cluster barrier",
             what, w.block, w.step, w.peer);
  return text;
}

// After a launch: a watchdog record turns the figure into "timeout" or "error". True when clean.
bool check_watch(mb::Figure& fig, const Scratch& s, int timeout_ms, Watch* out = nullptr) {
  Watch w = {};
  const cudaError_t err = cudaMemcpy(&w, s.watch, sizeof w, cudaMemcpyDeviceToHost);
  if (err != cudaSuccess) {
    fig.status = "error";
    fig.reason = cuda_error("cudaMemcpy(watch)", err);
    return false;
  }
  if (out) *out = w;
  if (w.code == kWatchOk) return true;
  fig.status = w.code == kWatchTimeout ? "timeout" : "error";
  fig.reason = watch_reason(w, timeout_ms, fig.name.c_str());
  return false;
}

mb::Figure l2_round_trip(const Device& dev, const Options& o, double* clock_mhz) {
  mb::Figure fig;
  fig.name = "l2_round_trip";
  fig.unit = "ns per load";
  const uint32_t nodes = static_cast<uint32_t>(kChaseBytes / kChaseStrideBytes);
  const uint32_t per_node = static_cast<uint32_t>(kChaseStrideBytes / sizeof(uint32_t));
  const std::vector<uint32_t> cycle = mb::single_cycle(nodes, 0x5eed);
  std::vector<uint32_t> next(kChaseBytes / sizeof(uint32_t), 0);
  for (uint32_t n = 0; n < nodes; ++n) next[static_cast<size_t>(n) * per_node] = cycle[n] * per_node;
  const int hops = iterations(o, kChaseHops);
  fig.params.num("buffer_bytes", static_cast<long long>(kChaseBytes))
      .num("stride_bytes", static_cast<long long>(kChaseStrideBytes))
      .num("hops", hops)
      .num("l2_bytes", dev.l2_bytes)
      .str("load", "ld.global.cg.u32, one thread, each address from the previous load");
  uint32_t* d_next = nullptr;
  unsigned long long* d_out = nullptr;
  TRY(fig, cudaMalloc(&d_next, kChaseBytes));
  TRY(fig, cudaMalloc(&d_out, 3 * sizeof(unsigned long long)));
  TRY(fig, cudaMemcpy(d_next, next.data(), kChaseBytes, cudaMemcpyHostToDevice));
  // Warm-up: one full lap brings every line into L2.
  l2_chase_kernel<<<1, 32>>>(d_next, static_cast<int>(nodes), d_out);
  TRY(fig, cudaDeviceSynchronize());
  std::vector<double> cycles;
  for (int r = 0; r < o.repeats; ++r) {
    l2_chase_kernel<<<1, 32>>>(d_next, hops, d_out);
    TRY(fig, cudaGetLastError());
    unsigned long long out[3];
    TRY(fig, cudaMemcpy(out, d_out, sizeof out, cudaMemcpyDeviceToHost));
    fig.samples.push_back(static_cast<double>(out[0]) / hops);
    cycles.push_back(static_cast<double>(out[1]) / hops);
    if (out[0] > 0) *clock_mhz = 1000.0 * static_cast<double>(out[1]) / static_cast<double>(out[0]);
  }
  const mb::Summary c = mb::summarize(cycles);
  fig.params.num("cycles_per_load_median", c.median);
  cudaFree(d_next);
  cudaFree(d_out);
  return fig;
}

// Shared memory that lets only one block on an SM: the whole opt-in (block-level) amount.
int one_per_sm_smem(const Device& dev) { return dev.smem_optin; }

mb::Figure handoff_two_blocks(const Device& dev, const Options& o, const Scratch& s, int partner) {
  mb::Figure fig;
  fig.name = "handoff_two_blocks";
  fig.unit = "ns per one-way hand-off";
  const int grid = partner + 1, smem = one_per_sm_smem(dev);
  HandoffArgs a = {s.words, s.watch, s.smids, s.elapsed, partner, iterations(o, kPingRoundTrips),
                   static_cast<unsigned long long>(o.timeout_ms) * 1000000ull};
  fig.params.num("block_a", 0).num("block_b", partner).num("round_trips", a.iterations).num("grid", grid)
      .str("word", "kernel v2's 8-byte exchange word, st/ld.relaxed.gpu.b64");
  const void* fn = reinterpret_cast<const void*>(&pingpong_kernel);
  TRY(fig, cudaFuncSetAttribute(fn, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
  int resident = 0;
  TRY(fig, cudaOccupancyMaxActiveBlocksPerMultiprocessor(&resident, fn, 32, smem));
  std::string why;
  if (!mb::check_co_resident(grid, resident, dev.sm_count, &why)) {
    fig.status = "refused";
    fig.reason = why;
    return fig;
  }
  unsigned int smids[2] = {0, 0};
  for (int r = 0; r < o.repeats; ++r) {
    TRY(fig, cudaMemset(s.watch, 0, sizeof(Watch)));
    TRY(fig, cudaMemset(s.words, 0, s.word_count * sizeof(unsigned long long)));
    void* params[] = {&a};
    TRY(fig, cudaLaunchCooperativeKernel(fn, dim3(grid), dim3(32), params, smem, 0));
    TRY(fig, cudaDeviceSynchronize());
    if (!check_watch(fig, s, o.timeout_ms)) return fig;
    unsigned long long ns = 0;
    TRY(fig, cudaMemcpy(&ns, s.elapsed, sizeof ns, cudaMemcpyDeviceToHost));
    TRY(fig, cudaMemcpy(&smids[0], s.smids, sizeof(unsigned int), cudaMemcpyDeviceToHost));
    TRY(fig, cudaMemcpy(&smids[1], s.smids + partner, sizeof(unsigned int), cudaMemcpyDeviceToHost));
    fig.samples.push_back(static_cast<double>(ns) / (2.0 * (a.iterations - 1)));
  }
  fig.params.num("sm_a", static_cast<int>(smids[0])).num("sm_b", static_cast<int>(smids[1]));
  if (smids[0] == smids[1]) {
    fig.status = "error";
    fig.reason = "blocks 0 and " + std::to_string(partner) + " ran on the same SM " + std::to_string(smids[0]);
  }
  return fig;
}

mb::Figure handoff_all_to_all(const Device& dev, const Options& o, const Scratch& s, int grid) {
  mb::Figure fig;
  fig.name = "handoff_all_to_all";
  fig.unit = "us per step";
  const int threads = (grid + 31) / 32 * 32, smem = one_per_sm_smem(dev);
  HandoffArgs a = {s.words, s.watch, s.smids, s.elapsed, 0, iterations(o, kAllToAllSteps),
                   static_cast<unsigned long long>(o.timeout_ms) * 1000000ull};
  fig.params.num("blocks", grid).num("steps", a.iterations).num("threads", threads)
      .num("word_stride_bytes", static_cast<int>(kWordStride * sizeof(unsigned long long)))
      .str("word", "one 8-byte exchange word per block per step, two-slot ring, as kernel v2's");
  if (threads > kMaxGrid || static_cast<size_t>(2) * grid * kWordStride > s.word_count) {
    fig.status = "refused";
    fig.reason = "grid of " + std::to_string(grid) + " blocks exceeds this program's limit of " +
                 std::to_string(kMaxGrid);
    return fig;
  }
  const void* fn = reinterpret_cast<const void*>(&all_to_all_kernel);
  TRY(fig, cudaFuncSetAttribute(fn, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
  int resident = 0;
  TRY(fig, cudaOccupancyMaxActiveBlocksPerMultiprocessor(&resident, fn, threads, smem));
  std::string why;
  if (!mb::check_co_resident(grid, resident, dev.sm_count, &why)) {
    fig.status = "refused";
    fig.reason = why;
    return fig;
  }
  std::vector<unsigned int> smids(grid);
  for (int r = 0; r < o.repeats; ++r) {
    TRY(fig, cudaMemset(s.watch, 0, sizeof(Watch)));
    TRY(fig, cudaMemset(s.words, 0, s.word_count * sizeof(unsigned long long)));
    void* params[] = {&a};
    TRY(fig, cudaLaunchCooperativeKernel(fn, dim3(grid), dim3(threads), params, smem, 0));
    TRY(fig, cudaDeviceSynchronize());
    if (!check_watch(fig, s, o.timeout_ms)) return fig;
    unsigned long long ns = 0;
    TRY(fig, cudaMemcpy(&ns, s.elapsed, sizeof ns, cudaMemcpyDeviceToHost));
    TRY(fig, cudaMemcpy(smids.data(), s.smids, grid * sizeof(unsigned int), cudaMemcpyDeviceToHost));
    fig.samples.push_back(static_cast<double>(ns) / (a.iterations - 1) / 1000.0);
  }
  std::vector<unsigned int> sorted = smids;
  std::sort(sorted.begin(), sorted.end());
  const bool distinct = std::adjacent_find(sorted.begin(), sorted.end()) == sorted.end();
  fig.params.flag("one_block_per_sm", distinct);
  if (!distinct) {
    fig.status = "error";
    fig.reason = "two blocks of the grid ran on one SM although one block per SM was asked for";
  }
  return fig;
}

std::string no_clusters_reason(const Device& dev) {
  char text[200];
  snprintf(text, sizeof text,
           "thread-block clusters and distributed shared memory need compute capability 9.0; this device is %d.%d",
           dev.cc_major, dev.cc_minor);
  return text;
}

cudaLaunchConfig_t cluster_config(int cluster, int threads, int smem, cudaLaunchAttribute* attr) {
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(cluster);
  cfg.blockDim = dim3(threads);
  cfg.dynamicSmemBytes = static_cast<size_t>(smem);
  cfg.stream = 0;
  attr->id = cudaLaunchAttributeClusterDimension;
  attr->val.clusterDim.x = cluster;
  attr->val.clusterDim.y = 1;
  attr->val.clusterDim.z = 1;
  cfg.attrs = attr;
  cfg.numAttrs = 1;
  return cfg;
}

// tx_words: kClusterTx's payloads per block and step (negative: pushed 4 at a time, st.async.v4).
mb::Figure cluster_figure(const Device& dev, const Options& o, const Scratch& s, int mode, int cluster,
                          int tx_words = 0) {
  mb::Figure fig;
  fig.name = mode == kClusterPingPong ? "dsmem_handoff_two_blocks"
             : mode == kClusterAllToAll ? "dsmem_all_to_all"
             : mode == kClusterBarrier  ? "cluster_barrier_exchange"
                                        : "dsmem_tx_exchange";
  fig.unit = mode == kClusterPingPong ? "ns per one-way hand-off" : "us per step";
  const int its = iterations(o, mode == kClusterPingPong ? kClusterRoundTrips : kClusterSteps);
  fig.params.num("cluster_blocks", cluster).num(mode == kClusterPingPong ? "round_trips" : "steps", its)
      .flag("non_portable_cluster_size", cluster > 8)
      .str("word", mode == kClusterBarrier ? "exchange word into each peer's shared memory, then barrier.cluster"
                   : mode == kClusterTx
                       ? "4-byte payloads pushed into every block of the cluster (this one too) with st.async, "
                         "counted by the receiver's mbarrier (arrive.expect_tx, try_wait.parity), every payload checked"
                       : "exchange word stored into the peer's shared memory (st.relaxed.cluster), "
                         "polled there (ld.relaxed.cluster)");
  if (mode == kClusterTx)
    fig.params.num("payloads_per_block_per_step", tx_words < 0 ? -tx_words : tx_words)
        .num("payloads_per_st_async", tx_words < 0 ? 4 : 1);
  if (dev.cc_major < 9 || !dev.cluster_launch) {
    fig.status = "not_applicable";
    fig.reason = no_clusters_reason(dev);
    return fig;
  }
  void (*kernel)(HandoffArgs) = mode == kClusterTx ? cluster_tx_kernel : cluster_kernel;
  const int threads = mode == kClusterTx ? kTxThreads : kClusterThreads;
  const void* fn = reinterpret_cast<const void*>(kernel);
  const int smem = one_per_sm_smem(dev);
  if (mode == kClusterTx && smem < kTxSmemBytes) {
    fig.status = "refused";
    fig.reason = "the exchange's ring and barriers need " + std::to_string(kTxSmemBytes) +
                 " bytes of shared memory per block; this device allows " + std::to_string(smem);
    return fig;
  }
  TRY(fig, cudaFuncSetAttribute(fn, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
  if (cluster > 8) TRY(fig, cudaFuncSetAttribute(fn, cudaFuncAttributeNonPortableClusterSizeAllowed, 1));
  cudaLaunchAttribute attr;
  cudaLaunchConfig_t cfg = cluster_config(cluster, threads, smem, &attr);
  int active = 0;
  TRY(fig, cudaOccupancyMaxActiveClusters(&active, fn, &cfg));
  fig.params.num("max_active_clusters", active);
  if (active < 1) {
    fig.status = "refused";
    fig.reason = "no cluster of " + std::to_string(cluster) + " blocks with one block per SM (" +
                 std::to_string(smem) + " bytes of shared memory each) fits on this device";
    return fig;
  }
  HandoffArgs a = {s.words, s.watch, s.smids, s.elapsed, mode == kClusterTx ? tx_words : mode, its,
                   static_cast<unsigned long long>(o.timeout_ms) * 1000000ull};
  std::vector<unsigned int> smids(cluster);
  for (int r = 0; r < o.repeats; ++r) {
    TRY(fig, cudaMemset(s.watch, 0, sizeof(Watch)));
    TRY(fig, cudaLaunchKernelEx(&cfg, kernel, a));
    TRY(fig, cudaDeviceSynchronize());
    Watch w = {};
    if (!check_watch(fig, s, o.timeout_ms, &w)) return fig;
    if (!w.ran_cluster_code) {
      fig.status = "not_applicable";
      fig.reason = "this build has no sm_90 code for this device (compute capability " + std::to_string(dev.cc_major) +
                   "." + std::to_string(dev.cc_minor) + "): the cluster kernel ran as an empty stub";
      fig.samples.clear();
      return fig;
    }
    unsigned long long ns = 0;
    TRY(fig, cudaMemcpy(&ns, s.elapsed, sizeof ns, cudaMemcpyDeviceToHost));
    TRY(fig, cudaMemcpy(smids.data(), s.smids, cluster * sizeof(unsigned int), cudaMemcpyDeviceToHost));
    fig.samples.push_back(mode == kClusterPingPong ? static_cast<double>(ns) / (2.0 * (its - 1))
                                                   : static_cast<double>(ns) / (its - 1) / 1000.0);
  }
  std::vector<unsigned int> sorted = smids;
  std::sort(sorted.begin(), sorted.end());
  fig.params.flag("one_block_per_sm", std::adjacent_find(sorted.begin(), sorted.end()) == sorted.end());
  return fig;
}

prnn::DeviceLimits limits_of(const Device& dev) {
  prnn::DeviceLimits l = {};
  l.sm_count = dev.sm_count;
  l.regs_per_sm = dev.regs_per_sm;
  l.regs_per_block = dev.regs_per_block;
  l.max_threads_per_sm = dev.max_threads_sm;
  l.max_threads_per_block = dev.max_threads_block;
  l.max_blocks_per_sm = dev.max_blocks_sm;
  l.smem_per_sm = static_cast<size_t>(dev.smem_per_sm);
  l.smem_per_block_optin = static_cast<size_t>(dev.smem_optin);
  l.smem_reserved_per_block = static_cast<size_t>(dev.smem_reserved);
  return l;
}

// cudaOccupancyMaxActiveClusters for a block of `threads` threads and `smem` bytes. The probe kernel
// has few registers, so where the real kernel is one block per SM (v2 always is) the shared memory
// asked is raised to more than half an SM's, which allows exactly one as well.
mb::Figure max_active_clusters(const Device& dev, int cluster, const std::string& shape, int threads, int smem,
                               const std::string& plan_note) {
  mb::Figure fig;
  fig.name = "max_active_clusters";
  fig.unit = "clusters";
  const int one_per_sm = dev.smem_per_sm / 2 + 1 - dev.smem_reserved;
  const int asked = std::min(dev.smem_optin, std::max(smem, one_per_sm));
  fig.params.num("cluster_blocks", cluster).str("shape", shape).num("threads", threads)
      .num("smem_bytes_of_shape", smem).num("smem_bytes_asked", asked).flag("non_portable_cluster_size", cluster > 8);
  if (!plan_note.empty()) fig.params.str("plan", plan_note);
  if (dev.cc_major < 9 || !dev.cluster_launch) {
    fig.status = "not_applicable";
    fig.reason = no_clusters_reason(dev);
    return fig;
  }
  const void* fn = reinterpret_cast<const void*>(&cluster_occupancy_probe);
  TRY(fig, cudaFuncSetAttribute(fn, cudaFuncAttributeMaxDynamicSharedMemorySize, asked));
  if (cluster > 8) TRY(fig, cudaFuncSetAttribute(fn, cudaFuncAttributeNonPortableClusterSizeAllowed, 1));
  cudaLaunchAttribute attr;
  cudaLaunchConfig_t cfg = cluster_config(cluster, threads, asked, &attr);
  int active = 0;
  TRY(fig, cudaOccupancyMaxActiveClusters(&active, fn, &cfg));
  fig.samples.push_back(static_cast<double>(active));
  fig.params.num("blocks_in_clusters", active * cluster);
  return fig;
}

void cluster_occupancy(const Device& dev, std::vector<mb::Figure>* figures) {
  for (int batch : kV2TargetBatches) {
    const prnn::ProblemShape shape = {kV2TargetSteps, batch, 1, kV2TargetHidden, 2};
    prnn::PlanV2 plan = {};
    char why[512] = {0};
    const bool ok = prnn::make_plan_v2(limits_of(dev), shape, prnn::kV2Mma16, prnn::kKernelMaxRegsPerThread, &plan,
                                       why, sizeof why);
    const std::string name = "v2 bf16 H=" + std::to_string(kV2TargetHidden) + " N=" + std::to_string(batch);
    for (int c : kClusterSizes) {
      if (!ok) {
        mb::Figure fig;
        fig.name = "max_active_clusters";
        fig.unit = "clusters";
        fig.params.num("cluster_blocks", c).str("shape", name);
        fig.status = "not_applicable";
        fig.reason = std::string("the v2 planner has no plan for this shape on this device: ") + why;
        fig.label = name + ", cluster " + std::to_string(c);
        figures->push_back(fig);
        continue;
      }
      char note[512];
      prnn::describe_plan_v2(plan, note, sizeof note);
      figures->push_back(max_active_clusters(dev, c, name, plan.threads, plan.smem_bytes, note));
      figures->back().label = name + ", cluster " + std::to_string(c);
    }
  }
  for (int c : kClusterSizes) {
    figures->push_back(max_active_clusters(dev, c, "one block per SM, 512 threads", prnn::kKernelMaxThreads,
                                           dev.smem_optin, ""));
    figures->back().label = "1 block/SM, cluster " + std::to_string(c);
  }
}

bool read_device(int index, Device* dev, std::string* why) {
  cudaDeviceProp prop;
  cudaError_t err = cudaGetDeviceProperties(&prop, index);
  if (err != cudaSuccess) {
    *why = cuda_error("cudaGetDeviceProperties", err);
    return false;
  }
  dev->index = index;
  dev->name = prop.name;
  const struct {
    cudaDeviceAttr attr;
    int* out;
  } attrs[] = {{cudaDevAttrComputeCapabilityMajor, &dev->cc_major},
               {cudaDevAttrComputeCapabilityMinor, &dev->cc_minor},
               {cudaDevAttrMultiProcessorCount, &dev->sm_count},
               {cudaDevAttrClockRate, &dev->clock_khz},
               {cudaDevAttrMemoryClockRate, &dev->memory_clock_khz},
               {cudaDevAttrL2CacheSize, &dev->l2_bytes},
               {cudaDevAttrMaxSharedMemoryPerMultiprocessor, &dev->smem_per_sm},
               {cudaDevAttrMaxSharedMemoryPerBlockOptin, &dev->smem_optin},
               {cudaDevAttrReservedSharedMemoryPerBlock, &dev->smem_reserved},
               {cudaDevAttrMaxRegistersPerMultiprocessor, &dev->regs_per_sm},
               {cudaDevAttrMaxRegistersPerBlock, &dev->regs_per_block},
               {cudaDevAttrMaxThreadsPerMultiProcessor, &dev->max_threads_sm},
               {cudaDevAttrMaxThreadsPerBlock, &dev->max_threads_block},
               {cudaDevAttrMaxBlocksPerMultiprocessor, &dev->max_blocks_sm}};
  for (const auto& a : attrs) {
    err = cudaDeviceGetAttribute(a.out, a.attr, index);
    if (err != cudaSuccess) {
      *why = cuda_error("cudaDeviceGetAttribute", err);
      return false;
    }
  }
  int flag = 0;
  if (cudaDeviceGetAttribute(&flag, cudaDevAttrCooperativeLaunch, index) == cudaSuccess) dev->cooperative = flag != 0;
  flag = 0;
  if (cudaDeviceGetAttribute(&flag, cudaDevAttrClusterLaunch, index) == cudaSuccess) dev->cluster_launch = flag != 0;
  return true;
}

int parse_int(const char* flag, const char* text, int low, int high, bool* ok) {
  char* end = nullptr;
  const long v = strtol(text, &end, 10);
  if (end == text || *end != '\0' || v < low || v > high) {
    fprintf(stderr, "microbench: %s must be an integer in [%d, %d], got '%s'\n", flag, low, high, text);
    *ok = false;
    return 0;
  }
  return static_cast<int>(v);
}

bool parse_options(int argc, char** argv, Options* o) {
  bool ok = true;
  for (int i = 1; i < argc && ok; ++i) {
    const char* arg = argv[i];
    if (!strcmp(arg, "--repeats") || !strcmp(arg, "--timeout-ms")) {
      if (i + 1 >= argc) {
        fprintf(stderr, "microbench: %s needs a value\n", arg);
        return false;
      }
      if (!strcmp(arg, "--repeats"))
        o->repeats = parse_int(arg, argv[++i], 1, 1000, &ok);
      else
        o->timeout_ms = parse_int(arg, argv[++i], 1, 600000, &ok);
    } else if (!strcmp(arg, "--quick")) {
      o->quick = true;
    } else if (arg[0] == '-') {
      fprintf(stderr, "microbench: unknown option '%s'\n", arg);
      return false;
    } else if (o->out == nullptr) {
      o->out = arg;
    } else {
      fprintf(stderr, "microbench: one output path, got '%s' and '%s'\n", o->out, arg);
      return false;
    }
  }
  if (ok && o->out == nullptr) fprintf(stderr, "microbench: OUT.json (the output path) is missing\n");
  if (ok && o->quick && o->repeats == kDefaultRepeats) o->repeats = kQuickRepeats;
  return ok && o->out != nullptr;
}

}  // namespace

int main(int argc, char** argv) {
  Options opt;
  if (!parse_options(argc, argv, &opt)) {
    fprintf(stderr, "usage: microbench OUT.json [--repeats N] [--timeout-ms MS] [--quick]\n");
    return mb::kUsageExit;
  }
  int count = 0;
  const cudaError_t count_err = cudaGetDeviceCount(&count);
  if (count_err != cudaSuccess || count == 0) {
    printf("microbench: no GPU (%s)\n", count_err != cudaSuccess ? cudaGetErrorName(count_err) : "0 devices");
    return mb::kNoGpuExit;
  }
  Device dev;
  std::string why;
  if (!read_device(0, &dev, &why) || cudaSetDevice(0) != cudaSuccess) {
    printf("microbench: no GPU (%s)\n", why.c_str());
    return mb::kNoGpuExit;
  }
  Scratch scratch;
  scratch.word_count = static_cast<size_t>(2) * kMaxGrid * kWordStride;
  if (cudaMalloc(&scratch.watch, sizeof(Watch)) != cudaSuccess ||
      cudaMalloc(&scratch.smids, kMaxGrid * sizeof(unsigned int)) != cudaSuccess ||
      cudaMalloc(&scratch.elapsed, sizeof(unsigned long long)) != cudaSuccess ||
      cudaMalloc(&scratch.words, scratch.word_count * sizeof(unsigned long long)) != cudaSuccess) {
    printf("microbench: cannot allocate %zu bytes on %s\n", scratch.word_count * 8, dev.name.c_str());
    return 1;
  }
  std::vector<mb::Figure> figures;
  const auto add = [&figures](mb::Figure fig, const std::string& label) {
    fig.label = label;
    figures.push_back(fig);
  };
  double clock_mhz = NAN;
  add(l2_round_trip(dev, opt, &clock_mhz), "8 MiB chase");
  for (int partner : mb::pingpong_partners(dev.sm_count))
    add(handoff_two_blocks(dev, opt, scratch, partner), "block 0 <-> " + std::to_string(partner));
  for (int grid : mb::all_to_all_grid_sizes(dev.sm_count))
    add(handoff_all_to_all(dev, opt, scratch, grid), std::to_string(grid) + " blocks");
  add(cluster_figure(dev, opt, scratch, kClusterPingPong, 2), "cluster of 2");
  for (int c : kClusterAllToAllSizes)
    add(cluster_figure(dev, opt, scratch, kClusterAllToAll, c), "cluster of " + std::to_string(c));
  for (int c : kClusterBarrierSizes)
    add(cluster_figure(dev, opt, scratch, kClusterBarrier, c), "cluster of " + std::to_string(c));
  for (int c : kTxClusterSizes)
    for (int w : kTxWords)
      add(cluster_figure(dev, opt, scratch, kClusterTx, c, w),
          "cluster of " + std::to_string(c) + ", " + std::to_string(w) + " payloads per block");
  for (int c : kTxClusterSizes)  // the kernel's volume again, 4 payloads per st.async
    add(cluster_figure(dev, opt, scratch, kClusterTx, c, -kTxMaxWords),
        "cluster of " + std::to_string(c) + ", " + std::to_string(kTxMaxWords) + " payloads per block, v4");
  cluster_occupancy(dev, &figures);

  int failures = 0;
  std::vector<std::string> items;
  for (const auto& f : figures) {
    failures += f.failed() ? 1 : 0;
    items.push_back(f.json(2));
  }
  mb::JsonObject device;
  device.str("name", dev.name)
      .str("compute_capability", std::to_string(dev.cc_major) + "." + std::to_string(dev.cc_minor))
      .num("sm_count", dev.sm_count)
      .num("sm_clock_peak_mhz", dev.clock_khz / 1000.0)
      .num("memory_clock_peak_mhz", dev.memory_clock_khz / 1000.0)
      .num("sm_clock_measured_mhz", clock_mhz)
      .num("l2_bytes", dev.l2_bytes)
      .num("smem_per_sm_bytes", dev.smem_per_sm)
      .num("smem_per_block_optin_bytes", dev.smem_optin)
      .flag("cooperative_launch", dev.cooperative)
      .flag("cluster_launch", dev.cluster_launch);
  mb::JsonObject doc;
  doc.str("program", "csrc/microbench/microbench.cu")
      .raw("device", device.text(1))
      .num("repeats", opt.repeats)
      .num("timeout_ms", opt.timeout_ms)
      .flag("quick", opt.quick)
      .str("statistics", "median, p10, p90 over repeats (linear interpolation between ranks)")
      .num("failures", failures)
      .raw("figures", "[\n  " + [&] {
        std::string joined;
        for (size_t i = 0; i < items.size(); ++i) joined += (i ? ",\n  " : "") + items[i];
        return joined;
      }() + "\n ]");
  FILE* f = fopen(opt.out, "w");
  const std::string text = doc.text() + "\n";
  if (f == nullptr || fwrite(text.data(), 1, text.size(), f) != text.size() || fclose(f) != 0) {
    fprintf(stderr, "microbench: cannot write %s: %s\n", opt.out, strerror(errno));
    return 1;
  }
  printf("microbench on %s (sm_%d%d, %d SMs, peak %d MHz, measured %.0f MHz): median [p10, p90]\n", dev.name.c_str(),
         dev.cc_major, dev.cc_minor, dev.sm_count, dev.clock_khz / 1000, clock_mhz);
  for (const auto& fig : figures) printf("%s\n", mb::table_row(fig).c_str());
  printf("wrote %s (%d figures, %d failed)\n", opt.out, static_cast<int>(figures.size()), failures);
  return failures ? 1 : 0;
}
