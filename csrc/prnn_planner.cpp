// prnn_planner.cpp - device limits -> tiling of the persistent recurrent kernel (host only).
// See prnn_planner.h for the tiling this produces.
#include "prnn_planner.h"

#include <stdarg.h>
#include <stdio.h>

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

}  // namespace prnn
