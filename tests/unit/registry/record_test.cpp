// Registry records: JSON form and validation.
#include <gtest/gtest.h>
#include <unistd.h>

#include <cstdlib>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>

#include "registry/etcd_registry.hpp"
#include "registry/registry.hpp"

namespace companion::registry {
namespace {

using nlohmann::json;

ServerIdentity full_record() {
  ServerIdentity r;
  r.instance_id = "abc_DEF-0123";
  r.ns = "prod";
  r.component = "model_server_gpu_1";
  r.hostname = "node-7";
  r.pid = 4242;
  r.device = "GPU-1234-abcd";
  r.gpu_uuid = "GPU-1234-abcd";
  r.pci_bus_id = "0000:17:00.0";
  r.device_ordinal = 1;
  r.backends = {"cuda_ipc", "host_shm"};
  r.default_backend = "cuda_ipc";
  r.started_at_ms = 1700000000123;
  r.version = "0.1.0";
  r.socket_path = "/run/user/1000/companion/abc_DEF-0123.sock";
  return r;
}

void expect_same(const ServerIdentity& a, const ServerIdentity& b) {
  EXPECT_EQ(a.instance_id, b.instance_id);
  EXPECT_EQ(a.ns, b.ns);
  EXPECT_EQ(a.component, b.component);
  EXPECT_EQ(a.hostname, b.hostname);
  EXPECT_EQ(a.pid, b.pid);
  EXPECT_EQ(a.device, b.device);
  EXPECT_EQ(a.gpu_uuid, b.gpu_uuid);
  EXPECT_EQ(a.pci_bus_id, b.pci_bus_id);
  EXPECT_EQ(a.device_ordinal, b.device_ordinal);
  EXPECT_EQ(a.backends, b.backends);
  EXPECT_EQ(a.default_backend, b.default_backend);
  EXPECT_EQ(a.started_at_ms, b.started_at_ms);
  EXPECT_EQ(a.version, b.version);
  EXPECT_EQ(a.socket_path, b.socket_path);
}

TEST(RegistryRecord, RoundTrip) {
  const ServerIdentity r = full_record();
  const std::string text = record_to_json(r);
  auto back = record_from_json(text);
  ASSERT_TRUE(back.ok()) << back.error().to_string();
  expect_same(r, *back);

  // A host record: negative ordinal, empty GPU fields, no backends.
  ServerIdentity host;
  host.instance_id = "h";
  host.ns = "n";
  host.component = "model_server_host";
  host.pid = 1;
  host.device = "host";
  host.socket_path = "/tmp/x.sock";
  auto host_back = record_from_json(record_to_json(host));
  ASSERT_TRUE(host_back.ok()) << host_back.error().to_string();
  expect_same(host, *host_back);
  EXPECT_EQ(host_back->device_ordinal, -1);
}

TEST(RegistryRecord, FieldNames) {
  const json j = json::parse(record_to_json(full_record()));
  ASSERT_TRUE(j.is_object());
  EXPECT_EQ(j.at("namespace"), "prod");
  EXPECT_EQ(j.at("component"), "model_server_gpu_1");
  EXPECT_EQ(j.at("instance_id"), "abc_DEF-0123");
  EXPECT_EQ(j.at("socket_path"), "/run/user/1000/companion/abc_DEF-0123.sock");
  EXPECT_EQ(j.at("device"), "GPU-1234-abcd");
  EXPECT_EQ(j.at("gpu_uuid"), "GPU-1234-abcd");
  EXPECT_EQ(j.at("pci_bus_id"), "0000:17:00.0");
  EXPECT_EQ(j.at("device_ordinal"), 1);
  EXPECT_EQ(j.at("hostname"), "node-7");
  EXPECT_EQ(j.at("pid"), 4242);
  EXPECT_EQ(j.at("started_at_ms"), 1700000000123);
  EXPECT_EQ(j.at("version"), "0.1.0");
  EXPECT_EQ(j.at("backends"), json::array({"cuda_ipc", "host_shm"}));
  EXPECT_EQ(j.at("default_backend"), "cuda_ipc");
}

TEST(RegistryRecord, UnknownFieldsIgnoredOptionalFieldsDefault) {
  json j = {{"instance_id", "i1"}, {"namespace", "n"}, {"component", "c"},
            {"socket_path", "/s"}, {"pid", 7},         {"something_new", {{"nested", true}}}};
  auto r = record_from_json(j.dump());
  ASSERT_TRUE(r.ok()) << r.error().to_string();
  EXPECT_EQ(r->instance_id, "i1");
  EXPECT_EQ(r->pid, 7);
  EXPECT_EQ(r->device_ordinal, -1);
  EXPECT_TRUE(r->backends.empty());
  EXPECT_TRUE(r->hostname.empty());
  EXPECT_EQ(r->started_at_ms, 0);
}

void expect_invalid(const std::string& text) {
  auto r = record_from_json(text);
  ASSERT_FALSE(r.ok()) << "accepted: " << text;
  EXPECT_EQ(r.error().code, StatusCode::kInvalidArgument) << text;
}

TEST(RegistryRecord, RejectsMissingRequiredFields) {
  const json good = json::parse(record_to_json(full_record()));
  for (const char* key : {"instance_id", "namespace", "component", "socket_path", "pid"}) {
    json j = good;
    j.erase(key);
    SCOPED_TRACE(key);
    expect_invalid(j.dump());
  }
  // Optional ones may go.
  for (const char* key : {"device", "gpu_uuid", "pci_bus_id", "device_ordinal", "hostname",
                          "started_at_ms", "version", "backends", "default_backend"}) {
    json j = good;
    j.erase(key);
    EXPECT_TRUE(record_from_json(j.dump()).ok()) << key;
  }
}

TEST(RegistryRecord, RejectsMalformed) {
  expect_invalid("");
  expect_invalid("{");
  expect_invalid("{\"instance_id\": \"a\",");
  expect_invalid("[]");
  expect_invalid("42");
  expect_invalid("null");

  const json good = json::parse(record_to_json(full_record()));
  auto with = [&](const char* key, json value) {
    json j = good;
    j[key] = std::move(value);
    return j.dump();
  };
  expect_invalid(with("pid", "4242"));
  expect_invalid(with("pid", 1.5));
  expect_invalid(with("pid", -3));
  expect_invalid(with("instance_id", 5));
  expect_invalid(with("instance_id", ""));
  expect_invalid(with("instance_id", "../etc/passwd"));
  expect_invalid(with("instance_id", "has space"));
  expect_invalid(with("instance_id", std::string(65, 'a')));
  expect_invalid(with("namespace", ""));
  expect_invalid(with("namespace", "a/b"));
  expect_invalid(with("component", ""));
  expect_invalid(with("component", "x/y"));
  expect_invalid(with("socket_path", ""));
  expect_invalid(with("backends", "cuda_ipc"));
  expect_invalid(with("backends", json::array({"a", 1})));
  expect_invalid(with("device_ordinal", 1LL << 40));
  expect_invalid(with("started_at_ms", "now"));
  expect_invalid(with("hostname", 3));
  // The good one really is good.
  EXPECT_TRUE(record_from_json(good.dump()).ok());
}

TEST(RegistryRecord, InstanceIdRules) {
  EXPECT_TRUE(is_valid_instance_id("a"));
  EXPECT_TRUE(is_valid_instance_id("0123456789abcdef"));
  EXPECT_TRUE(is_valid_instance_id("A_b-C"));
  EXPECT_TRUE(is_valid_instance_id(std::string(64, 'z')));
  EXPECT_FALSE(is_valid_instance_id(std::string(65, 'z')));
  EXPECT_FALSE(is_valid_instance_id(""));
  EXPECT_FALSE(is_valid_instance_id("."));
  EXPECT_FALSE(is_valid_instance_id(".."));
  EXPECT_FALSE(is_valid_instance_id("a/b"));
  EXPECT_FALSE(is_valid_instance_id("a.json"));
  EXPECT_FALSE(is_valid_instance_id(std::string("a\0b", 3)));
}

TEST(RegistryRecord, ValidateRecord) {
  ServerIdentity r = full_record();
  EXPECT_TRUE(validate_record(r).ok());
  r.ns = "a/b";
  EXPECT_EQ(validate_record(r).error().code, StatusCode::kInvalidArgument);
  r = full_record();
  r.component.clear();
  EXPECT_EQ(validate_record(r).error().code, StatusCode::kInvalidArgument);
  r = full_record();
  r.instance_id = "x y";
  EXPECT_EQ(validate_record(r).error().code, StatusCode::kInvalidArgument);
  // Socket paths: absolute, at most what sockaddr_un holds, no NUL.
  r = full_record();
  r.socket_path = "relative.sock";
  EXPECT_EQ(validate_record(r).error().code, StatusCode::kInvalidArgument);
  r.socket_path = "/" + std::string(kMaxSocketPathBytes, 'a');
  EXPECT_EQ(validate_record(r).error().code, StatusCode::kInvalidArgument);
  r.socket_path = "/" + std::string(kMaxSocketPathBytes - 1, 'a');
  EXPECT_TRUE(validate_record(r).ok());
  r.socket_path = std::string("/a\0b", 4);
  EXPECT_EQ(validate_record(r).error().code, StatusCode::kInvalidArgument);
}

TEST(RegistryRecord, EtcdRecordMustMatchItsKey) {
  const ServerIdentity r = full_record();
  EtcdKeyValue kv{etcd_key_for(r), record_to_json(r), 1, 0};
  auto ok = record_from_etcd(kv);
  ASSERT_TRUE(ok.ok()) << ok.error().to_string();
  EXPECT_EQ(ok->instance_id, r.instance_id);
  // Filed under another instance's key (it would shadow that instance), or another namespace's.
  for (const std::string& key : {etcd_namespace_prefix(r.ns) + r.component + "/other",
                                 std::string("/services/x/") + r.component + "/" + r.instance_id}) {
    kv.key = key;
    auto refused = record_from_etcd(kv);
    ASSERT_FALSE(refused.ok()) << key;
    EXPECT_EQ(refused.error().code, StatusCode::kInvalidArgument);
  }
  // Oversized, or not a record.
  kv.key = etcd_key_for(r);
  kv.value = std::string(64 * 1024 + 1, ' ');
  EXPECT_FALSE(record_from_etcd(kv).ok());
  kv.value = "[]";
  EXPECT_FALSE(record_from_etcd(kv).ok());
}

TEST(RegistryChoice, EtcdSchemesAndSecurity) {
  auto plain = choose_registry("etcd://127.0.0.1:2379,h:1");
  ASSERT_TRUE(plain.ok());
  EXPECT_EQ(plain->etcd_endpoints,
            (std::vector<std::string>{"http://127.0.0.1:2379", "http://h:1"}));
  for (const char* tls : {"etcds://127.0.0.1:2379", "https://127.0.0.1:2379"}) {
    auto r = choose_registry(tls);
    ASSERT_TRUE(r.ok()) << tls;
    EXPECT_EQ(r->etcd_endpoints, (std::vector<std::string>{"https://127.0.0.1:2379"}));
  }
  EtcdSecurity cert_only;
  cert_only.cert_file = "/c.pem";
  EXPECT_EQ(choose_registry("etcds://h:1", cert_only).error().code, StatusCode::kInvalidArgument);
  EtcdSecurity user_only;
  user_only.user = "root";
  EXPECT_EQ(choose_registry("etcd://h:1", user_only).error().code, StatusCode::kInvalidArgument);
  ::setenv("COMPANION_REGISTRY_CA", "/from-env.pem", 1);
  auto from_env = choose_registry("etcds://h:1");
  ::unsetenv("COMPANION_REGISTRY_CA");
  ASSERT_TRUE(from_env.ok());
  EXPECT_EQ(from_env->etcd_security.ca_file, "/from-env.pem");
}

// Sets or unsets an environment variable for a scope, restoring it afterwards.
class ScopedEnv {
 public:
  ScopedEnv(const char* name, const char* value) : name_(name) {
    if (const char* old = std::getenv(name)) old_ = old;
    if (value)
      ::setenv(name, value, 1);
    else
      ::unsetenv(name);
  }
  ~ScopedEnv() {
    if (old_)
      ::setenv(name_, old_->c_str(), 1);
    else
      ::unsetenv(name_);
  }
  ScopedEnv(const ScopedEnv&) = delete;
  ScopedEnv& operator=(const ScopedEnv&) = delete;

