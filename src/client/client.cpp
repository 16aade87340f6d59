#include <algorithm>
#include <atomic>
#include <chrono>
#include <map>
#include <mutex>
#include <optional>
#include <random>
#include <set>
#include <thread>

#include "client/connection.hpp"
#include "client/discovery.hpp"
#include "client/instances.hpp"
#include "client/mapped_model_impl.hpp"
#include "client/publication.hpp"
#include "common/deadline.hpp"
#include "common/log.hpp"
#include "common/util.hpp"
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
    const Deadline deadline = Deadline::after_seconds(timeout_s);
    for (;;) {
      COMPANION_ASSIGN_OR_RETURN(Message m, connection_->receive(deadline.remaining_ms()));
      if (m.request_id != subscription_) continue;
      if (auto* e = std::get_if<protocol::StatusEvent>(&m.body)) return e->model;
      if (auto* e = std::get_if<protocol::ErrorReply>(&m.body)) return e->error;
    }
  }

 private:
  std::shared_ptr<Connection> connection_;
  uint64_t subscription_;
};

// A live instance this client talks to.
struct Instance {
  std::string key;  // the socket path its record names: identifies it in the pool
  std::shared_ptr<const ServerIdentity> server;  // as its hello reported it
  std::shared_ptr<Connection> connection;
  int ordinal = -1;  // local CUDA ordinal of its GPU; -1 for host
};

// The codes a failed connect or a broken connection gives (refused, socket gone, peer closed).
bool transport_error(const Error& e) {
  return e.code == StatusCode::kUnavailable || e.code == StatusCode::kConnectionClosed ||
         e.code == StatusCode::kIoError;
}

// A request failed because its instance went away (its connection is closed), not because the
// instance answered with an error: only then may another instance take over.
bool instance_lost(const Instance& i, const Error& e) {
  return transport_error(e) && !i.connection->alive();
}

// How long a model-aware probe waits for one instance before passing it over.
constexpr int kProbeMs = 2000;

// A spec as the client sees it (the server's key also resolves paths), to remember where a
// model was found.
std::string spec_identity(const ModelSpec& s) {
  std::string id = s.source;
  for (const std::string* field : {&s.revision, &s.shard_rules, &s.tag}) {
    id += '\0';
    id += *field;
  }
  id += '\0' + std::string(s.dtype ? dtype_name(*s.dtype) : "stored") + '\0' +
        std::to_string(s.tp_rank) + '/' + std::to_string(s.tp_size);
  return id;
}

class ClientImpl final : public Client {
 public:
  ClientImpl(ConnectOptions options, std::unique_ptr<InstanceSource> source,
             registry::TrustPolicy trust)
      : options_(std::move(options)), source_(std::move(source)), trust_(std::move(trust)) {
    std::random_device seed;
    round_robin_ = seed();  // independent clients spread over the instances
  }

  // Connects to a first instance, waiting up to discovery_timeout_s for one to be reachable.
  Result<void> start() {
    auto deadline = Clock::now() + std::chrono::milliseconds(
                                       static_cast<int64_t>(options_.discovery_timeout_s * 1000));
    for (;;) {
      auto first = choose(nullptr, {});
      if (first.ok()) {
        make_current(*first);
        return ok_result();
      }
      if (!transport_error(first.error()) || Clock::now() >= deadline)
        return std::move(first).error();
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
    }
  }

  const ServerIdentity& server() const noexcept override { return *current_server_.load(); }

  Result<std::vector<ServerIdentity>> instances() override {
    if (!source_) return std::vector<ServerIdentity>{*current_server_.load()};
    return source_->list();
  }

  Result<ModelStatus> status(const ModelSpec& spec) override {
    return with_failover(&spec, [&](Instance& i) { return query_status(i, spec, kRequestMs); });
  }

