// unit_capi: libcompanion.so (the C ABI, include/companion/companion.h) against a real
// `companion serve --device host` process with its own runtime directory and model root. Only
// the C header is used here: the test links the shared library and nothing else of Companion.
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <barrier>
#include <chrono>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <map>
#include <memory>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "companion/companion.h"

#ifndef COMPANION_BINARY
#error "COMPANION_BINARY (the path of the companion executable) must be defined"
#endif

namespace {

using nlohmann::json;
namespace fs = std::filesystem;

// ---- checkpoints ---------------------------------------------------------------------------

struct TestTensor {
  std::string name;
  std::string dtype;  // safetensors spelling
  std::vector<int64_t> shape;
  std::vector<uint8_t> bytes;
};

template <typename T>
std::vector<uint8_t> bytes_of(const std::vector<T>& values) {
  std::vector<uint8_t> out(values.size() * sizeof(T));
  if (!out.empty()) std::memcpy(out.data(), values.data(), out.size());
  return out;
}

// A few tensors of different types and ranks (a scalar included); seed varies the values.
std::vector<TestTensor> sample_tensors(int seed) {
  std::vector<float> w(2 * 3);
  for (size_t i = 0; i < w.size(); ++i)
    w[i] = static_cast<float>(seed) + 0.25f * static_cast<float>(i);
  std::vector<int64_t> b = {seed, -1, 1LL << 40, 7};
  std::vector<uint8_t> mask = {1, 0, 1, 1, static_cast<uint8_t>(seed)};
  std::vector<float> scale = {1.5f * static_cast<float>(seed)};
  return {{"embed.weight", "F32", {2, 3}, bytes_of(w)},
          {"layer.0.bias", "I64", {4}, bytes_of(b)},
          {"mask", "U8", {5}, mask},
          {"scale", "F32", {}, bytes_of(scale)}};
}

// Writes a safetensors file: 8-byte little-endian header length, JSON header, data.
void write_safetensors(const fs::path& path, const std::vector<TestTensor>& tensors) {
  json header = json::object();
  uint64_t offset = 0;
  for (const auto& t : tensors) {
    offset = (offset + 7) / 8 * 8;  // keep every tensor 8-byte aligned
    header[t.name] = {{"dtype", t.dtype},
                      {"shape", t.shape},
                      {"data_offsets", {offset, offset + t.bytes.size()}}};
    offset += t.bytes.size();
  }
  std::string text = header.dump();
  text.append((8 - text.size() % 8) % 8, ' ');
  std::vector<uint8_t> data(offset, 0);
  offset = 0;
  for (const auto& t : tensors) {
    offset = (offset + 7) / 8 * 8;
    if (!t.bytes.empty()) std::memcpy(data.data() + offset, t.bytes.data(), t.bytes.size());
    offset += t.bytes.size();
  }
  fs::create_directories(path.parent_path());
  std::ofstream f(path, std::ios::binary);
  uint64_t n = text.size();
  unsigned char len[8];
  for (int i = 0; i < 8; ++i) len[i] = static_cast<unsigned char>(n >> (8 * i));
  f.write(reinterpret_cast<const char*>(len), 8);
  f.write(text.data(), static_cast<std::streamsize>(text.size()));
  f.write(reinterpret_cast<const char*>(data.data()), static_cast<std::streamsize>(data.size()));
  ASSERT_TRUE(f.good()) << path;
}

// ---- the server process --------------------------------------------------------------------

std::string make_temp_dir() {
  const char* base = std::getenv("TMPDIR");
  std::string pattern =
      std::string(base != nullptr && *base != '\0' ? base : "/tmp") + "/companion-capi-XXXXXX";
  std::vector<char> buf(pattern.begin(), pattern.end());
  buf.push_back('\0');
  char* dir = ::mkdtemp(buf.data());
  if (dir == nullptr) return "";
  return fs::canonical(dir).string();
}

struct ServerProcess {
  pid_t pid = -1;
  int stdout_fd = -1;
  std::string socket;
  std::string instance;
  std::string log_path;
  std::string error;  // why it did not start

  bool start(const std::string& runtime_dir, const std::string& model_root,
             const std::string& log) {
    log_path = log;
    int out[2];
    if (::pipe2(out, O_CLOEXEC) != 0) return fail("pipe failed");
    int log_fd = ::open(log.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (log_fd < 0) return fail("cannot open " + log);
    std::vector<std::string> args = {COMPANION_BINARY, "serve",     "--device",     "host",
                                     "--runtime-dir",  runtime_dir, "--model-root", model_root,
                                     "--log-level",    "info",      "--no-keep"};
    std::vector<char*> argv;
    for (auto& a : args) argv.push_back(a.data());
    argv.push_back(nullptr);
    pid = ::fork();
    if (pid == 0) {
      // Only async-signal-safe calls between fork and exec.
      ::dup2(out[1], STDOUT_FILENO);
      ::dup2(log_fd, STDERR_FILENO);
      ::execv(argv[0], argv.data());
      ::_exit(127);
    }
    ::close(out[1]);
    ::close(log_fd);
    stdout_fd = out[0];
    if (pid < 0) return fail("fork failed");
    // "companion serving <ns>/<component> instance <id> socket <path>"
    std::string line;
    auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(60);
    while (line.find('\n') == std::string::npos) {
      auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
                      deadline - std::chrono::steady_clock::now())
                      .count();
      if (left <= 0) return fail("no 'companion serving' line within 60 s");
      pollfd p{stdout_fd, POLLIN, 0};
      if (::poll(&p, 1, static_cast<int>(left)) <= 0) continue;
      char buf[512];
      ssize_t n = ::read(stdout_fd, buf, sizeof(buf));
      if (n <= 0) return fail("server exited before serving");
      line.append(buf, static_cast<size_t>(n));
    }
    line = line.substr(0, line.find('\n'));
    if (line.find("companion serving") == std::string::npos)
      return fail("unexpected first line: " + line);
    auto after = [&](const std::string& marker) {
      size_t at = line.find(marker);
      if (at == std::string::npos) return std::string();
      std::string rest = line.substr(at + marker.size());
      return rest.substr(0, rest.find(' '));
    };
    socket = after(" socket ");
    instance = after(" instance ");
    if (socket.empty() || instance.empty()) return fail("cannot parse: " + line);
    return true;
  }

