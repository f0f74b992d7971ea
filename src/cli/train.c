/* train.c — `klvae train`: the training loop around klvae_trainer_step,
 * with a loader thread, a live progress line, RUN_DIR/log.csv, held-out
 * evaluation with reconstruction grids, a loss-curve picture, checkpoints
 * (every K steps and on Ctrl-C) and the final diffusers export.
 *
 * RUN_DIR holds:
 *   checkpoint.safetensors  everything needed to resume (--resume RUN_DIR)
 *   log.csv                 one row per step: the losses of klvae_step_stats_t and the
 *                           steps skipped so far for non-finite values
 *   eval.csv                held-out PSNR and SSIM at every evaluation
 *   grid.png, grids/        inputs (top) above reconstructions (bottom)
 *   loss.png                the curves of log.csv and eval.csv
 *   model/, model_ema/      the final weights as diffusers folders
 *
 * Under mpirun (mpirun -np N klvae train ...) every rank runs this same
 * program as one rank of a data-parallel run (cli/team.h): --batch is the
 * global batch, each rank loads its share of it and steps with the others
 * (klvae_trainer_set_comm); rank 0 alone writes RUN_DIR, evaluates and
 * prints progress; the ranks agree at every step on whether to go on. */
#include <errno.h>
#include <math.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "base/io.h"
#include "base/options.h"
#include "cli/cli.h"
#include "cli/plot.h"
#include "cli/plot_run.h"
#include "cli/team.h"
#include "formats/safetensors.h"
#include "train/data.h"

/* With --nonfinite skip, a run whose every batch gives NaN has diverged:
 * it stops after this many in a row instead of spinning on. */
#define KV_CLI_MAX_SKIPPED_IN_A_ROW 100

const char *const train_help =
    "usage: klvae train [--data DIR] [--out RUN_DIR] [--size N] [--batch N]\n"
    "                   [--steps N] [--minutes M] [--model INIT] [--config NAME]\n"
    "                   [--lpips FILE] [--resume RUN_DIR|CHECKPOINT] [--OPTION VALUE ...]\n"
    "\n"
    "Trains an autoencoder with the LDM recipe (pixel loss, LPIPS, KL, PatchGAN)\n"
    "and writes RUN_DIR (default klvae-run): log.csv, eval.csv, grid.png and\n"
    "grids/, loss.png, checkpoint.safetensors, and at the end model/ (and\n"
    "model_ema/ with --ema-decay) as diffusers folders.\n"
    "\n"
    "  --data DIR            PNG and JPEG files under DIR (recursively); without it,\n"
    "                        the built-in procedural images\n"
    "  --size N              training crop, a multiple of the downsampling factor\n"
    "                        and at least 16 (default 256)\n"
    "  --batch N             images per step (default 4)\n"
    "  --steps N             stop after step N (default 1000)\n"
    "  --minutes M           also stop after M minutes of training\n"
    "  --model INIT          start from these weights (folder or .safetensors);\n"
    "                        without it, a random init of --config (sd, small, tiny)\n"
    "  --lpips FILE          LPIPS-VGG16 weights (tools/export_lpips.py makes them);\n"
    "                        without them the perceptual weight is 0\n"
    "  --resume R            continue the run in folder R (or from checkpoint R)\n"
    "                        exactly where it stopped, with its options, data, size,\n"
    "                        batch and intervals (flags given again override them)\n"
    "  --eval-images N       held-out images for PSNR/SSIM and the grid (default 8)\n"
    "  --grid-every K        evaluate and write a grid every K steps (default 100)\n"
    "  --checkpoint-every K  checkpoint every K steps (default 500)\n"
    "  --log-every K         progress line every K steps when stderr is not a\n"
    "                        terminal (default 10)\n"
    "\n"
    "Data-parallel: mpirun -np N klvae train ... trains on N processes (one per\n"
    "GPU with --backend cuda; each takes device = its rank on the machine unless\n"
    "--device is given); --batch is the global batch, a multiple of N x\n"
    "--grad-accum. Rank 0 writes RUN_DIR (docs/training.md).\n"
    "\n"
    "Every library option is a flag too: --learning-rate, --kl-weight,\n"
    "--disc-start, --pixel-loss l2, --ema-decay 0.999, --preset ldm, --seed, ...\n"
    "(see 'klvae options' and docs/training.md). Ctrl-C stops after the current\n"
    "step, writes a checkpoint and the model; a second Ctrl-C quits at once.\n";

/* Options that describe the machine, not the run: never taken from a
 * checkpoint. */
static const char *const machine_keys[] = {"backend", "device", "threads", NULL};

static volatile sig_atomic_t stop_requested = 0;

