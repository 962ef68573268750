// Builds without MPI: a single process only (dist::init refuses to run under mpirun).
#include "core/error.h"
#include "dist/runtime.h"

namespace dsv3::dist {

bool have_mpi() { return false; }
std::unique_ptr<Communicator> make_mpi_world() { fail("this dsv3 was built without MPI"); }
void finalize() {}
void abort_job(int) {}

}  // namespace dsv3::dist
