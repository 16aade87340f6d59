// companion_set_log_handler: the library's messages reach the host's handler at its level and
// above, and nowhere by default (stderr included). The message is a real one: discovery skipping
// a registry record that is not a regular file ("ignoring registry record ..."), logged once per
// record path, so every call plants a new one.
//
// CapiLogDefault runs first in a process of its own too (ctest capi_log_default): there it sees
// the library as no handler has ever been set.
#include <fcntl.h>
#include <unistd.h>

#include <atomic>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include <gtest/gtest.h>

#include "companion/companion.h"

namespace {

namespace fs = std::filesystem;

std::string temp_dir() {
  const char* base = std::getenv("TMPDIR");
  std::string pattern =
      std::string(base != nullptr && *base != '\0' ? base : "/tmp") + "/companion-log-XXXXXX";
  std::vector<char> buf(pattern.begin(), pattern.end());
  buf.push_back('\0');
  char* dir = ::mkdtemp(buf.data());
  return dir == nullptr ? std::string() : fs::canonical(dir).string();
}

// A runtime directory whose one record, planted.json, is a directory.
struct PlantedRecord {
  std::string runtime_dir = temp_dir();
  std::string record = runtime_dir + "/planted.json";
  PlantedRecord() { fs::create_directory(record); }
  ~PlantedRecord() {
    std::error_code ec;
    fs::remove_all(runtime_dir, ec);
  }
};

// Looks for a server in a fresh planted runtime directory, once: none is there, and discovery
// warns that it skips the record. Returns the record's path.
std::string discover_past_a_planted_record() {
  PlantedRecord planted;
  companion_connect_options o;
  companion_connect_options_init(&o);
  o.runtime_dir = planted.runtime_dir.c_str();
  o.registry = "local";
  companion_client* client = nullptr;
  EXPECT_EQ(companion_client_connect(&o, &client), COMPANION_UNAVAILABLE);
  if (client != nullptr) companion_client_close(client);
  return planted.record;
}

struct Received {
  std::mutex mutex;
  std::vector<std::pair<int, std::string>> messages;

