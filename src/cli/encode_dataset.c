/* encode_dataset.c — `klvae encode-dataset` and `klvae latent-stats`:
 * klvae_encode_dataset with a progress line, one line per skipped file and
 * a summary, and klvae_latent_stats as a table. */
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "base/options.h"
#include "cli/cli.h"

const char *const encode_dataset_help =
    "usage: klvae encode-dataset MODEL (--data DIR | --list FILE) --out SHARDS_DIR\n"
    "                            [--size N | --buckets SIDE,STEP[,MAX_RATIO]]\n"
    "                            [--crop center|random] [--flip] [--store posterior|sample]\n"
    "                            [--dtype fp32|bf16|fp16] [--scaled] [--shard-size N]\n"
    "                            [--part I/N] [--encode-batch N] [--loader-threads N]\n"
    "                            [--OPTION VALUE ...]\n"
    "\n"
    "Encodes every PNG and JPEG under DIR (recursively, sorted as 'klvae train' reads\n"
    "them), or the paths listed in FILE (one per line), into latents for diffusion\n"
    "training: SHARDS_DIR gets safetensors shards of --shard-size images (default\n"
    "512), index.jsonl (one line per image: path, shard, row, bucket, original size,\n"
    "crop, flip), errors.jsonl (the files skipped, with the reason) and manifest.json\n"
    "(model, options, counts, the latents' statistics). docs/latents.md describes them.\n"
    "\n"
    "  --size N          resize the shorter side to N and crop N x N (default 256)\n"
    "  --buckets S,T[,R] aspect-ratio buckets of about S x S pixels, sides multiples\n"
    "                    of T, aspect ratios up to R (default 4): 1024,64 is near SDXL's\n"
    "  --crop C          center (default) or random (seeded by --seed)\n"
    "  --flip            also store the latents of each image mirrored\n"
    "  --store S         posterior (mean and logvar, default) or sample\n"
    "  --dtype D         fp32 (default), bf16 or fp16\n"
    "  --scaled          store (z - shift_factor) * scaling_factor\n"
    "  --part I/N        encode part I of N (from 0); under mpirun each rank takes\n"
    "                    its own part by itself; the last part to finish merges them\n"
    "\n"
    "Run the same command again after a crash or Ctrl-C: the shards already written\n"
    "are kept and the rest encoded, to the same bytes as an uninterrupted run.\n"
    "Unreadable images are skipped and listed in errors.jsonl.\n";

const char *const latent_stats_help =
    "usage: klvae latent-stats SHARDS_DIR\n"
    "\n"
    "Per-channel mean and standard deviation of the latents of a finished dataset\n"
    "(klvae encode-dataset, every part done) and the scaling and shift factors they\n"
    "imply (1 / std, mean), written to SHARDS_DIR/manifest.json (with index.jsonl and\n"
    "errors.jsonl, the merge of the parts). encode-dataset does it at its end.\n";

typedef struct progress_state {
    const cli *c;
    bool tty;
    double last_print;
    bool line_open; /* a \r line is on the terminal */
} progress_state;

static void format_duration(double seconds, char *buf, size_t size)
{
    if (seconds < 0) {
        snprintf(buf, size, "?");
        return;
    }
    long s = (long)(seconds + 0.5);
    if (s >= 3600)
        snprintf(buf, size, "%ldh%02ldm", s / 3600, s / 60 % 60);
    else
        snprintf(buf, size, "%ldm%02lds", s / 60, s % 60);
}

static void print_progress(progress_state *ps, const klvae_dataset_progress_t *p)
{
    char eta[32];
    format_duration(p->eta_seconds, eta, sizeof eta);
    double done = (double)(p->images_done + p->images_skipped);
    fprintf(stderr, "%spart %d/%d: %lld/%lld images (%.1f%%), %lld skipped, shard %lld/%lld, "
            "%.2f images/s, ETA %s%s",
            ps->tty ? "\r" : "", p->part, p->parts, (long long)p->images_done,
            (long long)p->images_total,
            p->images_total > 0 ? 100.0 * done / (double)p->images_total : 100.0,
            (long long)p->images_skipped, (long long)p->shards_done, (long long)p->shards_total,
            p->images_per_second, eta, ps->tty ? "\033[K" : "\n");
    ps->line_open = ps->tty;
}

