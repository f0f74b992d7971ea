/* param_set.h — one walker for the trainer's work on a network's parameters,
 * whatever the network (the VAE, the discriminator): zeroing gradients,
 * their norm and clipping, Adam, EMA, copies. Checkpoints walk the same
 * sets (train/checkpoint.c).
 *
 * A set is a network's parameter registry (kv_param, model/model.h), in the
 * network's state_dict order. The trainer's shadows of a network (its
 * gradients, both Adam moments, its EMA weights) are module trees of the
 * same shapes, so their sets have the same length and order: index i is the
 * same parameter in each. */
#ifndef KV_PARAM_SET_H
#define KV_PARAM_SET_H

#include "model/model.h"

typedef struct kv_param_set {
    kv_param *params;
    size_t count;
} kv_param_set;

static inline kv_param_set kv_model_param_set(const klvae_model_t *m)
{
    kv_param_set s = {m ? m->params : NULL, m ? m->num_params : 0};
    return s;
}

/* Every tensor of s = value. */
klvae_status_t kv_params_fill(kv_backend *be, kv_param_set s, float value);

/* dst = src (sets of the same network): bit for bit (but for the sign of a
 * zero: 0 + -0 is +0), or rounded to dst's storage when that holds fewer
 * bits (float32 master weights to bf16). */
klvae_status_t kv_params_copy(kv_backend *be, kv_param_set dst, kv_param_set src);

/* *total += the sum of squares of the tensors i of s with use[i] (use may be
 * NULL: all), in double. */
klvae_status_t kv_params_sum_squares(kv_backend *be, kv_param_set s, const bool *use,
                                     double *total);

/* The tensors i of s with use[i] (or all) *= a. */
klvae_status_t kv_params_scale(kv_backend *be, kv_param_set s, const bool *use, float a);

/* One Adam step (backend op adam) for every parameter i with use[i] (or
 * all): weights from grads, moments m and v. */
klvae_status_t kv_params_adam(kv_backend *be, kv_param_set weights, kv_param_set grads,
                              kv_param_set m, kv_param_set v, const bool *use, float lr,
                              float beta1, float beta2, float eps, int64_t step);

/* ema += (1 - decay) (weights - ema) for every parameter. */
klvae_status_t kv_params_ema(kv_backend *be, kv_param_set ema, kv_param_set weights, float decay);

#endif /* KV_PARAM_SET_H */
