#pragma once
// The process's place in a distributed job. `dsv3 ...` alone is a world of one (no MPI call is made, MPI and
// NCCL are not needed at run time); under `mpirun -np N dsv3 ...` (OpenMPI's environment variables are set)
// init() initializes MPI and world() is the MPI world. Ranks map to GPUs by local rank.
//
// Faults: every blocking collective of the MPI transport is watched by a timer thread; one that has not
// finished after timeout_s() (DSV3_DIST_TIMEOUT, default 300 s) prints an error naming the rank and the
// collective and ends the process with status 1, which makes mpirun end the whole job. A rank that dies is
// noticed by mpirun itself, which then kills the other ranks.
#include <string>

#include "dist/communicator.h"

namespace dsv3::dist {

// Call first in main. Initializes MPI when launched by mpirun; fails with a one-line reason when launched by
// mpirun but this build has no MPI.
void init(int* argc, char*** argv);
void finalize();              // MPI_Finalize when init() started MPI
bool launched();              // running under mpirun with more than zero MPI ranks initialized
Communicator& world();        // the MPI world, or a one-rank local communicator
int local_rank();             // rank among the processes of this host (GPU index); 0 alone
double timeout_s();           // collective timeout (seconds)
// Ends the whole job after an error on this rank (MPI_Abort); returns only when not launched.
void abort_job(int code);
// While one exists, collectives on this process wait without the timeout: for a rank that legitimately
// idles in a collective (a serving follower waiting for the next request).
struct ScopedNoTimeout {
  ScopedNoTimeout();
  ~ScopedNoTimeout();
};
bool timeout_paused();

// The --device of this rank: a bare "cuda" under mpirun with several ranks becomes "cuda:<local rank>" (one GPU per
// rank); anything else is returned as given. device_index("cuda:N") = N ("cuda": 0, cpu: -1).
std::string rank_device(const std::string& device);
int device_index(const std::string& device);

// "rank R: " when the world has more than one rank, else "" (prefix for messages).
std::string rank_prefix();

// The MPI transport: a communicator over MPI_COMM_WORLD (dist/mpi); null when this build has no MPI.
std::unique_ptr<Communicator> make_mpi_world();
bool have_mpi();  // this build has the MPI transport

}  // namespace dsv3::dist
