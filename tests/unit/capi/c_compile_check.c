/* companion.h compiles as strict C11 (-std=c11 -pedantic -Werror) and a C program links against
 * libcompanion.so alone. Exits 0 when the checks pass. */
#include <stdio.h>
#include <string.h>

#include "companion/companion.h"

static int failures = 0;

/* companion_model_spec as an older companion.h declared it (before tag), with a canary after it:
 * the library must fill it and write nothing past it. */
struct older_model_spec {
  uint32_t struct_size;
  const char* source;
  const char* revision;
  const char* dtype;
  uint32_t tp_size;
  uint32_t tp_rank;
};
struct guarded_older_model_spec {
  struct older_model_spec spec;
  unsigned char canary[16];
};

/* A C function fits companion_log_fn. */
static void count_messages(void* user, int level, const char* message) {
  (void)level;
  (void)message;
  ++*(int*)user;
}

static void check(int ok, const char* what) {
  if (!ok) {
    fprintf(stderr, "FAILED: %s\n", what);
    ++failures;
  }
}

int main(void) {
  companion_connect_options options;
  companion_model_spec spec;
  companion_client* client = NULL;
  companion_status status;
  companion_tensor tensor;

  check(companion_version() != NULL && companion_version()[0] != '\0', "companion_version");
  check(strcmp(companion_status_string(COMPANION_OK), "ok") == 0, "status string OK");
  check(strcmp(companion_status_string(COMPANION_UNAVAILABLE), "unavailable") == 0,
        "status string UNAVAILABLE");
  /* A value outside the list (C enums are ints) still gets a string. */
  check(companion_status_string((companion_status)99) != NULL, "status string of 99");
  check(strcmp(companion_last_error(), "") == 0, "no error yet");
  {
    int messages = 0;
    check(companion_set_log_handler(count_messages, &messages, COMPANION_LOG_WARN) == COMPANION_OK,
          "companion_set_log_handler");
    check(
        companion_set_log_handler(NULL, NULL, COMPANION_LOG_OFF + 1) == COMPANION_INVALID_ARGUMENT,
        "a log level outside the list");
    check(companion_set_log_handler(NULL, NULL, COMPANION_LOG_OFF) == COMPANION_OK,
          "no log handler");
  }

  companion_model_spec_init(&spec);
  check(spec.struct_size == sizeof(spec) && spec.tp_size == 1, "companion_model_spec_init");
  {
    struct guarded_older_model_spec older;
    size_t i;
    int canary_intact = 1;
    memset(&older, 0xC3, sizeof(older));
    companion_model_spec_init_sized((companion_model_spec*)(void*)&older.spec, sizeof(older.spec));
    for (i = 0; i < sizeof(older.canary); ++i) canary_intact &= older.canary[i] == 0xC3;
    check(canary_intact, "init of an older header's spec writes nothing past it");
    check(older.spec.struct_size == sizeof(older.spec) && older.spec.tp_size == 1 &&
              older.spec.source == NULL,
          "init of an older header's spec fills it");
  }

  companion_connect_options_init(&options);
  check(options.struct_size == sizeof(options), "companion_connect_options_init");
  options.socket_path = "/nonexistent/companion-c-check.sock";
  status = companion_client_connect(&options, &client);
  check(status == COMPANION_UNAVAILABLE, "connect to a missing socket is UNAVAILABLE");
  check(client == NULL, "no handle on failure");
  check(strstr(companion_last_error(), "companion-c-check.sock") != NULL,
        "last_error names the socket");

  check(companion_model_tensor(NULL, 0, &tensor) == COMPANION_INVALID_ARGUMENT, "NULL model");
  check(companion_model_find(NULL, "x", &tensor) == COMPANION_INVALID_ARGUMENT, "find, NULL model");
  check(companion_publication_tensor(NULL, 0, &tensor) == COMPANION_INVALID_ARGUMENT,
        "publication tensor, NULL publication");
  {
    companion_tensor_decl decls[1];
    companion_attach_options attach;
    memset(decls, 0, sizeof(decls));
    check(companion_publication_declare(NULL, decls, 1) == COMPANION_INVALID_ARGUMENT,
          "declare, NULL publication");
    companion_attach_options_init(&attach);
    check(attach.struct_size == sizeof(attach) && attach.wait == 1,
          "companion_attach_options_init");
  }
  check(companion_model_tensor_count(NULL) == 0, "count of NULL");
  {
    companion_model_table table;
    companion_model_table_init(&table);
    check(table.struct_size == sizeof(table), "companion_model_table_init");
    check(companion_model_get_table(NULL, &table) == COMPANION_INVALID_ARGUMENT,
          "table of a NULL model");
  }
  companion_client_close(NULL);
  companion_free(NULL);

  if (failures == 0) printf("capi_c_check: ok (libcompanion %s)\n", companion_version());
  return failures == 0 ? 0 : 1;
}
