#pragma once
// Open-addressing hash maps for the tokenizer's hot lookups. std::unordered_map allocates a node per entry
// and cannot look up a std::string key by string_view without building a string; these keep keys in one
// arena, probe linearly, and never allocate per lookup.
#include <cstdint>
#include <cstring>
#include <string>
#include <string_view>
#include <vector>

namespace dsv3 {

inline uint64_t mix64(uint64_t x) {
  x ^= x >> 33;
  x *= 0xff51afd7ed558ccdULL;
  x ^= x >> 33;
  x *= 0xc4ceb9fe1a85ec53ULL;
  x ^= x >> 33;
  return x;
}

// A fast non-cryptographic hash of a byte string (8 bytes per step).
inline uint64_t hash_bytes(std::string_view s) {
  uint64_t h = 0x9E3779B97F4A7C15ULL ^ (s.size() * 0x100000001B3ULL);
  size_t i = 0;
  for (; i + 8 <= s.size(); i += 8) {
    uint64_t w;
    std::memcpy(&w, s.data() + i, 8);
    h = (h ^ mix64(w)) * 0x9E3779B97F4A7C15ULL;
  }
  if (i < s.size()) {
    uint64_t w = 0;
    std::memcpy(&w, s.data() + i, s.size() - i);
    h = (h ^ mix64(w)) * 0x9E3779B97F4A7C15ULL;
  }
  return mix64(h);
}

// string -> int32 id. Inserting an existing key replaces its id.
class StringIdMap {
 public:
  void reserve(size_t n) { rehash(capacity_for(n)); }

  void insert(std::string_view key, int32_t id) {
    if ((count_ + 1) * 2 > slots_.size()) rehash(capacity_for(count_ + 1));
    size_t i = hash_bytes(key) & (slots_.size() - 1);
    while (slots_[i].len >= 0) {
      if (key_of(slots_[i]) == key) {
        slots_[i].id = id;
        return;
      }
      i = (i + 1) & (slots_.size() - 1);
    }
    slots_[i] = Slot{uint32_t(arena_.size()), int32_t(key.size()), id};
    arena_.append(key);
    ++count_;
  }

  // The id of key, or -1.
  int32_t find(std::string_view key) const {
    if (slots_.empty()) return -1;
    size_t i = hash_bytes(key) & (slots_.size() - 1);
    while (slots_[i].len >= 0) {
      if (size_t(slots_[i].len) == key.size() && key_of(slots_[i]) == key) return slots_[i].id;
      i = (i + 1) & (slots_.size() - 1);
    }
    return -1;
  }

  size_t size() const { return count_; }

  template <typename F>
  void for_each(F&& f) const {
    for (const auto& s : slots_)
      if (s.len >= 0) f(key_of(s), s.id);
  }

 private:
  struct Slot {
    uint32_t off = 0;
    int32_t len = -1;  // -1: empty slot
    int32_t id = 0;
  };
  static size_t capacity_for(size_t n) {
    size_t c = 16;
    while (c < n * 2) c <<= 1;
    return c;
  }
  std::string_view key_of(const Slot& s) const { return std::string_view(arena_).substr(s.off, size_t(s.len)); }
  void rehash(size_t cap) {
    if (cap <= slots_.size()) return;
    std::vector<Slot> old(cap);
    old.swap(slots_);
    for (const auto& s : old) {
      if (s.len < 0) continue;
      size_t i = hash_bytes(key_of(s)) & (cap - 1);
      while (slots_[i].len >= 0) i = (i + 1) & (cap - 1);
      slots_[i] = s;
    }
  }
  std::vector<Slot> slots_;
  std::string arena_;
  size_t count_ = 0;
};

// (left id, right id) -> (merge rank, merged id): the BPE merge table.
class PairMap {
 public:
  struct Value {
    int32_t rank;
    int32_t new_id;
  };
  static uint64_t key(int32_t a, int32_t b) { return (uint64_t(uint32_t(a)) << 32) | uint32_t(b); }

  void reserve(size_t n) { rehash(capacity_for(n)); }

  void insert_or_assign(int32_t a, int32_t b, Value v) {
    if ((count_ + 1) * 2 > slots_.size()) rehash(capacity_for(count_ + 1));
    const uint64_t k = key(a, b);
    size_t i = mix64(k) & (slots_.size() - 1);
    while (slots_[i].used) {
      if (slots_[i].k == k) {
        slots_[i].v = v;
        return;
      }
      i = (i + 1) & (slots_.size() - 1);
    }
    slots_[i] = Slot{k, v, true};
    ++count_;
  }

  const Value* find(int32_t a, int32_t b) const {
    if (slots_.empty()) return nullptr;
    const uint64_t k = key(a, b);
    size_t i = mix64(k) & (slots_.size() - 1);
    while (slots_[i].used) {
      if (slots_[i].k == k) return &slots_[i].v;
      i = (i + 1) & (slots_.size() - 1);
    }
    return nullptr;
  }

  size_t size() const { return count_; }

 private:
  struct Slot {
    uint64_t k = 0;
    Value v{0, 0};
    bool used = false;
  };
  static size_t capacity_for(size_t n) {
    size_t c = 16;
    while (c < n * 2) c <<= 1;
    return c;
  }
  void rehash(size_t cap) {
    if (cap <= slots_.size()) return;
    std::vector<Slot> old(cap);
    old.swap(slots_);
    for (const auto& s : old) {
      if (!s.used) continue;
      size_t i = mix64(s.k) & (cap - 1);
      while (slots_[i].used) i = (i + 1) & (cap - 1);
      slots_[i] = s;
    }
  }
  std::vector<Slot> slots_;
  size_t count_ = 0;
};

}  // namespace dsv3
