/* io.c — see io.h. */
#include <errno.h>
#include <fcntl.h>
#include <libgen.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "base/io.h"

static void sync_parent_directory(const char *path)
{
    char *copy = strdup(path);
    if (!copy)
        return;
    int fd = open(dirname(copy), O_RDONLY | O_DIRECTORY);
    if (fd >= 0) {
        fsync(fd);
        close(fd);
    }
    free(copy);
}

klvae_status_t kv_atomic_open(kv_atomic_file *f, const char *path)
{
    memset(f, 0, sizeof *f);
    /* Refuse now what the final rename would refuse later (a folder in the
     * way), so that files published together either all appear or none. */
    struct stat existing;
    if (lstat(path, &existing) == 0 && S_ISDIR(existing.st_mode))
        return kv_error(KLVAE_ERR_IO, "cannot write %s: a folder of that name is in the way", path);
    size_t len = strlen(path);
    f->final_path = kv_strdup(path);
    f->temp_path = malloc(len + 16);
    if (!f->final_path || !f->temp_path) {
        kv_atomic_abort(f);
        return kv_error(KLVAE_ERR_OUT_OF_MEMORY, "out of memory opening %s", path);
    }
    snprintf(f->temp_path, len + 16, "%s.tmp.XXXXXX", path);
    int fd = mkstemp(f->temp_path);
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
        sync_parent_directory(f->final_path);
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
