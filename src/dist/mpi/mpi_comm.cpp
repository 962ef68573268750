// The MPI transport (OpenMPI): host-memory collectives for CPU ranks, the launcher's world and the NCCL
// bootstrap. Every blocking call runs under a watchdog (see dist/runtime.h): a collective that does not
// finish within the timeout ends this process with a message, and mpirun then ends the job.
// The C API only (OpenMPI's C++ bindings are deprecated and warn under -Wextra).
#define OMPI_SKIP_MPICXX 1
#define MPICH_SKIP_MPICXX 1
#include <mpi.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <climits>
#include <cstdio>
#include <cstdlib>
#include <thread>

#include "core/error.h"
#include "dist/runtime.h"

namespace dsv3::dist {

namespace {

MPI_Datatype mpi_type(CommType t) {
  switch (t) {
    case CommType::F32: return MPI_FLOAT;
    case CommType::F64: return MPI_DOUBLE;
    case CommType::I32: return MPI_INT32_T;
    case CommType::I64: return MPI_INT64_T;
    case CommType::U8: return MPI_UINT8_T;
  }
  return MPI_BYTE;
}

// ---- watchdog: one collective at a time per process (the training and inference loops are single-threaded
// in their communication).
std::atomic<int64_t> g_since_ms{-1};
std::atomic<const char*> g_what{""};
int g_rank = 0;

int64_t now_ms() {
  return std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

void watchdog_loop(double timeout) {
  const int64_t limit = int64_t(timeout * 1000.0);
  for (;;) {
    std::this_thread::sleep_for(std::chrono::milliseconds(200));
    const int64_t since = g_since_ms.load();
    if (since >= 0 && now_ms() - since > limit) {
      std::fprintf(stderr,
                   "error: rank %d: %s did not complete within %.0f s (DSV3_DIST_TIMEOUT): another rank died, hangs "
                   "or runs different work; ending the job\n",
                   g_rank, g_what.load(), timeout);
      std::fflush(stderr);
      _exit(1);  // mpirun sees a rank exit without MPI_Finalize and ends every other rank
    }
  }
}

struct Watch {
  explicit Watch(const char* what) {
    if (timeout_paused()) return;
    g_what = what;
    g_since_ms = now_ms();
  }
  ~Watch() { g_since_ms = -1; }
};

void check(int rc, const char* what) {
  if (rc == MPI_SUCCESS) return;
  char msg[MPI_MAX_ERROR_STRING];
  int len = 0;
  MPI_Error_string(rc, msg, &len);
  fail("MPI {} failed: {}", what, std::string(msg, size_t(len)));
}

int as_int(int64_t n, const char* what) {
  if (n < 0 || n > INT_MAX) fail("MPI {}: {} elements exceed the 2^31 element limit of one call", what, n);
  return int(n);
}

class MpiCommunicator final : public Communicator {
 public:
  MpiCommunicator(MPI_Comm c, bool owned) : comm_(c), owned_(owned) {
    MPI_Comm_rank(comm_, &rank_);
    MPI_Comm_size(comm_, &size_);
    MPI_Comm_set_errhandler(comm_, MPI_ERRORS_RETURN);
  }
  ~MpiCommunicator() override {
    if (owned_) {
      int fin = 0;
      MPI_Finalized(&fin);
      if (!fin) MPI_Comm_free(&comm_);
    }
  }
  int rank() const override { return rank_; }
  int size() const override { return size_; }
  std::string transport() const override { return "mpi"; }

  void all_reduce_sum(void* x, int64_t n, CommType t) override {
    Watch w("all-reduce");
    // Chunks of at most 2^30 elements keep every call inside MPI's int counts.
    char* p = static_cast<char*>(x);
    const int64_t chunk = int64_t(1) << 30;
    for (int64_t o = 0; o < n; o += chunk) {
      const int64_t m = std::min(chunk, n - o);
      check(MPI_Allreduce(MPI_IN_PLACE, p + size_t(o) * comm_type_size(t), int(m), mpi_type(t), MPI_SUM, comm_),
            "all-reduce");
    }
  }
  void reduce_scatter_sum(void* out, const void* in, const std::vector<int64_t>& counts, CommType t) override {
    Watch w("reduce-scatter");
    std::vector<int> c = ints(counts, "reduce-scatter");
    check(MPI_Reduce_scatter(in, out, c.data(), mpi_type(t), MPI_SUM, comm_), "reduce-scatter");
  }
  void all_gather(void* out, const void* in, const std::vector<int64_t>& counts, CommType t) override {
    Watch w("all-gather");
    std::vector<int> c = ints(counts, "all-gather"), d = displs(c);
    check(MPI_Allgatherv(in, c[rank_], mpi_type(t), out, c.data(), d.data(), mpi_type(t), comm_), "all-gather");
  }
  void all_to_all(const void* send, const std::vector<int64_t>& sc, void* recv, const std::vector<int64_t>& rc,
                  CommType t) override {
    Watch w("all-to-all");
    std::vector<int> s = ints(sc, "all-to-all"), r = ints(rc, "all-to-all"), sd = displs(s), rd = displs(r);
    check(MPI_Alltoallv(send, s.data(), sd.data(), mpi_type(t), recv, r.data(), rd.data(), mpi_type(t), comm_),
          "all-to-all");
  }
  void broadcast(void* x, int64_t n, CommType t, int root) override {
    Watch w("broadcast");
    check(MPI_Bcast(x, as_int(n, "broadcast"), mpi_type(t), root, comm_), "broadcast");
  }
  void barrier() override {
    Watch w("barrier");
    check(MPI_Barrier(comm_), "barrier");
  }
  std::unique_ptr<Communicator> split(int color, int key) override {
    Watch w("communicator split");
    MPI_Comm c;
    check(MPI_Comm_split(comm_, color, key, &c), "communicator split");
    return std::make_unique<MpiCommunicator>(c, true);
  }

 private:
  std::vector<int> ints(const std::vector<int64_t>& c, const char* what) const {
    if (int(c.size()) != size_) fail("internal: MPI {} needs {} counts, got {}", what, size_, c.size());
    std::vector<int> out(c.size());
    int64_t total = 0;
    for (size_t i = 0; i < c.size(); ++i) out[i] = as_int(c[i], what), total += c[i];
    as_int(total, what);  // the displacements are ints too
    return out;
  }
  static std::vector<int> displs(const std::vector<int>& c) {
    std::vector<int> d(c.size(), 0);
    for (size_t i = 1; i < c.size(); ++i) d[i] = d[i - 1] + c[i - 1];
    return d;
  }
  MPI_Comm comm_;
  bool owned_;
  int rank_ = 0, size_ = 1;
};

bool g_started = false;

}  // namespace

bool have_mpi() { return true; }

std::unique_ptr<Communicator> make_mpi_world() {
  int provided = 0;
  check(MPI_Init_thread(nullptr, nullptr, MPI_THREAD_SERIALIZED, &provided), "init");
  g_started = true;
  // The server's scheduler thread makes the collectives of a serving leader (one thread at a time).
  if (provided < MPI_THREAD_SERIALIZED) fail("this MPI library does not support MPI_THREAD_SERIALIZED");
  MPI_Comm_rank(MPI_COMM_WORLD, &g_rank);
  std::thread(watchdog_loop, timeout_s()).detach();
  return std::make_unique<MpiCommunicator>(MPI_COMM_WORLD, false);
}

void finalize() {
  if (!g_started) return;
  int fin = 0;
  MPI_Finalized(&fin);
  if (!fin) MPI_Finalize();
}

void abort_job(int code) {
  if (!g_started) return;
  std::fflush(stderr), std::fflush(stdout);
  MPI_Abort(MPI_COMM_WORLD, code);
}

}  // namespace dsv3::dist
