/* options.h — the key/value options object behind klvae_options_*.
 * Every key is declared once in the table in options.c, with its type,
 * default, range and help; values are validated when set, so the typed
 * getters below cannot fail on a value that was accepted. */
#ifndef KV_OPTIONS_H
#define KV_OPTIONS_H

#include "base/common.h"

#define KV_MAX_LIST 8 /* block_out_channels: up to 8 levels */

typedef struct kv_int_list {
    int count;
    int values[KV_MAX_LIST];
} kv_int_list;

/* The value as set, or NULL when the key was not set (opts may be NULL).
 * key must be a known key. */
const char *kv_options_value(const klvae_options_t *opts, const char *key);
bool kv_options_is_set(const klvae_options_t *opts, const char *key);

/* Typed getters: the set value, else the key's default. */
int kv_options_int(const klvae_options_t *opts, const char *key);
double kv_options_double(const klvae_options_t *opts, const char *key);
bool kv_options_bool(const klvae_options_t *opts, const char *key);
uint64_t kv_options_uint64(const klvae_options_t *opts, const char *key);
const char *kv_options_string(const klvae_options_t *opts, const char *key);
kv_int_list kv_options_int_list(const klvae_options_t *opts, const char *key);
/* For keys whose value may be "none": false when it is none. */
bool kv_options_optional_double(const klvae_options_t *opts, const char *key, double *out);

/* A size in bytes: a decimal number (1.5 is fine) with an optional unit K,
 * M, G or T (powers of 1024, either case, optionally followed by B or iB),
 * at least 1 byte and below 2^64; "4G" is 4294967296. */
bool kv_parse_bytes(const char *text, uint64_t *out);

/* Parsers shared with config.json handling and the CLI. */
bool kv_parse_int_list(const char *text, kv_int_list *out);
void kv_format_int_list(const kv_int_list *list, char *buf, size_t size);
/* The option part's "I/N" (0 <= I < N <= 2^20). */
bool kv_parse_part(const char *text, int *index, int *count);
/* The option buckets' "SIDE,STEP[,MAX_RATIO]" (MAX_RATIO 4 when absent). */
bool kv_parse_buckets(const char *text, int *side, int *step, double *max_ratio);
/* The shortest decimal text that reads back as exactly v (0.18215, not
 * 0.18215000000000001). */
void kv_format_double(double v, char *buf, size_t size);

#endif