  Result<std::vector<ModelStatus>> list() override {
    return with_failover(nullptr, [&](Instance& i) -> Result<std::vector<ModelStatus>> {
      COMPANION_ASSIGN_OR_RETURN(
          auto r, expect<protocol::ListReply>(i.connection->call(protocol::List{}, kRequestMs)));
      return std::move(r.models);
    });
  }

  Result<HealthInfo> health() override {
    return with_failover(nullptr, [&](Instance& i) -> Result<HealthInfo> {
      COMPANION_ASSIGN_OR_RETURN(auto r, expect<protocol::HealthReply>(
                                             i.connection->call(protocol::Health{}, kRequestMs)));
      return std::move(r.info);
    });
  }

  Result<ModelStatus> load(const ModelSpec& spec, bool wait,
                           const std::function<void(const ModelStatus&)>& on_progress,
                           double timeout_s) override {
    if (!wait) {
      return with_failover(&spec, [&](Instance& i) -> Result<ModelStatus> {
        COMPANION_ASSIGN_OR_RETURN(auto r, expect<protocol::LoadReply>(i.connection->call(
                                               protocol::Load{spec, false}, kRequestMs)));
        return r.model;
      });
    }
    return load_and_wait(spec, kRequestMs / 1000.0, timeout_s, on_progress);
  }

  Result<ModelStatus> unload(const ModelSpec& spec, bool force) override {
    protocol::Unload u;
    u.spec = spec;
    u.force = force;
    // Never repeated elsewhere: it would unload another instance's copy.
    return with_failover(
        &spec, [&](Instance& i) { return call_unload(i, u); }, false);
  }

  Result<ModelStatus> unload_key(const std::string& key, bool force) override {
    protocol::Unload u;
    u.key = key;
    u.force = force;
    return with_failover(
        nullptr, [&](Instance& i) { return call_unload(i, u); }, false);
  }

  Result<ModelStatus> offload(const ModelSpec& spec, bool force, double timeout_s) override {
    protocol::Unload u;
    u.spec = spec;
    u.force = force;
    u.to_host = true;
    const Deadline deadline = Deadline::after_seconds(timeout_s);
    return with_failover(
        &spec, [&](Instance& i) { return call_offload(i, u, deadline); }, false);
  }

  Result<ModelStatus> offload_key(const std::string& key, bool force, double timeout_s) override {
    protocol::Unload u;
    u.key = key;
    u.force = force;
    u.to_host = true;
    const Deadline deadline = Deadline::after_seconds(timeout_s);
    return with_failover(
        nullptr, [&](Instance& i) { return call_offload(i, u, deadline); }, false);
  }

  Result<ModelStatus> load_key(const std::string& key, bool wait, double timeout_s) override {
    protocol::Load l;
    l.key = key;
    l.wait = wait;
    const Deadline deadline = Deadline::after_seconds(wait ? timeout_s : kRequestMs / 1000.0);
    return with_failover(
        nullptr,
        [&](Instance& i) -> Result<ModelStatus> {
          COMPANION_ASSIGN_OR_RETURN(
              auto r, expect<protocol::LoadReply>(i.connection->call(l, deadline.remaining_ms())));
          return r.model;
        },
        false);
  }

  Result<ModelStatus> wait_for_model_ready(const ModelSpec& spec, double initial_timeout_s,
                                           double loading_timeout_s) override {
    return load_and_wait(spec, initial_timeout_s, loading_timeout_s, {});
  }

