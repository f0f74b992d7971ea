/* activation.cu — y = act(x) elementwise, with the activations of
 * base/numerics.h (the CPU's), through the kernels of elementwise.cuh. */
#include "elementwise.cuh"

namespace {

struct activation_op {
    int act;
    __device__ float operator()(float x, float) const { return kv_activate(act, x); }
};

} // namespace

klvae_status_t kv_cuda_activation(kv_backend *be, const kv_tensor *x, kv_activation act,
                                  kv_tensor *y)
{
    activation_op op = {(int)act};
    return kv_cuda_elementwise(kv_cuda_of(be), "activation", op, y, x, NULL);
}

namespace {

/* dx = dy where y > 0, else below * dy (relu: 0, leaky relu: 0.2) */
struct activation_backward_op {
    float below;
    __device__ float operator()(float dy, float y) const { return y > 0.0f ? dy : below * dy; }
};

} // namespace

klvae_status_t kv_cuda_activation_backward(kv_backend *be, const kv_tensor *y,
                                           const kv_tensor *dy, kv_activation act, kv_tensor *dx)
{
    kv_cuda *cu = kv_cuda_of(be);
    if (act != KV_ACT_RELU && act != KV_ACT_LEAKY_RELU)
        return kv_cuda_error(cu, KLVAE_ERR_INTERNAL,
                             "activation_backward supports relu and leaky relu");
    activation_backward_op op = {act == KV_ACT_LEAKY_RELU ? 0.2f : 0.0f};
    return kv_cuda_elementwise(cu, "activation_backward", op, dx, dy, y);
}
