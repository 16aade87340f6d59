#include "common/fault_point.hpp"

#include <gtest/gtest.h>

#include <cstdio>
#include <string>

namespace companion::fault {
namespace {

class FaultPointTest : public ::testing::Test {
 protected:
  void TearDown() override { ASSERT_TRUE(configure("").ok()); }
};

TEST_F(FaultPointTest, InertWhenNotConfigured) {
  ASSERT_TRUE(configure("").ok());
  for (int i = 0; i < 3; ++i) EXPECT_TRUE(point(Stage::kRead, "/m/a.safetensors").ok());
}

TEST_F(FaultPointTest, FailsTheNthMatchingHitOnlyWithTheGivenCode) {
  ASSERT_TRUE(configure("fail-at=read@3:IO_ERROR,path=victim").ok());
  EXPECT_TRUE(point(Stage::kRead, "/m/other/model.safetensors").ok());  // path does not match
  EXPECT_TRUE(point(Stage::kSeal, "/m/victim").ok());                   // another stage
  EXPECT_TRUE(point(Stage::kRead, "/m/victim/model.safetensors").ok());
  EXPECT_TRUE(point(Stage::kRead, "/m/victim/model.safetensors").ok());
  auto third = point(Stage::kRead, "/m/victim/model.safetensors");
  ASSERT_FALSE(third.ok());
  EXPECT_EQ(third.error().code, StatusCode::kIoError);
  EXPECT_NE(third.error().message.find("read /m/victim/model.safetensors"), std::string::npos);
  EXPECT_NE(third.error().message.find("COMPANION_TEST_FAULT"), std::string::npos);
  EXPECT_TRUE(point(Stage::kRead, "/m/victim/model.safetensors").ok());  // once only
}

TEST_F(FaultPointTest, FirstHitByDefault) {
  ASSERT_TRUE(configure("fail-at=allocate:OUT_OF_MEMORY").ok());
  auto r = point(Stage::kAllocate, "/m/x");
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.error().code, StatusCode::kOutOfMemory);
}

TEST_F(FaultPointTest, RejectsSpecsThatDoNotParse) {
  for (const char* spec : {"fail-at=read", "fail-at=reed:IO_ERROR", "fail-at=read:NO_SUCH_CODE",
                           "fail-at=read:OK", "pause-at=read@0", "pause-at=read@x", "path=a",
                           "pause-at=read,fail-at=seal:IO_ERROR", "slow-at=read", "pause-at"}) {
    auto r = configure(spec);
    ASSERT_FALSE(r.ok()) << spec;
    EXPECT_EQ(r.error().code, StatusCode::kInvalidArgument) << spec;
  }
  // A refused spec leaves the points inert.
  EXPECT_TRUE(point(Stage::kRead, "/m/x").ok());
}

TEST_F(FaultPointTest, SeveralPointsEachWithItsOwnCount) {
  ASSERT_TRUE(configure("fail-at=read@2:IO_ERROR,path=a;fail-at=seal:OUT_OF_MEMORY,path=b").ok());
  EXPECT_TRUE(point(Stage::kRead, "/m/a").ok());
  EXPECT_TRUE(point(Stage::kSeal, "/m/a").ok());
  auto sealed = point(Stage::kSeal, "/m/b");
  ASSERT_FALSE(sealed.ok());
  EXPECT_EQ(sealed.error().code, StatusCode::kOutOfMemory);
  auto read = point(Stage::kRead, "/m/a");
  ASSERT_FALSE(read.ok());
  EXPECT_EQ(read.error().code, StatusCode::kIoError);
}

TEST_F(FaultPointTest, WaitAtGoesOnOnceItsFileExists) {
  const std::string gate = ::testing::TempDir() + "fault_point_gate";
  ASSERT_TRUE(configure("wait-at=grant,until=" + gate).ok());
  std::FILE* f = std::fopen(gate.c_str(), "w");  // there already: no wait
  ASSERT_NE(f, nullptr);
  std::fclose(f);
  EXPECT_TRUE(point(Stage::kGrant, "/m/a").ok());
  std::remove(gate.c_str());
  for (const char* spec : {"wait-at=grant", "pause-at=read,until=/x", "wait-at=read:IO_ERROR"}) {
    auto r = configure(spec);
    EXPECT_FALSE(r.ok()) << spec;
  }
}

TEST_F(FaultPointTest, StageNames) {
  EXPECT_STREQ(stage_name(Stage::kOpen), "open");
  EXPECT_STREQ(stage_name(Stage::kAllocate), "allocate");
  EXPECT_STREQ(stage_name(Stage::kExport), "export");
  EXPECT_STREQ(stage_name(Stage::kGrant), "grant");
}

}  // namespace
}  // namespace companion::fault
