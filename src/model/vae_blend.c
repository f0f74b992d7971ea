/* vae_blend.c — tiling=blend: diffusers' tiled encode and decode
 * (AutoencoderKL.tiled_decode and _tiled_encode), for comparison with the
 * exact streamed forward.
 *
 * The input is cut into tiles of tile_size pixels (tile_size / f latents)
 * that start every `step` input rows and columns; each tile runs through
 * the untiled forward on its own, so it has its own group-norm statistics
 * and attention. Going row by row and left to right, each output tile's
 * first `extent` rows are blended linearly with the last rows of the tile
 * above, then its first `extent` columns with the last columns of the tile
 * to its left, in place (as diffusers does: later blends read the blended
 * values), and its first `limit` rows and columns make the output. */
#include <stdlib.h>
#include <string.h>

#include "model/stream.h"
#include "model/vae.h"

typedef struct blend_geometry {
    int tile, step;    /* input: tile size and the distance between tiles */
    int extent, limit; /* output: rows blended, rows kept of each tile */
    int scale_num, scale_den; /* output size = input size * num / den */
} blend_geometry;

/* diffusers' numbers: for decode tile = tile_size / f latents,
 * step = int(tile * (1 - overlap)), extent = int(tile_size * overlap)
 * pixels; for encode the other way round. The tiles cover the output
 * exactly only when step, scaled, is limit (else diffusers' output has
 * another size than its input). */
static klvae_status_t geometry_of(const klvae_model_t *m, bool encode, blend_geometry *g)
{
    const int f = kv_config_factor(&m->cfg);
    const int pixels = m->infer.tile_size ? m->infer.tile_size : m->cfg.sample_size;
    const double overlap = m->infer.tile_overlap;
    const int in_tile = encode ? pixels : pixels / f, out_tile = encode ? pixels / f : pixels;
    g->tile = in_tile;
    g->step = (int)(in_tile * (1.0 - overlap));
    g->extent = (int)(out_tile * overlap);
    g->limit = out_tile - g->extent;
    g->scale_num = encode ? 1 : f;
    g->scale_den = encode ? f : 1;
    if (g->step < 1 || g->step * g->scale_num / g->scale_den != g->limit ||
        g->step % g->scale_den != 0)
        return kv_error(KLVAE_ERR_OPTION,
                        "tile_size %d with tile_overlap %g does not tile the image: tiles start "
                        "every %d %s but keep %d %s (diffusers' output would change size); "
                        "choose an overlap that makes tile_size * overlap a whole number of "
                        "latents",
                        pixels, overlap, g->step, encode ? "pixels" : "latents", g->limit,
                        encode ? "latents" : "pixels");
    return KLVAE_OK;
}

/* A (n, c, h, w) host array. */
typedef struct host_tile {
    float *data;
    int n, c, h, w;
} host_tile;

static float *at(const host_tile *t, int n, int c, int y, int x)
{
    return t->data + (((size_t)n * t->c + c) * t->h + y) * t->w + x;
}

/* b's first rows (blend_v) or columns (blend_h) = a's last ones weighted
 * by 1 - k / extent plus b's by k / extent, in float as PyTorch computes
 * `a * (1 - k / e) + b * (k / e)`. */
static void blend_v(const host_tile *a, host_tile *b, int extent)
{
    extent = KV_MIN(KV_MIN(a->h, b->h), extent);
    for (int y = 0; y < extent; y++) {
        const float wa = (float)(1.0 - (double)y / extent), wb = (float)((double)y / extent);
        for (int n = 0; n < b->n; n++)
            for (int c = 0; c < b->c; c++) {
                const float *src = at(a, n, c, a->h - extent + y, 0);
                float *dst = at(b, n, c, y, 0);
                for (int x = 0; x < b->w; x++)
                    dst[x] = src[x] * wa + dst[x] * wb;
            }
    }
}

static void blend_h(const host_tile *a, host_tile *b, int extent)
{
    extent = KV_MIN(KV_MIN(a->w, b->w), extent);
    for (int x = 0; x < extent; x++) {
        const float wa = (float)(1.0 - (double)x / extent), wb = (float)((double)x / extent);
        for (int n = 0; n < b->n; n++)
            for (int c = 0; c < b->c; c++)
                for (int y = 0; y < b->h; y++) {
                    float *dst = at(b, n, c, y, x);
                    *dst = *at(a, n, c, y, a->w - extent + x) * wa + *dst * wb;
                }
    }
}

