/* conv2d.c — convolution as a matrix product: for each image and each band
 * of output rows, the input patches of the band are laid out as columns
 * (im2col, K = Cin*kh*kw rows) and multiplied by the weight matrix
 * (Cout x K) with sgemm. Working band by band keeps the column buffer small
 * (a few MB) however large the image is. A 1x1 convolution without stride or
 * padding needs no columns: the input already is the matrix. */
#include <cblas.h>
#include <string.h>

#include "backend/cpu/bf16_gemm.h"
#include "backend/cpu/conv2d_internal.h"

/* Target size of one band's column buffer, in floats. Bands are sized from
 * the shapes only, never from the thread count, so the result is the same
 * for any number of threads. */
#define KV_CONV_BAND_FLOATS ((size_t)1 << 21)
/* Split the output channels when a layer has too few bands to keep every
 * thread busy (small late-stage layers). */
#define KV_CONV_MIN_TASKS 8

typedef struct conv_job {
    const float *x, *w, *b;
    float *y;
    int ci, h, w_in, co, kh, kw, ho, wo;
    kv_conv_geometry g;
    bool direct;
    int rows_per_band, bands, co_splits;
    const uint32_t *wp; /* bf16 products: the packed weights (else NULL: sgemm) */
    size_t col_floats;  /* bf16: the packed columns follow this many floats of scratch */
    /* With channel splits (float32 im2col): the columns of every band of
     * image `image`, made once before the products (band b's at
     * cols + b * band_floats); else NULL and each task makes its own. */
    float *cols;
    size_t band_floats;
    int image;
    kv_cpu *cpu;
} conv_job;

/* Writes row r = (c kh + ky) kw + kx of the (K x band_rows*wo) column
 * matrix of output rows [oy0, oy1): input channel c at kernel offset (ky, kx). */
static void im2col_row(const conv_job *j, const float *x, int r, int oy0, int oy1, float *dst)
{
    const int s = j->g.stride, wo = j->wo;
    const int c = r / (j->kh * j->kw), ky = r / j->kw % j->kh, kx = r % j->kw;
    const float *plane = x + (size_t)c * j->h * j->w_in;
    /* Output columns whose input column ix = ox*s - pad_left + kx lies
     * inside the image: [ox_lo, ox_hi). */
    int shift = j->g.pad_left - kx;
    int ox_lo = shift > 0 ? (shift + s - 1) / s : 0;
    int ox_hi = (j->w_in - 1 + shift) >= 0 ? (j->w_in - 1 + shift) / s + 1 : 0;
    if (ox_hi > wo)
        ox_hi = wo;
    if (ox_lo > ox_hi)
        ox_lo = ox_hi;
    for (int oy = oy0; oy < oy1; oy++, dst += wo) {
        int iy = oy * s - j->g.pad_top + ky;
        if (iy < 0 || iy >= j->h) {
            memset(dst, 0, (size_t)wo * sizeof(float));
            continue;
        }
        const float *src = plane + (size_t)iy * j->w_in;
        for (int ox = 0; ox < ox_lo; ox++)
            dst[ox] = 0.0f;
        if (s == 1) {
            memcpy(dst + ox_lo, src + ox_lo - shift, (size_t)(ox_hi - ox_lo) * sizeof(float));
        } else {
            for (int ox = ox_lo; ox < ox_hi; ox++)
                dst[ox] = src[ox * s - shift];
        }
        for (int ox = ox_hi; ox < wo; ox++)
            dst[ox] = 0.0f;
    }
}

/* Writes the (K x band_rows*wo) column matrix of output rows [oy0, oy1). */
static void im2col_band(const conv_job *j, const float *x, int oy0, int oy1, float *col)
{
    const int K = j->ci * j->kh * j->kw, cols = (oy1 - oy0) * j->wo;
    for (int r = 0; r < K; r++)
        im2col_row(j, x, r, oy0, oy1, col + (size_t)r * cols);
}

/* The same columns packed as a bf16 B, two rows at a time through two
 * float32 rows of scratch (rows), so the float32 matrix is never whole. */
