/* attention.cu — single-head self-attention over the N = H*W positions of
 * channel-major (B, C, H, W) tensors, in blocks of queries so that memory
 * grows linearly with N (cuda/attention_plan.cuh), as src/backend/cpu/attention.c.
 *
 * In column-major terms (cuBLAS's), q, k, v and out of one image are N x C
 * matrices with leading dimension N. For a block of queries [n0, n0 + nb):
 *   S (N x nb, ld N) = scale * K Q[n0:n0+nb, :]^T   (column j: query n0 + j)
 *   P = softmax of each column of S                 (the CPU's row softmax)
 *   out[n0:n0+nb, :] = P^T V
 * two strided-batched GEMMs over the batch and one softmax kernel. S is
 * float32 in every mode; in bf16 mode P is bf16 in its own buffer and the
 * GEMMs take bf16 operands with float32 accumulation. */
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

/* t in the compute dtype: t itself, or a converted copy in a temporary
 * block (*temp, released by the caller). */
static klvae_status_t as_compute(kv_cuda *cu, const kv_tensor *t, const void **out, void **temp)
{
    kv_cuda_dtype d = kv_cuda_dtype_of(cu, t->data);
    *temp = NULL;
    if (d == cu->compute) {
        *out = t->data;
        return KLVAE_OK;
    }
    size_t count = kv_cuda_numel(t);
    KV_TRY(kv_cuda_temp(cu, count * kv_cuda_esize(cu->compute), temp));
    *out = *temp;
    return kv_cuda_convert(cu, t->data, d, *temp, cu->compute, count);
}

/* The op once its operands are in the compute dtype and its buffers exist. */
static klvae_status_t attention_blocks(kv_cuda *cu, int batch, int c, int n, int block,
                                       const void *qp, const void *kp, const void *vp, void *op,
                                       float scale, void *scores, void *probs)
{
    const kv_cuda_dtype tc = cu->compute;
    const bool bf16 = tc == KV_CUDA_BF16;
    const cudaDataType_t dt = cuda_type(tc);
    const cublasComputeType_t compute = cu->precision == KV_PRECISION_TF32
                                            ? CUBLAS_COMPUTE_32F_FAST_TF32
                                            : CUBLAS_COMPUTE_32F;
    const long long image = (long long)c * n, column_block = (long long)block * n;
    const size_t es = kv_cuda_esize(tc);
    const float one = 1.0f, zero = 0.0f;
    for (int k0 = 0, blk = 0; k0 < n; k0 += block, blk++) {
        const int nb = kv_attention_block_size(n, block, blk);
        /* S = scale * K Q_blk^T: (n x c) (c x nb) */
        KV_CUBLAS(cu, cublasGemmStridedBatchedEx(
                          cu->cublas, CUBLAS_OP_N, CUBLAS_OP_T, n, nb, c, &scale, kp, dt, n, image,
                          (const char *)qp + (size_t)k0 * es, dt, n, image, &zero, scores,
                          CUDA_R_32F, n, column_block, batch, compute, CUBLAS_GEMM_DEFAULT));
        softmax_kernel<<<dim3(nb, batch), SOFTMAX_THREADS, 0, cu->stream>>>(
            (float *)scores, probs, bf16, n, block);
        KV_LAUNCHED(cu, softmax_kernel);
        /* out_blk = P^T V: (nb x n) (n x c) */
        KV_CUBLAS(cu, cublasGemmStridedBatchedEx(
                          cu->cublas, CUBLAS_OP_T, CUBLAS_OP_N, nb, c, n, &one, probs, dt, n,
                          column_block, vp, dt, n, image, &zero, (char *)op + (size_t)k0 * es, dt,
                          n, image, batch, compute, CUBLAS_GEMM_DEFAULT));
    }
    return KLVAE_OK;
}

klvae_status_t kv_cuda_attention(kv_backend *be, const kv_tensor *q, const kv_tensor *k,
                                 const kv_tensor *v, float scale, kv_tensor *out)
{
    kv_cuda *cu = kv_cuda_of(be);
    KV_CU(cu, cudaSetDevice(cu->device));
    const int batch = q->shape[0], c = q->shape[1], n = q->shape[2] * q->shape[3];
    if (!batch || !c || !n)
        return KLVAE_OK;
    const kv_cuda_dtype tc = cu->compute, to = kv_cuda_dtype_of(cu, out->data);
    const bool bf16 = tc == KV_CUDA_BF16;
    const int block = kv_attention_block(n, batch, bf16 ? 6 : 4, cu->attention_budget);
    const size_t pairs = (size_t)block * n * batch;
    const void *qp = NULL, *kp = NULL, *vp = NULL;
    void *temps[6] = {NULL, NULL, NULL, NULL, NULL, NULL}; /* q, k, v, out, scores, probs */
    void *op = out->data;
    klvae_status_t st = as_compute(cu, q, &qp, &temps[0]);
    if (st == KLVAE_OK)
        st = as_compute(cu, k, &kp, &temps[1]);
    if (st == KLVAE_OK)
        st = as_compute(cu, v, &vp, &temps[2]);
    if (st == KLVAE_OK && to != tc) {
        st = kv_cuda_temp(cu, kv_cuda_numel(out) * kv_cuda_esize(tc), &temps[3]);
        op = temps[3];
    }
    if (st == KLVAE_OK)
        st = kv_cuda_temp(cu, pairs * sizeof(float), &temps[4]);
    if (st == KLVAE_OK && bf16)
        st = kv_cuda_temp(cu, pairs * 2, &temps[5]);
    if (st == KLVAE_OK)
        st = attention_blocks(cu, batch, c, n, block, qp, kp, vp, op, scale, temps[4],
                              bf16 ? temps[5] : temps[4]);
    if (st == KLVAE_OK && to != tc)
        st = kv_cuda_convert(cu, op, tc, out->data, to, kv_cuda_numel(out));
    for (int i = 0; i < 6; i++)
        kv_cuda_temp_release(cu, temps[i]);
    return st;
}