/* ---- one tile through the untiled forward ---- */

/* A backend tensor over a host array: the array itself on a backend with
 * host memory, else a copy (uploaded when upload). */
static klvae_status_t tensor_of(kv_backend *be, float *data, int n, int c, int h, int w,
                                bool upload, kv_tensor *t)
{
    if (be->host_memory) {
        *t = kv_tensor_wrap(data, n, c, h, w);
        return KLVAE_OK;
    }
    klvae_status_t st = kv_tensor_alloc(be, n, c, h, w, t);
    if (st == KLVAE_OK && upload)
        st = be->ops->upload(be, t, data);
    return st;
}

/* out = the untiled forward of in: the decoder's images, or the encoder's
 * moments (before the posterior's clamp, which diffusers applies after
 * blending). */
static klvae_status_t forward_tile(klvae_model_t *m, bool encode, const host_tile *in,
                                   host_tile *out)
{
    kv_backend *be = m->be;
    kv_tensor x = {0}, y = {0};
    klvae_status_t st = tensor_of(be, in->data, in->n, in->c, in->h, in->w, true, &x);
    if (st == KLVAE_OK && encode) {
        st = kv_vae_encode_moments(m, &x, NULL, &y);
        if (st == KLVAE_OK)
            st = be->ops->download(be, out->data, &y);
    } else if (st == KLVAE_OK) {
        st = tensor_of(be, out->data, out->n, out->c, out->h, out->w, false, &y);
        if (st == KLVAE_OK)
            st = kv_vae_decode(m, &x, NULL, &y);
        if (st == KLVAE_OK && !be->host_memory)
            st = be->ops->download(be, out->data, &y);
    }
    kv_tensor_release(be, &x);
    kv_tensor_release(be, &y);
    /* no trim: the next tile, of the same size, reuses this one's memory */
    return st;
}

/* ---- the tiles ---- */

static int tile_count(int size, int step)
{
    return (size + step - 1) / step;
}

/* Rows [y0, y0 + h) and columns [x0, x0 + w) of src into t (allocated). */
static klvae_status_t cut(const host_tile *src, int y0, int x0, int h, int w, host_tile *t)
{
    *t = (host_tile){malloc((size_t)src->n * src->c * h * w * sizeof(float)), src->n, src->c, h, w};
    if (!t->data)
        return kv_error(KLVAE_ERR_OUT_OF_MEMORY, "out of memory for a tile");
    for (int n = 0; n < src->n; n++)
        for (int c = 0; c < src->c; c++)
            for (int y = 0; y < h; y++)
                memcpy(at(t, n, c, y, 0), at(src, n, c, y0 + y, x0), (size_t)w * sizeof(float));
    return KLVAE_OK;
}

/* The first limit rows and columns of t into dst at (y0, x0), clipped. */
static void paste(const host_tile *t, int limit, host_tile *dst, int y0, int x0)
{
    const int h = KV_MIN(KV_MIN(limit, t->h), dst->h - y0);
    const int w = KV_MIN(KV_MIN(limit, t->w), dst->w - x0);
    for (int n = 0; n < t->n; n++)
        for (int c = 0; c < t->c; c++)
            for (int y = 0; y < h; y++)
                memcpy(at(dst, n, c, y0 + y, x0), at(t, n, c, y, 0), (size_t)w * sizeof(float));
}

/* Tile (i, j) of the input through the forward, then blended with the
 * tile above (up) and the one to the left (left), both done already. */
static klvae_status_t run_tile(klvae_model_t *m, bool encode, const blend_geometry *g,
                               const host_tile *in, int i, int j, int out_c, const host_tile *up,
                               const host_tile *left, host_tile *out)
{
    const int y0 = i * g->step, x0 = j * g->step;
    const int h = KV_MIN(g->tile, in->h - y0), w = KV_MIN(g->tile, in->w - x0);
    host_tile part;
    memset(out, 0, sizeof *out);
    klvae_status_t st = cut(in, y0, x0, h, w, &part);
    if (st != KLVAE_OK)
        return st;
    const int oh = h * g->scale_num / g->scale_den, ow = w * g->scale_num / g->scale_den;
    *out = (host_tile){malloc((size_t)in->n * out_c * oh * ow * sizeof(float)), in->n, out_c, oh,
                       ow};
    if (!out->data)
        st = kv_error(KLVAE_ERR_OUT_OF_MEMORY, "out of memory for a tile");
    if (st == KLVAE_OK)
        st = forward_tile(m, encode, &part, out);
    free(part.data);
    if (st != KLVAE_OK) {
        free(out->data);
        out->data = NULL;
        return st;
    }
    if (up)
        blend_v(up, out, g->extent);
    if (left)
        blend_h(left, out, g->extent);
    return KLVAE_OK;
}

