/* attention.cu — single-head self-attention over the N = H*W positions of
 * (B, C, H, W) tensors in the backend's layout, in blocks of queries so that
 * memory grows linearly with N (cuda/attention_plan.cuh), as
 * src/backend/cpu/attention.c.
 *
 * For a block of queries [n0, n0 + nb), in column-major terms (cuBLAS's):
 *   S (N x nb, ld N) = scale * K^T Q_blk   (column j: the scores of query n0 + j)
 *   P = softmax of each column of S        (the CPU's row softmax)
 *   out_blk = V P
 * two strided-batched GEMMs over the batch and one softmax kernel, where an
 * image's q, k, v and out are C x N matrices of leading dimension C in NHWC
 * (a position's channels are contiguous) and N x C matrices of leading
 * dimension N in NCHW (the same products, transposed). S is float32 in every
 * mode; in bf16 mode P is bf16 in its own buffer and the GEMMs take bf16
 * operands with float32 accumulation.
 *
 * cuDNN's fused attention does not take a head dimension of 512 (the VAE's
 * single head has all 512 channels), so the mid-block attention is these
 * GEMMs; it is one layer at 1/64 of the image's positions. */
#include "attention_plan.cuh"
#include "cuda_ops.h"

#define SOFTMAX_THREADS 256

static __device__ __forceinline__ float block_max(float v, float *shared)
{
    for (int offset = 16; offset > 0; offset >>= 1)
        v = fmaxf(v, __shfl_xor_sync(0xFFFFFFFFu, v, offset));
    if (threadIdx.x % 32 == 0)
        shared[threadIdx.x / 32] = v;
    __syncthreads();
    v = shared[0];
    for (int w = 1; w < SOFTMAX_THREADS / 32; w++)
        v = fmaxf(v, shared[w]);
    __syncthreads();
    return v;
}

static __device__ __forceinline__ double block_sum(double v, double *shared)
{
    for (int offset = 16; offset > 0; offset >>= 1)
        v += __shfl_xor_sync(0xFFFFFFFFu, v, offset);
    if (threadIdx.x % 32 == 0)
        shared[threadIdx.x / 32] = v;
    __syncthreads();
    v = shared[0];
    for (int w = 1; w < SOFTMAX_THREADS / 32; w++)
        v += shared[w];
    __syncthreads();
    return v;
}

/* Column (blockIdx.x, image blockIdx.y) of the scores: p = exp(s - max) /
 * sum, the sum in double, as the CPU's softmax_rows. probs may be the
 * scores themselves (float32 mode). */
static __global__ void __launch_bounds__(SOFTMAX_THREADS)
    softmax_kernel(float *scores, void *probs, int p16, int n, int block)
{
    __shared__ float fshared[SOFTMAX_THREADS / 32];
    __shared__ double dshared[SOFTMAX_THREADS / 32];
    const size_t column = (size_t)blockIdx.y * block + blockIdx.x;
    const float *s = scores + column * n;
    float m = -INFINITY;
    for (int i = threadIdx.x; i < n; i += SOFTMAX_THREADS)
        m = fmaxf(m, s[i]);
    m = block_max(m, fshared);
    double sum = 0.0;
    for (int i = threadIdx.x; i < n; i += SOFTMAX_THREADS)
        sum += (double)expf(s[i] - m);
    sum = block_sum(sum, dshared);
    const double inv = 1.0 / sum;
    const size_t base = column * n;
    for (int i = threadIdx.x; i < n; i += SOFTMAX_THREADS)
        kv_st(probs, p16, base + i, (float)((double)expf(s[i] - m) * inv));
}

static cudaDataType_t cuda_type(kv_cuda_dtype t)
{
    return t == KV_CUDA_BF16 ? CUDA_R_16BF : CUDA_R_32F;
}

/* The geometry of one call's GEMMs: a position's offset and the leading
 * dimension of q, k, v and out in the layout, the dtypes, the batch. */
