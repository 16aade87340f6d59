// Reading and validating safetensors headers: 8-byte little-endian length, JSON, data section.
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cerrno>
#include <limits>
#include <map>
#include <optional>
#include <string>
#include <string_view>
#include <unordered_set>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "checkpoint/checkpoint.hpp"
#include "checkpoint/name_table.hpp"
#include "checkpoint/strict_json.hpp"
#include "common/unique_fd.hpp"
#include "common/util.hpp"

namespace companion::checkpoint {
namespace {

using json = nlohmann::json;

constexpr uint64_t kLengthPrefixBytes = 8;

Error bad(std::string message) {
  return make_error(StatusCode::kBadCheckpoint, std::move(message));
}

std::string quoted(const std::string& name) {
  return "tensor '" + name + "'";
}

constexpr size_t kNoCap = static_cast<size_t>(-1);
constexpr std::string_view kMetadataKey = "__metadata__";

// Only the exact safetensors spellings: aliases such as "bf16" are not part of the format.
Result<DType> parse_header_dtype(const std::string& tensor, const std::string& text) {
  for (int i = 0; i < kDTypeCount; ++i) {
    auto dtype = static_cast<DType>(i);
    if (text == dtype_name(dtype)) return dtype;
  }
  return make_error(StatusCode::kUnknownDtype, quoted(tensor) + ": unknown dtype \"" + text + "\"");
}

struct ParsedRange {
  uint64_t begin = 0;
  uint64_t end = 0;
};

// Builds nlohmann values from SAX events, for the few values an error message shows whole (a
// shape holding something other than an integer, a metadata value that is not a string).
class ValueCapture {
 public:
  bool active() const { return !stack_.empty(); }
  void start(json container) {
    root_ = std::move(container);
    stack_.assign(1, &root_);
  }
  void add(json value) { append(std::move(value)); }
  void open(json container) { stack_.push_back(append(std::move(container))); }
  void key(const std::string& key) { key_ = key; }
  // True when the container closed is the one start() began: take() gives it.
  bool close() {
    stack_.pop_back();
    return stack_.empty();
  }
  json take() { return std::move(root_); }

 private:
  json* append(json value) {
    json& top = *stack_.back();
    if (top.is_array()) {
      top.push_back(std::move(value));
      return &top.back();
    }
    json& slot = top[key_];
    slot = std::move(value);
    return &slot;
  }

  json root_;
  std::vector<json*> stack_;  // the containers open, root first
  std::string key_;
};

// A "shape" or "data_offsets" array as streamed: its integers while every element is a
// non-negative integer, else the array as a value (for the message that shows it). Elements past
// `cap` are only counted: such an array is refused for its length before its elements are read.
struct NumberList {
  size_t count = 0;
  size_t cap = 0;
  std::array<uint64_t, kMaxRank> values{};
  std::optional<json> irregular;

  void reset(size_t keep) {
    count = 0;
    cap = keep;
    irregular.reset();
  }
  void add_unsigned(uint64_t value) {
    if (json* list = next()) {
      list->push_back(value);
    } else if (count <= cap) {
      values[count - 1] = value;
    }
  }
  // The next element is something else: where it goes, or nullptr when it does not matter.
  json* add_other() {
    if (++count > cap) {
      irregular.reset();
      return nullptr;
    }
    if (!irregular) {
      irregular = json::array();
      for (size_t i = 0; i + 1 < count; ++i) irregular->push_back(values[i]);
    }
    return &*irregular;
  }
  bool is_unsigned(size_t i) const { return !irregular || (*irregular)[i].is_number_unsigned(); }
  uint64_t at(size_t i) const { return irregular ? (*irregular)[i].get<uint64_t>() : values[i]; }
  std::string dump_at(size_t i) const {
    return irregular ? (*irregular)[i].dump() : std::to_string(values[i]);
  }
  std::string dump() const {
    if (irregular) return irregular->dump();
    std::string text = "[";
    for (size_t i = 0; i < count; ++i) text += (i ? "," : "") + std::to_string(values[i]);
    return text + "]";
  }

