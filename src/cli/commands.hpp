// The `companion` subcommands.
#pragma once

#include <string>
#include <vector>

#include "companion/client.hpp"
#include "server/server.hpp"

namespace companion::cli {

struct ModelArgs {
  std::string source;
  std::string revision;
  std::string dtype;  // "" = as stored
  std::string tag;
};

struct CommonArgs {
  ConnectOptions connect;
  bool json = false;
};

// Each returns the process exit code.
int run_serve(const server::ServerOptions& options, const std::string& log_level);
int run_status(const CommonArgs& args, const ModelArgs& model, bool follow);
int run_load(const CommonArgs& args, const ModelArgs& model, bool wait);
int run_unload(const CommonArgs& args, const ModelArgs& model, bool force);
int run_list(const CommonArgs& args);
int run_health(const CommonArgs& args);

}  // namespace companion::cli
