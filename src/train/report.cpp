// A self-contained HTML report of a training run (inline SVG, no scripts, no external files): loss curves,
// learning rate, MaxVio per MoE layer over steps, and a heatmap of the expert load at the last step.
#include "train/report.h"

#include <algorithm>
#include <cmath>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "core/error.h"
#include "io/atomic_file.h"

namespace dsv3 {

using json = nlohmann::json;

namespace {

struct Series {
  Series(std::string n, std::string c) : name(std::move(n)), color(std::move(c)) {}
  std::string name, color;
  std::vector<double> x, y;
  bool dots = false;
};

const char* kColors[] = {"#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf"};

std::string esc(const std::string& s) {
  std::string o;
  for (char c : s) o += c == '<' ? "&lt;" : c == '>' ? "&gt;" : c == '&' ? "&amp;" : std::string(1, c);
  return o;
}

std::string num(double v) {
  if (v == 0) return "0";
  const double a = std::abs(v);
  if (a >= 1e4 || a < 1e-2) return fmt::format("{:.1e}", v);
  if (a >= 100) return fmt::format("{:.0f}", v);
  return fmt::format("{:.3g}", v);
}

// "Nice" tick positions covering [lo, hi].
std::vector<double> ticks(double lo, double hi, int n) {
  const double span = hi - lo;
  if (!(span > 0)) return {lo};
  const double raw = span / n, mag = std::pow(10.0, std::floor(std::log10(raw)));
  double step = mag;
  for (double m : {1.0, 2.0, 2.5, 5.0, 10.0})
    if (raw <= m * mag) {
      step = m * mag;
      break;
    }
  std::vector<double> t;
  for (double v = std::ceil(lo / step) * step; v <= hi + 1e-9 * span; v += step) t.push_back(v);
  return t;
}

std::string line_chart(const std::string& title, const std::string& ylabel, const std::vector<Series>& ss) {
  const double W = 700, Hh = 300, L = 60, R = 200, T = 30, B = 40;
  double x0 = INFINITY, x1 = -INFINITY, y0 = INFINITY, y1 = -INFINITY;
  for (auto& s : ss)
    for (size_t i = 0; i < s.x.size(); ++i)
      if (std::isfinite(s.y[i])) {
        x0 = std::min(x0, s.x[i]), x1 = std::max(x1, s.x[i]);
        y0 = std::min(y0, s.y[i]), y1 = std::max(y1, s.y[i]);
      }
  std::ostringstream o;
  o << fmt::format("<svg xmlns='http://www.w3.org/2000/svg' width='{}' height='{}' font-family='sans-serif' font-size='11'>", W, Hh);
  o << fmt::format("<text x='{}' y='18' font-size='14' font-weight='bold'>{}</text>", L, esc(title));
  if (!std::isfinite(x0)) {
    o << fmt::format("<text x='{}' y='{}'>no data</text></svg>", L, Hh / 2);
    return o.str();
  }
  if (x1 == x0) x1 = x0 + 1;
  if (y1 == y0) y1 = y0 + 1, y0 -= 1;
  const double pad = 0.05 * (y1 - y0);
  y0 -= pad, y1 += pad;
  auto X = [&](double v) { return L + (v - x0) / (x1 - x0) * (W - L - R); };
  auto Y = [&](double v) { return T + (1 - (v - y0) / (y1 - y0)) * (Hh - T - B); };
  o << fmt::format("<rect x='{}' y='{}' width='{}' height='{}' fill='none' stroke='#999'/>", L, T, W - L - R, Hh - T - B);
  for (double v : ticks(y0, y1, 5))
    o << fmt::format("<line x1='{}' x2='{}' y1='{:.1f}' y2='{:.1f}' stroke='#eee'/><text x='{}' y='{:.1f}' text-anchor='end'>{}</text>",
                     L, W - R, Y(v), Y(v), L - 4, Y(v) + 4, num(v));
  for (double v : ticks(x0, x1, 6))
    o << fmt::format("<text x='{:.1f}' y='{}' text-anchor='middle'>{}</text>", X(v), Hh - B + 14, num(v));
  o << fmt::format("<text x='{}' y='{}' text-anchor='middle'>step</text>", L + (W - L - R) / 2, Hh - 6);
  o << fmt::format("<text transform='translate(12,{}) rotate(-90)' text-anchor='middle'>{}</text>", T + (Hh - T - B) / 2, esc(ylabel));
  int li = 0;
  for (auto& s : ss) {
    std::string pts;
    for (size_t i = 0; i < s.x.size(); ++i)
      if (std::isfinite(s.y[i])) pts += fmt::format("{:.1f},{:.1f} ", X(s.x[i]), Y(s.y[i]));
    o << fmt::format("<polyline points='{}' fill='none' stroke='{}' stroke-width='1.5'/>", pts, s.color);
    if (s.dots)
      for (size_t i = 0; i < s.x.size(); ++i)
        o << fmt::format("<circle cx='{:.1f}' cy='{:.1f}' r='3' fill='{}'/>", X(s.x[i]), Y(s.y[i]), s.color);
    const double ly = T + 10 + 16 * li++;
    o << fmt::format("<line x1='{}' x2='{}' y1='{}' y2='{}' stroke='{}' stroke-width='3'/><text x='{}' y='{}'>{}</text>",
                     W - R + 10, W - R + 28, ly, ly, s.color, W - R + 32, ly + 4, esc(s.name));
  }
  o << "</svg>";
  return o.str();
}

std::string heatmap(const std::vector<int64_t>& layers, const std::vector<std::vector<int64_t>>& load, int64_t step) {
  if (load.empty()) return "<p>No MoE layers.</p>";
  const size_t E = load[0].size();
  const double cell = std::max(12.0, std::min(36.0, 560.0 / double(E))), L = 90, T = 40;
  const double W = L + cell * double(E) + 20, Hh = T + cell * double(load.size()) + 50;
  std::ostringstream o;
  o << fmt::format("<svg xmlns='http://www.w3.org/2000/svg' width='{}' height='{}' font-family='sans-serif' font-size='11'>", W, Hh);
  o << fmt::format("<text x='{}' y='18' font-size='14' font-weight='bold'>Expert load at step {} (tokens / mean; white = 1)</text>", 10, step);
  for (size_t r = 0; r < load.size(); ++r) {
    int64_t sum = 0;
    for (auto v : load[r]) sum += v;
    const double mean = sum ? double(sum) / double(E) : 1.0;
    o << fmt::format("<text x='{}' y='{:.1f}' text-anchor='end'>layer {}</text>", L - 6, T + cell * (r + 0.5) + 4, layers[r]);
    for (size_t e = 0; e < E; ++e) {
      const double q = double(load[r][e]) / mean;  // 0 .. E
      // Blue below the mean, red above, white at the mean; saturates at 0 and 2x.
      const double d = std::clamp(q - 1.0, -1.0, 1.0);
      const int c = int(255 * (1 - std::abs(d)));
      const std::string col = d >= 0 ? fmt::format("rgb(255,{},{})", c, c) : fmt::format("rgb({},{},255)", c, c);
      o << fmt::format("<rect x='{:.1f}' y='{:.1f}' width='{:.1f}' height='{:.1f}' fill='{}' stroke='#fff'><title>layer {} expert {}: {} tokens ({:.2f}x mean)</title></rect>",
                       L + cell * e, T + cell * r, cell, cell, col, layers[r], e, load[r][e], q);
    }
  }
  for (size_t e = 0; e < E; e += std::max<size_t>(1, E / 16))
    o << fmt::format("<text x='{:.1f}' y='{:.1f}' text-anchor='middle'>{}</text>", L + cell * (e + 0.5), T + cell * load.size() + 14, e);
  o << fmt::format("<text x='{:.1f}' y='{:.1f}' text-anchor='middle'>expert</text>", L + cell * E / 2, T + cell * load.size() + 30);
  o << "</svg>";
  return o.str();
}

}  // namespace

void write_report(const std::string& metrics_path, const std::string& out_path) {
  std::ifstream in(metrics_path);
  if (!in) fail("cannot read metrics file {}", metrics_path);
  Series loss{"train loss", kColors[0]}, mtp{"train MTP-1 loss", kColors[3]}, val{"validation loss", kColors[1]},
      vmtp{"validation MTP-1 loss", kColors[4]}, lr{"learning rate", kColors[2]}, gn{"grad norm", kColors[5]},
      vacc{"MTP-1 accuracy (token after next)", kColors[4]}, macc{"next-token accuracy", kColors[1]};
  val.dots = vmtp.dots = vacc.dots = macc.dots = true;
  std::vector<Series> vio;
  std::vector<int64_t> layers;
  std::vector<std::vector<int64_t>> last_load;
  int64_t last_step = 0;
  double last_tok_s = 0;
  std::string line;
  int64_t lineno = 0;
  while (std::getline(in, line)) {
    ++lineno;
    if (line.empty()) continue;
    json j;
    try {
      j = json::parse(line);
    } catch (const json::exception& e) {
      fail("{}:{}: not a JSON line ({})", metrics_path, lineno, e.what());
    }
    const double step = j.value("step", 0.0);
    if (j.value("type", "") == "train") {
      loss.x.push_back(step), loss.y.push_back(j.value("loss", NAN));
      lr.x.push_back(step), lr.y.push_back(j.value("lr", NAN));
      gn.x.push_back(step), gn.y.push_back(j.value("grad_norm", NAN));
      if (j.contains("mtp_loss") && !j["mtp_loss"].empty()) mtp.x.push_back(step), mtp.y.push_back(j["mtp_loss"][0].get<double>());
      if (j.contains("maxvio")) {
        layers = j.value("moe_layers", std::vector<int64_t>{});
        auto mv = j["maxvio"].get<std::vector<double>>();
        if (vio.size() < mv.size())
          for (size_t r = vio.size(); r < mv.size(); ++r)
            vio.push_back({fmt::format("layer {}", r < layers.size() ? layers[r] : int64_t(r)), kColors[r % 8]});
        for (size_t r = 0; r < mv.size(); ++r) vio[r].x.push_back(step), vio[r].y.push_back(mv[r]);
        last_load = j.value("load", std::vector<std::vector<int64_t>>{});
      }
      last_step = int64_t(step);
      last_tok_s = j.value("tok_per_s", 0.0);
    } else if (j.value("type", "") == "val") {
      val.x.push_back(step), val.y.push_back(j.value("val_loss", NAN));
      macc.x.push_back(step), macc.y.push_back(j.value("val_acc", NAN));
      if (j.contains("val_mtp_loss") && !j["val_mtp_loss"].empty()) {
        vmtp.x.push_back(step), vmtp.y.push_back(j["val_mtp_loss"][0].get<double>());
        vacc.x.push_back(step), vacc.y.push_back(j["val_mtp_acc"][0].get<double>());
      }
    }
  }
  std::vector<Series> losses = {loss};
  if (!mtp.x.empty()) losses.push_back(mtp);
  if (!val.x.empty()) losses.push_back(val);
  if (!vmtp.x.empty()) losses.push_back(vmtp);
  std::vector<Series> accs;
  if (!macc.x.empty()) accs.push_back(macc);
  if (!vacc.x.empty()) accs.push_back(vacc);
  std::ostringstream h;
  h << "<!DOCTYPE html><html><head><meta charset='utf-8'><title>dsv3 training report</title>"
       "<style>body{font-family:sans-serif;margin:24px;color:#222} .row{display:flex;flex-wrap:wrap;gap:12px}"
       " td,th{padding:2px 10px;text-align:right}</style></head><body>";
  h << "<h1>dsv3 training report</h1>";
  h << fmt::format("<p>{} steps; last step {:.0f} tokens/s. Source: {}</p>", last_step, last_tok_s, esc(metrics_path));
  if (!val.y.empty()) {
    h << "<table><tr><th>last validation</th><th>loss</th><th>next-token acc</th><th>MTP-1 loss</th><th>MTP-1 acc</th></tr>";
    h << fmt::format("<tr><td>step {:.0f}</td><td>{:.4f}</td><td>{:.3f}</td><td>{}</td><td>{}</td></tr></table>", val.x.back(),
                     val.y.back(), macc.y.back(), vmtp.y.empty() ? "-" : fmt::format("{:.4f}", vmtp.y.back()),
                     vacc.y.empty() ? "-" : fmt::format("{:.3f}", vacc.y.back()));
  }
  h << "<div class='row'>" << line_chart("Loss", "cross-entropy (nats)", losses)
    << line_chart("Expert balance: MaxVio per MoE layer", "max load / mean - 1", vio) << "</div>";
  h << "<div class='row'>" << line_chart("Learning rate", "lr", {lr}) << line_chart("Gradient norm (before clipping)", "norm", {gn});
  if (!accs.empty()) h << line_chart("Validation accuracy", "fraction", accs);
  h << "</div>";
  h << heatmap(layers, last_load, last_step);
  h << "</body></html>\n";
  write_file_atomic(out_path, h.str());
}

void write_comparison(const std::vector<std::string>& paths, std::vector<std::string> labels, const std::string& out_path) {
  if (paths.size() < 2) fail("a comparison needs at least two metrics files, got {}", paths.size());
  if (!labels.empty() && labels.size() != paths.size())
    fail("--labels gives {} names for {} metrics files", labels.size(), paths.size());
  if (labels.empty())
    for (auto& p : paths) labels.push_back(p);
  std::vector<Series> train, val;
  std::vector<double> last_val;
  std::vector<int64_t> last_step;
  for (size_t r = 0; r < paths.size(); ++r) {
    std::ifstream in(paths[r]);
    if (!in) fail("cannot read metrics file {}", paths[r]);
    Series t{labels[r] + " train", kColors[r % 8]}, v{labels[r] + " validation", kColors[r % 8]};
    v.dots = true;
    std::string line;
    int64_t lineno = 0, step_max = 0;
    while (std::getline(in, line)) {
      ++lineno;
      if (line.empty()) continue;
      json j;
      try {
        j = json::parse(line);
      } catch (const json::exception& e) {
        fail("{}:{}: not a JSON line ({})", paths[r], lineno, e.what());
      }
      const double step = j.value("step", 0.0);
      if (j.value("type", "") == "train") t.x.push_back(step), t.y.push_back(j.value("loss", NAN));
      if (j.value("type", "") == "val") v.x.push_back(step), v.y.push_back(j.value("val_loss", NAN));
      step_max = std::max(step_max, int64_t(step));
    }
    if (v.y.empty()) fail("{} has no validation records (train with --eval-every)", paths[r]);
    last_val.push_back(v.y.back());
    last_step.push_back(int64_t(v.x.back()));
    train.push_back(std::move(t));
    val.push_back(std::move(v));
  }
  std::ostringstream h;
  h << "<!DOCTYPE html><html><head><meta charset='utf-8'><title>dsv3 run comparison</title>"
       "<style>body{font-family:sans-serif;margin:24px;color:#222} .row{display:flex;flex-wrap:wrap;gap:12px}"
       " td,th{padding:2px 10px;text-align:right}</style></head><body><h1>dsv3 run comparison</h1>";
  h << "<table><tr><th>run</th><th>last validation step</th><th>validation loss</th><th>vs first run</th></tr>";
  for (size_t r = 0; r < paths.size(); ++r)
    h << fmt::format("<tr><td>{}</td><td>{}</td><td>{:.4f}</td><td>{:+.3f}%</td></tr>", esc(labels[r]), last_step[r],
                     last_val[r], 100.0 * (last_val[r] - last_val[0]) / last_val[0]);
  h << "</table><div class='row'>" << line_chart("Train loss", "cross-entropy (nats)", train)
    << line_chart("Validation loss", "cross-entropy (nats)", val) << "</div></body></html>\n";
  write_file_atomic(out_path, h.str());
}

}  // namespace dsv3