 private:
  // An unsigned element: the irregular array when there is one (and the element matters).
  json* next() {
    if (++count > cap) {
      irregular.reset();
      return nullptr;
    }
    return irregular ? &*irregular : nullptr;
  }
};

// What one tensor's entry held, gathered while it streams by and judged when it ends.
struct EntryFields {
  bool is_object = false;
  bool has_dtype = false, has_shape = false, has_offsets = false;
  std::optional<std::string> unexpected;  // the first unexpected field in name order
  bool dtype_is_string = false;
  std::string dtype;
  bool shape_is_array = false;
  NumberList shape;
  bool offsets_is_array = false;
  NumberList offsets;

  void reset() {
    is_object = has_dtype = has_shape = has_offsets = false;
    unexpected.reset();
    dtype_is_string = shape_is_array = offsets_is_array = false;
    shape.reset(kMaxRank);
    offsets.reset(2);
  }
};

Result<uint64_t> unsigned_at(const std::string& tensor, const char* field, const NumberList& list,
                             size_t i) {
  if (!list.is_unsigned(i))
    return bad(quoted(tensor) + ": \"" + field + "\" entries must be non-negative integers, got " +
               list.dump_at(i));
  return list.at(i);
}

// The checks, in the order (and with the messages) of the document-based validation this
// replaced: a bad header gets the same error.
Result<TensorEntry> judge_tensor(const std::string& name, const EntryFields& f, uint64_t data_bytes,
                                 ParsedRange& range) {
  if (name.empty()) return bad("a tensor has an empty name");
  if (name.size() > kMaxTensorNameBytes)
    return bad("tensor name '" + name.substr(0, 64) + "...' is " + std::to_string(name.size()) +
               " bytes, over the limit of " + std::to_string(kMaxTensorNameBytes));
  if (!f.is_object) return bad(quoted(name) + ": entry must be an object");
  if (f.unexpected) return bad(quoted(name) + ": unexpected field \"" + *f.unexpected + "\"");
  if (!f.has_dtype) return bad(quoted(name) + ": missing field \"dtype\"");
  if (!f.has_shape) return bad(quoted(name) + ": missing field \"shape\"");
  if (!f.has_offsets) return bad(quoted(name) + ": missing field \"data_offsets\"");

  TensorEntry entry;
  if (!f.dtype_is_string) return bad(quoted(name) + ": \"dtype\" must be a string");
  COMPANION_ASSIGN_OR_RETURN(entry.dtype, parse_header_dtype(name, f.dtype));

  if (!f.shape_is_array) return bad(quoted(name) + ": \"shape\" must be an array");
  if (f.shape.count > kMaxRank)
    return bad(quoted(name) + ": rank " + std::to_string(f.shape.count) + " is over the limit of " +
               std::to_string(kMaxRank));
  bool has_zero_dim = false;
  // Even an empty tensor is described by int64 strides, products of its other dimensions.
  uint64_t nonzero_elements = 1;
  entry.shape.reserve(f.shape.count);
  for (size_t i = 0; i < f.shape.count; ++i) {
    COMPANION_ASSIGN_OR_RETURN(uint64_t dim, unsigned_at(name, "shape", f.shape, i));
    if (dim > static_cast<uint64_t>(std::numeric_limits<int64_t>::max()))
      return bad(quoted(name) + ": dimension " + std::to_string(dim) + " is too large");
    has_zero_dim = has_zero_dim || dim == 0;
    if (dim != 0) {
      if (nonzero_elements > static_cast<uint64_t>(std::numeric_limits<int64_t>::max()) / dim)
        return bad(quoted(name) + ": shape " + f.shape.dump() + " overflows 64-bit element counts");
      nonzero_elements *= dim;
    }
    entry.shape.push_back(static_cast<int64_t>(dim));
  }

  if (!f.offsets_is_array || f.offsets.count != 2)
    return bad(quoted(name) + ": \"data_offsets\" must be an array [begin, end]");
  COMPANION_ASSIGN_OR_RETURN(range.begin, unsigned_at(name, "data_offsets", f.offsets, 0));
  COMPANION_ASSIGN_OR_RETURN(range.end, unsigned_at(name, "data_offsets", f.offsets, 1));
  if (range.begin > range.end)
    return bad(quoted(name) + ": data_offsets begin " + std::to_string(range.begin) +
               " is after end " + std::to_string(range.end));

  // Sizes come from untrusted input: every multiplication is checked before it can wrap.
  uint64_t nbytes = 0;
  if (!has_zero_dim) {
    nbytes = dtype_size(entry.dtype);
    for (int64_t dim : entry.shape) {
      auto d = static_cast<uint64_t>(dim);
      if (nbytes > std::numeric_limits<uint64_t>::max() / d)
        return bad(quoted(name) + ": shape " + f.shape.dump() + " overflows 64-bit byte counts");
      nbytes *= d;
    }
  }
  if (nbytes != range.end - range.begin)
    return bad(quoted(name) + ": shape " + f.shape.dump() + " of " + dtype_name(entry.dtype) +
               " needs " + std::to_string(nbytes) + " bytes but data_offsets [" +
               std::to_string(range.begin) + ", " + std::to_string(range.end) + "] span " +
               std::to_string(range.end - range.begin));
  if (range.end > data_bytes)
    return bad(quoted(name) + ": data_offsets end " + std::to_string(range.end) +
               " is past the end of the data section (" + std::to_string(data_bytes) + " bytes)");
  entry.nbytes = nbytes;
  return entry;
}

// A header streamed (json::sax_parse) straight into tensor records: one pass, no document, a
// record per tensor and a table of their names. Errors keep the precedence of the document-based
// validation it replaced (a count before anything, then parse_json_strict, then the entries in
// name order), so that a bad header is refused with the same error:
//   1. a cap: more tensors than `max_tensors`, an array longer than `max_array`, when met before
//      any syntax error;
//   2. the first syntax error, repeated key or too-deep nesting, in text order;
//   3. a top level that is not an object;
//   4. of the entries that are wrong, the first in name order (a document iterates so);
//   5. overlapping data ranges (checked after the parse, in data order).
class HeaderParser {
 public:
  enum class Cap { kNone, kTensors, kArray };

