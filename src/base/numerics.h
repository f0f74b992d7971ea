/* numerics.h — the arithmetic that host and device code share.
 *
 * Written once and compiled twice: by the C compiler for the CPU backend and
 * the core, and by nvcc for the CUDA plugin, where KV_HD makes each function
 * __host__ __device__. So an activation, the logvar clamp or a bf16 rounding
 * cannot drift between the backends, and tests/test_cuda_host.c can check
 * the device's version with the C compiler.
 *
 * Only plain C here: no libc state, no allocation, nothing that needs a GPU.
 * (The counter-based generator and its deterministic log/sincos/exp, shared
 * the same way, are in philox.h.) */
#ifndef KV_NUMERICS_H
#define KV_NUMERICS_H

#include <math.h>
#include <stdbool.h>
#include <stdint.h>
#include <string.h>

#ifndef KV_HD
#if defined(__CUDACC__)
#define KV_HD __host__ __device__
#else
#define KV_HD
#endif
#endif

/* ---- activations ---- */

typedef enum kv_activation {
    KV_ACT_NONE = 0,
    KV_ACT_SILU,
    KV_ACT_GELU, /* exact, with erf */
    KV_ACT_RELU,
    KV_ACT_MISH,
    KV_ACT_LEAKY_RELU /* slope 0.2, the PatchGAN's */
} kv_activation;

/* act(v) for act a kv_activation (an int, so that kernels can pass theirs),
 * as PyTorch defines each (Mish's softplus with PyTorch's threshold
 * of 20). The CPU backend's vectorised SiLU (backend/cpu/group_norm.c) is a
 * faster evaluation of the same function, about 1 ulp from this one. */
static inline KV_HD float kv_activate(int act, float v)
{
    switch ((kv_activation)act) {
    case KV_ACT_NONE: return v;
    case KV_ACT_SILU: return v / (1.0f + expf(-v));
    case KV_ACT_GELU: return 0.5f * v * (1.0f + erff(v * 0.70710678118654752f));
    case KV_ACT_RELU: return v > 0.0f ? v : 0.0f;
    case KV_ACT_MISH: {
        float sp = v > 20.0f ? v : log1pf(expf(v));
        return v * tanhf(sp);
    }
    case KV_ACT_LEAKY_RELU: return v > 0.0f ? v : 0.2f * v;
    }
    return v;
}

/* d act / d v at v. */
static inline KV_HD float kv_activate_grad(int act, float v)
{
    switch ((kv_activation)act) {
    case KV_ACT_NONE: return 1.0f;
    case KV_ACT_SILU: {
        float sig = 1.0f / (1.0f + expf(-v));
        return sig * (1.0f + v * (1.0f - sig));
    }
    case KV_ACT_GELU: {
        float cdf = 0.5f * (1.0f + erff(v * 0.70710678118654752f));
        float pdf = 0.39894228040143268f * expf(-0.5f * v * v);
        return cdf + v * pdf;
    }
    case KV_ACT_RELU: return v > 0.0f ? 1.0f : 0.0f;
    case KV_ACT_MISH: {
        float sp = v > 20.0f ? v : log1pf(expf(v));
        float tsp = tanhf(sp);
        float sig = 1.0f / (1.0f + expf(-v));
        return tsp + v * (1.0f - tsp * tsp) * sig;
    }
    case KV_ACT_LEAKY_RELU: return v > 0.0f ? 1.0f : 0.2f;
    }
    return 1.0f;
}

/* ---- the posterior's log-variance ---- */

/* diffusers clamps logvar to [-30, 20] before every use. */
#define KV_LOGVAR_MIN (-30.0f)
#define KV_LOGVAR_MAX 20.0f

static inline KV_HD float kv_clamp_logvar(float v)
{
    return v < KV_LOGVAR_MIN ? KV_LOGVAR_MIN : (v > KV_LOGVAR_MAX ? KV_LOGVAR_MAX : v);
}

/* Where the clamp passes gradients through (inside the range, ends
 * included, as torch.clamp's backward). */
static inline KV_HD bool kv_logvar_unclamped(float v)
{
    return v >= KV_LOGVAR_MIN && v <= KV_LOGVAR_MAX;
}

/* ---- bfloat16 ----
 * Stored as its 16 bits: the top half of the float32 bit pattern. */

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

/* bf16 bits -> float32, exactly. */
static inline KV_HD float kv_bf16_to_float(uint16_t h)
{
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

#endif /* KV_NUMERICS_H */
