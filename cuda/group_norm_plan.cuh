/* group_norm_plan.cuh — how cuda/group_norm.cu splits the statistics of a
 * group norm, and the formula that turns them into (scale, shift). Plain C
 * and __host__ __device__, checked on the CPU by tests/test_cuda_host.c.
 *
 * The values of one (sample, group) are contiguous: (C/G) * H * W of them,
 * 16 Mi at the decoder's last level at 1024^2. One thread block per group
 * would leave most of the GPU idle (N * G = 32 blocks), so each group is cut
 * into chunks by its size alone (never by the GPU's size, so the sums are
 * the same on every GPU); a block sums one chunk in double, and a second
 * kernel adds a group's chunk sums in chunk order. */
#ifndef KV_GROUP_NORM_PLAN_CUH
#define KV_GROUP_NORM_PLAN_CUH

#include "backend/backend.h"

#define KV_GN_CHUNK_MIN 16384 /* values per chunk, at least (but one chunk for small groups) */
#define KV_GN_CHUNKS_MAX 128

/* Chunks of a group of count values. */
static inline KV_HD int kv_gn_chunks(size_t count)
{
    size_t chunks = (count + KV_GN_CHUNK_MIN - 1) / KV_GN_CHUNK_MIN;
    if (chunks < 1)
        chunks = 1;
    return chunks > KV_GN_CHUNKS_MAX ? KV_GN_CHUNKS_MAX : (int)chunks;
}

/* Values [*begin, *end) of the group are chunk k of chunks. */
static inline KV_HD void kv_gn_chunk_range(size_t count, int chunks, int k, size_t *begin,
                                           size_t *end)
{
    *begin = count / (size_t)chunks * (size_t)k + (count % (size_t)chunks) * (size_t)k / (size_t)chunks;
    *end = count / (size_t)chunks * (size_t)(k + 1) +
           (count % (size_t)chunks) * (size_t)(k + 1) / (size_t)chunks;
}

/* backend.h's formula from the group's sum and sum of squares (in double):
 * mean, biased variance (clamped at 0), rstd = 1/sqrt(var + eps),
 * scale = gamma * rstd, shift = beta - scale * mean; the same operations in
 * the same order as src/backend/cpu/group_norm.c. */
static inline KV_HD void kv_gn_finalize(double sum, double sumsq, size_t count, float eps,
                                        float gamma, float beta, float *scale, float *shift,
                                        double *mean_out, double *rstd_out)
{
    double mean = sum / (double)count;
    double var = sumsq / (double)count - mean * mean;
    if (var < 0.0)
        var = 0.0;
    double rstd = 1.0 / sqrt(var + (double)eps);
    float s = (float)(rstd * (double)gamma);
    *scale = s;
    *shift = (float)((double)beta - (double)s * mean);
    *mean_out = mean;
    *rstd_out = rstd;
}

#endif /* KV_GROUP_NORM_PLAN_CUH */
