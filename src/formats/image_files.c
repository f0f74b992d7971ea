/* image_files.c — see image_files.h. The walk follows the same rules as
 * train/data.c's, so that a folder is the same dataset for training and
 * for encoding (tests/test_dataset.c compares the two lists). */
#include <dirent.h>
#include <errno.h>
#include <libgen.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/stat.h>

#include "base/io.h"
#include "formats/image_files.h"

#define KV_WALK_MAX_DEPTH 256
#define KV_LIST_MAX_LINE 4096
#define KV_LIST_MAX_BYTES ((size_t)1 << 32)

typedef struct dir_id {
    dev_t dev;
    ino_t ino;
} dir_id;

static bool has_image_extension(const char *name)
{
    const char *dot = strrchr(name, '.');
    if (!dot || dot == name)
        return false;
    return strcasecmp(dot, ".png") == 0 || strcasecmp(dot, ".jpg") == 0 ||
           strcasecmp(dot, ".jpeg") == 0;
}

/* Appends path (taken over; freed on failure). */
static klvae_status_t push(kv_image_files *files, size_t *cap, char *path)
{
    if (files->count == *cap) {
        size_t n = *cap ? *cap * 2 : 64;
        char **grown = n > SIZE_MAX / sizeof *grown ? NULL
                                                    : realloc(files->paths, n * sizeof *grown);
        if (!grown) {
            free(path);
            return kv_error(KLVAE_ERR_OUT_OF_MEMORY, "out of memory listing image files");
        }
        files->paths = grown;
        *cap = n;
    }
    files->paths[files->count++] = path;
    return KLVAE_OK;
}

static klvae_status_t walk(const char *dir, kv_image_files *files, size_t *cap,
                           dir_id *ancestors, int depth);

/* One entry of a folder: recursed into, listed or passed over. */
static klvae_status_t walk_entry(char *path, const char *name, kv_image_files *files,
                                 size_t *cap, dir_id *ancestors, int depth)
{
    struct stat sb;
    if (stat(path, &sb) != 0) /* dangling: kept so that reading it says so */
        return has_image_extension(name) ? push(files, cap, path) : (free(path), KLVAE_OK);
    if (S_ISREG(sb.st_mode) && has_image_extension(name))
        return push(files, cap, path);
    klvae_status_t st = KLVAE_OK;
    if (S_ISDIR(sb.st_mode)) {
        bool loop = false;
        for (int i = 0; i < depth; i++)
            loop |= ancestors[i].dev == sb.st_dev && ancestors[i].ino == sb.st_ino;
        if (!loop && depth >= KV_WALK_MAX_DEPTH) {
            st = kv_error(KLVAE_ERR_IO, "folders nested more than %d deep at %s",
                          KV_WALK_MAX_DEPTH, path);
        } else if (!loop) {
            ancestors[depth].dev = sb.st_dev;
            ancestors[depth].ino = sb.st_ino;
            st = walk(path, files, cap, ancestors, depth + 1);
        }
    }
    free(path);
    return st;
}

static klvae_status_t walk(const char *dir, kv_image_files *files, size_t *cap,
                           dir_id *ancestors, int depth)
{
    DIR *d = opendir(dir);
    if (!d)
        return kv_error(KLVAE_ERR_IO, "cannot read folder %s: %s", dir, strerror(errno));
    klvae_status_t st = KLVAE_OK;
    while (st == KLVAE_OK) {
        errno = 0;
        struct dirent *e = readdir(d);
        if (!e) {
            if (errno != 0)
                st = kv_error(KLVAE_ERR_IO, "cannot read folder %s: %s", dir, strerror(errno));
            break;
        }
        if (e->d_name[0] == '.')
            continue; /* ".", "..", hidden files and folders */
        char *path = kv_path_join(dir, e->d_name);
        st = path ? walk_entry(path, e->d_name, files, cap, ancestors, depth)
                  : KLVAE_ERR_OUT_OF_MEMORY;
    }
    closedir(d);
    return st;
}

static int compare_paths(const void *a, const void *b)
{
    return strcmp(*(char *const *)a, *(char *const *)b);
}

void kv_image_files_free(kv_image_files *files)
{
    for (size_t i = 0; i < files->count; i++) {
        if (files->names)
            free(files->names[i]);
        free(files->paths[i]);
    }
    free(files->paths);
    free(files->names);
    memset(files, 0, sizeof *files);
}

