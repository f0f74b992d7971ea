/* io.h — file helpers: atomic writes and whole reads. */
#ifndef KV_IO_H
#define KV_IO_H

#include <stdio.h>

#include "base/common.h"

/* Temporary names. A file or folder NAME is written as
 * "NAME.tmp.klvae-XXXXXX" (six letters or digits) beside it; a folder that a
 * save moves aside, where the filesystem cannot swap two folders in one
 * step, is "NAME.old.klvae-XXXXXX" (see kv_atomic_folder). The writer holds
 * an flock on it while it lives, so that a later writer of NAME can tell
 * one that a crash left behind (no lock) from one in use, and remove it.
 * The "klvae-" mark keeps these names apart from a user's own files. */
#define KV_TEMP_MARK ".tmp.klvae-"
#define KV_OLD_MARK ".old.klvae-"

/* true when entry is target_base + mark + six letters or digits. */
bool kv_temp_name_of(const char *entry, const char *target_base, const char *mark);

/* true when a live writer holds the temporary file or folder name in the
 * folder dir_fd (or AT_FDCWD), or it cannot be opened to ask: it is then
 * left alone. */
bool kv_temp_in_use(int dir_fd, const char *name);

/* Syncs the folder that holds path, so that a rename in it is durable. */
void kv_sync_parent(const char *path);

/* A file written under a temporary name in the target's folder, then
 * flushed, synced and renamed over the target, so readers see either the old
 * file or the complete new one. Opening removes the stale temporary files of
 * the same target (those no live writer holds). */
typedef struct kv_atomic_file {
    FILE *fp;
    char *final_path;
    char *temp_path;
    int lock_fd; /* holds the temporary file's flock until publish or abort */
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
/* Removes the temporary file (safe after commit or abort, and on a file
 * that kv_atomic_open refused). */
void kv_atomic_abort(kv_atomic_file *f);

/* A folder whose files must change together (a model: config.json and its
 * weights), replaced in one step. begin makes "NAME.tmp.klvae-XXXXXX" beside
 * NAME; the caller writes the files into temp_path; commit puts that folder
 * in NAME's place with one rename (a swap through renameat2 RENAME_EXCHANGE
 * when NAME exists) and removes the old one, so that at every instant NAME is
 * the old folder or the new one, whole. Where the filesystem cannot swap
 * (EINVAL: NFS, some FUSE), the old folder is first renamed to
 * "NAME.old.klvae-XXXXXX"; a crash between the two renames leaves it there,
 * and the next begin for NAME renames it back before anything else.
 *
 * names lists the entries the folder holds (NULL-terminated). An existing
 * NAME may hold only those (regular files) and temporary files of them, so
 * that replacing it never removes anything else; begin refuses any other.
 * begin also removes what crashed writers of NAME left (temporary folders no
 * live writer holds, and only the entries of names in them). A symbolic link
 * NAME is followed: the folder it names is replaced. */
typedef struct kv_atomic_folder {
    char *final_path; /* NAME, or what its symbolic link names */
    char *temp_path;  /* where the caller writes */
    const char *const *names;
    unsigned mode; /* the old folder's permissions, else 0755 */
    int lock_fd;   /* the temporary folder, flock'ed while it is live */
} kv_atomic_folder;

klvae_status_t kv_folder_begin(kv_atomic_folder *f, const char *path, const char *const *names);
/* Puts the folder in place; on failure the old folder stays at NAME and the
 * temporary one is removed. Frees f either way. */
klvae_status_t kv_folder_commit(kv_atomic_folder *f);
/* Removes the temporary folder and frees f (safe after commit). */
void kv_folder_abort(kv_atomic_folder *f);

/* Reads a whole (small) file into a NUL-terminated buffer. */
klvae_status_t kv_read_text_file(const char *path, size_t max_bytes, char **out, size_t *len);

/* true when path names a directory. */
bool kv_is_directory(const char *path);

/* Creates a directory (and not its parents); an existing one is fine. */
klvae_status_t kv_make_directory(const char *path);

#endif
