/* procedural.c — kv_procedural_image (data.h): synthetic training images
 * for an autoencoder, made of the pieces real photographs are made of (flat
 * and shaded regions, sharp and soft edges, thin lines, periodic and random
 * textures), with no file to read.
 *
 * An image is a background (flat, linear or radial gradient) and then 3 to
 * 12 elements painted over it in order, each one of:
 *   - a filled shape (circle, ellipse, rectangle with optionally rounded
 *     corners, triangle or convex polygon of up to 8 sides) painted flat or
 *     with a gradient;
 *   - an outlined shape (the same shapes, a ring of random width);
 *   - a texture clipped to a shape: stripes, checkers, a sinusoidal grating
 *     (or two crossed: plaid) at a random angle and period, or smooth value
 *     noise of 1 to 4 octaves;
 *   - a translucent texture covering the whole image;
 *   - a stroke: a polyline or a quadratic curve of random width, sometimes
 *     repeated at an offset as a pattern of parallel strokes.
 * Colours come mostly from a small per-image palette (with jitter), which
 * gives the colour coherence of real scenes. Most elements are opaque with
 * 1-pixel anti-aliased edges; some are translucent, some are blurred (a
 * wider edge ramp, like out-of-focus objects). A quarter of the images get
 * a faint film grain.
 *
 * Edges: every shape has a signed distance d (pixels, negative inside;
 * |d| - w/2 for outlines and strokes) and covers a pixel by
 * smoothstep(clamp(0.5 - d / edge, 0, 1)), edge ~ 1 px.
 *
 * Determinism: all random choices come from one Philox stream keyed by the
 * seed with the counter (block, "proc", lo32(index), hi32(index)). All
 * arithmetic is float or double +, -, *, /, sqrt and floor, correctly
 * rounded in IEEE 754 everywhere, compiled without contraction
 * (-ffp-contract=off), so the same (seed, index, size) gives the same bits
 * on every machine. No libm transcendental is called: angles use
 * kv_det_sincos_2pi from philox.h, gratings a polynomial sine (below).
 *
 * Speed: each element only visits its bounding box, row by row, in chunks of
 * CHUNK pixels; coverage and paint are computed into small row buffers on
 * the stack. No heap memory is used. */
#include <math.h>
#include <string.h>

#include "base/common.h"
#include "base/philox.h"
#include "train/procedural.h"

#define KV_TAG_PROC 0x70726F63u /* "proc" */

#define CHUNK 512
#define MAX_VERTS 8
#define MAX_SEGMENTS 128
#define MAX_OCTAVES 4
#define MAX_CELLS 40
#define LATTICE_SIDE (MAX_CELLS + 1)
#define PALETTE 5

/* ---- random numbers ---- */

typedef kv_philox_stream rng;

static rng rng_start(uint64_t seed, uint64_t index)
{
    return kv_philox_stream_start(seed, KV_TAG_PROC, index);
}

static uint32_t rng_word(rng *r)
{
    return kv_philox_stream_next(r);
}

/* Uniform in [0, 1), 24 bits. */
static float rnd(rng *r)
{
    return (float)(rng_word(r) >> 8) * (1.0f / 16777216.0f);
}

static float rnd_range(rng *r, float lo, float hi)
{
    return lo + (hi - lo) * rnd(r);
}

/* Uniform integer in [lo, hi] (small ranges: the bias of multiply-shift,
 * below 2^-24 here, does not matter for picture content). */
static int rnd_int(rng *r, int lo, int hi)
{
    uint64_t span = (uint64_t)(hi - lo + 1);
    return lo + (int)(((uint64_t)rng_word(r) * span) >> 32);
}

static bool chance(rng *r, float p)
{
    return rnd(r) < p;
}

/* A random direction: the cosine and sine of a uniform angle. */
static void rnd_direction(rng *r, float *c, float *s)
{
    double sd, cd;
    kv_det_sincos_2pi((double)rnd(r), &sd, &cd);
    *c = (float)cd;
    *s = (float)sd;
}

/* ---- small float helpers (exact IEEE operations only) ---- */

static inline float clampf(float v, float lo, float hi)
{
    return v < lo ? lo : (v > hi ? hi : v);
}

