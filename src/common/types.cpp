#include <algorithm>
#include <cctype>
#include <string>
#include <string_view>

#include "common/shard_rules.hpp"
#include "common/util.hpp"
#include "companion/types.hpp"
#include "protocol/limits.hpp"

namespace companion {
namespace {
struct DTypeInfo {
  DType dtype;
  const char* name;
  size_t size;
};
constexpr DTypeInfo kDTypes[kDTypeCount] = {
    {DType::kBool, "BOOL", 1}, {DType::kU8, "U8", 1},          {DType::kI8, "I8", 1},
    {DType::kU16, "U16", 2},   {DType::kI16, "I16", 2},        {DType::kF16, "F16", 2},
    {DType::kBF16, "BF16", 2}, {DType::kU32, "U32", 4},        {DType::kI32, "I32", 4},
    {DType::kF32, "F32", 4},   {DType::kU64, "U64", 8},        {DType::kI64, "I64", 8},
    {DType::kF64, "F64", 8},   {DType::kF8E4M3, "F8_E4M3", 1}, {DType::kF8E5M2, "F8_E5M2", 1},
};
const DTypeInfo* info(DType d) {
  auto i = static_cast<size_t>(d);
  return i < static_cast<size_t>(kDTypeCount) ? &kDTypes[i] : nullptr;
}
}  // namespace

size_t dtype_size(DType d) noexcept {
  const DTypeInfo* i = info(d);
  return i ? i->size : 0;
}

const char* dtype_name(DType d) noexcept {
  const DTypeInfo* i = info(d);
  return i ? i->name : "?";
}

Result<DType> parse_dtype(std::string_view name) {
  for (const auto& i : kDTypes)
    if (name == i.name) return i.dtype;
  std::string lower(name);
  std::transform(lower.begin(), lower.end(), lower.begin(),
                 [](unsigned char c) { return static_cast<char>(std::tolower(c)); });
  if (lower.rfind("torch.", 0) == 0) lower = lower.substr(6);
  static const struct {
    const char* alias;
    DType dtype;
  } kAliases[] = {{"bf16", DType::kBF16},
                  {"bfloat16", DType::kBF16},
                  {"f16", DType::kF16},
                  {"fp16", DType::kF16},
                  {"float16", DType::kF16},
                  {"half", DType::kF16},
                  {"f32", DType::kF32},
                  {"fp32", DType::kF32},
                  {"float32", DType::kF32},
                  {"float", DType::kF32},
                  {"f64", DType::kF64},
                  {"float64", DType::kF64},
                  {"double", DType::kF64},
                  {"bool", DType::kBool},
                  {"uint8", DType::kU8},
                  {"int8", DType::kI8},
                  {"int16", DType::kI16},
                  {"uint16", DType::kU16},
                  {"int32", DType::kI32},
                  {"uint32", DType::kU32},
                  {"int64", DType::kI64},
                  {"uint64", DType::kU64},
                  {"float8_e4m3fn", DType::kF8E4M3},
                  {"float8_e5m2", DType::kF8E5M2}};
  for (const auto& a : kAliases)
    if (lower == a.alias) return a.dtype;
  return make_error(StatusCode::kUnknownDtype, "unknown dtype '" + std::string(name) + "'");
}

bool dtype_is_float_convertible(DType d) noexcept {
  return d == DType::kF16 || d == DType::kBF16 || d == DType::kF32;
}

Result<void> ModelSpec::validate() const {
  // The bounds keep every key made from a spec within the wire's string limit (limits.hpp); the
  // UTF-8 rule keeps every JSON and terminal rendering of it valid.
  auto too_long = [](const char* what, size_t size, size_t max) {
    return make_error(StatusCode::kInvalidArgument, std::string(what) + " is " +
                                                        std::to_string(size) + " bytes; at most " +
                                                        std::to_string(max) + " are allowed");
  };
  if (source.empty()) return make_error(StatusCode::kInvalidArgument, "model source is empty");
  if (source.size() > protocol::kMaxSourceBytes)
    return too_long("model source", source.size(), protocol::kMaxSourceBytes);
  if (source.find('\0') != std::string::npos || revision.find('\0') != std::string::npos)
    return make_error(StatusCode::kInvalidArgument, "model source contains a NUL byte");
  if (revision.size() > protocol::kMaxRevisionBytes)
    return too_long("revision", revision.size(), protocol::kMaxRevisionBytes);
  if (tag.size() > protocol::kMaxTagBytes)
    return too_long("tag", tag.size(), protocol::kMaxTagBytes);
  if (tag.find('\0') != std::string::npos)
    return make_error(StatusCode::kInvalidArgument, "tag contains a NUL byte");
  if (!is_valid_utf8(source))
    return make_error(StatusCode::kInvalidArgument, "model source is not valid UTF-8");
  if (!is_valid_utf8(revision))
    return make_error(StatusCode::kInvalidArgument, "revision is not valid UTF-8");
  if (!is_valid_utf8(tag))
    return make_error(StatusCode::kInvalidArgument, "tag is not valid UTF-8");
  if (!is_valid_utf8(shard_rules))
    return make_error(StatusCode::kInvalidArgument, "shard rules are not valid UTF-8");
  if (tp_size == 0 || tp_rank >= tp_size)
    return make_error(
        StatusCode::kInvalidArgument,
        "tp_rank " + std::to_string(tp_rank) + " is not below tp_size " + std::to_string(tp_size));
  if (shard_rules.size() > protocol::kMaxShardRulesBytes)
    return too_long("shard rules", shard_rules.size(), protocol::kMaxShardRulesBytes);
  if (auto rules = parse_shard_rules(shard_rules); !rules.ok()) return rules.error();
  if (dtype && !dtype_is_float_convertible(*dtype))
    return make_error(StatusCode::kUnknownDtype, std::string("cannot cast a model to ") +
                                                     dtype_name(*dtype) +
                                                     "; targets are BF16, F16 and F32");
  return ok_result();
}

std::string ModelSpec::describe() const {
  std::string out = source;
  if (!revision.empty()) out += "@" + revision;
  if (dtype) out += std::string(" dtype=") + dtype_name(*dtype);
  if (tp_size != 1) out += " tp=" + std::to_string(tp_rank) + "/" + std::to_string(tp_size);
  if (!shard_rules.empty()) out += " rules=" + shard_rules;
  if (!tag.empty()) out += " tag=" + tag;
  return out;
}

const char* model_state_name(ModelState s) noexcept {
  switch (s) {
    case ModelState::kReady:
      return "ready";
    case ModelState::kLoading:
      return "loading";
    case ModelState::kLoaded:
      return "loaded";
    case ModelState::kError:
      return "error";
    case ModelState::kUnloaded:
      return "unloaded";
  }
  return "?";
}

const char* software_version() noexcept {
  return COMPANION_VERSION_STRING;
}

}  // namespace companion
