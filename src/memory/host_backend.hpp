// Host backend: slabs in sealed memfds. Needs no GPU: used on machines without one and in tests.
#pragma once

#include <memory>

#include "memory/backend.hpp"

namespace companion::memory {

std::unique_ptr<Backend> make_host_backend();

// Maps a sealed memfd read-only (the client half of the host backend), or, with
// Access::kReadWrite, an unsealed one read-write (the writer of a published slab).
Result<std::unique_ptr<MappedSegment>> import_host_segment(UniqueFd fd, uint64_t size,
                                                           Access access = Access::kReadOnly);

}  // namespace companion::memory
