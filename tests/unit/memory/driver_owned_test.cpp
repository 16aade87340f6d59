// DriverOwned: the one owner behind the pinned buffers, streams and events. Each object is
// released exactly once (on destruction, reset or being assigned over), never after it was moved
// away, with or without a driver (the driver's part runs only where there is one).
#include <gtest/gtest.h>

#include <utility>
#include <vector>

#include "memory/cuda_driver.hpp"

namespace companion::memory::cuda {
namespace {

std::vector<int> g_driver_released;  // values, in release order
std::vector<int> g_host_released;

struct FakeObject {
  using Value = int;  // 0: nothing
  static constexpr const char* kReleasing = "releasing a fake object";
  static Result<void> release(const DriverApi&, const Value& value) {
    g_driver_released.push_back(value);
    return ok_result();
  }
  static void release_host(const Value& value) noexcept { g_host_released.push_back(value); }
};
using Owned = DriverOwned<FakeObject>;

class DriverOwnedTest : public ::testing::Test {
 protected:
  void SetUp() override {
    g_driver_released.clear();
    g_host_released.clear();
  }
  // The driver's part runs where a driver is loaded, and always in the same order as the host's.
  void expect_released(const std::vector<int>& values) {
    EXPECT_EQ(g_host_released, values);
    if (driver().ok()) {
      EXPECT_EQ(g_driver_released, values);
    } else {
      EXPECT_TRUE(g_driver_released.empty());
    }
  }
};

TEST_F(DriverOwnedTest, ReleasedOnceOnDestruction) {
  {
    Owned a(0, 7);
    EXPECT_EQ(a.get(), 7);
    EXPECT_EQ(a.ordinal(), 0);
    Owned empty;
    EXPECT_EQ(empty.get(), 0);
  }
  expect_released({7});  // the empty one releases nothing
}

TEST_F(DriverOwnedTest, MovesHandTheObjectOn) {
  {
    Owned a(0, 1);
    Owned b(std::move(a));
    EXPECT_EQ(a.get(), 0);  // NOLINT(bugprone-use-after-move): moved-from is empty
    EXPECT_EQ(b.get(), 1);
    std::vector<Owned> many;
    many.push_back(std::move(b));
    many.emplace_back(0, 2);
    many.reserve(16);  // relocation moves, never releases
    EXPECT_TRUE(g_host_released.empty());
  }
  expect_released({1, 2});
}

TEST_F(DriverOwnedTest, AssignmentReleasesTheOldObjectFirst) {
  Owned a(0, 1);
  Owned b(0, 2);
  a = std::move(b);
  expect_released({1});
  EXPECT_EQ(a.get(), 2);
  auto& self = a;
  a = std::move(self);  // self-assignment keeps it
  EXPECT_EQ(a.get(), 2);
  a.reset();
  a.reset();  // once only
  expect_released({1, 2});
  EXPECT_EQ(a.get(), 0);
}

}  // namespace
}  // namespace companion::memory::cuda