static void on_interrupt(int sig)
{
    (void)sig;
    stop_requested = 1;
    static const char msg[] = "\nklvae: stopping after this step (Ctrl-C again quits now)\n";
    ssize_t ignored = write(STDERR_FILENO, msg, sizeof msg - 1);
    (void)ignored;
}

static void catch_interrupts(void)
{
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_interrupt;
    sa.sa_flags = SA_RESETHAND; /* the second one gets the default: quit */
    sigemptyset(&sa.sa_mask);
    sigaction(SIGINT, &sa, NULL);
    sigaction(SIGTERM, &sa, NULL);
}

typedef struct run {
    cli *c;
    char *dir;            /* RUN_DIR */
    const char *data_dir; /* NULL: procedural */
    int size, batch, eval_n, grid_every, ckpt_every, log_every;
    long long steps;
    double minutes;
    uint64_t seed, position;
    klvae_model_t *model;
    klvae_trainer_t *trainer;
    kv_dataset *data, *eval_data;
    kv_loader *loader;
    float *images, *eval_images, *eval_recon;
    FILE *log, *eval_log;
    bool tty;
    int64_t last_eval_step; /* and its result, so the end does not redo it */
    double last_psnr, last_ssim;
    int skipped_in_a_row; /* batches skipped for non-finite values (--nonfinite skip) */
    team team;            /* this process alone, or the ranks of an MPI job */
    bool leader;          /* rank 0: writes RUN_DIR, evaluates, prints */
    int local_batch;      /* this rank's share of --batch */
    bool interrupted;     /* Ctrl-C (on any rank) */
} run;

static char *join(const char *dir, const char *name)
{
    size_t n = strlen(dir) + strlen(name) + 2;
    char *p = xmalloc(n);
    snprintf(p, n, "%s/%s", dir, name);
    return p;
}

static void check(klvae_status_t st, const char *what)
{
    if (st != KLVAE_OK)
        die_status(st, what);
}

static bool file_exists(const char *path)
{
    return access(path, F_OK) == 0;
}

/* ---- resuming ------------------------------------------------------------ */

/* The note of a checkpoint, or NULL. */
static const char *checkpoint_note(const kv_safetensors *st, const char *key)
{
    char full[64];
    snprintf(full, sizeof full, "note.%s", key);
    return kv_st_metadata(st, full);
}

/* Sets key=value unless the user gave key on the command line. */
static void adopt_option(cli *c, const char *key, const char *value, const char *from)
{
    for (int i = 0; machine_keys[i]; i++)
        if (strcmp(key, machine_keys[i]) == 0)
            return;
    if (kv_options_is_set(c->opts, key) || !*value) /* "" is every empty default */
        return;
    klvae_status_t st = klvae_options_set(c->opts, key, value);
    if (st != KLVAE_OK)
        die("%s: its option %s=%s is not valid here: %s", from, key, value, klvae_last_error());
}

/* Takes the options, model config and data settings of a checkpoint as
 * defaults: a resumed run needs no flags but --resume. */
static void adopt_checkpoint_settings(run *r, const char *path, const char **data_note)
{
    kv_safetensors st;
    check(kv_st_open(path, &st), "cannot open the checkpoint");
    const char *format = kv_st_metadata(&st, "format");
    if (!format || strncmp(format, "klvae-trainer-checkpoint", 24) != 0)
        die("%s is not a klvae trainer checkpoint", path);
    /* The model's actual config first: the options text also lists the
     * defaults of keys that a loaded --model INIT overrode. */
    for (size_t i = 0; i < st.metadata_count; i++)
        if (strncmp(st.metadata[i].key, "config.", 7) == 0)
            adopt_option(r->c, st.metadata[i].key + 7, st.metadata[i].value, path);
    const char *text = kv_st_metadata(&st, "options");
    for (const char *line = text; line && *line;) {
        const char *end = strchr(line, '\n');
        size_t len = end ? (size_t)(end - line) : strlen(line);
        char buf[1200];
        if (len < sizeof buf) {
            memcpy(buf, line, len);
            buf[len] = '\0';
            char *eq = strchr(buf, '=');
            if (eq) {
                *eq = '\0';
                adopt_option(r->c, buf, eq + 1, path);
            }
        }
        line = end ? end + 1 : line + len;
    }
    const char *pos = checkpoint_note(&st, "data_position");
    r->position = pos ? strtoull(pos, NULL, 10) : 0;
    const char *data = checkpoint_note(&st, "data");
    *data_note = data && strcmp(data, "procedural") != 0 ? strdup(data) : NULL;
    /* the run's shape, unless given again */
    struct {
        const char *flag;
        int *value;
    } kept[] = {{"size", &r->size},
                {"batch", &r->batch},
                {"eval-images", &r->eval_n},
                {"grid-every", &r->grid_every},
                {"checkpoint-every", &r->ckpt_every},
                {"log-every", &r->log_every}};
    for (size_t i = 0; i < sizeof kept / sizeof kept[0]; i++) {
        const char *text = checkpoint_note(&st, kept[i].flag);
        if (text && !cli_flag(r->c, kept[i].flag))
            *kept[i].value = atoi(text);
    }
    kv_st_close(&st);
}