  // With `shared_count`, the tensors of every header parsed at once count against
  // `max_tensors` together (added in batches: the total may pass it by a batch per parser).
  HeaderParser(uint64_t data_bytes, size_t max_tensors, size_t max_array,
               std::atomic<size_t>* shared_count)
      : data_bytes_(data_bytes),
        max_tensors_(max_tensors),
        shared_count_(shared_count),
        guard_(max_array) {}

  bool null() {
    return scalar([] { return json(nullptr); });
  }
  bool boolean(bool value) {
    return scalar([value] { return json(value); });
  }
  bool number_integer(json::number_integer_t value) {
    return scalar([value] { return json(value); });
  }
  bool number_float(json::number_float_t value, const json::string_t&) {
    return scalar([value] { return json(value); });
  }
  bool binary(json::binary_t&) {  // not in JSON text
    return scalar([] { return json::binary({}); });
  }
  bool number_unsigned(json::number_unsigned_t value) {
    if (!guard_.element()) return false;
    if (guard_.failed()) return true;
    if (!capture_.active() && (role() == Role::kShape || role() == Role::kOffsets)) {
      current_list().add_unsigned(value);
      return true;
    }
    place([value] { return json(value); });
    return true;
  }
  bool string(json::string_t& value) {
    if (!guard_.element()) return false;
    if (guard_.failed()) return true;
    if (!capture_.active() && role() == Role::kEntry && field_ == Field::kDtype) {
      fields_.dtype_is_string = true;
      fields_.dtype = value;
    } else if (!capture_.active() && role() == Role::kMetadata) {
      metadata_.emplace(metadata_key_, value);
    } else {
      place([&value] { return json(value); });
    }
    return true;
  }

  bool start_object(size_t) { return open(true); }
  bool start_array(size_t) { return open(false); }
  bool end_object() { return close(); }
  bool end_array() { return close(); }

  bool key(json::string_t& key) {
    // Counted as a pass of its own would: every key of the top-level object but __metadata__.
    if (guard_.depth() == 1 && top_is_object_ && key != kMetadataKey) {
      if (++tensor_keys_ > max_tensors_ || (++unshared_ == kShareEvery && !share_count())) {
        cap_ = Cap::kTensors;
        return false;
      }
    }
    guard_.key(key);
    if (guard_.failed()) return true;
    if (capture_.active()) {
      capture_.key(key);
    } else if (role() == Role::kTop) {
      begin_member(key);
    } else if (role() == Role::kEntry) {
      entry_field(key);
    } else if (role() == Role::kMetadata) {
      metadata_key_ = key;
    }
    return true;
  }

