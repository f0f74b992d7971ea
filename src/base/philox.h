/* philox.h — the counter-based normal generator behind klvae_sample, shared
 * verbatim by the CPU backend and the CUDA kernels.
 *
 * Why it looks like this: the same seed must give the same eps bits on every
 * backend and for every thread count. A counter-based generator
 * (Philox-4x32-10, Salmon et al., SC'11) makes element i depend only on
 * (seed, i). Box-Muller then needs log, sqrt, sin and cos, and libm's and
 * CUDA's versions differ in the last bits. So log, sincos and exp are written
 * here with only IEEE operations that are correctly rounded everywhere
 * (+, -, *, /, sqrt, fma, floor, frexp, ldexp), in double, with every
 * multiply-add an explicit fma. Compile users of this file without FP
 * contraction (-ffp-contract=off; nvcc: the explicit fma calls and
 * separately rounded float ops in the kernel).
 *
 * Layout: counter j = (lo32(j), hi32(j), 0, 0), key = (lo32(seed),
 * hi32(seed)). Its four output words give u1 = (1 + top 53 bits of w0:w1) *
 * 2^-53 in (0, 1] and u2 = (top 53 bits of w2:w3) * 2^-53 in [0, 1), and
 * eps[2j] = r cos(2 pi u2), eps[2j + 1] = r sin(2 pi u2), r = sqrt(-2 ln u1).
 */
#ifndef KV_PHILOX_H
#define KV_PHILOX_H

#include <math.h>
#include <stdint.h>

#include "base/numerics.h" /* KV_HD, kv_clamp_logvar */

typedef struct kv_philox_block {
    uint32_t w[4];
} kv_philox_block;

static inline KV_HD void kv_philox_mulhilo(uint32_t a, uint32_t b, uint32_t *hi, uint32_t *lo)
{
    uint64_t product = (uint64_t)a * (uint64_t)b;
    *hi = (uint32_t)(product >> 32);
    *lo = (uint32_t)product;
}

/* Philox-4x32 with 10 rounds on a full 128-bit counter and 64-bit key. */
static inline KV_HD kv_philox_block kv_philox4x32_10_full(const uint32_t counter[4],
                                                          const uint32_t key[2])
{
    uint32_t c0 = counter[0], c1 = counter[1], c2 = counter[2], c3 = counter[3];
    uint32_t k0 = key[0], k1 = key[1];
    for (int round = 0; round < 10; round++) {
        uint32_t hi0, lo0, hi1, lo1;
        kv_philox_mulhilo(0xD2511F53u, c0, &hi0, &lo0);
        kv_philox_mulhilo(0xCD9E8D57u, c2, &hi1, &lo1);
        uint32_t n0 = hi1 ^ c1 ^ k0, n1 = lo1, n2 = hi0 ^ c3 ^ k1, n3 = lo0;
        c0 = n0;
        c1 = n1;
        c2 = n2;
        c3 = n3;
        k0 += 0x9E3779B9u;
        k1 += 0xBB67AE85u;
    }
    kv_philox_block out = {{c0, c1, c2, c3}};
    return out;
}

/* The generator as libklvae uses it: counter (lo32, hi32, 0, 0). */
static inline KV_HD kv_philox_block kv_philox4x32_10(uint64_t counter, uint64_t seed)
{
    uint32_t c[4] = {(uint32_t)counter, (uint32_t)(counter >> 32), 0, 0};
    uint32_t k[2] = {(uint32_t)seed, (uint32_t)(seed >> 32)};
    return kv_philox4x32_10_full(c, k);
}

