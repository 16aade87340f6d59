#include "registry/etcd_registry.hpp"

#include <algorithm>

#include "common/log.hpp"
#include "registry/registry.hpp"

namespace companion::registry {

std::string etcd_namespace_prefix(const std::string& ns) {
  return "/services/" + ns + "/";
}

std::string etcd_key_for(const ServerIdentity& record) {
  return etcd_namespace_prefix(record.ns) + record.component + "/" + record.instance_id;
}

Result<ServerIdentity> record_from_etcd(const EtcdKeyValue& kv) {
  constexpr size_t kMaxRecordBytes = 64 * 1024;
  if (kv.value.size() > kMaxRecordBytes)
    return make_error(StatusCode::kInvalidArgument, "record is larger than 64 KiB");
  COMPANION_ASSIGN_OR_RETURN(ServerIdentity record, record_from_json(kv.value));
  // A record filed under another instance's key would shadow or impersonate it.
  if (etcd_key_for(record) != kv.key)
    return make_error(StatusCode::kInvalidArgument,
                      "record names " + etcd_key_for(record) + ", not its key");
  return record;
}

// ---- announcer ---------------------------------------------------------------------------------

EtcdAnnouncer::EtcdAnnouncer(std::vector<std::string> endpoints, ServerIdentity record, int ttl_s,
                             EtcdSecurity security)
    : endpoints_(std::move(endpoints)),
      security_(std::move(security)),
      record_(std::move(record)),
      key_(etcd_key_for(record_)),
      value_(record_to_json(record_)),
      ttl_s_(std::max(ttl_s, 1)) {
  state_.key = key_;
  thread_ = std::thread([this] { run(); });
}

EtcdAnnouncer::~EtcdAnnouncer() {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    stopping_ = true;
  }
  changed_.notify_all();
  thread_.join();
  if (state_.lease_id != 0) {
    // Revoking deletes the key now instead of a TTL later; if etcd is away the lease lapses.
    EtcdClient etcd(endpoints_, 500, security_);
    auto r = etcd.revoke(state_.lease_id);
    if (!r.ok())
      log::warn("leaving etcd: " + r.error().message + " (the record lapses with its lease)");
  }
}

AnnouncerState EtcdAnnouncer::state() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return state_;
}

bool EtcdAnnouncer::wait_registered(std::chrono::milliseconds timeout) const {
  std::unique_lock<std::mutex> lock(mutex_);
  return changed_.wait_for(lock, timeout, [&] { return state_.registered; });
}

void EtcdAnnouncer::mark_registered(bool wrote_record) {
  std::lock_guard<std::mutex> lock(mutex_);
  if (wrote_record) ++state_.registrations;
  state_.registered = true;
  state_.last_error.clear();
  changed_.notify_all();
}

Result<void> EtcdAnnouncer::step(EtcdClient& etcd) {
  int64_t lease = 0;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    lease = state_.lease_id;
  }
  if (lease != 0) {
    COMPANION_ASSIGN_OR_RETURN(int64_t ttl, etcd.keepalive(lease));
    if (ttl > 0) {
      // The lease lives; the record must too (deleted by hand, or written over meanwhile).
      COMPANION_ASSIGN_OR_RETURN(auto current, etcd.get(key_));
      if (current && current->value == value_ && current->lease == lease) {
        mark_registered(false);
        return ok_result();
      }
      log::info("etcd record " + key_ + " went missing; writing it again");
    } else {
      log::info("etcd lease " + std::to_string(lease) + " is gone; registering again");
      lease = 0;
      std::lock_guard<std::mutex> lock(mutex_);
      state_.lease_id = 0;
      state_.registered = false;
    }
  }
  if (lease == 0) {
    COMPANION_ASSIGN_OR_RETURN(lease, etcd.grant(ttl_s_));
    std::lock_guard<std::mutex> lock(mutex_);
    state_.lease_id = lease;
  }
  COMPANION_TRY(etcd.put(key_, value_, lease));
  mark_registered(true);
  log::info("registered in etcd at " + etcd.endpoint() + " as " + key_ + " (lease " +
            std::to_string(lease) + ", TTL " + std::to_string(ttl_s_) + " s)");
  return ok_result();
}

void EtcdAnnouncer::run() {
  // Renewals every TTL/3, counted from the start of the previous one; each request is bounded so
  // that a step (up to three requests, each possibly trying every endpoint) fits in the interval.
  const auto interval = std::chrono::milliseconds(ttl_s_ * 1000 / 3);
  const int64_t requests = 3 * static_cast<int64_t>(endpoints_.size());
  const auto request_timeout = std::clamp<int64_t>(interval.count() / requests, 100, 2000);
  // After a failure, try again sooner: the lease may be close to lapsing.
  const auto retry = std::min(interval, std::chrono::milliseconds(500));
  EtcdClient etcd(endpoints_, static_cast<int>(request_timeout), security_);
  std::unique_lock<std::mutex> lock(mutex_);
  while (!stopping_) {
    auto started = std::chrono::steady_clock::now();
    lock.unlock();
    auto r = step(etcd);
    lock.lock();
    if (!r.ok()) {
      bool first = state_.last_error.empty();
      state_.registered = false;
      state_.last_error = r.error().message;
      if (first)
        log::warn("etcd registry unreachable (" + r.error().message +
                  "); serving local clients and retrying");
    }
    changed_.wait_until(lock, started + (r.ok() ? interval : retry), [&] { return stopping_; });
  }
}

