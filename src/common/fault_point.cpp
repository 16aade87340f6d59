#include "common/fault_point.hpp"

#include <unistd.h>

#include <atomic>
#include <charconv>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <thread>
#include <vector>

namespace companion::fault {

namespace {

constexpr Stage kStages[] = {Stage::kOpen, Stage::kAllocate, Stage::kRead, Stage::kCopy,
                             Stage::kSeal, Stage::kExport,   Stage::kGrant};

struct Plan {
  enum class Action { kFail, kPause, kWait };
  Action action = Action::kFail;
  std::string until;  // kWait: the file whose existence ends the wait
  Stage stage = Stage::kOpen;
  uint64_t nth = 1;
  StatusCode code = StatusCode::kInternal;
  std::string path;  // substring the hit's path must contain; "" matches all
  std::atomic<uint64_t> hits{0};
};

// Never destroyed: a load thread left behind at shutdown may still pass a point at exit.
std::vector<Plan*>& plans = *new std::vector<Plan*>;

Result<void> parse_into(std::string_view spec, Plan& out) {
  const std::string whole(spec);
  auto bad = [&](const std::string& why) {
    return make_error(StatusCode::kInvalidArgument, "COMPANION_TEST_FAULT '" + whole + "': " + why);
  };
  bool have_point = false;
  while (!spec.empty()) {
    size_t comma = spec.find(',');
    std::string_view item = spec.substr(0, comma);
    spec = comma == std::string_view::npos ? std::string_view() : spec.substr(comma + 1);
    size_t eq = item.find('=');
    if (eq == std::string_view::npos) return bad("'" + std::string(item) + "' is not key=value");
    std::string_view key = item.substr(0, eq);
    std::string_view value = item.substr(eq + 1);
    if (key == "path") {
      out.path = std::string(value);
      continue;
    }
    if (key == "until") {
      out.until = std::string(value);
      continue;
    }
    if (key != "pause-at" && key != "fail-at" && key != "wait-at")
      return bad("unknown key '" + std::string(key) +
                 "' (pause-at, fail-at, wait-at, path, until)");
    if (have_point) return bad("one pause-at, fail-at or wait-at per point (points: ';')");
    have_point = true;
    out.action = key == "pause-at"  ? Plan::Action::kPause
                 : key == "wait-at" ? Plan::Action::kWait
                                    : Plan::Action::kFail;
    std::string_view code;
    if (out.action == Plan::Action::kFail) {
      size_t colon = value.find(':');
      if (colon == std::string_view::npos) return bad("fail-at=STAGE[@N]:CODE needs a CODE");
      code = value.substr(colon + 1);
      value = value.substr(0, colon);
    }
    size_t at = value.find('@');
    if (at != std::string_view::npos) {
      std::string_view n = value.substr(at + 1);
      auto [end, ec] = std::from_chars(n.data(), n.data() + n.size(), out.nth);
      if (ec != std::errc() || end != n.data() + n.size() || out.nth == 0)
        return bad("@N takes a count from 1");
      value = value.substr(0, at);
    }
    bool known = false;
    for (Stage s : kStages) {
      if (value == stage_name(s)) {
        out.stage = s;
        known = true;
      }
    }
    if (!known)
      return bad("unknown stage '" + std::string(value) +
                 "' (open, allocate, read, copy, seal, export, grant)");
    if (out.action == Plan::Action::kFail) {
      bool found = false;
#define COMPANION_X(cname, name, value, text) \
  if (code == #cname) {                       \
    out.code = StatusCode::k##name;           \
    found = true;                             \
  }
      COMPANION_STATUS_CODES(COMPANION_X)
#undef COMPANION_X
      if (!found || out.code == StatusCode::kOk)
        return bad("unknown status code '" + std::string(code) + "' (IO_ERROR, OUT_OF_MEMORY...)");
    }
  }
  if (!have_point) return bad("needs pause-at=STAGE, fail-at=STAGE:CODE or wait-at=STAGE");
  if ((out.action == Plan::Action::kWait) != !out.until.empty())
    return bad("until=FILE goes with wait-at, and only with it");
  return ok_result();
}

// Read once, before main: the hooks never look at the environment.
struct FromEnvironment {
  FromEnvironment() {
    const char* spec = std::getenv("COMPANION_TEST_FAULT");
    if (spec == nullptr || *spec == '\0') return;
    if (auto r = configure(spec); !r.ok()) {
      std::fprintf(stderr, "companion: %s\n", r.error().message.c_str());
      std::_Exit(2);
    }
  }
} from_environment;

}  // namespace

const char* stage_name(Stage stage) noexcept {
  switch (stage) {
    case Stage::kOpen:
      return "open";
    case Stage::kAllocate:
      return "allocate";
    case Stage::kRead:
      return "read";
    case Stage::kCopy:
      return "copy";
    case Stage::kSeal:
      return "seal";
    case Stage::kExport:
      return "export";
    case Stage::kGrant:
      return "grant";
  }
  return "?";
}

namespace detail {

bool armed = false;

Result<void> hit(Stage stage, std::string_view path) {
  for (Plan* plan : plans) {
    if (stage != plan->stage) continue;
    if (!plan->path.empty() && path.find(plan->path) == std::string_view::npos) continue;
    if (plan->hits.fetch_add(1, std::memory_order_relaxed) + 1 != plan->nth) continue;
    std::string where = std::string(stage_name(stage)) + " " + std::string(path);
    // Written straight to stderr whatever the log level: tests wait for these lines.
    if (plan->action == Plan::Action::kPause) {
      std::fprintf(stderr, "companion: fault point: paused at %s (pid %d); waiting to be killed\n",
                   where.c_str(), static_cast<int>(::getpid()));
      std::fflush(stderr);
      for (;;) ::sleep(60);
    }
    if (plan->action == Plan::Action::kWait) {
      std::fprintf(stderr, "companion: fault point: waiting at %s until %s exists\n", where.c_str(),
                   plan->until.c_str());
      std::fflush(stderr);
      while (::access(plan->until.c_str(), F_OK) != 0)
        std::this_thread::sleep_for(std::chrono::milliseconds(10));
      std::fprintf(stderr, "companion: fault point: going on from %s\n", where.c_str());
      std::fflush(stderr);
      continue;
    }
    return make_error(plan->code, where + ": injected " + status_code_text(plan->code) +
                                      " (COMPANION_TEST_FAULT)");
  }
  return ok_result();
}

}  // namespace detail

Result<void> configure(std::string_view spec) {
  if (spec.empty()) {
    detail::armed = false;
    return ok_result();
  }
  std::vector<Plan*> parsed;
  auto discard = [&] {
    for (Plan* p : parsed) delete p;
  };
  while (true) {
    size_t semicolon = spec.find(';');
    auto* plan = new Plan;
    parsed.push_back(plan);
    if (auto r = parse_into(spec.substr(0, semicolon), *plan); !r.ok()) {
      discard();
      return r;
    }
    if (semicolon == std::string_view::npos) break;
    spec = spec.substr(semicolon + 1);
  }
  for (Plan* p : plans) delete p;  // no hook runs now (see the header)
  plans = std::move(parsed);
  detail::armed = true;
  return ok_result();
}

}  // namespace companion::fault