  bool has(int level, const std::string& part) {
    std::lock_guard<std::mutex> lock(mutex);
    for (const auto& [l, m] : messages)
      if (l == level && m.find(part) != std::string::npos) return true;
    return false;
  }
  size_t size() {
    std::lock_guard<std::mutex> lock(mutex);
    return messages.size();
  }
};

void receive(void* user, int level, const char* message) {
  auto* received = static_cast<Received*>(user);
  std::lock_guard<std::mutex> lock(received->mutex);
  received->messages.emplace_back(level, message);
}

// Points fd 2 at a file while it lives; text() restores it and returns what was written.
class StderrCapture {
 public:
  StderrCapture() : dir_(temp_dir()), path_(dir_ + "/stderr") {
    std::fflush(stderr);
    saved_ = ::dup(STDERR_FILENO);
    int fd = ::open(path_.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    ::dup2(fd, STDERR_FILENO);
    ::close(fd);
  }
  ~StderrCapture() {
    restore();
    std::error_code ec;
    fs::remove_all(dir_, ec);
  }
  std::string text() {
    restore();
    std::ifstream f(path_);
    return std::string(std::istreambuf_iterator<char>(f), std::istreambuf_iterator<char>());
  }

 private:
  void restore() {
    if (saved_ < 0) return;
    std::fflush(stderr);
    ::dup2(saved_, STDERR_FILENO);
    ::close(saved_);
    saved_ = -1;
  }
  std::string dir_;
  std::string path_;
  int saved_ = -1;
};

// Every test leaves the library as it found it: no handler.
class CapiLog : public ::testing::Test {
 protected:
  void TearDown() override {
    EXPECT_EQ(companion_set_log_handler(nullptr, nullptr, COMPANION_LOG_OFF), COMPANION_OK);
  }
};

TEST(CapiLogDefault, NothingReachesStderrUntilAHandlerIsSet) {
  Received received;
  StderrCapture captured;
  std::string unheard = discover_past_a_planted_record();
  ASSERT_EQ(companion_set_log_handler(receive, &received, COMPANION_LOG_WARN), COMPANION_OK);
  std::string heard = discover_past_a_planted_record();
  EXPECT_EQ(companion_set_log_handler(nullptr, nullptr, COMPANION_LOG_OFF), COMPANION_OK);
  EXPECT_EQ(captured.text(), "");
  // The same action logs once there is a handler, and only then.
  EXPECT_TRUE(received.has(COMPANION_LOG_WARN, "ignoring registry record " + heard));
  EXPECT_FALSE(received.has(COMPANION_LOG_WARN, unheard));
}

TEST_F(CapiLog, TheHandlerReceivesTheLibrarysWarningWithItsUserPointer) {
  Received received;
  ASSERT_EQ(companion_set_log_handler(receive, &received, COMPANION_LOG_WARN), COMPANION_OK);
  std::string record = discover_past_a_planted_record();
  EXPECT_TRUE(received.has(COMPANION_LOG_WARN, "ignoring registry record " + record));
  std::lock_guard<std::mutex> lock(received.mutex);
  for (const auto& [level, message] : received.messages) {
    EXPECT_EQ(message.find('\n'), std::string::npos) << message;
    EXPECT_GE(level, COMPANION_LOG_WARN) << message;
  }
}

TEST_F(CapiLog, MinLevelFilters) {
  Received received;
  ASSERT_EQ(companion_set_log_handler(receive, &received, COMPANION_LOG_ERROR), COMPANION_OK);
  std::string above_the_warning = discover_past_a_planted_record();
  ASSERT_EQ(companion_set_log_handler(receive, &received, COMPANION_LOG_OFF), COMPANION_OK);
  std::string off = discover_past_a_planted_record();
  EXPECT_EQ(received.size(), 0u);

  ASSERT_EQ(companion_set_log_handler(receive, &received, COMPANION_LOG_DEBUG), COMPANION_OK);
  std::string debug = discover_past_a_planted_record();
  EXPECT_TRUE(received.has(COMPANION_LOG_WARN, debug));
  EXPECT_FALSE(received.has(COMPANION_LOG_WARN, above_the_warning));
  EXPECT_FALSE(received.has(COMPANION_LOG_WARN, off));
}

TEST_F(CapiLog, ANullHandlerIsSilentAgain) {
  Received received;
  ASSERT_EQ(companion_set_log_handler(receive, &received, COMPANION_LOG_DEBUG), COMPANION_OK);
  ASSERT_EQ(companion_set_log_handler(nullptr, &received, COMPANION_LOG_DEBUG), COMPANION_OK);
  StderrCapture captured;
  discover_past_a_planted_record();
  EXPECT_EQ(captured.text(), "");
  EXPECT_EQ(received.size(), 0u);
}

TEST_F(CapiLog, ALevelOutsideTheListIsRefusedAndChangesNothing) {
  Received received;
  ASSERT_EQ(companion_set_log_handler(receive, &received, COMPANION_LOG_WARN), COMPANION_OK);
  EXPECT_EQ(companion_set_log_handler(nullptr, nullptr, -1), COMPANION_INVALID_ARGUMENT);
  EXPECT_NE(std::string(companion_last_error()).find("min_level"), std::string::npos);
  EXPECT_EQ(companion_set_log_handler(nullptr, nullptr, COMPANION_LOG_OFF + 1),
            COMPANION_INVALID_ARGUMENT);
  std::string record = discover_past_a_planted_record();
  EXPECT_TRUE(received.has(COMPANION_LOG_WARN, record));
}

// A handler may not swap itself: it would wait for its own call to end. The call fails instead
// and the handler stays.
struct SelfSwapping {
  Received received;
  std::atomic<int> calls{0};
  std::atomic<int> swap_status{-1};
};

void self_swapping(void* user, int level, const char* message) {
  auto* s = static_cast<SelfSwapping*>(user);
  receive(&s->received, level, message);
  if (s->calls.fetch_add(1) == 0)
    s->swap_status = companion_set_log_handler(nullptr, nullptr, COMPANION_LOG_OFF);
}

TEST_F(CapiLog, TheHandlerCannotReplaceItself) {
  SelfSwapping s;
  ASSERT_EQ(companion_set_log_handler(self_swapping, &s, COMPANION_LOG_WARN), COMPANION_OK);
  std::string record = discover_past_a_planted_record();
  EXPECT_TRUE(s.received.has(COMPANION_LOG_WARN, record));
  EXPECT_EQ(s.swap_status, COMPANION_INVALID_ARGUMENT);
  std::string later = discover_past_a_planted_record();
  EXPECT_TRUE(s.received.has(COMPANION_LOG_WARN, later));
}

// The guarantee that lets a host free a handler's data: once companion_set_log_handler has
// returned, the handler it replaced is not running and never runs again. One thread logs while
// another swaps handlers; each handler counts the calls it gets after its retirement.
struct Retirable {
  std::atomic<bool> retired{false};
  std::atomic<int> calls{0};
  std::atomic<int> calls_after_retirement{0};
};

void retirable(void* user, int, const char*) {
  auto* r = static_cast<Retirable*>(user);
  r->calls.fetch_add(1);
  // Widen the window in which a swap could overtake a running call.
  std::this_thread::yield();
  if (r->retired.load()) r->calls_after_retirement.fetch_add(1);
}

TEST_F(CapiLog, AReplacedHandlerIsNeverCalledAgain) {
  constexpr int kMessages = 200;
  std::vector<std::unique_ptr<Retirable>> handlers;
  handlers.push_back(std::make_unique<Retirable>());
  ASSERT_EQ(companion_set_log_handler(retirable, handlers.back().get(), COMPANION_LOG_WARN),
            COMPANION_OK);
  std::atomic<bool> done{false};
  std::thread logger([&] {
    for (int i = 0; i < kMessages; ++i) discover_past_a_planted_record();
    done = true;
  });
  while (!done.load()) {
    Retirable* previous = handlers.back().get();
    handlers.push_back(std::make_unique<Retirable>());
    ASSERT_EQ(companion_set_log_handler(retirable, handlers.back().get(), COMPANION_LOG_WARN),
              COMPANION_OK);
    previous->retired = true;
    std::this_thread::yield();
  }
  logger.join();
  int calls = 0;
  for (const auto& h : handlers) {
    calls += h->calls;
    EXPECT_EQ(h->calls_after_retirement, 0);
  }
  EXPECT_EQ(calls, kMessages);
  EXPECT_GT(handlers.size(), 2u);
}

}  // namespace
