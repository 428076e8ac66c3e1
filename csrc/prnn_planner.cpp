// prnn_planner.cpp - device limits -> tiling of the persistent recurrent kernel (host only).
// See prnn_planner.h for the tiling this produces.
#include "prnn_planner.h"

#include <stdarg.h>
#include <stdio.h>
#include <string.h>

namespace prnn {
namespace {

void write_reason(char* out, size_t len, const char* fmt, ...) {
  if (out == nullptr || len == 0) return;
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(out, len, fmt, ap);
  va_end(ap);
}

long long ceil_div(long long a, long long b) { return (a + b - 1) / b; }
long long round_up(long long a, long long b) { return ceil_div(a, b) * b; }

const char* storage_name(int elem_bytes) { return elem_bytes == 4 ? "fp32" : "fp16/bf16"; }

double mib(double bytes) { return bytes / (1024.0 * 1024.0); }
double kib(double bytes) { return bytes / 1024.0; }

int regs_per_warp(int regs_per_thread) {
  return static_cast<int>(round_up(static_cast<long long>(regs_per_thread) * kWarpSize, kRegAllocUnit));
}

size_t usable_smem_per_block(const DeviceLimits& dev) {
  const size_t per_sm = dev.smem_per_sm > dev.smem_reserved_per_block
                            ? dev.smem_per_sm - dev.smem_reserved_per_block : 0;
  return dev.smem_per_block_optin < per_sm ? dev.smem_per_block_optin : per_sm;
}

int max_warps_per_block(const DeviceLimits& dev, int regs_per_thread) {
  int threads = kKernelMaxThreads;
  if (dev.max_threads_per_block < threads) threads = dev.max_threads_per_block;
  if (dev.max_threads_per_sm < threads) threads = dev.max_threads_per_sm;
  int warps = threads / kWarpSize;
  const int per_warp = regs_per_warp(regs_per_thread);
  if (dev.regs_per_sm / per_warp < warps) warps = dev.regs_per_sm / per_warp;
  if (dev.regs_per_block / per_warp < warps) warps = dev.regs_per_block / per_warp;
  return warps;
}

}  // namespace

int blocks_per_sm_for(const DeviceLimits& dev, int threads, int regs_per_thread, size_t smem_bytes) {
  if (threads <= 0 || threads > dev.max_threads_per_block) return 0;
  if (smem_bytes > dev.smem_per_block_optin) return 0;
  const int warps = static_cast<int>(ceil_div(threads, kWarpSize));
  const long long block_regs = static_cast<long long>(warps) * regs_per_warp(regs_per_thread);
  if (block_regs > dev.regs_per_block) return 0;
  long long blocks = dev.max_blocks_per_sm;
  const long long by_threads = dev.max_threads_per_sm / (warps * kWarpSize);
  const long long by_regs = dev.regs_per_sm / block_regs;
  const long long by_smem = static_cast<long long>(
      dev.smem_per_sm / (smem_bytes + dev.smem_reserved_per_block));
  if (by_threads < blocks) blocks = by_threads;
  if (by_regs < blocks) blocks = by_regs;
  if (by_smem < blocks) blocks = by_smem;
  return static_cast<int>(blocks);
}

bool check_co_residency(const Plan& p, int resident_per_sm, int sm_count, char* reason, size_t len) {
  if (resident_per_sm < 1 || static_cast<long long>(resident_per_sm) * sm_count < p.blocks) {
    write_reason(reason, len,
                 "%d blocks of %d threads with %d B shared memory cannot all be resident (%d per SM x %d SMs)",
                 p.blocks, p.threads, p.smem_bytes, resident_per_sm, sm_count);
    return false;
  }
  return true;
}

bool check_plan(const DeviceLimits& dev, const Plan& p, char* reason, size_t len) {
  const long long H = p.hidden;
  if (p.blocks != p.blocks_per_dir * p.directions) {
    write_reason(reason, len, "plan: grid %d != %d blocks x %d directions", p.blocks, p.blocks_per_dir,
                 p.directions);
    return false;
  }
  if (static_cast<long long>(p.blocks_per_dir) * p.rows_per_block < H ||
      static_cast<long long>(p.blocks_per_dir - 1) * p.rows_per_block >= H) {
    write_reason(reason, len, "plan: %d blocks of %d rows do not tile hidden %lld exactly",
                 p.blocks_per_dir, p.rows_per_block, H);
    return false;
  }
  if (p.row_groups * p.row_group != p.rows_padded || p.rows_padded < p.rows_per_block ||
      (p.row_groups - 1) * p.row_group >= p.rows_per_block) {
    write_reason(reason, len, "plan: %d row groups of %d do not tile %d rows", p.row_groups,
                 p.row_group, p.rows_per_block);
    return false;
  }
  if (p.k_chunk <= 0 || p.k_chunk % kWarpSize != 0 ||
      static_cast<long long>(p.k_splits) * p.k_chunk < H ||
      static_cast<long long>(p.k_splits - 1) * p.k_chunk >= H) {
    write_reason(reason, len, "plan: %d k chunks of %d do not tile hidden %lld", p.k_splits, p.k_chunk, H);
    return false;
  }
  if (p.warps != p.row_groups * p.k_splits || p.threads != p.warps * kWarpSize ||
      p.threads > dev.max_threads_per_block || p.threads > kKernelMaxThreads) {
    write_reason(reason, len, "plan: %d threads for %d x %d warps exceed the limits", p.threads,
                 p.row_groups, p.k_splits);
    return false;
  }
  if (p.batch_chunk < kBatchGroup || p.batch_chunk % kBatchGroup != 0) {
    write_reason(reason, len, "plan: batch chunk %d is not a positive multiple of %d", p.batch_chunk,
                 kBatchGroup);
    return false;
  }
  const long long w_bytes = static_cast<long long>(p.rows_padded) * H * p.elem_bytes;
  const long long x_bytes = static_cast<long long>(p.batch_chunk) * H * 4;
  const long long red_bytes = static_cast<long long>(p.k_splits) * p.batch_chunk * p.rows_padded * 4;
  if (p.smem_w_offset != 0 || p.smem_x_offset % kSmemAlign || p.smem_red_offset % kSmemAlign ||
      p.smem_w_offset + w_bytes > p.smem_x_offset || p.smem_x_offset + x_bytes > p.smem_red_offset ||
      p.smem_red_offset + red_bytes > p.smem_bytes) {
    write_reason(reason, len, "plan: shared-memory regions overlap or overflow");
    return false;
  }
  if (static_cast<size_t>(p.smem_bytes) > dev.smem_per_block_optin ||
      static_cast<size_t>(p.smem_bytes) + dev.smem_reserved_per_block > dev.smem_per_sm) {
    write_reason(reason, len, "plan: %.1f KiB of shared memory per block exceeds the device's %.1f KiB",
                 kib(p.smem_bytes), kib(static_cast<double>(usable_smem_per_block(dev))));
    return false;
  }
  const long long block_regs = static_cast<long long>(p.warps) * regs_per_warp(p.regs_per_thread);
  if (block_regs > dev.regs_per_block || block_regs > dev.regs_per_sm) {
    write_reason(reason, len, "plan: %lld registers per block exceed the device's %d", block_regs,
                 dev.regs_per_block);
    return false;
  }
  const int per_sm = blocks_per_sm_for(dev, p.threads, p.regs_per_thread, p.smem_bytes);
  if (per_sm < 1 || per_sm != p.blocks_per_sm) {
    write_reason(reason, len, "plan: %d blocks per SM recorded, %d allowed", p.blocks_per_sm, per_sm);
    return false;
  }
  return check_co_residency(p, per_sm, dev.sm_count, reason, len);
}

bool make_plan(const DeviceLimits& dev, const ProblemShape& s, int regs_per_thread, Plan* out,
               char* reason, size_t len) {
  if (s.hidden < 1 || s.batch < 1 || s.time_steps < 0 || (s.directions != 1 && s.directions != 2) ||
      (s.elem_bytes != 2 && s.elem_bytes != 4)) {
    write_reason(reason, len, "invalid problem: T=%d N=%d D=%d H=%d element bytes %d", s.time_steps,
                 s.batch, s.directions, s.hidden, s.elem_bytes);
    return false;
  }
  if (regs_per_thread <= 0) regs_per_thread = kKernelMaxRegsPerThread;
  if (dev.sm_count < s.directions) {
    write_reason(reason, len, "the device has %d SMs, fewer than the %d directions", dev.sm_count,
                 s.directions);
    return false;
  }
  Plan p = {};
  p.time_steps = s.time_steps;
  p.batch = s.batch;
  p.directions = s.directions;
  p.hidden = s.hidden;
  p.elem_bytes = s.elem_bytes;
  p.regs_per_thread = regs_per_thread;

  // One block per SM and per direction slice: the weights of a direction are spread over as many
  // SMs as there are, which maximises on-chip capacity and keeps the grid one wave.
  const long long H = s.hidden;
  const int max_blocks_per_dir = dev.sm_count / s.directions;
  p.rows_per_block = static_cast<int>(ceil_div(H, max_blocks_per_dir));
  p.blocks_per_dir = static_cast<int>(ceil_div(H, p.rows_per_block));
  p.blocks = p.blocks_per_dir * s.directions;

  // The largest row group whose zero padding stays small (row groups reuse each staged h value).
  p.row_group = 1;
  for (int rg : kRowGroupChoices) {
    const long long padded = round_up(p.rows_per_block, rg);
    if (padded - p.rows_per_block <= kMaxRowPaddingFraction * p.rows_per_block) {
      p.row_group = rg;
      break;
    }
  }
  p.row_groups = static_cast<int>(ceil_div(p.rows_per_block, p.row_group));
  p.rows_padded = p.row_groups * p.row_group;

  // Capacity first: the weight tile plus the smallest staging must fit one block's shared memory.
  const long long usable = static_cast<long long>(usable_smem_per_block(dev));
  const auto refuse_capacity = [&](long long tile_bytes, long long staging_bytes) {
    const double weights_total = static_cast<double>(H) * H * s.elem_bytes * s.directions;
    write_reason(reason, len,
                 "hidden %lld %s x %d direction(s) needs %.1f MiB of weights on chip; the persistent "
                 "kernel keeps %d rows (%.1f KiB) plus %.1f KiB of staging per block in shared memory, "
                 "and this device allows %.1f KiB per block on %d SMs (%.1f MiB in all)",
                 H, storage_name(s.elem_bytes), s.directions, mib(weights_total), p.rows_per_block,
                 kib(static_cast<double>(tile_bytes)), kib(static_cast<double>(staging_bytes)),
                 kib(static_cast<double>(usable)), dev.sm_count,
                 mib(static_cast<double>(usable) * dev.sm_count));
    return false;
  };
  const long long tile_min = static_cast<long long>(p.rows_per_block) * H * s.elem_bytes;
  if (tile_min + kBatchGroup * H * 4 > usable) return refuse_capacity(tile_min, kBatchGroup * H * 4);

  const int max_warps = max_warps_per_block(dev, regs_per_thread);
  if (p.row_groups > max_warps) {
    write_reason(reason, len,
                 "hidden %lld needs %d rows per block (%d warps), more than the %d warps a block may have",
                 H, p.rows_per_block, p.row_groups, max_warps);
    return false;
  }
  long long k_splits = max_warps / p.row_groups;
  const long long k_splits_by_work = H / (kMinKPerLane * kWarpSize);
  if (k_splits_by_work < k_splits) k_splits = k_splits_by_work;
  if (k_splits < 1) k_splits = 1;
  p.k_chunk = static_cast<int>(round_up(ceil_div(H, k_splits), kWarpSize));
  p.k_splits = static_cast<int>(ceil_div(H, p.k_chunk));
  p.warps = p.row_groups * p.k_splits;
  p.threads = p.warps * kWarpSize;

  // Shared memory: the weight tile, then as many staged sequences as fit.
  const long long w_bytes = round_up(static_cast<long long>(p.rows_padded) * H * s.elem_bytes, kSmemAlign);
  const long long per_sequence = H * 4 + static_cast<long long>(p.k_splits) * p.rows_padded * 4;
  const long long need_min = w_bytes + kBatchGroup * per_sequence + 2 * kSmemAlign;
  if (need_min > usable) return refuse_capacity(w_bytes, need_min - w_bytes);
  const long long batch_rounded = round_up(s.batch, kBatchGroup);
  long long chunk = (usable - w_bytes - 2 * kSmemAlign) / per_sequence;
  chunk = chunk / kBatchGroup * kBatchGroup;
  if (chunk > batch_rounded) chunk = batch_rounded;
  p.batch_chunk = static_cast<int>(chunk);

  p.smem_w_offset = 0;
  p.smem_x_offset = static_cast<int>(w_bytes);
  p.smem_red_offset = static_cast<int>(w_bytes + round_up(chunk * H * 4, kSmemAlign));
  p.smem_bytes = static_cast<int>(p.smem_red_offset +
                                   round_up(chunk * p.k_splits * p.rows_padded * 4, kSmemAlign));
  p.blocks_per_sm = blocks_per_sm_for(dev, p.threads, regs_per_thread, p.smem_bytes);
  if (p.blocks_per_sm < 1) {
    write_reason(reason, len, "a block of %d threads and %.1f KiB shared memory cannot be resident",
                 p.threads, kib(p.smem_bytes));
    return false;
  }
  if (!check_plan(dev, p, reason, len)) return false;
  *out = p;
  if (reason != nullptr && len > 0) reason[0] = '\0';
  return true;
}

void describe_plan(const Plan& p, char* out, size_t len) {
  write_reason(out, len,
               "T=%d N=%d D=%d H=%d elem=%dB: %d blocks (%d/direction, %d/SM allowed) x %d threads; "
               "%d rows/block in %d groups of %d, k in %d chunks of %d; batch chunk %d; "
               "smem %.1f KiB (weights %.1f, staging %.1f, partials %.1f); %d regs/thread",
               p.time_steps, p.batch, p.directions, p.hidden, p.elem_bytes, p.blocks, p.blocks_per_dir,
               p.blocks_per_sm, p.threads, p.rows_per_block, p.row_groups, p.row_group, p.k_splits,
               p.k_chunk, p.batch_chunk, kib(p.smem_bytes), kib(p.smem_x_offset),
               kib(p.smem_red_offset - p.smem_x_offset), kib(p.smem_bytes - p.smem_red_offset),
               p.regs_per_thread);
}

// ---- kernel v2 ------------------------------------------------------------------------------------

namespace {
const char* v2_precision_name(int precision, int elem_bytes) {
  if (precision == kV2Mma16) return elem_bytes == 2 ? "bf16/fp16 (mma m16n8k16)" : "?";
  return precision == kV2Tf32 ? "fp32 as 1xTF32 (mma m16n8k8)" : "fp32 as 3xTF32 (mma m16n8k8)";
}
}  // namespace

long long v2_ring_bytes_for(int batch, int directions, int hidden, int elem_bytes) {
  const long long np = round_up(batch > 0 ? batch : 1, kV2BatchTile), hp = round_up(hidden, kV2RowTile);
  const long long words_per_row = elem_bytes == 2 ? hp / 2 : hp;
  return static_cast<long long>(kV2RingSlots) * directions * np * words_per_row * 8;
}

// The exchange words in shared memory for a mode: ring mode stages tagged 8-byte words (rows padded by 2
// words), cluster mode keeps bare 4-byte payloads (rows padded by 4); either pad puts the 8 sequences of
// a B fragment in different banks.
namespace {
void v2_exchange_layout(PlanV2* p, int mode) {
  const int words_per_row = p->hidden_padded / p->elems_per_word;
  p->b_word_bytes = mode == kV2ModeCluster ? 4 : 8;
  p->b_row_words = words_per_row + (mode == kV2ModeCluster ? 4 : 2);
}
}  // namespace

bool check_plan_v2(const DeviceLimits& dev, const PlanV2& p, char* reason, size_t len) {
  const long long H = p.hidden;
  const bool mma16 = p.precision == kV2Mma16;
  const bool cluster = p.mode == kV2ModeCluster;
  if (p.mode != kV2ModeRing && !cluster) {
    write_reason(reason, len, "v2 plan: mode %d is neither ring nor cluster", p.mode);
    return false;
  }
  if ((mma16 ? p.elem_bytes != 2 || p.k_tile != 16 || p.elems_per_word != 2
             : p.elem_bytes != 4 || p.k_tile != 8 || p.elems_per_word != 1 ||
                   (p.precision != kV2Tf32 && p.precision != kV2Tf32x3))) {
    write_reason(reason, len, "v2 plan: precision %d does not match %d-byte storage", p.precision, p.elem_bytes);
    return false;
  }
  if (p.hidden_padded != round_up(H, kV2RowTile) || p.k_steps * p.k_tile != p.hidden_padded) {
    write_reason(reason, len, "v2 plan: %d k steps of %d do not tile hidden %lld", p.k_steps, p.k_tile, H);
    return false;
  }
  if (p.blocks != p.blocks_per_dir * p.directions * p.groups || p.rows_per_block % kV2RowTile != 0 ||
      p.m_tiles * kV2RowTile != p.rows_per_block ||
      static_cast<long long>(p.blocks_per_dir) * p.rows_per_block < H ||
      static_cast<long long>(p.blocks_per_dir - 1) * p.rows_per_block >= H) {
    write_reason(reason, len, "v2 plan: %d blocks of %d rows do not tile hidden %lld", p.blocks_per_dir,
                 p.rows_per_block, H);
    return false;
  }
  if (p.k_splits < 1 || static_cast<long long>(p.k_splits) * p.k_steps_per_warp < p.k_steps ||
      static_cast<long long>(p.k_splits - 1) * p.k_steps_per_warp >= p.k_steps) {
    write_reason(reason, len, "v2 plan: %d splits of %d k steps do not tile %d steps", p.k_splits,
                 p.k_steps_per_warp, p.k_steps);
    return false;
  }
  bool known_reg_steps = false;
  for (int r : kV2RegStepChoices) known_reg_steps |= r == p.reg_steps;
  const int in_regs = p.k_steps_per_warp < p.reg_steps ? p.k_steps_per_warp : p.reg_steps;
  if (!known_reg_steps || p.smem_steps != p.k_steps_per_warp - in_regs || (p.precision == kV2Tf32x3 && p.reg_steps > 4)) {
    write_reason(reason, len, "v2 plan: %d register + %d shared-memory steps for %d steps per warp", p.reg_steps,
                 p.smem_steps, p.k_steps_per_warp);
    return false;
  }
  if (p.warps != p.m_tiles * p.k_splits || p.warps > kV2MaxWarps || p.threads != p.warps * kWarpSize ||
      p.threads > dev.max_threads_per_block) {
    write_reason(reason, len, "v2 plan: %d warps (%d m tiles x %d k splits) exceed %d", p.warps, p.m_tiles,
                 p.k_splits, kV2MaxWarps);
    return false;
  }
  if (p.batch_padded != round_up(p.batch, kV2BatchTile) || p.n_tiles * kV2BatchTile != p.batch_padded ||
      p.group_tiles < 1 || p.group_tiles > p.n_tiles || p.groups != ceil_div(p.n_tiles, p.group_tiles) ||
      (!cluster && (p.groups != 1 || p.group_tiles != p.n_tiles)) || p.chunk_tiles < 1 ||
      p.chunk_tiles > p.group_tiles) {
    write_reason(reason, len, "v2 plan: %d n tiles in %d groups of %d, chunks of %d, for batch %d", p.n_tiles, p.groups,
                 p.group_tiles, p.chunk_tiles, p.batch);
    return false;
  }
  const long long a_bytes = static_cast<long long>(p.warps) * p.smem_steps * kWarpSize * 16;
  const long long red_bytes = static_cast<long long>(p.k_splits) * p.chunk_tiles * kV2BatchTile * p.rows_per_block * 4;
  const long long len_bytes = static_cast<long long>(p.batch_padded + p.n_tiles) * 4;  // lengths, tile flags
  const long long b_rows = cluster ? v2_cluster_ring_rows(p) : static_cast<long long>(p.chunk_tiles) * kV2BatchTile;
  const long long b_bytes = b_rows * p.b_row_words * p.b_word_bytes;
  const int words_per_row = p.hidden_padded / p.elems_per_word;
  PlanV2 layout = p;
  v2_exchange_layout(&layout, p.mode);
  const bool b_layout = p.b_word_bytes == layout.b_word_bytes && p.b_row_words == layout.b_row_words;
  const long long bar_bytes = cluster ? kV2ClusterBarBytes : 0;
  if (!b_layout || p.smem_a_offset != 0 || p.smem_red_offset % kSmemAlign || p.smem_b_offset % kSmemAlign ||
      p.smem_len_offset % kSmemAlign || a_bytes > p.smem_red_offset || p.smem_red_offset + red_bytes > p.smem_b_offset ||
      p.smem_b_offset + b_bytes > p.smem_len_offset || p.smem_len_offset + len_bytes > p.smem_bytes ||
      (cluster && (p.smem_bar_offset % 8 || p.smem_bar_offset < p.smem_len_offset + len_bytes ||
                   p.smem_bar_offset + bar_bytes > p.smem_bytes)) ||
      (!cluster && p.smem_bar_offset != 0)) {
    write_reason(reason, len, "v2 plan: shared-memory regions overlap or overflow");
    return false;
  }
  if (static_cast<size_t>(p.smem_bytes) > usable_smem_per_block(dev)) {
    write_reason(reason, len, "v2 plan: %.1f KiB of shared memory per block exceeds the device's %.1f KiB",
                 kib(p.smem_bytes), kib(static_cast<double>(usable_smem_per_block(dev))));
    return false;
  }
  const long long ring = cluster ? 0 : v2_ring_bytes_for(p.batch, p.directions, p.hidden, p.elem_bytes) / 8;
  if (p.ring_words != ring) {
    write_reason(reason, len, "v2 plan: ring of %lld words, expected %lld", p.ring_words, ring);
    return false;
  }
  const int per_sm = blocks_per_sm_for(dev, p.threads, p.regs_per_thread, p.smem_bytes);
  if (per_sm < 1 || per_sm != p.blocks_per_sm) {
    write_reason(reason, len, "v2 plan: %d blocks per SM recorded, %d allowed", p.blocks_per_sm, per_sm);
    return false;
  }
  if (cluster) {
    // A cluster's blocks are co-scheduled by the hardware; clusters are independent of each other.
    if (p.blocks_per_dir > dev.max_cluster_blocks || p.blocks_per_dir > dev.sm_count || p.blocks_per_dir < 2 ||
        p.blocks_per_dir > kV2MaxClusterBlocks) {
      write_reason(reason, len, "v2 plan: clusters of %d blocks, the device allows 2 to %d", p.blocks_per_dir,
                   dev.max_cluster_blocks);
      return false;
    }
    // One step's pushes into a slot are counted on that slot's mbarrier.
    const long long slot_bytes = (static_cast<long long>(p.group_tiles) * kV2BatchTile * words_per_row + p.blocks_per_dir) * 4;
    if (slot_bytes > kV2MaxTxBytes) {
      write_reason(reason, len, "v2 plan: %lld bytes per ring slot exceed an mbarrier's %lld-byte transaction count",
                   slot_bytes, kV2MaxTxBytes);
      return false;
    }
    if (p.waves < 1) {
      write_reason(reason, len, "v2 plan: %d waves of clusters", p.waves);
      return false;
    }
  } else if (p.blocks > dev.sm_count || p.waves != 1) {
    // One block per SM is the plan; every block polls its peers, so all must be resident.
    write_reason(reason, len, "v2 plan: %d blocks for %d SMs", p.blocks, dev.sm_count);
    return false;
  }
  return true;
}

namespace {
// The fields every v2 plan shares (shape, precision, k tiling); false with a reason for a bad problem.
bool v2_common(const ProblemShape& s, int precision, int regs_per_thread, PlanV2* p, char* reason, size_t len) {
  if (s.hidden < 1 || s.batch < 1 || s.time_steps < 0 || (s.directions != 1 && s.directions != 2) ||
      (s.elem_bytes != 2 && s.elem_bytes != 4)) {
    write_reason(reason, len, "invalid problem: T=%d N=%d D=%d H=%d element bytes %d", s.time_steps, s.batch,
                 s.directions, s.hidden, s.elem_bytes);
    return false;
  }
  const bool mma16 = s.elem_bytes == 2;
  if (mma16 ? precision != kV2Mma16 : (precision != kV2Tf32 && precision != kV2Tf32x3)) {
    write_reason(reason, len, "v2: precision %d is not available for %d-byte storage", precision, s.elem_bytes);
    return false;
  }
  if (s.time_steps + 1 > kV2MaxSteps) {
    write_reason(reason, len, "v2: %d time steps exceed the exchange tag's %d", s.time_steps, kV2MaxSteps - 1);
    return false;
  }
  *p = PlanV2{};
  p->time_steps = s.time_steps;
  p->batch = s.batch;
  p->directions = s.directions;
  p->hidden = s.hidden;
  p->elem_bytes = s.elem_bytes;
  p->precision = precision;
  p->regs_per_thread = regs_per_thread;
  p->k_tile = mma16 ? 16 : 8;
  p->elems_per_word = mma16 ? 2 : 1;
  p->hidden_padded = static_cast<int>(round_up(s.hidden, kV2RowTile));
  p->k_steps = p->hidden_padded / p->k_tile;
  p->batch_padded = static_cast<int>(round_up(s.batch, kV2BatchTile));
  p->n_tiles = p->batch_padded / kV2BatchTile;
  v2_exchange_layout(p, kV2ModeRing);  // cluster mode sets its own
  return true;
}

// Rows per block and the warps' share of the weights: m tiles, k splits, register / shared-memory
// steps. `where` names the grid in a refusal ("on 132 SMs", "in a cluster of 16").
bool v2_warps(const DeviceLimits& dev, int rows_per_block, const char* where, PlanV2* p, char* reason, size_t len) {
  const long long H = p->hidden;
  p->rows_per_block = rows_per_block;
  p->m_tiles = p->rows_per_block / kV2RowTile;
  p->blocks_per_dir = static_cast<int>(ceil_div(H, p->rows_per_block));
  int max_warps = kV2MaxWarps;
  const int by_threads = dev.max_threads_per_block / kWarpSize;
  if (by_threads < max_warps) max_warps = by_threads;
  const int per_warp = regs_per_warp(p->regs_per_thread);
  if (dev.regs_per_block / per_warp < max_warps) max_warps = dev.regs_per_block / per_warp;
  if (dev.regs_per_sm / per_warp < max_warps) max_warps = dev.regs_per_sm / per_warp;
  if (p->m_tiles > max_warps) {
    write_reason(reason, len,
                 "v2: hidden %lld x %d direction(s) (%.1f MiB of %s weights) needs %d rows per block %s, "
                 "i.e. %d warps of 16 rows, more than the %d warps a block may have",
                 H, p->directions, mib(static_cast<double>(H) * H * p->elem_bytes * p->directions),
                 v2_precision_name(p->precision, p->elem_bytes), p->rows_per_block, where, p->m_tiles, max_warps);
    return false;
  }
  int k_splits = max_warps / p->m_tiles;
  if (k_splits > p->k_steps) k_splits = p->k_steps;
  p->k_steps_per_warp = static_cast<int>(ceil_div(p->k_steps, k_splits));
  p->k_splits = static_cast<int>(ceil_div(p->k_steps, p->k_steps_per_warp));
  p->warps = p->m_tiles * p->k_splits;
  p->threads = p->warps * kWarpSize;
  // 3xTF32 splits each A register into hi and lo at use: 8 register steps spill (ptxas), so 4.
  const int max_reg_steps = p->precision == kV2Tf32x3 ? 4 : kV2MaxRegSteps;
  p->reg_steps = max_reg_steps;
  for (int r : kV2RegStepChoices) {
    if (r >= p->k_steps_per_warp && r <= max_reg_steps) {
      p->reg_steps = r;
      break;
    }
  }
  const int in_regs = p->k_steps_per_warp < p->reg_steps ? p->k_steps_per_warp : p->reg_steps;
  p->smem_steps = p->k_steps_per_warp - in_regs;
  return true;
}

// Bytes of the shared-memory regions that do not depend on the exchange mode: the A steps kept there,
// the lengths and tile flags, and the partial sums of one tile of 8 sequences.
struct V2SmemParts {
  long long a_bytes, len_bytes, red_per_tile;
};
V2SmemParts v2_smem_parts(const PlanV2& p) {
  return {static_cast<long long>(p.warps) * p.smem_steps * kWarpSize * 16,
          round_up(static_cast<long long>(p.batch_padded + p.n_tiles) * 4, kSmemAlign),
          static_cast<long long>(p.k_splits) * kV2BatchTile * p.rows_per_block * 4};
}

// Lays out shared memory: A steps, partial sums of chunk_tiles tiles, `b_rows` rows of exchange words,
// lengths and flags, (cluster mode) the ring slots' mbarriers; then occupancy and the full re-check.
bool v2_finish(const DeviceLimits& dev, long long b_rows, PlanV2* p, char* reason, size_t len) {
  const auto [a_bytes, len_bytes, red_per_tile] = v2_smem_parts(*p);
  p->smem_a_offset = 0;
  p->smem_red_offset = static_cast<int>(round_up(a_bytes, kSmemAlign));
  p->smem_b_offset = static_cast<int>(p->smem_red_offset + round_up(p->chunk_tiles * red_per_tile, kSmemAlign));
  p->smem_len_offset =
      static_cast<int>(p->smem_b_offset + round_up(b_rows * p->b_row_words * p->b_word_bytes, kSmemAlign));
  p->smem_bytes = static_cast<int>(p->smem_len_offset + len_bytes);
  p->smem_bar_offset = 0;
  if (p->mode == kV2ModeCluster) {
    p->smem_bar_offset = p->smem_bytes;  // len_bytes is a multiple of 16: 8-byte aligned
    p->smem_bytes += kV2ClusterBarBytes;
  }
  p->blocks_per_sm = blocks_per_sm_for(dev, p->threads, p->regs_per_thread, p->smem_bytes);
  if (p->blocks_per_sm < 1) {
    write_reason(reason, len, "v2: a block of %d threads and %.1f KiB shared memory cannot be resident", p->threads,
                 kib(p->smem_bytes));
    return false;
  }
  return check_plan_v2(dev, *p, reason, len);
}

bool plan_v2_ring(const DeviceLimits& dev, const ProblemShape& s, int precision, int regs_per_thread, PlanV2* out,
                  char* reason, size_t len) {
  PlanV2 p;
  if (!v2_common(s, precision, regs_per_thread, &p, reason, len)) return false;
  const long long H = s.hidden;
  // Rows per block: the smallest multiple of 16 whose grid (one block per SM) fits the device.
  const int max_blocks_per_dir = dev.sm_count / s.directions;
  if (max_blocks_per_dir < 1) {
    write_reason(reason, len, "v2: the device has %d SMs, fewer than the %d directions", dev.sm_count, s.directions);
    return false;
  }
  char where[64];
  snprintf(where, sizeof(where), "on %d SMs", dev.sm_count);
  if (!v2_warps(dev, static_cast<int>(round_up(ceil_div(H, max_blocks_per_dir), kV2RowTile)), where, &p, reason, len))
    return false;
  p.mode = kV2ModeRing;
  p.groups = 1;
  p.group_tiles = p.n_tiles;
  p.waves = 1;
  p.blocks = p.blocks_per_dir * s.directions;
  const long long usable = static_cast<long long>(usable_smem_per_block(dev));
  const auto [a_bytes, len_bytes, red_per_tile] = v2_smem_parts(p);
  const long long b_per_tile = static_cast<long long>(kV2BatchTile) * p.b_row_words * 8;
  const long long per_tile = red_per_tile + b_per_tile;
  const long long room = usable - a_bytes - len_bytes - 2 * kSmemAlign;
  if (room < per_tile) {
    const int in_regs = p.k_steps_per_warp - p.smem_steps;
    write_reason(reason, len,
                 "v2: hidden %lld x %d direction(s) (%.1f MiB of %s weights): each of %d blocks keeps %d rows, "
                 "%d k steps per warp of which %d in registers and %d (%.1f KiB) in shared memory, plus %.1f KiB "
                 "of staged state and partial sums per tile of 8 sequences; this device allows %.1f KiB of "
                 "shared memory per block",
                 H, s.directions, mib(static_cast<double>(H) * H * s.elem_bytes * s.directions),
                 v2_precision_name(precision, s.elem_bytes), p.blocks, p.rows_per_block, p.k_steps_per_warp, in_regs,
                 p.smem_steps, kib(static_cast<double>(a_bytes)), kib(static_cast<double>(per_tile)),
                 kib(static_cast<double>(usable)));
    return false;
  }
  long long chunk = room / per_tile;
  if (chunk > p.n_tiles) chunk = p.n_tiles;
  p.chunk_tiles = static_cast<int>(chunk);
  p.ring_words = v2_ring_bytes_for(s.batch, s.directions, s.hidden, s.elem_bytes) / 8;
  if (!v2_finish(dev, chunk * kV2BatchTile, &p, reason, len)) return false;
  *out = p;
  return true;
}

// Cluster mode. `one_wave`: refuse when the batch needs more clusters than run at once.
bool plan_v2_cluster(const DeviceLimits& dev, const ProblemShape& s, int precision, int regs_per_thread, bool one_wave,
                     PlanV2* out, char* reason, size_t len) {
  PlanV2 p;
  if (!v2_common(s, precision, regs_per_thread, &p, reason, len)) return false;
  const long long H = s.hidden;
  if (dev.max_cluster_blocks < 1) {
    write_reason(reason, len, "v2 cluster mode: the device has no thread-block clusters (sm_90 and later)");
    return false;
  }
  const int max_cluster = dev.max_cluster_blocks < dev.sm_count ? dev.max_cluster_blocks : dev.sm_count;
  char where[64];
  snprintf(where, sizeof(where), "in a cluster of at most %d", max_cluster);
  // The most blocks a cluster may have: the step's math spread widest, each block the fewest rows.
  if (!v2_warps(dev, static_cast<int>(round_up(ceil_div(H, max_cluster), kV2RowTile)), where, &p, reason, len))
    return false;
  p.mode = kV2ModeCluster;
  p.ring_words = 0;
  if (p.blocks_per_dir < 2) {  // st.async needs a peer: a cluster of one block is undefined behaviour
    write_reason(reason, len,
                 "v2 cluster mode: hidden %lld fits one block of %d rows; a cluster needs at least 2 blocks "
                 "(st.async)",
                 H, p.rows_per_block);
    return false;
  }
  v2_exchange_layout(&p, kV2ModeCluster);  // bare payloads: the mbarrier's byte count says when a slot is full
  const long long usable = static_cast<long long>(usable_smem_per_block(dev));
  const auto [a_bytes, len_bytes, red_per_tile] = v2_smem_parts(p);
  const long long ring_per_tile = static_cast<long long>(kV2RingSlots) * kV2BatchTile * p.b_row_words * p.b_word_bytes;
  const long long room = usable - a_bytes - len_bytes - 3 * kSmemAlign - kV2ClusterBarBytes;
  const double weights_mib = mib(static_cast<double>(H) * H * s.elem_bytes * s.directions);
  if (room < ring_per_tile + red_per_tile) {
    const int in_regs = p.k_steps_per_warp - p.smem_steps;
    write_reason(reason, len,
                 "v2 cluster mode: hidden %lld (%.1f MiB of %s weights per direction) in a cluster of %d blocks: each "
                 "keeps %d rows, %d k steps per warp of which %d in registers and %d (%.1f KiB) in shared memory, "
                 "plus %.1f KiB of ring and partial sums per tile of 8 sequences; this device allows %.1f KiB of "
                 "shared memory per block",
                 H, weights_mib / s.directions, v2_precision_name(precision, s.elem_bytes), p.blocks_per_dir,
                 p.rows_per_block, p.k_steps_per_warp, in_regs, p.smem_steps, kib(static_cast<double>(a_bytes)),
                 kib(static_cast<double>(ring_per_tile + red_per_tile)), kib(static_cast<double>(usable)));
    return false;
  }
  // Clusters that run at once (the runtime's count once known, else SMs / cluster size), and so how
  // many sequence tiles each must take for the batch to need one wave.
  const int resident = dev.max_active_clusters > 0 ? dev.max_active_clusters : dev.sm_count / p.blocks_per_dir;
  const int per_dir = resident / s.directions > 0 ? resident / s.directions : 1;
  long long group_tiles = ceil_div(p.n_tiles, per_dir);
  const long long fit = (room - red_per_tile) / ring_per_tile;  // with partial sums of one tile
  if (group_tiles > fit) group_tiles = fit;
  p.group_tiles = static_cast<int>(group_tiles);
  p.groups = static_cast<int>(ceil_div(p.n_tiles, p.group_tiles));
  p.blocks = p.groups * s.directions * p.blocks_per_dir;
  p.waves = static_cast<int>(ceil_div(static_cast<long long>(p.groups) * s.directions, resident > 0 ? resident : 1));
  if (one_wave && p.waves > 1) {
    write_reason(reason, len,
                 "v2 cluster mode: batch %d needs %d clusters of %d blocks (groups of %d tiles of 8 sequences, at most "
                 "%lld by shared memory: %.1f KiB of ring per tile) x %d direction(s); the device runs %d at once",
                 s.batch, p.groups * s.directions, p.blocks_per_dir, p.group_tiles, fit, kib(static_cast<double>(ring_per_tile)),
                 s.directions, resident);
    return false;
  }
  long long chunk = (room - p.group_tiles * ring_per_tile) / red_per_tile;
  if (chunk > p.group_tiles) chunk = p.group_tiles;
  p.chunk_tiles = static_cast<int>(chunk);
  if (!v2_finish(dev, v2_cluster_ring_rows(p), &p, reason, len)) return false;
  *out = p;
  return true;
}
}  // namespace

bool make_plan_v2_mode(const DeviceLimits& dev, const ProblemShape& s, int precision, int regs_per_thread, int mode,
                       PlanV2* out, char* reason, size_t len) {
  if (regs_per_thread <= 0) regs_per_thread = kKernelMaxRegsPerThread;
  bool ok = false;
  if (mode == kV2ModeRing) {
    ok = plan_v2_ring(dev, s, precision, regs_per_thread, out, reason, len);
  } else if (mode == kV2ModeCluster) {
    ok = plan_v2_cluster(dev, s, precision, regs_per_thread, false, out, reason, len);
  } else if (mode == kV2ModeAuto) {
    char why_cluster[640] = "";
    ok = dev.max_cluster_blocks > 0 &&
         plan_v2_cluster(dev, s, precision, regs_per_thread, true, out, why_cluster, sizeof(why_cluster));
    if (!ok) ok = plan_v2_ring(dev, s, precision, regs_per_thread, out, reason, len);
    if (!ok && dev.max_cluster_blocks > 0 && reason != nullptr && len > 0) {
      const size_t used = strlen(reason);
      if (used + 4 < len) snprintf(reason + used, len - used, "; %s", why_cluster);
    }
  } else {
    write_reason(reason, len, "v2: mode %d is not auto, ring or cluster", mode);
  }
  if (ok && reason != nullptr && len > 0) reason[0] = '\0';
  return ok;
}

bool make_plan_v2(const DeviceLimits& dev, const ProblemShape& s, int precision, int regs_per_thread, PlanV2* out,
                  char* reason, size_t len) {
  return make_plan_v2_mode(dev, s, precision, regs_per_thread, kV2ModeAuto, out, reason, len);
}

void describe_plan_v2(const PlanV2& p, char* out, size_t len) {
  char groups[160] = "";
  if (p.mode == kV2ModeCluster)
    snprintf(groups, sizeof(groups), " = one cluster; %d group(s) of %d tiles of 8 sequences, %d cluster(s) in %d wave(s)",
             p.groups, p.group_tiles, p.groups * p.directions, p.waves);
  write_reason(out, len,
               "v2 %s T=%d N=%d D=%d H=%d %s: %d blocks (%d/direction%s) x %d threads; %d rows/block (%d m tiles), "
               "%d k steps of %d in %d splits of %d (%d in registers, %d in shared memory); %d n tiles in chunks "
               "of %d; smem %.1f KiB; ring %.1f KiB%s; %d regs/thread",
               p.mode == kV2ModeCluster ? "cluster" : "ring", p.time_steps, p.batch, p.directions, p.hidden,
               v2_precision_name(p.precision, p.elem_bytes), p.blocks, p.blocks_per_dir, groups, p.threads,
               p.rows_per_block, p.m_tiles, p.k_steps, p.k_tile, p.k_splits, p.k_steps_per_warp,
               p.k_steps_per_warp - p.smem_steps, p.smem_steps, p.n_tiles, p.chunk_tiles, kib(p.smem_bytes),
               kib(static_cast<double>(p.mode == kV2ModeCluster
                                           ? static_cast<long long>(v2_cluster_ring_rows(p)) * p.b_row_words * p.b_word_bytes
                                           : v2_ring_bytes(p))),
               p.mode == kV2ModeCluster ? " in each block's shared memory" : " in global memory", p.regs_per_thread);
}

}  // namespace prnn
