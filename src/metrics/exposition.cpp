#include "metrics/exposition.hpp"

#include <algorithm>
#include <cassert>
#include <charconv>
#include <cmath>
#include <cstdio>

namespace companion::metrics {

Histogram::Histogram(std::vector<double> upper_bounds)
    : bounds_(std::move(upper_bounds)), counts_(bounds_.size() + 1, 0) {
  assert(std::is_sorted(bounds_.begin(), bounds_.end()));
}

void Histogram::observe(double value) {
  // The first bound not below the value: Prometheus buckets are "less than or equal".
  auto it = std::lower_bound(bounds_.begin(), bounds_.end(), value);
  ++counts_[static_cast<size_t>(it - bounds_.begin())];
  sum_ += value;
}

std::vector<uint64_t> Histogram::cumulative() const {
  std::vector<uint64_t> out(counts_.size());
  uint64_t running = 0;
  for (size_t i = 0; i < counts_.size(); ++i) out[i] = running += counts_[i];
  return out;
}

uint64_t Histogram::count() const {
  uint64_t n = 0;
  for (uint64_t c : counts_) n += c;
  return n;
}

namespace {
bool name_char(char c, bool first, bool colon) {
  if ((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '_') return true;
  if (colon && c == ':') return true;
  return !first && c >= '0' && c <= '9';
}
bool valid_name(std::string_view name, bool colon) {
  if (name.empty()) return false;
  for (size_t i = 0; i < name.size(); ++i)
    if (!name_char(name[i], i == 0, colon)) return false;
  return true;
}
}  // namespace

bool valid_metric_name(std::string_view name) {
  return valid_name(name, true);
}
bool valid_label_name(std::string_view name) {
  return valid_name(name, false) && name.substr(0, 2) != "__";  // reserved for Prometheus
}

namespace {
// Backslash and line feed always; double quotes in label values only.
std::string escape(std::string_view text, bool quotes) {
  std::string out;
  out.reserve(text.size());
  for (char c : text) {
    if (c == '\\')
      out += "\\\\";
    else if (c == '\n')
      out += "\\n";
    else if (c == '"' && quotes)
      out += "\\\"";
    else
      out += c;
  }
  return out;
}
}  // namespace

std::string escape_label_value(std::string_view value) {
  return escape(value, true);
}
std::string escape_help(std::string_view text) {
  return escape(text, false);
}

std::string format_value(double value) {
  if (std::isnan(value)) return "NaN";
  if (std::isinf(value)) return value > 0 ? "+Inf" : "-Inf";
  char buf[64];
  if (value == std::trunc(value) && std::fabs(value) <= 9007199254740992.0) {
    std::snprintf(buf, sizeof buf, "%.0f", value);
    return buf;
  }
  // The shortest text that reads back as the same double (0.0005, not 0.00050000000000000001).
  // Fixed notation where it stays short (what people read), else scientific.
  const double magnitude = std::fabs(value);
  const auto format = magnitude >= 1e-6 && magnitude < 1e15 ? std::chars_format::fixed
                                                            : std::chars_format::scientific;
  auto [end, ec] = std::to_chars(buf, buf + sizeof buf, value, format);
  return ec == std::errc() ? std::string(buf, end) : std::string("NaN");
}

void TextWriter::family(std::string_view name, std::string_view help, Type type) {
  assert(valid_metric_name(name));
  const char* type_name = type == Type::kCounter ? "counter"
                          : type == Type::kGauge ? "gauge"
                                                 : "histogram";
  out_.append("# HELP ").append(name).append(" ").append(escape_help(help)).append("\n");
  out_.append("# TYPE ").append(name).append(" ").append(type_name).append("\n");
}

void TextWriter::sample(std::string_view name, const Labels& labels, double value) {
  out_.append(name);
  if (!labels.empty()) {
    out_ += '{';
    for (size_t i = 0; i < labels.size(); ++i) {
      assert(valid_label_name(labels[i].first));
      if (i > 0) out_ += ',';
      out_.append(labels[i].first).append("=\"").append(escape_label_value(labels[i].second));
      out_ += '"';
    }
    out_ += '}';
  }
  out_.append(" ").append(format_value(value)).append("\n");
}

void TextWriter::histogram(std::string_view name, const Labels& labels, const Histogram& h) {
  const std::string base(name);
  std::vector<uint64_t> cumulative = h.cumulative();
  Labels with_le = labels;
  with_le.emplace_back("le", "");
  for (size_t i = 0; i < cumulative.size(); ++i) {
    with_le.back().second =
        i < h.upper_bounds().size() ? format_value(h.upper_bounds()[i]) : "+Inf";
    sample(base + "_bucket", with_le, static_cast<double>(cumulative[i]));
  }
  sample(base + "_sum", labels, h.sum());
  sample(base + "_count", labels, static_cast<double>(h.count()));
}

}  // namespace companion::metrics
