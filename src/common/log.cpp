#include "common/log.hpp"

#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <ctime>
#include <mutex>

#include "common/util.hpp"

namespace companion::log {
namespace {
std::atomic<Level> g_level{Level::kWarn};
std::mutex g_mutex;
const char* level_tag(Level l) {
  switch (l) {
    case Level::kDebug:
      return "debug";
    case Level::kInfo:
      return "info";
    case Level::kWarn:
      return "warn";
    case Level::kError:
      return "error";
    default:
      return "";
  }
}
}  // namespace

void set_level(Level l) {
  g_level.store(l);
}
Level level() {
  return g_level.load(std::memory_order_relaxed);
}

bool set_level(const std::string& name) {
  static const struct {
    const char* name;
    Level level;
  } kLevels[] = {{"debug", Level::kDebug},
                 {"info", Level::kInfo},
                 {"warn", Level::kWarn},
                 {"error", Level::kError},
                 {"off", Level::kOff}};
  for (const auto& l : kLevels) {
    if (name == l.name) {
      set_level(l.level);
      return true;
    }
  }
  return false;
}

void write(Level l, const std::string& message) {
  auto now = std::chrono::system_clock::now();
  auto ms = std::chrono::duration_cast<std::chrono::milliseconds>(now.time_since_epoch()).count();
  std::time_t secs = static_cast<std::time_t>(ms / 1000);
  std::tm tm{};
  gmtime_r(&secs, &tm);
  char stamp[32];
  std::strftime(stamp, sizeof(stamp), "%H:%M:%S", &tm);
  // Messages carry tags, paths and names from peers and files: one line each, escaped, so that
  // nobody can forge a log line or send the operator's terminal escape sequences.
  std::string text = printable_text(message);
  std::lock_guard<std::mutex> lock(g_mutex);
  std::fprintf(stderr, "%s.%03d companion[%d] %s: %s\n", stamp, static_cast<int>(ms % 1000),
               static_cast<int>(::getpid()), level_tag(l), text.c_str());
}

}  // namespace companion::log
