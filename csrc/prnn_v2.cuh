// prnn_v2.cuh - persistent recurrent kernel v2: tensor cores, and a data-flow exchange instead of a
// grid barrier (the tiling is described in prnn_planner.h, "Kernel v2").
//
//   forward:        h_t  = act(u_t + W h_{t-1})              A = W[rows, :]
//   backward-data:  du_t = (dy_t + W^T du_{t+1}) * act'(y_t) A = W^T[rows, :]
//
// Each warp keeps its A fragments (mma.sync layout, prnn_fragments.h) for the whole launch, in
// registers and, past reg_steps k steps, in shared memory. Per step and chunk of n tiles (8
// sequences each) the block stages the previous state from the exchange ring: every thread starts
// cp.async copies of its word pairs at once (one L2 round trip, no registers held), then checks its
// own words in shared memory and re-polls only those not yet carrying the step. Each 8-byte word is
// {payload: two bf16/fp16 or one fp32; check byte; 24-bit step}, written by its producer in one
// store, so a word with the awaited step and a matching check byte carries that step's payload;
// there is no flag to order against the data and no grid-wide barrier. Warps then read their B
// fragments from the staged words, partial sums of the warps that split k meet in shared memory,
// and the epilogue applies the activation, writes y (or du) and publishes the block's rows.
//
// Why two ring slots suffice: a block writes step s into slot s & 1 only after it has read step
// s-1 from every producer of its k range (= all rows), and each producer wrote step s-1 only after
// it had finished reading step s-2 from that slot. Tags only grow within a slot, so a tag above the
// awaited one can only mean a broken protocol: the kernel records that as an error instead of using
// it. Ragged batches: a tile of 8 sequences whose sequences have all ended (or, backward, not yet
// begun) costs no polling and no MMA, only the zero stores of its outputs.
//
// Every wait is bounded (globaltimer): past the bound a block records who it waited for and all
// blocks leave; the launch then reports PRNN_STATUS_TIMEOUT through the workspace's status record.
//
// Cluster mode (sm_90, prnn_planner.h): each block's two-slot ring lives in its own shared memory and
// holds bare 4-byte payloads (no tags). A block pushes each payload of its rows into every block of
// its cluster with st.async, whose completion counts 4 bytes on the receiving block's mbarrier of
// that slot (release at cluster scope). Per step, one thread of the receiver arms the slot's barrier
// with the bytes the step brings (arrive.expect_tx; pushes that land first drive the count below zero,
// which the PTX ISA allows, and the phase cannot complete before the arrival) and every thread waits
// for the phase (try_wait.parity, acquire at cluster scope); the B fragments are read from the ring in
// place. The two-slot argument is the ring mode's: a push into slot s & 1 at step s is made after its
// producer saw the whole step s-1, i.e. after every block read slot s & 1 at step s-1 (a fence after
// the block's __syncthreads orders those reads before its own pushes), so a push never lands in a
// phase other than its own. A tile publishes only what the next step reads (kTileToNext), so the
// bytes expected and the bytes pushed agree; every block also pushes a 4-byte heartbeat to every block
// each step, after its last read of the step, so that no step's phase can complete without every peer
// (a step with no ring input would otherwise expect 0 bytes and let blocks run ahead of their peers'
// barriers). A cluster barrier at the start (rings zeroed and barriers
// initialised everywhere before any push) and at the end (no block leaves while a peer may still push
// into it; after a timeout a push may still be in flight there: the launch's outputs are void then).
//
// Status: compiled in CI (sm_80, sm_90) with ptxas resource checks; run on CPU threads by
// csrc/tests/prnn_v2_emulation_test.cpp (fragments, the whole kernel for bf16/fp16/fp32 in both modes,
// ring mode's exchange under a memory that delays writes and returns stale values, cluster mode's
// under pushes that land late and in any order and waits that fail spuriously); NOT yet run on a GPU.
#pragma once

#include <stdint.h>

#include "prnn_fragments.h"
#include "prnn_kernels.cuh"  // activations, KernelArgs, the status record, sequence_length, dynamic_smem
#include "prnn_planner.h"

namespace prnn {

enum KernelStatusV2 : unsigned int { kKernelExchangeTimeout = 2, kKernelExchangeProtocol = 3 };

// ---- element access by storage type ------------------------------------------------------------
template <typename T> struct Elem;
template <> struct Elem<float> {
  static __device__ __forceinline__ float load(const float* p) { return *p; }
  static __device__ __forceinline__ void store(float* p, float v) { *p = v; }
};
#ifndef PRNN_HOST_EMULATION
template <> struct Elem<__nv_bfloat16> {
  static __device__ __forceinline__ float load(const __nv_bfloat16* p) { return __bfloat162float(*p); }
  static __device__ __forceinline__ void store(__nv_bfloat16* p, float v) { *p = __float2bfloat16_rn(v); }
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
    const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);  // .x (low 16 bits) = lo
    return *reinterpret_cast<const uint32_t*>(&v);
  }
  static __device__ __forceinline__ float round(float v) { return __bfloat162float(__float2bfloat16_rn(v)); }
};
template <> struct Elem<__half> {
  static __device__ __forceinline__ float load(const __half* p) { return __half2float(*p); }
  static __device__ __forceinline__ void store(__half* p, float v) { *p = __float2half_rn(v); }
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
    const __half2 v = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<const uint32_t*>(&v);
  }
  static __device__ __forceinline__ float round(float v) { return __half2float(__float2half_rn(v)); }
};

