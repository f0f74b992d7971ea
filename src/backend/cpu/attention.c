/* attention.c — single-head self-attention over image positions, in blocks
 * of query positions so that memory grows linearly with the number of
 * positions: a block of KV_ATTENTION_BLOCK queries needs one
 * (block x N) score buffer per thread, never the full N x N matrix. */
#include <cblas.h>
#include <math.h>
#include <string.h>

#include "backend/cpu/bf16_gemm.h"
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

/* ---- bf16 products (precision=bf16) ----
 * The same blocks of queries, with both products on the bf16 kernel: per
 * image, K is packed once as the right operand of the scores and V as the
 * left operand of the output (out = V P^T, so the output block is written
 * in place, channel-major); per block, the queries and the probabilities
 * are packed. The softmax stays float32 with its sum in double. Blocks are
 * two kernel blocks of queries wide (96). */

#define KV_ATTENTION_BF16_BLOCK (2 * KV_BF16_NR)

typedef struct attention_bf16_job {
    const float *q, *k, *v; /* this image */
    float *out;
    uint32_t *kp, *vp; /* K packed as B (channels x positions), V as A */
    int channels, positions;
    float scale;
    size_t s_floats, q_words; /* scratch: scores, then packed queries, then P */
    kv_cpu *cpu;
} attention_bf16_job;

static void pack_k_task(void *arg, int task, int thread)
{
    (void)thread;
    const attention_bf16_job *j = arg;
    const int n0 = task * KV_BF16_NR, n = KV_MIN(KV_BF16_NR, j->positions - n0);
    kv_bf16_pack_b(j->k + n0, (size_t)j->positions, 1, j->channels, n,
                   j->kp + (size_t)n0 * kv_bf16_pairs(j->channels));
}

static void pack_v_task(void *arg, int task, int thread)
{
    (void)thread;
    const attention_bf16_job *j = arg;
    const int c0 = task * KV_BF16_MR, c = KV_MIN(KV_BF16_MR, j->channels - c0);
    kv_bf16_pack_a(j->v + (size_t)c0 * j->positions, (size_t)j->positions, 1, c, j->positions,
                   j->vp + (size_t)c0 * kv_bf16_pairs(j->positions));
}

static void attention_bf16_task(void *arg, int task, int thread)
{
    const attention_bf16_job *j = arg;
    const int C = j->channels, N = j->positions;
    const int n0 = task * KV_ATTENTION_BF16_BLOCK, rows = KV_MIN(KV_ATTENTION_BF16_BLOCK, N - n0);
    float *scores = j->cpu->scratch[thread];
    uint32_t *qa = (uint32_t *)(scores + j->s_floats), *pb = qa + j->q_words;
    /* scores[r, m] = sum_c q[c, n0 + r] k[c, m], then scaled */
    kv_bf16_pack_a(j->q + n0, 1, (size_t)N, rows, C, qa);
    kv_bf16_gemm(rows, N, kv_bf16_pairs(C), qa, j->kp, scores, (size_t)N, false);
    for (size_t i = 0; i < (size_t)rows * N; i++)
        scores[i] *= j->scale;
    softmax_rows(scores, rows, N);
    /* out[c, n0 + r] = sum_m v[c, m] p[r, m]: P^T (positions x rows) as B */
    kv_bf16_pack_b(scores, 1, (size_t)N, N, rows, pb);
    kv_bf16_gemm(C, rows, kv_bf16_pairs(N), j->vp, pb, j->out + n0, (size_t)N, false);
}

static klvae_status_t attention_bf16(kv_cpu *cpu, const kv_tensor *q, const kv_tensor *k,
                                     const kv_tensor *v, float scale, kv_tensor *out)
{
    attention_bf16_job j;
    memset(&j, 0, sizeof j);
    j.channels = q->shape[1];
    j.positions = q->shape[2] * q->shape[3];
    j.scale = scale;
    j.cpu = cpu;
    const int C = j.channels, N = j.positions;
    j.s_floats = (size_t)KV_ATTENTION_BF16_BLOCK * N;
    j.q_words = kv_bf16_a_words(KV_ATTENTION_BF16_BLOCK, C);
    const size_t kp_words = kv_bf16_b_words(C, N), vp_words = kv_bf16_a_words(C, N);
    klvae_status_t st = kv_cpu_reserve_scratch(
        cpu, j.s_floats + j.q_words + kv_bf16_b_words(N, KV_ATTENTION_BF16_BLOCK));
    if (st == KLVAE_OK)
        st = kv_cpu_reserve_shared(cpu, kp_words + vp_words);
    if (st != KLVAE_OK)
        return st;
    j.kp = (uint32_t *)cpu->shared;
    j.vp = j.kp + kp_words;
    const int blocks = (N + KV_ATTENTION_BF16_BLOCK - 1) / KV_ATTENTION_BF16_BLOCK;
    for (int b = 0; b < q->shape[0]; b++) {
        const size_t offset = (size_t)b * C * N;
        j.q = (const float *)q->data + offset;
        j.k = (const float *)k->data + offset;
        j.v = (const float *)v->data + offset;
        j.out = (float *)out->data + offset;
        kv_pool_run(cpu->pool, (N + KV_BF16_NR - 1) / KV_BF16_NR, pack_k_task, &j);
        kv_pool_run(cpu->pool, (C + KV_BF16_MR - 1) / KV_BF16_MR, pack_v_task, &j);
        kv_pool_run(cpu->pool, blocks, attention_bf16_task, &j);
    }
    return KLVAE_OK;
}

klvae_status_t kv_cpu_attention(kv_backend *be, const kv_tensor *q, const kv_tensor *k,
                                const kv_tensor *v, float scale, kv_tensor *out)
{
    kv_cpu *cpu = kv_cpu_of(be);
    if (cpu->bf16)
        return attention_bf16(cpu, q, k, v, scale, out);
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
