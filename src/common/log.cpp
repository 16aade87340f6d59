#include "common/log.hpp"

#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <ctime>
#include <mutex>
#include <optional>

#include "common/util.hpp"

namespace companion::log {
namespace {

// Guards the handler and is held while it runs: calls are serialised, and set_handler waits
// for a running call to return before the old user data may go.
std::mutex g_mutex;
Handler g_handler = nullptr;
void* g_user = nullptr;
Level g_min_level = Level::kWarn;
// g_handler ? g_min_level : kOff, read without the lock by debug()/info()/... .
std::atomic<Level> g_threshold{Level::kOff};
// Set while this thread runs the handler: what it logs meanwhile is dropped, and it may not
// swap the handler (it holds g_mutex).
thread_local bool t_in_handler = false;

void publish_threshold() {  // under g_mutex
  g_threshold.store(g_handler != nullptr ? g_min_level : Level::kOff);
}

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

// The server's line format; tests and operators parse it: keep it as it is.
void stderr_handler(void*, int level, const char* text) {
  auto now = std::chrono::system_clock::now();
  auto ms = std::chrono::duration_cast<std::chrono::milliseconds>(now.time_since_epoch()).count();
  std::time_t secs = static_cast<std::time_t>(ms / 1000);
  std::tm tm{};
  gmtime_r(&secs, &tm);
  char stamp[32];
  std::strftime(stamp, sizeof(stamp), "%H:%M:%S", &tm);
  std::fprintf(stderr, "%s.%03d companion[%d] %s: %s\n", stamp, static_cast<int>(ms % 1000),
               static_cast<int>(::getpid()), level_tag(static_cast<Level>(level)), text);
}

struct InHandler {
  InHandler() { t_in_handler = true; }
  ~InHandler() { t_in_handler = false; }
  InHandler(const InHandler&) = delete;
  InHandler& operator=(const InHandler&) = delete;
};

std::optional<Level> parse_level(const std::string& name) {
  static const struct {
    const char* name;
    Level level;
  } kLevels[] = {{"debug", Level::kDebug},
                 {"info", Level::kInfo},
                 {"warn", Level::kWarn},
                 {"error", Level::kError},
                 {"off", Level::kOff}};
  for (const auto& l : kLevels)
    if (name == l.name) return l.level;
  return std::nullopt;
}

}  // namespace

bool set_handler(Handler handler, void* user, Level min_level) {
  if (t_in_handler) return false;
  std::lock_guard<std::mutex> lock(g_mutex);
  g_handler = handler;
  g_user = user;
  g_min_level = min_level;
  publish_threshold();
  return true;
}

void to_stderr(Level min_level) {
  set_handler(stderr_handler, nullptr, min_level);
}

void set_level(Level l) {
  if (t_in_handler) return;
  std::lock_guard<std::mutex> lock(g_mutex);
  g_min_level = l;
  publish_threshold();
}

Level level() {
  return g_threshold.load(std::memory_order_relaxed);
}

bool set_level(const std::string& name) {
  std::optional<Level> parsed = parse_level(name);
  if (!parsed) return false;
  set_level(*parsed);
  return true;
}

void write(Level l, const std::string& message) {
  if (t_in_handler || l >= Level::kOff) return;
  // Messages carry tags, paths and names from peers and files: one line each, escaped, so that
  // nobody can forge a log line or send the operator's terminal escape sequences.
  std::string text = printable_text(message);
  std::lock_guard<std::mutex> lock(g_mutex);
  if (g_handler == nullptr || l < g_min_level) return;
  InHandler running;
  try {
    g_handler(g_user, static_cast<int>(l), text.c_str());
  } catch (...) {
    // A handler that throws loses its message; the code that logged goes on.
  }
}

}  // namespace companion::log
