// Client-side subcommands: status, load, unload, offload, ls, health.
#include <unistd.h>

#include <cstdio>
#include <functional>
#include <iostream>

#include "cli/commands.hpp"
#include "cli/output.hpp"
#include "common/util.hpp"

namespace companion::cli {
namespace {

int fail(const CommonArgs& args, const Error& e) {
  if (args.json)
    std::cout << json_text(to_json(e)) << std::endl;
  else
    std::fprintf(stderr, "companion: %s\n", printable_text(e.to_string()).c_str());
  return 1;
}

}  // namespace

Result<ModelSpec> make_spec(const ModelArgs& m) {
  ModelSpec spec;
  spec.source = m.source;
  // A local path is sent absolute: the server's working directory is not the caller's.
  if (!m.source.empty() && m.source[0] != '/' && ::access(m.source.c_str(), F_OK) == 0) {
    char* real = ::realpath(m.source.c_str(), nullptr);
    if (real != nullptr) {
      spec.source = real;
      std::free(real);
    }
  }
  spec.revision = m.revision;
  spec.tag = m.tag;
  spec.tp_size = m.tp_size;
  spec.tp_rank = m.tp_rank;
  spec.shard_rules = m.shard_rules;
  if (!m.dtype.empty() && m.dtype != "auto") {
    COMPANION_ASSIGN_OR_RETURN(DType d, parse_dtype(m.dtype));
    spec.dtype = d;
  }
  COMPANION_TRY(spec.validate());
  return spec;
}

int run_status(const CommonArgs& args, const ModelArgs& model, bool follow) {
  auto client = Client::connect(args.connect);
  if (!client.ok()) return fail(args, client.error());
  if (!follow) {
    if (model.source.empty()) {
      auto models = (*client)->list();
      if (!models.ok()) return fail(args, models.error());
      if (args.json) {
        nlohmann::json j = nlohmann::json::array();
        for (const auto& s : *models) j.push_back(to_json(s));
        std::cout << json_text(j, 2) << std::endl;
      } else {
        std::cout << render_models(*models) << render_generations(*models);
      }
      return 0;
    }
    Result<ModelStatus> s = make_error(StatusCode::kInternal, "");
    if (model.published) {
      // A published key's status is the first event of its stream.
      auto stream = (*client)->subscribe_key(model.source);
      if (!stream.ok()) return fail(args, stream.error());
      s = (*stream)->next(30);
    } else {
      auto spec = make_spec(model);
      if (!spec.ok()) return fail(args, spec.error());
      s = (*client)->status(*spec);
    }
    if (!s.ok()) return fail(args, s.error());
    if (args.json)
      std::cout << json_text(to_json(*s), 2) << std::endl;
    else
      std::cout << render_models({*s}) << render_generations({*s});
    return 0;
  }
  Result<std::unique_ptr<StatusStream>> stream = make_error(StatusCode::kInternal, "");
  if (model.source.empty()) {
    stream = (*client)->subscribe_all();
  } else if (model.published) {
    stream = (*client)->subscribe_key(model.source);
  } else {
    auto spec = make_spec(model);
    if (!spec.ok()) return fail(args, spec.error());
    stream = (*client)->subscribe(*spec);
  }
  if (!stream.ok()) return fail(args, stream.error());
  for (;;) {
    auto s = (*stream)->next(-1);
    if (!s.ok()) return fail(args, s.error());
    if (args.json) {
      std::cout << json_text(to_json(*s)) << std::endl;
    } else {
      std::cout << s->id << "  " << model_state_name(s->state) << "  " << render_progress(*s)
                << "  " << printable_text(s->source)
                << (s->message.empty() ? "" : "  " + printable_text(s->message)) << std::endl;
    }
  }
}

namespace {

// A short id from `companion ls` (12 hex digits), or a loaded model's whole key.
bool names_held_model(const std::string& text) {
  if (text.rfind("source=", 0) == 0) return true;
  return text.size() == 12 && text.find_first_not_of("0123456789abcdef") == std::string::npos;
}

}  // namespace

int run_load(const CommonArgs& args, const ModelArgs& model, bool wait) {
  bool local_path = ::access(model.source.c_str(), F_OK) == 0;
  if (model.published || (!local_path && names_held_model(model.source))) {
    // A model the server holds, by key or id (an offloaded one is woken); an id it does not
    // know may still be a Hugging Face name.
    auto client = Client::connect(args.connect);
    if (!client.ok()) return fail(args, client.error());
    auto s = (*client)->load_key(model.source, wait);
    if (s.ok() || model.published || s.error().code != StatusCode::kNotFound) {
      if (!s.ok()) return fail(args, s.error());
      if (args.json)
        std::cout << json_text(to_json(*s), 2) << std::endl;
      else
        std::cout << render_models({*s});
      return 0;
    }
  }
  auto spec = make_spec(model);
  if (!spec.ok()) return fail(args, spec.error());
  auto client = Client::connect(args.connect);
  if (!client.ok()) return fail(args, client.error());
  bool bar = !args.json && ::isatty(STDERR_FILENO);
  int last_decile = -1;
  ModelState last_state = ModelState::kReady;
  size_t bar_width = 0;  // of the bar line on screen: a shorter one must cover all of it
  auto on_progress = [&](const ModelStatus& s) {
    if (args.json) return;
    if (bar) {
      std::string line = std::string(model_state_name(s.state)) + " " + render_progress(s);
      size_t width = line.size();
      if (width < bar_width) line.append(bar_width - width, ' ');
      bar_width = width;
      std::fprintf(stderr, "\r%s", line.c_str());
      std::fflush(stderr);
      return;
    }
    // Logs get a line per 10% and per state change, not one per event.
    int decile = static_cast<int>(s.progress() * 10);
    if (decile == last_decile && s.state == last_state) return;
    last_decile = decile;
    last_state = s.state;
    std::fprintf(stderr, "%s %s\n", model_state_name(s.state), render_progress(s).c_str());
  };
  auto s = (*client)->load(*spec, wait, on_progress);
  if (bar && bar_width > 0) std::fprintf(stderr, "\n");
  if (!s.ok()) return fail(args, s.error());
  if (args.json)
    std::cout << json_text(to_json(*s), 2) << std::endl;
  else
    std::cout << render_models({*s});
  return 0;
}

// A model named by an id or key from `companion ls` (a published key too) or by its source, for
// unload and offload: "org/name" may be a published key or a Hugging Face id, so the key is
// tried first and the source after it when no model has that key.
static Result<ModelStatus> by_key_or_spec(
    const ModelArgs& model, const std::function<Result<ModelStatus>(const std::string&)>& by_key,
    const std::function<Result<ModelStatus>(const ModelSpec&)>& by_spec) {
  bool local_path = ::access(model.source.c_str(), F_OK) == 0;
  bool key_like = model.published || model.source.rfind("source=", 0) == 0 ||
                  model.source.find('/') == std::string::npos;
  if (!local_path) {
    auto s = by_key(model.source);
    if (key_like || s.ok() || s.error().code != StatusCode::kNotFound) return s;
  }
  COMPANION_ASSIGN_OR_RETURN(ModelSpec spec, make_spec(model));
  return by_spec(spec);
}

int run_unload(const CommonArgs& args, const ModelArgs& model, bool force) {
  auto client = Client::connect(args.connect);
  if (!client.ok()) return fail(args, client.error());
  auto s = by_key_or_spec(
      model, [&](const std::string& key) { return (*client)->unload_key(key, force); },
      [&](const ModelSpec& spec) { return (*client)->unload(spec, force); });
  if (!s.ok()) return fail(args, s.error());
  if (args.json)
    std::cout << json_text(to_json(*s), 2) << std::endl;
  else
    std::cout << "unloaded " << s->id << "  " << printable_text(s->key) << std::endl;
  return 0;
}

int run_offload(const CommonArgs& args, const ModelArgs& model, bool force) {
  auto client = Client::connect(args.connect);
  if (!client.ok()) return fail(args, client.error());
  auto s = by_key_or_spec(
      model, [&](const std::string& key) { return (*client)->offload_key(key, force); },
      [&](const ModelSpec& spec) { return (*client)->offload(spec, force); });
  if (!s.ok()) return fail(args, s.error());
  if (args.json)
    std::cout << json_text(to_json(*s), 2) << std::endl;
  else
    std::cout << "offloaded " << s->id << "  " << printable_text(s->key) << "  ("
              << format_bytes(s->host_bytes) << " in host memory)" << std::endl;
  return 0;
}

int run_list(const CommonArgs& args) {
  return run_status(args, ModelArgs{}, false);
}

int run_reload(const CommonArgs& args, const ModelArgs& model, bool force) {
  auto client = Client::connect(args.connect);
  if (!client.ok()) return fail(args, client.error());
  // An id or key from `companion ls`, or a model source (named by the key it loaded under).
  std::string key = model.source;
  if (::access(model.source.c_str(), F_OK) == 0 || model.source.find('/') != std::string::npos) {
    auto spec = make_spec(model);
    if (spec.ok()) {
      auto s = (*client)->status(*spec);
      if (s.ok() && s->state != ModelState::kReady) key = s->key;
    }
  }
  auto s = (*client)->reload(key, force);
  if (!s.ok()) return fail(args, s.error());
  if (args.json) {
    std::cout << json_text(to_json(*s), 2) << std::endl;
  } else if (!s->message.empty()) {
    std::cout << s->id << "  generation " << s->generation << "  " << printable_text(s->message)
              << std::endl;
  } else {
    std::cout << "reloaded " << s->id << " as generation " << s->generation << "  "
              << printable_text(s->source) << std::endl;
  }
  return 0;
}

namespace {

int run_health_all(const CommonArgs& args) {
  auto instances = discover_instances(args.connect);
  if (!instances.ok()) return fail(args, instances.error());
  bool all_serving = true;
  nlohmann::json out = nlohmann::json::array();
  std::vector<std::vector<std::string>> rows;
  for (const auto& record : *instances) {
    ConnectOptions direct = args.connect;
    direct.socket_path = record.socket_path;
    auto client = Client::connect(direct);
    auto h = client.ok() ? (*client)->health() : Result<HealthInfo>(client.error());
    bool serving = h.ok() && h->state == "serving";
    all_serving = all_serving && serving;
    if (args.json) {
      nlohmann::json entry{{"instance_id", record.instance_id},
                           {"socket_path", record.socket_path},
                           {"serving", serving}};
      if (h.ok())
        entry["health"] = to_json(*h);
      else
        entry.update(to_json(h.error()));
      out.push_back(std::move(entry));
      continue;
    }
    rows.push_back(
        {record.instance_id, std::to_string(record.pid),
         h.ok() ? h->state : std::string("unreachable"),
         h.ok() ? std::to_string(h->models_loaded) + "/" + std::to_string(h->models_total) : "-",
         h.ok() ? std::to_string(h->uptime_ms / 1000) + " s" : "-",
         h.ok() ? (h->registry == "local" ? "local"
                   : h->registered        ? "etcd, registered"
                                          : "etcd, NOT registered")
                : h.error().message});
  }
  if (args.json)
    std::cout << json_text(out, 2) << std::endl;
  else
    std::cout << render_table({"INSTANCE", "PID", "STATE", "MODELS", "UPTIME", "REGISTRY"}, rows);
  return all_serving ? 0 : 1;
}

}  // namespace

int run_health(const CommonArgs& args, bool all) {
  if (all) return run_health_all(args);
  auto client = Client::connect(args.connect);
  if (!client.ok()) return fail(args, client.error());
  auto h = (*client)->health();
  if (!h.ok()) return fail(args, h.error());
  if (args.json)
    std::cout << json_text(to_json(*h), 2) << std::endl;
  else
    std::cout << render_health(*h);
  return h->state == "serving" ? 0 : 1;
}

}  // namespace companion::cli
