/* Companion status codes: the one list every layer derives its codes and strings from. */
#ifndef COMPANION_STATUS_CODES_H
#define COMPANION_STATUS_CODES_H

/* X(C_NAME, CppName, value, "description") */
#define COMPANION_STATUS_CODES(X)                                      \
  X(OK, Ok, 0, "ok")                                                   \
  X(INVALID_ARGUMENT, InvalidArgument, 1, "invalid argument")          \
  X(NOT_FOUND, NotFound, 2, "model not found")                         \
  X(BAD_CHECKPOINT, BadCheckpoint, 3, "bad checkpoint")                \
  X(UNKNOWN_DTYPE, UnknownDtype, 4, "unknown dtype")                   \
  X(NOT_PERMITTED, NotPermitted, 5, "not permitted")                   \
  X(OUT_OF_MEMORY, OutOfMemory, 6, "out of memory")                    \
  X(DEVICE_MISMATCH, DeviceMismatch, 7, "device mismatch")             \
  X(VERSION_MISMATCH, VersionMismatch, 8, "protocol version mismatch") \
  X(PROTOCOL_ERROR, ProtocolError, 9, "protocol error")                \
  X(IO_ERROR, IoError, 10, "i/o error")                                \
  X(TIMEOUT, Timeout, 11, "timed out")                                 \
  X(UNAVAILABLE, Unavailable, 12, "unavailable")                       \
  X(NOT_READY, NotReady, 13, "model not loaded yet")                   \
  X(MODEL_IN_USE, ModelInUse, 14, "model in use")                      \
  X(CANCELLED, Cancelled, 15, "cancelled")                             \
  X(CUDA_ERROR, CudaError, 16, "CUDA error")                           \
  X(CONNECTION_CLOSED, ConnectionClosed, 17, "connection closed")      \
  X(INTERNAL, Internal, 18, "internal error")                          \
  X(LIMIT_EXCEEDED, LimitExceeded, 19, "limit exceeded")               \
  X(FINGERPRINT_MISMATCH, FingerprintMismatch, 20, "fingerprint mismatch")

#endif /* COMPANION_STATUS_CODES_H */
