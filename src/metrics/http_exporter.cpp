#include "metrics/http_exporter.hpp"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>

#include <charconv>
#include <chrono>
#include <condition_variable>
#include <cstring>
#include <exception>
#include <mutex>
#include <thread>
#include <unordered_map>

#include "common/log.hpp"

#ifdef COMPANION_HAVE_MICROHTTPD
#include <dlfcn.h>
#include <microhttpd.h>

#include <cstdlib>
#include <mutex>
#endif

namespace companion::metrics {

Result<ListenAddress> parse_listen_address(const std::string& text) {
  auto bad = [&](const std::string& why) {
    return make_error(StatusCode::kInvalidArgument,
                      "--metrics '" + text + "': " + why +
                          " (PORT, HOST:PORT with an IPv4 address, or [IPv6]:PORT)");
  };
  ListenAddress out;
  std::string port_text = text;
  out.host = "127.0.0.1";
  if (!text.empty() && text.front() == '[') {
    size_t close = text.find(']');
    if (close == std::string::npos || close + 1 >= text.size() || text[close + 1] != ':')
      return bad("an IPv6 address is written [ADDRESS]:PORT");
    out.host = text.substr(1, close - 1);
    out.ipv6 = true;
    port_text = text.substr(close + 2);
  } else if (size_t colon = text.rfind(':'); colon != std::string::npos) {
    out.host = text.substr(0, colon);
    port_text = text.substr(colon + 1);
    if (out.host == "localhost") out.host = "127.0.0.1";
  }
  unsigned port = 0;
  auto [end, ec] = std::from_chars(port_text.data(), port_text.data() + port_text.size(), port);
  if (port_text.empty() || ec != std::errc() || end != port_text.data() + port_text.size() ||
      port > 65535)
    return bad("the port must be a number from 0 to 65535");
  out.port = static_cast<uint16_t>(port);
  unsigned char buf[sizeof(in6_addr)];
  if (inet_pton(out.ipv6 ? AF_INET6 : AF_INET, out.host.c_str(), buf) != 1)
    return bad("'" + out.host + "' is not a numeric " + (out.ipv6 ? "IPv6" : "IPv4") + " address");
  return out;
}

#ifndef COMPANION_HAVE_MICROHTTPD

bool http_exporter_available() noexcept {
  return false;
}

Result<std::unique_ptr<HttpExporter>> HttpExporter::start(const ListenAddress&, Render) {
  return make_error(StatusCode::kUnavailable,
                    "this build of companion has no metrics endpoint: it was built without "
                    "libmicrohttpd (apt-get install libmicrohttpd-dev, then rebuild)");
}

#else

bool http_exporter_available() noexcept {
  return true;
}

namespace {

// libmicrohttpd is loaded when an endpoint starts, not linked: a server binary runs on hosts
// without it (a GPU host often lacks it), and only --metrics needs it there.
constexpr const char* kLibraryName = "libmicrohttpd.so.12";

struct Microhttpd {
  decltype(&::MHD_start_daemon) start_daemon = nullptr;
  decltype(&::MHD_stop_daemon) stop_daemon = nullptr;
  decltype(&::MHD_get_daemon_info) get_daemon_info = nullptr;
  decltype(&::MHD_get_connection_info) get_connection_info = nullptr;
  decltype(&::MHD_create_response_from_buffer) create_response_from_buffer = nullptr;
  decltype(&::MHD_add_response_header) add_response_header = nullptr;
  decltype(&::MHD_queue_response) queue_response = nullptr;
  decltype(&::MHD_destroy_response) destroy_response = nullptr;
};

// Loaded once per process (never unloaded); $COMPANION_MICROHTTPD_LIBRARY names another file.
Result<const Microhttpd*> microhttpd() {
  static std::once_flag once;
  static Microhttpd table;
  static std::string failure;
  std::call_once(once, [] {
    const char* override_name = std::getenv("COMPANION_MICROHTTPD_LIBRARY");
    const std::string name =
        override_name != nullptr && *override_name != '\0' ? override_name : kLibraryName;
    void* lib = ::dlopen(name.c_str(), RTLD_NOW | RTLD_LOCAL);
    if (lib == nullptr) {
      const char* why = ::dlerror();
      failure = "the metrics endpoint needs libmicrohttpd, which cannot be loaded (" +
                std::string(why != nullptr ? why : name) +
                "): install it (Debian and Ubuntu: apt-get install libmicrohttpd12)";
      return;
    }
    bool complete = true;
    auto bind = [&](auto& fn, const char* symbol) {
      fn = reinterpret_cast<std::remove_reference_t<decltype(fn)>>(::dlsym(lib, symbol));
      complete = complete && fn != nullptr;
    };
    bind(table.start_daemon, "MHD_start_daemon");
    bind(table.stop_daemon, "MHD_stop_daemon");
    bind(table.get_daemon_info, "MHD_get_daemon_info");
    bind(table.get_connection_info, "MHD_get_connection_info");
    bind(table.create_response_from_buffer, "MHD_create_response_from_buffer");
    bind(table.add_response_header, "MHD_add_response_header");
    bind(table.queue_response, "MHD_queue_response");
    bind(table.destroy_response, "MHD_destroy_response");
    if (!complete) failure = name + " lacks functions the metrics endpoint calls: too old?";
  });
  if (!failure.empty()) return make_error(StatusCode::kUnavailable, failure);
  return &table;
}

// Bounds on scrapers: a Prometheus server makes one request per interval.
constexpr unsigned kMaxConnections = 16;
constexpr unsigned kMaxConnectionsPerAddress = 4;
constexpr unsigned kConnectionTimeoutS = 10;
// A request must arrive whole within this of its connection's start or of the previous answer:
// the idle timeout alone lets a client that sends a byte every few seconds hold a connection.
constexpr auto kRequestDeadline = std::chrono::seconds(10);
constexpr size_t kConnectionMemory = 32 * 1024;  // request headers and buffers, per connection
constexpr const char* kContentType = "text/plain; version=0.0.4; charset=utf-8";

void log_from_microhttpd(void*, const char* format, va_list args) {
  char buf[512];
  std::vsnprintf(buf, sizeof buf, format, args);
  std::string line(buf);
  while (!line.empty() && (line.back() == '\n' || line.back() == '\r')) line.pop_back();
  log::debug("metrics endpoint: " + line);
}

class MicrohttpdExporter final : public HttpExporter {
 public:
  MicrohttpdExporter(const Microhttpd& mhd, Render render, std::string url_prefix)
      : mhd_(mhd), render_(std::move(render)), url_prefix_(std::move(url_prefix)) {}
  ~MicrohttpdExporter() override {
    if (watchdog_.joinable()) {
      {
        std::lock_guard<std::mutex> lock(mutex_);
        stopping_ = true;
      }
      wake_.notify_all();
      watchdog_.join();
    }
    if (daemon_ != nullptr) mhd_.stop_daemon(daemon_);  // joins its thread
  }
  std::string url() const override { return url_; }

