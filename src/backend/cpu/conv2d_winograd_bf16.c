/* conv2d_winograd_bf16.c — Winograd F(2x2, 3x3) with bf16 products
 * (precision=bf16 on a CPU with AVX512-BF16).
 *
 * The same algorithm as conv2d_winograd.c: U = G g G^T and V = B^T d B in
 * float32, then the 16 products M[xi] = U[xi] V[xi] over channels, then
 * Y = A^T M A. Here U and V are rounded to bf16 and packed for the bf16
 * micro-kernel (bf16_gemm.h), and M is summed in float32:
 *
 *   - U is packed once per weight tensor, and kept (weight_cache.h);
 *   - each task does all the work for a chunk of consecutive tiles (whole
 *     48-tile blocks, the kernel's NR, as many as 1.5 MB of V hold): it
 *     transforms the chunk's inputs of every channel into its own V, two
 *     channels (a pair of k) and 16 tiles at a time in registers, stored
 *     rounded and straight in the kernel's layout (per block and xi, pair p
 *     of tile j at [p * 48 + j]); then block by block, for 8 output
 *     channels at a time, it runs the 16 products into a small M (24 KB, in
 *     L1) and transforms M to outputs at once. V stays in the core's
 *     caches and M in L1: a whole-image V, four times the input's size,
 *     written out and read back cost more in memory traffic than its
 *     transform did in arithmetic (a 128-channel layer at 256^2 ran 15-20%
 *     faster on Zen 4 when V stopped going to memory).
 *
 * Chunks of blocks and splits of output channels are sized from the shapes
 * only, and every output is summed in one kernel in a fixed order, so
 * results do not depend on the number of threads. */
#include <stdlib.h>
#include <string.h>

#include "backend/cpu/bf16_gemm.h"
#include "backend/cpu/conv2d_internal.h"

/* A task's V holds at most this many words (1.5 MB), one block at least. */
#define KV_WINOGRAD_BF16_V_CHUNK_WORDS ((size_t)384 << 10)
/* Output channels per task when an image has too few blocks (a multiple of 8). */
#define KV_WINOGRAD_BF16_SPLIT_CHANNELS 64
#define KV_WINOGRAD_BF16_MIN_TASKS 4

