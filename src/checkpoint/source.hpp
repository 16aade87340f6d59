// Model sources: resolving what a client names (a path or a Hugging Face id) to a local path.
// Nothing is ever downloaded.
#pragma once

#include <string>
#include <vector>

#include "companion/result.hpp"
#include "companion/types.hpp"

namespace companion::checkpoint {

// The Hugging Face hub cache: $HF_HUB_CACHE, else $HF_HOME/hub, else ~/.cache/huggingface/hub.
std::string hf_hub_cache_dir();

// True for "org/name" (one slash, [A-Za-z0-9._-] parts, no "..", not starting with '/' or '.').
bool looks_like_hf_id(const std::string& source);

struct ResolvedSource {
  std::string path;       // canonical real path of the directory or file to open
  std::string hf_repo;    // "org/name" when it came from the HF cache
  std::string hf_commit;  // the snapshot's commit hash
};

// Absolute paths are taken as they are (canonicalised). HF ids resolve in `hf_cache`:
// models--org--name/refs/<revision or main> gives a commit, snapshots/<commit> the directory; a
// revision that is itself a snapshot name is used directly. Relative paths are refused
// (kInvalidArgument): the server's working directory means nothing to a client.
Result<ResolvedSource> resolve_source(const ModelSpec& spec, const std::string& hf_cache);
// The same for a server that reads only under `roots` (canonical): an absolute path outside every
// root is kNotPermitted whether or not it exists (real_path_under_roots), so that the answer says
// nothing about files the caller may not read.
Result<ResolvedSource> resolve_source(const ModelSpec& spec, const std::string& hf_cache,
                                      const std::vector<std::string>& roots);

// realpath(3): absolute, symlinks resolved. Missing -> kNotFound naming the path, EACCES ->
// kNotPermitted, anything else kIoError.
Result<std::string> real_path(const std::string& path);

// Canonicalises roots (realpath); missing roots are dropped with no error.
std::vector<std::string> canonical_roots(const std::vector<std::string>& roots);
// True if canonical `real_path` equals a root or lies below one.
bool is_under_roots(const std::string& real_path, const std::vector<std::string>& roots);

}  // namespace companion::checkpoint
