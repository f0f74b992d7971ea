/* conv2d_winograd.c — 3x3 stride-1 convolutions with one column of zero
 * padding left and right, and zero or one row above and below ("same", and
 * the row bands of streamed execution, whose halo rows replace the padding),
 * by Winograd's minimal filtering F(2x2, 3x3) (Lavin & Gray, 2016).
 *
 * Each 2x2 block of outputs is computed from a 4x4 block of inputs d as
 *     Y = A^T [ (G g G^T) .* (B^T d B) ] A
 * so that a (co, ci) pair costs 16 multiplies per 4 outputs instead of 36:
 * 2.25x fewer than direct convolution, and the 16 elementwise products over
 * channels become 16 matrix products (Co x Ci) x (Ci x tiles), done by
 * sgemm. The transforms only add, subtract and halve, so float32 rounding
 * stays within a small multiple of the direct method's (the op tests hold
 * both to the same float64 reference).
 *
 *   B^T = | 1  0 -1  0 |    G = | 1    0    0   |    A^T = | 1 1  1  0 |
 *         | 0  1  1  0 |        | 1/2  1/2  1/2 |          | 0 1 -1 -1 |
 *         | 0 -1  1  0 |        | 1/2 -1/2  1/2 |
 *         | 0  1  0 -1 |        | 0    0    1   |
 *
 * An image goes in bands of tile rows, one after another, each in two
 * parallel phases: the input transform V (16 x Ci x tiles, shared) split
 * over input channels, then the 16 products and the output transform split
 * into chunks of tile rows (and, for small layers, of output channels), each
 * task with its own M. Chunks of at least KV_WINOGRAD_CHUNK_TILES tiles keep
 * sgemm's packing of the weights amortised; splitting tiles before channels
 * keeps V from being packed more than once. Bands and chunks are sized from
 * the shapes only, so results do not depend on the thread count. */
#include <cblas.h>
#include <string.h>

#include "backend/cpu/conv2d_internal.h"

/* V of one band holds at most this many floats (16 MB). */
#define KV_WINOGRAD_BAND_FLOATS ((size_t)4 << 20)
/* Tiles per task of the second phase (whole tile rows, at least this). */
#define KV_WINOGRAD_CHUNK_TILES 256
/* Output channels per task when a band has too few tiles to split. */
#define KV_WINOGRAD_SPLIT_CHANNELS 64
#define KV_WINOGRAD_MIN_TASKS 4
/* Input channels per task of the first phase. */
#define KV_WINOGRAD_TRANSFORM_CHANNELS 16


bool kv_winograd_applies(int ci, int co, int kh, int kw, kv_conv_geometry g)
{
    return kh == 3 && kw == 3 && g.stride == 1 && (g.pad_top == 0 || g.pad_top == 1) &&
           g.pad_left == 1 && (g.pad_bottom == 0 || g.pad_bottom == 1) && g.pad_right == 1 &&
           ci >= KV_WINOGRAD_MIN_CHANNELS && co >= KV_WINOGRAD_MIN_CHANNELS;
}

typedef struct weight_job {
    const float *w;
    float *u;
    int ci, co; /* of the convolution U is for */
    bool flipped;
    kv_cpu *cpu;
} weight_job;

/* U[xi][co][ci] = (G g G^T)[xi] for one output channel: taps[k][ci] holds
 * tap k of every 3x3 kernel g = w[co][ci] (gathered first so that the
 * transform runs over contiguous input channels and vectorises). */
