/* geometry.h — where each image of a dataset goes before it is encoded:
 * aspect-ratio buckets, the resize that covers the target, the crop box, and
 * the resampling itself.
 *
 * Every decision here is integer or exactly-rounded arithmetic (no libm), so
 * two machines that encode parts of one dataset place every image alike. */
#ifndef KV_DATASET_GEOMETRY_H
#define KV_DATASET_GEOMETRY_H

#include "base/common.h"

typedef struct kv_bucket {
    int h, w;
} kv_bucket;

/* The buckets of about side x side pixels with sides multiples of step:
 * for each width w = step, 2 step, ... the height h is the largest multiple
 * of step with h w <= side^2; the pair is kept when step <= h <= w and
 * w / h <= max_ratio, and so is its transpose w x h (portrait). Sorted by
 * aspect ratio w / h, then by width. For 1024,64 and ratio 4 the set holds
 * SDXL's 1024 x 1024, 896 x 1152, 832 x 1216, 768 x 1344, 640 x 1536,
 * 576 x 1728 and 512 x 2048 and their transposes (33 in all). *out is
 * malloc'ed (the caller frees it).
 * Errors: KLVAE_ERR_INVALID_ARGUMENT (no bucket: step or max_ratio too
 * small for side), KLVAE_ERR_OUT_OF_MEMORY. */
klvae_status_t kv_buckets_make(int side, int step, double max_ratio, kv_bucket **out,
                               int *count);

/* The index of the bucket whose aspect ratio is nearest that of an h x w
 * image: the smallest max(a / b, b / a) over buckets, with a / b = (bucket
 * w / bucket h) / (w / h), compared exactly; ties go to the larger bucket,
 * then to the lower index. count >= 1. */
int kv_bucket_nearest(const kv_bucket *buckets, int count, int h, int w);

/* How a source image becomes an h x w target. */
typedef struct kv_geometry {
    int src_h, src_w;         /* the image as read */
    int resized_h, resized_w; /* scaled by one factor to cover the target */
    int top, left;            /* the crop's corner in the resized image */
    int h, w;                 /* the target: the crop's size */
} kv_geometry;

/* The resize that covers an h x w target with the fewest pixels: the tight
 * side becomes exactly h (or w), the other is scaled by the same factor and
 * rounded to nearest (halves up), so it is at least the target's; and the
 * crop at the centre (top = (resized_h - h) / 2, rounded down; the same for
 * left). A square target makes the shorter side exactly h. */
void kv_geometry_cover(int src_h, int src_w, int h, int w, kv_geometry *g);

/* Moves the crop to a position drawn from (seed, id): top uniform in
 * [0, resized_h - h], then left in [0, resized_w - w], from the Philox
 * stream with tag "dcrp". */
void kv_geometry_random_crop(kv_geometry *g, uint64_t seed, uint64_t id);

/* The target (3, g->h, g->w) from src (3, g->src_h, g->src_w): the crop of
 * the image resized by antialiased bilinear interpolation, PIL's
 * Image.resize(BILINEAR) (a triangle filter widened by the scale when
 * shrinking, weights normalised; here in float, without PIL's 8-bit
 * rounding). Without a resize (resized = source size) it is the plain crop,
 * pixel for pixel. Errors: KLVAE_ERR_OUT_OF_MEMORY. */
klvae_status_t kv_geometry_apply(const float *src, const kv_geometry *g, float *out);

/* out = img (c, h, w) mirrored left to right; out must not overlap img. */
void kv_mirror(const float *img, int c, int h, int w, float *out);

#endif
