/* attention_plan.cuh — the query blocks of cuda/attention.cu. Plain C and
 * __host__ __device__, checked on the CPU by tests/test_cuda_host.c.
 *
 * For N positions the scores of one query are N floats; a block of B
 * queries (for every image of the batch at once) needs B * N * batch of
 * them, and in bf16 mode as many bf16 probabilities besides. The block is
 * the largest multiple of 64 queries whose buffers fit in `budget` bytes
 * (at least 64, at most N), so memory grows linearly with N, never as N^2:
 * the mid-block attention of a 1024^2 decode (N = 128^2 = 16384) takes
 * 64 MiB of scores in blocks of 640 queries, where the full matrix would
 * be 1 GiB. */
#ifndef KV_ATTENTION_PLAN_CUH
#define KV_ATTENTION_PLAN_CUH

#include "backend/backend.h"

#define KV_ATTENTION_ALIGN 64

/* Queries per block for n positions, batch images and bytes_per_score
 * bytes of buffers per (query, key) pair. */
static inline KV_HD int kv_attention_block(int n, int batch, size_t bytes_per_score,
                                           size_t budget)
{
    size_t per_query = (size_t)n * (size_t)batch * bytes_per_score;
    size_t b = per_query ? budget / per_query : (size_t)n;
    b = b / KV_ATTENTION_ALIGN * KV_ATTENTION_ALIGN;
    if (b < KV_ATTENTION_ALIGN)
        b = KV_ATTENTION_ALIGN;
    return b > (size_t)n ? n : (int)b;
}

/* Queries in block k: [k * block, k * block + kv_attention_block_size). */
static inline KV_HD int kv_attention_block_size(int n, int block, int k)
{
    int left = n - k * block;
    return left < block ? left : block;
}

#endif /* KV_ATTENTION_PLAN_CUH */