  bool parse_error(size_t, const std::string&, const nlohmann::detail::exception& e) {
    guard_.syntax_error(e.what());
    return false;
  }

  // After sax_parse (or its exception, reported to syntax_error).
  Cap cap() const {
    if (cap_ != Cap::kNone) return cap_;
    return guard_.array_too_long() ? Cap::kArray : Cap::kNone;
  }
  void syntax_error(const std::string& what) { guard_.syntax_error(what); }
  // Adds the tensors not yet counted to the shared count: false once it is past the cap.
  bool share_count() {
    size_t added = unshared_;
    unshared_ = 0;
    if (shared_count_ == nullptr) return true;
    return shared_count_->fetch_add(added, std::memory_order_relaxed) + added <= max_tensors_;
  }

  Result<SafetensorsFile> finish(uint64_t data_start) {
    if (guard_.failed()) return bad("header is not valid JSON: " + guard_.problem());
    if (!top_is_object_) return bad("header must be a JSON object, got " + top_type_);
    if (first_bad_) return std::move(first_bad_->second);

    SafetensorsFile file;
    file.data_start = data_start;
    file.file_size = data_start + data_bytes_;
    file.metadata = std::move(metadata_);
    // Data order, ties (zero-size tensors) by name so the result does not depend on JSON order.
    // Until now file_offset holds where the tensor begins in the data section.
    std::sort(parsed_.begin(), parsed_.end(), [](const TensorEntry& a, const TensorEntry& b) {
      if (a.file_offset != b.file_offset) return a.file_offset < b.file_offset;
      if (a.nbytes != b.nbytes) return a.nbytes < b.nbytes;
      return a.name < b.name;
    });
    // In begin order, any overlap shows up between neighbours (a range overlapping an earlier
    // one also overlaps the one right before it). Empty ranges hold no bytes: they overlap none.
    const TensorEntry* previous = nullptr;
    for (const TensorEntry& item : parsed_) {
      if (item.nbytes == 0) continue;
      if (previous && item.file_offset < previous->file_offset + previous->nbytes) {
        return bad(quoted(previous->name) + " [" + std::to_string(previous->file_offset) + ", " +
                   std::to_string(previous->file_offset + previous->nbytes) + ") and " +
                   quoted(item.name) + " [" + std::to_string(item.file_offset) + ", " +
                   std::to_string(item.file_offset + item.nbytes) + ") overlap");
      }
      previous = &item;
    }
    for (TensorEntry& item : parsed_) item.file_offset += data_start;
    file.tensors = std::move(parsed_);
    return file;
  }

 private:
  // What the innermost open container is.
  enum class Role : uint8_t { kNone, kTop, kEntry, kShape, kOffsets, kMetadata, kCapture, kOther };
  enum class Field : uint8_t { kDtype, kShape, kOffsets, kUnexpected };
  enum class Member : uint8_t { kNone, kTensor, kMetadata };

  Role role() const { return roles_.empty() ? Role::kNone : roles_.back(); }
  NumberList& current_list() { return role() == Role::kShape ? fields_.shape : fields_.offsets; }

  template <typename MakeValue>
  bool scalar(const MakeValue& make) {
    if (!guard_.element()) return false;
    if (!guard_.failed()) place(make);
    return true;
  }

  // A value other than the expected ones (those the events above take directly) lands here.
  template <typename MakeValue>
  void place(const MakeValue& make) {
    if (capture_.active()) {
      capture_.add(make());
      return;
    }
    switch (role()) {
      case Role::kNone:
        top_type_ = make().type_name();
        break;
      case Role::kMetadata:
        metadata_value_error(make().dump());
        break;
      case Role::kShape:
      case Role::kOffsets:
        if (json* list = current_list().add_other()) list->push_back(make());
        break;
      default:  // an entry's field or a member that is not what it should be: flags stay false
        break;
    }
  }