// ---- directory ---------------------------------------------------------------------------------

EtcdDirectory::EtcdDirectory(std::vector<std::string> endpoints, std::string ns, int timeout_ms,
                             EtcdSecurity security)
    : endpoints_(std::move(endpoints)),
      prefix_(etcd_namespace_prefix(ns)),
      timeout_ms_(timeout_ms),
      security_(std::move(security)) {
  EtcdClient etcd(endpoints_, timeout_ms_, security_);
  auto revision = resync(etcd);
  thread_ = std::thread([this, next = revision.ok() ? *revision + 1 : 0] { run(next); });
}

EtcdDirectory::~EtcdDirectory() {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    stopping_ = true;
    if (watch_) watch_->stop();
  }
  changed_.notify_all();
  thread_.join();
}

EtcdDirectory::Snapshot EtcdDirectory::snapshot() const {
  std::lock_guard<std::mutex> lock(mutex_);
  Snapshot s;
  for (const auto& [key, record] : records_) s.records.push_back(record);
  std::sort(s.records.begin(), s.records.end(), [](const auto& a, const auto& b) {
    return a.started_at_ms != b.started_at_ms ? a.started_at_ms < b.started_at_ms
                                              : a.instance_id < b.instance_id;
  });
  s.synced = synced_;
  s.live = live_;
  s.last_error = last_error_;
  return s;
}

EtcdDirectory::Snapshot EtcdDirectory::wait_for(
    const std::function<bool(const ServerIdentity&)>& accept,
    std::chrono::milliseconds timeout) const {
  {
    std::unique_lock<std::mutex> lock(mutex_);
    changed_.wait_for(lock, timeout, [&] {
      return std::any_of(records_.begin(), records_.end(),
                         [&](const auto& kv) { return accept(kv.second); });
    });
  }
  return snapshot();
}

Result<int64_t> EtcdDirectory::resync(EtcdClient& etcd) {
  auto range = etcd.range_prefix(prefix_);
  std::lock_guard<std::mutex> lock(mutex_);
  if (!range.ok()) {
    live_ = false;
    last_error_ = range.error().message;
    return std::move(range).error();
  }
  records_.clear();
  for (const auto& kv : range->kvs) {
    auto record = record_from_etcd(kv);
    if (record.ok())
      records_[kv.key] = std::move(*record);
    else
      log::debug("ignoring etcd key " + kv.key + ": " + record.error().message);
  }
  synced_ = true;
  last_error_.clear();
  endpoint_ = etcd.endpoint();
  changed_.notify_all();
  return range->revision;
}

void EtcdDirectory::apply(const std::vector<EtcdEvent>& events) {
  std::lock_guard<std::mutex> lock(mutex_);
  for (const auto& e : events) {
    if (e.deleted) {
      records_.erase(e.kv.key);
      continue;
    }
    auto record = record_from_etcd(e.kv);
    if (record.ok())
      records_[e.kv.key] = std::move(*record);
    else
      records_.erase(e.kv.key);
  }
  changed_.notify_all();
}

void EtcdDirectory::run(int64_t next_revision) {
  EtcdClient etcd(endpoints_, timeout_ms_, security_);
  // The watch needs this client's token: list again first to authenticate.
  if (!security_.user.empty()) next_revision = 0;
  std::unique_lock<std::mutex> lock(mutex_);
  while (!stopping_) {
    if (next_revision == 0) {
      lock.unlock();
      auto revision = resync(etcd);
      lock.lock();
      if (stopping_) break;
      if (!revision.ok()) {
        changed_.wait_for(lock, std::chrono::milliseconds(500), [&] { return stopping_; });
        continue;
      }
      next_revision = *revision + 1;
    }
    // Created under the lock and checked against stopping_ there, so the destructor either sees
    // this watch (and stops it) or this thread sees stopping_.
    auto watch =
        std::make_shared<EtcdWatch>(endpoint_, prefix_, next_revision, security_, etcd.token());
    watch_ = watch;
    lock.unlock();
    auto r = watch->run([&](const std::vector<EtcdEvent>& events, int64_t) { apply(events); },
                        [&] {
                          std::lock_guard<std::mutex> created(mutex_);
                          live_ = true;
                          changed_.notify_all();
                        });
    lock.lock();
    watch_.reset();
    live_ = false;
    if (stopping_) break;
    last_error_ = r.ok() ? "watch ended" : r.error().message;
    log::debug("etcd watch ended: " + last_error_);
    // List again before watching again: etcd may have lost its data (revisions start over) or
    // compacted the revisions missed meanwhile.
    next_revision = 0;
    changed_.wait_for(lock, std::chrono::milliseconds(250), [&] { return stopping_; });
  }
}

}  // namespace companion::registry
