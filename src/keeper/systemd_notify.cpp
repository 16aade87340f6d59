#include "keeper/systemd_notify.hpp"

#include <cstdlib>

#ifdef COMPANION_HAVE_SYSTEMD
#include <systemd/sd-daemon.h>
#endif

namespace companion::keeper {

Result<bool> notify_systemd(const std::string& state) {
  const char* socket = std::getenv("NOTIFY_SOCKET");
  if (socket == nullptr || *socket == '\0') return false;
#ifdef COMPANION_HAVE_SYSTEMD
  // NOTIFY_SOCKET stays set: the file-descriptor store sends on it for the server's whole life.
  int r = ::sd_notify(0, state.c_str());
  if (r < 0) return errno_error(StatusCode::kUnavailable, "sd_notify", -r);
  return r > 0;
#else
  (void)state;
  return make_error(StatusCode::kUnavailable,
                    "this companion was built without libsystemd (libsystemd-dev)");
#endif
}

}  // namespace companion::keeper