  Result<void> listen(const ListenAddress& address) {
    sockaddr_storage storage{};
    if (address.ipv6) {
      auto* a = reinterpret_cast<sockaddr_in6*>(&storage);
      a->sin6_family = AF_INET6;
      a->sin6_port = htons(address.port);
      inet_pton(AF_INET6, address.host.c_str(), &a->sin6_addr);
    } else {
      auto* a = reinterpret_cast<sockaddr_in*>(&storage);
      a->sin_family = AF_INET;
      a->sin_port = htons(address.port);
      inet_pton(AF_INET, address.host.c_str(), &a->sin_addr);
    }
    unsigned flags = MHD_USE_INTERNAL_POLLING_THREAD | MHD_USE_EPOLL | MHD_USE_ERROR_LOG;
    if (address.ipv6) flags |= MHD_USE_IPv6;
    daemon_ = mhd_.start_daemon(
        flags, address.port, nullptr, nullptr, &MicrohttpdExporter::answer, this,
        MHD_OPTION_SOCK_ADDR, reinterpret_cast<sockaddr*>(&storage), MHD_OPTION_CONNECTION_LIMIT,
        kMaxConnections, MHD_OPTION_PER_IP_CONNECTION_LIMIT, kMaxConnectionsPerAddress,
        MHD_OPTION_CONNECTION_TIMEOUT, kConnectionTimeoutS, MHD_OPTION_CONNECTION_MEMORY_LIMIT,
        kConnectionMemory, MHD_OPTION_NOTIFY_CONNECTION, &MicrohttpdExporter::notify, this,
        MHD_OPTION_EXTERNAL_LOGGER, &log_from_microhttpd, nullptr, MHD_OPTION_END);
    if (daemon_ == nullptr)
      return make_error(StatusCode::kUnavailable,
                        "cannot serve metrics on " + url_prefix_ + ":" +
                            std::to_string(address.port) +
                            ": the address is in use or not one of this host's");
    uint16_t port = address.port;
    if (const MHD_DaemonInfo* info = mhd_.get_daemon_info(daemon_, MHD_DAEMON_INFO_BIND_PORT);
        info != nullptr && info->port != 0)
      port = info->port;
    url_ = url_prefix_ + ":" + std::to_string(port) + "/metrics";
    watchdog_ = std::thread([this] { watch(); });
    return ok_result();
  }

 private:
  using Clock = std::chrono::steady_clock;

