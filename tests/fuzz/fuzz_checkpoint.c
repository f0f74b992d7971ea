/* fuzz_checkpoint.c — klvae_trainer_load of a fuzzed checkpoint into a
 * trainer of the tiny fixture model (tests/fixtures/train/vae) with a small
 * discriminator (1 layer, 4 channels) and EMA.
 * Invariants: a failed load leaves a message and the trainer unchanged
 * (step count, a note, and a checksum of every weight, discriminator
 * weight and BatchNorm statistic); a load that succeeds is undone by
 * loading the trainer's own checkpoint again, which must restore all of
 * it. The trainer takes one step after the seed checkpoint is written, so
 * every tensor of a seed differs from the trainer's: a load that fails
 * half-way cannot go unnoticed. The seed goes to $KLVAE_FUZZ_SEED_DIR: at
 * 0.5 MB it is too large to commit. */
#include <string.h>

#include "fuzz.h"
#include "model/model.h"
#include "train/discriminator.h"
#include "train/trainer.h"

#ifndef KV_FUZZ_FIXTURES
#error "build with -DKV_FUZZ_FIXTURES=\"<repository>/tests/fixtures\""
#endif

static klvae_model_t *model;
static klvae_trainer_t *trainer;
static char original[4200];

typedef struct state {
    int64_t step;
    uint64_t checksum;
    char note[64];
} state;

static uint64_t mix(uint64_t h, const void *data, size_t bytes)
{
    const unsigned char *p = data;
    for (size_t i = 0; i < bytes; i++)
        h = (h ^ p[i]) * 1099511628211ull; /* FNV-1a */
    return h;
}

static state snapshot(void)
{
    state s;
    uint64_t h = 14695981039346656037ull;
    for (size_t i = 0; i < model->num_params; i++)
        h = mix(h, model->params[i].tensor->data,
                kv_tensor_numel(model->params[i].tensor) * sizeof(float));
    const kv_disc *d = kv_trainer_disc(trainer);
    for (int i = 0; i < d->num_params; i++)
        h = mix(h, d->params[i].tensor->data, kv_tensor_numel(d->params[i].tensor) * sizeof(float));
    for (int i = 0; i < d->convs; i++)
        if (d->running_mean[i]) {
            size_t ch = (size_t)d->bn[i].weight.shape[0];
            h = mix(h, d->running_mean[i], ch * sizeof(float));
            h = mix(h, d->running_var[i], ch * sizeof(float));
        }
    s.checksum = h;
    s.step = klvae_trainer_step_count(trainer);
    if (klvae_trainer_get_note(trainer, "data_position", s.note, sizeof s.note) != KLVAE_OK)
        strcpy(s.note, "(none)");
    return s;
}

static void check_unchanged(const state *before, const char *what)
{
    state now = snapshot();
    FUZZ_CHECK(now.step == before->step, "%s: the step count changed from %lld to %lld", what,
               (long long)before->step, (long long)now.step);
    FUZZ_CHECK(now.checksum == before->checksum, "%s: the weights changed", what);
    FUZZ_CHECK(strcmp(now.note, before->note) == 0, "%s: the note changed from %s to %s", what,
               before->note, now.note);
}

static state initial;

/* One optimizer step (generator and discriminator) on a fixed batch of two
 * 32 x 32 images: every weight moves. */
static void take_a_step(void)
{
    enum { N = 2, SIDE = 32 };
    static float batch[N * 3 * SIDE * SIDE];
    uint32_t x = 12345;
    for (size_t i = 0; i < sizeof batch / sizeof batch[0]; i++) {
        x = x * 1664525u + 1013904223u;
        batch[i] = (float)(x >> 8) / 8388608.0f - 1.0f;
    }
    klvae_step_stats_t stats = KLVAE_STEP_STATS_INIT;
    FUZZ_CHECK(klvae_trainer_step(trainer, batch, N, SIDE, SIDE, &stats) == KLVAE_OK, "%s",
               klvae_last_error());
}

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    (void)argc, (void)argv;
    static const char *const settings[][2] = {
        {"backend", "cpu"},     {"threads", "1"},     {"disc_layers", "1"},
        {"disc_channels", "4"}, {"ema_decay", "0.5"}, {"seed", "3"},
        {"disc_start", "0"},    {"learning_rate", "1e-3"},
    };
    klvae_options_t *o = NULL;
    FUZZ_CHECK(klvae_options_create(&o) == KLVAE_OK, "options");
    for (size_t i = 0; i < sizeof settings / sizeof settings[0]; i++)
        FUZZ_CHECK(klvae_options_set(o, settings[i][0], settings[i][1]) == KLVAE_OK, "%s",
                   klvae_last_error());
    FUZZ_CHECK(klvae_model_load(KV_FUZZ_FIXTURES "/train/vae", o, &model) == KLVAE_OK, "%s",
               klvae_last_error());
    FUZZ_CHECK(klvae_trainer_create(model, o, &trainer) == KLVAE_OK, "%s", klvae_last_error());
    klvae_options_free(o);
    FUZZ_CHECK(klvae_trainer_set_note(trainer, "data_position", "7") == KLVAE_OK, "note");
    if (fuzz_seed_dir()) {
        char seed[4300];
        snprintf(seed, sizeof seed, "%s/generated-valid.safetensors", fuzz_seed_dir());
        FUZZ_CHECK(klvae_trainer_save(trainer, seed) == KLVAE_OK, "%s", klvae_last_error());
    }
    take_a_step();
    FUZZ_CHECK(klvae_trainer_set_note(trainer, "data_position", "9") == KLVAE_OK, "note");
    snprintf(original, sizeof original, "%s", fuzz_path("original.safetensors"));
    FUZZ_CHECK(klvae_trainer_save(trainer, original) == KLVAE_OK, "%s", klvae_last_error());
    initial = snapshot();
    return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    const char *path = fuzz_path("checkpoint.safetensors");
    fuzz_write(path, data, size);
    klvae_status_t st = klvae_trainer_load(trainer, path);
    if (st != KLVAE_OK) {
        fuzz_check_failure(st, "klvae_trainer_load");
        check_unchanged(&initial, "after a failed klvae_trainer_load");
        return 0;
    }
    FUZZ_CHECK(klvae_trainer_step_count(trainer) >= 0, "negative step count %lld",
               (long long)klvae_trainer_step_count(trainer));
    FUZZ_CHECK(klvae_trainer_load(trainer, original) == KLVAE_OK, "cannot restore: %s",
               klvae_last_error());
    check_unchanged(&initial, "after restoring the original checkpoint");
    return 0;
}
