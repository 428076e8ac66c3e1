// microbench_host_test.cpp - the host-only logic of csrc/microbench/microbench.cu on a CPU: statistics
// against hand-computed quantiles, the grid sizes and partners for A100/H100/small devices, the
// co-residency refusal, the pointer-chase cycle, the JSON writer. With a path argument it also
// writes a sample document through the same writer (tests/test_csrc.py parses it with Python's json).
// Exit status: 0 all passed, 1 a check failed.
#include <math.h>
#include <stdio.h>
#include <string.h>

#include <string>
#include <vector>

#include "microbench/microbench_host.h"
#include "prnn_expect.h"

namespace {

bool near(double a, double b) { return fabs(a - b) <= 1e-12 * (1.0 + fabs(b)); }

void test_statistics() {
  // 1..10: position q*(n-1) -> median 5.5, p10 1 + 0.9 = 1.9, p90 9.1 (numpy's "linear" method).
  std::vector<double> ten;
  for (int i = 10; i >= 1; --i) ten.push_back(i);  // unsorted on purpose
  const mb::Summary s = mb::summarize(ten);
  EXPECT(s.repeats == 10, "repeats %d", s.repeats);
  EXPECT(near(s.median, 5.5) && near(s.p10, 1.9) && near(s.p90, 9.1), "median %g p10 %g p90 %g", s.median, s.p10,
         s.p90);
  EXPECT(s.min == 1.0 && s.max == 10.0, "min %g max %g", s.min, s.max);
  const mb::Summary odd = mb::summarize({3.0, 1.0, 2.0});
  EXPECT(near(odd.median, 2.0) && near(odd.p10, 1.2) && near(odd.p90, 2.8), "odd: %g %g %g", odd.median, odd.p10,
         odd.p90);
  const mb::Summary one = mb::summarize({7.25});
  EXPECT(one.repeats == 1 && one.median == 7.25 && one.p10 == 7.25 && one.p90 == 7.25, "one sample");
  const mb::Summary none = mb::summarize({});
  EXPECT(none.repeats == 0 && isnan(none.median) && isnan(none.p90), "no samples: NaN (null in JSON)");
  bool threw = false;
  try {
    mb::summarize({1.0, NAN});
  } catch (const std::invalid_argument&) {
    threw = true;
  }
  EXPECT(threw, "a NaN sample must be refused");
  threw = false;
  try {
    mb::quantile_sorted({1.0}, 1.5);
  } catch (const std::invalid_argument&) {
    threw = true;
  }
  EXPECT(threw, "q outside [0, 1] must be refused");
}

std::string join(const std::vector<int>& v) {
  std::string s;
  for (size_t i = 0; i < v.size(); ++i) s += (i ? "," : "") + std::to_string(v[i]);
  return s;
}

void test_grid_sizes_and_partners() {
  const struct {
    int sms;
    const char* grids;
    const char* partners;
  } cases[] = {{132, "8,16,32,64,132", "1,66,131"},  // H100 SXM / H200
               {108, "8,16,32,64,108", "1,54,107"},  // A100
               {114, "8,16,32,64,114", "1,57,113"},  // H100 PCIe
               {64, "8,16,32,64", "1,32,63"},
               {16, "8,16", "1,8,15"},
               {6, "6", "1,3,5"},
               {2, "2", "1"},
               {1, "", ""}};
  for (const auto& c : cases) {
    const std::string g = join(mb::all_to_all_grid_sizes(c.sms)), p = join(mb::pingpong_partners(c.sms));
    EXPECT(g == c.grids, "%d SMs: grid sizes %s, expected %s", c.sms, g.c_str(), c.grids);
    EXPECT(p == c.partners, "%d SMs: partners %s, expected %s", c.sms, p.c_str(), c.partners);
  }
}

void test_co_residency() {
  std::string why;
  EXPECT(mb::check_co_resident(132, 1, 132, &why), "132 blocks, 1 per SM, 132 SMs must fit");
  EXPECT(mb::check_co_resident(200, 2, 108, &why), "200 blocks, 2 per SM, 108 SMs must fit");
  why.clear();
  EXPECT(!mb::check_co_resident(133, 1, 132, &why), "133 blocks on 132 SMs must be refused");
  EXPECT(why == "133 blocks cannot all be co-resident: 1 per SM x 132 SMs = 132", "message: %s", why.c_str());
  EXPECT(!mb::check_co_resident(8, 0, 132, &why) && why.find("occupancy 0") != std::string::npos, "message: %s",
         why.c_str());
  EXPECT(!mb::check_co_resident(0, 1, 132, &why) && why.find("need at least 1") != std::string::npos, "message: %s",
         why.c_str());
}

void test_single_cycle() {
  for (uint32_t n : {1u, 2u, 3u, 1000u, 65536u}) {
    const std::vector<uint32_t> next = mb::single_cycle(n, 0x5eed);
    std::vector<char> seen(n, 0);
    uint32_t i = 0, steps = 0;
    do {
      EXPECT(next[i] < n, "n=%u: next[%u] = %u out of range", n, i, next[i]);
      if (next[i] >= n) return;
      seen[i] = 1;
      i = next[i];
      ++steps;
    } while (i != 0 && steps <= n);
    EXPECT(steps == n, "n=%u: the cycle from 0 has %u nodes, expected all %u", n, steps, n);
    bool all = true;
    for (char c : seen) all = all && c;
    EXPECT(all, "n=%u: a node is not on the cycle", n);
  }
  EXPECT(mb::single_cycle(1000, 1) == mb::single_cycle(1000, 1), "deterministic for a seed");
  EXPECT(mb::single_cycle(1000, 1) != mb::single_cycle(1000, 2), "the seed changes the order");
  int sequential = 0;
  const std::vector<uint32_t> big = mb::single_cycle(65536, 0x5eed);
  for (uint32_t k = 0; k < big.size(); ++k) sequential += big[k] == k + 1;
  EXPECT(sequential < 100, "%d of 65536 hops go to the next node: not a random order", sequential);
}

void test_json() {
  EXPECT(mb::json_string("a\"b\\c\n\x01") == "\"a\\\"b\\\\c\\n\\u0001\"", "escaping: %s",
         mb::json_string("a\"b\\c\n\x01").c_str());
  EXPECT(mb::json_number(NAN) == "null" && mb::json_number(INFINITY) == "null", "non-finite numbers are null");
  EXPECT(mb::json_number(0.25) == "0.25" && mb::json_number(12345678901LL) == "12345678901", "numbers");
  mb::JsonObject o;
  EXPECT(o.text() == "{}", "empty object");
  o.str("k", "v").num("n", 3).flag("b", false);
  EXPECT(o.text() == "{\n \"k\": \"v\",\n \"n\": 3,\n \"b\": false\n}", "object: %s", o.text().c_str());
  mb::Figure f;
  f.name = "handoff_two_blocks";
  f.unit = "ns per one-way hand-off";
  f.label = "block 0 <-> 1";
  f.samples = {3.0, 1.0, 2.0};
  const std::string row = mb::table_row(f);
  EXPECT(row.find("block 0 <-> 1") != std::string::npos && row.find("2.000") != std::string::npos &&
             row.find("[    1.200,     2.800]") != std::string::npos && row.find("(n=3)") != std::string::npos,
         "row: %s", row.c_str());
  f.status = "not_applicable";
  f.reason = "needs sm_90";
  EXPECT(mb::table_row(f).find("not_applicable: needs sm_90") != std::string::npos, "row of a figure not run");
  EXPECT(!f.failed(), "not applicable is not a failure");
  f.status = "timeout";
  EXPECT(f.failed(), "a timeout is a failure");
}

// The document tests/test_csrc.py parses: one figure of each status, the same writer as the program.
bool write_sample(const char* path) {
  std::vector<mb::Figure> figs(3);
  figs[0].name = "l2_round_trip";
  figs[0].unit = "ns per load";
  figs[0].label = "8 MiB chase";
  figs[0].samples = {1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0};
  figs[0].params.num("buffer_bytes", 8LL << 20).str("load", "ld.global.cg \"quoted\"");
  figs[1].name = "dsmem_all_to_all";
  figs[1].unit = "us per step";
  figs[1].status = "not_applicable";
  figs[1].reason = "thread-block clusters need compute capability 9.0; this device is 8.0";
  figs[2].name = "handoff_all_to_all";
  figs[2].unit = "us per step";
  figs[2].status = "timeout";
  figs[2].reason = "block 3 waited more than 1000 ms at step 7 for the word of block 5";
  figs[2].samples = {2.5};
  std::string items;
  for (size_t i = 0; i < figs.size(); ++i) items += (i ? ",\n  " : "") + figs[i].json(2);
  mb::JsonObject doc;
  doc.str("program", "csrc/tests/microbench_host_test.cpp").raw("figures", "[\n  " + items + "\n ]");
  FILE* f = fopen(path, "w");
  if (!f) return false;
  const std::string text = doc.text() + "\n";
  const bool ok = fwrite(text.data(), 1, text.size(), f) == text.size();
  return fclose(f) == 0 && ok;
}

}  // namespace

int main(int argc, char** argv) {
  test_statistics();
  test_grid_sizes_and_partners();
  test_co_residency();
  test_single_cycle();
  test_json();
  if (argc > 1) EXPECT(write_sample(argv[1]), "cannot write %s", argv[1]);
  printf("microbench host test: %d failures\n", g_failures);
  return g_failures ? 1 : 0;
}