static inline float smooth01(float t)
{
    t = clampf(t, 0.0f, 1.0f);
    return t * t * (3.0f - 2.0f * t);
}

/* sin(2 pi u), to about 2e-4: fold into a quarter period and use the
 * degree-7 Taylor polynomial. */
static inline float sin_2pi(float u)
{
    float x = u - floorf(u) - 0.5f; /* sin(2 pi u) = -sin(2 pi x), x in [-0.5, 0.5) */
    if (x > 0.25f)
        x = 0.5f - x;
    else if (x < -0.25f)
        x = -0.5f - x;
    float y = x * 6.28318530717958648f;
    float y2 = y * y;
    float s = y * (1.0f + y2 * (-1.0f / 6.0f + y2 * (1.0f / 120.0f + y2 * (-1.0f / 5040.0f))));
    return -s;
}

/* A soft square wave of period 1 in u, high (1) on [0, duty): coverage of
 * the stripe with a 1-pixel edge, period in pixels. */
static inline float soft_square(float u, float duty, float period)
{
    float f = u - floorf(u);
    float e = f < duty ? fminf(f, duty - f) : -fminf(f - duty, 1.0f - f);
    return smooth01(0.5f + e * period);
}

/* ---- colours ---- */

typedef struct palette {
    float c[PALETTE][3];
} palette;

static void random_colour(rng *r, float out[3])
{
    float lum = rnd_range(r, -0.85f, 0.85f);
    float u = rnd(r);
    float sat = 0.95f * u * u; /* mostly muted, sometimes vivid */
    for (int c = 0; c < 3; c++)
        out[c] = clampf(lum + sat * (2.0f * rnd(r) - 1.0f), -1.0f, 1.0f);
}

static void pick_colour(rng *r, const palette *pal, float out[3])
{
    if (chance(r, 0.25f)) {
        random_colour(r, out);
        return;
    }
    const float *base = pal->c[rnd_int(r, 0, PALETTE - 1)];
    for (int c = 0; c < 3; c++)
        out[c] = clampf(base[c] + rnd_range(r, -0.08f, 0.08f), -1.0f, 1.0f);
}

/* ---- paints ---- */

enum { P_FLAT, P_LINEAR, P_RADIAL, P_STRIPES, P_CHECKERS, P_GRATING, P_NOISE };

typedef struct paint {
    int type;
    float c0[3], c1[3];
    float ox, oy;     /* gradient origin or centre */
    float ux, uy;     /* direction / length or period (u per pixel) */
    float vx, vy;     /* second direction (checkers, plaid) */
    float phase, phase2;
    float duty, period, period2;
    bool plaid;
    float contrast; /* noise */
    int octaves;
    int cells[MAX_OCTAVES];
    float inv_cell[MAX_OCTAVES], amp[MAX_OCTAVES];
    float lattice[MAX_OCTAVES][LATTICE_SIDE * LATTICE_SIDE];
} paint;

static void make_gradient(rng *r, const palette *pal, float S, bool radial, paint *p)
{
    p->type = radial ? P_RADIAL : P_LINEAR;
    pick_colour(r, pal, p->c0);
    pick_colour(r, pal, p->c1);
    p->ox = rnd_range(r, 0.0f, S);
    p->oy = rnd_range(r, 0.0f, S);
    if (radial) {
        p->ux = 1.0f / rnd_range(r, 0.2f * S, 1.2f * S) ; /* 1 / radius */
    } else {
        float c, s, len = rnd_range(r, 0.3f * S, 1.5f * S);
        rnd_direction(r, &c, &s);
        p->ox -= 0.5f * len * c; /* so that the ramp is centred in the image */
        p->oy -= 0.5f * len * s;
        p->ux = c / len;
        p->uy = s / len;
    }
}

static float random_period(rng *r, float S)
{
    float hi = fmaxf(4.0f, 0.25f * S);
    float u = rnd(r);
    return 3.0f + (hi - 3.0f) * u * u;
}

