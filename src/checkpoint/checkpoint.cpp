// Opening checkpoints: a single .safetensors file, a sharded directory with an index, or a
// directory of .safetensors files.
#include <dirent.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <climits>
#include <exception>
#include <optional>
#include <string>
#include <system_error>
#include <thread>

#include "checkpoint/checkpoint.hpp"
#include "checkpoint/index_json.hpp"
#include "checkpoint/name_table.hpp"
#include "checkpoint/open_beneath.hpp"
#include "checkpoint/source.hpp"
#include "common/util.hpp"

namespace companion::checkpoint {
namespace {

constexpr const char* kIndexName = "model.safetensors.index.json";
constexpr const char* kSafetensorsSuffix = ".safetensors";
// Index files of the largest public models are a few MiB.
// An index names every tensor (~90 bytes each with its file): room for kMaxTableTensors.
constexpr size_t kMaxIndexBytes = 512u << 20;

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

Error not_regular(const std::string& path) {
  count_refusal(Refusal::kNotRegular);
  return bad(path + " is not a regular file");
}

Error too_many_files(const std::string& where, const std::string& count, size_t limit) {
  count_refusal(Refusal::kFiles);
  return make_error(StatusCode::kLimitExceeded,
                    where + " has " + count + " .safetensors files, over this server's limit of " +
                        std::to_string(limit) + " (--max-checkpoint-files)");
}

// The .safetensors files of directory `dir` (open as `dir_file`), listed through its descriptor
// and each opened beneath the roots, in name order. Directories with the suffix are skipped.
Result<std::vector<OpenedFile>> open_listed_files(const OpenedFile& dir_file,
                                                  const std::string& dir,
                                                  const std::vector<std::string>& allowed_roots,
                                                  const CheckpointLimits& limits) {
  // A description of its own (fdopendir reads with it and closedir closes it), of this very
  // directory: "." is looked up in it, not a path.
  int listing_fd = ::openat(dir_file.fd.get(), ".", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (listing_fd < 0) return errno_error(StatusCode::kIoError, "open directory " + dir, errno);
  DIR* d = ::fdopendir(listing_fd);
  if (d == nullptr) {
    int err = errno;
    ::close(listing_fd);
    return errno_error(StatusCode::kIoError, "open directory " + dir, err);
  }
  std::vector<std::string> names;
  // Stops at the first name past the limit: a directory of millions of names costs no memory.
  while (struct dirent* ent = ::readdir(d)) {
    std::string name = ent->d_name;
    if (ends_with(name, kSafetensorsSuffix)) names.push_back(std::move(name));
    if (names.size() > limits.max_files) break;
  }
  ::closedir(d);
  if (names.size() > limits.max_files)
    return too_many_files(dir, "more than " + std::to_string(limits.max_files), limits.max_files);
  std::sort(names.begin(), names.end());

  std::vector<OpenedFile> files;
  for (const std::string& name : names) {
    std::string path = dir + "/" + name;
    auto file = open_under_roots(path, allowed_roots);
    if (!file.ok()) {
      // A dangling link is a missing shard (an interrupted download), not something to skip.
      if (file.error().code == StatusCode::kNotFound)
        return bad(path + " cannot be read (a dangling symlink? an incomplete download?)");
      return std::move(file).error();
    }
    if (S_ISDIR(file->st.st_mode)) continue;
    if (!S_ISREG(file->st.st_mode)) return not_regular(path);
    files.push_back(std::move(file).value());
  }
  return files;
}

// Headers read ahead, several at once, when there are several files: parsing them is most of the
// work of opening a checkpoint of many tensors. nullopt where one failed or the tensors of all of
// them passed the limit (assemble then reads that header again, in turn).
std::vector<std::optional<SafetensorsFile>> read_headers_ahead(const std::vector<OpenedFile>& files,
                                                               const CheckpointLimits& limits) {
  std::vector<std::optional<SafetensorsFile>> headers(files.size());
  // Each parse holds its header's text (up to --max-header-bytes) while it runs.
  constexpr size_t kMaxParsers = 4;
  size_t parsers = std::min(
      {files.size(), kMaxParsers, std::max<size_t>(1, std::thread::hardware_concurrency())});
  if (parsers < 2) return headers;
  std::atomic<size_t> next{0};
  std::atomic<size_t> tensors{0};
  auto parse = [&] {
    for (size_t i; (i = next.fetch_add(1)) < files.size();) {
      try {
        headers[i] = try_read_safetensors_header(files[i], limits, tensors);
      } catch (const std::exception&) {
        // Out of memory, say: read again in turn, where it is reported.
      }
    }
  };
  std::vector<std::thread> threads;
  for (size_t t = 1; t < parsers; ++t) {
    try {
      threads.emplace_back(parse);
    } catch (const std::system_error&) {
      break;  // fewer threads: this one parses what is left
    }
  }
  parse();
  for (std::thread& thread : threads) thread.join();
  return headers;
}

// The tensors of `files`, in file order then data order. With an index, each tensor it names
// must be in the file it names, and each it names must be found.
Result<Checkpoint> assemble(std::string location, std::string directory,
                            std::vector<OpenedFile> files, const CheckpointLimits& limits,
                            const IndexMap* index) {
  Checkpoint checkpoint;
  checkpoint.location = std::move(location);
  checkpoint.directory = std::move(directory);
  // Which file holds each tensor: for the index's tensors by their entry, for any other through
  // a table of names (of checkpoint.tensors, by position).
  std::vector<uint32_t> holder(index ? index->entries.size() : 0, NameTable::kNone);
  NameTable unindexed;
  auto tensor_name = [&checkpoint](uint32_t i) -> std::string_view {
    return checkpoint.tensors[i].name;
  };
  std::vector<std::optional<SafetensorsFile>> ahead = read_headers_ahead(files, limits);
  for (size_t f = 0; f < files.size(); ++f) {
    OpenedFile& opened = files[f];
    const std::string path = opened.path;
    size_t tensors_left =
        limits.max_tensors - std::min(limits.max_tensors, checkpoint.tensors.size());
    // A header read ahead is what reading it now would give when it was read whole within the
    // tensors left; else it is read now, for its error (or for the limit of the tensors left).
    SafetensorsFile file;
    if (ahead[f] && ahead[f]->tensors.size() <= tensors_left) {
      file = std::move(*ahead[f]);
      ahead[f].reset();
    } else {
      COMPANION_ASSIGN_OR_RETURN(file, read_safetensors_header(opened, limits, tensors_left));
    }
    auto file_index = static_cast<uint32_t>(checkpoint.files.size());
    std::string file_name = path.substr(path.rfind('/') + 1);
    for (TensorEntry& tensor : file.tensors) {
      uint32_t earlier = NameTable::kNone;  // the file that holds it already
      const IndexMap::Entry* entry = index ? index->find(tensor.name) : nullptr;
      if (entry != nullptr) {
        const std::string& mapped = index->files[entry->file];
        if (mapped != file_name)
          return bad(path + ": holds tensor '" + tensor.name + "', which " + kIndexName +
                     " assigns to " + mapped);
        uint32_t& held = holder[static_cast<size_t>(entry - index->entries.data())];
        earlier = held;
        if (held == NameTable::kNone) held = file_index;
      } else if (files.size() > 1) {  // one file's header has no name twice
        auto position = static_cast<uint32_t>(checkpoint.tensors.size());
        uint32_t found = unindexed.insert(tensor.name, position, tensor_name);
        if (found != NameTable::kNone) earlier = checkpoint.tensors[found].file_index;
      }
      if (earlier != NameTable::kNone)
        return bad("tensor '" + tensor.name + "' appears in both " + checkpoint.files[earlier] +
                   " and " + path);
      tensor.file_index = file_index;
      checkpoint.total_bytes += tensor.nbytes;
      checkpoint.tensors.push_back(std::move(tensor));
    }
    checkpoint.files.push_back(path);
    checkpoint.fds.push_back(std::make_shared<const UniqueFd>(std::move(opened.fd)));
  }
  if (index) {
    for (size_t i = 0; i < holder.size(); ++i) {
      if (holder[i] == NameTable::kNone)
        return bad(kIndexName + std::string(" maps tensor '") + index->entries[i].tensor + "' to " +
                   index->files[index->entries[i].file] + ", which does not contain it");
    }
  }
  return checkpoint;
}

Result<Checkpoint> open_indexed(const std::string& dir, const OpenedFile& index_file,
                                const std::vector<std::string>& allowed_roots,
                                const CheckpointLimits& limits) {
  const std::string& index_path = index_file.path;
  IndexMap index;
  {  // the text goes once parsed
    COMPANION_ASSIGN_OR_RETURN(std::string text, read_opened_file(index_file, kMaxIndexBytes));
    // Each entry names a tensor: more than the tensor limit cannot load, and are refused as soon
    // as the count passes it, before the rest of the index is read.
    auto parsed = parse_index_json(text, index_path, limits.max_tensors);
    if (!parsed.ok() && parsed.error().code == StatusCode::kLimitExceeded) {
      count_refusal(Refusal::kTensors);
      return make_error(StatusCode::kLimitExceeded,
                        index_path + ": weight_map has more tensors than this server's limit of " +
                            std::to_string(limits.max_tensors) +
                            " for one checkpoint (--max-tensors)");
    }
    COMPANION_ASSIGN_OR_RETURN(index, std::move(parsed));
  }
  const auto& file_names = index.files;  // sorted: shard names sort in shard order

  if (file_names.size() > limits.max_files)
    return too_many_files(index_path, std::to_string(file_names.size()), limits.max_files);
  std::vector<OpenedFile> files;
  for (uint32_t f = 0; f < file_names.size(); ++f) {
    std::string path = dir + "/" + file_names[f];
    auto file = open_under_roots(path, allowed_roots);
    if (!file.ok() && file.error().code == StatusCode::kNotFound) {
      auto mapped = std::find_if(index.entries.begin(), index.entries.end(),
                                 [f](const IndexMap::Entry& entry) { return entry.file == f; });
      return bad(index_path + ": weight_map maps '" + mapped->tensor + "' to missing file " + path);
    }
    if (!file.ok()) return std::move(file).error();
    if (!S_ISREG(file->st.st_mode)) return not_regular(path);
    files.push_back(std::move(file).value());
  }
  return assemble(dir, dir, std::move(files), limits, &index);
}

}  // namespace

Result<void> check_limits(const CheckpointLimits& limits) {
  auto out_of_range = [](const char* flag, uint64_t value, uint64_t most) {
    return make_error(StatusCode::kInvalidArgument,
                      std::string(flag) + " " + std::to_string(value) + " is not between 1 and " +
                          std::to_string(most));
  };
  if (limits.max_header_bytes == 0 || limits.max_header_bytes > kMaxHeaderBytes)
    return out_of_range("--max-header-bytes", limits.max_header_bytes, kMaxHeaderBytes);
  if (limits.max_tensors == 0 || limits.max_tensors > protocol::kMaxTableTensors)
    return out_of_range("--max-tensors", limits.max_tensors, protocol::kMaxTableTensors);
  constexpr size_t kMostFiles = 1u << 20;
  if (limits.max_files == 0 || limits.max_files > kMostFiles)
    return out_of_range("--max-checkpoint-files", limits.max_files, kMostFiles);
  return ok_result();
}

Result<Checkpoint> open_checkpoint(const std::string& path,
                                   const std::vector<std::string>& allowed_roots,
                                   const CheckpointLimits& limits) {
  COMPANION_ASSIGN_OR_RETURN(std::string location, absolute_path(path));
  // Refused before anything is listed or read: the answer says nothing about what lies outside.
  COMPANION_ASSIGN_OR_RETURN(OpenedFile top, open_under_roots(location, allowed_roots));
  if (S_ISREG(top.st.st_mode)) {
    std::string directory = location.substr(0, std::max<size_t>(1, location.rfind('/')));
    std::vector<OpenedFile> files;
    files.push_back(std::move(top));
    return assemble(location, std::move(directory), std::move(files), limits, nullptr);
  }
  if (!S_ISDIR(top.st.st_mode)) {
    count_refusal(Refusal::kNotRegular);
    return bad(path + " is neither a .safetensors file nor a directory");
  }

  auto index = open_under_roots(location + "/" + kIndexName, allowed_roots);
  if (index.ok()) return open_indexed(location, *index, allowed_roots, limits);
  if (index.error().code != StatusCode::kNotFound) return std::move(index).error();

  COMPANION_ASSIGN_OR_RETURN(std::vector<OpenedFile> files,
                             open_listed_files(top, location, allowed_roots, limits));
  if (files.empty())
    return make_error(StatusCode::kNotFound, "no safetensors files in " + location);
  return assemble(location, location, std::move(files), limits, nullptr);
}

Result<std::optional<std::string>> read_checkpoint_side_file(
    const Checkpoint& checkpoint, const std::string& name,
    const std::vector<std::string>& allowed_roots, uint64_t max_bytes) {
  auto file = open_under_roots(checkpoint.directory + "/" + name, allowed_roots);
  if (!file.ok()) {
    if (file.error().code == StatusCode::kNotFound) return std::optional<std::string>();
    return std::move(file).error();
  }
  COMPANION_ASSIGN_OR_RETURN(std::string text, read_opened_file(*file, max_bytes));
  return std::optional<std::string>(std::move(text));
}

}  // namespace companion::checkpoint
