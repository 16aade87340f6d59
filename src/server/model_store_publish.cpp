// Published models: a writer connection claims a key, declares its table (the store lays out and
// allocates one slab and exports it writable to that writer alone), fills it, and commits (the
// store digests and seals it on a worker and makes it the key's newest generation). Reloads of
// loaded models make generations the same way from the files.
#include <algorithm>
#include <new>
#include <set>
#include <unordered_set>

#include "common/log.hpp"
#include "common/util.hpp"
#include "loader/layout.hpp"
#include "protocol/limits.hpp"
#include "server/model_store.hpp"
#include "server/store_entry.hpp"

namespace companion::server {
namespace {

Error invalid(const std::string& why) {
  return make_error(StatusCode::kInvalidArgument, why);
}

// A declared table's tensors: each one's bytes (0 for aliases) and, for an alias, the index of
// the tensor it names (kNoAlias for the others).
struct CheckedTable {
  static constexpr size_t kNoAlias = SIZE_MAX;
  std::vector<uint64_t> bytes;
  std::vector<size_t> alias_of;
};

// Checks a declared table: names valid and unique, shapes within bounds, aliases naming an
// earlier tensor with its own bytes and the same dtype and shape.
Result<CheckedTable> check_table(const std::vector<protocol::TensorDeclInfo>& table) {
  if (table.size() > protocol::kMaxTableTensors)
    return invalid("a published model has at most " + std::to_string(protocol::kMaxTableTensors) +
                   " tensors, not " + std::to_string(table.size()));
  CheckedTable checked;
  checked.bytes.assign(table.size(), 0);
  checked.alias_of.assign(table.size(), CheckedTable::kNoAlias);
  std::unordered_map<std::string_view, size_t> index;
  index.reserve(table.size());
  for (size_t i = 0; i < table.size(); ++i) {
    const auto& t = table[i];
    if (t.name.empty() || t.name.size() > protocol::kMaxNameBytes || !is_valid_utf8(t.name) ||
        t.name.find('\0') != std::string::npos)
      return invalid("tensor " + std::to_string(i) + " has no valid name (UTF-8 without NUL, 1.." +
                     std::to_string(protocol::kMaxNameBytes) + " bytes)");
    if (!index.emplace(t.name, i).second)
      return invalid("tensor '" + printable_text(t.name) + "' is declared twice");
    if (t.shape.size() > protocol::kMaxRank)
      return invalid("tensor '" + printable_text(t.name) + "' has rank " +
                     std::to_string(t.shape.size()) + "; at most " +
                     std::to_string(protocol::kMaxRank));
    // Bounded with the zero dims left out too: strides multiply every other dim.
    uint64_t elements = 1;
    uint64_t span = 1;
    for (int64_t d : t.shape) {
      if (d < 0) return invalid("tensor '" + printable_text(t.name) + "' has a negative dim");
      uint64_t n = d == 0 ? 1 : static_cast<uint64_t>(d);
      if (span > (uint64_t{1} << 56) / n)
        return invalid("tensor '" + printable_text(t.name) + "' is too large");
      span *= n;
      elements *= static_cast<uint64_t>(d);
    }
    if (!t.alias_of.empty()) {
      auto target = index.find(t.alias_of);
      if (target == index.end() || target->second == i)
        return invalid("tensor '" + printable_text(t.name) + "' aliases '" +
                       printable_text(t.alias_of) + "', which is not declared before it");
      const auto& of = table[target->second];
      if (!of.alias_of.empty())
        return invalid("tensor '" + printable_text(t.name) + "' aliases '" +
                       printable_text(t.alias_of) + "', itself an alias; name the original");
      if (of.dtype != t.dtype || of.shape != t.shape)
        return invalid("tensor '" + printable_text(t.name) + "' aliases '" +
                       printable_text(t.alias_of) + "' but differs in dtype or shape");
      checked.alias_of[i] = target->second;
      continue;
    }
    checked.bytes[i] = elements * dtype_size(t.dtype);
  }
  return checked;
}

std::string digest_text(uint64_t digest) {
  return "wsum64:" + hex64(digest);
}

}  // namespace

Result<ClaimOutcome> ModelStore::claim(const std::string& key, const Fingerprint& fingerprint,
                                       protocol::ClaimMode mode, uint64_t writer) {
  COMPANION_TRY(protocol::validate_publish_key(key));
  COMPANION_TRY(protocol::validate_fingerprint(fingerprint));
  ClaimOutcome out;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    std::string store_key = published_store_key(key);
    auto it = entries_.find(store_key);
    if (it != entries_.end() && it->second->published) {
      Entry& e = *it->second;
      if (mode == protocol::ClaimMode::kIfUnpublished && e.current() != nullptr) {
        COMPANION_TRY(
            check_fingerprint(key, e.current()->number, e.current()->fingerprint, fingerprint));
        out.kind = ClaimOutcome::Kind::kPublished;
        out.status = snapshot(e);
        return out;
      }
      if (e.writer) {
        out.kind =
            e.writer->owner == writer ? ClaimOutcome::Kind::kClaimed : ClaimOutcome::Kind::kBusy;
        out.status = snapshot(e);
        return out;
      }
      drop_unleased_locked(e);
      if (e.generations.size() + 1 > config_.max_generations) {
        refusals_["generations"]++;
        std::string leased;
        for (const auto& g : e.generations)
          if (&g != e.current())
            leased += " " + std::to_string(g.number) + " (" + std::to_string(g.leases) + " leases)";
        return make_error(StatusCode::kLimitExceeded,
                          "'" + printable_text(key) + "' has " +
                              std::to_string(e.generations.size()) +
                              " live generations, and a new one would pass its limit "
                              "(--max-generations " +
                              std::to_string(config_.max_generations) +
                              "); readers still hold generation(s)" + leased);
      }
      e.writer = Writer{};
      e.writer->owner = writer;
      e.writer->fingerprint = fingerprint;
      out.kind = ClaimOutcome::Kind::kClaimed;
      out.status = snapshot(e);
    } else {
      size_t held = held_locked();
      if (held >= config_.max_models) {
        refusals_["models"]++;
        return make_error(StatusCode::kLimitExceeded,
                          "the server holds " + std::to_string(held) +
                              " models (loaded, loading or published), its limit "
                              "(--max-models " +
                              std::to_string(config_.max_models) + "); unload one first");
      }
      auto entry = std::make_shared<Entry>();
      entry->published = true;
      entry->publish_key = key;
      entry->model.key = store_key;
      entry->id = short_id(store_key);
      entry->state = ModelState::kLoading;
      entry->generation = next_generation();
      entry->writer = Writer{};
      entry->writer->owner = writer;
      entry->writer->fingerprint = fingerprint;
      entries_[store_key] = entry;
      out.kind = ClaimOutcome::Kind::kClaimed;
      out.status = snapshot(*entry);
    }
  }
  notify(out.status);
  return out;
}

