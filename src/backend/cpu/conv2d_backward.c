/* conv2d_backward.c — gradients of conv2d (specified in src/backend/backend.h).
 *
 * Data gradient. For stride 1 the transposed convolution is itself a
 * convolution: dx = conv(dy, w') with w'[ci][co][ky][kx] =
 * w[co][ci][kh-1-ky][kw-1-kx] and paddings kh-1-top, kw-1-left, kh-1-bottom,
 * kw-1-right; so it goes through the forward op, Winograd included. Strided
 * layers (the downsampling convs, the discriminator) use col2im: the
 * columns Wt * dy of a band of output rows are scattered back into dx, each
 * task owning a range of input channels so that no two tasks write the same
 * value.
 *
 * Weight gradient. dw += dy * cols^T over bands of output rows, each task
 * owning a range of input channels (so a disjoint block of dw's columns):
 * it applies the prologue once to the input rows the band reads, lays out
 * their columns and multiplies. Bands are visited in order, so every dw
 * value is summed in the same order for any thread count. */
#include <cblas.h>
#include <string.h>

#include "backend/cpu/conv2d_internal.h"

#define KV_BACKWARD_BAND_FLOATS ((size_t)1 << 21)
#define KV_BACKWARD_TASKS 8

/* ---- data gradient, stride 1 ---- */

typedef struct flip_job {
    const float *w;
    float *wt;
    int co, ci, kh, kw;
} flip_job;

static void flip_task(void *arg, int ci, int thread)
{
    (void)thread;
    const flip_job *j = arg;
    const int taps = j->kh * j->kw;
    for (int co = 0; co < j->co; co++) {
        const float *src = j->w + ((size_t)co * j->ci + ci) * taps;
        float *dst = j->wt + ((size_t)ci * j->co + co) * taps;
        for (int t = 0; t < taps; t++)
            dst[t] = src[taps - 1 - t];
    }
}

static klvae_status_t backward_data_stride1(kv_backend *be, const kv_tensor *dy,
                                            const kv_tensor *w, kv_conv_geometry g, kv_tensor *dx)
{
    kv_cpu *cpu = kv_cpu_of(be);
    const int co = w->shape[0], ci = w->shape[1];
    const int kh = w->ndim == 4 ? w->shape[2] : 1, kw = w->ndim == 4 ? w->shape[3] : 1;
    kv_conv_geometry t = {1, kh - 1 - g.pad_top, kw - 1 - g.pad_left, kh - 1 - g.pad_bottom,
                          kw - 1 - g.pad_right};
    /* Winograd reads the flipped kernel straight from w, so its transform is
     * kept for w (frozen weights: LPIPS) instead of for a fresh copy */
    if (w->ndim == 4 && kv_winograd_applies(co, ci, kh, kw, t))
        return kv_conv2d_winograd(cpu, dy, NULL, w, true, NULL, t.pad_top, dx);
    kv_tensor wt;
    klvae_status_t st = kv_tensor_alloc(be, ci, co, kh, kw, &wt);
    if (st != KLVAE_OK)
        return st;
    flip_job fj = {w->data, wt.data, co, ci, kh, kw};
    kv_pool_run(cpu->pool, ci, flip_task, &fj);
    st = kv_cpu_conv2d(be, dy, NULL, &wt, NULL, NULL, t, dx);
    kv_tensor_release(be, &wt);
    return st;
}

/* ---- data gradient, col2im ---- */

typedef struct col2im_job {
    const float *dy, *w;
    float *dx; /* this image */
    int ci, h, w_in, co, kh, kw, ho, wo;
    kv_conv_geometry g;
    int oy0, oy1; /* this band */
    int ci_per_task;
    kv_cpu *cpu;
} col2im_job;

