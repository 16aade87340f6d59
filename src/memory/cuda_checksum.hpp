// wsum64 (common/checksum.hpp) computed by the GPU over device memory: lets a client prove that
// what it mapped holds the checkpoint's bytes without copying them to the host.
#pragma once

#include <cstdint>
#include <memory>

#include "companion/result.hpp"

namespace companion::memory {

class DeviceChecksum {
 public:
  // Loads the kernel (hand-written PTX, JIT-compiled by the driver) on the local ordinal.
  static Result<std::unique_ptr<DeviceChecksum>> create(int ordinal);
  virtual ~DeviceChecksum() = default;
  // wsum64 of `bytes` bytes at device_ptr (any alignment of bytes; device_ptr 4-byte aligned).
  virtual Result<uint64_t> run(uint64_t device_ptr, uint64_t bytes) = 0;
  // A write of 0 through the mapping at device_ptr: Ok only if the GPU accepted it (a read-only
  // mapping must refuse). Diagnostic for tests.
  virtual Result<void> try_write(uint64_t device_ptr) = 0;
};

}  // namespace companion::memory
