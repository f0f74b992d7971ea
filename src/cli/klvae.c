/* klvae — the command-line tool: info, encode, decode, reconstruct,
 * convert, options (here), train (train.c), eval (eval.c), encode-dataset
 * and latent-stats (encode_dataset.c). It uses the public API (include/klvae.h) for everything but the
 * latent files, which it reads and writes with the library's own safetensors
 * code; so it links libklvae.a. */
#include <errno.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <math.h>

#include "cli/cli.h"
#include "cli/latents.h"
#include "formats/safetensors.h"
#include "klvae.h"

/* The flags of train and eval that are not library options. */
static const char *const train_flags[] = {"data", "out", "size", "batch", "steps", "minutes",
                                          "model", "resume", "lpips", "grid-every",
                                          "checkpoint-every", "log-every", "eval-images", NULL};
static const char *const eval_flags[] = {"data", "lpips", "size", "images", NULL};
static const char *const encode_dataset_flags[] = {"data", "list", "out", NULL};

static const char *const general_help =
    "usage: klvae COMMAND [ARGS] [--OPTION VALUE ...]\n"
    "\n"
    "The Stable Diffusion KL-f8 autoencoder on the command line.\n"
    "\n"
    "commands:\n"
    "  info MODEL                          config, parameter count, backend\n"
    "  encode MODEL IN.png OUT.safetensors  image -> mean, logvar and latent\n"
    "  decode MODEL IN.safetensors OUT.png  latent -> image\n"
    "  reconstruct MODEL IN.png OUT.png     encode then decode\n"
    "  convert MODEL OUT_DIR               write MODEL as a diffusers folder\n"
    "  train [--data DIR] [--out RUN_DIR]  train an autoencoder (LDM recipe)\n"
    "  eval MODEL [--data DIR]             PSNR, SSIM (and LPIPS) over images\n"
    "  encode-dataset MODEL --data DIR --out SHARDS_DIR\n"
    "                                      a folder of images -> latent shards\n"
    "  latent-stats SHARDS_DIR             the latents' statistics and scaling\n"
    "  options                             list every --OPTION with its default\n"
    "\n"
    "MODEL is a diffusers folder (config.json + diffusion_pytorch_model.safetensors)\n"
    "or one .safetensors file with diffusers or original CompVis names.\n"
    "Every library option is a flag: --threads 4, --backend cpu, --norm-num-groups 32\n"
    "(see 'klvae options'). Images may have any size: they are padded to a multiple\n"
    "of the downsampling factor and cropped back.\n"
    "\n"
    "'klvae COMMAND --help' describes one command. --version prints the version.\n";

static const char *command_help(const char *command)
{
    if (strcmp(command, "info") == 0)
        return "usage: klvae info MODEL [--OPTION VALUE ...]\n"
               "\n"
               "Prints the model's config, parameter count, downsampling factor and the\n"
               "backend it runs on. For a single .safetensors file the config is inferred\n"
               "from the tensor shapes; --norm-num-groups, --scaling-factor and\n"
               "--shift-factor give what shapes cannot show.\n";
    if (strcmp(command, "encode") == 0)
        return "usage: klvae encode MODEL IN.png OUT.safetensors [--sample] [--seed N]\n"
               "                    [--scaled] [--OPTION VALUE ...]\n"
               "\n"
               "Encodes an image (PNG or JPEG) and writes OUT.safetensors with the tensors\n"
               "mean, logvar and latent, each (1, latent_channels, h/f, w/f). latent is the\n"
               "mean, or with --sample a draw mean + exp(logvar/2) * eps seeded by --seed\n"
               "(default 0). With --scaled, latent is (z - shift_factor) * scaling_factor, the\n"
               "form diffusion models take. The metadata records the image size, so decode\n"
               "crops the padding away again.\n";
    if (strcmp(command, "decode") == 0)
        return "usage: klvae decode MODEL IN.safetensors OUT.png [--scaled] [--OPTION VALUE ...]\n"
               "\n"
               "Decodes the tensor 'latent' of IN.safetensors (or its only tensor), shaped\n"
               "(C, h, w) or (N, C, h, w), into OUT.png (N > 1 writes OUT_0.png, OUT_1.png,\n"
               "...). Latents written by 'klvae encode --scaled' are unscaled automatically;\n"
               "--scaled treats any other file's latents as scaled: z / scaling_factor +\n"
               "shift_factor.\n";
    if (strcmp(command, "reconstruct") == 0)
        return "usage: klvae reconstruct MODEL IN.png OUT.png [--sample] [--seed N]\n"
               "                         [--OPTION VALUE ...]\n"
               "\n"
               "Encodes and decodes an image (PNG or JPEG) and writes the reconstruction,\n"
               "using the posterior mean, or a seeded draw with --sample. Prints the PSNR of\n"
               "the reconstruction.\n";
    if (strcmp(command, "convert") == 0)
        return "usage: klvae convert MODEL OUT_DIR [--OPTION VALUE ...]\n"
               "\n"
               "Loads MODEL (any supported layout and dtype) and writes it to OUT_DIR as a\n"
               "diffusers folder in float32, which AutoencoderKL.from_pretrained loads.\n";
    if (strcmp(command, "train") == 0)
        return train_help;
    if (strcmp(command, "eval") == 0)
        return eval_help;
    if (strcmp(command, "encode-dataset") == 0)
        return encode_dataset_help;
    if (strcmp(command, "latent-stats") == 0)
        return latent_stats_help;
    if (strcmp(command, "options") == 0)
        return "usage: klvae options\n"
               "\n"
               "Lists every option with its default and meaning. Each is a flag of every\n"
               "command: --key value or --key=value, with '-' or '_' in the key.\n";
    return NULL;
}

