// TensorTableView::open on any bytes (the content of a table memfd a server sends). What opens
// must be readable record by record within its arrays, and find() must give either nothing or a
// record of exactly the name asked for.
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string_view>
#include <vector>

#include "fuzz_check.hpp"
#include "protocol/tensor_table.hpp"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace companion::protocol;
  using companion::fuzz::check;
  // A mapping is page-aligned: give the table an 8-aligned copy, as a mapping would.
  std::vector<uint64_t> storage((size + 7) / 8);
  if (size > 0) std::memcpy(storage.data(), data, size);
  std::span<const uint8_t> bytes(reinterpret_cast<const uint8_t*>(storage.data()), size);
  const std::vector<uint64_t> segments{1 << 20, 4096};
  auto view = TensorTableView::open(bytes, segments);
  if (!view.ok()) {
    check(view.error().code == companion::StatusCode::kProtocolError);
    return 0;
  }
  for (size_t i = 0; i < view->size(); ++i) {
    TensorRef t = (*view)[i];
    check(!t.name.empty() && t.shape.size() == t.strides.size());
    check(t.segment < segments.size() && t.offset + t.nbytes <= segments[t.segment]);
    size_t found = view->find(t.name);
    check(found == TensorTableView::npos || (*view)[found].name == t.name);
  }
  size_t found = view->find(std::string_view("model.layers.0.mlp.experts.0.w1.weight"));
  check(found == TensorTableView::npos || found < view->size());
  return 0;
}