  bool open(bool is_object) {
    if (!guard_.element()) return false;
    Role next = Role::kOther;
    bool own_keys = false;
    if (!guard_.failed()) {
      json container = is_object ? json::object() : json::array();
      if (capture_.active()) {
        capture_.open(std::move(container));
        next = Role::kCapture;
      } else {
        switch (role()) {
          case Role::kNone:
            top_is_object_ = is_object;
            if (!is_object) top_type_ = "array";
            next = is_object ? Role::kTop : Role::kOther;
            own_keys = is_object;
            break;
          case Role::kTop:
            if (is_object && member_ == Member::kTensor) {
              fields_.is_object = true;
              next = Role::kEntry;
              own_keys = true;
            } else if (is_object && member_ == Member::kMetadata) {
              metadata_is_object_ = true;
              next = Role::kMetadata;
            }
            break;
          case Role::kEntry:
            if (!is_object && field_ == Field::kShape) {
              fields_.shape_is_array = true;
              next = Role::kShape;
            } else if (!is_object && field_ == Field::kOffsets) {
              fields_.offsets_is_array = true;
              next = Role::kOffsets;
            }
            break;
          case Role::kMetadata:
            capture_.start(std::move(container));
            capture_into_ = Role::kMetadata;
            next = Role::kCapture;
            break;
          case Role::kShape:
          case Role::kOffsets:
            if (current_list().add_other() != nullptr) {
              capture_.start(std::move(container));
              capture_into_ = role();
              next = Role::kCapture;
            }
            break;
          default:
            break;
        }
      }
    }
    guard_.open(is_object, own_keys);
    roles_.push_back(next);
    return true;
  }

  bool close() {
    Role closed = role();
    if (!roles_.empty()) roles_.pop_back();
    guard_.close();
    if (guard_.failed()) return true;
    if (closed == Role::kCapture && capture_.close()) {
      json value = capture_.take();
      if (capture_into_ == Role::kMetadata) {
        metadata_value_error(value.dump());
      } else {
        current_list().irregular->push_back(std::move(value));
      }
    } else if (closed == Role::kTop) {
      end_member();
    }
    return true;
  }

  // A key of the top-level object: a tensor's name, or __metadata__.
  void begin_member(const std::string& key) {
    end_member();
    if (key == kMetadataKey) {
      if (seen_metadata_) return guard_.repeated_key(key);
      seen_metadata_ = true;
      member_ = Member::kMetadata;
      return;
    }
    auto index = static_cast<uint32_t>(parsed_.size());
    parsed_.emplace_back();
    parsed_.back().name = key;
    auto name_of = [this](uint32_t i) -> std::string_view { return parsed_[i].name; };
    if (names_.insert(key, index, name_of) != NameTable::kNone) return guard_.repeated_key(key);
    member_ = Member::kTensor;
    fields_.reset();
    if (!unexpected_keys_.empty()) unexpected_keys_.clear();
  }

  // The member's value has ended (the next key or the end of the header): judge it.
  void end_member() {
    if (member_ == Member::kTensor) {
      TensorEntry& entry = parsed_.back();
      ParsedRange range;
      auto judged = judge_tensor(entry.name, fields_, data_bytes_, range);
      if (judged.ok()) {
        std::string name = std::move(entry.name);
        entry = std::move(judged).value();
        entry.name = std::move(name);
        entry.file_offset = range.begin;  // made absolute in finish()
      } else {
        note_error(entry.name, std::move(judged).error());
      }
    } else if (member_ == Member::kMetadata) {
      if (!metadata_is_object_) {
        note_error(std::string(kMetadataKey), bad("\"__metadata__\" must be an object of strings"));
      } else if (metadata_error_) {
        note_error(std::string(kMetadataKey), std::move(*metadata_error_));
      }
    }
    member_ = Member::kNone;
  }

  void entry_field(const std::string& key) {
    bool* seen = nullptr;
    if (key == "dtype") {
      field_ = Field::kDtype;
      seen = &fields_.has_dtype;
    } else if (key == "shape") {
      field_ = Field::kShape;
      seen = &fields_.has_shape;
    } else if (key == "data_offsets") {
      field_ = Field::kOffsets;
      seen = &fields_.has_offsets;
    } else {
      field_ = Field::kUnexpected;
      if (!unexpected_keys_.insert(key).second) return guard_.repeated_key(key);
      if (!fields_.unexpected || key < *fields_.unexpected) fields_.unexpected = key;
      return;
    }
    if (*seen) return guard_.repeated_key(key);
    *seen = true;
  }