// ---- the few instructions the emulation test supplies for CPU threads ---------------------------
template <typename T> __device__ __forceinline__ void mma_16816(float (&c)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]);
template <> __device__ __forceinline__ void mma_16816<__nv_bfloat16>(float (&c)[4], const uint32_t (&a)[4],
                                                                     const uint32_t (&b)[2]) {
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
               : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
template <> __device__ __forceinline__ void mma_16816<__half>(float (&c)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
               : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
__device__ __forceinline__ void mma_1688_tf32(float (&c)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  asm volatile("mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
               : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
// cvt.rna.tf32.f32: the tf32 value as fp32 bits with the low 13 bits zero.
__device__ __forceinline__ uint32_t tf32_bits(float x) {
  uint32_t r;
  asm("cvt.rna.tf32.f32 %0, %1;" : "=r"(r) : "f"(x));
  return r;
}
__device__ __forceinline__ float bits_as_float(uint32_t u) { return __uint_as_float(u); }
__device__ __forceinline__ uint32_t float_as_bits(float f) { return __float_as_uint(f); }
// Exchange words: strong (relaxed, gpu scope) 64-bit accesses, single-copy atomic, never served from
// a stale L1 line.
__device__ __forceinline__ unsigned long long ring_load(const unsigned long long* p) {
  unsigned long long v;
  asm volatile("ld.relaxed.gpu.global.b64 %0, [%1];" : "=l"(v) : "l"(p) : "memory");
  return v;
}
__device__ __forceinline__ void ring_store(unsigned long long* p, unsigned long long v) {
  asm volatile("st.relaxed.gpu.global.b64 [%0], %1;" ::"l"(p), "l"(v) : "memory");
}
__device__ __forceinline__ bool warp_any(bool v) { return __any_sync(0xffffffffu, v) != 0; }
// 16 bytes (two exchange words) global -> shared, asynchronously, through L2 only (.cg: no L1 line
// that could be stale). Each 8-byte word is validated by its tag and check byte after the copy.
__device__ __forceinline__ unsigned int smem_address(const void* p) {
  return static_cast<unsigned int>(__cvta_generic_to_shared(p));
}
__device__ __forceinline__ void async_copy16(void* smem_dst, const void* gmem_src) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(smem_address(smem_dst)), "l"(gmem_src) : "memory");
}
__device__ __forceinline__ void async_copy_wait_all() { asm volatile("cp.async.wait_all;" ::: "memory"); }

// Cluster mode (sm_90). Compiled for sm_80 too (the kernel is one template), where the planner never
// chooses cluster mode: there these trap.
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 900
#define PRNN_HAS_CLUSTERS 1
#endif
// Every thread of every block of the cluster arrives; shared-memory writes before it are visible to
// the cluster after it (release / acquire).
__device__ __forceinline__ void cluster_sync_all() {
#ifdef PRNN_HAS_CLUSTERS
  asm volatile("barrier.cluster.arrive.release;\n\tbarrier.cluster.wait.acquire;" ::: "memory");
#else
  __trap();
#endif
}
// This block's mbarrier of a ring slot: `count` arrivals per phase (1: the thread that arms it).
__device__ __forceinline__ void mbar_init(unsigned long long* bar, unsigned int count) {
#ifdef PRNN_HAS_CLUSTERS
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(smem_address(bar)), "r"(count) : "memory");
#else
  (void)bar, (void)count;
  __trap();
#endif
}
// Makes this thread's mbarrier.init visible to the cluster (the cluster barrier that follows orders it).
__device__ __forceinline__ void mbar_init_fence() {
#ifdef PRNN_HAS_CLUSTERS
  asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
#endif
}
// Arms the current phase: `bytes` more transaction bytes to come, and this thread's arrival. Peers'
// bytes may land before it (the count goes negative; the phase cannot complete without the arrival).
__device__ __forceinline__ void mbar_arrive_expect_tx(unsigned long long* bar, unsigned int bytes) {
#ifdef PRNN_HAS_CLUSTERS
  asm volatile("mbarrier.arrive.expect_tx.release.cluster.shared::cta.b64 _, [%0], %1;" ::"r"(smem_address(bar)),
               "r"(bytes)
               : "memory");
#else
  (void)bar, (void)bytes;
  __trap();
#endif
}
// True once the phase of parity `parity` has completed; the peers' pushes it counted are then visible
// to this thread (acquire at cluster scope: they were released by st.async's complete-tx).
__device__ __forceinline__ bool mbar_try_wait(unsigned long long* bar, unsigned int parity) {
#ifdef PRNN_HAS_CLUSTERS
  unsigned int done;
  asm volatile(
      "{\n\t.reg .pred p;\n\tmbarrier.try_wait.parity.acquire.cluster.shared::cta.b64 p, [%1], %2;\n\t"
      "selp.u32 %0, 1, 0, p;\n\t}"
      : "=r"(done)
      : "r"(smem_address(bar)), "r"(parity)
      : "memory");
  return done != 0;
#else
  (void)bar, (void)parity;
  __trap();
  return false;
#endif
}
#ifdef PRNN_HAS_CLUSTERS
// mapa: the shared::cluster address, in block `rank` of the cluster, of what `local` is in this block.
__device__ __forceinline__ unsigned int cluster_map(const void* local, unsigned int rank) {
  unsigned int remote;
  asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(remote) : "r"(smem_address(local)), "r"(rank));
  return remote;
}
#endif
// One 4-byte payload into block `rank` of the cluster, at the offset `local` has in this block's
// shared memory (the peers' layouts are the same); its completion counts 4 bytes on that block's
// barrier at the offset of `local_bar`. `use`: the slot's phase it belongs to (checked by the CPU
// emulation only).
__device__ __forceinline__ void cluster_push(uint32_t* local, unsigned long long* local_bar, unsigned int rank,
                                             uint32_t v, unsigned int use) {
  (void)use;
#ifdef PRNN_HAS_CLUSTERS
  asm volatile("st.async.shared::cluster.mbarrier::complete_tx::bytes.b32 [%0], %1, [%2];" ::"r"(
                   cluster_map(local, rank)),
               "r"(v), "r"(cluster_map(local_bar, rank))
               : "memory");
#else
  (void)local, (void)local_bar, (void)rank, (void)v;
  __trap();
#endif
}
// Four consecutive payloads (16 bytes, `local` 16-byte aligned) in one st.async.v4: what the kernel's
// epilogue could issue instead of four cluster_push calls. Used by the microbenchmark
// (dsmem_tx_exchange, vector 4) to measure whether it pays; the kernel does not use it yet.
__device__ __forceinline__ void cluster_push4(uint32_t* local, unsigned long long* local_bar, unsigned int rank,
                                              const uint32_t (&v)[4]) {
#ifdef PRNN_HAS_CLUSTERS
  asm volatile("st.async.shared::cluster.mbarrier::complete_tx::bytes.v4.b32 [%0], {%1, %2, %3, %4}, [%5];" ::"r"(
                   cluster_map(local, rank)),
               "r"(v[0]), "r"(v[1]), "r"(v[2]), "r"(v[3]), "r"(cluster_map(local_bar, rank))
               : "memory");
#else
  (void)local, (void)local_bar, (void)rank, (void)v;
  __trap();
#endif
}
// Orders this thread's earlier shared-memory reads (and the block's, after a __syncthreads) before
// its later stores into the peers, as the peers observe them: a slot is overwritten only after it
// was read.
__device__ __forceinline__ void fence_cluster() {
#ifdef PRNN_HAS_CLUSTERS
  asm volatile("fence.acq_rel.cluster;" ::: "memory");
#endif
}
#endif  // PRNN_HOST_EMULATION

