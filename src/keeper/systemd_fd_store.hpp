// systemd's file-descriptor store as the place a server's committed generations outlive it: the
// server runs as a systemd service with FileDescriptorStoreMax= set; each committed generation's
// descriptors, and a sealed memfd holding its catalog entry, go to the store with
// sd_pid_notify_with_fds("FDSTORE=1\nFDNAME=...") and leave it with FDSTOREREMOVE=1; systemd
// passes what the store holds to the next server it starts (LISTEN_FDS, LISTEN_FDNAMES), which
// adopts them as it would from a keeper. The store lives as long as the unit: through restarts
// and crashes, not through `systemctl stop` (unless FileDescriptorStorePreserve=yes).
#pragma once

#include <map>
#include <memory>
#include <string>
#include <vector>

#include "keeper/kept_store.hpp"

namespace companion::keeper {

// Whether this build can talk to systemd (libsystemd was found when it was configured).
bool systemd_fd_store_built();
// Whether the environment asks for the store: NOTIFY_SOCKET is set and either FDSTORE (systemd
// 254 and later set it to FileDescriptorStoreMax=) is above zero or systemd passed descriptors
// named as this server names them.
bool systemd_fd_store_offered();

class SystemdFdStore final : public KeptStore {
 public:
  // Takes what systemd passed (sd_listen_fds_with_names; the LISTEN_ variables are then unset).
  // kUnavailable without NOTIFY_SOCKET or without libsystemd in this build.
  static Result<std::unique_ptr<SystemdFdStore>> open();
  ~SystemdFdStore() override;

  std::string holder() const override;
  // The generations systemd passed, once. Those it passed incomplete (a server died while storing
  // them) are removed from the store and not listed.
  Result<std::vector<KeptGeneration>> list() override;
  // kLimitExceeded, storing nothing, when the store would go past FDSTORE's maximum.
  Result<void> keep(uint64_t id, const std::vector<uint8_t>& catalog,
                    std::span<const int> fds) override;
  Result<void> forget(uint64_t id) override;
  // serve --keep no: removes from the store everything systemd passed. The generations removed.
  size_t forget_all();

  struct Passed;  // descriptors systemd passed, by generation

 private:
  SystemdFdStore() = default;
  Result<void> send(const std::string& state, std::span<const int> fds = {});

  size_t max_descriptors_ = 0;  // FDSTORE; 0: not told
  size_t stored_ = 0;           // descriptors in the store under names_
  std::map<uint64_t, std::vector<std::string>> names_;
  std::map<uint64_t, std::unique_ptr<Passed>> passed_;
};

}  // namespace companion::keeper