/* Keeps only the rows of a CSV log before step `step` (a crash after the
 * last checkpoint left rows that the resumed run will write again). The
 * rows are filtered in place and the file replaced atomically: a kill here
 * must not cost the rows before the checkpoint. */
static void truncate_log(const char *path, int64_t step)
{
    char *text = NULL;
    size_t len = 0;
    if (kv_read_text_file(path, (size_t)1 << 30, &text, &len) != KLVAE_OK)
        return;
    size_t kept = 0; /* never passes the line being read */
    for (char *line = text; *line;) {
        char *end = strchr(line, '\n');
        size_t n = end ? (size_t)(end - line) : strlen(line);
        char *stop;
        long long row_step = strtoll(line, &stop, 10);
        if (stop == line || row_step < step) { /* the header, or an earlier row */
            memmove(text + kept, line, n);
            kept += n;
            text[kept++] = '\n';
        }
        if (!end)
            break;
        line = end + 1;
    }
    if (kept != len) {
        kv_atomic_file f;
        klvae_status_t st = kv_atomic_open(&f, path);
        if (st == KLVAE_OK)
            st = kv_atomic_write(&f, text, kept);
        if (st == KLVAE_OK)
            st = kv_atomic_commit(&f);
        check(st, "cannot rewrite the log");
    }
    free(text);
}

static FILE *open_log(const char *dir, const char *name, const char *header, bool resume,
                      int64_t step)
{
    char *path = join(dir, name);
    bool append = resume && file_exists(path);
    if (append)
        truncate_log(path, step);
    FILE *f = fopen(path, append ? "a" : "w");
    if (!f)
        die("cannot write %s: %s", path, strerror(errno));
    if (!append)
        fprintf(f, "%s\n", header);
    free(path);
    return f;
}

/* ---- setup --------------------------------------------------------------- */

static void read_flags(run *r, const char **resume_path)
{
    cli *c = r->c;
    if (c->npos != 0)
        die_usage("train takes no positional arguments (got '%s'); the data is --data DIR",
                  c->pos[0]);
    r->size = (int)cli_flag_int(c, "size", 256, 16, 8192);
    r->batch = (int)cli_flag_int(c, "batch", 4, 1, 4096);
    r->steps = cli_flag_int(c, "steps", 1000, 1, (long long)1 << 50);
    r->minutes = cli_flag_double(c, "minutes", 0, 0, 1e9);
    r->eval_n = (int)cli_flag_int(c, "eval-images", 8, 0, 64);
    r->grid_every = (int)cli_flag_int(c, "grid-every", 100, 1, 1 << 30);
    r->ckpt_every = (int)cli_flag_int(c, "checkpoint-every", 500, 1, 1 << 30);
    r->log_every = (int)cli_flag_int(c, "log-every", 10, 1, 1 << 30);
    r->data_dir = cli_flag(c, "data");
    const char *lpips = cli_flag(c, "lpips");
    if (lpips)
        check(klvae_options_set(c->opts, "lpips_weights", lpips), "--lpips");
    *resume_path = cli_flag(c, "resume");
    const char *out = cli_flag(c, "out");
    if (!out && *resume_path && kv_is_directory(*resume_path))
        out = *resume_path;
    r->dir = strdup(out ? out : "klvae-run");
    if (cli_flag(c, "model") && *resume_path)
        die_usage("--model and --resume exclude each other: a checkpoint holds the weights");
}

static void create_model(run *r, bool resume)
{
    const char *init = cli_flag(r->c, "model");
    if (init) {
        r->model = load_model(r->c, init);
        return;
    }
    check(klvae_model_create(r->c->opts, &r->model), "cannot create the model");
    char channels[64];
    klvae_model_get(r->model, "block_out_channels", channels, sizeof channels);
    note(r->c, "%s model: block_out_channels %s, %.1f M parameters, %s backend\n",
         resume ? "resumed" : "new random", channels,
         (double)klvae_model_parameter_count(r->model) / 1e6, klvae_model_backend(r->model));
}

