// Leveled logging through one process-wide handler. Nothing is written until a handler is
// installed: the `companion` binary installs stderr (to_stderr), a host of the library installs
// its own (companion_set_log_handler), so that the library never writes to its host's stderr
// unasked.
#pragma once

#include <string>

namespace companion::log {

// The values are the C ABI's COMPANION_LOG_* constants.
enum class Level { kDebug = 0, kInfo = 1, kWarn = 2, kError = 3, kOff = 4 };

// Receives one message: a single line of printable UTF-8 (control bytes escaped as \n, \xNN),
// and its Level as an int: the shape of the C ABI's companion_log_fn, whose functions are
// installed as they are.
using Handler = void (*)(void* user, int level, const char* message);

// Sends the messages at min_level and above to handler(user, ...); a null handler (the default)
// sends them nowhere. Calls of the handler are serialised, from whichever thread logs. When
// set_handler returns, the previous handler has returned from every call and is never called
// again: its user data may be freed. Messages logged on a thread while it runs the handler are
// dropped (no recursion). Returns false, changing nothing, when called from inside the handler
// (it would wait for itself).
bool set_handler(Handler handler, void* user, Level min_level);
// The server's sink: "HH:MM:SS.mmm companion[pid] level: message" lines on stderr.
void to_stderr(Level min_level);

// The current handler's threshold (kept for the next handler when there is none).
void set_level(Level level);
// Parses "debug|info|warn|error|off"; unknown names leave the level unchanged and return false.
bool set_level(const std::string& name);
// The level a message needs to reach the handler: kOff while there is none, so that messages
// nobody receives take no lock.
Level level();
void write(Level level, const std::string& message);

inline void debug(const std::string& m) {
  if (level() <= Level::kDebug) write(Level::kDebug, m);
}
inline void info(const std::string& m) {
  if (level() <= Level::kInfo) write(Level::kInfo, m);
}
inline void warn(const std::string& m) {
  if (level() <= Level::kWarn) write(Level::kWarn, m);
}
inline void error(const std::string& m) {
  if (level() <= Level::kError) write(Level::kError, m);
}

}  // namespace companion::log