KV_VECTOR_CLONES
static void transform_weights(const float *taps, int ci, float *u, size_t plane)
{
    const float *g0 = taps, *g1 = taps + ci, *g2 = taps + 2 * ci, *g3 = taps + 3 * ci;
    const float *g4 = taps + 4 * ci, *g5 = taps + 5 * ci, *g6 = taps + 6 * ci;
    const float *g7 = taps + 7 * ci, *g8 = taps + 8 * ci;
    float *u0 = u, *u1 = u + plane, *u2 = u + 2 * plane, *u3 = u + 3 * plane;
    float *u4 = u + 4 * plane, *u5 = u + 5 * plane, *u6 = u + 6 * plane, *u7 = u + 7 * plane;
    float *u8 = u + 8 * plane, *u9 = u + 9 * plane, *u10 = u + 10 * plane;
    float *u11 = u + 11 * plane, *u12 = u + 12 * plane, *u13 = u + 13 * plane;
    float *u14 = u + 14 * plane, *u15 = u + 15 * plane;
    /* The 9 input and 16 output streams never overlap; too many pairs for
     * the vectoriser to check at run time, so say so. */
#pragma GCC ivdep
    for (int c = 0; c < ci; c++) {
        /* G g (4 x 3): g's rows are (g0 g1 g2), (g3 g4 g5), (g6 g7 g8) */
        float t00 = g0[c], t01 = g1[c], t02 = g2[c];
        float t10 = 0.5f * (g0[c] + g3[c] + g6[c]);
        float t11 = 0.5f * (g1[c] + g4[c] + g7[c]);
        float t12 = 0.5f * (g2[c] + g5[c] + g8[c]);
        float t20 = 0.5f * (g0[c] - g3[c] + g6[c]);
        float t21 = 0.5f * (g1[c] - g4[c] + g7[c]);
        float t22 = 0.5f * (g2[c] - g5[c] + g8[c]);
        float t30 = g6[c], t31 = g7[c], t32 = g8[c];
        /* (G g) G^T, row by row */
        u0[c] = t00;
        u1[c] = 0.5f * (t00 + t01 + t02);
        u2[c] = 0.5f * (t00 - t01 + t02);
        u3[c] = t02;
        u4[c] = t10;
        u5[c] = 0.5f * (t10 + t11 + t12);
        u6[c] = 0.5f * (t10 - t11 + t12);
        u7[c] = t12;
        u8[c] = t20;
        u9[c] = 0.5f * (t20 + t21 + t22);
        u10[c] = 0.5f * (t20 - t21 + t22);
        u11[c] = t22;
        u12[c] = t30;
        u13[c] = 0.5f * (t30 + t31 + t32);
        u14[c] = 0.5f * (t30 - t31 + t32);
        u15[c] = t32;
    }
}

/* The taps of output channel co: w[co][c][k], or for the flipped
 * transpose (the backward's kernel, w being (ci, co, 3, 3) for this
 * convolution's ci and co) w[c][co][8 - k]. */
static void weight_transform_task(void *arg, int co, int thread)
{
    const weight_job *j = arg;
    float *taps = j->cpu->scratch[thread];
    if (j->flipped) {
        for (int c = 0; c < j->ci; c++) {
            const float *g = j->w + ((size_t)c * j->co + co) * 9;
            for (int k = 0; k < 9; k++)
                taps[(size_t)k * j->ci + c] = g[8 - k];
        }
    } else {
        const float *w = j->w + (size_t)co * j->ci * 9;
        for (int c = 0; c < j->ci; c++)
            for (int k = 0; k < 9; k++)
                taps[(size_t)k * j->ci + c] = w[(size_t)c * 9 + k];
    }
    transform_weights(taps, j->ci, j->u + (size_t)co * j->ci, (size_t)j->co * j->ci);
}

void kv_winograd_transform_weights(kv_cpu *cpu, const float *w, bool flipped, int ci, int co,
                                   float *u)
{
    weight_job wj = {w, u, ci, co, flipped, cpu};
    kv_pool_run(cpu->pool, co, weight_transform_task, &wj);
}

/* U for the weights w of this convolution (flipped: w is the forward
 * kernel whose flipped transpose this is): kept from an earlier call, or
 * computed, into the cache when it keeps it, else into scratch. */
static const float *winograd_weights(kv_cpu *cpu, const kv_tensor *w, bool flipped, int ci,
                                     int co, float *scratch)
{
    const kv_weight_form form = flipped ? KV_WEIGHT_WINOGRAD_FLIPPED : KV_WEIGHT_WINOGRAD;
    const size_t bytes = kv_tensor_numel(w) * sizeof(float);
    const int shape[4] = {w->shape[0], w->shape[1], 3, 3};
    const float *u = kv_weight_cache_find(&cpu->weights, w->data, bytes, shape, form);
    if (u)
        return u;
    float *dst = kv_weight_cache_store(&cpu->weights, w->data, bytes, shape, form,
                                       (size_t)16 * co * ci * sizeof(float));
    if (!dst)
        dst = scratch;
    kv_winograd_transform_weights(cpu, w->data, flipped, ci, co, dst);
    return dst;
}

