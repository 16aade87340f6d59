#include "server/server.hpp"

#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <deque>
#include <map>
#include <unordered_map>

#include "checkpoint/source.hpp"
#include "common/log.hpp"
#include "common/util.hpp"
#include "memory/cuda_backend.hpp"
#include "memory/host_backend.hpp"
#include "protocol/frame.hpp"
#include "protocol/messages.hpp"
#include "registry/etcd_registry.hpp"
#include "registry/registry.hpp"
#include "server/model_store.hpp"
#include "transport/event_loop.hpp"
#include "transport/unix_socket.hpp"

namespace companion::server {
namespace {

using protocol::Message;

// A connection whose unsent replies pile up past this is too slow to keep (a stuck subscriber).
constexpr size_t kMaxQueuedBytes = 256u << 20;

struct Connection {
  struct Lease {
    std::string key;
    uint64_t generation = 0;
    std::shared_ptr<memory::Slab> slab;  // keeps force-unloaded memory alive for this client
  };
  struct Subscription {
    bool all = false;
    std::string key;
    // Newest status sent per model: older ones that arrive late are skipped.
    std::map<std::string, uint64_t> last_seq;
  };

  uint64_t id = 0;
  UniqueFd fd;
  transport::EventLoop::Token token = 0;
  transport::PeerCredentials peer;
  protocol::FrameReader reader;
  std::deque<protocol::OutgoingFrame> out;
  size_t queued_bytes = 0;
  bool writing = false;  // EPOLLOUT armed
  bool greeted = false;
  bool closing = false;  // close once the queue drains
  bool dead = false;     // close now
  std::map<uint64_t, Lease> leases;
  std::map<uint64_t, Subscription> subscriptions;
};

// A request parked until its model finishes loading.
struct Waiter {
  uint64_t connection = 0;
  uint64_t request_id = 0;
  bool wants_lease = false;  // GetParameters (true) or Load (false)
  uint64_t after_seq = 0;    // only outcomes newer than the status it parked on count
};

struct DeviceSetup {
  std::unique_ptr<memory::Backend> backend;
  ServerIdentity identity;
};

Result<DeviceSetup> setup_device(const ServerOptions& options) {
  DeviceSetup setup;
  ServerIdentity& id = setup.identity;
  if (options.device == "host") {
    if (!options.backend.empty() && options.backend != "host")
      return make_error(StatusCode::kInvalidArgument,
                        "backend " + options.backend + " needs a GPU device, not host");
    setup.backend = memory::make_host_backend();
    id.device = "host";
    id.component = "model_server_host";
  } else {
    COMPANION_ASSIGN_OR_RETURN(memory::GpuIdentity gpu, memory::resolve_gpu(options.device));
    std::string backend = options.backend.empty() ? "cuda-vmm" : options.backend;
    if (backend == "cuda-vmm") {
      COMPANION_ASSIGN_OR_RETURN(setup.backend, memory::make_cuda_vmm_backend(gpu.ordinal));
    } else if (backend == "cuda-ipc") {
      COMPANION_ASSIGN_OR_RETURN(setup.backend, memory::make_cuda_ipc_backend(gpu.ordinal));
    } else {
      return make_error(StatusCode::kInvalidArgument,
                        "unknown backend '" + backend + "' (cuda-vmm, cuda-ipc or host)");
    }
    id.device = gpu.uuid;
    id.gpu_uuid = gpu.uuid;
    id.pci_bus_id = gpu.pci_bus_id;
    id.device_ordinal = gpu.ordinal;
    id.component = "model_server_gpu_" + std::to_string(gpu.ordinal);
  }
  id.default_backend = setup.backend->name();
  id.backends = {setup.backend->name()};
  id.ns = options.ns;
  id.hostname = hostname();
  id.pid = ::getpid();
  id.version = software_version();
  id.started_at_ms = unix_time_ms();
  id.instance_id = random_hex_id();
  return setup;
}

class ServerImpl final : public Server {
 public:
  ServerImpl(ServerOptions options, ServerIdentity identity,
             std::unique_ptr<transport::EventLoop> loop, UniqueFd listen_fd,
             std::unique_ptr<registry::Registration> registration, std::string registry_url)
      : options_(std::move(options)),
        identity_(std::move(identity)),
        loop_(std::move(loop)),
        listen_fd_(std::move(listen_fd)),
        registration_(std::move(registration)),
        registry_url_(std::move(registry_url)),
        started_(Clock::now()) {}

