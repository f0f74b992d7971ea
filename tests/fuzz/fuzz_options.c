/* fuzz_options.c — klvae_options_set with fuzzed keys and values: the input
 * is up to four key/value pairs, each string ended by a NUL byte, set one
 * after another on one options object.
 * Invariants: a set that succeeds reads back exactly (and a NULL buffer
 * asks for strlen + 1 bytes); a set that fails is KLVAE_ERR_OPTION or
 * KLVAE_ERR_INVALID_ARGUMENT with a message and leaves the key's value as
 * it was; every key of the table still reads afterwards. */
#include <string.h>

#include "fuzz.h"

/* The next NUL-terminated string of the input, or the rest of it. */
static char *next_string(const uint8_t **data, size_t *size)
{
    const uint8_t *end = memchr(*data, 0, *size);
    size_t n = end ? (size_t)(end - *data) : *size;
    char *s = malloc(n + 1);
    FUZZ_CHECK(s != NULL, "out of memory");
    memcpy(s, *data, n);
    s[n] = '\0';
    *data += end ? n + 1 : n;
    *size -= end ? n + 1 : n;
    return s;
}

/* The key's value in o, or NULL when the key is unknown (freed by caller). */
static char *value_of(const klvae_options_t *o, const char *key)
{
    if (klvae_options_get(o, key, NULL, 0) != KLVAE_ERR_BUFFER_TOO_SMALL)
        return NULL;
    size_t need = klvae_last_needed_size();
    char *v = malloc(need);
    FUZZ_CHECK(v != NULL, "out of memory");
    FUZZ_CHECK(klvae_options_get(o, key, v, need) == KLVAE_OK, "get %s with the size it asked",
               key);
    FUZZ_CHECK(strlen(v) + 1 == need, "%s: needed %zu bytes for \"%s\"", key, need, v);
    return v;
}

static void set_one(klvae_options_t *o, const char *key, const char *value)
{
    char *before = value_of(o, key);
    klvae_status_t st = klvae_options_set(o, key, value);
    if (st != KLVAE_OK) /* before the next call replaces the message */
        fuzz_check_failure(st, "klvae_options_set");
    char *after = value_of(o, key);
    if (st == KLVAE_OK) {
        FUZZ_CHECK(after && strcmp(after, value) == 0, "set %s = \"%s\" reads back \"%s\"", key,
                   value, after ? after : "(unknown key)");
    } else {
        FUZZ_CHECK(st == KLVAE_ERR_OPTION || st == KLVAE_ERR_INVALID_ARGUMENT,
                   "klvae_options_set returned %s", klvae_status_string(st));
        FUZZ_CHECK((!before && !after) || (before && after && strcmp(before, after) == 0),
                   "a failed set changed %s from \"%s\" to \"%s\"", key,
                   before ? before : "(unknown)", after ? after : "(unknown)");
    }
    free(before);
    free(after);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    klvae_options_t *o = NULL;
    FUZZ_CHECK(klvae_options_create(&o) == KLVAE_OK, "options");
    for (int pair = 0; pair < 4 && size > 0; pair++) {
        char *key = next_string(&data, &size);
        char *value = next_string(&data, &size);
        set_one(o, key, value);
        free(key);
        free(value);
    }
    const char *key;
    for (int i = 0; klvae_option_describe(i, &key, NULL, NULL) == KLVAE_OK; i++) {
        char *v = value_of(o, key);
        FUZZ_CHECK(v != NULL, "key %s no longer reads", key);
        free(v);
    }
    klvae_options_free(o);
    return 0;
}
