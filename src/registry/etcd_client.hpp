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

// "etcd://host:port[,host:port...]" → {"http://host:port", ...}. kInvalidArgument otherwise.
Result<std::vector<std::string>> parse_etcd_endpoints(std::string_view url);
// The end of the key range holding every key that starts with prefix (etcd's range_end).
std::string prefix_range_end(std::string_view prefix);

// Blocking requests. Each attempt is bounded by timeout_ms; a request that cannot reach an
// endpoint moves on to the next one, so a request takes at most endpoints × timeout_ms. Failures
// to reach etcd are kUnavailable. One thread at a time.
class EtcdClient {
 public:
  explicit EtcdClient(std::vector<std::string> endpoints, int timeout_ms = 1500);
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

 private:
  Result<std::string> post(std::string_view path, const std::string& body);

  std::vector<std::string> endpoints_;
  size_t current_ = 0;
  int timeout_ms_;
  void* curl_ = nullptr;  // one easy handle, so the connection is reused between requests
};

// A watch on every key under a prefix, on one endpoint. run() blocks on the calling thread;
// stop() from any thread makes it return at once.
class EtcdWatch {
 public:
  using Callback = std::function<void(const std::vector<EtcdEvent>& events, int64_t revision)>;

  // start_revision 0 = from now on.
  EtcdWatch(std::string endpoint, std::string prefix, int64_t start_revision);
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
  std::atomic<bool> stop_{false};
  void* multi_ = nullptr;
};

}  // namespace companion::registry
