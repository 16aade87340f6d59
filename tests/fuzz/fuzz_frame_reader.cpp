// FrameReader: bytes fed in pieces of fuzzer-chosen sizes, some with descriptors attached, then
// next() until it has no whole frame or refuses the stream. Every byte fed is accounted for
// (frames taken plus bytes still buffered), frames respect the limits, and every descriptor the
// reader was given is closed once it is gone.
#include <fcntl.h>
#include <unistd.h>

#include <cstdint>
#include <cstdlib>
#include <vector>

#include <fuzzer/FuzzedDataProvider.h>

#include "fuzz_check.hpp"
#include "protocol/frame.hpp"
#include "protocol/limits.hpp"

namespace {

using companion::UniqueFd;
using companion::protocol::Frame;
using companion::protocol::FrameReader;
namespace limits = companion::protocol;

using companion::fuzz::check;

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static const int null_fd = ::open("/dev/null", O_RDONLY | O_CLOEXEC);
  check(null_fd >= 0);
  FuzzedDataProvider input(data, size);
  std::vector<int> given;  // every descriptor handed to the reader
  size_t fed = 0, taken = 0;
  {
    FrameReader reader;
    bool refused = false;
    while (input.remaining_bytes() > 0 && !refused) {
      size_t piece = input.ConsumeIntegralInRange<size_t>(0, 64 * 1024);
      uint8_t fd_count = input.ConsumeIntegralInRange<uint8_t>(0, 3);
      std::vector<uint8_t> bytes = input.ConsumeBytes<uint8_t>(piece);
      std::vector<UniqueFd> fds;
      // Descriptors ride on a read of at least one byte, as with a real socket.
      for (uint8_t i = 0; i < fd_count && !bytes.empty(); ++i) {
        int fd = ::fcntl(null_fd, F_DUPFD_CLOEXEC, 0);
        check(fd >= 0);
        given.push_back(fd);
        fds.emplace_back(fd);
      }
      fed += bytes.size();
      reader.feed(bytes, std::move(fds));
      for (;;) {
        auto frame = reader.next();
        if (!frame.ok()) {
          check(frame.error().code == companion::StatusCode::kProtocolError);
          refused = true;
          break;
        }
        if (!frame->has_value()) break;
        const Frame& f = **frame;
        check(f.payload.size() <= limits::kMaxPayloadBytes);
        check(f.fds.size() <= limits::kMaxFdsPerFrame);
        taken += limits::kFrameHeaderBytes + f.payload.size();
      }
      if (!refused) check(taken + reader.buffered_bytes() == fed);
    }
  }
  // Frames (and their descriptors) and the reader are gone: nothing may stay open.
  for (int fd : given) check(::fcntl(fd, F_GETFD) == -1);
  return 0;
}
