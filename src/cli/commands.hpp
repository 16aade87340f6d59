// The `companion` subcommands.
#pragma once

#include <string>
#include <vector>

#include "companion/client.hpp"
#include "server/server.hpp"

namespace CLI {
class App;
}

namespace companion::cli {

struct ModelArgs {
  std::string source;
  std::string revision;
  std::string dtype;  // "" = as stored
  std::string tag;
  uint32_t tp_size = 1;
  uint32_t tp_rank = 0;
  std::string shard_rules;  // "" = the architecture's preset
  bool published = false;   // source is a published model's key
};

struct CommonArgs {
  ConnectOptions connect;
  bool json = false;
};

struct AttachOptions {
  double initial_timeout_s = 30;
  double loading_timeout_s = 600;
  bool verify = false;     // checksum every tensor (CRC-32 on host, wsum64 on the GPU)
  bool reverify = false;   // checksum again after the hold
  bool try_write = false;  // report whether a write through the mapping is refused
  double hold_s = 0;       // keep the mapping this long before exiting
  size_t show = 8;         // tensors listed in the table
  // A published model (the spec's source is its key): which generation (0: the newest), and the
  // fingerprint fields ("name=value") it must have.
  bool published = false;
  uint64_t generation = 0;
  std::vector<std::string> fingerprint;
};

// The `serve` options that limit what the store holds.
void add_store_limit_options(CLI::App& serve_cmd, server::ServerOptions& serve);

// A spec from command-line arguments (local paths made absolute).
Result<ModelSpec> make_spec(const ModelArgs& model);

// `companion serve`'s flags for who may connect and what one client may hold.
void add_connection_flags(CLI::App* serve, server::ConnectionLimits& limits);

// Each returns the process exit code.
int run_serve(const server::ServerOptions& options, const std::string& log_level);
// The running executable's path (what serve starts its keeper with); "" when unknown.
std::string this_program();
int run_keeper(const std::string& socket_path, double keep_for_s, const std::string& log_level);
int run_status(const CommonArgs& args, const ModelArgs& model, bool follow);
int run_load(const CommonArgs& args, const ModelArgs& model, bool wait);
int run_unload(const CommonArgs& args, const ModelArgs& model, bool force);
// Moves a model to the server's host tier (its device memory freed); `load` wakes it.
int run_offload(const CommonArgs& args, const ModelArgs& model, bool force);
int run_list(const CommonArgs& args);
// A new generation of a loaded model whose files changed (force: even if they did not).
int run_reload(const CommonArgs& args, const ModelArgs& model, bool force);
// all: every live instance of the device, one line each; exit 0 when all of them serve.
int run_health(const CommonArgs& args, bool all);
int run_devices(bool json);
// Checks the host (driver, GPUs, runtime directory, servers, registry); exit 1 when one failed.
int run_doctor(const CommonArgs& args);
int run_attach(const CommonArgs& args, const ModelSpec& spec, const AttachOptions& options);

}  // namespace companion::cli