// Exchange word: payload in the low 32 bits, then 8 bits of payload check, then 24 bits of step.
// The check byte makes a word read in two halves (a weak copy torn between two stores) fail its
// validation instead of pairing one store's tag with another's payload.
__device__ __forceinline__ unsigned int v2_check8(uint32_t payload) {
  return ((payload ^ (payload >> 8) ^ (payload >> 16) ^ (payload >> 24)) & 0xFFu) ^ 0x5Au;
}
__device__ __forceinline__ unsigned long long v2_word(unsigned int step, uint32_t payload) {
  return (static_cast<unsigned long long>(step) << 40) | (static_cast<unsigned long long>(v2_check8(payload)) << 32) |
         payload;
}
__device__ __forceinline__ unsigned int v2_word_step(unsigned long long w) { return static_cast<unsigned int>(w >> 40); }
__device__ __forceinline__ bool v2_word_intact(unsigned long long w) {
  return static_cast<unsigned int>((w >> 32) & 0xFFu) == v2_check8(static_cast<uint32_t>(w));
}

constexpr unsigned int kExchangePollsPerClockCheck = 256;
constexpr int kV2LoadChunk = 4;  // k steps of exchange words in flight per lane before the first wait

// Records (first failure wins) that this block gave up at `step` waiting for `producer`'s rows.
__device__ __forceinline__ void record_exchange_failure(const KernelArgs& a, unsigned int code, int step,
                                                        int producer, unsigned int seen_tag) {
  if (atomicCAS(a.status + kStatusCode, 0u, code) == 0u) {
    a.status[kStatusBlock] = blockIdx.x;
    a.status[kStatusGeneration] = static_cast<unsigned int>(step);
    a.status[kStatusArrived] = static_cast<unsigned int>(producer);
    a.status[kStatusGrid] = gridDim.x;
    a.status[kStatusTimeoutMs] = code == kKernelExchangeProtocol ? seen_tag
                                                                  : static_cast<unsigned int>(a.barrier_timeout_ns / 1000000ull);
    __threadfence();
  }
}

// A tile of 8 sequences takes part in a step when one of its sequences has that position.
__device__ __forceinline__ bool v2_tile_active(const PlanV2& p, const int* len_s, int tile, int pos) {
  if (pos < 0) return true;  // the dh0 step
  const int n0 = tile * kV2BatchTile;
  for (int j = 0; j < kV2BatchTile; ++j)
    if (n0 + j < p.batch && len_s[n0 + j] > pos) return true;
  return false;
}

// Element (r, k) of the block's A = W (forward) or W^T (backward) tile of direction d, zero outside.
template <typename T, bool kBackward>
__device__ __forceinline__ float v2_tile_value(const PlanV2& p, const KernelArgs& a, int d, int row0, int rows, int r, int k) {
  if (r >= rows || k >= p.hidden) return 0.0f;
  const T* w = static_cast<const T*>(a.w) + static_cast<size_t>(d) * p.hidden * p.hidden;
  const size_t o = kBackward ? static_cast<size_t>(k) * p.hidden + row0 + r : static_cast<size_t>(row0 + r) * p.hidden + k;
  return Elem<T>::load(w + o);
}

// Register `reg` of this lane's A fragment for k step `step` of m tile `mt`.
template <typename T, int kPrec, bool kBackward>
__device__ __forceinline__ uint32_t v2_a_register(const PlanV2& p, const KernelArgs& a, int d, int row0, int rows, int mt,
                                                  int step, int lane, int reg) {
  if constexpr (kPrec == kV2Mma16) {
    const frag::Coord c0 = frag::a16816(lane, reg, 0), c1 = frag::a16816(lane, reg, 1);
    const int r = mt * kV2RowTile, k = step * 16;
    return Elem<T>::pack(v2_tile_value<T, kBackward>(p, a, d, row0, rows, r + c0.row, k + c0.col),
                         v2_tile_value<T, kBackward>(p, a, d, row0, rows, r + c1.row, k + c1.col));
  } else {
    const frag::Coord c = frag::a1688(lane, reg);
    const float v = v2_tile_value<T, kBackward>(p, a, d, row0, rows, mt * kV2RowTile + c.row, step * 8 + c.col);
    return kPrec == kV2Tf32 ? tf32_bits(v) : float_as_bits(v);  // 3xTF32 splits at use
  }
}