  Result<std::shared_ptr<MappedModel>> get_model_parameters(const ModelSpec& spec,
                                                            double timeout_s) override {
    const Deadline deadline = Deadline::after_seconds(timeout_s);
    auto fetch = [&](Instance& i, bool only_if_held) -> Result<std::shared_ptr<MappedModel>> {
      std::vector<UniqueFd> fds;
      protocol::GetParameters request{spec, true, only_if_held};
      COMPANION_ASSIGN_OR_RETURN(auto params, expect<protocol::Parameters>(i.connection->call(
                                                  request, deadline.remaining_ms(), &fds)));
      return map_parameters(i.connection, std::move(params), std::move(fds), i.ordinal);
    };
    // The hot path (an engine asking again): the instance that served this model last, asked to
    // answer only if it still holds it, so no probe is needed and no second copy is loaded.
    // A 1.0 server may not know only_if_held (it would load a second copy): no hint there.
    if (auto hint = last_holder(spec); hint && hint->connection->server_minor() >= 1) {
      auto r = fetch(*hint, true);
      if (r.ok()) {
        make_current(*hint);
        return r;
      }
      if (r.error().code != StatusCode::kNotReady && !instance_lost(*hint, r.error())) return r;
      if (instance_lost(*hint, r.error())) forget(*hint);
      forget_holder(spec);
    }
    return with_failover(&spec, [&](Instance& i) { return fetch(i, false); });
  }

  Result<std::unique_ptr<StatusStream>> subscribe(const ModelSpec& spec) override {
    return with_failover(&spec, [&](Instance& i) {
      return open_stream(i, protocol::StatusSubscribe{spec, false});
    });
  }
  Result<std::unique_ptr<StatusStream>> subscribe_all() override {
    return with_failover(nullptr, [&](Instance& i) {
      return open_stream(i, protocol::StatusSubscribe{{}, true});
    });
  }

  Result<std::unique_ptr<StatusStream>> subscribe_key(const std::string& key) override {
    COMPANION_TRY(protocol::validate_publish_key(key));
    return with_failover(nullptr, [&](Instance& i) {
      protocol::StatusSubscribe request;
      request.key = key;
      return open_stream(i, std::move(request));
    });
  }

  // ---- publishing ----
  // Published models live on the instance used last (a client publishes and attaches through
  // one instance; several instances on one device each hold their own publications).

  Result<std::unique_ptr<Publication>> claim(const std::string& key, const Fingerprint& fingerprint,
                                             ClaimMode mode, double timeout_s) override {
    return with_failover(nullptr, [&](Instance& i) -> Result<std::unique_ptr<Publication>> {
      // A connection of its own: it is the key's writer lock until commit or abort.
      COMPANION_ASSIGN_OR_RETURN(Instance own, connect_instance(i.key, i.server.get()));
      return claim_publication(own.connection, own.ordinal, key, fingerprint, mode,
                               to_ms(timeout_s));
    });
  }

  Result<std::unique_ptr<Publication>> publish(const std::string& key,
                                               std::span<const TensorDecl> table,
                                               const Fingerprint& fingerprint) override {
    COMPANION_ASSIGN_OR_RETURN(auto publication,
                               claim(key, fingerprint, ClaimMode::kNow, kRequestMs / 1000.0));
    if (!publication) return make_error(StatusCode::kInternal, "claim gave no publication");
    COMPANION_TRY(publication->declare(table));
    return publication;
  }

  Result<std::shared_ptr<MappedModel>> attach(const std::string& key,
                                              const AttachOptions& options) override {
    if (!options.or_source) COMPANION_TRY(protocol::validate_publish_key(key));
    if (options.fingerprint) COMPANION_TRY(protocol::validate_fingerprint(*options.fingerprint));
    const Deadline deadline = Deadline::after_seconds(options.timeout_s);
    return with_failover(nullptr, [&](Instance& i) -> Result<std::shared_ptr<MappedModel>> {
      COMPANION_TRY(require_publishing(i.connection->server(), i.connection->server_minor()));
      protocol::GetParameters request;
      request.key = key;
      request.wait = options.wait;
      request.generation = options.generation;
      request.fingerprint = options.fingerprint;
      request.or_source = options.or_source;
      if (options.or_source) request.spec.source = key;
      std::vector<UniqueFd> fds;
      COMPANION_ASSIGN_OR_RETURN(
          auto params, expect<protocol::Parameters>(
                           i.connection->call(std::move(request), deadline.remaining_ms(), &fds)));
      return map_parameters(i.connection, std::move(params), std::move(fds), i.ordinal);
    });
  }

