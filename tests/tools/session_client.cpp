// companion-session-client: one long-lived Client driven line by line from stdin, for tests of
// discovery, instance choice and failover. Each command prints one JSON line on stdout:
//
//   attach PATH   get_model_parameters; the mapping is kept   {"ok":true,"instance":ID,"index":N}
//   load PATH     load and wait                              {"ok":true,"instance":ID}
//   status PATH   the model's status                         {"ok":true,"instance":ID,"state":S}
//   verify        checksums of every tensor of every mapping kept (CRC-32 on the host, wsum64 on
//                 the GPU): {"ok":true,"models":[{"instance":ID,"source":S,"sums":{name:sum}}]}
//   instances     {"ok":true,"instances":[ID...]}
//   release N     drops mapping N                            {"ok":true}
//   quit
//
// Errors: {"ok":false,"code":"UNAVAILABLE","message":...}. Options as `companion` clients.
#include <CLI/CLI.hpp>
#include <iostream>
#include <map>
#include <memory>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string>
#include <vector>

#include "common/checksum.hpp"
#include "companion/client.hpp"
#include "memory/cuda_checksum.hpp"

namespace companion {
namespace {

using nlohmann::json;

json error_json(const Error& e) {
  return {{"ok", false}, {"code", status_code_name(e.code)}, {"message", e.message}};
}

Result<json> checksums(const MappedModel& model,
                       std::map<int, std::unique_ptr<memory::DeviceChecksum>>& kernels) {
  json sums = json::object();
  for (const auto& t : model.tensors()) {
    if (!t.on_device) {
      sums[std::string(t.name)] = crc32(t.data, t.nbytes);
      continue;
    }
    auto& kernel = kernels[t.device_ordinal];
    if (!kernel) {
      COMPANION_ASSIGN_OR_RETURN(kernel, memory::DeviceChecksum::create(t.device_ordinal));
    }
    COMPANION_ASSIGN_OR_RETURN(uint64_t sum,
                               kernel->run(reinterpret_cast<uint64_t>(t.data), t.nbytes));
    sums[std::string(t.name)] = sum;
  }
  return sums;
}

int run(int argc, char** argv) {
  CLI::App app{"Drives one companion Client from stdin (tests)"};
  ConnectOptions options;
  options.client_name = "companion-session-client";
  app.add_option("--namespace", options.ns);
  app.add_option("--device", options.device);
  app.add_option("--socket", options.socket_path);
  app.add_option("--runtime-dir", options.runtime_dir);
  app.add_option("--registry", options.registry);
  app.add_option("--wait-server", options.discovery_timeout_s);
  CLI11_PARSE(app, argc, argv);

  auto client = Client::connect(options);
  if (!client.ok()) {
    std::cout << error_json(client.error()).dump() << std::endl;
    return 1;
  }
  std::cout << json{{"ok", true}, {"instance", (*client)->server().instance_id}}.dump()
            << std::endl;
  std::vector<std::shared_ptr<MappedModel>> held;
  std::map<int, std::unique_ptr<memory::DeviceChecksum>> kernels;
  std::string line;
  while (std::getline(std::cin, line)) {
    std::istringstream words(line);
    std::string command, arg;
    words >> command;
    std::getline(words >> std::ws, arg);
    ModelSpec spec;
    spec.source = arg;
    json out;
    if (command == "quit") break;
    if (command == "attach") {
      auto m = (*client)->get_model_parameters(spec, 60);
      if (m.ok()) {
        held.push_back(*m);
        out = {{"ok", true},
               {"instance", (*client)->server().instance_id},
               {"index", held.size() - 1}};
      } else {
        out = error_json(m.error());
      }
    } else if (command == "load" || command == "status") {
      auto s = command == "load" ? (*client)->load(spec, true, {}, 60) : (*client)->status(spec);
      out = s.ok() ? json{{"ok", true},
                          {"instance", (*client)->server().instance_id},
                          {"state", model_state_name(s->state)}}
                   : error_json(s.error());
    } else if (command == "verify") {
      out = {{"ok", true}, {"models", json::array()}};
      for (const auto& m : held) {
        auto sums = checksums(*m, kernels);
        if (!sums.ok()) {
          out = error_json(sums.error());
          break;
        }
        // The instance that served the mapping (its lease's server) may be gone by now.
        out["models"].push_back({{"source", m->status().source}, {"sums", *sums}});
      }
    } else if (command == "instances") {
      auto list = (*client)->instances();
      if (list.ok()) {
        out = {{"ok", true}, {"instances", json::array()}};
        for (const auto& r : *list) out["instances"].push_back(r.instance_id);
      } else {
        out = error_json(list.error());
      }
    } else if (command == "release") {
      size_t index = std::stoul(arg);
      if (index < held.size()) held[index].reset();
      out = {{"ok", true}};
    } else {
      out = {{"ok", false}, {"code", "USAGE"}, {"message", "unknown command " + command}};
    }
    std::cout << out.dump() << std::endl;
  }
  return 0;
}

}  // namespace
}  // namespace companion

int main(int argc, char** argv) {
  return companion::run(argc, argv);
}
