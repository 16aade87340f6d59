// A hash index of names stored elsewhere: the caller's records hold the strings, the table holds
// their positions. A million names cost 8 bytes of table each and no allocation of their own.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <string_view>
#include <vector>

namespace companion::checkpoint {

class NameTable {
 public:
  static constexpr uint32_t kNone = UINT32_MAX;

  // `name_of(index)` gives the name stored at a position the table holds. It is passed to each
  // call rather than kept, so that the records (and the table) can move freely.
  template <typename NameOf>
  uint32_t find(std::string_view name, const NameOf& name_of) const {
    if (slots_.empty()) return kNone;
    uint32_t hash = hash_of(name);
    for (size_t i = hash & mask(); slots_[i].index != kNone; i = (i + 1) & mask()) {
      if (slots_[i].hash == hash && name_of(slots_[i].index) == name) return slots_[i].index;
    }
    return kNone;
  }

  // Adds position `index` under `name` unless that name is there already: then the position that
  // holds it is returned and nothing changes; kNone when added.
  template <typename NameOf>
  uint32_t insert(std::string_view name, uint32_t index, const NameOf& name_of) {
    if ((size_ + 1) * 2 > slots_.size()) grow();
    uint32_t hash = hash_of(name);
    size_t i = hash & mask();
    for (; slots_[i].index != kNone; i = (i + 1) & mask()) {
      if (slots_[i].hash == hash && name_of(slots_[i].index) == name) return slots_[i].index;
    }
    slots_[i] = Slot{index, hash};
    ++size_;
    return kNone;
  }

  size_t size() const { return size_; }

 private:
  struct Slot {
    uint32_t index = kNone;
    // Low bits of the name's hash: where it goes in any table of up to 2^32 slots (so growing
    // reads no name), and most mismatches are told without the string.
    uint32_t hash = 0;
  };

  static uint32_t hash_of(std::string_view name) {
    return static_cast<uint32_t>(std::hash<std::string_view>{}(name));
  }
  size_t mask() const { return slots_.size() - 1; }

  // Doubles the slots (at most half of them are ever used, so probes stay short).
  void grow() {
    std::vector<Slot> old(slots_.empty() ? 16 : slots_.size() * 2);
    old.swap(slots_);
    for (const Slot& slot : old) {
      if (slot.index == kNone) continue;
      size_t i = slot.hash & mask();
      while (slots_[i].index != kNone) i = (i + 1) & mask();
      slots_[i] = slot;
    }
  }

  std::vector<Slot> slots_;
  size_t size_ = 0;
};

}  // namespace companion::checkpoint