static int on_progress(void *user, const klvae_dataset_progress_t *p)
{
    progress_state *ps = user;
    if (ps->c->quiet)
        return 0;
    if (p->skipped_path) {
        fprintf(stderr, "%sklvae: skipping %s: %s\n", ps->line_open ? "\n" : "", p->skipped_path,
                p->skipped_reason);
        ps->line_open = false;
        return 0;
    }
    /* a terminal line four times a second; a log line every 30 s */
    double now = p->seconds, every = ps->tty ? 0.25 : 30.0;
    if (now - ps->last_print >= every || p->finished) {
        ps->last_print = now;
        print_progress(ps, p);
    }
    return 0;
}

/* Prints the statistics of manifest.json (the merge wrote them). */
static void print_stats(const char *dir)
{
    char path[4096];
    snprintf(path, sizeof path, "%s/manifest.json", dir);
    json_error_t err;
    json_t *m = json_load_file(path, 0, &err);
    json_t *stats = json_object_get(m, "latent_stats");
    json_t *mean = json_object_get(stats, "mean"), *std = json_object_get(stats, "std");
    printf("%-10s %14s %14s\n", "channel", "mean", "std");
    for (size_t c = 0; c < json_array_size(mean) && c < json_array_size(std); c++)
        printf("%-10zu %14.6g %14.6g\n", c, json_number_value(json_array_get(mean, c)),
               json_number_value(json_array_get(std, c)));
    printf("%-10s %14.6g %14.6g\n", "all", json_number_value(json_object_get(stats,
                                                               "mean_all_channels")),
           json_number_value(json_object_get(stats, "std_all_channels")));
    printf("implied scaling_factor %.6g (1 / std), shift_factor %.6g (mean)\n",
           json_number_value(json_object_get(stats, "scaling_factor")),
           json_number_value(json_object_get(stats, "shift_factor")));
    json_decref(m);
}

/* Under mpirun each rank on a machine takes its own GPU (when --device is
 * not given): the launcher's local rank. */
static void device_per_rank(cli *c)
{
    const char *local = getenv("OMPI_COMM_WORLD_LOCAL_RANK");
    if (!local)
        local = getenv("MPI_LOCALRANKID");
    if (!local || kv_options_is_set(c->opts, "device"))
        return;
    if (klvae_options_set(c->opts, "device", local) != KLVAE_OK)
        die_usage("the local MPI rank '%s' is no device number: %s", local, klvae_last_error());
}

int cmd_encode_dataset(cli *c)
{
    need_args(c, 1);
    const char *dir = cli_flag(c, "data"), *list = cli_flag(c, "list"), *out = cli_flag(c, "out");
    if (!dir == !list)
        die_usage("encode-dataset needs --data DIR or --list FILE (one of them)");
    if (!out)
        die_usage("encode-dataset needs --out SHARDS_DIR");
    if (c->scaled && klvae_options_set(c->opts, "scale_latents", "true") != KLVAE_OK)
        die_status(KLVAE_ERR_OPTION, "options");
    if (!kv_options_is_set(c->opts, "model_name"))
        klvae_options_set(c->opts, "model_name", c->pos[0]);
    device_per_rank(c);
    klvae_model_t *m = load_model(c, c->pos[0]);
    progress_state ps = {c, isatty(STDERR_FILENO) != 0, -1e9, false};
    klvae_dataset_progress_t summary = KLVAE_DATASET_PROGRESS_INIT;
    klvae_status_t st =
        klvae_encode_dataset(m, dir ? dir : list, out, c->opts, on_progress, &ps, &summary);
    if (ps.line_open)
        fputc('\n', stderr);
    klvae_model_free(m);
    if (st != KLVAE_OK)
        die_status(st, "encode-dataset failed");
    char took[32];
    format_duration(summary.seconds, took, sizeof took);
    note(c, "part %d/%d done: %lld images in %lld shards (%lld found from an earlier run), "
         "%lld skipped, %s, %.2f images/s\n",
         summary.part, summary.parts, (long long)summary.images_done,
         (long long)summary.shards_total, (long long)summary.images_resumed,
         (long long)summary.images_skipped, took, summary.images_per_second);
    if (summary.dataset_complete) {
        note(c, "dataset complete: %s/manifest.json, index.jsonl, errors.jsonl\n", out);
        if (!c->quiet)
            print_stats(out);
    } else {
        note(c, "other parts are not finished yet; the last one to finish merges them\n");
    }
    return 0;
}

int cmd_latent_stats(cli *c)
{
    need_args(c, 1);
    int channels = 0;
    double scale, shift;
    klvae_status_t st = klvae_latent_stats(c->pos[0], 0, &channels, NULL, NULL, &scale, &shift);
    if (st != KLVAE_OK)
        die_status(st, "latent-stats failed");
    print_stats(c->pos[0]);
    note(c, "wrote %s/manifest.json\n", c->pos[0]);
    return 0;
}