  ~ServerImpl() override {
    store_.reset();  // joins loaders before the loop they post to goes away
  }

  void attach_store(std::unique_ptr<ModelStore> store) { store_ = std::move(store); }
  void attach_announcer(std::unique_ptr<registry::EtcdAnnouncer> announcer) {
    announcer_ = std::move(announcer);
  }
  ModelStore& store() { return *store_; }
  transport::EventLoop& loop() { return *loop_; }

  const ServerIdentity& identity() const override { return identity_; }
  void stop() override { loop_->stop(); }

  Result<void> run() override {
    COMPANION_TRY(loop_->add(listen_fd_.get(), EPOLLIN, [this](uint32_t) { accept_all(); }));
    log::info("serving " + identity_.ns + "/" + identity_.component + " instance " +
              identity_.instance_id + " on " + identity_.socket_path + " (" +
              identity_.default_backend + ")");
    loop_->run();
    std::vector<uint64_t> ids;
    for (auto& [id, c] : connections_) ids.push_back(id);
    for (uint64_t id : ids) destroy(id);
    announcer_.reset();  // leaves etcd first: clients there stop choosing this instance
    registration_.reset();
    log::info("stopped");
    return ok_result();
  }

  // Runs on the loop thread. Statuses may arrive slightly out of order (they are posted by
  // several threads); seq tells which is newer.
  void on_model_status(const ModelStatus& s) {
    std::vector<uint64_t> touched;
    for (auto& [cid, c] : connections_) {
      for (auto& [rid, sub] : c->subscriptions) {
        if (!sub.all && sub.key != s.key) continue;
        uint64_t& last = sub.last_seq[s.key];
        if (s.seq <= last) continue;
        last = s.seq;
        send(*c, Message{rid, protocol::StatusEvent{s}});
        if (sub.all && s.state == ModelState::kUnloaded) sub.last_seq.erase(s.key);
      }
      touched.push_back(cid);
    }
    if (s.state == ModelState::kLoaded || s.state == ModelState::kError ||
        s.state == ModelState::kUnloaded) {
      auto range = waiters_.equal_range(s.key);
      std::vector<Waiter> ready;
      for (auto w = range.first; w != range.second;) {
        if (w->second.after_seq < s.seq) {
          ready.push_back(w->second);
          w = waiters_.erase(w);
        } else {
          ++w;
        }
      }
      for (const Waiter& w : ready) {
        auto c = connections_.find(w.connection);
        if (c == connections_.end()) continue;
        complete_wait(*c->second, w, s);
      }
    }
    for (uint64_t cid : touched) reap(cid);
  }

 private:
  // ---- connections ----------------------------------------------------------------------------

  void accept_all() {
    for (;;) {
      int fd = ::accept4(listen_fd_.get(), nullptr, nullptr, SOCK_NONBLOCK | SOCK_CLOEXEC);
      if (fd < 0) {
        if (errno == EINTR) continue;
        if (errno != EAGAIN && errno != EWOULDBLOCK)
          log::warn(std::string("accept: ") + std::strerror(errno));
        return;
      }
      auto c = std::make_unique<Connection>();
      c->id = next_connection_++;
      c->fd.reset(fd);
      if (auto peer = transport::peer_credentials(fd); peer.ok()) c->peer = *peer;
      uint64_t cid = c->id;
      auto token = loop_->add(fd, EPOLLIN | EPOLLRDHUP,
                              [this, cid](uint32_t events) { on_event(cid, events); });
      if (!token.ok()) {
        log::warn("cannot watch a new connection: " + token.error().to_string());
        continue;
      }
      c->token = *token;
      log::debug("connection " + std::to_string(cid) + " from pid " + std::to_string(c->peer.pid));
      connections_[cid] = std::move(c);
    }
  }