/* V[xi][ci][t] = (B^T d B)[xi] for the band's tiles. The vertical half of
 * the transform works on whole (zero-padded) image rows; the horizontal half
 * then reads those rows at even and odd offsets, one tile per lane. */
KV_VECTOR_CLONES
void kv_winograd_transform_inputs(const kv_winograd_job *j, int c0, int c1, size_t tiles,
                                  float *rows)
{
    const float *x = j->x;
    float *v = j->v;
    const int h = j->h, w = j->w, tw = j->tiles_w, tr0 = j->tr0, tr1 = j->tr1;
    const int pw = 2 * tw + 2; /* padded row: one zero on the left, up to two on the right */
    const size_t stride = (size_t)j->ci * tiles;
    float *e0 = rows, *e1 = rows + pw, *e2 = rows + 2 * pw, *e3 = rows + 3 * pw;
    float *d = rows + 4 * pw; /* 4 padded input rows */
    for (int c = c0; c < c1; c++) {
        const float *plane = x + (size_t)c * h * w;
        size_t t = (size_t)c * tiles;
        /* Input rows 2 tr - pad_top ... 2 tr - pad_top + 3 of the tile row (the
         * rows of output rows 2 tr and 2 tr + 1), zero-padded and
         * with the prologue applied; consecutive tile rows share two rows,
         * so each row is prepared once and the buffers rotate. */
        float *in[4] = {d, d + pw, d + 2 * pw, d + 3 * pw};
        int have = 0; /* rows of in[] still valid from the previous tile row */
        for (int tr = tr0; tr < tr1; tr++, t += (size_t)tw) {
            if (have == 2) {
                float *a = in[0], *b = in[1];
                in[0] = in[2];
                in[1] = in[3];
                in[2] = a;
                in[3] = b;
            }
            for (int r = have; r < 4; r++) {
                float *dr = in[r];
                int yy = 2 * tr - j->pad_top + r;
                if (yy < 0 || yy >= h) {
                    memset(dr, 0, (size_t)pw * sizeof(float));
                    continue;
                }
                dr[0] = 0.0f;
                if (j->scale)
                    kv_cpu_scale_shift_act(plane + (size_t)yy * w, dr + 1, (size_t)w,
                                           j->scale[c], j->shift[c], j->act);
                else
                    memcpy(dr + 1, plane + (size_t)yy * w, (size_t)w * sizeof(float));
                for (int q = w + 1; q < pw; q++)
                    dr[q] = 0.0f;
            }
            have = 2;
            const float *d0 = in[0], *d1 = in[1], *d2 = in[2], *d3 = in[3];
            for (int q = 0; q < pw; q++) { /* B^T d, column by column */
                e0[q] = d0[q] - d2[q];
                e1[q] = d1[q] + d2[q];
                e2[q] = d2[q] - d1[q];
                e3[q] = d1[q] - d3[q];
            }
            const float *e[4] = {e0, e1, e2, e3};
            for (int r = 0; r < 4; r++) { /* (B^T d) B, tile by tile */
                const float *er = e[r];
                float *o0 = v + (size_t)(4 * r) * stride + t;
                float *o1 = o0 + stride, *o2 = o1 + stride, *o3 = o2 + stride;
                for (int k = 0; k < tw; k++) {
                    float a = er[2 * k], b = er[2 * k + 1], cc = er[2 * k + 2], dd = er[2 * k + 3];
                    o0[k] = a - cc;
                    o1[k] = b + cc;
                    o2[k] = cc - b;
                    o3[k] = b - dd;
                }
            }
        }
    }
}

/* y = A^T M A + bias for the band's tiles: each tile's 16 products are read
 * across the 16 planes of M (contiguous over tiles), and the 2x2 results are
 * written to two padded output rows, then copied into the image so odd sizes
 * drop their extra row and column. */
