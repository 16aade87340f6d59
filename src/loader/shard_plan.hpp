// Tensor-parallel shards: which slice of each tensor a rank loads (the rules of
// common/shard_rules.hpp matched to tensor names, presets per architecture) and the read extents
// that bring in exactly that slice.
//
// Conventions (Megatron / vLLM). A PyTorch Linear weight is [out_features, in_features]:
// column-parallel splits dim 0 (and the bias), row-parallel splits dim 1 (the bias stays whole).
// A split dimension of size D gives rank r the contiguous indices [r*D/tp, (r+1)*D/tp). A
// "packed" dimension holds N equal parts (GPT-2's fused q,k,v): each part is split that way and
// the rank's pieces are concatenated in part order. A dimension that does not divide is an error:
// there is no padding.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "checkpoint/checkpoint.hpp"
#include "common/shard_rules.hpp"
#include "companion/result.hpp"
#include "companion/types.hpp"
#include "loader/loader.hpp"

namespace companion::loader {

// fnmatch-style matching of the whole name: '*' matches any run (dots included), '?' one byte.
bool glob_match(std::string_view pattern, std::string_view name);

// Presets: "llama" (Llama, Mistral, Qwen2), "opt", "gpt2". The rules in parse_shard_rules's
// spelling, or nullptr for a name without a preset.
const std::vector<ShardRule>* shard_preset(std::string_view preset);
const char* shard_preset_text(std::string_view preset);

struct DetectedArchitecture {
  std::string preset;  // "" when no preset fits
  std::string why;     // for messages: what config.json or the tensor names said
};

// Picks the preset for a checkpoint: config.json's `architectures`, else its `model_type`;
// without config.json (or one naming neither) a guess from the tensor names. A config.json that
// is not a JSON object is kBadCheckpoint.
Result<DetectedArchitecture> detect_architecture(
    const std::optional<std::string>& config_json,
    const std::vector<checkpoint::TensorEntry>& tensors);

// One model's rules: the spec's rules first, then the architecture's preset; a tensor that no
// rule matches is replicated.
class ShardPlanner {
 public:
  // kInvalidArgument for bad rules, or for an architecture without a preset when there are no
  // rules in the spec.
  static Result<ShardPlanner> create(const ShardOptions& options,
                                     const std::vector<checkpoint::TensorEntry>& tensors);

  SplitRule rule_for(std::string_view tensor_name) const;
  const std::string& preset() const { return preset_; }

 private:
  std::vector<ShardRule> rules_;
  std::string preset_;
};

// What one rank reads of one tensor.
struct TensorShard {
  std::vector<int64_t> shape;       // the shard's shape
  std::vector<ReadExtent> extents;  // file order, neighbours coalesced, no empty ones
  uint64_t source_bytes = 0;        // sum of extents' bytes
  uint64_t target_bytes = 0;        // the shard's size in `target_dtype`
};

// Rank `tp_rank` of `tp_size` under `rule`. A split dimension that is missing or does not divide
// by packed × tp_size is kInvalidArgument naming the tensor and its shape.
Result<TensorShard> shard_tensor(const checkpoint::TensorEntry& tensor, const SplitRule& rule,
                                 uint32_t tp_size, uint32_t tp_rank, DType target_dtype);

}  // namespace companion::loader
