#include "server/server.hpp"

#include <fcntl.h>
#include <grp.h>
#include <malloc.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <condition_variable>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <functional>
#include <map>
#include <mutex>
#include <new>
#include <optional>
#include <set>
#include <stdexcept>
#include <system_error>
#include <thread>
#include <unordered_map>

#include "checkpoint/checkpoint.hpp"
#include "checkpoint/source.hpp"
#include "common/fault_point.hpp"
#include "common/log.hpp"
#include "common/util.hpp"
#include "keeper/systemd_fd_store.hpp"
#include "memory/cuda_backend.hpp"
#include "memory/host_backend.hpp"
#include "metrics/http_exporter.hpp"
#include "protocol/frame.hpp"
#include "protocol/limits.hpp"
#include "protocol/messages.hpp"
#include "registry/etcd_registry.hpp"
#include "registry/registry.hpp"
#include "server/keeper_link.hpp"
#include "server/model_store.hpp"
#include "server/server_metrics.hpp"
#include "transport/event_loop.hpp"
#include "transport/unix_socket.hpp"

namespace companion::server {
namespace {

using protocol::Message;

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
  // Requests never carry descriptors: any that arrive are closed at once.
  protocol::FrameReader reader{protocol::FdPolicy::kRefuse};
  std::deque<protocol::OutgoingFrame> out;
  size_t queued_bytes = 0;
  size_t queued_fds = 0;     // descriptors in `out` still held by this process
  size_t pending_claim = 0;  // this connection's share of the pending-frame budget
  size_t parked = 0;         // requests waiting for a load
  uint32_t interest = 0;     // the epoll events asked for now
  bool writing = false;      // EPOLLOUT armed
  bool paused = false;       // not read from until the client reads its replies
  bool resolving = false;    // a request's spec is being resolved: later requests wait for it
  std::optional<Clock::time_point> partial_since;  // when the incomplete frame began
  Clock::time_point closing_since;                 // when `closing` was set
  Clock::time_point last_active = Clock::now();
  bool greeted = false;
  uint16_t minor = 0;    // the protocol minor its Hello named: 2+ gets tables as memfds
  bool closing = false;  // close once the queue drains
  bool dead = false;     // close now
  std::map<uint64_t, Lease> leases;
  std::map<uint64_t, Subscription> subscriptions;
  std::set<std::string> publishing;  // published keys this connection holds as their writer
  // 1.3: the parts of a table declared so far (PublishDeclare with `more`), by key, and the
  // bytes they hold (as declaration_bytes() counts them), all keys together.
  struct Declaring {
    std::vector<protocol::TensorDeclInfo> tensors;
    size_t bytes = 0;
  };
  std::map<std::string, Declaring> declaring;
  size_t declaring_bytes = 0;
  // GetParameters requests not answered yet (at most the one being served and the parked ones),
  // by request id: when each arrived, for the attach latency metric.
  std::map<uint64_t, Clock::time_point> attaching;
};

// Refusal reasons, as counted in health (all present, zero or not).
constexpr const char* kRefusalReasons[] = {
    "connections",            // --max-connections
    "connections_per_uid",    // --max-connections-per-uid
    "peer_not_permitted",     // the peer's uid/gid is not allowed
    "descriptors",            // a request carried file descriptors
    "descriptors_exhausted",  // accept() hit the process's or the system's descriptor limit
    "pending_frame_bytes",    // --max-pending-frame-bytes
    "frame_timeout",          // --frame-timeout
    "idle_timeout",           // --idle-timeout (closed quietly)
    "queued_fds",             // --max-queued-fds / --max-queued-fds-total
    "queued_bytes",           // --max-queued-bytes: a client not reading its replies
    "queued_bytes_total",     // --max-queued-bytes-total
    "leases",                 // --max-leases-per-connection
    "parked_requests",        // --max-queued-replies requests waiting on one connection
    "publications",           // publications in progress on one connection
    "declaration_bytes",      // a table declared in parts past its bounds
};

// A request parked until its model finishes loading (or its first generation is committed).
struct Waiter {
  enum class Kind { kLease, kLoad, kReload, kPublished };
  uint64_t connection = 0;
  uint64_t request_id = 0;
  Kind kind = Kind::kLease;
  uint64_t after_seq = 0;  // only outcomes newer than the status it parked on count
  // kPublished: what GetParameters asked for.
  std::string key;
  uint64_t generation = 0;
  std::optional<Fingerprint> fingerprint;
  // kLease, kPublished: keeps the model from being evicted until the lease is granted (or the
  // wait ends otherwise); shared by the copies of the waiter, dropped with the last.
  std::shared_ptr<void> hold;
};

// A PublishClaim parked while another connection writes the key.
struct ClaimWaiter {
  uint64_t connection = 0;
  uint64_t request_id = 0;
  protocol::PublishClaim claim;
};

// Resolves specs off the event loop: realpath(3) on a stalled mount (NFS) blocks the thread that
// calls it, and that must never be the loop that serves every client. Threads are started as
// resolves need them (a stalled one keeps its thread), up to kMaxThreads, and are detached: a
// resolve that never returns must not hold up shutdown; it finds the server gone and drops its
// result.
class Resolver {
 public:
  using Done = std::function<void(Result<ResolvedModel>)>;
  using Post = std::function<void(std::function<void()>)>;
  static constexpr size_t kMaxThreads = 16;

  Resolver(ModelStore::ResolveFn resolve, Post post) : state_(std::make_shared<State>()) {
    state_->resolve = std::move(resolve);
    state_->post = std::move(post);
#ifdef COMPANION_TEST_HOOKS
    // "SUBSTRING:MS": resolving a source that contains SUBSTRING first sleeps MS (a stalled
    // mount, for the tests). Compiled into test builds only.
    if (const char* hook = std::getenv("COMPANION_TEST_SLOW_RESOLVE"); hook != nullptr) {
      std::string text(hook);
      size_t colon = text.rfind(':');
      if (colon != std::string::npos) {
        state_->slow_match = text.substr(0, colon);
        state_->slow_ms = std::atoi(text.c_str() + colon + 1);
      }
    }
#endif
  }
  ~Resolver() {
    std::lock_guard<std::mutex> lock(state_->mutex);
    state_->stopping = true;
    state_->post = nullptr;
    state_->jobs.clear();
    state_->cv.notify_all();
  }

  // `done` runs on the loop (through post) with the outcome, unless the server is gone by then.
  void submit(ModelSpec spec, Done done) {
    std::lock_guard<std::mutex> lock(state_->mutex);
    state_->jobs.push_back(Job{std::move(spec), std::move(done)});
    if (state_->idle < state_->jobs.size() && state_->threads < kMaxThreads) {
      try {
        std::thread([state = state_] { run(state); }).detach();
        ++state_->threads;
        ++state_->idle;
      } catch (const std::system_error& e) {
        log::warn(std::string("starting a resolver thread: ") + e.what());
      }
    }
    state_->cv.notify_one();
  }

 private:
  struct Job {
    ModelSpec spec;
    Done done;
  };
  struct State {
    std::mutex mutex;
    std::condition_variable cv;
    std::deque<Job> jobs;
    size_t threads = 0;
    size_t idle = 0;
    bool stopping = false;
    ModelStore::ResolveFn resolve;
    Post post;
    std::string slow_match;  // test hook
    int slow_ms = 0;
  };

  static void run(std::shared_ptr<State> state) {
    for (;;) {
      Job job;
      {
        std::unique_lock<std::mutex> lock(state->mutex);
        state->cv.wait(lock, [&] { return state->stopping || !state->jobs.empty(); });
        if (state->stopping) return;
        job = std::move(state->jobs.front());
        state->jobs.pop_front();
        --state->idle;
      }
      Result<ResolvedModel> model = make_error(StatusCode::kInternal, "not resolved");
      try {
        if (state->slow_ms > 0 && job.spec.source.find(state->slow_match) != std::string::npos)
          std::this_thread::sleep_for(std::chrono::milliseconds(state->slow_ms));
        model = state->resolve(job.spec);
      } catch (const std::bad_alloc&) {
        model = make_error(StatusCode::kOutOfMemory, "out of memory resolving the model");
      } catch (const std::exception& e) {
        model = make_error(StatusCode::kInternal, std::string("resolving the model: ") + e.what());
      }
      std::lock_guard<std::mutex> lock(state->mutex);
      if (state->stopping) return;
      ++state->idle;
      state->post([done = std::move(job.done), model = std::move(model)]() mutable {
        done(std::move(model));
      });
    }
  }

  std::shared_ptr<State> state_;
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
        limits_(options_.connections),
        identity_(std::move(identity)),
        loop_(std::move(loop)),
        listen_fd_(std::move(listen_fd)),
        registration_(std::move(registration)),
        registry_url_(std::move(registry_url)),
        started_(Clock::now()) {
    for (const char* reason : kRefusalReasons) refused_[reason] = 0;
    // Descriptors queued in replies never take more than half of what this process may open.
    rlimit nofile{};
    if (::getrlimit(RLIMIT_NOFILE, &nofile) == 0 && nofile.rlim_cur != RLIM_INFINITY)
      queued_fds_cap_ = std::min<size_t>(limits_.max_queued_fds_total, nofile.rlim_cur / 2);
    else
      queued_fds_cap_ = limits_.max_queued_fds_total;
  }

  // The peer policy: this uid, root, and whatever the options allow.
  void allow_peers(gid_t socket_group) {
    allowed_uids_.insert(::geteuid());
    allowed_uids_.insert(0);
    allowed_uids_.insert(limits_.allow_uids.begin(), limits_.allow_uids.end());
    allowed_gids_.insert(limits_.allow_gids.begin(), limits_.allow_gids.end());
    if (socket_group != static_cast<gid_t>(-1)) allowed_gids_.insert(socket_group);
  }

