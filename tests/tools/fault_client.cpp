// companion-fault-client: a client that misbehaves on purpose, for server robustness tests.
//
//   companion-fault-client --socket PATH --mode MODE [--model PATH] [--seconds N] [--timeout S]
//
// It connects, does what MODE says, and prints one JSON line on stdout describing what the server
// answered: {"mode":..., "answer":"error","code":"PROTOCOL_ERROR","message":...,"then":"closed"},
// {"answer":"closed"} (EOF without a reply), {"answer":"none"} (nothing within the timeout) or
// {"answer":"<MessageType>"}. Exit status 0 when it did what it was asked (whatever the server
// answered), 1 when it could not (connect, send, an unexpected reply on the way), 2 on bad usage.
// The die-* modes end with SIGKILL on purpose, after printing their line.
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/socket.h>
#include <unistd.h>

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <iostream>
#include <nlohmann/json.hpp>
#include <optional>
#include <random>
#include <span>
#include <string>
#include <thread>
#include <vector>

#include "common/unique_fd.hpp"
#include "companion/types.hpp"
#include "protocol/frame.hpp"
#include "protocol/limits.hpp"
#include "protocol/messages.hpp"
#include "transport/unix_socket.hpp"

namespace companion {
namespace {

using json = nlohmann::json;
using protocol::Message;

constexpr const char* kModes[] = {
    "garbage",           "bad-magic",       "bad-flags",         "oversized",
    "truncated",         "no-hello",        "bad-version",       "malformed-body",
    "with-fds",          "die-mid-request", "die-holding-lease", "slow-reader",
    "unread-parameters", "first-answer",    "pipelined",         "old-minor"};

struct Options {
  std::string socket;
  std::string mode;
  std::string model;
  double seconds = 0;
  double timeout_s = -1;  // < 0: the mode's default
};

[[noreturn]] void usage(const std::string& why) {
  std::cerr << "companion-fault-client: " << why << "\n"
            << "usage: companion-fault-client --socket PATH --mode MODE [--model PATH] "
               "[--seconds N] [--timeout S]\nmodes:";
  for (const char* m : kModes) std::cerr << ' ' << m;
  std::cerr << '\n';
  std::exit(2);
}

double parse_seconds(const std::string& flag, const std::string& text) {
  try {
    size_t used = 0;
    double v = std::stod(text, &used);
    if (used == text.size() && v >= 0 && v < 1e7) return v;
  } catch (const std::exception&) {
  }
  usage(flag + " needs a number of seconds, not '" + text + "'");
}

Options parse(int argc, char** argv) {
  Options o;
  for (int i = 1; i < argc; ++i) {
    std::string arg = argv[i];
    if (arg == "-h" || arg == "--help") usage("help");
    std::string value;
    auto eq = arg.find('=');
    if (arg.rfind("--", 0) == 0 && eq != std::string::npos) {
      value = arg.substr(eq + 1);
      arg = arg.substr(0, eq);
    } else if (i + 1 < argc) {
      value = argv[++i];
    } else {
      usage(arg + " needs a value");
    }
    if (arg == "--socket")
      o.socket = value;
    else if (arg == "--mode")
      o.mode = value;
    else if (arg == "--model")
      o.model = value;
    else if (arg == "--seconds")
      o.seconds = parse_seconds(arg, value);
    else if (arg == "--timeout")
      o.timeout_s = parse_seconds(arg, value);
    else
      usage("unknown option " + arg);
  }
  if (o.socket.empty()) usage("--socket is required");
  bool known = false;
  for (const char* m : kModes) known = known || o.mode == m;
  if (!known) usage(o.mode.empty() ? "--mode is required" : "unknown mode '" + o.mode + "'");
  if ((o.mode == "die-mid-request" || o.mode == "die-holding-lease" ||
       o.mode == "unread-parameters" || o.mode == "old-minor") &&
      o.model.empty())
    usage("--mode " + o.mode + " needs --model");
  return o;
}

// ---- output ------------------------------------------------------------------------------------

void print(const json& j) {
  std::cout << j.dump(-1, ' ', false, json::error_handler_t::replace) << std::endl;  // flushes
}

[[noreturn]] void fail(json j, const std::string& why) {
  j["failed"] = why;
  print(j);
  std::exit(1);
}

[[noreturn]] void die_by_sigkill() {
  std::fflush(nullptr);
  ::kill(::getpid(), SIGKILL);
  for (;;) ::pause();
}

// ---- sending -----------------------------------------------------------------------------------

std::vector<uint8_t> header(uint32_t magic, uint32_t size, uint16_t fds, uint16_t flags) {
  std::vector<uint8_t> h(protocol::kFrameHeaderBytes);
  for (int i = 0; i < 4; ++i) h[i] = static_cast<uint8_t>(magic >> (8 * i));
  for (int i = 0; i < 4; ++i) h[4 + i] = static_cast<uint8_t>(size >> (8 * i));
  h[8] = static_cast<uint8_t>(fds);
  h[9] = static_cast<uint8_t>(fds >> 8);
  h[10] = static_cast<uint8_t>(flags);
  h[11] = static_cast<uint8_t>(flags >> 8);
  return h;
}

// Writes raw bytes (blocking socket). A peer that already hung up is not an error here: what
// the server did is reported from the read side.
bool send_raw(int fd, const std::vector<uint8_t>& bytes, std::string* error) {
  size_t sent = 0;
  while (sent < bytes.size()) {
    ssize_t n = ::send(fd, bytes.data() + sent, bytes.size() - sent, MSG_NOSIGNAL);
    if (n < 0) {
      if (errno == EINTR) continue;
      if (errno == EPIPE || errno == ECONNRESET) {
        *error = "peer closed while sending";
        return sent > 0;
      }
      *error = std::string("send: ") + std::strerror(errno);
      return false;
    }
    sent += static_cast<size_t>(n);
  }
  return true;
}

void send_message(int fd, const Message& m, json& out, std::span<const int> fds = {}) {
  auto r = protocol::send_frame(fd, protocol::encode(m).value(), fds);
  if (!r.ok())
    fail(out, "sending " + std::string(protocol::body_name(m.body)) + ": " + r.error().to_string());
}

std::vector<uint8_t> random_bytes(size_t n) {
  std::random_device rd;
  std::mt19937_64 rng((static_cast<uint64_t>(rd()) << 32) ^ rd());
  std::vector<uint8_t> b(n);
  for (auto& x : b) x = static_cast<uint8_t>(rng());
  return b;
}

// ---- reading -----------------------------------------------------------------------------------

int ms(double seconds) {
  return static_cast<int>(seconds * 1000);
}

// Waits for the server's next frame or EOF and describes it in `out`. Returns the decoded
// message when there was one.
std::optional<Message> read_answer(int fd, protocol::FrameReader& reader, double timeout_s,
                                   json& out, std::vector<UniqueFd>* fds = nullptr) {
  auto frame = protocol::receive_frame(fd, reader, ms(timeout_s));
  if (!frame.ok()) {
    const Error& e = frame.error();
    if (e.code == StatusCode::kConnectionClosed) {
      out["answer"] = "closed";
    } else if (e.code == StatusCode::kTimeout) {
      out["answer"] = "none";
    } else {
      out["answer"] = "unreadable";
      out["detail"] = e.to_string();
    }
    return std::nullopt;
  }
  auto m = protocol::decode(std::move(frame->payload));
  if (!m.ok()) {
    out["answer"] = "undecodable";
    out["detail"] = m.error().to_string();
    return std::nullopt;
  }
  out["request_id"] = m->request_id;
  if (const auto* e = std::get_if<protocol::ErrorReply>(&m->body)) {
    out["answer"] = "error";
    out["code"] = status_code_name(e->error.code);
    out["message"] = e->error.message;
  } else {
    out["answer"] = protocol::body_name(m->body);
  }
  out["fds"] = frame->fds.size();
  if (fds != nullptr) *fds = std::move(frame->fds);
  return std::move(m).value();
}

// After an ErrorReply the server is expected to hang up: says whether it did ("then").
void read_what_follows(int fd, protocol::FrameReader& reader, double timeout_s, json& out) {
  json next;
  read_answer(fd, reader, timeout_s, next);
  out["then"] = next["answer"];
}

// Reads one answer; when it is an error, also what follows it.
void report_answer(int fd, protocol::FrameReader& reader, double timeout_s, json& out) {
  auto m = read_answer(fd, reader, timeout_s, out);
  if (m && std::holds_alternative<protocol::ErrorReply>(m->body))
    read_what_follows(fd, reader, timeout_s, out);
}

// Valid hello, waiting for the HelloReply.
void greet(int fd, protocol::FrameReader& reader, double timeout_s, json& out) {
  protocol::Hello hello;
  hello.client_name = "companion-fault-client";
  hello.pid = ::getpid();
  send_message(fd, Message{1, hello}, out);
  json reply;
  auto m = read_answer(fd, reader, timeout_s, reply);
  out["hello"] = reply["answer"];
  if (!m || !std::holds_alternative<protocol::HelloReply>(m->body))
    fail(out, "the server did not answer hello with HelloReply");
}

// ---- modes -------------------------------------------------------------------------------------

int run(const Options& o) {
  json out;
  out["mode"] = o.mode;
  const bool long_wait = o.mode == "die-holding-lease";
  const double timeout_s = o.timeout_s >= 0 ? o.timeout_s : (long_wait ? 300.0 : 5.0);

  auto connected = transport::connect_unix(o.socket);
  if (!connected.ok()) fail(out, connected.error().to_string());
  UniqueFd sock = std::move(connected).value();
  const int fd = sock.get();
  protocol::FrameReader reader;
  std::string send_error;

  if (o.mode == "garbage") {
    auto bytes = random_bytes(4096);
    if (bytes[0] == 'C') bytes[0] = 'X';  // never the magic by chance
    if (!send_raw(fd, bytes, &send_error)) fail(out, send_error);
    out["sent"] = bytes.size();
    report_answer(fd, reader, timeout_s, out);
  } else if (o.mode == "bad-magic") {
    if (!send_raw(fd, header(0x4b4c4f4e /* "NOLK" */, 0, 0, 0), &send_error)) fail(out, send_error);
    report_answer(fd, reader, timeout_s, out);
  } else if (o.mode == "bad-flags") {
    // A complete, valid Hello whose header has a reserved flag set.
    auto payload = protocol::encode(Message{1, protocol::Hello{}}).value();
    auto bytes = header(protocol::kFrameMagic, static_cast<uint32_t>(payload.size()), 0, 1);
    bytes.insert(bytes.end(), payload.begin(), payload.end());
    if (!send_raw(fd, bytes, &send_error)) fail(out, send_error);
    report_answer(fd, reader, timeout_s, out);
  } else if (o.mode == "oversized") {
    // Only the header: the server must refuse it without waiting for 64 MiB.
    auto start = std::chrono::steady_clock::now();
    if (!send_raw(fd, header(protocol::kFrameMagic, protocol::kMaxPayloadBytes + 1, 0, 0),
                  &send_error))
      fail(out, send_error);
    report_answer(fd, reader, timeout_s, out);
    out["elapsed_ms"] = std::chrono::duration_cast<std::chrono::milliseconds>(
                            std::chrono::steady_clock::now() - start)
                            .count();
  } else if (o.mode == "truncated") {
    auto bytes = header(protocol::kFrameMagic, 1000, 0, 0);
    auto part = random_bytes(10);
    bytes.insert(bytes.end(), part.begin(), part.end());
    if (!send_raw(fd, bytes, &send_error)) fail(out, send_error);
    ::shutdown(fd, SHUT_WR);  // closes our side; we still hear what the server does
    report_answer(fd, reader, timeout_s, out);
  } else if (o.mode == "no-hello") {
    send_message(fd, Message{1, protocol::List{}}, out);
    report_answer(fd, reader, timeout_s, out);
  } else if (o.mode == "bad-version") {
    protocol::Hello hello;
    hello.major = static_cast<uint16_t>(kProtocolMajor + 1);
    hello.minor = 0;
    hello.client_name = "companion-fault-client";
    hello.pid = ::getpid();
    send_message(fd, Message{1, hello}, out);
    report_answer(fd, reader, timeout_s, out);
  } else if (o.mode == "malformed-body") {
    std::vector<uint8_t> payload;
    do {
      payload = random_bytes(256);
    } while (protocol::decode(payload).ok());  // (practically never loops)
    auto r = protocol::send_frame(fd, payload);
    if (!r.ok()) fail(out, r.error().to_string());
    report_answer(fd, reader, timeout_s, out);
  } else if (o.mode == "with-fds") {
    greet(fd, reader, timeout_s, out);
    int p[2];
    if (::pipe2(p, O_CLOEXEC) != 0) fail(out, "pipe failed");
    UniqueFd pr(p[0]), pw(p[1]);
    int fds[] = {pr.get()};
    send_message(fd, Message{2, protocol::List{}}, out, fds);
    report_answer(fd, reader, timeout_s, out);
  } else if (o.mode == "die-mid-request") {
    greet(fd, reader, timeout_s, out);
    ModelSpec spec;
    spec.source = o.model;
    send_message(fd, Message{2, protocol::GetParameters{spec, true}}, out);
    out["sent"] = "GetParameters";
    out["pid"] = ::getpid();
    print(out);
    die_by_sigkill();
  } else if (o.mode == "die-holding-lease") {
    greet(fd, reader, timeout_s, out);
    ModelSpec spec;
    spec.source = o.model;
    send_message(fd, Message{2, protocol::GetParameters{spec, true}}, out);
    std::vector<UniqueFd> fds;
    auto m = read_answer(fd, reader, timeout_s, out, &fds);
    const auto* p = m ? std::get_if<protocol::Parameters>(&m->body) : nullptr;
    if (p == nullptr) fail(out, "no Parameters reply");
    out["lease_id"] = p->lease_id;
    out["tensors"] = p->tensors.size();
    out["segments"] = p->segments.size();
    out["pid"] = ::getpid();
    print(out);
    die_by_sigkill();  // the descriptors and the lease die with the process
  } else if (o.mode == "pipelined") {
    // Sends 2,000 health requests as fast as the server takes them without reading, then reads
    // and sends the rest: every request must still be answered once the client catches up.
    greet(fd, reader, timeout_s, out);
    (void)transport::set_nonblocking(fd);
    constexpr uint64_t kRequests = 2000;
    std::deque<protocol::OutgoingFrame> pending;
    for (uint64_t rid = 2; rid < 2 + kRequests; ++rid)
      pending.emplace_back(protocol::encode(Message{rid, protocol::Health{}}).value(),
                           std::vector<UniqueFd>{});
    auto write_what_fits = [&] {
      while (!pending.empty()) {
        auto done = pending.front().write_some(fd);
        if (!done.ok()) fail(out, "sending: " + done.error().to_string());
        if (!*done) return;
        pending.pop_front();
      }
    };
    write_what_fits();
    out["sent_before_reading"] = kRequests - pending.size();
    uint64_t answered = 0;
    auto deadline = std::chrono::steady_clock::now() + std::chrono::duration<double>(timeout_s);
    while (answered < kRequests && std::chrono::steady_clock::now() < deadline) {
      write_what_fits();
      pollfd p{fd, static_cast<short>(POLLIN | (pending.empty() ? 0 : POLLOUT)), 0};
      if (::poll(&p, 1, 100) <= 0) continue;
      if (p.revents & POLLIN) {
        auto n = reader.read_some(fd);
        if (!n.ok() && n.error().code != StatusCode::kUnavailable)
          fail(out, "reading: " + n.error().to_string());
        if (n.ok() && *n == 0) break;
        for (;;) {
          auto frame = reader.next();
          if (!frame.ok()) fail(out, "reading: " + frame.error().to_string());
          if (!*frame) break;
          auto m = protocol::decode(std::move((*frame)->payload));
          if (m.ok() && std::holds_alternative<protocol::HealthReply>(m->body)) ++answered;
        }
      }
    }
    out["requests"] = kRequests;
    out["answered"] = answered;
  } else if (o.mode == "old-minor") {
    // A client of protocol 1.1 (before table memfds) asks for --model: how are tensors sent?
    protocol::Hello hello;
    hello.minor = 1;
    hello.client_name = "companion-fault-client";
    hello.pid = ::getpid();
    send_message(fd, Message{1, hello}, out);
    json reply;
    auto h = read_answer(fd, reader, timeout_s, reply);
    if (!h || !std::holds_alternative<protocol::HelloReply>(h->body))
      fail(out, "the server did not answer hello with HelloReply");
    ModelSpec spec;
    spec.source = o.model;
    send_message(fd, Message{2, protocol::GetParameters{spec, true}}, out);
    auto m = read_answer(fd, reader, timeout_s, out);
    if (m)
      if (const auto* p = std::get_if<protocol::Parameters>(&m->body)) {
        out["tensors"] = p->tensors.size();
        out["table_fd_index"] = p->table_fd_index;
        if (!p->tensors.empty()) out["last"] = std::string(p->tensors.back().name);
      }
  } else if (o.mode == "first-answer") {
    // Sends nothing: what does the server say to a connection it does not take?
    report_answer(fd, reader, timeout_s, out);
  } else if (o.mode == "unread-parameters") {
    // Asks for the model's parameters again and again and reads none of the replies (each
    // carries descriptors), until the server stops taking requests for 2 s; then holds on for
    // --seconds so that the test can look at the server meanwhile.
    int tiny = 4096;
    ::setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &tiny, sizeof(tiny));
    greet(fd, reader, timeout_s, out);
    (void)transport::set_nonblocking(fd);
    ModelSpec spec;
    spec.source = o.model;
    size_t sent = 0;
    bool stalled = false;
    for (uint64_t rid = 2; rid < 20002 && !stalled; ++rid) {
      protocol::OutgoingFrame frame(
          protocol::encode(Message{rid, protocol::GetParameters{spec, true}}).value(), {});
      for (;;) {
        auto done = frame.write_some(fd);
        if (!done.ok()) fail(out, "sending: " + done.error().to_string());
        if (*done) break;
        pollfd p{fd, POLLOUT, 0};
        if (::poll(&p, 1, 2000) != 1) {
          stalled = true;
          break;
        }
      }
      if (!stalled) ++sent;
    }
    out["sent"] = sent;
    out["stalled"] = stalled;
    print(out);
    std::this_thread::sleep_for(std::chrono::duration<double>(o.seconds));
    return 0;
  } else if (o.mode == "slow-reader") {
    int tiny = 4096;  // make the server's queue grow instead of our buffer
    ::setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &tiny, sizeof(tiny));
    greet(fd, reader, timeout_s, out);
    protocol::StatusSubscribe sub;
    sub.all = true;
    send_message(fd, Message{2, sub}, out);
    out["subscribed"] = true;
    std::this_thread::sleep_for(std::chrono::duration<double>(o.seconds));
    out["slept_s"] = o.seconds;
    // Did the server give up on us meanwhile? (Only looks: reads nothing.)
    pollfd pfd{fd, POLLRDHUP, 0};
    bool hung_up = ::poll(&pfd, 1, 0) == 1 && (pfd.revents & (POLLRDHUP | POLLHUP | POLLERR));
    out["server_hung_up"] = hung_up;
    print(out);
    return 0;
  }
  print(out);
  return 0;
}

}  // namespace
}  // namespace companion

int main(int argc, char** argv) {
  ::signal(SIGPIPE, SIG_IGN);
  return companion::run(companion::parse(argc, argv));
}
