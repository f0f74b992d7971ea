/* conv2d_winograd_bf16.c — Winograd F(2x2, 3x3) with bf16 products
 * (precision=bf16 on a CPU with AVX512-BF16).
 *
 * The same algorithm as conv2d_winograd.c: U = G g G^T and V = B^T d B in
 * float32, then the 16 products M[xi] = U[xi] V[xi] over channels, then
 * Y = A^T M A. Here U and V are rounded to bf16 and packed for the bf16
 * micro-kernel (bf16_gemm.h), and M is summed in float32:
 *
 *   - U is packed once per weight tensor, and kept (weight_cache.h);
 *   - the input transform writes V straight into the kernel's layout,
 *     two channels (a pair of k) at a time, so V is never packed again:
 *     for each xi, blocks of 48 tiles, inside a block pair p of tile j at
 *     [p * 48 + j];
 *   - the second phase works block by block: for 8 output channels and 48
 *     tiles it runs the 16 products into a small M (24 KB, in L1) and
 *     transforms it to outputs at once, so M never goes to memory.
 *
 * Bands of tile rows, chunks of blocks and splits of output channels are
 * sized from the shapes only, and every output is summed in one kernel in a
 * fixed order, so results do not depend on the number of threads. */
#include <stdlib.h>
#include <string.h>

#include "backend/cpu/bf16_gemm.h"
#include "backend/cpu/conv2d_internal.h"

/* V of one band holds at most this many words (16 MB). */
#define KV_WINOGRAD_BF16_BAND_WORDS ((size_t)4 << 20)
/* 48-tile blocks per task of the second phase. */
#define KV_WINOGRAD_BF16_CHUNK_BLOCKS 6
/* Output channels per task when a band has too few blocks (a multiple of 8). */
#define KV_WINOGRAD_BF16_SPLIT_CHANNELS 64
#define KV_WINOGRAD_BF16_MIN_TASKS 4
/* Input channels per task of the first phase (an even number). */
#define KV_WINOGRAD_BF16_TRANSFORM_CHANNELS 16
/* Tiles the first phase transforms at a time, before packing them. */
#define KV_WINOGRAD_BF16_STEP_TILES 1024

typedef struct bf16_job {
    kv_winograd_job in; /* image, prologue, sizes and band (tr0, tr1) */
    const uint32_t *u;  /* 16 packed A (co x ci), u_plane words apart */
    size_t u_plane;
    uint32_t *v; /* 16 packed B (ci x band tiles), v_plane words apart */
    size_t v_plane;
    int pairs, blocks; /* pairs of input channels; 48-tile blocks of the band */
    int step_rows;     /* tile rows per step of the first phase */
    int blocks_per_chunk, chunks, co_per_split, splits;
    kv_cpu *cpu;
} bf16_job;

/* ---- weights ---- */

typedef struct pack_u_job {
    const float *u; /* 16 x co x ci floats */
    uint32_t *out;
    size_t plane;
    int co, ci;
} pack_u_job;

static void pack_u_task(void *arg, int xi, int thread)
{
    (void)thread;
    const pack_u_job *j = arg;
    kv_bf16_pack_a(j->u + (size_t)xi * j->co * j->ci, (size_t)j->ci, 1, j->co, j->ci,
                   j->out + (size_t)xi * j->plane);
}

/* The packed U of this convolution's kernel (w, or its flipped transpose),
 * kept from an earlier call or made now into the cache or into out. */
static klvae_status_t packed_weights(kv_cpu *cpu, const kv_tensor *w, bool flipped, int ci,
                                     int co, uint32_t *out, const uint32_t **u)
{
    const kv_weight_form form = flipped ? KV_WEIGHT_WINOGRAD_BF16_FLIPPED : KV_WEIGHT_WINOGRAD_BF16;
    const size_t bytes = kv_tensor_numel(w) * sizeof(float);
    const int shape[4] = {w->shape[0], w->shape[1], 3, 3};
    const size_t plane = kv_bf16_a_words(co, ci);
    *u = kv_weight_cache_find(&cpu->weights, w->data, bytes, shape, form);
    if (*u)
        return KLVAE_OK;
    uint32_t *dst = kv_weight_cache_store(&cpu->weights, w->data, bytes, shape, form,
                                          16 * plane * sizeof(uint32_t));
    float *u32 = NULL;
    if (posix_memalign((void **)&u32, 64, (size_t)16 * co * ci * sizeof(float)) != 0)
        return kv_error(KLVAE_ERR_OUT_OF_MEMORY,
                        "out of memory transforming the weights of a %d x %d convolution", co, ci);
    kv_winograd_transform_weights(cpu, w->data, flipped, ci, co, u32);
    pack_u_job pj = {u32, dst ? dst : out, plane, co, ci};
    kv_pool_run(cpu->pool, 16, pack_u_task, &pj);
    free(u32);
    *u = pj.out;
    return KLVAE_OK;
}

