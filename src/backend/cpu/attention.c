/* attention.c — single-head self-attention over image positions, in blocks
 * of query positions so that memory grows linearly with the number of
 * positions: a block of KV_ATTENTION_BLOCK queries needs one
 * (block x N) score buffer per thread, never the full N x N matrix. */
#include <cblas.h>
#include <math.h>
#include <string.h>

#include "backend/cpu/cpu_ops.h"

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

/* ---- backward ----
 * With P = softmax(scale q^T k) (N x N, recomputed), out = v P^T, so
 *   dv = dout P,  dP = dout^T v,  dS = P .* (dP - rowsum(P .* dP)),
 *   dq = scale k dS^T,  dk = scale q dS.
 * The N x N matrices are held whole, one image at a time: training runs at
 * sizes where that is small (N = 1024 at 256^2 for the SD config: 4 MB). */

typedef struct softmax_job {
    float *scores;
    int n;
} softmax_job;

static void softmax_task(void *arg, int task, int thread)
{
    (void)thread;
    const softmax_job *j = arg;
    int r0 = task * KV_ATTENTION_BLOCK, r1 = KV_MIN(j->n, r0 + KV_ATTENTION_BLOCK);
    softmax_rows(j->scores + (size_t)r0 * j->n, r1 - r0, j->n);
}

typedef struct dsoftmax_job {
    const float *p;
    float *dp; /* becomes dS */
    int n;
} dsoftmax_job;

static void dsoftmax_task(void *arg, int task, int thread)
{
    (void)thread;
    const dsoftmax_job *j = arg;
    int r0 = task * KV_ATTENTION_BLOCK, r1 = KV_MIN(j->n, r0 + KV_ATTENTION_BLOCK);
    for (int r = r0; r < r1; r++) {
        const float *p = j->p + (size_t)r * j->n;
        float *dp = j->dp + (size_t)r * j->n;
        double dot = 0.0;
        for (int m = 0; m < j->n; m++)
            dot += (double)p[m] * dp[m];
        for (int m = 0; m < j->n; m++)
            dp[m] = p[m] * (float)((double)dp[m] - dot);
    }
}

klvae_status_t kv_cpu_attention_backward(kv_backend *be, const kv_tensor *q, const kv_tensor *k,
                                         const kv_tensor *v, float scale, const kv_tensor *dout,
                                         kv_tensor *dq, kv_tensor *dk, kv_tensor *dv)
{
    kv_cpu *cpu = kv_cpu_of(be);
    const int C = q->shape[1], N = q->shape[2] * q->shape[3];
    kv_tensor pt, dpt;
    klvae_status_t st = kv_tensor_alloc(be, 1, 1, N, N, &pt);
    if (st != KLVAE_OK)
        return st;
    st = kv_tensor_alloc(be, 1, 1, N, N, &dpt);
    if (st != KLVAE_OK) {
        kv_tensor_release(be, &pt);
        return st;
    }
    float *P = pt.data, *dP = dpt.data;
    const int blocks = (N + KV_ATTENTION_BLOCK - 1) / KV_ATTENTION_BLOCK;
    for (int b = 0; b < q->shape[0]; b++) {
        const size_t off = (size_t)b * C * N;
        const float *Q = (const float *)q->data + off, *K = (const float *)k->data + off,
                    *V = (const float *)v->data + off, *dO = (const float *)dout->data + off;
        float *dQ = (float *)dq->data + off, *dK = (float *)dk->data + off,
              *dV = (float *)dv->data + off;
        kv_cpu_gemm(cpu, CblasTrans, CblasNoTrans, N, N, C, scale, Q, N, K, N, 0.0f, P, N);
        softmax_job sj = {P, N};
        kv_pool_run(cpu->pool, blocks, softmax_task, &sj);
        kv_cpu_gemm(cpu, CblasNoTrans, CblasNoTrans, C, N, N, 1.0f, dO, N, P, N, 0.0f, dV, N);
        kv_cpu_gemm(cpu, CblasTrans, CblasNoTrans, N, N, C, 1.0f, dO, N, V, N, 0.0f, dP, N);
        dsoftmax_job dj = {P, dP, N};
        kv_pool_run(cpu->pool, blocks, dsoftmax_task, &dj);
        kv_cpu_gemm(cpu, CblasNoTrans, CblasTrans, C, N, N, scale, K, N, dP, N, 0.0f, dQ, N);
        kv_cpu_gemm(cpu, CblasNoTrans, CblasNoTrans, C, N, N, scale, Q, N, dP, N, 0.0f, dK, N);
    }
    kv_tensor_release(be, &pt);
    kv_tensor_release(be, &dpt);
    return KLVAE_OK;
}
