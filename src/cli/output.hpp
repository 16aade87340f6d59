// Rendering for the `companion` command: readable tables, or JSON for scripts.
#pragma once

#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "client/json.hpp"
#include "companion/types.hpp"

namespace companion::cli {

// The JSON documents live in the client library (shared with the C ABI).
using client::to_json;

// JSON text that never throws: bytes that are not UTF-8 (names from checkpoint headers, paths)
// become U+FFFD instead of aborting with nlohmann's type_error.316.
std::string json_text(const nlohmann::json& j, int indent = -1);
// A fixed-width table (cells made printable, see printable_text): header row, then rows; columns
// sized to their widest cell.
std::string render_table(const std::vector<std::string>& header,
                         const std::vector<std::vector<std::string>>& rows);
// Which variant of its source a loaded model is, from its key: "stored" or the cast dtype, then
// "tp=R/S", "rules=..." and "tag=..." when set ("BF16 tp=1/2"); "-" for a published model.
std::string variant_text(const ModelStatus& s);
// The models table (ls, status, load): one row per model, its variant in a column.
std::string render_models(const std::vector<ModelStatus>& models);
// The live generations of published models and of models with more than one ("" when none).
std::string render_generations(const std::vector<ModelStatus>& models);
std::string render_health(const HealthInfo& h);
// "[#########.........]  45.0%  1.2 GiB / 2.5 GiB"
std::string render_progress(const ModelStatus& s, int width = 30);

}  // namespace companion::cli
