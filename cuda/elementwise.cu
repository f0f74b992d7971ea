/* elementwise.cu — add, and the vector ops of the trainer (scale, axpy,
 * lerp, fill); elementwise.cuh's kernels, which activation.cu shares.
 *
 * Elementwise ops do not care about the layout (every operand of one op has
 * the same shape, so the same layout). Each operand may be stored in the
 * compute dtype or in float32 (KV_STORAGE_FLOAT32 blocks); values are
 * computed in float32. */
#include "elementwise.cuh"

namespace {

struct add_op {
    __device__ float operator()(float a, float b) const { return a + b; }
};

/* alpha * a + beta * b; scale has no b (beta 0) */
struct affine_op {
    float alpha, beta;
    __device__ float operator()(float a, float b) const { return alpha * a + beta * b; }
};

/* a + t (b - a), as the CPU rounds it (not (1 - t) a + t b) */
struct lerp_op {
    float t;
    __device__ float operator()(float a, float b) const { return a + t * (b - a); }
};

struct fill_op {
    float value;
    __device__ float operator()(float, float) const { return value; }
};

} // namespace

klvae_status_t kv_cuda_add(kv_backend *be, const kv_tensor *a, const kv_tensor *b, kv_tensor *y)
{
    return kv_cuda_elementwise(kv_cuda_of(be), "add", add_op(), y, a, b);
}

klvae_status_t kv_cuda_scale(kv_backend *be, kv_tensor *x, float a)
{
    affine_op op = {a, 0.0f};
    return kv_cuda_elementwise(kv_cuda_of(be), "scale", op, x, x, NULL);
}

klvae_status_t kv_cuda_axpy(kv_backend *be, float a, const kv_tensor *x, kv_tensor *y)
{
    affine_op op = {a, 1.0f};
    return kv_cuda_elementwise(kv_cuda_of(be), "axpy", op, y, x, y);
}

klvae_status_t kv_cuda_lerp(kv_backend *be, kv_tensor *x, const kv_tensor *y, float t)
{
    lerp_op op = {t};
    return kv_cuda_elementwise(kv_cuda_of(be), "lerp", op, x, x, y);
}

klvae_status_t kv_cuda_fill(kv_backend *be, kv_tensor *x, float value)
{
    fill_op op = {value};
    return kv_cuda_elementwise(kv_cuda_of(be), "fill", op, x, NULL, NULL);
}

/* ---- channel_affine: y = x * a[c] + b[c], a and b host arrays ---- */

static __global__ void channel_affine_kernel(const void *x, int x16, const float *a,
                                             const float *b, void *y, int y16, size_t count,
                                             int channels, size_t pixels, int nhwc)
{
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < count;
         i += (size_t)gridDim.x * blockDim.x) {
        int n, c;
        kv_storage_nc(i, nhwc, channels, pixels, &n, &c);
        float v = kv_ld(x, x16, i);
        if (a)
            v = v * a[c];
        if (b)
            v = v + b[c];
        kv_st(y, y16, i, v);
    }
}

klvae_status_t kv_cuda_channel_affine(kv_backend *be, const kv_tensor *x, const float *a,
                                      const float *b, kv_tensor *y)
{
    kv_cuda *cu = kv_cuda_of(be);
    const size_t count = kv_cuda_numel(y);
    if (!count)
        return KLVAE_OK;
    kv_cuda_dtype tx, ty;
    KV_TRY(kv_cuda_dtype_of(cu, x->data, "channel_affine", "x", &tx));
    KV_TRY(kv_cuda_dtype_of(cu, y->data, "channel_affine", "y", &ty));
    const int channels = x->shape[1];
    const size_t pixels = (size_t)x->shape[2] * x->shape[3];
    void *da = NULL, *db = NULL;
    klvae_status_t st = KLVAE_OK;
    if (a)
        st = kv_cuda_from_host(cu, a, channels * sizeof(float), "channel_affine's scales", &da);
    if (st == KLVAE_OK && b)
        st = kv_cuda_from_host(cu, b, channels * sizeof(float), "channel_affine's shifts", &db);
    if (st == KLVAE_OK) {
        channel_affine_kernel<<<kv_cuda_blocks(count, cu), 256, 0, cu->stream>>>(
            x->data, tx == KV_CUDA_BF16, (const float *)da, (const float *)db, y->data,
            ty == KV_CUDA_BF16, count, channels, pixels, cu->nhwc && pixels > 1);
        cudaError_t e = cudaGetLastError();
        if (e != cudaSuccess)
            st = kv_cuda_fail(cu, e, "the launch of channel_affine_kernel");
    }
    kv_cuda_temp_free(cu, db);
    kv_cuda_temp_free(cu, da);
    return st;
}