  Result<std::shared_ptr<MappedModel>> attach_or_publish(
      const std::string& key, const Fingerprint& fingerprint,
      const std::function<Result<std::vector<TensorDecl>>()>& declare,
      const std::function<Result<void>(Publication&)>& fill, double timeout_s) override {
    const Deadline deadline = Deadline::after_seconds(timeout_s);
    // Each round blocks on the server (a claim waits for the writer before it); a round repeats
    // only when the model it was told of went away before it could attach.
    for (int round = 0;; ++round) {
      COMPANION_ASSIGN_OR_RETURN(
          auto publication,
          claim(key, fingerprint, ClaimMode::kIfUnpublished, deadline.remaining_s()));
      if (publication) {
        COMPANION_ASSIGN_OR_RETURN(std::vector<TensorDecl> table, declare());
        COMPANION_TRY(publication->declare(table));
        COMPANION_TRY(fill(*publication));
        return publication->commit();
      }
      AttachOptions options;
      options.fingerprint = fingerprint;
      options.timeout_s = deadline.remaining_s();
      auto model = attach(key, options);
      if (model.ok() || model.error().code != StatusCode::kNotFound || round >= 3) return model;
    }
  }

  Result<ModelStatus> reload(const std::string& key_or_id, bool force, double timeout_s) override {
    const Deadline deadline = Deadline::after_seconds(timeout_s);
    return with_failover(
        nullptr,
        [&](Instance& i) -> Result<ModelStatus> {
          COMPANION_TRY(require_publishing(i.connection->server(), i.connection->server_minor()));
          COMPANION_ASSIGN_OR_RETURN(
              auto r, expect<protocol::LoadReply>(i.connection->call(
                          protocol::Reload{key_or_id, force}, deadline.remaining_ms())));
          return r.model;
        },
        false);
  }

  // Connects to a server at socket_path directly (no registry, no failover).
  Result<void> start_direct(const std::string& socket_path) {
    COMPANION_ASSIGN_OR_RETURN(Instance i, connect_instance(socket_path, nullptr));
    std::lock_guard<std::mutex> lock(mutex_);
    direct_ = i;
    make_current_locked(i);
    return ok_result();
  }

