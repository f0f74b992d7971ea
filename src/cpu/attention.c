/* attention.c — single-head self-attention over image positions, in blocks
 * of query positions so that memory grows linearly with the number of
 * positions: a block of KV_ATTENTION_BLOCK queries needs one
 * (block x N) score buffer per thread, never the full N x N matrix. */
#include <cblas.h>
#include <math.h>
#include <string.h>

#include "cpu_ops.h"

#define KV_ATTENTION_BLOCK 64

typedef struct attention_job {
    const float *q, *k, *v;
    float *out;
    int channels, positions, blocks;
    float scale;
    kv_cpu *cpu;
} attention_job;

static void softmax_rows(float *scores, int rows, int cols)
{
    for (int r = 0; r < rows; r++) {
        float *row = scores + (size_t)r * cols;
        float max = row[0];
        for (int m = 1; m < cols; m++)
            if (row[m] > max)
                max = row[m];
        double sum = 0.0;
        for (int m = 0; m < cols; m++) {
            row[m] = expf(row[m] - max);
            sum += row[m];
        }
        double inv = 1.0 / sum;
        for (int m = 0; m < cols; m++)
            row[m] = (float)((double)row[m] * inv);
    }
}

static void attention_task(void *arg, int task, int thread)
{
    const attention_job *j = arg;
    const int C = j->channels, N = j->positions;
    int b = task / j->blocks, blk = task % j->blocks;
    int n0 = blk * KV_ATTENTION_BLOCK, rows = KV_MIN(KV_ATTENTION_BLOCK, N - n0);
    size_t offset = (size_t)b * C * N;
    const float *q = j->q + offset, *k = j->k + offset, *v = j->v + offset;
    float *out = j->out + offset;
    float *scores = j->cpu->scratch[thread];
    /* scores[r, m] = scale * sum_c q[c, n0 + r] k[c, m] */
    cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, rows, N, C, j->scale, q + n0, N, k, N,
                0.0f, scores, N);
    softmax_rows(scores, rows, N);
    /* out[c, n0 + r] = sum_m v[c, m] p[r, m] */
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, C, rows, N, 1.0f, v, N, scores, N, 0.0f,
                out + n0, N);
}

klvae_status_t kv_cpu_attention(kv_backend *be, const kv_tensor *q, const kv_tensor *k,
                                const kv_tensor *v, float scale, kv_tensor *out)
{
    kv_cpu *cpu = kv_cpu_of(be);
    attention_job j;
    memset(&j, 0, sizeof j);
    j.q = q->data;
    j.k = k->data;
    j.v = v->data;
    j.out = out->data;
    j.channels = q->shape[1];
    j.positions = q->shape[2] * q->shape[3];
    j.blocks = (j.positions + KV_ATTENTION_BLOCK - 1) / KV_ATTENTION_BLOCK;
    j.scale = scale;
    j.cpu = cpu;
    klvae_status_t st = kv_cpu_reserve_scratch(cpu, (size_t)KV_ATTENTION_BLOCK * j.positions);
    if (st != KLVAE_OK)
        return st;
    kv_pool_run(cpu->pool, q->shape[0] * j.blocks, attention_task, &j);
    return KLVAE_OK;
}