/* ln(u) for u in (0, 1], to about 1 ulp. */
static inline KV_HD double kv_det_log(double u)
{
    int e;
    double m = frexp(u, &e); /* u = m * 2^e, m in [0.5, 1) */
    if (m < 0.70710678118654752440) {
        m = m * 2.0;
        e = e - 1;
    }
    double s = (m - 1.0) / (m + 1.0); /* |s| <= 0.1716 */
    double s2 = s * s;
    /* ln m = 2 (s + s^3/3 + s^5/5 + ...), 11 terms: error < 1e-18 */
    double p = 1.0 / 21.0;
    p = fma(p, s2, 1.0 / 19.0);
    p = fma(p, s2, 1.0 / 17.0);
    p = fma(p, s2, 1.0 / 15.0);
    p = fma(p, s2, 1.0 / 13.0);
    p = fma(p, s2, 1.0 / 11.0);
    p = fma(p, s2, 1.0 / 9.0);
    p = fma(p, s2, 1.0 / 7.0);
    p = fma(p, s2, 1.0 / 5.0);
    p = fma(p, s2, 1.0 / 3.0);
    double s3 = s2 * s;
    double log_m = fma(2.0 * s3, p, 2.0 * s);
    const double ln2_hi = 6.93147180369123816490e-01; /* 0x3FE62E42FEE00000 */
    const double ln2_lo = 1.90821492927058770002e-10; /* 0x3DEA39EF35793C76 */
    double de = (double)e;
    return fma(de, ln2_hi, fma(de, ln2_lo, log_m));
}

/* sin and cos of 2 pi u for u in [0, 1). */
static inline KV_HD void kv_det_sincos_2pi(double u, double *sin_out, double *cos_out)
{
    double t = u * 4.0;              /* exact */
    double k = floor(t + 0.5);       /* nearest quarter turn, exact */
    double f = t - k;                /* in [-0.5, 0.5], exact */
    const double pio2_hi = 1.57079632679489655800e+00;
    const double pio2_lo = 6.12323399573676603587e-17;
    double r = fma(f, pio2_hi, f * pio2_lo); /* |r| <= pi/4 */
    double r2 = r * r;
    /* Taylor series; at |r| <= pi/4 the first omitted terms are < 1e-19. */
    double ps = -1.0 / 121645100408832000.0; /* -1/19! */
    ps = fma(ps, r2, 1.0 / 355687428096000.0);
    ps = fma(ps, r2, -1.0 / 1307674368000.0);
    ps = fma(ps, r2, 1.0 / 6227020800.0);
    ps = fma(ps, r2, -1.0 / 39916800.0);
    ps = fma(ps, r2, 1.0 / 362880.0);
    ps = fma(ps, r2, -1.0 / 5040.0);
    ps = fma(ps, r2, 1.0 / 120.0);
    ps = fma(ps, r2, -1.0 / 6.0);
    double sin_r = fma(r * r2, ps, r);
    double pc = 1.0 / 6402373705728000.0; /* 1/18! */
    pc = fma(pc, r2, -1.0 / 20922789888000.0);
    pc = fma(pc, r2, 1.0 / 87178291200.0);
    pc = fma(pc, r2, -1.0 / 479001600.0);
    pc = fma(pc, r2, 1.0 / 3628800.0);
    pc = fma(pc, r2, -1.0 / 40320.0);
    pc = fma(pc, r2, 1.0 / 720.0);
    pc = fma(pc, r2, -1.0 / 24.0);
    pc = fma(pc, r2, 0.5);
    double cos_r = fma(-r2, pc, 1.0);
    int quadrant = (int)k & 3;
    switch (quadrant) {
    case 0: *sin_out = sin_r; *cos_out = cos_r; break;
    case 1: *sin_out = cos_r; *cos_out = -sin_r; break;
    case 2: *sin_out = -sin_r; *cos_out = -cos_r; break;
    default: *sin_out = -cos_r; *cos_out = sin_r; break;
    }
}

/* exp(x) for x in [-30, 30], to about 1 ulp. */
static inline KV_HD double kv_det_exp(double x)
{
    if (!(x == x))
        return x; /* NaN stays NaN */
    const double inv_ln2 = 1.44269504088896338700e+00;
    const double ln2_hi = 6.93147180369123816490e-01;
    const double ln2_lo = 1.90821492927058770002e-10;
    double k = floor(fma(x, inv_ln2, 0.5));
    double r = fma(-k, ln2_lo, fma(-k, ln2_hi, x)); /* |r| <= 0.35 */
    double p = 1.0 / 87178291200.0;                /* 1/14! */
    p = fma(p, r, 1.0 / 6227020800.0);
    p = fma(p, r, 1.0 / 479001600.0);
    p = fma(p, r, 1.0 / 39916800.0);
    p = fma(p, r, 1.0 / 3628800.0);
    p = fma(p, r, 1.0 / 362880.0);
    p = fma(p, r, 1.0 / 40320.0);
    p = fma(p, r, 1.0 / 5040.0);
    p = fma(p, r, 1.0 / 720.0);
    p = fma(p, r, 1.0 / 120.0);
    p = fma(p, r, 1.0 / 24.0);
    p = fma(p, r, 1.0 / 6.0);
    p = fma(p, r, 0.5);
    p = fma(p, r, 1.0);
    p = fma(p, r, 1.0);
    return ldexp(p, (int)k);
}

