#pragma once
// safetensors reading (mmap, zero-copy views) and writing (write to a temporary file, then rename, so a
// crash or a full disk never leaves a half-written file under the final name).
// Format: u64 little-endian header length N, N bytes of JSON {name: {dtype, shape, data_offsets}}, data.
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "core/tensor.h"

namespace dsv3 {

// One mmap'd .safetensors file. Tensors returned by get() share ownership of the mapping.
class SafetensorsFile {
 public:
  explicit SafetensorsFile(const std::string& path);  // throws InputError naming the file and the problem
  bool has(const std::string& name) const { return entries_.count(name) != 0; }
  Tensor get(const std::string& name) const;
  std::vector<std::string> names() const;
  const std::map<std::string, std::string>& metadata() const { return metadata_; }
  const std::string& path() const { return path_; }

 private:
  struct Entry { DType dtype; Shape shape; size_t begin, end; };
  std::string path_;
  std::shared_ptr<void> map_;
  size_t size_ = 0;
  const char* data_ = nullptr;  // start of the data section
  std::map<std::string, Entry> entries_;
  std::map<std::string, std::string> metadata_;
};

// A model's weights: model.safetensors, or shards listed by model.safetensors.index.json, or every
// *.safetensors file in the directory.
class WeightSet {
 public:
  explicit WeightSet(const std::string& dir);
  bool has(const std::string& name) const { return where_.count(name) != 0; }
  Tensor get(const std::string& name) const;  // throws "missing tensor NAME in DIR"
  std::vector<std::string> names() const;

 private:
  std::string dir_;
  std::vector<std::unique_ptr<SafetensorsFile>> files_;
  std::map<std::string, size_t> where_;
};

// Writes CPU tensors (any dtype) under their names; tensors are written in name order.
void write_safetensors(const std::string& path, const std::vector<Tensor>& tensors,
                       const std::map<std::string, std::string>& metadata = {});

}  // namespace dsv3