static void parse_args(int argc, char **argv, cli *c)
{
    memset(c, 0, sizeof *c);
    klvae_status_t st = klvae_options_create(&c->opts);
    if (st != KLVAE_OK)
        die_status(st, "options");
    for (int i = 1; i < argc; i++) {
        const char *arg = argv[i];
        if (strcmp(arg, "--help") == 0 || strcmp(arg, "-h") == 0) {
            const char *help = c->command ? command_help(c->command) : NULL;
            fputs(help ? help : general_help, stdout);
            exit(0);
        }
        if (strcmp(arg, "--version") == 0) {
            printf("klvae %s (library %s)\n", KLVAE_VERSION_STRING, klvae_version_string());
            exit(0);
        }
        if (strcmp(arg, "-q") == 0) {
            c->quiet = true;
            continue;
        }
        if (strncmp(arg, "--", 2) != 0 || arg[2] == '\0') {
            if (!c->command) {
                c->command = arg;
                if (!command_help(arg))
                    die_usage("unknown command '%s'", arg);
            } else if (c->npos < 8) {
                c->pos[c->npos++] = arg;
            } else {
                die_usage("too many arguments");
            }
            continue;
        }
        const char *flag = arg + 2;
        if (strcmp(flag, "sample") == 0) {
            c->sample = true;
            continue;
        }
        if (strcmp(flag, "scaled") == 0) {
            c->scaled = true;
            continue;
        }
        if (strcmp(flag, "flip") == 0 && c->command && strcmp(c->command, "encode-dataset") == 0) {
            st = klvae_options_set(c->opts, "flip", "true");
            if (st != KLVAE_OK)
                die_status(st, "options");
            continue;
        }
        if (strcmp(flag, "quiet") == 0 || strcmp(flag, "q") == 0) {
            c->quiet = true;
            continue;
        }
        /* --key=value or --key value */
        char key[64];
        const char *value;
        const char *eq = strchr(flag, '=');
        if (eq) {
            if ((size_t)(eq - flag) >= sizeof key)
                die_usage("unknown option '--%.*s'", (int)(eq - flag), flag);
            memcpy(key, flag, (size_t)(eq - flag));
            key[eq - flag] = '\0';
            value = eq + 1;
        } else {
            if (strlen(flag) >= sizeof key)
                die_usage("unknown option '%s'", arg);
            strcpy(key, flag);
            if (i + 1 >= argc)
                die_usage("option '--%s' needs a value", key);
            value = argv[++i];
        }
        const char *const *own = NULL;
        if (c->command && strcmp(c->command, "train") == 0)
            own = train_flags;
        else if (c->command && strcmp(c->command, "eval") == 0)
            own = eval_flags;
        else if (c->command && strcmp(c->command, "encode-dataset") == 0)
            own = encode_dataset_flags;
        for (char *u = key; *u; u++) /* --grid_every and --grid-every alike */
            if (*u == '_' && own)
                *u = '-';
        bool is_own = false;
        for (int k = 0; own && own[k]; k++)
            if (strcmp(key, own[k]) == 0) {
                if (c->nflags == CLI_MAX_FLAGS)
                    die_usage("too many flags");
                c->flag_name[c->nflags] = own[k];
                c->flag_value[c->nflags++] = value;
                is_own = true;
            }
        if (is_own)
            continue;
        bool is_command = c->command && (strcmp(c->command, "encode") == 0 ||
                                         strcmp(c->command, "reconstruct") == 0);
        if (strcmp(key, "seed") == 0 && is_command) { /* the sampling seed here */
            char *end;
            errno = 0;
            unsigned long long v = strtoull(value, &end, 10);
            if (errno || *end || !*value || value[0] == '-')
                die_usage("--seed needs a non-negative integer, not '%s'", value);
            c->seed = v;
            c->seed_given = true;
            continue;
        }
        st = klvae_options_set(c->opts, key, value);
        if (st == KLVAE_ERR_OPTION)
            die_usage("%s", klvae_last_error());
        if (st != KLVAE_OK)
            die_status(st, "options");
    }
    if (!c->command) {
        fputs(general_help, stderr);
        exit(EXIT_USAGE);
    }
    if (c->seed_given && !c->sample)
        die_usage("--seed only makes sense with --sample");
}