static void col2im_task(void *arg, int task, int thread)
{
    const col2im_job *j = arg;
    const int c0 = task * j->ci_per_task, c1 = KV_MIN(j->ci, c0 + j->ci_per_task);
    if (c0 >= c1)
        return;
    const int taps = j->kh * j->kw, rows = (c1 - c0) * taps;
    const int K = j->ci * taps, cols = (j->oy1 - j->oy0) * j->wo;
    const size_t P = (size_t)j->ho * j->wo;
    float *col = j->cpu->scratch[thread];
    /* col (rows x cols) = W[:, c0 taps .. c1 taps]^T * dy[:, band] */
    cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, rows, cols, j->co, 1.0f,
                j->w + (size_t)c0 * taps, K, j->dy + (size_t)j->oy0 * j->wo, (int)P, 0.0f, col,
                cols);
    const int s = j->g.stride;
    for (int c = c0; c < c1; c++) {
        float *plane = j->dx + (size_t)c * j->h * j->w_in;
        for (int ky = 0; ky < j->kh; ky++)
            for (int kx = 0; kx < j->kw; kx++) {
                const float *src = col + ((size_t)((c - c0) * j->kh + ky) * j->kw + kx) * cols;
                for (int oy = j->oy0; oy < j->oy1; oy++) {
                    int iy = oy * s - j->g.pad_top + ky;
                    if (iy < 0 || iy >= j->h)
                        continue;
                    const float *row = src + (size_t)(oy - j->oy0) * j->wo;
                    float *out = plane + (size_t)iy * j->w_in;
                    for (int ox = 0; ox < j->wo; ox++) {
                        int ix = ox * s - j->g.pad_left + kx;
                        if (ix >= 0 && ix < j->w_in)
                            out[ix] += row[ox];
                    }
                }
            }
    }
}

static klvae_status_t backward_data_col2im(kv_backend *be, const kv_tensor *dy,
                                           const kv_tensor *w, kv_conv_geometry g, kv_tensor *dx)
{
    kv_cpu *cpu = kv_cpu_of(be);
    col2im_job j;
    memset(&j, 0, sizeof j);
    j.w = w->data;
    j.co = w->shape[0];
    j.ci = w->shape[1];
    j.kh = w->shape[2];
    j.kw = w->shape[3];
    j.h = dx->shape[2];
    j.w_in = dx->shape[3];
    j.ho = dy->shape[2];
    j.wo = dy->shape[3];
    j.g = g;
    j.cpu = cpu;
    j.ci_per_task = KV_MAX(1, (j.ci + KV_BACKWARD_TASKS - 1) / KV_BACKWARD_TASKS);
    const int tasks = (j.ci + j.ci_per_task - 1) / j.ci_per_task;
    const size_t rows = (size_t)j.ci_per_task * j.kh * j.kw;
    int band_rows = (int)KV_MAX((size_t)1, KV_BACKWARD_BAND_FLOATS / (rows * (size_t)j.wo));
    band_rows = KV_MIN(band_rows, j.ho);
    klvae_status_t st = kv_cpu_reserve_scratch(cpu, rows * (size_t)band_rows * j.wo);
    if (st != KLVAE_OK)
        return st;
    memset(dx->data, 0, kv_tensor_numel(dx) * sizeof(float));
    for (int n = 0; n < dy->shape[0]; n++) {
        j.dy = (const float *)dy->data + (size_t)n * j.co * j.ho * j.wo;
        j.dx = (float *)dx->data + (size_t)n * j.ci * j.h * j.w_in;
        for (j.oy0 = 0; j.oy0 < j.ho; j.oy0 += band_rows) {
            j.oy1 = KV_MIN(j.ho, j.oy0 + band_rows);
            kv_pool_run(cpu->pool, tasks, col2im_task, &j);
        }
    }
    return KLVAE_OK;
}

klvae_status_t kv_cpu_conv2d_backward_data(kv_backend *be, const kv_tensor *dy, const kv_tensor *w,
                                           kv_conv_geometry g, kv_tensor *dx)
{
    const int kh = w->ndim == 4 ? w->shape[2] : 1, kw = w->ndim == 4 ? w->shape[3] : 1;
    if (g.stride == 1 && g.pad_top <= kh - 1 && g.pad_bottom <= kh - 1 && g.pad_left <= kw - 1 &&
        g.pad_right <= kw - 1)
        return backward_data_stride1(be, dy, w, g, dx);
    kv_tensor w4 = kv_tensor_view4(w, w->shape[0], w->shape[1], kh, kw);
    return backward_data_col2im(be, dy, &w4, g, dx);
}

/* ---- weight gradient ---- */

