/* io.h — file helpers: atomic writes and whole reads. */
#ifndef KV_IO_H
#define KV_IO_H

#include <stdio.h>

#include "base/common.h"

/* A file written under a temporary name in the target's folder, then
 * flushed, synced and renamed over the target, so readers see either the old
 * file or the complete new one. */
typedef struct kv_atomic_file {
    FILE *fp;
    char *final_path;
    char *temp_path;
} kv_atomic_file;

klvae_status_t kv_atomic_open(kv_atomic_file *f, const char *path);
/* Writes bytes; on failure aborts the file and returns KLVAE_ERR_IO. */
klvae_status_t kv_atomic_write(kv_atomic_file *f, const void *data, size_t bytes);
/* Flushes, fsyncs and renames; on failure removes the temporary file. */
klvae_status_t kv_atomic_commit(kv_atomic_file *f);
/* The two halves of kv_atomic_commit, for files that must appear together:
 * finish (flush, fsync, close) each, then publish (rename) each. A failed
 * finish removes the temporary file. */
klvae_status_t kv_atomic_finish(kv_atomic_file *f);
klvae_status_t kv_atomic_publish(kv_atomic_file *f);
/* Removes the temporary file (safe after commit or abort). */
void kv_atomic_abort(kv_atomic_file *f);

/* Reads a whole (small) file into a NUL-terminated buffer. */
klvae_status_t kv_read_text_file(const char *path, size_t max_bytes, char **out, size_t *len);

/* true when path names a directory. */
bool kv_is_directory(const char *path);

/* Creates a directory (and not its parents); an existing one is fine. */
klvae_status_t kv_make_directory(const char *path);

#endif
