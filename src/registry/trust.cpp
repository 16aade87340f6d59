// Whom a process trusts in the local registry: owners of the runtime directory, records and
// sockets; and the settings that secure etcd.
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdlib>
#include <string>

#include "registry/registry.hpp"

namespace companion::registry {
namespace {

std::string env_or_empty(const char* name) {
  const char* value = std::getenv(name);
  return value != nullptr ? value : "";
}

}  // namespace

TrustPolicy::TrustPolicy() {
  uids_.push_back(::getuid());
  if (::getuid() != 0) uids_.push_back(0);
}

Result<TrustPolicy> TrustPolicy::from_environment(const std::vector<uint32_t>& extra) {
  TrustPolicy policy;
  for (uint32_t uid : extra) policy.uids_.push_back(static_cast<uid_t>(uid));
  const std::string listed = env_or_empty("COMPANION_TRUST_UID");
  size_t start = 0;
  while (start <= listed.size() && !listed.empty()) {
    size_t comma = listed.find(',', start);
    std::string item =
        listed.substr(start, comma == std::string::npos ? std::string::npos : comma - start);
    uint64_t uid = 0;
    bool valid = !item.empty() && item.size() <= 10;
    for (char c : item) {
      if (c < '0' || c > '9') {
        valid = false;
        break;
      }
      uid = uid * 10 + static_cast<uint64_t>(c - '0');
    }
    if (!valid || uid >= 0xFFFFFFFFu)
      return make_error(StatusCode::kInvalidArgument,
                        "COMPANION_TRUST_UID='" + listed + "' is not a comma-separated uid list");
    policy.uids_.push_back(static_cast<uid_t>(uid));
    if (comma == std::string::npos) break;
    start = comma + 1;
  }
  std::sort(policy.uids_.begin(), policy.uids_.end());
  policy.uids_.erase(std::unique(policy.uids_.begin(), policy.uids_.end()), policy.uids_.end());
  return policy;
}

bool TrustPolicy::allows(uid_t uid) const noexcept {
  return std::find(uids_.begin(), uids_.end(), uid) != uids_.end();
}

std::string TrustPolicy::describe() const {
  std::string out = "uid";
  for (size_t i = 0; i < uids_.size(); ++i) out += (i == 0 ? " " : ", ") + std::to_string(uids_[i]);
  return out;
}

Result<uid_t> trusted_socket_owner(const std::string& path, const TrustPolicy& trust) {
  struct stat st {};
  if (::lstat(path.c_str(), &st) != 0) {
    int err = errno;
    if (err == ENOENT) return errno_error(StatusCode::kUnavailable, "socket " + path, err);
    return errno_error(StatusCode::kIoError, "stat " + path, err);
  }
  if (!S_ISSOCK(st.st_mode))
    return make_error(StatusCode::kNotPermitted, path + " is not a socket");
  if (!trust.allows(st.st_uid))
    return make_error(StatusCode::kNotPermitted, "socket " + path + " belongs to uid " +
                                                     std::to_string(st.st_uid) +
                                                     ", not a trusted owner (" + trust.describe() +
                                                     "; COMPANION_TRUST_UID adds others)");
  return st.st_uid;
}

EtcdSecurity etcd_security_from_environment(EtcdSecurity given) {
  auto fill = [](std::string& field, const char* env) {
    if (field.empty()) field = env_or_empty(env);
  };
  fill(given.ca_file, "COMPANION_REGISTRY_CA");
  fill(given.cert_file, "COMPANION_REGISTRY_CERT");
  fill(given.key_file, "COMPANION_REGISTRY_KEY");
  fill(given.user, "COMPANION_REGISTRY_USER");
  fill(given.password_file, "COMPANION_REGISTRY_PASSWORD_FILE");
  return given;
}

}  // namespace companion::registry
