// Registry records: validation and the JSON form.
#include <cstdint>
#include <exception>
#include <limits>
#include <nlohmann/json.hpp>
#include <string>

#include "registry/registry.hpp"

namespace companion::registry {
namespace {

using nlohmann::json;

Result<void> check_name(const char* what, const std::string& value) {
  if (value.empty())
    return make_error(StatusCode::kInvalidArgument, std::string(what) + " is empty");
  if (value.find('/') != std::string::npos)
    return make_error(StatusCode::kInvalidArgument,
                      std::string(what) + " '" + value + "' contains '/'");
  if (value.find('\0') != std::string::npos)
    return make_error(StatusCode::kInvalidArgument, std::string(what) + " contains a NUL byte");
  return ok_result();
}

Error field_error(const char* key, const char* expected) {
  return make_error(StatusCode::kInvalidArgument,
                    std::string("registry record: field \"") + key + "\" " + expected);
}

// Reads a string field; a missing field leaves `out` untouched unless required.
Result<void> get_string(const json& j, const char* key, bool required, std::string& out) {
  auto it = j.find(key);
  if (it == j.end() || it->is_null()) {
    if (required) return field_error(key, "is missing");
    return ok_result();
  }
  if (!it->is_string()) return field_error(key, "is not a string");
  out = it->get<std::string>();
  return ok_result();
}

Result<void> get_int(const json& j, const char* key, bool required, int64_t min, int64_t max,
                     int64_t& out) {
  auto it = j.find(key);
  if (it == j.end() || it->is_null()) {
    if (required) return field_error(key, "is missing");
    return ok_result();
  }
  if (!it->is_number_integer()) return field_error(key, "is not an integer");
  int64_t value = 0;
  if (it->is_number_unsigned()) {
    uint64_t u = it->get<uint64_t>();
    if (u > static_cast<uint64_t>(std::numeric_limits<int64_t>::max()))
      return field_error(key, "is out of range");
    value = static_cast<int64_t>(u);
  } else {
    value = it->get<int64_t>();
  }
  if (value < min || value > max) return field_error(key, "is out of range");
  out = value;
  return ok_result();
}

Result<ServerIdentity> parse_record(const json& j) {
  if (!j.is_object())
    return make_error(StatusCode::kInvalidArgument, "registry record is not a JSON object");
  ServerIdentity r;
  COMPANION_TRY(get_string(j, "instance_id", true, r.instance_id));
  COMPANION_TRY(get_string(j, "namespace", true, r.ns));
  COMPANION_TRY(get_string(j, "component", true, r.component));
  COMPANION_TRY(get_string(j, "socket_path", true, r.socket_path));
  COMPANION_TRY(get_int(j, "pid", true, 0, std::numeric_limits<int64_t>::max(), r.pid));
  COMPANION_TRY(get_string(j, "device", false, r.device));
  COMPANION_TRY(get_string(j, "gpu_uuid", false, r.gpu_uuid));
  COMPANION_TRY(get_string(j, "pci_bus_id", false, r.pci_bus_id));
  int64_t ordinal = r.device_ordinal;
  COMPANION_TRY(get_int(j, "device_ordinal", false, std::numeric_limits<int32_t>::min(),
                        std::numeric_limits<int32_t>::max(), ordinal));
  r.device_ordinal = static_cast<int32_t>(ordinal);
  COMPANION_TRY(get_string(j, "hostname", false, r.hostname));
  COMPANION_TRY(get_int(j, "started_at_ms", false, std::numeric_limits<int64_t>::min(),
                        std::numeric_limits<int64_t>::max(), r.started_at_ms));
  COMPANION_TRY(get_string(j, "version", false, r.version));
  COMPANION_TRY(get_string(j, "default_backend", false, r.default_backend));
  if (auto it = j.find("backends"); it != j.end() && !it->is_null()) {
    if (!it->is_array()) return field_error("backends", "is not an array");
    for (const auto& b : *it) {
      if (!b.is_string()) return field_error("backends", "has a non-string element");
      r.backends.push_back(b.get<std::string>());
    }
  }
  COMPANION_TRY(validate_record(r));
  return r;
}

}  // namespace

bool is_valid_instance_id(std::string_view id) noexcept {
  if (id.empty() || id.size() > 64) return false;
  for (char c : id) {
    bool ok = (c >= '0' && c <= '9') || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') ||
              c == '_' || c == '-';
    if (!ok) return false;
  }
  return true;
}

Result<void> validate_record(const ServerIdentity& record) {
  if (!is_valid_instance_id(record.instance_id))
    return make_error(
        StatusCode::kInvalidArgument,
        "instance id '" + record.instance_id + "' is not 1 to 64 characters of [0-9a-zA-Z_-]");
  COMPANION_TRY(check_name("namespace", record.ns));
  COMPANION_TRY(check_name("component", record.component));
  if (record.socket_path.empty())
    return make_error(StatusCode::kInvalidArgument, "socket path is empty");
  if (record.socket_path.front() != '/')
    return make_error(StatusCode::kInvalidArgument,
                      "socket path '" + record.socket_path + "' is not absolute");
  if (record.socket_path.size() > kMaxSocketPathBytes)
    return make_error(
        StatusCode::kInvalidArgument,
        "socket path is longer than " + std::to_string(kMaxSocketPathBytes) + " bytes");
  if (record.socket_path.find('\0') != std::string::npos)
    return make_error(StatusCode::kInvalidArgument, "socket path contains a NUL byte");
  if (record.pid < 0) return make_error(StatusCode::kInvalidArgument, "pid is negative");
  return ok_result();
}

std::string record_to_json(const ServerIdentity& record) {
  try {
    json j = json::object();
    j["namespace"] = record.ns;
    j["component"] = record.component;
    j["instance_id"] = record.instance_id;
    j["socket_path"] = record.socket_path;
    j["device"] = record.device;
    j["gpu_uuid"] = record.gpu_uuid;
    j["pci_bus_id"] = record.pci_bus_id;
    j["device_ordinal"] = record.device_ordinal;
    j["hostname"] = record.hostname;
    j["pid"] = record.pid;
    j["started_at_ms"] = record.started_at_ms;
    j["version"] = record.version;
    j["backends"] = record.backends;
    j["default_backend"] = record.default_backend;
    // Invalid UTF-8 in a field is replaced rather than thrown on.
    return j.dump(2, ' ', false, json::error_handler_t::replace) + "\n";
  } catch (const std::exception&) {
    return "{}\n";  // allocation failure: an unparsable record, which readers skip
  }
}

Result<ServerIdentity> record_from_json(const std::string& text) {
  try {
    json j = json::parse(text, nullptr, /*allow_exceptions=*/false);
    if (j.is_discarded())
      return make_error(StatusCode::kInvalidArgument, "registry record is not valid JSON");
    return parse_record(j);
  } catch (const std::exception& e) {
    return make_error(StatusCode::kInvalidArgument,
                      std::string("registry record is invalid: ") + e.what());
  }
}

}  // namespace companion::registry