  // A value of __metadata__ that is not a string: the first such key in name order is reported.
  void metadata_value_error(const std::string& dump) {
    if (metadata_error_key_ && *metadata_error_key_ <= metadata_key_) return;
    metadata_error_key_ = metadata_key_;
    metadata_error_ =
        bad("\"__metadata__\" value for \"" + metadata_key_ + "\" must be a string, got " + dump);
  }

  void note_error(const std::string& member, Error error) {
    if (first_bad_ && first_bad_->first <= member) return;
    first_bad_.emplace(member, std::move(error));
  }

  static constexpr size_t kShareEvery = 1024;

  uint64_t data_bytes_;
  size_t max_tensors_;
  std::atomic<size_t>* shared_count_;
  StrictJsonGuard guard_;
  Cap cap_ = Cap::kNone;
  size_t tensor_keys_ = 0;
  size_t unshared_ = 0;      // counted in tensor_keys_, not yet in *shared_count_
  std::vector<Role> roles_;  // one per open container, as the guard's scopes
  ValueCapture capture_;
  Role capture_into_ = Role::kNone;

  bool top_is_object_ = false;
  std::string top_type_;
  Member member_ = Member::kNone;
  std::vector<TensorEntry> parsed_;  // in JSON order until finish()
  NameTable names_;                  // of parsed_
  Field field_ = Field::kDtype;
  EntryFields fields_;
  std::unordered_set<std::string> unexpected_keys_;  // of the current entry

  bool seen_metadata_ = false;
  bool metadata_is_object_ = false;
  std::string metadata_key_;
  std::map<std::string, std::string> metadata_;
  std::optional<std::string> metadata_error_key_;
  std::optional<Error> metadata_error_;

