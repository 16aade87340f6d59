// `companion serve`: runs a server until SIGINT or SIGTERM.
#include <csignal>
#include <cstdio>
#include <thread>

#include "cli/commands.hpp"
#include "common/log.hpp"

namespace companion::cli {

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

  std::thread waiter([&] {
    int sig = 0;
    sigwait(&signals, &sig);
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

}  // namespace companion::cli
