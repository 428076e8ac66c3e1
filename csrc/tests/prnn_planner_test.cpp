// prnn_planner_test.cpp - checks the tile planner on the published limits of four GPUs, on CPU.
//
// For every device x hidden size x batch x directions x storage size it checks that a plan either
//   * exists, respects every register / shared-memory / thread budget, keeps all blocks
//     co-resident (blocks <= SMs x blocks per SM), and makes every weight element owned by exactly
//     one thread (enumerated through the same mapping functions the kernel uses), or
//   * is refused with a reason, and only when the weights really cannot stay on chip.
// Build: g++ -std=c++17 -O2 -I csrc csrc/prnn_planner.cpp csrc/tests/prnn_planner_test.cpp
// Exit status 0 when every check passes; failures are printed one per line.
#include <stdio.h>
#include <string.h>

#include <string>
#include <vector>

#include "prnn_planner.h"
#include "prnn_expect.h"

using prnn::DeviceLimits;
using prnn::Plan;
using prnn::ProblemShape;

namespace {

struct NamedDevice {
  const char* name;
  DeviceLimits limits;
};

constexpr size_t KiB = 1024;

// Published per-device limits (CUDA occupancy tables / cudaGetDeviceProperties output).
const NamedDevice kDevices[] = {
    {"A100", {108, 65536, 65536, 2048, 1024, 32, 164 * KiB, 163 * KiB, 1 * KiB}},
    {"H100-SXM", {132, 65536, 65536, 2048, 1024, 32, 228 * KiB, 227 * KiB, 1 * KiB}},
    {"H200", {132, 65536, 65536, 2048, 1024, 32, 228 * KiB, 227 * KiB, 1 * KiB}},
    {"L4", {58, 65536, 65536, 1536, 1024, 24, 100 * KiB, 99 * KiB, 1 * KiB}},
};

int g_plans = 0;
int g_refusals = 0;


long long ceil_div(long long a, long long b) { return (a + b - 1) / b; }

// Every weight element (d, row, k) must be multiplied by exactly one (block, thread).
void check_ownership(const char* dev, const Plan& p) {
  const long long H = p.hidden;
  std::vector<unsigned char> owners(static_cast<size_t>(p.directions * H * H), 0);
  const int k_per_lane = p.k_chunk / prnn::kWarpSize;
  long long out_of_range = 0;
  for (int block = 0; block < p.blocks; ++block) {
    const int d = prnn::plan_direction(p, block);
    const int row0 = prnn::plan_row_begin(p, block);
    const int rows = prnn::plan_rows_in_block(p, block);
    for (int thread = 0; thread < p.threads; ++thread) {
      const int warp = thread / prnn::kWarpSize, lane = thread % prnn::kWarpSize;
      const int group = prnn::plan_warp_row_group(p, warp);
      const int split = prnn::plan_warp_k_split(p, warp);
      const int k_begin = prnn::plan_k_begin(p, split), k_end = prnn::plan_k_end(p, split);
      for (int rr = 0; rr < p.row_group; ++rr) {
        const int r = group * p.row_group + rr;  // local row; rows >= `rows` are zero padding
        if (r >= rows) continue;
        // The kernel's loop: k = k_begin + lane, += 32, while k < k_end.
        for (int k = k_begin + lane; k < k_end; k += prnn::kWarpSize) {
          if (d < 0 || d >= p.directions || row0 + r >= H || k >= H) {
            ++out_of_range;
            continue;
          }
          unsigned char& o = owners[(static_cast<size_t>(d) * H + row0 + r) * H + k];
          if (o < 255) ++o;
        }
      }
    }
  }
  (void)k_per_lane;
  EXPECT(out_of_range == 0, "%s H=%d D=%d: %lld owned elements outside the weights", dev, p.hidden,
         p.directions, out_of_range);
  long long missing = 0, shared = 0;
  for (unsigned char o : owners) {
    if (o == 0) ++missing;
    if (o > 1) ++shared;
  }
  EXPECT(missing == 0 && shared == 0, "%s H=%d D=%d: %lld weight elements unowned, %lld owned twice", dev,
         p.hidden, p.directions, missing, shared);
}

// Budgets, recomputed here independently of check_plan.
void check_budgets(const char* dev, const DeviceLimits& L, const ProblemShape& s, const Plan& p) {
  EXPECT(p.threads >= 32 && p.threads <= L.max_threads_per_block && p.threads <= prnn::kKernelMaxThreads && p.threads % 32 == 0,
         "%s H=%d: %d threads", dev, s.hidden, p.threads);
  const long long regs = static_cast<long long>(p.threads) * p.regs_per_thread;
  EXPECT(regs <= L.regs_per_block && regs <= L.regs_per_sm, "%s H=%d: %lld registers per block", dev, s.hidden, regs);
  const long long w = static_cast<long long>(p.rows_padded) * s.hidden * s.elem_bytes;
  const long long x = static_cast<long long>(p.batch_chunk) * s.hidden * 4;
  const long long red = static_cast<long long>(p.k_splits) * p.batch_chunk * p.rows_padded * 4;
  EXPECT(w + x + red <= p.smem_bytes, "%s H=%d: regions %lld B > smem %d B", dev, s.hidden, w + x + red, p.smem_bytes);
  EXPECT(static_cast<size_t>(p.smem_bytes) <= L.smem_per_block_optin, "%s H=%d: smem %d B > per-block %zu B", dev,
         s.hidden, p.smem_bytes, L.smem_per_block_optin);
  // Co-residency: every block resident at once.
  long long per_sm = L.max_blocks_per_sm;
  per_sm = std::min<long long>(per_sm, L.max_threads_per_sm / p.threads);
  per_sm = std::min<long long>(per_sm, L.regs_per_sm / regs);
  per_sm = std::min<long long>(per_sm, static_cast<long long>(L.smem_per_sm / (p.smem_bytes + L.smem_reserved_per_block)));
  EXPECT(per_sm >= 1 && p.blocks <= L.sm_count * per_sm, "%s H=%d D=%d: %d blocks, %lld per SM x %d SMs", dev,
         s.hidden, s.directions, p.blocks, per_sm, L.sm_count);
  EXPECT(p.blocks <= L.sm_count, "%s H=%d: grid of %d blocks is more than one wave of %d SMs", dev, s.hidden,
         p.blocks, L.sm_count);
  EXPECT(p.batch_chunk >= prnn::kBatchGroup && p.batch_chunk % prnn::kBatchGroup == 0 &&
             p.batch_chunk <= ceil_div(s.batch, prnn::kBatchGroup) * prnn::kBatchGroup,
         "%s H=%d N=%d: batch chunk %d", dev, s.hidden, s.batch, p.batch_chunk);
  EXPECT(p.k_chunk % 32 == 0 && static_cast<long long>(p.k_splits) * p.k_chunk >= s.hidden &&
             static_cast<long long>(p.k_splits - 1) * p.k_chunk < s.hidden,
         "%s H=%d: k chunks %d x %d", dev, s.hidden, p.k_splits, p.k_chunk);
  EXPECT(p.row_group == 1 || p.row_group == 2 || p.row_group == 4, "%s H=%d: row group %d has no kernel", dev,
         s.hidden, p.row_group);
}

// A refusal must be justified: even the smallest possible layout (the weight tile alone, one block
// per SM) would not fit, or the reason must name what did not fit.
void check_refusal(const char* dev, const DeviceLimits& L, const ProblemShape& s, const char* reason) {
  EXPECT(strlen(reason) > 20, "%s H=%d: refusal without a reason", dev, s.hidden);
  const long long rows = ceil_div(s.hidden, L.sm_count / s.directions);
  const long long tile = rows * s.hidden * s.elem_bytes;
  const long long usable = static_cast<long long>(std::min(L.smem_per_block_optin, L.smem_per_sm - L.smem_reserved_per_block));
  const long long staging_min = static_cast<long long>(prnn::kBatchGroup) * s.hidden * 4;
  EXPECT(tile + staging_min > usable, "%s H=%d D=%d elem=%d refused although tile %lld + staging %lld <= %lld B: %s",
         dev, s.hidden, s.directions, s.elem_bytes, tile, staging_min, usable, reason);
}

}  // namespace