static void warn_missing_lpips(run *r)
{
    char value[64];
    klvae_trainer_get(r->trainer, "perceptual_weight", value, sizeof value);
    double asked = kv_options_double(r->c->opts, "perceptual_weight");
    if (strtod(value, NULL) == 0.0 && asked != 0.0)
        fprintf(stderr,
                "\n"
                "  *** %s: NO LPIPS WEIGHTS: training WITHOUT the perceptual loss. ***\n"
                "  *** The LDM recipe weights LPIPS-VGG16 by %g; give its weights with   ***\n"
                "  *** --lpips FILE (tools/export_lpips.py makes the file), or pass     ***\n"
                "  *** --perceptual-weight 0 to train on the pixel loss on purpose.      ***\n\n",
                program, asked);
}

/* A file the loader skipped, said with this rank's name. */
static void loader_warning(void *ctx, const char *message)
{
    (void)ctx;
    fprintf(stderr, "%s%s: %s\n", program, cli_rank_text, message);
}

static void open_data(run *r)
{
    const int f = klvae_model_downsampling_factor(r->model);
    if (r->size % f != 0)
        die_usage("--size %d is not a multiple of the model's downsampling factor %d", r->size, f);
    if (r->data_dir) {
        check(kv_dataset_open_folder(r->data_dir, r->size, r->seed, &r->data),
              "cannot open the training data");
        /* fixed crops of the same files, drawn with another seed */
        check(kv_dataset_open_folder(r->data_dir, r->size, r->seed + 1, &r->eval_data),
              "cannot open the training data");
        uint64_t budget = kv_options_uint64(r->c->opts, "max_image_pixels");
        kv_dataset_set_max_pixels(r->data, budget);
        kv_dataset_set_max_pixels(r->eval_data, budget);
    } else {
        check(kv_dataset_open_procedural(r->size, r->seed, &r->data), "procedural data");
        /* held out: a seed the training stream never uses */
        check(kv_dataset_open_procedural(r->size, r->seed ^ 0x5EEDE7A1C0FFEEull, &r->eval_data),
              "procedural data");
    }
    if (r->team.mpi) { /* this rank's share of each global batch */
        kv_loader_share share = {r->batch, (int)kv_options_int(r->c->opts, "grad_accum"),
                                 r->team.rank, r->team.size};
        check(kv_loader_create_share(r->data, &share, r->position, 3, loader_warning, r,
                                     &r->loader),
              "cannot start the data loader");
    } else {
        check(kv_loader_create(r->data, r->batch, r->position, 3, NULL, NULL, &r->loader),
              "cannot start the data loader");
    }
    const size_t image = (size_t)3 * r->size * r->size;
    r->images = xmalloc((size_t)r->local_batch * image * sizeof(float));
    if (r->eval_n > 0) {
        r->eval_images = xmalloc((size_t)r->eval_n * image * sizeof(float));
        r->eval_recon = xmalloc((size_t)r->eval_n * image * sizeof(float));
        /* unreadable files are skipped here quietly: the loader reports them */
        const uint64_t tries = (uint64_t)r->eval_n + 2 * kv_dataset_count(r->eval_data);
        int got = 0;
        for (uint64_t p = 0; p < tries && got < r->eval_n; p++)
            if (kv_dataset_get(r->eval_data, p, r->eval_images + got * image) == KLVAE_OK)
                got++;
        if (got < r->eval_n)
            die("could read only %d of %d evaluation images from %s: %s", got, r->eval_n,
                r->data_dir, klvae_last_error());
    }
}

/* ---- evaluation and pictures --------------------------------------------- */

typedef struct eval_result {
    double psnr, ssim;
} eval_result;

/* Reconstructs the evaluation images through the posterior mean. */
static eval_result evaluate(run *r)
{
    eval_result res = {0, 0};
    if (r->eval_n == 0)
        return res;
    const int s = r->size, f = klvae_model_downsampling_factor(r->model);
    const int zc = klvae_model_latent_channels(r->model), chunk = 4;
    const size_t image = (size_t)3 * s * s, latent = (size_t)zc * (s / f) * (s / f);
    float *mean = xmalloc(chunk * latent * sizeof(float));
    float *logvar = xmalloc(chunk * latent * sizeof(float));
    for (int i = 0; i < r->eval_n; i += chunk) {
        int n = r->eval_n - i < chunk ? r->eval_n - i : chunk;
        check(klvae_encode(r->model, r->eval_images + i * image, n, s, s, mean, logvar),
              "evaluation: encode");
        check(klvae_decode(r->model, mean, n, s / f, s / f, r->eval_recon + i * image),
              "evaluation: decode");
    }
    for (int i = 0; i < r->eval_n; i++) {
        res.psnr += image_psnr(r->eval_images + i * image, r->eval_recon + i * image, s, s);
        res.ssim += image_ssim(r->eval_images + i * image, r->eval_recon + i * image, s, s);
    }
    res.psnr /= r->eval_n;
    res.ssim /= r->eval_n;
    free(mean);
    free(logvar);
    return res;
}

