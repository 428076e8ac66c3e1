// microbench_host.h - the host-only part of csrc/microbench/microbench.cu: statistics over repeats,
// the grid sizes and partner blocks it measures, the co-residency refusal, the pointer-chase cycle,
// and a small JSON writer. Plain C++17 (g++ alone), so csrc/tests/microbench_host_test.cpp checks it
// on a CPU; the CUDA program only adds the kernels and the launches.
#pragma once

#include <math.h>
#include <stdint.h>
#include <stdio.h>

#include <algorithm>
#include <random>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace mb {

constexpr int kNoGpuExit = 77;       // as csrc/tests/prnn_test.cpp: "compiled and linked; not run"
constexpr int kUsageExit = 2;
constexpr int kMinAllToAllBlocks = 2;
constexpr int kAllToAllGrids[] = {8, 16, 32, 64};  // plus the SM count itself (132 on an H100 SXM)

// ---- statistics ---------------------------------------------------------------------------------
struct Summary {
  int repeats = 0;
  double median = NAN, p10 = NAN, p90 = NAN, min = NAN, max = NAN;
};

// The q-quantile (0 <= q <= 1) of sorted values, interpolating linearly between the closest ranks
// (numpy's default): position q * (n - 1).
inline double quantile_sorted(const std::vector<double>& sorted, double q) {
  if (sorted.empty()) throw std::invalid_argument("quantile of no values");
  if (!(q >= 0.0 && q <= 1.0)) throw std::invalid_argument("quantile q must be in [0, 1]");
  const double pos = q * static_cast<double>(sorted.size() - 1);
  const size_t lo = static_cast<size_t>(floor(pos));
  const size_t hi = std::min(lo + 1, sorted.size() - 1);
  return sorted[lo] + (pos - static_cast<double>(lo)) * (sorted[hi] - sorted[lo]);
}

// Median, 10th and 90th percentile, extremes. An empty list gives repeats = 0 and NaN everywhere
// (written as null); a non-finite sample is a bug in the caller and throws.
inline Summary summarize(std::vector<double> values) {
  Summary s;
  for (double v : values)
    if (!isfinite(v)) throw std::invalid_argument("summarize: a sample is not finite");
  if (values.empty()) return s;
  std::sort(values.begin(), values.end());
  s.repeats = static_cast<int>(values.size());
  s.median = quantile_sorted(values, 0.5);
  s.p10 = quantile_sorted(values, 0.1);
  s.p90 = quantile_sorted(values, 0.9);
  s.min = values.front();
  s.max = values.back();
  return s;
}

// ---- what to measure ------------------------------------------------------------------------------
// Grid sizes of the all-to-all hand-off: 8, 16, 32, 64 and the SM count (one block per SM), those
// above the SM count dropped; a device with fewer than 8 SMs measures its SM count alone.
inline std::vector<int> all_to_all_grid_sizes(int sm_count) {
  std::vector<int> sizes;
  if (sm_count < kMinAllToAllBlocks) return sizes;
  for (int g : kAllToAllGrids)
    if (g <= sm_count) sizes.push_back(g);
  if (sizes.empty() || sizes.back() != sm_count) sizes.push_back(sm_count);
  return sizes;
}

// Partners of block 0 in the two-block hand-off: block 1, the middle block and the last block of a
// one-block-per-SM grid (distinct, ascending), so that near and far SMs both show up.
inline std::vector<int> pingpong_partners(int sm_count) {
  std::vector<int> partners;
  for (int p : {1, sm_count / 2, sm_count - 1})
    if (p >= 1 && p < sm_count && (partners.empty() || partners.back() < p)) partners.push_back(p);
  return partners;
}

// Can `blocks` blocks all be resident at once, given how many fit on one SM (the runtime's
// cudaOccupancyMaxActiveBlocksPerMultiprocessor) and the SM count? The hand-off benchmarks spin on
// each other's words, so a block that is not running would make the others wait until the watchdog
// fires; such a grid is refused up front with the numbers.
inline bool check_co_resident(int blocks, int resident_per_sm, int sm_count, std::string* why) {
  char text[256];
  if (blocks < 1) {
    snprintf(text, sizeof text, "grid of %d blocks: need at least 1", blocks);
  } else if (resident_per_sm < 1) {
    snprintf(text, sizeof text, "not one block of this kernel fits on an SM (occupancy 0): %d blocks cannot run",
             blocks);
  } else if (static_cast<long long>(resident_per_sm) * sm_count < blocks) {
    snprintf(text, sizeof text, "%d blocks cannot all be co-resident: %d per SM x %d SMs = %lld", blocks,
             resident_per_sm, sm_count, static_cast<long long>(resident_per_sm) * sm_count);
  } else {
    return true;
  }
  if (why) *why = text;
  return false;
}

