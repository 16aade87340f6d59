#include <chrono>
#include <mutex>

#include "client/connection.hpp"
#include "client/discovery.hpp"
#include "client/mapped_model_impl.hpp"
#include "companion/client.hpp"

namespace companion {
namespace client {
namespace {

using protocol::Message;

int to_ms(double seconds) {
  return seconds < 0 ? -1 : static_cast<int>(seconds * 1000.0 + 0.5);
}

template <typename T>
Result<T> expect(Result<Message> reply) {
  if (!reply.ok()) return std::move(reply).error();
  if (auto* body = std::get_if<T>(&reply->body)) return std::move(*body);
  return make_error(StatusCode::kProtocolError,
                    std::string("unexpected reply ") + protocol::body_name(reply->body));
}

class StatusStreamImpl final : public StatusStream {
 public:
  StatusStreamImpl(std::shared_ptr<Connection> connection, uint64_t subscription)
      : connection_(std::move(connection)), subscription_(subscription) {}

  Result<ModelStatus> next(double timeout_s) override {
    auto deadline = std::chrono::steady_clock::now() +
                    std::chrono::milliseconds(timeout_s < 0 ? 0 : to_ms(timeout_s));
    for (;;) {
      int wait = -1;
      if (timeout_s >= 0) {
        auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
                        deadline - std::chrono::steady_clock::now())
                        .count();
        wait = left < 0 ? 0 : static_cast<int>(left);
      }
      COMPANION_ASSIGN_OR_RETURN(Message m, connection_->receive(wait));
      if (m.request_id != subscription_) continue;
      if (auto* e = std::get_if<protocol::StatusEvent>(&m.body)) return e->model;
      if (auto* e = std::get_if<protocol::ErrorReply>(&m.body)) return e->error;
    }
  }

 private:
  std::shared_ptr<Connection> connection_;
  uint64_t subscription_;
};

class ClientImpl final : public Client {
 public:
  ClientImpl(ConnectOptions options, std::string socket_path, std::shared_ptr<Connection> c,
             int ordinal)
      : options_(std::move(options)),
        socket_path_(std::move(socket_path)),
        connection_(std::move(c)),
        ordinal_(ordinal) {}

  const ServerIdentity& server() const noexcept override { return connection_->server(); }

  Result<ModelStatus> status(const ModelSpec& spec) override {
    COMPANION_ASSIGN_OR_RETURN(auto stream, subscribe(spec));
    return stream->next(10.0);
  }

  Result<std::vector<ModelStatus>> list() override {
    COMPANION_ASSIGN_OR_RETURN(
        auto r, expect<protocol::ListReply>(connection_->call(protocol::List{}, kRequestMs)));
    return std::move(r.models);
  }

  Result<HealthInfo> health() override {
    COMPANION_ASSIGN_OR_RETURN(
        auto r, expect<protocol::HealthReply>(connection_->call(protocol::Health{}, kRequestMs)));
    return std::move(r.info);
  }

  Result<ModelStatus> load(const ModelSpec& spec, bool wait,
                           const std::function<void(const ModelStatus&)>& on_progress,
                           double timeout_s) override {
    if (!wait) {
      COMPANION_ASSIGN_OR_RETURN(auto r, expect<protocol::LoadReply>(connection_->call(
                                             protocol::Load{spec, false}, kRequestMs)));
      return r.model;
    }
    return load_and_wait(spec, kRequestMs / 1000.0, timeout_s, on_progress);
  }

  Result<ModelStatus> unload(const ModelSpec& spec, bool force) override {
    protocol::Unload u;
    u.spec = spec;
    u.force = force;
    COMPANION_ASSIGN_OR_RETURN(
        auto r, expect<protocol::UnloadReply>(connection_->call(std::move(u), kRequestMs)));
    return r.model;
  }

  Result<ModelStatus> unload_key(const std::string& key, bool force) override {
    protocol::Unload u;
    u.key = key;
    u.force = force;
    COMPANION_ASSIGN_OR_RETURN(
        auto r, expect<protocol::UnloadReply>(connection_->call(std::move(u), kRequestMs)));
    return r.model;
  }

