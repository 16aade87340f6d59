#include "server/keeper_link.hpp"

#include <algorithm>
#include <condition_variable>
#include <cstdlib>
#include <deque>
#include <map>
#include <mutex>
#include <variant>

#include "common/log.hpp"
#include "common/util.hpp"
#include "memory/backend.hpp"

namespace companion::server {

namespace {
using Clock = std::chrono::steady_clock;

struct KeepJob {
  uint64_t id = 0;
  keeper::CatalogEntry catalog;
  std::shared_ptr<memory::Slab> slab;
  std::shared_ptr<const protocol::SharedTensorTable> table;
};
struct ForgetJob {
  uint64_t id = 0;
};

std::string digest_text(uint64_t digest) {
  return "wsum64:" + hex64(digest);
}
}  // namespace

struct KeeperLink::State {
  std::unique_ptr<keeper::KeeperSession> session;
  std::mutex mutex;
  std::condition_variable cv;
  std::deque<std::variant<KeepJob, ForgetJob>> jobs;
  uint64_t next_id = 1;
  bool detached = false;
  bool stopping = false;
  bool broken = false;  // the keeper is gone: nothing more is sent

  void forget(uint64_t id) {
    std::lock_guard<std::mutex> lock(mutex);
    if (detached) return;
    jobs.push_back(ForgetJob{id});
    cv.notify_one();
  }

  void fail(const Error& error) {
    if (broken) return;
    broken = true;
    log::warn("the keeper is gone (" + error.message +
              "): models committed from now on will not survive a restart");
  }

  void send_keep(KeepJob& job) {
    auto exports = job.slab->export_segments();
    if (!exports.ok()) return log::warn("not kept: " + exports.error().message);
    std::vector<int> fds;
    for (const auto& e : *exports) {
      if (!e.fd) return log::warn("not kept: a segment has no descriptor");
      fds.push_back(e.fd.get());
    }
    auto table_fd = job.table->share();
    if (!table_fd.ok()) return log::warn("not kept: " + table_fd.error().message);
    fds.push_back(table_fd->get());
    // A load's digests are taken here, off the load's path: what the next server checks.
    if (job.catalog.digests.size() != job.slab->segment_count()) {
      job.catalog.digests.clear();
      for (size_t i = 0; i < job.slab->segment_count(); ++i) {
        auto digest = job.slab->digest(i);
        if (!digest.ok()) return log::warn("not kept: " + digest.error().message);
        job.catalog.digests.push_back(*digest);
      }
    }
    auto sent = session->keep(job.id, keeper::encode_catalog(job.catalog), fds);
    if (!sent.ok()) return fail(sent.error());
    log::debug("kept " + printable_text(job.catalog.store_key) + " generation " +
               std::to_string(job.catalog.number) + " as " + std::to_string(job.id));
  }