static void make_texture(rng *r, const palette *pal, float S, paint *p)
{
    float u = rnd(r);
    p->type = u < 0.25f ? P_STRIPES : u < 0.45f ? P_CHECKERS : u < 0.7f ? P_GRATING : P_NOISE;
    pick_colour(r, pal, p->c0);
    pick_colour(r, pal, p->c1);
    if (chance(r, 0.5f)) /* make sure the texture shows */
        for (int c = 0; c < 3; c++)
            p->c1[c] = clampf(-p->c0[c] + rnd_range(r, -0.2f, 0.2f), -1.0f, 1.0f);
    float c, s;
    rnd_direction(r, &c, &s);
    p->period = random_period(r, S);
    p->period2 = chance(r, 0.5f) ? p->period : random_period(r, S);
    p->ux = c / p->period;
    p->uy = s / p->period;
    p->vx = -s / p->period2;
    p->vy = c / p->period2;
    p->phase = rnd(r);
    p->phase2 = rnd(r);
    p->duty = rnd_range(r, 0.2f, 0.8f);
    p->plaid = chance(r, 0.3f);
    if (p->type == P_GRATING && p->plaid) { /* the second grating at any angle */
        rnd_direction(r, &c, &s);
        p->vx = c / p->period2;
        p->vy = s / p->period2;
    }
    if (p->type == P_NOISE) {
        int cells = rnd_int(r, 2, 5);
        int limit = KV_MIN(MAX_CELLS, KV_MAX(1, (int)(S / 2.0f)));
        cells = KV_MIN(cells, limit);
        int octaves = rnd_int(r, 1, MAX_OCTAVES);
        float persistence = rnd_range(r, 0.35f, 0.65f), amp = 1.0f, total = 0.0f;
        p->octaves = 0;
        for (int o = 0; o < octaves && cells <= limit; o++) {
            p->cells[o] = cells;
            p->inv_cell[o] = (float)cells / S;
            p->amp[o] = amp;
            total += amp;
            float *lat = p->lattice[o];
            for (int i = 0; i < (cells + 1) * (cells + 1); i++)
                lat[i] = rnd(r);
            p->octaves++;
            amp *= persistence;
            cells *= 2;
        }
        for (int o = 0; o < p->octaves; o++)
            p->amp[o] /= total;
        p->contrast = rnd_range(r, 1.5f, 3.5f);
    }
}

/* The paint of pixels [x0, x1) of the row at py (pixel centre), into
 * rgb[c][x - x0]. t[] is scratch. */
