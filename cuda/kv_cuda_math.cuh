/* kv_cuda_math.cuh — the small pieces of the CUDA backend's arithmetic and
 * index math that do not need a GPU: bf16 conversion, the activations, and
 * the index maps of the elementwise ops. They are __host__ __device__ (KV_HD)
 * and plain C, so the kernels use them and tests/test_cuda_host.c checks
 * them with the C compiler against straightforward loops.
 *
 * bf16 is stored as its 16 bits in a uint16_t (the kernels never need the
 * cuda_bf16.h type): the top half of the float32 bit pattern, rounded to
 * nearest with ties to even. */
#ifndef KV_CUDA_MATH_CUH
#define KV_CUDA_MATH_CUH

#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "backend/backend.h"

#ifndef KV_HD
#if defined(__CUDACC__)
#define KV_HD __host__ __device__
#else
#define KV_HD
#endif
#endif

/* ---- bf16 ---- */

/* float32 -> bf16 bits, round to nearest even; NaN stays a (quiet) NaN of
 * the same sign, overflow rounds to infinity as IEEE rounding does. */
static inline KV_HD uint16_t kv_bf16_from_float(float f)
{
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    if ((u & 0x7FFFFFFFu) > 0x7F800000u)
        return (uint16_t)((u >> 16) | 0x0040u);
    u += 0x7FFFu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

static inline KV_HD float kv_bf16_to_float(uint16_t h)
{
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

/* ---- activations (the CPU's kv_cpu_activate, written once for both) ---- */

static inline KV_HD float kv_cuda_activate(int act, float v)
{
    switch (act) {
    case KV_ACT_SILU: return v / (1.0f + expf(-v));
    case KV_ACT_GELU: return 0.5f * v * (1.0f + erff(v * 0.70710678118654752f));
    case KV_ACT_RELU: return v > 0.0f ? v : 0.0f;
    case KV_ACT_MISH: {
        float sp = v > 20.0f ? v : log1pf(expf(v)); /* PyTorch's softplus threshold */
        return v * tanhf(sp);
    }
    case KV_ACT_LEAKY_RELU: return v > 0.0f ? v : 0.2f * v;
    default: return v;
    }
}

/* ---- index maps ---- */

/* upsample_nearest2x: the input index of pixel pix of output plane plane,
 * for input planes of h x w (output planes 2h x 2w). The kernels go over
 * (plane, pixel) so that no 64-bit division is needed per element. */
static inline KV_HD size_t kv_upsample_source(size_t plane, int pix, int h, int w)
{
    int oy = pix / (2 * w), ox = pix % (2 * w);
    return plane * (size_t)h * (size_t)w + (size_t)(oy / 2) * (size_t)w + (size_t)(ox / 2);
}

/* posterior_split: the moments index of element i of mean, where block =
 * Z * H * W is one sample's mean (logvar's element i is block further). */
static inline KV_HD size_t kv_posterior_source(size_t i, size_t block)
{
    return (i / block) * 2 * block + i % block;
}

/* The clamp of logvar that posterior_split and gaussian_sample apply. */
static inline KV_HD float kv_clamp_logvar(float v)
{
    return v < -30.0f ? -30.0f : (v > 20.0f ? 20.0f : v);
}

#endif /* KV_CUDA_MATH_CUH */
