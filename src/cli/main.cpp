// dsv3: train and serve DeepSeek-V3-architecture models. One binary, one subcommand per job.
#include <cstdio>
#include <exception>

#include "cli/commands.h"
#include "cli/common.h"
#include "core/error.h"

int main(int argc, char** argv) {
  dsv3::cli::select_blas_kernels(argv);
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
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e);
  } catch (const dsv3::Error& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 1;
  } catch (const std::bad_alloc&) {
    std::fprintf(stderr, "error: out of memory\n");
    return 1;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 1;
  }
  return 0;
}