  // Connections and when their next request must have arrived; microhttpd reports a connection
  // closed before it closes the socket, so a descriptor here is still the connection's.
  static void notify(void* self, MHD_Connection* connection, void**,
                     MHD_ConnectionNotificationCode code) {
    auto& exporter = *static_cast<MicrohttpdExporter*>(self);
    std::lock_guard<std::mutex> lock(exporter.mutex_);
    if (code == MHD_CONNECTION_NOTIFY_CLOSED) {
      exporter.deadlines_.erase(connection);
      return;
    }
    const MHD_ConnectionInfo* info =
        exporter.mhd_.get_connection_info(connection, MHD_CONNECTION_INFO_CONNECTION_FD);
    if (info != nullptr)
      exporter.deadlines_[connection] = {info->connect_fd, Clock::now() + kRequestDeadline};
  }

  // A request arrived: the connection has the deadline's time again for its answer and the
  // next request.
  void request_arrived(MHD_Connection* connection) {
    std::lock_guard<std::mutex> lock(mutex_);
    if (auto it = deadlines_.find(connection); it != deadlines_.end())
      it->second.deadline = Clock::now() + kRequestDeadline;
  }

  // Shuts the sockets of connections past their deadline; microhttpd then finds them closed
  // and lets them go.
  void watch() {
    std::unique_lock<std::mutex> lock(mutex_);
    while (!wake_.wait_for(lock, std::chrono::seconds(1), [this] { return stopping_; })) {
      const auto now = Clock::now();
      for (auto& [connection, tracked] : deadlines_) {
        if (tracked.deadline > now) continue;
        log::debug("metrics endpoint: closing a connection that sent no whole request in time");
        ::shutdown(tracked.fd, SHUT_RDWR);
        tracked.deadline = Clock::time_point::max();
      }
    }
  }

  MHD_Result queue(MHD_Connection* connection, unsigned status, const std::string& body,
                   const char* content_type, const char* allow = nullptr) const {
    MHD_Response* response = mhd_.create_response_from_buffer(
        body.size(), const_cast<char*>(body.data()), MHD_RESPMEM_MUST_COPY);
    if (response == nullptr) return MHD_NO;
    mhd_.add_response_header(response, MHD_HTTP_HEADER_CONTENT_TYPE, content_type);
    if (allow != nullptr) mhd_.add_response_header(response, MHD_HTTP_HEADER_ALLOW, allow);
    MHD_Result queued = mhd_.queue_response(connection, status, response);
    mhd_.destroy_response(response);
    return queued;
  }

  static MHD_Result answer(void* self, MHD_Connection* connection, const char* url,
                           const char* method, const char*, const char*, size_t*, void**) {
    auto& exporter = *static_cast<MicrohttpdExporter*>(self);
    exporter.request_arrived(connection);
    const bool get = std::strcmp(method, MHD_HTTP_METHOD_GET) == 0;
    const bool head = std::strcmp(method, MHD_HTTP_METHOD_HEAD) == 0;
    if (!get && !head)
      return exporter.queue(connection, MHD_HTTP_METHOD_NOT_ALLOWED, "only GET and HEAD\n",
                            "text/plain; charset=utf-8", "GET, HEAD");
    if (std::strcmp(url, "/metrics") != 0)
      return exporter.queue(connection, MHD_HTTP_NOT_FOUND, "not found: metrics are at /metrics\n",
                            "text/plain; charset=utf-8");
    std::string body;
    try {
      body = exporter.render_();
    } catch (const std::exception& e) {
      return exporter.queue(connection, MHD_HTTP_INTERNAL_SERVER_ERROR,
                            std::string("cannot render metrics: ") + e.what() + "\n",
                            "text/plain; charset=utf-8");
    }
    return exporter.queue(connection, MHD_HTTP_OK, body, kContentType);
  }

  const Microhttpd& mhd_;
  Render render_;
  std::string url_prefix_;  // "http://127.0.0.1"
  std::string url_;
  MHD_Daemon* daemon_ = nullptr;
  struct Tracked {
    MHD_socket fd;
    Clock::time_point deadline;
  };
  std::mutex mutex_;
  std::unordered_map<MHD_Connection*, Tracked> deadlines_;
  bool stopping_ = false;
  std::condition_variable wake_;
  std::thread watchdog_;
};

}  // namespace

Result<std::unique_ptr<HttpExporter>> HttpExporter::start(const ListenAddress& address,
                                                          Render render) {
  std::string prefix = "http://" + (address.ipv6 ? "[" + address.host + "]" : address.host);
  COMPANION_ASSIGN_OR_RETURN(const Microhttpd* mhd, microhttpd());
  auto exporter = std::make_unique<MicrohttpdExporter>(*mhd, std::move(render), prefix);
  COMPANION_TRY(exporter->listen(address));
  return std::unique_ptr<HttpExporter>(std::move(exporter));
}

#endif

}  // namespace companion::metrics
