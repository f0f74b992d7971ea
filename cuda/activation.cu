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
