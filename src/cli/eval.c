/* eval.c — `klvae eval`: reconstruction quality of a model over a set of
 * images: PSNR and SSIM, and LPIPS when its weights are given. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "base/options.h"
#include "cli/cli.h"
#include "model/model.h"
#include "train/data.h"
#include "train/procedural.h"
#include "train/lpips.h"

const char *const eval_help =
    "usage: klvae eval MODEL [--data DIR] [--size N] [--images N] [--lpips FILE]\n"
    "                  [--OPTION VALUE ...]\n"
    "\n"
    "Encodes each image, decodes the posterior mean and compares the result with\n"
    "the image: PSNR (dB, on 8-bit values), SSIM (Gaussian window 11, sigma 1.5)\n"
    "and, with --lpips FILE, the LPIPS-VGG16 distance. Prints one line per image\n"
    "on stdout, then the means.\n"
    "\n"
    "  --data DIR    every PNG and JPEG file under DIR, whole (padded to a multiple\n"
    "                of the downsampling factor and cropped back), or with --size\n"
    "                the centre N x N of each; without --data, the held-out\n"
    "                procedural images that 'klvae train' evaluates on (same --seed)\n"
    "  --size N      crop size (default: whole images; 256 for procedural images)\n"
    "  --images N    evaluate at most N images (default: all; 16 procedural)\n";

typedef struct evaluator {
    cli *c;
    klvae_model_t *model;
    kv_lpips *lpips;
    double sum_psnr, sum_ssim, sum_lpips;
    int count;
} evaluator;

/* Reconstructs a (3, h, w) image through the posterior mean. */
static float *reconstruct(klvae_model_t *m, const float *img, int h, int w)
{
    const int f = klvae_model_downsampling_factor(m), zc = klvae_model_latent_channels(m);
    const int ph = round_up(h, f), pw = round_up(w, f);
    float *padded = pad_image(img, h, w, ph, pw);
    const size_t latent = (size_t)zc * (ph / f) * (pw / f);
    float *mean = xmalloc(latent * sizeof(float)), *logvar = xmalloc(latent * sizeof(float));
    klvae_status_t st = klvae_encode(m, padded, 1, ph, pw, mean, logvar);
    if (st == KLVAE_OK)
        st = klvae_decode(m, mean, 1, ph / f, pw / f, padded);
    if (st != KLVAE_OK)
        die_status(st, "cannot reconstruct");
    float *out = xmalloc((size_t)3 * h * w * sizeof(float));
    crop_image(padded, ph, pw, h, w, out);
    free(padded);
    free(mean);
    free(logvar);
    return out;
}

static void evaluate_one(evaluator *e, const char *name, const float *img, int h, int w)
{
    float *rec = reconstruct(e->model, img, h, w);
    double psnr = image_psnr(img, rec, h, w), ssim = image_ssim(img, rec, h, w);
    e->sum_psnr += psnr;
    e->sum_ssim += ssim;
    printf("%s  %dx%d  PSNR %.2f dB  SSIM %.4f", name, w, h, psnr, ssim);
    if (e->lpips) {
        double d = 0;
        if (h < 16 || w < 16) {
            die("%s is %dx%d: LPIPS needs at least 16x16 (use --size or leave out --lpips)",
                name, w, h);
        }
        klvae_status_t st = kv_lpips_distance_host(e->lpips, img, rec, 1, h, w, &d);
        if (st != KLVAE_OK)
            die_status(st, "LPIPS");
        e->sum_lpips += d;
        printf("  LPIPS %.4f", d);
    }
    printf("\n");
    fflush(stdout);
    e->count++;
    free(rec);
}

/* The centre size x size of a (3, h, w) image, in place. */
static void centre_crop(float *img, int h, int w, int size)
{
    const int y0 = (h - size) / 2, x0 = (w - size) / 2;
    size_t k = 0;
    for (int ch = 0; ch < 3; ch++)
        for (int y = 0; y < size; y++)
            for (int x = 0; x < size; x++)
                img[k++] = img[((size_t)ch * h + y0 + y) * w + x0 + x];
}