/* grid.png and grids/step_N.png: the evaluation images above their
 * reconstructions (from the last evaluate). */
static void write_grids(run *r, int64_t step)
{
    if (r->eval_n == 0)
        return;
    const int cols = r->eval_n < 8 ? r->eval_n : 8;
    const size_t image = (size_t)3 * r->size * r->size;
    float *pair = xmalloc(2 * cols * image * sizeof(float));
    memcpy(pair, r->eval_images, cols * image * sizeof(float));
    memcpy(pair + cols * image, r->eval_recon, cols * image * sizeof(float));
    char name[64];
    snprintf(name, sizeof name, "grids/step_%06lld.png", (long long)step);
    char *path = join(r->dir, name), *latest = join(r->dir, "grid.png");
    check(write_image_grid(path, pair, 2, cols, r->size, r->size), "cannot write the grid");
    check(write_image_grid(latest, pair, 2, cols, r->size, r->size), "cannot write the grid");
    free(path);
    free(latest);
    free(pair);
}

static eval_result evaluate_and_show(run *r, int64_t step)
{
    if (!r->leader)
        return (eval_result){0, 0};
    if (step == r->last_eval_step)
        return (eval_result){r->last_psnr, r->last_ssim};
    eval_result e = evaluate(r);
    r->last_eval_step = step;
    r->last_psnr = e.psnr;
    r->last_ssim = e.ssim;
    if (r->eval_n == 0)
        return e;
    write_grids(r, step);
    fprintf(r->eval_log, "%lld,%.4f,%.5f\n", (long long)step, e.psnr, e.ssim);
    fflush(r->eval_log);
    return e;
}

/* ---- the loop ------------------------------------------------------------ */

static void format_duration(double s, char *buf, size_t size)
{
    long t = (long)(s + 0.5);
    if (t >= 3600)
        snprintf(buf, size, "%ldh%02ldm", t / 3600, t / 60 % 60);
    else
        snprintf(buf, size, "%ldm%02lds", t / 60, t % 60);
}

static void log_step(run *r, const klvae_step_stats_t *s, double elapsed)
{
    if (!r->log) /* a rank other than 0 */
        return;
    fprintf(r->log,
            "%lld,%.3f,%.4f,%.8g,%.8g,%.8g,%.8g,%.8g,%.8g,%.8g,%.6g,%.8g,%.8g,%.8g,%.8g,%lld\n",
            (long long)s->step, elapsed, s->seconds, s->total_loss, s->rec_loss,
            s->perceptual_loss, s->nll_loss, s->kl_loss, s->g_loss, s->d_weight, s->disc_factor,
            s->d_loss, s->logits_real, s->logits_fake, s->logvar, (long long)s->skipped_steps);
}

static void show_progress(run *r, const klvae_step_stats_t *s, double img_per_s, double eta)
{
    if (r->c->quiet)
        return;
    char eta_text[32];
    format_duration(eta, eta_text, sizeof eta_text);
    char gan[64] = "";
    if (s->disc_factor > 0)
        snprintf(gan, sizeof gan, "  g %.3f d %.3f", s->g_loss, s->d_loss);
    char lp[32] = "";
    if (s->perceptual_loss > 0)
        snprintf(lp, sizeof lp, "  lpips %.4f", s->perceptual_loss);
    fprintf(stderr, "%sstep %lld/%lld  %.2f img/s  ETA %s  rec %.4f%s  kl %.4g%s%s",
            r->tty ? "\r\033[K" : "", (long long)s->step + 1, r->steps, img_per_s, eta_text,
            s->rec_loss, lp, s->kl_loss, gan, r->tty ? "" : "\n");
    fflush(stderr);
}

/* Every rank stops here when one failed (its message, as every rank
 * learned it from team_agree): the others have not failed, so they leave
 * MPI in order. */
static void stop_with(run *r, int rank, const char *message) __attribute__((noreturn));
static void stop_with(run *r, int rank, const char *message)
{
    if (r->team.size > 1)
        fprintf(stderr, "%s%s: stopping: rank %d failed: %s\n", program, cli_rank_text, rank,
                message);
    else
        fprintf(stderr, "%s: %s\n", program, message);
    team_leave(&r->team);
    exit(1);
}

/* Rank 0's outcome of something only it does (a write), learned by every
 * rank: the others wait for it here, and all stop when it failed. */
