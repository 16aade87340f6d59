/* Companion status codes: the one list every layer derives its codes and strings from. */
#ifndef COMPANION_STATUS_CODES_H
#define COMPANION_STATUS_CODES_H

/* X(NAME, value, "description") */
#define COMPANION_STATUS_CODES(X)                                                  \
  X(OK, 0, "ok")                                                                   \
  X(INVALID_ARGUMENT, 1, "invalid argument")                                       \
  X(NOT_FOUND, 2, "model not found")                                               \
  X(BAD_CHECKPOINT, 3, "bad checkpoint")                                           \
  X(UNKNOWN_DTYPE, 4, "unknown dtype")                                             \
  X(NOT_PERMITTED, 5, "not permitted")                                             \
  X(OUT_OF_MEMORY, 6, "out of memory")                                             \
  X(DEVICE_MISMATCH, 7, "device mismatch")                                         \
  X(VERSION_MISMATCH, 8, "protocol version mismatch")                              \
  X(PROTOCOL_ERROR, 9, "protocol error")                                           \
  X(IO_ERROR, 10, "i/o error")                                                     \
  X(TIMEOUT, 11, "timed out")                                                      \
  X(UNAVAILABLE, 12, "unavailable")                                                \
  X(NOT_READY, 13, "model not loaded yet")                                         \
  X(MODEL_IN_USE, 14, "model in use")                                              \
  X(CANCELLED, 15, "cancelled")                                                    \
  X(CUDA_ERROR, 16, "CUDA error")                                                  \
  X(CONNECTION_CLOSED, 17, "connection closed")                                    \
  X(INTERNAL, 18, "internal error")

#endif /* COMPANION_STATUS_CODES_H */
