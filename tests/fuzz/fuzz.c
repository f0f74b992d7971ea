/* fuzz.c — see fuzz.h. Linked into every harness (built with
 * -D_GNU_SOURCE, for nftw and mkdtemp). */
#include <ftw.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "fuzz.h"

static char scratch[4096];

static int remove_entry(const char *path, const struct stat *sb, int flag, struct FTW *ftw)
{
    (void)sb, (void)flag, (void)ftw;
    return remove(path);
}

static void remove_scratch(void)
{
    if (scratch[0])
        nftw(scratch, remove_entry, 16, FTW_DEPTH | FTW_PHYS);
}

const char *fuzz_dir(void)
{
    if (!scratch[0]) {
        const char *base = getenv("TMPDIR");
        snprintf(scratch, sizeof scratch, "%s/klvae-fuzz-XXXXXX", base && *base ? base : "/tmp");
        FUZZ_CHECK(mkdtemp(scratch) != NULL, "cannot make a scratch folder %s", scratch);
        atexit(remove_scratch);
    }
    return scratch;
}

const char *fuzz_path(const char *name)
{
    static char path[4200];
    snprintf(path, sizeof path, "%s/%s", fuzz_dir(), name);
    return path;
}

void fuzz_write(const char *path, const void *data, size_t size)
{
    FILE *fp = fopen(path, "wb");
    FUZZ_CHECK(fp != NULL, "cannot write %s", path);
    FUZZ_CHECK(size == 0 || fwrite(data, 1, size, fp) == size, "cannot write %s", path);
    FUZZ_CHECK(fclose(fp) == 0, "cannot write %s", path);
}

void fuzz_check_failure(klvae_status_t st, const char *call)
{
    FUZZ_CHECK(st > KLVAE_OK && st <= KLVAE_ERR_BUFFER_TOO_SMALL, "%s returned status %d", call,
               (int)st);
    FUZZ_CHECK(st != KLVAE_ERR_INTERNAL, "%s hit an internal error: %s", call, klvae_last_error());
    FUZZ_CHECK(klvae_last_error()[0] != '\0', "%s failed with %s but left no message", call,
               klvae_status_string(st));
}

const char *fuzz_seed_dir(void)
{
    const char *dir = getenv("KLVAE_FUZZ_SEED_DIR");
    return dir && *dir ? dir : NULL;
}
