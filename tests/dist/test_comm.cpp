// The communicator collectives under mpirun (CTest runs this with -np 2 and -np 4). Every rank fills its
// inputs from a formula of (rank, index), so each rank can compute the expected result of every collective
// naively on its own and compare exactly (integers) or to 1e-6 (float sums, whose order MPI chooses).
#include <gtest/gtest.h>

#include <cmath>
#include <numeric>

#include "core/error.h"
#include "dist/runtime.h"

namespace dsv3 {
namespace {

Communicator& W() { return dist::world(); }

float val(int r, int64_t i) { return float(r + 1) * 0.5f + float(i % 7) * 0.25f; }

TEST(DistComm, LaunchedWithSeveralRanks) {
  ASSERT_TRUE(dist::launched());
  EXPECT_GE(W().size(), 2);
  EXPECT_EQ(W().transport(), "mpi");
}

TEST(DistComm, AllReduceSum) {
  const int n = W().size();
  for (int64_t len : {1, 5, 1000}) {
    std::vector<float> x(len);
    std::vector<double> xd(len);
    std::vector<int64_t> xi(len);
    for (int64_t i = 0; i < len; ++i) x[i] = val(W().rank(), i), xd[i] = x[i], xi[i] = W().rank() * 1000 + i;
    W().all_reduce_sum(x), W().all_reduce_sum(xd), W().all_reduce_sum(xi);
    for (int64_t i = 0; i < len; ++i) {
      double ref = 0;
      int64_t refi = 0;
      for (int r = 0; r < n; ++r) ref += val(r, i), refi += r * 1000 + i;
      EXPECT_NEAR(x[i], ref, 1e-6 * std::abs(ref));
      EXPECT_EQ(xd[i], ref);  // sums of exact binary fractions: exact in any order
      EXPECT_EQ(xi[i], refi);
    }
  }
}

TEST(DistComm, ReduceScatterUneven) {
  const int n = W().size(), me = W().rank();
  std::vector<int64_t> counts(n);
  for (int r = 0; r < n; ++r) counts[r] = r + 2;  // uneven blocks
  const int64_t total = std::accumulate(counts.begin(), counts.end(), int64_t(0));
  std::vector<float> in(total);
  for (int64_t i = 0; i < total; ++i) in[i] = val(me, i);
  std::vector<float> out(counts[me]);
  W().reduce_scatter_sum(out.data(), in.data(), counts, CommType::F32);
  const int64_t off = std::accumulate(counts.begin(), counts.begin() + me, int64_t(0));
  for (int64_t i = 0; i < counts[me]; ++i) {
    double ref = 0;
    for (int r = 0; r < n; ++r) ref += val(r, off + i);
    EXPECT_NEAR(out[i], ref, 1e-6 * ref) << i;
  }
}

TEST(DistComm, AllGatherUneven) {
  const int n = W().size(), me = W().rank();
  std::vector<int64_t> counts(n);
  for (int r = 0; r < n; ++r) counts[r] = (r * 3) % 4;  // includes empty blocks
  std::vector<int32_t> mine(counts[me]);
  for (int64_t i = 0; i < counts[me]; ++i) mine[i] = me * 100 + int32_t(i);
  std::vector<int32_t> out(std::accumulate(counts.begin(), counts.end(), int64_t(0)) + 1, -7);
  W().all_gather(out.data(), mine.data(), counts, CommType::I32);
  int64_t p = 0;
  for (int r = 0; r < n; ++r)
    for (int64_t i = 0; i < counts[r]; ++i) EXPECT_EQ(out[p++], r * 100 + i);
  EXPECT_EQ(out.back(), -7);  // nothing written past the gathered elements
  EXPECT_EQ(W().gather_all<int64_t>(me * 11), [&] {
    std::vector<int64_t> v(n);
    for (int r = 0; r < n; ++r) v[r] = r * 11;
    return v;
  }());
}

TEST(DistComm, AllToAllUnevenCounts) {
  const int n = W().size(), me = W().rank();
  // rank s sends (s + d) % 3 elements to rank d (some zero), value s * 1000 + d * 10 + i.
  auto cnt = [](int s, int d) { return int64_t((s + d) % 3); };
  std::vector<int64_t> sc(n);
  std::vector<double> send;
  for (int d = 0; d < n; ++d) {
    sc[d] = cnt(me, d);
    for (int64_t i = 0; i < sc[d]; ++i) send.push_back(me * 1000 + d * 10 + double(i));
  }
  std::vector<int64_t> rc = W().exchange_counts(sc);
  for (int s = 0; s < n; ++s) EXPECT_EQ(rc[s], cnt(s, me));
  std::vector<double> recv(std::accumulate(rc.begin(), rc.end(), int64_t(0)));
  W().all_to_all(send.data(), sc, recv.data(), rc, CommType::F64);
  int64_t p = 0;
  for (int s = 0; s < n; ++s)
    for (int64_t i = 0; i < rc[s]; ++i) EXPECT_EQ(recv[p++], s * 1000 + me * 10 + double(i));
}

TEST(DistComm, BroadcastFromEveryRoot) {
  const int n = W().size();
  for (int root = 0; root < n; ++root) {
    std::vector<uint8_t> b(9, uint8_t(W().rank()));
    W().broadcast(b.data(), int64_t(b.size()), CommType::U8, root);
    for (auto v : b) EXPECT_EQ(v, root);
  }
  W().barrier();
}

TEST(DistComm, SplitIntoGroups) {
  const int n = W().size(), me = W().rank();
  // Groups of consecutive pairs (the expert-parallel layout) and of equal parity (the data-parallel one).
  auto pairs = W().split(me / 2, me);
  EXPECT_EQ(pairs->rank(), me % 2);
  EXPECT_EQ(pairs->size(), std::min(2, n - (me / 2) * 2));
  auto parity = W().split(me % 2, me);
  EXPECT_EQ(parity->rank(), me / 2);
  // A sum inside the group only sees the group's ranks.
  int64_t s = parity->sum<int64_t>(me);
  int64_t ref = 0;
  for (int r = me % 2; r < n; r += 2) ref += r;
  EXPECT_EQ(s, ref);
}

TEST(DistComm, EvenCounts) {
  const std::vector<int64_t> c10 = even_counts(10, 4), c2 = even_counts(2, 4);
  ASSERT_EQ(c10.size(), 4u);
  ASSERT_EQ(c2.size(), 4u);
  const int64_t want10[4] = {3, 3, 2, 2}, want2[4] = {1, 1, 0, 0};
  for (int r = 0; r < 4; ++r) {
    EXPECT_EQ(c10[r], want10[r]);
    EXPECT_EQ(c2[r], want2[r]);
  }
}

}  // namespace
}  // namespace dsv3

int main(int argc, char** argv) {
  ::testing::InitGoogleTest(&argc, argv);
  // Only rank 0 prints test results (the others would repeat them).
  try {
    dsv3::dist::init(&argc, &argv);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 1;
  }
  if (dsv3::dist::world().rank() != 0) {
    auto& l = ::testing::UnitTest::GetInstance()->listeners();
    delete l.Release(l.default_result_printer());
  }
  const int rc = RUN_ALL_TESTS();
  // A failure on any rank fails the job.
  const int64_t bad = dsv3::dist::world().sum<int64_t>(rc != 0);
  dsv3::dist::finalize();
  return bad ? 1 : 0;
}
