// Opening files beneath the model roots: once, as descriptors, never blocking and never following
// a symlink out of the roots. What is checked is the descriptor that is then read, so swapping a
// path component after the check changes nothing.
#pragma once

#include <sys/stat.h>

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "common/unique_fd.hpp"
#include "companion/result.hpp"

namespace companion::checkpoint {

// An open file shared by the checkpoint and the loader that reads it.
using SharedFd = std::shared_ptr<const UniqueFd>;

struct OpenedFile {
  std::string path;  // as named by the caller, for messages
  UniqueFd fd;       // O_RDONLY | O_NONBLOCK | O_CLOEXEC | O_NOCTTY
  struct stat st {};
};

// Opens absolute `path` for reading, resolved beneath the canonical root that holds it (openat2
// with RESOLVE_BENEATH: symlinks that stay beneath, such as Hugging Face snapshots pointing into
// ../../blobs, are followed). A symlink into another root, or a kernel without openat2, falls back
// to opening the file as an O_PATH descriptor, checking where that descriptor really is, then
// reopening that very descriptor. The result may be a file of any type (the caller checks
// `st`); opening never blocks (a FIFO opens at once).
// Errors: outside every root -> kNotPermitted, whether or not the path exists; missing (inside a
// root) -> kNotFound; a socket -> kBadCheckpoint; EACCES -> kNotPermitted; else kIoError.
Result<OpenedFile> open_under_roots(const std::string& path, const std::vector<std::string>& roots);

// The canonical real path of absolute `path` if it lies under one of `roots`. A path outside every
// root is kNotPermitted whether or not it exists, so that the answer tells an outsider nothing
// about the file system; kNotFound only for a path inside a root.
Result<std::string> real_path_under_roots(const std::string& path,
                                          const std::vector<std::string>& roots);

// Reads the whole of a regular file of at most `max_bytes` from its descriptor. Anything else
// (a FIFO, a device, a directory) or a larger file is kBadCheckpoint naming `path`.
Result<std::string> read_opened_file(const OpenedFile& file, uint64_t max_bytes);

// Tests: false makes every open take the fallback path, as on kernels without openat2.
void use_openat2_for_testing(bool enabled);

// Where descriptor `fd` really is (readlink of /proc/self/fd/N); "" when that cannot be told.
std::string descriptor_path(int fd);

}  // namespace companion::checkpoint
