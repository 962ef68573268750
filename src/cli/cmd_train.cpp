// Training subcommands. `grads` lives here; train, prepare-data and plot have their own files and are
// registered from add_train_commands.
#include <cstdio>
#include <nlohmann/json.hpp>

#include "cli/commands.h"
#include "io/safetensors.h"
#include "model/weights.h"
#include "train/param_memory.h"
#include "train/train_model.h"

namespace dsv3::cli {

namespace {

void add_grads(CLI::App& app) {
  auto* c = app.add_subcommand("grads", "Loss and the gradient of every trainable tensor for int32 input_ids [B,T]");
  struct Args {
    std::string dir, in, out, device = "cpu", precision = "default";
    bool mtp = false;
    double mtp_lambda = 0.3, alpha = 0.0;
  };
  auto a = std::make_shared<Args>();
  c->add_option("--model", a->dir, "Model directory")->required();
  c->add_option("--input", a->in, "safetensors with int32 input_ids [B,T]")->required();
  c->add_option("--output", a->out, "safetensors to write: loss [1] and grad.<tensor name>")->required();
  c->add_option("--device", a->device, "cpu | cuda | cuda:N (GPU index)")->capture_default_str();
  c->add_option("--precision", a->precision, "default | fp8 (gradients of the FP8-recipe products)")->capture_default_str();
  c->add_flag("--mtp", a->mtp, "Add the MTP loss lambda/D sum_k CE_k (default: main-model loss only)");
  c->add_option("--mtp-lambda", a->mtp_lambda, "MTP loss weight lambda (with --mtp)");
  c->add_option("--balance-alpha", a->alpha, "Add the sequence-wise balance loss with this alpha (default 0: off)");
  c->callback([=] {
    SafetensorsFile f(a->in);
    if (!f.has("input_ids")) fail("{}: no tensor named input_ids", a->in);
    Tensor ids = f.get("input_ids");
    if (ids.dtype != DType::I32 && ids.dtype != DType::I64)
      fail("{}: input_ids must be int32 (or int64), got {}", a->in, dtype_name(ids.dtype));
    if (ids.ndim() != 2 || ids.dim(0) < 1 || ids.dim(1) < 2)
      fail("{}: input_ids must be [B, T] with B >= 1, T >= 2, got {}", a->in, shape_str(ids.shape));
    const int64_t B = ids.dim(0), T = ids.dim(1);
    std::vector<int32_t> flat(B * T);
    for (int64_t i = 0; i < B * T; ++i)
      flat[i] = ids.dtype == DType::I32 ? ids.ptr<int32_t>()[i] : int32_t(ids.ptr<int64_t>()[i]);
    const TrainBackend::Precision precision = parse_precision(a->precision);
    std::unique_ptr<TrainBackend> be = make_train_backend(a->device);
    be->set_precision(precision);
    ModelConfig cfg = ModelConfig::load(a->dir);
    LoadOptions lo;
    lo.dtype = "f32";  // bf16/fp8 checkpoints are computed in fp32 from their stored values
    ModelWeights w = load_weights(cfg, a->dir, lo);
    ModelWeights g = alloc_weights(cfg, DType::F32);
    ParamMemory mem(*be, w, g);
    TrainModel tm(*be, cfg, w, g, mem.view());
    LossOptions opt;
    opt.mtp = a->mtp;
    opt.mtp_lambda = a->mtp_lambda;
    opt.balance_alpha = a->alpha;
    StepStats st = tm.run(flat.data(), B, T, opt, 1.0, true);
    mem.download_grads();
    std::vector<Tensor> outs;
    Tensor loss = Tensor::empty(DType::F32, {1}, "loss");
    loss.f32()[0] = float(st.total);
    outs.push_back(loss);
    for (auto& s : g.layout.specs) {
      if (s.is_bias) continue;
      Tensor t = g.view(s.name).clone();
      t.name = "grad." + s.name;
      outs.push_back(t);
    }
    write_safetensors(a->out, outs);
    std::fprintf(stderr, "loss %.6f (main %.6f)\n", st.total, st.loss);
  });
}

}  // namespace

void add_train_run(CLI::App& app);
void add_prepare_data(CLI::App& app);
void add_plot(CLI::App& app);

void add_train_commands(CLI::App& app) {
  add_grads(app);
  add_train_run(app);
  add_prepare_data(app);
}

}  // namespace dsv3::cli