  ~ServerImpl() override {
    // What the store frees as it goes away stays with the keeper for the next server.
    exporter_.reset();  // no scrape reads the store from here on
    if (keeper_) keeper_->detach();
    resolver_.reset();  // resolves still running drop their results
    waiters_.clear();   // their holds on models go before the store
    store_.reset();     // joins loaders before the loop they post to goes away
    keeper_.reset();    // sends what is queued, then ends the session
  }

  void attach_keeper(std::shared_ptr<KeeperLink> keeper) { keeper_ = std::move(keeper); }

  // The counters exist from the start (the store reports loads to them); the endpoint that
  // serves them, only with --metrics.
  void attach_metrics(std::shared_ptr<ServerMetrics> metrics) { metrics_ = std::move(metrics); }
  Result<void> serve_metrics(const metrics::ListenAddress& address) {
    COMPANION_ASSIGN_OR_RETURN(exporter_, metrics::HttpExporter::start(address, [this] {
                                 // The store and the announcer are attached while starting.
                                 if (!metrics_ready_.load(std::memory_order_acquire))
                                   throw std::runtime_error("the server is still starting");
                                 return metrics_->render(metrics_state());
                               }));
    log::info("metrics on " + exporter_->url());
    return ok_result();
  }
  void metrics_ready() { metrics_ready_.store(true, std::memory_order_release); }

  void attach_store(std::unique_ptr<ModelStore> store) {
    store_ = std::move(store);
    resolver_ = std::make_unique<Resolver>(
        store_->resolver(), [this](std::function<void()> task) { loop_->post(std::move(task)); });
  }
  void attach_announcer(std::unique_ptr<registry::EtcdAnnouncer> announcer) {
    announcer_ = std::move(announcer);
  }
  ModelStore& store() { return *store_; }
  transport::EventLoop& loop() { return *loop_; }

  const ServerIdentity& identity() const override { return identity_; }
  void stop() override { loop_->stop(); }

  Result<void> run() override {
    // Kept open so that, with the descriptor table full, one can be freed to accept and refuse.
    reserve_fd_.reset(::open("/dev/null", O_RDONLY | O_CLOEXEC));
    COMPANION_ASSIGN_OR_RETURN(
        listen_token_, loop_->add(listen_fd_.get(), EPOLLIN, [this](uint32_t) { accept_all(); }));
    COMPANION_ASSIGN_OR_RETURN(accept_timer_,
                               transport::Timer::create(*loop_, [this] { resume_accepting(); }));
    COMPANION_ASSIGN_OR_RETURN(sweep_timer_, transport::Timer::create(*loop_, [this] { sweep(); }));
    COMPANION_TRY(sweep_timer_->arm(sweep_period(), sweep_period()));
    log::info("serving " + identity_.ns + "/" + identity_.component + " instance " +
              identity_.instance_id + " on " + identity_.socket_path + " (" +
              identity_.default_backend + ")");
    loop_->run();
    exporter_.reset();  // scrapes read the announcer, which goes below
    std::vector<uint64_t> ids;
    for (auto& [id, c] : connections_) ids.push_back(id);
    for (uint64_t id : ids) destroy(id);
    sweep_timer_.reset();
    accept_timer_.reset();
    announcer_.reset();  // leaves etcd first: clients there stop choosing this instance
    registration_.reset();
    log::info("stopped");
    return ok_result();
  }

  // Runs on the loop thread. Statuses may arrive slightly out of order (they are posted by
  // several threads); seq tells which is newer.
  void on_model_status(const ModelStatus& s) {
    // Subscriptions and waiters name a published model by its store key, statuses by the
    // publisher's key.
    const std::string store_key = s.published ? published_store_key(s.key) : s.key;
    std::vector<uint64_t> touched;
    for (auto& [cid, c] : connections_) {
      for (auto& [rid, sub] : c->subscriptions) {
        if (!sub.all && sub.key != store_key) continue;
        uint64_t& last = sub.last_seq[s.key];
        if (s.seq <= last) continue;
        last = s.seq;
        send(*c, Message{rid, protocol::StatusEvent{s}});
        if (sub.all && s.state == ModelState::kUnloaded) sub.last_seq.erase(s.key);
      }
      touched.push_back(cid);
    }
    // A reload is over at its next status, whatever it is; a load at kLoaded, kError or
    // kUnloaded.
    bool settled = s.state == ModelState::kLoaded || s.state == ModelState::kError ||
                   s.state == ModelState::kUnloaded;
    if (settled) {
      auto range = waiters_.equal_range(store_key);
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
        // The writer of a first generation went away, and another took the key over: wait on.
        if (w.kind == Waiter::Kind::kPublished && s.state == ModelState::kUnloaded) {
          ModelStatus now = store_->status(store_key);
          if (now.state == ModelState::kLoading) {
            Waiter again = w;
            again.after_seq = now.seq;
            waiters_.emplace(store_key, again);
            continue;
          }
        }
        --c->second->parked;
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
        int err = errno;
        if (err == EINTR || err == ECONNABORTED) continue;
        if (err == EAGAIN || err == EWOULDBLOCK) return;
        return accept_exhausted(err);
      }
      admit(UniqueFd(fd));
    }
  }

  // Out of descriptors (or kernel memory): free the reserve to accept and refuse one pending
  // client, then stop accepting for a moment instead of spinning on a listen socket that stays
  // readable.
  void accept_exhausted(int err) {
    count_refusal("descriptors_exhausted");
    warn_limited("accept", std::string("accept: ") + std::strerror(err) +
                               "; refusing new connections for a moment");
    if (err == EMFILE || err == ENFILE) {
      reserve_fd_.reset();
      UniqueFd pending(::accept4(listen_fd_.get(), nullptr, nullptr, SOCK_NONBLOCK | SOCK_CLOEXEC));
      if (pending)
        refuse(std::move(pending),
               make_error(StatusCode::kLimitExceeded, "the server is out of file descriptors"));
      reserve_fd_.reset(::open("/dev/null", O_RDONLY | O_CLOEXEC));
    }
    if (loop_->modify(listen_token_, 0).ok()) {
      auto armed = accept_timer_->arm(kAcceptBackoff);
      if (!armed.ok()) (void)loop_->modify(listen_token_, EPOLLIN);
    }
  }

  void resume_accepting() {
    if (!reserve_fd_) reserve_fd_.reset(::open("/dev/null", O_RDONLY | O_CLOEXEC));
    (void)loop_->modify(listen_token_, EPOLLIN);
  }

  bool peer_allowed(int fd, const transport::PeerCredentials& peer) const {
    if (allowed_uids_.count(peer.uid) || allowed_gids_.count(peer.gid)) return true;
    if (allowed_gids_.empty()) return false;
    auto groups = transport::peer_groups(fd);
    if (!groups.ok()) return false;
    for (gid_t g : *groups)
      if (allowed_gids_.count(g)) return true;
    return false;
  }

  void admit(UniqueFd fd) {
    auto peer = transport::peer_credentials(fd.get());
    if (!peer.ok()) return;  // gone already
    if (!peer_allowed(fd.get(), *peer)) {
      count_refusal("peer_not_permitted");
      warn_limited("peer", "refused a connection from uid " + std::to_string(peer->uid) + " (pid " +
                               std::to_string(peer->pid) +
                               "): not allowed (--allow-uid, --allow-gid, --socket-group)");
      return refuse(std::move(fd), make_error(StatusCode::kNotPermitted,
                                              "uid " + std::to_string(peer->uid) +
                                                  " may not use this companion server"));
    }
    if (connections_.size() >= limits_.max_connections) {
      count_refusal("connections");
      warn_limited("connections", "refused a connection: " + std::to_string(connections_.size()) +
                                      " clients connected (--max-connections)");
      return refuse(std::move(fd),
                    make_error(StatusCode::kLimitExceeded,
                               "the server has " + std::to_string(limits_.max_connections) +
                                   " connections already (--max-connections)"));
    }
    size_t& of_uid = connections_per_uid_[peer->uid];
    if (of_uid >= limits_.max_connections_per_uid) {
      count_refusal("connections_per_uid");
      warn_limited("connections_per_uid",
                   "refused a connection from uid " + std::to_string(peer->uid) + ": it has " +
                       std::to_string(of_uid) + " (--max-connections-per-uid)");
      return refuse(std::move(fd),
                    make_error(StatusCode::kLimitExceeded,
                               "uid " + std::to_string(peer->uid) + " has " +
                                   std::to_string(limits_.max_connections_per_uid) +
                                   " connections already (--max-connections-per-uid)"));
    }
    auto c = std::make_unique<Connection>();
    c->id = next_connection_++;
    c->peer = *peer;
    uint64_t cid = c->id;
    c->interest = EPOLLIN | EPOLLRDHUP;
    auto token =
        loop_->add(fd.get(), c->interest, [this, cid](uint32_t events) { on_event(cid, events); });
    if (!token.ok()) {
      log::warn("cannot watch a new connection: " + token.error().to_string());
      return;
    }
    c->fd = std::move(fd);
    c->token = *token;
    ++of_uid;
    log::debug("connection " + std::to_string(cid) + " from pid " + std::to_string(c->peer.pid) +
               " uid " + std::to_string(c->peer.uid));
    connections_[cid] = std::move(c);
    client_count_.store(static_cast<uint32_t>(connections_.size()), std::memory_order_relaxed);
  }

  // Tells a connection it is not served, then closes it. Best effort: one small frame into an
  // empty socket buffer never blocks.
  void refuse(UniqueFd fd, const Error& e) {
    auto payload = protocol::encode(Message{0, protocol::ErrorReply{e}});
    if (payload.ok()) {
      protocol::OutgoingFrame frame(std::move(*payload), {});
      (void)frame.write_some(fd.get());
    }
    // What the client sent already is read and dropped (descriptors with it: no control buffer),
    // so the close does not reset the connection before the client reads the refusal.
    uint8_t sink[4096];
    for (int i = 0; i < 16 && ::recv(fd.get(), sink, sizeof(sink), MSG_DONTWAIT) > 0; ++i) {
    }
    ::shutdown(fd.get(), SHUT_RDWR);
  }

