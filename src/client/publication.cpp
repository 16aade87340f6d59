// Publication: claim → declare (the server's slab mapped writable here) → fill → commit (write
// access dropped in place, then the server digests and seals) or abort.
#include "client/publication.hpp"

#include <sys/stat.h>

#include "client/mapped_model_impl.hpp"
#include "memory/cuda_driver.hpp"

namespace companion::client {
namespace {

// A large slab takes a while to allocate on the server, and a commit digests every byte.
constexpr int kDeclareMs = 300000;
// One PublishDeclare holds at most this many tensors and this many bytes of them, estimated a
// little above their FlatBuffer size (well inside the 64 MiB frame).
constexpr size_t kTensorsPerPart = 100'000;
constexpr size_t kBytesPerPart = 32u << 20;

// Where each part of a declaration ends (the last: the table's size; one part when it fits).
std::vector<size_t> declaration_parts(std::span<const TensorDecl> table) {
  std::vector<size_t> ends;
  size_t count = 0;
  size_t bytes = 0;
  for (size_t i = 0; i < table.size(); ++i) {
    size_t size = table[i].name.size() + table[i].alias_of.size() + 8 * table[i].shape.size() + 64;
    if (count > 0 && (count == kTensorsPerPart || bytes + size > kBytesPerPart)) {
      ends.push_back(i);
      count = 0;
      bytes = 0;
    }
    ++count;
    bytes += size;
  }
  ends.push_back(table.size());
  return ends;
}
constexpr int kCommitMs = 600000;
constexpr int kAbortMs = 5000;

class PublicationImpl final : public Publication {
 public:
  PublicationImpl(std::shared_ptr<Connection> connection, int ordinal, std::string key,
                  uint64_t next_generation)
      : connection_(std::move(connection)),
        ordinal_(ordinal),
        key_(std::move(key)),
        generation_(next_generation) {}

  ~PublicationImpl() override { abort(); }

  const std::string& key() const noexcept override { return key_; }
  uint64_t generation() const noexcept override { return generation_; }

  Result<void> declare(std::span<const TensorDecl> table) override {
    if (!connection_)
      return make_error(StatusCode::kInvalidArgument,
                        "the publication of '" + key_ + "' is over (committed or aborted)");
    if (declared_)
      return make_error(StatusCode::kInvalidArgument, "the table of '" + key_ + "' is declared");
    // A table larger than one frame holds goes in parts; the server declares it at the last.
    std::vector<size_t> ends = declaration_parts(table);
    size_t begin = 0;
    Result<protocol::Message> reply = Error{};
    std::vector<UniqueFd> fds;
    for (size_t end : ends) {
      protocol::PublishDeclare request;
      request.key = key_;
      request.more = end != table.size();
      request.tensors.reserve(end - begin);
      for (const auto& t : table.subspan(begin, end - begin))
        request.tensors.push_back(protocol::TensorDeclInfo{t.name, t.dtype, t.shape, t.alias_of});
      begin = end;
      reply = connection_->call(std::move(request), kDeclareMs, &fds);
      if (!reply.ok() || end == table.size()) break;
      if (!std::holds_alternative<protocol::Done>(reply->body))
        return make_error(StatusCode::kProtocolError,
                          "the server did not take a part of the table of '" + key_ + "'");
    }
    if (!reply.ok()) return std::move(reply).error();
    auto* params = std::get_if<protocol::Parameters>(&reply->body);
    if (params == nullptr || !params->writable)
      return make_error(StatusCode::kProtocolError,
                        "the server did not answer with a writable slab");
    generation_ = params->model.generation;
    COMPANION_ASSIGN_OR_RETURN(table_, map_table(*params, fds));
    COMPANION_ASSIGN_OR_RETURN(
        segments_, import_segments(*params, fds, ordinal_, memory::Access::kReadWrite, &inodes_));
    views_.resize(table_ ? table_->size() : params->tensors.size());
    for_each_tensor(*params, table_.get(), [&](size_t i, const protocol::TensorRef& t) {
      const auto& seg = segments_[t.segment];
      WritableTensor& v = views_[i];
      v.name = t.name;
      v.dtype = t.dtype;
      v.shape = t.shape;
      v.strides = t.strides;
      v.data = static_cast<char*>(const_cast<void*>(seg->address())) + t.offset;
      v.nbytes = t.nbytes;
      v.on_device = seg->on_device();
      v.device_ordinal = seg->on_device() ? ordinal_ : -1;
      v.segment = t.segment;
      v.offset = t.offset;
    });
    if (!table_)
      name_slots_ = build_name_index(views_.size(), [&](size_t k) { return views_[k].name; });
    params_ = std::move(*params);  // owns the payload inline views point into
    declared_ = true;
    return ok_result();
  }

  std::span<const WritableTensor> tensors() const noexcept override { return views_; }

