// Training subcommands. `grads` lives here; train, prepare-data and plot have their own files and are
// registered from add_train_commands.
#include <cstdio>
#include <nlohmann/json.hpp>

#include "cli/commands.h"
#include "dist/expert_shard.h"
#include "dist/param_groups.h"
#include "dist/runtime.h"
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
    int ep = 0, dp = 0;
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
  c->add_option("--ep", a->ep, "Under mpirun: expert-parallel ranks (each owns E/ep routed experts)");
  c->add_option("--dp", a->dp, "Under mpirun: data-parallel degree (ep x dp = ranks); B must divide by the ranks");
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
    // Under mpirun: each rank takes B / ranks sequences and (with --ep) its slice of the experts; the
    // gradients are summed over the ranks that hold each tensor and rank 0 writes the whole model's.
    Communicator& world = dist::world();
    Parallel par = make_parallel(world, a->ep, a->dp, cfg);
    if (par.distributed()) {
      check_same_on_all_ranks(world, cfg.to_json().dump() + a->in + std::to_string(a->mtp) + std::to_string(a->alpha),
                              "model or input");
      if (B % par.size() != 0) fail("{}: B = {} must be a multiple of the {} ranks", a->in, B, par.size());
      if (!be->is_host()) fail("distributed grads run on CPU ranks (--device cpu), got --device {}", a->device);
    }
    if (par.ep > 1) w = slice_experts(w, par.expert_lo, par.expert_n);
    ModelWeights g = alloc_weights(cfg, DType::F32, true, w.layout.expert_lo, par.ep > 1 ? w.layout.expert_n : -1);
    ParamMemory mem(*be, w, g);
    TrainModel tm(*be, cfg, w, g, mem.view());
    std::unique_ptr<ExpertParallel> ep;
    if (par.ep > 1) {
      ep = std::make_unique<ExpertParallel>(*par.ep_group, par.bulk_ep_group(), cfg.n_routed_experts);
      tm.set_expert_parallel(ep.get());
    }
    LossOptions opt;
    opt.mtp = a->mtp;
    opt.mtp_lambda = a->mtp_lambda;
    opt.balance_alpha = a->alpha;
    const double ranks = double(par.size());
    StepStats st = tm.run(flat.data() + par.batch_first(B) * T, par.batch_count(B), T, opt, 1.0 / ranks, true);
    mem.download_grads();
    if (par.distributed()) {
      st.total = world.sum(st.total) / ranks, st.loss = world.sum(st.loss) / ranks;
      all_reduce_grads(make_param_groups(g.layout, par), g.flat.ptr<float>());
      if (par.ep > 1) {
        ModelWeights full = alloc_weights(cfg, DType::F32);
        gather_flat(*par.ep_group, g.layout, g.flat.ptr<float>(), full.layout, full.flat.ptr<float>());
        g = std::move(full);
      }
      if (!par.is_root()) return;
    }
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
