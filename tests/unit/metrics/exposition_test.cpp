#include "metrics/exposition.hpp"

#include <gtest/gtest.h>

#include <cmath>
#include <limits>

#include "metrics/http_exporter.hpp"

namespace companion::metrics {
namespace {

TEST(Exposition, EscapesLabelValuesAndHelp) {
  EXPECT_EQ(escape_label_value("a\\b\"c\nd"), "a\\\\b\\\"c\\nd");
  EXPECT_EQ(escape_label_value("plain é"), "plain é");
  // HELP keeps double quotes as they are.
  EXPECT_EQ(escape_help("say \"hi\"\\\n"), "say \"hi\"\\\\\\n");
}

TEST(Exposition, FormatsValues) {
  EXPECT_EQ(format_value(0), "0");
  EXPECT_EQ(format_value(17179869184.0), "17179869184");
  EXPECT_EQ(format_value(-3), "-3");
  EXPECT_EQ(format_value(0.0005), "0.0005");
  EXPECT_EQ(format_value(1796270646.901), "1796270646.901");
  EXPECT_EQ(format_value(std::numeric_limits<double>::infinity()), "+Inf");
  EXPECT_EQ(format_value(-std::numeric_limits<double>::infinity()), "-Inf");
  EXPECT_EQ(format_value(std::nan("")), "NaN");
  // Past 2^53 an integer is written as a double that reads back the same.
  EXPECT_EQ(std::stod(format_value(1e300)), 1e300);
}

TEST(Exposition, ChecksNames) {
  EXPECT_TRUE(valid_metric_name("companion_loads_total"));
  EXPECT_TRUE(valid_metric_name("a:b_c"));
  EXPECT_FALSE(valid_metric_name("1abc"));
  EXPECT_FALSE(valid_metric_name("a-b"));
  EXPECT_FALSE(valid_metric_name(""));
  EXPECT_TRUE(valid_label_name("kind"));
  EXPECT_FALSE(valid_label_name("a:b"));
  EXPECT_FALSE(valid_label_name("__name__"));
}

TEST(Exposition, WritesFamiliesAndSamples) {
  TextWriter w;
  w.family("companion_models", "Models by state", Type::kGauge);
  w.sample("companion_models", {{"state", "loaded"}}, 2);
  w.sample("companion_models", {{"state", "x\"y"}, {"b", "c"}}, 0);
  w.family("companion_evictions_total", "Evictions", Type::kCounter);
  w.sample("companion_evictions_total", {}, 5);
  EXPECT_EQ(w.text(),
            "# HELP companion_models Models by state\n"
            "# TYPE companion_models gauge\n"
            "companion_models{state=\"loaded\"} 2\n"
            "companion_models{state=\"x\\\"y\",b=\"c\"} 0\n"
            "# HELP companion_evictions_total Evictions\n"
            "# TYPE companion_evictions_total counter\n"
            "companion_evictions_total 5\n");
}

TEST(Exposition, HistogramBucketsAreCumulativeAndInclusive) {
  Histogram h({0.001, 0.01, 1});
  h.observe(0.001);  // on a bound: counted in that bucket (le = less or equal)
  h.observe(0.005);
  h.observe(0.5);
  h.observe(7);  // past every bound: +Inf only
  EXPECT_EQ(h.count(), 4u);
  EXPECT_DOUBLE_EQ(h.sum(), 7.506);
  EXPECT_EQ(h.cumulative(), (std::vector<uint64_t>{1, 2, 3, 4}));

  TextWriter w;
  w.histogram("x_seconds", {{"kind", "load"}}, h);
  EXPECT_EQ(w.text(),
            "x_seconds_bucket{kind=\"load\",le=\"0.001\"} 1\n"
            "x_seconds_bucket{kind=\"load\",le=\"0.01\"} 2\n"
            "x_seconds_bucket{kind=\"load\",le=\"1\"} 3\n"
            "x_seconds_bucket{kind=\"load\",le=\"+Inf\"} 4\n"
            "x_seconds_sum{kind=\"load\"} 7.506\n"
            "x_seconds_count{kind=\"load\"} 4\n");
}

TEST(ListenAddress, ParsesPortsAndAddresses) {
  auto a = parse_listen_address("9464");
  ASSERT_TRUE(a.ok());
  EXPECT_EQ(a->host, "127.0.0.1");  // loopback unless told otherwise
  EXPECT_EQ(a->port, 9464);
  EXPECT_FALSE(a->ipv6);
  auto b = parse_listen_address("0.0.0.0:80");
  ASSERT_TRUE(b.ok());
  EXPECT_EQ(b->host, "0.0.0.0");
  EXPECT_EQ(b->port, 80);
  auto c = parse_listen_address("[::1]:0");
  ASSERT_TRUE(c.ok());
  EXPECT_EQ(c->host, "::1");
  EXPECT_TRUE(c->ipv6);
  EXPECT_EQ(c->port, 0);
  auto d = parse_listen_address("localhost:9000");
  ASSERT_TRUE(d.ok());
  EXPECT_EQ(d->host, "127.0.0.1");
}

TEST(ListenAddress, RefusesWhatIsNotAnAddress) {
  for (const char* text : {"", "65536", "-1", "abc", "host.example:9464", "1.2.3:80", "[::1]",
                           "[::1]80", "::1:80", "127.0.0.1:", "127.0.0.1:80x", "[1.2.3.4]:80"}) {
    auto r = parse_listen_address(text);
    EXPECT_FALSE(r.ok()) << text;
    if (!r.ok()) {
      EXPECT_EQ(r.error().code, StatusCode::kInvalidArgument) << text;
    }
  }
}

}  // namespace
}  // namespace companion::metrics