static void paint_row(const paint *p, float py, int x0, int x1, float *t, float *rgb[3])
{
    const int n = x1 - x0;
    if (p->type == P_FLAT) {
        for (int c = 0; c < 3; c++)
            for (int i = 0; i < n; i++)
                rgb[c][i] = p->c0[c];
        return;
    }
    switch (p->type) {
    case P_LINEAR: {
        float base = (py - p->oy) * p->uy;
        for (int i = 0; i < n; i++) {
            float px = (float)(x0 + i) + 0.5f;
            t[i] = clampf((px - p->ox) * p->ux + base, 0.0f, 1.0f);
        }
        break;
    }
    case P_RADIAL: {
        float dy = py - p->oy, dy2 = dy * dy;
        for (int i = 0; i < n; i++) {
            float dx = (float)(x0 + i) + 0.5f - p->ox;
            t[i] = clampf(sqrtf(dx * dx + dy2) * p->ux, 0.0f, 1.0f);
        }
        break;
    }
    case P_STRIPES: {
        float base = py * p->uy + p->phase;
        for (int i = 0; i < n; i++) {
            float px = (float)(x0 + i) + 0.5f;
            t[i] = soft_square(px * p->ux + base, p->duty, p->period);
        }
        break;
    }
    case P_CHECKERS: {
        float bu = py * p->uy + p->phase, bv = py * p->vy + p->phase2;
        for (int i = 0; i < n; i++) {
            float px = (float)(x0 + i) + 0.5f;
            float a = soft_square(px * p->ux + bu, 0.5f, p->period);
            float b = soft_square(px * p->vx + bv, 0.5f, p->period2);
            t[i] = a + b - 2.0f * a * b; /* soft exclusive or */
        }
        break;
    }
    case P_GRATING: {
        float bu = py * p->uy + p->phase, bv = py * p->vy + p->phase2;
        if (p->plaid) {
            for (int i = 0; i < n; i++) {
                float px = (float)(x0 + i) + 0.5f;
                t[i] = 0.5f + 0.25f * (sin_2pi(px * p->ux + bu) + sin_2pi(px * p->vx + bv));
            }
        } else {
            for (int i = 0; i < n; i++) {
                float px = (float)(x0 + i) + 0.5f;
                t[i] = 0.5f + 0.5f * sin_2pi(px * p->ux + bu);
            }
        }
        break;
    }
    case P_NOISE: {
        for (int i = 0; i < n; i++)
            t[i] = 0.0f;
        for (int o = 0; o < p->octaves; o++) {
            const int cells = p->cells[o], side = cells + 1;
            const float inv = p->inv_cell[o], amp = p->amp[o];
            float gy = py * inv;
            int iy = (int)gy;
            if (iy > cells - 1)
                iy = cells - 1;
            float sy = smooth01(gy - (float)iy);
            const float *r0 = p->lattice[o] + iy * side, *r1 = r0 + side;
            for (int i = 0; i < n; i++) {
                float gx = ((float)(x0 + i) + 0.5f) * inv;
                int ix = (int)gx;
                if (ix > cells - 1)
                    ix = cells - 1;
                float sx = smooth01(gx - (float)ix);
                float top = r0[ix] + sx * (r0[ix + 1] - r0[ix]);
                float bottom = r1[ix] + sx * (r1[ix + 1] - r1[ix]);
                t[i] += amp * (top + sy * (bottom - top));
            }
        }
        for (int i = 0; i < n; i++)
            t[i] = clampf(0.5f + (t[i] - 0.5f) * p->contrast, 0.0f, 1.0f);
        break;
    }
    }
    for (int c = 0; c < 3; c++) {
        const float a = p->c0[c], d = p->c1[c] - p->c0[c];
        for (int i = 0; i < n; i++)
            rgb[c][i] = a + t[i] * d;
    }
}

/* ---- shapes ---- */

enum { S_ALL, S_CIRCLE, S_ELLIPSE, S_RECT, S_POLY, S_STROKE };

typedef struct shape {
    int type;
    bool outline;
    float half_width; /* outline or stroke */
    float cx, cy, cs, sn; /* centre; local = rotate(-angle)(p - centre) */
    float a, b, r;        /* radius; half axes; corner radius */
    int nv;
    float vx[MAX_VERTS], vy[MAX_VERTS];
    float nx[MAX_VERTS], ny[MAX_VERTS], off[MAX_VERTS]; /* outward edge lines */
    float ex[MAX_VERTS], ey[MAX_VERTS], inv_len2[MAX_VERTS];
    int nseg;
    float sx[MAX_SEGMENTS], sy[MAX_SEGMENTS], sdx[MAX_SEGMENTS], sdy[MAX_SEGMENTS];
    float sinv[MAX_SEGMENTS], symin[MAX_SEGMENTS], symax[MAX_SEGMENTS];
    float x0, y0, x1, y1; /* bounding box of the shape itself */
} shape;

/* Distance from (px, py) to the segment from (ax, ay) along (dx, dy), squared. */
static inline float segment_dist2(float px, float py, float ax, float ay, float dx, float dy,
                                  float inv_len2)
{
    float qx = px - ax, qy = py - ay;
    float h = clampf((qx * dx + qy * dy) * inv_len2, 0.0f, 1.0f);
    float ex = qx - dx * h, ey = qy - dy * h;
    return ex * ex + ey * ey;
}