/* ---- phase 1: V ---- */

/* Packs the float32 V of one or two channels (lo, hi; each 16 planes of
 * tiles values, plane floats apart) for the band's tiles [t0, t0 + tiles)
 * as pair p, block by block. */
static void pack_tiles(const bf16_job *j, const float *lo, const float *hi, size_t plane, int p,
                       size_t t0, size_t tiles)
{
    for (size_t done = 0; done < tiles;) {
        const size_t t = t0 + done, block = t / KV_BF16_NR, lane = t % KV_BF16_NR;
        const int count = (int)KV_MIN(tiles - done, KV_BF16_NR - lane);
        uint32_t *dst = j->v + block * (size_t)j->pairs * KV_BF16_NR +
                        (size_t)p * KV_BF16_NR + lane;
        for (int xi = 0; xi < 16; xi++)
            kv_bf16_pack_pairs(lo + xi * plane + done, hi ? hi + xi * plane + done : NULL, count,
                               dst + (size_t)xi * j->v_plane);
        done += (size_t)count;
    }
}

/* Input channels [16 task, 16 task + 16), two at a time, a few tile rows
 * at a time: the float32 transform of conv2d_winograd.c into scratch, then
 * packed into V. */
static void input_task(void *arg, int task, int thread)
{
    const bf16_job *j = arg;
    const kv_winograd_job *in = &j->in;
    const int tw = in->tiles_w;
    float *tmp = j->cpu->scratch[thread];
    float *rows = tmp + (size_t)16 * 2 * j->step_rows * tw;
    const int c_end = KV_MIN(in->ci, (task + 1) * KV_WINOGRAD_BF16_TRANSFORM_CHANNELS);
    for (int c = task * KV_WINOGRAD_BF16_TRANSFORM_CHANNELS; c < c_end; c += 2) {
        const int count = KV_MIN(2, in->ci - c);
        kv_winograd_job one = *in;
        one.x = in->x + (size_t)c * in->h * in->w;
        one.scale = in->scale ? in->scale + c : NULL;
        one.shift = in->shift ? in->shift + c : NULL;
        one.ci = count;
        one.v = tmp;
        for (int tr = in->tr0; tr < in->tr1; tr += j->step_rows) {
            one.tr0 = tr;
            one.tr1 = KV_MIN(in->tr1, tr + j->step_rows);
            const size_t tiles = (size_t)(one.tr1 - one.tr0) * tw;
            kv_winograd_transform_inputs(&one, 0, count, tiles, rows);
            pack_tiles(j, tmp, count == 2 ? tmp + tiles : NULL, (size_t)count * tiles, c / 2,
                       (size_t)(tr - in->tr0) * tw, tiles);
        }
    }
}

/* ---- phase 2: products and outputs ---- */

/* y for rows channels from c0 and the band's tiles [t0, t0 + count) from
 * M (16 planes of MR x NR): A^T M A + bias, scattered as 2x2 blocks. */
