// The C ABI (include/companion/companion.h) over the C++ client. Every entry point catches every
// exception, checks its pointers, and turns Result errors into a status code plus a per-thread
// message (companion_last_error).
#include "companion/companion.h"

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <memory>
#include <mutex>
#include <new>
#include <span>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "capi/view_plan.hpp"
#include "client/json.hpp"
#include "client/publication.hpp"
#include "common/log.hpp"
#include "companion/client.hpp"

// The C and C++ lists come from one X-macro; check anyway that the values agree.
#define COMPANION_CHECK_CODE(cname, name, value, text)                  \
  static_assert(static_cast<int>(COMPANION_##cname) ==                  \
                    static_cast<int>(companion::StatusCode::k##name) && \
                static_cast<int>(COMPANION_##cname) == (value));
COMPANION_STATUS_CODES(COMPANION_CHECK_CODE)
#undef COMPANION_CHECK_CODE

static_assert(COMPANION_DTYPE_BOOL == static_cast<int>(companion::DType::kBool));
static_assert(COMPANION_DTYPE_U8 == static_cast<int>(companion::DType::kU8));
static_assert(COMPANION_DTYPE_I8 == static_cast<int>(companion::DType::kI8));
static_assert(COMPANION_DTYPE_U16 == static_cast<int>(companion::DType::kU16));
static_assert(COMPANION_DTYPE_I16 == static_cast<int>(companion::DType::kI16));
static_assert(COMPANION_DTYPE_F16 == static_cast<int>(companion::DType::kF16));
static_assert(COMPANION_DTYPE_BF16 == static_cast<int>(companion::DType::kBF16));
static_assert(COMPANION_DTYPE_U32 == static_cast<int>(companion::DType::kU32));
static_assert(COMPANION_DTYPE_I32 == static_cast<int>(companion::DType::kI32));
static_assert(COMPANION_DTYPE_F32 == static_cast<int>(companion::DType::kF32));
static_assert(COMPANION_DTYPE_U64 == static_cast<int>(companion::DType::kU64));
static_assert(COMPANION_DTYPE_I64 == static_cast<int>(companion::DType::kI64));
static_assert(COMPANION_DTYPE_F64 == static_cast<int>(companion::DType::kF64));
static_assert(COMPANION_DTYPE_F8_E4M3 == static_cast<int>(companion::DType::kF8E4M3));
static_assert(COMPANION_DTYPE_F8_E5M2 == static_cast<int>(companion::DType::kF8E5M2));
static_assert(companion::kDTypeCount == COMPANION_DTYPE_F8_E5M2 + 1);

static_assert(COMPANION_LOG_DEBUG == static_cast<int>(companion::log::Level::kDebug));
static_assert(COMPANION_LOG_INFO == static_cast<int>(companion::log::Level::kInfo));
static_assert(COMPANION_LOG_WARN == static_cast<int>(companion::log::Level::kWarn));
static_assert(COMPANION_LOG_ERROR == static_cast<int>(companion::log::Level::kError));
static_assert(COMPANION_LOG_OFF == static_cast<int>(companion::log::Level::kOff));
static_assert(std::is_same_v<companion_log_fn, companion::log::Handler>);

// companion.h promises one layout for the record on every 64-bit compiler (the Python package
// reads it with struct, not through a C compiler): all fields at their natural alignment, no
// padding, 64 bytes.
#if UINTPTR_MAX == UINT64_MAX
static_assert(sizeof(companion_tensor_record) == 64);
static_assert(offsetof(companion_tensor_record, name_length) == 40);
static_assert(offsetof(companion_tensor_record, segment) == 60);
#endif

// The unsized entry points serve binaries built against companion.h before the *_sized calls
// existed: those callers' structs end where that header's did. Their sizes are frozen here
// (through the last member that header declared) and must not change when a struct grows.
#define COMPANION_SIZE_THROUGH(type, member) (offsetof(type, member) + sizeof(type::member))
constexpr size_t kLegacyConnectOptionsSize =
    COMPANION_SIZE_THROUGH(companion_connect_options, instance_id);
constexpr size_t kLegacyModelSpecSize = COMPANION_SIZE_THROUGH(companion_model_spec, tag);
constexpr size_t kLegacyAttachOptionsSize =
    COMPANION_SIZE_THROUGH(companion_attach_options, timeout_s);
constexpr size_t kLegacyModelTableSize = COMPANION_SIZE_THROUGH(companion_model_table, segments);
constexpr size_t kLegacyTensorSize = COMPANION_SIZE_THROUGH(companion_tensor, device_id);
constexpr size_t kLegacyTensorDeclSize = COMPANION_SIZE_THROUGH(companion_tensor_decl, alias_of);
// A declaration must reach at least through shape (alias_of and later fields have defaults).
constexpr size_t kRequiredTensorDeclSize = COMPANION_SIZE_THROUGH(companion_tensor_decl, shape);
#undef COMPANION_SIZE_THROUGH
#if UINTPTR_MAX == UINT64_MAX
// The 64-bit values, so that a member inserted before these ones (which would move them) fails
// here.
static_assert(kLegacyConnectOptionsSize == 72 && kLegacyModelSpecSize == 48 &&
              kLegacyAttachOptionsSize == 40 && kLegacyModelTableSize == 64 &&
              kLegacyTensorSize == 64 && kLegacyTensorDeclSize == 32);
#endif

// The opaque handles of companion.h.
struct companion_client {
  std::unique_ptr<companion::Client> client;
};

struct companion_model {
  std::shared_ptr<companion::MappedModel> model;
  // companion_model_get_table's arrays. Built on its first call rather than here, so callers that
  // never ask (most C and C++ users) pay nothing; call_once keeps the handle safe to read from
  // several threads, as companion.h promises.
  mutable std::once_flag table_once;
  mutable std::vector<companion_tensor_record> records;
  // Where names and dims are: in the model's own table (protocol 1.2) when it holds them in the
  // promised layout, else in the copies below.
  mutable const char* names_at = nullptr;
  mutable size_t names_bytes = 0;
  mutable const int64_t* dims_at = nullptr;
  mutable size_t dims_count = 0;
  mutable std::string names;
  mutable std::vector<int64_t> dims;
};

struct companion_status_stream {
  std::unique_ptr<companion::StatusStream> stream;
};

struct companion_publication {
  std::unique_ptr<companion::Publication> publication;
  std::vector<companion_tensor> tensors;  // built at declare; data pointers writable
};

namespace {

using companion::Error;
using companion::ModelSpec;
using companion::Result;
using companion::StatusCode;

// The calling thread's message for its last failed call. Reset by every call that returns a
// companion_status (and by nothing else, so that companion_status_string() or companion_version()
// evaluated next to companion_last_error() in one expression cannot wipe it).
thread_local std::string t_last_error;

// Longest timeout honoured as such: the client counts milliseconds in an int. Anything longer
// (infinity included) means "no limit".
constexpr double kMaxTimeoutS = 1.0e6;

companion_status to_c(StatusCode code) noexcept {
  return static_cast<companion_status>(static_cast<int>(code));
}

// Records the message; never throws (a message that cannot be stored is dropped).
companion_status fail(companion_status status, const char* message) noexcept {
  try {
    t_last_error = message;
  } catch (...) {
    t_last_error.clear();
  }
  return status;
}

companion_status fail(companion_status status, const std::string& message) noexcept {
  return fail(status, message.c_str());
}

companion_status fail(const Error& e) noexcept {
  return fail(to_c(e.code),
              e.message.empty() ? companion::status_code_text(e.code) : e.message.c_str());
}

companion_status invalid(const char* message) noexcept {
  return fail(COMPANION_INVALID_ARGUMENT, message);
}

// Runs the body of an entry point: clears the thread's message, and turns any exception into a
// status code (no exception crosses the C boundary).
template <typename Body>
companion_status guarded(Body&& body) noexcept {
  try {
    t_last_error.clear();
    return body();
  } catch (const std::bad_alloc&) {
    return fail(COMPANION_OUT_OF_MEMORY, "out of memory");
  } catch (const std::exception& e) {
    return fail(COMPANION_INTERNAL, std::string("internal error: ") + e.what());
  } catch (...) {
    return fail(COMPANION_INTERNAL, "internal error: unknown exception");
  }
}

// For the functions that return no status (close, release, count): swallow everything.
template <typename Body>
void quietly(Body&& body) noexcept {
  try {
    body();
  } catch (...) {
  }
}

// True when a caller's struct (struct_size bytes long) contains the member.
#define COMPANION_FITS(s, member)           \
  (static_cast<size_t>((s)->struct_size) >= \
   offsetof(std::remove_cv_t<std::remove_pointer_t<decltype(s)>>, member) + sizeof((s)->member))

// A string member that fits and is neither NULL nor empty.
#define COMPANION_STRING(s, member) \
  (COMPANION_FITS(s, member) && (s)->member != nullptr && (s)->member[0] != '\0')

Result<ModelSpec> to_spec(const companion_model_spec* s) {
  if (s == nullptr) return companion::make_error(StatusCode::kInvalidArgument, "spec is NULL");
  if (s->struct_size == 0)
    return companion::make_error(
        StatusCode::kInvalidArgument,
        "spec->struct_size is 0: initialise the spec with companion_model_spec_init()");
  ModelSpec spec;
  if (!COMPANION_FITS(s, source) || s->source == nullptr)
    return companion::make_error(StatusCode::kInvalidArgument, "spec->source is NULL");
  spec.source = s->source;
  if (COMPANION_STRING(s, revision)) spec.revision = s->revision;
  if (COMPANION_STRING(s, dtype) && std::strcmp(s->dtype, "auto") != 0) {
    COMPANION_ASSIGN_OR_RETURN(companion::DType d, companion::parse_dtype(s->dtype));
    spec.dtype = d;
  }
  if (COMPANION_FITS(s, tp_size)) spec.tp_size = s->tp_size;
  if (COMPANION_FITS(s, tp_rank)) spec.tp_rank = s->tp_rank;
  if (COMPANION_STRING(s, tag)) spec.tag = s->tag;
  COMPANION_TRY(spec.validate());
  return spec;
}

// A timeout argument: NaN is refused; negative or beyond kMaxTimeoutS becomes -1 (no limit).
Result<double> to_timeout(double seconds, const char* name) {
  if (std::isnan(seconds))
    return companion::make_error(StatusCode::kInvalidArgument, std::string(name) + " is NaN");
  if (seconds < 0 || seconds > kMaxTimeoutS) return -1.0;
  return seconds;
}

Result<companion::ConnectOptions> to_connect_options(const companion_connect_options* o) {
  companion::ConnectOptions options;
  options.client_name = "companion-c";
  if (o == nullptr) return options;
  if (o->struct_size == 0)
    return companion::make_error(
        StatusCode::kInvalidArgument,
        "options->struct_size is 0: initialise the options with companion_connect_options_init()");
  if (COMPANION_STRING(o, ns)) options.ns = o->ns;
  if (COMPANION_STRING(o, device)) options.device = o->device;
  if (COMPANION_STRING(o, socket_path)) options.socket_path = o->socket_path;
  if (COMPANION_STRING(o, runtime_dir)) options.runtime_dir = o->runtime_dir;
  if (COMPANION_STRING(o, client_name)) options.client_name = o->client_name;
  if (COMPANION_STRING(o, registry)) options.registry = o->registry;
  if (COMPANION_STRING(o, instance_id)) options.instance_id = o->instance_id;
  if (COMPANION_FITS(o, discovery_timeout_s)) {
    double t = o->discovery_timeout_s;
    if (std::isnan(t))
      return companion::make_error(StatusCode::kInvalidArgument,
                                   "options->discovery_timeout_s is NaN");
    options.discovery_timeout_s = t < 0 ? 0 : (t > kMaxTimeoutS ? kMaxTimeoutS : t);
  }
  return options;
}

// Hands a JSON document to the caller as a malloc'd string (companion_free releases it). Invalid
// UTF-8 (a path with odd bytes) is replaced rather than thrown about.
void put_json(const nlohmann::json& j, char** out) {
  if (out == nullptr) return;
  std::string text = j.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
  auto* p = static_cast<char*>(std::malloc(text.size() + 1));
  if (p == nullptr) throw std::bad_alloc();
  std::memcpy(p, text.c_str(), text.size() + 1);
  *out = p;
}

// Sets *out to NULL (when out is not NULL) so that a failed call leaves no stale pointer.
template <typename T>
void clear_out(T** out) noexcept {
  if (out != nullptr) *out = nullptr;
}

// Copies the first min(caller_size, sizeof(T)) bytes of `value` into the caller's struct (which
// ends after caller_size bytes), with struct_size saying how many that was. Nothing is written
// when the caller's struct cannot even hold struct_size.
template <typename T>
void init_struct(T* out, size_t caller_size, T value) noexcept {
  if (out == nullptr || caller_size < sizeof(value.struct_size)) return;
  size_t size = std::min(caller_size, sizeof(T));
  value.struct_size = static_cast<uint32_t>(size);
  std::memcpy(static_cast<void*>(out), &value, size);
}

// A struct with every byte zero, padding included.
template <typename T>
T zeroed() noexcept {
  T value;
  std::memset(static_cast<void*>(&value), 0, sizeof(value));
  return value;
}

// Writes a tensor into the caller's companion_tensor of tensor_size bytes (its header's sizeof).
// The callers have checked that out is not NULL.
companion_status put_tensor(const companion_tensor& t, companion_tensor* out, size_t tensor_size) {
  if (tensor_size == 0) return invalid("tensor_size is 0: pass sizeof(companion_tensor)");
  std::memcpy(static_cast<void*>(out), &t, std::min(tensor_size, sizeof(t)));
  return COMPANION_OK;
}

companion_tensor to_c(const companion::TensorView& v) {
  auto t = zeroed<companion_tensor>();
  t.name = v.name.data();
  t.name_length = v.name.size();
  t.dtype = static_cast<int32_t>(v.dtype);
  t.ndim = static_cast<int32_t>(v.shape.size());
  t.shape = v.shape.data();
  t.strides = v.strides.data();
  t.data = v.data;
  t.nbytes = v.nbytes;
  t.device_type = v.on_device ? COMPANION_DEVICE_CUDA : COMPANION_DEVICE_CPU;
  t.device_id = v.on_device && v.device_ordinal > 0 ? v.device_ordinal : 0;
  return t;
}

// A fingerprint from its JSON text: an object of strings (NULL: none, as an empty object).
Result<companion::Fingerprint> to_fingerprint(const char* json) {
  companion::Fingerprint out;
  if (json == nullptr) return out;
  auto bad = [](const std::string& why) {
    return companion::make_error(StatusCode::kInvalidArgument, "fingerprint_json: " + why);
  };
  nlohmann::json j = nlohmann::json::parse(json, nullptr, false);
  if (j.is_discarded()) return bad("not valid JSON");
  if (!j.is_object()) return bad("must be a JSON object of strings");
  for (const auto& [name, value] : j.items()) {
    if (!value.is_string()) return bad("the value of '" + name + "' is not a string");
    out[name] = value.get<std::string>();
  }
  return out;
}

// Whether the views' names already lie back to back, each followed by a NUL, and their shapes
// and strides back to back (shape then strides per view): the layout of protocol 1.2's tables,
// which the table arrays can then point into instead of copying.
bool laid_out_as_table(std::span<const companion::TensorView> views) {
  if (views.empty()) return false;
  const char* name = views[0].name.data();
  const int64_t* dims = views[0].shape.data();
  if (name == nullptr || dims == nullptr) return false;
  for (const auto& v : views) {
    // Pointer checks first: the NUL is read only where the previous view's layout says a name
    // ends inside the same blob (the first view's, inside a table or a FlatBuffer string).
    if (v.name.data() != name || v.shape.data() != dims || v.strides.size() != v.shape.size() ||
        v.strides.data() != dims + v.shape.size() || name[v.name.size()] != '\0')
      return false;
    name += v.name.size() + 1;
    dims += 2 * v.shape.size();
  }
  return true;
}

// Fills the model's table arrays from its views. Names (each followed by a NUL) and shapes and
// strides are handed out in place when the views lie in a 1.2 table, else copied, so that a
// caller can take each array in one read.
// One view as a table record; name and dims offsets are the caller's (in place or copied).
companion_tensor_record table_record(const companion::TensorView& v, uint64_t name_offset,
                                     uint64_t dims_offset) {
  companion_tensor_record r{};
  r.data = v.data;
  r.nbytes = v.nbytes;
  r.segment_offset = v.offset;
  r.name_offset = name_offset;
  r.dims_offset = dims_offset;
  r.name_length = static_cast<uint32_t>(v.name.size());
  r.dtype = static_cast<int32_t>(v.dtype);
  r.ndim = static_cast<int32_t>(v.shape.size());
  r.device_type = v.on_device ? COMPANION_DEVICE_CUDA : COMPANION_DEVICE_CPU;
  r.device_id = v.on_device && v.device_ordinal > 0 ? v.device_ordinal : 0;
  r.segment = v.segment;
  return r;
}

void build_table(const companion_model& handle) {
  handle.records.clear();
  handle.names.clear();
  handle.dims.clear();
  auto views = handle.model->tensors();
  if (laid_out_as_table(views)) {
    const char* names = views[0].name.data();
    const int64_t* dims = views[0].shape.data();
    handle.records.resize(views.size());
    for (size_t i = 0; i < views.size(); ++i) {
      const auto& v = views[i];
      handle.records[i] = table_record(v, static_cast<uint64_t>(v.name.data() - names),
                                       static_cast<uint64_t>(v.shape.data() - dims));
    }
    const auto& last = views.back();
    handle.names_at = names;
    handle.names_bytes = static_cast<size_t>(last.name.data() + last.name.size() + 1 - names);
    handle.dims_at = dims;
    handle.dims_count = static_cast<size_t>(last.strides.data() + last.strides.size() - dims);
    return;
  }
  size_t name_bytes = 0;
  size_t dim_count = 0;
  for (const auto& v : views) {
    name_bytes += v.name.size() + 1;
    dim_count += 2 * v.shape.size();
  }
  handle.records.reserve(views.size());
  handle.names.reserve(name_bytes);
  handle.dims.reserve(dim_count);
  for (const auto& v : views) {
    companion_tensor_record r = table_record(v, handle.names.size(), handle.dims.size());
    handle.names.append(v.name);
    handle.names.push_back('\0');
    handle.dims.insert(handle.dims.end(), v.shape.begin(), v.shape.end());
    if (v.strides.size() == v.shape.size()) {
      handle.dims.insert(handle.dims.end(), v.strides.begin(), v.strides.end());
    } else {
      // A view without strides is contiguous; the record promises ndim of them regardless.
      size_t first = handle.dims.size();
      handle.dims.resize(first + v.shape.size());
      int64_t step = 1;
      for (size_t d = v.shape.size(); d-- > 0;) {
        handle.dims[first + d] = step;
        step *= v.shape[d] > 0 ? v.shape[d] : 1;
      }
    }
    handle.records.push_back(r);
  }
  handle.names_at = handle.names.data();
  handle.names_bytes = handle.names.size();
  handle.dims_at = handle.dims.data();
  handle.dims_count = handle.dims.size();
}

companion_model* wrap_model(std::shared_ptr<companion::MappedModel> mapped) {
  auto handle = std::make_unique<companion_model>();
  handle->model = std::move(mapped);
  return handle.release();
}

}  // namespace

// ---- errors and version --------------------------------------------------------------------

const char* companion_status_string(companion_status status) {
  // A C caller may pass any int; in C++ a value outside the enumerators' range must not be read
  // as a companion_status, so take its bytes as an int (unknown values get "unknown status").
  static_assert(sizeof(status) == sizeof(int));
  int value = 0;
  std::memcpy(&value, &status, sizeof(value));
  return companion::status_code_text(static_cast<StatusCode>(value));
}

const char* companion_last_error(void) {
  return t_last_error.c_str();
}

const char* companion_version(void) {
  return companion::software_version();
}

void companion_free(void* pointer) {
  std::free(pointer);
}

// ---- logging -------------------------------------------------------------------------------

companion_status companion_set_log_handler(companion_log_fn fn, void* user, int min_level) {
  return guarded([&]() -> companion_status {
    if (min_level < COMPANION_LOG_DEBUG || min_level > COMPANION_LOG_OFF)
      return invalid("min_level is not a companion_log_level (COMPANION_LOG_DEBUG..OFF)");
    if (!companion::log::set_handler(fn, user, static_cast<companion::log::Level>(min_level)))
      return invalid("companion_set_log_handler called from inside the log handler");
    return COMPANION_OK;
  });
}

// ---- options -------------------------------------------------------------------------------

// The unsized functions' definitions parenthesise their names: companion.h also defines those
// names as macros (passing sizeof to the *_sized functions).

void companion_connect_options_init_sized(companion_connect_options* options, size_t size) {
  auto defaults = zeroed<companion_connect_options>();
  defaults.ns = "companion";
  defaults.device = "host";
  defaults.socket_path = nullptr;
  defaults.runtime_dir = nullptr;
  defaults.client_name = "companion-c";
  defaults.discovery_timeout_s = 0.0;
  defaults.registry = nullptr;
  defaults.instance_id = nullptr;
  init_struct(options, size, defaults);
}

void(companion_connect_options_init)(companion_connect_options* options) {
  companion_connect_options_init_sized(options, kLegacyConnectOptionsSize);
}

void companion_model_spec_init_sized(companion_model_spec* spec, size_t size) {
  auto defaults = zeroed<companion_model_spec>();
  defaults.source = nullptr;
  defaults.revision = nullptr;
  defaults.dtype = nullptr;
  defaults.tp_size = 1;
  defaults.tp_rank = 0;
  defaults.tag = nullptr;
  init_struct(spec, size, defaults);
}

void(companion_model_spec_init)(companion_model_spec* spec) {
  companion_model_spec_init_sized(spec, kLegacyModelSpecSize);
}

// ---- client --------------------------------------------------------------------------------

companion_status companion_client_connect(const companion_connect_options* options,
                                          companion_client** client) {
  return guarded([&]() -> companion_status {
    clear_out(client);
    if (client == nullptr) return invalid("client (the out pointer) is NULL");
    auto o = to_connect_options(options);
    if (!o.ok()) return fail(o.error());
    auto c = companion::Client::connect(*o);
    if (!c.ok()) return fail(c.error());
    *client = new companion_client{std::move(*c)};
    return COMPANION_OK;
  });
}

void companion_client_close(companion_client* client) {
  quietly([&] { delete client; });
}

companion_status companion_client_server_info(companion_client* client, char** json) {
  return guarded([&]() -> companion_status {
    clear_out(json);
    if (client == nullptr) return invalid("client is NULL");
    if (json == nullptr) return invalid("json (the out pointer) is NULL");
    put_json(companion::client::to_json(client->client->server()), json);
    return COMPANION_OK;
  });
}

companion_status companion_client_status(companion_client* client, const companion_model_spec* spec,
                                         char** json) {
  return guarded([&]() -> companion_status {
    clear_out(json);
    if (client == nullptr) return invalid("client is NULL");
    if (json == nullptr) return invalid("json (the out pointer) is NULL");
    auto s = to_spec(spec);
    if (!s.ok()) return fail(s.error());
    auto status = client->client->status(*s);
    if (!status.ok()) return fail(status.error());
    put_json(companion::client::to_json(*status), json);
    return COMPANION_OK;
  });
}

companion_status companion_client_list(companion_client* client, char** json) {
  return guarded([&]() -> companion_status {
    clear_out(json);
    if (client == nullptr) return invalid("client is NULL");
    if (json == nullptr) return invalid("json (the out pointer) is NULL");
    auto models = client->client->list();
    if (!models.ok()) return fail(models.error());
    nlohmann::json j = nlohmann::json::array();
    for (const auto& m : *models) j.push_back(companion::client::to_json(m));
    put_json(j, json);
    return COMPANION_OK;
  });
}

companion_status companion_client_health(companion_client* client, char** json) {
  return guarded([&]() -> companion_status {
    clear_out(json);
    if (client == nullptr) return invalid("client is NULL");
    if (json == nullptr) return invalid("json (the out pointer) is NULL");
    auto h = client->client->health();
    if (!h.ok()) return fail(h.error());
    put_json(companion::client::to_json(*h), json);
    return COMPANION_OK;
  });
}

companion_status companion_client_instances(companion_client* client, char** json) {
  return guarded([&]() -> companion_status {
    clear_out(json);
    if (client == nullptr) return invalid("client is NULL");
    if (json == nullptr) return invalid("json (the out pointer) is NULL");
    auto list = client->client->instances();
    if (!list.ok()) return fail(list.error());
    nlohmann::json out = nlohmann::json::array();
    for (const auto& s : *list) out.push_back(companion::client::to_json(s));
    put_json(out, json);
    return COMPANION_OK;
  });
}

companion_status companion_client_load(companion_client* client, const companion_model_spec* spec,
                                       int wait, double timeout_s, char** json) {
  return guarded([&]() -> companion_status {
    clear_out(json);
    if (client == nullptr) return invalid("client is NULL");
    auto s = to_spec(spec);
    if (!s.ok()) return fail(s.error());
    auto timeout = to_timeout(timeout_s, "timeout_s");
    if (!timeout.ok()) return fail(timeout.error());
    auto status = client->client->load(*s, wait != 0, {}, *timeout);
    if (!status.ok()) return fail(status.error());
    put_json(companion::client::to_json(*status), json);
    return COMPANION_OK;
  });
}

companion_status companion_client_unload(companion_client* client, const companion_model_spec* spec,
                                         const char* key, int force, char** json) {
  return guarded([&]() -> companion_status {
    clear_out(json);
    if (client == nullptr) return invalid("client is NULL");
    Result<companion::ModelStatus> status = Error{};
    if (key != nullptr) {
      if (key[0] == '\0') return invalid("key is empty");
      status = client->client->unload_key(key, force != 0);
    } else {
      if (spec == nullptr) return invalid("spec and key are both NULL");
      auto s = to_spec(spec);
      if (!s.ok()) return fail(s.error());
      status = client->client->unload(*s, force != 0);
    }
    if (!status.ok()) return fail(status.error());
    put_json(companion::client::to_json(*status), json);
    return COMPANION_OK;
  });
}

companion_status companion_client_wait_for_model_ready(companion_client* client,
                                                       const companion_model_spec* spec,
                                                       double initial_timeout_s,
                                                       double loading_timeout_s, char** json) {
  return guarded([&]() -> companion_status {
    clear_out(json);
    if (client == nullptr) return invalid("client is NULL");
    auto s = to_spec(spec);
    if (!s.ok()) return fail(s.error());
    auto initial = to_timeout(initial_timeout_s, "initial_timeout_s");
    if (!initial.ok()) return fail(initial.error());
    auto loading = to_timeout(loading_timeout_s, "loading_timeout_s");
    if (!loading.ok()) return fail(loading.error());
    auto status = client->client->wait_for_model_ready(*s, *initial, *loading);
    if (!status.ok()) return fail(status.error());
    put_json(companion::client::to_json(*status), json);
    return COMPANION_OK;
  });
}

companion_status companion_client_get_model_parameters(companion_client* client,
                                                       const companion_model_spec* spec,
                                                       double timeout_s, companion_model** model) {
  return guarded([&]() -> companion_status {
    clear_out(model);
    if (client == nullptr) return invalid("client is NULL");
    if (model == nullptr) return invalid("model (the out pointer) is NULL");
    auto s = to_spec(spec);
    if (!s.ok()) return fail(s.error());
    auto timeout = to_timeout(timeout_s, "timeout_s");
    if (!timeout.ok()) return fail(timeout.error());
    auto mapped = client->client->get_model_parameters(*s, *timeout);
    if (!mapped.ok()) return fail(mapped.error());
    *model = wrap_model(std::move(*mapped));
    return COMPANION_OK;
  });
}

// ---- mapped models -------------------------------------------------------------------------

void companion_model_release(companion_model* model) {
  quietly([&] { delete model; });
}

size_t companion_model_tensor_count(const companion_model* model) {
  return model == nullptr ? 0 : model->model->tensors().size();
}

companion_status companion_model_tensor_sized(const companion_model* model, size_t index,
                                              companion_tensor* tensor, size_t tensor_size) {
  return guarded([&]() -> companion_status {
    if (model == nullptr) return invalid("model is NULL");
    if (tensor == nullptr) return invalid("tensor (the out pointer) is NULL");
    auto views = model->model->tensors();
    if (index >= views.size())
      return invalid(("tensor index " + std::to_string(index) + " is out of range (the model has " +
                      std::to_string(views.size()) + " tensors)")
                         .c_str());
    return put_tensor(to_c(views[index]), tensor, tensor_size);
  });
}

companion_status(companion_model_tensor)(const companion_model* model, size_t index,
                                         companion_tensor* tensor) {
  return companion_model_tensor_sized(model, index, tensor, kLegacyTensorSize);
}

companion_status companion_model_find_sized(const companion_model* model, const char* name,
                                            companion_tensor* tensor, size_t tensor_size) {
  return guarded([&]() -> companion_status {
    if (model == nullptr) return invalid("model is NULL");
    if (name == nullptr) return invalid("name is NULL");
    if (tensor == nullptr) return invalid("tensor (the out pointer) is NULL");
    const companion::TensorView* v = model->model->find(name);
    if (v == nullptr)
      return fail(COMPANION_NOT_FOUND, "the model has no tensor named '" + std::string(name) + "'");
    return put_tensor(to_c(*v), tensor, tensor_size);
  });
}

companion_status(companion_model_find)(const companion_model* model, const char* name,
                                       companion_tensor* tensor) {
  return companion_model_find_sized(model, name, tensor, kLegacyTensorSize);
}

void companion_model_table_init_sized(companion_model_table* table, size_t size) {
  init_struct(table, size, zeroed<companion_model_table>());
}

void(companion_model_table_init)(companion_model_table* table) {
  companion_model_table_init_sized(table, kLegacyModelTableSize);
}

companion_status companion_model_get_table(const companion_model* model,
                                           companion_model_table* table) {
  return guarded([&]() -> companion_status {
    if (model == nullptr) return invalid("model is NULL");
    if (table == nullptr) return invalid("table (the out pointer) is NULL");
    if (table->struct_size == 0)
      return invalid(
          "table->struct_size is 0: initialise the table with companion_model_table_init()");
    std::call_once(model->table_once, [&] { build_table(*model); });
    // Only the members the caller's (possibly older, shorter) struct has room for are written.
    if (COMPANION_FITS(table, record_size))
      table->record_size = static_cast<uint32_t>(sizeof(companion_tensor_record));
    if (COMPANION_FITS(table, count)) table->count = model->records.size();
    if (COMPANION_FITS(table, records)) table->records = model->records.data();
    if (COMPANION_FITS(table, names)) table->names = model->names_at;
    if (COMPANION_FITS(table, names_bytes)) table->names_bytes = model->names_bytes;
    if (COMPANION_FITS(table, dims)) table->dims = model->dims_at;
    if (COMPANION_FITS(table, dims_count)) table->dims_count = model->dims_count;
    if (COMPANION_FITS(table, segments)) table->segments = model->model->segment_count();
    return COMPANION_OK;
  });
}

companion_status companion_plan_views(const companion_model_table* table, uint32_t* rows,
                                      companion_view_run* runs, size_t* run_count, size_t* planned,
                                      uint64_t* segment_ends) {
  return guarded([&]() -> companion_status {
    if (table == nullptr) return invalid("table is NULL");
    if (run_count == nullptr || planned == nullptr) return invalid("an out pointer is NULL");
    size_t count = table->count;
    if (count > UINT32_MAX) return invalid("the table has more than 2^32 - 1 records");
    if (count > 0 && (rows == nullptr || runs == nullptr || table->records == nullptr))
      return invalid("rows, runs or table->records is NULL");
    if (table->segments > 0 && segment_ends == nullptr) return invalid("segment_ends is NULL");
    if (count > 0 && table->record_size < sizeof(companion_tensor_record))
      return invalid("table->record_size is smaller than a companion_tensor_record");
    std::vector<companion::capi::PlanRecord> records(count);
    const auto* bytes = static_cast<const unsigned char*>(table->records);
    for (size_t i = 0; i < count; ++i) {
      companion_tensor_record r;
      std::memcpy(&r, bytes + i * table->record_size, sizeof(r));
      auto& p = records[i];
      p.offset = r.segment_offset;
      p.nbytes = r.nbytes;
      p.segment = r.segment;
      p.dtype = r.dtype;
      auto ndim = static_cast<uint64_t>(r.ndim);
      // A record whose sizes and strides are not inside dims is left out (no span).
      if (r.ndim >= 0 && table->dims != nullptr && r.dims_offset <= table->dims_count &&
          2 * ndim <= table->dims_count - r.dims_offset) {
        p.shape = {table->dims + r.dims_offset, ndim};
        p.strides = {table->dims + r.dims_offset + ndim, ndim};
      } else {
        p.nbytes = 0;
      }
    }
    auto plan = companion::capi::plan_views(records, table->segments);
    std::copy(plan.rows.begin(), plan.rows.end(), rows);
    for (size_t k = 0; k < plan.runs.size(); ++k)
      runs[k] = companion_view_run{plan.runs[k].step, plan.runs[k].first, plan.runs[k].count};
    std::copy(plan.segment_ends.begin(), plan.segment_ends.end(), segment_ends);
    *run_count = plan.runs.size();
    *planned = plan.planned;
    return COMPANION_OK;
  });
}

companion_status companion_model_info(const companion_model* model, char** json) {
  return guarded([&]() -> companion_status {
    clear_out(json);
    if (model == nullptr) return invalid("model is NULL");
    if (json == nullptr) return invalid("json (the out pointer) is NULL");
    put_json(companion::client::to_json(*model->model), json);
    return COMPANION_OK;
  });
}

// ---- status streams ------------------------------------------------------------------------

companion_status companion_client_subscribe(companion_client* client,
                                            const companion_model_spec* spec,
                                            companion_status_stream** stream) {
  return guarded([&]() -> companion_status {
    clear_out(stream);
    if (client == nullptr) return invalid("client is NULL");
    if (stream == nullptr) return invalid("stream (the out pointer) is NULL");
    Result<std::unique_ptr<companion::StatusStream>> s = Error{};
    if (spec == nullptr) {
      s = client->client->subscribe_all();
    } else {
      auto model_spec = to_spec(spec);
      if (!model_spec.ok()) return fail(model_spec.error());
      s = client->client->subscribe(*model_spec);
    }
    if (!s.ok()) return fail(s.error());
    *stream = new companion_status_stream{std::move(*s)};
    return COMPANION_OK;
  });
}

companion_status companion_status_stream_next(companion_status_stream* stream, double timeout_s,
                                              char** json) {
  return guarded([&]() -> companion_status {
    clear_out(json);
    if (stream == nullptr) return invalid("stream is NULL");
    if (json == nullptr) return invalid("json (the out pointer) is NULL");
    auto timeout = to_timeout(timeout_s, "timeout_s");
    if (!timeout.ok()) return fail(timeout.error());
    auto status = stream->stream->next(*timeout);
    if (!status.ok()) return fail(status.error());
    put_json(companion::client::to_json(*status), json);
    return COMPANION_OK;
  });
}

void companion_status_stream_close(companion_status_stream* stream) {
  quietly([&] { delete stream; });
}

companion_status companion_client_subscribe_key(companion_client* client, const char* key,
                                                companion_status_stream** stream) {
  return guarded([&]() -> companion_status {
    clear_out(stream);
    if (client == nullptr) return invalid("client is NULL");
    if (key == nullptr) return invalid("key is NULL");
    if (stream == nullptr) return invalid("stream (the out pointer) is NULL");
    auto s = client->client->subscribe_key(key);
    if (!s.ok()) return fail(s.error());
    *stream = new companion_status_stream{std::move(*s)};
    return COMPANION_OK;
  });
}

// ---- publishing ----------------------------------------------------------------------------

companion_status companion_publish_claim(companion_client* client, const char* key,
                                         const char* fingerprint_json, int32_t mode,
                                         double timeout_s, companion_publication** publication) {
  return guarded([&]() -> companion_status {
    clear_out(publication);
    if (client == nullptr) return invalid("client is NULL");
    if (key == nullptr) return invalid("key is NULL");
    if (publication == nullptr) return invalid("publication (the out pointer) is NULL");
    if (mode < COMPANION_CLAIM_NOW || mode > COMPANION_CLAIM_IF_UNPUBLISHED)
      return invalid("mode is not a companion_claim_mode");
    auto fingerprint = to_fingerprint(fingerprint_json);
    if (!fingerprint.ok()) return fail(fingerprint.error());
    auto timeout = to_timeout(timeout_s, "timeout_s");
    if (!timeout.ok()) return fail(timeout.error());
    auto claimed =
        client->client->claim(key, *fingerprint, static_cast<companion::ClaimMode>(mode), *timeout);
    if (!claimed.ok()) return fail(claimed.error());
    if (*claimed) *publication = new companion_publication{std::move(*claimed), {}};
    return COMPANION_OK;
  });
}

companion_status companion_publication_declare_sized(companion_publication* publication,
                                                     const companion_tensor_decl* tensors,
                                                     size_t count, size_t decl_size) {
  return guarded([&]() -> companion_status {
    if (publication == nullptr) return invalid("publication is NULL");
    if (tensors == nullptr && count > 0) return invalid("tensors is NULL");
    if (decl_size < kRequiredTensorDeclSize)
      return invalid(("decl_size " + std::to_string(decl_size) +
                      " does not reach companion_tensor_decl.shape: pass "
                      "sizeof(companion_tensor_decl)")
                         .c_str());
    std::vector<companion::TensorDecl> table;
    table.reserve(count);
    for (size_t i = 0; i < count; ++i) {
      // The caller's entries are decl_size bytes apart; fields past decl_size keep their
      // defaults (zero: no alias).
      auto d = zeroed<companion_tensor_decl>();
      std::memcpy(static_cast<void*>(&d), reinterpret_cast<const char*>(tensors) + i * decl_size,
                  std::min(decl_size, sizeof(d)));
      if (d.name == nullptr)
        return invalid(("tensors[" + std::to_string(i) + "].name is NULL").c_str());
      if (d.dtype < 0 || d.dtype >= companion::kDTypeCount)
        return invalid(
            ("tensors[" + std::to_string(i) + "].dtype is not a companion_dtype").c_str());
      if (d.ndim < 0 || d.ndim > 16 || (d.ndim > 0 && d.shape == nullptr))
        return invalid(("tensors[" + std::to_string(i) + "] has no valid shape").c_str());
      companion::TensorDecl decl;
      decl.name = d.name;
      decl.dtype = static_cast<companion::DType>(d.dtype);
      decl.shape.assign(d.shape, d.shape + d.ndim);
      for (int64_t dim : decl.shape)
        if (dim < 0)
          return invalid(("tensors[" + std::to_string(i) + "] has a negative dimension").c_str());
      if (d.alias_of != nullptr) decl.alias_of = d.alias_of;
      table.push_back(std::move(decl));
    }
    auto declared = publication->publication->declare(table);
    if (!declared.ok()) return fail(declared.error());
    publication->tensors.clear();
    for (const auto& w : publication->publication->tensors())
      publication->tensors.push_back(to_c(companion::client::read_only_view(w)));
    return COMPANION_OK;
  });
}

companion_status(companion_publication_declare)(companion_publication* publication,
                                                const companion_tensor_decl* tensors,
                                                size_t count) {
  return companion_publication_declare_sized(publication, tensors, count, kLegacyTensorDeclSize);
}

size_t companion_publication_tensor_count(const companion_publication* publication) {
  return publication == nullptr ? 0 : publication->tensors.size();
}

companion_status companion_publication_tensor_sized(const companion_publication* publication,
                                                    size_t index, companion_tensor* tensor,
                                                    size_t tensor_size) {
  return guarded([&]() -> companion_status {
    if (publication == nullptr) return invalid("publication is NULL");
    if (tensor == nullptr) return invalid("tensor (the out pointer) is NULL");
    if (index >= publication->tensors.size())
      return invalid(("tensor index " + std::to_string(index) +
                      " is out of range (the publication has " +
                      std::to_string(publication->tensors.size()) + " tensors)")
                         .c_str());
    return put_tensor(publication->tensors[index], tensor, tensor_size);
  });
}

companion_status(companion_publication_tensor)(const companion_publication* publication,
                                               size_t index, companion_tensor* tensor) {
  return companion_publication_tensor_sized(publication, index, tensor, kLegacyTensorSize);
}

companion_status companion_publication_info(const companion_publication* publication, char** json) {
  return guarded([&]() -> companion_status {
    clear_out(json);
    if (publication == nullptr) return invalid("publication is NULL");
    if (json == nullptr) return invalid("json (the out pointer) is NULL");
    const companion::Publication& p = *publication->publication;
    uint64_t bytes = 0;
    for (const auto& t : publication->tensors) bytes += t.nbytes;
    put_json({{"key", p.key()},
              {"generation", p.generation()},
              {"tensors", publication->tensors.size()},
              {"tensor_bytes", bytes},
              {"declared", !publication->tensors.empty()}},
             json);
    return COMPANION_OK;
  });
}

companion_status companion_publication_commit(companion_publication* publication,
                                              companion_model** model) {
  return guarded([&]() -> companion_status {
    clear_out(model);
    if (publication == nullptr) return invalid("publication is NULL");
    auto committed = publication->publication->commit();
    if (!committed.ok()) return fail(committed.error());
    publication->tensors.clear();
    if (model != nullptr) *model = wrap_model(std::move(*committed));
    return COMPANION_OK;
  });
}

void companion_publication_close(companion_publication* publication) {
  quietly([&] { delete publication; });
}

void companion_attach_options_init_sized(companion_attach_options* options, size_t size) {
  auto defaults = zeroed<companion_attach_options>();
  defaults.generation = 0;
  defaults.fingerprint_json = nullptr;
  defaults.or_source = 0;
  defaults.wait = 1;
  defaults.timeout_s = -1.0;
  init_struct(options, size, defaults);
}

void(companion_attach_options_init)(companion_attach_options* options) {
  companion_attach_options_init_sized(options, kLegacyAttachOptionsSize);
}

companion_status companion_client_attach(companion_client* client, const char* key,
                                         const companion_attach_options* options,
                                         companion_model** model) {
  return guarded([&]() -> companion_status {
    clear_out(model);
    if (client == nullptr) return invalid("client is NULL");
    if (key == nullptr) return invalid("key is NULL");
    if (model == nullptr) return invalid("model (the out pointer) is NULL");
    companion::AttachOptions o;
    if (options != nullptr) {
      if (options->struct_size == 0)
        return invalid(
            "options->struct_size is 0: initialise the options with "
            "companion_attach_options_init()");
      if (COMPANION_FITS(options, generation)) o.generation = options->generation;
      if (COMPANION_FITS(options, fingerprint_json) && options->fingerprint_json != nullptr) {
        auto fingerprint = to_fingerprint(options->fingerprint_json);
        if (!fingerprint.ok()) return fail(fingerprint.error());
        o.fingerprint = std::move(*fingerprint);
      }
      if (COMPANION_FITS(options, or_source)) o.or_source = options->or_source != 0;
      if (COMPANION_FITS(options, wait)) o.wait = options->wait != 0;
      if (COMPANION_FITS(options, timeout_s)) {
        auto timeout = to_timeout(options->timeout_s, "options->timeout_s");
        if (!timeout.ok()) return fail(timeout.error());
        o.timeout_s = *timeout;
      }
    }
    auto mapped = client->client->attach(key, o);
    if (!mapped.ok()) return fail(mapped.error());
    *model = wrap_model(std::move(*mapped));
    return COMPANION_OK;
  });
}

companion_status companion_client_reload(companion_client* client, const char* key_or_id,
                                         int32_t force, double timeout_s, char** json) {
  return guarded([&]() -> companion_status {
    clear_out(json);
    if (client == nullptr) return invalid("client is NULL");
    if (key_or_id == nullptr || key_or_id[0] == '\0') return invalid("key_or_id is NULL or empty");
    auto timeout = to_timeout(timeout_s, "timeout_s");
    if (!timeout.ok()) return fail(timeout.error());
    auto status = client->client->reload(key_or_id, force != 0, *timeout);
    if (!status.ok()) return fail(status.error());
    put_json(companion::client::to_json(*status), json);
    return COMPANION_OK;
  });
}
