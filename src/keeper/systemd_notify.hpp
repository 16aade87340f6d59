// systemd's notification socket, besides the file-descriptor store: a server run as a
// Type=notify service says when it serves (READY=1, so that `systemctl start` returns once clients
// can connect, and units ordered after it start then) and when it stops (STOPPING=1), with a
// STATUS= line that `systemctl status` shows.
#pragma once

#include <string>

#include "companion/result.hpp"

namespace companion::keeper {

// Sends state ("READY=1\nSTATUS=...") to systemd. False when NOTIFY_SOCKET is not set (not run
// by systemd, or by a unit that accepts no notifications); kUnavailable when it is set but this
// build has no libsystemd, or the send failed.
Result<bool> notify_systemd(const std::string& state);

}  // namespace companion::keeper
