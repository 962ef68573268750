// The one-process communicator: a world of size 1, where every collective reduces to a copy. It lets the
// distributed code paths run (and be tested) without MPI.
#include <cstring>

#include "core/error.h"
#include "dist/communicator.h"

namespace dsv3 {

size_t comm_type_size(CommType t) {
  switch (t) {
    case CommType::F32: return 4;
    case CommType::F64: return 8;
    case CommType::I32: return 4;
    case CommType::I64: return 8;
    case CommType::U8: return 1;
  }
  return 1;
}

std::vector<int64_t> Communicator::exchange_counts(const std::vector<int64_t>& send_counts) {
  if (int(send_counts.size()) != size()) fail("internal: exchange_counts needs {} counts, got {}", size(), send_counts.size());
  std::vector<int64_t> recv(size());
  all_to_all(send_counts.data(), std::vector<int64_t>(size(), 1), recv.data(), std::vector<int64_t>(size(), 1),
             CommType::I64);
  return recv;
}

std::vector<int64_t> even_counts(int64_t n, int parts) {
  std::vector<int64_t> c(parts, n / parts);
  for (int64_t r = 0; r < n % parts; ++r) c[r]++;
  return c;
}

namespace {

class LocalCommunicator final : public Communicator {
 public:
  int rank() const override { return 0; }
  int size() const override { return 1; }
  std::string transport() const override { return "local"; }
  void all_reduce_sum(void*, int64_t, CommType) override {}
  void reduce_scatter_sum(void* out, const void* in, const std::vector<int64_t>& counts, CommType t) override {
    check(counts);
    if (counts[0] > 0) std::memmove(out, in, size_t(counts[0]) * comm_type_size(t));
  }
  void all_gather(void* out, const void* in, const std::vector<int64_t>& counts, CommType t) override {
    check(counts);
    if (counts[0] > 0 && out != in) std::memmove(out, in, size_t(counts[0]) * comm_type_size(t));
  }
  void all_to_all(const void* send, const std::vector<int64_t>& sc, void* recv, const std::vector<int64_t>& rc,
                  CommType t) override {
    check(sc), check(rc);
    if (sc[0] != rc[0]) fail("internal: all_to_all sends {} elements to itself but expects {}", sc[0], rc[0]);
    if (sc[0] > 0) std::memmove(recv, send, size_t(sc[0]) * comm_type_size(t));
  }
  void broadcast(void*, int64_t, CommType, int root) override {
    if (root != 0) fail("internal: broadcast root {} in a world of 1", root);
  }
  void barrier() override {}
  std::unique_ptr<Communicator> split(int, int) override { return std::make_unique<LocalCommunicator>(); }

 private:
  static void check(const std::vector<int64_t>& c) {
    if (c.size() != 1) fail("internal: a one-rank collective got {} counts", c.size());
  }
};

}  // namespace

std::unique_ptr<Communicator> make_local_communicator() { return std::make_unique<LocalCommunicator>(); }

}  // namespace dsv3