static void agree_on_leader(run *r, klvae_status_t st, const char *what)
{
    char message[1024] = "";
    if (st != KLVAE_OK)
        snprintf(message, sizeof message, "%s: %s (%s)", what, klvae_last_error(),
                 klvae_status_string(st));
    int failed = team_agree(&r->team, st == KLVAE_OK, message, sizeof message);
    if (failed >= 0)
        stop_with(r, failed, message);
}

static klvae_status_t write_checkpoint(run *r)
{
    char text[32];
    snprintf(text, sizeof text, "%llu", (unsigned long long)r->position);
    check(klvae_trainer_set_note(r->trainer, "data_position", text), "checkpoint note");
    check(klvae_trainer_set_note(r->trainer, "data", r->data_dir ? r->data_dir : "procedural"),
          "checkpoint note");
    const struct {
        const char *flag;
        int value;
    } kept[] = {{"size", r->size},
                {"batch", r->batch},
                {"eval-images", r->eval_n},
                {"grid-every", r->grid_every},
                {"checkpoint-every", r->ckpt_every},
                {"log-every", r->log_every}};
    for (size_t i = 0; i < sizeof kept / sizeof kept[0]; i++) {
        snprintf(text, sizeof text, "%d", kept[i].value);
        check(klvae_trainer_set_note(r->trainer, kept[i].flag, text), "checkpoint note");
    }
    snprintf(text, sizeof text, "%d", r->team.size);
    check(klvae_trainer_set_note(r->trainer, "ranks", text), "checkpoint note");
    char *path = join(r->dir, "checkpoint.safetensors");
    klvae_status_t st = klvae_trainer_save(r->trainer, path);
    free(path);
    return st;
}

/* Rank 0 writes RUN_DIR/checkpoint.safetensors; the other ranks wait. */
static void save_checkpoint(run *r)
{
    agree_on_leader(r, r->leader ? write_checkpoint(r) : KLVAE_OK, "cannot write the checkpoint");
}

static void end_line(run *r)
{
    if (r->tty && !r->c->quiet)
        fputc('\n', stderr);
}

/* The next batch (this rank's share of it); a rank whose data fails stops
 * every rank, named. */
static void next_batch(run *r, uint64_t *next)
{
    klvae_status_t st = kv_loader_next(r->loader, r->images, next);
    if (!r->team.mpi) {
        check(st, "cannot load training data");
        return;
    }
    char message[1024] = "";
    if (st != KLVAE_OK)
        snprintf(message, sizeof message, "cannot load training data: %s (%s)",
                 klvae_last_error(), klvae_status_string(st));
    int failed = team_agree(&r->team, st == KLVAE_OK, message, sizeof message);
    if (failed >= 0) {
        end_line(r);
        stop_with(r, failed, message);
    }
}

/* Trains until --steps, --minutes or Ctrl-C. */
static void train_loop(run *r)
{
    const double start = kv_now_seconds(), budget = r->minutes * 60.0;
    double step_time = 0; /* a running mean for the ETA */
    int64_t step = klvae_trainer_step_count(r->trainer);
    const int64_t first = step;
    while (step < r->steps) {
        /* Ctrl-C on any rank (mpirun passes it to all, maybe in different
         * steps), rank 0's clock: every rank stops after the same step */
        r->interrupted = team_any(&r->team, stop_requested);
        bool out_of_time = r->leader && budget > 0 && kv_now_seconds() - start >= budget;
        if (r->interrupted || team_any(&r->team, out_of_time))
            break;
        uint64_t next = 0;
        next_batch(r, &next);
        klvae_step_stats_t stats = KLVAE_STEP_STATS_INIT;
        double t0 = kv_now_seconds();
        klvae_status_t st =
            klvae_trainer_step(r->trainer, r->images, r->local_batch, r->size, r->size, &stats);
        if (st != KLVAE_OK) {
            end_line(r);
            die_status(st, "training step failed (resume from the last checkpoint)");
        }
        double dt = kv_now_seconds() - t0;
        r->position = next;
        if (stats.skipped) { /* --nonfinite skip: no update, the data moved on */
            end_line(r);
            note(r->c, "step %lld: a non-finite value; this batch's update was skipped (%lld "
                       "skipped so far)\n",
                 (long long)stats.step, (long long)stats.skipped_steps);
            if (++r->skipped_in_a_row >= KV_CLI_MAX_SKIPPED_IN_A_ROW)
                die("%d batches in a row gave non-finite values; stopping (lower "
                    "--learning-rate, resume from the last checkpoint)",
                    r->skipped_in_a_row);
            continue;
        }
        r->skipped_in_a_row = 0;
        step = stats.step + 1;
        step_time = step - first == 1 ? dt : 0.9 * step_time + 0.1 * dt;
        log_step(r, &stats, kv_now_seconds() - start);
        double eta = (double)(r->steps - step) * step_time;
        if (budget > 0 && budget - (kv_now_seconds() - start) < eta)
            eta = budget - (kv_now_seconds() - start);
        if (r->tty || step % r->log_every == 0 || step == r->steps)
            show_progress(r, &stats, r->batch / step_time, eta > 0 ? eta : 0);
        if (step % r->grid_every == 0) {
            fflush(r->log);
            eval_result e = evaluate_and_show(r, step);
            if (r->eval_n > 0 && !r->c->quiet) {
                end_line(r);
                note(r->c, "step %lld: held-out PSNR %.2f dB, SSIM %.4f\n", (long long)step,
                     e.psnr, e.ssim);
            }
            write_loss_plot(r->dir);
        }
        if (step % r->ckpt_every == 0)
            save_checkpoint(r);
    }
    /* also a Ctrl-C during the last step (every rank is here now) */
    r->interrupted = team_any(&r->team, stop_requested);
    end_line(r);
    if (r->log)
        fflush(r->log);
}