struct attention_gemm {
    int batch, c, n, block, ld;
    size_t position, es;
    long long image, column_block;
    cudaDataType_t dt;
    cublasComputeType_t compute;
};

static attention_gemm gemm_geometry(const kv_cuda *cu, int batch, int c, int n, int block)
{
    attention_gemm g;
    g.batch = batch;
    g.c = c;
    g.n = n;
    g.block = block;
    g.position = cu->nhwc ? (size_t)c : 1; /* where query (or output position) k0 starts */
    g.ld = cu->nhwc ? c : n;
    g.es = kv_cuda_esize(cu->compute);
    g.image = (long long)c * n;
    g.column_block = (long long)block * n;
    g.dt = cuda_type(cu->compute);
    g.compute = cu->precision == KV_PRECISION_TF32 ? CUBLAS_COMPUTE_32F_FAST_TF32
                                                   : CUBLAS_COMPUTE_32F;
    return g;
}

/* P of the query block at q_blk (nb queries): scores = scale K^T Q_blk (NHWC)
 * or scale K Q_blk^T (NCHW), both N x nb, then the softmax of each column
 * into probs (bf16), or in place (float32). */
static klvae_status_t block_probabilities(kv_cuda *cu, const attention_gemm *g, int nb,
                                          const void *kp, const void *q_blk, float scale,
                                          float *scores, void *probs)
{
    const float zero = 0.0f;
    KV_CUBLAS(cu, cublasGemmStridedBatchedEx(
                      cu->cublas, cu->nhwc ? CUBLAS_OP_T : CUBLAS_OP_N,
                      cu->nhwc ? CUBLAS_OP_N : CUBLAS_OP_T, g->n, nb, g->c, &scale, kp, g->dt,
                      g->ld, g->image, q_blk, g->dt, g->ld, g->image, &zero, scores, CUDA_R_32F,
                      g->n, g->column_block, g->batch, g->compute, CUBLAS_GEMM_DEFAULT));
    softmax_kernel<<<dim3(nb, g->batch), SOFTMAX_THREADS, 0, cu->stream>>>(
        scores, probs, cu->compute == KV_CUDA_BF16, g->n, g->block);
    KV_LAUNCHED(cu, softmax_kernel);
    return KLVAE_OK;
}

/* The op once its operands are checked and its buffers exist. */
static klvae_status_t attention_blocks(kv_cuda *cu, int batch, int c, int n, int block,
                                       const void *qp, const void *kp, const void *vp, void *op,
                                       float scale, void *scores, void *probs)
{
    const attention_gemm g = gemm_geometry(cu, batch, c, n, block);
    const float one = 1.0f, zero = 0.0f;
    for (int k0 = 0, blk = 0; k0 < n; k0 += block, blk++) {
        const int nb = kv_attention_block_size(n, block, blk);
        const void *q_blk = (const char *)qp + (size_t)k0 * g.position * g.es;
        void *out_blk = (char *)op + (size_t)k0 * g.position * g.es;
        KV_TRY(block_probabilities(cu, &g, nb, kp, q_blk, scale, (float *)scores, probs));
        if (cu->nhwc) /* out_blk (c x nb) = V P: (c x n)(n x nb) */
            KV_CUBLAS(cu, cublasGemmStridedBatchedEx(
                              cu->cublas, CUBLAS_OP_N, CUBLAS_OP_N, c, nb, n, &one, vp, g.dt,
                              g.ld, g.image, probs, g.dt, n, g.column_block, &zero, out_blk, g.dt,
                              g.ld, g.image, batch, g.compute, CUBLAS_GEMM_DEFAULT));
        else /* out_blk (nb x c) = P^T V: (nb x n)(n x c) */
            KV_CUBLAS(cu, cublasGemmStridedBatchedEx(
                              cu->cublas, CUBLAS_OP_T, CUBLAS_OP_N, nb, c, n, &one, probs, g.dt,
                              n, g.column_block, vp, g.dt, g.ld, g.image, &zero, out_blk, g.dt,
                              g.ld, g.image, batch, g.compute, CUBLAS_GEMM_DEFAULT));
    }
    return KLVAE_OK;
}

