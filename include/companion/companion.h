/**
 * Companion C ABI: the only stable binary interface (libcompanion.so). Everything else in
 * include/companion/ is C++ convenience over the same library.
 *
 * Conventions
 * - Every function returning companion_status returns COMPANION_OK or an error code; on error,
 *   companion_last_error() holds a human message for the calling thread until its next call.
 * - Handles are opaque. Each *_connect / *_get_* / *_subscribe that returns a handle transfers
 *   ownership to the caller, who frees it with the matching *_close / *_release.
 * - Strings returned through char** (JSON documents) are allocated by the library; free them with
 *   companion_free(). Strings passed in are borrowed for the duration of the call.
 * - Structs grow by appending fields, and the library never reads or writes past the end of the
 *   caller's struct (compiled against an older or newer companion.h): it uses the first
 *   min(caller's size, library's size) bytes and treats fields past the caller's end as their
 *   defaults. The caller's size travels in one of two ways:
 *   - option and table structs start with struct_size. companion_X_init(p) fills the defaults and
 *     sets struct_size to min(sizeof *p, the library's size): a value below sizeof *p says that
 *     the library is older than the header and ignores the fields past struct_size.
 *   - companion_tensor and companion_tensor_decl have no size field: the calls that fill or read
 *     them take the size as an argument (companion_model_tensor_sized...).
 *   The familiar names (companion_connect_options_init, companion_model_tensor...) are macros
 *   that pass sizeof of the caller's struct to the *_sized function (see the end of this file),
 *   so recompiled callers need no change. The functions of those names remain, for binaries
 *   built before the *_sized calls existed: they use exactly the struct sizes of that header.
 *   A literal NULL as the struct pointer no longer compiles through a macro (sizeof *NULL): call
 *   the *_sized function for that.
 * - No function throws or aborts: C++ exceptions never cross this boundary.
 *
 * Thread safety
 * - companion_client: may be used from several threads; requests are serialised internally.
 * - companion_model: immutable; any thread may read it; release it once.
 * - companion_status_stream: one thread at a time.
 * - companion_set_log_handler: any thread; the handler is called from library threads too (see
 *   there).
 */
#ifndef COMPANION_COMPANION_H
#define COMPANION_COMPANION_H

#include <stddef.h>
#include <stdint.h>

#include "companion/status_codes.h"

