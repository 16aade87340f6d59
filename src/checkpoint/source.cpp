// Resolving model sources to local paths: absolute paths and the Hugging Face hub cache.
#include "checkpoint/source.hpp"

#include <fcntl.h>
#include <pwd.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>
#include <string>
#include <vector>

#include "checkpoint/open_beneath.hpp"
#include "common/util.hpp"

namespace companion::checkpoint {
namespace {

std::string env_or_empty(const char* name) {
  const char* value = std::getenv(name);
  return value ? value : "";
}

std::string home_dir() {
  std::string home = env_or_empty("HOME");
  if (!home.empty()) return home;
  // Services started without HOME still have a passwd entry.
  std::vector<char> buf(16384);
  struct passwd pw {};
  struct passwd* found = nullptr;
  if (::getpwuid_r(::getuid(), &pw, buf.data(), buf.size(), &found) == 0 && found && found->pw_dir)
    return found->pw_dir;
  return "/";
}

bool is_directory(const std::string& path) {
  struct stat st {};
  return ::stat(path.c_str(), &st) == 0 && S_ISDIR(st.st_mode);
}

std::string trim(const std::string& s) {
  const char* space = " \t\r\n\v\f";
  size_t begin = s.find_first_not_of(space);
  if (begin == std::string::npos) return "";
  size_t end = s.find_last_not_of(space);
  return s.substr(begin, end - begin + 1);
}

bool is_id_char(char c) {
  return (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '.' ||
         c == '_' || c == '-';
}

// One half of "org/name". "--" is refused because the cache joins the halves with it.
bool is_id_part(const std::string& part) {
  if (part.empty() || part.size() > 96) return false;
  for (char c : part)
    if (!is_id_char(c)) return false;
  if (part.front() == '.' || part.front() == '-' || part.back() == '.' || part.back() == '-')
    return false;
  return part.find("..") == std::string::npos && part.find("--") == std::string::npos;
}

Result<void> check_revision(const std::string& revision) {
  if (revision.find("..") != std::string::npos || revision.front() == '/' ||
      revision.find('\0') != std::string::npos)
    return make_error(StatusCode::kInvalidArgument,
                      "revision \"" + revision + "\" may not start with '/' or contain \"..\"");
  return ok_result();
}

Result<ResolvedSource> resolve_hf_id(const std::string& repo, const std::string& requested_revision,
                                     const std::string& hf_cache) {
  std::string revision = requested_revision.empty() ? "main" : requested_revision;
  COMPANION_TRY(check_revision(revision));
  size_t slash = repo.find('/');
  std::string repo_dir =
      hf_cache + "/models--" + repo.substr(0, slash) + "--" + repo.substr(slash + 1);
  auto not_cached = [&]() {
    return make_error(StatusCode::kNotFound,
                      repo + "@" + revision + " is not in the local Hugging Face cache at " +
                          repo_dir + "; the server never downloads: fetch it first (e.g. " +
                          "`huggingface-cli download " + repo + " --revision " + revision + "`)");
  };

  std::string commit;
  std::string ref_path = repo_dir + "/refs/" + revision;
  // Opened without blocking and checked on the descriptor: a FIFO planted as a ref must not stall
  // the caller, nor one swapped in after a check by path.
  OpenedFile ref_file;
  ref_file.path = ref_path;
  // A ref is a plain file written by the hub client, never a link: a symlink planted as a ref
  // would make the server read (and quote) a file of someone else's choosing.
  ref_file.fd.reset(
      ::open(ref_path.c_str(), O_RDONLY | O_NONBLOCK | O_CLOEXEC | O_NOCTTY | O_NOFOLLOW));
  if (ref_file.fd && ::fstat(ref_file.fd.get(), &ref_file.st) == 0 &&
      S_ISREG(ref_file.st.st_mode)) {
    COMPANION_ASSIGN_OR_RETURN(std::string ref, read_opened_file(ref_file, 4096));
    commit = trim(ref);
    // A commit hash is a short run of letters and digits; what else the file holds is not
    // repeated back (it could be anything the file's writer chose).
    bool plain = !commit.empty() && commit.size() <= 128;
    for (char c : commit)
      plain = plain && ((c >= '0' && c <= '9') || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z'));
    if (!plain)
      return make_error(StatusCode::kBadCheckpoint, ref_path + " does not hold a commit hash");
    if (!is_directory(repo_dir + "/snapshots/" + commit)) return not_cached();
  } else if (is_directory(repo_dir + "/snapshots/" + revision)) {
    commit = revision;
  } else {
    return not_cached();
  }

  ResolvedSource resolved;
  COMPANION_ASSIGN_OR_RETURN(resolved.path, real_path(repo_dir + "/snapshots/" + commit));
  resolved.hf_repo = repo;
  resolved.hf_commit = commit;
  return resolved;
}

bool ends_with_dotdot(const std::string& path) {
  return path.size() >= 3 && path.compare(path.size() - 3, 3, "/..") == 0;
}

}  // namespace

Result<std::string> real_path(const std::string& path) {
  char* resolved = ::realpath(path.c_str(), nullptr);
  if (resolved == nullptr) {
    int err = errno;
    if (err == ENOENT || err == ENOTDIR)
      return make_error(StatusCode::kNotFound, path + " does not exist");
    if (err == EACCES) return errno_error(StatusCode::kNotPermitted, "resolve " + path, err);
    return errno_error(StatusCode::kIoError, "resolve " + path, err);
  }
  std::string out(resolved);
  std::free(resolved);
  return out;
}

std::string hf_hub_cache_dir() {
  std::string hub_cache = env_or_empty("HF_HUB_CACHE");
  if (!hub_cache.empty()) return hub_cache;
  std::string hf_home = env_or_empty("HF_HOME");
  if (!hf_home.empty()) return hf_home + "/hub";
  return home_dir() + "/.cache/huggingface/hub";
}

bool looks_like_hf_id(const std::string& source) {
  size_t slash = source.find('/');
  if (slash == std::string::npos || source.find('/', slash + 1) != std::string::npos) return false;
  return is_id_part(source.substr(0, slash)) && is_id_part(source.substr(slash + 1));
}

Result<ResolvedSource> resolve_source(const ModelSpec& spec, const std::string& hf_cache) {
  const std::string& source = spec.source;
  if (!source.empty() && source[0] == '/') {
    // A revision only means something for hub ids; a path is what it is.
    ResolvedSource resolved;
    COMPANION_ASSIGN_OR_RETURN(resolved.path, real_path(source));
    return resolved;
  }
  if (looks_like_hf_id(source))
    return resolve_hf_id(source, spec.revision, hf_cache.empty() ? hf_hub_cache_dir() : hf_cache);
  return make_error(StatusCode::kInvalidArgument,
                    "model source \"" + source +
                        "\" is neither an absolute path nor a Hugging Face id (org/name); relative "
                        "paths are refused because the server's working directory is not yours");
}

Result<ResolvedSource> resolve_source(const ModelSpec& spec, const std::string& hf_cache,
                                      const std::vector<std::string>& roots) {
  if (!spec.source.empty() && spec.source[0] == '/') {
    ResolvedSource resolved;
    COMPANION_ASSIGN_OR_RETURN(resolved.path, real_path_under_roots(spec.source, roots));
    return resolved;
  }
  return resolve_source(spec, hf_cache);
}

std::vector<std::string> canonical_roots(const std::vector<std::string>& roots) {
  std::vector<std::string> out;
  for (const std::string& root : roots) {
    auto real = real_path(root);
    if (!real.ok()) continue;
    bool seen = false;
    for (const std::string& r : out) seen = seen || r == real.value();
    if (!seen) out.push_back(std::move(real).value());
  }
  return out;
}

bool is_under_roots(const std::string& real_path, const std::vector<std::string>& roots) {
  // Canonical paths have no ".." components; one that does could climb out of any root.
  if (real_path.empty() || real_path[0] != '/' || real_path.find("/../") != std::string::npos ||
      ends_with_dotdot(real_path))
    return false;
  for (std::string root : roots) {
    while (root.size() > 1 && root.back() == '/') root.pop_back();
    if (root.empty()) continue;
    if (root == "/") {
      if (!real_path.empty() && real_path[0] == '/') return true;
      continue;
    }
    // Whole components only: "/a/bc" is not under "/a/b".
    if (real_path.compare(0, root.size(), root) == 0 &&
        (real_path.size() == root.size() || real_path[root.size()] == '/'))
      return true;
  }
  return false;
}

}  // namespace companion::checkpoint
