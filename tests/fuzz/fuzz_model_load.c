/* fuzz_model_load.c — klvae_model_load on a fuzzed single .safetensors file:
 * the safetensors reader (header, byte ranges, dtypes) and the weight
 * loader (names, layouts, shapes, the config inferred from them).
 * Invariants: a failed load sets *out to NULL and leaves a message; a model
 * that loads has parameters and channels, and frees without a leak. */
#include <string.h>

#include "fuzz.h"

static klvae_options_t *options;

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    (void)argc, (void)argv;
    /* norm_num_groups cannot be seen in a single file: 2 suits the seeds */
    static const char *const settings[][2] = {
        {"backend", "cpu"}, {"threads", "1"}, {"norm_num_groups", "2"}};
    FUZZ_CHECK(klvae_options_create(&options) == KLVAE_OK, "options");
    for (size_t i = 0; i < sizeof settings / sizeof settings[0]; i++)
        FUZZ_CHECK(klvae_options_set(options, settings[i][0], settings[i][1]) == KLVAE_OK, "%s",
                   klvae_last_error());
    return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static int sentinel;
    const char *path = fuzz_path("model.safetensors");
    fuzz_write(path, data, size);
    klvae_model_t *m = (klvae_model_t *)&sentinel;
    klvae_status_t st = klvae_model_load(path, options, &m);
    if (st != KLVAE_OK) {
        fuzz_check_failure(st, "klvae_model_load");
        FUZZ_CHECK(m == NULL, "klvae_model_load failed but *out is %p", (void *)m);
        return 0;
    }
    FUZZ_CHECK(m != NULL && m != (klvae_model_t *)&sentinel, "loaded, but no model");
    FUZZ_CHECK(klvae_model_parameter_count(m) > 0 && klvae_model_in_channels(m) > 0 &&
                   klvae_model_out_channels(m) > 0 && klvae_model_latent_channels(m) > 0,
               "a loaded model without parameters or channels");
    FUZZ_CHECK(klvae_last_error()[0] == '\0', "success left a message: %s", klvae_last_error());
    klvae_model_free(m);
    return 0;
}
