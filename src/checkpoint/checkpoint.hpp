// Safetensors checkpoints: reading and validating headers, single files and sharded layouts.
#pragma once

#include <atomic>
#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "checkpoint/open_beneath.hpp"
#include "companion/result.hpp"
#include "companion/types.hpp"
#include "protocol/limits.hpp"

namespace companion::checkpoint {

// The reference implementation's cap on the JSON header.
inline constexpr uint64_t kMaxHeaderBytes = 100ull << 20;
// DeepSeek-V3, among the most sharded public checkpoints, has 163 files.
inline constexpr size_t kDefaultMaxCheckpointFiles = 4096;

// What one checkpoint may cost before it is parsed in full. Each is checked before the work it
// bounds (the header length before reading the header, the tensor count before building it);
// each refusal is kLimitExceeded naming the `companion serve` flag that sets it.
struct CheckpointLimits {
  // --max-header-bytes: a header's JSON; at most kMaxHeaderBytes, the format's own cap.
  uint64_t max_header_bytes = kMaxHeaderBytes;
  // --max-tensors: tensors of all the checkpoint's files together.
  size_t max_tensors = protocol::kMaxTableTensors;
  // --max-checkpoint-files: .safetensors files (each is held open while the model loads).
  size_t max_files = kDefaultMaxCheckpointFiles;
};

// kInvalidArgument naming the flag when a limit is 0 or above what the format or the protocol
// allows (kMaxHeaderBytes, protocol::kMaxTableTensors).
Result<void> check_limits(const CheckpointLimits& limits);

// Refusals of checkpoint files since the process started, by reason (for the server to report).
struct RefusalCounts {
  uint64_t outside_roots = 0;  // a path or symlink leading outside every model root
  uint64_t not_regular = 0;    // a FIFO, device, socket... where a file was expected
  uint64_t header_bytes = 0;   // CheckpointLimits::max_header_bytes
  uint64_t tensors = 0;        // CheckpointLimits::max_tensors
  uint64_t files = 0;          // CheckpointLimits::max_files
};
enum class Refusal { kOutsideRoots, kNotRegular, kHeaderBytes, kTensors, kFiles };
void count_refusal(Refusal kind);
RefusalCounts refusal_counts();
// A checkpoint's tensors must fit the wire (and shard rules name dims below it).
inline constexpr size_t kMaxRank = protocol::kMaxRank;
inline constexpr size_t kMaxTensorNameBytes = 4096;

struct TensorEntry {
  std::string name;
  DType dtype = DType::kU8;
  std::vector<int64_t> shape;
  uint32_t file_index = 0;   // index into Checkpoint::files (0 for a single file)
  uint64_t file_offset = 0;  // absolute byte offset in that file (8 + header length + begin)
  uint64_t nbytes = 0;
};

struct SafetensorsFile {
  std::string path;
  uint64_t file_size = 0;
  uint64_t data_start = 0;                      // 8 + header length
  std::map<std::string, std::string> metadata;  // "__metadata__"
  std::vector<TensorEntry> tensors;             // in data-offset order
};

// Validates a header's JSON against a data section of data_bytes bytes. Pure: no I/O.
// Every failure is kBadCheckpoint, except an unknown dtype string: kUnknownDtype.
Result<SafetensorsFile> parse_safetensors_header(std::string_view header_json, uint64_t data_bytes);
// Validates the header of an open .safetensors file (length cap, tensor count, JSON shape, dtypes,
// sizes, ranges inside the file and not overlapping), read from its descriptor. At most
// `max_tensors` tensors (the count is checked before the header is parsed into values).
Result<SafetensorsFile> read_safetensors_header(const OpenedFile& file,
                                                const CheckpointLimits& limits, size_t max_tensors);
// The same read ahead of time, for parsing several files' headers at once: `shared_count` counts
// the tensors of all of them against limits.max_tensors (give up past it), and nothing is
// reported: nullopt for any failure or refusal (nor is it counted), and the caller reads that
// header again with read_safetensors_header when it comes to it.
std::optional<SafetensorsFile> try_read_safetensors_header(const OpenedFile& file,
                                                           const CheckpointLimits& limits,
                                                           std::atomic<size_t>& shared_count);
// Opens `path` (without blocking) and reads its header with the default limits (tests, tools).
Result<SafetensorsFile> read_safetensors_file(const std::string& path);

struct Checkpoint {
  std::string location;            // the directory or file it was opened from
  std::string directory;           // where its files are: location, or a single file's parent
  std::vector<std::string> files;  // absolute paths of the .safetensors files, as found
  // The same files, opened once beneath the roots: their bytes are read through these, never by
  // path, so what was checked is what is read.
  std::vector<SharedFd> fds;
  std::vector<TensorEntry> tensors;  // all tensors of all files, names unique
  uint64_t total_bytes = 0;
};

// Opens a checkpoint at `path`: a .safetensors file, or a directory holding either
// model.safetensors.index.json (sharded; weight_map names files in the same directory) or
// .safetensors files. Every file is opened once, beneath one of `allowed_roots` (already
// canonical; see open_under_roots), without blocking; anything but a regular file where a file is
// expected is kBadCheckpoint. A path outside every root is kNotPermitted whether or not it exists;
// a path inside one that does not exist is kNotFound.
Result<Checkpoint> open_checkpoint(const std::string& path,
                                   const std::vector<std::string>& allowed_roots,
                                   const CheckpointLimits& limits = {});

// A small file of the checkpoint's directory (config.json), opened beneath the roots like its
// weights and read from that descriptor: nullopt when there is none, kBadCheckpoint when it is not
// a regular file of at most `max_bytes`.
Result<std::optional<std::string>> read_checkpoint_side_file(
    const Checkpoint& checkpoint, const std::string& name,
    const std::vector<std::string>& allowed_roots, uint64_t max_bytes);

}  // namespace companion::checkpoint
