#include "cli/commands.h"
namespace dsv3::cli {
void add_train_commands(CLI::App&) {}
}  // namespace dsv3::cli
