// dsv3: train and serve DeepSeek-V3-architecture models. One binary, one subcommand per job.
#include <cstdio>
#include <exception>
#include <string>

#include "cli/commands.h"
#include "cli/common.h"
#include "core/error.h"
#include "dist/runtime.h"

namespace {

// One line per failure; under mpirun it names the rank and ends the whole job (the other ranks would
// otherwise wait for this one in their next collective).
int fail_exit(const char* what) {
  std::fprintf(stderr, "error: %s%s\n", dsv3::dist::rank_prefix().c_str(), what);
  dsv3::dist::abort_job(1);
  return 1;
}

}  // namespace

int main(int argc, char** argv) {
  dsv3::cli::select_blas_kernels(argv);
  try {
    dsv3::dist::init(&argc, &argv);  // MPI only when started by mpirun
  } catch (const std::exception& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 1;
  }
  CLI::App app{"dsv3: train and serve DeepSeek-V3-architecture models (MLA, DeepSeekMoE, MTP, FP8)"};
  app.require_subcommand(1);
  app.set_version_flag("--version", "dsv3 0.1.0");
  dsv3::cli::add_info(app);
  dsv3::cli::add_init(app);
  dsv3::cli::add_logits(app);
  dsv3::cli::add_generate(app);
  dsv3::cli::add_bench(app);
  dsv3::cli::add_bench_train(app);
  dsv3::cli::add_quantize(app);
  dsv3::cli::add_tokenizer_commands(app);
  dsv3::cli::add_train_commands(app);
  dsv3::cli::add_serve_commands(app);
  dsv3::cli::add_eval_commands(app);
  int rc = 0;
  try {
    // Under mpirun with several ranks only the commands that split their work may run (the others would
    // repeat the same job on every rank and write the same files at once).
    if (dsv3::dist::world().size() > 1 && argc > 1) {
      const std::string cmd = argv[1];
      if (cmd != "train" && cmd != "grads" && cmd != "generate" && cmd != "serve" && cmd != "bench-train" &&
          cmd.rfind("-", 0) != 0)
        dsv3::fail("{} does not run under mpirun with several ranks (distributed: train, grads, bench-train, "
                   "generate, serve)", cmd);
    }
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    rc = app.exit(e);
  } catch (const dsv3::Error& e) {
    return fail_exit(e.what());
  } catch (const std::bad_alloc&) {
    return fail_exit("out of memory");
  } catch (const std::exception& e) {
    return fail_exit(e.what());
  }
  dsv3::dist::finalize();
  return rc;
}
