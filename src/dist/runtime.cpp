#include "dist/runtime.h"

#include <omp.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <string>

#include "core/error.h"

namespace dsv3::dist {

namespace {

std::unique_ptr<Communicator> g_world;
bool g_launched = false;
int g_local_rank = 0;

// OpenMPI exports these to every process it starts (PMIx ones for launchers built on PMIx).
bool started_by_mpirun() {
  return std::getenv("OMPI_COMM_WORLD_SIZE") || std::getenv("PMIX_RANK");
}

int env_int(const char* name, int dflt) {
  const char* v = std::getenv(name);
  return v ? std::atoi(v) : dflt;
}

}  // namespace

void init(int* argc, char*** argv) {
  (void)argc, (void)argv;
  if (!started_by_mpirun()) return;
  if (!have_mpi())
    fail("started by mpirun, but this dsv3 was built without MPI (install libopenmpi-dev and rebuild)");
  g_world = make_mpi_world();
  g_launched = true;
  g_local_rank = env_int("OMPI_COMM_WORLD_LOCAL_RANK", env_int("MPI_LOCALRANKID", 0));
  // Ranks of one host share its cores: without an explicit OMP_NUM_THREADS, each takes its share (several
  // full-width OpenMP teams on the same cores run many times slower than one).
  if (!std::getenv("OMP_NUM_THREADS")) {
    const int local = std::max(1, env_int("OMPI_COMM_WORLD_LOCAL_SIZE", 1));
    const int cores = int(std::max<long>(1, sysconf(_SC_NPROCESSORS_ONLN)));
    omp_set_num_threads(std::max(1, cores / local));
  }
}

bool launched() { return g_launched; }

Communicator& world() {
  if (!g_world) g_world = make_local_communicator();
  return *g_world;
}

int local_rank() { return g_local_rank; }

std::string rank_device(const std::string& device) {
  return device == "cuda" && world().size() > 1 ? "cuda:" + std::to_string(g_local_rank) : device;
}
int device_index(const std::string& device) {
  if (device == "cuda") return 0;
  if (device.rfind("cuda:", 0) == 0) return std::atoi(device.c_str() + 5);
  return -1;
}

double timeout_s() {
  const char* v = std::getenv("DSV3_DIST_TIMEOUT");
  if (!v) return 300.0;
  char* end = nullptr;
  const double t = std::strtod(v, &end);
  if (end == v || !(t > 0)) fail("DSV3_DIST_TIMEOUT must be a positive number of seconds, got '{}'", v);
  return t;
}

namespace {
std::atomic<int> g_no_timeout{0};
}
ScopedNoTimeout::ScopedNoTimeout() { ++g_no_timeout; }
ScopedNoTimeout::~ScopedNoTimeout() { --g_no_timeout; }
bool timeout_paused() { return g_no_timeout.load() > 0; }

std::string rank_prefix() {
  if (!g_launched || world().size() <= 1) return "";
  return "rank " + std::to_string(world().rank()) + ": ";
}

}  // namespace dsv3::dist
