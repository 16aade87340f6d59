// `companion keeper`: the small process that holds a server's committed memory while no server
// does. It keeps, per generation, the descriptors the server handed it (segments and table) and
// an opaque catalog entry, and gives them all back to the next server that opens a session.
//
// Lifetime: one keeper per socket (a lock file beside it); one server session at a time. When the
// session ends (the server stopped or died) the keeper waits keep_for for a server to come back,
// then exits and so frees everything; with nothing held it exits at once. SIGTERM or SIGINT:
// exits (frees). A Hello with release_all (serve --no-keep): frees everything and exits.
#pragma once

#include <chrono>
#include <string>

namespace companion::keeper {

struct KeeperOptions {
  std::string socket_path;
  std::chrono::milliseconds keep_for{std::chrono::minutes(10)};
};

// Runs until the keeper is done; the process's exit status (0: done, 1: could not start).
int run_keeper(const KeeperOptions& options);

}  // namespace companion::keeper
