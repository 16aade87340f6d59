// Opening checkpoints: a single .safetensors file, a sharded directory with an index, or a
// directory of .safetensors files.
#include <dirent.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <climits>
#include <set>
#include <string>
#include <unordered_map>

#include <nlohmann/json.hpp>

#include "checkpoint/checkpoint.hpp"
#include "checkpoint/source.hpp"
#include "checkpoint/strict_json.hpp"
#include "common/util.hpp"

namespace companion::checkpoint {
namespace {

using json = nlohmann::json;

constexpr const char* kIndexName = "model.safetensors.index.json";
constexpr const char* kSafetensorsSuffix = ".safetensors";
// Index files of the largest public models are a few MiB.
constexpr size_t kMaxIndexBytes = 64u << 20;

Error bad(std::string message) {
  return make_error(StatusCode::kBadCheckpoint, std::move(message));
}

bool ends_with(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() &&
         s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

// Absolute and without "." components or a trailing slash; symlinks are kept as found.
Result<std::string> absolute_path(const std::string& path) {
  std::string out;
  if (!path.empty() && path[0] == '/') {
    out = path;
  } else {
    char cwd[PATH_MAX];
    if (::getcwd(cwd, sizeof(cwd)) == nullptr)
      return errno_error(StatusCode::kIoError, "getcwd", errno);
    out = std::string(cwd) + "/" + path;
  }
  std::string cleaned;
  size_t pos = 0;
  while (pos <= out.size()) {
    size_t next = out.find('/', pos);
    if (next == std::string::npos) next = out.size();
    std::string part = out.substr(pos, next - pos);
    if (!part.empty() && part != ".") cleaned += "/" + part;
    pos = next + 1;
  }
  return cleaned.empty() ? std::string("/") : cleaned;
}

Result<void> check_allowed(const std::string& path, const std::vector<std::string>& allowed_roots) {
  COMPANION_ASSIGN_OR_RETURN(std::string real, real_path(path));
  if (!is_under_roots(real, allowed_roots)) {
    std::string message = path;
    if (real != path) message += " (really " + real + ")";
    return make_error(StatusCode::kNotPermitted,
                      message + " is outside the directories this server may read");
  }
  return ok_result();
}

bool is_regular_file(const std::string& path) {
  struct stat st {};
  return ::stat(path.c_str(), &st) == 0 && S_ISREG(st.st_mode);
}

// A weight_map value must name a file in the index's own directory.
bool is_plain_file_name(const std::string& name) {
  return !name.empty() && name != "." && name != ".." && name.find('/') == std::string::npos &&
         name.find('\0') == std::string::npos;
}

Result<std::vector<std::string>> list_safetensors_files(const std::string& dir) {
  DIR* d = ::opendir(dir.c_str());
  if (d == nullptr) return errno_error(StatusCode::kIoError, "open directory " + dir, errno);
  std::vector<std::string> names;
  std::string broken;
  while (struct dirent* ent = ::readdir(d)) {
    std::string name = ent->d_name;
    if (!ends_with(name, kSafetensorsSuffix)) continue;
    // Followed: Hugging Face snapshots are symlinks into blobs/.
    struct stat st {};
    if (::stat((dir + "/" + name).c_str(), &st) != 0) {
      // A dangling link is a missing shard (an interrupted download), not something to skip.
      if (broken.empty()) broken = name;
      continue;
    }
    if (S_ISREG(st.st_mode)) names.push_back(std::move(name));
  }
  ::closedir(d);
  if (!broken.empty())
    return bad(dir + "/" + broken +
               " cannot be read (a dangling symlink? an incomplete download?)");
  std::sort(names.begin(), names.end());
  return names;
}

// The tensors of `files` (paths as found), in file order then data order.
Result<Checkpoint> assemble(std::string location, const std::vector<std::string>& files,
                            const std::vector<std::string>& allowed_roots,
                            const std::unordered_map<std::string, std::string>* weight_map) {
  Checkpoint checkpoint;
  checkpoint.location = std::move(location);
  std::unordered_map<std::string, uint32_t> owner;  // tensor name -> file index
  for (const std::string& path : files) {
    COMPANION_TRY(check_allowed(path, allowed_roots));
    COMPANION_ASSIGN_OR_RETURN(SafetensorsFile file, read_safetensors_file(path));
    auto file_index = static_cast<uint32_t>(checkpoint.files.size());
    std::string file_name = path.substr(path.rfind('/') + 1);
    for (TensorEntry& tensor : file.tensors) {
      if (weight_map) {
        auto it = weight_map->find(tensor.name);
        if (it != weight_map->end() && it->second != file_name)
          return bad(path + ": holds tensor '" + tensor.name + "', which " + kIndexName +
                     " assigns to " + it->second);
      }
      auto [it, inserted] = owner.emplace(tensor.name, file_index);
      if (!inserted)
        return bad("tensor '" + tensor.name + "' appears in both " + checkpoint.files[it->second] +
                   " and " + path);
      tensor.file_index = file_index;
      checkpoint.total_bytes += tensor.nbytes;
      checkpoint.tensors.push_back(std::move(tensor));
    }
    checkpoint.files.push_back(path);
  }
  if (weight_map) {
    for (const auto& [name, file_name] : *weight_map) {
      if (owner.find(name) == owner.end())
        return bad(kIndexName + std::string(" maps tensor '") + name + "' to " + file_name +
                   ", which does not contain it");
    }
  }
  return checkpoint;
}

Result<Checkpoint> open_indexed(const std::string& dir,
                                const std::vector<std::string>& allowed_roots) {
  std::string index_path = dir + "/" + kIndexName;
  COMPANION_TRY(check_allowed(index_path, allowed_roots));
  COMPANION_ASSIGN_OR_RETURN(std::string text, read_small_file(index_path, kMaxIndexBytes));
  COMPANION_ASSIGN_OR_RETURN(json index, parse_json_strict(text, index_path));
  if (!index.is_object() || !index.contains("weight_map") || !index["weight_map"].is_object())
    return bad(index_path + ": \"weight_map\" object missing");

  std::unordered_map<std::string, std::string> weight_map;
  std::set<std::string> file_names;  // sorted: shard names sort in shard order
  for (const auto& [name, value] : index["weight_map"].items()) {
    if (name.empty()) return bad(index_path + ": weight_map has an empty tensor name");
    if (!value.is_string())
      return bad(index_path + ": weight_map entry for '" + name + "' must be a file name string");
    const auto& file_name = value.get_ref<const std::string&>();
    if (!is_plain_file_name(file_name))
      return bad(index_path + ": weight_map maps '" + name + "' to \"" + file_name +
                 "\", which is not a plain file name in the same directory");
    if (file_names.insert(file_name).second && !is_regular_file(dir + "/" + file_name))
      return bad(index_path + ": weight_map maps '" + name + "' to missing file " + dir + "/" +
                 file_name);
    weight_map.emplace(name, file_name);
  }
  if (file_names.empty()) return bad(index_path + ": weight_map is empty");

  std::vector<std::string> files;
  for (const std::string& file_name : file_names) files.push_back(dir + "/" + file_name);
  return assemble(dir, files, allowed_roots, &weight_map);
}

}  // namespace

Result<Checkpoint> open_checkpoint(const std::string& path,
                                   const std::vector<std::string>& allowed_roots) {
  COMPANION_ASSIGN_OR_RETURN(std::string location, absolute_path(path));
  struct stat st {};
  if (::stat(location.c_str(), &st) != 0) {
    int err = errno;
    if (err == ENOENT || err == ENOTDIR)
      return make_error(StatusCode::kNotFound, path + " does not exist");
    return errno_error(StatusCode::kIoError, "stat " + path, err);
  }
  if (S_ISREG(st.st_mode)) return assemble(location, {location}, allowed_roots, nullptr);
  if (!S_ISDIR(st.st_mode)) return bad(path + " is neither a .safetensors file nor a directory");

  // Refuse before listing anything: the listing would tell what lies outside the roots.
  COMPANION_TRY(check_allowed(location, allowed_roots));
  std::string index_path = location + "/" + kIndexName;
  if (::access(index_path.c_str(), F_OK) == 0) return open_indexed(location, allowed_roots);

  COMPANION_ASSIGN_OR_RETURN(std::vector<std::string> names, list_safetensors_files(location));
  if (names.empty())
    return make_error(StatusCode::kNotFound, "no safetensors files in " + location);
  std::vector<std::string> files;
  for (const std::string& name : names) files.push_back(location + "/" + name);
  return assemble(location, files, allowed_roots, nullptr);
}

}  // namespace companion::checkpoint
