// prnn_emulation_test.cpp - runs the fp32 persistent kernels on CPU threads, against a CPU loop.
//
// The kernel template of prnn_kernels.cuh is compiled by g++ with a small shim (one POSIX thread
// per CUDA thread, std::barrier for __syncthreads, per-warp barriers for shuffles, std::atomic_ref
// for the device atomics, so the kernel's own counter barrier and its bounded wait run as written,
// with a steady clock for %globaltimer). Plans come from the real planner on small made-up
// devices chosen so that the cases cover: both directions, k split over several warps, several
// batch chunks, every row-group template (4, 2, 1), ragged lengths including 0 and T, h0 / dh_last,
// all three activations. It checks the kernel's indexing, staging, reductions, positions and
// epilogues, and that a grid barrier whose peer never arrives gives up with a status instead of
// hanging (the PRNN_FAULT=timeout mechanism: one block skips its arrivals); it cannot check what only a GPU shows (memory ordering of the real barrier, the
// cooperative launch, fp16/bf16 conversions, speed).
// Build: g++ -std=c++20 -O2 -Wno-unknown-pragmas -pthread -DPRNN_HOST_EMULATION -I csrc -I <cuda>/include
//        csrc/prnn_planner.cpp csrc/tests/prnn_emulation_test.cpp
#include "prnn.h"  // first: the CUDA headers define the qualifiers that the shim replaces below

#include "prnn_emu_shim.h"

#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wunknown-pragmas"
#pragma GCC diagnostic ignored "-Wunused-parameter"
#include "prnn_kernels.cuh"
#include "prnn_oracle.h"
#include "prnn_expect.h"  // g_failures
#pragma GCC diagnostic pop