  void count_refusal(const char* reason) {
    std::lock_guard<std::mutex> lock(refused_mutex_);
    ++refused_[reason];
  }

  // At most one line per kind every few seconds, however fast the cause repeats.
  void warn_limited(const std::string& kind, const std::string& message) {
    auto& limit = log_limits_[kind];
    auto now = Clock::now();
    if (limit.logged && now - limit.last < kLogInterval) {
      ++limit.suppressed;
      return;
    }
    std::string more = limit.suppressed == 0 ? ""
                                             : " (and " + std::to_string(limit.suppressed) +
                                                   " more like it since the last such line)";
    limit.logged = true;
    limit.last = now;
    limit.suppressed = 0;
    log::warn(message + more);
  }

  void on_event(uint64_t cid, uint32_t events) {
    auto it = connections_.find(cid);
    if (it == connections_.end()) return;
    Connection& c = *it->second;
    if (events & EPOLLOUT) flush(c);
    bool held = c.paused || c.resolving;
    if (!c.dead && held && (events & (EPOLLHUP | EPOLLERR))) c.dead = true;  // gone for good
    if (!c.dead && !held) {
      if (events & (EPOLLIN | EPOLLHUP | EPOLLERR | EPOLLRDHUP))
        read_all(c);
      else
        process_buffered(c);  // frames left while it was paused
    }
    reap(cid);
  }

  void read_all(Connection& c) {
    for (int round = 0; round < 64 && !c.dead && !c.closing && !c.paused && !c.resolving; ++round) {
      auto n = c.reader.read_some(c.fd.get());
      if (!n.ok()) {
        if (n.error().code == StatusCode::kUnavailable) return;
        if (n.error().code == StatusCode::kProtocolError) {
          if (n.error().message.find("descriptors") != std::string::npos)
            count_refusal("descriptors");
          return fail_connection(c, 0, n.error());
        }
        c.dead = true;
        return;
      }
      if (*n == 0) {  // peer closed; nothing it sent after this matters
        c.dead = true;
        return;
      }
      process_buffered(c);
    }
  }

  // Handles the complete frames buffered, then accounts for the incomplete one.
  void process_buffered(Connection& c) {
    while (!c.dead && !c.closing && !c.paused && !c.resolving) {
      auto frame = c.reader.next();
      if (!frame.ok()) return fail_connection(c, 0, frame.error());
      if (!*frame) break;
      c.last_active = Clock::now();
      c.partial_since.reset();  // the deadline is per frame
      handle_frame(c, std::move(**frame));
    }
    if (c.dead || c.closing) return;
    if (c.reader.buffered_bytes() == 0 || c.paused || c.resolving)
      c.partial_since.reset();
    else if (!c.partial_since)
      c.partial_since = Clock::now();
    // The frame in progress counts at the size its header announced.
    size_t claim = c.reader.pending_frame_bytes();
    if (claim > c.pending_claim &&
        pending_frame_bytes_ - c.pending_claim + claim > limits_.max_pending_frame_bytes) {
      count_refusal("pending_frame_bytes");
      warn_limited("pending_frame_bytes",
                   "dropping connection " + std::to_string(c.id) + " (pid " +
                       std::to_string(c.peer.pid) + "): its " + std::to_string(claim) +
                       "-byte frame would pass the server's " +
                       std::to_string(limits_.max_pending_frame_bytes) +
                       " bytes of incomplete frames (--max-pending-frame-bytes)");
      return fail_connection(
          c, 0,
          make_error(StatusCode::kLimitExceeded,
                     "the server holds too many incomplete frames; this one of " +
                         std::to_string(claim) + " bytes is refused (--max-pending-frame-bytes)"));
    }
    set_pending_claim(c, claim);
  }

  void set_pending_claim(Connection& c, size_t claim) {
    pending_frame_bytes_ = pending_frame_bytes_ - c.pending_claim + claim;
    c.pending_claim = claim;
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
    if (auto* m = std::get_if<protocol::PublishClaim>(&body)) return on_claim(c, rid, *m);
    if (auto* m = std::get_if<protocol::PublishDeclare>(&body)) return on_declare(c, rid, *m);
    if (auto* m = std::get_if<protocol::PublishCommit>(&body)) return on_commit(c, rid, *m);
    if (auto* m = std::get_if<protocol::PublishAbort>(&body)) return on_abort(c, rid, *m);
    if (auto* m = std::get_if<protocol::Reload>(&body)) return on_reload(c, rid, *m);
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
    c.minor = m.minor;
    send(c, Message{rid, protocol::HelloReply{kProtocolMajor, kProtocolMinor, identity_}});
  }

  // Resolves `spec` on the resolver, then runs `next` on the loop. The connection reads no
  // further request until then, so that its requests are answered in order; other connections
  // are served meanwhile.
  void resolve_then(Connection& c, ModelSpec spec,
                    std::function<void(Connection&, Result<ResolvedModel>)> next) {
    c.resolving = true;
    update_interest(c);
    uint64_t cid = c.id;
    resolver_->submit(std::move(spec),
                      [this, cid, next = std::move(next)](Result<ResolvedModel> model) {
                        auto it = connections_.find(cid);
                        if (it == connections_.end()) return;  // gone meanwhile
                        Connection& conn = *it->second;
                        conn.resolving = false;
                        if (!conn.dead) next(conn, std::move(model));
                        if (!conn.dead) {
                          update_interest(conn);
                          process_buffered(conn);  // requests that arrived meanwhile
                        }
                        reap(cid);
                      });
  }

  void on_get(Connection& c, uint64_t rid, const protocol::GetParameters& m) {
    c.attaching[rid] = Clock::now();
    if (m.key.empty())
      return resolve_then(c, m.spec, [this, rid, m](Connection& conn, Result<ResolvedModel> model) {
        get_checkpoint(conn, rid, m, std::move(model));
      });
    if (m.or_source) {
      // A checkpoint the server finds is what the name means; a key published under the same
      // spelling never stands in for it (another client could publish under any path).
      ModelSpec spec = m.spec;
      if (spec.source.empty()) spec.source = m.key;
      return resolve_then(c, spec, [this, rid, m](Connection& conn, Result<ResolvedModel> model) {
        if (model.ok()) return get_checkpoint(conn, rid, m, std::move(model));
        ModelStatus held = store_->status(published_store_key(m.key));
        bool offloaded = held.state == ModelState::kUnloaded && held.host_bytes > 0;
        if (held.state != ModelState::kLoaded && held.state != ModelState::kLoading && !offloaded)
          return reply_error(conn, rid, model.error());  // neither: the checkpoint's error
        get_published(conn, rid, m);
      });
    }
    get_published(c, rid, m);
  }

  void get_published(Connection& c, uint64_t rid, const protocol::GetParameters& m) {
    std::string store_key = published_store_key(m.key);
    ModelStatus now = store_->status(store_key);
    if (now.state == ModelState::kUnloaded && now.host_bytes > 0) {  // offloaded: wake it
      auto woken = store_->wake(store_key);
      if (!woken.ok()) return reply_error(c, rid, woken.error());
      now = *woken;
    }
    // A first generation being written, or an offloaded one being woken.
    if (now.state == ModelState::kLoading) {
      if (!m.wait)
        return reply_error(c, rid,
                           make_error(StatusCode::kNotReady,
                                      "'" + printable_text(m.key) + "' is being published"));
      if (!may_park(c, rid)) return;
      Waiter w{c.id, rid, Waiter::Kind::kPublished, now.seq, m.key, m.generation, m.fingerprint};
      w.hold = store_->hold_for_waiter(store_key);
      waiters_.emplace(store_key, std::move(w));
      ++c.parked;
      return;
    }
    grant(c, rid, store_->acquire_published(m.key, m.generation, m.fingerprint));
  }

  void get_checkpoint(Connection& c, uint64_t rid, const protocol::GetParameters& m,
                      Result<ResolvedModel> model) {
    if (!model.ok()) return reply_error(c, rid, model.error());
    if (m.only_if_held) {
      ModelState state = store_->status(model->key).state;
      if (state != ModelState::kLoaded && state != ModelState::kLoading)
        return reply_error(
            c, rid, make_error(StatusCode::kNotReady, "this instance does not hold the model"));
    }
    auto s = store_->ensure_loading(*model);
    if (!s.ok()) return reply_error(c, rid, s.error());
    bool pinned = m.generation != 0 || m.fingerprint.has_value();
    if (s->state == ModelState::kLoaded)
      return grant(c, rid,
                   pinned ? store_->acquire_generation(model->key, m.generation, m.fingerprint)
                          : store_->acquire(model->key));
    if (!m.wait)
      return reply_error(
          c, rid,
          make_error(StatusCode::kNotReady, "model is loading (" + std::to_string(s->bytes_done) +
                                                "/" + std::to_string(s->bytes_total) + " bytes)"));
    if (!may_park(c, rid)) return;
    Waiter w{c.id, rid, Waiter::Kind::kLease, s->seq, {}, m.generation, m.fingerprint};
    w.hold = store_->hold_for_waiter(model->key);
    waiters_.emplace(model->key, std::move(w));
    ++c.parked;
  }

  void on_load(Connection& c, uint64_t rid, const protocol::Load& m) {
    if (!m.key.empty()) return load_key(c, rid, m);
    resolve_then(c, m.spec, [this, rid, m](Connection& conn, Result<ResolvedModel> model) {
      load_resolved(conn, rid, m, model);
    });
  }

