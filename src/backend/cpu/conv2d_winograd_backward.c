/* conv2d_winograd_backward.c — the weight gradient of a 3x3 "same"
 * convolution through Winograd F(2x2, 3x3), the transpose of the forward in
 * conv2d_winograd.c.
 *
 * The forward computes each 2x2 output tile as y = A^T [sum_ci U ⊙ V] A with
 * U = G g G^T and V = B^T d B. So with dM = A dY A^T per tile,
 *
 *     dU[co][ci] = sum over tiles of dM[co] ⊙ V[ci]      (16 products, one
 *                                                         per frequency xi)
 *     dg[co][ci] = G^T dU[co][ci] G
 *
 * The sums over tiles are 16 matrix products (co x tiles) x (tiles x ci),
 * 4 co ci P multiply-adds for P output pixels against im2col's 9 co ci P,
 * and their inputs are 4 (ci + co) P values against im2col's 9 ci P
 * columns. Images and bands of tile rows run in order and every product
 * sums into dU in that order, so the result depends on the shapes only, not
 * on the number of threads. */
#include <cblas.h>
#include <string.h>

#include "backend/cpu/conv2d_internal.h"

/* Tile rows per band: as many as keep a band's V and dM within this. */
#define KV_WGRAD_BAND_FLOATS ((size_t)1 << 20)
/* Channels per transform task. */
#define KV_WGRAD_TRANSFORM_CHANNELS 16

typedef struct wgrad_job {
    kv_winograd_job in; /* the input transform's view: x, prologue, v, band */
    const float *dy;    /* this image: co x ho x wo */
    float *dm;          /* the band's 16 x co x tiles */
    float *du;          /* 16 x co x ci, summed over images and bands */
    float *dw;          /* co x ci x 3 x 3, += */
    size_t tiles;       /* of the band */
    int in_tasks;       /* the first in_tasks transform tasks are V's */
} wgrad_job;

/* dM[xi][c][t] = (A dY_t A^T)[xi] for output channels [c0, c1): dY_t is
 * tile t's 2x2 block of dy, zero past the last row or column (odd sizes).
 * As in the input transform, the vertical half works on whole rows (rows:
 * 6 of 2 tiles_w floats) and the horizontal half reads them at even and
 * odd offsets, one tile per lane, into the 16 planes. A's rows are (1 0),
 * (1 1), (1 -1), (0 -1). */
KV_VECTOR_CLONES
static void transform_output_grads(const wgrad_job *j, int c0, int c1, float *rows)
{
    const int ho = j->in.ho, wo = j->in.w, tw = j->in.tiles_w, pw = 2 * tw;
    const size_t plane = (size_t)j->in.co * j->tiles;
    float *a = rows, *b = rows + pw, *e[4] = {rows + 2 * pw, rows + 3 * pw, rows + 4 * pw,
                                             rows + 5 * pw};
    for (int c = c0; c < c1; c++) {
        const float *dy = j->dy + (size_t)c * ho * wo;
        for (int tr = j->in.tr0; tr < j->in.tr1; tr++) {
            const int y = 2 * tr;
            memcpy(a, dy + (size_t)y * wo, (size_t)wo * sizeof(float));
            if (y + 1 < ho)
                memcpy(b, dy + (size_t)(y + 1) * wo, (size_t)wo * sizeof(float));
            else
                memset(b, 0, (size_t)wo * sizeof(float));
            for (int q = wo; q < pw; q++)
                a[q] = b[q] = 0.0f;
            for (int q = 0; q < pw; q++) { /* A dY, column by column */
                e[0][q] = a[q];
                e[1][q] = a[q] + b[q];
                e[2][q] = a[q] - b[q];
                e[3][q] = -b[q];
            }
            const size_t t = (size_t)c * j->tiles + (size_t)(tr - j->in.tr0) * tw;
            for (int r = 0; r < 4; r++) { /* (A dY) A^T, tile by tile */
                const float *er = e[r];
                float *o0 = j->dm + (size_t)(4 * r) * plane + t;
                float *o1 = o0 + plane, *o2 = o1 + plane, *o3 = o2 + plane;
                for (int k = 0; k < tw; k++) {
                    const float p = er[2 * k], q = er[2 * k + 1];
                    o0[k] = p;
                    o1[k] = p + q;
                    o2[k] = p - q;
                    o3[k] = -q;
                }
            }
        }
    }
}

/* Task i < in_tasks: V of input channels 16 i ...; the rest: dM of output
 * channels 16 (i - in_tasks) ... */
static void transform_task(void *arg, int task, int thread)
{
    const wgrad_job *j = arg;
    const int per = KV_WGRAD_TRANSFORM_CHANNELS;
    if (task < j->in_tasks) {
        const int c0 = task * per, c1 = KV_MIN(j->in.ci, c0 + per);
        kv_winograd_transform_inputs(&j->in, c0, c1, j->tiles, j->in.cpu->scratch[thread]);
    } else {
        const int c0 = (task - j->in_tasks) * per, c1 = KV_MIN(j->in.co, c0 + per);
        transform_output_grads(j, c0, c1, j->in.cpu->scratch[thread]);
    }
}

/* dU[xi] += dM[xi] (co x tiles) V[xi]^T (tiles x ci) */
static void product_task(void *arg, int xi, int thread)
{
    (void)thread;
    const wgrad_job *j = arg;
    const int ci = j->in.ci, co = j->in.co, tiles = (int)j->tiles;
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, co, ci, tiles, 1.0f,
                j->dm + (size_t)xi * co * j->tiles, tiles, j->in.v + (size_t)xi * ci * j->tiles,
                tiles, 1.0f, j->du + (size_t)xi * co * ci, ci);
}