/* Signed distances (pixels) of pixels [x0, x1) of the row at py into d[]. */
static void shape_row(const shape *s, float py, int x0, int x1, float band, float *d)
{
    const int n = x1 - x0;
    switch (s->type) {
    case S_ALL:
        for (int i = 0; i < n; i++)
            d[i] = -1e30f;
        return;
    case S_CIRCLE: {
        float dy = py - s->cy, dy2 = dy * dy;
        for (int i = 0; i < n; i++) {
            float dx = (float)(x0 + i) + 0.5f - s->cx;
            d[i] = sqrtf(dx * dx + dy2) - s->a;
        }
        break;
    }
    case S_ELLIPSE: {
        /* Quilez's approximation: exact on the axes, close to 1 px elsewhere
         * near the boundary, which is all the edge ramp needs. */
        const float ia = 1.0f / s->a, ib = 1.0f / s->b, ia2 = ia * ia, ib2 = ib * ib;
        const float dy = py - s->cy;
        for (int i = 0; i < n; i++) {
            float dx = (float)(x0 + i) + 0.5f - s->cx;
            float qx = dx * s->cs + dy * s->sn, qy = dy * s->cs - dx * s->sn;
            float k0 = sqrtf(qx * qx * ia2 + qy * qy * ib2);
            float k1 = sqrtf(qx * qx * ia2 * ia2 + qy * qy * ib2 * ib2);
            d[i] = k1 > 0.0f ? k0 * (k0 - 1.0f) / k1 : -fminf(s->a, s->b);
        }
        break;
    }
    case S_RECT: {
        const float dy = py - s->cy, hx = s->a - s->r, hy = s->b - s->r;
        for (int i = 0; i < n; i++) {
            float dx = (float)(x0 + i) + 0.5f - s->cx;
            float qx = fabsf(dx * s->cs + dy * s->sn) - hx;
            float qy = fabsf(dy * s->cs - dx * s->sn) - hy;
            float mx = fmaxf(qx, 0.0f), my = fmaxf(qy, 0.0f);
            d[i] = sqrtf(mx * mx + my * my) + fminf(fmaxf(qx, qy), 0.0f) - s->r;
        }
        break;
    }
    case S_POLY: {
        for (int i = 0; i < n; i++) {
            float px = (float)(x0 + i) + 0.5f;
            float h = -1e30f;
            for (int k = 0; k < s->nv; k++)
                h = fmaxf(h, px * s->nx[k] + py * s->ny[k] - s->off[k]);
            /* Inside a convex polygon the distance to the nearest edge line
             * is exact; outside it is a lower bound, exact enough beyond
             * the band where the coverage is 0 anyway. */
            if (h > 0.0f && h < band) {
                float best = 1e30f;
                for (int k = 0; k < s->nv; k++)
                    best = fminf(best, segment_dist2(px, py, s->vx[k], s->vy[k], s->ex[k],
                                                     s->ey[k], s->inv_len2[k]));
                h = sqrtf(best);
            }
            d[i] = h;
        }
        break;
    }
    case S_STROKE: {
        for (int i = 0; i < n; i++)
            d[i] = 1e30f; /* squared distances first */
        const float m = band + s->half_width + 2.0f;
        for (int k = 0; k < s->nseg; k++) {
            if (py < s->symin[k] - m || py > s->symax[k] + m)
                continue;
            const float ax = s->sx[k], ay = s->sy[k], dx = s->sdx[k], dy = s->sdy[k];
            /* Points of the row within m of the segment lie within m of
             * the part of the segment whose y is within m of py. */
            float xa, xb;
            if (fabsf(dy) > 1e-6f) {
                float t0 = (py - m - ay) / dy, t1 = (py + m - ay) / dy;
                if (t0 > t1) {
                    float tmp = t0;
                    t0 = t1;
                    t1 = tmp;
                }
                t0 = clampf(t0, 0.0f, 1.0f);
                t1 = clampf(t1, 0.0f, 1.0f);
                xa = ax + t0 * dx;
                xb = ax + t1 * dx;
            } else {
                xa = ax;
                xb = ax + dx;
            }
            if (xa > xb) {
                float tmp = xa;
                xa = xb;
                xb = tmp;
            }
            float fa = clampf(floorf(xa - m) - 1.0f, (float)x0, (float)x1);
            float fb = clampf(floorf(xb + m) + 2.0f, (float)x0, (float)x1);
            for (int x = (int)fa; x < (int)fb; x++) {
                float d2 = segment_dist2((float)x + 0.5f, py, ax, ay, dx, dy, s->sinv[k]);
                d[x - x0] = fminf(d[x - x0], d2);
            }
        }
        for (int i = 0; i < n; i++)
            d[i] = sqrtf(d[i]) - s->half_width;
        return;
    }
    }
    if (s->outline)
        for (int i = 0; i < n; i++)
            d[i] = fabsf(d[i]) - s->half_width;
}

