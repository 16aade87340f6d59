// The store's limit settings (--memory-reserve, the list bound), the host's free-memory query,
// and the text helpers that keep what the server and CLI print valid.
#include <string>

#include <gtest/gtest.h>

#include "common/util.hpp"
#include "memory/host_backend.hpp"
#include "protocol/limits.hpp"
#include "protocol/messages.hpp"
#include "server/model_store.hpp"

namespace companion::server {
namespace {

TEST(StoreLimits, MemoryReserveTakesBytesOrAShare) {
  StoreConfig c;
  ASSERT_TRUE(parse_memory_reserve("10%", c).ok());
  EXPECT_DOUBLE_EQ(c.memory_reserve_fraction, 0.10);
  EXPECT_EQ(c.memory_reserve_bytes, 0u);
  ASSERT_TRUE(parse_memory_reserve("1GiB", c).ok());
  EXPECT_EQ(c.memory_reserve_bytes, 1ull << 30);
  EXPECT_EQ(c.memory_reserve_fraction, 0.0);
  ASSERT_TRUE(parse_memory_reserve("512MiB", c).ok());
  EXPECT_EQ(c.memory_reserve_bytes, 512ull << 20);
  ASSERT_TRUE(parse_memory_reserve("4096", c).ok());
  EXPECT_EQ(c.memory_reserve_bytes, 4096u);
  ASSERT_TRUE(parse_memory_reserve("0", c).ok());
  EXPECT_EQ(c.memory_reserve_bytes, 0u);
  for (const char* bad :
       {"", "abc", "100%", "10 %", "1GB", "-1", "1e30", "1.5.3GiB", "99999999999TiB"}) {
    SCOPED_TRACE(bad);
    auto r = parse_memory_reserve(bad, c);
    ASSERT_FALSE(r.ok());
    EXPECT_EQ(r.error().code, StatusCode::kInvalidArgument);
  }
}

TEST(StoreLimits, MemoryBudgetTakesBytesOrAShareUpToTheWholeDevice) {
  StoreConfig c;
  ASSERT_TRUE(parse_memory_budget("8GiB", c).ok());
  EXPECT_EQ(c.memory_budget_bytes, 8ull << 30);
  EXPECT_EQ(c.memory_budget_fraction, 0.0);
  ASSERT_TRUE(parse_memory_budget("100%", c).ok());
  EXPECT_DOUBLE_EQ(c.memory_budget_fraction, 1.0);
  EXPECT_EQ(c.memory_budget_bytes, 0u);
  ASSERT_TRUE(parse_memory_budget("80%", c).ok());
  EXPECT_DOUBLE_EQ(c.memory_budget_fraction, 0.8);
  ASSERT_TRUE(parse_memory_budget("4096", c).ok());
  EXPECT_EQ(c.memory_budget_bytes, 4096u);
  EXPECT_TRUE(c.validate().ok());
  for (const char* bad : {"", "0", "0%", "101%", "8GB", "-1", "x"}) {
    SCOPED_TRACE(bad);
    auto r = parse_memory_budget(bad, c);
    ASSERT_FALSE(r.ok());
    EXPECT_EQ(r.error().code, StatusCode::kInvalidArgument);
    EXPECT_NE(r.error().message.find("--memory-budget"), std::string::npos);
  }
}

TEST(StoreLimits, AStatusAtEveryBoundFitsItsWireBudget) {
  // The largest status the server can emit: longest key, source and message, a full fingerprint,
  // and every generation with a full fingerprint and its listed digests.
  ModelStatus s;
  s.key = std::string(protocol::kMaxStringBytes, 'k');
  s.id = std::string(12, 'i');
  s.source = std::string(protocol::kMaxSourceBytes, 's');
  s.message = std::string(protocol::kMaxStatusMessageBytes, 'm');
  s.backend = "cuda-vmm";
  s.published = true;
  for (size_t i = 0; i < protocol::kMaxFingerprintFields; ++i) {
    std::string name = "f" + std::to_string(i);
    size_t room = protocol::kMaxFingerprintBytes / protocol::kMaxFingerprintFields;
    s.fingerprint[name] = std::string(room - name.size(), 'v');
  }
  ASSERT_TRUE(protocol::validate_fingerprint(s.fingerprint).ok());
  for (size_t g = 0; g < protocol::kMaxGenerationsPerKey; ++g) {
    GenerationInfo info;
    info.number = ~uint64_t{0} - g;
    info.leases = ~uint32_t{0};
    info.slab_bytes = ~uint64_t{0};
    info.created_at_ms = -1;
    info.fingerprint = s.fingerprint;
    for (size_t d = 0; d < protocol::kMaxListedDigests; ++d)
      info.digests.push_back("wsum64:" + std::string(16, 'f'));
    s.generations.push_back(std::move(info));
  }
  auto bytes = protocol::encode(protocol::Message{1, protocol::StatusEvent{s}}).value();
  EXPECT_LE(bytes.size(), protocol::kMaxModelStatusWireBytes);
  auto back = protocol::decode(std::move(bytes));
  ASSERT_TRUE(back.ok()) << back.error().to_string();
}

TEST(StoreLimits, GenerationsAreTwoToTheProtocolsBound) {
  StoreConfig c;
  EXPECT_TRUE(c.validate().ok());
  c.max_generations = 1;  // a new generation is always built beside the current one
  EXPECT_EQ(c.validate().error().code, StatusCode::kInvalidArgument);
  c.max_generations = protocol::kMaxGenerationsPerKey;
  EXPECT_TRUE(c.validate().ok());
  c.max_generations = protocol::kMaxGenerationsPerKey + 1;
  EXPECT_EQ(c.validate().error().code, StatusCode::kInvalidArgument);
}

TEST(StoreLimits, ListOfEveryEntryAlwaysFitsOneFrame) {
  // Every entry at its largest, and as many as the limits allow, fit kMaxPayloadBytes.
  static_assert(protocol::kMaxListedModels * protocol::kMaxModelStatusWireBytes <
                protocol::kMaxPayloadBytes);
  StoreConfig c;
  EXPECT_TRUE(c.validate().ok());
  c.max_models = protocol::kMaxListedModels - c.max_error_entries;
  EXPECT_TRUE(c.validate().ok());
  c.max_models += 1;
  auto r = c.validate();
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.error().code, StatusCode::kInvalidArgument);
  StoreConfig zero;
  zero.max_variants_per_source = 0;
  EXPECT_FALSE(zero.validate().ok());
}

TEST(StoreLimits, HostReportsAvailableMemory) {
  auto backend = memory::make_host_backend();
  auto m = backend->available_bytes();
  ASSERT_TRUE(m.ok()) << m.error().to_string();
  EXPECT_GT(m->available, 0u);
  EXPECT_GT(m->total, 0u);
  EXPECT_LE(m->available, m->total);
}

TEST(OutputText, Utf8IsCheckedStrictly) {
  EXPECT_TRUE(is_valid_utf8(""));
  EXPECT_TRUE(is_valid_utf8("plain"));
  EXPECT_TRUE(is_valid_utf8("caf\xc3\xa9 \xe2\x82\xac \xf0\x9f\x98\x80"));
  EXPECT_FALSE(is_valid_utf8("\xff"));
  EXPECT_FALSE(is_valid_utf8("\xc0\xaf"));          // overlong '/'
  EXPECT_FALSE(is_valid_utf8("\xed\xa0\x80"));      // surrogate
  EXPECT_FALSE(is_valid_utf8("\xf4\x90\x80\x80"));  // past U+10FFFF
  EXPECT_FALSE(is_valid_utf8("\xe2\x82"));          // cut short
}

TEST(OutputText, PrefixNeverCutsASequence) {
  std::string euro = "\xe2\x82\xac";
  EXPECT_EQ(utf8_prefix("ab" + euro, 4), "ab");
  EXPECT_EQ(utf8_prefix("ab" + euro, 5), "ab" + euro);
  EXPECT_EQ(utf8_prefix("abc", 10), "abc");
}

TEST(OutputText, PrintableTextEscapesControlsAndReplacesBadBytes) {
  EXPECT_EQ(printable_text("ok caf\xc3\xa9"), "ok caf\xc3\xa9");
  EXPECT_EQ(printable_text("\x1b[2Jx\x07"), "\\x1b[2Jx\\x07");
  EXPECT_EQ(printable_text("a\nb\tc\r"), "a\\nb\\tc\\r");
  EXPECT_EQ(printable_text("del\x7f"), "del\\x7f");
  EXPECT_EQ(printable_text("csi\xc2\x9b"), "csi\\u009b");  // C1 control
  EXPECT_EQ(printable_text("bad\xff!"), "bad\xef\xbf\xbd!");
  EXPECT_TRUE(is_valid_utf8(printable_text("\xfe\xff\xc0\xaf\xed\xa0\x80")));
}

}  // namespace
}  // namespace companion::server