  const WritableTensor* find(std::string_view name) const noexcept override {
    size_t i = table_ ? table_->view().find(name)
                      : find_in_index(name_slots_, name, [&](size_t k) { return views_[k].name; });
    return i < views_.size() ? &views_[i] : nullptr;
  }

  Result<std::shared_ptr<MappedModel>> commit() override {
    if (!connection_)
      return make_error(StatusCode::kInvalidArgument,
                        "the publication of '" + key_ + "' is over (committed or aborted)");
    if (!declared_)
      return make_error(StatusCode::kInvalidArgument,
                        "'" + key_ + "' has no table: declare it before committing");
    // Device writes of this process must have landed before write access goes.
    bool on_device = false;
    for (const auto& s : segments_) on_device = on_device || s->on_device();
    if (on_device) COMPANION_TRY(memory::cuda::synchronize_device(ordinal_));
    for (auto& s : segments_) COMPANION_TRY(s->make_read_only());
    auto reply = connection_->call(protocol::PublishCommit{key_}, kCommitMs);
    if (!reply.ok()) return std::move(reply).error();
    auto* committed = std::get_if<protocol::PublishCommitted>(&reply->body);
    if (committed == nullptr)
      return make_error(StatusCode::kProtocolError,
                        std::string("unexpected reply ") + protocol::body_name(reply->body));
    // The same mapping, read-only now, becomes a mapped model holding a lease of the generation.
    auto impl = std::make_unique<MappedModel::Impl>();
    impl->connection = connection_;
    impl->lease_id = committed->lease_id;
    impl->status = committed->model;
    impl->params = std::move(params_);
    impl->table = std::move(table_);
    impl->name_slots = std::move(name_slots_);
    impl->segments = std::move(segments_);
    impl->inodes = std::move(inodes_);
    impl->views.reserve(views_.size());
    for (const auto& w : views_) impl->views.push_back(read_only_view(w));
    generation_ = committed->model.generation;
    views_.clear();
    connection_.reset();  // the model holds it now
    return std::make_shared<MappedModel>(std::move(impl));
  }

  void abort() override {
    if (!connection_) return;
    // Mappings first: the server frees the slab once the key is given up.
    views_.clear();
    name_slots_.clear();
    table_.reset();
    segments_.clear();
    (void)connection_->call(protocol::PublishAbort{key_}, kAbortMs);
    connection_.reset();  // closing it gives the key up even if the abort was not answered
  }

 private:
  std::shared_ptr<Connection> connection_;
  int ordinal_ = -1;
  std::string key_;
  uint64_t generation_ = 0;
  bool declared_ = false;
  protocol::Parameters params_;
  std::vector<std::unique_ptr<memory::MappedSegment>> segments_;
  std::shared_ptr<const protocol::SharedTensorTable> table_;  // 1.2: names and shapes live here
  std::vector<WritableTensor> views_;
  std::vector<uint32_t> name_slots_;  // inline tables only
  std::vector<uint64_t> inodes_;
};

}  // namespace

TensorView read_only_view(const WritableTensor& w) {
  TensorView v;
  v.name = w.name;
  v.dtype = w.dtype;
  v.shape = w.shape;
  v.strides = w.strides;
  v.data = w.data;
  v.nbytes = w.nbytes;
  v.on_device = w.on_device;
  v.device_ordinal = w.device_ordinal;
  v.segment = w.segment;
  v.offset = w.offset;
  return v;
}

Result<void> require_publishing(const ServerIdentity& server, uint16_t server_minor) {
  if (server_minor >= 1) return ok_result();
  return make_error(StatusCode::kVersionMismatch,
                    "the companion server " + server.instance_id + " (version " + server.version +
                        ", protocol 1." + std::to_string(server_minor) +
                        ") predates publishing (protocol 1.1)");
}

Result<std::unique_ptr<Publication>> claim_publication(std::shared_ptr<Connection> connection,
                                                       int ordinal, const std::string& key,
                                                       const Fingerprint& fingerprint,
                                                       ClaimMode mode, int timeout_ms) {
  COMPANION_TRY(require_publishing(connection->server(), connection->server_minor()));
  COMPANION_TRY(protocol::validate_publish_key(key));
  COMPANION_TRY(protocol::validate_fingerprint(fingerprint));
  protocol::PublishClaim request{key, fingerprint, static_cast<protocol::ClaimMode>(mode)};
  auto reply = connection->call(std::move(request), timeout_ms);
  if (!reply.ok()) return std::move(reply).error();
  auto* claimed = std::get_if<protocol::PublishClaimed>(&reply->body);
  if (claimed == nullptr)
    return make_error(StatusCode::kProtocolError,
                      std::string("unexpected reply ") + protocol::body_name(reply->body));
  if (!claimed->claimed) return std::unique_ptr<Publication>();
  uint64_t next =
      claimed->model.generations.empty() ? 1 : claimed->model.generations.back().number + 1;
  return std::unique_ptr<Publication>(
      std::make_unique<PublicationImpl>(std::move(connection), ordinal, key, next));
}

}  // namespace companion::client