  bool fail(const std::string& why) {
    std::ifstream f(log_path);
    std::string log((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
    error = why + "\nserver log:\n" + log;
    return false;
  }

  // SIGTERM, then the exit status (-1 when it had to be killed).
  int stop() {
    if (pid <= 0) return -1;
    ::kill(pid, SIGTERM);
    int status = 0;
    auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(20);
    while (::waitpid(pid, &status, WNOHANG) == 0) {
      if (std::chrono::steady_clock::now() > deadline) {
        ::kill(pid, SIGKILL);
        ::waitpid(pid, &status, 0);
        pid = -1;
        return -1;
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
    pid = -1;
    if (stdout_fd >= 0) ::close(stdout_fd);
    stdout_fd = -1;
    return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  }
};

// ---- helpers -------------------------------------------------------------------------------

struct ClientCloser {
  void operator()(companion_client* c) const { companion_client_close(c); }
};
struct ModelReleaser {
  void operator()(companion_model* m) const { companion_model_release(m); }
};
struct StreamCloser {
  void operator()(companion_status_stream* s) const { companion_status_stream_close(s); }
};
using ClientPtr = std::unique_ptr<companion_client, ClientCloser>;
using ModelPtr = std::unique_ptr<companion_model, ModelReleaser>;
using StreamPtr = std::unique_ptr<companion_status_stream, StreamCloser>;

// Parses and frees a JSON string the library returned.
json take_json(char* text) {
  if (text == nullptr) return json();
  json j = json::parse(text);
  companion_free(text);
  return j;
}

// A spec that owns its strings.
class Spec {
 public:
  explicit Spec(std::string source, std::string dtype = "") : source_(std::move(source)) {
    dtype_ = std::move(dtype);
    companion_model_spec_init(&spec_);
    spec_.source = source_.c_str();
    if (!dtype_.empty()) spec_.dtype = dtype_.c_str();
  }
  Spec(const Spec&) = delete;
  Spec& operator=(const Spec&) = delete;
  const companion_model_spec* get() const { return &spec_; }
  companion_model_spec* mut() { return &spec_; }

 private:
  std::string source_;
  std::string dtype_;
  companion_model_spec spec_{};
};

std::string last_error() {
  return companion_last_error();
}

class CapiTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    tmp_ = make_temp_dir();
    ASSERT_FALSE(tmp_.empty());
    runtime_dir_ = tmp_ + "/runtime";
    model_root_ = tmp_ + "/models";
    fs::create_directories(model_root_);
    ::mkdir(runtime_dir_.c_str(), 0700);
    server_ = new ServerProcess();
    started_ = server_->start(runtime_dir_, model_root_, tmp_ + "/server.log");
    ASSERT_TRUE(started_) << server_->error;
  }

  static void TearDownTestSuite() {
    if (server_ != nullptr) {
      int code = server_->stop();
      EXPECT_EQ(code, 0) << "server exit status";
      delete server_;
      server_ = nullptr;
    }
    if (!tmp_.empty()) {
      std::error_code ec;
      fs::remove_all(tmp_, ec);
    }
  }

  void SetUp() override {
    if (!started_) GTEST_FAIL() << "the server did not start";
  }

  // A fresh model directory <root>/<name> with sample_tensors(seed); returns its path.
  static std::string write_model(const std::string& name, int seed = 1) {
    fs::path dir = fs::path(model_root_) / name;
    write_safetensors(dir / "model.safetensors", sample_tensors(seed));
    return dir.string();
  }

  static ClientPtr connect() {
    companion_connect_options options;
    companion_connect_options_init(&options);
    options.runtime_dir = runtime_dir_.c_str();
    companion_client* client = nullptr;
    companion_status s = companion_client_connect(&options, &client);
    EXPECT_EQ(s, COMPANION_OK) << last_error();
    return ClientPtr(client);
  }

  // The model's entry in list(), or null json.
  static json listed(companion_client* client, const std::string& source) {
    char* text = nullptr;
    EXPECT_EQ(companion_client_list(client, &text), COMPANION_OK) << last_error();
    for (const auto& m : take_json(text))
      if (m["source"] == source) return m;
    return json();
  }

  static std::string tmp_;
  static std::string runtime_dir_;
  static std::string model_root_;
  static ServerProcess* server_;
  static bool started_;
};

std::string CapiTest::tmp_;
std::string CapiTest::runtime_dir_;
std::string CapiTest::model_root_;
ServerProcess* CapiTest::server_ = nullptr;
bool CapiTest::started_ = false;

// Every tensor of the mapped model equals the file's, in order, with its metadata.
void expect_tensors_match(const companion_model* model, const std::vector<TestTensor>& expected) {
  ASSERT_EQ(companion_model_tensor_count(model), expected.size());
  std::map<std::string, const TestTensor*> by_name;
  for (const auto& t : expected) by_name[t.name] = &t;
  std::set<std::string> seen;
  for (size_t i = 0; i < expected.size(); ++i) {
    companion_tensor t;
    ASSERT_EQ(companion_model_tensor(model, i, &t), COMPANION_OK) << last_error();
    std::string name(t.name, t.name_length);
    ASSERT_TRUE(by_name.count(name)) << name;
    seen.insert(name);
    const TestTensor& want = *by_name[name];
    EXPECT_EQ(t.ndim, static_cast<int32_t>(want.shape.size())) << name;
    for (int32_t d = 0; d < t.ndim; ++d) EXPECT_EQ(t.shape[d], want.shape[d]) << name;
    // Contiguous strides, in elements.
    int64_t stride = 1;
    for (int32_t d = t.ndim - 1; d >= 0; --d) {
      EXPECT_EQ(t.strides[d], stride) << name << " dim " << d;
      stride *= want.shape[d];
    }
    EXPECT_EQ(t.nbytes, want.bytes.size()) << name;
    ASSERT_NE(t.data, nullptr) << name;
    EXPECT_EQ(std::memcmp(t.data, want.bytes.data(), want.bytes.size()), 0) << name;
    EXPECT_EQ(t.device_type, COMPANION_DEVICE_CPU);
    EXPECT_EQ(t.device_id, 0);
    int32_t dtype = want.dtype == "F32"   ? COMPANION_DTYPE_F32
                    : want.dtype == "I64" ? COMPANION_DTYPE_I64
                                          : COMPANION_DTYPE_U8;
    EXPECT_EQ(t.dtype, dtype) << name;

    // find() gives the same description.
    companion_tensor found;
    ASSERT_EQ(companion_model_find(model, name.c_str(), &found), COMPANION_OK) << last_error();
    EXPECT_EQ(found.data, t.data);
    EXPECT_EQ(found.name, t.name);
    EXPECT_EQ(found.shape, t.shape);
    EXPECT_EQ(found.nbytes, t.nbytes);
  }
  EXPECT_EQ(seen.size(), expected.size());
}

// ---- errors and version --------------------------------------------------------------------

TEST(CapiStatic, StatusStringForEveryCode) {
  std::set<std::string> texts;
#define COMPANION_CHECK(cname, name, value, text)                 \
  EXPECT_EQ(static_cast<int>(COMPANION_##cname), value);          \
  ASSERT_NE(companion_status_string(COMPANION_##cname), nullptr); \
  EXPECT_STREQ(companion_status_string(COMPANION_##cname), text); \
  texts.insert(companion_status_string(COMPANION_##cname));
  COMPANION_STATUS_CODES(COMPANION_CHECK)
#undef COMPANION_CHECK
  EXPECT_EQ(texts.size(), 21u);
  EXPECT_STREQ(companion_status_string(COMPANION_NOT_FOUND), "model not found");
}

TEST(CapiStatic, VersionAndFree) {
  ASSERT_NE(companion_version(), nullptr);
  EXPECT_STREQ(companion_version(), COMPANION_VERSION_STRING);
  companion_free(nullptr);  // fine
}

TEST(CapiStatic, InitFillsDefaults) {
  companion_connect_options o;
  std::memset(&o, 0xAB, sizeof(o));
  companion_connect_options_init(&o);
  EXPECT_EQ(o.struct_size, sizeof(o));
  EXPECT_STREQ(o.ns, "companion");
  EXPECT_STREQ(o.device, "host");
  EXPECT_EQ(o.socket_path, nullptr);
  EXPECT_EQ(o.runtime_dir, nullptr);
  EXPECT_STREQ(o.client_name, "companion-c");
  EXPECT_EQ(o.discovery_timeout_s, 0.0);
  EXPECT_EQ(o.registry, nullptr);
  EXPECT_EQ(o.instance_id, nullptr);

  companion_model_spec s;
  std::memset(&s, 0xAB, sizeof(s));
  companion_model_spec_init(&s);
  EXPECT_EQ(s.struct_size, sizeof(s));
  EXPECT_EQ(s.source, nullptr);
  EXPECT_EQ(s.revision, nullptr);
  EXPECT_EQ(s.dtype, nullptr);
  EXPECT_EQ(s.tp_size, 1u);
  EXPECT_EQ(s.tp_rank, 0u);
  EXPECT_EQ(s.tag, nullptr);

  // No crash. (A literal NULL does not compile through the macros: call the functions.)
  companion_connect_options_init_sized(nullptr, sizeof(companion_connect_options));
  companion_model_spec_init_sized(nullptr, sizeof(companion_model_spec));
  (companion_connect_options_init)(nullptr);
  (companion_model_spec_init)(nullptr);
}

// ---- struct sizes --------------------------------------------------------------------------
// Callers compiled against an older companion.h have shorter structs. Each Older* below is a
// test-local copy of a struct of companion.h as it was before its newest field(s); Guarded puts
// a canary right after it. The library must fill the older struct (defaults, struct_size) and
// leave the canary alone: before the sized calls, every *_init wrote the library's whole struct.

struct OlderConnectOptions {  // before instance_id
  uint32_t struct_size;
  const char* ns;
  const char* device;
  const char* socket_path;
  const char* runtime_dir;
  const char* client_name;
  double discovery_timeout_s;
  const char* registry;
};
static_assert(sizeof(OlderConnectOptions) == offsetof(companion_connect_options, instance_id));

struct OlderModelSpec {  // before tag
  uint32_t struct_size;
  const char* source;
  const char* revision;
  const char* dtype;
  uint32_t tp_size;
  uint32_t tp_rank;
};
static_assert(sizeof(OlderModelSpec) == offsetof(companion_model_spec, tag));

struct OlderAttachOptions {  // before timeout_s
  uint32_t struct_size;
  uint64_t generation;
  const char* fingerprint_json;
  int32_t or_source;
  int32_t wait;
};
static_assert(sizeof(OlderAttachOptions) == offsetof(companion_attach_options, timeout_s));

struct OlderModelTable {  // before segments
  uint32_t struct_size;
  uint32_t record_size;
  size_t count;
  const void* records;
  const char* names;
  size_t names_bytes;
  const int64_t* dims;
  size_t dims_count;
};
static_assert(sizeof(OlderModelTable) == offsetof(companion_model_table, segments));

struct OlderTensor {  // before device_type and device_id
  const char* name;
  size_t name_length;
  int32_t dtype;
  int32_t ndim;
  const int64_t* shape;
  const int64_t* strides;
  const void* data;
  uint64_t nbytes;
};
static_assert(sizeof(OlderTensor) == offsetof(companion_tensor, device_type));

struct OlderTensorDecl {  // before alias_of
  const char* name;
  int32_t dtype;
  int32_t ndim;
  const int64_t* shape;
};
static_assert(sizeof(OlderTensorDecl) == offsetof(companion_tensor_decl, alias_of));

constexpr unsigned char kCanary = 0xC3;

template <typename Older>
struct Guarded {
  Older value;
  unsigned char canary[64];

  Guarded() {
    std::memset(static_cast<void*>(this), 0xAB, sizeof(*this));  // garbage in the struct
    std::memset(canary, kCanary, sizeof(canary));
  }
  bool canary_intact() const {
    for (unsigned char c : canary)
      if (c != kCanary) return false;
    return true;
  }
  template <typename Current>
  Current* as() {
    return reinterpret_cast<Current*>(&value);
  }
};
static_assert(offsetof(Guarded<OlderModelSpec>, canary) == sizeof(OlderModelSpec));

TEST(CapiStatic, InitWritesNothingPastAnOlderCallersStruct) {
  Guarded<OlderConnectOptions> options;
  companion_connect_options_init_sized(options.as<companion_connect_options>(),
                                       sizeof(options.value));
  EXPECT_TRUE(options.canary_intact());
  EXPECT_EQ(options.value.struct_size, sizeof(options.value));
  EXPECT_STREQ(options.value.ns, "companion");
  EXPECT_STREQ(options.value.device, "host");
  EXPECT_EQ(options.value.runtime_dir, nullptr);
  EXPECT_EQ(options.value.registry, nullptr);

  Guarded<OlderModelSpec> spec;
  companion_model_spec_init_sized(spec.as<companion_model_spec>(), sizeof(spec.value));
  EXPECT_TRUE(spec.canary_intact());
  EXPECT_EQ(spec.value.struct_size, sizeof(spec.value));
  EXPECT_EQ(spec.value.source, nullptr);
  EXPECT_EQ(spec.value.tp_size, 1u);
  EXPECT_EQ(spec.value.tp_rank, 0u);

  Guarded<OlderAttachOptions> attach;
  companion_attach_options_init_sized(attach.as<companion_attach_options>(), sizeof(attach.value));
  EXPECT_TRUE(attach.canary_intact());
  EXPECT_EQ(attach.value.struct_size, sizeof(attach.value));
  EXPECT_EQ(attach.value.generation, 0u);
  EXPECT_EQ(attach.value.fingerprint_json, nullptr);
  EXPECT_EQ(attach.value.wait, 1);

  Guarded<OlderModelTable> table;
  companion_model_table_init_sized(table.as<companion_model_table>(), sizeof(table.value));
  EXPECT_TRUE(table.canary_intact());
  EXPECT_EQ(table.value.struct_size, sizeof(table.value));
  EXPECT_EQ(table.value.count, 0u);

  // Too short to hold struct_size: nothing is written.
  Guarded<uint16_t> tiny;
  companion_model_spec_init_sized(tiny.as<companion_model_spec>(), sizeof(tiny.value));
  EXPECT_TRUE(tiny.canary_intact());
  EXPECT_EQ(tiny.value, 0xABABu);
}

// A caller compiled against a newer companion.h: the library fills what it knows, and
// struct_size tells the caller where that ends (its newer fields are ignored by this library).
TEST(CapiStatic, InitOfANewerCallersStructSaysWhatTheLibraryKnows) {
  struct Newer {
    companion_connect_options options;
    uint64_t newer_field;
  } newer;
  std::memset(&newer, 0xAB, sizeof(newer));
  companion_connect_options_init_sized(&newer.options, sizeof(newer));
  EXPECT_EQ(newer.options.struct_size, sizeof(companion_connect_options));
  EXPECT_EQ(newer.newer_field, 0xABABABABABABABABu);
  EXPECT_EQ(newer.options.instance_id, nullptr);
}

// The macros of companion.h pass the size of the struct they are given; the unsized functions
// (for binaries built before the macros) write the frozen size of that header's structs, which
// is today's: a field added later must not change what they write.
TEST(CapiStatic, MacrosPassSizeofAndTheUnsizedFunctionsKeepTheirSize) {
  companion_model_spec spec;
  std::memset(&spec, 0xAB, sizeof(spec));
  companion_model_spec_init(&spec);
  EXPECT_EQ(spec.struct_size, sizeof(spec));

  Guarded<companion_connect_options> options;
  (companion_connect_options_init)(&options.value);
  EXPECT_TRUE(options.canary_intact());
  EXPECT_EQ(options.value.struct_size, offsetof(companion_connect_options, instance_id) + 8);
  Guarded<companion_model_spec> legacy_spec;
  (companion_model_spec_init)(&legacy_spec.value);
  EXPECT_TRUE(legacy_spec.canary_intact());
  EXPECT_EQ(legacy_spec.value.struct_size, offsetof(companion_model_spec, tag) + 8);
  Guarded<companion_attach_options> attach;
  (companion_attach_options_init)(&attach.value);
  EXPECT_TRUE(attach.canary_intact());
  EXPECT_EQ(attach.value.struct_size, offsetof(companion_attach_options, timeout_s) + 8);
  Guarded<companion_model_table> table;
  (companion_model_table_init)(&table.value);
  EXPECT_TRUE(table.canary_intact());
  EXPECT_EQ(table.value.struct_size, offsetof(companion_model_table, segments) + 8);
}

TEST(CapiStatic, NoServerIsUnavailable) {
  std::string empty = make_temp_dir();
  ASSERT_FALSE(empty.empty());
  companion_connect_options o;
  companion_connect_options_init(&o);
  o.runtime_dir = empty.c_str();
  o.discovery_timeout_s = 0.2;
  companion_client* client = reinterpret_cast<companion_client*>(0x1);
  auto t0 = std::chrono::steady_clock::now();
  EXPECT_EQ(companion_client_connect(&o, &client), COMPANION_UNAVAILABLE);
  EXPECT_GE(std::chrono::steady_clock::now() - t0, std::chrono::milliseconds(150));
  EXPECT_EQ(client, nullptr);
  EXPECT_NE(last_error().find("no live companion server"), std::string::npos) << last_error();
  EXPECT_NE(last_error().find(empty), std::string::npos) << last_error();

  std::string missing = empty + "/missing.sock";
  companion_connect_options_init(&o);
  o.socket_path = missing.c_str();
  EXPECT_EQ(companion_client_connect(&o, &client), COMPANION_UNAVAILABLE);
  EXPECT_NE(last_error().find(missing), std::string::npos) << last_error();
  fs::remove_all(empty);
}

TEST(CapiStatic, NullArgumentsAreInvalid) {
  auto invalid = [](companion_status s, const char* what) {
    EXPECT_EQ(s, COMPANION_INVALID_ARGUMENT) << what;
    EXPECT_FALSE(last_error().empty()) << what;
  };
  invalid(companion_client_connect(nullptr, nullptr), "connect out");
  EXPECT_NE(last_error().find("NULL"), std::string::npos) << last_error();
  char* text = reinterpret_cast<char*>(0x1);
  invalid(companion_client_server_info(nullptr, &text), "server_info");
  EXPECT_EQ(text, nullptr);  // cleared on failure
  EXPECT_EQ(last_error(), "client is NULL");
  invalid(companion_client_list(nullptr, &text), "list");
  invalid(companion_client_health(nullptr, &text), "health");
  Spec spec("/nowhere");
  invalid(companion_client_status(nullptr, spec.get(), &text), "status");
  invalid(companion_client_load(nullptr, spec.get(), 1, -1, nullptr), "load");
  invalid(companion_client_unload(nullptr, spec.get(), nullptr, 0, nullptr), "unload");
  invalid(companion_client_wait_for_model_ready(nullptr, spec.get(), 1, 1, nullptr), "wait");
  companion_model* model = nullptr;
  invalid(companion_client_get_model_parameters(nullptr, spec.get(), -1, &model), "get params");
  companion_status_stream* stream = nullptr;
  invalid(companion_client_subscribe(nullptr, spec.get(), &stream), "subscribe");
  invalid(companion_status_stream_next(nullptr, 0, &text), "next");
  companion_tensor t;
  invalid(companion_model_tensor(nullptr, 0, &t), "tensor");
  invalid(companion_model_find(nullptr, "x", &t), "find");
  invalid(companion_model_info(nullptr, &text), "info");
  companion_model_table table;
  companion_model_table_init(&table);
  invalid(companion_model_get_table(nullptr, &table), "table");
  EXPECT_EQ(companion_model_tensor_count(nullptr), 0u);
  // NULL handles to close/release are no-ops.
  companion_client_close(nullptr);
  companion_model_release(nullptr);
  companion_status_stream_close(nullptr);
}

TEST(CapiStatic, LastErrorIsPerThread) {
  // The main thread's message survives other threads' failures.
  ASSERT_EQ(companion_client_list(nullptr, nullptr), COMPANION_INVALID_ARGUMENT);
  std::string main_message = last_error();
  ASSERT_FALSE(main_message.empty());

  std::barrier sync(2);
  std::string seen_a, seen_b;
  companion_status code_a = COMPANION_OK, code_b = COMPANION_OK;
  std::thread a([&] {
    EXPECT_STREQ(companion_last_error(), "");  // nothing failed on this thread yet
    code_a = companion_client_health(nullptr, nullptr);
    sync.arrive_and_wait();  // both have failed
    sync.arrive_and_wait();  // both have read
    seen_a = companion_last_error();
  });
  std::thread b([&] {
    companion_connect_options o;
    companion_connect_options_init(&o);
    o.struct_size = 0;  // refused before any connection is tried
    companion_client* c = nullptr;
    code_b = companion_client_connect(&o, &c);
    sync.arrive_and_wait();
    sync.arrive_and_wait();
    seen_b = companion_last_error();
  });
  a.join();
  b.join();
  EXPECT_EQ(code_a, COMPANION_INVALID_ARGUMENT);
  EXPECT_EQ(code_b, COMPANION_INVALID_ARGUMENT);
  EXPECT_EQ(seen_a, "client is NULL");
  EXPECT_NE(seen_b.find("struct_size"), std::string::npos) << seen_b;
  EXPECT_EQ(last_error(), main_message);
}

TEST(CapiStatic, LastErrorSurvivesInfallibleCalls) {
  ASSERT_EQ(companion_client_health(nullptr, nullptr), COMPANION_INVALID_ARGUMENT);
  std::string message = last_error();
  // Calls that cannot fail leave the message alone (so they may share an expression with it).
  (void)companion_status_string(COMPANION_INVALID_ARGUMENT);
  (void)companion_version();
  companion_free(nullptr);
  companion_client_close(nullptr);
  EXPECT_EQ(last_error(), message);
}

// ---- with a server -------------------------------------------------------------------------

TEST_F(CapiTest, ConnectsByDiscoveryAndReportsServerInfo) {
  companion_connect_options o;
  companion_connect_options_init(&o);
  o.runtime_dir = runtime_dir_.c_str();
  companion_client* raw = nullptr;
  ASSERT_EQ(companion_client_connect(&o, &raw), COMPANION_OK) << last_error();
  ClientPtr client(raw);
  EXPECT_STREQ(companion_last_error(), "");

  char* text = nullptr;
  ASSERT_EQ(companion_client_server_info(client.get(), &text), COMPANION_OK) << last_error();
  json j = take_json(text);
  std::set<std::string> keys;
  for (const auto& [k, v] : j.items()) keys.insert(k);
  EXPECT_EQ(keys,
            (std::set<std::string>{"instance_id", "namespace", "component", "hostname", "pid",
                                   "device", "gpu_uuid", "pci_bus_id", "device_ordinal", "backends",
                                   "default_backend", "started_at_ms", "version", "socket_path"}));
  EXPECT_EQ(j["socket_path"], server_->socket);
  EXPECT_EQ(j["instance_id"], server_->instance);
  EXPECT_EQ(j["pid"], server_->pid);
  EXPECT_EQ(j["namespace"], "companion");
  EXPECT_EQ(j["device"], "host");
  EXPECT_EQ(j["component"], "model_server_host");
  EXPECT_EQ(j["device_ordinal"], -1);
  EXPECT_EQ(j["version"], companion_version());

  ASSERT_EQ(companion_client_instances(client.get(), &text), COMPANION_OK) << last_error();
  json instances = take_json(text);
  ASSERT_TRUE(instances.is_array());
  ASSERT_EQ(instances.size(), 1u);
  EXPECT_EQ(instances[0]["instance_id"], server_->instance);
  EXPECT_EQ(companion_client_instances(nullptr, &text), COMPANION_INVALID_ARGUMENT);
}

TEST_F(CapiTest, RegistryAndInstanceOptions) {
  companion_connect_options o;
  companion_connect_options_init(&o);
  o.runtime_dir = runtime_dir_.c_str();
  o.registry = "local";
  o.instance_id = server_->instance.c_str();
  companion_client* raw = nullptr;
  ASSERT_EQ(companion_client_connect(&o, &raw), COMPANION_OK) << last_error();
  companion_client_close(raw);

  o.instance_id = "0123456789abcdef";  // no such instance
  EXPECT_EQ(companion_client_connect(&o, &raw), COMPANION_UNAVAILABLE);
  EXPECT_NE(last_error().find("0123456789abcdef"), std::string::npos) << last_error();

  o.instance_id = nullptr;
  o.registry = "zookeeper://h:1";
  EXPECT_EQ(companion_client_connect(&o, &raw), COMPANION_INVALID_ARGUMENT);
  EXPECT_NE(last_error().find("etcd://host:port"), std::string::npos) << last_error();

  // A struct from before these members existed: they are not read.
  o.struct_size = offsetof(companion_connect_options, registry);
  ASSERT_EQ(companion_client_connect(&o, &raw), COMPANION_OK) << last_error();
  companion_client_close(raw);
}

TEST_F(CapiTest, ConnectsBySocketPathAndReportsHealthAndList) {
  companion_connect_options o;
  companion_connect_options_init(&o);
  o.socket_path = server_->socket.c_str();
  o.runtime_dir = "/nonexistent-runtime-dir";  // not consulted when socket_path is given
  o.client_name = "capi-unit";
  companion_client* raw = nullptr;
  ASSERT_EQ(companion_client_connect(&o, &raw), COMPANION_OK) << last_error();
  ClientPtr client(raw);

  char* text = nullptr;
  ASSERT_EQ(companion_client_health(client.get(), &text), COMPANION_OK) << last_error();
  json h = take_json(text);
  EXPECT_EQ(h["state"], "serving");
  EXPECT_EQ(h["server"]["instance_id"], server_->instance);
  for (const char* k :
       {"uptime_ms", "models_loaded", "models_total", "clients", "leases", "slab_bytes"})
    EXPECT_TRUE(h.contains(k)) << k;
  EXPECT_GE(h["clients"].get<int>(), 1);

  ASSERT_EQ(companion_client_list(client.get(), &text), COMPANION_OK) << last_error();
  EXPECT_TRUE(take_json(text).is_array());
}

TEST_F(CapiTest, LoadWithoutWaitThenWaitForReady) {
  std::string path = write_model("load-nowait");
  auto client = connect();
  ASSERT_TRUE(client);
  Spec spec(path);
  char* text = nullptr;
  ASSERT_EQ(companion_client_load(client.get(), spec.get(), 0, -1, &text), COMPANION_OK)
      << last_error();
  json started = take_json(text);
  EXPECT_TRUE(started["state"] == "loading" || started["state"] == "loaded") << started;
  EXPECT_EQ(started["source"], path);

  ASSERT_EQ(companion_client_wait_for_model_ready(client.get(), spec.get(), 10, 60, &text),
            COMPANION_OK)
      << last_error();
  json ready = take_json(text);
  EXPECT_EQ(ready["state"], "loaded");
  EXPECT_EQ(ready["tensors"], 4);
  EXPECT_EQ(ready["id"], started["id"]);
  EXPECT_EQ(ready["key"], started["key"]);
  EXPECT_EQ(ready["progress"], 1.0);
  EXPECT_FALSE(ready.contains("error"));

  ASSERT_EQ(companion_client_status(client.get(), spec.get(), &text), COMPANION_OK) << last_error();
  json status = take_json(text);
  EXPECT_EQ(status["state"], "loaded");
  EXPECT_EQ(status["id"], started["id"]);
  std::set<std::string> keys;
  for (const auto& [k, v] : status.items()) keys.insert(k);
  EXPECT_EQ(keys,
            (std::set<std::string>{"id", "key", "source", "state", "bytes_done", "bytes_total",
                                   "progress", "tensors", "leases", "backend", "slab_bytes",
                                   "published", "generation", "fingerprint", "generations",
                                   "host_bytes", "offloaded", "last_used_ms", "eviction_rank"}));

  json entry = listed(client.get(), path);
  ASSERT_FALSE(entry.is_null());
  EXPECT_EQ(entry["id"], started["id"]);

  // Already loaded: load(wait) returns at once; the JSON out pointer is optional.
  EXPECT_EQ(companion_client_load(client.get(), spec.get(), 1, 5, nullptr), COMPANION_OK)
      << last_error();
  EXPECT_EQ(companion_client_wait_for_model_ready(client.get(), spec.get(), 5, 5, nullptr),
            COMPANION_OK)
      << last_error();
}

TEST_F(CapiTest, LoadAndWait) {
  std::string path = write_model("load-wait", 2);
  auto client = connect();
  ASSERT_TRUE(client);
  Spec spec(path, "auto");  // "auto" = as stored
  char* text = nullptr;
  ASSERT_EQ(companion_client_load(client.get(), spec.get(), 1, 60, &text), COMPANION_OK)
      << last_error();
  json j = take_json(text);
  EXPECT_EQ(j["state"], "loaded");
  EXPECT_EQ(j["bytes_done"], j["bytes_total"]);
  EXPECT_GT(j["bytes_total"].get<uint64_t>(), 0u);
  EXPECT_EQ(j["backend"], "host");
}

TEST_F(CapiTest, GetModelParametersMapsTheFileBytes) {
  std::string path = write_model("params", 3);
  auto client = connect();
  ASSERT_TRUE(client);
  Spec spec(path);
  companion_model* raw = nullptr;
  ASSERT_EQ(companion_client_get_model_parameters(client.get(), spec.get(), 60, &raw), COMPANION_OK)
      << last_error();
  ModelPtr model(raw);
  expect_tensors_match(model.get(), sample_tensors(3));

  companion_tensor t;
  EXPECT_EQ(companion_model_find(model.get(), "no.such.tensor", &t), COMPANION_NOT_FOUND);
  EXPECT_NE(last_error().find("no.such.tensor"), std::string::npos) << last_error();
  EXPECT_EQ(companion_model_tensor(model.get(), 4, &t), COMPANION_INVALID_ARGUMENT);
  EXPECT_NE(last_error().find("out of range"), std::string::npos) << last_error();
  EXPECT_EQ(companion_model_tensor_sized(model.get(), 0, nullptr, sizeof(t)),
            COMPANION_INVALID_ARGUMENT);
  EXPECT_EQ(companion_model_find(model.get(), nullptr, &t), COMPANION_INVALID_ARGUMENT);
  EXPECT_EQ(companion_model_find_sized(model.get(), "mask", nullptr, sizeof(t)),
            COMPANION_INVALID_ARGUMENT);
  EXPECT_EQ(companion_model_tensor_sized(model.get(), 0, &t, 0), COMPANION_INVALID_ARGUMENT);
  EXPECT_NE(last_error().find("tensor_size"), std::string::npos) << last_error();

  // The scalar has rank 0.
  ASSERT_EQ(companion_model_find(model.get(), "scale", &t), COMPANION_OK);
  EXPECT_EQ(t.ndim, 0);
  EXPECT_EQ(t.nbytes, 4u);

  char* text = nullptr;
  ASSERT_EQ(companion_model_info(model.get(), &text), COMPANION_OK) << last_error();
  json info = take_json(text);
  EXPECT_GT(info["lease_id"].get<uint64_t>(), 0u);
  EXPECT_GE(info["segments"].get<size_t>(), 1u);
  EXPECT_EQ(info["segment_inodes"].size(), info["segments"].get<size_t>());
  EXPECT_GE(info["mapped_bytes"].get<uint64_t>(), 24u + 32u + 5u + 4u);
  EXPECT_EQ(info["read_only"], true);  // host memfds are mapped PROT_READ
  EXPECT_EQ(info["model"]["state"], "loaded");
  EXPECT_EQ(info["model"]["source"], path);
  EXPECT_EQ(info["model"]["tensors"], 4);
  EXPECT_EQ(companion_model_info(model.get(), nullptr), COMPANION_INVALID_ARGUMENT);

  // The server counts our lease; it goes with the release.
  EXPECT_EQ(listed(client.get(), path)["leases"], 1);
  model.reset();
  bool released = false;
  for (int i = 0; i < 200 && !released; ++i) {
    released = listed(client.get(), path)["leases"] == 0;
    if (!released) std::this_thread::sleep_for(std::chrono::milliseconds(25));
  }
  EXPECT_TRUE(released);
}

// companion_tensor has no size field: the calls take the caller's size, and an older caller's
// shorter struct gets the fields it has and nothing past them.
TEST_F(CapiTest, TensorCallsWriteNothingPastAnOlderCallersStruct) {
  std::string path = write_model("older-tensor", 6);
  auto client = connect();
  ASSERT_TRUE(client);
  Spec spec(path);
  companion_model* raw = nullptr;
  ASSERT_EQ(companion_client_get_model_parameters(client.get(), spec.get(), 60, &raw), COMPANION_OK)
      << last_error();
  ModelPtr model(raw);
  companion_tensor current;
  ASSERT_EQ(companion_model_tensor(model.get(), 1, &current), COMPANION_OK) << last_error();

  Guarded<OlderTensor> by_index;
  ASSERT_EQ(companion_model_tensor_sized(model.get(), 1, by_index.as<companion_tensor>(),
                                         sizeof(by_index.value)),
            COMPANION_OK)
      << last_error();
  EXPECT_TRUE(by_index.canary_intact());
  EXPECT_EQ(by_index.value.data, current.data);
  EXPECT_EQ(by_index.value.nbytes, current.nbytes);
  EXPECT_EQ(std::string(by_index.value.name, by_index.value.name_length),
            std::string(current.name, current.name_length));

  Guarded<OlderTensor> by_name;
  std::string name(current.name, current.name_length);
  ASSERT_EQ(companion_model_find_sized(model.get(), name.c_str(), by_name.as<companion_tensor>(),
                                       sizeof(by_name.value)),
            COMPANION_OK)
      << last_error();
  EXPECT_TRUE(by_name.canary_intact());
  EXPECT_EQ(by_name.value.data, current.data);
  EXPECT_EQ(by_name.value.ndim, current.ndim);

  // The unsized functions write the frozen size, which is today's whole struct.
  Guarded<companion_tensor> legacy;
  ASSERT_EQ((companion_model_tensor)(model.get(), 1, &legacy.value), COMPANION_OK);
  EXPECT_TRUE(legacy.canary_intact());
  EXPECT_EQ(legacy.value.data, current.data);
  EXPECT_EQ(legacy.value.device_type, COMPANION_DEVICE_CPU);
}

// The table of companion_model_get_table says what companion_model_tensor says, tensor by
// tensor, and its records are stepped through by record_size.
TEST_F(CapiTest, TableHandsEveryTensorOverInOneBlock) {
  std::string path = write_model("table", 5);
  auto client = connect();
  ASSERT_TRUE(client);
  Spec spec(path);
  companion_model* raw = nullptr;
  ASSERT_EQ(companion_client_get_model_parameters(client.get(), spec.get(), 60, &raw), COMPANION_OK)
      << last_error();
  ModelPtr model(raw);

  companion_model_table table;
  companion_model_table_init(&table);
  EXPECT_EQ(table.struct_size, sizeof(table));
  EXPECT_EQ(companion_model_get_table(model.get(), nullptr), COMPANION_INVALID_ARGUMENT);
  companion_model_table zero{};
  EXPECT_EQ(companion_model_get_table(model.get(), &zero), COMPANION_INVALID_ARGUMENT);
  EXPECT_NE(last_error().find("companion_model_table_init"), std::string::npos) << last_error();
  ASSERT_EQ(companion_model_get_table(model.get(), &table), COMPANION_OK) << last_error();
  ASSERT_EQ(table.count, companion_model_tensor_count(model.get()));
  ASSERT_GE(table.record_size, sizeof(companion_tensor_record));
  ASSERT_NE(table.records, nullptr);
  EXPECT_GE(table.segments, 1u);
  size_t name_bytes = 0;
  size_t dims = 0;
  for (size_t i = 0; i < table.count; ++i) {
    const auto* r = reinterpret_cast<const companion_tensor_record*>(
        static_cast<const char*>(table.records) + i * table.record_size);
    companion_tensor t;
    ASSERT_EQ(companion_model_tensor(model.get(), i, &t), COMPANION_OK) << last_error();
    std::string name(t.name, t.name_length);
    ASSERT_LE(r->name_offset + r->name_length, table.names_bytes) << name;
    EXPECT_EQ(std::string(table.names + r->name_offset, r->name_length), name);
    EXPECT_EQ(table.names[r->name_offset + r->name_length], '\0') << name;
    name_bytes += r->name_length + 1u;
    EXPECT_EQ(r->dtype, t.dtype) << name;
    ASSERT_EQ(r->ndim, t.ndim) << name;
    ASSERT_LE(r->dims_offset + 2u * static_cast<uint64_t>(r->ndim), table.dims_count) << name;
    for (int32_t d = 0; d < t.ndim; ++d) {
      EXPECT_EQ(table.dims[r->dims_offset + static_cast<uint64_t>(d)], t.shape[d]) << name;
      EXPECT_EQ(table.dims[r->dims_offset + static_cast<uint64_t>(t.ndim + d)], t.strides[d])
          << name;
    }
    dims += 2u * static_cast<size_t>(t.ndim);
    EXPECT_EQ(r->data, t.data) << name;
    EXPECT_EQ(r->nbytes, t.nbytes) << name;
    EXPECT_EQ(r->device_type, t.device_type) << name;
    EXPECT_EQ(r->device_id, t.device_id) << name;
    EXPECT_LT(r->segment, table.segments) << name;
    EXPECT_GE(reinterpret_cast<uintptr_t>(r->data), r->segment_offset) << name;
  }
  EXPECT_EQ(table.names_bytes, name_bytes);
  EXPECT_EQ(table.dims_count, dims);
  // Tensors of one segment agree on where it starts.
  std::map<uint32_t, uintptr_t> starts;
  for (size_t i = 0; i < table.count; ++i) {
    const auto* r = reinterpret_cast<const companion_tensor_record*>(
        static_cast<const char*>(table.records) + i * table.record_size);
    uintptr_t start = reinterpret_cast<uintptr_t>(r->data) - r->segment_offset;
    auto [it, fresh] = starts.emplace(r->segment, start);
    EXPECT_TRUE(fresh || it->second == start) << i;
  }

  // A second call hands over the same arrays (built once, owned by the handle).
  companion_model_table again;
  companion_model_table_init(&again);
  ASSERT_EQ(companion_model_get_table(model.get(), &again), COMPANION_OK) << last_error();
  EXPECT_EQ(again.records, table.records);
  EXPECT_EQ(again.names, table.names);

  // An older, shorter struct: nothing past struct_size is written.
  companion_model_table old;
  companion_model_table_init(&old);
  old.struct_size = offsetof(companion_model_table, names);
  old.names = reinterpret_cast<const char*>(0x1);
  old.segments = 12345;
  ASSERT_EQ(companion_model_get_table(model.get(), &old), COMPANION_OK) << last_error();
  EXPECT_EQ(old.records, table.records);
  EXPECT_EQ(old.names, reinterpret_cast<const char*>(0x1));
  EXPECT_EQ(old.segments, 12345u);
}

TEST_F(CapiTest, DtypeCastIsPassedToTheServer) {
  std::string path = write_model("cast", 4);
  auto client = connect();
  ASSERT_TRUE(client);
  Spec spec(path, "fp16");
  companion_model* raw = nullptr;
  ASSERT_EQ(companion_client_get_model_parameters(client.get(), spec.get(), 60, &raw), COMPANION_OK)
      << last_error();
  ModelPtr model(raw);
  companion_tensor t;
  ASSERT_EQ(companion_model_find(model.get(), "embed.weight", &t), COMPANION_OK);
  EXPECT_EQ(t.dtype, COMPANION_DTYPE_F16);
  EXPECT_EQ(t.nbytes, 12u);
  ASSERT_EQ(companion_model_find(model.get(), "layer.0.bias", &t), COMPANION_OK);
  EXPECT_EQ(t.dtype, COMPANION_DTYPE_I64);  // only floating tensors are cast
}

TEST_F(CapiTest, BadDtypesAreRefused) {
  auto client = connect();
  ASSERT_TRUE(client);
  Spec unknown(model_root_ + "/whatever", "q7");
  char* text = nullptr;
  EXPECT_EQ(companion_client_load(client.get(), unknown.get(), 1, 5, &text),
            COMPANION_UNKNOWN_DTYPE);
  EXPECT_NE(last_error().find("q7"), std::string::npos) << last_error();
  EXPECT_EQ(text, nullptr);
  companion_model* model = nullptr;
  EXPECT_EQ(companion_client_get_model_parameters(client.get(), unknown.get(), 5, &model),
            COMPANION_UNKNOWN_DTYPE);
  EXPECT_EQ(model, nullptr);
  companion_status_stream* stream = nullptr;
  EXPECT_EQ(companion_client_subscribe(client.get(), unknown.get(), &stream),
            COMPANION_UNKNOWN_DTYPE);
  EXPECT_EQ(stream, nullptr);

  // A real dtype that is no cast target.
  Spec int8(model_root_ + "/whatever", "int8");
  EXPECT_EQ(companion_client_status(client.get(), int8.get(), &text), COMPANION_UNKNOWN_DTYPE);
  EXPECT_NE(last_error().find("I8"), std::string::npos) << last_error();
}

TEST_F(CapiTest, InvalidSpecsAndTimeouts) {
  auto client = connect();
  ASSERT_TRUE(client);
  char* text = nullptr;
  companion_model_spec spec;
  companion_model_spec_init(&spec);
  EXPECT_EQ(companion_client_status(client.get(), &spec, &text), COMPANION_INVALID_ARGUMENT);
  EXPECT_NE(last_error().find("source"), std::string::npos) << last_error();
  EXPECT_EQ(companion_client_status(client.get(), nullptr, &text), COMPANION_INVALID_ARGUMENT);
  EXPECT_EQ(last_error(), "spec is NULL");
  spec.source = "";
  EXPECT_EQ(companion_client_status(client.get(), &spec, &text), COMPANION_INVALID_ARGUMENT);
  spec.source = "/models/x";
  spec.struct_size = 0;
  EXPECT_EQ(companion_client_status(client.get(), &spec, &text), COMPANION_INVALID_ARGUMENT);
  EXPECT_NE(last_error().find("companion_model_spec_init"), std::string::npos) << last_error();
  companion_model_spec_init(&spec);
  spec.source = "/models/x";
  spec.tp_size = 2;
  spec.tp_rank = 2;
  EXPECT_EQ(companion_client_status(client.get(), &spec, &text), COMPANION_INVALID_ARGUMENT);
  EXPECT_NE(last_error().find("tp_rank"), std::string::npos) << last_error();

  Spec relative("relative/dir/model");
  EXPECT_EQ(companion_client_load(client.get(), relative.get(), 1, 5, nullptr),
            COMPANION_INVALID_ARGUMENT);
  EXPECT_NE(last_error().find("relative"), std::string::npos) << last_error();

  Spec ok(write_model("timeouts"));
  double nan = std::numeric_limits<double>::quiet_NaN();
  EXPECT_EQ(companion_client_load(client.get(), ok.get(), 1, nan, nullptr),
            COMPANION_INVALID_ARGUMENT);
  EXPECT_NE(last_error().find("NaN"), std::string::npos);
  EXPECT_EQ(companion_client_wait_for_model_ready(client.get(), ok.get(), nan, 1, nullptr),
            COMPANION_INVALID_ARGUMENT);
  // Infinity is "no limit".
  double inf = std::numeric_limits<double>::infinity();
  EXPECT_EQ(companion_client_wait_for_model_ready(client.get(), ok.get(), inf, inf, nullptr),
            COMPANION_OK)
      << last_error();
  companion_model* model = nullptr;
  EXPECT_EQ(companion_client_get_model_parameters(client.get(), ok.get(), 1e300, &model),
            COMPANION_OK)
      << last_error();
  companion_model_release(model);

  companion_connect_options o;
  companion_connect_options_init(&o);
  o.runtime_dir = runtime_dir_.c_str();
  o.discovery_timeout_s = nan;
  companion_client* other = nullptr;
  EXPECT_EQ(companion_client_connect(&o, &other), COMPANION_INVALID_ARGUMENT);
  o.discovery_timeout_s = inf;  // a live server is found at once
  ASSERT_EQ(companion_client_connect(&o, &other), COMPANION_OK) << last_error();
  companion_client_close(other);
}

TEST_F(CapiTest, MissingModelIsNotFoundAndNamesThePath) {
  auto client = connect();
  ASSERT_TRUE(client);
  std::string path = model_root_ + "/no-such-model";
  Spec spec(path);
  char* text = nullptr;
  EXPECT_EQ(companion_client_load(client.get(), spec.get(), 1, 10, &text), COMPANION_NOT_FOUND);
  EXPECT_NE(last_error().find(path), std::string::npos) << last_error();
  EXPECT_EQ(text, nullptr);
  EXPECT_EQ(companion_client_load(client.get(), spec.get(), 0, 10, nullptr), COMPANION_NOT_FOUND);
  EXPECT_EQ(companion_client_status(client.get(), spec.get(), &text), COMPANION_NOT_FOUND);
  EXPECT_NE(last_error().find(path), std::string::npos) << last_error();
  EXPECT_EQ(companion_client_wait_for_model_ready(client.get(), spec.get(), 5, 5, nullptr),
            COMPANION_NOT_FOUND);
  companion_model* model = nullptr;
  EXPECT_EQ(companion_client_get_model_parameters(client.get(), spec.get(), 5, &model),
            COMPANION_NOT_FOUND);
  EXPECT_EQ(model, nullptr);
  EXPECT_NE(last_error().find(path), std::string::npos) << last_error();
  EXPECT_EQ(companion_client_unload(client.get(), spec.get(), nullptr, 0, nullptr),
            COMPANION_NOT_FOUND);
  // A successful call clears the message.
  ASSERT_EQ(companion_client_list(client.get(), &text), COMPANION_OK);
  companion_free(text);
  EXPECT_STREQ(companion_last_error(), "");
}

TEST_F(CapiTest, SubscribeToOneModelSeesCurrentStateThenTheLoad) {
  std::string path = write_model("stream-one", 5);
  auto client = connect();
  ASSERT_TRUE(client);
  Spec spec(path);
  companion_status_stream* raw = nullptr;
  ASSERT_EQ(companion_client_subscribe(client.get(), spec.get(), &raw), COMPANION_OK)
      << last_error();
  StreamPtr stream(raw);
  char* text = nullptr;
  ASSERT_EQ(companion_status_stream_next(stream.get(), 10, &text), COMPANION_OK) << last_error();
  json first = take_json(text);
  EXPECT_EQ(first["state"], "ready");
  EXPECT_EQ(first["source"], path);

  ASSERT_EQ(companion_client_load(client.get(), spec.get(), 0, -1, nullptr), COMPANION_OK)
      << last_error();
  std::vector<json> states;
  while (states.empty() || states.back()["state"] != "loaded") {
    ASSERT_EQ(companion_status_stream_next(stream.get(), 30, &text), COMPANION_OK) << last_error();
    states.push_back(take_json(text));
    ASSERT_LT(states.size(), 1000u);
    ASSERT_NE(states.back()["state"], "error") << states.back();
  }
  EXPECT_EQ(states.front()["state"], "loading");
  uint64_t last_done = 0;
  for (const auto& s : states) {
    EXPECT_GE(s["bytes_done"].get<uint64_t>(), last_done);
    last_done = s["bytes_done"].get<uint64_t>();
  }
  EXPECT_EQ(states.back()["bytes_done"], states.back()["bytes_total"]);

  // Nothing more: a timeout, with a message.
  EXPECT_EQ(companion_status_stream_next(stream.get(), 0.2, &text), COMPANION_TIMEOUT);
  EXPECT_EQ(text, nullptr);
  EXPECT_FALSE(last_error().empty());
  EXPECT_EQ(companion_status_stream_next(stream.get(), std::nan(""), &text),
            COMPANION_INVALID_ARGUMENT);
  EXPECT_EQ(companion_status_stream_next(stream.get(), 1, nullptr), COMPANION_INVALID_ARGUMENT);

  // An unload shows up too.
  ASSERT_EQ(companion_client_unload(client.get(), spec.get(), nullptr, 0, &text), COMPANION_OK)
      << last_error();
  EXPECT_EQ(take_json(text)["state"], "unloaded");
  ASSERT_EQ(companion_status_stream_next(stream.get(), 10, &text), COMPANION_OK) << last_error();
  EXPECT_EQ(take_json(text)["state"], "unloaded");
}

TEST_F(CapiTest, SubscribeToAllSeesEveryModel) {
  std::string a = write_model("stream-all-a", 6);
  std::string b = write_model("stream-all-b", 7);
  auto client = connect();
  ASSERT_TRUE(client);
  Spec spec_a(a), spec_b(b);
  ASSERT_EQ(companion_client_load(client.get(), spec_a.get(), 1, 60, nullptr), COMPANION_OK)
      << last_error();

  companion_status_stream* raw = nullptr;
  ASSERT_EQ(companion_client_subscribe(client.get(), nullptr, &raw), COMPANION_OK) << last_error();
  StreamPtr stream(raw);
  // First the current state of every model (a among them, loaded).
  char* text = nullptr;
  bool saw_a = false;
  for (;;) {
    companion_status s = companion_status_stream_next(stream.get(), 0.5, &text);
    if (s == COMPANION_TIMEOUT) break;
    ASSERT_EQ(s, COMPANION_OK) << last_error();
    json j = take_json(text);
    if (j["source"] == a) saw_a = j["state"] == "loaded";
  }
  EXPECT_TRUE(saw_a);

  ASSERT_EQ(companion_client_load(client.get(), spec_b.get(), 0, -1, nullptr), COMPANION_OK)
      << last_error();
  std::vector<std::string> b_states;
  while (b_states.empty() || b_states.back() != "loaded") {
    ASSERT_EQ(companion_status_stream_next(stream.get(), 30, &text), COMPANION_OK) << last_error();
    json j = take_json(text);
    if (j["source"] == b) b_states.push_back(j["state"]);
    ASSERT_LT(b_states.size(), 1000u);
  }
  EXPECT_EQ(b_states.front(), "loading");
}

TEST_F(CapiTest, UnloadRespectsLeasesUnlessForced) {
  std::string path = write_model("in-use", 8);
  auto client = connect();
  ASSERT_TRUE(client);
  Spec spec(path);
  companion_model* raw = nullptr;
  ASSERT_EQ(companion_client_get_model_parameters(client.get(), spec.get(), 60, &raw), COMPANION_OK)
      << last_error();
  ModelPtr model(raw);

  char* text = nullptr;
  EXPECT_EQ(companion_client_unload(client.get(), spec.get(), nullptr, 0, &text),
            COMPANION_MODEL_IN_USE);
  EXPECT_EQ(text, nullptr);
  EXPECT_NE(last_error().find("lease"), std::string::npos) << last_error();

  ASSERT_EQ(companion_client_unload(client.get(), spec.get(), nullptr, 1, &text), COMPANION_OK)
      << last_error();
  json unloaded = take_json(text);
  EXPECT_EQ(unloaded["state"], "unloaded");
  EXPECT_EQ(unloaded["source"], path);
  // Our mapping outlives the unload.
  expect_tensors_match(model.get(), sample_tensors(8));
  model.reset();

  // By id (and key), as `companion ls` shows them.
  ASSERT_EQ(companion_client_load(client.get(), spec.get(), 1, 60, &text), COMPANION_OK)
      << last_error();
  json loaded = take_json(text);
  std::string id = loaded["id"];
  ASSERT_EQ(companion_client_unload(client.get(), nullptr, id.c_str(), 0, &text), COMPANION_OK)
      << last_error();
  EXPECT_EQ(take_json(text)["id"], id);
  EXPECT_EQ(companion_client_unload(client.get(), nullptr, id.c_str(), 0, nullptr),
            COMPANION_NOT_FOUND);
  EXPECT_NE(last_error().find(id), std::string::npos) << last_error();
  ASSERT_EQ(companion_client_load(client.get(), spec.get(), 1, 60, &text), COMPANION_OK);
  std::string key = take_json(text)["key"];
  EXPECT_EQ(companion_client_unload(client.get(), nullptr, key.c_str(), 0, nullptr), COMPANION_OK)
      << last_error();

  EXPECT_EQ(companion_client_unload(client.get(), nullptr, nullptr, 0, nullptr),
            COMPANION_INVALID_ARGUMENT);
  EXPECT_EQ(companion_client_unload(client.get(), nullptr, "", 0, nullptr),
            COMPANION_INVALID_ARGUMENT);
}

TEST_F(CapiTest, ModelOutlivesItsClient) {
  std::string path = write_model("outlives", 9);
  Spec spec(path);
  companion_model* raw = nullptr;
  {
    auto client = connect();
    ASSERT_TRUE(client);
    ASSERT_EQ(companion_client_get_model_parameters(client.get(), spec.get(), 60, &raw),
              COMPANION_OK)
        << last_error();
  }  // client closed here
  ModelPtr model(raw);
  expect_tensors_match(model.get(), sample_tensors(9));
  char* text = nullptr;
  ASSERT_EQ(companion_model_info(model.get(), &text), COMPANION_OK) << last_error();
  EXPECT_EQ(take_json(text)["model"]["source"], path);

  // The lease is still held (the model keeps its connection) until the release.
  auto observer = connect();
  ASSERT_TRUE(observer);
  EXPECT_EQ(listed(observer.get(), path)["leases"], 1);
  model.reset();
  bool released = false;
  for (int i = 0; i < 200 && !released; ++i) {
    released = listed(observer.get(), path)["leases"] == 0;
    if (!released) std::this_thread::sleep_for(std::chrono::milliseconds(25));
  }
  EXPECT_TRUE(released);
}

TEST_F(CapiTest, OneClientSharedByThreads) {
  std::string path = write_model("threads", 10);
  auto client = connect();
  ASSERT_TRUE(client);
  std::atomic<int> failures{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&, t] {
      Spec spec(path);
      for (int i = 0; i < 10; ++i) {
        char* text = nullptr;
        companion_status s = COMPANION_OK;
        switch ((t + i) % 4) {
          case 0:
            s = companion_client_list(client.get(), &text);
            break;
          case 1:
            s = companion_client_health(client.get(), &text);
            break;
          case 2:
            s = companion_client_server_info(client.get(), &text);
            break;
          case 3: {
            companion_model* m = nullptr;
            s = companion_client_get_model_parameters(client.get(), spec.get(), 60, &m);
            if (s == COMPANION_OK && companion_model_tensor_count(m) != 4) ++failures;
            companion_model_release(m);
            break;
          }
        }
        if (s != COMPANION_OK) ++failures;
        companion_free(text);
      }
    });
  }
  for (auto& th : threads) th.join();
  EXPECT_EQ(failures.load(), 0);
}

TEST_F(CapiTest, StructSizeLimitsWhatIsRead) {
  std::string path = write_model("struct-size", 11);
  // An older, shorter spec: the fields past struct_size are never read (poisoned here).
  companion_model_spec old_spec;
  companion_model_spec_init(&old_spec);
  old_spec.source = path.c_str();
  old_spec.dtype = "q7";                              // past the end: ignored
  old_spec.tag = reinterpret_cast<const char*>(0x1);  // would crash if read
  old_spec.struct_size = offsetof(companion_model_spec, dtype);

  // A shorter connect options struct: runtime_dir and later are not read.
  companion_connect_options old_options;
  companion_connect_options_init(&old_options);
  old_options.socket_path = server_->socket.c_str();
  old_options.runtime_dir = reinterpret_cast<const char*>(0x1);
  old_options.client_name = reinterpret_cast<const char*>(0x1);
  old_options.struct_size = offsetof(companion_connect_options, runtime_dir);
  companion_client* raw = nullptr;
  ASSERT_EQ(companion_client_connect(&old_options, &raw), COMPANION_OK) << last_error();
  ClientPtr client(raw);

  char* text = nullptr;
  ASSERT_EQ(companion_client_load(client.get(), &old_spec, 1, 60, &text), COMPANION_OK)
      << last_error();
  EXPECT_EQ(take_json(text)["state"], "loaded");

  // A newer, longer struct: the unknown tail is ignored.
  struct {
    companion_model_spec spec;
    char tail[64];
  } newer;
  std::memset(&newer, 0x5A, sizeof(newer));
  companion_model_spec_init(&newer.spec);
  newer.spec.source = path.c_str();
  newer.spec.struct_size = sizeof(newer);
  ASSERT_EQ(companion_client_status(client.get(), &newer.spec, &text), COMPANION_OK)
      << last_error();
  EXPECT_EQ(take_json(text)["state"], "loaded");
}

// ---- publishing ----------------------------------------------------------------------------

struct PublicationCloser {
  void operator()(companion_publication* p) const { companion_publication_close(p); }
};
using PublicationPtr = std::unique_ptr<companion_publication, PublicationCloser>;

class CapiPublishTest : public CapiTest {
 protected:
  // Claims `key` (mode NOW) and declares w (4x8 f32), b (8 f32) and w_tied (alias of w).
  static PublicationPtr begin(companion_client* client, const std::string& key,
                              const char* fingerprint) {
    companion_publication* raw = nullptr;
    companion_status s =
        companion_publish_claim(client, key.c_str(), fingerprint, COMPANION_CLAIM_NOW, 10, &raw);
    EXPECT_EQ(s, COMPANION_OK) << last_error();
    PublicationPtr p(raw);
    if (!p) return p;
    static const int64_t w_shape[] = {4, 8};
    static const int64_t b_shape[] = {8};
    companion_tensor_decl table[] = {{"w", COMPANION_DTYPE_F32, 2, w_shape, nullptr},
                                     {"b", COMPANION_DTYPE_F32, 1, b_shape, nullptr},
                                     {"w_tied", COMPANION_DTYPE_F32, 2, w_shape, "w"}};
    EXPECT_EQ(companion_publication_declare(p.get(), table, 3), COMPANION_OK) << last_error();
    return p;
  }

  // Fills every declared tensor with value + its element index.
  static void fill(companion_publication* p, float value) {
    for (size_t i = 0; i < companion_publication_tensor_count(p); ++i) {
      companion_tensor t{};
      ASSERT_EQ(companion_publication_tensor(p, i, &t), COMPANION_OK) << last_error();
      ASSERT_EQ(t.device_type, COMPANION_DEVICE_CPU);
      auto* data = static_cast<float*>(const_cast<void*>(t.data));
      for (size_t k = 0; k < t.nbytes / sizeof(float); ++k) data[k] = value + static_cast<float>(k);
    }
  }

  static ModelPtr attach(companion_client* client, const std::string& key, const char* fingerprint,
                         uint64_t generation, companion_status expected = COMPANION_OK) {
    companion_attach_options options;
    companion_attach_options_init(&options);
    options.fingerprint_json = fingerprint;
    options.generation = generation;
    options.timeout_s = 10;
    companion_model* raw = nullptr;
    EXPECT_EQ(companion_client_attach(client, key.c_str(), &options, &raw), expected)
        << last_error();
    return ModelPtr(raw);
  }

  static float first(const companion_model* m, const char* name) {
    companion_tensor t{};
    EXPECT_EQ(companion_model_find(m, name, &t), COMPANION_OK) << last_error();
    return t.data == nullptr ? -1.0f : *static_cast<const float*>(t.data);
  }

  static json entry(companion_client* client, const std::string& key) {
    char* text = nullptr;
    EXPECT_EQ(companion_client_list(client, &text), COMPANION_OK) << last_error();
    for (const auto& m : take_json(text))
      if (m["published"] == true && m["key"] == key) return m;
    return json();
  }

  static uint64_t slab_bytes(companion_client* client) {
    char* text = nullptr;
    EXPECT_EQ(companion_client_health(client, &text), COMPANION_OK) << last_error();
    return take_json(text)["slab_bytes"].get<uint64_t>();
  }
};

// An older caller's declarations (no alias_of) are read decl_size bytes apart, and the
// publication's tensors are handed back into its older companion_tensor.
TEST_F(CapiPublishTest, OlderStructsDeclareAndReadThePublication) {
  auto writer = connect();
  ASSERT_TRUE(writer);
  companion_publication* raw = nullptr;
  ASSERT_EQ(
      companion_publish_claim(writer.get(), "capi/older", nullptr, COMPANION_CLAIM_NOW, 10, &raw),
      COMPANION_OK)
      << last_error();
  PublicationPtr p(raw);
  static const int64_t w_shape[] = {4, 8};
  static const int64_t b_shape[] = {8};
  OlderTensorDecl older[] = {{"w", COMPANION_DTYPE_F32, 2, w_shape},
                             {"b", COMPANION_DTYPE_F32, 1, b_shape}};
  const auto* decls = reinterpret_cast<const companion_tensor_decl*>(older);
  EXPECT_EQ(companion_publication_declare_sized(p.get(), decls, 2, sizeof(int64_t)),
            COMPANION_INVALID_ARGUMENT);
  EXPECT_NE(last_error().find("decl_size"), std::string::npos) << last_error();
  ASSERT_EQ(companion_publication_declare_sized(p.get(), decls, 2, sizeof(OlderTensorDecl)),
            COMPANION_OK)
      << last_error();
  ASSERT_EQ(companion_publication_tensor_count(p.get()), 2u);

  Guarded<OlderTensor> b;
  ASSERT_EQ(
      companion_publication_tensor_sized(p.get(), 1, b.as<companion_tensor>(), sizeof(b.value)),
      COMPANION_OK)
      << last_error();
  EXPECT_TRUE(b.canary_intact());
  EXPECT_EQ(std::string(b.value.name, b.value.name_length), "b");
  EXPECT_EQ(b.value.ndim, 1);
  EXPECT_EQ(b.value.nbytes, 32u);
  ASSERT_NE(b.value.data, nullptr);
  EXPECT_EQ(companion_publication_tensor_sized(p.get(), 1, b.as<companion_tensor>(), 0),
            COMPANION_INVALID_ARGUMENT);

  companion_tensor w{};
  ASSERT_EQ(companion_publication_tensor(p.get(), 0, &w), COMPANION_OK) << last_error();
  EXPECT_EQ(std::string(w.name, w.name_length), "w");
  EXPECT_EQ(w.nbytes, 4u * 8u * 4u);
  EXPECT_NE(w.data, b.value.data);  // not aliased: the missing alias_of read as none
}

TEST_F(CapiPublishTest, PublishedTensorsAreAttachedByAnotherClientWithTheirTies) {
  auto writer = connect();
  auto reader = connect();
  const char* fp = R"({"engine":"test","dtype":"f32"})";
  auto p = begin(writer.get(), "capi/basic", fp);
  ASSERT_TRUE(p);
  ASSERT_EQ(companion_publication_tensor_count(p.get()), 3u);
  fill(p.get(), 1.0f);
  companion_model* committed = nullptr;
  ASSERT_EQ(companion_publication_commit(p.get(), &committed), COMPANION_OK) << last_error();
  ModelPtr own(committed);
  EXPECT_EQ(first(own.get(), "w"), 1.0f);  // the writer's mapping stays, read-only

  auto m = attach(reader.get(), "capi/basic", fp, 0);
  ASSERT_TRUE(m);
  ASSERT_EQ(companion_model_tensor_count(m.get()), 3u);
  companion_tensor w{}, tied{}, b{};
  ASSERT_EQ(companion_model_find(m.get(), "w", &w), COMPANION_OK);
  ASSERT_EQ(companion_model_find(m.get(), "w_tied", &tied), COMPANION_OK);
  ASSERT_EQ(companion_model_find(m.get(), "b", &b), COMPANION_OK);
  EXPECT_EQ(w.data, tied.data);  // one copy of tied weights
  companion_model_table table;
  companion_model_table_init(&table);
  ASSERT_EQ(companion_model_get_table(m.get(), &table), COMPANION_OK) << last_error();
  ASSERT_EQ(table.count, 3u);
  for (size_t i = 0; i < table.count; ++i) {
    const auto* r = reinterpret_cast<const companion_tensor_record*>(
        static_cast<const char*>(table.records) + i * table.record_size);
    companion_tensor t{};
    ASSERT_EQ(companion_model_tensor(m.get(), i, &t), COMPANION_OK) << last_error();
    EXPECT_EQ(r->data, t.data);
    EXPECT_LT(r->segment, table.segments);
  }
  companion_model_table mine;
  companion_model_table_init(&mine);
  ASSERT_EQ(companion_model_get_table(own.get(), &mine), COMPANION_OK) << last_error();
  ASSERT_EQ(mine.count, 3u);
  EXPECT_EQ(static_cast<const float*>(w.data)[31], 32.0f);
  EXPECT_EQ(static_cast<const float*>(b.data)[7], 8.0f);

  json e = entry(reader.get(), "capi/basic");
  ASSERT_FALSE(e.is_null());
  EXPECT_EQ(e["state"], "loaded");
  EXPECT_EQ(e["generation"], 1);
  EXPECT_EQ(e["fingerprint"]["engine"], "test");
  ASSERT_EQ(e["generations"].size(), 1u);
  EXPECT_EQ(e["generations"][0]["leases"], 2);  // the writer's and the reader's
  ASSERT_FALSE(e["generations"][0]["digests"].empty());
  EXPECT_EQ(e["generations"][0]["digests"][0].get<std::string>().rfind("wsum64:", 0), 0u);

  // Attached without a fingerprint check, or by its short id through unload: both work.
  auto unchecked = attach(reader.get(), "capi/basic", nullptr, 0);
  EXPECT_TRUE(unchecked);
  m.reset();
  own.reset();
  unchecked.reset();
  // Releases are sent without waiting for the answer, and the writer's goes over another
  // connection than the unload below: wait until the server has seen both clients let go.
  auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(10);
  for (;;) {
    json now = entry(reader.get(), "capi/basic");
    ASSERT_FALSE(now.is_null());
    if (now["generations"][0]["leases"] == 0) break;
    ASSERT_LT(std::chrono::steady_clock::now(), deadline) << now.dump();
    std::this_thread::sleep_for(std::chrono::milliseconds(2));
  }
  char* text = nullptr;
  ASSERT_EQ(companion_client_unload(reader.get(), nullptr, "capi/basic", 0, &text), COMPANION_OK)
      << last_error();
  EXPECT_EQ(take_json(text)["state"], "unloaded");
  attach(reader.get(), "capi/basic", nullptr, 0, COMPANION_NOT_FOUND);
}

TEST_F(CapiPublishTest, AFingerprintMismatchNamesTheFields) {
  auto client = connect();
  auto p = begin(client.get(), "capi/fp", R"({"dtype":"bf16","tp":"0/2"})");
  ASSERT_TRUE(p);
  fill(p.get(), 0.0f);
  ASSERT_EQ(companion_publication_commit(p.get(), nullptr), COMPANION_OK) << last_error();
  auto m = attach(client.get(), "capi/fp", R"({"dtype":"fp16","tp":"0/2","extra":"x"})", 0,
                  COMPANION_FINGERPRINT_MISMATCH);
  EXPECT_FALSE(m);
  std::string message = last_error();
  EXPECT_NE(message.find("dtype: published 'bf16', asked 'fp16'"), std::string::npos) << message;
  EXPECT_NE(message.find("extra"), std::string::npos) << message;
  EXPECT_EQ(message.find("tp:"), std::string::npos) << message;  // equal fields are not listed
  // attach-or-publish with the wrong fingerprint: the same typed error, nothing claimed.
  companion_publication* raw = nullptr;
  EXPECT_EQ(companion_publish_claim(client.get(), "capi/fp", R"({"dtype":"fp16"})",
                                    COMPANION_CLAIM_IF_UNPUBLISHED, 5, &raw),
            COMPANION_FINGERPRINT_MISMATCH);
  EXPECT_EQ(raw, nullptr);
  // With the right one it reports the committed generation instead of claiming.
  EXPECT_EQ(companion_publish_claim(client.get(), "capi/fp", R"({"dtype":"bf16","tp":"0/2"})",
                                    COMPANION_CLAIM_IF_UNPUBLISHED, 5, &raw),
            COMPANION_OK)
      << last_error();
  EXPECT_EQ(raw, nullptr);
  EXPECT_EQ(companion_publish_claim(client.get(), "capi/fp", "[1]", COMPANION_CLAIM_NOW, 5, &raw),
            COMPANION_INVALID_ARGUMENT);
}

TEST_F(CapiPublishTest, OneWriterPerKeyAndAnAbortFreesItsSlab) {
  auto a = connect();
  auto b = connect();
  uint64_t before = slab_bytes(a.get());
  auto p = begin(a.get(), "capi/lock", nullptr);
  ASSERT_TRUE(p);
  EXPECT_GT(slab_bytes(a.get()), before);
  companion_publication* raw = nullptr;
  EXPECT_EQ(companion_publish_claim(b.get(), "capi/lock", nullptr, COMPANION_CLAIM_NOW, 5, &raw),
            COMPANION_MODEL_IN_USE);
  // Waiting attaches see nothing until a commit; a non-waiting one is told it is being written.
  companion_attach_options options;
  companion_attach_options_init(&options);
  options.wait = 0;
  companion_model* m = nullptr;
  EXPECT_EQ(companion_client_attach(b.get(), "capi/lock", &options, &m), COMPANION_NOT_READY);
  // Closing the publication aborts: the memory is back and the key is free.
  p.reset();
  EXPECT_EQ(slab_bytes(a.get()), before);
  EXPECT_TRUE(entry(a.get(), "capi/lock").is_null());
  auto again = begin(b.get(), "capi/lock", nullptr);
  ASSERT_TRUE(again);
}

TEST_F(CapiPublishTest, ANewGenerationLeavesReadersOfTheOldOneUntouched) {
  auto client = connect();
  auto reader = connect();
  auto p1 = begin(client.get(), "capi/gen", nullptr);
  ASSERT_TRUE(p1);
  fill(p1.get(), 100.0f);
  ASSERT_EQ(companion_publication_commit(p1.get(), nullptr), COMPANION_OK) << last_error();
  auto old = attach(reader.get(), "capi/gen", nullptr, 0);
  ASSERT_TRUE(old);

  auto p2 = begin(client.get(), "capi/gen", nullptr);
  ASSERT_TRUE(p2);
  fill(p2.get(), 200.0f);
  EXPECT_EQ(first(old.get(), "w"), 100.0f);  // generation 1 serves while 2 is written
  ASSERT_EQ(companion_publication_commit(p2.get(), nullptr), COMPANION_OK) << last_error();
  auto fresh = attach(reader.get(), "capi/gen", nullptr, 0);
  ASSERT_TRUE(fresh);
  EXPECT_EQ(first(fresh.get(), "w"), 200.0f);
  EXPECT_EQ(first(old.get(), "w"), 100.0f);
  auto pinned = attach(reader.get(), "capi/gen", nullptr, 1);
  ASSERT_TRUE(pinned);
  EXPECT_EQ(first(pinned.get(), "w"), 100.0f);

  json e = entry(client.get(), "capi/gen");
  EXPECT_EQ(e["generation"], 2);
  ASSERT_EQ(e["generations"].size(), 2u);
  EXPECT_EQ(e["generations"][0]["generation"], 1);
  EXPECT_EQ(e["generations"][0]["leases"], 2);
  EXPECT_EQ(e["generations"][1]["current"], true);

  // Two generations live (the default --max-generations): a third publication waits its turn.
  companion_publication* raw = nullptr;
  EXPECT_EQ(
      companion_publish_claim(client.get(), "capi/gen", nullptr, COMPANION_CLAIM_NOW, 5, &raw),
      COMPANION_LIMIT_EXCEEDED);
  EXPECT_NE(last_error().find("--max-generations"), std::string::npos) << last_error();

  old.reset();
  pinned.reset();  // generation 1's last lease: it is freed
  e = entry(client.get(), "capi/gen");
  ASSERT_EQ(e["generations"].size(), 1u);
  EXPECT_EQ(e["generations"][0]["generation"], 2);
  attach(reader.get(), "capi/gen", nullptr, 1, COMPANION_NOT_FOUND);
  auto p3 = begin(client.get(), "capi/gen", nullptr);  // room again
  EXPECT_TRUE(p3);
}

TEST_F(CapiPublishTest, BadTablesAreRefusedWithReasons) {
  auto client = connect();
  companion_publication* raw = nullptr;
  ASSERT_EQ(
      companion_publish_claim(client.get(), "capi/bad", nullptr, COMPANION_CLAIM_NOW, 5, &raw),
      COMPANION_OK)
      << last_error();
  PublicationPtr p(raw);
  const int64_t shape[] = {2, 2};
  const int64_t other[] = {4};
  const int64_t negative[] = {-1};
  companion_tensor_decl duplicate[] = {{"a", COMPANION_DTYPE_F32, 2, shape, nullptr},
                                       {"a", COMPANION_DTYPE_F32, 2, shape, nullptr}};
  EXPECT_EQ(companion_publication_declare(p.get(), duplicate, 2), COMPANION_INVALID_ARGUMENT);
  EXPECT_NE(last_error().find("declared twice"), std::string::npos) << last_error();
  companion_tensor_decl bad_alias[] = {{"a", COMPANION_DTYPE_F32, 2, shape, nullptr},
                                       {"b", COMPANION_DTYPE_F32, 1, other, "a"}};
  EXPECT_EQ(companion_publication_declare(p.get(), bad_alias, 2), COMPANION_INVALID_ARGUMENT);
  companion_tensor_decl forward[] = {{"b", COMPANION_DTYPE_F32, 2, shape, "a"},
                                     {"a", COMPANION_DTYPE_F32, 2, shape, nullptr}};
  EXPECT_EQ(companion_publication_declare(p.get(), forward, 2), COMPANION_INVALID_ARGUMENT);
  // A zero dim makes no bytes, but the other dims still make strides: bounded all the same.
  const int64_t huge[] = {0, int64_t{1} << 62, int64_t{1} << 62};
  companion_tensor_decl overflow[] = {{"o", COMPANION_DTYPE_F32, 3, huge, nullptr}};
  EXPECT_EQ(companion_publication_declare(p.get(), overflow, 1), COMPANION_INVALID_ARGUMENT);
  EXPECT_NE(last_error().find("too large"), std::string::npos) << last_error();
  companion_tensor_decl neg[] = {{"n", COMPANION_DTYPE_F32, 1, negative, nullptr}};
  EXPECT_EQ(companion_publication_declare(p.get(), neg, 1), COMPANION_INVALID_ARGUMENT);
  // Commit before a table: refused, and the publication is still open.
  EXPECT_EQ(companion_publication_commit(p.get(), nullptr), COMPANION_INVALID_ARGUMENT);
  companion_tensor_decl good[] = {{"a", COMPANION_DTYPE_F32, 2, shape, nullptr}};
  EXPECT_EQ(companion_publication_declare(p.get(), good, 1), COMPANION_OK) << last_error();
  EXPECT_EQ(companion_publication_declare(p.get(), good, 1), COMPANION_INVALID_ARGUMENT);
  EXPECT_EQ(companion_publication_commit(p.get(), nullptr), COMPANION_OK) << last_error();
  EXPECT_EQ(companion_publication_commit(p.get(), nullptr), COMPANION_INVALID_ARGUMENT);
}

TEST_F(CapiPublishTest, AWaitingClaimTakesOverWhenTheWriterGoesAndWaitingReadersAttach) {
  auto first_writer = connect();
  auto waiter = connect();
  auto reader = connect();
  auto p = begin(first_writer.get(), "capi/handover", R"({"v":"1"})");
  ASSERT_TRUE(p);
  std::atomic<bool> claimed{false};
  std::atomic<float> seen{-1.0f};
  std::thread builder([&] {
    companion_publication* raw = nullptr;
    // Blocks on the server while the first writer holds the key.
    if (companion_publish_claim(waiter.get(), "capi/handover", R"({"v":"1"})",
                                COMPANION_CLAIM_IF_UNPUBLISHED, 20, &raw) != COMPANION_OK ||
        raw == nullptr)
      return;
    claimed = true;
    PublicationPtr mine(raw);
    const int64_t shape[] = {4, 8};
    companion_tensor_decl table[] = {{"w", COMPANION_DTYPE_F32, 2, shape, nullptr}};
    if (companion_publication_declare(mine.get(), table, 1) != COMPANION_OK) return;
    fill(mine.get(), 7.0f);
    (void)companion_publication_commit(mine.get(), nullptr);
  });
  std::thread waiting_reader([&] {
    auto m = attach(reader.get(), "capi/handover", R"({"v":"1"})", 0);
    if (m) seen = first(m.get(), "w");
  });
  std::this_thread::sleep_for(std::chrono::milliseconds(300));
  EXPECT_FALSE(claimed.load());  // still waiting: the first writer holds the key
  p.reset();                     // the first writer gives up (as if it died)
  builder.join();
  waiting_reader.join();
  EXPECT_TRUE(claimed.load());
  EXPECT_EQ(seen.load(), 7.0f);  // the reader waited through the hand-over and got the commit
  json e = entry(reader.get(), "capi/handover");
  EXPECT_EQ(e["generation"], 1);
}

}  // namespace
