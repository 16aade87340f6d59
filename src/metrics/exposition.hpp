// The Prometheus text exposition format (version 0.0.4): metric families with HELP and TYPE
// lines, samples with escaped labels, and histograms. A writer builds one scrape's text.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace companion::metrics {

// Label name -> value, in the order they are written.
using Labels = std::vector<std::pair<std::string, std::string>>;

enum class Type { kCounter, kGauge, kHistogram };

// Bucketed observations: counts per upper bound (non-cumulative), the +Inf bucket, and the sum.
// Not synchronised: its owner locks.
class Histogram {
 public:
  explicit Histogram(std::vector<double> upper_bounds);  // ascending, finite
  void observe(double value);
  const std::vector<double>& upper_bounds() const { return bounds_; }
  // Cumulative counts per bound, then the +Inf bucket (= count()).
  std::vector<uint64_t> cumulative() const;
  uint64_t count() const;
  double sum() const { return sum_; }

 private:
  std::vector<double> bounds_;
  std::vector<uint64_t> counts_;  // one per bound, then +Inf
  double sum_ = 0;
};

// [a-zA-Z_:][a-zA-Z0-9_:]* (metric names), [a-zA-Z_][a-zA-Z0-9_]* (label names).
bool valid_metric_name(std::string_view name);
bool valid_label_name(std::string_view name);
// Label values escape backslash, double quote and line feed; HELP text backslash and line feed.
std::string escape_label_value(std::string_view value);
std::string escape_help(std::string_view text);
// Integers exactly (up to 2^53), other values as the shortest text that reads back the same;
// +Inf, -Inf, NaN.
std::string format_value(double value);

class TextWriter {
 public:
  // Starts a family: its HELP and TYPE lines. Names are the caller's constants (checked in
  // debug builds and by the tests, not at run time).
  void family(std::string_view name, std::string_view help, Type type);
  // One sample; `name` is the family's name, or with _bucket/_sum/_count for histograms.
  void sample(std::string_view name, const Labels& labels, double value);
  // A histogram's _bucket (with le), _sum and _count samples.
  void histogram(std::string_view name, const Labels& labels, const Histogram& h);
  const std::string& text() const { return out_; }
  std::string take() { return std::move(out_); }

 private:
  std::string out_;
};

}  // namespace companion::metrics