Result<WriterGrant> ModelStore::declare(const std::string& key, uint64_t writer,
                                        const std::vector<protocol::TensorDeclInfo>& table) {
  std::string store_key = published_store_key(key);
  auto not_writer = [&] {
    return make_error(StatusCode::kInvalidArgument,
                      "this connection does not hold '" + printable_text(key) +
                          "' (claim it first; a commit, abort or unload gives it up)");
  };
  {
    std::lock_guard<std::mutex> lock(mutex_);
    auto it = entries_.find(store_key);
    if (it == entries_.end() || !it->second->writer || it->second->writer->owner != writer)
      return not_writer();
    if (it->second->writer->slab)
      return invalid("'" + printable_text(key) + "' is declared already; one table per claim");
  }
  COMPANION_ASSIGN_OR_RETURN(CheckedTable checked, check_table(table));
  std::vector<uint64_t>& bytes = checked.bytes;
  std::vector<uint64_t> sizes;
  std::vector<size_t> owners;  // table index of each laid-out tensor
  for (size_t i = 0; i < table.size(); ++i)
    if (table[i].alias_of.empty()) {
      sizes.push_back(bytes[i]);
      owners.push_back(i);
    }
  if (sizes.empty()) {  // a slab needs one segment: an empty model still gets one page
    sizes.push_back(0);
    owners.push_back(table.size());
  }
  COMPANION_ASSIGN_OR_RETURN(
      loader::SlabLayout layout,
      loader::plan_layout(sizes, loader::kTensorAlignment, backend_->granularity(),
                          backend_->max_segment_bytes()));
  if (layout.segment_sizes.size() > protocol::kMaxSegments)
    return invalid("the table needs more segments than one reply carries");
  uint64_t slab_bytes = 0;
  for (uint64_t size : layout.segment_sizes) slab_bytes += size;
  COMPANION_TRY(admit(slab_bytes, "publication of '" + printable_text(key) + "'", store_key));
  // The admitted bytes count against the budget until the writer holds the slab (then they are
  // the entry's), or until this function gives up, however it returns.
  struct BudgetHold {
    ModelStore* store;
    uint64_t bytes;
    ~BudgetHold() {
      if (bytes == 0) return;
      std::lock_guard<std::mutex> lock(store->mutex_);
      store->budget_pending_ -= std::min(bytes, store->budget_pending_);
    }
  } budget_hold{this, slab_bytes};
  uint64_t outstanding = slab_bytes;
  auto settle = [&](uint64_t keep) {  // under mutex_
    admitted_bytes_ -= std::min(outstanding - keep, admitted_bytes_);
    outstanding = keep;
  };
  // What is still admitted goes back on every way out that does not hand it to the writer (an
  // exception included: declare_async runs this on a worker and reports the exception).
  bool handed_over = false;
  struct Unadmit {
    std::function<void()> run;
    ~Unadmit() { run(); }
  } unadmit{[&] {
    if (handed_over) return;
    std::lock_guard<std::mutex> lock(mutex_);
    settle(0);
  }};
  auto allocate_start = Clock::now();
  auto slab = backend_->allocate(layout.segment_sizes, short_id(store_key));
  if (!slab.ok()) {
    std::lock_guard<std::mutex> lock(mutex_);
    settle(0);
    return slab.error();
  }
  auto allocated_at = Clock::now();
  auto exports = (*slab)->export_writable();
  auto exported_at = Clock::now();
  if (!exports.ok()) {
    std::lock_guard<std::mutex> lock(mutex_);
    settle(0);
    return exports.error();
  }
  // Where each tensor lies; an alias where the tensor it names does (check_table made sure that
  // one comes earlier and has its own bytes).
  std::vector<uint32_t> segment_of(table.size(), 0);
  std::vector<uint64_t> offset_of(table.size(), 0);
  for (size_t k = 0; k < owners.size(); ++k) {
    size_t i = owners[k];
    if (i == table.size()) continue;
    segment_of[i] = layout.placements[k].segment;
    offset_of[i] = layout.placements[k].offset;
  }
  size_t name_bytes = 0;
  for (const auto& t : table) name_bytes += t.name.size();
  protocol::TensorTableBuilder builder(table.size(), name_bytes);
  Result<void> built = ok_result();
  for (size_t i = 0; i < table.size() && built.ok(); ++i) {
    if (size_t of = checked.alias_of[i]; of != CheckedTable::kNoAlias) {
      segment_of[i] = segment_of[of];
      offset_of[i] = offset_of[of];
      bytes[i] = bytes[of];
    }
    built = builder.add(table[i].name, table[i].dtype, table[i].shape, {}, segment_of[i],
                        offset_of[i], bytes[i]);
  }
  auto tensors = built.ok()
                     ? make_shared_table(builder, **slab)
                     : Result<std::shared_ptr<const protocol::SharedTensorTable>>(built.error());
  if (!tensors.ok()) {
    std::lock_guard<std::mutex> lock(mutex_);
    settle(0);
    return tensors.error();
  }
  WriterGrant grant;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    auto it = entries_.find(store_key);
    // Aborted or unloaded while allocating: the slab goes with this function.
    if (it == entries_.end() || !it->second->writer || it->second->writer->owner != writer ||
        it->second->writer->slab) {
      settle(0);
      return make_error(StatusCode::kCancelled,
                        "'" + printable_text(key) + "' was given up while its slab was allocated");
    }
    Entry& e = *it->second;
    // GPU memory and reserved host pages show as taken from now on; host pages of a backend
    // that cannot reserve them only as the writer fills them.
    if (backend_->allocation_is_resident()) settle(0);
    e.writer->slab = std::shared_ptr<memory::Slab>(std::move(*slab));
    budget_pending_ -= std::min(budget_hold.bytes, budget_pending_);
    budget_hold.bytes = 0;
    e.writer->table = *tensors;
    e.writer->token = next_generation();
    e.writer->admitted = outstanding;
    handed_over = true;
    e.bytes_total = slab_bytes;
    e.bytes_done = 0;
    grant.status = snapshot(e);
    grant.table = *tensors;
    grant.exports = std::move(*exports);
    grant.generation = e.next_number;
  }
  auto ms = [](Clock::duration d) { return std::chrono::duration<double, std::milli>(d).count(); };
  log::info("publishing '" + printable_text(key) + "': " + std::to_string(table.size()) +
            " tensors, " + format_bytes(slab_bytes) + " (allocated in " +
            std::to_string(ms(allocated_at - allocate_start)) + " ms, exported in " +
            std::to_string(ms(exported_at - allocated_at)) + " ms)");
  notify(grant.status);
  return grant;
}