/* Says how a forward ran when it was not untiled (memory_limit, tiling). */
static void note_plan(const cli *c, klvae_model_t *m)
{
    char plan[600];
    if (klvae_model_get(m, "last_plan", plan, sizeof plan) == KLVAE_OK &&
        strncmp(plan, "untiled", 7) != 0)
        note(c, "  %s\n", plan);
}

typedef struct encoded {
    int h, w, ph, pw, lh, lw, zc;
    float *mean, *logvar, *latent;
} encoded;

static encoded encode_image(const cli *c, klvae_model_t *m, const char *path)
{
    encoded e;
    float *img = NULL;
    klvae_status_t st = klvae_image_read_opts(path, c->opts, &img, &e.h, &e.w);
    if (st != KLVAE_OK)
        die_status(st, "cannot read the image");
    if (klvae_model_in_channels(m) != 3) {
        fprintf(stderr, "%s: the model takes %d input channels; images are RGB\n", program,
                klvae_model_in_channels(m));
        exit(1);
    }
    const int f = klvae_model_downsampling_factor(m);
    e.ph = round_up(e.h, f);
    e.pw = round_up(e.w, f);
    e.lh = e.ph / f;
    e.lw = e.pw / f;
    e.zc = klvae_model_latent_channels(m);
    float *padded = pad_image(img, e.h, e.w, e.ph, e.pw);
    klvae_free(img);
    size_t nz = (size_t)e.zc * e.lh * e.lw;
    e.mean = xmalloc(nz * sizeof(float));
    e.logvar = xmalloc(nz * sizeof(float));
    e.latent = xmalloc(nz * sizeof(float));
    double t0 = kv_now_seconds();
    st = klvae_encode(m, padded, 1, e.ph, e.pw, e.mean, e.logvar);
    if (st != KLVAE_OK)
        die_status(st, "encode failed");
    note(c, "encoded %d x %d%s in %.2f s\n", e.h, e.w, e.ph != e.h || e.pw != e.w ? " (padded)" : "",
         kv_now_seconds() - t0);
    note_plan(c, m);
    free(padded);
    if (c->sample) {
        st = klvae_sample(m, e.mean, e.logvar, 1, e.lh, e.lw, c->seed, e.latent);
        if (st != KLVAE_OK)
            die_status(st, "sample failed");
    } else {
        memcpy(e.latent, e.mean, nz * sizeof(float));
    }
    return e;
}

static void free_encoded(encoded *e)
{
    free(e->mean), free(e->logvar), free(e->latent);
}

/* Decodes (zc, lh, lw) and crops to (h, w). */
static float *decode_latent(const cli *c, klvae_model_t *m, const float *z, int lh, int lw, int h,
                            int w)
{
    const int f = klvae_model_downsampling_factor(m);
    const int oc = klvae_model_out_channels(m);
    if (oc != 3) {
        fprintf(stderr, "%s: the model makes %d output channels; PNG output needs 3\n", program,
                oc);
        exit(1);
    }
    float *full = xmalloc((size_t)3 * lh * f * lw * f * sizeof(float));
    double t0 = kv_now_seconds();
    klvae_status_t st = klvae_decode(m, z, 1, lh, lw, full);
    if (st != KLVAE_OK)
        die_status(st, "decode failed");
    note(c, "decoded %d x %d latent in %.2f s\n", lh, lw, kv_now_seconds() - t0);
    note_plan(c, m);
    if (h == lh * f && w == lw * f)
        return full;
    float *out = xmalloc((size_t)3 * h * w * sizeof(float));
    crop_image(full, lh * f, lw * f, h, w, out);
    free(full);
    return out;
}

static void write_png(const char *path, const float *img, int h, int w)
{
    klvae_status_t st = klvae_image_write_png(path, img, h, w);
    if (st != KLVAE_OK)
        die_status(st, "cannot write the image");
}