KV_VECTOR_CLONES
static void transform_outputs(const kv_winograd_job *j, const float *m, int c0, int c1, int tr0,
                              int tr1, float *rows)
{
    const int h = j->ho, w = j->w, tw = j->tiles_w;
    const size_t tiles = (size_t)(tr1 - tr0) * tw;
    const size_t stride = (size_t)(c1 - c0) * tiles; /* m holds channels [c0, c1) */
    float *top = rows, *bottom = rows + 2 * tw;
    for (int c = c0; c < c1; c++) {
        const float bias = j->bias ? j->bias[c] : 0.0f;
        float *plane = j->y + (size_t)c * h * w;
        size_t t = (size_t)(c - c0) * tiles;
        for (int tr = tr0; tr < tr1; tr++, t += (size_t)tw) {
            const float *mp[16];
            for (int k = 0; k < 16; k++)
                mp[k] = m + (size_t)k * stride + t;
            for (int k = 0; k < tw; k++) {
                /* M A: each row of the 4x4 reduced to 2 columns */
                float s00 = mp[0][k] + mp[1][k] + mp[2][k], s01 = mp[1][k] - mp[2][k] - mp[3][k];
                float s10 = mp[4][k] + mp[5][k] + mp[6][k], s11 = mp[5][k] - mp[6][k] - mp[7][k];
                float s20 = mp[8][k] + mp[9][k] + mp[10][k], s21 = mp[9][k] - mp[10][k] - mp[11][k];
                float s30 = mp[12][k] + mp[13][k] + mp[14][k],
                      s31 = mp[13][k] - mp[14][k] - mp[15][k];
                top[2 * k] = s00 + s10 + s20 + bias;
                top[2 * k + 1] = s01 + s11 + s21 + bias;
                bottom[2 * k] = s10 - s20 - s30 + bias;
                bottom[2 * k + 1] = s11 - s21 - s31 + bias;
            }
            const int y0 = 2 * tr;
            memcpy(plane + (size_t)y0 * w, top, (size_t)w * sizeof(float));
            if (y0 + 1 < h)
                memcpy(plane + (size_t)(y0 + 1) * w, bottom, (size_t)w * sizeof(float));
        }
    }
}

static size_t band_tiles(const kv_winograd_job *j)
{
    return (size_t)(j->tr1 - j->tr0) * (size_t)j->tiles_w;
}

/* Phase 1: V for input channels [16 task, 16 task + 16). */
static void input_task(void *arg, int task, int thread)
{
    const kv_winograd_job *j = arg;
    int c0 = task * KV_WINOGRAD_TRANSFORM_CHANNELS;
    int c1 = KV_MIN(j->ci, c0 + KV_WINOGRAD_TRANSFORM_CHANNELS);
    kv_winograd_transform_inputs(j, c0, c1, band_tiles(j), j->cpu->scratch[thread]);
}

/* Phase 2: the 16 products and the output transform for one chunk of tile
 * rows and one range of output channels. */
static void output_task(void *arg, int task, int thread)
{
    const kv_winograd_job *j = arg;
    const int chunk = task / j->splits, split = task % j->splits;
    const int c0 = split * j->co_per_split, c1 = KV_MIN(j->co, c0 + j->co_per_split);
    const int tr0 = j->tr0 + chunk * j->rows_per_chunk;
    const int tr1 = KV_MIN(j->tr1, tr0 + j->rows_per_chunk);
    if (c0 >= c1 || tr0 >= tr1)
        return;
    const int rows = c1 - c0;
    const size_t tiles = band_tiles(j), chunk_tiles = (size_t)(tr1 - tr0) * j->tiles_w;
    const size_t t0 = (size_t)(tr0 - j->tr0) * j->tiles_w;
    float *m = j->cpu->scratch[thread];
    float *row_buffers = m + (size_t)16 * rows * chunk_tiles;
    const size_t u_plane = (size_t)j->co * j->ci;
    for (int xi = 0; xi < 16; xi++)
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, rows, (int)chunk_tiles, j->ci, 1.0f,
                    j->u + (size_t)xi * u_plane + (size_t)c0 * j->ci, j->ci,
                    j->v + (size_t)xi * j->ci * tiles + t0, (int)tiles, 0.0f,
                    m + (size_t)xi * rows * chunk_tiles, (int)chunk_tiles);
    transform_outputs(j, m, c0, c1, tr0, tr1, row_buffers);
}

