#pragma once
// `dsv3 plot`: a self-contained HTML report (inline SVG) drawn from a run's metrics.jsonl.
#include <string>

namespace dsv3 {

void write_report(const std::string& metrics_path, const std::string& out_path);

}  // namespace dsv3