typedef struct bf16_job {
    kv_winograd_job in; /* image, prologue and sizes; tr0 = 0, tr1 = tile rows */
    const uint32_t *u;  /* 16 packed A (co x ci), u_plane words apart */
    size_t u_plane;
    size_t v_plane; /* words of one xi's packed B of a block: pairs x 48; a
                     * chunk's V is its blocks' 16 planes, block after block */
    int pairs, blocks; /* pairs of input channels; 48-tile blocks of the image */
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

/* ---- phase 1: V of one block ---- */

/* The transform of one channel's run of tiles in a tile row, from its four
 * padded input rows d0..d3 to V, runs on the even and odd columns apart:
 * with d[2k] in even[k] and d[2k + 1] in odd[k] (k from the run's first
 * tile), the four values of row r of tile k are e[2k] - e[2k+2],
 * e[2k+1] + e[2k+2], e[2k+2] - e[2k+1] and e[2k+1] - e[2k+3] (e = B^T d),
 * contiguous loads 16 tiles at a time. The sums are those of
 * conv2d_winograd.c in the same order, so V is its V rounded once. */

/* The columns of input row yy of channel c that tiles [tx, tx + run) read,
 * prologue applied, zero outside the image, as even and odd padded columns:
 * even[k] = x[2 (tx + k) - 1], odd[k] = x[2 (tx + k)], run + 1 each. */
#ifdef KV_BF16_KERNELS
KV_BF16_TARGET
#endif
static void split_input_row(const kv_winograd_job *in, int c, int yy, int tx, int run,
                            float *line, float *even, float *odd)
{
    const int w = in->w, n = run + 1;
    if (yy < 0 || yy >= in->h) {
        memset(even, 0, (size_t)n * sizeof(float));
        memset(odd, 0, (size_t)n * sizeof(float));
        return;
    }
    /* image columns [first, last] of the 2 run + 2 padded ones */
    const int first = KV_MAX(0, 2 * tx - 1), last = KV_MIN(w - 1, 2 * (tx + run));
    const float *src = in->x + ((size_t)c * in->h + (size_t)yy) * w + first;
    if (in->scale) {
        kv_cpu_scale_shift_act(src, line, (size_t)(last - first + 1), in->scale[c], in->shift[c],
                               in->act);
        src = line;
    }
    src -= first; /* src[i] is column i for first <= i <= last */
    for (int k = 0; k < n; k++) {
        const int ie = 2 * (tx + k) - 1, io = 2 * (tx + k);
        even[k] = ie >= first && ie <= last ? src[ie] : 0.0f;
        odd[k] = io <= last ? src[io] : 0.0f;
    }
}

/* e = B^T d for the even or the odd columns (n values each). */
#ifdef KV_BF16_KERNELS
KV_BF16_TARGET
#endif
static void columns_transform(const float *const d[4], float *const e[4], int n)
{
    for (int q = 0; q < n; q++) {
        e[0][q] = d[0][q] - d[2][q];
        e[1][q] = d[1][q] + d[2][q];
        e[2][q] = d[2][q] - d[1][q];
        e[3][q] = d[1][q] - d[3][q];
    }
}

#ifdef KV_BF16_KERNELS
#include <immintrin.h>

/* Lane j of the result holds (hi[j] << 16) | lo[j] in bf16: one pair per tile. */
KV_BF16_TARGET static inline __m512i pair_words(__m512 lo, __m512 hi)
{
    const __m512i index =
        _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7, 22,
                         6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
    return _mm512_permutexvar_epi16(index, (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
}

KV_BF16_TARGET static inline __mmask16 lanes(int count)
{
    return count >= 16 ? (__mmask16)0xFFFF : count <= 0 ? 0 : (__mmask16)((1u << count) - 1u);
}

/* The four V values of row r of count tiles from e's even and odd columns
 * of the pair's two channels (hi_even NULL: no second channel), stored as
 * pairs at out + xi * plane for the row's four xi. */
KV_BF16_TARGET static void pack_tile_row(const float *lo_even, const float *lo_odd,
                                         const float *hi_even, const float *hi_odd, int count,
                                         uint32_t *out, size_t plane)
{
    for (int k = 0; k < count; k += 16) {
        const __mmask16 m = lanes(count - k);
        __m512 a = _mm512_maskz_loadu_ps(m, lo_even + k), b = _mm512_maskz_loadu_ps(m, lo_odd + k);
        __m512 c = _mm512_maskz_loadu_ps(m, lo_even + k + 1);
        __m512 d = _mm512_maskz_loadu_ps(m, lo_odd + k + 1);
        __m512 lo[4] = {_mm512_sub_ps(a, c), _mm512_add_ps(b, c), _mm512_sub_ps(c, b),
                        _mm512_sub_ps(b, d)};
        __m512 hi[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(),
                        _mm512_setzero_ps()};
        if (hi_even) {
            a = _mm512_maskz_loadu_ps(m, hi_even + k);
            b = _mm512_maskz_loadu_ps(m, hi_odd + k);
            c = _mm512_maskz_loadu_ps(m, hi_even + k + 1);
            d = _mm512_maskz_loadu_ps(m, hi_odd + k + 1);
            hi[0] = _mm512_sub_ps(a, c);
            hi[1] = _mm512_add_ps(b, c);
            hi[2] = _mm512_sub_ps(c, b);
            hi[3] = _mm512_sub_ps(b, d);
        }
        for (int xi = 0; xi < 4; xi++)
            _mm512_mask_storeu_epi32(out + (size_t)xi * plane + k, m, pair_words(lo[xi], hi[xi]));
    }
}

#else /* no kernels in this build: the bf16 mode never runs */

static void pack_tile_row(const float *lo_even, const float *lo_odd, const float *hi_even,
                          const float *hi_odd, int count, uint32_t *out, size_t plane)
{
    (void)lo_even, (void)lo_odd, (void)hi_even, (void)hi_odd, (void)count, (void)out, (void)plane;
}

#endif

/* Floats of scratch the transform of a chunk needs for rows of up to tw
 * tiles: per channel of a pair, four input rows and four rows of e, even and
 * odd columns (tw + 1 values each); one line of 2 tw + 2 columns; rounded up
 * to keep V 64-byte aligned behind them. */
static size_t rows_floats(int tw)
{
    const size_t n = (size_t)tw + 1;
    return (2 * 16 * n + 2 * n + 15) / 16 * 16;
}

/* The even and odd columns of rows r of e for one channel. */
typedef struct channel_rows {
    float *d[4][2], *e[4][2];
} channel_rows;

/* V of the chunk's tiles [t_begin, t_end) of the image for every input
 * channel, two channels at a time, tile row by tile row: block after block
 * of 16 planes of pairs x 48 words at v. Consecutive tile rows that cover
 * the same columns share two input rows, so those are prepared once. Lanes
 * past t_end are zero. */
static void transform_chunk(const bf16_job *j, size_t t_begin, size_t t_end, uint32_t *v,
                            float *rows)
{
    const kv_winograd_job *in = &j->in;
    const int tw = in->tiles_w;
    const size_t n = (size_t)tw + 1, block_words = 16 * j->v_plane;
    const size_t tiles = t_end - t_begin, blocks = (tiles + KV_BF16_NR - 1) / KV_BF16_NR;
    const int tail = (int)(blocks * KV_BF16_NR - tiles);
    float *line = rows + 2 * 16 * n;
    channel_rows ch[2];
    for (int h = 0; h < 2; h++)
        for (int r = 0; r < 4; r++)
            for (int parity = 0; parity < 2; parity++) {
                ch[h].d[r][parity] = rows + ((size_t)(h * 4 + r) * 2 + parity) * n;
                ch[h].e[r][parity] = rows + (16 + (size_t)(h * 4 + r) * 2 + parity) * n;
            }
    for (int p = 0; p < j->pairs; p++) {
        const int c = 2 * p, channels = KV_MIN(2, in->ci - c);
        uint32_t *pair = v + (size_t)p * KV_BF16_NR;
        for (int xi = 0; tail && xi < 16; xi++)
            memset(pair + (blocks - 1) * block_words + (size_t)xi * j->v_plane + (KV_BF16_NR - tail),
                   0, (size_t)tail * sizeof(uint32_t));
        int last_tr = -2, last_tx = -1, last_run = -1;
        for (size_t t = t_begin; t < t_end;) { /* one tile row's run of tiles at a time */
            const int tr = in->tr0 + (int)(t / (size_t)tw), tx = (int)(t % (size_t)tw);
            const int run = (int)KV_MIN(t_end - t, (size_t)(tw - tx));
            const int have = tr == last_tr + 1 && tx == last_tx && run == last_run ? 2 : 0;
            for (int h = 0; h < channels; h++) {
                channel_rows *cr = &ch[h];
                if (have == 2)
                    for (int parity = 0; parity < 2; parity++) {
                        float *r0 = cr->d[0][parity], *r1 = cr->d[1][parity];
                        cr->d[0][parity] = cr->d[2][parity];
                        cr->d[1][parity] = cr->d[3][parity];
                        cr->d[2][parity] = r0;
                        cr->d[3][parity] = r1;
                    }
                for (int r = have; r < 4; r++)
                    split_input_row(in, c + h, 2 * tr - in->pad_top + r, tx, run, line,
                                    cr->d[r][0], cr->d[r][1]);
                for (int parity = 0; parity < 2; parity++) {
                    const float *d4[4] = {cr->d[0][parity], cr->d[1][parity], cr->d[2][parity],
                                          cr->d[3][parity]};
                    float *const e4[4] = {cr->e[0][parity], cr->e[1][parity], cr->e[2][parity],
                                          cr->e[3][parity]};
                    columns_transform(d4, e4, run + 1);
                }
            }
            last_tr = tr, last_tx = tx, last_run = run;
            for (int k = 0; k < run;) { /* split where the chunk's blocks end */
                const size_t local = t - t_begin + (size_t)k;
                const size_t block = local / KV_BF16_NR, lane = local % KV_BF16_NR;
                const int part = (int)KV_MIN((size_t)(run - k), KV_BF16_NR - lane);
                uint32_t *dst = pair + block * block_words + lane;
                for (int r = 0; r < 4; r++)
                    pack_tile_row(ch[0].e[r][0] + k, ch[0].e[r][1] + k,
                                  channels == 2 ? ch[1].e[r][0] + k : NULL,
                                  channels == 2 ? ch[1].e[r][1] + k : NULL, part,
                                  dst + (size_t)(4 * r) * j->v_plane, j->v_plane);
                k += part;
            }
            t += (size_t)run;
        }
    }
}

/* ---- phase 2: products and outputs ---- */

#ifdef KV_BF16_KERNELS

/* Stores count values of left and right interleaved (left[i] at row[2i],
 * right[i] at row[2i + 1]), and, with one_more, left[count] at row[2 count]. */
KV_BF16_TARGET static void store_interleaved(float *row, const float *left, const float *right,
                                             int count, bool one_more)
{
    const __m512i first = _mm512_set_epi32(23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
    const __m512i second =
        _mm512_set_epi32(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8);
    int i = 0;
    for (; i < count; i += 16) {
        const int n = KV_MIN(16, count - i);
        const __m512 l = _mm512_maskz_loadu_ps(lanes(n), left + i);
        const __m512 r = _mm512_maskz_loadu_ps(lanes(n), right + i);
        _mm512_mask_storeu_ps(row + 2 * i, lanes(2 * n), _mm512_permutex2var_ps(l, first, r));
        _mm512_mask_storeu_ps(row + 2 * i + 16, lanes(2 * n - 16),
                              _mm512_permutex2var_ps(l, second, r));
    }
    if (one_more)
        row[2 * count] = left[count];
}

#define KV_OUTPUT_TARGET KV_BF16_TARGET

#else

static void store_interleaved(float *row, const float *left, const float *right, int count,
                              bool one_more)
{
    for (int i = 0; i < count; i++) {
        row[2 * i] = left[i];
        row[2 * i + 1] = right[i];
    }
    if (one_more)
        row[2 * count] = left[count];
}

#define KV_OUTPUT_TARGET

#endif

/* y for rows channels from c0 and the band's tiles [t0, t0 + count) from
 * M (16 planes of MR x NR): A^T M A + bias, scattered as 2x2 blocks. */
KV_OUTPUT_TARGET static void output_block(const bf16_job *j, const float *m, int c0, int rows,
                                          size_t t0, int count)
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
            for (int half = 0; half < 2 && y0 + half < h; half++)
                store_interleaved(plane + (size_t)(y0 + half) * w + x0, o[2 * half] + k,
                                  o[2 * half + 1] + k, full, full < run);
            k += run;
        }
    }
}

/* Task: the tiles of one chunk, for the output channels of one split. */
static void chunk_task(void *arg, int task, int thread)
{
    const bf16_job *j = arg;
    const int chunk = task / j->splits, split = task % j->splits;
    const int c_begin = split * j->co_per_split, c_end = KV_MIN(j->in.co, c_begin + j->co_per_split);
    const size_t tiles = (size_t)(j->in.tr1 - j->in.tr0) * j->in.tiles_w;
    const size_t t_begin = (size_t)chunk * j->blocks_per_chunk * KV_BF16_NR;
    const size_t t_end = KV_MIN(tiles, t_begin + (size_t)j->blocks_per_chunk * KV_BF16_NR);
    float *m = j->cpu->scratch[thread];
    float *rows = m + (size_t)16 * KV_BF16_MR * KV_BF16_NR;
    uint32_t *v = (uint32_t *)(rows + rows_floats(j->in.tiles_w));
    if (c_begin >= c_end || t_begin >= t_end)
        return;
    transform_chunk(j, t_begin, t_end, v, rows);
    for (size_t t0 = t_begin; t0 < t_end; t0 += KV_BF16_NR) {
        const int cols = (int)KV_MIN((size_t)KV_BF16_NR, t_end - t0);
        const uint32_t *block = v + (t0 - t_begin) / KV_BF16_NR * 16 * j->v_plane;
        for (int c0 = c_begin; c0 < c_end; c0 += KV_BF16_MR) {
            const uint32_t *u = j->u + (size_t)c0 * j->pairs;
            for (int xi = 0; xi < 16; xi++)
                kv_bf16_kernel(j->pairs, u + (size_t)xi * j->u_plane,
                               block + (size_t)xi * j->v_plane,
                               m + (size_t)xi * KV_BF16_MR * KV_BF16_NR, KV_BF16_NR, KV_BF16_MR,
                               cols, false);
            output_block(j, m, c0, KV_MIN(KV_BF16_MR, c_end - c0), t0, cols);
        }
    }
}

/* ---- the convolution ---- */

/* Chunks, splits and scratch for an image of x and co outputs. */
static klvae_status_t plan(kv_cpu *cpu, const kv_tensor *x, const kv_tensor *y, int pad_top,
                           int co, bf16_job *j)
{
    kv_winograd_job *in = &j->in;
    in->ci = x->shape[1];
    in->co = co;
    in->h = x->shape[2];
    in->w = x->shape[3];
    in->ho = y->shape[2];
    in->pad_top = pad_top;
    in->tiles_w = (in->w + 1) / 2;
    in->tr0 = 0;
    in->tr1 = (in->ho + 1) / 2;
    j->pairs = kv_bf16_pairs(in->ci);
    const size_t tiles = (size_t)in->tr1 * in->tiles_w;
    j->blocks = (int)((tiles + KV_BF16_NR - 1) / KV_BF16_NR);
    /* as many blocks as V_CHUNK_WORDS hold, fewer where that leaves fewer
     * than MIN_TASKS chunks */
    const size_t block_words = (size_t)16 * kv_bf16_b_words(in->ci, KV_BF16_NR);
    int per_chunk = (int)KV_MAX((size_t)1, KV_WINOGRAD_BF16_V_CHUNK_WORDS / block_words);
    per_chunk = KV_MIN(per_chunk, KV_MAX(1, j->blocks / KV_WINOGRAD_BF16_MIN_TASKS));
    j->blocks_per_chunk = per_chunk;
    j->chunks = (j->blocks + per_chunk - 1) / per_chunk;
    j->splits = 1;
    while (j->chunks * j->splits < KV_WINOGRAD_BF16_MIN_TASKS &&
           co / (2 * j->splits) >= KV_WINOGRAD_BF16_SPLIT_CHANNELS)
        j->splits *= 2;
    j->co_per_split = (co + j->splits - 1) / j->splits;
    j->co_per_split = (j->co_per_split + KV_BF16_MR - 1) / KV_BF16_MR * KV_BF16_MR;
    j->u_plane = kv_bf16_a_words(co, in->ci);
    j->v_plane = kv_bf16_b_words(in->ci, KV_BF16_NR);
    j->cpu = cpu;
    /* per thread: M, the transform's rows, V of one block (words as floats) */
    const size_t per_thread = (size_t)16 * KV_BF16_MR * KV_BF16_NR + rows_floats(in->tiles_w) +
                              (size_t)per_chunk * block_words;
    klvae_status_t st = kv_cpu_reserve_scratch(cpu, KV_MAX(per_thread, (size_t)9 * KV_MAX(in->ci, co)));
    if (st == KLVAE_OK)
        st = kv_cpu_reserve_shared(cpu, 16 * j->u_plane);
    return st;
}

klvae_status_t kv_conv2d_winograd_bf16(kv_cpu *cpu, const kv_tensor *x,
                                       const kv_conv_prologue *prologue, const kv_tensor *w,
                                       bool flipped, const kv_tensor *b, int pad_top,
                                       kv_tensor *y)
{
    bf16_job j;
    memset(&j, 0, sizeof j);
    const int co = flipped ? w->shape[1] : w->shape[0];
    klvae_status_t st = plan(cpu, x, y, pad_top, co, &j);
    if (st != KLVAE_OK)
        return st;
    st = packed_weights(cpu, w, flipped, j.in.ci, co, (uint32_t *)cpu->shared, &j.u);
    if (st != KLVAE_OK)
        return st;
    kv_winograd_job *in = &j.in;
    in->bias = b ? b->data : NULL;
    in->cpu = cpu;
    for (int n = 0; n < x->shape[0]; n++) {
        in->x = (const float *)x->data + (size_t)n * in->ci * in->h * in->w;
        in->y = (float *)y->data + (size_t)n * co * in->ho * in->w;
        if (prologue) {
            in->scale = (const float *)prologue->scale->data + (size_t)n * in->ci;
            in->shift = (const float *)prologue->shift->data + (size_t)n * in->ci;
            in->act = prologue->act;
        }
        kv_pool_run(cpu->pool, j.chunks * j.splits, chunk_task, &j);
    }
    return KLVAE_OK;
}
