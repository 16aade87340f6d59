#include "registry/etcd_client.hpp"

#include <curl/curl.h>

#include <mutex>
#include <nlohmann/json.hpp>

#include "common/base64.hpp"
#include "common/util.hpp"

namespace companion::registry {
namespace {

using nlohmann::json;

void ensure_curl_initialised() {
  static std::once_flag once;
  std::call_once(once, [] { curl_global_init(CURL_GLOBAL_DEFAULT); });
}

// The gateway writes 64-bit numbers as strings; older ones as numbers.
int64_t as_int64(const json& object, const char* field) {
  auto it = object.find(field);
  if (it == object.end()) return 0;
  if (it->is_number_integer()) return it->get<int64_t>();
  if (it->is_string()) {
    try {
      return std::stoll(it->get<std::string>());
    } catch (...) {
      return 0;
    }
  }
  return 0;
}

std::string decoded(const json& object, const char* field) {
  auto it = object.find(field);
  if (it == object.end() || !it->is_string()) return {};
  return base64_decode(it->get<std::string>()).value_or(std::string{});
}

EtcdKeyValue key_value_from(const json& kv) {
  EtcdKeyValue out;
  out.key = decoded(kv, "key");
  out.value = decoded(kv, "value");
  out.mod_revision = as_int64(kv, "mod_revision");
  out.lease = as_int64(kv, "lease");
  return out;
}

size_t append_to_string(char* data, size_t size, size_t count, void* user) {
  static_cast<std::string*>(user)->append(data, size * count);
  return size * count;
}

// The message of an error body ({"error": "...", "message": "...", "code": N}), or the body.
std::string error_text(const std::string& body) {
  json j = json::parse(body, nullptr, false);
  if (j.is_object()) {
    for (const char* field : {"message", "error"})
      if (auto it = j.find(field); it != j.end() && it->is_string()) return it->get<std::string>();
  }
  return body.substr(0, 200);
}

// TLS settings for one transfer: the CA that signs etcd's certificate and our client certificate.
// Peer and host verification stay on (libcurl's defaults).
void apply_tls(CURL* curl, const EtcdSecurity& security) {
  if (!security.ca_file.empty()) curl_easy_setopt(curl, CURLOPT_CAINFO, security.ca_file.c_str());
  if (!security.cert_file.empty())
    curl_easy_setopt(curl, CURLOPT_SSLCERT, security.cert_file.c_str());
  if (!security.key_file.empty()) curl_easy_setopt(curl, CURLOPT_SSLKEY, security.key_file.c_str());
}

// A transfer that failed on TLS: the handshake, a certificate (ours, theirs, a CA file), or
// etcd refusing us for want of one. Not worth trying again as it is.
bool tls_refused(CURLcode rc, const char* detail) {
  switch (rc) {
    case CURLE_SSL_CONNECT_ERROR:
    case CURLE_PEER_FAILED_VERIFICATION:
    case CURLE_SSL_CERTPROBLEM:
    case CURLE_SSL_CIPHER:
    case CURLE_SSL_CACERT_BADFILE:
    case CURLE_SSL_ISSUER_ERROR:
    case CURLE_SSL_ENGINE_NOTFOUND:
    case CURLE_SSL_ENGINE_SETFAILED:
      return true;
    default:
      // TLS 1.3 reports a missing client certificate at the first read, as an alert.
      return rc == CURLE_RECV_ERROR &&
             std::string_view(detail).find("certificate") != std::string_view::npos;
  }
}

std::string curl_failure(CURLcode rc, const char* detail) {
  return *detail != '\0' ? std::string(detail) : std::string(curl_easy_strerror(rc));
}

Result<json> parse_object(const std::string& body, const std::string& endpoint) {
  json j = json::parse(body, nullptr, false);
  if (!j.is_object())
    return make_error(
        StatusCode::kUnavailable,
        "etcd at " + endpoint + " sent a reply that is not JSON: " + body.substr(0, 120));
  return j;
}

}  // namespace

Result<std::vector<std::string>> parse_etcd_endpoints(std::string_view url) {
  // etcd:// is plain HTTP; etcds:// (or https://) is TLS.
  std::string_view rest;
  std::string scheme;
  for (auto [prefix, http_scheme] : {std::pair<std::string_view, const char*>{"etcd://", "http://"},
                                     {"etcds://", "https://"},
                                     {"https://", "https://"}}) {
    if (url.substr(0, prefix.size()) == prefix) {
      rest = url.substr(prefix.size());
      scheme = http_scheme;
      break;
    }
  }
  if (scheme.empty())
    return make_error(StatusCode::kInvalidArgument,
                      "registry '" + std::string(url) +
                          "' is not etcd://host:port[,host:port] (or etcds://, https:// for TLS)");
  std::vector<std::string> endpoints;
  for (bool more = !rest.empty(); more;) {
    size_t comma = rest.find(',');
    std::string_view hostport = rest.substr(0, comma);
    more = comma != std::string_view::npos;
    rest = more ? rest.substr(comma + 1) : std::string_view{};
    size_t colon = hostport.rfind(':');
    bool valid = colon != std::string_view::npos && colon > 0 && colon + 1 < hostport.size() &&
                 hostport.find_first_of("/?#@ ") == std::string_view::npos;
    int port = 0;
    if (valid) {
      for (char c : hostport.substr(colon + 1)) {
        if (c < '0' || c > '9' || port > 65535) {
          valid = false;
          break;
        }
        port = port * 10 + (c - '0');
      }
    }
    if (!valid || port <= 0 || port > 65535)
      return make_error(StatusCode::kInvalidArgument,
                        "etcd endpoint '" + std::string(hostport) + "' is not host:port");
    endpoints.push_back(scheme + std::string(hostport));
  }
  if (endpoints.empty())
    return make_error(StatusCode::kInvalidArgument, std::string(url) + " names no endpoint");
  return endpoints;
}

std::string prefix_range_end(std::string_view prefix) {
  std::string end(prefix);
  while (!end.empty()) {
    auto& last = reinterpret_cast<unsigned char&>(end.back());
    if (last < 0xFF) {
      ++last;
      return end;
    }
    end.pop_back();
  }
  return std::string(1, '\0');  // every key
}

EtcdClient::EtcdClient(std::vector<std::string> endpoints, int timeout_ms, EtcdSecurity security)
    : endpoints_(std::move(endpoints)), timeout_ms_(timeout_ms), security_(std::move(security)) {
  if (endpoints_.empty()) endpoints_.push_back("http://127.0.0.1:2379");
  ensure_curl_initialised();
  curl_ = curl_easy_init();
}

EtcdClient::~EtcdClient() {
  if (curl_ != nullptr) curl_easy_cleanup(static_cast<CURL*>(curl_));
}

Result<std::string> EtcdClient::post(std::string_view path, const std::string& body) {
  if (security_.user.empty()) return post_once(path, body, false);
  if (token_.empty()) COMPANION_TRY(authenticate());
  auto reply = post_once(path, body, true);
  if (reply.ok() || !token_refused_) return reply;
  // Tokens expire (etcd's --auth-token-ttl) or die with a restart: authenticate again, once.
  token_.clear();
  COMPANION_TRY(authenticate());
  return post_once(path, body, true);
}

Result<void> EtcdClient::authenticate() {
  auto password = read_small_file(security_.password_file, 4096);
  if (!password.ok())
    return make_error(StatusCode::kInvalidArgument,
                      "etcd password file: " + password.error().message);
  std::string secret = password->substr(0, password->find_first_of("\r\n"));
  auto reply = post_once("/v3/auth/authenticate",
                         json{{"name", security_.user}, {"password", secret}}.dump(), false);
  if (!reply.ok()) {
    if (reply.error().code == StatusCode::kUnavailable) return std::move(reply).error();
    return make_error(StatusCode::kNotPermitted,
                      "etcd refused user '" + security_.user + "': " + reply.error().message);
  }
  json j = json::parse(*reply, nullptr, false);
  auto token = j.is_object() ? j.find("token") : j.end();
  if (!j.is_object() || token == j.end() || !token->is_string() ||
      token->get<std::string>().empty())
    return make_error(StatusCode::kNotPermitted,
                      "etcd at " + endpoint() + " gave user '" + security_.user + "' no token");
  token_ = token->get<std::string>();
  return ok_result();
}

Result<std::string> EtcdClient::post_once(std::string_view path, const std::string& body,
                                          bool with_token) {
  auto* curl = static_cast<CURL*>(curl_);
  if (curl == nullptr) return make_error(StatusCode::kInternal, "curl_easy_init failed");
  token_refused_ = false;
  std::string last_error;
  StatusCode last_code = StatusCode::kUnavailable;
  for (size_t attempt = 0; attempt < endpoints_.size(); ++attempt) {
    const std::string& endpoint = endpoints_[current_];
    std::string url = endpoint + std::string(path);
    std::string reply;
    char detail[CURL_ERROR_SIZE] = {0};
    curl_slist* headers = curl_slist_append(nullptr, "Content-Type: application/json");
    if (with_token && !token_.empty())
      headers = curl_slist_append(headers, ("Authorization: " + token_).c_str());
    curl_easy_reset(curl);
    curl_easy_setopt(curl, CURLOPT_URL, url.c_str());
    curl_easy_setopt(curl, CURLOPT_HTTPHEADER, headers);
    curl_easy_setopt(curl, CURLOPT_COPYPOSTFIELDS, body.c_str());
    curl_easy_setopt(curl, CURLOPT_WRITEFUNCTION, append_to_string);
    curl_easy_setopt(curl, CURLOPT_WRITEDATA, &reply);
    curl_easy_setopt(curl, CURLOPT_ERRORBUFFER, detail);
    curl_easy_setopt(curl, CURLOPT_TIMEOUT_MS, static_cast<long>(timeout_ms_));
    curl_easy_setopt(curl, CURLOPT_CONNECTTIMEOUT_MS, static_cast<long>(timeout_ms_));
    curl_easy_setopt(curl, CURLOPT_NOSIGNAL, 1L);
    curl_easy_setopt(curl, CURLOPT_NOPROXY, "*");  // etcd is reached directly, never via a proxy
    apply_tls(curl, security_);
    CURLcode rc = curl_easy_perform(curl);
    long http = 0;
    if (rc == CURLE_OK) curl_easy_getinfo(curl, CURLINFO_RESPONSE_CODE, &http);
    curl_easy_setopt(curl, CURLOPT_HTTPHEADER, nullptr);
    curl_easy_setopt(curl, CURLOPT_ERRORBUFFER, nullptr);
    curl_slist_free_all(headers);
    if (rc != CURLE_OK) {
      last_error = "etcd at " + endpoint + ": " + curl_failure(rc, detail);
      if (tls_refused(rc, detail)) {
        last_code = StatusCode::kNotPermitted;
        last_error += " (TLS: check the CA, client certificate and key)";
      } else if (endpoint.rfind("https://", 0) == 0 &&
                 (rc == CURLE_SEND_ERROR || rc == CURLE_RECV_ERROR)) {
        // Under TLS 1.3 etcd refuses a missing or unknown client certificate after the
        // handshake: the first read or write fails, with whatever error the race gives.
        last_error += " (TLS: if it persists, check the client certificate and key)";
      }
      current_ = (current_ + 1) % endpoints_.size();
      continue;
    }
    if (http == 200) return reply;
    std::string message = "etcd at " + endpoint + std::string(path) + ": HTTP " +
                          std::to_string(http) + ": " + error_text(reply);
    if (http == 404) return make_error(StatusCode::kNotFound, message);
    if (http == 401 || http == 403 || message.find("auth token") != std::string::npos ||
        message.find("user name is empty") != std::string::npos) {
      token_refused_ = http == 401 || message.find("auth token") != std::string::npos;
      return make_error(StatusCode::kNotPermitted, message);
    }
    if (http >= 400 && http < 500) return make_error(StatusCode::kInvalidArgument, message);
    // 5xx: this member cannot serve (no leader, shutting down); another one may.
    last_error = message;
    last_code = StatusCode::kUnavailable;
    current_ = (current_ + 1) % endpoints_.size();
  }
  return make_error(last_code, last_error);
}

Result<int64_t> EtcdClient::grant(int64_t ttl_s) {
  COMPANION_ASSIGN_OR_RETURN(std::string body,
                             post("/v3/lease/grant", json{{"TTL", ttl_s}}.dump()));
  COMPANION_ASSIGN_OR_RETURN(json j, parse_object(body, endpoint()));
  int64_t id = as_int64(j, "ID");
  if (id == 0)
    return make_error(StatusCode::kUnavailable,
                      "etcd at " + endpoint() + " granted no lease: " + error_text(body));
  return id;
}

Result<int64_t> EtcdClient::keepalive(int64_t lease) {
  COMPANION_ASSIGN_OR_RETURN(
      std::string body, post("/v3/lease/keepalive", json{{"ID", std::to_string(lease)}}.dump()));
  COMPANION_ASSIGN_OR_RETURN(json j, parse_object(body, endpoint()));
  if (auto e = j.find("error"); e != j.end())
    return make_error(StatusCode::kUnavailable,
                      "etcd at " + endpoint() + " refused the keepalive: " + e->dump());
  // A single reply wrapped in "result"; a lease etcd does not know comes back without a TTL.
  const json& result = j.contains("result") ? j["result"] : j;
  if (!result.is_object()) return int64_t{0};
  return as_int64(result, "TTL");
}

Result<void> EtcdClient::revoke(int64_t lease) {
  auto r = post("/v3/lease/revoke", json{{"ID", std::to_string(lease)}}.dump());
  if (!r.ok() && r.error().code != StatusCode::kNotFound) return std::move(r).error();
  return ok_result();
}

Result<int64_t> EtcdClient::put(const std::string& key, const std::string& value, int64_t lease) {
  json request{{"key", base64_encode(key)}, {"value", base64_encode(value)}};
  if (lease != 0) request["lease"] = std::to_string(lease);
  COMPANION_ASSIGN_OR_RETURN(std::string body, post("/v3/kv/put", request.dump()));
  COMPANION_ASSIGN_OR_RETURN(json j, parse_object(body, endpoint()));
  return as_int64(j.value("header", json::object()), "revision");
}

Result<std::optional<EtcdKeyValue>> EtcdClient::get(const std::string& key) {
  COMPANION_ASSIGN_OR_RETURN(std::string body,
                             post("/v3/kv/range", json{{"key", base64_encode(key)}}.dump()));
  COMPANION_ASSIGN_OR_RETURN(json j, parse_object(body, endpoint()));
  auto kvs = j.find("kvs");
  if (kvs == j.end() || !kvs->is_array() || kvs->empty()) return std::optional<EtcdKeyValue>{};
  return std::optional<EtcdKeyValue>(key_value_from(kvs->front()));
}

Result<EtcdRange> EtcdClient::range_prefix(const std::string& prefix) {
  json request{{"key", base64_encode(prefix)},
               {"range_end", base64_encode(prefix_range_end(prefix))}};
  COMPANION_ASSIGN_OR_RETURN(std::string body, post("/v3/kv/range", request.dump()));
  COMPANION_ASSIGN_OR_RETURN(json j, parse_object(body, endpoint()));
  EtcdRange range;
  range.revision = as_int64(j.value("header", json::object()), "revision");
  if (auto kvs = j.find("kvs"); kvs != j.end() && kvs->is_array())
    for (const auto& kv : *kvs)
      if (kv.is_object()) range.kvs.push_back(key_value_from(kv));
  return range;
}

Result<int64_t> EtcdClient::delete_key(const std::string& key) {
  COMPANION_ASSIGN_OR_RETURN(std::string body,
                             post("/v3/kv/deleterange", json{{"key", base64_encode(key)}}.dump()));
  COMPANION_ASSIGN_OR_RETURN(json j, parse_object(body, endpoint()));
  return as_int64(j, "deleted");
}

// ---- watch -------------------------------------------------------------------------------------

namespace {

// Parses the watch stream: one JSON object per line.
struct WatchStream {
  const EtcdWatch::Callback* on_events = nullptr;
  const std::function<void()>* on_created = nullptr;
  std::string pending;
  bool cancelled = false;
  std::string error;

