#include "cli/commands.h"
namespace dsv3::cli {
void add_info(CLI::App&) {}
void add_init(CLI::App&) {}
void add_logits(CLI::App&) {}
void add_generate(CLI::App&) {}
void add_bench(CLI::App&) {}
}  // namespace dsv3::cli