static void output_block(const bf16_job *j, const float *m, int c0, int rows, size_t t0,
                         int count)
{
    const kv_winograd_job *in = &j->in;
    const int h = in->ho, w = in->w, tw = in->tiles_w; /* h: output rows */
    float o[4][KV_BF16_NR];
    for (int r = 0; r < rows; r++) {
        const int c = c0 + r;
        const float bias = in->bias ? in->bias[c] : 0.0f;
        const float *mp[16];
        for (int xi = 0; xi < 16; xi++)
            mp[xi] = m + ((size_t)xi * KV_BF16_MR + r) * KV_BF16_NR;
        for (int k = 0; k < count; k++) {
            float s00 = mp[0][k] + mp[1][k] + mp[2][k], s01 = mp[1][k] - mp[2][k] - mp[3][k];
            float s10 = mp[4][k] + mp[5][k] + mp[6][k], s11 = mp[5][k] - mp[6][k] - mp[7][k];
            float s20 = mp[8][k] + mp[9][k] + mp[10][k], s21 = mp[9][k] - mp[10][k] - mp[11][k];
            float s30 = mp[12][k] + mp[13][k] + mp[14][k], s31 = mp[13][k] - mp[14][k] - mp[15][k];
            o[0][k] = s00 + s10 + s20 + bias;
            o[1][k] = s01 + s11 + s21 + bias;
            o[2][k] = s10 - s20 - s30 + bias;
            o[3][k] = s11 - s21 - s31 + bias;
        }
        float *plane = in->y + (size_t)c * h * w;
        for (int k = 0; k < count;) { /* one tile row's run of tiles at a time */
            const size_t t = t0 + (size_t)k;
            const int tr = in->tr0 + (int)(t / (size_t)tw), tx = (int)(t % (size_t)tw);
            const int run = KV_MIN(count - k, tw - tx);
            const int y0 = 2 * tr, x0 = 2 * tx;
            const int full = KV_MIN(run, (w - x0) / 2); /* tiles with both columns inside */
            for (int half = 0; half < 2 && y0 + half < h; half++) {
                float *row = plane + (size_t)(y0 + half) * w + x0;
                const float *left = o[2 * half] + k, *right = o[2 * half + 1] + k;
                for (int i = 0; i < full; i++) {
                    row[2 * i] = left[i];
                    row[2 * i + 1] = right[i];
                }
                if (full < run) /* odd width: the last tile's left column */
                    row[2 * full] = left[full];
            }
            k += run;
        }
    }
}

static void output_task(void *arg, int task, int thread)
{
    const bf16_job *j = arg;
    const int chunk = task / j->splits, split = task % j->splits;
    const int c_begin = split * j->co_per_split, c_end = KV_MIN(j->in.co, c_begin + j->co_per_split);
    const int b_begin = chunk * j->blocks_per_chunk;
    const int b_end = KV_MIN(j->blocks, b_begin + j->blocks_per_chunk);
    const size_t band_tiles = (size_t)(j->in.tr1 - j->in.tr0) * j->in.tiles_w;
    float *m = j->cpu->scratch[thread];
    for (int b = b_begin; b < b_end; b++) {
        const size_t t0 = (size_t)b * KV_BF16_NR;
        const int cols = (int)KV_MIN((size_t)KV_BF16_NR, band_tiles - t0);
        const uint32_t *v = j->v + (size_t)b * j->pairs * KV_BF16_NR;
        for (int c0 = c_begin; c0 < c_end; c0 += KV_BF16_MR) {
            const uint32_t *u = j->u + (size_t)c0 * j->pairs;
            for (int xi = 0; xi < 16; xi++)
                kv_bf16_kernel(j->pairs, u + (size_t)xi * j->u_plane, v + (size_t)xi * j->v_plane,
                               m + (size_t)xi * KV_BF16_MR * KV_BF16_NR, KV_BF16_NR, KV_BF16_MR,
                               cols, false);
            output_block(j, m, c0, KV_MIN(KV_BF16_MR, c_end - c0), t0, cols);
        }
    }
}

/* ---- the convolution ---- */

