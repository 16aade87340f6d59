// A server's side of the keeper (keeper_process.hpp): finding or starting the keeper of its
// device, opening its session, and the messages of that session. Blocking calls on one socket;
// the server makes them from one thread at a time.
#pragma once

#include <chrono>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "common/unique_fd.hpp"
#include "companion/result.hpp"
#include "keeper/keeper_protocol.hpp"
#include "protocol/frame.hpp"

namespace companion::keeper {

// One generation the keeper held, given back.
struct KeptGeneration {
  uint64_t id = 0;
  std::vector<uint8_t> catalog;
  std::vector<UniqueFd> fds;  // the segments in order, then the table
};

// How to start a keeper when none listens: `program keeper --socket PATH --keep-for SECONDS`,
// in a session of its own (setsid, double fork: it is no child of the server, and a signal to
// the server's process group does not reach it), its output appended to log_path.
struct KeeperLaunch {
  std::string program;
  std::string log_path;
};

class KeeperSession {
 public:
  // Connects to the keeper listening on socket_path, starting one first when none does (launch
  // with an empty program: never), and opens this server's session. kUnavailable when another
  // server holds the keeper or it cannot be reached.
  static Result<std::unique_ptr<KeeperSession>> open(const std::string& socket_path,
                                                     const KeeperLaunch& launch,
                                                     std::chrono::milliseconds keep_for);
  // serve --no-keep: tells a keeper left on socket_path by an earlier server to free everything
  // and exit. The generations and descriptors it held; nullopt-like {0,0} when none listened.
  static Result<HelloReply> release(const std::string& socket_path);

  const HelloReply& hello() const noexcept { return hello_; }
  // Everything the keeper holds.
  Result<std::vector<KeptGeneration>> list();
  Result<void> keep(uint64_t id, const std::vector<uint8_t>& catalog, std::span<const int> fds);
  Result<void> forget(uint64_t id);

 private:
  KeeperSession() = default;
  static Result<std::unique_ptr<KeeperSession>> open_once(const std::string& socket_path,
                                                          const KeeperLaunch& launch,
                                                          std::chrono::milliseconds keep_for);
  Result<void> send(const Message& message, std::span<const int> fds = {});

  UniqueFd fd_;
  protocol::FrameReader reader_{protocol::FdPolicy::kAccept};
  HelloReply hello_;
};

}  // namespace companion::keeper
