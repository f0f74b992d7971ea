/* param_set.c — see param_set.h. */
#include "train/param_set.h"

klvae_status_t kv_params_fill(kv_backend *be, kv_param_set s, float value)
{
    klvae_status_t st = KLVAE_OK;
    for (size_t i = 0; st == KLVAE_OK && i < s.count; i++)
        st = be->ops->fill(be, s.params[i].tensor, value);
    return st;
}

klvae_status_t kv_params_copy(kv_backend *be, kv_param_set dst, kv_param_set src)
{
    /* 0 + x is x exactly, so fill and add copy on any backend */
    klvae_status_t st = KLVAE_OK;
    for (size_t i = 0; st == KLVAE_OK && i < dst.count; i++) {
        st = be->ops->fill(be, dst.params[i].tensor, 0.0f);
        if (st == KLVAE_OK)
            st = be->ops->add(be, dst.params[i].tensor, src.params[i].tensor,
                              dst.params[i].tensor);
    }
    return st;
}

klvae_status_t kv_params_sum_squares(kv_backend *be, kv_param_set s, const bool *use,
                                     double *total)
{
    for (size_t i = 0; i < s.count; i++) {
        if (use && !use[i])
            continue;
        double sum;
        klvae_status_t st = be->ops->sum_squares(be, s.params[i].tensor, &sum);
        if (st != KLVAE_OK)
            return st;
        *total += sum;
    }
    return KLVAE_OK;
}

klvae_status_t kv_params_scale(kv_backend *be, kv_param_set s, const bool *use, float a)
{
    klvae_status_t st = KLVAE_OK;
    for (size_t i = 0; st == KLVAE_OK && i < s.count; i++)
        if (!use || use[i])
            st = be->ops->scale(be, s.params[i].tensor, a);
    return st;
}

klvae_status_t kv_params_adam(kv_backend *be, kv_param_set weights, kv_param_set grads,
                              kv_param_set m, kv_param_set v, const bool *use, float lr,
                              float beta1, float beta2, float eps, int64_t step)
{
    klvae_status_t st = KLVAE_OK;
    for (size_t i = 0; st == KLVAE_OK && i < weights.count; i++)
        if (!use || use[i])
            st = be->ops->adam(be, weights.params[i].tensor, grads.params[i].tensor,
                               m.params[i].tensor, v.params[i].tensor, lr, beta1, beta2, eps,
                               step);
    return st;
}

klvae_status_t kv_params_ema(kv_backend *be, kv_param_set ema, kv_param_set weights, float decay)
{
    klvae_status_t st = KLVAE_OK;
    for (size_t i = 0; st == KLVAE_OK && i < ema.count; i++)
        st = be->ops->lerp(be, ema.params[i].tensor, weights.params[i].tensor, 1.0f - decay);
    return st;
}
