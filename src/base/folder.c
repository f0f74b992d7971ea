/* folder.c — a folder replaced in one step (kv_atomic_folder, see io.h). */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <libgen.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "base/io.h"

#ifndef RENAME_EXCHANGE
#define RENAME_EXCHANGE (1 << 1)
#endif

/* Swaps two paths in one step (Linux 3.15+); ENOSYS where there is none. */
static int exchange(const char *a, const char *b)
{
#ifdef SYS_renameat2
    return (int)syscall(SYS_renameat2, AT_FDCWD, a, AT_FDCWD, b, RENAME_EXCHANGE);
#else
    (void)a, (void)b;
    errno = ENOSYS;
    return -1;
#endif
}

/* true when entry is one of names or a temporary file of one. */
static bool is_saved_entry(const char *entry, const char *const *names)
{
    for (const char *const *n = names; *n; n++)
        if (strcmp(entry, *n) == 0 || kv_temp_name_of(entry, *n, KV_TEMP_MARK))
            return true;
    return false;
}

/* Removes the saved entries from dir, then dir if that emptied it: whatever
 * else is in it (a file someone put there) stays, and dir with it. */
static void remove_saved_folder(const char *dir, const char *const *names)
{
    DIR *d = opendir(dir);
    if (d) {
        struct dirent *e;
        while ((e = readdir(d)) != NULL)
            if (is_saved_entry(e->d_name, names))
                unlinkat(dirfd(d), e->d_name, 0);
        closedir(d);
    }
    rmdir(dir);
}

/* The folder a save replaces: path without trailing slashes, through a
 * symbolic link. "/", "." and ".." name no folder that can be renamed. */
static klvae_status_t resolve_target(const char *path, char **out)
{
    size_t len = strlen(path);
    while (len > 1 && path[len - 1] == '/')
        len--;
    char *p = strndup(path, len);
    if (!p)
        return kv_error(KLVAE_ERR_OUT_OF_MEMORY, "out of memory saving to %s", path);
    const char *base = strrchr(p, '/') ? strrchr(p, '/') + 1 : p;
    if (!*base || strcmp(base, ".") == 0 || strcmp(base, "..") == 0) {
        free(p);
        return kv_error(KLVAE_ERR_INVALID_ARGUMENT,
                        "cannot save to '%s': name the folder itself (it is replaced as a "
                        "whole), not '/', '.' or '..'",
                        path);
    }
    struct stat st;
    if (lstat(p, &st) == 0 && S_ISLNK(st.st_mode)) {
        char *real = realpath(p, NULL);
        if (!real) {
            klvae_status_t status = kv_error(KLVAE_ERR_IO, "cannot follow the link %s: %s", p,
                                             strerror(errno));
            free(p);
            return status;
        }
        free(p);
        p = real;
    }
    *out = p;
    return KLVAE_OK;
}

/* An existing target must be a folder of saved entries only: replacing it
 * must not take anything else with it. */
static klvae_status_t check_existing(const char *path, const char *const *names, struct stat *st,
                                     bool *exists)
{
    *exists = false;
    if (lstat(path, st) != 0)
        return errno == ENOENT ? KLVAE_OK
                               : kv_error(KLVAE_ERR_IO, "cannot save to %s: %s", path,
                                          strerror(errno));
    if (!S_ISDIR(st->st_mode))
        return kv_error(KLVAE_ERR_IO, "cannot save to %s: it exists and is not a folder", path);
    *exists = true;
    DIR *d = opendir(path);
    if (!d)
        return kv_error(KLVAE_ERR_IO, "cannot read the folder %s: %s", path, strerror(errno));
    klvae_status_t status = KLVAE_OK;
    struct dirent *e;
    while (status == KLVAE_OK && (e = readdir(d)) != NULL) {
        struct stat es;
        if (strcmp(e->d_name, ".") == 0 || strcmp(e->d_name, "..") == 0 ||
            (is_saved_entry(e->d_name, names) &&
             fstatat(dirfd(d), e->d_name, &es, AT_SYMLINK_NOFOLLOW) == 0 && S_ISREG(es.st_mode)))
            continue;
        status = kv_error(KLVAE_ERR_IO,
                          "cannot save to %s: %s in it is not a file a save writes, and a save "
                          "replaces the folder whole; save to a new or empty folder, or move %s "
                          "away",
                          path, e->d_name, e->d_name);
    }
    closedir(d);
    return status;
}

/* What crashed saves of target left beside it: a folder moved aside (put
 * back when target is missing) and temporary folders (removed), each only
 * when it is ours and no live writer holds it. */
static void clean_stale_folders(const char *target, const char *const *names)
{
    char *dir_copy = strdup(target), *base_copy = strdup(target);
    const char *dir = dir_copy ? dirname(dir_copy) : NULL;
    DIR *d = dir && base_copy ? opendir(dir) : NULL;
    if (d) {
        const char *base = basename(base_copy);
        struct dirent *e;
        while ((e = readdir(d)) != NULL) {
            bool aside = kv_temp_name_of(e->d_name, base, KV_OLD_MARK);
            struct stat st;
            if ((!aside && !kv_temp_name_of(e->d_name, base, KV_TEMP_MARK)) ||
                fstatat(dirfd(d), e->d_name, &st, AT_SYMLINK_NOFOLLOW) != 0 ||
                !S_ISDIR(st.st_mode) || st.st_uid != geteuid() ||
                kv_temp_in_use(dirfd(d), e->d_name))
                continue;
            char *stale = malloc(strlen(dir) + strlen(e->d_name) + 2);
            if (!stale)
                break;
            sprintf(stale, "%s/%s", dir, e->d_name);
            if (!aside || (rename(stale, target) != 0 && errno != ENOENT))
                remove_saved_folder(stale, names);
            free(stale);
        }
        closedir(d);
    }
    free(dir_copy);
    free(base_copy);
}