static void im2col_band_bf16(const conv_job *j, const float *x, int oy0, int oy1, float *rows,
                             uint32_t *packed)
{
    const int K = j->ci * j->kh * j->kw, cols = (oy1 - oy0) * j->wo, pairs = kv_bf16_pairs(K);
    float *lo = rows, *hi = rows + cols;
    for (int p = 0; p < pairs; p++) {
        im2col_row(j, x, 2 * p, oy0, oy1, lo);
        if (2 * p + 1 < K)
            im2col_row(j, x, 2 * p + 1, oy0, oy1, hi);
        kv_bf16_pack_b_pair(lo, 2 * p + 1 < K ? hi : NULL, cols, pairs, p, packed);
    }
}

static void conv_task(void *arg, int task, int thread)
{
    const conv_job *j = arg;
    int split = task % j->co_splits;
    int band = (task / j->co_splits) % j->bands;
    int n = j->cols ? j->image : task / (j->co_splits * j->bands);
    int oy0 = band * j->rows_per_band;
    int oy1 = KV_MIN(j->ho, oy0 + j->rows_per_band);
    int co_per = (j->co + j->co_splits - 1) / j->co_splits;
    if (j->wp) /* whole panels of the packed weights */
        co_per = (co_per + KV_BF16_MR - 1) / KV_BF16_MR * KV_BF16_MR;
    int co0 = split * co_per, co1 = KV_MIN(j->co, co0 + co_per);
    if (co0 >= co1)
        return;
    const int K = j->ci * j->kh * j->kw;
    const size_t P = (size_t)j->ho * j->wo;
    const size_t p0 = (size_t)oy0 * j->wo;
    const int cols = (oy1 - oy0) * j->wo;
    const float *x = j->x + (size_t)n * j->ci * j->h * j->w_in;
    float *y = j->y + (size_t)n * j->co * P + p0;

    for (int c = co0; c < co1; c++) {
        float bias = j->b ? j->b[c] : 0.0f;
        float *row = y + (size_t)c * P;
        for (int p = 0; p < cols; p++)
            row[p] = bias;
    }
    /* bf16: several channel splits of one band each pack the same columns;
     * that only happens for small layers, where it is cheap. */
    if (j->wp) {
        uint32_t *packed = (uint32_t *)(j->cpu->scratch[thread] + j->col_floats);
        const int pairs = kv_bf16_pairs(K);
        if (j->direct)
            kv_bf16_pack_b(x + p0, P, 1, K, cols, packed);
        else
            im2col_band_bf16(j, x, oy0, oy1, j->cpu->scratch[thread], packed);
        kv_bf16_gemm(co1 - co0, cols, pairs, j->wp + (size_t)co0 * pairs, packed,
                     y + (size_t)co0 * P, P, true);
        return;
    }
    const float *B;
    int ldb;
    if (j->direct) {
        B = x + p0;
        ldb = (int)P;
    } else if (j->cols) {
        B = j->cols + (size_t)band * j->band_floats;
        ldb = cols;
    } else {
        float *col = j->cpu->scratch[thread];
        im2col_band(j, x, oy0, oy1, col);
        B = col;
        ldb = cols;
    }
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, co1 - co0, cols, K, 1.0f,
                j->w + (size_t)co0 * K, K, B, ldb, 1.0f, y + (size_t)co0 * P, (int)P);
}

/* The columns of band `band` of image j->image, for every channel split. */
static void columns_task(void *arg, int band, int thread)
{
    (void)thread;
    const conv_job *j = arg;
    const int oy0 = band * j->rows_per_band, oy1 = KV_MIN(j->ho, oy0 + j->rows_per_band);
    im2col_band(j, j->x + (size_t)j->image * j->ci * j->h * j->w_in, oy0, oy1,
                j->cols + (size_t)band * j->band_floats);
}

typedef struct pack_w_job {
    const float *w;
    uint32_t *out;
    int co, k;
} pack_w_job;

/* Panels [8 task, 8 task + 64) of the packed weights. */
static void pack_w_task(void *arg, int task, int thread)
{
    (void)thread;
    const pack_w_job *j = arg;
    const int r0 = task * 8 * KV_BF16_MR, rows = KV_MIN(8 * KV_BF16_MR, j->co - r0);
    kv_bf16_pack_a(j->w + (size_t)r0 * j->k, (size_t)j->k, 1, rows, j->k,
                   j->out + (size_t)r0 * kv_bf16_pairs(j->k));
}

/* The weights as a packed bf16 (co x K) matrix: kept from an earlier call,
 * or packed now into the cache or into the shared buffer. */
