#include "loader/shard_plan.hpp"

#include <algorithm>
#include <map>

#include "checkpoint/strict_json.hpp"

namespace companion::loader {
namespace {

Error invalid(const std::string& message) {
  return make_error(StatusCode::kInvalidArgument, message);
}

std::string shape_text(const std::vector<int64_t>& shape) {
  std::string out = "[";
  for (size_t i = 0; i < shape.size(); ++i) {
    if (i > 0) out += ", ";
    out += std::to_string(shape[i]);
  }
  return out + "]";
}

// The presets, in the rule-string spelling (README "Tensor-parallel shards" lists them).
constexpr const char* kLlamaRules =
    "*.self_attn.q_proj.weight=column;*.self_attn.q_proj.bias=column;"
    "*.self_attn.k_proj.weight=column;*.self_attn.k_proj.bias=column;"
    "*.self_attn.v_proj.weight=column;*.self_attn.v_proj.bias=column;"
    "*.self_attn.o_proj.weight=row;"
    "*.mlp.gate_proj.weight=column;*.mlp.up_proj.weight=column;*.mlp.down_proj.weight=row;"
    "*embed_tokens.weight=column;*lm_head.weight=column";
constexpr const char* kOptRules =
    "*.self_attn.q_proj.weight=column;*.self_attn.q_proj.bias=column;"
    "*.self_attn.k_proj.weight=column;*.self_attn.k_proj.bias=column;"
    "*.self_attn.v_proj.weight=column;*.self_attn.v_proj.bias=column;"
    "*.self_attn.out_proj.weight=row;"
    "*.fc1.weight=column;*.fc1.bias=column;*.fc2.weight=row;"
    "*embed_tokens.weight=column;*embed_positions.weight=replicated;*lm_head.weight=column";
// GPT-2's Conv1D weights are [in, out]: output features are dim 1.
constexpr const char* kGpt2Rules =
    "*.attn.c_attn.weight=dim1-packed(3);*.attn.c_attn.bias=column-packed(3);"
    "*.attn.c_proj.weight=dim0;"
    "*.mlp.c_fc.weight=dim1;*.mlp.c_fc.bias=dim0;*.mlp.c_proj.weight=dim0;"
    "*wte.weight=dim0;*wpe.weight=replicated;*lm_head.weight=dim0";

struct ArchitectureName {
  const char* name;
  const char* preset;
};
constexpr ArchitectureName kArchitectures[] = {
    {"LlamaForCausalLM", "llama"}, {"LlamaModel", "llama"},       {"MistralForCausalLM", "llama"},
    {"MistralModel", "llama"},     {"Qwen2ForCausalLM", "llama"}, {"Qwen2Model", "llama"},
    {"OPTForCausalLM", "opt"},     {"OPTModel", "opt"},           {"GPT2LMHeadModel", "gpt2"},
    {"GPT2Model", "gpt2"},
};
constexpr ArchitectureName kModelTypes[] = {
    {"llama", "llama"}, {"mistral", "llama"}, {"qwen2", "llama"}, {"opt", "opt"}, {"gpt2", "gpt2"},
};

bool ends_with(std::string_view s, std::string_view suffix) {
  return s.size() >= suffix.size() && s.substr(s.size() - suffix.size()) == suffix;
}

// Without config.json: names only these architectures have.
std::string guess_from_names(const std::vector<checkpoint::TensorEntry>& tensors) {
  auto any = [&](std::string_view suffix) {
    return std::any_of(tensors.begin(), tensors.end(),
                       [&](const checkpoint::TensorEntry& t) { return ends_with(t.name, suffix); });
  };
  if (any(".attn.c_attn.weight")) return "gpt2";
  if (any(".fc1.weight") && any(".self_attn.out_proj.weight")) return "opt";
  if (any(".self_attn.o_proj.weight") && any(".mlp.gate_proj.weight")) return "llama";
  return "";
}

}  // namespace

bool glob_match(std::string_view pattern, std::string_view name) {
  size_t p = 0, n = 0;
  size_t star = std::string_view::npos, mark = 0;
  while (n < name.size()) {
    if (p < pattern.size() && pattern[p] == '*') {
      star = p++;
      mark = n;
    } else if (p < pattern.size() && (pattern[p] == '?' || pattern[p] == name[n])) {
      ++p;
      ++n;
    } else if (star != std::string_view::npos) {
      p = star + 1;
      n = ++mark;
    } else {
      return false;
    }
  }
  while (p < pattern.size() && pattern[p] == '*') ++p;
  return p == pattern.size();
}

const char* shard_preset_text(std::string_view preset) {
  if (preset == "llama") return kLlamaRules;
  if (preset == "opt") return kOptRules;
  if (preset == "gpt2") return kGpt2Rules;
  return nullptr;
}

const std::vector<ShardRule>* shard_preset(std::string_view preset) {
  static const std::map<std::string, std::vector<ShardRule>, std::less<>> presets = [] {
    std::map<std::string, std::vector<ShardRule>, std::less<>> out;
    for (const char* name : {"llama", "opt", "gpt2"}) {
      auto rules = parse_shard_rules(shard_preset_text(name));
      out[name] = rules.ok() ? std::move(rules).value() : std::vector<ShardRule>{};
    }
    return out;
  }();
  auto it = presets.find(preset);
  return it == presets.end() ? nullptr : &it->second;
}

Result<DetectedArchitecture> detect_architecture(
    const std::optional<std::string>& config_json,
    const std::vector<checkpoint::TensorEntry>& tensors) {
  DetectedArchitecture out;
  if (config_json) {
    COMPANION_ASSIGN_OR_RETURN(nlohmann::json config,
                               checkpoint::parse_json_strict(*config_json, "config.json"));
    if (!config.is_object())
      return make_error(StatusCode::kBadCheckpoint, "config.json is not a JSON object");
    std::string said;
    auto it = config.find("architectures");
    if (it != config.end() && it->is_array()) {
      for (const auto& a : *it) {
        if (!a.is_string()) continue;
        const auto& name = a.get_ref<const std::string&>();
        said += (said.empty() ? "architectures " : ", ") + name;
        for (const auto& known : kArchitectures)
          if (name == known.name) {
            out.preset = known.preset;
            out.why = "config.json architectures " + name;
            return out;
          }
      }
    }
    it = config.find("model_type");
    if (it != config.end() && it->is_string()) {
      const auto& type = it->get_ref<const std::string&>();
      said += (said.empty() ? "" : "; ") + std::string("model_type ") + type;
      for (const auto& known : kModelTypes)
        if (type == known.name) {
          out.preset = known.preset;
          out.why = "config.json model_type " + type;
          return out;
        }
    }
    if (!said.empty()) {
      out.why = "config.json: " + said;
      return out;  // a named architecture without a preset: no guessing
    }
  }
  out.preset = guess_from_names(tensors);
  out.why = std::string(config_json ? "config.json names no architecture" : "no config.json") +
            (out.preset.empty() ? "; tensor names match no preset"
                                : "; tensor names look like " + out.preset);
  return out;
}

Result<ShardPlanner> ShardPlanner::create(const ShardOptions& options,
                                          const std::vector<checkpoint::TensorEntry>& tensors) {
  if (options.tp_size == 0 || options.tp_rank >= options.tp_size)
    return invalid("tp_rank " + std::to_string(options.tp_rank) + " is not below tp_size " +
                   std::to_string(options.tp_size));
  ShardPlanner planner;
  COMPANION_ASSIGN_OR_RETURN(planner.rules_, parse_shard_rules(options.rules));
  COMPANION_ASSIGN_OR_RETURN(DetectedArchitecture arch,
                             detect_architecture(options.config_json, tensors));
  if (arch.preset.empty()) {
    if (planner.rules_.empty())
      return invalid("no shard rules for this architecture (" + arch.why +
                     "); pass --shard-rules 'pattern=rule;...' (presets: Llama, Mistral, Qwen2, "
                     "OPT, GPT-2)");
    return planner;
  }
  planner.preset_ = arch.preset;
  const std::vector<ShardRule>* preset = shard_preset(arch.preset);
  if (preset != nullptr)
    planner.rules_.insert(planner.rules_.end(), preset->begin(), preset->end());
  return planner;
}

SplitRule ShardPlanner::rule_for(std::string_view tensor_name) const {
  for (const auto& r : rules_)
    if (glob_match(r.pattern, tensor_name)) return r.split;
  return SplitRule{};
}

Result<TensorShard> shard_tensor(const checkpoint::TensorEntry& tensor, const SplitRule& rule,
                                 uint32_t tp_size, uint32_t tp_rank, DType target_dtype) {
  if (tp_size == 0 || tp_rank >= tp_size)
    return invalid("tp_rank " + std::to_string(tp_rank) + " is not below tp_size " +
                   std::to_string(tp_size));
  const uint64_t in_size = dtype_size(tensor.dtype);
  const uint64_t out_size = dtype_size(target_dtype);
  if (in_size == 0 || out_size == 0) return invalid("tensor '" + tensor.name + "': unknown dtype");
  const size_t rank = tensor.shape.size();
  TensorShard shard;
  shard.shape = tensor.shape;

  std::optional<size_t> dim;
  switch (rule.kind) {
    case SplitRule::Kind::kReplicated:
      break;
    case SplitRule::Kind::kColumn:
      dim = 0;
      break;
    case SplitRule::Kind::kRow:
      if (rank >= 2) dim = 1;  // a row-parallel layer's bias is whole on every rank
      break;
    case SplitRule::Kind::kDim:
      dim = rule.dim;
      break;
  }
  if (!dim) {
    shard.source_bytes = tensor.nbytes;
    shard.target_bytes = tensor.nbytes / in_size * out_size;
    if (tensor.nbytes > 0)
      shard.extents.push_back(ReadExtent{tensor.file_offset, tensor.nbytes, 0});
    return shard;
  }
  std::string what = "tensor '" + tensor.name + "' " + shape_text(tensor.shape);
  std::string how = "rule " + format_split_rule(rule) + ", tp_size " + std::to_string(tp_size);
  if (*dim >= rank)
    return invalid(what + " has no dim " + std::to_string(*dim) + " to split (" + how + ")");
  const uint64_t parts = rule.packed;
  const auto size = static_cast<uint64_t>(tensor.shape[*dim]);
  if (size % (parts * tp_size) != 0)
    return invalid(what + ": dim " + std::to_string(*dim) + " (" + std::to_string(size) +
                   ") does not divide into " +
                   (parts > 1 ? std::to_string(parts) + " packed parts × " : std::string()) +
                   std::to_string(tp_size) + " equal shards (" + how + "; no padding)");

  // Row-major: [outer, size, inner]. Each outer index holds `parts` runs of the rank's rows.
  uint64_t outer = 1, inner = 1;
  for (size_t d = 0; d < *dim; ++d) outer *= static_cast<uint64_t>(tensor.shape[d]);
  for (size_t d = *dim + 1; d < rank; ++d) inner *= static_cast<uint64_t>(tensor.shape[d]);
  const uint64_t part = size / parts;     // indices per packed part
  const uint64_t slice = part / tp_size;  // the rank's indices per part
  const uint64_t shard_size = size / tp_size;
  shard.shape[*dim] = static_cast<int64_t>(shard_size);
  const uint64_t run = slice * inner;  // elements per extent before coalescing
  shard.target_bytes = outer * shard_size * inner * out_size;
  if (run == 0) return shard;
  for (uint64_t o = 0; o < outer; ++o) {
    for (uint64_t j = 0; j < parts; ++j) {
      uint64_t src = (o * size + j * part + tp_rank * slice) * inner;
      uint64_t dst = (o * shard_size + j * slice) * inner;
      ReadExtent e{tensor.file_offset + src * in_size, run * in_size, dst * out_size};
      if (!shard.extents.empty()) {
        ReadExtent& last = shard.extents.back();
        if (last.file_offset + last.bytes == e.file_offset &&
            last.dst_offset + last.bytes / in_size * out_size == e.dst_offset) {
          last.bytes += e.bytes;
          continue;
        }
      }
      shard.extents.push_back(e);
    }
  }
  shard.source_bytes = outer * shard_size * inner * in_size;
  return shard;
}

}  // namespace companion::loader