  // A model the server holds, named by key or id (published ones too): an offloaded one is
  // woken.
  void load_key(Connection& c, uint64_t rid, const protocol::Load& m) {
    std::string store_key = store_->find_key(m.key);
    if (store_key.empty())
      return reply_error(c, rid,
                         make_error(StatusCode::kNotFound,
                                    "no model " + printable_text(m.key) + " on this server"));
    auto s = store_->wake(store_key);
    if (!s.ok()) return reply_error(c, rid, s.error());
    if (s->state != ModelState::kLoading || !m.wait)
      return send(c, Message{rid, protocol::LoadReply{*s}});
    if (!may_park(c, rid)) return;
    waiters_.emplace(store_key, Waiter{c.id, rid, Waiter::Kind::kLoad, s->seq, {}, 0, {}});
    ++c.parked;
  }

  void load_resolved(Connection& c, uint64_t rid, const protocol::Load& m,
                     const Result<ResolvedModel>& model) {
    if (!model.ok()) return reply_error(c, rid, model.error());
    auto s = store_->ensure_loading(*model);
    if (!s.ok()) return reply_error(c, rid, s.error());
    if (s->state == ModelState::kLoaded || !m.wait)
      return send(c, Message{rid, protocol::LoadReply{*s}});
    if (!may_park(c, rid)) return;
    waiters_.emplace(model->key, Waiter{c.id, rid, Waiter::Kind::kLoad, s->seq, {}, 0, {}});
    ++c.parked;
  }

  void on_unload(Connection& c, uint64_t rid, const protocol::Unload& m) {
    if (m.to_host) {
      if (!m.key.empty()) return offload_key(c, rid, m.key, m.force);
      return resolve_then(
          c, m.spec, [this, rid, force = m.force](Connection& conn, Result<ResolvedModel> model) {
            if (!model.ok()) return reply_error(conn, rid, model.error());
            offload_key(conn, rid, model->key, force);
          });
    }
    if (!m.key.empty()) return unload_key(c, rid, m.key, m.force);
    resolve_then(c, m.spec,
                 [this, rid, force = m.force](Connection& conn, Result<ResolvedModel> model) {
                   if (!model.ok()) return reply_error(conn, rid, model.error());
                   unload_key(conn, rid, model->key, force);
                 });
  }

  // The copy to the host tier runs on a worker; the reply comes back to the loop.
  void offload_key(Connection& c, uint64_t rid, const std::string& key, bool force) {
    if (!may_park(c, rid)) return;
    ++c.parked;
    uint64_t cid = c.id;
    store_->offload_async(key, force, [this, cid, rid](Result<ModelStatus> result) {
      auto held = std::make_shared<Result<ModelStatus>>(std::move(result));
      loop_->post([this, cid, rid, held] {
        auto it = connections_.find(cid);
        if (it == connections_.end()) return;
        Connection& conn = *it->second;
        --conn.parked;
        if (!held->ok()) return reply_error(conn, rid, held->error());
        send(conn, Message{rid, protocol::UnloadReply{**held}});
        reap(cid);
      });
    });
  }

  void unload_key(Connection& c, uint64_t rid, const std::string& key, bool force) {
    auto s = store_->unload(key, force);
    if (!s.ok()) return reply_error(c, rid, s.error());
    send(c, Message{rid, protocol::UnloadReply{*s}});
    if (s->published) {
      // Its writer, if any, lost the key; whoever waited to claim it may now.
      for (auto& [cid, other] : connections_) {
        other->publishing.erase(s->key);
        drop_declaration(*other, s->key);
      }
      hand_over(s->key);
    }
  }

  void on_release(Connection& c, uint64_t rid, const protocol::Release& m) {
    auto it = c.leases.find(m.lease_id);
    if (it == c.leases.end())
      return reply_error(
          c, rid,
          make_error(StatusCode::kInvalidArgument,
                     "no lease " + std::to_string(m.lease_id) + " on this connection"));
    // The connection's reference goes first: the store's, if last, is freed off the loop.
    it->second.slab.reset();
    store_->release(it->second.key, it->second.generation);
    c.leases.erase(it);
    send(c, Message{rid, protocol::Released{m.lease_id}});
  }

  void on_subscribe(Connection& c, uint64_t rid, const protocol::StatusSubscribe& m) {
    Connection::Subscription sub;
    sub.all = m.all;
    if (!m.key.empty()) {
      if (auto valid = protocol::validate_publish_key(m.key); !valid.ok())
        return reply_error(c, rid, valid.error());
      sub.key = published_store_key(m.key);
    } else if (!m.all) {
      return resolve_then(c, m.spec,
                          [this, rid, sub, source = m.spec.source](
                              Connection& conn, Result<ResolvedModel> model) mutable {
                            if (!model.ok()) return reply_error(conn, rid, model.error());
                            sub.key = model->key;
                            subscribe(conn, rid, std::move(sub), source);
                          });
    }
    subscribe(c, rid, std::move(sub), m.spec.source);
  }

  void subscribe(Connection& c, uint64_t rid, Connection::Subscription sub,
                 const std::string& source) {
    // The current state first; events already in flight that are older get skipped by seq.
    std::vector<ModelStatus> current =
        sub.all ? store_->list() : std::vector<ModelStatus>{store_->status(sub.key)};
    for (auto& s : current)
      if (s.source.empty() && !s.published) s.source = source;  // not held yet
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
    if (w.kind == Waiter::Kind::kReload) {
      if (s.state == ModelState::kLoaded && s.error_code != StatusCode::kOk)
        return reply_error(c, w.request_id, Error{s.error_code, s.message});
      if (s.state == ModelState::kUnloaded)
        return reply_error(
            c, w.request_id,
            make_error(StatusCode::kCancelled, "the model was unloaded while reloading"));
      return send(c, Message{w.request_id, protocol::LoadReply{s}});
    }
    if (s.state == ModelState::kLoaded) {
      if (w.kind == Waiter::Kind::kLease || w.kind == Waiter::Kind::kPublished)
        if (auto f = fault::point(fault::Stage::kGrant, s.source.empty() ? s.key : s.source);
            !f.ok())
          return reply_error(c, w.request_id, f.error());
      if (w.kind == Waiter::Kind::kLease)
        return grant(c, w.request_id,
                     w.generation != 0 || w.fingerprint
                         ? store_->acquire_generation(s.key, w.generation, w.fingerprint)
                         : store_->acquire(s.key));
      if (w.kind == Waiter::Kind::kPublished)
        return grant(c, w.request_id,
                     store_->acquire_published(w.key, w.generation, w.fingerprint));
      return send(c, Message{w.request_id, protocol::LoadReply{s}});
    }
    if (s.state == ModelState::kError)
      return reply_error(c, w.request_id, Error{s.error_code, s.message});
    if (w.kind == Waiter::Kind::kPublished)
      return reply_error(
          c, w.request_id,
          make_error(StatusCode::kNotFound, "the writer of '" + printable_text(w.key) +
                                                "' went away before committing a generation"));
    reply_error(c, w.request_id,
                make_error(StatusCode::kCancelled, "the model was unloaded while loading"));
  }

  // ---- publishing -----------------------------------------------------------------------------

  void on_claim(Connection& c, uint64_t rid, const protocol::PublishClaim& m) {
    if (c.publishing.size() >= kMaxPublicationsPerConnection && !c.publishing.count(m.key)) {
      count_refusal("publications");
      return reply_error(c, rid,
                         make_error(StatusCode::kLimitExceeded,
                                    "this connection holds " + std::to_string(c.publishing.size()) +
                                        " publications in progress already; commit or abort one"));
    }
    auto outcome = store_->claim(m.key, m.fingerprint, m.mode, c.id);
    if (!outcome.ok()) return reply_error(c, rid, outcome.error());
    switch (outcome->kind) {
      case ClaimOutcome::Kind::kClaimed:
        c.publishing.insert(m.key);
        return send(c, Message{rid, protocol::PublishClaimed{true, outcome->status}});
      case ClaimOutcome::Kind::kPublished:
        return send(c, Message{rid, protocol::PublishClaimed{false, outcome->status}});
      case ClaimOutcome::Kind::kBusy:
        break;
    }
    if (m.mode == protocol::ClaimMode::kNow)
      return reply_error(c, rid,
                         make_error(StatusCode::kModelInUse,
                                    "another client is publishing '" + printable_text(m.key) +
                                        "'; claim it with wait to publish after it"));
    if (!may_park(c, rid)) return;
    claim_waiters_.emplace(m.key, ClaimWaiter{c.id, rid, m});
    ++c.parked;
  }

  // Requests a connection may have waiting on the server at once (parked loads, attaches,
  // claims, commits, reloads): each costs the server memory until it is answered.
  bool may_park(Connection& c, uint64_t rid) {
    if (c.parked < limits_.max_queued_replies) return true;
    count_refusal("parked_requests");
    reply_error(c, rid,
                make_error(StatusCode::kLimitExceeded,
                           "this connection has " + std::to_string(c.parked) +
                               " requests waiting already (--max-queued-replies)"));
    return false;
  }

  // The key's writer is gone (committed, aborted, disconnected, unloaded): parked claims are
  // answered in order until one of them becomes the writer.
  void hand_over(const std::string& key) {
    auto range = claim_waiters_.equal_range(key);
    for (auto it = range.first; it != range.second;) {
      ClaimWaiter w = it->second;
      auto conn = connections_.find(w.connection);
      if (conn == connections_.end()) {
        it = claim_waiters_.erase(it);
        continue;
      }
      Connection& c = *conn->second;
      auto outcome = store_->claim(w.claim.key, w.claim.fingerprint, w.claim.mode, c.id);
      if (outcome.ok() && outcome->kind == ClaimOutcome::Kind::kBusy) return;
      it = claim_waiters_.erase(it);
      --c.parked;
      if (!outcome.ok()) {
        reply_error(c, w.request_id, outcome.error());
        continue;
      }
      bool claimed = outcome->kind == ClaimOutcome::Kind::kClaimed;
      if (claimed) c.publishing.insert(w.claim.key);
      send(c, Message{w.request_id, protocol::PublishClaimed{claimed, outcome->status}});
      if (claimed) return;
    }
  }

