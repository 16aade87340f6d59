// Fault points: named places on the load path where a test makes the server stop or fail on
// purpose, to check what a crash or an error there leaves behind. Always compiled in, inert
// unless the environment variable COMPANION_TEST_FAULT is set when the process starts:
//
//   COMPANION_TEST_FAULT="pause-at=read"                  log a line at the first read, then
//                                                         sleep until killed (kill -9 it there)
//   COMPANION_TEST_FAULT="fail-at=seal:OUT_OF_MEMORY"      the first seal fails with that code
//   COMPANION_TEST_FAULT="fail-at=read@3:IO_ERROR,path=opt-victim"
//                                                         the third read of a file whose path
//                                                         contains "opt-victim" fails
//
//   COMPANION_TEST_FAULT="wait-at=grant,path=a,until=/tmp/t/go"
//                                                         log a line at the first grant of a
//                                                         lease to a request parked on a model
//                                                         whose source contains "a", then wait
//                                                         until the file /tmp/t/go exists
//
// STAGE@N: the Nth hit of the stage (counted among those matching path=, from 1) triggers, and
// only that one: later loads go through. Several points: specs separated by ';', each with its
// own count. A spec that does not parse stops the process at start (exit status 2), so that a
// mistyped test does not pass without its fault.
#pragma once

#include <string>
#include <string_view>

#include "companion/result.hpp"

namespace companion::fault {

enum class Stage {
  kOpen,      // the checkpoint's files are opened (server: before open_checkpoint)
  kAllocate,  // the slab is allocated (server: before Backend::allocate)
  kRead,      // a work item is read from a file (loader: before its reads)
  kCopy,      // a work item's bytes are in the slab (loader: after it; mid-load)
  kSeal,      // the loaded slab is sealed (server: before Slab::seal)
  kExport,    // a lease exports the slab's segments (server: before export_segments)
  kGrant,     // a request parked on a model's load is granted its lease (server's event loop)
};
const char* stage_name(Stage stage) noexcept;

namespace detail {
extern bool armed;  // set once, before main, from COMPANION_TEST_FAULT
Result<void> hit(Stage stage, std::string_view path);
}  // namespace detail

// The hook: ok unless the configured fault is due here. `path` is what path= is matched against
// (the model's source or the file being read). A pause never returns.
inline Result<void> point(Stage stage, std::string_view path) {
  if (!detail::armed) [[likely]]
    return ok_result();
  return detail::hit(stage, path);
}

// Replaces the configuration (tests of this module; "" disarms). kInvalidArgument, and nothing
// changed, when the spec does not parse. Not to be called while hooks may run.
Result<void> configure(std::string_view spec);

}  // namespace companion::fault
