#pragma once
// Typed reads of config.json fields that fail with one line naming the field (shared by the V3/V3.2 and the
// V4 config parsers).
#include <cmath>
#include <optional>
#include <string>
#include <type_traits>

#include <nlohmann/json.hpp>

#include "core/error.h"

namespace dsv3 {

template <typename T>
inline T get_num(const nlohmann::json& j, const char* key, std::optional<T> dflt) {
  if (!j.contains(key) || j[key].is_null()) {
    if (dflt) return *dflt;
    fail("config: missing field '{}'", key);
  }
  const nlohmann::json& v = j[key];
  if constexpr (std::is_same_v<T, bool>) {
    if (!v.is_boolean()) fail("config: field '{}' must be true or false, got {}", key, v.dump());
    return v.get<bool>();
  } else if constexpr (std::is_integral_v<T>) {
    if (!v.is_number_integer() && !(v.is_number_float() && v.get<double>() == std::floor(v.get<double>())))
      fail("config: field '{}' must be an integer, got {}", key, v.dump());
    double d = v.get<double>();
    if (std::fabs(d) > 1e12) fail("config: field '{}' = {} is absurd", key, v.dump());
    return T(v.get<int64_t>());
  } else {
    if (!v.is_number()) fail("config: field '{}' must be a number, got {}", key, v.dump());
    return v.get<T>();
  }
}

inline std::string get_str(const nlohmann::json& j, const char* key, const std::string& dflt) {
  if (!j.contains(key) || j[key].is_null()) return dflt;
  if (!j[key].is_string()) fail("config: field '{}' must be a string, got {}", key, j[key].dump());
  return j[key].get<std::string>();
}

}  // namespace dsv3
