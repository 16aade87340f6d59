#include <cstdlib>

#include "registry/etcd_client.hpp"
#include "registry/registry.hpp"

namespace companion::registry {

Result<RegistryChoice> choose_registry(const std::string& configured,
                                       const EtcdSecurity& security) {
  std::string url = configured;
  if (url.empty()) {
    const char* env = std::getenv("COMPANION_REGISTRY");
    url = env != nullptr ? env : "";
  }
  RegistryChoice choice;
  if (url.empty() || url == "local") return choice;
  if (url.rfind("etcd://", 0) != 0 && url.rfind("etcds://", 0) != 0 &&
      url.rfind("https://", 0) != 0)
    return make_error(
        StatusCode::kInvalidArgument,
        "registry '" + url + "': use local, etcd://host:port[,host:port] or etcds://... (TLS)");
  COMPANION_ASSIGN_OR_RETURN(choice.etcd_endpoints, parse_etcd_endpoints(url));
  choice.url = url;
  choice.etcd_security = etcd_security_from_environment(security);
  const EtcdSecurity& sec = choice.etcd_security;
  if (sec.cert_file.empty() != sec.key_file.empty())
    return make_error(StatusCode::kInvalidArgument,
                      "etcd client certificate and key go together (--registry-cert with "
                      "--registry-key, or COMPANION_REGISTRY_CERT with COMPANION_REGISTRY_KEY)");
  if (!sec.user.empty() && sec.password_file.empty())
    return make_error(StatusCode::kInvalidArgument,
                      "etcd user '" + sec.user +
                          "' needs a password file (--registry-password-file or "
                          "COMPANION_REGISTRY_PASSWORD_FILE)");
  return choice;
}

}  // namespace companion::registry