  void run() {
    for (;;) {
      std::variant<KeepJob, ForgetJob> job;
      {
        std::unique_lock<std::mutex> lock(mutex);
        cv.wait(lock, [&] { return stopping || !jobs.empty(); });
        if (jobs.empty()) return;  // stopping, and everything queued is sent
        job = std::move(jobs.front());
        jobs.pop_front();
      }
      if (broken) continue;
      if (auto* keep = std::get_if<KeepJob>(&job)) {
        send_keep(*keep);
      } else {
        auto sent = session->forget(std::get<ForgetJob>(job).id);
        if (!sent.ok()) fail(sent.error());
      }
    }
  }
};

namespace {
// The token a generation holds: its destruction queues the Forget.
struct KeptToken {
  std::shared_ptr<KeeperLink::State> state;
  uint64_t id = 0;
  ~KeptToken() { state->forget(id); }
};
}  // namespace

Result<std::shared_ptr<KeeperLink>> KeeperLink::open(const std::string& socket_path,
                                                     const keeper::KeeperLaunch& launch,
                                                     std::chrono::milliseconds keep_for) {
  auto state = std::make_shared<State>();
  COMPANION_ASSIGN_OR_RETURN(state->session,
                             keeper::KeeperSession::open(socket_path, launch, keep_for));
  return std::shared_ptr<KeeperLink>(new KeeperLink(std::move(state)));
}

KeeperLink::~KeeperLink() {
  {
    std::lock_guard<std::mutex> lock(state_->mutex);
    state_->stopping = true;
  }
  state_->cv.notify_all();
  if (thread_.joinable()) thread_.join();
}

const keeper::HelloReply& KeeperLink::hello() const noexcept {
  return state_->session->hello();
}

void KeeperLink::start() {
  thread_ = std::thread([state = state_] { state->run(); });
}

void KeeperLink::detach() {
  std::lock_guard<std::mutex> lock(state_->mutex);
  state_->detached = true;
}

std::shared_ptr<void> KeeperLink::token(uint64_t id) {
  auto token = std::make_shared<KeptToken>();
  token->state = state_;
  token->id = id;
  return token;
}

std::shared_ptr<void> KeeperLink::keep(keeper::CatalogEntry catalog,
                                       std::shared_ptr<memory::Slab> slab,
                                       std::shared_ptr<const protocol::SharedTensorTable> table) {
  uint64_t id = 0;
  {
    std::lock_guard<std::mutex> lock(state_->mutex);
    id = state_->next_id++;
    state_->jobs.push_back(KeepJob{id, std::move(catalog), std::move(slab), std::move(table)});
  }
  state_->cv.notify_one();
  return token(id);
}

Result<KeeperLink::Adoption> KeeperLink::adopt_into(ModelStore& store) {
  auto start = Clock::now();
  COMPANION_ASSIGN_OR_RETURN(std::vector<keeper::KeptGeneration> kept, state_->session->list());
  Adoption report;
  // Ids go on after the largest the keeper holds.
  for (const auto& k : kept) state_->next_id = std::max(state_->next_id, k.id + 1);

  struct Candidate {
    keeper::KeptGeneration* kept;
    keeper::CatalogEntry catalog;
    std::shared_ptr<void> token;  // dropping it makes the keeper let go
  };
  // The newest generation of each key: older ones were only alive for the leases of clients,
  // who hold their own mappings and need nothing from the keeper.
  std::map<std::string, Candidate> newest;
  for (auto& k : kept) {
    std::shared_ptr<void> t = token(k.id);
    auto catalog = keeper::decode_catalog(k.catalog);
    if (!catalog.ok()) {
      log::warn("keeper: generation " + std::to_string(k.id) +
                " not adopted: " + catalog.error().message);
      ++report.dropped;
      continue;
    }
    auto it = newest.find(catalog->store_key);
    if (it != newest.end() && it->second.catalog.number >= catalog->number) continue;
    std::string key = catalog->store_key;
    newest[key] = Candidate{&k, std::move(catalog).value(), std::move(t)};
  }

  std::string corrupt;  // test hook: the key whose catalog digest is taken as wrong
#ifdef COMPANION_TEST_HOOKS
  if (const char* hook = std::getenv("COMPANION_TEST_CORRUPT_KEPT_DIGEST")) corrupt = hook;
#endif
  const memory::Backend& backend = store.backend();
  for (auto& [key, c] : newest) {
    const keeper::CatalogEntry& cat = c.catalog;
    const std::string what = "'" + printable_text(cat.published ? cat.publish_key : key) +
                             "' generation " + std::to_string(cat.number);
    auto drop = [&](const std::string& why) {
      log::warn("not adopting " + what + ": " + why + "; the keeper lets it go");
      ++report.dropped;
    };
    std::vector<UniqueFd>& fds = c.kept->fds;
    if (fds.size() != cat.segment_sizes.size() + 1) {
      drop("it came with " + std::to_string(fds.size()) + " descriptors for " +
           std::to_string(cat.segment_sizes.size()) + " segments and a table");
      continue;
    }
    std::vector<memory::SegmentExport> segments;
    for (size_t i = 0; i < cat.segment_sizes.size(); ++i) {
      memory::SegmentExport e;
      e.kind = cat.segment_kind;
      e.size = cat.segment_sizes[i];
      e.fd = std::move(fds[i]);
      segments.push_back(std::move(e));
    }
    auto slab = backend.adopt(std::move(segments), short_id(key));
    if (!slab.ok()) {
      drop(slab.error().message);
      continue;
    }
    auto table = protocol::SharedTensorTable::adopt(std::move(fds.back()), cat.table_bytes,
                                                    cat.segment_sizes);
    if (!table.ok()) {
      drop(table.error().message);
      continue;
    }
    // The bytes are served again only if they are the bytes that were committed.
    std::vector<std::string> digests;
    std::string mismatch;
    for (size_t i = 0; i < cat.segment_sizes.size() && mismatch.empty(); ++i) {
      auto digest = (*slab)->digest(i);
      if (!digest.ok()) {
        mismatch = digest.error().message;
        break;
      }
      uint64_t expected = cat.digests[i];
      if (!corrupt.empty() && key.find(corrupt) != std::string::npos) expected ^= 1;
      if (*digest != expected)
        mismatch = "segment " + std::to_string(i) + " has digest " + digest_text(*digest) +
                   ", its catalog says " + digest_text(expected);
      digests.push_back(digest_text(*digest));
    }
    if (!mismatch.empty()) {
      log::error("digest mismatch: " + what + " is not served: " + mismatch);
      ++report.dropped;
      continue;
    }
    AdoptedGeneration a;
    a.model.key = key;
    a.model.spec = cat.spec;
    a.model.source.path = cat.source_path;
    a.model.source.hf_repo = cat.hf_repo;
    a.model.source.hf_commit = cat.hf_commit;
    a.published = cat.published;
    a.publish_key = cat.publish_key;
    a.number = cat.number;
    a.fingerprint = cat.fingerprint;
    // Shown for publications, as their commit showed them; a load's are the keeper's own.
    if (cat.published) a.digests = std::move(digests);
    a.files = cat.files;
    a.created_at_ms = cat.created_at_ms;
    uint64_t bytes = (*slab)->total_bytes();
    a.slab = std::shared_ptr<memory::Slab>(std::move(slab).value());
    a.table = std::move(table).value();
    a.kept = std::move(c.token);
    auto adopted = store.adopt(std::move(a));
    if (!adopted.ok()) {
      drop(adopted.error().message);
      continue;
    }
    ++report.adopted;
    report.bytes += bytes;
    log::info("adopted " + what + " (" + format_bytes(bytes) + ", " +
              std::to_string(cat.segment_sizes.size()) +
              " segments, digests checked): served without reading it again");
  }
  report.ms = std::chrono::duration<double, std::milli>(Clock::now() - start).count();
  return report;
}

}  // namespace companion::server