  void on_event(uint64_t cid, uint32_t events) {
    auto it = connections_.find(cid);
    if (it == connections_.end()) return;
    Connection& c = *it->second;
    if (events & EPOLLOUT) flush(c);
    if (!c.dead && (events & (EPOLLIN | EPOLLHUP | EPOLLERR | EPOLLRDHUP))) read_all(c);
    reap(cid);
  }

  void read_all(Connection& c) {
    for (int round = 0; round < 64 && !c.dead && !c.closing; ++round) {
      auto n = c.reader.read_some(c.fd.get());
      if (!n.ok()) {
        if (n.error().code != StatusCode::kUnavailable) c.dead = true;
        return;
      }
      if (*n == 0) {  // peer closed; nothing it sent after this matters
        c.dead = true;
        return;
      }
      for (;;) {
        auto frame = c.reader.next();
        if (!frame.ok()) return fail_connection(c, 0, frame.error());
        if (!*frame) break;
        handle_frame(c, std::move(**frame));
        if (c.dead || c.closing) return;
      }
    }
  }

  void handle_frame(Connection& c, protocol::Frame frame) {
    if (!frame.fds.empty())
      return fail_connection(
          c, 0, make_error(StatusCode::kProtocolError, "requests must not carry file descriptors"));
    auto message = protocol::decode(std::move(frame.payload));
    if (!message.ok()) return fail_connection(c, 0, message.error());
    uint64_t rid = message->request_id;
    protocol::Body& body = message->body;
    if (!c.greeted && !std::holds_alternative<protocol::Hello>(body))
      return fail_connection(
          c, rid, make_error(StatusCode::kProtocolError, "the first message must be hello"));
    if (auto* m = std::get_if<protocol::Hello>(&body)) return on_hello(c, rid, *m);
    if (auto* m = std::get_if<protocol::GetParameters>(&body)) return on_get(c, rid, *m);
    if (auto* m = std::get_if<protocol::Release>(&body)) return on_release(c, rid, *m);
    if (auto* m = std::get_if<protocol::StatusSubscribe>(&body)) return on_subscribe(c, rid, *m);
    if (auto* m = std::get_if<protocol::StatusUnsubscribe>(&body))
      return on_unsubscribe(c, rid, *m);
    if (auto* m = std::get_if<protocol::Load>(&body)) return on_load(c, rid, *m);
    if (auto* m = std::get_if<protocol::Unload>(&body)) return on_unload(c, rid, *m);
    if (std::holds_alternative<protocol::List>(body))
      return send(c, Message{rid, protocol::ListReply{store_->list()}});
    if (std::holds_alternative<protocol::Health>(body))
      return send(c, Message{rid, protocol::HealthReply{health()}});
    reply_error(c, rid,
                make_error(StatusCode::kProtocolError,
                           std::string(protocol::body_name(body)) + " is not a request"));
  }

  // ---- requests -------------------------------------------------------------------------------

  void on_hello(Connection& c, uint64_t rid, const protocol::Hello& m) {
    if (m.major != kProtocolMajor) {
      return fail_connection(
          c, rid,
          make_error(StatusCode::kVersionMismatch,
                     "server speaks protocol " + std::to_string(kProtocolMajor) + "." +
                         std::to_string(kProtocolMinor) + ", client " + std::to_string(m.major) +
                         "." + std::to_string(m.minor)));
    }
    c.greeted = true;
    send(c, Message{rid, protocol::HelloReply{kProtocolMajor, kProtocolMinor, identity_}});
  }

  void on_get(Connection& c, uint64_t rid, const protocol::GetParameters& m) {
    auto model = store_->resolve(m.spec);
    if (!model.ok()) return reply_error(c, rid, model.error());
    if (m.only_if_held) {
      ModelState state = store_->status(model->key).state;
      if (state != ModelState::kLoaded && state != ModelState::kLoading)
        return reply_error(
            c, rid, make_error(StatusCode::kNotReady, "this instance does not hold the model"));
    }
    auto s = store_->ensure_loading(*model);
    if (!s.ok()) return reply_error(c, rid, s.error());
    if (s->state == ModelState::kLoaded) return grant(c, rid, model->key);
    if (!m.wait)
      return reply_error(
          c, rid,
          make_error(StatusCode::kNotReady, "model is loading (" + std::to_string(s->bytes_done) +
                                                "/" + std::to_string(s->bytes_total) + " bytes)"));
    waiters_.emplace(model->key, Waiter{c.id, rid, true, s->seq});
  }