static void finish(run *r, double psnr_start, int64_t start_step)
{
    save_checkpoint(r);
    if (!r->leader) /* rank 0 writes the rest */
        return;
    int64_t step = klvae_trainer_step_count(r->trainer);
    eval_result e = evaluate_and_show(r, step);
    char *model_dir = join(r->dir, "model");
    check(klvae_trainer_export(r->trainer, model_dir, 0), "cannot export the model");
    char ema[32];
    klvae_trainer_get(r->trainer, "ema_decay", ema, sizeof ema);
    char *ema_dir = join(r->dir, "model_ema");
    if (strtod(ema, NULL) > 0)
        check(klvae_trainer_export(r->trainer, ema_dir, 1), "cannot export the EMA model");
    write_loss_plot(r->dir);
    note(r->c, "trained steps %lld..%lld; wrote %s (model/%s, checkpoint.safetensors, log.csv, "
               "eval.csv, grid.png, loss.png)\n",
         (long long)start_step, (long long)step, r->dir, strtod(ema, NULL) > 0 ? ", model_ema/" : "");
    if (r->eval_n > 0) {
        printf("held-out PSNR: %.2f dB at step %lld -> %.2f dB at step %lld (%+.2f dB); SSIM "
               "%.4f\n",
               psnr_start, (long long)start_step, e.psnr, (long long)step, e.psnr - psnr_start,
               e.ssim);
        fflush(stdout);
    }
    free(model_dir);
    free(ema_dir);
}

static void free_run(run *r)
{
    kv_loader_free(r->loader);
    kv_dataset_free(r->data);
    kv_dataset_free(r->eval_data);
    klvae_trainer_free(r->trainer);
    klvae_model_free(r->model);
    if (r->log)
        fclose(r->log);
    if (r->eval_log)
        fclose(r->eval_log);
    free(r->images);
    free(r->eval_images);
    free(r->eval_recon);
    free(r->dir);
}

/* ---- data-parallel ------------------------------------------------------ */

static team *the_team; /* for cli_failure_exit */

static void abort_team(int code)
{
    team_abort(the_team, code);
}

/* This process as one rank of an MPI job: its messages name it, a failure
 * ends every rank, rank 0 alone prints progress, and each rank takes its
 * share of the machine: threads (cores / ranks on it) and its own GPU
 * (device = its rank on the machine), unless given. */
static void join_team(run *r)
{
    team_join(&r->team);
    r->leader = r->team.rank == 0;
    if (!r->team.mpi)
        return;
    cli *c = r->c;
    if (r->team.size > 1)
        snprintf(cli_rank_text, sizeof cli_rank_text, " (rank %d of %d)", r->team.rank,
                 r->team.size);
    the_team = &r->team;
    cli_failure_exit = abort_team;
    if (!r->leader)
        c->quiet = true;
    char text[16];
    if (!kv_options_is_set(c->opts, "threads") && r->team.local_size > 1) {
        cpu_set_t cpus;
        int cores = sched_getaffinity(0, sizeof cpus, &cpus) == 0 ? CPU_COUNT(&cpus) : 1;
        snprintf(text, sizeof text, "%d", KV_MAX(1, cores / r->team.local_size));
        check(klvae_options_set(c->opts, "threads", text), "--threads");
    }
    if (!kv_options_is_set(c->opts, "device")) {
        snprintf(text, sizeof text, "%d", r->team.local_rank);
        check(klvae_options_set(c->opts, "device", text), "--device");
    }
}

/* --batch is the global batch: every rank takes batch / ranks images, in
 * grad_accum micro-batches. */
