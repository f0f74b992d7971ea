/* cli.h — what the klvae tool's commands share: the parsed command line,
 * error exits and small helpers. Every function here either succeeds or
 * prints a message naming the problem and exits (2 for usage errors, 1 for
 * failures), so the commands read straight through. */
#ifndef KLVAE_CLI_H
#define KLVAE_CLI_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "base/common.h"
#include "klvae.h"

#define EXIT_USAGE 2
#define CLI_MAX_FLAGS 24

typedef struct cli {
    const char *command;
    int npos;
    const char *pos[8];
    klvae_options_t *opts; /* every library option given on the command line */
    bool sample, scaled, quiet;
    bool seed_given;
    uint64_t seed;
    /* the command's own flags (--data DIR, --steps N, ...), by name */
    int nflags;
    const char *flag_name[CLI_MAX_FLAGS];
    const char *flag_value[CLI_MAX_FLAGS];
} cli;

extern const char *const program;
/* Set by a command that runs as one rank of several (klvae train under
 * mpirun): " (rank R of N)", which every message puts after the program's
 * name, and what a failure does instead of exit(code) (MPI_Abort: the
 * other ranks may be waiting for this one in a collective). */
extern char cli_rank_text[32];
extern void (*cli_failure_exit)(int code);

void die_usage(const char *fmt, ...) __attribute__((format(printf, 1, 2), noreturn));
/* Reports a failed library call (its message and status) and exits 1. */
void die_status(klvae_status_t st, const char *what) __attribute__((noreturn));
void die(const char *fmt, ...) __attribute__((format(printf, 1, 2), noreturn));
/* A progress or result line on stderr, unless -q. */
void note(const cli *c, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
void *xmalloc(size_t n);
void need_args(const cli *c, int n);
klvae_model_t *load_model(const cli *c, const char *path);

/* The value of the command flag --name, or NULL when it was not given. */
const char *cli_flag(const cli *c, const char *name);
/* --name as an integer in [lo, hi] (def when absent); exits on bad text. */
long long cli_flag_int(const cli *c, const char *name, long long def, long long lo, long long hi);
/* --name as a finite number in [lo, hi] (def when absent). */
double cli_flag_double(const cli *c, const char *name, double def, double lo, double hi);

/* Pads a (3, h, w) image to (3, ph, pw) by repeating its last row and
 * column (newly allocated), and copies the top-left (3, h, w) corner of a
 * padded one back: any image size goes through the f-times-smaller latent. */
float *pad_image(const float *img, int h, int w, int ph, int pw);
void crop_image(const float *img, int ph, int pw, int h, int w, float *out);
int round_up(int v, int f);

/* Writes images as a grid PNG: rows of cols (3, h, w) images in [-1, 1]
 * (rows * cols of them, row by row) with a 2-pixel white gap. */
klvae_status_t write_image_grid(const char *path, const float *images, int rows, int cols, int h,
                                int w);

/* Image quality of a reconstruction b of a, both (3, h, w) in [-1, 1]:
 * PSNR on the 8-bit scale the PNG stores, and SSIM (Gaussian window 11,
 * sigma 1.5, on [0, 1] intensities, mean of the three channels). */
double image_psnr(const float *a, const float *b, int h, int w);
double image_ssim(const float *a, const float *b, int h, int w);

int cmd_train(cli *c);
int cmd_eval(cli *c);
int cmd_encode_dataset(cli *c);
int cmd_latent_stats(cli *c);
extern const char *const train_help;
extern const char *const eval_help;
extern const char *const encode_dataset_help;
extern const char *const latent_stats_help;

#endif
