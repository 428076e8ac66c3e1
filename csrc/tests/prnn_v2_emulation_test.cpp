// prnn_v2_emulation_test.cpp - kernel v2 (prnn_v2.cuh) on CPU threads, before any GPU sees it.
//
// 1. The fragment layouts of prnn_fragments.h against the PTX ISA's tables, element by element, and
//    as bijections onto their matrices; the host roundings (tf32 cvt.rna, bf16, fp16) against
//    independent references (_Float16, exhaustive neighbours).
// 2. mma.sync emulated warp-wide (each lane deposits its registers, the warp's whole A, B and C are
//    rebuilt with the layout functions and multiplied) equals a naive GEMM bit for bit, in the
//    order this emulation defines: products exact (they are, for 16-bit and tf32 inputs), summed
//    in fp32 from C in increasing k.
// 3. The planner on A100, H100, H200 and L4 limits: every plan re-checks, names an instantiated
//    kernel, and the largest on-chip H per dtype is printed; refusals give numbers.
// 4. The whole kernel, one POSIX thread per CUDA thread, on plans of small made-up devices chosen to
//    cover: bf16, fp16, fp32 as 1xTF32 and 3xTF32; forward and backward-data (with dh0); one and two
//    directions; k split over warps; A fragments partly in shared memory; several batch chunks;
//    N not a multiple of 8, H not a multiple of 16; ragged lengths with 0 and T (tiles that end,
//    and backward, tiles that start late); h0 / dh_last; the three activations. Against a float64
//    loop that rounds the carried state to the exchange type each step, as the kernel does.
// 5. The exchange protocol against an adversarial memory: ring stores delayed by a random number
//    of later memory operations (per word in order, across words in any order) and ring loads that
//    return the word's previous value at random. Over many seeds: no protocol error (a tag above
//    the awaited one), no timeout, and outputs bitwise equal to the run on plain memory.
// 6. A block that never publishes (PRNN_FAULT=timeout's mechanism): the launch ends within its
//    bound with an exchange-timeout record naming that block.
// What it cannot show: the real memory model and L2 latency, the tensor cores' own summation order
// and rounding (hence the oracle tolerances), and speed.
// Build: g++ -std=c++20 -O2 -Wno-unknown-pragmas -pthread -DPRNN_HOST_EMULATION -I csrc -I <cuda>/include
//        csrc/prnn_planner.cpp csrc/tests/prnn_v2_emulation_test.cpp
#include "prnn.h"  // first: the CUDA headers define the qualifiers that the shim replaces

#include <sys/resource.h>

#include <fstream>
#include <map>
#include <mutex>
#include <string>

#include "prnn_emu_shim.h"
#include "prnn_fragments.h"

// ---- what prnn_v2.cuh needs beyond the v1 shim -----------------------------------------------------
struct EmuBf16 {
  uint16_t bits;
};
struct EmuHalf {
  uint16_t bits;
};
#ifndef __VECTOR_TYPES_H__
struct uint4 {
  unsigned int x, y, z, w;
};
#endif
inline uint4 make_uint4(unsigned int x, unsigned int y, unsigned int z, unsigned int w) {
  uint4 v;
  v.x = x;
  v.y = y;
  v.z = z;
  v.w = w;
  return v;
}

namespace prnn {
inline float bits_as_float(uint32_t u) { return frag::bits_float(u); }
inline uint32_t float_as_bits(float f) { return frag::float_bits(f); }
inline uint32_t tf32_bits(float x) { return frag::float_bits(frag::tf32_round_host(x)); }
inline bool warp_any(bool v) { return __any_sync(0xffffffffu, v ? 1 : 0) != 0; }

// Element decoders for the emulated MMA: the value of half `h` of a 32-bit register.
inline float emu_decode(const EmuBf16*, uint32_t reg, int h) {
  return frag::bf16_float_host(static_cast<uint16_t>(h ? reg >> 16 : reg & 0xFFFFu));
}
inline float emu_decode(const EmuHalf*, uint32_t reg, int h) {
  return frag::fp16_float_host(static_cast<uint16_t>(h ? reg >> 16 : reg & 0xFFFFu));
}

std::atomic<long long> g_tf32_unrounded{0};  // tf32 operands with low bits set: a missing cvt

// The warp-collective MMA: lanes deposit fragments, every lane rebuilds A, B, C and computes its D.
struct MmaScratch {
  uint32_t a[32][4];
  uint32_t b[32][2];
  float c[32][4];
};
static_assert(sizeof(MmaScratch) <= sizeof(EmuWarp::scratch), "scratch");

template <int kK, class DecodeA, class DecodeB>
inline void emu_mma(float (&c)[4], const uint32_t (&a)[4], const uint32_t (&b)[2], DecodeA dec_a, DecodeB dec_b) {
  EmuWarp& w = this_warp();
  MmaScratch& m = *reinterpret_cast<MmaScratch*>(w.scratch);
  const int lane = threadIdx.x % 32;
  for (int i = 0; i < 4; ++i) m.a[lane][i] = a[i], m.c[lane][i] = c[i];
  for (int i = 0; i < 2; ++i) m.b[lane][i] = b[i];
  w.sync.arrive_and_wait();
  float A[16][kK], B[kK][8], C[16][8];
  for (int l = 0; l < 32; ++l) {
    dec_a(m.a[l], l, A);
    dec_b(m.b[l], l, B);
    for (int i = 0; i < 4; ++i) {
      const frag::Coord cc = frag::c16x8(l, i);
      C[cc.row][cc.col] = m.c[l][i];
    }
  }
  w.sync.arrive_and_wait();
  for (int i = 0; i < 4; ++i) {
    const frag::Coord cc = frag::c16x8(lane, i);
    float sum = C[cc.row][cc.col];
    for (int k = 0; k < kK; ++k) sum += A[cc.row][k] * B[k][cc.col];
    c[i] = sum;
  }
}

template <typename T> void mma_16816(float (&c)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  emu_mma<16>(
      c, a, b,
      [](const uint32_t* regs, int l, float (&A)[16][16]) {
        for (int r = 0; r < 4; ++r)
          for (int h = 0; h < 2; ++h) {
            const frag::Coord x = frag::a16816(l, r, h);
            A[x.row][x.col] = emu_decode(static_cast<const T*>(nullptr), regs[r], h);
          }
      },
      [](const uint32_t* regs, int l, float (&B)[16][8]) {
        for (int r = 0; r < 2; ++r)
          for (int h = 0; h < 2; ++h) {
            const frag::Coord x = frag::b16816(l, r, h);
            B[x.row][x.col] = emu_decode(static_cast<const T*>(nullptr), regs[r], h);
          }
      });
}

inline void mma_1688_tf32(float (&c)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  emu_mma<8>(
      c, a, b,
      [](const uint32_t* regs, int l, float (&A)[16][8]) {
        for (int r = 0; r < 4; ++r) {
          const frag::Coord x = frag::a1688(l, r);
          if (regs[r] & 0x1FFFu) ++g_tf32_unrounded;
          A[x.row][x.col] = frag::bits_float(regs[r]);
        }
      },
      [](const uint32_t* regs, int l, float (&B)[8][8]) {
        for (int r = 0; r < 2; ++r) {
          const frag::Coord x = frag::b1688(l, r);
          if (regs[r] & 0x1FFFu) ++g_tf32_unrounded;
          B[x.row][x.col] = frag::bits_float(regs[r]);
        }
      });
}

// ---- the exchange ring's memory: plain, or adversarial ----------------------------------------------
struct RingMemory {
  unsigned long long* base = nullptr;
  size_t words = 0;
  bool adversarial = false;
  double p_delay = 0.0, p_stale = 0.0;
  int max_delay = 1;
  std::mutex mutex;
  struct Pending {
    size_t index;
    unsigned long long value;
    unsigned long long due;
  };
  std::vector<Pending> pending;
  std::vector<unsigned long long> previous;  // the value each word had before its last applied store
  std::map<size_t, unsigned long long> last_due;
  unsigned long long tick = 0;
  unsigned long long delayed = 0, stale = 0;
  unsigned int seed = 0;