klvae_status_t kv_image_files_walk(const char *dir, kv_image_files *out)
{
    memset(out, 0, sizeof *out);
    struct stat sb;
    if (stat(dir, &sb) != 0)
        return kv_error(KLVAE_ERR_IO, "cannot open folder %s: %s", dir, strerror(errno));
    if (!S_ISDIR(sb.st_mode))
        return kv_error(KLVAE_ERR_IO, "%s is not a folder", dir);
    dir_id *ancestors = malloc((KV_WALK_MAX_DEPTH + 1) * sizeof *ancestors);
    if (!ancestors)
        return kv_error(KLVAE_ERR_OUT_OF_MEMORY, "out of memory listing %s", dir);
    ancestors[0].dev = sb.st_dev;
    ancestors[0].ino = sb.st_ino;
    size_t cap = 0;
    klvae_status_t st = walk(dir, out, &cap, ancestors, 1);
    free(ancestors);
    if (st == KLVAE_OK && out->count == 0)
        st = kv_error(KLVAE_ERR_IO, "no PNG or JPEG file (*.png, *.jpg, *.jpeg) under %s", dir);
    if (st == KLVAE_OK) {
        qsort(out->paths, out->count, sizeof *out->paths, compare_paths);
        out->names = calloc(out->count, sizeof *out->names);
        size_t skip = strlen(dir); /* kv_path_join put "dir/" in front */
        skip += skip > 0 && dir[skip - 1] != '/';
        for (size_t i = 0; out->names && i < out->count && st == KLVAE_OK; i++)
            if (!(out->names[i] = kv_strdup(out->paths[i] + skip)))
                st = KLVAE_ERR_OUT_OF_MEMORY;
        if (!out->names)
            st = kv_error(KLVAE_ERR_OUT_OF_MEMORY, "out of memory listing %s", dir);
    }
    if (st != KLVAE_OK)
        kv_image_files_free(out);
    return st;
}

/* The path to open for a line of the list: absolute as it is, relative
 * below the list's folder. */
static char *resolve(const char *folder, const char *line)
{
    return line[0] == '/' ? kv_strdup(line) : kv_path_join(folder, line);
}

/* Splits text into lines and adds each listed path. */
static klvae_status_t parse_list(const char *list_path, char *text, size_t len,
                                 const char *folder, kv_image_files *out, size_t *cap)
{
    if (memchr(text, '\0', len))
        return kv_error(KLVAE_ERR_FORMAT, "%s: the list holds a NUL byte (one path per line)",
                        list_path);
    size_t line_no = 0;
    for (char *line = text; *line;) {
        char *end = strchr(line, '\n');
        char *next = end ? end + 1 : line + strlen(line);
        if (end)
            *end = '\0';
        line_no++;
        size_t n = strlen(line);
        if (n > 0 && line[n - 1] == '\r')
            line[--n] = '\0';
        if (n > KV_LIST_MAX_LINE)
            return kv_error(KLVAE_ERR_FORMAT, "%s: line %zu is longer than %d bytes", list_path,
                            line_no, KV_LIST_MAX_LINE);
        if (n > 0 && line[0] != '#') {
            char *path = resolve(folder, line);
            klvae_status_t st = path ? push(out, cap, path) : KLVAE_ERR_OUT_OF_MEMORY;
            if (st != KLVAE_OK)
                return st;
            char *name = kv_strdup(line);
            if (!name)
                return KLVAE_ERR_OUT_OF_MEMORY;
            out->names[out->count - 1] = name;
        }
        line = next;
    }
    return KLVAE_OK;
}

klvae_status_t kv_image_files_read_list(const char *list_path, kv_image_files *out)
{
    memset(out, 0, sizeof *out);
    char *text = NULL;
    size_t len = 0;
    klvae_status_t st = kv_read_text_file(list_path, KV_LIST_MAX_BYTES, &text, &len);
    if (st != KLVAE_OK)
        return st;
    char *copy = kv_strdup(list_path);
    size_t lines = 1;
    for (size_t i = 0; i < len; i++)
        lines += text[i] == '\n';
    /* names grows with paths: at most one entry per line */
    out->names = copy ? calloc(lines, sizeof *out->names) : NULL;
    size_t cap = 0;
    if (!copy || !out->names)
        st = kv_error(KLVAE_ERR_OUT_OF_MEMORY, "out of memory reading %s", list_path);
    else
        st = parse_list(list_path, text, len, dirname(copy), out, &cap);
    if (st == KLVAE_OK && out->count == 0)
        st = kv_error(KLVAE_ERR_IO, "%s lists no image path (one path per line)", list_path);
    free(copy);
    free(text);
    if (st != KLVAE_OK)
        kv_image_files_free(out);
    return st;
}