/* The pair of standard normals for counter j: eps[2j] and eps[2j + 1]. */
static inline KV_HD void kv_philox_normal_pair(uint64_t seed, uint64_t j, float *e0, float *e1)
{
    kv_philox_block b = kv_philox4x32_10(j, seed);
    uint64_t a = ((uint64_t)b.w[0] << 32) | b.w[1];
    uint64_t c = ((uint64_t)b.w[2] << 32) | b.w[3];
    const double two_m53 = 1.0 / 9007199254740992.0;
    double u1 = (double)((a >> 11) + 1) * two_m53; /* (0, 1] */
    double u2 = (double)(c >> 11) * two_m53;       /* [0, 1) */
    double radius = sqrt(-2.0 * kv_det_log(u1));
    double s, co;
    kv_det_sincos_2pi(u2, &s, &co);
    *e0 = (float)(radius * co);
    *e1 = (float)(radius * s);
}

/* eps[i] for element i of the tensor. */
static inline KV_HD float kv_philox_normal(uint64_t seed, uint64_t i)
{
    float e0, e1;
    kv_philox_normal_pair(seed, i >> 1, &e0, &e1);
    return (i & 1) ? e1 : e0;
}

/* The standard deviation used by gaussian_sample for a logvar value. */
static inline KV_HD float kv_posterior_std(float logvar)
{
    return (float)kv_det_exp(0.5 * (double)kv_clamp_logvar(logvar));
}

/* A uniform float in [0, 1) for element i (24 bits), used for seeded
 * weight initialisation. */
static inline KV_HD float kv_philox_uniform(uint64_t seed, uint64_t i)
{
    kv_philox_block b = kv_philox4x32_10(i >> 2, seed);
    return (float)(b.w[i & 3] >> 8) * (1.0f / 16777216.0f);
}

/* A stream of 32-bit words for sequential draws (data order, crops,
 * procedural pictures): block k of the stream for (seed, tag, id) is
 * Philox(counter (k, tag, lo32(id), hi32(id)), key (lo32(seed),
 * hi32(seed))), its four words used in order. A tag keeps the streams of
 * different purposes apart for the same seed and id. */
typedef struct kv_philox_stream {
    uint32_t counter[4];
    uint32_t key[2];
    kv_philox_block block;
    int used;
} kv_philox_stream;

static inline KV_HD kv_philox_stream kv_philox_stream_start(uint64_t seed, uint32_t tag,
                                                            uint64_t id)
{
    kv_philox_stream s;
    s.counter[0] = 0;
    s.counter[1] = tag;
    s.counter[2] = (uint32_t)id;
    s.counter[3] = (uint32_t)(id >> 32);
    s.key[0] = (uint32_t)seed;
    s.key[1] = (uint32_t)(seed >> 32);
    s.used = 4;
    return s;
}

static inline KV_HD uint32_t kv_philox_stream_next(kv_philox_stream *s)
{
    if (s->used == 4) {
        s->block = kv_philox4x32_10_full(s->counter, s->key);
        s->counter[0]++;
        s->used = 0;
    }
    return s->block.w[s->used++];
}

/* Exactly uniform in [0, bound), bound >= 1 (Lemire 2019). */
static inline KV_HD uint32_t kv_philox_stream_below(kv_philox_stream *s, uint32_t bound)
{
    uint64_t m = (uint64_t)kv_philox_stream_next(s) * bound;
    uint32_t low = (uint32_t)m;
    if (low < bound) {
        uint32_t threshold = (uint32_t)(0u - bound) % bound;
        while (low < threshold) {
            m = (uint64_t)kv_philox_stream_next(s) * bound;
            low = (uint32_t)m;
        }
    }
    return (uint32_t)(m >> 32);
}

#endif /* KV_PHILOX_H */
