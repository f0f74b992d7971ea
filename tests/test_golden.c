/* test_golden.c — the library's outputs against a recording of them.
 *
 * Encode, sample and decode of the four fixture configs, and three full
 * training steps in two trainer setups (every random choice on; decoder-only
 * with the other losses), are compared with tests/fixtures/golden/
 * outputs.safetensors. The recording guards refactors: code that moves must
 * not change a result. On the machine and build that made the recording (its
 * metadata names the OpenBLAS kernel, the compiler and the vector unit) the
 * comparison is bit for bit; elsewhere the float32 rounding of BLAS and of
 * the vectorised loops differs, and the outputs are held to 1e-4 relative to
 * each tensor's largest value (the architecture doc's parity bound).
 *
 * KLVAE_GOLDEN_RECORD=path writes a new recording instead of comparing
 * (make golden-record): do that only for a change that is meant to change
 * results, and say so in its commit. */
#include "formats/safetensors.h"
#include "model/model.h"
#include "model/vae.h"
#include "test_util.h"
#include "train/discriminator.h"
#include "train/trainer.h"

#define GOLDEN "fixtures/golden/outputs.safetensors"
#define GOLDEN_TOLERANCE 1e-4
#define MAX_OUTPUTS 2048

extern const char *openblas_get_corename(void) __attribute__((weak));

typedef struct output {
    char name[240];
    int ndim;
    int64_t shape[4];
    float *data; /* owned */
} output;

typedef struct recording {
    output items[MAX_OUTPUTS];
    size_t count;
} recording;

static void record(recording *r, const char *name, const float *data, int n, int c, int h, int w)
{
    ck_assert_uint_lt(r->count, MAX_OUTPUTS);
    output *o = &r->items[r->count++];
    snprintf(o->name, sizeof o->name, "%s", name);
    o->ndim = 4;
    o->shape[0] = n;
    o->shape[1] = c;
    o->shape[2] = h;
    o->shape[3] = w;
    size_t count = (size_t)n * c * h * w;
    o->data = test_alloc(count);
    memcpy(o->data, data, count * sizeof(float));
}

static void record_tensor(recording *r, const char *prefix, const char *name, const kv_tensor *t)
{
    char full[400];
    snprintf(full, sizeof full, "%s%s", prefix, name);
    record(r, full, t->data, (int)kv_tensor_numel(t), 1, 1, 1);
}

static void record_scalar(recording *r, const char *name, double value)
{
    float v = (float)value;
    record(r, name, &v, 1, 1, 1, 1);
}

/* ---- inference ---- */

static void run_inference(recording *r, const char *config)
{
    char path[256];
    snprintf(path, sizeof path, "fixtures/%s/io.safetensors", config);
    int xs[4];
    float *x = test_load_fixture_tensor(path, "x", xs);
    snprintf(path, sizeof path, "fixtures/%s/diffusers", config);
    klvae_model_t *m = NULL;
    ck_assert_ok(klvae_model_load(path, NULL, &m));
    const int f = klvae_model_downsampling_factor(m), zc = klvae_model_latent_channels(m);
    const int n = xs[0], lh = xs[2] / f, lw = xs[3] / f;
    const size_t latent = (size_t)n * zc * lh * lw;
    float *mean = test_alloc(latent), *logvar = test_alloc(latent), *z = test_alloc(latent);
    float *images = test_alloc((size_t)n * klvae_model_out_channels(m) * xs[2] * xs[3]);
    ck_assert_ok(klvae_encode(m, x, n, xs[2], xs[3], mean, logvar));
    ck_assert_ok(klvae_sample(m, mean, logvar, n, lh, lw, 11, z));
    ck_assert_ok(klvae_decode(m, z, n, lh, lw, images));
    char name[160];
    snprintf(name, sizeof name, "%s.mean", config);
    record(r, name, mean, n, zc, lh, lw);
    snprintf(name, sizeof name, "%s.logvar", config);
    record(r, name, logvar, n, zc, lh, lw);
    snprintf(name, sizeof name, "%s.z", config);
    record(r, name, z, n, zc, lh, lw);
    snprintf(name, sizeof name, "%s.decoded", config);
    record(r, name, images, n, klvae_model_out_channels(m), xs[2], xs[3]);
    free(x);
    free(mean);
    free(logvar);
    free(z);
    free(images);
    klvae_model_free(m);
}

/* ---- training ---- */

#define TRAIN "fixtures/train/"

typedef struct train_setup {
    const char *name;
    const char *const (*options)[2];
    size_t count;
} train_setup;

/* Every random choice: sampled posterior, LPIPS dropout, the GAN from step
 * 1 (with the adaptive weight), EMA, learned logvar, clipping. */