  void on_load(Connection& c, uint64_t rid, const protocol::Load& m) {
    auto model = store_->resolve(m.spec);
    if (!model.ok()) return reply_error(c, rid, model.error());
    auto s = store_->ensure_loading(*model);
    if (!s.ok()) return reply_error(c, rid, s.error());
    if (s->state == ModelState::kLoaded || !m.wait)
      return send(c, Message{rid, protocol::LoadReply{*s}});
    waiters_.emplace(model->key, Waiter{c.id, rid, false, s->seq});
  }

  void on_unload(Connection& c, uint64_t rid, const protocol::Unload& m) {
    std::string key = m.key;
    if (key.empty()) {
      auto model = store_->resolve(m.spec);
      if (!model.ok()) return reply_error(c, rid, model.error());
      key = model->key;
    }
    auto s = store_->unload(key, m.force);
    if (!s.ok()) return reply_error(c, rid, s.error());
    send(c, Message{rid, protocol::UnloadReply{*s}});
  }

  void on_release(Connection& c, uint64_t rid, const protocol::Release& m) {
    auto it = c.leases.find(m.lease_id);
    if (it == c.leases.end())
      return reply_error(
          c, rid,
          make_error(StatusCode::kInvalidArgument,
                     "no lease " + std::to_string(m.lease_id) + " on this connection"));
    store_->release(it->second.key, it->second.generation);
    c.leases.erase(it);
    send(c, Message{rid, protocol::Released{m.lease_id}});
  }

  void on_subscribe(Connection& c, uint64_t rid, const protocol::StatusSubscribe& m) {
    Connection::Subscription sub;
    sub.all = m.all;
    if (!m.all) {
      auto model = store_->resolve(m.spec);
      if (!model.ok()) return reply_error(c, rid, model.error());
      sub.key = model->key;
    }
    // The current state first; events already in flight that are older get skipped by seq.
    std::vector<ModelStatus> current =
        sub.all ? store_->list() : std::vector<ModelStatus>{store_->status(sub.key)};
    for (auto& s : current)
      if (s.source.empty()) s.source = m.spec.source;  // not held yet: name it as asked
    for (const auto& s : current) {
      sub.last_seq[s.key] = s.seq;
      send(c, Message{rid, protocol::StatusEvent{s}});
    }
    c.subscriptions[rid] = std::move(sub);
  }

  void on_unsubscribe(Connection& c, uint64_t rid, const protocol::StatusUnsubscribe& m) {
    c.subscriptions.erase(m.subscription_id);
    send(c, Message{rid, protocol::Done{}});
  }

  void complete_wait(Connection& c, const Waiter& w, const ModelStatus& s) {
    if (s.state == ModelState::kLoaded) {
      if (w.wants_lease) return grant(c, w.request_id, s.key);
      return send(c, Message{w.request_id, protocol::LoadReply{s}});
    }
    if (s.state == ModelState::kError)
      return reply_error(c, w.request_id, Error{s.error_code, s.message});
    reply_error(c, w.request_id,
                make_error(StatusCode::kCancelled, "the model was unloaded while loading"));
  }

  void grant(Connection& c, uint64_t rid, const std::string& key) {
    auto g = store_->acquire(key);
    if (!g.ok()) return reply_error(c, rid, g.error());
    uint64_t lease_id = next_lease_++;
    std::vector<protocol::SegmentInfo> segments;
    std::vector<UniqueFd> fds;
    for (auto& e : g->exports) {
      protocol::SegmentInfo info;
      info.kind = e.kind;
      info.size = e.size;
      info.ipc_handle = e.ipc_handle;
      if (e.fd.valid()) {
        info.fd_index = static_cast<int32_t>(fds.size());
        fds.push_back(std::move(e.fd));
      }
      segments.push_back(info);
    }
    auto payload = protocol::encode_parameters(rid, lease_id, g->status, segments, *g->tensors);
    c.leases[lease_id] = Connection::Lease{key, g->generation, g->slab};
    enqueue(c, std::move(payload), std::move(fds));
  }

