/* geometry.c — see geometry.h. */
#include <stdlib.h>
#include <string.h>

#include "base/philox.h"
#include "dataset/geometry.h"

#define KV_TAG_DATASET_CROP 0x64637270u /* "dcrp" */

typedef unsigned __int128 kv_u128;

/* w1/h1 < w2/h2, exactly. */
static bool ratio_less(const kv_bucket *a, const kv_bucket *b)
{
    uint64_t left = (uint64_t)a->w * (uint64_t)b->h, right = (uint64_t)b->w * (uint64_t)a->h;
    return left != right ? left < right : a->w < b->w;
}

static int compare_buckets(const void *x, const void *y)
{
    const kv_bucket *a = x, *b = y;
    return ratio_less(a, b) ? -1 : ratio_less(b, a) ? 1 : 0;
}

klvae_status_t kv_buckets_make(int side, int step, double max_ratio, kv_bucket **out,
                               int *count)
{
    *out = NULL;
    *count = 0;
    const uint64_t area = (uint64_t)side * (uint64_t)side, s = (uint64_t)step;
    int n = 0;
    kv_bucket *list = malloc((size_t)(2 * (area / s / s) + 2) * sizeof *list);
    if (!list)
        return kv_error(KLVAE_ERR_OUT_OF_MEMORY, "out of memory making buckets");
    for (uint64_t w = s; w * s <= area; w += s) {
        uint64_t h = area / w / s * s;
        /* w / h <= max_ratio, compared in double: both sides are exact
         * (integers below 2^53 times a ratio from text) */
        if (h < s || h > w || (double)w > max_ratio * (double)h)
            continue;
        list[n].h = (int)h;
        list[n++].w = (int)w;
        if (h < w) { /* its portrait twin */
            list[n].h = (int)w;
            list[n++].w = (int)h;
        }
    }
    if (n == 0) {
        free(list);
        return kv_error(KLVAE_ERR_INVALID_ARGUMENT,
                        "buckets %d,%d,%g: no bucket of about %d x %d pixels has sides that are "
                        "multiples of %d",
                        side, step, max_ratio, side, side, step);
    }
    qsort(list, (size_t)n, sizeof *list, compare_buckets);
    *out = list;
    *count = n;
    return KLVAE_OK;
}

/* The distance of bucket b from an h x w image as the fraction num / den
 * >= 1: max(bw h, w bh) / min(bw h, w bh). */
static void distance(const kv_bucket *b, int h, int w, uint64_t *num, uint64_t *den)
{
    uint64_t x = (uint64_t)b->w * (uint64_t)h, y = (uint64_t)w * (uint64_t)b->h;
    *num = x > y ? x : y;
    *den = x > y ? y : x;
}

int kv_bucket_nearest(const kv_bucket *buckets, int count, int h, int w)
{
    int best = 0;
    uint64_t best_num, best_den;
    distance(&buckets[0], h, w, &best_num, &best_den);
    for (int i = 1; i < count; i++) {
        uint64_t num, den;
        distance(&buckets[i], h, w, &num, &den);
        kv_u128 mine = (kv_u128)num * best_den, theirs = (kv_u128)best_num * den;
        uint64_t area = (uint64_t)buckets[i].h * (uint64_t)buckets[i].w;
        uint64_t best_area = (uint64_t)buckets[best].h * (uint64_t)buckets[best].w;
        if (mine < theirs || (mine == theirs && area > best_area)) {
            best = i;
            best_num = num;
            best_den = den;
        }
    }
    return best;
}

void kv_geometry_cover(int src_h, int src_w, int h, int w, kv_geometry *g)
{
    const uint64_t sh = (uint64_t)src_h, sw = (uint64_t)src_w;
    g->src_h = src_h;
    g->src_w = src_w;
    g->h = h;
    g->w = w;
    if ((uint64_t)h * sw >= (uint64_t)w * sh) { /* the height is the tight side */
        g->resized_h = h;
        g->resized_w = (int)((2 * sw * (uint64_t)h + sh) / (2 * sh));
    } else {
        g->resized_w = w;
        g->resized_h = (int)((2 * sh * (uint64_t)w + sw) / (2 * sw));
    }
    g->top = (g->resized_h - h) / 2;
    g->left = (g->resized_w - w) / 2;
}

void kv_geometry_random_crop(kv_geometry *g, uint64_t seed, uint64_t id)
{
    kv_philox_stream s = kv_philox_stream_start(seed, KV_TAG_DATASET_CROP, id);
    g->top = (int)kv_philox_stream_below(&s, (uint32_t)(g->resized_h - g->h + 1));
    g->left = (int)kv_philox_stream_below(&s, (uint32_t)(g->resized_w - g->w + 1));
}

/* The taps of one axis: output i (of count, starting at resized coordinate
 * first) reads source samples start[i] .. start[i] + taps - 1 with weights
 * weight[i * taps ..]; unused taps weigh 0. */
typedef struct axis_filter {
    int taps;
    int *start;
    float *weight;
} axis_filter;

static void axis_free(axis_filter *a)
{
    free(a->start);
    free(a->weight);
}

