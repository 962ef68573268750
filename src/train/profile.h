#pragma once
// Wall-clock time per named region of the training step, printed at exit when DSV3_PROFILE is set.
// Regions nest; each reports its inclusive time. Cheap enough to leave in (one clock read per region).
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <string>

namespace dsv3 {

struct ProfileTable {
  std::map<std::string, double> sec;
  bool on = std::getenv("DSV3_PROFILE") != nullptr;
  ~ProfileTable() {
    if (!on) return;
    for (auto& [k, v] : sec) std::fprintf(stderr, "profile %-28s %9.3f s\n", k.c_str(), v);
  }
  static ProfileTable& get() {
    static ProfileTable t;
    return t;
  }
};

class ProfileScope {
 public:
  explicit ProfileScope(const char* name) : name_(name), t0_(std::chrono::steady_clock::now()) {}
  ~ProfileScope() {
    auto& t = ProfileTable::get();
    if (t.on) t.sec[name_] += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0_).count();
  }

 private:
  const char* name_;
  std::chrono::steady_clock::time_point t0_;
};

}  // namespace dsv3
