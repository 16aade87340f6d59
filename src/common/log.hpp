// Minimal leveled logging to stderr. The server logs; libraries stay quiet unless asked.
#pragma once

#include <string>

namespace companion::log {

enum class Level { kDebug = 0, kInfo = 1, kWarn = 2, kError = 3, kOff = 4 };

void set_level(Level level);
Level level();
// Parses "debug|info|warn|error|off"; unknown names leave the level unchanged and return false.
bool set_level(const std::string& name);
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
