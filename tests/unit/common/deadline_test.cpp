// Deadline: the one helper behind every "wait at most N ms over several steps" loop.
#include "common/deadline.hpp"

#include <gtest/gtest.h>

#include <chrono>
#include <climits>
#include <thread>

namespace companion {
namespace {

TEST(Deadline, NegativeTimeoutsMeanNoLimit) {
  for (const Deadline& d : {Deadline(), Deadline::after_ms(-1), Deadline::after_seconds(-0.5)}) {
    EXPECT_TRUE(d.unlimited());
    EXPECT_FALSE(d.expired());
    EXPECT_EQ(d.remaining_ms(), -1);  // poll() waits for ever
    EXPECT_EQ(d.remaining_s(), -1.0);
  }
}

TEST(Deadline, ZeroIsAlreadyPassedButStillPollsOnce) {
  const Deadline d = Deadline::after_ms(0);
  EXPECT_FALSE(d.unlimited());
  EXPECT_TRUE(d.expired());
  EXPECT_EQ(d.remaining_ms(), 0);
  EXPECT_EQ(d.remaining_s(), 0.0);
}

TEST(Deadline, CountsDownAndStopsAtZero) {
  const Deadline d = Deadline::after_ms(60'000);
  EXPECT_FALSE(d.expired());
  EXPECT_LE(d.remaining_ms(), 60'000);
  EXPECT_GT(d.remaining_ms(), 55'000);
  EXPECT_NEAR(d.remaining_s(), d.remaining_ms() / 1000.0, 0.5);

  const Deadline soon = Deadline::after_ms(20);
  std::this_thread::sleep_for(std::chrono::milliseconds(40));
  EXPECT_TRUE(soon.expired());
  EXPECT_EQ(soon.remaining_ms(), 0);  // never negative: -1 would mean "no limit" to poll()
}

TEST(Deadline, SecondsRoundToTheNearestMillisecond) {
  EXPECT_TRUE(Deadline::after_seconds(0.0004).expired());  // rounds to 0 ms
  const Deadline d = Deadline::after_seconds(2.0006);      // rounds to 2001 ms
  EXPECT_LE(d.remaining_ms(), 2001);
  EXPECT_GT(d.remaining_ms(), 1500);
}

TEST(Deadline, HugeTimeoutsDoNotOverflow) {
  const Deadline seconds = Deadline::after_seconds(1e12);
  EXPECT_FALSE(seconds.unlimited());
  EXPECT_GT(seconds.remaining_ms(), INT_MAX / 2);
  const Deadline ms = Deadline::after_ms(int64_t{1} << 40);
  EXPECT_EQ(ms.remaining_ms(), INT_MAX);
}

}  // namespace
}  // namespace companion