klvae_status_t kv_cuda_attention(kv_backend *be, const kv_tensor *q, const kv_tensor *k,
                                 const kv_tensor *v, float scale, kv_tensor *out)
{
    kv_cuda *cu = kv_cuda_of(be);
    const int batch = q->shape[0], c = q->shape[1], n = q->shape[2] * q->shape[3];
    if (!batch || !c || !n)
        return KLVAE_OK;
    const kv_tensor *operand[4] = {q, k, v, out};
    static const char *names[4] = {"q", "k", "v", "the output"};
    for (int i = 0; i < 4; i++) {
        kv_cuda_dtype d;
        KV_TRY(kv_cuda_dtype_of(cu, operand[i]->data, "attention", names[i], &d));
        if (d != cu->compute)
            return kv_cuda_error(cu, KLVAE_ERR_INTERNAL,
                                 "attention: %s is stored as float32 in a bf16 backend",
                                 names[i]);
    }
    const bool bf16 = cu->compute == KV_CUDA_BF16;
    const int block = kv_attention_block(n, batch, bf16 ? 6 : 4, cu->attention_budget);
    const size_t pairs = (size_t)block * n * batch;
    void *scores = NULL, *probs = NULL;
    klvae_status_t st = kv_cuda_temp(cu, pairs * sizeof(float), "attention scores", &scores);
    if (st == KLVAE_OK && bf16)
        st = kv_cuda_temp(cu, pairs * 2, "attention probabilities", &probs);
    if (st == KLVAE_OK)
        st = attention_blocks(cu, batch, c, n, block, q->data, k->data, v->data, out->data,
                              scale, scores, bf16 ? probs : scores);
    kv_cuda_temp_free(cu, probs);
    kv_cuda_temp_free(cu, scores);
    return st;
}

/* ---- backward ----
 * For a block of queries, with P recomputed (the forward's S and softmax):
 *   NHWC (C x N matrices):  dV += dO_blk P^T,  dP = V^T dO_blk,
 *                           dQ_blk = scale K dS,  dK += scale Q_blk dS^T;
 *   NCHW (N x C matrices):  dV += P dO_blk,  dP = V dO_blk^T,
 *                           dQ_blk = scale dS^T K,  dK += scale dS Q_blk;
 * with dS = P .* (dP - colsum(P .* dP)) (the CPU's dsoftmax, in double). The
 * blocks go in order and accumulate into dK and dV with beta 1: the same
 * bits every time, and memory linear in positions as in the forward. */

/* Column (blockIdx.x, image blockIdx.y): ds = p * (dp - sum(p * dp)). p is
 * float32 (scores) or bf16 (probs); ds may be dp itself (float32 mode). */
static __global__ void __launch_bounds__(SOFTMAX_THREADS)
    softmax_backward_kernel(const void *probs, int p16, const float *dp, void *ds, int ds16,
                            int n, int block)
{
    __shared__ double dshared[SOFTMAX_THREADS / 32];
    const size_t base = ((size_t)blockIdx.y * block + blockIdx.x) * n;
    double dot = 0.0;
    for (int i = threadIdx.x; i < n; i += SOFTMAX_THREADS)
        dot += (double)kv_ld(probs, p16, base + i) * dp[base + i];
    dot = block_sum(dot, dshared);
    for (int i = threadIdx.x; i < n; i += SOFTMAX_THREADS) {
        const float p = kv_ld(probs, p16, base + i);
        kv_st(ds, ds16, base + i, p * (float)((double)dp[base + i] - dot));
    }
}

struct attention_grads {
    const void *q, *k, *v, *dout;
    void *dq, *dk, *dv;
    float *scores, *dp;
    void *probs, *ds; /* bf16 buffers, or scores and dp themselves */
};

