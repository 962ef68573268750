#pragma once
// Write-then-rename: data goes to PATH.tmp.<pid>; commit() flushes, fsyncs and renames it over PATH. If
// anything fails (a full disk included) the temporary is removed and PATH keeps its previous content.
#include <cstdio>
#include <string>

namespace dsv3 {

class AtomicFile {
 public:
  explicit AtomicFile(const std::string& path);
  ~AtomicFile();  // removes the temporary if commit() was not reached
  void write(const void* data, size_t n);
  void write(const std::string& s) { write(s.data(), s.size()); }
  void commit();

 private:
  std::string path_, tmp_;
  FILE* f_ = nullptr;
  bool done_ = false;
};

// Convenience: the whole file at once.
void write_file_atomic(const std::string& path, const std::string& content);
std::string read_file(const std::string& path);  // throws InputError naming the path

}  // namespace dsv3