  void apply(size_t i, unsigned long long v) {
    previous[i] = std::atomic_ref<unsigned long long>(base[i]).load();
    std::atomic_ref<unsigned long long>(base[i]).store(v);
  }
  void flush_due() {  // in list order: per word, stores land in the order they were made
    size_t keep = 0;
    for (size_t j = 0; j < pending.size(); ++j) {
      if (pending[j].due <= tick) {
        apply(pending[j].index, pending[j].value);
      } else {
        pending[keep++] = pending[j];
      }
    }
    pending.resize(keep);
  }
  void flush_all() {
    std::lock_guard<std::mutex> lock(mutex);
    for (const Pending& e : pending) apply(e.index, e.value);
    pending.clear();
  }
};
RingMemory g_ring;
thread_local std::mt19937 t_rng;
thread_local bool t_rng_seeded = false;

inline std::mt19937& thread_rng() {
  if (!t_rng_seeded) {
    t_rng.seed(g_ring.seed * 7919u + blockIdx.x * 1031u + threadIdx.x);
    t_rng_seeded = true;
  }
  return t_rng;
}

// Cluster mode's exchange: every block's ring-slot mbarriers (phase, pending arrivals, signed
// transaction count, as the PTX ISA describes them) and the st.async pushes into the peers' shared
// memory. Plain, or adversarial: a push lands (its payload, then its complete-tx on the receiver's
// barrier) up to max_delay exchange operations later, in any order across pushes, and try_wait fails
// spuriously (it may: it is a potentially blocking test with a time limit). Checked as they happen: a
// push lands in the phase it was made for (the two-slot argument), counts stay in the PTX ranges, no
// barrier is used uninitialised; and after a launch that was not abandoned, nothing is left in flight
// and every barrier is between phases with a zero count.
constexpr long long kPtxTxCountMax = (1 << 20) - 1;  // PTX ISA: tx-count lies in [-(2^20 - 1), 2^20 - 1]
struct EmuMbarrier {
  unsigned int phase = 0;  // completed phases
  int expected = 0, pending = 0;
  long long tx = 0;
};
struct ClusterExchange {
  std::mutex mutex;
  std::map<const void*, EmuMbarrier> bars;
  struct Push {
    uint32_t* word;
    uint32_t value;
    const void* bar;
    unsigned int use;
    unsigned long long due;
  };
  std::vector<Push> pending;
  bool adversarial = false;
  double p_delay = 0.0, p_spurious = 0.0;
  int max_delay = 1;
  unsigned long long tick = 0, pushes = 0, delayed = 0, spurious = 0;
  std::atomic<unsigned long long> stalls{0};
  int errors = 0;

  void error(const char* what, unsigned long long x, unsigned long long y) {  // under the mutex
    if (errors++ < 5) printf("FAIL: cluster exchange: %s (%llu, %llu)\n", what, x, y);
  }
  EmuMbarrier* find(const void* bar) {
    const auto it = bars.find(bar);
    if (it == bars.end()) {
      error("an mbarrier used before mbarrier.init", 0, 0);
      return nullptr;
    }
    return &it->second;
  }
  void complete_if_done(EmuMbarrier& b) {
    if (b.pending == 0 && b.tx == 0) {
      ++b.phase;
      b.pending = b.expected;
    }
  }
  void land(const Push& q) {
    std::atomic_ref<uint32_t>(*q.word).store(q.value);
    EmuMbarrier* b = find(q.bar);
    if (b == nullptr) return;
    if (b->phase != q.use) error("a push landed in another phase than its own (phase, push's)", b->phase, q.use);
    b->tx -= 4;
    if (b->tx < -kPtxTxCountMax) error("transaction count below -(2^20 - 1)", 0, 0);
    complete_if_done(*b);
  }
  void flush_due() {
    size_t keep = 0;
    for (size_t j = 0; j < pending.size(); ++j) {
      if (pending[j].due <= tick) land(pending[j]);
      else pending[keep++] = pending[j];
    }
    pending.resize(keep);
  }
  void reset() {
    std::lock_guard<std::mutex> lock(mutex);
    bars.clear();
    pending.clear();
  }
  // After a launch: whatever is still in flight lands; `strict` (a launch that finished) fails on any.
  void finish(bool strict) {
    std::lock_guard<std::mutex> lock(mutex);
    if (strict && !pending.empty()) error("pushes still in flight after the launch", pending.size(), 0);
    for (const Push& q : pending) land(q);
    pending.clear();
    if (!strict) return;
    for (const auto& [bar, b] : bars)
      if (b.tx != 0 || b.pending != b.expected) error("a barrier left mid-phase (tx, pending)", b.tx, b.pending);
  }
};
ClusterExchange g_cx;

inline unsigned long long adversarial_load(RingMemory& m, const unsigned long long* p) {
  if (!m.adversarial) return std::atomic_ref<unsigned long long>(*const_cast<unsigned long long*>(p)).load();
  std::lock_guard<std::mutex> lock(m.mutex);
  ++m.tick;
  m.flush_due();
  const size_t i = static_cast<size_t>(p - m.base);
  std::uniform_real_distribution<double> u(0.0, 1.0);
  if (u(thread_rng()) < m.p_stale) {
    ++m.stale;
    return m.previous[i];
  }
  return std::atomic_ref<unsigned long long>(m.base[i]).load();
}

inline void adversarial_store(RingMemory& m, unsigned long long* p, unsigned long long v) {
  if (!m.adversarial) {
    std::atomic_ref<unsigned long long>(*p).store(v);
    return;
  }
  std::lock_guard<std::mutex> lock(m.mutex);
  ++m.tick;
  const size_t i = static_cast<size_t>(p - m.base);
  std::uniform_real_distribution<double> u(0.0, 1.0);
  const auto last = m.last_due.find(i);
  const bool queued = last != m.last_due.end() && last->second > m.tick;
  if (queued || u(thread_rng()) < m.p_delay) {
    unsigned long long due = m.tick + 1 + thread_rng()() % m.max_delay;
    if (queued && last->second > due) due = last->second;  // never overtakes an earlier store to this word
    m.pending.push_back({i, v, due});
    m.last_due[i] = due;
    ++m.delayed;
  } else {
    m.apply(i, v);
  }
  m.flush_due();
}

inline unsigned long long ring_load(const unsigned long long* p) { return adversarial_load(g_ring, p); }
inline void ring_store(unsigned long long* p, unsigned long long v) { adversarial_store(g_ring, p, v); }

// Cluster mode: blocks are laid out g_smem_stride bytes apart in one buffer, so a peer's word is at
// the same offset in its slice (what mapa computes on the GPU); clusters are g_cluster_blocks
// consecutive blocks (1-D clusters, rank = blockIdx.x % size).
size_t g_smem_stride = 0;
int g_cluster_blocks = 1;
inline void cluster_sync_all() { g_cluster->sync.arrive_and_wait(); }
inline void fence_cluster() { std::atomic_thread_fence(std::memory_order_seq_cst); }
// mapa: the same offset in block `rank` of this block's cluster.
template <typename P> P* cluster_peer(P* local, unsigned int rank) {
  if (rank >= static_cast<unsigned int>(g_cluster_blocks)) {
    printf("FAIL: cluster access to rank %u of a %d-block cluster\n", rank, g_cluster_blocks);
    exit(1);
  }
  const long long peer = static_cast<long long>(blockIdx.x / g_cluster_blocks) * g_cluster_blocks + rank;
  return reinterpret_cast<P*>(reinterpret_cast<unsigned char*>(local) +
                              (peer - static_cast<long long>(blockIdx.x)) * static_cast<long long>(g_smem_stride));
}
inline void mbar_init(unsigned long long* bar, unsigned int count) {
  std::lock_guard<std::mutex> lock(g_cx.mutex);
  EmuMbarrier b;
  b.expected = b.pending = static_cast<int>(count);
  g_cx.bars[bar] = b;
}
inline void mbar_init_fence() {}
inline void mbar_arrive_expect_tx(unsigned long long* bar, unsigned int bytes) {
  // Adversarial: a block is slow to reach a step now and then (its arming thread stalls), so that its
  // peers run ahead of it wherever the protocol lets them.
  if (g_cx.adversarial && std::uniform_real_distribution<double>(0.0, 1.0)(thread_rng()) < 0.1) {
    g_cx.stalls.fetch_add(1);
    std::this_thread::sleep_for(std::chrono::milliseconds(30));
  }
  std::lock_guard<std::mutex> lock(g_cx.mutex);
  ++g_cx.tick;
  g_cx.flush_due();
  EmuMbarrier* b = g_cx.find(bar);
  if (b == nullptr) return;
  b->tx += bytes;
  if (b->tx > kPtxTxCountMax) g_cx.error("transaction count above 2^20 - 1", static_cast<unsigned long long>(b->tx), 0);
  if (--b->pending < 0) g_cx.error("more arrivals than the barrier expects", 0, 0);
  g_cx.complete_if_done(*b);
}
inline bool mbar_try_wait(unsigned long long* bar, unsigned int parity) {
  std::lock_guard<std::mutex> lock(g_cx.mutex);
  ++g_cx.tick;
  g_cx.flush_due();
  EmuMbarrier* b = g_cx.find(bar);
  if (b == nullptr) return false;
  if (g_cx.adversarial && std::uniform_real_distribution<double>(0.0, 1.0)(thread_rng()) < g_cx.p_spurious) {
    ++g_cx.spurious;
    return false;
  }
  return (b->phase & 1u) != parity;  // the phase of that parity has completed
}
inline void cluster_push(uint32_t* local, unsigned long long* local_bar, unsigned int rank, uint32_t v, unsigned int use) {
  ClusterExchange::Push q = {cluster_peer(local, rank), v, cluster_peer(local_bar, rank), use, 0};
  std::lock_guard<std::mutex> lock(g_cx.mutex);
  ++g_cx.tick;
  ++g_cx.pushes;
  if (g_cx.adversarial && std::uniform_real_distribution<double>(0.0, 1.0)(thread_rng()) < g_cx.p_delay) {
    q.due = g_cx.tick + 1 + thread_rng()() % g_cx.max_delay;
    g_cx.pending.push_back(q);
    ++g_cx.delayed;
  } else {
    g_cx.land(q);
  }
  g_cx.flush_due();
}

// cp.async of two exchange words: each read through the (possibly adversarial) ring memory.
inline void async_copy16(void* dst, const void* src) {
  auto* d = static_cast<unsigned long long*>(dst);
  const auto* from = static_cast<const unsigned long long*>(src);
  d[0] = ring_load(from);
  d[1] = ring_load(from + 1);
}
inline void async_copy_wait_all() {}

}  // namespace prnn

