// One overall time limit for a wait made of several steps (poll for a frame, retry a connect,
// wait for the next status event, fail over to another server): each step waits for what is
// left of it. Negative timeouts mean no limit, as for poll().
#pragma once

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <limits>

namespace companion {

class Deadline {
 public:
  using Clock = std::chrono::steady_clock;

  // timeout_ms from now; none when timeout_ms < 0.
  static Deadline after_ms(int64_t timeout_ms) noexcept {
    if (timeout_ms < 0) return Deadline();
    return Deadline(Clock::now() + std::chrono::milliseconds(timeout_ms));
  }
  // seconds from now, rounded to the nearest millisecond; none when seconds < 0.
  static Deadline after_seconds(double seconds) noexcept {
    if (seconds < 0) return Deadline();
    const double ms = seconds * 1000.0 + 0.5;
    constexpr double kMax = static_cast<double>(std::numeric_limits<int32_t>::max());
    return after_ms(static_cast<int64_t>(std::min(ms, kMax)));
  }
  // No limit.
  Deadline() noexcept = default;

  bool unlimited() const noexcept { return unlimited_; }
  // True once the limit has passed; never without one.
  bool expired() const noexcept { return !unlimited_ && Clock::now() >= at_; }
  // What is left in milliseconds, for poll(): -1 without a limit, 0 once passed (a last poll
  // still reads what is already there), at most INT_MAX.
  int remaining_ms() const noexcept {
    if (unlimited_) return -1;
    const int64_t left =
        std::chrono::duration_cast<std::chrono::milliseconds>(at_ - Clock::now()).count();
    return static_cast<int>(std::clamp<int64_t>(left, 0, std::numeric_limits<int>::max()));
  }
  // What is left in seconds (remaining_ms() / 1000): -1 without a limit.
  double remaining_s() const noexcept { return unlimited_ ? -1.0 : remaining_ms() / 1000.0; }

 private:
  explicit Deadline(Clock::time_point at) noexcept : unlimited_(false), at_(at) {}

  bool unlimited_ = true;
  Clock::time_point at_{};
};

}  // namespace companion
