/* fuzz_image.h — the body of fuzz_png.c and fuzz_jpeg.c: the input is an
 * image file after its signature (FUZZ_MAGIC, which the harness puts back),
 * so that mutations go to the decoder and not to format detection; read
 * with klvae_image_read_opts under a budget of 65536 pixels (a larger one
 * makes each input that claims a large image allocate megabytes before it
 * fails, and the fuzzer 20 times slower; the budget's own check is the
 * same code at any size).
 * Invariants: a read that succeeds gives h, w > 0 within the budget and
 * every value finite and in [-1, 1]; a failed read leaves *pixels NULL,
 * *h = *w = 0 and a message. */
#include <math.h>
#include <string.h>

#include "fuzz.h"

#define FUZZ_BUDGET 65536

static klvae_options_t *options;
static unsigned char *file;
static size_t file_cap;

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    (void)argc, (void)argv;
    FUZZ_CHECK(klvae_options_create(&options) == KLVAE_OK, "options");
    FUZZ_CHECK(klvae_options_set(options, "max_image_pixels", "65536") == KLVAE_OK, "budget");
    return 0;
}

static void check_image(const float *px, int h, int w)
{
    FUZZ_CHECK(px != NULL && h > 0 && w > 0, "success with pixels %p, %d x %d", (const void *)px,
               h, w);
    FUZZ_CHECK((uint64_t)h * (uint64_t)w <= FUZZ_BUDGET, "%d x %d is over the budget of %d", w, h,
               FUZZ_BUDGET);
    for (size_t i = 0; i < (size_t)3 * h * w; i++)
        FUZZ_CHECK(isfinite(px[i]) && px[i] >= -1.0f && px[i] <= 1.0f,
                   "value %zu of a %d x %d image is %g", i, w, h, (double)px[i]);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static const unsigned char magic[] = FUZZ_MAGIC;
    if (sizeof magic + size > file_cap) {
        file_cap = 2 * (sizeof magic + size);
        file = realloc(file, file_cap);
        FUZZ_CHECK(file != NULL, "out of memory");
    }
    memcpy(file, magic, sizeof magic);
    if (size)
        memcpy(file + sizeof magic, data, size);
    const char *path = fuzz_path("image");
    fuzz_write(path, file, sizeof magic + size);
    float sentinel[1];
    float *px = sentinel;
    int h = -7, w = -7;
    klvae_status_t st = klvae_image_read_opts(path, options, &px, &h, &w);
    if (st != KLVAE_OK) {
        fuzz_check_failure(st, "klvae_image_read_opts");
        FUZZ_CHECK(px == NULL && h == 0 && w == 0, "failed read left pixels %p, %d x %d",
                   (void *)px, h, w);
        return 0;
    }
    check_image(px, h, w);
    klvae_free(px);
    return 0;
}