void ModelStore::declare_async(const std::string& key, uint64_t writer,
                               std::vector<protocol::TensorDeclInfo> tensors,
                               std::function<void(Result<WriterGrant>)> done) {
  std::lock_guard<std::mutex> lock(mutex_);
  jobs_.push_back([this, pool = pool_, key, writer, tensors = std::move(tensors),
                   done = std::move(done)] {
    if (pool->stopping) return;
    // An exception fails this declaration alone (declare() frees what it allocated).
    Result<WriterGrant> outcome = Error{StatusCode::kInternal, "internal error while declaring"};
    try {
      outcome = declare(key, writer, tensors);
    } catch (const std::bad_alloc&) {
      outcome = Error{StatusCode::kOutOfMemory, "out of host memory while declaring a table"};
    } catch (const std::exception& e) {
      outcome = Error{StatusCode::kInternal,
                      std::string("internal error while declaring a table: ") + e.what()};
    } catch (...) {
    }
    if (pool->stopping) return;  // the store may be gone: touch nothing
    done(std::move(outcome));
  });
  jobs_cv_.notify_one();
}

void ModelStore::commit(const std::string& key, uint64_t writer,
                        std::function<void(Result<LeaseGrant>)> done) {
  std::shared_ptr<Entry> entry;
  uint64_t token = 0;
  ModelStatus s;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    auto it = entries_.find(published_store_key(key));
    if (it == entries_.end() || !it->second->writer || it->second->writer->owner != writer)
      return done(make_error(StatusCode::kInvalidArgument,
                             "this connection does not hold '" + printable_text(key) + "'"));
    Writer& w = *it->second->writer;
    if (!w.slab)
      return done(make_error(StatusCode::kInvalidArgument,
                             "'" + printable_text(key) + "' has no table yet: declare it first"));
    if (w.committing)
      return done(make_error(StatusCode::kInvalidArgument,
                             "'" + printable_text(key) + "' is being committed already"));
    w.committing = true;
    token = w.token;
    entry = it->second;
    s = snapshot(*entry);
    jobs_.push_back([this, pool = pool_, entry, writer, token, done = std::move(done)] {
      // An exception fails this commit alone; the publication stays open for another try.
      Error error;
      try {
        return run_commit(entry, writer, token, done);
      } catch (const std::bad_alloc&) {
        error = Error{StatusCode::kOutOfMemory, "out of host memory while committing"};
      } catch (const std::exception& e) {
        error = Error{StatusCode::kInternal,
                      std::string("internal error while committing: ") + e.what()};
      } catch (...) {
        error = Error{StatusCode::kInternal, "internal error while committing"};
      }
      if (pool->stopping) return;  // the store may be gone: touch nothing
      ModelStatus reopened;
      {
        std::lock_guard<std::mutex> job_lock(mutex_);
        if (entry->writer && entry->writer->token == token) entry->writer->committing = false;
        reopened = snapshot(*entry);
      }
      log::warn("commit of '" + printable_text(entry->publish_key) +
                "' failed: " + error.to_string());
      notify(reopened);
      done(error);
    });
    jobs_cv_.notify_one();
  }
  notify(s);
}