static klvae_status_t attention_backward_blocks(kv_cuda *cu, int batch, int c, int n, int block,
                                                float scale, const attention_grads *gr)
{
    const attention_gemm g = gemm_geometry(cu, batch, c, n, block);
    const bool bf16 = cu->compute == KV_CUDA_BF16;
    const cudaDataType_t dt = g.dt;
    const int ld = g.ld;
    const long long image = g.image, cb = g.column_block;
    const float one = 1.0f, zero = 0.0f;
    for (int k0 = 0, blk = 0; k0 < n; k0 += block, blk++) {
        const int nb = kv_attention_block_size(n, block, blk);
        const float *acc = blk ? &one : &zero;           /* dV: the first block sets it */
        const float s_acc = blk ? 1.0f : 0.0f;           /* dK: the same, scaled */
        const size_t at = (size_t)k0 * g.position * g.es;
        const char *q_blk = (const char *)gr->q + at, *do_blk = (const char *)gr->dout + at;
        char *dq_blk = (char *)gr->dq + at;
        KV_TRY(block_probabilities(cu, &g, nb, gr->k, q_blk, scale, gr->scores, gr->probs));
        if (cu->nhwc) {
            /* dV (c x n) += dO_blk (c x nb) P^T;  dP (n x nb) = V^T dO_blk */
            KV_CUBLAS(cu, cublasGemmStridedBatchedEx(
                              cu->cublas, CUBLAS_OP_N, CUBLAS_OP_T, c, n, nb, &one, do_blk, dt,
                              ld, image, gr->probs, dt, n, cb, acc, gr->dv, dt, ld, image, batch,
                              g.compute, CUBLAS_GEMM_DEFAULT));
            KV_CUBLAS(cu, cublasGemmStridedBatchedEx(
                              cu->cublas, CUBLAS_OP_T, CUBLAS_OP_N, n, nb, c, &one, gr->v, dt, ld,
                              image, do_blk, dt, ld, image, &zero, gr->dp, CUDA_R_32F, n, cb,
                              batch, g.compute, CUBLAS_GEMM_DEFAULT));
        } else {
            /* dV (n x c) += P dO_blk (nb x c);  dP (n x nb) = V dO_blk^T */
            KV_CUBLAS(cu, cublasGemmStridedBatchedEx(
                              cu->cublas, CUBLAS_OP_N, CUBLAS_OP_N, n, c, nb, &one, gr->probs, dt,
                              n, cb, do_blk, dt, ld, image, acc, gr->dv, dt, ld, image, batch,
                              g.compute, CUBLAS_GEMM_DEFAULT));
            KV_CUBLAS(cu, cublasGemmStridedBatchedEx(
                              cu->cublas, CUBLAS_OP_N, CUBLAS_OP_T, n, nb, c, &one, gr->v, dt, ld,
                              image, do_blk, dt, ld, image, &zero, gr->dp, CUDA_R_32F, n, cb,
                              batch, g.compute, CUBLAS_GEMM_DEFAULT));
        }
        softmax_backward_kernel<<<dim3(nb, batch), SOFTMAX_THREADS, 0, cu->stream>>>(
            gr->probs, bf16, gr->dp, gr->ds, bf16, n, block);
        KV_LAUNCHED(cu, softmax_backward_kernel);
        if (cu->nhwc) {
            /* dQ_blk (c x nb) = scale K dS;  dK (c x n) += scale Q_blk dS^T */
            KV_CUBLAS(cu, cublasGemmStridedBatchedEx(
                              cu->cublas, CUBLAS_OP_N, CUBLAS_OP_N, c, nb, n, &scale, gr->k, dt,
                              ld, image, gr->ds, dt, n, cb, &zero, dq_blk, dt, ld, image, batch,
                              g.compute, CUBLAS_GEMM_DEFAULT));
            KV_CUBLAS(cu, cublasGemmStridedBatchedEx(
                              cu->cublas, CUBLAS_OP_N, CUBLAS_OP_T, c, n, nb, &scale, q_blk, dt,
                              ld, image, gr->ds, dt, n, cb, &s_acc, gr->dk, dt, ld, image, batch,
                              g.compute, CUBLAS_GEMM_DEFAULT));
        } else {
            /* dQ_blk (nb x c) = scale dS^T K;  dK (n x c) += scale dS Q_blk */
            KV_CUBLAS(cu, cublasGemmStridedBatchedEx(
                              cu->cublas, CUBLAS_OP_T, CUBLAS_OP_N, nb, c, n, &scale, gr->ds, dt,
                              n, cb, gr->k, dt, ld, image, &zero, dq_blk, dt, ld, image, batch,
                              g.compute, CUBLAS_GEMM_DEFAULT));
            KV_CUBLAS(cu, cublasGemmStridedBatchedEx(
                              cu->cublas, CUBLAS_OP_N, CUBLAS_OP_N, n, c, nb, &scale, gr->ds, dt,
                              n, cb, q_blk, dt, ld, image, &s_acc, gr->dk, dt, ld, image, batch,
                              g.compute, CUBLAS_GEMM_DEFAULT));
        }
    }
    return KLVAE_OK;
}

