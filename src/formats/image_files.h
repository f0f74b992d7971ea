/* image_files.h — the image files of a dataset: every PNG and JPEG under a
 * folder, or the paths a list file names. Nothing is opened but folders and
 * the list file. */
#ifndef KV_IMAGE_FILES_H
#define KV_IMAGE_FILES_H

#include "base/common.h"

typedef struct kv_image_files {
    size_t count;
    char **paths; /* what to open */
    char **names; /* what to record: the path below the folder, or the list's line */
} kv_image_files;

/* Every *.png, *.jpg and *.jpeg file (any letter case) under dir, searched
 * recursively, sorted by path in byte order (strcmp): the rules of the
 * training data loader (train/data.h), so the same tree gives the same list
 * there, here and on every machine. Names starting with '.' are skipped;
 * symbolic links are followed, a link back to a folder being walked is not;
 * an entry that cannot be examined (a dangling link) with an image name is
 * kept, so that reading it reports it. names[i] is paths[i] without "dir/".
 * Errors: KLVAE_ERR_IO (dir missing, not a folder, unreadable, nested more
 * than 256 deep; no image file under it), KLVAE_ERR_OUT_OF_MEMORY. *out is
 * empty on error. */
klvae_status_t kv_image_files_walk(const char *dir, kv_image_files *out);

/* The paths listed in the text file list_path, one per line, in the file's
 * order (repeats kept). Empty lines and lines starting with '#' are skipped,
 * and a line's trailing '\r' is dropped. A relative path is relative to the
 * list file's folder. names[i] is the line as written. Errors: KLVAE_ERR_IO
 * (cannot read it; it lists no path), KLVAE_ERR_FORMAT (a NUL byte, a line of
 * more than 4096 bytes), KLVAE_ERR_OUT_OF_MEMORY. */
klvae_status_t kv_image_files_read_list(const char *list_path, kv_image_files *out);

void kv_image_files_free(kv_image_files *files);

#endif
