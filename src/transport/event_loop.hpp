// A single-threaded epoll loop. Other threads hand it work with post(); everything registered
// runs on the loop's thread.
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <unordered_map>
#include <vector>

#include "common/unique_fd.hpp"
#include "companion/result.hpp"

namespace companion::transport {

class EventLoop {
 public:
  using Handler = std::function<void(uint32_t events)>;
  using Token = uint64_t;

  static Result<std::unique_ptr<EventLoop>> create();
  ~EventLoop();

  // Watches fd for `events` (EPOLLIN, EPOLLOUT...). The token identifies the registration, so a
  // reused fd number never receives a stale event. Loop thread only.
  Result<Token> add(int fd, uint32_t events, Handler handler);
  Result<void> modify(Token token, uint32_t events);
  void remove(Token token);

  // Runs task on the loop thread soon. Thread-safe.
  void post(std::function<void()> task);
  // Runs until stop(). Returns when stopped.
  void run();
  // Thread-safe; also safe from a signal-handling thread.
  void stop();

 private:
  EventLoop(UniqueFd epoll, UniqueFd wake);
  void drain_posted();

  struct Entry {
    int fd;
    std::shared_ptr<Handler> handler;
  };
  UniqueFd epoll_;
  UniqueFd wake_;  // eventfd
  std::unordered_map<Token, Entry> entries_;
  Token next_token_ = 1;
  std::mutex posted_mutex_;
  std::vector<std::function<void()>> posted_;
  bool stopping_ = false;
};

// A timerfd watched by a loop: runs `fire` on the loop thread when it expires. Loop thread only;
// must not outlive its loop.
class Timer {
 public:
  static Result<std::unique_ptr<Timer>> create(EventLoop& loop, std::function<void()> fire);
  ~Timer();
  Timer(const Timer&) = delete;
  Timer& operator=(const Timer&) = delete;

  // Fires once after `delay`, then every `interval` (zero: only once). Re-arming replaces.
  Result<void> arm(std::chrono::nanoseconds delay, std::chrono::nanoseconds interval = {});
  void disarm();

 private:
  Timer(EventLoop& loop, UniqueFd fd) : loop_(loop), fd_(std::move(fd)) {}
  EventLoop& loop_;
  UniqueFd fd_;
  EventLoop::Token token_ = 0;
  std::function<void()> fire_;
};

}  // namespace companion::transport