#ifdef __cplusplus
extern "C" {
#endif

#define COMPANION_API __attribute__((visibility("default")))

/** Status codes: the same list as the C++ StatusCode (status_codes.h). */
typedef enum companion_status {
#define COMPANION_C_ENUM(cname, cppname, value, text) COMPANION_##cname = value,
  COMPANION_STATUS_CODES(COMPANION_C_ENUM)
#undef COMPANION_C_ENUM
} companion_status;

/** Element types; the numbering matches the wire protocol. */
typedef enum companion_dtype {
  COMPANION_DTYPE_BOOL = 0,
  COMPANION_DTYPE_U8 = 1,
  COMPANION_DTYPE_I8 = 2,
  COMPANION_DTYPE_U16 = 3,
  COMPANION_DTYPE_I16 = 4,
  COMPANION_DTYPE_F16 = 5,
  COMPANION_DTYPE_BF16 = 6,
  COMPANION_DTYPE_U32 = 7,
  COMPANION_DTYPE_I32 = 8,
  COMPANION_DTYPE_F32 = 9,
  COMPANION_DTYPE_U64 = 10,
  COMPANION_DTYPE_I64 = 11,
  COMPANION_DTYPE_F64 = 12,
  COMPANION_DTYPE_F8_E4M3 = 13,
  COMPANION_DTYPE_F8_E5M2 = 14
} companion_dtype;

/** Where a tensor's data lives; the values are DLPack's DLDeviceType. */
typedef enum companion_device_type {
  COMPANION_DEVICE_CPU = 1,
  COMPANION_DEVICE_CUDA = 2
} companion_device_type;

typedef struct companion_client companion_client;
typedef struct companion_model companion_model;
typedef struct companion_status_stream companion_status_stream;
typedef struct companion_publication companion_publication;

typedef struct companion_connect_options {
  uint32_t struct_size;
  const char* ns;             /* namespace; default "companion" */
  const char* device;         /* "host" (default), or a GPU ordinal, UUID or PCI bus id */
  const char* socket_path;    /* connect here directly instead of discovering; NULL = discover */
  const char* runtime_dir;    /* local registry directory; NULL = default */
  const char* client_name;    /* shown in server logs; NULL = "companion-c" */
  double discovery_timeout_s; /* how long to wait for a live server; default 0 */
  /* Where to look for servers: NULL or "" = $COMPANION_REGISTRY, else the local registry;
   * "local"; or "etcd://host:port[,host:port]" (instances on this host only). */
  const char* registry;
  const char* instance_id; /* use only this server instance; NULL = choose among live ones */
} companion_connect_options;

typedef struct companion_model_spec {
  uint32_t struct_size;
  const char* source;   /* directory, .safetensors file or Hugging Face id "org/name" */
  const char* revision; /* NULL or "" = main */
  const char* dtype;    /* NULL, "" or "auto" = as stored; else "bf16", "fp16", "fp32"... */
  uint32_t tp_size;     /* default 1 */
  uint32_t tp_rank;     /* default 0 */
  const char* tag;      /* NULL = none */
} companion_model_spec;

/** One tensor of a mapped model. Pointers stay valid until the model is released. Newer headers
 * may append fields: the calls filling it take its size (companion_model_tensor_sized...). */
typedef struct companion_tensor {
  const char* name; /* not NUL-terminated: use name_length */
  size_t name_length;
  int32_t dtype; /* companion_dtype */
  int32_t ndim;
  const int64_t* shape;   /* ndim entries */
  const int64_t* strides; /* ndim entries, in elements */
  const void* data;       /* host or device pointer (read-only memory) */
  uint64_t nbytes;
  int32_t device_type; /* companion_device_type */
  int32_t device_id;   /* local CUDA ordinal, 0 for CPU */
} companion_tensor;

/** One tensor in a model's table (companion_model_get_table). Fields sit at their natural
 * alignment with no padding: 64 bytes, one layout for every compiler of a 64-bit target. Newer
 * libraries may append fields: step through the records by companion_model_table.record_size,
 * never by sizeof. */
typedef struct companion_tensor_record {
  const void* data;        /* host or device pointer (read-only memory) */
  uint64_t nbytes;         /* bytes of the tensor's extent */
  uint64_t segment_offset; /* data's byte offset from the start of its segment */
  uint64_t name_offset;    /* into companion_model_table.names */
  uint64_t dims_offset;    /* into companion_model_table.dims: ndim sizes, then ndim strides */
  uint32_t name_length;    /* bytes, without the NUL that follows every name in the blob */
  int32_t dtype;           /* companion_dtype */
  int32_t ndim;
  int32_t device_type; /* companion_device_type */
  int32_t device_id;   /* local CUDA ordinal, 0 for CPU */
  uint32_t segment;    /* index of the mapping the tensor lies in (0..segments-1) */
} companion_tensor_record;

/** A model's whole tensor table in three arrays, owned by the model handle (valid until
 * companion_model_release). Same order as companion_model_tensor. Set struct_size (e.g. with
 * companion_model_table_init); the library fills the members that fit. */
typedef struct companion_model_table {
  uint32_t struct_size;
  uint32_t record_size; /* bytes from one record to the next (>= the fields this header names) */
  size_t count;         /* records */
  const void* records;  /* count records, record_size bytes apart */
  /* Every name, each followed by one NUL byte, in table order (a name may itself contain NUL:
   * use name_offset/name_length for exactness). */
  const char* names;
  size_t names_bytes;
  const int64_t* dims; /* shapes and strides (in elements) that records point into */
  size_t dims_count;
  size_t segments; /* mappings of the model: records' segment is below this */
} companion_model_table;

/** One entry of a table to publish. Newer headers may append fields: arrays of entries are read
 * by the caller's sizeof (companion_publication_declare_sized). */
typedef struct companion_tensor_decl {
  const char* name;     /* NUL-terminated, unique in the table */
  int32_t dtype;        /* companion_dtype */
  int32_t ndim;         /* 0..16 */
  const int64_t* shape; /* ndim entries, each >= 0 */
  /* NULL, or the name of an earlier entry this one shares its bytes with (tied weights): same
   * dtype and shape, no bytes of its own. */
  const char* alias_of;
} companion_tensor_decl;

/** How companion_client_attach finds a model. */
typedef struct companion_attach_options {
  uint32_t struct_size;
  /* Generation to pin; 0 (default) = the newest committed one. */
  uint64_t generation;
  /* NULL = not checked; else a JSON object of strings that must equal the committed
   * generation's fingerprint (COMPANION_FINGERPRINT_MISMATCH names the differing fields). */
  const char* fingerprint_json;
  /* Non-zero: the key may also name a checkpoint (as companion_model_spec.source). A checkpoint
   * the server finds is used; only when it finds none is the key a published model's. Default
   * 0 (a published key only). */
  int32_t or_source;
  /* Non-zero (default): wait while a writer is publishing the key's first generation (or the
   * checkpoint loads); 0 = COMPANION_NOT_READY at once. */
  int32_t wait;
  double timeout_s; /* negative (default) = no limit */
} companion_attach_options;

/** companion_publish_claim's modes. */
typedef enum companion_claim_mode {
  /* Claim the key to publish its next generation; COMPANION_MODEL_IN_USE when another writer
   * holds it. */
  COMPANION_CLAIM_NOW = 0,
  /* As CLAIM_NOW, but wait (timeout_s) for another writer to finish first. */
  COMPANION_CLAIM_WAIT = 1,
  /* attach_or_publish: when a generation is committed, claim nothing (the fingerprint must
   * match: else COMPANION_FINGERPRINT_MISMATCH); while another writer publishes the first one,
   * wait for its commit, or for it to fail and this caller to take over. */
  COMPANION_CLAIM_IF_UNPUBLISHED = 2
} companion_claim_mode;

/** ---- errors and version ------------------------------------------------------------------- */

/** Fixed description of a code ("model not found"). Never NULL. */
COMPANION_API const char* companion_status_string(companion_status status);
/** The calling thread's message for its last failed call ("" if none). Valid until the thread's
 * next companion call. */
COMPANION_API const char* companion_last_error(void);
COMPANION_API const char* companion_version(void);
/** Frees a string or buffer the library returned. NULL is fine. */
COMPANION_API void companion_free(void* pointer);

/** ---- logging ------------------------------------------------------------------------------ */

/** Levels of the library's messages (companion_set_log_handler). */
typedef enum companion_log_level {
  COMPANION_LOG_DEBUG = 0,
  COMPANION_LOG_INFO = 1,
  COMPANION_LOG_WARN = 2,
  COMPANION_LOG_ERROR = 3,
  COMPANION_LOG_OFF = 4 /* as min_level: no message */
} companion_log_level;

/** Receives one message of the library: level is a companion_log_level, message one line of
 * printable UTF-8 (no newline; control bytes escaped as \n, \xNN), valid during the call only. */
typedef void (*companion_log_fn)(void* user, int level, const char* message);

/** Where the library's messages go, process-wide (one handler for every client). By default
 * nowhere: the library writes nothing to stderr, or anywhere else, until a handler is set.
 * fn(user, level, message) then receives the messages at min_level and above; fn = NULL sends
 * them nowhere again (the default). COMPANION_INVALID_ARGUMENT for a min_level that is not a
 * companion_log_level.
 *
 * Threads: fn is called from whichever thread logs, the library's own threads included, and
 * never from two threads at once (the library holds a lock while it runs). Keep it short and do
 * not call into the library from it: the library may hold locks of its own while it logs, and
 * companion_set_log_handler called there fails with COMPANION_INVALID_ARGUMENT. Any other
 * thread may call companion_set_log_handler at any time: when it returns, the previous handler
 * has returned from its every call and is never called again, so its user data may be freed. */
COMPANION_API companion_status companion_set_log_handler(companion_log_fn fn, void* user,
                                                         int min_level);

/** ---- options ------------------------------------------------------------------------------ */

/** Fill the defaults into the first min(size, library's size) bytes and set struct_size to that
 * many (nothing is written when size cannot hold struct_size). Called through the macros
 * companion_connect_options_init(p) / companion_model_spec_init(p), which pass sizeof *p. */
COMPANION_API void companion_connect_options_init_sized(companion_connect_options* options,
                                                        size_t size);
COMPANION_API void companion_model_spec_init_sized(companion_model_spec* spec, size_t size);
/** For binaries built against a header without the *_sized calls: as *_init_sized with that
 * header's struct size. */
COMPANION_API void companion_connect_options_init(companion_connect_options* options);
COMPANION_API void companion_model_spec_init(companion_model_spec* spec);

/** ---- client ------------------------------------------------------------------------------- */

/** Finds the server of options->device in options->ns and connects. options may be NULL (all
 * defaults). On success *client is a new handle. */
COMPANION_API companion_status companion_client_connect(const companion_connect_options* options,
                                                        companion_client** client);
/** Closes the connection. Models obtained from it stay valid (they keep what they need). */
COMPANION_API void companion_client_close(companion_client* client);

/** JSON documents (free with companion_free): the server's identity, one model's status, all
 * models, the server's health. Field names as in `companion ... --json`. */
COMPANION_API companion_status companion_client_server_info(companion_client* client, char** json);
COMPANION_API companion_status companion_client_status(companion_client* client,
                                                       const companion_model_spec* spec,
                                                       char** json);
COMPANION_API companion_status companion_client_list(companion_client* client, char** json);
COMPANION_API companion_status companion_client_health(companion_client* client, char** json);
/** The live instances the client chooses among (a JSON array of server identities). Requests
 * about a model go to the instance holding it, else round robin; a lost instance fails over to
 * the next live one. */
COMPANION_API companion_status companion_client_instances(companion_client* client, char** json);

/** Starts a load (wait = 0) or waits for it (wait != 0, up to timeout_s; negative = no limit).
 * *json (may be NULL) receives the model's status. */
COMPANION_API companion_status companion_client_load(companion_client* client,
                                                     const companion_model_spec* spec, int wait,
                                                     double timeout_s, char** json);
/** Unloads by spec, or by key / short id when key is not NULL. */
COMPANION_API companion_status companion_client_unload(companion_client* client,
                                                       const companion_model_spec* spec,
                                                       const char* key, int force, char** json);
/** Triggers the load if needed and waits for it (the seed prototype's wait_for_model_ready).
 * COMPANION_TIMEOUT when it takes longer; the load's own error when it fails. *json (may be NULL)
 * receives the status. */
COMPANION_API companion_status companion_client_wait_for_model_ready(
    companion_client* client, const companion_model_spec* spec, double initial_timeout_s,
    double loading_timeout_s, char** json);
/** Loads if needed and maps every tensor read-only into this process. */
COMPANION_API companion_status
companion_client_get_model_parameters(companion_client* client, const companion_model_spec* spec,
                                      double timeout_s, companion_model** model);

/** ---- mapped models ------------------------------------------------------------------------ */

/** Unmaps the model and releases its lease. Tensors from it must not be used afterwards. */
COMPANION_API void companion_model_release(companion_model* model);
COMPANION_API size_t companion_model_tensor_count(const companion_model* model);
/** Fills the first min(tensor_size, library's size) bytes of *tensor (tensor_size 0 is refused).
 * Called through the macro companion_model_tensor(model, index, tensor), which passes
 * sizeof *tensor. */
COMPANION_API companion_status companion_model_tensor_sized(const companion_model* model,
                                                            size_t index, companion_tensor* tensor,
                                                            size_t tensor_size);
/** As companion_model_tensor_sized, by name (macro: companion_model_find(model, name, tensor)).
 * COMPANION_NOT_FOUND when the model has no tensor of that name. */
COMPANION_API companion_status companion_model_find_sized(const companion_model* model,
                                                          const char* name,
                                                          companion_tensor* tensor,
                                                          size_t tensor_size);
/** For binaries built against a header without the *_sized calls (that header's tensor size). */
COMPANION_API companion_status companion_model_tensor(const companion_model* model, size_t index,
                                                      companion_tensor* tensor);
COMPANION_API companion_status companion_model_find(const companion_model* model, const char* name,
                                                    companion_tensor* tensor);
/** As companion_connect_options_init_sized (macro: companion_model_table_init(table)). */
COMPANION_API void companion_model_table_init_sized(companion_model_table* table, size_t size);
COMPANION_API void companion_model_table_init(companion_model_table* table);
/** The whole table in one call (no call per tensor): fills *table with pointers to arrays the
 * model handle owns (built on the first call, then shared; thread-safe). */
COMPANION_API companion_status companion_model_get_table(const companion_model* model,
                                                         companion_model_table* table);
/** One run of a view plan (companion_plan_views): `count` tensors of one segment, dtype, shape and
 * strides whose bytes start `step` bytes apart, so that a consumer can make them as one strided
 * view with a leading dimension of `count` and split it (torch: unbind(0)). 16 bytes. */
typedef struct companion_view_run {
  uint64_t step;  /* bytes from one tensor of the run to the next (0: they share their bytes) */
  uint32_t first; /* index into the plan's rows of the run's first tensor */
  uint32_t count; /* tensors in the run, >= 1 */
} companion_view_run;
/** Plans how to make every tensor of `table` (any table in companion_model_table's layout, e.g.
 * companion_model_get_table's) as views of a few base tensors, one per segment, dtype and offset
 * modulo the item size. The caller's arrays: rows[table->count] receives the table's rows run by
 * run (each run's in offset order), then the rows left out (no bytes, a size of 0, an unknown
 * dtype or segment), in table order; runs[table->count] receives *run_count runs; *planned is
 * how many rows the runs cover; segment_ends[table->segments] receives, per segment, the byte
 * offset where its last planned tensor ends. */
COMPANION_API companion_status companion_plan_views(const companion_model_table* table,
                                                    uint32_t* rows, companion_view_run* runs,
                                                    size_t* run_count, size_t* planned,
                                                    uint64_t* segment_ends);
/** The model's status and mapping facts (lease id, segments, bytes) as JSON. */
COMPANION_API companion_status companion_model_info(const companion_model* model, char** json);

/** ---- publishing ---------------------------------------------------------------------------- */
/* A writer publishes its own tensors under a key (any string) and a fingerprint (JSON object of
 * strings: engine, version, dtype, ranks...). The publication holds a connection of its own, and
 * that connection is the key's writer lock: closing the publication, or the process dying, before
 * commit aborts and frees the memory. Flow: claim -> declare (the server allocates one slab and
 * maps it writable into this process) -> write the tensors -> commit (the server digests and seals
 * it; new attaches get this generation). */

/** Claims `key` for writing. *publication is NULL (and COMPANION_OK returned) only in mode
 * COMPANION_CLAIM_IF_UNPUBLISHED when a generation is committed: attach it instead. */
COMPANION_API companion_status companion_publish_claim(companion_client* client, const char* key,
                                                       const char* fingerprint_json, int32_t mode,
                                                       double timeout_s,
                                                       companion_publication** publication);
/** Declares the table; the server allocates its slab. Once per publication. The entries are
 * decl_size bytes apart (macro: companion_publication_declare(publication, tensors, count)
 * passes sizeof *tensors); decl_size must cover name..shape, and fields past it are defaults. */
COMPANION_API companion_status companion_publication_declare_sized(
    companion_publication* publication, const companion_tensor_decl* tensors, size_t count,
    size_t decl_size);
COMPANION_API size_t companion_publication_tensor_count(const companion_publication* publication);
/** A declared tensor; `data` is writable (cast away const) until commit. Host or device memory
 * (device_type), as the server's backend. Fills min(tensor_size, library's size) bytes (macro:
 * companion_publication_tensor(publication, index, tensor)). */
COMPANION_API companion_status
companion_publication_tensor_sized(const companion_publication* publication, size_t index,
                                   companion_tensor* tensor, size_t tensor_size);
/** For binaries built against a header without the *_sized calls (that header's struct sizes). */
COMPANION_API companion_status companion_publication_declare(companion_publication* publication,
                                                             const companion_tensor_decl* tensors,
                                                             size_t count);
COMPANION_API companion_status companion_publication_tensor(
    const companion_publication* publication, size_t index, companion_tensor* tensor);
/** Key, generation, segments and bytes as JSON. */
COMPANION_API companion_status companion_publication_info(const companion_publication* publication,
                                                          char** json);
/** Ends writing (device work must be finished: the library synchronises its own context first),
 * then the server digests and seals the slab and makes it the key's newest generation. The
 * publication's mapping stays, read-only, as *model (a lease of the committed generation, also
 * valid after companion_publication_close); model may be NULL to drop it. */
COMPANION_API companion_status companion_publication_commit(companion_publication* publication,
                                                            companion_model** model);
/** Aborts if not committed (the server frees the slab) and frees the handle. */
COMPANION_API void companion_publication_close(companion_publication* publication);

/** As companion_connect_options_init_sized (macro: companion_attach_options_init(options)). */
COMPANION_API void companion_attach_options_init_sized(companion_attach_options* options,
                                                       size_t size);
COMPANION_API void companion_attach_options_init(companion_attach_options* options);
/** Maps a published model (or, with or_source, a checkpoint) read-only, checking the fingerprint
 * when asked. */
COMPANION_API companion_status companion_client_attach(companion_client* client, const char* key,
                                                       const companion_attach_options* options,
                                                       companion_model** model);
/** Loads a new generation of a loaded model whose files changed (size, mtime, inode), or of any
 * loaded model with force; readers of the old one keep it. JSON status when done. */
COMPANION_API companion_status companion_client_reload(companion_client* client,
                                                       const char* key_or_id, int32_t force,
                                                       double timeout_s, char** json);

/** ---- status streams ----------------------------------------------------------------------- */

/** Subscribes to one model's status (spec) or to every model's (spec == NULL). The current state
 * comes first, then every change. companion_client_subscribe_key: one published key's. */
COMPANION_API companion_status companion_client_subscribe(companion_client* client,
                                                          const companion_model_spec* spec,
                                                          companion_status_stream** stream);
/** The next status as JSON; COMPANION_TIMEOUT after timeout_s (negative = wait forever). */
COMPANION_API companion_status companion_client_subscribe_key(companion_client* client,
                                                              const char* key,
                                                              companion_status_stream** stream);
COMPANION_API companion_status companion_status_stream_next(companion_status_stream* stream,
                                                            double timeout_s, char** json);
COMPANION_API void companion_status_stream_close(companion_status_stream* stream);

/** ---- sizes of the caller's structs ------------------------------------------------------- */
/* The familiar names pass the size of the caller's struct, as this header declares it, to the
 * *_sized functions (see Conventions at the top). Defined after the declarations, so that the
 * functions of the same names stay declared for binaries built before; (name)(args) calls one. */
#define companion_connect_options_init(options) \
  companion_connect_options_init_sized((options), sizeof *(options))
#define companion_model_spec_init(spec) companion_model_spec_init_sized((spec), sizeof *(spec))
#define companion_attach_options_init(options) \
  companion_attach_options_init_sized((options), sizeof *(options))
#define companion_model_table_init(table) companion_model_table_init_sized((table), sizeof *(table))
#define companion_model_tensor(model, index, tensor) \
  companion_model_tensor_sized((model), (index), (tensor), sizeof *(tensor))
#define companion_model_find(model, name, tensor) \
  companion_model_find_sized((model), (name), (tensor), sizeof *(tensor))
#define companion_publication_tensor(publication, index, tensor) \
  companion_publication_tensor_sized((publication), (index), (tensor), sizeof *(tensor))
#define companion_publication_declare(publication, tensors, count) \
  companion_publication_declare_sized((publication), (tensors), (count), sizeof *(tensors))

#ifdef __cplusplus
}
#endif

#endif /* COMPANION_COMPANION_H */