static klvae_status_t packed_weights(kv_cpu *cpu, const kv_tensor *w, int co, int k,
                                     const uint32_t **out)
{
    const size_t bytes = kv_tensor_numel(w) * sizeof(float);
    const int shape[4] = {co, w->shape[1], w->ndim == 4 ? w->shape[2] : 1,
                          w->ndim == 4 ? w->shape[3] : 1};
    const size_t words = kv_bf16_a_words(co, k);
    *out = kv_weight_cache_find(&cpu->weights, w->data, bytes, shape, KV_WEIGHT_GEMM_BF16);
    if (*out)
        return KLVAE_OK;
    uint32_t *dst = kv_weight_cache_store(&cpu->weights, w->data, bytes, shape,
                                          KV_WEIGHT_GEMM_BF16, words * sizeof(uint32_t));
    if (!dst) {
        klvae_status_t st = kv_cpu_reserve_shared(cpu, words);
        if (st != KLVAE_OK)
            return st;
        dst = (uint32_t *)cpu->shared;
    }
    pack_w_job pj = {w->data, dst, co, k};
    kv_pool_run(cpu->pool, (co + 8 * KV_BF16_MR - 1) / (8 * KV_BF16_MR), pack_w_task, &pj);
    *out = dst;
    return KLVAE_OK;
}

typedef struct prologue_job {
    const float *x, *scale, *shift;
    float *y;
    size_t plane;
    kv_activation act;
} prologue_job;

static void prologue_task(void *arg, int task, int thread)
{
    (void)thread;
    const prologue_job *j = arg;
    kv_cpu_scale_shift_act(j->x + (size_t)task * j->plane, j->y + (size_t)task * j->plane,
                           j->plane, j->scale[task], j->shift[task], j->act);
}

static klvae_status_t conv2d_im2col(kv_cpu *cpu, const kv_tensor *x, const kv_tensor *w,
                                    const kv_tensor *b, kv_conv_geometry g, kv_tensor *y);

/* y = conv(prologue(x)) + b with a prologue of scale and shift, or none. */
static klvae_status_t conv2d_plain(kv_backend *be, const kv_tensor *x,
                                   const kv_conv_prologue *prologue, const kv_tensor *w,
                                   const kv_tensor *b, kv_conv_geometry g, kv_tensor *y)
{
    kv_cpu *cpu = kv_cpu_of(be);
    if (w->ndim == 4 && kv_winograd_applies(x->shape[1], w->shape[0], w->shape[2], w->shape[3], g))
        return kv_conv2d_winograd(cpu, x, prologue, w, false, b, g.pad_top, y);
    if (!prologue)
        return conv2d_im2col(cpu, x, w, b, g, y);
    /* The im2col path reads every input value kh * kw times, so it applies
     * the prologue once into a temporary copy instead. It serves only the
     * layers with few channels (conv_out), where the copy is small. */
    kv_tensor normed;
    klvae_status_t st =
        kv_tensor_alloc(be, x->shape[0], x->shape[1], x->shape[2], x->shape[3], &normed);
    if (st != KLVAE_OK)
        return st;
    prologue_job pj = {x->data, prologue->scale->data, prologue->shift->data, normed.data,
                       (size_t)x->shape[2] * x->shape[3], prologue->act};
    kv_pool_run_sized(cpu->pool, x->shape[0] * x->shape[1], prologue_task, &pj,
                      2 * kv_tensor_numel(x));
    st = conv2d_im2col(cpu, &normed, w, b, g, y);
    kv_tensor_release(be, &normed);
    return st;
}

klvae_status_t kv_cpu_conv2d(kv_backend *be, const kv_tensor *x, const kv_conv_prologue *prologue,
                             const kv_tensor *w, const kv_tensor *b, const kv_tensor *residual,
                             kv_conv_geometry g, kv_tensor *y)
{
    const bool affine = prologue && prologue->scale && prologue->shift;
    kv_conv_prologue p = {NULL, NULL, KV_ACT_NONE, false};
    if (affine)
        p = (kv_conv_prologue){prologue->scale, prologue->shift, prologue->act, false};
    klvae_status_t st;
    if (prologue && prologue->upsample2x) {
        /* The upsample commutes with the per-channel prologue; the CPU stores
         * the upsampled input for the length of the call (the CUDA backend
         * reads it through its staging kernel instead). */
        kv_tensor up;
        st = kv_tensor_alloc(be, x->shape[0], x->shape[1], 2 * x->shape[2], 2 * x->shape[3], &up);
        if (st != KLVAE_OK)
            return st;
        st = kv_cpu_upsample_nearest2x(be, x, &up);
        if (st == KLVAE_OK)
            st = conv2d_plain(be, &up, affine ? &p : NULL, w, b, g, y);
        kv_tensor_release(be, &up);
    } else {
        st = conv2d_plain(be, x, affine ? &p : NULL, w, b, g, y);
    }
    if (st == KLVAE_OK && residual)
        st = kv_cpu_add(be, residual, y, y); /* r + y: the graph's add(shortcut, h) */
    return st;
}

