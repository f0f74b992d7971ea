/* train.c — train the autoencoder for a few steps through the C API: create
 * (or load) a model, create a trainer with options, feed it batches of
 * images made here, print what each step did, save a checkpoint, and export
 * the result as a diffusers folder.
 *
 *   cc train.c $(pkg-config --cflags --libs klvae) -lm -o train
 *   ./train OUT_DIR [--steps N] [--batch B] [--size S] [--model PATH] [--resume]
 *                   [--OPTION VALUE ...]
 *
 * Without --model the model is created from the options, by default
 * config=tiny (two levels, f = 2, 168 thousand parameters: a step at 32x32
 * takes a tenth of a second); --config small or --config sd pick bigger ones. --model
 * PATH starts from saved weights instead (a diffusers folder or a
 * .safetensors file), for fine-tuning. Any other --KEY VALUE pair goes to
 * klvae_options_set and so reaches klvae_model_create or klvae_model_load and
 * klvae_trainer_create: --learning-rate 1e-4, --pixel-loss l2,
 * --ema-decay 0.999, --threads 2, --lpips-weights FILE ... (docs/options.md).
 * This example sets learning_rate=1e-3 (the library's default is LDM's
 * 4.5e-6, meant for fine-tuning big models) and disc_start = half the
 * steps, so that the second half shows the GAN terms; options given on the
 * command line win.
 *
 * The images are procedural (a two-colour gradient with a few discs and
 * boxes) and depend only on the step number and their place in the batch,
 * so a resumed run sees the same data as an uninterrupted one.
 *
 * Output: OUT_DIR/checkpoint.safetensors (everything klvae_trainer_load needs
 * to continue exactly: weights, both Adam states, the discriminator, EMA,
 * random state, notes) and OUT_DIR/model/, a diffusers folder that
 * klvae_model_load, 'klvae reconstruct' and diffusers'
 * AutoencoderKL.from_pretrained read. With --resume, training continues
 * from OUT_DIR/checkpoint.safetensors up to --steps steps in all.
 *
 * Every libklvae status is checked; on failure the program prints
 * klvae_last_error() and exits with 1 (2 for usage errors). */
#define _POSIX_C_SOURCE 200809L /* mkdir under -std=c11 */
#include <klvae.h>
#include <errno.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

static int fail(const char *what, klvae_status_t st)
{
    fprintf(stderr, "%s: %s (%s)\n", what, klvae_last_error(), klvae_status_string(st));
    return 1;
}

/* ---- procedural images ---- */