  Result<ModelStatus> wait_for_model_ready(const ModelSpec& spec, double initial_timeout_s,
                                           double loading_timeout_s) override {
    return load_and_wait(spec, initial_timeout_s, loading_timeout_s, {});
  }

  Result<std::shared_ptr<MappedModel>> get_model_parameters(const ModelSpec& spec,
                                                            double timeout_s) override {
    std::vector<UniqueFd> fds;
    COMPANION_ASSIGN_OR_RETURN(auto params,
                               expect<protocol::Parameters>(connection_->call(
                                   protocol::GetParameters{spec, true}, to_ms(timeout_s), &fds)));
    return map_parameters(connection_, std::move(params), std::move(fds), ordinal_);
  }

  Result<std::unique_ptr<StatusStream>> subscribe(const ModelSpec& spec) override {
    return open_stream(protocol::StatusSubscribe{spec, false});
  }
  Result<std::unique_ptr<StatusStream>> subscribe_all() override {
    return open_stream(protocol::StatusSubscribe{{}, true});
  }

 private:
  static constexpr int kRequestMs = 30000;

  Result<std::unique_ptr<StatusStream>> open_stream(protocol::StatusSubscribe request) {
    COMPANION_ASSIGN_OR_RETURN(auto c, Connection::open(socket_path_, options_.client_name));
    COMPANION_ASSIGN_OR_RETURN(uint64_t id, c->send(std::move(request)));
    return std::unique_ptr<StatusStream>(std::make_unique<StatusStreamImpl>(c, id));
  }

  // Subscribes, starts the load, then follows the model's status until it is loaded.
  Result<ModelStatus> load_and_wait(const ModelSpec& spec, double initial_timeout_s,
                                    double loading_timeout_s,
                                    const std::function<void(const ModelStatus&)>& on_progress) {
    COMPANION_ASSIGN_OR_RETURN(auto stream, subscribe(spec));
    COMPANION_ASSIGN_OR_RETURN(
        auto started, expect<protocol::LoadReply>(connection_->call(protocol::Load{spec, false},
                                                                    to_ms(initial_timeout_s))));
    ModelStatus s = started.model;
    if (on_progress) on_progress(s);
    if (s.state == ModelState::kLoaded) return s;
    auto deadline = std::chrono::steady_clock::now() +
                    std::chrono::milliseconds(to_ms(loading_timeout_s < 0 ? 0 : loading_timeout_s));
    for (;;) {
      double left = -1;
      if (loading_timeout_s >= 0) {
        left = std::chrono::duration<double>(deadline - std::chrono::steady_clock::now()).count();
        if (left <= 0)
          return make_error(StatusCode::kTimeout,
                            "model still " + std::string(model_state_name(s.state)) + " after " +
                                std::to_string(loading_timeout_s) + " s");
      }
      auto next = stream->next(left);
      if (!next.ok()) {
        if (next.error().code == StatusCode::kTimeout) continue;
        return std::move(next).error();
      }
      if (next->seq <= started.model.seq) continue;  // from before our load, or already seen
      s = *next;
      if (on_progress) on_progress(s);
      if (s.state == ModelState::kLoaded) return s;
      if (s.state == ModelState::kError) return Error{s.error_code, s.message};
      if (s.state == ModelState::kUnloaded)
        return make_error(StatusCode::kCancelled, "the model was unloaded while loading");
    }
  }

  ConnectOptions options_;
  std::string socket_path_;
  std::shared_ptr<Connection> connection_;
  int ordinal_;
};

}  // namespace
}  // namespace client

Result<std::unique_ptr<Client>> Client::connect(const ConnectOptions& options) {
  COMPANION_ASSIGN_OR_RETURN(std::string socket, client::discover_socket(options));
  COMPANION_ASSIGN_OR_RETURN(auto connection,
                             client::Connection::open(socket, options.client_name));
  COMPANION_ASSIGN_OR_RETURN(int ordinal, client::local_ordinal_for(connection->server()));
  return std::unique_ptr<Client>(
      std::make_unique<client::ClientImpl>(options, socket, std::move(connection), ordinal));
}

}  // namespace companion
