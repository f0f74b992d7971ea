/* json_scan.h — a JSON reader for the safetensors header: one pass over a
 * buffer, strings decoded in place, nothing allocated. A header can be
 * 100 MB of hostile text; this reads it in linear time with no memory but
 * the buffer itself, where a tree (jansson) took gigabytes and seconds.
 *
 * The caller walks the structure it expects with peek/take/expect and
 * reads strings and numbers; any value it does not want is skipped. Every
 * function returns false on malformed text and leaves what was wrong in
 * error, at byte `at` of the buffer. Strings are strict JSON: valid UTF-8,
 * no control characters, no \u0000 (names are C strings), surrogates in
 * pairs. Containers nest at most KV_JSON_MAX_DEPTH deep. */
#ifndef KV_JSON_SCAN_H
#define KV_JSON_SCAN_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define KV_JSON_MAX_DEPTH 64

typedef struct kv_json {
    char *text; /* strings are decoded in place, over their own quotes */
    size_t len, at;
    const char *error; /* NULL until something fails */
    char message[48];
} kv_json;

void kv_json_init(kv_json *j, char *text, size_t len);

/* The next character after whitespace, or '\0' at the end. */
char kv_json_peek(kv_json *j);
/* Consumes c if it comes next (after whitespace). */
bool kv_json_take(kv_json *j, char c);
/* As take, but a missing c is an error ("expected ','"). */
bool kv_json_expect(kv_json *j, char c);
/* A string: *out points into the buffer, NUL-terminated, valid until the
 * buffer is freed (later strings never overwrite it). */
bool kv_json_string(kv_json *j, char **out);
/* Any value. When it is a number, *is_uint says whether it is an integer
 * from 0 to 2^63 - 1 (then *value is it); any other value is skipped with
 * *is_uint false. */
bool kv_json_uint(kv_json *j, bool *is_uint, uint64_t *value);
/* Skips any value. */
bool kv_json_skip(kv_json *j);
/* True when only whitespace is left. */
bool kv_json_at_end(kv_json *j);

#endif