  // What a connection's declared parts hold, counted per tensor: its strings, its shape, and
  // what a vector entry and two strings cost besides.
  static size_t declaration_bytes(const std::vector<protocol::TensorDeclInfo>& tensors) {
    size_t bytes = 0;
    for (const auto& t : tensors)
      bytes += t.name.size() + t.alias_of.size() + 8 * t.shape.size() +
               sizeof(protocol::TensorDeclInfo) + 32;
    return bytes;
  }

  static void drop_declaration(Connection& c, const std::string& key) {
    auto it = c.declaring.find(key);
    if (it == c.declaring.end()) return;
    c.declaring_bytes -= std::min(c.declaring_bytes, it->second.bytes);
    c.declaring.erase(it);
  }

  void on_declare(Connection& c, uint64_t rid, protocol::PublishDeclare& m) {
    auto parts = c.declaring.find(m.key);
    if (m.more || parts != c.declaring.end()) {
      // A table in parts: held here (bounded per connection) until its last part.
      if (!c.publishing.count(m.key)) {
        drop_declaration(c, m.key);
        return reply_error(c, rid,
                           make_error(StatusCode::kInvalidArgument,
                                      "'" + printable_text(m.key) +
                                          "' is not claimed by this connection: claim it "
                                          "before declaring its table"));
      }
      size_t held = parts == c.declaring.end() ? 0 : parts->second.tensors.size();
      size_t bytes = declaration_bytes(m.tensors);
      if (held + m.tensors.size() > protocol::kMaxTableTensors ||
          c.declaring_bytes + bytes > kMaxDeclaringBytes) {
        drop_declaration(c, m.key);
        count_refusal("declaration_bytes");
        return reply_error(
            c, rid,
            make_error(StatusCode::kLimitExceeded,
                       "the table of '" + printable_text(m.key) + "' passes " +
                           std::to_string(protocol::kMaxTableTensors) + " tensors or " +
                           format_bytes(kMaxDeclaringBytes) + " of declarations"));
      }
      auto& declared = c.declaring[m.key];
      declared.bytes += bytes;
      c.declaring_bytes += bytes;
      declared.tensors.insert(declared.tensors.end(), std::make_move_iterator(m.tensors.begin()),
                              std::make_move_iterator(m.tensors.end()));
      if (m.more) return send(c, Message{rid, protocol::Done{}});
      m.tensors = std::move(declared.tensors);
      drop_declaration(c, m.key);
    }
    if (!may_park(c, rid)) return;
    uint64_t cid = c.id;
    std::string key = m.key;
    ++c.parked;
    // Checks, layout and allocation run on a worker (seconds for a large table or slab); the
    // outcome comes back to the loop.
    store_->declare_async(
        key, cid, std::move(m.tensors), [this, cid, rid, key](Result<WriterGrant> result) {
          auto held = std::make_shared<Result<WriterGrant>>(std::move(result));
          loop_->post(
              [this, cid, rid, key, held] { on_declared(cid, rid, key, std::move(*held)); });
        });
  }

  void on_declared(uint64_t cid, uint64_t rid, const std::string& key, Result<WriterGrant> g) {
    auto it = connections_.find(cid);
    // The writer went away meanwhile: closing it gave its publications up (a slab allocated
    // after that was freed by the store, which found no writer).
    if (it == connections_.end()) return;
    Connection& c = *it->second;
    --c.parked;
    if (!g.ok()) return reply_error(c, rid, g.error());
    std::vector<UniqueFd> fds;
    std::vector<protocol::SegmentInfo> segments = describe_segments(g->exports, fds);
    ModelStatus status = g->status;
    status.generation = g->generation;  // the number the writer's commit will get
    auto payload = parameters_payload(c, rid, 0, status, segments, *g->table, true, fds);
    if (!payload.ok()) {
      store_->abort(key, c.id);
      c.publishing.erase(key);
      hand_over(key);
      return reply_error(c, rid, payload.error());
    }
    enqueue(c, std::move(*payload), std::move(fds));
  }

  void on_commit(Connection& c, uint64_t rid, const protocol::PublishCommit& m) {
    if (!may_park(c, rid)) return;
    uint64_t cid = c.id;
    std::string key = m.key;
    ++c.parked;
    // Digest and seal run on a worker; the outcome comes back to the loop.
    store_->commit(key, cid, [this, cid, rid, key](Result<LeaseGrant> result) {
      // Posted tasks are copyable functions; the grant (descriptors) is not.
      auto held = std::make_shared<Result<LeaseGrant>>(std::move(result));
      loop_->post([this, cid, rid, key, held] { on_committed(cid, rid, key, std::move(*held)); });
    });
  }

  void on_committed(uint64_t cid, uint64_t rid, const std::string& key, Result<LeaseGrant> result) {
    auto it = connections_.find(cid);
    if (it == connections_.end()) {
      // The writer went away meanwhile: its lease goes too, and a commit that failed ends its
      // publication (nobody is left to retry it).
      if (result.ok())
        store_->release(result->key, result->generation);
      else
        store_->abort(key, cid);
      hand_over(key);
      return;
    }
    Connection& c = *it->second;
    --c.parked;
    if (!result.ok()) {
      // A failed seal leaves the publication open (the writer may drop its mapping and retry);
      // anything else has ended it.
      if (store_->status(published_store_key(key)).state == ModelState::kUnloaded ||
          result.error().code == StatusCode::kCancelled) {
        c.publishing.erase(key);
        hand_over(key);
      }
      return reply_error(c, rid, result.error());
    }
    c.publishing.erase(key);
    uint64_t lease_id = next_lease_++;
    c.leases[lease_id] = Connection::Lease{result->key, result->generation, result->slab};
    send(c, Message{rid, protocol::PublishCommitted{lease_id, result->status}});
    hand_over(key);
    reap(cid);
  }

  void on_abort(Connection& c, uint64_t rid, const protocol::PublishAbort& m) {
    if (!c.publishing.count(m.key) || !store_->abort(m.key, c.id))
      return reply_error(c, rid,
                         make_error(StatusCode::kInvalidArgument,
                                    "this connection does not hold '" + printable_text(m.key) +
                                        "' (or its commit is under way)"));
    c.publishing.erase(m.key);
    send(c, Message{rid, protocol::Done{}});
    hand_over(m.key);
  }

  void on_reload(Connection& c, uint64_t rid, const protocol::Reload& m) {
    std::string store_key = store_->find_key(m.key);
    if (!may_park(c, rid)) return;
    auto s = store_->reload(m.key, m.force);
    if (!s.ok()) return reply_error(c, rid, s.error());
    waiters_.emplace(store_key, Waiter{c.id, rid, Waiter::Kind::kReload, s->seq, {}, 0, {}});
    ++c.parked;
  }

  void grant(Connection& c, uint64_t rid, Result<LeaseGrant> g) {
    if (!g.ok()) return reply_error(c, rid, g.error());
    if (c.leases.size() >= limits_.max_leases_per_connection) {
      store_->release(g->key, g->generation);
      count_refusal("leases");
      return reply_error(c, rid,
                         make_error(StatusCode::kLimitExceeded,
                                    "this connection holds " + std::to_string(c.leases.size()) +
                                        " leases already (--max-leases-per-connection); release "
                                        "some first"));
    }
    const std::string& key = g->key;
    size_t fd_count = c.minor >= 2 ? 1 : 0;  // the table's memfd
    for (const auto& e : g->exports) fd_count += e.fd.valid() ? 1 : 0;
    // Descriptors wait in the queue until the client reads them: bounded per client and in all.
    if (fd_count > 0 && (c.queued_fds + fd_count > limits_.max_queued_fds ||
                         queued_fds_ + fd_count > queued_fds_cap_)) {
      store_->release(key, g->generation);
      count_refusal("queued_fds");
      bool own = c.queued_fds + fd_count > limits_.max_queued_fds;
      warn_limited("queued_fds", "refused parameters to connection " + std::to_string(c.id) +
                                     (own ? ": it has not read " + std::to_string(c.queued_fds) +
                                                " descriptors (--max-queued-fds)"
                                          : ": " + std::to_string(queued_fds_) +
                                                " descriptors are queued for all clients "
                                                "(--max-queued-fds-total)"));
      return reply_error(
          c, rid,
          make_error(StatusCode::kLimitExceeded,
                     own ? "this connection has " + std::to_string(c.queued_fds) +
                               " descriptors it has not read (--max-queued-fds)"
                         : "the server has too many descriptors queued for its clients "
                           "(--max-queued-fds-total)"));
    }
    uint64_t lease_id = next_lease_++;
    std::vector<UniqueFd> fds;
    std::vector<protocol::SegmentInfo> segments = describe_segments(g->exports, fds);
    auto payload = parameters_payload(c, rid, lease_id, g->status, segments, *g->table, false, fds);
    if (!payload.ok()) {
      store_->release(key, g->generation);
      return reply_error(c, rid, payload.error());
    }
    c.leases[lease_id] = Connection::Lease{key, g->generation, g->slab};
    attach_answered(c, rid, StatusCode::kOk);
    enqueue(c, std::move(*payload), std::move(fds));
  }

  // A GetParameters request is answered (a lease, or an error): its latency is recorded. Before
  // the reply is written, so that a client that has its reply finds it counted.
  void attach_answered(Connection& c, uint64_t rid, StatusCode code) {
    auto it = c.attaching.find(rid);
    if (it == c.attaching.end()) return;
    if (metrics_)
      metrics_->record_attach(std::chrono::duration<double>(Clock::now() - it->second).count(),
                              code);
    c.attaching.erase(it);
  }

