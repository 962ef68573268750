#include "train/data.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <nlohmann/json.hpp>

#include "core/error.h"
#include "io/atomic_file.h"

namespace dsv3 {

namespace fs = std::filesystem;

namespace {

struct Header {
  char magic[8];
  uint32_t version, vocab_size;
  uint64_t num_tokens, reserved;
};
static_assert(sizeof(Header) == 32, "shard header is 32 bytes");

}  // namespace

void write_shard(const std::string& path, const std::vector<uint32_t>& tokens, uint32_t vocab_size) {
  Header h{};
  std::memcpy(h.magic, kShardMagic, 8);
  h.version = kShardVersion;
  h.vocab_size = vocab_size;
  h.num_tokens = tokens.size();
  AtomicFile f(path);
  f.write(&h, sizeof h);
  f.write(tokens.data(), tokens.size() * 4);
  f.commit();
}

TokenShard::TokenShard(const std::string& path) {
  int fd = ::open(path.c_str(), O_RDONLY);
  if (fd < 0) fail("cannot open token shard {}: {}", path, std::strerror(errno));
  struct stat st {};
  ::fstat(fd, &st);
  const size_t size = size_t(st.st_size);
  if (size < sizeof(Header)) {
    ::close(fd);
    fail("token shard {} is truncated: {} bytes, shorter than the 32-byte header", path, size);
  }
  void* p = ::mmap(nullptr, size, PROT_READ, MAP_PRIVATE, fd, 0);
  ::close(fd);
  if (p == MAP_FAILED) fail("cannot map token shard {}: {}", path, std::strerror(errno));
  map_ = std::shared_ptr<void>(p, [size](void* q) { ::munmap(q, size); });
  Header h;
  std::memcpy(&h, p, sizeof h);
  if (std::memcmp(h.magic, kShardMagic, 8) != 0)
    fail("{} is not a dsv3 token shard (bad magic; expected DSV3TOK1, made by dsv3 prepare-data)", path);
  if (h.version != kShardVersion) fail("token shard {} has version {}, this dsv3 reads version {}", path, h.version, kShardVersion);
  if (size != sizeof(Header) + h.num_tokens * 4)
    fail("token shard {} is truncated or corrupt: header says {} tokens ({} bytes), file has {} bytes", path,
         h.num_tokens, sizeof(Header) + h.num_tokens * 4, size);
  n_ = int64_t(h.num_tokens);
  vocab_ = h.vocab_size;
  tokens_ = reinterpret_cast<const uint32_t*>(static_cast<const char*>(p) + sizeof(Header));
  uint32_t mx = 0;
#pragma omp parallel for reduction(max : mx) schedule(static)
  for (int64_t i = 0; i < n_; ++i) mx = std::max(mx, tokens_[i]);
  max_ = mx;
  if (n_ > 0 && max_ >= vocab_)
    fail("token shard {} is corrupt: token id {} is not below its vocab_size {}", path, max_, vocab_);
}

DataMeta read_data_meta(const std::string& dir) {
  const std::string p = (fs::path(dir) / "meta.json").string();
  if (!fs::exists(p)) fail("{} has no meta.json: not a data directory made by dsv3 prepare-data", dir);
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(read_file(p));
  } catch (const nlohmann::json::exception& e) {
    fail("{}: bad JSON ({})", p, e.what());
  }
  DataMeta m;
  m.vocab_size = j.value("vocab_size", int64_t(0));
  m.eos_id = j.value("eos_id", int64_t(-1));
  m.bos_id = j.value("bos_id", int64_t(-1));
  m.tokenizer = j.value("tokenizer", std::string());
  if (m.vocab_size <= 0) fail("{}: vocab_size missing or not positive", p);
  return m;
}

DataLoader::DataLoader(const std::string& dir, uint64_t seed) : dir_(dir), rng_(seed) {
  if (!fs::is_directory(dir)) fail("data directory {} does not exist", dir);
  meta_ = read_data_meta(dir);
  for (auto& e : fs::directory_iterator(dir)) {
    const std::string n = e.path().filename().string();
    if (n.rfind("train_", 0) == 0 && e.path().extension() == ".bin") train_paths_.push_back(e.path().string());
  }
  std::sort(train_paths_.begin(), train_paths_.end());
  if (train_paths_.empty()) fail("data directory {} has no train_*.bin shards", dir);
  for (auto& p : train_paths_) {
    train_.push_back(std::make_unique<TokenShard>(p));
    train_tokens_ += train_.back()->size();
  }
  const std::string vp = (fs::path(dir) / "val.bin").string();
  if (fs::exists(vp)) val_ = std::make_unique<TokenShard>(vp);
}

void DataLoader::check_vocab(int64_t model_vocab) const {
  if (meta_.vocab_size > model_vocab)
    fail("the tokenizer of {} has {} tokens but the model's vocab_size is {}: use a model config with "
         "vocab_size >= {} or a smaller tokenizer", dir_, meta_.vocab_size, model_vocab, meta_.vocab_size);
  for (size_t i = 0; i < train_.size(); ++i)
    if (train_[i]->size() > 0 && train_[i]->max_token() >= model_vocab)
      fail("{} holds token id {}, out of range for the model's vocab_size {}", train_paths_[i], train_[i]->max_token(), model_vocab);
  if (val_ && val_->size() > 0 && val_->max_token() >= model_vocab)
    fail("{}/val.bin holds token id {}, out of range for the model's vocab_size {}", dir_, val_->max_token(), model_vocab);
}

void DataLoader::next_batch(int64_t B, int64_t T, int32_t* out) {
  // Shards are chosen with probability proportional to their number of window starts.
  std::vector<int64_t> starts(train_.size());
  int64_t total = 0;
  for (size_t i = 0; i < train_.size(); ++i) total += (starts[i] = std::max<int64_t>(0, train_[i]->size() - T + 1));
  if (total == 0) fail("the training shards in {} are shorter than one window of {} tokens", dir_, T);
  for (int64_t b = 0; b < B; ++b) {
    int64_t r = int64_t(rng_.below(uint64_t(total)));
    size_t s = 0;
    while (r >= starts[s]) r -= starts[s++];
    const uint32_t* src = train_[s]->tokens() + r;
    for (int64_t t = 0; t < T; ++t) out[b * T + t] = int32_t(src[t]);
  }
}

int64_t DataLoader::val_batches(int64_t B, int64_t T) const {
  if (!val_) return 0;
  return val_->size() / (B * T);
}

bool DataLoader::val_batch(int64_t i, int64_t B, int64_t T, int32_t* out) const {
  if (i >= val_batches(B, T)) return false;
  const uint32_t* src = val_->tokens() + i * B * T;
  for (int64_t k = 0; k < B * T; ++k) out[k] = int32_t(src[k]);
  return true;
}

}  // namespace dsv3
