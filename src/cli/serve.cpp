// `companion serve`: runs a server until SIGINT or SIGTERM; `companion keeper`, which serve
// starts.
#include <unistd.h>

#include <CLI/CLI.hpp>
#include <climits>
#include <csignal>
#include <cstdio>
#include <thread>

#include "cli/commands.hpp"
#include "common/log.hpp"
#include "keeper/keeper_process.hpp"
#include "keeper/systemd_notify.hpp"

namespace companion::cli {

void add_connection_flags(CLI::App* serve, server::ConnectionLimits& limits) {
  serve->add_option("--max-connections", limits.max_connections, "Clients connected at once")
      ->capture_default_str();
  serve
      ->add_option("--max-connections-per-uid", limits.max_connections_per_uid,
                   "Connections of one local user at once")
      ->capture_default_str();
  serve
      ->add_option("--idle-timeout", limits.idle_timeout_s,
                   "Seconds before a connection without requests, leases or subscriptions is "
                   "closed (0: never)")
      ->capture_default_str();
  serve
      ->add_option("--frame-timeout", limits.frame_timeout_s,
                   "Seconds a started request frame has to arrive whole")
      ->capture_default_str();
  serve
      ->add_option("--max-pending-frame-bytes", limits.max_pending_frame_bytes,
                   "Bytes of incomplete request frames, all clients together")
      ->capture_default_str();
  serve
      ->add_option("--max-queued-replies", limits.max_queued_replies,
                   "Unread replies after which a client is not read from until it catches up")
      ->capture_default_str();
  serve
      ->add_option("--max-queued-fds", limits.max_queued_fds,
                   "Descriptors in one client's unread replies")
      ->capture_default_str();
  serve
      ->add_option("--max-queued-fds-total", limits.max_queued_fds_total,
                   "Descriptors in unread replies, all clients together")
      ->capture_default_str();
  serve
      ->add_option("--max-queued-bytes", limits.max_queued_bytes,
                   "Bytes of one client's unread replies (it is not read from at this)")
      ->capture_default_str();
  serve
      ->add_option("--max-queued-bytes-total", limits.max_queued_bytes_total,
                   "Bytes of unread replies, all clients together")
      ->capture_default_str();
  serve
      ->add_option("--max-leases-per-connection", limits.max_leases_per_connection,
                   "Leases one connection may hold")
      ->capture_default_str();
  serve->add_option("--socket-group", limits.socket_group,
                    "Group (name or gid) whose members may connect; the socket becomes 0660 "
                    "(default 0600)");
  serve->add_option("--allow-uid", limits.allow_uids,
                    "Also allow this uid to connect (repeatable; the server's uid and root are)");
  serve->add_option("--allow-gid", limits.allow_gids,
                    "Also allow members of this gid to connect (repeatable)");
}

void add_store_limit_options(CLI::App& serve_cmd, server::ServerOptions& serve) {
  serve_cmd.add_option("--max-models", serve.max_models, "Models held at once, loaded or loading")
      ->capture_default_str();
  serve_cmd
      .add_option("--max-variants-per-source", serve.max_variants_per_source,
                  "Variants (dtype, shard, tag) held of one checkpoint")
      ->capture_default_str();
  serve_cmd
      .add_option("--max-generations", serve.max_generations,
                  "Generations of one model alive at once: the current one, older ones readers "
                  "still hold, and one being published or reloaded (2..4)")
      ->capture_default_str();
  serve_cmd
      .add_option("--max-error-entries", serve.max_error_entries,
                  "Failed loads listed at most (the oldest are dropped)")
      ->capture_default_str();
  serve_cmd.add_option("--error-ttl", serve.error_ttl_s, "Seconds a failed load stays listed")
      ->capture_default_str();
  serve_cmd
      .add_option("--memory-reserve", serve.memory_reserve,
                  "Device memory loads must leave free: bytes (1GiB, 512MiB) or a share (10%)")
      ->capture_default_str();
  serve_cmd.add_option(
      "--memory-budget", serve.memory_budget,
      "Memory all models together may hold: bytes (8GiB, 512MiB) or a share of the device "
      "(80%). Default: what is available at start less --memory-reserve. A load or publication "
      "past it evicts models no client holds, least recently used first (published ones never), "
      "else is refused with OUT_OF_MEMORY");
  serve_cmd
      .add_option("--idle-evict", serve.idle_evict_s,
                  "Evict a model that no client has held for this many seconds (0: never)")
      ->capture_default_str();
  serve_cmd
      .add_option("--host-budget", serve.host_budget,
                  "Host memory for offloaded models (companion offload, and evicted models, "
                  "which then wake from it): bytes (64GiB) or a share of the host's memory "
                  "(25%); past it the least recently offloaded is dropped. 0: no host tier")
      ->capture_default_str();
  serve_cmd
      .add_option("--shutdown-timeout", serve.shutdown_timeout_s,
                  "Seconds stopping waits for loads (a load stuck longer is left behind)")
      ->capture_default_str();
}

namespace {

// A notification that cannot be sent is logged, never fatal: the server serves either way (a
// Type=notify unit whose READY=1 never comes fails its start on its own, after TimeoutStartSec=).
void tell_systemd(const std::string& state) {
  auto sent = keeper::notify_systemd(state);
  if (!sent.ok())
    log::warn("cannot notify systemd (" + sent.error().message +
              "): a Type=notify unit would wait for this server in vain (use Type=exec)");
}

}  // namespace

int run_serve(const server::ServerOptions& options, const std::string& log_level) {
  if (!log::set_level(log_level)) {
    std::fprintf(stderr, "unknown log level '%s'\n", log_level.c_str());
    return 2;
  }
  // Signals go to one thread that stops the loop; every other thread (loaders) has them blocked.
  sigset_t signals;
  sigemptyset(&signals);
  sigaddset(&signals, SIGINT);
  sigaddset(&signals, SIGTERM);
  pthread_sigmask(SIG_BLOCK, &signals, nullptr);
  std::signal(SIGPIPE, SIG_IGN);

  auto server = server::Server::create(options);
  if (!server.ok()) {
    std::fprintf(stderr, "companion serve: %s\n", server.error().to_string().c_str());
    return 1;
  }
  const ServerIdentity& id = (*server)->identity();
  // One line on stdout for scripts that start a server and need its socket.
  std::printf("companion serving %s/%s instance %s socket %s\n", id.ns.c_str(),
              id.component.c_str(), id.instance_id.c_str(), id.socket_path.c_str());
  std::fflush(stdout);
  // The socket listens, the record is written and what was kept is adopted: under systemd
  // (Type=notify), `systemctl start` returns now.
  tell_systemd("READY=1\nSTATUS=serving " + id.ns + "/" + id.component + " instance " +
               id.instance_id + " on " + id.socket_path);

  std::thread waiter([&] {
    int sig = 0;
    sigwait(&signals, &sig);
    tell_systemd("STOPPING=1\nSTATUS=stopping");
    (*server)->stop();
  });
  auto result = (*server)->run();
  // Wake the signal thread if the loop ended on its own.
  pthread_kill(waiter.native_handle(), SIGTERM);
  waiter.join();
  if (!result.ok()) {
    std::fprintf(stderr, "companion serve: %s\n", result.error().to_string().c_str());
    return 1;
  }
  return 0;
}

std::string this_program() {
  char path[PATH_MAX];
  ssize_t n = ::readlink("/proc/self/exe", path, sizeof(path) - 1);
  if (n <= 0) return {};
  return std::string(path, static_cast<size_t>(n));
}

int run_keeper(const std::string& socket_path, double keep_for_s, const std::string& log_level) {
  if (!log::set_level(log_level)) {
    std::fprintf(stderr, "unknown log level '%s'\n", log_level.c_str());
    return 2;
  }
  if (!(keep_for_s >= 0 && keep_for_s <= 1e7)) {
    std::fprintf(stderr, "companion keeper: --keep-for must be 0..10000000 s\n");
    return 2;
  }
  keeper::KeeperOptions options;
  options.socket_path = socket_path;
  options.keep_for = std::chrono::milliseconds(static_cast<int64_t>(keep_for_s * 1000));
  return keeper::run_keeper(options);
}

}  // namespace companion::cli