  // A Parameters reply: the shared table's memfd (appended to fds) for clients of protocol 1.2,
  // the tensors inline for older ones (at most protocol::kMaxTensors of them).
  static Result<std::vector<uint8_t>> parameters_payload(
      const Connection& c, uint64_t rid, uint64_t lease_id, const ModelStatus& status,
      std::span<const protocol::SegmentInfo> segments, const protocol::SharedTensorTable& table,
      bool writable, std::vector<UniqueFd>& fds) {
    if (c.minor >= 2) {
      COMPANION_ASSIGN_OR_RETURN(UniqueFd table_fd, table.share());
      auto index = static_cast<int32_t>(fds.size());
      fds.push_back(std::move(table_fd));
      return protocol::encode_parameters_with_table(rid, lease_id, status, segments, index,
                                                    table.bytes(), writable);
    }
    if (table.size() > protocol::kMaxTensors)
      return make_error(StatusCode::kLimitExceeded,
                        "'" + printable_text(status.key) + "' has " + std::to_string(table.size()) +
                            " tensors; a client of protocol 1." + std::to_string(c.minor) +
                            " takes at most " + std::to_string(protocol::kMaxTensors) +
                            " (clients of protocol 1.2 take up to " +
                            std::to_string(protocol::kMaxTableTensors) + ")");
    return protocol::encode_parameters_inline(rid, lease_id, status, segments, table.view(),
                                              writable);
  }

  // Segment descriptions for a Parameters reply; their descriptors move to fds.
  static std::vector<protocol::SegmentInfo> describe_segments(
      std::vector<memory::SegmentExport>& exports, std::vector<UniqueFd>& fds) {
    std::vector<protocol::SegmentInfo> segments;
    for (auto& e : exports) {
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
    return segments;
  }

  // ---- replies --------------------------------------------------------------------------------

  // A reply that cannot be encoded (one over the frame limit) becomes an error reply with its
  // request id: the client learns why instead of waiting for a frame that never comes.
  void send(Connection& c, const Message& m) {
    auto payload = protocol::encode(m);
    if (!payload.ok()) {
      warn_limited("encode", "connection " + std::to_string(c.id) + ": cannot encode reply " +
                                 std::to_string(m.request_id) + ": " + payload.error().to_string());
      payload = protocol::encode(Message{m.request_id, protocol::ErrorReply{payload.error()}});
    }
    if (!payload.ok()) {  // not even the short error fits: the stream cannot go on
      c.dead = true;
      return;
    }
    enqueue(c, std::move(*payload), {});
  }

  void reply_error(Connection& c, uint64_t rid, const Error& e) {
    attach_answered(c, rid, e.code);
    send(c, Message{rid, protocol::ErrorReply{e}});
  }

  // Answers with the error, then closes: the stream can no longer be trusted.
  void fail_connection(Connection& c, uint64_t rid, const Error& e) {
    // Rate-limited: a hostile peer may open connections only to be thrown out.
    warn_limited("closing", "closing connection " + std::to_string(c.id) + " (pid " +
                                std::to_string(c.peer.pid) + "): " + e.to_string());
    reply_error(c, rid, e);
    c.closing = true;
    c.closing_since = Clock::now();
    flush(c);
  }

  void enqueue(Connection& c, std::vector<uint8_t> payload, std::vector<UniqueFd> fds) {
    if (c.dead) return;
    c.queued_bytes += payload.size();
    c.queued_fds += fds.size();
    queued_fds_ += fds.size();
    c.out.emplace_back(std::move(payload), std::move(fds));
    queued_bytes_ += c.out.back().payload_bytes();
    // One whole frame past the connection's cap: it is being sent what it did not ask for
    // (status events) and does not read. Past the server's cap: any connection that has unread
    // replies and is sent more.
    bool own = c.queued_bytes > limits_.max_queued_bytes + protocol::kMaxPayloadBytes;
    bool all = queued_bytes_ > limits_.max_queued_bytes_total && c.out.size() > 1;
    if (own || all) {
      count_refusal(own ? "queued_bytes" : "queued_bytes_total");
      warn_limited("queued_bytes", "connection " + std::to_string(c.id) +
                                       " is not reading its replies; dropping it (" +
                                       (own ? "--max-queued-bytes" : "--max-queued-bytes-total") +
                                       ")");
      c.dead = true;
      return;
    }
    flush(c);
  }

  void flush(Connection& c) {
    while (!c.out.empty()) {
      protocol::OutgoingFrame& front = c.out.front();
      size_t held = front.held_fds();
      auto done = front.write_some(c.fd.get());
      forget_fds(c, held - front.held_fds());  // the kernel holds those now
      if (!done.ok()) {
        c.dead = true;
        return;
      }
      if (!*done) break;
      c.queued_bytes -= front.payload_bytes();
      queued_bytes_ -= front.payload_bytes();
      c.out.pop_front();
      c.last_active = Clock::now();
    }
    if (c.out.empty() && c.closing) {
      c.dead = true;
      return;
    }
    // A client that does not read its replies is not read from until it does.
    bool was_paused = c.paused;
    c.paused = c.out.size() >= limits_.max_queued_replies ||
               c.queued_fds >= limits_.max_queued_fds || c.queued_bytes >= limits_.max_queued_bytes;
    update_interest(c);
    // Requests that arrived while it was paused may be waiting whole in its buffer, with nothing
    // more to come from the socket to wake the connection up.
    if (was_paused && !c.paused && c.reader.buffered_bytes() > 0) {
      uint64_t cid = c.id;
      loop_->post([this, cid] {
        auto it = connections_.find(cid);
        if (it == connections_.end() || it->second->paused || it->second->resolving) return;
        process_buffered(*it->second);
        reap(cid);
      });
    }
  }

  void forget_fds(Connection& c, size_t count) {
    c.queued_fds -= count;
    queued_fds_ -= count;
  }

  void update_interest(Connection& c) {
    c.writing = !c.out.empty();
    uint32_t want =
        (c.paused || c.resolving ? 0u : EPOLLIN | EPOLLRDHUP) | (c.writing ? EPOLLOUT : 0u);
    if (want == c.interest) return;
    c.interest = want;
    if (!loop_->modify(c.token, want).ok()) c.dead = true;
  }

  void reap(uint64_t cid) {
    auto it = connections_.find(cid);
    if (it != connections_.end() && it->second->dead) destroy(cid);
  }

  void destroy(uint64_t cid) {
    auto it = connections_.find(cid);
    if (it == connections_.end()) return;
    Connection& c = *it->second;
    for (auto& [lid, lease] : c.leases) {
      lease.slab.reset();  // the store's reference, if last, is freed off the loop
      store_->release(lease.key, lease.generation);
    }
    // A writer that goes before committing aborts: its slab is freed, and the next in line
    // may claim the key.
    std::set<std::string> publishing = std::move(c.publishing);
    for (const auto& key : publishing) store_->abort(key, cid);
    for (auto w = claim_waiters_.begin(); w != claim_waiters_.end();) {
      if (w->second.connection == cid)
        w = claim_waiters_.erase(w);
      else
        ++w;
    }
    for (const auto& frame : c.out) forget_fds(c, frame.held_fds());
    queued_bytes_ -= c.queued_bytes;
    bool large = c.queued_bytes > (16u << 20);
    set_pending_claim(c, 0);
    auto of_uid = connections_per_uid_.find(c.peer.uid);
    if (of_uid != connections_per_uid_.end() && --of_uid->second == 0)
      connections_per_uid_.erase(of_uid);
    for (auto w = waiters_.begin(); w != waiters_.end();) {
      if (w->second.connection == cid)
        w = waiters_.erase(w);
      else
        ++w;
    }
    loop_->remove(c.token);
    log::debug("connection " + std::to_string(cid) + " closed");
    connections_.erase(it);
    client_count_.store(static_cast<uint32_t>(connections_.size()), std::memory_order_relaxed);
    for (const auto& key : publishing) hand_over(key);
    // Hand the memory of a large unread queue back to the system, not only to malloc.
    if (large) ::malloc_trim(0);
  }

  // ---- deadlines ------------------------------------------------------------------------------

  std::chrono::nanoseconds sweep_period() const {
    double shortest = limits_.frame_timeout_s;
    if (limits_.idle_timeout_s > 0) shortest = std::min(shortest, limits_.idle_timeout_s);
    if (options_.idle_evict_s > 0) shortest = std::min(shortest, options_.idle_evict_s);
    double period = std::clamp(shortest / 4, 0.02, 1.0);
    return std::chrono::nanoseconds(static_cast<int64_t>(period * 1e9));
  }

  // Drops connections whose frame is overdue and closes idle ones; evicts idle models
  // (--idle-evict).
  void sweep() {
    auto now = Clock::now();
    if (store_) store_->evict_idle(now);
    auto seconds = [](double s) {
      return std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(s));
    };
    std::vector<uint64_t> touched;
    for (auto& [cid, cp] : connections_) {
      Connection& c = *cp;
      if (c.dead) continue;
      if (c.closing) {  // its last reply is not read either: give up on it
        if (now - c.closing_since > seconds(limits_.frame_timeout_s)) {
          c.dead = true;
          touched.push_back(cid);
        }
        continue;
      }
      if (c.partial_since && now - *c.partial_since > seconds(limits_.frame_timeout_s)) {
        count_refusal("frame_timeout");
        warn_limited("frame_timeout", "dropping connection " + std::to_string(cid) + " (pid " +
                                          std::to_string(c.peer.pid) +
                                          "): its request frame is not complete after " +
                                          std::to_string(limits_.frame_timeout_s) +
                                          " s (--frame-timeout)");
        fail_connection(c, 0,
                        make_error(StatusCode::kLimitExceeded,
                                   "request frame not completed in time (--frame-timeout)"));
        touched.push_back(cid);
        continue;
      }
      bool idle = c.leases.empty() && c.subscriptions.empty() && c.parked == 0 && !c.resolving &&
                  c.out.empty() && c.publishing.empty() && c.reader.buffered_bytes() == 0;
      if (limits_.idle_timeout_s > 0 && idle &&
          now - c.last_active > seconds(limits_.idle_timeout_s)) {
        // Quietly: a client finds the connection closed and opens another when it needs one.
        count_refusal("idle_timeout");
        log::debug("closing idle connection " + std::to_string(cid));
        c.dead = true;
        touched.push_back(cid);
      }
    }
    for (uint64_t cid : touched) reap(cid);
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
    h.refused = refusals();
    h.leases = store_->total_leases();
    h.slab_bytes = store_->slab_bytes();
    uint64_t budget = store_->memory_budget();
    h.memory_budget = budget == UINT64_MAX ? 0 : budget;
    h.evictions = store_->evictions();
    h.server = identity_;
    h.registry = registry_url_;
    if (announcer_) {
      auto state = announcer_->state();
      h.registered = state.registered;
      h.registry_error = state.last_error;
    }
    return h;
  }

