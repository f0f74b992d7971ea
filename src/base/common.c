/* common.c — status strings, the thread-local error message, version, and
 * the small helpers of common.h. */
#include <sched.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "base/common.h"

#define KV_ERROR_CAPACITY 1024

static _Thread_local char error_message[KV_ERROR_CAPACITY];

klvae_status_t kv_error(klvae_status_t status, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(error_message, sizeof error_message, fmt, ap);
    va_end(ap);
    return status;
}

klvae_status_t kv_error_prefix(klvae_status_t status, const char *fmt, ...)
{
    char prefix[KV_ERROR_CAPACITY];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(prefix, sizeof prefix - 2, fmt, ap);
    va_end(ap);
    if (n < 0)
        return status;
    size_t plen = strlen(prefix);
    memcpy(prefix + plen, ": ", 3);
    plen += 2;
    size_t old = strlen(error_message);
    if (plen + old >= sizeof error_message)
        old = sizeof error_message - 1 - plen;
    memmove(error_message + plen, error_message, old);
    memcpy(error_message, prefix, plen);
    error_message[plen + old] = '\0';
    return status;
}

void kv_error_clear(void)
{
    error_message[0] = '\0';
}

const char *kv_error_message(void)
{
    return error_message;
}

KLVAE_API const char *klvae_last_error(void)
{
    return error_message;
}

KLVAE_API const char *klvae_status_string(klvae_status_t status)
{
    switch (status) {
    case KLVAE_OK: return "ok";
    case KLVAE_ERR_INVALID_ARGUMENT: return "invalid argument";
    case KLVAE_ERR_OUT_OF_MEMORY: return "out of memory";
    case KLVAE_ERR_IO: return "input/output error";
    case KLVAE_ERR_FORMAT: return "malformed file";
    case KLVAE_ERR_SHAPE: return "tensor shape mismatch";
    case KLVAE_ERR_MISSING_TENSOR: return "missing tensor";
    case KLVAE_ERR_CONFIG: return "invalid configuration";
    case KLVAE_ERR_OPTION: return "invalid option";
    case KLVAE_ERR_UNSUPPORTED: return "unsupported";
    case KLVAE_ERR_BACKEND_UNAVAILABLE: return "backend unavailable";
    case KLVAE_ERR_BACKEND: return "backend failure";
    case KLVAE_ERR_INTERNAL: return "internal error";
    case KLVAE_ERR_NONFINITE: return "non-finite value";
    case KLVAE_ERR_BUSY: return "handle in use by another thread";
    case KLVAE_ERR_BUFFER_TOO_SMALL: return "buffer too small";
    case KLVAE_ERR_COMM: return "communication failure";
    }
    return "unknown status";
}

KLVAE_API unsigned klvae_version(void)
{
    return KLVAE_VERSION_NUMBER;
}

KLVAE_API const char *klvae_version_string(void)
{
    return KLVAE_VERSION_STRING;
}

KLVAE_API void klvae_free(void *ptr)
{
    free(ptr);
}

bool kv_numel4(int n, int c, int h, int w, size_t *out)
{
    size_t total = 1;
    int dims[4] = {n, c, h, w};
    for (int i = 0; i < 4; i++) {
        if (dims[i] <= 0 || !kv_mul_size(total, (size_t)dims[i], &total))
            return false;
    }
    if (total > ((size_t)1 << 60))
        return false;
    *out = total;
    return true;
}

char *kv_strdup(const char *s)
{
    char *copy = strdup(s);
    if (!copy)
        kv_error(KLVAE_ERR_OUT_OF_MEMORY, "out of memory copying a string");
    return copy;
}

char *kv_path_join(const char *dir, const char *name)
{
    size_t a = strlen(dir), b = strlen(name);
    char *p = malloc(a + b + 2);
    if (!p) {
        kv_error(KLVAE_ERR_OUT_OF_MEMORY, "out of memory building a path");
        return NULL;
    }
    memcpy(p, dir, a);
    size_t at = a;
    if (a > 0 && dir[a - 1] != '/')
        p[at++] = '/';
    memcpy(p + at, name, b + 1);
    return p;
}

int kv_cpu_count(void)
{
    cpu_set_t set;
    if (sched_getaffinity(0, sizeof set, &set) == 0) {
        int count = CPU_COUNT(&set);
        if (count > 0)
            return count;
    }
    long online = sysconf(_SC_NPROCESSORS_ONLN);
    return online > 0 ? (int)online : 1;
}

static _Thread_local size_t needed_size;

KLVAE_API size_t klvae_last_needed_size(void)
{
    return needed_size;
}

klvae_status_t kv_copy_out(const char *function, const char *key, const char *value, char *buf,
                           size_t size)
{
    size_t len = strlen(value);
    if (len >= size || !buf) {
        needed_size = len + 1;
        return kv_error(KLVAE_ERR_BUFFER_TOO_SMALL,
                        "%s: a buffer of %zu bytes is too small for the value of '%s' (%zu "
                        "needed)",
                        function, size, key, len + 1);
    }
    needed_size = 0;
    memcpy(buf, value, len + 1);
    return KLVAE_OK;
}

double kv_now_seconds(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}
