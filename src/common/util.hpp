// Small helpers used across components.
#pragma once

#include <chrono>
#include <cstdint>
#include <string>
#include <string_view>

#include "companion/result.hpp"

namespace companion {

using Clock = std::chrono::steady_clock;

int64_t unix_time_ms();
// 64-bit FNV-1a: stable across builds; used for short model ids, not for security.
uint64_t fnv1a64(std::string_view data, uint64_t seed = 1469598103934665603ULL);
std::string hex64(uint64_t value);
// 16 hex chars from the kernel's random source.
std::string random_hex_id();
std::string hostname();
// "1.5 GiB", "512 B"
std::string format_bytes(uint64_t bytes);
uint64_t align_up(uint64_t value, uint64_t alignment);
// Reads a whole small file (records, configs); refuses files over max_bytes.
Result<std::string> read_small_file(const std::string& path, size_t max_bytes = 1 << 20);
// Writes via a temporary file and rename, so readers never see a partial file.
Result<void> write_file_atomic(const std::string& path, std::string_view content, int mode = 0644);

// Length of the well-formed UTF-8 sequence at the start of text (1..4), or 0 when it is not one
// (overlong forms, surrogates and code points past U+10FFFF are not well-formed).
size_t utf8_sequence_length(std::string_view text) noexcept;
bool is_valid_utf8(std::string_view text) noexcept;
// The longest prefix of text of at most max_bytes that does not cut a UTF-8 sequence.
std::string_view utf8_prefix(std::string_view text, size_t max_bytes) noexcept;
// Text safe to print on a terminal: control characters (C0, DEL, C1) become escapes (\n, \t,
// \x1b, \u009b) and bytes that are not UTF-8 become U+FFFD, so names from files and peers can
// neither move the cursor nor break the output's encoding.
std::string printable_text(std::string_view text);

}  // namespace companion