void ModelStore::run_commit(std::shared_ptr<Entry> entry, uint64_t writer, uint64_t token,
                            std::function<void(Result<LeaseGrant>)> done) {
  std::shared_ptr<WorkerPool> pool = pool_;
  std::shared_ptr<memory::Slab> slab;
  std::string key;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    if (!entry->writer || entry->writer->token != token)
      return done(make_error(StatusCode::kCancelled, "the publication was unloaded"));
    slab = entry->writer->slab;
    key = entry->publish_key;
  }
  auto start = Clock::now();
  // Sealed first: from then on nobody can change the bytes (a host seal fails while a writable
  // mapping is left), so the digest is of what readers will see, and a refused seal costs no
  // digest.
  Result<void> outcome = slab->seal();
  auto sealed_at = Clock::now();
  std::vector<std::string> digests;
  for (size_t i = 0; i < slab->segment_count() && outcome.ok(); ++i) {
    auto digest = slab->digest(i);
    if (!digest.ok())
      outcome = digest.error();
    else
      digests.push_back(digest_text(*digest));
  }
  if (pool->stopping) return;  // the store is going away: touch nothing more
  if (!outcome.ok()) {
    ModelStatus s;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (entry->writer && entry->writer->token == token) entry->writer->committing = false;
      s = snapshot(*entry);
    }
    log::warn("commit of '" + printable_text(key) + "' failed: " + outcome.error().to_string());
    notify(s);
    return done(outcome.error());
  }
  Result<LeaseGrant> grant = make_error(StatusCode::kCancelled, "the publication was unloaded");
  ModelStatus s;
  bool committed = false;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    if (entry->writer && entry->writer->token == token && entry->writer->owner == writer) {
      Writer& w = *entry->writer;
      admitted_bytes_ -= std::min(w.admitted, admitted_bytes_);
      Generation g;
      g.number = entry->next_number++;
      g.token = token;
      g.slab = w.slab;
      g.table = w.table;
      g.digests = std::move(digests);
      g.fingerprint = w.fingerprint;
      g.created_at_ms = unix_time_ms();
      entry->generations.push_back(std::move(g));
      keep_locked(*entry, entry->generations.back());
      entry->writer.reset();
      entry->state = ModelState::kLoaded;
      entry->bytes_done = entry->bytes_total;
      drop_unleased_locked(*entry);
      grant = lease_locked(*entry, entry->generations.size() - 1);
      s = grant.ok() ? grant->status : snapshot(*entry);
      committed = true;
    }
  }
  // The generation (or nothing, if the publication was unloaded) holds the slab now: this
  // worker lets go before anyone hears of the commit, so the slab is freed with the last lease.
  slab.reset();
  if (committed) {
    auto ms = [](Clock::duration d) {
      return std::chrono::duration<double, std::milli>(d).count();
    };
    log::info("committed '" + printable_text(key) + "' generation " + std::to_string(s.generation) +
              " (seal " + std::to_string(ms(sealed_at - start)) + " ms, digest " +
              std::to_string(ms(Clock::now() - sealed_at)) + " ms)");
    notify(s);
  }
  done(std::move(grant));
}