#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wunknown-pragmas"
#pragma GCC diagnostic ignored "-Wunused-parameter"
#pragma GCC diagnostic ignored "-Wunused-variable"
#include "prnn_v2.cuh"
#include "prnn_oracle.h"
#include "prnn_expect.h"  // g_failures
#pragma GCC diagnostic pop

namespace prnn {
template <> struct Elem<EmuBf16> {
  static float load(const EmuBf16* p) { return frag::bf16_float_host(p->bits); }
  static void store(EmuBf16* p, float v) { p->bits = frag::bf16_bits_host(v); }
  static uint32_t pack(float lo, float hi) {
    return static_cast<uint32_t>(frag::bf16_bits_host(lo)) | (static_cast<uint32_t>(frag::bf16_bits_host(hi)) << 16);
  }
};
template <> struct Elem<EmuHalf> {
  static float load(const EmuHalf* p) { return frag::fp16_float_host(p->bits); }
  static void store(EmuHalf* p, float v) { p->bits = frag::fp16_bits_host(v); }
  static uint32_t pack(float lo, float hi) {
    return static_cast<uint32_t>(frag::fp16_bits_host(lo)) | (static_cast<uint32_t>(frag::fp16_bits_host(hi)) << 16);
  }
};
}  // namespace prnn

// ---- the tests ---------------------------------------------------------------------------------------
namespace {

using prnn::DeviceLimits;
using prnn::KernelArgs;
using prnn::PlanV2;
using prnn::g_ring;
using prnn::RingMemory;
namespace frag = prnn::frag;

constexpr size_t kThreadStackBytes = 256 * 1024;
constexpr unsigned long long kLongTimeoutNs = 600ull * 1000 * 1000 * 1000;
constexpr unsigned long long kFaultTimeoutNs = 300ull * 1000 * 1000;

// ---- 1. layouts and roundings ----
void test_layouts() {
  // The PTX ISA's formulas, written out here independently of prnn_fragments.h's bit tricks.
  for (int lane = 0; lane < 32; ++lane) {
    const int g = lane / 4, t = lane % 4;
    for (int i = 0; i < 8; ++i) {  // m16n8k16 A element a_i = register i/2, half i%2
      const int row = (i < 2 || (i >= 4 && i < 6)) ? g : g + 8;
      const int col = t * 2 + (i & 1) + (i >= 4 ? 8 : 0);
      const frag::Coord c = frag::a16816(lane, i / 2, i % 2);
      EXPECT(c.row == row && c.col == col, "a16816 lane %d a%d: (%d,%d), PTX (%d,%d)", lane, i, c.row, c.col, row, col);
    }
    for (int i = 0; i < 4; ++i) {  // m16n8k16 B element b_i
      const int row = t * 2 + (i & 1) + (i >= 2 ? 8 : 0), col = g;
      const frag::Coord c = frag::b16816(lane, i / 2, i % 2);
      EXPECT(c.row == row && c.col == col, "b16816 lane %d b%d", lane, i);
    }
    for (int i = 0; i < 4; ++i) {  // m16n8k8 tf32 A, B and the C/D of both
      const frag::Coord a = frag::a1688(lane, i);
      EXPECT(a.row == ((i == 0 || i == 2) ? g : g + 8) && a.col == ((i < 2) ? t : t + 4), "a1688 lane %d a%d", lane, i);
      const frag::Coord c = frag::c16x8(lane, i);
      EXPECT(c.row == (i < 2 ? g : g + 8) && c.col == t * 2 + (i & 1), "c16x8 lane %d c%d", lane, i);
    }
    for (int i = 0; i < 2; ++i) {
      const frag::Coord b = frag::b1688(lane, i);
      EXPECT(b.row == (i == 0 ? t : t + 4) && b.col == g, "b1688 lane %d b%d", lane, i);
    }
  }
  // Bijections: every element of every operand is held by exactly one (lane, register, half).
  int a16[16][16] = {}, b16[16][8] = {}, a8[16][8] = {}, b8[8][8] = {}, c8[16][8] = {};
  for (int lane = 0; lane < 32; ++lane) {
    for (int r = 0; r < 4; ++r)
      for (int h = 0; h < 2; ++h) ++a16[frag::a16816(lane, r, h).row][frag::a16816(lane, r, h).col];
    for (int r = 0; r < 2; ++r)
      for (int h = 0; h < 2; ++h) ++b16[frag::b16816(lane, r, h).row][frag::b16816(lane, r, h).col];
    for (int r = 0; r < 4; ++r) ++a8[frag::a1688(lane, r).row][frag::a1688(lane, r).col];
    for (int r = 0; r < 2; ++r) ++b8[frag::b1688(lane, r).row][frag::b1688(lane, r).col];
    for (int r = 0; r < 4; ++r) ++c8[frag::c16x8(lane, r).row][frag::c16x8(lane, r).col];
  }
  bool once = true;
  for (int i = 0; i < 16; ++i)
    for (int j = 0; j < 16; ++j) once &= a16[i][j] == 1 && (j >= 8 || (b16[i][j] == 1 && a8[i][j] == 1 && c8[i][j] == 1));
  for (int i = 0; i < 8; ++i)
    for (int j = 0; j < 8; ++j) once &= b8[i][j] == 1;
  EXPECT(once, "a fragment layout is not a bijection onto its matrix");

  // tf32 rounding: ties away from zero at bit 12, low 13 bits cleared.
  EXPECT(frag::tf32_round_host(1.0f + 0x1p-11f) == 1.0f + 0x1p-10f, "tf32: a tie rounds away from zero");
  EXPECT(frag::tf32_round_host(-(1.0f + 0x1p-11f)) == -(1.0f + 0x1p-10f), "tf32: negative tie");
  EXPECT(frag::tf32_round_host(1.0f + 0x1p-12f) == 1.0f, "tf32: below half rounds down");
  EXPECT(frag::tf32_round_host(1.0f + 0x1p-11f + 0x1p-20f) == 1.0f + 0x1p-10f, "tf32: above half rounds up");
  std::mt19937 rng(7);
  int bad16 = 0, bad_bf = 0, bad_tf = 0;
  for (int i = 0; i < 200000; ++i) {
    uint32_t bits = rng();
    if (i < 70000) bits = (bits & 0x807FFFFFu) | ((96u + rng() % 50u) << 23);  // fp16's range and subnormals
    const float f = frag::bits_float(bits);
    if (isnan(f)) continue;
    // fp16 against the compiler's _Float16 (IEEE binary16, round to nearest even)
    const _Float16 ref = static_cast<_Float16>(f);
    uint16_t ref_bits;
    memcpy(&ref_bits, &ref, 2);
    if (frag::fp16_bits_host(f) != ref_bits) ++bad16;
    if (!isinf(f) && frag::fp16_float_host(ref_bits) != static_cast<float>(ref)) ++bad16;
    // bf16: the nearer of the two neighbours, ties to even, by exact arithmetic in double
    if (!isinf(f) && fabsf(f) < 3.0e38f) {
      const uint16_t lo = static_cast<uint16_t>(bits >> 16);
      const double a = frag::bf16_float_host(lo), b = frag::bf16_float_host(static_cast<uint16_t>(lo + 1));
      const double da = fabs(f - a), db = fabs(f - b);
      const uint16_t want = da < db ? lo : db < da ? static_cast<uint16_t>(lo + 1) : ((lo & 1) ? static_cast<uint16_t>(lo + 1) : lo);
      if (frag::bf16_bits_host(f) != want) ++bad_bf;
      // tf32: the nearer neighbour on the 2^13 grid, ties away from zero
      const uint32_t tl = bits & 0xFFFFE000u;
      const double ta = frag::bits_float(tl), tb = frag::bits_float(tl + 0x2000u);
      const double ea = fabs(f - ta), eb = fabs(f - tb);
      const float twant = static_cast<float>(ea < eb ? ta : eb < ea ? tb : tb);
      if (frag::tf32_round_host(f) != twant) ++bad_tf;
    }
  }
  EXPECT(bad16 == 0, "fp16 host rounding differs from _Float16 in %d cases", bad16);
  EXPECT(bad_bf == 0, "bf16 host rounding wrong in %d cases", bad_bf);
  EXPECT(bad_tf == 0, "tf32 host rounding wrong in %d cases", bad_tf);
}

// ---- thread launching ----
// cluster_blocks > 0: the grid is cut into clusters of that many consecutive blocks, whose shared
// memories are slices of one buffer (so that peers can push into each other's).
std::vector<unsigned long long> g_cluster_smem;

template <class Body>
void run_threads(int blocks, int threads, size_t smem_bytes, Body body, int cluster_blocks = 0) {
  blockDim.x = threads;
  gridDim.x = blocks;
  std::vector<std::unique_ptr<EmuBlock>> bs;
  std::vector<std::unique_ptr<EmuCluster>> clusters;
  if (cluster_blocks > 0) {
    if (blocks % cluster_blocks != 0) {
      printf("FAIL: a grid of %d blocks is not made of clusters of %d\n", blocks, cluster_blocks);
      exit(1);
    }
    prnn::g_smem_stride = (smem_bytes + 15) / 16 * 16;
    prnn::g_cluster_blocks = cluster_blocks;
    g_cluster_smem.assign(prnn::g_smem_stride / 8 * blocks, 0ull);
    prnn::g_cx.reset();
    for (int c = 0; c < blocks / cluster_blocks; ++c) clusters.push_back(std::make_unique<EmuCluster>(cluster_blocks * threads));
  }
  for (int b = 0; b < blocks; ++b) {
    unsigned char* external =
        cluster_blocks > 0 ? reinterpret_cast<unsigned char*>(g_cluster_smem.data()) + b * prnn::g_smem_stride : nullptr;
    bs.push_back(std::make_unique<EmuBlock>(threads, smem_bytes, external));
  }
  struct Start {
    Body* body;
    EmuBlock* block;
    EmuCluster* cluster;
    unsigned int b, t;
    std::atomic<bool>* go;
  };
  std::atomic<bool> go{false};  // every thread waits until all exist (no poller starves the creation)
  std::vector<Start> starts;
  for (int b = 0; b < blocks; ++b)
    for (int t = 0; t < threads; ++t)
      starts.push_back({&body, bs[b].get(), cluster_blocks > 0 ? clusters[b / cluster_blocks].get() : nullptr,
                        static_cast<unsigned>(b), static_cast<unsigned>(t), &go});
  pthread_attr_t attr;
  pthread_attr_init(&attr);
  pthread_attr_setstacksize(&attr, kThreadStackBytes);
  std::vector<pthread_t> ids(starts.size());
  for (size_t i = 0; i < starts.size(); ++i) {
    auto entry = [](void* arg) -> void* {
      Start& s = *static_cast<Start*>(arg);
      s.go->wait(false);  // blocks (futex) instead of waking every few ms: thousands of sleepers
                          // polling a flag starved the creation of the rest (minutes for 7,200 threads)
      threadIdx.x = s.t;
      blockIdx.x = s.b;
      g_block = s.block;
      g_cluster = s.cluster;
      prnn::t_rng_seeded = false;
      (*s.body)();
      return nullptr;
    };
    if (pthread_create(&ids[i], &attr, entry, &starts[i]) != 0) {
      printf("FAIL: could not start thread %zu of %zu\n", i, starts.size());
      exit(1);
    }
  }
  go = true;
  go.notify_all();
  for (pthread_t& t : ids) pthread_join(t, nullptr);
  pthread_attr_destroy(&attr);
}

// ---- 2. one emulated mma against a naive GEMM ----
template <typename T>
void test_mma16(const char* name, std::mt19937& rng) {
  std::uniform_real_distribution<float> uni(-2.0f, 2.0f);
  float A[16][16], B[16][8], C[16][8];
  T tmp;
  for (auto& r : A)
    for (float& v : r) prnn::Elem<T>::store(&tmp, uni(rng)), v = prnn::Elem<T>::load(&tmp);
  for (auto& r : B)
    for (float& v : r) prnn::Elem<T>::store(&tmp, uni(rng)), v = prnn::Elem<T>::load(&tmp);
  for (auto& r : C)
    for (float& v : r) v = uni(rng);
  float D[16][8];
  run_threads(1, 32, 0, [&] {
    const int lane = threadIdx.x;
    uint32_t a[4], b[2];
    float c[4];
    for (int r = 0; r < 4; ++r) {
      const frag::Coord x0 = frag::a16816(lane, r, 0), x1 = frag::a16816(lane, r, 1);
      a[r] = prnn::Elem<T>::pack(A[x0.row][x0.col], A[x1.row][x1.col]);
    }
    for (int r = 0; r < 2; ++r) {
      const frag::Coord x0 = frag::b16816(lane, r, 0), x1 = frag::b16816(lane, r, 1);
      b[r] = prnn::Elem<T>::pack(B[x0.row][x0.col], B[x1.row][x1.col]);
    }
    for (int i = 0; i < 4; ++i) c[i] = C[frag::c16x8(lane, i).row][frag::c16x8(lane, i).col];
    prnn::mma_16816<T>(c, a, b);
    for (int i = 0; i < 4; ++i) D[frag::c16x8(lane, i).row][frag::c16x8(lane, i).col] = c[i];
  });
  int bad = 0;
  for (int m = 0; m < 16; ++m)
    for (int n = 0; n < 8; ++n) {
      float sum = C[m][n];
      for (int k = 0; k < 16; ++k) sum += A[m][k] * B[k][n];
      bad += memcmp(&sum, &D[m][n], 4) != 0;
    }
  EXPECT(bad == 0, "%s: emulated mma differs from the naive GEMM in %d of 128 elements", name, bad);
}

void test_mma_tf32(std::mt19937& rng) {
  std::uniform_real_distribution<float> uni(-2.0f, 2.0f);
  float A[16][8], B[8][8], C[16][8], D[16][8];
  for (auto& r : A)
    for (float& v : r) v = frag::tf32_round_host(uni(rng));
  for (auto& r : B)
    for (float& v : r) v = frag::tf32_round_host(uni(rng));
  for (auto& r : C)
    for (float& v : r) v = uni(rng);
  run_threads(1, 32, 0, [&] {
    const int lane = threadIdx.x;
    uint32_t a[4], b[2];
    float c[4];
    for (int r = 0; r < 4; ++r) a[r] = frag::float_bits(A[frag::a1688(lane, r).row][frag::a1688(lane, r).col]);
    for (int r = 0; r < 2; ++r) b[r] = frag::float_bits(B[frag::b1688(lane, r).row][frag::b1688(lane, r).col]);
    for (int i = 0; i < 4; ++i) c[i] = C[frag::c16x8(lane, i).row][frag::c16x8(lane, i).col];
    prnn::mma_1688_tf32(c, a, b);
    for (int i = 0; i < 4; ++i) D[frag::c16x8(lane, i).row][frag::c16x8(lane, i).col] = c[i];
  });
  int bad = 0;
  for (int m = 0; m < 16; ++m)
    for (int n = 0; n < 8; ++n) {
      float sum = C[m][n];
      for (int k = 0; k < 8; ++k) sum += A[m][k] * B[k][n];
      bad += memcmp(&sum, &D[m][n], 4) != 0;
    }
  EXPECT(bad == 0, "tf32: emulated mma differs from the naive GEMM in %d of 128 elements", bad);
}

// ---- 3. the planner on real devices ----
DeviceLimits device_a100() { return {108, 65536, 65536, 2048, 1024, 32, 167936, 166912, 1024, 0, 0}; }
// H100/H200: clusters of up to 16 blocks (non-portable size); how many run at once is left to the
// runtime's count (0 here: the planner assumes SMs / cluster size).
DeviceLimits device_h100() { return {132, 65536, 65536, 2048, 1024, 32, 233472, 232448, 1024, 16, 0}; }
DeviceLimits device_h200() { return {132, 65536, 65536, 2048, 1024, 32, 233472, 232448, 1024, 16, 0}; }
DeviceLimits device_l4() { return {58, 65536, 65536, 1536, 1024, 24, 102400, 101376, 1024, 0, 0}; }

int kernel_exists(const PlanV2& p) {
  bool ok = false;
  for (int r : prnn::kV2RegStepChoices) ok |= r == p.reg_steps;
  return ok && !(p.precision == prnn::kV2Tf32x3 && p.reg_steps != 4);
}

void test_planner() {
  struct Dev {
    const char* name;
    DeviceLimits lim;
  } devs[] = {{"A100", device_a100()}, {"H100", device_h100()}, {"H200", device_h200()}, {"L4", device_l4()}};
  const int hiddens[] = {64, 200, 256, 512, 800, 1024, 1152, 1536, 1760, 2048, 2304, 2560, 3072, 4096};
  const int batches[] = {1, 4, 8, 16, 64, 200};
  int plans = 0, refusals = 0;
  for (const Dev& dv : devs) {
    for (int prec : {prnn::kV2Mma16, prnn::kV2Tf32, prnn::kV2Tf32x3}) {
      for (int D = 1; D <= 2; ++D) {
        int largest = 0;
        for (int H : hiddens) {
          bool all = true;
          for (int N : batches) {
            const prnn::ProblemShape shape = {50, N, D, H, prec == prnn::kV2Mma16 ? 2 : 4};
            PlanV2 p;
            char why[768] = "";
            if (prnn::make_plan_v2(dv.lim, shape, prec, prnn::kKernelMaxRegsPerThread, &p, why, sizeof(why))) {
              ++plans;
              char again[512] = "";
              EXPECT(prnn::check_plan_v2(dv.lim, p, again, sizeof(again)), "%s H=%d: re-check: %s", dv.name, H, again);
              EXPECT(kernel_exists(p), "%s H=%d: plan wants %d register steps, not instantiated", dv.name, H, p.reg_steps);
              EXPECT(p.blocks <= dv.lim.sm_count, "%s H=%d: %d blocks on %d SMs", dv.name, H, p.blocks, dv.lim.sm_count);
            } else {
              ++refusals;
              all = false;
              EXPECT(strstr(why, "KiB") != nullptr || strstr(why, "warps") != nullptr, "%s H=%d: refusal without numbers: %s",
                     dv.name, H, why);
            }
          }
          if (all) largest = H;
        }
        printf("planner v2: %s %s D=%d: largest listed H with a plan for every N: %d\n", dv.name,
               prec == prnn::kV2Mma16 ? "bf16/fp16" : prec == prnn::kV2Tf32 ? "fp32 1xTF32" : "fp32 3xTF32", D, largest);
      }
    }
  }
  // The cases the issue requires on sm_90 (H100/H200): H=1152 and 2048 in bf16 and fp32, both directions.
  for (int H : {1152, 2048})
    for (int prec : {prnn::kV2Mma16, prnn::kV2Tf32x3})
      for (int N : {4, 64}) {
        PlanV2 p;
        char why[768] = "";
        const prnn::ProblemShape shape = {200, N, 2, H, prec == prnn::kV2Mma16 ? 2 : 4};
        const bool ok = prnn::make_plan_v2(device_h100(), shape, prec, prnn::kKernelMaxRegsPerThread, &p, why, sizeof(why));
        char text[768] = "";
        if (ok) prnn::describe_plan_v2(p, text, sizeof(text));
        printf("planner v2: H100 H=%d N=%d D=2 %s: %s\n", H, N, prec == prnn::kV2Mma16 ? "bf16" : "fp32 3xTF32",
               ok ? text : why);
        if (prec == prnn::kV2Mma16) EXPECT(ok, "H100 bf16 H=%d N=%d must have a v2 plan: %s", H, N, why);
      }
  // Cluster mode on the H100's limits: what auto picks for the shapes, and forced cluster plans.
  int cluster_plans = 0;
  for (int prec : {prnn::kV2Mma16, prnn::kV2Tf32x3})
    for (int H : {256, 512, 1024, 1152, 1536, 2048})
      for (int D = 1; D <= 2; ++D)
        for (int N : {1, 4, 8, 16, 64, 200}) {
          const prnn::ProblemShape shape = {200, N, D, H, prec == prnn::kV2Mma16 ? 2 : 4};
          for (int mode : {prnn::kV2ModeAuto, prnn::kV2ModeCluster}) {
            PlanV2 p;
            char why[768] = "";
            if (!prnn::make_plan_v2_mode(device_h100(), shape, prec, prnn::kKernelMaxRegsPerThread, mode, &p, why, sizeof(why))) {
              EXPECT(strstr(why, "KiB") != nullptr || strstr(why, "warps") != nullptr, "cluster refusal without numbers: %s", why);
              if (mode == prnn::kV2ModeAuto) {  // auto refuses only what ring mode refuses too
                PlanV2 ring;
                EXPECT(!prnn::make_plan_v2_mode(device_h100(), shape, prec, prnn::kKernelMaxRegsPerThread, prnn::kV2ModeRing,
                                                &ring, nullptr, 0),
                       "H100 auto H=%d N=%d D=%d refused what ring mode plans: %s", H, N, D, why);
              }
              continue;
            }
            char again[512] = "";
            EXPECT(prnn::check_plan_v2(device_h100(), p, again, sizeof(again)), "H100 H=%d: re-check: %s", H, again);
            EXPECT(kernel_exists(p), "H100 H=%d: plan wants %d register steps, not instantiated", H, p.reg_steps);
            if (p.mode != prnn::kV2ModeCluster) continue;
            ++cluster_plans;
            EXPECT(p.blocks_per_dir <= 16 && p.groups * p.group_tiles >= p.n_tiles && p.waves >= 1,
                   "H100 H=%d N=%d: cluster plan of %d blocks, %d groups of %d tiles", H, N, p.blocks_per_dir, p.groups,
                   p.group_tiles);
            if (mode == prnn::kV2ModeAuto) EXPECT(p.waves == 1, "auto chose cluster mode with %d waves", p.waves);
          }
        }
  for (int H : {1152, 2048})
    for (int prec : {prnn::kV2Mma16, prnn::kV2Tf32x3})
      for (int D : {1, 2})
        for (int N : {4, 16, 64}) {
          PlanV2 p;
          char why[768] = "";
          const prnn::ProblemShape shape = {200, N, D, H, prec == prnn::kV2Mma16 ? 2 : 4};
          const bool ok = prnn::make_plan_v2_mode(device_h100(), shape, prec, prnn::kKernelMaxRegsPerThread,
                                                  prnn::kV2ModeCluster, &p, why, sizeof(why));
          char text[768] = "";
          if (ok) prnn::describe_plan_v2(p, text, sizeof(text));
          printf("planner v2 cluster: H100 H=%d N=%d D=%d %s: %s\n", H, N, D, prec == prnn::kV2Mma16 ? "bf16" : "fp32 3xTF32",
                 ok ? text : why);
        }
  {  // the case the cluster mode is for: H=1152 bf16, one direction, N=4, planned as one cluster by auto
    PlanV2 p;
    char why[768] = "";
    const prnn::ProblemShape shape = {200, 4, 1, 1152, 2};
    const bool ok = prnn::make_plan_v2(device_h100(), shape, prnn::kV2Mma16, prnn::kKernelMaxRegsPerThread, &p, why, sizeof(why));
    EXPECT(ok && p.mode == prnn::kV2ModeCluster && p.blocks_per_dir <= 16,
           "H100 H=1152 bf16 N=4: auto should plan one cluster (%s)", ok ? "got ring mode" : why);
  }
  printf("planner v2: %d plans checked, %d refusals; %d cluster plans on H100 limits\n", plans, refusals, cluster_plans);
}

// ---- 4-6. the whole kernel ----
enum class Dt { kBf16, kFp16, kFp32 };

struct Case {
  const char* name;
  DeviceLimits device;
  Dt dt;
  int precision;
  int T, N, D, H;
  prnnActivation_t act;
  bool ragged, with_h0, with_dh_last, with_dh0;
  int mode = prnn::kV2ModeAuto;  // the plan's exchange mode (auto: what the planner picks)
};

// Storage rounding of the exchange type (bf16, fp16, or none for fp32).
double round_storage(Dt dt, double v) {
  const float f = static_cast<float>(v);
  if (dt == Dt::kBf16) return frag::bf16_float_host(frag::bf16_bits_host(f));
  if (dt == Dt::kFp16) return frag::fp16_float_host(frag::fp16_bits_host(f));
  return v;
}

struct Buffers {
  std::vector<float> u, w, h0, dy, dh_last;   // values (already representable in storage)
  std::vector<int32_t> lengths;
};

// Host storage: a byte vector of n elements of the case's type.
struct Store {
  Dt dt;
  std::vector<unsigned char> bytes;
  Store(Dt t, size_t n) : dt(t), bytes(n * (t == Dt::kFp32 ? 4 : 2), 0xFF) {}  // 0xFF: NaN poison
  size_t elem() const { return dt == Dt::kFp32 ? 4 : 2; }
  void set(size_t i, float v) {
    if (dt == Dt::kFp32) memcpy(&bytes[i * 4], &v, 4);
    else {
      const uint16_t b = dt == Dt::kBf16 ? frag::bf16_bits_host(v) : frag::fp16_bits_host(v);
      memcpy(&bytes[i * 2], &b, 2);
    }
  }
  float get(size_t i) const {
    if (dt == Dt::kFp32) {
      float v;
      memcpy(&v, &bytes[i * 4], 4);
      return v;
    }
    uint16_t b;
    memcpy(&b, &bytes[i * 2], 2);
    return dt == Dt::kBf16 ? frag::bf16_float_host(b) : frag::fp16_float_host(b);
  }
  void* data() { return bytes.data(); }
};

struct Outputs {
  std::vector<float> y, h_last, du, dh0;
  unsigned int status[prnn::kStatusWords];
};

template <typename T, int kPrec, int kRegSteps, bool kBackward>
void run_kernel_body(const PlanV2& p, const KernelArgs& a) {
  prnn::persistent_rnn_v2_kernel<T, kPrec, kRegSteps, kBackward>(p, a);
}

template <typename T, int kPrec, bool kBackward>
void dispatch_reg_steps(const PlanV2& p, const KernelArgs& a) {
  if (p.reg_steps == 4) run_kernel_body<T, kPrec, 4, kBackward>(p, a);
  else if constexpr (kPrec != prnn::kV2Tf32x3) run_kernel_body<T, kPrec, 8, kBackward>(p, a);
}

void launch_v2(const Case& c, const PlanV2& p, KernelArgs args, bool backward, std::vector<unsigned long long>& ring,
               unsigned int* status) {
  std::fill(ring.begin(), ring.end(), 0ull);  // the API zeroes the ring and the status per launch
  for (int i = 0; i < prnn::kStatusWords; ++i) status[i] = 0;
  args.ring = ring.data();
  args.status = status;
  g_ring.base = ring.data();
  g_ring.words = ring.size();
  g_ring.previous.assign(ring.size(), 0ull);
  g_ring.pending.clear();
  g_ring.last_due.clear();
  const bool cluster = p.mode == prnn::kV2ModeCluster;
  run_threads(p.blocks, p.threads, p.smem_bytes, [&] {
    const Dt dt = c.dt;
    if (dt == Dt::kBf16) {
      backward ? dispatch_reg_steps<EmuBf16, prnn::kV2Mma16, true>(p, args) : dispatch_reg_steps<EmuBf16, prnn::kV2Mma16, false>(p, args);
    } else if (dt == Dt::kFp16) {
      backward ? dispatch_reg_steps<EmuHalf, prnn::kV2Mma16, true>(p, args) : dispatch_reg_steps<EmuHalf, prnn::kV2Mma16, false>(p, args);
    } else if (p.precision == prnn::kV2Tf32) {
      backward ? dispatch_reg_steps<float, prnn::kV2Tf32, true>(p, args) : dispatch_reg_steps<float, prnn::kV2Tf32, false>(p, args);
    } else {
      backward ? dispatch_reg_steps<float, prnn::kV2Tf32x3, true>(p, args) : dispatch_reg_steps<float, prnn::kV2Tf32x3, false>(p, args);
    }
  }, cluster ? p.blocks_per_dir : 0);
  g_ring.flush_all();
  if (cluster) prnn::g_cx.finish(status[prnn::kStatusCode] == 0);
}

// Runs forward then backward through the emulated kernel. y for backward: the kernel's own forward y.
bool run_both(const Case& c, const PlanV2& pf, const PlanV2& pb, const Buffers& in, Outputs* out,
              unsigned long long timeout_ns, int skip_block) {
  const size_t step = static_cast<size_t>(c.N) * c.D * c.H, total = step * c.T;
  Store u(c.dt, total), w(c.dt, in.w.size()), h0(c.dt, step), y(c.dt, total), h_last(c.dt, step);
  Store dy(c.dt, total), dh_last(c.dt, step), du(c.dt, total), dh0(c.dt, step);
  for (size_t i = 0; i < total; ++i) u.set(i, in.u[i]), dy.set(i, in.dy[i]);
  for (size_t i = 0; i < in.w.size(); ++i) w.set(i, in.w[i]);
  for (size_t i = 0; i < step; ++i) h0.set(i, in.h0[i]), dh_last.set(i, in.dh_last[i]);
  std::vector<unsigned long long> ring(static_cast<size_t>(pf.ring_words));
  KernelArgs a = {};
  a.u = u.data();
  a.h0 = c.with_h0 ? h0.data() : nullptr;
  a.y = y.data();
  a.h_last = h_last.data();
  a.w = w.data();
  a.lengths = in.lengths.data();
  a.barrier_timeout_ns = timeout_ns;
  a.fault_skip_block = skip_block;
  a.activation = c.act;
  launch_v2(c, pf, a, false, ring, out->status);
  if (out->status[prnn::kStatusCode] != 0) return false;
  KernelArgs b = {};
  b.y_in = y.data();
  b.dy = dy.data();
  b.dh_last = c.with_dh_last ? dh_last.data() : nullptr;
  b.du = du.data();
  b.dh0 = c.with_dh0 ? dh0.data() : nullptr;
  b.w = w.data();
  b.lengths = in.lengths.data();
  b.barrier_timeout_ns = timeout_ns;
  b.fault_skip_block = -1;
  b.activation = c.act;
  std::vector<unsigned long long> ring_b(static_cast<size_t>(pb.ring_words));
  launch_v2(c, pb, b, true, ring_b, out->status);
  out->y.resize(total);
  out->du.resize(total);
  out->h_last.resize(step);
  out->dh0.resize(step);
  for (size_t i = 0; i < total; ++i) out->y[i] = y.get(i), out->du[i] = du.get(i);
  for (size_t i = 0; i < step; ++i) out->h_last[i] = h_last.get(i), out->dh0[i] = c.with_dh0 ? dh0.get(i) : 0.0f;
  return out->status[prnn::kStatusCode] == 0;
}

// The float64 oracle: as the kernel, the carried state is rounded to the exchange type each step and
// every output to the storage type; y for backward is the (rounded) forward output `y_used`.
void oracle(const Case& c, const Buffers& in, const std::vector<float>& y_used, std::vector<double>* y,
            std::vector<double>* h_last, std::vector<double>* du, std::vector<double>* dh0) {
  const int T = c.T, N = c.N, D = c.D, H = c.H;
  const size_t step = static_cast<size_t>(N) * D * H;
  y->assign(step * T, 0.0);
  du->assign(step * T, 0.0);
  h_last->assign(step, 0.0);
  dh0->assign(step, 0.0);
  for (int n = 0; n < N; ++n)
    for (int d = 0; d < D; ++d) {
      const int L = in.lengths[n];
      const float* W = &in.w[static_cast<size_t>(d) * H * H];
      std::vector<double> h(H), nh(H);
      for (int i = 0; i < H; ++i) h[i] = c.with_h0 ? in.h0[(static_cast<size_t>(n) * D + d) * H + i] : 0.0;
      for (int i = 0; i < H; ++i) (*h_last)[(static_cast<size_t>(n) * D + d) * H + i] = h[i];
      for (int pos = 0; pos < L; ++pos) {
        const int t = d == 0 ? pos : L - 1 - pos;
        for (int i = 0; i < H; ++i) {
          double acc = in.u[static_cast<size_t>(t) * step + (static_cast<size_t>(n) * D + d) * H + i];
          for (int k = 0; k < H; ++k) acc += static_cast<double>(W[static_cast<size_t>(i) * H + k]) * h[k];
          nh[i] = round_storage(c.dt, act(c.act, acc));
        }
        h = nh;
        for (int i = 0; i < H; ++i) {
          (*y)[static_cast<size_t>(t) * step + (static_cast<size_t>(n) * D + d) * H + i] = h[i];
          (*h_last)[(static_cast<size_t>(n) * D + d) * H + i] = h[i];
        }
      }
      // backward-data
      std::vector<double> g(H, 0.0), ng(H);
      for (int pos = L - 1; pos >= 0; --pos) {
        const int t = d == 0 ? pos : L - 1 - pos;
        for (int i = 0; i < H; ++i) {
          const size_t o = static_cast<size_t>(t) * step + (static_cast<size_t>(n) * D + d) * H + i;
          double acc = in.dy[o];
          if (pos == L - 1 && c.with_dh_last) acc += in.dh_last[(static_cast<size_t>(n) * D + d) * H + i];
          for (int k = 0; k < H; ++k) acc += static_cast<double>(W[static_cast<size_t>(k) * H + i]) * g[k];
          ng[i] = round_storage(c.dt, acc * act_grad(c.act, y_used[o]));
        }
        g = ng;
        for (int i = 0; i < H; ++i)
          (*du)[static_cast<size_t>(t) * step + (static_cast<size_t>(n) * D + d) * H + i] = g[i];
      }
      for (int i = 0; i < H; ++i) {
        double acc = 0.0;
        for (int k = 0; k < H; ++k) acc += static_cast<double>(W[static_cast<size_t>(k) * H + i]) * g[k];
        if (L == 0 && c.with_dh_last) acc += in.dh_last[(static_cast<size_t>(n) * D + d) * H + i];
        (*dh0)[(static_cast<size_t>(n) * D + d) * H + i] = acc;
      }
    }
}

// Tolerance per type, relative to max(1, max |reference|): the kernel and the oracle round the same
// values to the same type, so they differ by the accumulation order (fp32 vs float64), which can flip
// a rounding by one unit in the last place; such a flip then travels through W (gain < 1 here).
// 4 units of the storage type's last place covers one flip plus what it contributes later; fp32 as
// 3xTF32 keeps about fp32 accuracy, 1xTF32 about 2^-11 per product.
double tolerance(const Case& c) {
  if (c.dt == Dt::kBf16) return 4 * 0x1p-8;
  if (c.dt == Dt::kFp16) return 4 * 0x1p-11;
  return c.precision == prnn::kV2Tf32 ? 8 * 0x1p-11 : 2e-5;
}

double max_rel_error(const std::vector<float>& got, const std::vector<double>& ref) {
  double scale = 1.0, err = 0.0;
  for (double r : ref) scale = std::max(scale, fabs(r));
  for (size_t i = 0; i < ref.size(); ++i) {
    const double e = fabs(static_cast<double>(got[i]) - ref[i]);
    err = std::isnan(e) ? INFINITY : std::max(err, e);
  }
  return err / scale;
}

Buffers make_inputs(const Case& c, std::mt19937& rng) {
  const size_t step = static_cast<size_t>(c.N) * c.D * c.H, total = step * c.T;
  std::uniform_real_distribution<float> uni(-1.0f, 1.0f);
  const float w_scale = 0.9f * sqrtf(3.0f / c.H);
  Buffers b;
  auto rounded = [&](float v) { return static_cast<float>(round_storage(c.dt, v)); };
  b.u.resize(total);
  b.dy.resize(total);
  b.w.resize(static_cast<size_t>(c.D) * c.H * c.H);
  b.h0.resize(step);
  b.dh_last.resize(step);
  for (float& v : b.u) v = rounded(uni(rng) * (c.act == PRNN_ACT_CLIPPED_RELU ? 15.0f : 1.0f));
  for (float& v : b.dy) v = rounded(uni(rng));
  for (float& v : b.w) v = rounded(uni(rng) * w_scale * (c.act == PRNN_ACT_CLIPPED_RELU ? 3.0f : 1.0f));
  for (float& v : b.h0) v = rounded(uni(rng));
  for (float& v : b.dh_last) v = rounded(uni(rng));
  b.lengths.assign(c.N, c.T);
  if (c.ragged) {
    for (int n = 0; n < c.N; ++n) b.lengths[n] = static_cast<int32_t>(rng() % (c.T + 1));
    b.lengths[0] = c.T;
    if (c.N > 1) b.lengths[1] = 0;
    // A whole tile of 8 that ends early (and so, backward, starts late) when the batch allows it.
    if (c.N >= 16)
      for (int n = 8; n < 16; ++n) b.lengths[n] = static_cast<int32_t>(rng() % (c.T / 2 + 1));
  }
  return b;
}

bool plans_for(const Case& c, PlanV2* pf, PlanV2* pb) {
  const prnn::ProblemShape shape = {c.T, c.N, c.D, c.H, c.dt == Dt::kFp32 ? 4 : 2};
  char why[768] = "";
  if (!prnn::make_plan_v2_mode(c.device, shape, c.precision, prnn::kKernelMaxRegsPerThread, c.mode, pf, why, sizeof(why))) {
    printf("FAIL %s: no plan: %s\n", c.name, why);
    ++g_failures;
    return false;
  }
  if (c.mode != prnn::kV2ModeAuto && pf->mode != c.mode) {
    printf("FAIL %s: mode %d planned, %d asked for\n", c.name, pf->mode, c.mode);
    ++g_failures;
    return false;
  }
  *pb = *pf;  // the backward pass has the same shape and tiling over W^T
  return true;
}

void run_case(const Case& c, std::mt19937& rng) {
  PlanV2 pf, pb;
  if (!plans_for(c, &pf, &pb)) return;
  char text[768];
  prnn::describe_plan_v2(pf, text, sizeof(text));
  const Buffers in = make_inputs(c, rng);
  Outputs out;
  prnn::g_tf32_unrounded = 0;
  const bool ok = run_both(c, pf, pb, in, &out, kLongTimeoutNs, -1);
  EXPECT(ok, "%s: status code %u (block %u step %u producer %u)", c.name, out.status[0], out.status[1], out.status[2],
         out.status[3]);
  if (!ok) return;
  std::vector<double> y, h_last, du, dh0;
  oracle(c, in, out.y, &y, &h_last, &du, &dh0);
  const double tol = tolerance(c);
  const double ey = max_rel_error(out.y, y), eh = max_rel_error(out.h_last, h_last), ed = max_rel_error(out.du, du);
  const double e0 = c.with_dh0 ? max_rel_error(out.dh0, dh0) : 0.0;
  const bool pass = ey <= tol && eh <= tol && ed <= tol && e0 <= tol && prnn::g_tf32_unrounded == 0;
  printf("%s %s: y %.2g, h_last %.2g, du %.2g, dh0 %.2g (tolerance %.2g) [%s]\n", pass ? "ok  " : "FAIL", c.name, ey, eh,
         ed, e0, tol, text);
  if (!pass) ++g_failures;
  EXPECT(prnn::g_tf32_unrounded == 0, "%s: %lld tf32 operands were not rounded (a missing cvt)", c.name,
         static_cast<long long>(prnn::g_tf32_unrounded));
}

// 5: the same case over many seeds of an adversarial memory; bitwise equal to the plain run.
void run_protocol(const Case& c, int seeds, std::mt19937& rng) {
  PlanV2 pf, pb;
  if (!plans_for(c, &pf, &pb)) return;
  const Buffers in = make_inputs(c, rng);
  Outputs plain;
  g_ring.adversarial = false;
  if (!run_both(c, pf, pb, in, &plain, kLongTimeoutNs, -1)) {
    printf("FAIL %s: plain run failed\n", c.name);
    ++g_failures;
    return;
  }
  unsigned long long delayed = 0, stale = 0, stalls = 0;
  int mismatches = 0, failures = 0;
  for (int seed = 1; seed <= seeds; ++seed) {
    // The global ring (ring mode) and the cluster exchange (cluster mode), both adversarial.
    g_ring.adversarial = true;
    g_ring.seed = static_cast<unsigned int>(seed);  // also seeds the threads' generators
    g_ring.p_delay = prnn::g_cx.p_delay = 0.5;
    g_ring.p_stale = prnn::g_cx.p_spurious = 0.3;
    g_ring.max_delay = prnn::g_cx.max_delay = 50 + 50 * (seed % 4);
    g_ring.delayed = g_ring.stale = prnn::g_cx.delayed = prnn::g_cx.spurious = 0;
    prnn::g_cx.stalls = 0;
    prnn::g_cx.adversarial = true;
    Outputs got;
    const bool ok = run_both(c, pf, pb, in, &got, kLongTimeoutNs, -1);
    g_ring.adversarial = prnn::g_cx.adversarial = false;
    delayed += g_ring.delayed + prnn::g_cx.delayed;
    stalls += prnn::g_cx.stalls;
    stale += g_ring.stale + prnn::g_cx.spurious;
    if (!ok) {
      ++failures;
      printf("FAIL %s seed %d: status %u (block %u step %u producer %u tag %u)\n", c.name, seed, got.status[0],
             got.status[1], got.status[2], got.status[3], got.status[5]);
      continue;
    }
    const bool same = memcmp(got.y.data(), plain.y.data(), 4 * got.y.size()) == 0 &&
                      memcmp(got.du.data(), plain.du.data(), 4 * got.du.size()) == 0 &&
                      memcmp(got.h_last.data(), plain.h_last.data(), 4 * got.h_last.size()) == 0 &&
                      memcmp(got.dh0.data(), plain.dh0.data(), 4 * got.dh0.size()) == 0;
    mismatches += !same;
  }
  printf("%s protocol %s (%s mode): %d seeds, %llu stores delayed, %llu stale loads or spurious waits, %llu blocks "
         "stalled: %d failed, %d differ from plain memory\n",
         failures + mismatches ? "FAIL" : "ok  ", c.name, pf.mode == prnn::kV2ModeCluster ? "cluster" : "ring", seeds, delayed,
         stale, stalls, failures, mismatches);
  EXPECT(delayed > 0 && stale > 0, "%s: the adversarial memory did nothing", c.name);
  g_failures += failures + mismatches;
}

// 6: one block never publishes; the launch must end within its bound and name that block.
void run_timeout(const Case& c, std::mt19937& rng) {
  PlanV2 pf, pb;
  if (!plans_for(c, &pf, &pb)) return;
  const Buffers in = make_inputs(c, rng);
  std::atomic<bool> done{false};
  std::thread watchdog([&] {
    for (int i = 0; i < 600 && !done; ++i) std::this_thread::sleep_for(std::chrono::milliseconds(100));
    if (!done) {
      printf("FAIL %s: the launch did not end 60 s after a %llu ms bound (hung)\n", c.name, kFaultTimeoutNs / 1000000);
      fflush(stdout);
      _exit(1);
    }
  });
  Outputs out;
  const auto t0 = std::chrono::steady_clock::now();
  const int skip = pf.blocks - 1;
  const bool ok = run_both(c, pf, pb, in, &out, kFaultTimeoutNs, skip);
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  done = true;
  watchdog.join();
  EXPECT(!ok && out.status[prnn::kStatusCode] == prnn::kKernelExchangeTimeout,
         "%s: expected an exchange timeout, status %u", c.name, out.status[0]);
  // Cluster mode's barrier counts bytes, not senders: its record says the producer is unknown.
  const unsigned int named = pf.mode == prnn::kV2ModeCluster ? static_cast<unsigned>(prnn::kV2UnknownProducer)
                                                             : static_cast<unsigned>(skip);
  EXPECT(out.status[prnn::kStatusArrived] == named, "%s: the record names producer %u, not %u", c.name,
         out.status[prnn::kStatusArrived], named);
  printf("%s %s: a block that never publishes: status %u after %.2f s (bound %.1f s), waiting block %u at step %u for "
         "block %u\n",
         (!ok && out.status[0] == prnn::kKernelExchangeTimeout) ? "ok  " : "FAIL", c.name, out.status[0], seconds,
         kFaultTimeoutNs / 1e9, out.status[1], out.status[2], out.status[3]);
}

// The tasks (threads) this process may have: the smaller of RLIMIT_NPROC and the cgroup's pids.max.
long long task_limit() {
  long long limit = 1LL << 40;
  rlimit r = {};
  if (getrlimit(RLIMIT_NPROC, &r) == 0 && r.rlim_cur != RLIM_INFINITY) limit = static_cast<long long>(r.rlim_cur);
  std::ifstream pids("/sys/fs/cgroup/pids.max");
  std::string value;
  if (pids >> value && value != "max") limit = std::min(limit, std::stoll(value));
  return limit;
}

// Small made-up devices: SMs, registers per SM/block, threads per SM/block, blocks per SM,
// shared memory per SM / per block (opt-in) / reserved.
DeviceLimits small_device(int sms, int max_warps, size_t smem, int max_cluster = 0, int active_clusters = 0) {
  DeviceLimits d = {sms, 65536, max_warps * 32 * 128, 2048, max_warps * 32, 32, smem + 1024, smem, 1024, max_cluster, active_clusters};
  return d;
}

}  // namespace