static const char *const everything[][2] = {
    {"learning_rate", "1e-4"}, {"pixel_loss", "l1"},       {"perceptual_weight", "1"},
    {"lpips_weights", TRAIN "lpips.safetensors"},           {"lpips_dropout", "0.5"},
    {"kl_weight", "0.01"},     {"posterior", "sample"},    {"disc_start", "1"},
    {"disc_factor", "1"},      {"disc_weight", "0.5"},     {"disc_loss", "hinge"},
    {"disc_update", "reuse"},  {"disc_layers", "3"},       {"disc_channels", "8"},
    {"disc_weights", TRAIN "disc.safetensors"},             {"ema_decay", "0.9"},
    {"learn_logvar", "true"},  {"grad_clip", "0.5"},       {"seed", "5"},
    {"adam_eps", "1e-5"},      {"threads", "2"},
};

/* Decoder only, L2, vanilla GAN with the fresh second forward, gradient
 * accumulation. */
static const char *const decoder_only[][2] = {
    {"learning_rate", "2e-4"}, {"pixel_loss", "l2"},        {"perceptual_weight", "0.5"},
    {"lpips_weights", TRAIN "lpips.safetensors"},            {"kl_weight", "0.001"},
    {"posterior", "mode"},     {"disc_start", "0"},         {"disc_factor", "1"},
    {"disc_weight", "0.8"},    {"disc_loss", "vanilla"},    {"disc_update", "fresh"},
    {"disc_layers", "2"},      {"disc_channels", "4"},      {"train_encoder", "false"},
    {"grad_accum", "2"},       {"seed", "9"},               {"adam_eps", "1e-5"},
    {"threads", "1"},
};

static void run_training(recording *r, const char *setup, const char *const (*kv)[2],
                         size_t count)
{
    klvae_options_t *o = NULL;
    ck_assert_ok(klvae_options_create(&o));
    for (size_t i = 0; i < count; i++)
        ck_assert_ok(klvae_options_set(o, kv[i][0], kv[i][1]));
    klvae_model_t *m = NULL;
    klvae_trainer_t *t = NULL;
    ck_assert_ok(klvae_model_load(TRAIN "vae", o, &m));
    ck_assert_ok(klvae_trainer_create(m, o, &t));
    char name[200];
    for (int k = 0; k < 3; k++) {
        const int n = 4, h = 32, w = 40;
        size_t elems = (size_t)n * 3 * h * w;
        float *x = test_alloc(elems);
        test_rng rng = test_rng_new(7100 + (uint64_t)k);
        test_fill(x, elems, &rng, -1, 1);
        klvae_step_stats_t s = KLVAE_STEP_STATS_INIT;
        ck_assert_ok(klvae_trainer_step(t, x, n, h, w, &s));
        const double terms[] = {s.total_loss, s.rec_loss,    s.perceptual_loss, s.nll_loss,
                                s.kl_loss,    s.g_loss,      s.d_weight,        s.d_loss,
                                s.logits_real, s.logits_fake, s.logvar};
        snprintf(name, sizeof name, "%s.loss.%d", setup, k);
        float values[sizeof terms / sizeof terms[0]];
        for (size_t i = 0; i < sizeof terms / sizeof terms[0]; i++)
            values[i] = (float)terms[i];
        record(r, name, values, (int)(sizeof terms / sizeof terms[0]), 1, 1, 1);
        free(x);
    }
    snprintf(name, sizeof name, "%s.vae.", setup);
    for (size_t i = 0; i < m->num_params; i++)
        record_tensor(r, name, m->params[i].name, m->params[i].tensor);
    const kv_disc *d = kv_trainer_disc(t);
    snprintf(name, sizeof name, "%s.disc.", setup);
    for (int i = 0; i < d->num_params; i++)
        record_tensor(r, name, d->params[i].name, d->params[i].tensor);
    for (int i = 0; i < d->convs; i++) {
        if (!d->running_mean[i])
            continue;
        int ch = d->bn[i].weight.shape[0];
        snprintf(name, sizeof name, "%s.disc.running_mean.%d", setup, i);
        record(r, name, d->running_mean[i], ch, 1, 1, 1);
        snprintf(name, sizeof name, "%s.disc.running_var.%d", setup, i);
        record(r, name, d->running_var[i], ch, 1, 1, 1);
    }
    /* The EMA weights through the export, which writes them. */
    char *dir = test_tmpdir();
    char decay[32];
    ck_assert_ok(klvae_trainer_get(t, "ema_decay", decay, sizeof decay));
    if (strtod(decay, NULL) > 0.0) {
        char *model_dir = test_join(dir, "ema");
        ck_assert_ok(klvae_trainer_export(t, model_dir, 1));
        klvae_model_t *ema = NULL;
        ck_assert_ok(klvae_model_load(model_dir, NULL, &ema));
        snprintf(name, sizeof name, "%s.ema.", setup);
        for (size_t i = 0; i < ema->num_params; i++)
            record_tensor(r, name, ema->params[i].name, ema->params[i].tensor);
        klvae_model_free(ema);
        free(model_dir);
    }
    test_rmtree(dir);
    free(dir);
    record_scalar(r, setup, (double)klvae_trainer_step_count(t));
    klvae_trainer_free(t);
    klvae_model_free(m);
    klvae_options_free(o);
}