static void evaluate_folder(evaluator *e, const char *dir, int size, long long limit)
{
    kv_dataset *ds = NULL;
    /* The dataset lists the files; they are read whole here, not cropped. */
    klvae_status_t st = kv_dataset_open_folder(dir, size > 0 ? size : 8, 0, &ds);
    if (st != KLVAE_OK)
        die_status(st, "cannot open the images");
    size_t n = kv_dataset_count(ds);
    char **paths = xmalloc(n * sizeof(char *));
    for (size_t i = 0; i < n; i++)
        paths[i] = strdup(kv_dataset_path(ds, i));
    kv_dataset_free(ds); /* its files come in byte order of their paths already */
    int skipped = 0;
    for (size_t i = 0; i < n && (limit <= 0 || e->count < limit); i++) {
        float *img = NULL;
        int h, w;
        st = klvae_image_read_opts(paths[i], e->c->opts, &img, &h, &w);
        if (st != KLVAE_OK) {
            fprintf(stderr, "%s: skipping %s: %s\n", program, paths[i], klvae_last_error());
            skipped++;
            continue;
        }
        if (size > 0 && (h < size || w < size)) {
            fprintf(stderr, "%s: skipping %s: %dx%d is smaller than --size %d\n", program,
                    paths[i], w, h, size);
            skipped++;
        } else {
            if (size > 0) {
                centre_crop(img, h, w, size);
                h = w = size;
            }
            evaluate_one(e, paths[i], img, h, w);
        }
        klvae_free(img);
    }
    for (size_t i = 0; i < n; i++)
        free(paths[i]);
    free(paths);
    if (skipped)
        fprintf(stderr, "%s: skipped %d of %zu files\n", program, skipped, n);
}

static void evaluate_procedural(evaluator *e, int size, long long count)
{
    const int f = klvae_model_downsampling_factor(e->model);
    if (size % f != 0)
        die_usage("--size %d is not a multiple of the downsampling factor %d", size, f);
    /* the same held-out seed as klvae train uses for its evaluation */
    uint64_t seed = kv_options_uint64(e->c->opts, "seed") ^ 0x5EEDE7A1C0FFEEull;
    float *img = xmalloc((size_t)3 * size * size * sizeof(float));
    for (long long i = 0; i < count; i++) {
        char name[48];
        kv_procedural_image(seed, (uint64_t)i, size, img);
        snprintf(name, sizeof name, "procedural#%lld", i);
        evaluate_one(e, name, img, size, size);
    }
    free(img);
}

int cmd_eval(cli *c)
{
    need_args(c, 1);
    evaluator e;
    memset(&e, 0, sizeof e);
    e.c = c;
    const char *data = cli_flag(c, "data");
    int size = (int)cli_flag_int(c, "size", data ? 0 : 256, data ? 0 : 16, 8192);
    long long limit = cli_flag_int(c, "images", data ? 0 : 16, data ? 0 : 1, 1000000000);
    e.model = load_model(c, c->pos[0]);
    const char *lpips = cli_flag(c, "lpips");
    if (lpips) {
        klvae_status_t st = kv_lpips_load(e.model->be, lpips, &e.lpips);
        if (st != KLVAE_OK)
            die_status(st, "cannot load the LPIPS weights");
    }
    if (data)
        evaluate_folder(&e, data, size, limit);
    else
        evaluate_procedural(&e, size, limit);
    int rc = 0;
    if (e.count == 0) {
        fprintf(stderr, "%s: no image could be evaluated\n", program);
        rc = 1;
    } else {
        printf("mean over %d images: PSNR %.2f dB  SSIM %.4f", e.count, e.sum_psnr / e.count,
               e.sum_ssim / e.count);
        if (e.lpips)
            printf("  LPIPS %.4f", e.sum_lpips / e.count);
        printf("\n");
    }
    kv_lpips_free(e.lpips);
    klvae_model_free(e.model);
    return rc;
}
