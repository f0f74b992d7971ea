/* common.c — error exits, flags and small helpers of the klvae tool. */
#include <errno.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "cli/cli.h"

const char *const program = "klvae";
char cli_rank_text[32] = "";
void (*cli_failure_exit)(int code) = NULL;

static void leave(int code) __attribute__((noreturn));
static void leave(int code)
{
    if (cli_failure_exit)
        cli_failure_exit(code);
    exit(code);
}

void die_usage(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    fprintf(stderr, "%s%s: ", program, cli_rank_text);
    vfprintf(stderr, fmt, ap);
    fprintf(stderr, "\nTry '%s --help'.\n", program);
    va_end(ap);
    leave(EXIT_USAGE);
}

void die_status(klvae_status_t st, const char *what)
{
    fprintf(stderr, "%s%s: %s: %s (%s)\n", program, cli_rank_text, what, klvae_last_error(),
            klvae_status_string(st));
    leave(1);
}

void die(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    fprintf(stderr, "%s%s: ", program, cli_rank_text);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
    leave(1);
}

void note(const cli *c, const char *fmt, ...)
{
    if (c->quiet)
        return;
    va_list ap;
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
}

void *xmalloc(size_t n)
{
    void *p = malloc(n ? n : 1);
    if (!p)
        die("out of memory (%zu bytes)", n);
    return p;
}

void need_args(const cli *c, int n)
{
    if (c->npos != n) {
        fprintf(stderr, "%s %s: expected %d argument%s, got %d\nTry '%s %s --help'.\n", program,
                c->command, n, n == 1 ? "" : "s", c->npos, program, c->command);
        exit(EXIT_USAGE);
    }
}

klvae_model_t *load_model(const cli *c, const char *path)
{
    klvae_model_t *m = NULL;
    double t0 = kv_now_seconds();
    klvae_status_t st = klvae_model_load(path, c->opts, &m);
    if (st != KLVAE_OK)
        die_status(st, "cannot load the model");
    note(c, "loaded %s (%.1f M parameters, %s backend) in %.2f s\n", path,
         (double)klvae_model_parameter_count(m) / 1e6, klvae_model_backend(m), kv_now_seconds() - t0);
    return m;
}

const char *cli_flag(const cli *c, const char *name)
{
    for (int i = c->nflags - 1; i >= 0; i--) /* the last one given wins */
        if (strcmp(c->flag_name[i], name) == 0)
            return c->flag_value[i];
    return NULL;
}

long long cli_flag_int(const cli *c, const char *name, long long def, long long lo, long long hi)
{
    const char *text = cli_flag(c, name);
    if (!text)
        return def;
    char *end;
    errno = 0;
    long long v = strtoll(text, &end, 10);
    if (errno || end == text || *end || v < lo || v > hi)
        die_usage("--%s needs an integer from %lld to %lld, not '%s'", name, lo, hi, text);
    return v;
}

double cli_flag_double(const cli *c, const char *name, double def, double lo, double hi)
{
    const char *text = cli_flag(c, name);
    if (!text)
        return def;
    char *end;
    errno = 0;
    double v = strtod(text, &end);
    if (errno || end == text || *end || !isfinite(v) || v < lo || v > hi)
        die_usage("--%s needs a number from %g to %g, not '%s'", name, lo, hi, text);
    return v;
}

klvae_status_t write_image_grid(const char *path, const float *images, int rows, int cols, int h,
                                int w)
{
    const int gap = 2;
    const int gh = rows * h + (rows - 1) * gap, gw = cols * w + (cols - 1) * gap;
    const size_t plane = (size_t)gh * gw;
    float *grid = xmalloc(3 * plane * sizeof(float));
    for (size_t i = 0; i < 3 * plane; i++)
        grid[i] = 1.0f;
    for (int r = 0; r < rows; r++)
        for (int q = 0; q < cols; q++) {
            const float *img = images + ((size_t)r * cols + q) * 3 * h * w;
            for (int ch = 0; ch < 3; ch++)
                for (int y = 0; y < h; y++)
                    memcpy(grid + ch * plane + (size_t)(r * (h + gap) + y) * gw + q * (w + gap),
                           img + ((size_t)ch * h + y) * w, (size_t)w * sizeof(float));
        }
    klvae_status_t st = klvae_image_write_png(path, grid, gh, gw);
    free(grid);
    return st;
}

/* The 8-bit value a PNG would store for v in [-1, 1], back on [0, 1]. */
static double quantize(float v)
{
    double x = v * 0.5 + 0.5;
    x = x < 0 ? 0 : x > 1 ? 1 : x;
    if (x != x)
        x = 0;
    return nearbyint(x * 255.0) / 255.0;
}

double image_psnr(const float *a, const float *b, int h, int w)
{
    const size_t n = (size_t)3 * h * w;
    double se = 0;
    for (size_t i = 0; i < n; i++) {
        double d = quantize(a[i]) - quantize(b[i]);
        se += d * d;
    }
    double mse = se / (double)n;
    return mse > 0 ? 10.0 * log10(1.0 / mse) : 99.0;
}