klvae_status_t kv_conv2d_winograd(kv_cpu *cpu, const kv_tensor *x,
                                  const kv_conv_prologue *prologue, const kv_tensor *w,
                                  bool flipped, const kv_tensor *b, int pad_top, kv_tensor *y)
{
    if (cpu->bf16)
        return kv_conv2d_winograd_bf16(cpu, x, prologue, w, flipped, b, pad_top, y);
    kv_winograd_job j;
    memset(&j, 0, sizeof j);
    j.bias = b ? b->data : NULL;
    j.ci = x->shape[1];
    j.co = flipped ? w->shape[1] : w->shape[0];
    j.h = x->shape[2];
    j.w = x->shape[3];
    j.ho = y->shape[2];
    j.pad_top = pad_top;
    j.tiles_w = (j.w + 1) / 2;
    j.cpu = cpu;
    const int tiles_h = (j.ho + 1) / 2;
    /* Equal bands of at most KV_WINOGRAD_BAND_FLOATS of V. */
    size_t max_rows = KV_WINOGRAD_BAND_FLOATS / ((size_t)16 * j.ci * j.tiles_w);
    if (max_rows < 1)
        max_rows = 1;
    int bands = (int)(((size_t)tiles_h + max_rows - 1) / max_rows);
    j.tile_rows_per_band = (tiles_h + bands - 1) / bands;
    const size_t most_tiles = (size_t)j.tile_rows_per_band * j.tiles_w;
    j.rows_per_chunk = KV_MAX(1, (KV_WINOGRAD_CHUNK_TILES + j.tiles_w - 1) / j.tiles_w);
    j.rows_per_chunk = KV_MIN(j.rows_per_chunk, j.tile_rows_per_band);
    j.chunks = (j.tile_rows_per_band + j.rows_per_chunk - 1) / j.rows_per_chunk;
    j.rows_per_chunk = (j.tile_rows_per_band + j.chunks - 1) / j.chunks; /* equal chunks */
    j.splits = 1;
    while (j.chunks * j.splits < KV_WINOGRAD_MIN_TASKS &&
           j.co / (2 * j.splits) >= KV_WINOGRAD_SPLIT_CHANNELS)
        j.splits *= 2;
    j.co_per_split = (j.co + j.splits - 1) / j.splits;
    const size_t chunk_tiles = (size_t)j.rows_per_chunk * j.tiles_w;
    const size_t row_floats = (size_t)8 * (2 * (size_t)j.tiles_w + 2);

    klvae_status_t st = kv_cpu_reserve_scratch(
        cpu, KV_MAX((size_t)16 * j.co_per_split * chunk_tiles + row_floats, (size_t)9 * j.ci));
    if (st == KLVAE_OK)
        st = kv_cpu_reserve_shared(cpu, (size_t)16 * j.co * j.ci + (size_t)16 * j.ci * most_tiles);
    if (st != KLVAE_OK)
        return st;
    j.v = cpu->shared + (size_t)16 * j.co * j.ci;
    j.u = winograd_weights(cpu, w, flipped, j.ci, j.co, cpu->shared);
    const int input_tasks = (j.ci + KV_WINOGRAD_TRANSFORM_CHANNELS - 1) / KV_WINOGRAD_TRANSFORM_CHANNELS;
    for (int n = 0; n < x->shape[0]; n++) {
        j.x = (const float *)x->data + (size_t)n * j.ci * j.h * j.w;
        j.y = (float *)y->data + (size_t)n * j.co * j.ho * j.w;
        if (prologue) {
            j.scale = (const float *)prologue->scale->data + (size_t)n * j.ci;
            j.shift = (const float *)prologue->shift->data + (size_t)n * j.ci;
            j.act = prologue->act;
        }
        for (j.tr0 = 0; j.tr0 < tiles_h; j.tr0 += j.tile_rows_per_band) {
            j.tr1 = KV_MIN(tiles_h, j.tr0 + j.tile_rows_per_band);
            kv_pool_run(cpu->pool, input_tasks, input_task, &j);
            kv_pool_run(cpu->pool, j.chunks * j.splits, output_task, &j);
        }
    }
    return KLVAE_OK;
}
