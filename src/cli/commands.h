#pragma once
// Each subcommand lives in its own cmd_*.cpp and registers itself on the CLI11 app here.
// Callbacks throw dsv3::Error for user-facing failures; main() prints one line and exits 1.
#include <CLI/CLI.hpp>

namespace dsv3::cli {

void add_info(CLI::App& app);
void add_init(CLI::App& app);
void add_logits(CLI::App& app);
void add_generate(CLI::App& app);
void add_bench(CLI::App& app);
void add_bench_train(CLI::App& app);        // training tokens/s and MFU
void add_quantize(CLI::App& app);           // quantize (FP8 hub layout)
void add_tokenizer_commands(CLI::App& app);  // tokenize, detokenize, chat-template, train-tokenizer
void add_train_commands(CLI::App& app);      // grads, train, prepare-data, plot
void add_serve_commands(CLI::App& app);      // serve, chat
void add_eval_commands(CLI::App& app);       // eval perplexity | mc | gen | code

}  // namespace dsv3::cli