/* Separable Gaussian blur (window 11, sigma 1.5) of an h x w plane, with
 * the window cut at the border and renormalised, so that small images
 * still get a value (the reference's 'valid' window needs 11 x 11). */
static void gaussian_blur(const double *in, double *tmp, double *out, int h, int w)
{
    double k[11], ksum = 0;
    for (int i = 0; i < 11; i++)
        ksum += k[i] = exp(-(double)((i - 5) * (i - 5)) / (2 * 1.5 * 1.5));
    for (int i = 0; i < 11; i++)
        k[i] /= ksum;
    for (int y = 0; y < h; y++)
        for (int x = 0; x < w; x++) {
            double s = 0, ws = 0;
            for (int i = -5; i <= 5; i++)
                if (x + i >= 0 && x + i < w) {
                    s += k[i + 5] * in[(size_t)y * w + x + i];
                    ws += k[i + 5];
                }
            tmp[(size_t)y * w + x] = s / ws;
        }
    for (int y = 0; y < h; y++)
        for (int x = 0; x < w; x++) {
            double s = 0, ws = 0;
            for (int i = -5; i <= 5; i++)
                if (y + i >= 0 && y + i < h) {
                    s += k[i + 5] * tmp[(size_t)(y + i) * w + x];
                    ws += k[i + 5];
                }
            out[(size_t)y * w + x] = s / ws;
        }
}

double image_ssim(const float *a, const float *b, int h, int w)
{
    const size_t n = (size_t)h * w;
    const double c1 = 0.01 * 0.01, c2 = 0.03 * 0.03;
    double *buf = xmalloc(8 * n * sizeof(double));
    double *x = buf, *y = buf + n, *prod = buf + 2 * n, *tmp = buf + 3 * n;
    double *mx = buf + 4 * n, *my = buf + 5 * n, *sxy = buf + 6 * n, *sq = buf + 7 * n;
    double total = 0;
    for (int ch = 0; ch < 3; ch++) {
        for (size_t i = 0; i < n; i++) {
            x[i] = quantize(a[ch * n + i]);
            y[i] = quantize(b[ch * n + i]);
        }
        gaussian_blur(x, tmp, mx, h, w);
        gaussian_blur(y, tmp, my, h, w);
        for (size_t i = 0; i < n; i++)
            prod[i] = x[i] * y[i];
        gaussian_blur(prod, tmp, sxy, h, w);
        /* E[x^2] + E[y^2] in one blur: only their sum enters the formula */
        for (size_t i = 0; i < n; i++)
            prod[i] = x[i] * x[i] + y[i] * y[i];
        gaussian_blur(prod, tmp, sq, h, w);
        /* Averaged over the pixels whose window lies inside the image, as
         * skimage (gaussian_weights, sigma 1.5) and pytorch-msssim do; an
         * image under 11 pixels on a side uses every pixel. */
        const int m = h >= 11 && w >= 11 ? 5 : 0;
        double s = 0;
        for (int yy = m; yy < h - m; yy++)
            for (int xx = m; xx < w - m; xx++) {
                size_t i = (size_t)yy * w + xx;
                double cov = sxy[i] - mx[i] * my[i];
                double var_sum = sq[i] - mx[i] * mx[i] - my[i] * my[i];
                s += (2 * mx[i] * my[i] + c1) * (2 * cov + c2) /
                     ((mx[i] * mx[i] + my[i] * my[i] + c1) * (var_sum + c2));
            }
        total += s / ((double)(h - 2 * m) * (w - 2 * m));
    }
    free(buf);
    return total / 3.0;
}

/* Pads a (3, h, w) image to (3, ph, pw) by repeating its last row and
 * column: edge values keep the reconstruction of the border natural. */
float *pad_image(const float *img, int h, int w, int ph, int pw)
{
    float *out = xmalloc((size_t)3 * ph * pw * sizeof(float));
    for (int c = 0; c < 3; c++)
        for (int y = 0; y < ph; y++) {
            const float *src = img + ((size_t)c * h + (y < h ? y : h - 1)) * w;
            float *dst = out + ((size_t)c * ph + y) * pw;
            memcpy(dst, src, (size_t)w * sizeof(float));
            for (int x = w; x < pw; x++)
                dst[x] = src[w - 1];
        }
    return out;
}

/* Copies the top-left (3, h, w) corner of a (3, ph, pw) image. */
void crop_image(const float *img, int ph, int pw, int h, int w, float *out)
{
    for (int c = 0; c < 3; c++)
        for (int y = 0; y < h; y++)
            memcpy(out + ((size_t)c * h + y) * w, img + ((size_t)c * ph + y) * pw,
                   (size_t)w * sizeof(float));
}

int round_up(int v, int f)
{
    return (v + f - 1) / f * f;
}