/* ---- the recording ---- */

static void machine_signature(char *out, size_t size)
{
    __builtin_cpu_init();
    snprintf(out, size, "openblas=%s;cc=%s;avx512f=%d;avx2=%d",
             openblas_get_corename ? openblas_get_corename() : "none", __VERSION__,
             __builtin_cpu_supports("avx512f") ? 1 : 0, __builtin_cpu_supports("avx2") ? 1 : 0);
}

static void run_all(recording *r)
{
    const char *configs[] = {"latent16", "noquant", "noattn", "gelu"};
    for (size_t i = 0; i < sizeof configs / sizeof configs[0]; i++)
        run_inference(r, configs[i]);
    run_training(r, "everything", everything, sizeof everything / sizeof everything[0]);
    run_training(r, "decoder_only", decoder_only, sizeof decoder_only / sizeof decoder_only[0]);
}

static void free_recording(recording *r)
{
    for (size_t i = 0; i < r->count; i++)
        free(r->items[i].data);
    r->count = 0;
}

static klvae_status_t fetch_output(void *ctx, size_t index, float *dst)
{
    const recording *r = ctx;
    const output *o = &r->items[index];
    memcpy(dst, o->data, (size_t)(o->shape[0] * o->shape[1] * o->shape[2] * o->shape[3]) *
                             sizeof(float));
    return KLVAE_OK;
}

static void write_recording(const recording *r, const char *path)
{
    kv_st_entry *entries = calloc(r->count, sizeof *entries);
    ck_assert_ptr_nonnull(entries);
    for (size_t i = 0; i < r->count; i++) {
        entries[i].name = r->items[i].name;
        entries[i].ndim = r->items[i].ndim;
        memcpy(entries[i].shape, r->items[i].shape, sizeof r->items[i].shape);
    }
    char signature[512];
    machine_signature(signature, sizeof signature);
    kv_st_meta meta[] = {{(char *)"machine", signature},
                         {(char *)"what", (char *)"tests/test_golden.c outputs"}};
    ck_assert_ok(kv_st_write(path, entries, r->count, meta, 2, fetch_output, (void *)r, NULL));
    free(entries);
}

START_TEST(outputs_equal_the_recording)
{
    static recording r;
    run_all(&r);
    const char *record_path = getenv("KLVAE_GOLDEN_RECORD");
    if (record_path && *record_path) {
        write_recording(&r, record_path);
        fprintf(stderr, "golden: wrote %zu outputs to %s\n", r.count, record_path);
        free_recording(&r);
        return;
    }
    kv_safetensors st;
    ck_assert_ok(kv_st_open(GOLDEN, &st));
    char mine[512];
    machine_signature(mine, sizeof mine);
    const char *theirs = kv_st_metadata(&st, "machine");
    const bool exact = theirs && strcmp(theirs, mine) == 0;
    if (!exact)
        fprintf(stderr, "golden: recorded on \"%s\", running on \"%s\": comparing within %g "
                        "relative, not bit for bit\n",
                theirs ? theirs : "?", mine, GOLDEN_TOLERANCE);
    ck_assert_uint_eq(st.count, r.count);
    for (size_t i = 0; i < r.count; i++) {
        const output *o = &r.items[i];
        const kv_st_tensor *t = kv_st_find(&st, o->name);
        ck_assert_msg(t != NULL, "the recording has no output %s", o->name);
        size_t n = (size_t)(o->shape[0] * o->shape[1] * o->shape[2] * o->shape[3]);
        ck_assert_uint_eq(kv_st_numel(t), n);
        float *want = test_alloc(n);
        ck_assert_ok(kv_st_read_f32(&st, t, want));
        if (exact) {
            for (size_t k = 0; k < n; k++)
                ck_assert_msg(memcmp(&want[k], &o->data[k], sizeof(float)) == 0,
                              "%s[%zu] is %.9g, recorded %.9g (bitwise)", o->name, k,
                              (double)o->data[k], (double)want[k]);
        } else {
            double scale = 0.0;
            for (size_t k = 0; k < n; k++)
                scale = fmax(scale, fabs((double)want[k]));
            double err = test_max_abs_diff(o->data, want, n);
            ck_assert_msg(err <= GOLDEN_TOLERANCE * fmax(scale, 1e-6),
                          "%s: max abs difference %g against the recording (largest value %g)",
                          o->name, err, scale);
        }
        free(want);
    }
    kv_st_close(&st);
    free_recording(&r);
}
END_TEST

Suite *suite_golden(void)
{
    Suite *s = suite_create("golden");
    TCase *tc = tcase_create("golden");
    tcase_set_timeout(tc, 300);
    tcase_add_test(tc, outputs_equal_the_recording);
    suite_add_tcase(s, tc);
    return s;
}