typedef struct wgrad_job {
    const float *x, *dy; /* this image */
    const float *scale, *shift;
    kv_activation act;
    float *dw;
    int ci, h, w_in, co, kh, kw, ho, wo;
    kv_conv_geometry g;
    int oy0, oy1;
    int ci_per_task;
    kv_cpu *cpu;
} wgrad_job;

/* dst[ox] = src[ox * stride + offset], 0 where that lies outside the row:
 * the zero edges and the valid middle are found first, so the middle is a
 * plain (or strided) copy without a test per element. */
static void copy_row_taps(const float *src, float *dst, int w_in, int wo, int stride, int offset)
{
    int lo = offset >= 0 ? 0 : (-offset + stride - 1) / stride;
    int hi = w_in - 1 - offset < 0 ? 0 : (w_in - 1 - offset) / stride + 1;
    lo = KV_MIN(lo, wo);
    hi = KV_MAX(lo, KV_MIN(hi, wo));
    for (int ox = 0; ox < lo; ox++)
        dst[ox] = 0.0f;
    if (stride == 1) {
        memcpy(dst + lo, src + lo + offset, (size_t)(hi - lo) * sizeof(float));
    } else {
        const float *p = src + (size_t)lo * stride + offset;
        for (int ox = lo; ox < hi; ox++, p += stride)
            dst[ox] = *p;
    }
    for (int ox = hi; ox < wo; ox++)
        dst[ox] = 0.0f;
}

static void wgrad_task(void *arg, int task, int thread)
{
    const wgrad_job *j = arg;
    const int c0 = task * j->ci_per_task, c1 = KV_MIN(j->ci, c0 + j->ci_per_task);
    if (c0 >= c1)
        return;
    const int s = j->g.stride, taps = j->kh * j->kw;
    const int cols = (j->oy1 - j->oy0) * j->wo, K = j->ci * taps;
    /* Input rows this band reads, with the prologue applied once each. */
    const int iy0 = KV_MAX(0, j->oy0 * s - j->g.pad_top);
    const int iy1 = KV_MIN(j->h, (j->oy1 - 1) * s - j->g.pad_top + j->kh);
    const int nrows = KV_MAX(0, iy1 - iy0);
    float *col = j->cpu->scratch[thread];
    float *rows = col + (size_t)(c1 - c0) * taps * cols;
    for (int c = c0; c < c1; c++) {
        const float *plane = j->x + (size_t)c * j->h * j->w_in;
        float *dst = rows + (size_t)(c - c0) * nrows * j->w_in;
        if (j->scale)
            for (int r = 0; r < nrows; r++)
                kv_cpu_scale_shift_act(plane + (size_t)(iy0 + r) * j->w_in,
                                       dst + (size_t)r * j->w_in, (size_t)j->w_in,
                                       j->scale[c], j->shift[c], j->act);
        else
            memcpy(dst, plane + (size_t)iy0 * j->w_in, (size_t)nrows * j->w_in * sizeof(float));
    }
    for (int c = c0; c < c1; c++) {
        const float *src_plane = rows + (size_t)(c - c0) * nrows * j->w_in;
        for (int ky = 0; ky < j->kh; ky++)
            for (int kx = 0; kx < j->kw; kx++) {
                float *dst = col + ((size_t)((c - c0) * j->kh + ky) * j->kw + kx) * cols;
                for (int oy = j->oy0; oy < j->oy1; oy++, dst += j->wo) {
                    int iy = oy * s - j->g.pad_top + ky;
                    if (iy < 0 || iy >= j->h) {
                        memset(dst, 0, (size_t)j->wo * sizeof(float));
                        continue;
                    }
                    const float *src = src_plane + (size_t)(iy - iy0) * j->w_in;
                    copy_row_taps(src, dst, j->w_in, j->wo, s, kx - j->g.pad_left);
                }
            }
    }
    const size_t P = (size_t)j->ho * j->wo;
    /* dw[:, c0 taps .. c1 taps] += dy[:, band] * col^T */
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, j->co, (c1 - c0) * taps, cols, 1.0f,
                j->dy + (size_t)j->oy0 * j->wo, (int)P, col, cols, 1.0f,
                j->dw + (size_t)c0 * taps, K);
}

typedef struct bias_job {
    const float *dy;
    float *db;
    int n, co;
    size_t plane;
} bias_job;

