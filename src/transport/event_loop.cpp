#include "transport/event_loop.hpp"

#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/timerfd.h>
#include <unistd.h>

#include <cerrno>

namespace companion::transport {
namespace {
constexpr EventLoop::Token kWakeToken = 0;
}

Result<std::unique_ptr<EventLoop>> EventLoop::create() {
  UniqueFd ep(::epoll_create1(EPOLL_CLOEXEC));
  if (!ep) return errno_error(StatusCode::kIoError, "epoll_create1", errno);
  UniqueFd wake(::eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC));
  if (!wake) return errno_error(StatusCode::kIoError, "eventfd", errno);
  epoll_event ev{};
  ev.events = EPOLLIN;
  ev.data.u64 = kWakeToken;
  if (::epoll_ctl(ep.get(), EPOLL_CTL_ADD, wake.get(), &ev) != 0)
    return errno_error(StatusCode::kIoError, "epoll_ctl", errno);
  return std::unique_ptr<EventLoop>(new EventLoop(std::move(ep), std::move(wake)));
}

EventLoop::EventLoop(UniqueFd epoll, UniqueFd wake)
    : epoll_(std::move(epoll)), wake_(std::move(wake)) {}

EventLoop::~EventLoop() = default;

Result<EventLoop::Token> EventLoop::add(int fd, uint32_t events, Handler handler) {
  Token token = next_token_++;
  epoll_event ev{};
  ev.events = events;
  ev.data.u64 = token;
  if (::epoll_ctl(epoll_.get(), EPOLL_CTL_ADD, fd, &ev) != 0)
    return errno_error(StatusCode::kIoError, "epoll_ctl add", errno);
  entries_[token] = Entry{fd, std::make_shared<Handler>(std::move(handler))};
  return token;
}

Result<void> EventLoop::modify(Token token, uint32_t events) {
  auto it = entries_.find(token);
  if (it == entries_.end()) return make_error(StatusCode::kInternal, "unknown loop token");
  epoll_event ev{};
  ev.events = events;
  ev.data.u64 = token;
  if (::epoll_ctl(epoll_.get(), EPOLL_CTL_MOD, it->second.fd, &ev) != 0)
    return errno_error(StatusCode::kIoError, "epoll_ctl mod", errno);
  return ok_result();
}

void EventLoop::remove(Token token) {
  auto it = entries_.find(token);
  if (it == entries_.end()) return;
  ::epoll_ctl(epoll_.get(), EPOLL_CTL_DEL, it->second.fd, nullptr);
  entries_.erase(it);
}

void EventLoop::post(std::function<void()> task) {
  {
    std::lock_guard<std::mutex> lock(posted_mutex_);
    posted_.push_back(std::move(task));
  }
  uint64_t one = 1;
  ssize_t ignored = ::write(wake_.get(), &one, sizeof(one));
  (void)ignored;  // a full counter still wakes the loop
}

void EventLoop::stop() {
  post([this] { stopping_ = true; });
}

void EventLoop::drain_posted() {
  uint64_t count;
  while (::read(wake_.get(), &count, sizeof(count)) > 0) {
  }
  std::vector<std::function<void()>> tasks;
  {
    std::lock_guard<std::mutex> lock(posted_mutex_);
    tasks.swap(posted_);
  }
  for (auto& task : tasks) task();
}

void EventLoop::run() {
  constexpr int kBatch = 64;
  epoll_event events[kBatch];
  while (!stopping_) {
    int n = ::epoll_wait(epoll_.get(), events, kBatch, -1);
    if (n < 0) {
      if (errno == EINTR) continue;
      return;
    }
    for (int i = 0; i < n && !stopping_; ++i) {
      Token token = events[i].data.u64;
      if (token == kWakeToken) {
        drain_posted();
        continue;
      }
      auto it = entries_.find(token);
      if (it == entries_.end()) continue;                     // removed earlier in this batch
      std::shared_ptr<Handler> handler = it->second.handler;  // survives its own removal
      (*handler)(events[i].events);
    }
  }
}

Result<std::unique_ptr<Timer>> Timer::create(EventLoop& loop, std::function<void()> fire) {
  UniqueFd fd(::timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC));
  if (!fd) return errno_error(StatusCode::kIoError, "timerfd_create", errno);
  std::unique_ptr<Timer> timer(new Timer(loop, std::move(fd)));
  timer->fire_ = std::move(fire);
  Timer* raw = timer.get();
  COMPANION_ASSIGN_OR_RETURN(timer->token_, loop.add(raw->fd_.get(), EPOLLIN, [raw](uint32_t) {
    uint64_t expirations = 0;
    if (::read(raw->fd_.get(), &expirations, sizeof(expirations)) != sizeof(expirations)) return;
    raw->fire_();
  }));
  return timer;
}

Timer::~Timer() {
  loop_.remove(token_);
}

Result<void> Timer::arm(std::chrono::nanoseconds delay, std::chrono::nanoseconds interval) {
  auto to_timespec = [](std::chrono::nanoseconds d) {
    timespec t{};
    t.tv_sec = static_cast<time_t>(d.count() / 1'000'000'000);
    t.tv_nsec = static_cast<long>(d.count() % 1'000'000'000);
    return t;
  };
  itimerspec spec{};
  // A zero it_value would disarm: the shortest real delay instead.
  spec.it_value = to_timespec(delay.count() > 0 ? delay : std::chrono::nanoseconds(1));
  spec.it_interval = to_timespec(interval);
  if (::timerfd_settime(fd_.get(), 0, &spec, nullptr) != 0)
    return errno_error(StatusCode::kIoError, "timerfd_settime", errno);
  return ok_result();
}

void Timer::disarm() {
  itimerspec spec{};
  ::timerfd_settime(fd_.get(), 0, &spec, nullptr);
}

}  // namespace companion::transport
