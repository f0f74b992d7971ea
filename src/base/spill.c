/* spill.c — see spill.h. */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "base/io.h"
#include "base/spill.h"

static size_t page_size(void)
{
    long p = sysconf(_SC_PAGESIZE);
    return p > 0 ? (size_t)p : 4096;
}

/* bytes rounded up to whole pages, or 0 on overflow */
static size_t whole_pages(size_t bytes)
{
    size_t p = page_size();
    return bytes > SIZE_MAX - p ? 0 : (bytes + p - 1) / p * p;
}

void *kv_host_block_alloc(size_t bytes)
{
    size_t total = whole_pages(bytes ? bytes : 1);
    void *p = total ? mmap(NULL, total, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0)
                    : MAP_FAILED;
    if (p == MAP_FAILED) {
        kv_error(KLVAE_ERR_OUT_OF_MEMORY, "out of memory allocating %zu bytes", bytes);
        return NULL;
    }
    return p;
}

void kv_host_block_free(void *block, size_t bytes)
{
    if (block)
        munmap(block, whole_pages(bytes ? bytes : 1));
}

/* A free stretch of the file. */
typedef struct extent {
    uint64_t offset, length;
} extent;

struct kv_spill {
    int fd;
    char *dir;
    uint64_t end;          /* the file's size */
    extent *free;          /* sorted by offset, never adjacent */
    size_t nfree, capfree;
    uint64_t in_use, peak; /* bytes handed out */
};

/* An unnamed file in dir: O_TMPFILE where the filesystem has it, else a
 * named one that is unlinked at once. */
static int open_unnamed(const char *dir)
{
#ifdef O_TMPFILE
    int unnamed = open(dir, O_TMPFILE | O_RDWR | O_CLOEXEC, 0600);
    if (unnamed >= 0 || (errno != EOPNOTSUPP && errno != EISDIR && errno != EINVAL))
        return unnamed;
#endif
    size_t n = strlen(dir) + sizeof "/klvae-spill" KV_TEMP_MARK "XXXXXX";
    char *path = malloc(n);
    if (!path) {
        errno = ENOMEM;
        return -1;
    }
    snprintf(path, n, "%s/klvae-spill" KV_TEMP_MARK "XXXXXX", dir);
    int fd = mkostemp(path, O_CLOEXEC);
    if (fd >= 0)
        unlink(path);
    int saved = errno;
    free(path);
    errno = saved;
    return fd;
}

klvae_status_t kv_spill_open(const char *dir, kv_spill **out)
{
    *out = NULL;
    kv_spill *s = calloc(1, sizeof *s);
    if (!s)
        return kv_error(KLVAE_ERR_OUT_OF_MEMORY, "out of memory opening the spill file");
    s->dir = kv_strdup(dir);
    if (!s->dir) {
        free(s);
        return KLVAE_ERR_OUT_OF_MEMORY;
    }
    s->fd = open_unnamed(dir);
    if (s->fd < 0) {
        klvae_status_t st = kv_error(KLVAE_ERR_IO,
                                     "cannot create the spill file in %s (option spill_dir): %s",
                                     dir, strerror(errno));
        free(s->dir);
        free(s);
        return st;
    }
    *out = s;
    return KLVAE_OK;
}

void kv_spill_close(kv_spill *s)
{
    if (!s)
        return;
    close(s->fd);
    free(s->free);
    free(s->dir);
    free(s);
}

/* Takes bytes from the first free stretch that holds them. */
static bool take_free(kv_spill *s, uint64_t bytes, uint64_t *offset)
{
    for (size_t i = 0; i < s->nfree; i++) {
        extent *e = &s->free[i];
        if (e->length < bytes)
            continue;
        *offset = e->offset;
        e->offset += bytes;
        e->length -= bytes;
        if (e->length == 0) {
            memmove(e, e + 1, (s->nfree - i - 1) * sizeof *e);
            s->nfree--;
        }
        return true;
    }
    return false;
}

klvae_status_t kv_spill_alloc(kv_spill *s, size_t bytes, uint64_t *offset)
{
    uint64_t total = whole_pages(bytes ? bytes : 1);
    if (!total)
        return kv_error(KLVAE_ERR_OUT_OF_MEMORY, "a spilled block of %zu bytes is too large",
                        bytes);
    if (!take_free(s, total, offset)) {
        /* Reserve the blocks now: a write to a mapped page of a file that
         * cannot grow would be a SIGBUS. */
        int err = posix_fallocate(s->fd, (off_t)s->end, (off_t)total);
        if (err != 0)
            return kv_error(KLVAE_ERR_IO,
                            "the spill file in %s cannot grow to %llu bytes (option spill_dir): %s",
                            s->dir, (unsigned long long)(s->end + total), strerror(err));
        *offset = s->end;
        s->end += total;
    }
    s->in_use += total;
    if (s->in_use > s->peak)
        s->peak = s->in_use;
    return KLVAE_OK;
}

/* Adds [offset, offset + length) to the free list, merged with its
 * neighbours; a stretch that reaches the end of the file shortens it. */
void kv_spill_free(kv_spill *s, uint64_t offset, size_t bytes)
{
    uint64_t length = whole_pages(bytes ? bytes : 1);
    s->in_use -= length;
    size_t i = 0;
    while (i < s->nfree && s->free[i].offset < offset)
        i++;
    if (i > 0 && s->free[i - 1].offset + s->free[i - 1].length == offset) {
        i--;
        offset = s->free[i].offset;
        length += s->free[i].length;
        memmove(&s->free[i], &s->free[i + 1], (s->nfree - i - 1) * sizeof *s->free);
        s->nfree--;
    }
    if (i < s->nfree && offset + length == s->free[i].offset) {
        length += s->free[i].length;
        memmove(&s->free[i], &s->free[i + 1], (s->nfree - i - 1) * sizeof *s->free);
        s->nfree--;
    }
    if (offset + length == s->end && ftruncate(s->fd, (off_t)offset) == 0) {
        s->end = offset;
        return;
    }
    if (s->nfree == s->capfree) {
        size_t cap = s->capfree ? 2 * s->capfree : 16;
        extent *grown = realloc(s->free, cap * sizeof *grown);
        if (!grown) /* the stretch stays unused: the file is only larger */
            return;
        s->free = grown;
        s->capfree = cap;
    }
    memmove(&s->free[i + 1], &s->free[i], (s->nfree - i) * sizeof *s->free);
    s->free[i] = (extent){offset, length};
    s->nfree++;
}

klvae_status_t kv_spill_map(kv_spill *s, uint64_t offset, size_t bytes, void **ptr)
{
    void *p = mmap(NULL, whole_pages(bytes ? bytes : 1), PROT_READ | PROT_WRITE, MAP_SHARED,
                   s->fd, (off_t)offset);
    if (p == MAP_FAILED) {
        *ptr = NULL;
        return kv_error(KLVAE_ERR_OUT_OF_MEMORY, "cannot map %zu bytes of the spill file in %s: %s",
                        bytes, s->dir, strerror(errno));
    }
    *ptr = p;
    return KLVAE_OK;
}

void kv_spill_unmap(void *ptr, size_t bytes)
{
    if (ptr)
        munmap(ptr, whole_pages(bytes ? bytes : 1));
}

uint64_t kv_spill_peak(const kv_spill *s)
{
    return s->peak;
}

const char *kv_spill_dir(const kv_spill *s)
{
    return s->dir;
}