static void bias_task(void *arg, int c, int thread)
{
    (void)thread;
    const bias_job *j = arg;
    double sum = 0.0;
    for (int n = 0; n < j->n; n++) {
        const float *p = j->dy + ((size_t)n * j->co + c) * j->plane;
        for (size_t i = 0; i < j->plane; i++)
            sum += p[i];
    }
    j->db[c] += (float)sum;
}

/* dw += the weight gradient through im2col, per image and band of output
 * rows, one sgemm per group of input channels. */
static klvae_status_t backward_weight_im2col(kv_cpu *cpu, const kv_tensor *x,
                                             const kv_conv_prologue *prologue,
                                             const kv_tensor *dy, kv_conv_geometry g,
                                             kv_tensor *dw)
{
    wgrad_job j;
    memset(&j, 0, sizeof j);
    j.dw = dw->data;
    j.ci = x->shape[1];
    j.h = x->shape[2];
    j.w_in = x->shape[3];
    j.co = dy->shape[1];
    j.kh = dw->ndim == 4 ? dw->shape[2] : 1;
    j.kw = dw->ndim == 4 ? dw->shape[3] : 1;
    j.ho = dy->shape[2];
    j.wo = dy->shape[3];
    j.g = g;
    j.cpu = cpu;
    if (prologue)
        j.act = prologue->act;
    j.ci_per_task = KV_MAX(1, (j.ci + KV_BACKWARD_TASKS - 1) / KV_BACKWARD_TASKS);
    const int tasks = (j.ci + j.ci_per_task - 1) / j.ci_per_task;
    const size_t taps = (size_t)j.kh * j.kw, rows = (size_t)j.ci_per_task * taps;
    int band_rows = (int)KV_MAX((size_t)1, KV_BACKWARD_BAND_FLOATS / (rows * (size_t)j.wo));
    band_rows = KV_MIN(band_rows, j.ho);
    /* columns, plus the band's input rows: (rows - 1) * stride + kh */
    const size_t in_rows = (size_t)(band_rows - 1) * g.stride + (size_t)j.kh;
    klvae_status_t st = kv_cpu_reserve_scratch(
        cpu, rows * (size_t)band_rows * j.wo + (size_t)j.ci_per_task * in_rows * j.w_in);
    if (st != KLVAE_OK)
        return st;
    for (int n = 0; n < x->shape[0]; n++) {
        j.x = (const float *)x->data + (size_t)n * j.ci * j.h * j.w_in;
        j.dy = (const float *)dy->data + (size_t)n * j.co * j.ho * j.wo;
        if (prologue) {
            j.scale = (const float *)prologue->scale->data + (size_t)n * j.ci;
            j.shift = (const float *)prologue->shift->data + (size_t)n * j.ci;
        }
        for (j.oy0 = 0; j.oy0 < j.ho; j.oy0 += band_rows) {
            j.oy1 = KV_MIN(j.ho, j.oy0 + band_rows);
            kv_pool_run(cpu->pool, tasks, wgrad_task, &j);
        }
    }
    return KLVAE_OK;
}

klvae_status_t kv_cpu_conv2d_backward_weight(kv_backend *be, const kv_tensor *x,
                                             const kv_conv_prologue *prologue,
                                             const kv_tensor *dy, kv_conv_geometry g,
                                             kv_tensor *dw, kv_tensor *db)
{
    kv_cpu *cpu = kv_cpu_of(be);
    const int co = dy->shape[1], ho = dy->shape[2], wo = dy->shape[3];
    const bool winograd =
        dw->ndim == 4 && kv_winograd_backward_weight_applies(x->shape[1], co, x->shape[2],
                                                             x->shape[3], ho, wo, dw->shape[2],
                                                             dw->shape[3], g);
    klvae_status_t st = winograd ? kv_conv2d_winograd_backward_weight(be, x, prologue, dy, dw)
                                 : backward_weight_im2col(cpu, x, prologue, dy, g, dw);
    if (st == KLVAE_OK && db && db->data) {
        bias_job bj = {dy->data, db->data, dy->shape[0], co, (size_t)ho * wo};
        kv_pool_run(cpu->pool, co, bias_task, &bj);
    }
    return st;
}
