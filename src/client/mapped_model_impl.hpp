// Internals of MappedModel, shared by the client and the C ABI.
#pragma once

#include <memory>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "client/connection.hpp"
#include "companion/client.hpp"
#include "memory/backend.hpp"
#include "protocol/messages.hpp"

namespace companion {

struct MappedModel::Impl {
  std::shared_ptr<client::Connection> connection;  // releases the lease on destruction
  uint64_t lease_id = 0;
  ModelStatus status;
  protocol::Parameters params;  // keeps names and shapes alive
  std::vector<std::unique_ptr<memory::MappedSegment>> segments;
  std::vector<TensorView> views;
  std::unordered_map<std::string_view, size_t> by_name;
  std::vector<uint64_t> inodes;
};

namespace client {
// Maps each segment of a Parameters reply (descriptors in fds, taken) with the given access;
// the memfd inodes go to *inodes.
Result<std::vector<std::unique_ptr<memory::MappedSegment>>> import_segments(
    const protocol::Parameters& params, std::vector<UniqueFd>& fds, int ordinal,
    memory::Access access, std::vector<uint64_t>* inodes);
// Maps a Parameters reply's segments (descriptors in fds) and builds the tensor views.
Result<std::shared_ptr<MappedModel>> map_parameters(std::shared_ptr<Connection> connection,
                                                    protocol::Parameters params,
                                                    std::vector<UniqueFd> fds, int ordinal);
}  // namespace client

}  // namespace companion
