// Serves a metrics text over HTTP (libmicrohttpd): GET or HEAD /metrics answers what `render`
// returns, in the Prometheus text format; other paths are 404, other methods 405. One internal
// thread polls every connection; connections, their memory, their idle time and the time a
// request may take to arrive are bounded, so a slow or hostile scraper costs the server little.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>

#include "companion/result.hpp"

namespace companion::metrics {

// Where to listen: "PORT" (on 127.0.0.1), "HOST:PORT" with an IPv4 address or "localhost", or
// "[IPv6]:PORT". Port 0 asks the kernel for a free port. Host names are not resolved.
struct ListenAddress {
  std::string host;  // numeric
  uint16_t port = 0;
  bool ipv6 = false;
};
Result<ListenAddress> parse_listen_address(const std::string& text);

// Whether this build has the HTTP server (libmicrohttpd).
bool http_exporter_available() noexcept;

class HttpExporter {
 public:
  // Called on the exporter's thread for every scrape; must be thread-safe and may throw (the
  // scrape then gets a 500).
  using Render = std::function<std::string()>;
  // Listens at once: kUnavailable when the address is taken or not this host's, or when the
  // build has no HTTP server.
  static Result<std::unique_ptr<HttpExporter>> start(const ListenAddress& address, Render render);
  virtual ~HttpExporter() = default;  // stops: no scrape runs once it returns
  // "http://127.0.0.1:9464/metrics", with the port the kernel gave for port 0.
  virtual std::string url() const = 0;
};

}  // namespace companion::metrics