// acc += A . B for one k step, in the plan's precision.
template <typename T, int kPrec>
__device__ __forceinline__ void v2_mma(float (&acc)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  if constexpr (kPrec == kV2Mma16) {
    mma_16816<T>(acc, a, b);
  } else if constexpr (kPrec == kV2Tf32) {
    const uint32_t bt[2] = {tf32_bits(bits_as_float(b[0])), tf32_bits(bits_as_float(b[1]))};
    mma_1688_tf32(acc, a, bt);
  } else {  // 3xTF32: a*b ~ a_hi*b_lo + a_hi*b_hi + a_lo*b_hi (a_lo overwrites a_hi: 4 temporaries, not 8)
    uint32_t b_hi[2], b_lo[2], t[4];
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const float x = bits_as_float(b[i]);
      b_hi[i] = tf32_bits(x);
      b_lo[i] = tf32_bits(x - bits_as_float(b_hi[i]));
    }
#pragma unroll
    for (int i = 0; i < 4; ++i) t[i] = tf32_bits(bits_as_float(a[i]));
    mma_1688_tf32(acc, t, b_lo);
    mma_1688_tf32(acc, t, b_hi);
#pragma unroll
    for (int i = 0; i < 4; ++i) t[i] = tf32_bits(bits_as_float(a[i]) - bits_as_float(t[i]));
    mma_1688_tf32(acc, t, b_hi);
  }
}

// The state a step publishes, rounded as the exchange carries it (the MMA input type).
template <typename T>
__device__ __forceinline__ uint32_t v2_payload(float e0, float e1) {
  if constexpr (sizeof(T) == 4) {
    (void)e1;
    return float_as_bits(e0);
  } else {
    return Elem<T>::pack(e0, e1);
  }
}

// Per step and tile of 8 sequences: bit 0 = the tile takes part in the step, bit 1 = it reads the
// previous step's state from the ring (bit 2: from h0, forward step 0), bit 3 = it publishes its state
// for the next step (it takes part in both; = bit 1 of the next step).
enum : int { kTileActive = 1, kTileFromRing = 2, kTileFromH0 = 4, kTileToNext = 8 };
// The producer a record names when the waiting block cannot know which one is missing (cluster mode).
constexpr int kV2UnknownProducer = -1;

// The payload of exchange word kw of sequence n's initial state h0 (forward, step 0), rounded to the
// MMA input type; zero past H.
template <typename T, int kEpw>
__device__ __forceinline__ uint32_t v2_h0_payload(const PlanV2& p, const KernelArgs& a, int n, int d, int kw) {
  const int k = kw * kEpw;
  if (k >= p.hidden) return 0u;
  const T* h0 = static_cast<const T*>(a.h0) + (static_cast<size_t>(n) * p.directions + d) * p.hidden;
  return v2_payload<T>(Elem<T>::load(h0 + k), (kEpw == 2 && k + 1 < p.hidden) ? Elem<T>::load(h0 + k + 1) : 0.0f);
}

// The bound of one wait, checked every kExchangePollsPerClockCheck polls: true when the launch is
// being abandoned (another block gave up, or this wait passed its bound, which it records).
struct V2Watchdog {
  unsigned int polls = 0;
  unsigned long long first_check_ns = 0;
  __device__ __forceinline__ bool expired(const KernelArgs& a, int s, int producer) {
    if (++polls % kExchangePollsPerClockCheck != 0) return false;
    if (load_acquire_gpu(a.status + kStatusCode) != kKernelOk) return true;  // another block gave up
    const unsigned long long now = global_timer_ns();
    if (first_check_ns == 0) {
      first_check_ns = now;
    } else if (now - first_check_ns > a.barrier_timeout_ns) {
      record_exchange_failure(a, kKernelExchangeTimeout, s, producer, 0u);
      return true;
    }
    return false;
  }
};

// Re-reads one exchange word with `load` until it carries step `expected` intact (w: the first value
// read, then the word's payload). True when the launch is being abandoned: a tag above the awaited one
// (a slot overwritten before it was read), another block gave up, or the wait passed its bound.
template <class Load>
__device__ __forceinline__ bool v2_await_word(const KernelArgs& a, Load load, unsigned long long& w, unsigned int expected,
                                              int s, int producer) {
  V2Watchdog watchdog;
  while (!(v2_word_step(w) == expected && v2_word_intact(w))) {
    if (v2_word_step(w) > expected && v2_word_intact(w)) {
      record_exchange_failure(a, kKernelExchangeProtocol, s, producer, v2_word_step(w));
      return true;
    }
    if (watchdog.expired(a, s, producer)) return true;
    barrier_poll_pause();
    w = load();
  }
  return false;
}

