// decode() on random and randomly damaged payloads: it either succeeds or returns kProtocolError,
// and whatever it hands out stays inside the payload. Seeded: failures reproduce. Each loop runs in
// a child process so that a crash (or a sanitizer report) fails that test alone, with its report.
#include <gtest/gtest.h>
#include <signal.h>
#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "protocol/limits.hpp"
#include "protocol/messages.hpp"

namespace companion::protocol {
namespace {

using memory::SegmentKind;

ModelSpec spec() {
  ModelSpec s;
  s.source = "/models/m";
  s.revision = "main";
  s.dtype = DType::kF16;
  s.tp_size = 2;
  s.tp_rank = 1;
  s.tag = "t";
  return s;
}

ModelStatus status() {
  ModelStatus s;
  s.key = "/models/m|bf16";
  s.id = "abc123";
  s.source = "/models/m";
  s.state = ModelState::kLoading;
  s.bytes_done = 10;
  s.bytes_total = 100;
  s.error_code = StatusCode::kNotReady;
  s.message = "loading";
  s.tensors = 3;
  s.leases = 1;
  s.backend = "host";
  s.slab_bytes = 4096;
  s.seq = 9;
  return s;
}

ServerIdentity identity() {
  ServerIdentity id;
  id.instance_id = "inst";
  id.ns = "ns";
  id.component = "model_server_host";
  id.hostname = "h";
  id.pid = 12;
  id.device = "host";
  id.backends = {"host", "cuda-vmm"};
  id.default_backend = "host";
  id.started_at_ms = 5;
  id.version = "0.1.0";
  id.socket_path = "/tmp/s";
  return id;
}

std::vector<uint8_t> sample_parameters() {
  std::vector<SegmentInfo> segs(3);
  segs[0].kind = SegmentKind::kHostMemfd;
  segs[0].size = 1 << 16;
  segs[0].fd_index = 0;
  segs[1].kind = SegmentKind::kCudaVmmFd;
  segs[1].size = 1 << 16;
  segs[1].fd_index = 1;
  segs[2].kind = SegmentKind::kCudaIpcHandle;
  segs[2].size = 1 << 16;
  segs[2].ipc_handle.fill(0x5a);
  std::vector<TensorInfo> ts;
  const char* names[] = {"model.embed_tokens.weight", "model.layers.0.input_layernorm.weight",
                         "model.norm.weight", "lm_head.weight", "scalar"};
  for (int i = 0; i < 5; ++i) {
    TensorInfo t;
    t.name = names[i];
    t.dtype = i % 2 ? DType::kBF16 : DType::kF32;
    if (i < 4) {
      t.shape = {4, 8};
      t.strides = {8, 1};
    }
    t.segment = static_cast<uint32_t>(i % 3);
    t.offset = static_cast<uint64_t>(i) * 512;
    t.nbytes = (i < 4 ? 32 : 1) * dtype_size(t.dtype);
    ts.push_back(t);
  }
  return encode_parameters(3, 4, status(), segs, ts).value();
}

// One valid encoding of every message type.
std::vector<std::vector<uint8_t>> samples() {
  std::vector<std::vector<uint8_t>> out;
  std::vector<Body> bodies = {
      Hello{1, 0, "client", 42},
      HelloReply{1, 0, identity()},
      GetParameters{spec(), true},
      Release{7},
      Released{7},
      StatusSubscribe{spec(), false},
      StatusEvent{status()},
      StatusUnsubscribe{3},
      Load{spec(), true},
      LoadReply{status()},
      Unload{spec(), "key", true},
      UnloadReply{status()},
      List{},
      ListReply{{status(), status()}},
      Health{},
      HealthReply{HealthInfo{"serving", 1, 2, 3, 4, 5, 6, identity()}},
      ErrorReply{Error{StatusCode::kNotFound, "no such model"}},
      Done{},
      PublishClaim{"key", {{"engine", "x"}}, ClaimMode::kIfUnpublished},
      PublishClaimed{false, status()},
      PublishDeclare{"key", {{"a", DType::kF16, {4, 4}, ""}, {"b", DType::kF16, {4, 4}, "a"}}},
      PublishCommit{"key"},
      PublishCommitted{9, status()},
      PublishAbort{"key"},
      Reload{"key", false}};
  for (const Body& b : bodies) out.push_back(encode(Message{99, b}).value());
  out.push_back(sample_parameters());
  return out;
}

bool inside(const void* p, size_t n, const std::vector<uint8_t>& buf) {
  auto* b = static_cast<const uint8_t*>(p);
  return b >= buf.data() && b + n <= buf.data() + buf.size();
}

// Checks what a successful decode returned; reads every byte it points at. Empty when fine.
std::string check_decoded(const Message& m) {
  const auto* p = std::get_if<Parameters>(&m.body);
  if (p == nullptr) return {};
  if (p->payload == nullptr) return "Parameters without payload";
  uint64_t sum = 0;
  for (const TensorRef& t : p->tensors) {
    if (t.name.empty() || !inside(t.name.data(), t.name.size(), *p->payload))
      return "tensor name outside the payload";
    for (char c : t.name) sum += static_cast<uint8_t>(c);
    if (t.shape.size() != t.strides.size() || t.shape.size() > kMaxRank) return "bad rank";
    if (!t.shape.empty()) {
      if (!inside(t.shape.data(), t.shape.size_bytes(), *p->payload) ||
          !inside(t.strides.data(), t.strides.size_bytes(), *p->payload))
        return "shape outside the payload";
      if (reinterpret_cast<uintptr_t>(t.shape.data()) % alignof(int64_t) != 0 ||
          reinterpret_cast<uintptr_t>(t.strides.data()) % alignof(int64_t) != 0)
        return "misaligned shape or strides view";
    }
    uint64_t elements = 1;
    for (size_t i = 0; i < t.shape.size(); ++i) {
      if (t.shape[i] < 0) return "negative dim accepted";
      elements *= static_cast<uint64_t>(t.shape[i]);
      sum += static_cast<uint64_t>(t.strides[i]);
    }
    if (elements * dtype_size(t.dtype) != t.nbytes) return "nbytes accepted that does not match";
    if (t.segment >= p->segments.size()) return "missing segment accepted";
    const SegmentInfo& s = p->segments[t.segment];
    if (t.offset > s.size || t.nbytes > s.size - t.offset) return "tensor outside segment accepted";
  }
  for (const SegmentInfo& s : p->segments) {
    if (static_cast<int>(s.kind) > static_cast<int>(SegmentKind::kCudaIpcHandle))
      return "unknown segment kind accepted";
    if (s.kind != SegmentKind::kCudaIpcHandle && s.fd_index < 0) return "fd segment without fd";
  }
  return sum == 0xffffffffffffffffull ? "unreachable" : "";
}

// The input being decoded, for the crash handler: which one killed the child.
char g_current[256];

extern "C" void on_crash(int sig) {
  const char prefix[] = "crashed while decoding: ";
  ssize_t ignored = ::write(2, prefix, sizeof(prefix) - 1);
  ignored = ::write(2, g_current, ::strnlen(g_current, sizeof(g_current)));
  ignored = ::write(2, "\n", 1);
  (void)ignored;
  ::signal(sig, SIG_DFL);
  ::raise(sig);
}

// Installed in the child only. Sanitizer builds keep their own handlers (better reports).
void install_crash_handler() {
#if !defined(__SANITIZE_ADDRESS__)
  for (int sig : {SIGSEGV, SIGBUS, SIGFPE, SIGILL}) ::signal(sig, on_crash);
#endif
}

// Decodes one input; returns false (and says why on stderr) when the outcome is not allowed.
bool try_one(const std::vector<uint8_t>& input, const std::string& what) {
  std::snprintf(g_current, sizeof(g_current), "%s", what.c_str());
  auto r = decode(input);
  std::string why;
  if (!r.ok()) {
    if (r.error().code != StatusCode::kProtocolError)
      why = "error code " + std::string(status_code_name(r.error().code)) + ": " +
            r.error().to_string();
  } else {
    why = check_decoded(*r);
    if (why.empty() && !std::holds_alternative<Parameters>(r->body)) {
      // Whatever decoded must encode again and decode to the same type.
      auto again = decode(encode(*r).value());
      if (!again.ok() || again->body.index() != r->body.index()) why = "does not re-encode";
    }
  }
  if (why.empty()) return true;
  std::fprintf(stderr, "%s: %s\n", what.c_str(), why.c_str());
  return false;
}

int finish(int failures) {
  std::fflush(stderr);
  std::_Exit(failures == 0 ? 0 : 1);
}

TEST(CodecFuzzDeathTest, RandomBuffers) {
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  auto run = [] {
    install_crash_handler();
    std::mt19937_64 rng(0xC0FFEE);
    int failures = 0;
    for (int i = 0; i < 4000; ++i) {
      size_t size = rng() % 1024;
      std::vector<uint8_t> buf(size);
      for (auto& b : buf) b = static_cast<uint8_t>(rng());
      // Half of them start with a plausible root offset so the verifier looks further in.
      if (i % 2 == 1 && size >= 8) {
        uint32_t root = static_cast<uint32_t>((rng() % (size / 4)) * 4);
        for (int k = 0; k < 4; ++k) buf[k] = static_cast<uint8_t>(root >> (8 * k));
      }
      if (!try_one(buf, "random buffer " + std::to_string(i)) && ++failures > 20) break;
    }
    finish(failures);
  };
  EXPECT_EXIT(run(), ::testing::ExitedWithCode(0), "");
}

TEST(CodecFuzzDeathTest, Truncations) {
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  auto run = [] {
    install_crash_handler();
    int failures = 0;
    auto all = samples();
    for (size_t s = 0; s < all.size(); ++s) {
      for (size_t len = 0; len < all[s].size(); ++len) {
        std::vector<uint8_t> cut(all[s].begin(), all[s].begin() + static_cast<std::ptrdiff_t>(len));
        if (!try_one(cut, "sample " + std::to_string(s) + " cut to " + std::to_string(len)))
          ++failures;
      }
    }
    finish(failures);
  };
  EXPECT_EXIT(run(), ::testing::ExitedWithCode(0), "");
}

TEST(CodecFuzzDeathTest, SingleByteMutations) {
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  auto run = [] {
    install_crash_handler();
    std::mt19937_64 rng(12345);
    int failures = 0;
    auto all = samples();
    for (size_t s = 0; s < all.size(); ++s) {
      const auto& base = all[s];
      // Every byte position with a few values, then random positions and values.
      for (size_t pos = 0; pos < base.size(); ++pos) {
        for (uint8_t v : {uint8_t(0x00), uint8_t(0xff), uint8_t(0x80), uint8_t(base[pos] ^ 0x04),
                          uint8_t(base[pos] + 1)}) {
          if (v == base[pos]) continue;
          std::vector<uint8_t> m = base;
          m[pos] = v;
          if (!try_one(m, "sample " + std::to_string(s) + " byte " + std::to_string(pos) + "=" +
                              std::to_string(v)))
            ++failures;
        }
      }
      for (int i = 0; i < 300; ++i) {
        std::vector<uint8_t> m = base;
        size_t pos = rng() % m.size();
        m[pos] = static_cast<uint8_t>(rng());
        if (!try_one(m, "sample " + std::to_string(s) + " random mutation " + std::to_string(i)))
          ++failures;
      }
      if (failures > 50) break;
    }
    finish(failures);
  };
  EXPECT_EXIT(run(), ::testing::ExitedWithCode(0), "");
}

TEST(CodecFuzzDeathTest, MultiByteMutationsAndTruncations) {
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  auto run = [] {
    install_crash_handler();
    std::mt19937_64 rng(777);
    int failures = 0;
    auto all = samples();
    for (int i = 0; i < 3000; ++i) {
      size_t s = rng() % all.size();
      std::vector<uint8_t> m = all[s];
      int edits = 1 + static_cast<int>(rng() % 4);
      for (int e = 0; e < edits; ++e) m[rng() % m.size()] = static_cast<uint8_t>(rng());
      if (rng() % 3 == 0) m.resize(rng() % (m.size() + 1));
      if (!try_one(m, "multi mutation " + std::to_string(i) + " of sample " + std::to_string(s)) &&
          ++failures > 50)
        break;
    }
    finish(failures);
  };
  EXPECT_EXIT(run(), ::testing::ExitedWithCode(0), "");
}

// The unmutated samples decode (so the loops above start from valid input).
TEST(CodecFuzz, SamplesAreValid) {
  auto all = samples();
  ASSERT_EQ(all.size(), std::variant_size_v<Body>);  // one per message type
  for (size_t s = 0; s < all.size(); ++s) {
    auto r = decode(all[s]);
    ASSERT_TRUE(r.ok()) << s << ": " << r.error().to_string();
    EXPECT_EQ(check_decoded(*r), "") << s;
  }
}

}  // namespace
}  // namespace companion::protocol
