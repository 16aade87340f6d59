// MappedModel: the segments of one lease mapped into this process, with per-tensor views.
#include <sys/stat.h>

#include <algorithm>
#include <bit>

#include "client/mapped_model_impl.hpp"

namespace companion {

MappedModel::MappedModel(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}

MappedModel::~MappedModel() {
  if (!impl_) return;
  // Views die first, then mappings, then the lease (the server may free the memory after it).
  impl_->views.clear();
  impl_->table.reset();
  impl_->segments.clear();
  // Not waiting for the reply: a release never waits behind anything (Python's __del__ included).
  // The server handles the connection's requests in order, so the client's next request sees
  // the lease gone. A dead connection has no lease to release.
  if (impl_->connection) (void)impl_->connection->send(protocol::Release{impl_->lease_id});
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
  const auto& views = impl_->views;
  size_t i = impl_->table ? impl_->table->view().find(name)
                          : client::find_in_index(impl_->name_slots, name,
                                                  [&](size_t k) { return views[k].name; });
  return i < views.size() ? &views[i] : nullptr;
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

Result<std::shared_ptr<const protocol::SharedTensorTable>> map_table(
    const protocol::Parameters& params, std::vector<UniqueFd>& fds) {
  if (params.table_fd_index < 0) return std::shared_ptr<const protocol::SharedTensorTable>();
  auto index = static_cast<size_t>(params.table_fd_index);
  if (index >= fds.size() || !fds[index].valid())
    return make_error(StatusCode::kProtocolError, "tensor table descriptor missing");
  std::vector<uint64_t> sizes(params.segments.size());
  for (size_t i = 0; i < sizes.size(); ++i) sizes[i] = params.segments[i].size;
  return protocol::SharedTensorTable::map(std::move(fds[index]), params.table_bytes, sizes);
}

std::vector<uint32_t> build_name_index(size_t count,
                                       const std::function<std::string_view(size_t)>& name_of) {
  std::vector<uint32_t> slots(count == 0 ? 0 : std::bit_ceil(2 * count), 0);
  const size_t mask = slots.empty() ? 0 : slots.size() - 1;
  for (size_t i = 0; i < count; ++i) {
    std::string_view name = name_of(i);
    size_t slot = static_cast<size_t>(protocol::table_name_hash(name)) & mask;
    bool taken = false;  // a repeated name: the first keeps it
    while (slots[slot] != 0 && !taken) {
      taken = name_of(slots[slot] - 1) == name;
      if (!taken) slot = (slot + 1) & mask;
    }
    if (!taken) slots[slot] = static_cast<uint32_t>(i + 1);
  }
  return slots;
}

size_t find_in_index(const std::vector<uint32_t>& slots, std::string_view name,
                     const std::function<std::string_view(size_t)>& name_of) noexcept {
  if (slots.empty()) return protocol::TensorTableView::npos;
  const size_t mask = slots.size() - 1;
  for (size_t slot = static_cast<size_t>(protocol::table_name_hash(name)) & mask;;
       slot = (slot + 1) & mask) {
    if (slots[slot] == 0) return protocol::TensorTableView::npos;
    if (name_of(slots[slot] - 1) == name) return slots[slot] - 1;
  }
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
  auto table = map_table(params, fds);
  if (!table.ok()) return fail(table.error());
  impl->table = std::move(*table);
  auto segments = import_segments(params, fds, ordinal, memory::Access::kReadOnly, &impl->inodes);
  if (!segments.ok()) return fail(segments.error());
  impl->segments = std::move(*segments);
  std::vector<const char*> bases;
  std::vector<bool> on_device;
  for (const auto& s : impl->segments) {
    bases.push_back(static_cast<const char*>(s->address()));
    on_device.push_back(s->on_device());
  }
  impl->views.resize(impl->table ? impl->table->size() : params.tensors.size());
  for_each_tensor(params, impl->table.get(), [&](size_t i, const protocol::TensorRef& t) {
    TensorView& v = impl->views[i];
    v.name = t.name;
    v.dtype = t.dtype;
    v.shape = t.shape;
    v.strides = t.strides;
    v.data = bases[t.segment] + t.offset;
    v.nbytes = t.nbytes;
    v.on_device = on_device[t.segment];
    v.device_ordinal = v.on_device ? ordinal : -1;
    v.segment = t.segment;
    v.offset = t.offset;
  });
  if (!impl->table) {
    const auto& views = impl->views;
    impl->name_slots = build_name_index(views.size(), [&](size_t k) { return views[k].name; });
  }
  impl->params = std::move(params);  // owns the payload inline views point into
  return std::make_shared<MappedModel>(std::move(impl));
}

}  // namespace client
}  // namespace companion