// ---- the test ---------------------------------------------------------------------------------
namespace {

using prnn::DeviceLimits;
using prnn::KernelArgs;
using prnn::Plan;

constexpr size_t kThreadStackBytes = 256 * 1024;
constexpr double kTolerance = 2e-5;  // relative to max(1, max |reference|); fp32 accumulation
// Long: starting thousands of OS threads on 2 cores keeps early blocks waiting for many seconds.
constexpr unsigned long long kBarrierTimeoutNs = 600ull * 1000 * 1000 * 1000;
constexpr unsigned long long kFaultTimeoutNs = 200ull * 1000 * 1000;          // the timeout case's bound
constexpr int kWatchdogSeconds = 60;  // the timeout case must end long before this, or it hangs

// The workspace header of one launch (counter + status record), zeroed per launch as the API does.
struct Header {
  unsigned int counter = 0;
  unsigned int status[prnn::kStatusWords] = {};
};


struct ThreadStart {
  const Plan* plan;
  const KernelArgs* args;
  bool backward;
  EmuBlock* block;
  unsigned int block_index, thread_index;
};

template <int RG>
void run_kernel(const ThreadStart& s) {
  if (s.backward)
    prnn::persistent_rnn_kernel<float, RG, true>(*s.plan, *s.args);
  else
    prnn::persistent_rnn_kernel<float, RG, false>(*s.plan, *s.args);
}

void* thread_main(void* arg) {
  const ThreadStart& s = *static_cast<ThreadStart*>(arg);
  threadIdx.x = s.thread_index;
  blockIdx.x = s.block_index;
  g_block = s.block;
  switch (s.plan->row_group) {
    case 4: run_kernel<4>(s); break;
    case 2: run_kernel<2>(s); break;
    default: run_kernel<1>(s); break;
  }
  return nullptr;
}

// One "launch": a thread per CUDA thread. `header` is zeroed first and wired into the arguments.
void launch(const Plan& plan, KernelArgs args, bool backward, Header* header) {
  *header = Header{};
  args.barrier_counter = &header->counter;
  args.status = header->status;
  if (args.barrier_timeout_ns == 0) args.barrier_timeout_ns = kBarrierTimeoutNs;
  blockDim.x = plan.threads;
  gridDim.x = plan.blocks;
  std::vector<std::unique_ptr<EmuBlock>> blocks;
  for (int b = 0; b < plan.blocks; ++b) blocks.push_back(std::make_unique<EmuBlock>(plan.threads, plan.smem_bytes));
  std::vector<ThreadStart> starts;
  starts.reserve(static_cast<size_t>(plan.blocks) * plan.threads);
  for (int b = 0; b < plan.blocks; ++b)
    for (int t = 0; t < plan.threads; ++t)
      starts.push_back({&plan, &args, backward, blocks[b].get(), static_cast<unsigned>(b), static_cast<unsigned>(t)});
  pthread_attr_t attr;
  pthread_attr_init(&attr);
  pthread_attr_setstacksize(&attr, kThreadStackBytes);
  std::vector<pthread_t> threads(starts.size());
  for (size_t i = 0; i < starts.size(); ++i) {
    if (pthread_create(&threads[i], &attr, thread_main, &starts[i]) != 0) {
      printf("FAIL: could not start thread %zu of %zu\n", i, starts.size());
      exit(1);
    }
  }
  for (pthread_t& t : threads) pthread_join(t, nullptr);
  pthread_attr_destroy(&attr);
}

struct Case {
  const char* name;
  DeviceLimits device;
  int T, N, D, H;
  prnnActivation_t act;
  bool ragged, with_h0, with_dh_last, with_dh0;
  float w_gain;  // weight scale x sqrt(3/H); > 1 with clipped relu drives values into the clip
};

double max_error(const std::vector<float>& got, const std::vector<double>& ref, size_t begin, size_t end) {
  double err = 0;
  for (size_t i = begin; i < end; ++i) {
    const double d = fabs(static_cast<double>(got[i]) - ref[i]);
    err = isnan(d) ? INFINITY : std::max(err, d);
  }
  return err;
}

bool compare(const char* name, const char* what, const std::vector<float>& got, const std::vector<double>& ref,
             int steps, size_t step_elems) {
  double scale = 1.0;
  for (double r : ref) scale = std::max(scale, fabs(r));
  for (int t = 0; t < steps; ++t) {
    const double err = max_error(got, ref, t * step_elems, (t + 1) * step_elems);
    if (!(err <= kTolerance * scale)) {
      printf("FAIL %s: %s step %d: max error %.3g (tolerance %.3g)\n", name, what, t, err, kTolerance * scale);
      return false;
    }
  }
  return true;
}

void run_case(const Case& c, std::mt19937& rng) {
  const prnn::ProblemShape shape = {c.T, c.N, c.D, c.H, 4};
  Plan plan;
  char reason[512] = "";
  if (!prnn::make_plan(c.device, shape, prnn::kKernelMaxRegsPerThread, &plan, reason, sizeof(reason))) {
    printf("FAIL %s: no plan: %s\n", c.name, reason);
    ++g_failures;
    return;
  }
  char text[512];
  prnn::describe_plan(plan, text, sizeof(text));

  const size_t step = static_cast<size_t>(c.N) * c.D * c.H, total = step * c.T;
  std::uniform_real_distribution<float> uni(-1.0f, 1.0f);
  const float w_scale = c.w_gain * sqrtf(3.0f / c.H);
  std::vector<float> u(total), w(static_cast<size_t>(c.D) * c.H * c.H), h0(step), dy(total), dh_last(step);
  for (float& v : u) v = uni(rng) * (c.act == PRNN_ACT_CLIPPED_RELU ? 15.0f : 1.0f);
  for (float& v : w) v = uni(rng) * w_scale;
  for (float& v : h0) v = uni(rng);
  for (float& v : dy) v = uni(rng);
  for (float& v : dh_last) v = uni(rng);
  std::vector<int32_t> lengths(c.N, c.T);
  if (c.ragged) {
    for (int n = 0; n < c.N; ++n) lengths[n] = static_cast<int32_t>(rng() % (c.T + 1));
    lengths[0] = c.T;
    if (c.N > 1) lengths[1] = 0;
  }

  // CPU loop in double.
  std::vector<double> y_ref(total, 0.0), hl_ref(step, 0.0), du_ref(total, 0.0), dh0_ref(step, 0.0);
  std::vector<double> h(c.H), hn(c.H), g(c.H), du(c.H);
  long long clipped = 0;
  for (int d = 0; d < c.D; ++d) {
    const float* W = w.data() + static_cast<size_t>(d) * c.H * c.H;
    for (int n = 0; n < c.N; ++n) {
      const int L = lengths[n];
      const size_t nd = (static_cast<size_t>(n) * c.D + d) * c.H;
      for (int i = 0; i < c.H; ++i) h[i] = c.with_h0 ? h0[nd + i] : 0.0;
      for (int pos = 0; pos < L; ++pos) {
        const int t = d == 0 ? pos : L - 1 - pos;
        for (int i = 0; i < c.H; ++i) {
          double z = u[t * step + nd + i];
          for (int k = 0; k < c.H; ++k) z += static_cast<double>(W[static_cast<size_t>(i) * c.H + k]) * h[k];
          hn[i] = act(c.act, z);
          clipped += hn[i] == PRNN_CLIPPED_RELU_CEILING;
        }
        for (int i = 0; i < c.H; ++i) y_ref[t * step + nd + i] = h[i] = hn[i];
      }
      for (int i = 0; i < c.H; ++i) hl_ref[nd + i] = h[i];
      std::fill(g.begin(), g.end(), 0.0);
      for (int pos = L - 1; pos >= 0; --pos) {
        const int t = d == 0 ? pos : L - 1 - pos;
        for (int i = 0; i < c.H; ++i) {
          const double dh = dy[t * step + nd + i] + g[i] + (pos == L - 1 && c.with_dh_last ? dh_last[nd + i] : 0.0);
          du[i] = dh * act_grad(c.act, y_ref[t * step + nd + i]);
          du_ref[t * step + nd + i] = du[i];
        }
        for (int k = 0; k < c.H; ++k) {
          double s = 0;
          for (int i = 0; i < c.H; ++i) s += static_cast<double>(W[static_cast<size_t>(i) * c.H + k]) * du[i];
          g[k] = s;
        }
      }
      for (int i = 0; i < c.H; ++i) dh0_ref[nd + i] = g[i] + (L == 0 && c.with_dh_last ? dh_last[nd + i] : 0.0);
    }
  }

  // The kernels, outputs poisoned with NaN.
  const float nan = NAN;
  std::vector<float> y(total, nan), h_last(step, nan), du_out(total, nan), dh0(step, nan);
  std::vector<float> state(2 * step, nan);
  Header header;
  KernelArgs fa = {};
  fa.fault_skip_block = -1;
  fa.u = u.data();
  fa.h0 = c.with_h0 ? h0.data() : nullptr;
  fa.y = y.data();
  fa.h_last = h_last.data();
  fa.w = w.data();
  fa.lengths = c.ragged ? lengths.data() : nullptr;
  fa.state = state.data();
  fa.activation = c.act;
  launch(plan, fa, false, &header);
  bool ok = header.status[prnn::kStatusCode] == prnn::kKernelOk;
  KernelArgs ba = {};
  ba.fault_skip_block = -1;
  ba.y_in = y.data();
  ba.dy = dy.data();
  ba.dh_last = c.with_dh_last ? dh_last.data() : nullptr;
  ba.du = du_out.data();
  ba.dh0 = c.with_dh0 ? dh0.data() : nullptr;
  ba.w = w.data();
  ba.lengths = fa.lengths;
  ba.state = state.data();
  ba.activation = c.act;
  launch(plan, ba, true, &header);
  ok &= header.status[prnn::kStatusCode] == prnn::kKernelOk;
  if (!ok) printf("FAIL %s: a launch reported a barrier timeout\n", c.name);

  ok &= compare(c.name, "y", y, y_ref, c.T, step);
  ok &= compare(c.name, "h_last", h_last, hl_ref, 1, step);
  ok &= compare(c.name, "du", du_out, du_ref, c.T, step);
  if (c.with_dh0) ok &= compare(c.name, "dh0", dh0, dh0_ref, 1, step);
  if (!ok) ++g_failures;
  printf("%s %s (%s%s)\n      plan: %s\n", ok ? "ok  " : "FAIL", c.name, c.ragged ? "ragged" : "full",
         c.act == PRNN_ACT_CLIPPED_RELU ? (clipped > 0 ? ", clip reached" : ", clip never reached") : "", text);
  if (c.act == PRNN_ACT_CLIPPED_RELU && clipped == 0) {
    printf("FAIL %s: the clip was never reached\n", c.name);
    ++g_failures;
  }
}

DeviceLimits small_device(int sms, int threads_per_block, size_t smem_per_block) {
  return DeviceLimits{sms, 65536, 65536, 2048, threads_per_block, 32, smem_per_block + 1024, smem_per_block, 1024};
}

// A peer that never arrives (PRNN_FAULT=timeout's mechanism: the last block skips its arrivals):
// every block must give up at the first barrier within the bound, leaving the status record, and
// the launch must end. A watchdog fails the test instead of letting a broken bound hang it.
void run_timeout_case(bool backward) {
  const char* name = backward ? "barrier timeout (backward)" : "barrier timeout (forward)";
  const int T = 4, N = 2, D = 1, H = 40;
  Plan plan;
  char reason[512] = "";
  if (!prnn::make_plan(small_device(4, 256, 48 * 1024), {T, N, D, H, 4}, prnn::kKernelMaxRegsPerThread, &plan, reason,
                       sizeof(reason))) {
    printf("FAIL %s: no plan: %s\n", name, reason);
    ++g_failures;
    return;
  }
  const size_t step = static_cast<size_t>(N) * D * H;
  std::vector<float> u(step * T, 0.5f), w(static_cast<size_t>(H) * H, 0.01f), y(step * T, 0.0f), dy(step * T, 1.0f);
  std::vector<float> du(step * T, 0.0f), state(2 * step, 0.0f);
  KernelArgs a = {};
  a.w = w.data();
  a.state = state.data();
  a.activation = PRNN_ACT_TANH;
  if (backward) {
    a.y_in = y.data();
    a.dy = dy.data();
    a.du = du.data();
  } else {
    a.u = u.data();
    a.y = y.data();
  }
  a.barrier_timeout_ns = kFaultTimeoutNs;
  a.fault_skip_block = plan.blocks - 1;
  std::atomic<bool> finished{false};
  std::thread watchdog([&] {
    for (int i = 0; i < kWatchdogSeconds * 10 && !finished.load(); ++i)
      std::this_thread::sleep_for(std::chrono::milliseconds(100));
    if (!finished.load()) {
      printf("FAIL %s: the launch did not end within %d s: the barrier wait is unbounded\n", name, kWatchdogSeconds);
      fflush(stdout);
      _exit(1);
    }
  });
  Header header;
  const auto start = std::chrono::steady_clock::now();
  launch(plan, a, backward, &header);
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  finished.store(true);
  watchdog.join();
  const unsigned int* r = header.status;
  EXPECT(r[prnn::kStatusCode] == prnn::kKernelBarrierTimeout, "%s: status %u, expected the timeout code", name,
         r[prnn::kStatusCode]);
  EXPECT(r[prnn::kStatusGeneration] == 1, "%s: gave up at barrier %u, expected the first", name,
         r[prnn::kStatusGeneration]);
  EXPECT(r[prnn::kStatusArrived] == static_cast<unsigned int>(plan.blocks - 1) &&
             r[prnn::kStatusGrid] == static_cast<unsigned int>(plan.blocks),
         "%s: %u of %u blocks recorded as arrived, expected %d of %d", name, r[prnn::kStatusArrived],
         r[prnn::kStatusGrid], plan.blocks - 1, plan.blocks);
  EXPECT(r[prnn::kStatusBlock] < static_cast<unsigned int>(plan.blocks) &&
             r[prnn::kStatusTimeoutMs] == kFaultTimeoutNs / 1000000,
         "%s: block %u, timeout %u ms recorded", name, r[prnn::kStatusBlock], r[prnn::kStatusTimeoutMs]);
  // Only step 0 ran (forward: t = 0; backward: t = T-1): a write to any other timestep would mean
  // that a block went on past the barrier it gave up at.
  const std::vector<float>& out = backward ? du : y;
  const size_t first = backward ? 0 : step, last = backward ? step * (T - 1) : step * T;
  bool later_steps_untouched = true;
  for (size_t i = first; i < last; ++i) later_steps_untouched &= out[i] == 0.0f;
  EXPECT(later_steps_untouched, "%s: blocks went on past the barrier they gave up at", name);
  printf("%s %s: %d blocks, block %u gave up at barrier %u after %.2f s (bound %.1f s)\n",
         r[prnn::kStatusCode] == prnn::kKernelBarrierTimeout ? "ok  " : "FAIL", name, plan.blocks,
         r[prnn::kStatusBlock], r[prnn::kStatusGeneration], seconds, kFaultTimeoutNs / 1e9);
}

}  // namespace