static void random_shape(rng *r, float S, shape *s)
{
    memset(s, 0, offsetof(shape, nseg));
    s->type = S_CIRCLE + rnd_int(r, 0, 3); /* circle, ellipse, rectangle, polygon */
    s->cx = rnd_range(r, -0.1f * S, 1.1f * S);
    s->cy = rnd_range(r, -0.1f * S, 1.1f * S);
    float u = rnd(r);
    float rad = S * (0.04f + 0.36f * u * u);
    s->cs = 1.0f;
    s->sn = 0.0f;
    switch (s->type) {
    case S_CIRCLE:
        s->a = rad;
        s->x0 = s->cx - rad;
        s->x1 = s->cx + rad;
        s->y0 = s->cy - rad;
        s->y1 = s->cy + rad;
        break;
    case S_ELLIPSE:
    case S_RECT: {
        s->a = rad;
        s->b = rad * rnd_range(r, 0.3f, s->type == S_RECT ? 1.2f : 1.0f);
        if (s->type == S_ELLIPSE || chance(r, 0.6f))
            rnd_direction(r, &s->cs, &s->sn);
        if (s->type == S_RECT && chance(r, 0.5f))
            s->r = rnd_range(r, 0.0f, 0.5f) * fminf(s->a, s->b);
        /* Half extents of the rotated box (a bound for the ellipse). */
        float ex = fabsf(s->a * s->cs) + fabsf(s->b * s->sn);
        float ey = fabsf(s->a * s->sn) + fabsf(s->b * s->cs);
        s->x0 = s->cx - ex;
        s->x1 = s->cx + ex;
        s->y0 = s->cy - ey;
        s->y1 = s->cy + ey;
        break;
    }
    case S_POLY: {
        /* Vertices at increasing angles on a circle, squashed and rotated:
         * an affine image of a convex polygon, so convex and counter-
         * clockwise (positive area). Jittered spacing keeps angles open. */
        int k = rnd_int(r, 3, MAX_VERTS);
        float squash = rnd_range(r, 0.4f, 1.0f), c, sn;
        rnd_direction(r, &c, &sn);
        s->nv = k;
        s->x0 = s->y0 = 1e30f;
        s->x1 = s->y1 = -1e30f;
        for (int i = 0; i < k; i++) {
            double si, co;
            kv_det_sincos_2pi(((double)i + 0.7 * (double)rnd(r)) / (double)k, &si, &co);
            float lx = rad * (float)co, ly = rad * squash * (float)si;
            s->vx[i] = s->cx + lx * c - ly * sn;
            s->vy[i] = s->cy + lx * sn + ly * c;
            s->x0 = fminf(s->x0, s->vx[i]);
            s->x1 = fmaxf(s->x1, s->vx[i]);
            s->y0 = fminf(s->y0, s->vy[i]);
            s->y1 = fmaxf(s->y1, s->vy[i]);
        }
        for (int i = 0; i < k; i++) {
            int j = (i + 1) % k;
            float ex = s->vx[j] - s->vx[i], ey = s->vy[j] - s->vy[i];
            float len2 = ex * ex + ey * ey;
            s->ex[i] = ex;
            s->ey[i] = ey;
            if (len2 > 1e-12f) {
                float len = sqrtf(len2);
                s->nx[i] = ey / len;
                s->ny[i] = -ex / len;
                s->off[i] = s->nx[i] * s->vx[i] + s->ny[i] * s->vy[i];
                s->inv_len2[i] = 1.0f / len2;
            } else { /* a point: never the largest half-plane distance */
                s->nx[i] = s->ny[i] = 0.0f;
                s->off[i] = 1e30f;
                s->inv_len2[i] = 0.0f;
            }
        }
        break;
    }
    }
}