  // The direct instance; a new connection if the server went away (it may have restarted).
  Result<Instance> direct_instance() {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (direct_->connection->alive()) return *direct_;
    }
    COMPANION_ASSIGN_OR_RETURN(Instance i, connect_instance(options_.socket_path, nullptr));
    std::lock_guard<std::mutex> lock(mutex_);
    direct_ = i;
    return i;
  }

 private:
  static constexpr int kRequestMs = 30000;

  // Connects to a server whose socket must belong to a trusted owner and be served by that
  // owner's process, and by the pid its record names (record: null for a socket given directly).
  Result<Instance> connect_instance(const std::string& socket_path, const ServerIdentity* record) {
    COMPANION_ASSIGN_OR_RETURN(uid_t owner, registry::trusted_socket_owner(socket_path, trust_));
    ExpectedPeer expected;
    expected.uid = owner;
    expected.claimed_by = "socket " + socket_path;
    if (record != nullptr) {
      expected.pid = static_cast<pid_t>(record->pid);
      expected.claimed_by = "the record of instance " + record->instance_id;
    }
    COMPANION_ASSIGN_OR_RETURN(auto c,
                               Connection::open(socket_path, options_.client_name,
                                                to_ms(options_.connect_timeout_s), expected));
    COMPANION_ASSIGN_OR_RETURN(int ordinal, local_ordinal_for(c->server()));
    Instance i;
    i.key = socket_path;
    i.server = std::make_shared<const ServerIdentity>(c->server());
    i.connection = std::move(c);
    i.ordinal = ordinal;
    return i;
  }

  // The pooled connection to the instance, or a new one.
  Result<Instance> instance_for(const ServerIdentity& record) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      auto it = pool_.find(record.socket_path);
      // A restarted instance on the same socket is another instance; a connection the server
      // closed (idle, --idle-timeout) is replaced by a new one.
      if (it != pool_.end() && it->second.server->instance_id == record.instance_id &&
          it->second.connection->alive())
        return it->second;
    }
    COMPANION_ASSIGN_OR_RETURN(Instance i, connect_instance(record.socket_path, &record));
    std::lock_guard<std::mutex> lock(mutex_);
    pool_[record.socket_path] = i;
    return i;
  }

  void forget(const Instance& i) {
    std::lock_guard<std::mutex> lock(mutex_);
    auto it = pool_.find(i.key);
    if (it != pool_.end() && it->second.connection == i.connection) pool_.erase(it);
  }

  // The instance that served spec last, if its connection is still alive (direct clients have
  // only one instance: no hint needed).
  std::optional<Instance> last_holder(const ModelSpec& spec) {
    if (direct_) return std::nullopt;
    std::string holder = holder_key(spec);
    std::lock_guard<std::mutex> lock(mutex_);
    auto it = pool_.find(holder);
    if (it == pool_.end() || !it->second.connection->alive()) return std::nullopt;
    return it->second;
  }

  // The socket path of the instance that served spec last ("" when none did).
  std::string holder_key(const ModelSpec& spec) {
    std::lock_guard<std::mutex> lock(mutex_);
    auto it = holders_.find(spec_identity(spec));
    return it == holders_.end() ? std::string() : it->second;
  }

  void forget_holder(const ModelSpec& spec) {
    std::lock_guard<std::mutex> lock(mutex_);
    holders_.erase(spec_identity(spec));
  }

  void remember_holder(const ModelSpec& spec, const Instance& i) {
    std::lock_guard<std::mutex> lock(mutex_);
    if (holders_.size() >= 1024) holders_.clear();  // a hint, not a record: bound it simply
    holders_[spec_identity(spec)] = i.key;
  }

  void make_current(const Instance& i) {
    std::lock_guard<std::mutex> lock(mutex_);
    make_current_locked(i);
  }
  void make_current_locked(const Instance& i) {
    current_ = i.key;
    // server() hands out references: every identity it returned stays alive (one per connection
    // made, so the set grows only with reconnections).
    identities_.insert(i.server);
    current_server_.store(i.server.get());
  }

  // One model's status from one instance: subscribe (the first event is the current status),
  // then unsubscribe without waiting.
  // (A subscription whose first event times out is ended by the connection when it comes.)
  Result<ModelStatus> query_status(Instance& i, const ModelSpec& spec, int timeout_ms) {
    COMPANION_ASSIGN_OR_RETURN(
        Message m, i.connection->call(protocol::StatusSubscribe{spec, false}, timeout_ms));
    auto* event = std::get_if<protocol::StatusEvent>(&m.body);
    if (event == nullptr)
      return make_error(StatusCode::kProtocolError,
                        std::string("unexpected reply ") + protocol::body_name(m.body));
    (void)i.connection->send(protocol::StatusUnsubscribe{m.request_id});
    return event->model;
  }

  // The instance for a request: for a model, the first live instance that holds it (loaded,
  // else loading), otherwise the next one in round robin; without a model, the one used last.
  // Instances in `failed` broke during this request and are passed over.
  Result<Instance> choose(const ModelSpec* spec, const std::set<std::string>& failed) {
    if (direct_) {
      if (failed.count(options_.socket_path) != 0)
        return make_error(StatusCode::kUnavailable,
                          "the server at " + options_.socket_path + " went away");
      return direct_instance();
    }
    std::vector<ServerIdentity> candidates;
    for (auto& r : source_->list())
      if (failed.count(r.socket_path) == 0) candidates.push_back(std::move(r));
    std::string last_error;
    bool refused = false;  // a candidate's server is not who its record says (NOT_PERMITTED)
    std::set<std::string> unreachable;
    if (spec != nullptr && candidates.size() > 1) {
      // The instance that served this model to this client last is asked first: usually the
      // only probe needed.
      std::string holder = holder_key(*spec);
      std::stable_partition(candidates.begin(), candidates.end(),
                            [&](const ServerIdentity& r) { return r.socket_path == holder; });
      std::optional<Instance> loading;
      for (const auto& r : candidates) {
        auto i = instance_for(r);
        if (!i.ok()) {
          unreachable.insert(r.socket_path);
          last_error = i.error().message;
          refused = refused || i.error().code == StatusCode::kNotPermitted;
          continue;
        }
        auto s = query_status(*i, *spec, kProbeMs);
        if (!s.ok()) {
          if (instance_lost(*i, s.error())) {
            forget(*i);
            unreachable.insert(r.socket_path);
            last_error = s.error().message;
          }
          continue;  // e.g. outside this instance's model roots: it does not hold it
        }
        if (s->state == ModelState::kLoaded) return *i;
        if (s->state == ModelState::kLoading && !loading) loading = *i;
      }
      if (loading) return *loading;
    }
    if (spec == nullptr) {
      std::string current;
      {
        std::lock_guard<std::mutex> lock(mutex_);
        current = current_;
      }
      for (const auto& r : candidates) {
        if (r.socket_path != current || unreachable.count(r.socket_path) != 0) continue;
        auto i = instance_for(r);
        if (i.ok()) return i;
        unreachable.insert(r.socket_path);
        last_error = i.error().message;
        refused = refused || i.error().code == StatusCode::kNotPermitted;
      }
    }
    uint64_t turn;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      turn = round_robin_++;
    }
    for (size_t n = 0; n < candidates.size(); ++n) {
      const auto& r = candidates[(turn + n) % candidates.size()];
      if (unreachable.count(r.socket_path) != 0) continue;
      auto i = instance_for(r);
      if (i.ok()) return i;
      unreachable.insert(r.socket_path);
      last_error = i.error().message;
      refused = refused || i.error().code == StatusCode::kNotPermitted;
    }
    return make_error(refused ? StatusCode::kNotPermitted : StatusCode::kUnavailable,
                      "no live companion server for " + source_->describe() +
                          (last_error.empty() ? "" : ": " + last_error));
  }

  // Runs request on the chosen instance; when that instance is lost, on the next live one
  // (unless the request must not be repeated).
  template <typename F>
  auto with_failover(const ModelSpec* spec, F&& request, bool repeatable = true)
      -> decltype(request(std::declval<Instance&>())) {
    std::set<std::string> failed;
    std::set<std::string> reconnected;
    std::optional<Error> lost;
    for (;;) {
      auto i = choose(spec, failed);
      if (!i.ok()) {
        if (!lost) return std::move(i).error();
        return Error{lost->code, lost->message + "; no other instance to fail over to (" +
                                     i.error().message + ")"};
      }
      auto r = request(*i);
      if (r.ok() || !instance_lost(*i, r.error())) {
        make_current(*i);
        if (r.ok() && spec != nullptr) remember_holder(*spec, *i);
        return r;
      }
      forget(*i);
      if (!repeatable) return r;
      // The server may have closed just this connection (an idle one, as the request went out):
      // one new connection to the same instance first. A dead instance refuses it, and the
      // choice moves on.
      lost = r.error();
      if (reconnected.insert(i->key).second) continue;
      log::warn("companion instance " + i->server->instance_id + " lost (" + r.error().message +
                "); failing over");
      failed.insert(i->key);
    }
  }

  Result<ModelStatus> call_unload(Instance& i, const protocol::Unload& u) {
    COMPANION_ASSIGN_OR_RETURN(auto r,
                               expect<protocol::UnloadReply>(i.connection->call(u, kRequestMs)));
    return r.model;
  }

  Result<ModelStatus> call_offload(Instance& i, const protocol::Unload& u,
                                   const Deadline& deadline) {
    COMPANION_ASSIGN_OR_RETURN(
        auto r, expect<protocol::UnloadReply>(i.connection->call(u, deadline.remaining_ms())));
    return r.model;
  }

  Result<std::unique_ptr<StatusStream>> open_stream(Instance& i,
                                                    protocol::StatusSubscribe request) {
    COMPANION_ASSIGN_OR_RETURN(auto c, Connection::open(i.key, options_.client_name));
    COMPANION_ASSIGN_OR_RETURN(uint64_t id, c->send_stream(std::move(request)));
    return std::unique_ptr<StatusStream>(std::make_unique<StatusStreamImpl>(c, id));
  }

  Result<ModelStatus> load_and_wait(const ModelSpec& spec, double initial_timeout_s,
                                    double loading_timeout_s,
                                    const std::function<void(const ModelStatus&)>& on_progress) {
    const Deadline loading = Deadline::after_seconds(loading_timeout_s);
    return with_failover(&spec, [&](Instance& i) {
      return load_and_wait_on(i, spec, initial_timeout_s, loading, on_progress);
    });
  }

  // Subscribes, starts the load, then follows the model's status until it is loaded.
  Result<ModelStatus> load_and_wait_on(Instance& i, const ModelSpec& spec, double initial_timeout_s,
                                       const Deadline& deadline,
                                       const std::function<void(const ModelStatus&)>& on_progress) {
    COMPANION_ASSIGN_OR_RETURN(auto stream, open_stream(i, protocol::StatusSubscribe{spec, false}));
    COMPANION_ASSIGN_OR_RETURN(
        auto started, expect<protocol::LoadReply>(i.connection->call(protocol::Load{spec, false},
                                                                     to_ms(initial_timeout_s))));
    ModelStatus s = started.model;
    if (on_progress) on_progress(s);
    if (s.state == ModelState::kLoaded) return s;
    for (;;) {
      double left = deadline.remaining_s();
      if (left == 0)
        return make_error(StatusCode::kTimeout, "model still " +
                                                    std::string(model_state_name(s.state)) +
                                                    " when the loading timeout ran out");
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
  std::unique_ptr<InstanceSource> source_;  // null when connected to a socket directly
  registry::TrustPolicy trust_;
  std::optional<Instance> direct_;
  std::mutex mutex_;
  std::map<std::string, Instance> pool_;        // by socket path
  std::string current_;                         // socket path of the instance used last
  std::map<std::string, std::string> holders_;  // spec → socket path of the instance that served it
  std::set<std::shared_ptr<const ServerIdentity>> identities_;
  std::atomic<const ServerIdentity*> current_server_{nullptr};
  uint64_t round_robin_ = 0;
};

}  // namespace
}  // namespace client

Result<std::vector<ServerIdentity>> discover_instances(const ConnectOptions& options) {
  COMPANION_ASSIGN_OR_RETURN(auto source, client::InstanceSource::open(options));
  auto records = source->wait_for_any(options.discovery_timeout_s);
  if (records.empty())
    return make_error(StatusCode::kUnavailable,
                      "no live companion server for " + source->describe());
  return records;
}

Result<std::unique_ptr<Client>> Client::connect(const ConnectOptions& options) {
  if (!options.socket_path.empty()) {
    COMPANION_ASSIGN_OR_RETURN(registry::TrustPolicy trust,
                               registry::TrustPolicy::from_environment(options.trusted_uids));
    auto client = std::make_unique<client::ClientImpl>(options, nullptr, std::move(trust));
    COMPANION_TRY(client->start_direct(options.socket_path));
    return std::unique_ptr<Client>(std::move(client));
  }
  COMPANION_ASSIGN_OR_RETURN(auto source, client::InstanceSource::open(options));
  registry::TrustPolicy trust = source->trust();
  auto client = std::make_unique<client::ClientImpl>(options, std::move(source), std::move(trust));
  COMPANION_TRY(client->start());
  return std::unique_ptr<Client>(std::move(client));
}

}  // namespace companion