 private:
  const char* name_;
  std::optional<std::string> old_;
};

TEST(RegistryRuntimeDir, EnvPrecedence) {
  const std::string fallback = "/tmp/companion-" + std::to_string(::getuid());
  {
    ScopedEnv a("COMPANION_RUNTIME_DIR", "/srv/companion-rt");
    ScopedEnv b("XDG_RUNTIME_DIR", "/run/user/4321");
    EXPECT_EQ(default_runtime_dir(), "/srv/companion-rt");
  }
  {
    ScopedEnv a("COMPANION_RUNTIME_DIR", nullptr);
    ScopedEnv b("XDG_RUNTIME_DIR", "/run/user/4321");
    EXPECT_EQ(default_runtime_dir(), "/run/user/4321/companion");
  }
  {
    ScopedEnv a("COMPANION_RUNTIME_DIR", "");  // empty counts as unset
    ScopedEnv b("XDG_RUNTIME_DIR", "/run/user/4321/");
    EXPECT_EQ(default_runtime_dir(), "/run/user/4321/companion");
  }
  {
    ScopedEnv a("COMPANION_RUNTIME_DIR", nullptr);
    ScopedEnv b("XDG_RUNTIME_DIR", nullptr);
    EXPECT_EQ(default_runtime_dir(), fallback);
  }
  {
    ScopedEnv a("COMPANION_RUNTIME_DIR", nullptr);
    ScopedEnv b("XDG_RUNTIME_DIR", "");
    EXPECT_EQ(default_runtime_dir(), fallback);
  }
}

}  // namespace
}  // namespace companion::registry