static int cmd_info(cli *c)
{
    need_args(c, 1);
    klvae_model_t *m = load_model(c, c->pos[0]);
    static const char *const keys[] = {
        "in_channels",     "out_channels",    "latent_channels",     "block_out_channels",
        "layers_per_block", "norm_num_groups", "act_fn",              "use_quant_conv",
        "use_post_quant_conv", "mid_block_add_attention", "scaling_factor", "shift_factor",
        "backend",         "precision",       "threads",
    };
    printf("%-26s%s\n", "model", c->pos[0]);
    for (size_t i = 0; i < sizeof keys / sizeof keys[0]; i++) {
        char value[128], reason[1024];
        if (klvae_model_get(m, keys[i], value, sizeof value) != KLVAE_OK)
            continue;
        /* backend=auto on the CPU says why: "cpu (auto: CUDA plugin not found ...)" */
        if (strcmp(keys[i], "backend") == 0 &&
            klvae_model_get(m, "backend_reason", reason, sizeof reason) == KLVAE_OK && *reason)
            printf("%-26s%s (auto: %s)\n", keys[i], value, reason);
        /* "fp32 (precision=bf16 computes in fp32 here: this CPU has no ...)" */
        else if (strcmp(keys[i], "precision") == 0 &&
                 klvae_model_get(m, "precision_reason", reason, sizeof reason) == KLVAE_OK &&
                 *reason)
            printf("%-26s%s (%s)\n", keys[i], value, reason);
        else
            printf("%-26s%s\n", keys[i], value);
    }
    long long params = (long long)klvae_model_parameter_count(m);
    printf("%-26s%lld (%.2f M)\n", "parameters", params, (double)params / 1e6);
    printf("%-26s%d\n", "downsampling_factor", klvae_model_downsampling_factor(m));
    klvae_model_free(m);
    return 0;
}

static int cmd_encode(cli *c)
{
    need_args(c, 3);
    klvae_model_t *m = load_model(c, c->pos[0]);
    encoded e = encode_image(c, m, c->pos[1]);
    float scale = klvae_model_scaling_factor(m), shift = klvae_model_shift_factor(m);
    size_t nz = (size_t)e.zc * e.lh * e.lw;
    if (c->scaled)
        for (size_t i = 0; i < nz; i++)
            e.latent[i] = (e.latent[i] - shift) * scale;
    char sh[32], sw[32], sscale[40], sshift[40], what[64];
    snprintf(sh, sizeof sh, "%d", e.h);
    snprintf(sw, sizeof sw, "%d", e.w);
    /* The config's own text: "0.18215", and "none" when there is no shift. */
    klvae_model_get(m, "scaling_factor", sscale, sizeof sscale);
    klvae_model_get(m, "shift_factor", sshift, sizeof sshift);
    if (c->sample)
        snprintf(what, sizeof what, "sample seed %llu", (unsigned long long)c->seed);
    else
        snprintf(what, sizeof what, "mean");
    latent_tensor tensors[3] = {
        {"mean", {1, e.zc, e.lh, e.lw}, e.mean},
        {"logvar", {1, e.zc, e.lh, e.lw}, e.logvar},
        {"latent", {1, e.zc, e.lh, e.lw}, e.latent},
    };
    kv_st_meta meta[] = {
        {"format", "pt"},
        {"producer", "klvae " KLVAE_VERSION_STRING},
        {"image_height", sh},
        {"image_width", sw},
        {"latent", what},
        {"scaled", c->scaled ? "true" : "false"},
        {"scaling_factor", sscale},
        {"shift_factor", sshift},
    };
    klvae_status_t st = write_latents(c->pos[2], tensors, 3, meta, sizeof meta / sizeof meta[0]);
    if (st != KLVAE_OK)
        die_status(st, "cannot write the latents");
    note(c, "wrote %s: latent %d x %d x %d (%s%s)\n", c->pos[2], e.zc, e.lh, e.lw, what,
         c->scaled ? ", scaled" : "");
    free_encoded(&e);
    klvae_model_free(m);
    return 0;
}

/* OUT.png -> OUT_3.png */
static void numbered_path(const char *path, int index, char *out, size_t size)
{
    const char *dot = strrchr(path, '.');
    const char *slash = strrchr(path, '/');
    if (!dot || (slash && dot < slash))
        dot = path + strlen(path);
    snprintf(out, size, "%.*s_%d%s", (int)(dot - path), path, index, dot);
}

