#include "cli/commands.h"
namespace dsv3::cli {
void add_serve_commands(CLI::App&) {}
}  // namespace dsv3::cli