  // One map for every refusal: the connection's, the store's (load limits, memory) and the
  // checkpoint reader's (files outside the roots, non-regular files, header limits). Any thread.
  std::map<std::string, uint64_t> refusals() const {
    std::map<std::string, uint64_t> out;
    {
      std::lock_guard<std::mutex> lock(refused_mutex_);
      out = refused_;
    }
    for (const auto& [reason, count] : store_->refusal_counts()) out[reason] += count;
    auto files = checkpoint::refusal_counts();
    out["outside_roots"] += files.outside_roots;
    out["not_regular_file"] += files.not_regular;
    out["header_bytes"] += files.header_bytes;
    out["tensors"] += files.tensors;
    out["checkpoint_files"] += files.files;
    return out;
  }

  // For a scrape, on the metrics endpoint's thread: what it reads is the store's (locked), the
  // announcer's (locked) and the few counters kept for it here.
  MetricsState metrics_state() const {
    MetricsState m;
    m.identity = identity_;
    m.models = store_->list();
    m.device_bytes = store_->slab_bytes();
    m.host_tier_bytes = store_->host_tier_bytes();
    m.memory_budget = store_->memory_budget();
    m.memory_budget_used = store_->budget_used();
    m.host_budget = store_->host_budget();
    m.leases = store_->total_leases();
    m.clients = client_count_.load(std::memory_order_relaxed);
    m.evictions = store_->evictions();
    m.refused = refusals();
    m.registry = registry_url_;
    if (announcer_) m.registered = announcer_->state().registered;
    return m;
  }

  struct LogLimit {
    bool logged = false;
    Clock::time_point last;
    uint64_t suppressed = 0;
  };
  static constexpr auto kAcceptBackoff = std::chrono::milliseconds(100);
  // Keys one connection may hold as their writer at once (each claim takes a model's place).
  static constexpr size_t kMaxPublicationsPerConnection = 64;
  // Bytes of declared table parts one connection may hold, as declaration_bytes() counts them:
  // about 2.5 million tensors of 60-byte names.
  static constexpr size_t kMaxDeclaringBytes = size_t{512} << 20;
  static constexpr auto kLogInterval = std::chrono::seconds(10);

  ServerOptions options_;
  ConnectionLimits limits_;
  ServerIdentity identity_;
  std::unique_ptr<transport::EventLoop> loop_;
  UniqueFd listen_fd_;
  std::unique_ptr<registry::Registration> registration_;
  std::string registry_url_;
  std::unique_ptr<registry::EtcdAnnouncer> announcer_;
  std::shared_ptr<KeeperLink> keeper_;
  std::unique_ptr<ModelStore> store_;
  std::unique_ptr<Resolver> resolver_;
  std::unordered_map<uint64_t, std::unique_ptr<Connection>> connections_;
  std::unordered_map<uid_t, size_t> connections_per_uid_;
  std::set<uid_t> allowed_uids_;
  std::set<gid_t> allowed_gids_;
  mutable std::mutex refused_mutex_;  // refused_ is read by scrapes
  std::map<std::string, uint64_t> refused_;
  std::atomic<uint32_t> client_count_{0};  // connections_.size(), for scrapes
  std::map<std::string, LogLimit> log_limits_;
  size_t pending_frame_bytes_ = 0;  // claims of incomplete frames, all connections
  size_t queued_fds_ = 0;           // descriptors in unsent replies, all connections
  size_t queued_bytes_ = 0;         // bytes of unsent replies, all connections
  size_t queued_fds_cap_ = 0;
  UniqueFd reserve_fd_;
  transport::EventLoop::Token listen_token_ = 0;
  std::unique_ptr<transport::Timer> accept_timer_;
  std::unique_ptr<transport::Timer> sweep_timer_;
  std::multimap<std::string, Waiter> waiters_;
  std::multimap<std::string, ClaimWaiter> claim_waiters_;  // by published key, oldest first
  uint64_t next_connection_ = 1;
  uint64_t next_lease_ = 1;
  Clock::time_point started_;
  std::shared_ptr<ServerMetrics> metrics_;
  std::atomic<bool> metrics_ready_{false};
  // Last: stopped first, before anything a scrape reads goes away.
  std::unique_ptr<metrics::HttpExporter> exporter_;
};

}  // namespace

namespace {

// "" is no group (-1); else a group name or a numeric gid.
Result<gid_t> resolve_group(const std::string& name) {
  if (name.empty()) return static_cast<gid_t>(-1);
  if (name.find_first_not_of("0123456789") == std::string::npos && name.size() <= 9)
    return static_cast<gid_t>(std::stoul(name));
  std::vector<char> buffer(16384);
  group entry{};
  group* found = nullptr;
  int err = ::getgrnam_r(name.c_str(), &entry, buffer.data(), buffer.size(), &found);
  if (err != 0) return errno_error(StatusCode::kInvalidArgument, "look up group " + name, err);
  if (found == nullptr)
    return make_error(StatusCode::kInvalidArgument, "--socket-group: no group named " + name);
  return found->gr_gid;
}

Result<void> check_limits(const ConnectionLimits& l) {
  auto positive = [](double v) { return v > 0 && v < 1e7; };
  if (l.max_connections == 0 || l.max_connections_per_uid == 0)
    return make_error(StatusCode::kInvalidArgument, "connection limits must be at least 1");
  if (!positive(l.frame_timeout_s))
    return make_error(StatusCode::kInvalidArgument, "--frame-timeout must be > 0 seconds");
  if (l.idle_timeout_s < 0 || l.idle_timeout_s >= 1e7)
    return make_error(StatusCode::kInvalidArgument, "--idle-timeout must be >= 0 seconds");
  if (l.max_queued_replies == 0)
    return make_error(StatusCode::kInvalidArgument, "--max-queued-replies must be at least 1");
  if (l.max_pending_frame_bytes < protocol::kFrameHeaderBytes + 4096)
    return make_error(StatusCode::kInvalidArgument, "--max-pending-frame-bytes is too small");
  if (l.max_queued_bytes < (1u << 20) || l.max_queued_bytes_total < l.max_queued_bytes)
    return make_error(StatusCode::kInvalidArgument,
                      "--max-queued-bytes must be at least 1 MiB and at most "
                      "--max-queued-bytes-total");
  if (l.max_leases_per_connection == 0)
    return make_error(StatusCode::kInvalidArgument,
                      "--max-leases-per-connection must be at least 1");
  return ok_result();
}

// Descriptors are what connections and queued replies cost: take the hard limit the system
// grants (often 1024 soft against far more hard) so that --max-connections can be reached.
void raise_descriptor_limit() {
  rlimit nofile{};
  if (::getrlimit(RLIMIT_NOFILE, &nofile) != 0 || nofile.rlim_cur >= nofile.rlim_max) return;
  rlim_t wanted = std::min<rlim_t>(nofile.rlim_max, 1u << 16);
  if (wanted <= nofile.rlim_cur) return;
  nofile.rlim_cur = wanted;
  if (::setrlimit(RLIMIT_NOFILE, &nofile) != 0)
    log::warn(std::string("cannot raise the descriptor limit: ") + std::strerror(errno));
}

// The keeper of this namespace's server on this device and backend: one socket (and log) per
// such triple in the runtime directory, so that the next server of the same device finds it.
std::string keeper_path(const registry::LocalRegistry& registry, const ServerIdentity& id,
                        const char* suffix) {
  const std::string what = id.ns + "\n" + id.device + "\n" + id.default_backend;
  return registry.runtime_dir() + "/keeper-" + hex64(fnv1a64(what)).substr(0, 12) + suffix;
}

// What holds committed memory past this server, as --keep and the environment choose.
ServerOptions::Keep keep_mode(const ServerOptions& options) {
  using Keep = ServerOptions::Keep;
  Keep mode = options.keep;
  if (mode == Keep::kAuto) {
    mode = keeper::systemd_fd_store_offered() ? Keep::kSystemd : Keep::kKeeper;
    if (mode == Keep::kSystemd && !keeper::systemd_fd_store_built()) {
      log::warn(
          "systemd offers a file-descriptor store, but this companion was built without "
          "libsystemd (libsystemd-dev): a keeper process holds the models instead");
      mode = Keep::kKeeper;
    }
  }
  if (mode == Keep::kKeeper && options.keeper_program.empty()) mode = Keep::kNo;
  return mode;
}

// --keep no: what an earlier server left (with a keeper, or in systemd's store) is freed.
void release_kept(const std::string& socket) {
  auto released = keeper::KeeperSession::release(socket);
  if (released.ok() && !released->error.empty())
    log::info("the keeper on " + socket + " is left alone: " + released->error);
  else if (released.ok() && released->keeper_pid != 0)
    log::info("keeper " + std::to_string(released->keeper_pid) + " told to free the " +
              std::to_string(released->kept) + " generations it held (--no-keep)");
  if (!keeper::systemd_fd_store_offered()) return;
  auto store = keeper::SystemdFdStore::open();
  if (!store.ok()) return;
  size_t removed = (*store)->forget_all();
  if (removed > 0)
    log::info("removed " + std::to_string(removed) +
              " generations from systemd's file-descriptor store (--no-keep)");
}

// Opens the keeper session (or systemd's file-descriptor store), adopts what it holds and hands
// the store to it. A server without a keeper still serves: a failure here is logged, never fatal.
void start_keeper(const ServerOptions& options, const registry::LocalRegistry& registry,
                  ServerImpl& server) {
  using Keep = ServerOptions::Keep;
  const ServerIdentity& id = server.identity();
  const std::string socket = keeper_path(registry, id, ".sock");
  const Keep mode = keep_mode(options);
  if (mode == Keep::kNo) return release_kept(socket);
  if (!server.store().backend().handles_outlive_process()) {
    log::info(server.store().backend().name() +
              " memory cannot outlive this process: no keeper, models go with the server");
    return;
  }
  auto start = Clock::now();
  Result<std::shared_ptr<KeeperLink>> link = make_error(StatusCode::kUnavailable, "");
  if (mode == Keep::kSystemd) {
    link = KeeperLink::open_systemd();
    if (!link.ok()) {
      log::warn("no file-descriptor store (" + link.error().message +
                "): models will not survive a restart");
      return;
    }
  } else {
    if (socket.size() > registry::kMaxSocketPathBytes) {
      log::warn("no keeper: its socket path " + socket + " is longer than a socket path may be (" +
                std::to_string(registry::kMaxSocketPathBytes) +
                " bytes); models will not survive a restart");
      return;
    }
    auto keep_for = std::chrono::milliseconds(static_cast<int64_t>(options.keep_for_s * 1000));
    link = KeeperLink::open(socket, {options.keeper_program, keeper_path(registry, id, ".log")},
                            keep_for);
    if (!link.ok()) {
      log::warn("no keeper (" + link.error().message + "): models will not survive a restart");
      return;
    }
  }
  auto adopted = (*link)->adopt_into(server.store());
  if (!adopted.ok()) {
    log::warn("the kept generations could not be taken back (" + adopted.error().message + ")");
  } else if (adopted->adopted + adopted->dropped > 0) {
    log::info(
        "adopted " + std::to_string(adopted->adopted) + " models (" + format_bytes(adopted->bytes) +
        ") from " + (*link)->holder() + " in " + std::to_string(static_cast<int64_t>(adopted->ms)) +
        " ms (since start: " +
        std::to_string(
            std::chrono::duration_cast<std::chrono::milliseconds>(Clock::now() - start).count()) +
        " ms); " + std::to_string(adopted->dropped) + " dropped");
  }
  server.store().set_keeper(*link);
  (*link)->start();
  if (mode == Keep::kSystemd)
    log::info((*link)->holder() +
              " holds committed models past this server (while its unit lives)");
  else
    log::info((*link)->holder() + " on " + socket +
              " holds committed models past this server (for " +
              std::to_string(static_cast<int64_t>(options.keep_for_s)) + " s after it stops)");
  server.attach_keeper(std::move(link).value());
}

}  // namespace