static void add_segment(shape *s, float ax, float ay, float bx, float by)
{
    if (s->nseg >= MAX_SEGMENTS)
        return;
    int k = s->nseg++;
    float dx = bx - ax, dy = by - ay, len2 = dx * dx + dy * dy;
    s->sx[k] = ax;
    s->sy[k] = ay;
    s->sdx[k] = dx;
    s->sdy[k] = dy;
    s->sinv[k] = len2 > 1e-12f ? 1.0f / len2 : 0.0f;
    s->symin[k] = fminf(ay, by);
    s->symax[k] = fmaxf(ay, by);
    s->x0 = fminf(s->x0, fminf(ax, bx));
    s->x1 = fmaxf(s->x1, fmaxf(ax, bx));
    s->y0 = fminf(s->y0, s->symin[k]);
    s->y1 = fmaxf(s->y1, s->symax[k]);
}

static void random_stroke(rng *r, float S, shape *s)
{
    memset(s, 0, offsetof(shape, nseg));
    s->nseg = 0;
    s->type = S_STROKE;
    float u = rnd(r);
    s->half_width = 0.5f + (S / 24.0f) * u * u;
    s->x0 = s->y0 = 1e30f;
    s->x1 = s->y1 = -1e30f;
    float px[17], py[17];
    int npts;
    if (chance(r, 0.5f)) { /* polyline: a random walk */
        npts = rnd_int(r, 2, 6);
        px[0] = rnd_range(r, 0.0f, S);
        py[0] = rnd_range(r, 0.0f, S);
        for (int i = 1; i < npts; i++) {
            float c, sn, step = rnd_range(r, 0.1f * S, 0.5f * S);
            rnd_direction(r, &c, &sn);
            px[i] = px[i - 1] + step * c;
            py[i] = py[i - 1] + step * sn;
        }
    } else { /* quadratic Bezier, flattened into 16 segments */
        float p0x = rnd_range(r, -0.1f * S, 1.1f * S), p0y = rnd_range(r, -0.1f * S, 1.1f * S);
        float p1x = rnd_range(r, -0.2f * S, 1.2f * S), p1y = rnd_range(r, -0.2f * S, 1.2f * S);
        float p2x = rnd_range(r, -0.1f * S, 1.1f * S), p2y = rnd_range(r, -0.1f * S, 1.1f * S);
        npts = 17;
        for (int i = 0; i < npts; i++) {
            float t = (float)i / 16.0f, v = 1.0f - t;
            px[i] = v * v * p0x + 2.0f * v * t * p1x + t * t * p2x;
            py[i] = v * v * p0y + 2.0f * v * t * p1y + t * t * p2y;
        }
    }
    int copies = chance(r, 0.7f) ? 1 : rnd_int(r, 2, 5);
    float c, sn, gap = rnd_range(r, 2.0f * s->half_width + 2.0f,
                                 fmaxf(2.0f * s->half_width + 3.0f, 0.12f * S));
    rnd_direction(r, &c, &sn);
    for (int k = 0; k < copies; k++) {
        float ox = (float)k * gap * c, oy = (float)k * gap * sn;
        for (int i = 0; i + 1 < npts; i++)
            add_segment(s, px[i] + ox, py[i] + oy, px[i + 1] + ox, py[i + 1] + oy);
    }
}

/* ---- compositing ---- */

/* Paints shape s with paint p over out (3, size, size): alpha = coverage *
 * opacity, coverage = smoothstep of the signed distance over edge pixels. */
static void render(float *out, int size, const shape *s, const paint *p, float opacity,
                   float edge)
{
    const size_t plane = (size_t)size * (size_t)size;
    const float band = 0.5f * edge + (s->outline ? s->half_width : 0.0f) + 1.0f;
    int x0 = 0, x1 = size, y0 = 0, y1 = size;
    if (s->type != S_ALL) {
        float margin = band + (s->type == S_STROKE ? s->half_width : 0.0f) + 1.0f;
        float fs = (float)size;
        x0 = (int)clampf(floorf(s->x0 - margin), 0.0f, fs);
        x1 = (int)clampf(ceilf(s->x1 + margin) + 1.0f, 0.0f, fs);
        y0 = (int)clampf(floorf(s->y0 - margin), 0.0f, fs);
        y1 = (int)clampf(ceilf(s->y1 + margin) + 1.0f, 0.0f, fs);
    }
    const float inv_edge = 1.0f / edge;
    float cov[CHUNK], t[CHUNK], red[CHUNK], green[CHUNK], blue[CHUNK];
    float *rgb[3] = {red, green, blue};
    for (int y = y0; y < y1; y++) {
        const float py = (float)y + 0.5f;
        for (int xc = x0; xc < x1; xc += CHUNK) {
            const int xe = KV_MIN(xc + CHUNK, x1);
            shape_row(s, py, xc, xe, band, cov);
            int first = -1, last = -1;
            for (int i = 0; i < xe - xc; i++) {
                cov[i] = smooth01(0.5f - cov[i] * inv_edge) * opacity;
                if (cov[i] > 0.0f) {
                    if (first < 0)
                        first = i;
                    last = i;
                }
            }
            if (first < 0)
                continue;
            paint_row(p, py, xc + first, xc + last + 1, t, rgb);
            for (int c = 0; c < 3; c++) {
                float *o = out + (size_t)c * plane + (size_t)y * (size_t)size + (size_t)xc;
                const float *col = rgb[c];
                for (int i = first; i <= last; i++)
                    o[i] += cov[i] * (col[i - first] - o[i]);
            }
        }
    }
}

