// MappedModel: the segments of one lease mapped into this process, with per-tensor views.
#include <sys/stat.h>

#include <algorithm>

#include "client/mapped_model_impl.hpp"

namespace companion {

MappedModel::MappedModel(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}

MappedModel::~MappedModel() {
  if (!impl_) return;
  // Views die first, then mappings, then the lease (the server may free the memory after it).
  impl_->views.clear();
  impl_->segments.clear();
  if (impl_->connection) {
    auto released = impl_->connection->call(protocol::Release{impl_->lease_id}, 5000);
    (void)released;  // a dead server has no lease to release
  }
}

const ModelStatus& MappedModel::status() const noexcept {
  return impl_->status;
}
uint64_t MappedModel::lease_id() const noexcept {
  return impl_->lease_id;
}
std::span<const TensorView> MappedModel::tensors() const noexcept {
  return impl_->views;
}
size_t MappedModel::segment_count() const noexcept {
  return impl_->segments.size();
}

const TensorView* MappedModel::find(std::string_view name) const noexcept {
  auto it = impl_->by_name.find(name);
  return it == impl_->by_name.end() ? nullptr : &impl_->views[it->second];
}

uint64_t MappedModel::mapped_bytes() const noexcept {
  uint64_t total = 0;
  for (const auto& s : impl_->segments) total += s->size();
  return total;
}

std::vector<uint64_t> MappedModel::segment_inodes() const {
  return impl_->inodes;
}

bool MappedModel::read_only() const noexcept {
  return std::none_of(impl_->segments.begin(), impl_->segments.end(),
                      [](const auto& s) { return s->writable(); });
}

namespace client {

Result<std::vector<std::unique_ptr<memory::MappedSegment>>> import_segments(
    const protocol::Parameters& params, std::vector<UniqueFd>& fds, int ordinal,
    memory::Access access, std::vector<uint64_t>* inodes) {
  std::vector<std::unique_ptr<memory::MappedSegment>> out;
  for (const auto& seg : params.segments) {
    memory::SegmentExport e;
    e.kind = seg.kind;
    e.size = seg.size;
    e.ipc_handle = seg.ipc_handle;
    if (seg.fd_index >= 0) {
      if (static_cast<size_t>(seg.fd_index) >= fds.size() || !fds[seg.fd_index].valid())
        return make_error(StatusCode::kProtocolError, "segment descriptor missing");
      e.fd = std::move(fds[seg.fd_index]);
      struct stat st {};
      if (inodes != nullptr) inodes->push_back(::fstat(e.fd.get(), &st) == 0 ? st.st_ino : 0);
    }
    COMPANION_ASSIGN_OR_RETURN(
        auto mapped, memory::import_segment(std::move(e), memory::ImportTarget{ordinal}, access));
    out.push_back(std::move(mapped));
  }
  return out;
}

Result<std::shared_ptr<MappedModel>> map_parameters(std::shared_ptr<Connection> connection,
                                                    protocol::Parameters params,
                                                    std::vector<UniqueFd> fds, int ordinal) {
  auto impl = std::make_unique<MappedModel::Impl>();
  impl->connection = connection;  // from here on, failure releases the lease in ~MappedModel
  impl->lease_id = params.lease_id;
  impl->status = params.model;
  auto fail = [&](Error e) -> Result<std::shared_ptr<MappedModel>> {
    MappedModel discard(std::move(impl));
    return e;
  };
  auto segments = import_segments(params, fds, ordinal, memory::Access::kReadOnly, &impl->inodes);
  if (!segments.ok()) return fail(segments.error());
  impl->segments = std::move(*segments);
  impl->views.reserve(params.tensors.size());
  for (const auto& t : params.tensors) {
    const auto& seg = impl->segments[t.segment];
    TensorView v;
    v.name = t.name;
    v.dtype = t.dtype;
    v.shape = t.shape;
    v.strides = t.strides;
    v.data = static_cast<const char*>(seg->address()) + t.offset;
    v.nbytes = t.nbytes;
    v.on_device = seg->on_device();
    v.device_ordinal = seg->on_device() ? ordinal : -1;
    v.segment = t.segment;
    v.offset = t.offset;
    impl->views.push_back(v);
  }
  impl->by_name.reserve(impl->views.size());
  for (size_t i = 0; i < impl->views.size(); ++i) impl->by_name.emplace(impl->views[i].name, i);
  impl->params = std::move(params);  // owns the payload the views point into
  return std::make_shared<MappedModel>(std::move(impl));
}

}  // namespace client
}  // namespace companion