static void free_row(host_tile *row, int count)
{
    for (int j = 0; j < count; j++) {
        free(row[j].data);
        row[j].data = NULL;
    }
}

/* The whole tiled forward of in into out (its size in->size * scale). */
static klvae_status_t blend_all(klvae_model_t *m, bool encode, const host_tile *in,
                                host_tile *out)
{
    blend_geometry g;
    klvae_status_t st = geometry_of(m, encode, &g);
    if (st != KLVAE_OK)
        return st;
    const int rows = tile_count(in->h, g.step), cols = tile_count(in->w, g.step);
    host_tile *above = calloc((size_t)cols, sizeof *above), *row = calloc((size_t)cols, sizeof *row);
    if (!above || !row)
        st = kv_error(KLVAE_ERR_OUT_OF_MEMORY, "out of memory for a row of tiles");
    for (int i = 0; st == KLVAE_OK && i < rows; i++) {
        for (int j = 0; st == KLVAE_OK && j < cols; j++) {
            st = run_tile(m, encode, &g, in, i, j, out->c, i ? &above[j] : NULL,
                          j ? &row[j - 1] : NULL, &row[j]);
            if (st == KLVAE_OK)
                paste(&row[j], g.limit, out, i * g.limit, j * g.limit);
        }
        host_tile *done = above;
        free_row(done, cols);
        above = row;
        row = done;
    }
    if (above)
        free_row(above, cols);
    if (row)
        free_row(row, cols);
    free(above);
    free(row);
    return st;
}

klvae_status_t kv_blend_decode(klvae_model_t *m, const kv_forward_plan *plan, const float *z,
                               float *images)
{
    const int f = kv_config_factor(&m->cfg);
    host_tile in = {(float *)z, plan->n, m->cfg.latent_channels, plan->h / f, plan->w / f};
    host_tile out = {images, plan->n, m->cfg.out_channels, plan->h, plan->w};
    return blend_all(m, false, &in, &out);
}

klvae_status_t kv_blend_encode(klvae_model_t *m, const kv_forward_plan *plan,
                               const float *images, float *mean, float *logvar)
{
    const int f = kv_config_factor(&m->cfg), z = m->cfg.latent_channels;
    const int lh = plan->h / f, lw = plan->w / f;
    kv_backend *be = m->be;
    host_tile in = {(float *)images, plan->n, m->cfg.in_channels, plan->h, plan->w};
    host_tile moments = {malloc((size_t)plan->n * 2 * z * lh * lw * sizeof(float)), plan->n,
                         2 * z, lh, lw};
    if (!moments.data)
        return kv_error(KLVAE_ERR_OUT_OF_MEMORY, "out of memory for the blended moments");
    klvae_status_t st = blend_all(m, true, &in, &moments);
    kv_tensor mt = {0}, mu = {0}, lv = {0};
    if (st == KLVAE_OK)
        st = tensor_of(be, moments.data, plan->n, 2 * z, lh, lw, true, &mt);
    if (st == KLVAE_OK)
        st = tensor_of(be, mean, plan->n, z, lh, lw, false, &mu);
    if (st == KLVAE_OK && logvar)
        st = tensor_of(be, logvar, plan->n, z, lh, lw, false, &lv);
    if (st == KLVAE_OK) /* the clamp of logvar comes after blending, as in diffusers */
        st = be->ops->posterior_split(be, &mt, &mu, logvar ? &lv : NULL);
    if (st == KLVAE_OK && !be->host_memory)
        st = be->ops->download(be, mean, &mu);
    if (st == KLVAE_OK && !be->host_memory && logvar)
        st = be->ops->download(be, logvar, &lv);
    kv_tensor_release(be, &mt);
    kv_tensor_release(be, &mu);
    kv_tensor_release(be, &lv);
    free(moments.data);
    return st;
}