/* PIL's precompute_coeffs for the bilinear (triangle) filter. */
static klvae_status_t axis_make(int in, int out, int first, int count, axis_filter *a)
{
    const double scale = (double)in / (double)out;
    const double filterscale = scale > 1.0 ? scale : 1.0;
    const double support = filterscale; /* the triangle's support is 1 */
    a->taps = (int)support * 2 + 2;
    a->start = malloc((size_t)count * sizeof *a->start);
    a->weight = calloc((size_t)count * (size_t)a->taps, sizeof *a->weight);
    double *k = malloc((size_t)a->taps * sizeof *k);
    if (!a->start || !a->weight || !k) {
        free(k);
        axis_free(a);
        return kv_error(KLVAE_ERR_OUT_OF_MEMORY, "out of memory resizing an image");
    }
    for (int i = 0; i < count; i++) {
        const double center = ((double)(first + i) + 0.5) * scale;
        int lo = (int)(center - support + 0.5), hi = (int)(center + support + 0.5);
        lo = lo < 0 ? 0 : lo;
        hi = hi > in ? in : hi;
        int n = hi - lo < a->taps ? hi - lo : a->taps;
        double sum = 0.0;
        for (int x = 0; x < n; x++) {
            double t = ((double)(x + lo) - center + 0.5) / filterscale;
            t = t < 0 ? -t : t;
            k[x] = t < 1.0 ? 1.0 - t : 0.0;
            sum += k[x];
        }
        a->start[i] = lo;
        for (int x = 0; x < n; x++)
            a->weight[(size_t)i * a->taps + x] = sum > 0.0 ? (float)(k[x] / sum) : 0.0f;
    }
    free(k);
    return KLVAE_OK;
}

/* The plain crop: no resize. */
static void crop_only(const float *src, const kv_geometry *g, float *out)
{
    const size_t in_plane = (size_t)g->src_h * g->src_w, out_plane = (size_t)g->h * g->w;
    for (int c = 0; c < 3; c++)
        for (int y = 0; y < g->h; y++)
            memcpy(out + c * out_plane + (size_t)y * g->w,
                   src + c * in_plane + (size_t)(g->top + y) * g->src_w + g->left,
                   (size_t)g->w * sizeof *out);
}

/* Horizontal pass over source rows [row0, row0 + rows) into tmp (3, rows,
 * w), then the vertical pass into out. */
static void resample(const float *src, const kv_geometry *g, const axis_filter *ax,
                     const axis_filter *ay, int row0, int rows, float *tmp, float *out)
{
    const size_t in_plane = (size_t)g->src_h * g->src_w, out_plane = (size_t)g->h * g->w;
    for (int c = 0; c < 3; c++)
        for (int r = 0; r < rows; r++) {
            const float *line = src + c * in_plane + (size_t)(row0 + r) * g->src_w;
            float *dst = tmp + ((size_t)c * rows + r) * g->w;
            for (int x = 0; x < g->w; x++) {
                const float *k = ax->weight + (size_t)x * ax->taps;
                const float *p = line + ax->start[x];
                float v = 0.0f;
                for (int t = 0; t < ax->taps && ax->start[x] + t < g->src_w; t++)
                    v += k[t] * p[t];
                dst[x] = v;
            }
        }
    for (int c = 0; c < 3; c++)
        for (int y = 0; y < g->h; y++) {
            const float *k = ay->weight + (size_t)y * ay->taps;
            float *dst = out + c * out_plane + (size_t)y * g->w;
            for (int x = 0; x < g->w; x++)
                dst[x] = 0.0f;
            for (int t = 0; t < ay->taps && ay->start[y] + t < g->src_h; t++) {
                const float *line = tmp + ((size_t)c * rows + (ay->start[y] + t - row0)) * g->w;
                for (int x = 0; x < g->w; x++)
                    dst[x] += k[t] * line[x];
            }
        }
}

klvae_status_t kv_geometry_apply(const float *src, const kv_geometry *g, float *out)
{
    if (g->resized_h == g->src_h && g->resized_w == g->src_w) {
        crop_only(src, g, out);
        return KLVAE_OK;
    }
    axis_filter ax = {0, NULL, NULL}, ay = {0, NULL, NULL};
    klvae_status_t st = axis_make(g->src_w, g->resized_w, g->left, g->w, &ax);
    if (st == KLVAE_OK)
        st = axis_make(g->src_h, g->resized_h, g->top, g->h, &ay);
    if (st != KLVAE_OK) {
        axis_free(&ax);
        return st;
    }
    int row0 = ay.start[0];
    int row_end = ay.start[g->h - 1] + ay.taps;
    row_end = row_end > g->src_h ? g->src_h : row_end;
    float *tmp = malloc((size_t)3 * (size_t)(row_end - row0) * (size_t)g->w * sizeof *tmp);
    if (tmp)
        resample(src, g, &ax, &ay, row0, row_end - row0, tmp, out);
    else
        st = kv_error(KLVAE_ERR_OUT_OF_MEMORY, "out of memory resizing a %d x %d image", g->src_h,
                      g->src_w);
    free(tmp);
    axis_free(&ax);
    axis_free(&ay);
    return st;
}

void kv_mirror(const float *img, int c, int h, int w, float *out)
{
    for (size_t r = 0; r < (size_t)c * (size_t)h; r++) {
        const float *line = img + r * (size_t)w;
        float *dst = out + r * (size_t)w;
        for (int x = 0; x < w; x++)
            dst[x] = line[w - 1 - x];
    }
}