  // ---- replies --------------------------------------------------------------------------------

  void send(Connection& c, const Message& m) { enqueue(c, protocol::encode(m), {}); }

  void reply_error(Connection& c, uint64_t rid, const Error& e) {
    send(c, Message{rid, protocol::ErrorReply{e}});
  }

  // Answers with the error, then closes: the stream can no longer be trusted.
  void fail_connection(Connection& c, uint64_t rid, const Error& e) {
    log::warn("closing connection " + std::to_string(c.id) + " (pid " + std::to_string(c.peer.pid) +
              "): " + e.to_string());
    reply_error(c, rid, e);
    c.closing = true;
    flush(c);
  }

  void enqueue(Connection& c, std::vector<uint8_t> payload, std::vector<UniqueFd> fds) {
    if (c.dead) return;
    c.queued_bytes += payload.size();
    c.out.emplace_back(std::move(payload), std::move(fds));
    if (c.queued_bytes > kMaxQueuedBytes) {
      log::warn("connection " + std::to_string(c.id) + " is not reading its replies; dropping it");
      c.dead = true;
      return;
    }
    flush(c);
  }

  void flush(Connection& c) {
    while (!c.out.empty()) {
      auto done = c.out.front().write_some(c.fd.get());
      if (!done.ok()) {
        c.dead = true;
        return;
      }
      if (!*done) break;
      c.queued_bytes -= c.out.front().payload_bytes();
      c.out.pop_front();
    }
    bool want = !c.out.empty();
    if (want != c.writing) {
      c.writing = want;
      auto r = loop_->modify(c.token, EPOLLIN | EPOLLRDHUP | (want ? EPOLLOUT : 0u));
      if (!r.ok()) c.dead = true;
    }
    if (c.out.empty() && c.closing) c.dead = true;
  }

  void reap(uint64_t cid) {
    auto it = connections_.find(cid);
    if (it != connections_.end() && it->second->dead) destroy(cid);
  }

  void destroy(uint64_t cid) {
    auto it = connections_.find(cid);
    if (it == connections_.end()) return;
    Connection& c = *it->second;
    for (auto& [lid, lease] : c.leases) store_->release(lease.key, lease.generation);
    for (auto w = waiters_.begin(); w != waiters_.end();) {
      if (w->second.connection == cid)
        w = waiters_.erase(w);
      else
        ++w;
    }
    loop_->remove(c.token);
    log::debug("connection " + std::to_string(cid) + " closed");
    connections_.erase(it);
  }

  // ---- views ----------------------------------------------------------------------------------

  HealthInfo health() const {
    HealthInfo h;
    h.state = "serving";
    h.uptime_ms = static_cast<uint64_t>(
        std::chrono::duration_cast<std::chrono::milliseconds>(Clock::now() - started_).count());
    for (const auto& s : store_->list()) {
      h.models_total++;
      if (s.state == ModelState::kLoaded) h.models_loaded++;
    }
    h.clients = static_cast<uint32_t>(connections_.size());
    h.leases = store_->total_leases();
    h.slab_bytes = store_->slab_bytes();
    h.server = identity_;
    h.registry = registry_url_;
    if (announcer_) {
      auto state = announcer_->state();
      h.registered = state.registered;
      h.registry_error = state.last_error;
    }
    return h;
  }

