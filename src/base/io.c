/* io.c — see io.h. */
#include <ctype.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <libgen.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include "base/io.h"

void kv_sync_parent(const char *path)
{
    char *copy = strdup(path);
    if (!copy)
        return;
    int fd = open(dirname(copy), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (fd >= 0) {
        fsync(fd);
        close(fd);
    }
    free(copy);
}

bool kv_temp_name_of(const char *entry, const char *target_base, const char *mark)
{
    size_t nb = strlen(target_base), nm = strlen(mark);
    if (strlen(entry) != nb + nm + 6 || strncmp(entry, target_base, nb) != 0 ||
        strncmp(entry + nb, mark, nm) != 0)
        return false;
    for (const char *c = entry + nb + nm; *c; c++)
        if (!isalnum((unsigned char)*c))
            return false;
    return true;
}

bool kv_temp_in_use(int dir_fd, const char *name)
{
    int fd = openat(dir_fd, name, O_RDONLY | O_NOFOLLOW | O_CLOEXEC | O_NONBLOCK);
    if (fd < 0)
        return true;
    /* A filesystem without flock cannot say: such a file counts as stale,
     * as two writers of one path at once are not supported anyway. */
    bool busy = flock(fd, LOCK_EX | LOCK_NB) != 0 && errno == EWOULDBLOCK;
    close(fd);
    return busy;
}

/* Removes the temporary files that crashed writers of path left beside it:
 * regular files of ours, named by kv_atomic_open, that no writer holds. */
static void remove_stale_temp_files(const char *path)
{
    char *dir_copy = strdup(path), *base_copy = strdup(path);
    DIR *d = dir_copy && base_copy ? opendir(dirname(dir_copy)) : NULL;
    if (d) {
        const char *base = basename(base_copy);
        struct dirent *e;
        while ((e = readdir(d)) != NULL) {
            struct stat st;
            if (kv_temp_name_of(e->d_name, base, KV_TEMP_MARK) &&
                fstatat(dirfd(d), e->d_name, &st, AT_SYMLINK_NOFOLLOW) == 0 &&
                S_ISREG(st.st_mode) && st.st_uid == geteuid() &&
                !kv_temp_in_use(dirfd(d), e->d_name))
                unlinkat(dirfd(d), e->d_name, 0);
        }
        closedir(d);
    }
    free(dir_copy);
    free(base_copy);
}

klvae_status_t kv_atomic_open(kv_atomic_file *f, const char *path)
{
    memset(f, 0, sizeof *f);
    f->lock_fd = -1;
    /* Refuse now what the final rename would refuse later (a folder in the
     * way), so that files published together either all appear or none. */
    struct stat existing;
    if (lstat(path, &existing) == 0 && S_ISDIR(existing.st_mode))
        return kv_error(KLVAE_ERR_IO, "cannot write %s: a folder of that name is in the way", path);
    remove_stale_temp_files(path);
    size_t len = strlen(path) + sizeof KV_TEMP_MARK + 6;
    f->final_path = kv_strdup(path);
    f->temp_path = malloc(len);
    if (!f->final_path || !f->temp_path) {
        kv_atomic_abort(f);
        return kv_error(KLVAE_ERR_OUT_OF_MEMORY, "out of memory opening %s", path);
    }
    snprintf(f->temp_path, len, "%s" KV_TEMP_MARK "XXXXXX", path);
    int fd = mkostemp(f->temp_path, O_CLOEXEC);
    if (fd < 0) {
        int err = errno;
        free(f->temp_path);
        f->temp_path = NULL;
        kv_atomic_abort(f);
        return kv_error(KLVAE_ERR_IO, "cannot create %s: %s", path, strerror(err));
    }
    /* mkstemp makes 0600 files; give the usual permissions instead (umask
     * cannot be read without changing it, which would race other threads). */
    fchmod(fd, 0644);
    /* The lock marks the file as live for remove_stale_temp_files; a second
     * descriptor keeps it from fclose (finish) to the rename (publish). */
    flock(fd, LOCK_EX | LOCK_NB);
    f->lock_fd = dup(fd);
    f->fp = fdopen(fd, "wb");
    if (!f->fp) {
        int err = errno;
        close(fd);
        kv_atomic_abort(f);
        return kv_error(KLVAE_ERR_IO, "cannot open %s: %s", path, strerror(err));
    }
    return KLVAE_OK;
}

klvae_status_t kv_atomic_write(kv_atomic_file *f, const void *data, size_t bytes)
{
    if (bytes && fwrite(data, 1, bytes, f->fp) != bytes) {
        int err = errno;
        klvae_status_t st = kv_error(KLVAE_ERR_IO, "cannot write %s: %s", f->final_path,
                                     strerror(err));
        kv_atomic_abort(f);
        return st;
    }
    return KLVAE_OK;
}

klvae_status_t kv_atomic_finish(kv_atomic_file *f)
{
    klvae_status_t st = KLVAE_OK;
    if (fflush(f->fp) != 0 || fsync(fileno(f->fp)) != 0)
        st = kv_error(KLVAE_ERR_IO, "cannot write %s: %s", f->final_path, strerror(errno));
    if (fclose(f->fp) != 0 && st == KLVAE_OK)
        st = kv_error(KLVAE_ERR_IO, "cannot write %s: %s", f->final_path, strerror(errno));
    f->fp = NULL;
    if (st != KLVAE_OK)
        kv_atomic_abort(f);
    return st;
}

klvae_status_t kv_atomic_publish(kv_atomic_file *f)
{
    klvae_status_t st = KLVAE_OK;
    if (rename(f->temp_path, f->final_path) != 0) {
        st = kv_error(KLVAE_ERR_IO, "cannot rename %s to %s: %s", f->temp_path, f->final_path,
                      strerror(errno));
    } else {
        kv_sync_parent(f->final_path);
        free(f->temp_path);
        f->temp_path = NULL;
    }
    kv_atomic_abort(f);
    return st;
}

klvae_status_t kv_atomic_commit(kv_atomic_file *f)
{
    klvae_status_t st = kv_atomic_finish(f);
    return st == KLVAE_OK ? kv_atomic_publish(f) : st;
}

void kv_atomic_abort(kv_atomic_file *f)
{
    if (f->fp) {
        fclose(f->fp);
        f->fp = NULL;
    }
    if (f->temp_path) {
        unlink(f->temp_path);
        free(f->temp_path);
        f->temp_path = NULL;
    }
    if (f->lock_fd >= 0) {
        close(f->lock_fd); /* after the unlink or rename: never a stale-looking live file */
        f->lock_fd = -1;
    }
    free(f->final_path);
    f->final_path = NULL;
}

klvae_status_t kv_read_text_file(const char *path, size_t max_bytes, char **out, size_t *len)
{
    *out = NULL;
    FILE *fp = fopen(path, "rb");
    if (!fp)
        return kv_error(KLVAE_ERR_IO, "cannot open %s: %s", path, strerror(errno));
    struct stat st;
    if (fstat(fileno(fp), &st) != 0 || !S_ISREG(st.st_mode)) {
        fclose(fp);
        return kv_error(KLVAE_ERR_IO, "%s is not a regular file", path);
    }
    if ((size_t)st.st_size > max_bytes) {
        fclose(fp);
        return kv_error(KLVAE_ERR_FORMAT, "%s is %lld bytes, more than the %zu allowed", path,
                        (long long)st.st_size, max_bytes);
    }
    size_t size = (size_t)st.st_size;
    char *buf = malloc(size + 1);
    if (!buf) {
        fclose(fp);
        return kv_error(KLVAE_ERR_OUT_OF_MEMORY, "out of memory reading %s", path);
    }
    if (fread(buf, 1, size, fp) != size) {
        free(buf);
        fclose(fp);
        return kv_error(KLVAE_ERR_IO, "cannot read %s", path);
    }
    fclose(fp);
    buf[size] = '\0';
    *out = buf;
    if (len)
        *len = size;
    return KLVAE_OK;
}

bool kv_is_directory(const char *path)
{
    struct stat st;
    return stat(path, &st) == 0 && S_ISDIR(st.st_mode);
}

klvae_status_t kv_make_directory(const char *path)
{
    if (mkdir(path, 0777) == 0 || (errno == EEXIST && kv_is_directory(path)))
        return KLVAE_OK;
    return kv_error(KLVAE_ERR_IO, "cannot create folder %s: %s", path, strerror(errno));
}
