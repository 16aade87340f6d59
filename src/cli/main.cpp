// `companion`: the server and its command-line client.
#include <CLI/CLI.hpp>
#include <cstdio>

#include "cli/commands.hpp"
#include "common/log.hpp"
#include "companion/types.hpp"

int main(int argc, char** argv) {
  using namespace companion;
  // This program is the host: its log goes to stderr (journald under systemd). Warnings for the
  // client commands; serve and keeper set --log-level.
  log::to_stderr(log::Level::kWarn);
  CLI::App app{"Companion: load model weights on a GPU once, share them zero-copy"};
  app.require_subcommand(1);
  app.set_version_flag("--version", std::string(software_version()));

  cli::CommonArgs common;
  // The connection options belong to every client subcommand, and are also accepted before the
  // subcommand (`companion --runtime-dir X ls`): both spellings fill the same fields.
  auto add_common = [&](CLI::App* cmd) {
    cmd->add_option("--namespace,-n", common.connect.ns, "Namespace")->capture_default_str();
    cmd->add_option("--device,-d", common.connect.device,
                    "Server device: host, or a GPU ordinal, UUID or PCI bus id")
        ->capture_default_str();
    cmd->add_option("--socket", common.connect.socket_path, "Connect to this socket directly");
    cmd->add_option("--runtime-dir", common.connect.runtime_dir, "Local registry directory");
    cmd->add_option("--registry", common.connect.registry,
                    "Where to look for servers: local or etcd://host:port[,host:port] "
                    "(default $COMPANION_REGISTRY, else local)");
    cmd->add_option("--instance", common.connect.instance_id,
                    "Use only this server instance (default: choose among live ones)");
    cmd->add_option("--wait-server", common.connect.discovery_timeout_s,
                    "Seconds to wait for a server to appear");
    cmd->add_option("--connect-timeout", common.connect.connect_timeout_s,
                    "Seconds a server may take to accept a connection")
        ->capture_default_str();
    cmd->add_option("--trust-uid", common.connect.trusted_uids,
                    "Also trust servers, records and runtime directories of this uid "
                    "(repeatable; besides this user, root and $COMPANION_TRUST_UID)");
    cmd->add_flag("--json", common.json, "JSON output for scripts");
  };
  add_common(&app);
  cli::ModelArgs model;
  auto add_model = [&](CLI::App* cmd, bool required) {
    auto* opt = cmd->add_option("model", model.source,
                                "Model: a directory, a .safetensors file or a Hugging Face id");
    if (required) opt->required();
    cmd->add_option("--revision", model.revision, "Hugging Face revision (default main)");
    cmd->add_option("--dtype", model.dtype, "Cast floating tensors: bf16, fp16, fp32");
    cmd->add_option("--tag", model.tag, "Opaque tag that keeps otherwise equal models apart");
    cmd->add_option("--tp-size", model.tp_size, "Tensor-parallel world size (default 1)");
    cmd->add_option("--tp-rank", model.tp_rank, "This shard's tensor-parallel rank (default 0)");
    cmd->add_option("--shard-rules", model.shard_rules,
                    "How tensors split, before the architecture's preset: "
                    "'pattern=rule;...', rule = replicated|column|row|dim<K>[-packed(N)]");
  };

  server::ServerOptions serve;
  std::string log_level = "info";
  auto* serve_cmd = app.add_subcommand("serve", "Run a server for one device");
  serve_cmd->add_option("--device,-d", serve.device, "host, or a GPU ordinal, UUID or PCI bus id")
      ->capture_default_str();
  serve_cmd->add_option("--namespace,-n", serve.ns, "Namespace")->capture_default_str();
  serve_cmd->add_option("--backend", serve.backend, "cuda-vmm (GPU default), cuda-ipc or host");
  serve_cmd->add_option("--model-root", serve.model_roots,
                        "Directory the server may read checkpoints from (repeatable)");
  serve_cmd->add_option("--runtime-dir", serve.runtime_dir, "Local registry directory");
  serve_cmd->add_option("--registry", serve.registry,
                        "Also announce in etcd: etcd://host:port[,host:port] "
                        "(default $COMPANION_REGISTRY, else local only)");
  serve_cmd
      ->add_option("--registry-ttl", serve.registry_ttl_s,
                   "etcd lease TTL in seconds: a dead instance leaves etcd within it")
      ->capture_default_str();
  serve_cmd->add_option("--registry-ca", serve.registry_security.ca_file,
                        "CA file (PEM) that signs etcd's certificate, for etcds:// "
                        "(default $COMPANION_REGISTRY_CA)");
  serve_cmd->add_option("--registry-cert", serve.registry_security.cert_file,
                        "Client certificate (PEM) for etcd (default $COMPANION_REGISTRY_CERT)");
  serve_cmd->add_option("--registry-key", serve.registry_security.key_file,
                        "Its private key (PEM) (default $COMPANION_REGISTRY_KEY)");
  serve_cmd->add_option("--registry-user", serve.registry_security.user,
                        "etcd user (default $COMPANION_REGISTRY_USER)");
  serve_cmd->add_option("--registry-password-file", serve.registry_security.password_file,
                        "File holding the etcd user's password "
                        "(default $COMPANION_REGISTRY_PASSWORD_FILE)");
  serve_cmd->add_option("--socket", serve.socket_path, "Socket path (default: in the registry)");
  serve_cmd->add_option("--hf-cache", serve.hf_cache, "Hugging Face hub cache directory");
  serve_cmd
      ->add_option("--direct-io", serve.direct_io,
                   "O_DIRECT checkpoint reads: auto (per file: O_DIRECT unless mostly in the page "
                   "cache), on, off")
      ->capture_default_str();
  serve_cmd->add_option("--load-threads", serve.load_threads, "Models loading at once")
      ->capture_default_str();
  serve_cmd->add_option("--preload", serve.preload, "Model to load at start (repeatable)");
  serve_cmd
      ->add_option("--max-header-bytes", serve.checkpoint_limits.max_header_bytes,
                   "Largest safetensors header (JSON bytes) read; at most 100 MiB")
      ->capture_default_str();
  serve_cmd
      ->add_option("--max-tensors", serve.checkpoint_limits.max_tensors,
                   "Most tensors in one checkpoint, counted as its headers are read")
      ->capture_default_str();
  serve_cmd
      ->add_option("--max-checkpoint-files", serve.checkpoint_limits.max_files,
                   "Most .safetensors files in one checkpoint (each is held open while loading)")
      ->capture_default_str();
  cli::add_connection_flags(serve_cmd, serve.connections);
  cli::add_store_limit_options(*serve_cmd, serve);
  serve_cmd->add_option("--log-level", log_level, "debug, info, warn, error")
      ->capture_default_str();
  serve_cmd->add_option("--metrics", serve.metrics,
                        "Serve Prometheus metrics at http://ADDRESS:PORT/metrics: PORT (on "
                        "127.0.0.1), ADDRESS:PORT or [IPv6]:PORT (port 0: any free port, logged)");
  bool no_keep = false;
  std::string keep_mode = "auto";
  serve_cmd
      ->add_option("--keep", keep_mode,
                   "What holds committed models past this server: keeper (a `companion keeper` "
                   "process), systemd (systemd's file-descriptor store: FileDescriptorStoreMax= "
                   "in the unit), no, or auto (systemd when it offers a store, else keeper)")
      ->check(CLI::IsMember({"auto", "keeper", "systemd", "no"}))
      ->capture_default_str();
  serve_cmd->add_flag("--no-keep", no_keep,
                      "--keep no: free every model's memory when the server exits (a keeper an "
                      "earlier server left for this device is told to free what it holds)");
  serve_cmd
      ->add_option("--keep-for", serve.keep_for_s,
                   "Seconds the keeper holds the models of a server that stopped or died, "
                   "waiting for a new server on the device to adopt them")
      ->capture_default_str();

  std::string keeper_socket;
  double keeper_keep_for_s = 600;
  auto* keeper_cmd = app.add_subcommand(
      "keeper",
      "Hold committed models' memory across server restarts (serve starts it; not run by hand)");
  keeper_cmd->add_option("--socket", keeper_socket, "The keeper's socket")->required();
  keeper_cmd
      ->add_option("--keep-for", keeper_keep_for_s,
                   "Seconds to wait for a server before freeing everything")
      ->capture_default_str();
  keeper_cmd->add_option("--log-level", log_level, "debug, info, warn, error")
      ->capture_default_str();

  bool follow = false;
  auto* status_cmd = app.add_subcommand("status", "Show model status (all models without MODEL)");
  add_common(status_cmd);
  add_model(status_cmd, false);
  status_cmd->add_flag("--follow,-f", follow, "Stream every change");

  bool no_wait = false;
  auto* load_cmd = app.add_subcommand(
      "load",
      "Load a model, with a progress bar (by source, or by id or key: wakes an offloaded one)");
  add_common(load_cmd);
  add_model(load_cmd, true);
  load_cmd->add_flag("--no-wait", no_wait, "Return once the load has started");

  bool force = false;
  auto* unload_cmd = app.add_subcommand("unload", "Unload a model (by source, id or key)");
  add_common(unload_cmd);
  add_model(unload_cmd, true);
  unload_cmd->add_flag("--force", force, "Unload even while clients hold it");

  bool offload_force = false;
  auto* offload_cmd = app.add_subcommand(
      "offload",
      "Move a model to the server's host memory (serve --host-budget) and free its device "
      "memory; `load` (or an attach) copies it back");
  add_common(offload_cmd);
  add_model(offload_cmd, true);
  offload_cmd->add_flag("--force", offload_force, "Offload even while clients hold it");

  status_cmd->add_flag("--published", model.published, "MODEL is a published model's key");
  unload_cmd->add_flag("--published", model.published, "MODEL is a published model's key");
  offload_cmd->add_flag("--published", model.published, "MODEL is a published model's key");
  load_cmd->add_flag("--published", model.published,
                     "MODEL is a published model's key (wakes it when offloaded)");

  bool reload_force = false;
  auto* reload_cmd = app.add_subcommand(
      "reload", "Load a new generation of a model whose files changed (readers keep theirs)");
  add_common(reload_cmd);
  add_model(reload_cmd, true);
  reload_cmd->add_flag("--force", reload_force, "Reload even if the files did not change");

  auto* ls_cmd = app.add_subcommand("ls", "List the server's models and their generations");
  add_common(ls_cmd);
  bool health_all = false;
  auto* health_cmd = app.add_subcommand("health", "Check the server (exit code 0 when serving)");
  add_common(health_cmd);
  health_cmd->add_flag("--all", health_all,
                       "Every live instance of the device (exit 0 when all serve)");

  cli::AttachOptions attach;
  auto* attach_cmd =
      app.add_subcommand("attach", "Map a model zero-copy into this process and show it");
  add_common(attach_cmd);
  add_model(attach_cmd, true);
  attach_cmd->add_flag("--verify", attach.verify,
                       "Checksum every tensor (CRC-32 on host, wsum64 computed by the GPU)");
  attach_cmd->add_flag("--reverify", attach.reverify, "Checksum again after --hold");
  attach_cmd->add_flag("--try-write", attach.try_write,
                       "Report whether a write through the mapping is refused (--json)");
  attach_cmd->add_option("--hold", attach.hold_s, "Seconds to keep the mapping before exiting");
  attach_cmd->add_option("--show", attach.show, "Tensors to list")->capture_default_str();
  attach_cmd->add_flag("--published", attach.published, "MODEL is a published model's key");
  attach_cmd->add_option("--generation", attach.generation,
                         "Published: this generation (default: the newest)");
  attach_cmd->add_option("--fingerprint", attach.fingerprint,
                         "Published: a field NAME=VALUE the generation must have (repeatable; "
                         "with any, the fingerprint must equal them exactly)");
  attach_cmd
      ->add_option("--initial-timeout", attach.initial_timeout_s,
                   "Seconds for the server to start the load")
      ->capture_default_str();
  attach_cmd
      ->add_option("--loading-timeout", attach.loading_timeout_s, "Seconds for the load to finish")
      ->capture_default_str();

  auto* doctor_cmd = app.add_subcommand(
      "doctor",
      "Check this host: driver, GPUs, runtime directory, servers, etcd (exit 1 when one fails)");
  add_common(doctor_cmd);

  bool devices_json = false;
  auto* devices_cmd = app.add_subcommand("devices", "List the GPUs this process sees");
  devices_cmd->add_flag("--json", devices_json, "JSON output for scripts");

  CLI11_PARSE(app, argc, argv);

  // Options given before `serve` or `devices`: those the subcommand has mean the same there (its
  // own spelling after the subcommand wins); the client-only ones are refused, not ignored.
  auto before_subcommand = [&](const char* name) { return app.get_option(name)->count() > 0; };
  if (*serve_cmd || *devices_cmd) {
    CLI::App* cmd = *serve_cmd ? serve_cmd : devices_cmd;
    for (const CLI::Option* opt : app.get_options()) {
      const std::string name = opt->get_name();
      if (opt->count() == 0 || name == "--help" || name == "--version") continue;
      bool shared = *serve_cmd
                        ? name == "--namespace" || name == "--device" || name == "--socket" ||
                              name == "--runtime-dir" || name == "--registry"
                        : name == "--json";
      if (!shared) {
        std::fprintf(stderr, "companion %s: %s is an option of the client commands\n",
                     cmd->get_name().c_str(), name.c_str());
        return 2;
      }
    }
    auto take = [&](const char* name, std::string& into, const std::string& value) {
      if (before_subcommand(name) && serve_cmd->get_option(name)->count() == 0) into = value;
    };
    take("--namespace", serve.ns, common.connect.ns);
    take("--device", serve.device, common.connect.device);
    take("--socket", serve.socket_path, common.connect.socket_path);
    take("--runtime-dir", serve.runtime_dir, common.connect.runtime_dir);
    take("--registry", serve.registry, common.connect.registry);
    devices_json = devices_json || common.json;
  }
  if (common.connect.client_name == ConnectOptions{}.client_name)
    common.connect.client_name = "companion-cli";
  if (*serve_cmd) {
    using Keep = server::ServerOptions::Keep;
    if (no_keep) keep_mode = "no";
    serve.keep = keep_mode == "keeper"    ? Keep::kKeeper
                 : keep_mode == "systemd" ? Keep::kSystemd
                 : keep_mode == "no"      ? Keep::kNo
                                          : Keep::kAuto;
    if (serve.keep != Keep::kNo) serve.keeper_program = cli::this_program();
    return cli::run_serve(serve, log_level);
  }
  if (*keeper_cmd) return cli::run_keeper(keeper_socket, keeper_keep_for_s, log_level);
  if (*status_cmd) return cli::run_status(common, model, follow);
  if (*load_cmd) return cli::run_load(common, model, !no_wait);
  if (*unload_cmd) return cli::run_unload(common, model, force);
  if (*offload_cmd) return cli::run_offload(common, model, offload_force);
  if (*reload_cmd) return cli::run_reload(common, model, reload_force);
  if (*ls_cmd) return cli::run_list(common);
  if (*health_cmd) return cli::run_health(common, health_all);
  if (*devices_cmd) return cli::run_devices(devices_json);
  if (*doctor_cmd) return cli::run_doctor(common);
  if (*attach_cmd) {
    if (attach.published) {
      ModelSpec key;
      key.source = model.source;
      return cli::run_attach(common, key, attach);
    }
    auto spec = cli::make_spec(model);
    if (!spec.ok()) {
      std::fprintf(stderr, "companion attach: %s\n", spec.error().to_string().c_str());
      return 1;
    }
    return cli::run_attach(common, *spec, attach);
  }
  return 2;
}
