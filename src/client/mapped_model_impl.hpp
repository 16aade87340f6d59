// Internals of MappedModel, shared by the client and the C ABI.
#pragma once

#include <functional>
#include <memory>
#include <string_view>
#include <vector>

#include "client/connection.hpp"
#include "companion/client.hpp"
#include "memory/backend.hpp"
#include "protocol/messages.hpp"
#include "protocol/tensor_table.hpp"

namespace companion {

struct MappedModel::Impl {
  std::shared_ptr<client::Connection> connection;  // releases the lease on destruction
  uint64_t lease_id = 0;
  ModelStatus status;
  protocol::Parameters params;  // keeps inline names and shapes alive (servers before 1.2)
  // The server's table mapped read-only (1.2): views' names and shapes point into it, and its
  // name index serves find().
  std::shared_ptr<const protocol::SharedTensorTable> table;
  std::vector<std::unique_ptr<memory::MappedSegment>> segments;
  std::vector<TensorView> views;
  std::vector<uint32_t> name_slots;  // inline tables only: see build_name_index
  std::vector<uint64_t> inodes;
};

namespace client {
// Maps each segment of a Parameters reply (descriptors in fds, taken) with the given access;
// the memfd inodes go to *inodes.
Result<std::vector<std::unique_ptr<memory::MappedSegment>>> import_segments(
    const protocol::Parameters& params, std::vector<UniqueFd>& fds, int ordinal,
    memory::Access access, std::vector<uint64_t>* inodes);
// Maps the table memfd of a Parameters reply (1.2; its descriptor taken from fds), checking its
// seals and validating every record against the reply's segments. nullptr when the tensors came
// inline.
Result<std::shared_ptr<const protocol::SharedTensorTable>> map_table(
    const protocol::Parameters& params, std::vector<UniqueFd>& fds);
// Calls f(i, tensor) for every tensor of the reply, from the table when there is one.
template <typename F>
void for_each_tensor(const protocol::Parameters& params, const protocol::SharedTensorTable* table,
                     F&& f) {
  if (table != nullptr) {
    const protocol::TensorTableView& view = table->view();
    for (size_t i = 0; i < view.size(); ++i) f(i, view[i]);
  } else {
    for (size_t i = 0; i < params.tensors.size(); ++i) f(i, params.tensors[i]);
  }
}
// An open-addressing index of names (table_name_hash, slots = record index + 1) for tensors that
// came inline, in one allocation; and the lookup in it.
std::vector<uint32_t> build_name_index(size_t count,
                                       const std::function<std::string_view(size_t)>& name_of);
size_t find_in_index(const std::vector<uint32_t>& slots, std::string_view name,
                     const std::function<std::string_view(size_t)>& name_of) noexcept;
// Maps a Parameters reply's segments (descriptors in fds) and builds the tensor views.
Result<std::shared_ptr<MappedModel>> map_parameters(std::shared_ptr<Connection> connection,
                                                    protocol::Parameters params,
                                                    std::vector<UniqueFd> fds, int ordinal);
}  // namespace client

}  // namespace companion