// A random cyclic permutation of 0..n-1 (Sattolo's algorithm: one cycle through every node), so
// that following next[] from any node visits all n before it repeats and the hardware cannot guess
// the next address. Deterministic for a seed.
inline std::vector<uint32_t> single_cycle(uint32_t n, uint64_t seed) {
  std::vector<uint32_t> order(n);
  for (uint32_t i = 0; i < n; ++i) order[i] = i;
  std::mt19937_64 rng(seed);
  for (uint32_t i = n; i > 1; --i) {
    std::uniform_int_distribution<uint32_t> pick(0, i - 2);
    std::swap(order[i - 1], order[pick(rng)]);
  }
  std::vector<uint32_t> next(n);
  for (uint32_t i = 0; i < n; ++i) next[order[i]] = order[(i + 1) % n];
  return next;
}

// ---- JSON -----------------------------------------------------------------------------------------
inline std::string json_string(const std::string& s) {
  std::string out = "\"";
  for (unsigned char c : s) {
    switch (c) {
      case '"': out += "\\\""; break;
      case '\\': out += "\\\\"; break;
      case '\n': out += "\\n"; break;
      case '\t': out += "\\t"; break;
      case '\r': out += "\\r"; break;
      default:
        if (c < 0x20) {
          char esc[8];
          snprintf(esc, sizeof esc, "\\u%04x", c);
          out += esc;
        } else {
          out += static_cast<char>(c);
        }
    }
  }
  return out + "\"";
}

inline std::string json_number(double v) {
  if (!isfinite(v)) return "null";  // JSON has no NaN or infinity
  char text[32];
  snprintf(text, sizeof text, "%.6g", v);
  return text;
}

inline std::string json_number(long long v) { return std::to_string(v); }
inline std::string json_number(int v) { return std::to_string(v); }
inline std::string json_bool(bool v) { return v ? "true" : "false"; }

// An object whose members keep their insertion order; values are JSON text already.
class JsonObject {
 public:
  JsonObject& raw(const std::string& key, const std::string& json) {
    members_.emplace_back(key, json);
    return *this;
  }
  JsonObject& str(const std::string& key, const std::string& v) { return raw(key, json_string(v)); }
  JsonObject& num(const std::string& key, double v) { return raw(key, json_number(v)); }
  JsonObject& num(const std::string& key, long long v) { return raw(key, json_number(v)); }
  JsonObject& num(const std::string& key, int v) { return raw(key, json_number(v)); }
  JsonObject& flag(const std::string& key, bool v) { return raw(key, json_bool(v)); }
  bool empty() const { return members_.empty(); }
  std::string text(int indent = 0) const {
    if (members_.empty()) return "{}";
    const std::string pad(indent + 1, ' ');
    std::string out = "{\n";
    for (size_t i = 0; i < members_.size(); ++i) {
      out += pad + json_string(members_[i].first) + ": " + members_[i].second;
      out += i + 1 < members_.size() ? ",\n" : "\n";
    }
    return out + std::string(indent, ' ') + "}";
  }

 private:
  std::vector<std::pair<std::string, std::string>> members_;
};

inline std::string json_array(const std::vector<std::string>& items) {
  std::string out = "[";
  for (size_t i = 0; i < items.size(); ++i) out += (i ? ", " : "") + items[i];
  return out + "]";
}

inline std::string json_numbers(const std::vector<double>& values) {
  std::vector<std::string> items;
  for (double v : values) items.push_back(json_number(v));
  return json_array(items);
}

// ---- one measured figure --------------------------------------------------------------------------
// status: "ok"; "not_applicable" (the device or this build lacks the feature: reason says which);
// "refused" (the configuration cannot run as asked, e.g. not co-resident: reason has the numbers);
// "timeout" (a watchdog fired: reason names the wait); "error" (a CUDA error or a wrong payload).
struct Figure {
  std::string name;    // e.g. "l2_round_trip"
  std::string label;   // which instance, for the table: "block 0 <-> 66", "cluster of 16"
  std::string unit;    // e.g. "ns per load"
  std::string status = "ok";
  std::string reason;  // empty when ok
  JsonObject params;   // what was measured (sizes, SM ids, ...)
  std::vector<double> samples;  // one per repeat, in `unit`

  bool failed() const { return status == "timeout" || status == "error"; }
  std::string json(int indent) const {
    const Summary s = summarize(samples);
    JsonObject o;
    o.str("name", name).str("label", label).str("unit", unit).str("status", status);
    if (!reason.empty()) o.str("reason", reason);
    if (!params.empty()) o.raw("params", params.text(indent + 1));
    o.num("repeats", s.repeats).num("median", s.median).num("p10", s.p10).num("p90", s.p90);
    o.num("min", s.min).num("max", s.max).raw("samples", json_numbers(samples));
    return o.text(indent);
  }
};

// One line of the stdout table: name, label, median [p10, p90] unit, or the status and its reason.
inline std::string table_row(const Figure& f) {
  char text[512];
  const Summary s = summarize(f.samples);
  if (f.status == "ok") {
    snprintf(text, sizeof text, "%-26s %-34s %10.3f  [%9.3f, %9.3f]  %s  (n=%d)", f.name.c_str(), f.label.c_str(),
             s.median, s.p10, s.p90, f.unit.c_str(), s.repeats);
  } else {
    snprintf(text, sizeof text, "%-26s %-34s %s: %.200s", f.name.c_str(), f.label.c_str(), f.status.c_str(),
             f.reason.c_str());
  }
  return text;
}

}  // namespace mb
