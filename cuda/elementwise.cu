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
