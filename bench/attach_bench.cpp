// Client-side attach latency: from the request to every tensor usable (segments imported and
// mapped, views built), over many attaches of an already-loaded model. Prints one JSON line.
//   attach_bench --device 0 --model /models/llama --iterations 200
#include <CLI/CLI.hpp>
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <vector>

#include "companion/client.hpp"

int main(int argc, char** argv) {
  using namespace companion;
  CLI::App app{"Companion attach latency"};
  ConnectOptions options;
  std::string model;
  int iterations = 200;
  int warmup = 5;
  app.add_option("--device", options.device)->capture_default_str();
  app.add_option("--namespace", options.ns)->capture_default_str();
  app.add_option("--runtime-dir", options.runtime_dir);
  app.add_option("--model", model)->required();
  app.add_option("--iterations", iterations)->capture_default_str();
  app.add_option("--warmup", warmup)->capture_default_str();
  CLI11_PARSE(app, argc, argv);

  auto fail = [](const Error& e) {
    std::fprintf(stderr, "attach_bench: %s\n", e.to_string().c_str());
    return 1;
  };
  auto client = Client::connect(options);
  if (!client.ok()) return fail(client.error());
  ModelSpec spec;
  spec.source = model;
  auto ready = (*client)->wait_for_model_ready(spec, 30, 1800);
  if (!ready.ok()) return fail(ready.error());

  std::vector<double> ms;
  size_t tensors = 0;
  uint64_t bytes = 0;
  size_t segments = 0;
  for (int i = 0; i < warmup + iterations; ++i) {
    auto t0 = std::chrono::steady_clock::now();
    auto mapped = (*client)->get_model_parameters(spec);
    if (!mapped.ok()) return fail(mapped.error());
    // "Usable": every view's pointer is final; touch them so nothing is left lazy.
    const void* last = nullptr;
    for (const auto& t : (*mapped)->tensors()) last = t.data;
    auto t1 = std::chrono::steady_clock::now();
    if (last == nullptr && !(*mapped)->tensors().empty()) return 1;
    tensors = (*mapped)->tensors().size();
    bytes = (*mapped)->mapped_bytes();
    segments = (*mapped)->segment_count();
    if (i >= warmup) ms.push_back(std::chrono::duration<double, std::milli>(t1 - t0).count());
  }
  std::sort(ms.begin(), ms.end());
  auto pct = [&](double p) {
    return ms[std::min(ms.size() - 1, static_cast<size_t>(p * ms.size()))];
  };
  std::printf(
      "{\"tensors\": %zu, \"segments\": %zu, \"mapped_bytes\": %llu, \"iterations\": %d, "
      "\"p50_ms\": %.4f, \"p99_ms\": %.4f, \"min_ms\": %.4f, \"max_ms\": %.4f, "
      "\"backend\": \"%s\"}\n",
      tensors, segments, static_cast<unsigned long long>(bytes), iterations, pct(0.50), pct(0.99),
      ms.front(), ms.back(), ready->backend.c_str());
  return 0;
}
