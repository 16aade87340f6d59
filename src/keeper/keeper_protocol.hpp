// The messages between a server and its keeper (keeper.fbs) as plain C++ values, and the catalog
// entry of a kept generation. Nothing here knows the memory backends: descriptors travel beside
// the messages (protocol/frame.hpp), and segment kinds are the shared vocabulary of
// common/segment_kind.hpp.
#pragma once

#include <cstdint>
#include <string>
#include <variant>
#include <vector>

#include "common/segment_kind.hpp"
#include "companion/result.hpp"
#include "companion/types.hpp"

namespace companion::keeper {

struct Hello {
  int64_t pid = 0;
  int64_t keep_for_ms = 0;
  bool release_all = false;  // free everything and exit (serve --no-keep)
};
struct HelloReply {
  int64_t keeper_pid = 0;
  uint32_t kept = 0;         // generations held
  uint32_t descriptors = 0;  // descriptors held for them
  std::string error;         // empty: the session is open
};
// Keep (server → keeper) and Kept (keeper → server): one generation, its descriptors (segments in
// order, then the table) beside the message.
struct Keep {
  uint64_t id = 0;
  std::vector<uint8_t> catalog;
};
struct Forget {
  uint64_t id = 0;
};
struct List {};
struct Kept {
  uint64_t id = 0;
  std::vector<uint8_t> catalog;
};
struct ListEnd {
  uint32_t count = 0;
};
using Message = std::variant<Hello, HelloReply, Keep, Forget, List, Kept, ListEnd>;

Result<std::vector<uint8_t>> encode(const Message& message);
// Verified: anything malformed is kProtocolError.
Result<Message> decode(const std::vector<uint8_t>& payload);

// What a server needs to serve a kept generation again without reading anything.
struct CatalogEntry {
  std::string store_key;
  bool published = false;
  std::string publish_key;
  ModelSpec spec;  // loaded models
  std::string source_path;
  std::string hf_repo;
  std::string hf_commit;
  uint64_t number = 0;
  Fingerprint fingerprint;
  std::vector<uint64_t> digests;  // wsum64 per segment
  std::string files;
  int64_t created_at_ms = 0;
  memory::SegmentKind segment_kind = memory::SegmentKind::kHostMemfd;
  std::vector<uint64_t> segment_sizes;
  uint64_t table_bytes = 0;
};
std::vector<uint8_t> encode_catalog(const CatalogEntry& entry);
// Verified and bounded (protocol/limits.hpp); kProtocolError otherwise.
Result<CatalogEntry> decode_catalog(const std::vector<uint8_t>& bytes);

}  // namespace companion::keeper
