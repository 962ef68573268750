#include "train/checkpoint.h"

#include <fcntl.h>
#include <stdio.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <filesystem>

#include "io/atomic_file.h"
#include "io/safetensors.h"

namespace dsv3 {

namespace fs = std::filesystem;

namespace {

Tensor f32_tensor(const std::string& name, const std::vector<float>& v) {
  Tensor t = Tensor::empty(DType::F32, {int64_t(v.size())}, name);
  std::copy(v.begin(), v.end(), t.ptr<float>());
  return t;
}

}  // namespace

void swap_in_directory(const std::string& src, const std::string& dst) {
  if (!fs::exists(dst)) {
    if (std::rename(src.c_str(), dst.c_str()) != 0) fail("renaming {} to {} failed: {}", src, dst, std::strerror(errno));
    return;
  }
  if (renameat2(AT_FDCWD, src.c_str(), AT_FDCWD, dst.c_str(), RENAME_EXCHANGE) == 0) {
    fs::remove_all(src);  // now holds the previous checkpoint
    return;
  }
  // Fallback: old -> .old, new -> dst, then drop .old.
  const std::string old = dst + ".old";
  fs::remove_all(old);
  if (std::rename(dst.c_str(), old.c_str()) != 0) fail("renaming {} failed: {}", dst, std::strerror(errno));
  if (std::rename(src.c_str(), dst.c_str()) != 0) {
    std::rename(old.c_str(), dst.c_str());
    fail("renaming {} to {} failed: {}", src, dst, std::strerror(errno));
  }
  fs::remove_all(old);
}

bool is_checkpoint(const std::string& dir) { return fs::exists(fs::path(dir) / "trainer_state.json"); }

nlohmann::json load_checkpoint_args(const std::string& dir) {
  if (!is_checkpoint(dir)) fail("{} is not a training checkpoint (no trainer_state.json)", dir);
  try {
    return nlohmann::json::parse(read_file((fs::path(dir) / "trainer_state.json").string())).value("args", nlohmann::json::object());
  } catch (const nlohmann::json::exception& e) {
    fail("{}/trainer_state.json: {}", dir, e.what());
  }
}

void save_checkpoint(const std::string& dir, const ModelConfig& cfg, const ModelWeights& params, DType save_dtype,
                     const std::vector<float>& adam_m, const std::vector<float>& adam_v, const TrainerState& st,
                     const std::string& tokenizer_dir) {
  fs::path final_dir = fs::absolute(dir);
  const std::string tmp = (final_dir.parent_path() / ("." + final_dir.filename().string() + ".tmp." +
                                                      std::to_string(getpid()))).string();
  try {
    fs::remove_all(tmp);
    fs::create_directories(tmp);
    save_weights(cfg, params, tmp, save_dtype);
    if (const char* f = std::getenv("DSV3_FAULT_INJECT"); f && std::string(f) == "save")
      fail("injected failure while writing {} (DSV3_FAULT_INJECT=save)", tmp);
    std::vector<Tensor> ts = {f32_tensor("adam.m", adam_m), f32_tensor("adam.v", adam_v)};
    if (save_dtype != DType::F32) {
      Tensor master = params.flat.clone();
      master.name = "master";
      master.shape = {params.flat.numel()};
      ts.push_back(master);
    }
    write_safetensors((fs::path(tmp) / "trainer_state.safetensors").string(), ts);
    nlohmann::json j = {{"step", st.step},
                        {"tokens", st.tokens},
                        {"adam_t", st.adam_t},
                        {"rng", {st.rng[0], st.rng[1], st.rng[2], st.rng[3]}},
                        {"model_dtype", dtype_name(save_dtype)},
                        {"args", st.args}};
    write_file_atomic((fs::path(tmp) / "trainer_state.json").string(), j.dump(2) + "\n");
    if (!tokenizer_dir.empty()) {
      fs::path td = fs::is_directory(tokenizer_dir) ? fs::path(tokenizer_dir) : fs::path(tokenizer_dir).parent_path();
      for (const char* n : {"tokenizer.json", "tokenizer_config.json"})
        if (fs::exists(td / n)) fs::copy_file(td / n, fs::path(tmp) / n, fs::copy_options::overwrite_existing);
    }
    swap_in_directory(tmp, final_dir.string());
  } catch (const std::exception& e) {
    std::error_code ec;
    fs::remove_all(tmp, ec);
    fail("saving checkpoint {} failed (the previous checkpoint is untouched): {}", final_dir.string(), e.what());
  }
}

Checkpoint load_checkpoint(const std::string& dir, int64_t expert_lo, int64_t expert_n) {
  if (!is_checkpoint(dir)) fail("{} is not a training checkpoint (no trainer_state.json)", dir);
  Checkpoint c;
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(read_file((fs::path(dir) / "trainer_state.json").string()));
    c.state.step = j.at("step");
    c.state.tokens = j.at("tokens");
    c.state.adam_t = j.at("adam_t");
    for (int i = 0; i < 4; ++i) c.state.rng[i] = j.at("rng").at(i).get<uint64_t>();
    c.state.args = j.value("args", nlohmann::json::object());
  } catch (const nlohmann::json::exception& e) {
    fail("{}/trainer_state.json: {}", dir, e.what());
  }
  c.cfg = ModelConfig::load(dir);
  LoadOptions lo;
  lo.dtype = "f32";
  lo.expert_lo = expert_lo, lo.expert_n = expert_n;
  c.params = load_weights(c.cfg, dir, lo);
  const ParamLayout full = make_param_layout(c.cfg);
  SafetensorsFile f((fs::path(dir) / "trainer_state.safetensors").string());
  // The flat arrays are stored in the full layout; a slice copies only its own tensors out of the mapping.
  auto get = [&](const char* name, std::vector<float>& out) {
    if (!f.has(name)) fail("{}/trainer_state.safetensors has no {}", dir, name);
    Tensor t = f.get(name);
    if (t.dtype != DType::F32 || t.numel() != full.num_params)
      fail("{}/trainer_state.safetensors: {} must be f32 [{}]", dir, name, full.num_params);
    const float* src = t.ptr<float>();
    if (c.params.layout.num_params == full.num_params) {
      out.assign(src, src + t.numel());
      return;
    }
    out.resize(size_t(c.params.layout.num_params));
    for (auto& s : c.params.layout.specs)
      if (!s.is_bias) std::copy_n(src + full.at(s.name).offset, shape_numel(s.shape), out.data() + s.offset);
  };
  get("adam.m", c.adam_m);
  get("adam.v", c.adam_v);
  if (f.has("master")) {
    std::vector<float> mst;
    get("master", mst);
    std::copy(mst.begin(), mst.end(), c.params.flat.ptr<float>());
  }
  return c;
}

}  // namespace dsv3
