#pragma once
// The NCCL transport: collectives on GPU memory, one GPU per rank. Built when CUDA is on and the toolkit has
// NCCL (DSV3_HAVE_NCCL); bootstrapped over a host communicator (MPI, or the local one for a single GPU rank):
// rank 0 makes the unique id and broadcasts it. Each collective is queued on the communicator's stream and
// waited for with the job's timeout (dist/runtime.h): one that does not finish aborts the NCCL communicator
// and fails with a message instead of hanging.
#include <memory>

#include "dist/communicator.h"

namespace dsv3 {

bool have_nccl();  // this build has the NCCL transport
// device: the CUDA device of this rank (usually dist::local_rank()).
std::unique_ptr<Communicator> make_nccl_communicator(Communicator& bootstrap, int device);

}  // namespace dsv3