// Stages the exchange words of the chunk's tiles in b_s (shared memory): every thread starts the
// asynchronous copies of its word pairs at once, then checks its own words there and re-polls, one
// by one, only those that did not yet carry step s's tag. Tiles without ring input get their h0
// payloads (forward, step 0) or zeros, as words that already pass the check. Returns true when the
// launch is being abandoned (a bound expired, the protocol broke, or another block gave up).
template <typename T, int kPrec>
__device__ __forceinline__ bool v2_stage(const PlanV2& p, const KernelArgs& a, unsigned long long* b_s,
                                         const int* flags_s, int c0, int tiles_here, int s, int d, int g) {
  constexpr int kEpw = kPrec == kV2Mma16 ? 2 : 1;
  const int Kw = p.hidden_padded / kEpw, pairs_per_row = Kw / 2;
  const int items = tiles_here * kV2BatchTile * pairs_per_row;
  const unsigned int expected = static_cast<unsigned int>(s);  // step s-1 wrote step tag s
  const int slot = (s - 1) & 1;
  for (int idx = threadIdx.x; idx < items; idx += blockDim.x) {
    const int row = idx / pairs_per_row, kw = 2 * (idx - row * pairs_per_row);  // row = tt * 8 + j
    const int tile = c0 + row / kV2BatchTile, n = tile * kV2BatchTile + row % kV2BatchTile;
    const int f = flags_s[tile];
    unsigned long long* dst = b_s + row * p.b_row_words + kw;
    if ((f & kTileFromRing) && n < p.batch && kw * kEpw < p.hidden) {
      async_copy16(dst, a.ring + v2_ring_index(p, slot, d, n, kw));
    } else {
      const bool from_h0 = (f & kTileFromH0) && n < p.batch;
      dst[0] = v2_word(expected, from_h0 ? v2_h0_payload<T, kEpw>(p, a, n, d, kw) : 0u);
      dst[1] = v2_word(expected, from_h0 ? v2_h0_payload<T, kEpw>(p, a, n, d, kw + 1) : 0u);
    }
  }
  async_copy_wait_all();  // this thread's copies have landed (each thread checks only its own)
  bool abandon = false;
  for (int idx = threadIdx.x; idx < items && !abandon; idx += blockDim.x) {
    const int row = idx / pairs_per_row, kw0 = 2 * (idx - row * pairs_per_row);
    const int tile = c0 + row / kV2BatchTile, n = tile * kV2BatchTile + row % kV2BatchTile;
    if (!((flags_s[tile] & kTileFromRing) && n < p.batch && kw0 * kEpw < p.hidden)) continue;
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      const int kw = kw0 + j;
      unsigned long long* dst = b_s + row * p.b_row_words + kw;
      if (kw * kEpw >= p.hidden) {  // padding past H: never written by a producer
        *dst = v2_word(expected, 0u);
        continue;
      }
      unsigned long long w = *dst;
      const unsigned long long* src = a.ring + v2_ring_index(p, slot, d, n, kw);
      abandon = v2_await_word(a, [src] { return ring_load(src); }, w, expected, s, v2_producer_block(p, g, d, kw * kEpw));
      if (abandon) break;
      *dst = w;
    }
  }
  return abandon;
}

// Cluster mode, step s (called before the group's first chunk): the ring slot (s-1) & 1 of this block
// receives the previous state of the group's tiles. Thread 0 arms the slot's barrier with the bytes
// the cluster pushes for step s (every payload of every sequence of the tiles with ring input: each
// payload comes from exactly one block), and every thread waits for the phase: one wait for the whole
// step, no tags. Tiles that start from h0 (forward, step 0) or from zero (backward, a tile that begins
// late) get their payloads written here, by this block: no peer pushes those rows in that step.
// Padding (k past H, sequences past N) stays zero from the start of the launch. Returns true when the
// launch is being abandoned (the record cannot name a producer: the barrier counts bytes, not senders).
template <typename T, int kPrec>
__device__ __forceinline__ bool v2_cluster_wait(const PlanV2& p, const KernelArgs& a, uint32_t* ring_s,
                                                unsigned long long* bars, const int* flags_s, int t_begin, int t_end,
                                                int s, int d) {
  constexpr int kEpw = kPrec == kV2Mma16 ? 2 : 1;
  const int Kw = (p.hidden + kEpw - 1) / kEpw;  // payloads per sequence that carry state
  const int slot = (s - 1) & 1;
  if (s > 0) {
    unsigned long long* bar = bars + slot;
    if (threadIdx.x == 0) {
      unsigned int bytes = 0;
      for (int tile = t_begin; tile < t_end; ++tile)
        if (flags_s[tile] & kTileFromRing)
          bytes += static_cast<unsigned int>(min(kV2BatchTile, p.batch - tile * kV2BatchTile) * Kw * 4);
      bytes += static_cast<unsigned int>(p.blocks_per_dir) * 4;  // every block's heartbeat of step s-1
      mbar_arrive_expect_tx(bar, bytes);
    }
    const unsigned int parity = static_cast<unsigned int>((s - 1) >> 1) & 1u;  // the slot's ((s-1)/2)-th phase
    V2Watchdog watchdog;
    while (!mbar_try_wait(bar, parity)) {
      if (watchdog.expired(a, s, kV2UnknownProducer)) return true;
      barrier_poll_pause();
    }
  }
  const int items = (t_end - t_begin) * kV2BatchTile * Kw;
  for (int idx = threadIdx.x; idx < items; idx += blockDim.x) {
    const int row = idx / Kw, kw = idx - row * Kw;  // row: the sequence's index within the group
    const int tile = t_begin + row / kV2BatchTile, n = tile * kV2BatchTile + row % kV2BatchTile;
    const int f = flags_s[tile];
    if (!(f & kTileActive) || (f & kTileFromRing) || n >= p.batch) continue;
    ring_s[v2_cluster_word(p, slot, row, kw)] = (f & kTileFromH0) ? v2_h0_payload<T, kEpw>(p, a, n, d, kw) : 0u;
  }
  return false;
}

// Epilogue operands of one item (sequence n, state word rw) at position pos: forward u, backward dy
// and y; zero outside the sequence. Each thread loads its first item's before the chunk's wait, so
// that their latency hides behind the exchange instead of following it.
template <typename T, bool kBackward, int kEpw>
__device__ __forceinline__ void v2_epilogue_operands(const PlanV2& p, const KernelArgs& a, int d, int row0, int rows,
                                                     int pos, int n, int L, int rw, float (&x)[kEpw], float (&yv)[kEpw]) {
#pragma unroll
  for (int e = 0; e < kEpw; ++e) {
    x[e] = 0.0f;
    yv[e] = 0.0f;
    const int r = rw * kEpw + e;
    if (r >= rows || pos < 0 || pos >= L) continue;
    const int t = d == 0 ? pos : L - 1 - pos;
    const size_t o = static_cast<size_t>(t) * p.batch * p.directions * p.hidden +
                     (static_cast<size_t>(n) * p.directions + d) * p.hidden + row0 + r;
    if (!kBackward) {
      x[e] = Elem<T>::load(static_cast<const T*>(a.u) + o);
    } else {
      x[e] = Elem<T>::load(static_cast<const T*>(a.dy) + o);
      yv[e] = Elem<T>::load(static_cast<const T*>(a.y_in) + o);
    }
  }
}