  ServerOptions options_;
  ServerIdentity identity_;
  std::unique_ptr<transport::EventLoop> loop_;
  UniqueFd listen_fd_;
  std::unique_ptr<registry::Registration> registration_;
  std::string registry_url_;
  std::unique_ptr<registry::EtcdAnnouncer> announcer_;
  std::unique_ptr<ModelStore> store_;
  std::unordered_map<uint64_t, std::unique_ptr<Connection>> connections_;
  std::multimap<std::string, Waiter> waiters_;
  uint64_t next_connection_ = 1;
  uint64_t next_lease_ = 1;
  Clock::time_point started_;
};

}  // namespace

Result<std::unique_ptr<Server>> Server::create(const ServerOptions& options) {
  if (options.ns.empty() || options.ns.find('/') != std::string::npos)
    return make_error(StatusCode::kInvalidArgument, "namespace must be non-empty without '/'");
  COMPANION_ASSIGN_OR_RETURN(registry::RegistryChoice registry_choice,
                             registry::choose_registry(options.registry));
  if (options.registry_ttl_s < 1 || options.registry_ttl_s > 3600)
    return make_error(StatusCode::kInvalidArgument, "registry TTL must be 1..3600 s");
  COMPANION_ASSIGN_OR_RETURN(DeviceSetup setup, setup_device(options));
  registry::LocalRegistry registry(options.runtime_dir.empty() ? registry::default_runtime_dir()
                                                               : options.runtime_dir);
  COMPANION_TRY(registry.ensure_dir());
  ServerIdentity& id = setup.identity;
  id.socket_path =
      options.socket_path.empty() ? registry.socket_path_for(id.instance_id) : options.socket_path;
  COMPANION_ASSIGN_OR_RETURN(UniqueFd listen_fd, transport::listen_unix(id.socket_path));
  COMPANION_ASSIGN_OR_RETURN(auto loop, transport::EventLoop::create());
  COMPANION_ASSIGN_OR_RETURN(auto registration, registry.register_instance(id));

  StoreConfig config;
  config.model_roots = checkpoint::canonical_roots(options.model_roots);
  if (config.model_roots.size() != options.model_roots.size())
    log::warn("some model roots do not exist and are ignored");
  config.hf_cache = options.hf_cache.empty() ? checkpoint::hf_hub_cache_dir() : options.hf_cache;
  config.load_threads = options.load_threads;
  if (options.direct_io == "on") {
    config.direct_io = loader::DirectIo::kOn;
  } else if (options.direct_io == "off") {
    config.direct_io = loader::DirectIo::kOff;
  } else if (options.direct_io != "auto") {
    return make_error(StatusCode::kInvalidArgument,
                      "--direct-io takes auto, on or off, not '" + options.direct_io + "'");
  }
  config.max_models = options.max_models;
  config.max_variants_per_source = options.max_variants_per_source;
  config.max_error_entries = options.max_error_entries;
  if (!(options.error_ttl_s > 0 && options.error_ttl_s < 1e9))
    return make_error(StatusCode::kInvalidArgument, "--error-ttl must be a positive number of s");
  config.error_ttl = std::chrono::milliseconds(static_cast<int64_t>(options.error_ttl_s * 1000));
  COMPANION_TRY(parse_memory_reserve(options.memory_reserve, config));
  if (!(options.shutdown_timeout_s >= 0 && options.shutdown_timeout_s <= 3600))
    return make_error(StatusCode::kInvalidArgument, "--shutdown-timeout must be 0..3600 s");
  config.shutdown_timeout =
      std::chrono::milliseconds(static_cast<int64_t>(options.shutdown_timeout_s * 1000));
  COMPANION_TRY(config.validate());

  auto server = std::make_unique<ServerImpl>(options, id, std::move(loop), std::move(listen_fd),
                                             std::move(registration), registry_choice.url);
  ServerImpl* raw = server.get();
  server->attach_store(std::make_unique<ModelStore>(
      std::move(setup.backend), std::move(config),
      [raw](const ModelStatus& s) { raw->loop().post([raw, s] { raw->on_model_status(s); }); }));
  for (const auto& source : options.preload) {
    ModelSpec spec;
    spec.source = source;
    COMPANION_ASSIGN_OR_RETURN(ResolvedModel model, raw->store().resolve(spec));
    COMPANION_TRY(raw->store().ensure_loading(model));
  }
  // Announced last, once everything that can refuse to start has passed.
  if (registry_choice.is_etcd()) {
    auto announcer = std::make_unique<registry::EtcdAnnouncer>(
        registry_choice.etcd_endpoints, raw->identity(), options.registry_ttl_s);
    // Clients started right after us should find us; an absent etcd only delays the record.
    if (!announcer->wait_registered(std::chrono::milliseconds(1500)))
      log::warn("not registered in " + registry_choice.url + " yet (" +
                announcer->state().last_error + "); serving local clients meanwhile");
    raw->attach_announcer(std::move(announcer));
  }
  return std::unique_ptr<Server>(std::move(server));
}

}  // namespace companion::server