static klvae_status_t conv2d_im2col(kv_cpu *cpu, const kv_tensor *x, const kv_tensor *w,
                                    const kv_tensor *b, kv_conv_geometry g, kv_tensor *y)
{
    conv_job j;
    memset(&j, 0, sizeof j);
    j.x = x->data;
    j.w = w->data;
    j.b = b ? b->data : NULL;
    j.y = y->data;
    j.ci = x->shape[1];
    j.h = x->shape[2];
    j.w_in = x->shape[3];
    j.co = w->shape[0];
    j.kh = w->ndim == 4 ? w->shape[2] : 1;
    j.kw = w->ndim == 4 ? w->shape[3] : 1;
    j.ho = y->shape[2];
    j.wo = y->shape[3];
    j.g = g;
    j.cpu = cpu;
    j.direct = j.kh == 1 && j.kw == 1 && g.stride == 1 && g.pad_top == 0 && g.pad_left == 0 &&
               g.pad_bottom == 0 && g.pad_right == 0;
    const size_t K = (size_t)j.ci * j.kh * j.kw;
    size_t band_cols = KV_CONV_BAND_FLOATS / K;
    if (band_cols < (size_t)j.wo)
        band_cols = (size_t)j.wo;
    j.rows_per_band = (int)KV_MIN((size_t)j.ho, band_cols / (size_t)j.wo);
    j.bands = (j.ho + j.rows_per_band - 1) / j.rows_per_band;
    int per_image = j.bands;
    j.co_splits = 1;
    while (per_image * j.co_splits < KV_CONV_MIN_TASKS && j.co / (j.co_splits * 2) >= 16)
        j.co_splits *= 2;
    /* bf16 products for layers with at least a kernel's rows of outputs
     * (not conv_out's 3 channels, where they would save nothing) */
    const bool bf16 = cpu->bf16 && j.co >= KV_BF16_MR;
    const size_t cols_per_band = (size_t)j.rows_per_band * (size_t)j.wo;
    /* Few bands per image (small images) and channel splits: each split's
     * task would make its band's float32 columns again (the discriminator's
     * 4x4 layers made them 8 times), so they are made once per image first,
     * into the shared buffer. Same products, same bits. */
    const bool shared_columns = j.co_splits > 1 && !bf16 && !j.direct;
    /* im2col's columns: whole in float32, or two rows at a time when packed */
    j.col_floats = j.direct || shared_columns ? 0 : bf16 ? 2 * cols_per_band : K * cols_per_band;
    size_t scratch = j.col_floats;
    if (bf16)
        scratch += kv_bf16_b_words((int)K, (int)cols_per_band);
    if (scratch > 0) {
        klvae_status_t st = kv_cpu_reserve_scratch(cpu, scratch);
        if (st != KLVAE_OK)
            return st;
    }
    if (bf16) {
        klvae_status_t st = packed_weights(cpu, w, j.co, (int)K, &j.wp);
        if (st != KLVAE_OK)
            return st;
    }
    int batch = x->shape[0];
    if (shared_columns) {
        j.band_floats = K * cols_per_band;
        klvae_status_t st = kv_cpu_reserve_shared(cpu, j.band_floats * (size_t)j.bands);
        if (st != KLVAE_OK)
            return st;
        j.cols = cpu->shared;
        for (j.image = 0; j.image < batch; j.image++) {
            kv_pool_run(cpu->pool, j.bands, columns_task, &j);
            kv_pool_run(cpu->pool, j.bands * j.co_splits, conv_task, &j);
        }
        return KLVAE_OK;
    }
    kv_pool_run(cpu->pool, batch * j.bands * j.co_splits, conv_task, &j);
    return KLVAE_OK;
}