/* Bands, chunks, splits and scratch for an image of x and co outputs. */
static klvae_status_t plan(kv_cpu *cpu, const kv_tensor *x, const kv_tensor *y, int pad_top,
                           int co, bf16_job *j, int *band_rows, size_t *most_tiles)
{
    kv_winograd_job *in = &j->in;
    in->ci = x->shape[1];
    in->co = co;
    in->h = x->shape[2];
    in->w = x->shape[3];
    in->ho = y->shape[2];
    in->pad_top = pad_top;
    in->tiles_w = (in->w + 1) / 2;
    const int tiles_h = (in->ho + 1) / 2, tw = in->tiles_w;
    j->pairs = kv_bf16_pairs(in->ci);
    size_t max_rows = KV_WINOGRAD_BF16_BAND_WORDS / ((size_t)16 * j->pairs * tw);
    max_rows = KV_MAX((size_t)1, max_rows);
    const int bands = (int)(((size_t)tiles_h + max_rows - 1) / max_rows);
    *band_rows = (tiles_h + bands - 1) / bands;
    *most_tiles = (size_t)*band_rows * tw;
    const int most_blocks = (int)((*most_tiles + KV_BF16_NR - 1) / KV_BF16_NR);
    j->blocks_per_chunk = KV_MIN(KV_WINOGRAD_BF16_CHUNK_BLOCKS, most_blocks);
    j->chunks = (most_blocks + j->blocks_per_chunk - 1) / j->blocks_per_chunk;
    j->splits = 1;
    while (j->chunks * j->splits < KV_WINOGRAD_BF16_MIN_TASKS &&
           co / (2 * j->splits) >= KV_WINOGRAD_BF16_SPLIT_CHANNELS)
        j->splits *= 2;
    j->co_per_split = (co + j->splits - 1) / j->splits;
    j->co_per_split = (j->co_per_split + KV_BF16_MR - 1) / KV_BF16_MR * KV_BF16_MR;
    j->step_rows = KV_MAX(1, KV_WINOGRAD_BF16_STEP_TILES / tw);
    j->u_plane = kv_bf16_a_words(co, in->ci);
    j->v_plane = kv_bf16_b_words(in->ci, (int)*most_tiles);
    j->cpu = cpu;
    const size_t phase1 = (size_t)16 * 2 * j->step_rows * tw + (size_t)8 * (2 * tw + 2);
    const size_t phase2 = (size_t)16 * KV_BF16_MR * KV_BF16_NR;
    klvae_status_t st = kv_cpu_reserve_scratch(cpu, KV_MAX(KV_MAX(phase1, phase2), (size_t)9 * KV_MAX(in->ci, co)));
    if (st == KLVAE_OK)
        st = kv_cpu_reserve_shared(cpu, 16 * j->u_plane + 16 * j->v_plane);
    return st;
}

klvae_status_t kv_conv2d_winograd_bf16(kv_cpu *cpu, const kv_tensor *x,
                                       const kv_conv_prologue *prologue, const kv_tensor *w,
                                       bool flipped, const kv_tensor *b, int pad_top,
                                       kv_tensor *y)
{
    bf16_job j;
    memset(&j, 0, sizeof j);
    int band_rows;
    size_t most_tiles;
    const int co = flipped ? w->shape[1] : w->shape[0];
    klvae_status_t st = plan(cpu, x, y, pad_top, co, &j, &band_rows, &most_tiles);
    if (st != KLVAE_OK)
        return st;
    uint32_t *shared = (uint32_t *)cpu->shared;
    j.v = shared + 16 * j.u_plane;
    st = packed_weights(cpu, w, flipped, j.in.ci, co, shared, &j.u);
    if (st != KLVAE_OK)
        return st;
    kv_winograd_job *in = &j.in;
    in->bias = b ? b->data : NULL;
    in->cpu = cpu;
    const int tiles_h = (in->ho + 1) / 2;
    const int input_tasks = (in->ci + KV_WINOGRAD_BF16_TRANSFORM_CHANNELS - 1) /
                            KV_WINOGRAD_BF16_TRANSFORM_CHANNELS;
    for (int n = 0; n < x->shape[0]; n++) {
        in->x = (const float *)x->data + (size_t)n * in->ci * in->h * in->w;
        in->y = (float *)y->data + (size_t)n * co * in->ho * in->w;
        if (prologue) {
            in->scale = (const float *)prologue->scale->data + (size_t)n * in->ci;
            in->shift = (const float *)prologue->shift->data + (size_t)n * in->ci;
            in->act = prologue->act;
        }
        for (in->tr0 = 0; in->tr0 < tiles_h; in->tr0 += band_rows) {
            in->tr1 = KV_MIN(tiles_h, in->tr0 + band_rows);
            const size_t tiles = (size_t)(in->tr1 - in->tr0) * in->tiles_w;
            j.blocks = (int)((tiles + KV_BF16_NR - 1) / KV_BF16_NR);
            /* the last block's tiles past the band are zero, not stale */
            const size_t tail = (size_t)j.blocks * KV_BF16_NR - tiles;
            for (int xi = 0; tail && xi < 16; xi++)
                for (int p = 0; p < j.pairs; p++)
                    memset(j.v + (size_t)xi * j.v_plane +
                               ((size_t)(j.blocks - 1) * j.pairs + p) * KV_BF16_NR +
                               (KV_BF16_NR - tail),
                           0, tail * sizeof(uint32_t));
            kv_pool_run(cpu->pool, input_tasks, input_task, &j);
            const int chunks = (j.blocks + j.blocks_per_chunk - 1) / j.blocks_per_chunk;
            kv_pool_run(cpu->pool, chunks * j.splits, output_task, &j);
        }
    }
    return KLVAE_OK;
}
