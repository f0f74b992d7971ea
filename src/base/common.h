/* common.h — what every libklvae source file needs: errors, checked sizes,
 * small helpers. Nothing here is exported; the build hides every symbol that
 * is not declared KLVAE_API in klvae.h. */
#ifndef KV_COMMON_H
#define KV_COMMON_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#ifndef __cplusplus /* the CUDA plugin (C++) includes this file too */
#include <stdatomic.h>
#endif

#include "klvae.h"

#define KV_ARRAY_LEN(a) (sizeof(a) / sizeof((a)[0]))
/* The largest klvae_status_t value (statuses a plugin may return). */
#define KV_STATUS_LAST KLVAE_ERR_COMM
#define KV_MIN(a, b) ((a) < (b) ? (a) : (b))
#define KV_MAX(a, b) ((a) > (b) ? (a) : (b))

#if defined(__GNUC__)
#define KV_PRINTF(f, a) __attribute__((format(printf, f, a)))
#define KV_WARN_UNUSED __attribute__((warn_unused_result))
#else
#define KV_PRINTF(f, a)
#define KV_WARN_UNUSED
#endif

/* Records msg as the calling thread's last error and returns status, so that
 * failures read `return kv_error(KLVAE_ERR_IO, "cannot open %s: %s", ...)`. */
klvae_status_t kv_error(klvae_status_t status, const char *fmt, ...) KV_PRINTF(2, 3);

/* Puts "prefix: " in front of the current message (for context that only
 * the caller knows, such as the file name). Returns status unchanged. */
klvae_status_t kv_error_prefix(klvae_status_t status, const char *fmt, ...) KV_PRINTF(2, 3);

/* Empties the calling thread's message; every API entry point calls it. */
void kv_error_clear(void);

/* The current message (never NULL). */
const char *kv_error_message(void);

/* Checked arithmetic for sizes: false on overflow. */
static inline bool kv_mul_size(size_t a, size_t b, size_t *out)
{
    if (a != 0 && b > SIZE_MAX / a)
        return false;
    *out = a * b;
    return true;
}

static inline bool kv_add_size(size_t a, size_t b, size_t *out)
{
    if (b > SIZE_MAX - a)
        return false;
    *out = a + b;
    return true;
}

/* Number of elements of an (n, c, h, w) block, or false on overflow or on a
 * non-positive dimension. Limits each tensor to 2^62 bytes of float32 so
 * that byte counts never overflow either. */
bool kv_numel4(int n, int c, int h, int w, size_t *out);

/* strdup that reports out-of-memory through kv_error. */
char *kv_strdup(const char *s);

/* Joins dir and name with a '/'; returns NULL (with kv_error) on OOM. */
char *kv_path_join(const char *dir, const char *name);

/* Copies value (NUL-terminated) into the caller's buf of size bytes, as
 * every *_get of the API does. When it does not fit (buf may then be NULL
 * with size 0): KLVAE_ERR_BUFFER_TOO_SMALL, a message naming function and
 * key, and klvae_last_needed_size() = strlen(value) + 1 for this thread. */
klvae_status_t kv_copy_out(const char *function, const char *key, const char *value, char *buf,
                           size_t size);

#ifndef __cplusplus
/* A handle's "in use" mark. The API's rule is one thread per handle at a
 * time; a second thread that calls in while the first is inside gets
 * KLVAE_ERR_BUSY instead of corrupting the handle's state or deadlocking in
 * its worker pool. One atomic exchange per call. */
typedef struct kv_busy {
    atomic_int flag;
} kv_busy;

/* Marks b in use for function, or KLVAE_ERR_BUSY naming it. */
static inline klvae_status_t kv_busy_enter(kv_busy *b, const char *function)
{
    if (atomic_exchange_explicit(&b->flag, 1, memory_order_acquire))
        return kv_error(KLVAE_ERR_BUSY,
                        "%s: the handle is being used by another thread (a handle is used by "
                        "one thread at a time); nothing was done",
                        function);
    return KLVAE_OK;
}

/* Ends the mark; returns st, so that a call ends with
 * `return kv_busy_leave(&h->busy, st);`. */
static inline klvae_status_t kv_busy_leave(kv_busy *b, klvae_status_t st)
{
    atomic_store_explicit(&b->flag, 0, memory_order_release);
    return st;
}
#endif /* __cplusplus */

/* Seconds on a monotonic clock (for durations). */
double kv_now_seconds(void);

/* Number of CPUs this process may run on (at least 1). */
int kv_cpu_count(void);

#endif /* KV_COMMON_H */