static int cmd_decode(cli *c)
{
    need_args(c, 3);
    klvae_model_t *m = load_model(c, c->pos[0]);
    latents lat;
    klvae_status_t st = read_latents(c->pos[1], klvae_model_latent_channels(m), &lat);
    if (st != KLVAE_OK)
        die_status(st, "cannot read the latents");
    const int f = klvae_model_downsampling_factor(m);
    int h = lat.image_height > 0 ? lat.image_height : lat.h * f;
    int w = lat.image_width > 0 ? lat.image_width : lat.w * f;
    if (h > lat.h * f || w > lat.w * f || h <= (lat.h - 1) * f || w <= (lat.w - 1) * f) {
        h = lat.h * f; /* metadata from another model: ignore it */
        w = lat.w * f;
    }
    size_t per = (size_t)lat.c * lat.h * lat.w;
    if (c->scaled || lat.scaled) {
        float scale = klvae_model_scaling_factor(m), shift = klvae_model_shift_factor(m);
        for (size_t i = 0; i < per * (size_t)lat.n; i++)
            lat.data[i] = lat.data[i] / scale + shift;
    }
    for (int i = 0; i < lat.n; i++) {
        float *img = decode_latent(c, m, lat.data + per * (size_t)i, lat.h, lat.w, h, w);
        char path[4096];
        if (lat.n == 1)
            snprintf(path, sizeof path, "%s", c->pos[2]);
        else
            numbered_path(c->pos[2], i, path, sizeof path);
        write_png(path, img, h, w);
        note(c, "wrote %s (%d x %d)\n", path, h, w);
        free(img);
    }
    free(lat.data);
    klvae_model_free(m);
    return 0;
}

static int cmd_reconstruct(cli *c)
{
    need_args(c, 3);
    klvae_model_t *m = load_model(c, c->pos[0]);
    encoded e = encode_image(c, m, c->pos[1]);
    float *img = decode_latent(c, m, e.latent, e.lh, e.lw, e.h, e.w);
    write_png(c->pos[2], img, e.h, e.w);
    /* PSNR on the 8-bit values the two PNGs hold. */
    float *orig = NULL;
    int oh, ow;
    if (klvae_image_read_opts(c->pos[1], c->opts, &orig, &oh, &ow) == KLVAE_OK) {
        double se = 0;
        size_t n = (size_t)3 * e.h * e.w;
        for (size_t i = 0; i < n; i++) {
            double a = orig[i] * 0.5 + 0.5, b = img[i] * 0.5 + 0.5;
            b = b < 0 ? 0 : b > 1 ? 1 : b;
            double d = a - nearbyint(b * 255.0) / 255.0;
            se += d * d;
        }
        double mse = se / (double)n;
        if (!c->quiet)
            fprintf(stderr, "wrote %s: PSNR %.2f dB\n", c->pos[2],
                    mse > 0 ? 10.0 * log10(1.0 / mse) : 99.0);
        klvae_free(orig);
    }
    free(img);
    free_encoded(&e);
    klvae_model_free(m);
    return 0;
}

static int cmd_convert(cli *c)
{
    need_args(c, 2);
    klvae_model_t *m = load_model(c, c->pos[0]);
    klvae_status_t st = klvae_model_save(m, c->pos[1]);
    if (st != KLVAE_OK)
        die_status(st, "cannot save the model");
    note(c, "wrote the diffusers folder %s\n", c->pos[1]);
    klvae_model_free(m);
    return 0;
}

static int cmd_options(cli *c)
{
    need_args(c, 0);
    const char *key, *def, *help;
    for (int i = 0; klvae_option_describe(i, &key, &def, &help) == KLVAE_OK; i++) {
        printf("--%s  (default: %s)\n    %s\n", key, *def ? def : "(empty)", help);
    }
    return 0;
}

int main(int argc, char **argv)
{
    cli c;
    parse_args(argc, argv, &c);
    int rc;
    if (strcmp(c.command, "info") == 0)
        rc = cmd_info(&c);
    else if (strcmp(c.command, "encode") == 0)
        rc = cmd_encode(&c);
    else if (strcmp(c.command, "decode") == 0)
        rc = cmd_decode(&c);
    else if (strcmp(c.command, "reconstruct") == 0)
        rc = cmd_reconstruct(&c);
    else if (strcmp(c.command, "convert") == 0)
        rc = cmd_convert(&c);
    else if (strcmp(c.command, "train") == 0)
        rc = cmd_train(&c);
    else if (strcmp(c.command, "eval") == 0)
        rc = cmd_eval(&c);
    else if (strcmp(c.command, "encode-dataset") == 0)
        rc = cmd_encode_dataset(&c);
    else if (strcmp(c.command, "latent-stats") == 0)
        rc = cmd_latent_stats(&c);
    else
        rc = cmd_options(&c);
    klvae_options_free(c.opts);
    return rc;
}
