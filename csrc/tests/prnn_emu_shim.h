// prnn_emu_shim.h - what CUDA gives a kernel, for CPU threads: the shim the emulation tests use to
// run the kernels of prnn_kernels.cuh and prnn_v2.cuh as written, one POSIX thread per CUDA thread.
//
// std::barrier for __syncthreads, per-warp barriers for the warp-collective operations (shuffles,
// votes, and mma.sync, which gathers the 32 lanes' fragments and multiplies the whole matrices),
// std::atomic_ref for the device atomics, a steady clock for %globaltimer. Include it first after
// prnn.h (the CUDA headers define the qualifiers it replaces), then the kernel headers.
#pragma once

#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <barrier>
#include <chrono>
#include <memory>
#include <random>
#include <thread>
#include <vector>

// ---- the shim ---------------------------------------------------------------------------------
#undef __global__
#undef __device__
#undef __host__
#undef __forceinline__
#undef __launch_bounds__
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)

struct EmuDim {
  unsigned int x = 0, y = 0, z = 0;
};
thread_local EmuDim threadIdx, blockIdx;
EmuDim blockDim, gridDim;

struct EmuWarp {
  std::barrier<> sync{32};
  float slots[32] = {};
  alignas(16) unsigned char scratch[2048] = {};  // warp-collective operands (votes, mma fragments)
};

// A block's shared memory is its own vector, or (clusters: the peers address each other's) a slice of
// one buffer that the launcher owns; either way it starts as 0xFF bytes.
struct EmuBlock {
  std::barrier<> sync;
  std::vector<std::unique_ptr<EmuWarp>> warps;
  std::vector<unsigned char> smem;
  unsigned char* smem_base;
  std::atomic<int> votes[2] = {0, 0};  // __syncthreads_or, alternating between calls
  EmuBlock(int threads, size_t smem_bytes, unsigned char* external = nullptr)
      : sync(threads), smem(external != nullptr ? 0 : smem_bytes, 0xFF), smem_base(external != nullptr ? external : smem.data()) {
    if (external != nullptr) memset(external, 0xFF, smem_bytes);
    for (int w = 0; w < threads / 32; ++w) warps.push_back(std::make_unique<EmuWarp>());
  }
};
thread_local EmuBlock* g_block = nullptr;
// A thread-block cluster: barrier.cluster over all threads of its blocks.
struct EmuCluster {
  std::barrier<> sync;
  explicit EmuCluster(int threads) : sync(threads) {}
};
thread_local EmuCluster* g_cluster = nullptr;
thread_local unsigned int g_or_calls = 0;

inline void __syncthreads() { g_block->sync.arrive_and_wait(); }
// Each call uses votes[parity]; thread 0 clears the other slot between the two barriers, when no
// thread can be using it (the previous call's readers are past, the next call's voters not yet in).
inline int __syncthreads_or(int predicate) {
  EmuBlock& b = *g_block;
  const unsigned int parity = g_or_calls++ & 1u;
  if (predicate) b.votes[parity].store(1);
  b.sync.arrive_and_wait();
  const int result = b.votes[parity].load();
  if (threadIdx.x == 0) b.votes[parity ^ 1u].store(0);
  b.sync.arrive_and_wait();
  return result;
}
inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }
inline unsigned int atomicAdd(unsigned int* p, unsigned int v) {
  return std::atomic_ref<unsigned int>(*p).fetch_add(v, std::memory_order_acq_rel);
}
inline unsigned int atomicCAS(unsigned int* p, unsigned int expected, unsigned int desired) {
  std::atomic_ref<unsigned int>(*p).compare_exchange_strong(expected, desired, std::memory_order_acq_rel);
  return expected;  // the old value, as CUDA's atomicCAS returns it
}
inline unsigned int load_acquire_gpu(const unsigned int* p) {
  return std::atomic_ref<unsigned int>(*const_cast<unsigned int*>(p)).load(std::memory_order_acquire);
}
inline unsigned long long global_timer_ns() {
  return static_cast<unsigned long long>(
      std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch()).count());
}
// Thousands of OS threads share 2 cores: a polling thread sleeps so that the others can arrive.
// Tens of thousands of threads, as in a real device's grid, need more: consecutive polls (less than
// 1 ms apart) double the pause up to g_poll_pause_max_us (by default no growth).
inline std::atomic<int> g_poll_pause_us{200};
inline std::atomic<int> g_poll_pause_max_us{200};
inline void barrier_poll_pause() {
  thread_local int pause_us = 0;
  thread_local std::chrono::steady_clock::time_point last_end{};
  const auto now = std::chrono::steady_clock::now();
  if (pause_us == 0 || now - last_end > std::chrono::milliseconds(1)) {
    pause_us = g_poll_pause_us.load();
  } else {
    pause_us = std::min(2 * pause_us, std::max(g_poll_pause_max_us.load(), g_poll_pause_us.load()));
  }
  std::this_thread::sleep_for(std::chrono::microseconds(pause_us));
  last_end = std::chrono::steady_clock::now();
}
inline float __shfl_xor_sync(unsigned int, float v, int lane_mask) {
  EmuWarp& w = *g_block->warps[threadIdx.x / 32];
  const int lane = threadIdx.x % 32;
  w.slots[lane] = v;
  w.sync.arrive_and_wait();
  const float other = w.slots[lane ^ lane_mask];
  w.sync.arrive_and_wait();
  return other;
}
inline EmuWarp& this_warp() { return *g_block->warps[threadIdx.x / 32]; }
inline int __any_sync(unsigned int, int predicate) {
  EmuWarp& w = this_warp();
  int* votes = reinterpret_cast<int*>(w.scratch);
  votes[threadIdx.x % 32] = predicate != 0;
  w.sync.arrive_and_wait();
  int any = 0;
  for (int l = 0; l < 32; ++l) any |= votes[l];
  w.sync.arrive_and_wait();
  return any;
}
inline int __ffs(unsigned int x) { return x == 0 ? 0 : __builtin_ctz(x) + 1; }
template <typename T> inline T __ldcg(const T* p) { return *p; }
template <typename T> inline T __ldg(const T* p) { return *p; }
inline unsigned char* dynamic_smem() { return g_block->smem_base; }
using std::max;
using std::min;