bool ModelStore::abort(const std::string& key, uint64_t writer) {
  ModelStatus s;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    std::string store_key = published_store_key(key);
    auto it = entries_.find(store_key);
    if (it == entries_.end() || !it->second->writer || it->second->writer->owner != writer)
      return false;
    Entry& e = *it->second;
    if (e.writer->committing) {
      // The digest is under way: the commit goes on, and stands; the writer's lease then goes
      // with its connection.
      return false;
    }
    admitted_bytes_ -= std::min(e.writer->admitted, admitted_bytes_);
    std::vector<std::shared_ptr<memory::Slab>> dropped;
    dropped.push_back(std::move(e.writer->slab));
    retire_locked(std::move(dropped));
    e.writer.reset();
    e.bytes_done = e.bytes_total = 0;
    if (e.generations.empty()) {
      e.state = ModelState::kUnloaded;
      e.generation = next_generation();
      s = snapshot(e);
      entries_.erase(it);
    } else {
      s = snapshot(e);
    }
  }
  log::info("publication of '" + printable_text(key) + "' aborted");
  notify(s);
  return true;
}

Result<ModelStatus> ModelStore::reload(const std::string& key_or_id, bool force) {
  ModelStatus s;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    Entry* found = find_locked(key_or_id);
    if (found == nullptr)
      return make_error(StatusCode::kNotFound,
                        "no model " + printable_text(key_or_id) + " on this server");
    if (found->published)
      return invalid("'" + printable_text(found->publish_key) +
                     "' is published: its writer makes new generations by publishing again");
    if (found->state != ModelState::kLoaded || found->generations.empty())
      return make_error(StatusCode::kNotReady, "only a loaded model can be reloaded; this one is " +
                                                   std::string(model_state_name(found->state)));
    std::shared_ptr<Entry> entry = entries_.at(found->model.key);
    if (!entry->reloading) {
      drop_unleased_locked(*entry);
      if (entry->generations.size() + 1 > config_.max_generations) {
        refusals_["generations"]++;
        return make_error(StatusCode::kLimitExceeded,
                          std::to_string(entry->generations.size()) +
                              " generations of the model are live, its limit (--max-generations " +
                              std::to_string(config_.max_generations) +
                              "); readers still hold older ones");
      }
      entry->reloading = true;
      entry->reload_error.reset();
      entry->reload_note.clear();
      uint64_t generation = entry->generation;
      jobs_.push_back(
          [this, entry, generation, force] { load_job(entry, generation, true, force); });
      jobs_cv_.notify_one();
    }
    s = snapshot(*entry);
  }
  log::info("reloading " + printable_text(s.key));
  return s;
}

}  // namespace companion::server