Result<std::unique_ptr<Server>> Server::create(const ServerOptions& options) {
  COMPANION_TRY(check_limits(options.connections));
  raise_descriptor_limit();
  if (options.ns.empty() || options.ns.find('/') != std::string::npos)
    return make_error(StatusCode::kInvalidArgument, "namespace must be non-empty without '/'");
  COMPANION_ASSIGN_OR_RETURN(
      registry::RegistryChoice registry_choice,
      registry::choose_registry(options.registry, options.registry_security));
  if (options.registry_ttl_s < 1 || options.registry_ttl_s > 3600)
    return make_error(StatusCode::kInvalidArgument, "registry TTL must be 1..3600 s");
  std::optional<metrics::ListenAddress> metrics_address;
  if (!options.metrics.empty()) {
    COMPANION_ASSIGN_OR_RETURN(metrics_address, metrics::parse_listen_address(options.metrics));
    if (!metrics::http_exporter_available())
      return metrics::HttpExporter::start(*metrics_address, {}).error();
  }
  COMPANION_ASSIGN_OR_RETURN(DeviceSetup setup, setup_device(options));
  registry::LocalRegistry registry(options.runtime_dir.empty() ? registry::default_runtime_dir()
                                                               : options.runtime_dir);
  COMPANION_ASSIGN_OR_RETURN(gid_t socket_group, resolve_group(options.connections.socket_group));
  // The group that may reach the socket must reach the directory holding it and its record.
  if (socket_group != static_cast<gid_t>(-1)) registry.set_dir_group(socket_group);
  COMPANION_TRY(registry.ensure_dir());
  ServerIdentity& id = setup.identity;
  id.socket_path =
      options.socket_path.empty() ? registry.socket_path_for(id.instance_id) : options.socket_path;
  transport::SocketAccess access;
  if (socket_group != static_cast<gid_t>(-1)) {
    access.mode = 0660;
    access.group = socket_group;
  }
  COMPANION_ASSIGN_OR_RETURN(UniqueFd listen_fd, transport::listen_unix(id.socket_path, access));
  COMPANION_ASSIGN_OR_RETURN(auto loop, transport::EventLoop::create());
  COMPANION_ASSIGN_OR_RETURN(auto registration, registry.register_instance(id));

  StoreConfig config;
  config.model_roots = checkpoint::canonical_roots(options.model_roots);
  if (config.model_roots.size() != options.model_roots.size())
    log::warn("some model roots do not exist and are ignored");
  config.hf_cache = options.hf_cache.empty() ? checkpoint::hf_hub_cache_dir() : options.hf_cache;
  if (checkpoint::canonical_roots({config.hf_cache}).empty())
    log::info("Hugging Face cache " + config.hf_cache +
              " does not exist: models are served by path only until a restart");
  config.load_threads = options.load_threads;
  COMPANION_TRY(checkpoint::check_limits(options.checkpoint_limits));
  config.checkpoint_limits = options.checkpoint_limits;
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
  config.max_generations = options.max_generations;
  config.max_error_entries = options.max_error_entries;
  if (!(options.error_ttl_s > 0 && options.error_ttl_s < 1e9))
    return make_error(StatusCode::kInvalidArgument, "--error-ttl must be a positive number of s");
  config.error_ttl = std::chrono::milliseconds(static_cast<int64_t>(options.error_ttl_s * 1000));
  COMPANION_TRY(parse_memory_reserve(options.memory_reserve, config));
  if (!options.memory_budget.empty())
    COMPANION_TRY(parse_memory_budget(options.memory_budget, config));
  if (!(options.idle_evict_s >= 0 && options.idle_evict_s < 1e9))
    return make_error(StatusCode::kInvalidArgument, "--idle-evict must be 0 or more seconds");
  config.idle_evict = std::chrono::milliseconds(static_cast<int64_t>(options.idle_evict_s * 1000));
  COMPANION_TRY(parse_host_budget(options.host_budget, config));
  if (!(options.shutdown_timeout_s >= 0 && options.shutdown_timeout_s <= 3600))
    return make_error(StatusCode::kInvalidArgument, "--shutdown-timeout must be 0..3600 s");
  config.shutdown_timeout =
      std::chrono::milliseconds(static_cast<int64_t>(options.shutdown_timeout_s * 1000));
  auto metrics = std::make_shared<ServerMetrics>();
  config.on_load_end = [metrics](const LoadReport& r) { metrics->record_load(r); };
  COMPANION_TRY(config.validate());
  if (!(options.keep_for_s >= 0 && options.keep_for_s <= 1e7))
    return make_error(StatusCode::kInvalidArgument, "--keep-for must be 0..10000000 s");

  auto server = std::make_unique<ServerImpl>(options, id, std::move(loop), std::move(listen_fd),
                                             std::move(registration), registry_choice.url);
  ServerImpl* raw = server.get();
  raw->allow_peers(socket_group);
  raw->attach_metrics(metrics);
  // Early, so that a taken port fails the start before a keeper or a load is started.
  if (metrics_address) COMPANION_TRY(raw->serve_metrics(*metrics_address));
  server->attach_store(std::make_unique<ModelStore>(
      std::move(setup.backend), std::move(config),
      [raw](const ModelStatus& s) { raw->loop().post([raw, s] { raw->on_model_status(s); }); }));
  // Before any load and before clients: what an earlier server left with the keeper is served
  // again first, and what this one commits is kept from the start.
  start_keeper(options, registry, *raw);
  if (id.device_ordinal >= 0 && id.device != "host")
    raw->store().pin_staging_ahead(id.device_ordinal);
  for (const auto& source : options.preload) {
    ModelSpec spec;
    spec.source = source;
    COMPANION_ASSIGN_OR_RETURN(ResolvedModel model, raw->store().resolve(spec));
    COMPANION_TRY(raw->store().ensure_loading(model));
  }
  // Announced last, once everything that can refuse to start has passed.
  if (registry_choice.is_etcd()) {
    auto announcer = std::make_unique<registry::EtcdAnnouncer>(
        registry_choice.etcd_endpoints, raw->identity(), options.registry_ttl_s,
        registry_choice.etcd_security);
    // Clients started right after us should find us; an absent etcd only delays the record.
    if (!announcer->wait_registered(std::chrono::milliseconds(1500)))
      log::warn("not registered in " + registry_choice.url + " yet (" +
                announcer->state().last_error + "); serving local clients meanwhile");
    raw->attach_announcer(std::move(announcer));
  }
  raw->metrics_ready();  // nothing a scrape reads changes from here on
  return std::unique_ptr<Server>(std::move(server));
}

}  // namespace companion::server