void kv_procedural_image(uint64_t seed, uint64_t index, int size, float *out)
{
    if (!out || size <= 0)
        return;
    const float S = (float)size;
    const size_t plane = (size_t)size * (size_t)size;
    rng r = rng_start(seed, index);
    /* Both on the stack: the paint holds the noise lattices (27 KiB). */
    paint p;
    shape s;

    palette pal;
    for (int i = 0; i < PALETTE; i++)
        random_colour(&r, pal.c[i]);

    memset(out, 0, 3 * plane * sizeof *out);
    memset(&s, 0, sizeof s);
    s.type = S_ALL;
    int bg = rnd_int(&r, 0, 2);
    if (bg == 0) {
        p.type = P_FLAT;
        pick_colour(&r, &pal, p.c0);
    } else {
        make_gradient(&r, &pal, S, bg == 2, &p);
    }
    render(out, size, &s, &p, 1.0f, 1.0f);

    int elements = rnd_int(&r, 3, 12);
    for (int e = 0; e < elements; e++) {
        float opacity = chance(&r, 0.7f) ? 1.0f : rnd_range(&r, 0.35f, 1.0f);
        float edge = chance(&r, 0.85f) ? rnd_range(&r, 0.8f, 1.5f)
                                       : rnd_range(&r, 2.0f, fmaxf(2.5f, S / 12.0f));
        float kind = rnd(&r);
        if (kind < 0.38f) { /* filled shape, flat or shaded */
            random_shape(&r, S, &s);
            float g = rnd(&r);
            if (g < 0.7f) {
                p.type = P_FLAT;
                pick_colour(&r, &pal, p.c0);
            } else {
                make_gradient(&r, &pal, S, g >= 0.85f, &p);
            }
        } else if (kind < 0.50f) { /* outline */
            random_shape(&r, S, &s);
            s.outline = true;
            float u = rnd(&r);
            s.half_width = 0.5f + fmaxf(0.25f, S / 40.0f) * u * u;
            p.type = P_FLAT;
            pick_colour(&r, &pal, p.c0);
        } else if (kind < 0.65f) { /* texture clipped to a shape */
            random_shape(&r, S, &s);
            make_texture(&r, &pal, S, &p);
        } else if (kind < 0.73f) { /* translucent texture over everything */
            memset(&s, 0, offsetof(shape, nseg));
            s.type = S_ALL;
            make_texture(&r, &pal, S, &p);
            opacity = rnd_range(&r, 0.2f, 0.6f);
        } else { /* strokes */
            random_stroke(&r, S, &s);
            p.type = P_FLAT;
            pick_colour(&r, &pal, p.c0);
        }
        render(out, size, &s, &p, opacity, edge);
    }

    if (chance(&r, 0.25f)) { /* film grain, the same on the three channels */
        float amp = rnd_range(&r, 0.005f, 0.03f);
        for (size_t i = 0; i < plane; i++) {
            float g = (rnd(&r) - 0.5f) * 2.0f * amp;
            for (int c = 0; c < 3; c++)
                out[(size_t)c * plane + i] += g;
        }
    }
    for (size_t i = 0; i < 3 * plane; i++)
        out[i] = clampf(out[i], -1.0f, 1.0f);
}