template <typename T, int kPrec, int kRegSteps, bool kBackward>
__global__ void __launch_bounds__(kKernelMaxThreads, 1)
persistent_rnn_v2_kernel(const PlanV2 p, const KernelArgs a) {
  unsigned char* smem = dynamic_smem();
  uint4* a_s = reinterpret_cast<uint4*>(smem + p.smem_a_offset);      // [warps][smem_steps][32] x 4 registers
  float* red_s = reinterpret_cast<float*>(smem + p.smem_red_offset);  // [k_splits][chunk_tiles*8][rows_per_block]
  unsigned long long* b_s = reinterpret_cast<unsigned long long*>(smem + p.smem_b_offset);  // ring mode: [chunk_tiles*8][b_row_words]
  uint32_t* ring_s = reinterpret_cast<uint32_t*>(smem + p.smem_b_offset);  // cluster mode: [2][group_tiles*8][b_row_words]
  unsigned long long* bars = reinterpret_cast<unsigned long long*>(smem + p.smem_bar_offset);  // cluster: one per slot
  uint32_t* beats = reinterpret_cast<uint32_t*>(bars + kV2RingSlots);  // cluster: [slot][kV2MaxClusterBlocks]
  int* len_s = reinterpret_cast<int*>(smem + p.smem_len_offset);      // [batch_padded], then flags [n_tiles]
  int* flags_s = len_s + p.batch_padded;

  const int H = p.hidden, N = p.batch, D = p.directions, T_steps = p.time_steps;
  const int d = v2_direction(p, blockIdx.x), g = v2_group(p, blockIdx.x);
  const bool cluster = p.mode == kV2ModeCluster;  // block-uniform
  const int t_begin = v2_tile_begin(p, g), t_end = v2_tile_end(p, g);  // this block's n tiles
  const int row0 = v2_row_begin(p, blockIdx.x);
  const int rows = v2_rows_in_block(p, blockIdx.x);
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  const int mt = v2_warp_m_tile(p, warp), ks = v2_warp_k_split(p, warp);
  const int step0 = v2_k_step_begin(p, ks), my_steps = v2_k_steps_in_split(p, ks);
  const int R = p.rows_per_block, chunk_n = p.chunk_tiles * kV2BatchTile;
  const size_t step_elems = static_cast<size_t>(N) * D * H;
  constexpr int kEpw = kPrec == kV2Mma16 ? 2 : 1;  // state rows per exchange word
  const bool publishes = static_cast<int>(blockIdx.x) != a.fault_skip_block;

  for (int i = threadIdx.x; i < p.batch_padded; i += blockDim.x) len_s[i] = i < N ? sequence_length(a, i, T_steps) : 0;

  // The warp's A fragments: the first kRegSteps k steps in registers, the rest in shared memory.
  uint32_t a_reg[kRegSteps][4];
#pragma unroll
  for (int i = 0; i < kRegSteps; ++i)
#pragma unroll
    for (int r = 0; r < 4; ++r)
      a_reg[i][r] = i < my_steps ? v2_a_register<T, kPrec, kBackward>(p, a, d, row0, rows, mt, step0 + i, lane, r) : 0u;
  for (int i = kRegSteps; i < my_steps; ++i) {
    uint4 v;
    v.x = v2_a_register<T, kPrec, kBackward>(p, a, d, row0, rows, mt, step0 + i, lane, 0);
    v.y = v2_a_register<T, kPrec, kBackward>(p, a, d, row0, rows, mt, step0 + i, lane, 1);
    v.z = v2_a_register<T, kPrec, kBackward>(p, a, d, row0, rows, mt, step0 + i, lane, 2);
    v.w = v2_a_register<T, kPrec, kBackward>(p, a, d, row0, rows, mt, step0 + i, lane, 3);
    a_s[(warp * p.smem_steps + (i - kRegSteps)) * kWarpSize + lane] = v;
  }

  if (!kBackward && a.h_last != nullptr) {  // sequences of length 0 never step: their last state is h0
    const int n_begin = t_begin * kV2BatchTile, n_count = min(N, t_end * kV2BatchTile) - n_begin;  // the group's
    for (int idx = threadIdx.x; idx < rows * n_count; idx += blockDim.x) {
      const int n = n_begin + idx / rows, i = row0 + idx % rows;
      if (sequence_length(a, n, T_steps) == 0) {
        const size_t o = (static_cast<size_t>(n) * D + d) * H + i;
        Elem<T>::store(static_cast<T*>(a.h_last) + o, a.h0 != nullptr ? Elem<T>::load(static_cast<const T*>(a.h0) + o) : 0.0f);
      }
    }
  }
  if (cluster) {  // zeroed rings (the MMA reads the padding, which no one writes) and initialised
                  // barriers in every block before any peer pushes
    const int ring_words = v2_cluster_ring_rows(p) * p.b_row_words;
    for (int i = threadIdx.x; i < ring_words; i += blockDim.x) ring_s[i] = 0u;
    if (threadIdx.x == 0) {
      for (int slot = 0; slot < kV2RingSlots; ++slot) mbar_init(bars + slot, 1);
      mbar_init_fence();
    }
    cluster_sync_all();
  }
  __syncthreads();

  const int steps = kBackward ? (a.dh0 != nullptr ? T_steps + 1 : T_steps) : T_steps;
  for (int s = 0; s < steps; ++s) {
    const int pos = kBackward ? T_steps - 1 - s : s;     // -1: the dh0 step
    const int prev_pos = kBackward ? pos + 1 : pos - 1;  // the position step s-1 handled
    const int next_pos = kBackward ? pos - 1 : pos + 1;  // and step s+1
    for (int tile = t_begin + static_cast<int>(threadIdx.x); tile < t_end; tile += blockDim.x) {
      int f = 0;
      if (v2_tile_active(p, len_s, tile, pos)) {
        f = kTileActive;
        if (s > 0 && v2_tile_active(p, len_s, tile, prev_pos)) f |= kTileFromRing;
        if (s == 0 && !kBackward && a.h0 != nullptr) f |= kTileFromH0;
        if (s + 1 < steps && v2_tile_active(p, len_s, tile, next_pos)) f |= kTileToNext;
      }
      flags_s[tile] = f;
    }
    __syncthreads();
    for (int c0 = t_begin; c0 < t_end; c0 += p.chunk_tiles) {
      const int tiles_here = min(p.chunk_tiles, t_end - c0);
      const int row_words = (rows + kEpw - 1) / kEpw;
      const int items = row_words * tiles_here * kV2BatchTile;  // epilogue items of the chunk
      float pre_x[kEpw], pre_y[kEpw];                            // this thread's first item's operands
      {
        const int j = threadIdx.x / row_words, rw = threadIdx.x - j * row_words;
        const int n = c0 * kV2BatchTile + j;
        const int L = (static_cast<int>(threadIdx.x) < items && n < N) ? len_s[n] : 0;
        v2_epilogue_operands<T, kBackward, kEpw>(p, a, d, row0, rows, pos, n, L, rw, pre_x, pre_y);
      }
      // Ring mode: stage the previous state of the chunk (one round trip to L2 for all of it).
      // Cluster mode: before the group's first chunk, wait until the whole step has landed in this
      // block's ring.
      const bool abandon = cluster ? (c0 == t_begin && v2_cluster_wait<T, kPrec>(p, a, ring_s, bars, flags_s, t_begin,
                                                                                 t_end, s, d))
                                   : v2_stage<T, kPrec>(p, a, b_s, flags_s, c0, tiles_here, s, d, g);
      if (__syncthreads_or(abandon)) goto leave;
      // Where the chunk's B payloads are, in 4-byte units: the staged tagged words (payload first, wu
      // = 2 units a word), or (cluster) the ring slot in place (wu = 1).
      const int wu = p.b_word_bytes / 4;
      const uint32_t* b_chunk = cluster ? ring_s + v2_cluster_word(p, (s - 1) & 1, (c0 - t_begin) * kV2BatchTile, 0)
                                        : reinterpret_cast<const uint32_t*>(b_s);

      // Matrix phase: every warp, every tile with an input, its m tile over its k range.
      for (int tt = 0; tt < tiles_here; ++tt) {
        if (!(flags_s[c0 + tt] & (kTileFromRing | kTileFromH0))) continue;  // block-uniform: zero input
        // Two accumulators (even and odd k steps) halve the chain of dependent MMAs (not for 3xTF32,
        // whose extra registers spill on sm_80; its three MMAs per step are a chain either way).
        constexpr bool kDual = kPrec != kV2Tf32x3;
        float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f}, acc_odd[4] = {0.0f, 0.0f, 0.0f, 0.0f};
        const uint32_t* b_row = b_chunk + ((tt * kV2BatchTile + frag::group_id(lane)) * p.b_row_words + (lane & 3)) * wu;
#pragma unroll
        for (int i = 0; i < kRegSteps; ++i) {
          if (i < my_steps) {  // warp-uniform
            const uint32_t b[2] = {b_row[wu * ((step0 + i) * 8)], b_row[wu * ((step0 + i) * 8 + 4)]};
            v2_mma<T, kPrec>((kDual && (i & 1)) ? acc_odd : acc, a_reg[i], b);
          }
        }
        // Shared-memory steps in pairs (kRegSteps is even), so that each accumulator is named at
        // compile time (an array picked at run time would live in local memory).
        for (int i = kRegSteps; i < my_steps; i += 2) {
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            if (h == 1 && i + 1 >= my_steps) break;
            const uint4 v = a_s[(warp * p.smem_steps + (i + h - kRegSteps)) * kWarpSize + lane];
            const uint32_t af[4] = {v.x, v.y, v.z, v.w};
            const uint32_t b[2] = {b_row[wu * ((step0 + i + h) * 8)], b_row[wu * ((step0 + i + h) * 8 + 4)]};
            v2_mma<T, kPrec>((kDual && h == 1) ? acc_odd : acc, af, b);
          }
        }
#pragma unroll
        for (int i = 0; i < 4; ++i) acc[i] += acc_odd[i];
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          const frag::Coord c = frag::c16x8(lane, i);
          red_s[(ks * chunk_n + tt * kV2BatchTile + c.col) * R + mt * kV2RowTile + c.row] = acc[i];
        }
      }
      __syncthreads();
      if (cluster) fence_cluster();  // the block's reads of the slot come before its stores into peers

      // Epilogue: one thread per (row word, sequence): sum the k-split partials, apply the
      // activation (or its derivative), write the outputs and publish the word for the next step.
      for (int idx = threadIdx.x; idx < items; idx += blockDim.x) {
        const int j = idx / row_words, rw = idx - j * row_words;
        const int n = c0 * kV2BatchTile + j;
        if (n >= N) continue;
        const int L = len_s[n];
        const int f = flags_s[c0 + j / kV2BatchTile];
        const bool has_input = (f & (kTileFromRing | kTileFromH0)) != 0;
        const size_t nd = (static_cast<size_t>(n) * D + d) * H;  // + row: offset within a [N,D,H] slab
        float x[kEpw], yv[kEpw];
        if (idx == static_cast<int>(threadIdx.x)) {
#pragma unroll
          for (int e = 0; e < kEpw; ++e) x[e] = pre_x[e], yv[e] = pre_y[e];
        } else {
          v2_epilogue_operands<T, kBackward, kEpw>(p, a, d, row0, rows, pos, n, L, rw, x, yv);
        }
        float out[kEpw];
#pragma unroll
        for (int e = 0; e < kEpw; ++e) {
          const int r = rw * kEpw + e, i = row0 + r;
          out[e] = 0.0f;
          if (r >= rows) continue;
          float acc = 0.0f;
          if (has_input)
            for (int q = 0; q < p.k_splits; ++q) acc += red_s[(q * chunk_n + j) * R + r];
          if (!kBackward) {
            if (pos < L) {
              const int t = d == 0 ? pos : L - 1 - pos;
              const size_t o = static_cast<size_t>(t) * step_elems + nd + i;
              const float h = activate(a.activation, x[e] + acc);
              Elem<T>::store(static_cast<T*>(a.y) + o, h);
              if (pos == L - 1 && a.h_last != nullptr) Elem<T>::store(static_cast<T*>(a.h_last) + nd + i, h);
              out[e] = h;
            } else {
              Elem<T>::store(static_cast<T*>(a.y) + static_cast<size_t>(pos) * step_elems + nd + i, 0.0f);
            }
          } else if (pos < 0) {  // dh0 = W^T du_0 (+ dh_last for empty sequences)
            float g = acc;
            if (L == 0 && a.dh_last != nullptr) g += Elem<T>::load(static_cast<const T*>(a.dh_last) + nd + i);
            Elem<T>::store(static_cast<T*>(a.dh0) + nd + i, g);
          } else if (pos < L) {
            const int t = d == 0 ? pos : L - 1 - pos;
            const size_t o = static_cast<size_t>(t) * step_elems + nd + i;
            float g = x[e] + acc;
            if (pos == L - 1 && a.dh_last != nullptr) g += Elem<T>::load(static_cast<const T*>(a.dh_last) + nd + i);
            const float du = g * activation_grad_from_output(a.activation, yv[e]);
            Elem<T>::store(static_cast<T*>(a.du) + o, du);
            out[e] = du;
          } else {
            Elem<T>::store(static_cast<T*>(a.du) + static_cast<size_t>(pos) * step_elems + nd + i, 0.0f);
          }
        }
        if ((f & kTileToNext) && publishes) {  // only what step s+1 reads (its kTileFromRing tiles)
          const uint32_t payload = v2_payload<T>(out[0], out[kEpw - 1]);
          const int kw = (row0 + rw * kEpw) / kEpw;
          if (cluster) {  // into every block of the cluster (this one too), slot s & 1, its (s/2)-th phase
            uint32_t* local = ring_s + v2_cluster_word(p, s & 1, n - t_begin * kV2BatchTile, kw);
            for (int r = 0; r < p.blocks_per_dir; ++r)
              cluster_push(local, bars + (s & 1), static_cast<unsigned int>(r), payload, static_cast<unsigned int>(s >> 1));
          } else {
            ring_store(a.ring + v2_ring_index(p, s & 1, d, n, kw), v2_word(static_cast<unsigned int>(s + 1), payload));
          }
        }
      }
      __syncthreads();  // red_s, b_s and flags_s are reused
    }
    // Cluster mode: a heartbeat into every block's slot s & 1, after this block's last read of the step.
    // Without it a step whose group has no ring input (tiles that all begin late, backward) would expect
    // 0 bytes and need no peer: blocks would run ahead, and a push could land in a phase of its
    // receiver's barrier that has not completed yet (the CPU emulation's protocol run caught that).
    if (cluster && threadIdx.x == 0 && s + 1 < steps && publishes) {
      fence_cluster();
      const unsigned int rank = blockIdx.x % static_cast<unsigned int>(p.blocks_per_dir);
      for (int r = 0; r < p.blocks_per_dir; ++r)
        cluster_push(beats + (s & 1) * kV2MaxClusterBlocks + rank, bars + (s & 1), static_cast<unsigned int>(r),
                     static_cast<uint32_t>(s + 1), static_cast<unsigned int>(s >> 1));
    }
  }
