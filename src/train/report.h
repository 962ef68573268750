#pragma once
// `dsv3 plot`: a self-contained HTML report (inline SVG) drawn from a run's metrics.jsonl.
#include <string>
#include <vector>

namespace dsv3 {

void write_report(const std::string& metrics_path, const std::string& out_path);
// Several runs side by side (e.g. the same seed in bf16 and in fp8): train and validation loss curves of every run
// in one chart each, and a table of the last validation loss of each run with its relative difference to the first
// run's. labels: one per run (empty: the file names).
void write_comparison(const std::vector<std::string>& metrics_paths, std::vector<std::string> labels,
                      const std::string& out_path);

}  // namespace dsv3