static void share_batch(run *r)
{
    const int ranks = r->team.size, accum = (int)kv_options_int(r->c->opts, "grad_accum");
    if (r->team.mpi && r->batch % (ranks * accum) != 0)
        die_usage("--batch %d is the global batch of %d ranks: it must be a multiple of the "
                  "ranks times --grad-accum (%d x %d)",
                  r->batch, ranks, ranks, accum);
    r->local_batch = r->batch / ranks;
    if (!r->leader) /* rank 0 evaluates */
        r->eval_n = 0;
}

int cmd_train(cli *c)
{
    run r;
    memset(&r, 0, sizeof r);
    r.c = c;
    r.last_eval_step = -1;
    r.tty = isatty(STDERR_FILENO);
    join_team(&r);
    const char *resume = NULL, *data_note = NULL;
    read_flags(&r, &resume);
    char *checkpoint = NULL;
    if (resume) {
        checkpoint = kv_is_directory(resume) ? join(resume, "checkpoint.safetensors")
                                             : strdup(resume);
        adopt_checkpoint_settings(&r, checkpoint, &data_note);
        if (!r.data_dir)
            r.data_dir = data_note;
        else if (!data_note || strcmp(data_note, r.data_dir) != 0)
            fprintf(stderr, "%s: warning: the checkpoint trained on %s; continuing on %s\n",
                    program, data_note ? data_note : "procedural images", r.data_dir);
    }
    r.seed = kv_options_uint64(c->opts, "seed");
    share_batch(&r);
    create_model(&r, resume != NULL);
    check(klvae_trainer_create(r.model, c->opts, &r.trainer), "cannot create the trainer");
    if (checkpoint) {
        check(klvae_trainer_load(r.trainer, checkpoint), "cannot resume");
        note(c, "resumed %s at step %lld\n", checkpoint,
             (long long)klvae_trainer_step_count(r.trainer));
    }
    if (r.team.mpi)
        check(klvae_trainer_set_comm(r.trainer, &r.team.comm),
              "cannot start data-parallel training");
    if (r.leader) {
        warn_missing_lpips(&r);
        check(kv_make_directory(r.dir), "cannot create the run folder");
        char *grids = join(r.dir, "grids");
        check(kv_make_directory(grids), "cannot create the run folder");
        free(grids);
    }
    const int64_t start_step = klvae_trainer_step_count(r.trainer);
    if (start_step >= r.steps)
        die("the run is already at step %lld; give a larger --steps to continue",
            (long long)start_step);
    open_data(&r);
    if (r.leader) {
        r.log = open_log(r.dir, "log.csv",
                         "step,elapsed_s,step_s,total,rec,perceptual,nll,kl,g,d_weight,"
                         "disc_factor,d_loss,logits_real,logits_fake,logvar,skipped_steps",
                         checkpoint != NULL, start_step);
        r.eval_log = open_log(r.dir, "eval.csv", "step,psnr,ssim", checkpoint != NULL,
                              start_step);
    }
    char ranks[64] = "";
    if (r.team.mpi) {
        char allreduce[16] = "";
        klvae_trainer_get(r.trainer, "allreduce", allreduce, sizeof allreduce);
        snprintf(ranks, sizeof ranks, " on %d ranks (gradients summed on the %s)", r.team.size,
                 allreduce);
    }
    note(c, "training %s on %s, %dx%d crops, batch %d%s, steps %lld..%lld%s -> %s\n",
         cli_flag(c, "model") ? cli_flag(c, "model") : "the model",
         r.data_dir ? r.data_dir : "procedural images", r.size, r.size, r.batch, ranks,
         (long long)start_step, r.steps, r.minutes > 0 ? " (or the time limit)" : "", r.dir);
    eval_result e0 = evaluate_and_show(&r, start_step);
    if (r.eval_n > 0)
        note(c, "step %lld: held-out PSNR %.2f dB, SSIM %.4f (%d %s)\n", (long long)start_step,
             e0.psnr, e0.ssim, r.eval_n,
             r.data_dir ? "fixed crops of the data" : "held-out procedural images");
    catch_interrupts();
    train_loop(&r);
    bool interrupted = r.interrupted;
    signal(SIGINT, SIG_DFL);
    signal(SIGTERM, SIG_DFL);
    finish(&r, e0.psnr, start_step);
    if (interrupted && r.leader)
        fprintf(stderr, "%s: interrupted at step %lld; continue with: %s train --resume %s\n",
                program, (long long)klvae_trainer_step_count(r.trainer), program, r.dir);
    free(checkpoint);
    free((char *)data_note);
    free_run(&r);
    team_leave(&r.team);
    return interrupted ? 130 : 0;
}