  std::optional<std::pair<std::string, Error>> first_bad_;  // (member name, its error)
};

// Parses a header with caps (kNoCap: none); `cap` says which one stopped it.
Result<SafetensorsFile> parse_header(std::string_view header_json, uint64_t data_bytes,
                                     size_t max_tensors, size_t max_array, HeaderParser::Cap& cap,
                                     std::atomic<size_t>* shared_count = nullptr) {
  HeaderParser parser(data_bytes, max_tensors, max_array, shared_count);
  try {
    json::sax_parse(header_json.begin(), header_json.end(), &parser);
  } catch (const std::exception& e) {
    // sax_parse reports syntax errors through parse_error, but a few limits still throw.
    parser.syntax_error(e.what());
  }
  if (parser.cap() == HeaderParser::Cap::kNone && !parser.share_count())
    cap = HeaderParser::Cap::kTensors;
  else
    cap = parser.cap();
  if (cap != HeaderParser::Cap::kNone) return bad("header is over a cap");
  return parser.finish(kLengthPrefixBytes + header_json.size());
}

// Reads exactly `size` bytes at `offset`, retrying short reads.
Result<void> pread_exact(int fd, void* buf, size_t size, uint64_t offset, const std::string& path) {
  auto* out = static_cast<char*>(buf);
  size_t done = 0;
  while (done < size) {
    ssize_t n = ::pread(fd, out + done, size - done, static_cast<off_t>(offset + done));
    if (n < 0) {
      if (errno == EINTR) continue;
      return errno_error(StatusCode::kIoError, "read " + path, errno);
    }
    if (n == 0) return bad(path + ": file ended while reading its header (was it truncated?)");
    done += static_cast<size_t>(n);
  }
  return ok_result();
}

}  // namespace

Result<SafetensorsFile> parse_safetensors_header(std::string_view header_json,
                                                 uint64_t data_bytes) {
  HeaderParser::Cap cap = HeaderParser::Cap::kNone;
  return parse_header(header_json, data_bytes, kNoCap, kNoCap, cap);
}

namespace {

// read_safetensors_header, and its speculative form: `shared_count` as in HeaderParser, and no
// refusal counted (a caller that gets an error reads the header again, in turn, to report it).
Result<SafetensorsFile> read_header(const OpenedFile& opened, const CheckpointLimits& limits,
                                    size_t max_tensors, std::atomic<size_t>* shared_count,
                                    bool count_refusals) {
  auto refused = [count_refusals](Refusal kind) {
    if (count_refusals) count_refusal(kind);
  };
  const std::string& path = opened.path;
  const UniqueFd& fd = opened.fd;
  if (!S_ISREG(opened.st.st_mode)) {
    refused(Refusal::kNotRegular);
    return bad(path + ": not a regular file");
  }
  auto file_size = static_cast<uint64_t>(opened.st.st_size);
  if (file_size < kLengthPrefixBytes)
    return bad(path + ": file is " + std::to_string(file_size) +
               " bytes, too short for the 8-byte header length");

  unsigned char prefix[kLengthPrefixBytes];
  COMPANION_TRY(pread_exact(fd.get(), prefix, sizeof(prefix), 0, path));
  uint64_t header_bytes = 0;
  for (int i = 7; i >= 0; --i) header_bytes = (header_bytes << 8) | prefix[i];
  if (header_bytes > kMaxHeaderBytes)
    return bad(path + ": header length " + std::to_string(header_bytes) + " is over the limit of " +
               std::to_string(kMaxHeaderBytes) + " bytes");
  if (header_bytes > limits.max_header_bytes) {
    refused(Refusal::kHeaderBytes);
    return make_error(StatusCode::kLimitExceeded,
                      path + ": header length " + std::to_string(header_bytes) +
                          " is over this server's limit of " +
                          std::to_string(limits.max_header_bytes) + " bytes (--max-header-bytes)");
  }
  if (header_bytes > file_size - kLengthPrefixBytes)
    return bad(path + ": header length " + std::to_string(header_bytes) +
               " runs past the end of the " + std::to_string(file_size) +
               "-byte file (truncated?)");

  std::string header(static_cast<size_t>(header_bytes), '\0');
  COMPANION_TRY(pread_exact(fd.get(), header.data(), header.size(), kLengthPrefixBytes, path));
  // The caps are checked as the header streams in: a header of millions of tiny entries is
  // refused after reading a fraction of it. Every array of a header is a shape (at most kMaxRank
  // numbers) or a pair of data offsets.
  HeaderParser::Cap cap = HeaderParser::Cap::kNone;
  auto parsed = parse_header(header, file_size - kLengthPrefixBytes - header_bytes, max_tensors,
                             kMaxRank, cap, shared_count);
  if (cap == HeaderParser::Cap::kTensors) {
    refused(Refusal::kTensors);
    return make_error(StatusCode::kLimitExceeded,
                      path + ": more tensors than this server's limit of " +
                          std::to_string(limits.max_tensors) +
                          " for one checkpoint (--max-tensors)");
  }
  if (cap == HeaderParser::Cap::kArray)
    return bad(path + ": an array in the header has more than " + std::to_string(kMaxRank) +
               " elements (a shape's rank is at most " + std::to_string(kMaxRank) + ")");
  if (!parsed.ok()) {
    Error error = std::move(parsed).error();
    error.message = path + ": " + error.message;
    return error;
  }
  SafetensorsFile file = std::move(parsed).value();
  file.path = path;
  return file;
}

}  // namespace

Result<SafetensorsFile> read_safetensors_header(const OpenedFile& opened,
                                                const CheckpointLimits& limits,
                                                size_t max_tensors) {
  return read_header(opened, limits, max_tensors, nullptr, true);
}

std::optional<SafetensorsFile> try_read_safetensors_header(const OpenedFile& opened,
                                                           const CheckpointLimits& limits,
                                                           std::atomic<size_t>& shared_count) {
  auto file = read_header(opened, limits, limits.max_tensors, &shared_count, false);
  if (!file.ok()) return std::nullopt;
  return std::move(file).value();
}

Result<SafetensorsFile> read_safetensors_file(const std::string& path) {
  OpenedFile opened;
  opened.path = path;
  opened.fd.reset(::open(path.c_str(), O_RDONLY | O_NONBLOCK | O_CLOEXEC | O_NOCTTY));
  if (!opened.fd) {
    int err = errno;
    return errno_error(err == ENOENT ? StatusCode::kNotFound : StatusCode::kIoError, "open " + path,
                       err);
  }
  if (::fstat(opened.fd.get(), &opened.st) != 0)
    return errno_error(StatusCode::kIoError, "stat " + path, errno);
  CheckpointLimits limits;
  return read_safetensors_header(opened, limits, limits.max_tensors);
}

}  // namespace companion::checkpoint