klvae_status_t kv_cuda_attention_backward(kv_backend *be, const kv_tensor *q, const kv_tensor *k,
                                          const kv_tensor *v, float scale,
                                          const kv_tensor *dout, kv_tensor *dq, kv_tensor *dk,
                                          kv_tensor *dv)
{
    kv_cuda *cu = kv_cuda_of(be);
    const int batch = q->shape[0], c = q->shape[1], n = q->shape[2] * q->shape[3];
    if (!batch || !c || !n)
        return KLVAE_OK;
    const kv_tensor *operand[7] = {q, k, v, dout, dq, dk, dv};
    static const char *names[7] = {"q", "k", "v", "dout", "dq", "dk", "dv"};
    for (int i = 0; i < 7; i++) {
        kv_cuda_dtype d;
        KV_TRY(kv_cuda_dtype_of(cu, operand[i]->data, "attention_backward", names[i], &d));
        if (d != cu->compute)
            return kv_cuda_error(cu, KLVAE_ERR_INTERNAL,
                                 "attention_backward: %s is stored as float32 in a bf16 backend",
                                 names[i]);
    }
    const bool bf16 = cu->compute == KV_CUDA_BF16;
    const int block = kv_attention_block(n, batch, bf16 ? 12 : 8, cu->attention_budget);
    const size_t pairs = (size_t)block * n * batch;
    attention_grads g;
    memset(&g, 0, sizeof g);
    g.q = q->data;
    g.k = k->data;
    g.v = v->data;
    g.dout = dout->data;
    g.dq = dq->data;
    g.dk = dk->data;
    g.dv = dv->data;
    klvae_status_t st = kv_cuda_temp(cu, pairs * 4, "attention scores", (void **)&g.scores);
    if (st == KLVAE_OK)
        st = kv_cuda_temp(cu, pairs * 4, "attention score gradients", (void **)&g.dp);
    if (st == KLVAE_OK && bf16)
        st = kv_cuda_temp(cu, pairs * 2, "attention probabilities", &g.probs);
    if (st == KLVAE_OK && bf16)
        st = kv_cuda_temp(cu, pairs * 2, "attention softmax gradients", &g.ds);
    if (!bf16) {
        g.probs = g.scores;
        g.ds = g.dp;
    }
    if (st == KLVAE_OK)
        st = attention_backward_blocks(cu, batch, c, n, block, scale, &g);
    if (bf16) {
        kv_cuda_temp_free(cu, g.ds);
        kv_cuda_temp_free(cu, g.probs);
    }
    kv_cuda_temp_free(cu, g.dp);
    kv_cuda_temp_free(cu, g.scores);
    return st;
}
