// The etcd registry: servers announce their record under /services/<namespace>/<component>/
// <instance>, bound to a lease they keep alive; clients keep a watched copy of a namespace's
// records. Both survive etcd going away: the server goes on serving and registers again, the
// client keeps the records it last saw.
#pragma once

#include <chrono>
#include <condition_variable>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "companion/types.hpp"
#include "registry/etcd_client.hpp"

namespace companion::registry {

// "/services/<ns>/"
std::string etcd_namespace_prefix(const std::string& ns);
// "/services/<ns>/<component>/<instance_id>"
std::string etcd_key_for(const ServerIdentity& record);

struct AnnouncerState {
  bool registered = false;  // the record is in etcd under a live lease, as of the last check
  std::string key;
  int64_t lease_id = 0;
  uint64_t registrations = 0;  // times the record was (re)written
  std::string last_error;      // why the last attempt failed; empty after a success
};

// Keeps one server's record in etcd on a thread of its own: grants a lease of ttl_s seconds,
// writes the record bound to it, renews it every ttl_s/3 and puts the record back if it went
// missing. When etcd is unreachable it retries
// at that pace; when the lease is gone on its return (expired, or etcd lost its data) it takes a
// new one and writes the record again. Destruction revokes the lease, removing the key at once.
class EtcdAnnouncer {
 public:
  EtcdAnnouncer(std::vector<std::string> endpoints, ServerIdentity record, int ttl_s,
                EtcdSecurity security = {});
  ~EtcdAnnouncer();
  EtcdAnnouncer(const EtcdAnnouncer&) = delete;
  EtcdAnnouncer& operator=(const EtcdAnnouncer&) = delete;

  AnnouncerState state() const;
  // Waits until the record is registered; false on timeout.
  bool wait_registered(std::chrono::milliseconds timeout) const;

 private:
  void run();
  // One step: register (new lease + put) or renew (keepalive, re-put if the key went missing).
  Result<void> step(EtcdClient& etcd);
  // The record is in etcd under a live lease; wrote_record: this step (re)wrote it.
  void mark_registered(bool wrote_record);

  std::vector<std::string> endpoints_;
  EtcdSecurity security_;
  ServerIdentity record_;
  std::string key_;
  std::string value_;
  int ttl_s_;
  mutable std::mutex mutex_;
  mutable std::condition_variable changed_;
  bool stopping_ = false;
  AnnouncerState state_;
  std::thread thread_;
};

// The record stored under an etcd key, validated before use: at most 64 KiB, the full schema
// (record_from_json) and a key that is the record's own (etcd_key_for). kInvalidArgument
// otherwise.
Result<ServerIdentity> record_from_etcd(const EtcdKeyValue& kv);

// A client's view of one namespace in etcd: every valid record under /services/<ns>/
// (record_from_etcd), read once at open and kept current by a watch on a thread of its own. When
// etcd goes away the records last seen stay; when it returns they are read again and the watch
// resumes.
class EtcdDirectory {
 public:
  struct Snapshot {
    std::vector<ServerIdentity> records;  // oldest first
    bool synced = false;                  // read from etcd at least once
    bool live = false;                    // the watch is running now
    std::string last_error;
  };

  // Reads the records once (each endpoint tried for up to timeout_ms; a failure is remembered,
  // not returned), then starts watching.
  EtcdDirectory(std::vector<std::string> endpoints, std::string ns, int timeout_ms = 1500,
                EtcdSecurity security = {});
  ~EtcdDirectory();
  EtcdDirectory(const EtcdDirectory&) = delete;
  EtcdDirectory& operator=(const EtcdDirectory&) = delete;

  Snapshot snapshot() const;
  // Waits until a record satisfying `accept` is present, or timeout; the snapshot either way.
  Snapshot wait_for(const std::function<bool(const ServerIdentity&)>& accept,
                    std::chrono::milliseconds timeout) const;

 private:
  Result<int64_t> resync(EtcdClient& etcd);
  void apply(const std::vector<EtcdEvent>& events);
  void run(int64_t next_revision);

  std::vector<std::string> endpoints_;
  std::string prefix_;
  int timeout_ms_;
  EtcdSecurity security_;
  mutable std::mutex mutex_;
  mutable std::condition_variable changed_;
  std::map<std::string, ServerIdentity> records_;  // by key
  bool synced_ = false;
  bool live_ = false;
  bool stopping_ = false;
  std::string last_error_;
  std::string endpoint_;  // the one the last range came from; the watch goes there
  std::shared_ptr<EtcdWatch> watch_;
  std::thread thread_;
};

}  // namespace companion::registry