/* dw[co][c] += G^T dU[co][c] G, G's rows being (1 0 0), (1/2 1/2 1/2),
 * (1/2 -1/2 1/2), (0 0 1). */
static void weight_grad_task(void *arg, int co, int thread)
{
    (void)thread;
    const wgrad_job *j = arg;
    const int ci = j->in.ci;
    const size_t plane = (size_t)j->in.co * ci;
    for (int c = 0; c < ci; c++) {
        const float *u = j->du + (size_t)co * ci + c;
        float s[3][4]; /* G^T dU */
        for (int k = 0; k < 4; k++) {
            const float u0 = u[(size_t)k * plane], u1 = u[(size_t)(4 + k) * plane];
            const float u2 = u[(size_t)(8 + k) * plane], u3 = u[(size_t)(12 + k) * plane];
            s[0][k] = u0 + 0.5f * (u1 + u2);
            s[1][k] = 0.5f * (u1 - u2);
            s[2][k] = 0.5f * (u1 + u2) + u3;
        }
        float *dw = j->dw + ((size_t)co * ci + c) * 9;
        for (int r = 0; r < 3; r++) {
            dw[3 * r] += s[r][0] + 0.5f * (s[r][1] + s[r][2]);
            dw[3 * r + 1] += 0.5f * (s[r][1] - s[r][2]);
            dw[3 * r + 2] += 0.5f * (s[r][1] + s[r][2]) + s[r][3];
        }
    }
}

bool kv_winograd_backward_weight_applies(int ci, int co, int h, int w, int ho, int wo, int kh,
                                         int kw, kv_conv_geometry g)
{
    return kh == 3 && kw == 3 && g.stride == 1 && g.pad_top == 1 && g.pad_left == 1 &&
           g.pad_bottom == 1 && g.pad_right == 1 && ho == h && wo == w &&
           ci >= KV_WINOGRAD_MIN_CHANNELS && co >= KV_WINOGRAD_MIN_CHANNELS;
}

klvae_status_t kv_conv2d_winograd_backward_weight(kv_backend *be, const kv_tensor *x,
                                                  const kv_conv_prologue *prologue,
                                                  const kv_tensor *dy, kv_tensor *dw)
{
    kv_cpu *cpu = kv_cpu_of(be);
    wgrad_job j;
    memset(&j, 0, sizeof j);
    j.in.ci = x->shape[1];
    j.in.co = dy->shape[1];
    j.in.h = x->shape[2];
    j.in.w = x->shape[3];
    j.in.ho = dy->shape[2];
    j.in.pad_top = 1;
    j.in.tiles_w = (j.in.w + 1) / 2;
    j.in.cpu = cpu;
    j.dw = dw->data;
    const int tiles_h = (j.in.ho + 1) / 2;
    const size_t per_row = (size_t)16 * KV_MAX(j.in.ci, j.in.co) * j.in.tiles_w;
    const int band_rows = (int)KV_MAX((size_t)1, KV_MIN((size_t)tiles_h, KV_WGRAD_BAND_FLOATS / per_row));
    const size_t most_tiles = (size_t)band_rows * j.in.tiles_w;
    /* the input transform's padded rows: 8 (2 tiles_w + 2) floats (more
     * than transform_output_grads' 6 (2 tiles_w)) */
    klvae_status_t st = kv_cpu_reserve_scratch(cpu, (size_t)8 * (2 * j.in.tiles_w + 2));
    if (st != KLVAE_OK)
        return st;
    kv_tensor v = {0}, dm = {0}, du = {0};
    st = kv_tensor_alloc(be, 16, j.in.ci, (int)most_tiles, 1, &v);
    if (st == KLVAE_OK)
        st = kv_tensor_alloc(be, 16, j.in.co, (int)most_tiles, 1, &dm);
    if (st == KLVAE_OK)
        st = kv_tensor_alloc(be, 16, j.in.co, j.in.ci, 1, &du);
    if (st == KLVAE_OK) {
        j.in.v = v.data;
        j.dm = dm.data;
        j.du = du.data;
        memset(j.du, 0, kv_tensor_numel(&du) * sizeof(float));
        const int per = KV_WGRAD_TRANSFORM_CHANNELS;
        j.in_tasks = (j.in.ci + per - 1) / per;
        const int transform_tasks = j.in_tasks + (j.in.co + per - 1) / per;
        if (prologue)
            j.in.act = prologue->act;
        for (int n = 0; n < x->shape[0]; n++) {
            j.in.x = (const float *)x->data + (size_t)n * j.in.ci * j.in.h * j.in.w;
            j.dy = (const float *)dy->data + (size_t)n * j.in.co * j.in.ho * j.in.w;
            if (prologue) {
                j.in.scale = (const float *)prologue->scale->data + (size_t)n * j.in.ci;
                j.in.shift = (const float *)prologue->shift->data + (size_t)n * j.in.ci;
            }
            for (j.in.tr0 = 0; j.in.tr0 < tiles_h; j.in.tr0 += band_rows) {
                j.in.tr1 = KV_MIN(tiles_h, j.in.tr0 + band_rows);
                j.tiles = (size_t)(j.in.tr1 - j.in.tr0) * j.in.tiles_w;
                kv_pool_run(cpu->pool, transform_tasks, transform_task, &j);
                kv_pool_run(cpu->pool, 16, product_task, &j);
            }
        }
        kv_pool_run(cpu->pool, j.in.co, weight_grad_task, &j);
    }
    kv_tensor_release(be, &v);
    kv_tensor_release(be, &dm);
    kv_tensor_release(be, &du);
    return st;
}
