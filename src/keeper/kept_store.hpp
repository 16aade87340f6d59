// Where a server keeps its committed generations past its own exit: the keeper process
// (keeper_client.hpp) or systemd's file-descriptor store (systemd_fd_store.hpp). Both hold, per
// generation, the slab's segment descriptors, the table's memfd and an opaque catalog entry, and
// give them back to the next server of the same device.
#pragma once

#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "common/unique_fd.hpp"
#include "companion/result.hpp"

namespace companion::keeper {

// One generation held, given back.
struct KeptGeneration {
  uint64_t id = 0;
  std::vector<uint8_t> catalog;
  std::vector<UniqueFd> fds;  // the segments in order, then the table
};

class KeptStore {
 public:
  virtual ~KeptStore() = default;
  // Who holds the generations, for logs ("keeper 1234", "systemd's file-descriptor store").
  virtual std::string holder() const = 0;
  // Everything held for this server when it started.
  virtual Result<std::vector<KeptGeneration>> list() = 0;
  // Hold these descriptors (the slab's segments in order, then the table) under id.
  virtual Result<void> keep(uint64_t id, const std::vector<uint8_t>& catalog,
                            std::span<const int> fds) = 0;
  // Let go of what id holds.
  virtual Result<void> forget(uint64_t id) = 0;
};

}  // namespace companion::keeper