/* splitmix64: a tiny, good generator; state 0 is fine. */
static uint64_t next_u64(uint64_t *s)
{
    uint64_t z = (*s += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

static float uniform(uint64_t *s) /* in [0, 1) */
{
    return (float)(next_u64(s) >> 40) * (1.0f / 16777216.0f);
}

/* One (3, size, size) image in [-1, 1], a function of (step, index) only. */
static void make_image(float *img, int size, int64_t step, int index)
{
    uint64_t s = (uint64_t)step * 1000003u + (uint64_t)index;
    const size_t plane = (size_t)size * size;
    float a[3], b[3];
    for (int c = 0; c < 3; c++) {
        a[c] = 2 * uniform(&s) - 1;
        b[c] = 2 * uniform(&s) - 1;
    }
    const float angle = 6.2831853f * uniform(&s), dx = cosf(angle), dy = sinf(angle);
    for (int y = 0; y < size; y++)
        for (int x = 0; x < size; x++) {
            float t = 0.5f + 0.5f * (dx * (x - size / 2) + dy * (y - size / 2)) / (float)size;
            t = t < 0 ? 0 : t > 1 ? 1 : t;
            for (int c = 0; c < 3; c++)
                img[c * plane + (size_t)y * size + x] = a[c] + (b[c] - a[c]) * t;
        }
    const int shapes = 1 + (int)(next_u64(&s) % 3);
    for (int k = 0; k < shapes; k++) {
        const int disc = (int)(next_u64(&s) & 1);
        const float cx = size * uniform(&s), cy = size * uniform(&s);
        const float r = size * (0.1f + 0.25f * uniform(&s));
        float col[3];
        for (int c = 0; c < 3; c++)
            col[c] = 2 * uniform(&s) - 1;
        for (int y = 0; y < size; y++)
            for (int x = 0; x < size; x++) {
                const float u = x + 0.5f - cx, v = y + 0.5f - cy;
                const int inside = disc ? u * u + v * v < r * r : fabsf(u) < r && fabsf(v) < 0.6f * r;
                if (inside)
                    for (int c = 0; c < 3; c++)
                        img[c * plane + (size_t)y * size + x] = col[c];
            }
    }
}

/* ---- main ---- */

static int usage(const char *argv0)
{
    fprintf(stderr,
            "usage: %s OUT_DIR [--steps N] [--batch B] [--size S] [--model PATH] [--resume]\n"
            "       [--OPTION VALUE ...]\n",
            argv0);
    return 2;
}

static int parse_int(const char *flag, const char *v, int lo, int hi, int *out)
{
    char *end;
    errno = 0;
    long x = strtol(v, &end, 10);
    if (errno || end == v || *end || x < lo || x > hi) {
        fprintf(stderr, "%s: '%s' is not an integer in %d..%d\n", flag, v, lo, hi);
        return -1;
    }
    *out = (int)x;
    return 0;
}

/* True when key was given on the command line (dashes equal underscores). */
static int given(int argc, char **argv, const char *key)
{
    for (int i = 2; i < argc; i++) {
        if (strncmp(argv[i], "--", 2) != 0)
            continue;
        const char *a = argv[i] + 2, *k = key;
        while (*a && *k && (*a == *k || (*a == '-' && *k == '_')))
            a++, k++;
        if (!*a && !*k)
            return 1;
    }
    return 0;
}

int main(int argc, char **argv)
{
    if (argc < 2 || strncmp(argv[1], "--", 2) == 0)
        return usage(argv[0]);
    const char *out_dir = argv[1], *model_path = NULL;
    int steps = 10, batch = 2, size = 32, resume = 0;

    klvae_options_t *opts = NULL;
    klvae_model_t *model = NULL;
    klvae_trainer_t *trainer = NULL;
    float *images = NULL;
    char *checkpoint = NULL, *export_dir = NULL;
    klvae_status_t st = klvae_options_create(&opts);
    if (st != KLVAE_OK)
        return fail("options", st);

    /* Our own flags, and every other --KEY VALUE into the options object.
     * One object can carry model and trainer keys: each function reads the
     * keys it knows (docs/options.md says which). */
    int rc = 2;
    for (int i = 2; i < argc; i++) {
        const char *a = argv[i];
        if (strncmp(a, "--", 2) != 0)
            goto out;
        if (strcmp(a, "--resume") == 0) {
            resume = 1;
            continue;
        }
        if (i + 1 >= argc) {
            fprintf(stderr, "%s needs a value\n", a);
            goto out;
        }
        const char *v = argv[++i];
        if (strcmp(a, "--steps") == 0) {
            if (parse_int(a, v, 1, 100000000, &steps) != 0)
                goto out;
        } else if (strcmp(a, "--batch") == 0) {
            if (parse_int(a, v, 1, 4096, &batch) != 0)
                goto out;
        } else if (strcmp(a, "--size") == 0) {
            if (parse_int(a, v, 16, 4096, &size) != 0)
                goto out;
        } else if (strcmp(a, "--model") == 0) {
            model_path = v;
        } else if ((st = klvae_options_set(opts, a + 2, v)) != KLVAE_OK) {
            fail(a, st); /* the message names the key and the value */
            goto out;
        }
    }
    /* This example's defaults, unless the command line set them. */
    char text[32];
    snprintf(text, sizeof text, "%d", steps / 2);
    if ((!model_path && !given(argc, argv, "config") &&
         (st = klvae_options_set(opts, "config", "tiny")) != KLVAE_OK) ||
        (!given(argc, argv, "learning_rate") &&
         (st = klvae_options_set(opts, "learning_rate", "1e-3")) != KLVAE_OK) ||
        (!given(argc, argv, "disc_start") &&
         (st = klvae_options_set(opts, "disc_start", text)) != KLVAE_OK)) {
        rc = fail("options", st);
        goto out;
    }
    rc = 1;

    /* The model: fresh weights from the options' config, or saved ones. */
    st = model_path ? klvae_model_load(model_path, opts, &model) : klvae_model_create(opts, &model);
    if (st != KLVAE_OK) {
        fail(model_path ? "load" : "create", st);
        goto out;
    }
    const int f = klvae_model_downsampling_factor(model);
    if (klvae_model_in_channels(model) != 3) {
        fprintf(stderr, "the model does not take RGB images, which this example makes\n");
        goto out;
    }
    if (size % f != 0) { /* klvae_trainer_step would refuse it too */
        fprintf(stderr, "--size %d is not a multiple of the downsampling factor %d\n", size, f);
        goto out;
    }
    printf("model: %lld parameters, f = %d, latent channels %d, backend %s\n",
           (long long)klvae_model_parameter_count(model), f, klvae_model_latent_channels(model),
           klvae_model_backend(model));

    /* The trainer borrows the model: free the trainer first. */
    if ((st = klvae_trainer_create(model, opts, &trainer)) != KLVAE_OK) {
        fail("trainer", st);
        goto out;
    }
    klvae_options_free(opts); /* both have copied what they need */
    opts = NULL;

    if (mkdir(out_dir, 0777) != 0 && errno != EEXIST) {
        fprintf(stderr, "%s: %s\n", out_dir, strerror(errno));
        goto out;
    }
    const size_t len = strlen(out_dir) + 32;
    checkpoint = malloc(len);
    export_dir = malloc(len);
    images = malloc((size_t)batch * 3 * size * size * sizeof(float));
    if (!checkpoint || !export_dir || !images) {
        fprintf(stderr, "out of memory\n");
        goto out;
    }
    snprintf(checkpoint, len, "%s/checkpoint.safetensors", out_dir);
    snprintf(export_dir, len, "%s/model", out_dir);

    if (resume) {
        if ((st = klvae_trainer_load(trainer, checkpoint)) != KLVAE_OK) {
            fail("resume", st);
            goto out;
        }
        /* Notes travel in the checkpoint: the caller's own state. */
        char note[256];
        if ((st = klvae_trainer_get_note(trainer, "images", note, sizeof note)) != KLVAE_OK) {
            fail("note", st);
            goto out;
        }
        printf("resumed %s at step %lld (images: %s)\n", checkpoint,
               (long long)klvae_trainer_step_count(trainer), note);
    }
    if ((st = klvae_trainer_set_note(trainer, "images", "train.c procedural")) != KLVAE_OK) {
        fail("note", st);
        goto out;
    }

    /* The loop: one optimizer step per batch. step_count is the number of
     * steps made so far, so a resumed run picks up where it stopped. */
    while (klvae_trainer_step_count(trainer) < steps) {
        const int64_t step = klvae_trainer_step_count(trainer);
        for (int i = 0; i < batch; i++)
            make_image(images + (size_t)i * 3 * size * size, size, step, i);
        klvae_step_stats_t stats = KLVAE_STEP_STATS_INIT; /* struct_size set */
        if ((st = klvae_trainer_step(trainer, images, batch, size, size, &stats)) != KLVAE_OK) {
            fail("step", st);
            goto out;
        }
        printf("step %lld/%d  loss %.4f  rec %.4f  kl %.1f  g %.4f  d %.4f (factor %g, weight %.3g)"
               "  %.3f s\n",
               (long long)stats.step + 1, steps, stats.total_loss, stats.rec_loss, stats.kl_loss,
               stats.g_loss, stats.d_loss, stats.disc_factor, stats.d_weight, stats.seconds);
    }

    /* A checkpoint to resume from, and the model for everything else. */
    if ((st = klvae_trainer_save(trainer, checkpoint)) != KLVAE_OK) {
        fail("save", st);
        goto out;
    }
    if ((st = klvae_trainer_export(trainer, export_dir, 0)) != KLVAE_OK) {
        fail("export", st);
        goto out;
    }
    /* With ema_decay > 0 the trainer also kept averaged weights. */
    char ema[32];
    if ((st = klvae_trainer_get(trainer, "ema_decay", ema, sizeof ema)) != KLVAE_OK) {
        fail("trainer_get", st);
        goto out;
    }
    if (strtod(ema, NULL) > 0) {
        snprintf(export_dir, len, "%s/model-ema", out_dir);
        if ((st = klvae_trainer_export(trainer, export_dir, 1)) != KLVAE_OK) {
            fail("export ema", st);
            goto out;
        }
        snprintf(export_dir, len, "%s/model", out_dir);
    }
    printf("wrote %s and %s/ after %lld steps\n", checkpoint, export_dir,
           (long long)klvae_trainer_step_count(trainer));

    /* The export is an ordinary model: load it back to prove it. */
    klvae_trainer_free(trainer);
    trainer = NULL;
    klvae_model_t *exported = NULL;
    if ((st = klvae_model_load(export_dir, NULL, &exported)) != KLVAE_OK) {
        fail("reload", st);
        goto out;
    }
    printf("%s loads: %lld parameters\n", export_dir,
           (long long)klvae_model_parameter_count(exported));
    klvae_model_free(exported);
    rc = 0;
out:
    if (rc == 2)
        usage(argv[0]);
    klvae_trainer_free(trainer); /* before the model it borrows */
    klvae_model_free(model);
    klvae_options_free(opts);
    free(images);
    free(checkpoint);
    free(export_dir);
    return rc;
}