int main() {
  std::mt19937 rng(7);
  const Case cases[] = {
      // 2 directions, 4 blocks of 35 rows (row group 4), 3 batch chunks of 4, tanh.
      {"bidirectional tanh, chunked batch", small_device(4, 512, 12 * 1024), 3, 9, 2, 70, PRNN_ACT_TANH,
       true, true, true, true, 1.2f},
      // k split in 2 chunks (H >= 512), row group 4 rows per block, relu.
      {"k split, relu", small_device(130, 128, 48 * 1024), 2, 2, 1, 520, PRNN_ACT_RELU, true, false, true, true, 0.9f},
      // rows per block 9 -> row group 2; clipped relu driven into the clip.
      {"row group 2, clipped relu", small_device(8, 512, 48 * 1024), 6, 2, 1, 72, PRNN_ACT_CLIPPED_RELU, true,
       true, false, true, 2.0f},
      // rows per block 7 -> row group 1; no dh0 (the extra backward step is skipped).
      {"row group 1, no dh0", small_device(5, 512, 48 * 1024), 4, 5, 1, 33, PRNN_ACT_RELU, false, true, true,
       false, 0.9f},
      // a single unit and a single step
      {"H=1 T=1", small_device(2, 512, 48 * 1024), 1, 1, 2, 1, PRNN_ACT_TANH, false, true, true, true, 1.0f},
  };
  bool seen_rg[5] = {}, seen_ks = false, seen_chunks = false;
  for (const Case& c : cases) {
    Plan p;
    const prnn::ProblemShape s = {c.T, c.N, c.D, c.H, 4};
    if (prnn::make_plan(c.device, s, prnn::kKernelMaxRegsPerThread, &p, nullptr, 0)) {
      seen_rg[p.row_group] = true;
      seen_ks |= p.k_splits > 1;
      seen_chunks |= p.batch_chunk < c.N;
    }
    const auto start = std::chrono::steady_clock::now();
    run_case(c, rng);
    printf("      %.1f s\n", std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count());
  }
  run_timeout_case(false);
  run_timeout_case(true);
  if (!(seen_rg[1] && seen_rg[2] && seen_rg[4] && seen_ks && seen_chunks)) {
    printf("FAIL: the cases no longer cover row groups 1/2/4, k splits and batch chunks\n");
    ++g_failures;
  }
  printf("emulation test: %d failures\n", g_failures);
  return g_failures == 0 ? 0 : 1;
}
