/* fuzz_config.c — klvae_model_load on a diffusers folder whose config.json
 * is fuzzed and whose weights are a fixed small model, made at start-up
 * (block_out_channels 4,8; 1 layer a block; 2 groups; 2 latent channels).
 * Invariants: a failed load sets *out to NULL and leaves a message; a
 * config that loads describes those weights: every key the tensors show
 * reads back as saved. (norm_num_groups and act_fn are the config's to
 * say: no tensor shows them.) */
#include <string.h>

#include "fuzz.h"

static klvae_options_t *options;
static char folder[4200], config_path[4300];

/* The model's config; the keys before the first NULL are shown by the
 * tensors' names and shapes. */
static const char *const architecture[][2] = {
    {"block_out_channels", "4,8"},   {"layers_per_block", "1"},
    {"latent_channels", "2"},        {"in_channels", "3"},
    {"out_channels", "3"},           {"use_quant_conv", "true"},
    {"use_post_quant_conv", "true"}, {"mid_block_add_attention", "true"},
    {NULL, NULL},                    {"norm_num_groups", "2"},
};
#define SHOWN 8

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    (void)argc, (void)argv;
    klvae_options_t *create = NULL;
    FUZZ_CHECK(klvae_options_create(&create) == KLVAE_OK, "options");
    for (size_t i = 0; i < sizeof architecture / sizeof architecture[0]; i++)
        FUZZ_CHECK(!architecture[i][0] ||
                       klvae_options_set(create, architecture[i][0], architecture[i][1]) == KLVAE_OK,
                   "%s", klvae_last_error());
    FUZZ_CHECK(klvae_options_set(create, "threads", "1") == KLVAE_OK, "threads");
    klvae_model_t *m = NULL;
    FUZZ_CHECK(klvae_model_create(create, &m) == KLVAE_OK, "%s", klvae_last_error());
    snprintf(folder, sizeof folder, "%s", fuzz_path("model"));
    FUZZ_CHECK(klvae_model_save(m, folder) == KLVAE_OK, "%s", klvae_last_error());
    snprintf(config_path, sizeof config_path, "%s/config.json", folder);
    klvae_model_free(m);
    klvae_options_free(create);
    FUZZ_CHECK(klvae_options_create(&options) == KLVAE_OK, "options");
    FUZZ_CHECK(klvae_options_set(options, "backend", "cpu") == KLVAE_OK, "backend");
    FUZZ_CHECK(klvae_options_set(options, "threads", "1") == KLVAE_OK, "threads");
    return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static int sentinel;
    fuzz_write(config_path, data, size);
    klvae_model_t *m = (klvae_model_t *)&sentinel;
    klvae_status_t st = klvae_model_load(folder, options, &m);
    if (st != KLVAE_OK) {
        fuzz_check_failure(st, "klvae_model_load");
        FUZZ_CHECK(m == NULL, "klvae_model_load failed but *out is %p", (void *)m);
        return 0;
    }
    for (size_t i = 0; i < SHOWN; i++) {
        char value[256];
        FUZZ_CHECK(klvae_model_get(m, architecture[i][0], value, sizeof value) == KLVAE_OK,
                   "klvae_model_get(%s): %s", architecture[i][0], klvae_last_error());
        FUZZ_CHECK(strcmp(value, architecture[i][1]) == 0,
                   "config.json loaded with %s = %s, but the weights have %s", architecture[i][0],
                   value, architecture[i][1]);
    }
    klvae_model_free(m);
    return 0;
}
