#include "io/safetensors.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "io/atomic_file.h"

namespace dsv3 {

using json = nlohmann::json;

SafetensorsFile::SafetensorsFile(const std::string& path) : path_(path) {
  int fd = ::open(path.c_str(), O_RDONLY);
  if (fd < 0) fail("cannot open {}: {}", path, std::strerror(errno));
  struct stat st;
  if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
    ::close(fd);
    fail("{}: not a regular file", path);
  }
  size_ = size_t(st.st_size);
  if (size_ < 8) {
    ::close(fd);
    fail("{}: truncated safetensors file ({} bytes, need at least 8)", path, size_);
  }
  void* p = mmap(nullptr, size_, PROT_READ, MAP_PRIVATE, fd, 0);
  ::close(fd);
  if (p == MAP_FAILED) fail("{}: mmap failed: {}", path, std::strerror(errno));
  size_t sz = size_;
  map_ = std::shared_ptr<void>(p, [sz](void* q) { munmap(q, sz); });
  const char* base = static_cast<const char*>(p);
  uint64_t n;
  std::memcpy(&n, base, 8);
  if (n > size_ - 8 || n > (uint64_t(1) << 30))
    fail("{}: header length {} exceeds the file size {} (truncated or not a safetensors file)", path, n, size_);
  json h;
  try {
    h = json::parse(base + 8, base + 8 + n);
  } catch (const std::exception& e) {
    fail("{}: header is not valid JSON: {}", path, e.what());
  }
  if (!h.is_object()) fail("{}: header is not a JSON object", path);
  data_ = base + 8 + n;
  size_t data_size = size_ - 8 - n;
  for (auto& [name, v] : h.items()) {
    if (name == "__metadata__") {
      if (v.is_object())
        for (auto& [k, m] : v.items())
          if (m.is_string()) metadata_[k] = m.get<std::string>();
      continue;
    }
    if (!v.is_object() || !v.contains("dtype") || !v.contains("shape") || !v.contains("data_offsets"))
      fail("{}: tensor {} lacks dtype, shape or data_offsets", path, name);
    Entry e;
    if (!v["dtype"].is_string() || !dtype_from_name(v["dtype"].get<std::string>(), &e.dtype))
      fail("{}: tensor {} has unsupported dtype {}", path, name, v["dtype"].dump());
    if (!v["shape"].is_array()) fail("{}: tensor {} shape is not an array", path, name);
    for (auto& d : v["shape"]) {
      if (!d.is_number_unsigned()) fail("{}: tensor {} has a bad dimension {}", path, name, d.dump());
      uint64_t dv = d.get<uint64_t>();
      if (dv > (uint64_t(1) << 40)) fail("{}: tensor {} dimension {} is absurd", path, name, dv);
      e.shape.push_back(int64_t(dv));
    }
    auto& off = v["data_offsets"];
    if (!off.is_array() || off.size() != 2 || !off[0].is_number_unsigned() || !off[1].is_number_unsigned())
      fail("{}: tensor {} data_offsets must be two non-negative integers", path, name);
    e.begin = off[0].get<uint64_t>();
    e.end = off[1].get<uint64_t>();
    if (e.begin > e.end || e.end > data_size)
      fail("{}: tensor {} data_offsets [{}, {}] out of range (data section is {} bytes; truncated file?)", path,
           name, e.begin, e.end, data_size);
    // numel * size must equal the byte range; guard the multiplication against overflow.
    long double want = 1;
    for (auto d : e.shape) want *= (long double)d;
    want *= dtype_size(e.dtype);
    if (want != (long double)(e.end - e.begin))
      fail("{}: tensor {} of shape {} and dtype {} needs {} bytes but data_offsets span {}", path, name,
           shape_str(e.shape), dtype_name(e.dtype), (double)want, e.end - e.begin);
    entries_[name] = e;
  }
}

Tensor SafetensorsFile::get(const std::string& name) const {
  auto it = entries_.find(name);
  if (it == entries_.end()) fail("{}: no tensor named {}", path_, name);
  Tensor t;
  t.name = name;
  t.dtype = it->second.dtype;
  t.shape = it->second.shape;
  t.data = const_cast<char*>(data_ + it->second.begin);
  t.storage = map_;
  return t;
}

std::vector<std::string> SafetensorsFile::names() const {
  std::vector<std::string> r;
  for (auto& [k, v] : entries_) r.push_back(k);
  return r;
}

WeightSet::WeightSet(const std::string& dir) : dir_(dir) {
  namespace fs = std::filesystem;
  std::vector<std::string> paths;
  fs::path index = fs::path(dir) / "model.safetensors.index.json";
  if (fs::exists(index)) {
    std::ifstream f(index);
    json j;
    try {
      j = json::parse(f);
    } catch (const std::exception& e) {
      fail("{}: not valid JSON: {}", index.string(), e.what());
    }
    if (!j.contains("weight_map") || !j["weight_map"].is_object())
      fail("{}: no weight_map object", index.string());
    for (auto& [k, v] : j["weight_map"].items()) {
      if (!v.is_string()) fail("{}: weight_map entry {} is not a file name", index.string(), k);
      std::string p = (fs::path(dir) / v.get<std::string>()).string();
      if (std::find(paths.begin(), paths.end(), p) == paths.end()) paths.push_back(p);
    }
  } else if (fs::exists(fs::path(dir) / "model.safetensors")) {
    paths.push_back((fs::path(dir) / "model.safetensors").string());
  } else {
    if (!fs::is_directory(dir)) fail("model directory {} does not exist", dir);
    for (auto& e : fs::directory_iterator(dir))
      if (e.path().extension() == ".safetensors") paths.push_back(e.path().string());
    std::sort(paths.begin(), paths.end());
    if (paths.empty()) fail("{}: no model.safetensors, index or *.safetensors file", dir);
  }
  for (auto& p : paths) {
    files_.push_back(std::make_unique<SafetensorsFile>(p));
    for (auto& n : files_.back()->names()) {
      if (where_.count(n)) fail("{}: tensor {} appears in two shards", dir, n);
      where_[n] = files_.size() - 1;
    }
  }
}

Tensor WeightSet::get(const std::string& name) const {
  auto it = where_.find(name);
  if (it == where_.end()) fail("missing tensor {} in {}", name, dir_);
  return files_[it->second]->get(name);
}

std::vector<std::string> WeightSet::names() const {
  std::vector<std::string> r;
  for (auto& [k, v] : where_) r.push_back(k);
  return r;
}

void write_safetensors(const std::string& path, const std::vector<Tensor>& tensors,
                       const std::map<std::string, std::string>& metadata) {
  std::vector<const Tensor*> order;
  for (auto& t : tensors) order.push_back(&t);
  std::sort(order.begin(), order.end(), [](auto a, auto b) { return a->name < b->name; });
  json h = json::object();
  if (!metadata.empty()) h["__metadata__"] = metadata;
  size_t off = 0;
  for (auto t : order) {
    if (t->device != Device::CPU) fail("write_safetensors: tensor {} is not on the CPU", t->name);
    h[t->name] = {{"dtype", dtype_name(t->dtype)}, {"shape", t->shape}, {"data_offsets", {off, off + t->nbytes()}}};
    off += t->nbytes();
  }
  std::string hs = h.dump();
  while ((hs.size() + 8) % 8) hs += ' ';  // align the data section to 8 bytes, as the reference writer does
  AtomicFile out(path);
  uint64_t n = hs.size();
  out.write(&n, 8);
  out.write(hs.data(), hs.size());
  for (auto t : order) out.write(t->data, t->nbytes());
  out.commit();
}

}  // namespace dsv3
