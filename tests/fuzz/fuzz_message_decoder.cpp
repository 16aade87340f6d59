// protocol::decode on any payload. What decodes must encode again, and that encoding must decode
// and re-encode to the same bytes: a peer never gets from us what our own decoder would refuse.
#include <cstdint>
#include <cstdlib>
#include <variant>
#include <vector>

#include "fuzz_check.hpp"
#include "protocol/messages.hpp"

namespace {

using namespace companion::protocol;

using companion::fuzz::check;

std::vector<uint8_t> encode_any(const Message& message) {
  const auto* p = std::get_if<Parameters>(&message.body);
  if (p == nullptr) return encode(message).value();
  if (p->table_fd_index >= 0)
    return encode_parameters_with_table(message.request_id, p->lease_id, p->model, p->segments,
                                        p->table_fd_index, p->table_bytes, p->writable)
        .value();
  std::vector<TensorInfo> tensors;
  tensors.reserve(p->tensors.size());
  for (const TensorRef& t : p->tensors)
    tensors.push_back(TensorInfo{
        std::string(t.name), t.dtype, std::vector<int64_t>(t.shape.begin(), t.shape.end()),
        std::vector<int64_t>(t.strides.begin(), t.strides.end()), t.segment, t.offset, t.nbytes});
  return encode_parameters(message.request_id, p->lease_id, p->model, p->segments, tensors).value();
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  auto message = decode(std::vector<uint8_t>(data, data + size));
  if (!message.ok()) {
    check(message.error().code == companion::StatusCode::kProtocolError);
    return 0;
  }
  check(body_name(message->body) != nullptr);
  std::vector<uint8_t> once = encode_any(*message);
  auto again = decode(once);
  check(again.ok());
  check(again->request_id == message->request_id);
  check(again->body.index() == message->body.index());
  check(encode_any(*again) == once);
  return 0;
}
