// Restart without reload, the server's half: a session with the device's keeper
// (keeper/keeper_process.hpp). At start the server takes back what the keeper holds (each
// generation rebuilt from its handles with Backend::adopt, its digests checked, then registered in
// the store); from then on every committed generation is handed to the keeper, and every freed
// one taken back, from one thread of the link's own (the store's lock is never held across a
// send).
#pragma once

#include <chrono>
#include <memory>
#include <string>
#include <thread>

#include "keeper/keeper_client.hpp"
#include "server/model_store.hpp"

namespace companion::server {

class KeeperLink final : public GenerationKeeper {
 public:
  // Opens this server's session with the keeper on socket_path, starting the keeper first when
  // none listens. kUnavailable when another server holds it.
  static Result<std::shared_ptr<KeeperLink>> open(const std::string& socket_path,
                                                  const keeper::KeeperLaunch& launch,
                                                  std::chrono::milliseconds keep_for);
  ~KeeperLink() override;

  const keeper::HelloReply& hello() const noexcept;

  struct Adoption {
    size_t adopted = 0;
    size_t dropped = 0;  // not served: digest mismatch, unusable handles, refused by the store
    uint64_t bytes = 0;
    double ms = 0;
  };
  // Takes back every generation the keeper holds into `store` (its newest generation per key);
  // call once, before start(). What is not adopted the keeper lets go of.
  Result<Adoption> adopt_into(ModelStore& store);
  // Starts the thread that sends what keep() and the tokens' destruction queue.
  void start();
  // The server is stopping: generations freed from now on (the store going away) stay kept.
  void detach();

  std::shared_ptr<void> keep(keeper::CatalogEntry catalog, std::shared_ptr<memory::Slab> slab,
                             std::shared_ptr<const protocol::SharedTensorTable> table) override;

  struct State;

 private:
  explicit KeeperLink(std::shared_ptr<State> state) : state_(std::move(state)) {}
  std::shared_ptr<void> token(uint64_t id);

  std::shared_ptr<State> state_;
  std::thread thread_;
};

}  // namespace companion::server
