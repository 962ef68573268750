#include "cli/commands.h"
namespace dsv3::cli {
void add_bench(CLI::App&) {}
}  // namespace dsv3::cli