klvae_status_t kv_folder_begin(kv_atomic_folder *f, const char *path, const char *const *names)
{
    memset(f, 0, sizeof *f);
    f->lock_fd = -1;
    f->names = names;
    f->mode = 0755;
    klvae_status_t st = resolve_target(path, &f->final_path);
    if (st != KLVAE_OK)
        return st;
    clean_stale_folders(f->final_path, names);
    struct stat old;
    bool exists;
    st = check_existing(f->final_path, names, &old, &exists);
    if (st != KLVAE_OK) {
        kv_folder_abort(f);
        return st;
    }
    if (exists)
        f->mode = old.st_mode & 07777; /* set at commit: it may forbid writing */
    size_t n = strlen(f->final_path) + sizeof KV_TEMP_MARK + 6;
    f->temp_path = malloc(n);
    if (!f->temp_path) {
        kv_folder_abort(f);
        return kv_error(KLVAE_ERR_OUT_OF_MEMORY, "out of memory saving to %s", path);
    }
    snprintf(f->temp_path, n, "%s" KV_TEMP_MARK "XXXXXX", f->final_path);
    if (!mkdtemp(f->temp_path)) {
        st = kv_error(KLVAE_ERR_IO, "cannot create a folder beside %s: %s", f->final_path,
                      strerror(errno));
        free(f->temp_path);
        f->temp_path = NULL;
        kv_folder_abort(f);
        return st;
    }
    f->lock_fd = open(f->temp_path, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (f->lock_fd >= 0)
        flock(f->lock_fd, LOCK_EX | LOCK_NB);
    return KLVAE_OK;
}

/* For filesystems that cannot swap: the old folder goes aside, the new one
 * in, the old one away. A crash between the first two renames leaves the old
 * folder at "NAME.old.klvae-XXXXXX", which the next kv_folder_begin puts back. */
static klvae_status_t swap_by_two_renames(kv_atomic_folder *f)
{
    size_t n = strlen(f->final_path) + sizeof KV_OLD_MARK + 6;
    char *aside = malloc(n);
    if (!aside)
        return kv_error(KLVAE_ERR_OUT_OF_MEMORY, "out of memory saving to %s", f->final_path);
    snprintf(aside, n, "%s" KV_OLD_MARK "XXXXXX", f->final_path);
    if (!mkdtemp(aside)) { /* an empty folder, which the rename replaces */
        klvae_status_t st = kv_error(KLVAE_ERR_IO, "cannot create a folder beside %s: %s",
                                     f->final_path, strerror(errno));
        free(aside);
        return st;
    }
    /* the old folder, locked while aside: no other writer takes it for stale */
    int lock = open(f->final_path, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (lock >= 0)
        flock(lock, LOCK_EX | LOCK_NB);
    klvae_status_t st = KLVAE_OK;
    if (rename(f->final_path, aside) != 0) {
        st = kv_error(KLVAE_ERR_IO, "cannot move %s aside to %s: %s", f->final_path, aside,
                      strerror(errno));
        rmdir(aside);
    } else if (rename(f->temp_path, f->final_path) != 0) {
        st = kv_error(KLVAE_ERR_IO, "cannot rename %s to %s: %s", f->temp_path, f->final_path,
                      strerror(errno));
        rename(aside, f->final_path); /* if this fails too, the next save puts it back */
    } else {
        kv_sync_parent(f->final_path);
        remove_saved_folder(aside, f->names);
        free(f->temp_path);
        f->temp_path = NULL;
    }
    if (lock >= 0)
        close(lock);
    free(aside);
    return st;
}

klvae_status_t kv_folder_commit(kv_atomic_folder *f)
{
    klvae_status_t st = KLVAE_OK;
    /* the new entries are durable before the folder becomes the target */
    if ((f->lock_fd >= 0 && fsync(f->lock_fd) != 0) || chmod(f->temp_path, f->mode) != 0) {
        st = kv_error(KLVAE_ERR_IO, "cannot write %s: %s", f->temp_path, strerror(errno));
    } else if (access(f->final_path, F_OK) != 0 && errno == ENOENT) {
        if (rename(f->temp_path, f->final_path) == 0) {
            free(f->temp_path);
            f->temp_path = NULL;
        } else {
            st = kv_error(KLVAE_ERR_IO, "cannot rename %s to %s: %s", f->temp_path,
                          f->final_path, strerror(errno));
        }
    } else if (exchange(f->temp_path, f->final_path) == 0) {
        /* temp_path now holds the old folder, removed below */
    } else if (errno == EINVAL || errno == ENOSYS || errno == EOPNOTSUPP) {
        st = swap_by_two_renames(f);
    } else {
        st = kv_error(KLVAE_ERR_IO, "cannot swap %s with %s: %s", f->temp_path, f->final_path,
                      strerror(errno));
    }
    if (st == KLVAE_OK)
        kv_sync_parent(f->final_path);
    kv_folder_abort(f);
    return st;
}

void kv_folder_abort(kv_atomic_folder *f)
{
    if (f->temp_path)
        remove_saved_folder(f->temp_path, f->names);
    if (f->lock_fd >= 0)
        close(f->lock_fd); /* after the removal: never a stale-looking live folder */
    free(f->temp_path);
    free(f->final_path);
    f->temp_path = NULL;
    f->final_path = NULL;
    f->lock_fd = -1;
}