int main(int argc, char** argv) {
  setvbuf(stdout, nullptr, _IOLBF, 0);  // each verdict reaches the log even if a hang gets the run killed
  const bool quick = argc > 1 && strcmp(argv[1], "--quick") == 0;
  const bool heavy = argc > 1 && strcmp(argv[1], "--real") == 0;  // also the 28,800-thread case (~1 min)
  std::mt19937 rng(12345);
  test_layouts();
  test_mma16<EmuBf16>("bf16", rng);
  test_mma16<EmuHalf>("fp16", rng);
  test_mma_tf32(rng);
  test_planner();

  const DeviceLimits dev4 = small_device(4, 16, 96 * 1024);    // 4 SMs, 16 warps
  const DeviceLimits dev2w = small_device(5, 2, 96 * 1024);    // 2 warps: 10 k steps per warp, 2 in smem
  const DeviceLimits tiny_smem = small_device(4, 16, 14 * 1024);  // few n tiles per chunk
  const Case cases[] = {
      {"bf16 fwd+bwd D=2 H=64 N=5 relu ragged", dev4, Dt::kBf16, prnn::kV2Mma16, 6, 5, 2, 64, PRNN_ACT_RELU, true, true, true, true},
      {"fp16 D=1 H=72 N=19 tanh ragged", dev4, Dt::kFp16, prnn::kV2Mma16, 5, 19, 1, 72, PRNN_ACT_TANH, true, false, true, true},
      {"bf16 clipped relu H=160 smem A steps", dev2w, Dt::kBf16, prnn::kV2Mma16, 4, 9, 1, 160, PRNN_ACT_CLIPPED_RELU, true, true, false, true},
      {"fp32 3xTF32 D=2 H=48 N=12 relu", dev4, Dt::kFp32, prnn::kV2Tf32x3, 5, 12, 2, 48, PRNN_ACT_RELU, true, true, true, true},
      {"fp32 1xTF32 D=1 H=64 N=8 tanh", dev4, Dt::kFp32, prnn::kV2Tf32, 5, 8, 1, 64, PRNN_ACT_TANH, false, true, true, false},
      {"bf16 chunks D=2 H=64 N=24 relu ragged", tiny_smem, Dt::kBf16, prnn::kV2Mma16, 5, 24, 2, 64, PRNN_ACT_RELU, true, false, true, true},
      {"fp32 3xTF32 H=80 smem A steps tanh", dev2w, Dt::kFp32, prnn::kV2Tf32x3, 4, 3, 1, 80, PRNN_ACT_TANH, true, true, true, true},
  };
  for (const Case& c : cases) {
    if (quick && &c != &cases[0]) break;
    run_case(c, rng);
  }
  // Cluster mode (sm_90's DSMEM exchange), on made-up devices with clusters of at most 4 / 3 / 5 blocks.
  const DeviceLimits cdev = small_device(8, 16, 96 * 1024, 4, 8);   // 8 clusters at once: one group per tile
  const DeviceLimits cdev3 = small_device(6, 16, 96 * 1024, 3, 0);  // 2 clusters at once (6 SMs / 3)
  const DeviceLimits cdev2w = small_device(5, 2, 96 * 1024, 5, 0);  // 2 warps: A steps in shared memory
  const DeviceLimits csmall = small_device(8, 16, 16 * 1024, 4, 1); // one cluster: a group of 3 tiles, chunks of 1
  const int C = prnn::kV2ModeCluster;
  const Case cluster_cases[] = {
      {"cluster bf16 fwd+bwd D=2 H=64 N=19 relu ragged, 3 groups", cdev, Dt::kBf16, prnn::kV2Mma16, 5, 19, 2, 64, PRNN_ACT_RELU, true, true, true, true, C},
      {"cluster fp32 3xTF32 D=1 H=48 N=12 tanh ragged", cdev3, Dt::kFp32, prnn::kV2Tf32x3, 4, 12, 1, 48, PRNN_ACT_TANH, true, true, true, true, C},
      {"cluster fp16 clipped relu H=160 smem A steps", cdev2w, Dt::kFp16, prnn::kV2Mma16, 4, 9, 1, 160, PRNN_ACT_CLIPPED_RELU, true, true, false, true, C},
      {"cluster bf16 D=1 H=64 N=20 chunks in a group", csmall, Dt::kBf16, prnn::kV2Mma16, 4, 20, 1, 64, PRNN_ACT_RELU, true, false, true, true, C},
      {"cluster fp32 1xTF32 D=2 H=40 N=8 relu", cdev, Dt::kFp32, prnn::kV2Tf32, 4, 8, 2, 40, PRNN_ACT_RELU, false, true, true, false, C},
  };
  for (const Case& c : cluster_cases) {
    if (quick && &c != &cluster_cases[0]) break;
    run_case(c, rng);
  }
  // N=19: a tile that ends early (forward) and so begins late (backward), where what a step publishes
  // and what the next expects must agree.
  const Case cproto = {"cluster bf16 D=2 H=48 N=19 ragged", cdev, Dt::kBf16, prnn::kV2Mma16, 4, 19, 2, 48, PRNN_ACT_RELU, true, true, true, true, C};
  run_protocol(cproto, quick ? 2 : 12, rng);
  const Case cto = {"timeout cluster bf16 D=1 H=64 N=4", cdev, Dt::kBf16, prnn::kV2Mma16, 4, 4, 1, 64, PRNN_ACT_RELU, false, false, false, false, C};
  run_timeout(cto, rng);
  // Whole grids of the plans real devices get (one CPU thread per GPU thread: 7,200 to 18,432 threads,
  // about 10 s each on 2 cores; waiters back off to 20 ms). The H100 case is issue 11's headline shape.
  if (!quick) {
    const int R = prnn::kV2ModeRing;
    std::vector<Case> real = {
        {"real H100 cluster bf16 D=1 H=1152 N=4 T=3", device_h100(), Dt::kBf16, prnn::kV2Mma16, 3, 4, 1, 1152, PRNN_ACT_CLIPPED_RELU, true, true, true, true, C},
        {"real L4 ring bf16 D=1 H=1152 N=4 T=2", device_l4(), Dt::kBf16, prnn::kV2Mma16, 2, 4, 1, 1152, PRNN_ACT_CLIPPED_RELU, true, true, true, true, R},
        {"real A100 ring fp32 3xTF32 D=1 H=512 N=4 T=2", device_a100(), Dt::kFp32, prnn::kV2Tf32x3, 2, 4, 1, 512, PRNN_ACT_TANH, true, true, true, true, R},
    };
    if (heavy)  // 60 blocks of 480: 28,800 threads
      real.push_back({"real H100 cluster bf16 D=2 H=1152 N=16 T=2", device_h100(), Dt::kBf16, prnn::kV2Mma16, 2, 16, 2, 1152, PRNN_ACT_CLIPPED_RELU, true, true, true, true, C});
    const long long allowed = task_limit();
    const int pause = g_poll_pause_max_us;
    g_poll_pause_max_us = 20000;
    for (const Case& c : real) {
      PlanV2 pf, pb;
      if (!plans_for(c, &pf, &pb)) continue;
      const long long needed = static_cast<long long>(pf.blocks) * pf.threads;
      if (needed + 1024 > allowed) {  // said, never silent: the Python test accepts this line only
        printf("skip %s: %lld threads, this machine allows %lld tasks\n", c.name, needed, allowed);
        continue;
      }
      run_case(c, rng);
    }
    g_poll_pause_max_us = pause;
  }
  const Case proto = {"bf16 D=2 H=48 N=10 ragged", dev4, Dt::kBf16, prnn::kV2Mma16, 4, 10, 2, 48, PRNN_ACT_RELU, true, true, true, true};
  run_protocol(proto, quick ? 2 : 12, rng);
  const Case proto32 = {"fp32 3xTF32 D=1 H=32 N=17 ragged", dev4, Dt::kFp32, prnn::kV2Tf32x3, 4, 17, 1, 32, PRNN_ACT_TANH, true, false, true, true};
  if (!quick) run_protocol(proto32, 6, rng);
  const Case to = {"timeout bf16 D=1 H=64 N=4", dev4, Dt::kBf16, prnn::kV2Mma16, 4, 4, 1, 64, PRNN_ACT_RELU, false, false, false, false};
  run_timeout(to, rng);
  g_failures += prnn::g_cx.errors;  // cluster exchange checks (each printed as it happened)
  printf("v2 emulation test: %d failures\n", g_failures);
  return g_failures == 0 ? 0 : 1;
}