leave:
  // Cluster mode: no block leaves while a peer may still store into its shared memory.
  if (cluster) cluster_sync_all();
}

// Kernel entry points (prnn_v2_forward.cu / prnn_v2_backward.cu); null for an unknown combination.
const void* forward_kernel_v2(prnnDataType_t dtype, int precision, int reg_steps);
const void* backward_kernel_v2(prnnDataType_t dtype, int precision, int reg_steps);

#ifndef PRNN_HOST_EMULATION
template <bool kBackward>
const void* select_kernel_v2(prnnDataType_t dtype, int precision, int reg_steps) {
#define PRNN_V2_REG_STEPS(T, PREC)                                                                    \
  switch (reg_steps) {                                                                                \
    case 4: return reinterpret_cast<const void*>(&persistent_rnn_v2_kernel<T, PREC, 4, kBackward>);   \
    case 8: return reinterpret_cast<const void*>(&persistent_rnn_v2_kernel<T, PREC, 8, kBackward>);   \
    default: return nullptr;                                                                          \
  }
  switch (dtype) {
    case PRNN_DATA_BFLOAT16:
      if (precision != kV2Mma16) return nullptr;
      PRNN_V2_REG_STEPS(__nv_bfloat16, kV2Mma16)
    case PRNN_DATA_HALF:
      if (precision != kV2Mma16) return nullptr;
      PRNN_V2_REG_STEPS(__half, kV2Mma16)
    case PRNN_DATA_FLOAT:
      if (precision == kV2Tf32) PRNN_V2_REG_STEPS(float, kV2Tf32)
      if (precision == kV2Tf32x3)  // 4 register steps only: 8 spill (ptxas); the planner never asks for them
        return reg_steps == 4 ? reinterpret_cast<const void*>(&persistent_rnn_v2_kernel<float, kV2Tf32x3, 4, kBackward>)
                              : nullptr;
      return nullptr;
    default: return nullptr;
  }
#undef PRNN_V2_REG_STEPS
}
#endif  // PRNN_HOST_EMULATION

}  // namespace prnn