  void feed(const char* data, size_t n) {
    pending.append(data, n);
    size_t start = 0;
    for (size_t nl; (nl = pending.find('\n', start)) != std::string::npos; start = nl + 1)
      handle_line(std::string_view(pending).substr(start, nl - start));
    pending.erase(0, start);
  }

  void handle_line(std::string_view line) {
    if (line.find_first_not_of(" \r\t") == std::string_view::npos) return;
    json j = json::parse(line, nullptr, false);
    if (!j.is_object()) return;
    if (auto e = j.find("error"); e != j.end()) {
      error = e->is_string() ? e->get<std::string>() : e->dump();
      cancelled = true;
      return;
    }
    auto r = j.find("result");
    if (r == j.end() || !r->is_object()) return;
    auto flag = [&](const char* name) {
      auto it = r->find(name);
      return it != r->end() && it->is_boolean() && it->get<bool>();
    };
    if (flag("canceled")) {
      cancelled = true;
      error = "etcd cancelled the watch (compact revision " +
              std::to_string(as_int64(*r, "compact_revision")) + ")";
      return;
    }
    if (flag("created") && *on_created) (*on_created)();
    auto events = r->find("events");
    if (events == r->end() || !events->is_array()) return;
    std::vector<EtcdEvent> out;
    for (const auto& e : *events) {
      if (!e.is_object() || !e.contains("kv")) continue;
      EtcdEvent event;
      auto type = e.find("type");
      event.deleted = type != e.end() && type->is_string() && type->get<std::string>() == "DELETE";
      if (!e["kv"].is_object()) continue;
      event.kv = key_value_from(e["kv"]);
      out.push_back(std::move(event));
    }
    auto header = r->find("header");
    int64_t revision =
        header != r->end() && header->is_object() ? as_int64(*header, "revision") : 0;
    if (!out.empty()) (*on_events)(out, revision);
  }
};

// No exception may unwind through libcurl: one ends the transfer (returning a short count)
// with the reason kept.
size_t feed_watch(char* data, size_t size, size_t count, void* user) {
  auto* stream = static_cast<WatchStream*>(user);
  try {
    stream->feed(data, size * count);
    return size * count;
  } catch (const std::exception& e) {
    stream->cancelled = true;
    stream->error = std::string("etcd watch: ") + e.what();
    return 0;
  }
}

}  // namespace

EtcdWatch::EtcdWatch(std::string endpoint, std::string prefix, int64_t start_revision,
                     EtcdSecurity security, std::string token)
    : endpoint_(std::move(endpoint)),
      prefix_(std::move(prefix)),
      start_revision_(start_revision),
      security_(std::move(security)),
      token_(std::move(token)) {
  ensure_curl_initialised();
  multi_ = curl_multi_init();
}

EtcdWatch::~EtcdWatch() {
  if (multi_ != nullptr) curl_multi_cleanup(static_cast<CURLM*>(multi_));
}

void EtcdWatch::stop() {
  stop_.store(true);
  if (multi_ != nullptr) curl_multi_wakeup(static_cast<CURLM*>(multi_));
}

Result<void> EtcdWatch::run(const Callback& on_events, const std::function<void()>& on_created) {
  auto* multi = static_cast<CURLM*>(multi_);
  CURL* easy = curl_easy_init();
  if (multi == nullptr || easy == nullptr) {
    if (easy != nullptr) curl_easy_cleanup(easy);
    return make_error(StatusCode::kInternal, "curl init failed");
  }
  json create{{"key", base64_encode(prefix_)},
              {"range_end", base64_encode(prefix_range_end(prefix_))}};
  if (start_revision_ > 0) create["start_revision"] = std::to_string(start_revision_);
  std::string body = json{{"create_request", create}}.dump();
  std::string url = endpoint_ + "/v3/watch";
  WatchStream stream;
  stream.on_events = &on_events;
  stream.on_created = &on_created;
  curl_slist* headers = curl_slist_append(nullptr, "Content-Type: application/json");
  if (!token_.empty()) headers = curl_slist_append(headers, ("Authorization: " + token_).c_str());
  curl_easy_setopt(easy, CURLOPT_HTTPHEADER, headers);
  apply_tls(easy, security_);
  curl_easy_setopt(easy, CURLOPT_URL, url.c_str());
  curl_easy_setopt(easy, CURLOPT_POSTFIELDS, body.c_str());
  curl_easy_setopt(easy, CURLOPT_WRITEFUNCTION, feed_watch);
  curl_easy_setopt(easy, CURLOPT_WRITEDATA, &stream);
  curl_easy_setopt(easy, CURLOPT_CONNECTTIMEOUT_MS, 1500L);
  curl_easy_setopt(easy, CURLOPT_NOSIGNAL, 1L);
  curl_easy_setopt(easy, CURLOPT_NOPROXY, "*");
  // A member that vanishes without closing the connection is noticed by TCP keepalive.
  curl_easy_setopt(easy, CURLOPT_TCP_KEEPALIVE, 1L);
  curl_easy_setopt(easy, CURLOPT_TCP_KEEPIDLE, 5L);
  curl_easy_setopt(easy, CURLOPT_TCP_KEEPINTVL, 2L);
  curl_multi_add_handle(multi, easy);

  CURLcode done = CURLE_OK;
  bool finished = false;
  while (!stop_.load() && !finished && !stream.cancelled) {
    int running = 0;
    if (curl_multi_perform(multi, &running) != CURLM_OK) break;
    int queued = 0;
    while (CURLMsg* m = curl_multi_info_read(multi, &queued)) {
      if (m->msg == CURLMSG_DONE) {
        finished = true;
        done = m->data.result;
      }
    }
    if (finished || stream.cancelled || stop_.load()) break;
    curl_multi_poll(multi, nullptr, 0, 1000, nullptr);
  }
  long http = 0;
  curl_easy_getinfo(easy, CURLINFO_RESPONSE_CODE, &http);
  curl_multi_remove_handle(multi, easy);
  curl_easy_cleanup(easy);
  curl_slist_free_all(headers);
  if (stop_.load()) return ok_result();
  if (stream.cancelled) return make_error(StatusCode::kCancelled, stream.error);
  std::string why = done != CURLE_OK ? curl_easy_strerror(done)
                    : http != 200    ? "HTTP " + std::to_string(http)
                                     : std::string("stream ended");
  return make_error(StatusCode::kUnavailable, "etcd watch at " + endpoint_ + ": " + why);
}

}  // namespace companion::registry
