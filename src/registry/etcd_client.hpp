// A small etcd v3 client over etcd's HTTP/JSON gateway (libcurl): leases, put, get, range by
// prefix, delete and watch; what the registry needs and nothing more. Keys and values travel
// base64-encoded; 64-bit numbers arrive as JSON strings.
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "companion/result.hpp"

namespace companion::registry {

// How to reach etcd securely: TLS (https:// endpoints, from etcds://) with an optional CA file
// and client certificate, and user/password authentication through the gateway. Paths only: the
// password is read from a file, never passed on a command line.
struct EtcdSecurity {
  std::string ca_file;        // PEM bundle that signs etcd's certificate ("" = system CAs)
  std::string cert_file;      // client certificate (PEM), for --client-cert-auth
  std::string key_file;       // its private key (PEM)
  std::string user;           // etcd user ("" = no authentication)
  std::string password_file;  // the user's password, first line of this file
  bool any() const noexcept {
    return !ca_file.empty() || !cert_file.empty() || !key_file.empty() || !user.empty();
  }
};
struct EtcdKeyValue {
  std::string key;
  std::string value;
  int64_t mod_revision = 0;
  int64_t lease = 0;
};

struct EtcdRange {
  int64_t revision = 0;  // the store's revision when read: a watch continues from revision + 1
  std::vector<EtcdKeyValue> kvs;
};

struct EtcdEvent {
  bool deleted = false;
  EtcdKeyValue kv;  // key only, for deletions
};

// "etcd://host:port[,host:port...]" → {"http://host:port", ...}; "etcds://..." and "https://..."
// → {"https://host:port", ...}. kInvalidArgument otherwise.
Result<std::vector<std::string>> parse_etcd_endpoints(std::string_view url);
// The end of the key range holding every key that starts with prefix (etcd's range_end).
std::string prefix_range_end(std::string_view prefix);

// Blocking requests. Each attempt is bounded by timeout_ms; a request that cannot reach an
// endpoint moves on to the next one, so a request takes at most endpoints × timeout_ms. Failures
// to reach etcd are kUnavailable; a TLS handshake or certificate that fails, or authentication
// that etcd refuses, is kNotPermitted. With a user, the client authenticates on its first
// request and again whenever etcd refuses its token. One thread at a time.
class EtcdClient {
 public:
  explicit EtcdClient(std::vector<std::string> endpoints, int timeout_ms = 1500,
                      EtcdSecurity security = {});
  ~EtcdClient();
  EtcdClient(const EtcdClient&) = delete;
  EtcdClient& operator=(const EtcdClient&) = delete;

  // A new lease of ttl_s seconds; its id.
  Result<int64_t> grant(int64_t ttl_s);
  // Renews the lease; the TTL it now has, 0 when the lease no longer exists (expired, revoked,
  // or etcd lost its data).
  Result<int64_t> keepalive(int64_t lease);
  // Ends the lease and deletes every key bound to it.
  Result<void> revoke(int64_t lease);
  // Writes key = value, bound to lease (0 = none). The new revision.
  Result<int64_t> put(const std::string& key, const std::string& value, int64_t lease = 0);
  Result<std::optional<EtcdKeyValue>> get(const std::string& key);
  Result<EtcdRange> range_prefix(const std::string& prefix);
  // Number of keys deleted.
  Result<int64_t> delete_key(const std::string& key);

  // The endpoint that answered last (or the first).
  const std::string& endpoint() const noexcept { return endpoints_[current_]; }
  // The authentication token in use ("" without a user, or before the first request).
  const std::string& token() const noexcept { return token_; }
  const EtcdSecurity& security() const noexcept { return security_; }

 private:
  Result<std::string> post(std::string_view path, const std::string& body);
  Result<std::string> post_once(std::string_view path, const std::string& body, bool with_token);
  Result<void> authenticate();

  std::vector<std::string> endpoints_;
  size_t current_ = 0;
  int timeout_ms_;
  EtcdSecurity security_;
  std::string token_;
  bool token_refused_ = false;  // the last request failed because etcd refused our token
  void* curl_ = nullptr;        // one easy handle, so the connection is reused between requests
};

// A watch on every key under a prefix, on one endpoint. run() blocks on the calling thread;
// stop() from any thread makes it return at once.
class EtcdWatch {
 public:
  using Callback = std::function<void(const std::vector<EtcdEvent>& events, int64_t revision)>;

  // start_revision 0 = from now on. token: the Authorization header (from EtcdClient::token()).
  EtcdWatch(std::string endpoint, std::string prefix, int64_t start_revision,
            EtcdSecurity security = {}, std::string token = {});
  ~EtcdWatch();
  EtcdWatch(const EtcdWatch&) = delete;
  EtcdWatch& operator=(const EtcdWatch&) = delete;

  // Streams events to on_events until stop() (ok), the stream breaks (kUnavailable: etcd went
  // away) or etcd cancels the watch (kCancelled: the start revision was compacted; list again).
  // on_created runs once etcd has accepted the watch.
  Result<void> run(const Callback& on_events, const std::function<void()>& on_created = {});
  void stop();

 private:
  std::string endpoint_;
  std::string prefix_;
  int64_t start_revision_;
  EtcdSecurity security_;
  std::string token_;
  std::atomic<bool> stop_{false};
  void* multi_ = nullptr;
};

}  // namespace companion::registry