int main() {
  const int hiddens[] = {1, 7, 31, 32, 33, 100, 129, 256, 500, 512, 800, 1000, 1024, 1152, 1500,
                         1760, 2048, 2560, 3000, 4096, 8192};
  const int batches[] = {1, 3, 4, 17, 64, 256};
  for (const NamedDevice& dev : kDevices) {
    for (int H : hiddens) {
      for (int D = 1; D <= 2; ++D) {
        for (int elem : {4, 2}) {
          for (int N : batches) {
            const ProblemShape s = {200, N, D, H, elem};
            Plan p;
            char reason[512] = "";
            const bool ok = prnn::make_plan(dev.limits, s, prnn::kKernelMaxRegsPerThread, &p, reason, sizeof(reason));
            if (!ok) {
              ++g_refusals;
              check_refusal(dev.name, dev.limits, s, reason);
              continue;
            }
            ++g_plans;
            char why[256] = "";
            EXPECT(prnn::check_plan(dev.limits, p, why, sizeof(why)), "%s H=%d: %s", dev.name, H, why);
            check_budgets(dev.name, dev.limits, s, p);
            if (N == 1) check_ownership(dev.name, p);
          }
        }
      }
    }
  }

  // Sizes the benchmark relies on must be planned on an H100; sizes far beyond on-chip capacity
  // must be refused with a reason that names the capacity.
  const DeviceLimits& h100 = kDevices[1].limits;
  struct Expect { int H, D, elem; bool fits; };
  const Expect expectations[] = {
      {1152, 1, 4, true}, {1152, 2, 4, true}, {1152, 2, 2, true}, {2048, 1, 4, true}, {2560, 1, 2, true},
      {1760, 2, 4, true}, {4096, 1, 4, false}, {8192, 2, 2, false}};
  for (const Expect& e : expectations) {
    const ProblemShape s = {200, 4, e.D, e.H, e.elem};
    Plan p;
    char reason[512] = "";
    const bool ok = prnn::make_plan(h100, s, prnn::kKernelMaxRegsPerThread, &p, reason, sizeof(reason));
    EXPECT(ok == e.fits, "H100 H=%d D=%d elem=%d: planned=%d (expected %d) %s", e.H, e.D, e.elem, ok, e.fits, reason);
    if (!ok) EXPECT(strstr(reason, "MiB") != nullptr, "H100 H=%d: reason lacks the capacity: %s", e.H, reason);
    if (ok) {
      char text[512];
      prnn::describe_plan(p, text, sizeof(text));
      printf("H100 plan: %s\n", text);
    } else {
      printf("H100 refusal: %s\n", reason);
    }
  }
  // Co-residency, the precondition of the grid barrier: a grid that cannot be resident all at once
  // is refused before any launch, both by the planner's own occupancy rule (check_plan, e.g. a plan
  // made for all 132 SMs of an H100 run where only 66 are available) and by the check the API
  // applies to the runtime's occupancy answer for the kernel as built (check_co_residency).
  {
    Plan p;
    char reason[512] = "";
    const ProblemShape s = {200, 8, 1, 1152, 4};
    EXPECT(prnn::make_plan(h100, s, prnn::kKernelMaxRegsPerThread, &p, reason, sizeof(reason)), "H100 H=1152: %s",
           reason);
    EXPECT(p.blocks > h100.sm_count / 2 && p.blocks <= h100.sm_count, "H100 H=1152: grid of %d blocks", p.blocks);
    DeviceLimits half = h100;
    half.sm_count = h100.sm_count / 2;
    EXPECT(!prnn::check_plan(half, p, reason, sizeof(reason)) && strstr(reason, "cannot all be resident"),
           "a %d-block grid passed on %d SMs: %s", p.blocks, half.sm_count, reason);
    ++g_refusals;
    EXPECT(prnn::check_co_residency(p, 1, p.blocks, reason, sizeof(reason)), "one block per SM refused: %s", reason);
    EXPECT(!prnn::check_co_residency(p, 1, p.blocks - 1, reason, sizeof(reason)) &&
               strstr(reason, "cannot all be resident (1 per SM x") != nullptr,
           "%d blocks on %d SMs accepted: %s", p.blocks, p.blocks - 1, reason);
    ++g_refusals;
    // The kernel as built may need more registers than planned: the runtime then answers 0 per SM.
    EXPECT(!prnn::check_co_residency(p, 0, h100.sm_count, reason, sizeof(reason)) &&
               strstr(reason, "0 per SM") != nullptr,
           "a kernel with no resident block per SM accepted: %s", reason);
    ++g_refusals;
    printf("co-residency refusal: %s\n", reason);
  }

  // Invalid problems are refused, not planned.
  {
    Plan p;
    char reason[256] = "";
    const ProblemShape bad = {10, 4, 3, 64, 4};
    EXPECT(!prnn::make_plan(h100, bad, 64, &p, reason, sizeof(reason)), "3 directions were planned");
  }

  printf("planner test: %d plans checked, %d refusals checked, %d failures\n", g_plans, g_refusals, g_failures);
  return g_failures == 0 ? 0 : 1;
}
