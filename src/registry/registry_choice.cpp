#include <cstdlib>

#include "registry/etcd_client.hpp"
#include "registry/registry.hpp"

namespace companion::registry {

Result<RegistryChoice> choose_registry(const std::string& configured) {
  std::string url = configured;
  if (url.empty()) {
    const char* env = std::getenv("COMPANION_REGISTRY");
    url = env != nullptr ? env : "";
  }
  RegistryChoice choice;
  if (url.empty() || url == "local") return choice;
  if (url.rfind("etcd://", 0) != 0)
    return make_error(StatusCode::kInvalidArgument,
                      "registry '" + url + "': use local or etcd://host:port[,host:port]");
  COMPANION_ASSIGN_OR_RETURN(choice.etcd_endpoints, parse_etcd_endpoints(url));
  choice.url = url;
  return choice;
}

}  // namespace companion::registry
