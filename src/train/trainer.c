/* trainer.c — klvae_trainer_*: the LDM training step (generator pass,
 * adaptive GAN weight, Adam, EMA, discriminator pass), settings and notes.
 * Checkpoints are in checkpoint.c.
 * docs/training.md describes the step and every difference between the
 * default settings and preset=ldm. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "backend/plugin.h"
#include "base/options.h"
#include "base/philox.h"
#include "model/vae.h"
#include "train/discriminator.h"
#include "train/lpips.h"
#include "train/trainer.h"
#include "train/trainer_state.h"

#define KV_LAMBDA_EPS 1e-4
#define KV_LAMBDA_MAX 1e4

/* ---- shadows of the model (gradients, Adam moments, EMA) ---- */

static void shadow_release(kv_backend *be, klvae_model_t *s)
{
    if (!s)
        return;
    for (size_t i = 0; i < s->num_params; i++)
        kv_tensor_release(be, s->params[i].tensor);
    free(s->params);
    free(s);
}

/* A module tree of the model's shapes in backend memory: zeros, or a copy
 * of the model's values. */
static klvae_status_t shadow_create(klvae_model_t *m, bool copy, klvae_model_t **out)
{
    *out = NULL;
    klvae_model_t *s = calloc(1, sizeof *s);
    if (!s)
        return kv_error(KLVAE_ERR_OUT_OF_MEMORY, "out of memory creating the trainer");
    s->cfg = m->cfg;
    s->cfg.extra_json = NULL;
    s->be = m->be;
    klvae_status_t st = kv_model_build(s);
    if (st == KLVAE_OK)
        st = kv_model_alloc_params(s, KV_STORAGE_FLOAT32); /* exact optimiser state */
    if (st == KLVAE_OK)
        st = copy ? kv_params_copy(m->be, kv_model_param_set(s), kv_model_param_set(m))
                  : kv_params_fill(m->be, kv_model_param_set(s), 0.0f);
    if (st != KLVAE_OK) {
        shadow_release(m->be, s);
        return st;
    }
    *out = s;
    return KLVAE_OK;
}

static bool is_trainable(const klvae_trainer_t *t, size_t i)
{
    if (t->s.train_encoder)
        return true;
    const char *name = t->m->params[i].name;
    return strncmp(name, "encoder.", 8) != 0 && strncmp(name, "quant_conv.", 11) != 0;
}

/* ---- settings ---- */

static klvae_status_t read_settings(const klvae_options_t *o, trainer_settings *s)
{
    memset(s, 0, sizeof *s);
    s->ldm = strcmp(kv_options_string(o, "preset"), "ldm") == 0;
    s->lr = (float)kv_options_double(o, "learning_rate");
    double dlr;
    s->disc_lr = kv_options_optional_double(o, "disc_learning_rate", &dlr) ? (float)dlr : s->lr;
    s->beta1 = (float)kv_options_double(o, "adam_beta1");
    s->beta2 = (float)kv_options_double(o, "adam_beta2");
    s->eps = (float)kv_options_double(o, "adam_eps");
    s->pixel_loss = strcmp(kv_options_string(o, "pixel_loss"), "l2") == 0 ? KV_LOSS_L2 : KV_LOSS_L1;
    s->pixel_weight = (float)kv_options_double(o, "pixel_weight");
    s->perceptual_weight = (float)kv_options_double(o, "perceptual_weight");
    s->lpips_dropout = kv_options_is_set(o, "lpips_dropout")
                           ? (float)kv_options_double(o, "lpips_dropout")
                           : (s->ldm ? 0.5f : 0.0f);
    s->kl_weight = (float)kv_options_double(o, "kl_weight");
    s->logvar_init = (float)kv_options_double(o, "logvar_init");
    s->learn_logvar = kv_options_bool(o, "learn_logvar");
    s->recompute = kv_options_bool(o, "recompute");
    s->disc_start = kv_options_int(o, "disc_start");
    s->disc_factor = (float)kv_options_double(o, "disc_factor");
    s->disc_weight = (float)kv_options_double(o, "disc_weight");
    s->vanilla = strcmp(kv_options_string(o, "disc_loss"), "vanilla") == 0;
    s->disc_layers = kv_options_int(o, "disc_layers");
    s->disc_channels = kv_options_int(o, "disc_channels");
    s->fresh = kv_options_is_set(o, "disc_update")
                   ? strcmp(kv_options_string(o, "disc_update"), "fresh") == 0
                   : s->ldm;
    s->sample = strcmp(kv_options_string(o, "posterior"), "sample") == 0;
    s->ema_decay = (float)kv_options_double(o, "ema_decay");
    s->train_encoder = kv_options_bool(o, "train_encoder");
    s->grad_accum = kv_options_int(o, "grad_accum");
    s->grad_clip = (float)kv_options_double(o, "grad_clip");
    s->refuse_nonfinite = strcmp(kv_options_string(o, "nonfinite"), "refuse") == 0;
    s->dp_exact = kv_options_is_set(o, "data_parallel")
                      ? strcmp(kv_options_string(o, "data_parallel"), "exact") == 0
                      : !s->ldm;
    snprintf(s->allreduce, sizeof s->allreduce, "%s", kv_options_string(o, "allreduce"));
    s->bucket_mb = kv_options_double(o, "allreduce_bucket_mb");
    return KLVAE_OK;
}

/* Every option's value as "key=value" lines, for checkpoint metadata. */
static char *options_text(const klvae_options_t *o)
{
    size_t cap = 4096, len = 0;
    char *text = malloc(cap);
    if (!text)
        return NULL;
    text[0] = '\0';
    const char *key;
    for (int i = 0; klvae_option_describe(i, &key, NULL, NULL) == KLVAE_OK; i++) {
        char value[1024];
        if (klvae_options_get(o, key, value, sizeof value) != KLVAE_OK)
            continue;
        size_t need = strlen(key) + strlen(value) + 3;
        if (len + need >= cap) {
            cap = 2 * (len + need);
            char *grown = realloc(text, cap);
            if (!grown) {
                free(text);
                return NULL;
            }
            text = grown;
        }
        len += (size_t)snprintf(text + len, cap - len, "%s=%s\n", key, value);
    }
    return text;
}

/* A 64-bit seed for one use of randomness in one step. */
static uint64_t stream_seed(const klvae_trainer_t *t, int64_t step, int micro, int purpose)
{
    uint64_t counter = ((uint64_t)step << 20) ^ ((uint64_t)micro << 4) ^ (uint64_t)purpose;
    kv_philox_block b = kv_philox4x32_10(counter, t->seed ^ 0x7261696E6572ull);
    return ((uint64_t)b.w[0] << 32) | b.w[1];
}

enum { SEED_POSTERIOR = 1, SEED_DROPOUT = 2, SEED_FRESH_POSTERIOR = 3 };

/* ---- create / free ---- */

/* The two networks as param sets, for the optimiser and checkpoints. */
static klvae_status_t describe_nets(klvae_trainer_t *t)
{
    kv_trained_net *m = &t->model_net, *d = &t->disc_net;
    m->name = "model";
    m->weights = kv_model_param_set(t->m);
    m->grads = kv_model_param_set(t->grads);
    m->adam_m = kv_model_param_set(t->adam_m);
    m->adam_v = kv_model_param_set(t->adam_v);
    m->ema = kv_model_param_set(t->ema);
    m->master = kv_model_param_set(t->master);
    m->lr = t->s.lr;
    m->trained = calloc(m->weights.count ? m->weights.count : 1, sizeof *m->trained);
    if (!m->trained)
        return kv_error(KLVAE_ERR_OUT_OF_MEMORY, "out of memory creating the trainer");
    for (size_t i = 0; i < m->weights.count; i++)
        m->trained[i] = is_trainable(t, i);
    d->name = "disc";
    d->weights = kv_disc_param_set(t->disc);
    d->grads = kv_disc_param_set(t->disc_grads);
    d->adam_m = kv_disc_param_set(t->disc_m);
    d->adam_v = kv_disc_param_set(t->disc_v);
    d->master = kv_disc_param_set(t->disc_master);
    d->lr = t->s.disc_lr;
    return KLVAE_OK;
}

KLVAE_API void klvae_trainer_free(klvae_trainer_t *t)
{
    if (!t)
        return;
    kv_backend *be = t->be;
    kv_trainer_detach_comm(t);
    shadow_release(be, t->grads);
    shadow_release(be, t->adam_m);
    shadow_release(be, t->adam_v);
    shadow_release(be, t->ema);
    shadow_release(be, t->master);
    kv_disc_free(t->disc);
    kv_disc_free(t->disc_master);
    kv_disc_free(t->disc_grads);
    kv_disc_free(t->disc_m);
    kv_disc_free(t->disc_v);
    kv_lpips_free(t->lpips);
    kv_tensor_release(be, &t->last_grad_nll);
    kv_tensor_release(be, &t->last_grad_g);
    free(t->model_net.trained);
    free(t->options_text);
    free(t);
    be->ops->trim(be, false); /* what the steps kept for the next one */
}

KLVAE_API klvae_status_t klvae_trainer_create(klvae_model_t *model, const klvae_options_t *opts,
                                              klvae_trainer_t **out)
{
    kv_error_clear();
    if (!out)
        return kv_error(KLVAE_ERR_INVALID_ARGUMENT, "klvae_trainer_create: out is NULL");
    *out = NULL;
    if (!model)
        return kv_error(KLVAE_ERR_INVALID_ARGUMENT, "klvae_trainer_create: model is NULL");
    const char *missing = kv_backend_missing_op(model->be, KV_OP_TRAINING);
    if (missing)
        return kv_error(KLVAE_ERR_UNSUPPORTED,
                        "klvae_trainer_create: the %s backend cannot train this model: it has "
                        "no %s op (training needs every training op of the backend interface; "
                        "backend=cpu has them all)",
                        model->be->ops->name, missing);
    klvae_trainer_t *t = calloc(1, sizeof *t);
    if (!t)
        return kv_error(KLVAE_ERR_OUT_OF_MEMORY, "out of memory creating the trainer");
    t->m = model;
    t->be = model->be;
    read_settings(opts, &t->s);
    t->seed = kv_options_uint64(opts, "seed");
    t->logvar = t->s.logvar_init;
    klvae_status_t st = KLVAE_OK;
    t->options_text = options_text(opts);
    if (!t->options_text)
        st = kv_error(KLVAE_ERR_OUT_OF_MEMORY, "out of memory creating the trainer");
    if (st == KLVAE_OK)
        st = shadow_create(model, false, &t->grads);
    if (st == KLVAE_OK)
        st = shadow_create(model, false, &t->adam_m);
    if (st == KLVAE_OK)
        st = shadow_create(model, false, &t->adam_v);
    if (st == KLVAE_OK && t->s.ema_decay > 0.0f)
        st = shadow_create(model, true, &t->ema);
    if (st == KLVAE_OK && t->be->lossy_storage) /* float32 master weights for Adam */
        st = shadow_create(model, true, &t->master);
    if (st == KLVAE_OK)
        st = kv_disc_create(t->be, model->cfg.out_channels, t->s.disc_channels, t->s.disc_layers,
                            t->seed ^ 0x44495343ull, &t->disc);
    const char *disc_path = kv_options_string(opts, "disc_weights");
    if (st == KLVAE_OK && *disc_path)
        st = kv_disc_load(t->disc, disc_path);
    if (st == KLVAE_OK)
        st = kv_disc_create_like(t->disc, &t->disc_grads);
    if (st == KLVAE_OK)
        st = kv_disc_create_like(t->disc, &t->disc_m);
    if (st == KLVAE_OK)
        st = kv_disc_create_like(t->disc, &t->disc_v);
    if (st == KLVAE_OK && t->be->lossy_storage)
        st = kv_disc_create_like(t->disc, &t->disc_master);
    if (st == KLVAE_OK && t->disc_master)
        st = kv_params_copy(t->be, kv_disc_param_set(t->disc_master), kv_disc_param_set(t->disc));
    const char *lpips_path = kv_options_string(opts, "lpips_weights");
    if (st == KLVAE_OK && *lpips_path)
        st = kv_lpips_load(t->be, lpips_path, &t->lpips);
    if (st == KLVAE_OK && !t->lpips)
        t->s.perceptual_weight = 0.0f; /* the caller learns it from klvae_trainer_get */
    const kv_tensor *last = &model->dec.conv_out.weight;
    if (st == KLVAE_OK)
        st = kv_tensor_alloc(t->be, last->shape[0], last->shape[1], last->shape[2],
                             last->shape[3], &t->last_grad_nll);
    if (st == KLVAE_OK)
        st = kv_tensor_alloc(t->be, last->shape[0], last->shape[1], last->shape[2],
                             last->shape[3], &t->last_grad_g);
    if (st == KLVAE_OK)
        st = describe_nets(t);
    if (st != KLVAE_OK) {
        klvae_trainer_free(t);
        return st;
    }
    *out = t;
    return KLVAE_OK;
}

/* ---- the step ---- */

/* What one call of klvae_trainer_step does, decided from its arguments and
 * the step counter before anything runs. */
typedef struct step_plan {
    int micro_batch, channels, h, w;
    float gan_factor;
    bool adaptive, disc_pass;
    /* The micro-batch of the losses' averages: this process's micro_batch
     * images are global_micro's images first_image, first_image + 1, ...
     * (data-parallel; else global_micro = micro_batch, first_image = 0), and
     * share = micro_batch / global_micro. */
    int global_micro, first_image;
    double share;
} step_plan;

typedef struct step_sums {
    double total, rec, perceptual, nll, kl, g, d_weight, d_loss, real, fake;
} step_sums;

static klvae_status_t zero_grads(klvae_trainer_t *t)
{
    klvae_status_t st = kv_params_fill(t->be, t->model_net.grads, 0.0f);
    if (st == KLVAE_OK)
        st = kv_params_fill(t->be, t->disc_net.grads, 0.0f);
    t->logvar_grad = 0.0;
    return st;
}

/* Scales a network's gradients (and the extra scalar gradient) to the clip
 * norm when their global norm exceeds it, as PyTorch's clip_grad_norm_
 * does (coefficient clip / (norm + 1e-6), at most 1). */
static klvae_status_t clip_grads(kv_backend *be, const kv_trained_net *n, double *extra,
                                 float clip)
{
    /* the finiteness check has just summed the same squares */
    double norm = sqrt(n->grad_sum_squares), coef = clip / (norm + 1e-6);
    klvae_status_t st = KLVAE_OK;
    if (st != KLVAE_OK || coef >= 1.0)
        return st;
    st = kv_params_scale(be, n->grads, n->trained, (float)coef);
    if (extra)
        *extra *= coef;
    return st;
}

/* Clipping, Adam and EMA for one network; extra is a scalar trained with it
 * (the model's logvar) whose gradient counts towards the clip norm. */
static klvae_status_t optimizer_step(klvae_trainer_t *t, kv_trained_net *n, double *extra)
{
    klvae_status_t st = KLVAE_OK;
    if (t->s.grad_clip > 0.0f)
        st = clip_grads(t->be, n, extra, t->s.grad_clip);
    n->adam_steps++;
    /* with master weights, Adam and EMA work on them and the weights follow */
    const kv_param_set exact = n->master.count ? n->master : n->weights;
    if (st == KLVAE_OK)
        st = kv_params_adam(t->be, exact, n->grads, n->adam_m, n->adam_v, n->trained, n->lr,
                            t->s.beta1, t->s.beta2, t->s.eps, n->adam_steps);
    if (st == KLVAE_OK && n->ema.count)
        st = kv_params_ema(t->be, n->ema, exact, t->s.ema_decay);
    if (st == KLVAE_OK && n->master.count)
        st = kv_params_copy(t->be, n->weights, n->master);
    return st;
}

static klvae_status_t model_optimizer_step(klvae_trainer_t *t)
{
    klvae_status_t st =
        optimizer_step(t, &t->model_net, t->s.learn_logvar ? &t->logvar_grad : NULL);
    if (st == KLVAE_OK && t->s.learn_logvar) { /* the one scalar, on the host */
        double g = t->logvar_grad, b1 = t->s.beta1, b2 = t->s.beta2;
        double steps = (double)t->model_net.adam_steps;
        t->logvar_m += (1.0 - b1) * (g - t->logvar_m);
        t->logvar_v = t->logvar_v * b2 + (1.0 - b2) * g * g;
        double bc1 = 1.0 - pow(b1, steps), bc2 = 1.0 - pow(b2, steps);
        t->logvar -=
            (float)(t->s.lr / bc1 * t->logvar_m / (sqrt(t->logvar_v) / sqrt(bc2) + t->s.eps));
    }
    return st;
}

/* z from the posterior: a sample (seeded; moments are images first_image,
 * ... of the micro-batch) or the mean. Allocates z. */
static klvae_status_t posterior_z(klvae_trainer_t *t, const kv_tensor *moments, bool sample,
                                  uint64_t seed, int first_image, kv_tensor *z)
{
    kv_backend *be = t->be;
    const int n = moments->shape[0], zc = moments->shape[1] / 2;
    kv_tensor mean = {0}, logvar = {0};
    klvae_status_t st = kv_tensor_alloc(be, n, zc, moments->shape[2], moments->shape[3], &mean);
    if (st == KLVAE_OK)
        st = kv_tensor_alloc(be, n, zc, moments->shape[2], moments->shape[3], &logvar);
    if (st == KLVAE_OK)
        st = be->ops->posterior_split(be, moments, &mean, &logvar);
    if (st == KLVAE_OK && sample)
        st = be->ops->gaussian_sample(be, &mean, &logvar, seed,
                                      (uint64_t)first_image * (kv_tensor_numel(&mean) / n),
                                      &mean);
    kv_tensor_release(be, &logvar);
    if (st != KLVAE_OK) {
        kv_tensor_release(be, &mean);
        return st;
    }
    *z = mean;
    return KLVAE_OK;
}

/* The adaptive weight lambda = disc_weight ||d nll/dW|| / (||d g/dW|| + 1e-4)
 * at W = decoder.conv_out.weight, from the gradient of nll (d_img) and of g
 * (d_gimg) at the reconstruction. Data-parallel: exact sums the two
 * gradients over the ranks first (the global batch's); ddp takes this
 * rank's, normalised by its own batch as Lightning's loss is. */
static klvae_status_t adaptive_weight(klvae_trainer_t *t, const step_plan *plan,
                                      const kv_decoder_tape *dt, const kv_tensor *d_img,
                                      const kv_tensor *d_gimg, double *lambda)
{
    kv_backend *be = t->be;
    double gn = 0.0, gg = 0.0;
    klvae_status_t st = kv_vae_decoder_last_weight_grad(t->m, dt, d_img, &t->last_grad_nll);
    if (st == KLVAE_OK)
        st = kv_vae_decoder_last_weight_grad(t->m, dt, d_gimg, &t->last_grad_g);
    if (st == KLVAE_OK && t->dp && t->s.dp_exact)
        st = kv_dp_sum_tensor(t->dp, &t->last_grad_nll, "the adaptive weight's gradients");
    if (st == KLVAE_OK && t->dp && t->s.dp_exact)
        st = kv_dp_sum_tensor(t->dp, &t->last_grad_g, "the adaptive weight's gradients");
    if (st == KLVAE_OK)
        st = be->ops->sum_squares(be, &t->last_grad_nll, &gn);
    if (st == KLVAE_OK)
        st = be->ops->sum_squares(be, &t->last_grad_g, &gg);
    if (t->dp && !t->s.dp_exact) { /* this rank's batch mean, not its share of the global one */
        gn /= plan->share * plan->share;
        gg /= plan->share * plan->share;
    }
    double l = sqrt(gn) / (sqrt(gg) + KV_LAMBDA_EPS);
    l = l < 0.0 ? 0.0 : (l > KV_LAMBDA_MAX ? KV_LAMBDA_MAX : l);
    *lambda = l * t->s.disc_weight;
    return st;
}

/* The generator pass on one micro-batch: losses, gradients accumulated into
 * t->grads, and the reconstruction (for a discriminator step that reuses it).
 * Data-parallel: x is this rank's part of the global micro-batch; every
 * average is over the global micro-batch (the gradients summed over the
 * ranks are the global batch's), and the losses added into sums are the
 * global batch's. */
static klvae_status_t generator_pass(klvae_trainer_t *t, const step_plan *plan,
                                     const kv_tensor *x, int micro, step_sums *sums,
                                     kv_tensor *recon)
{
    kv_backend *be = t->be;
    klvae_model_t *m = t->m;
    const trainer_settings *s = &t->s;
    const float gan_factor = plan->gan_factor;
    const bool adaptive = plan->adaptive;
    const int B = x->shape[0], G = plan->global_micro;
    const double accum = s->grad_accum, pixels = (double)x->shape[1] * x->shape[2] * x->shape[3];
    const double inv_var = exp(-(double)t->logvar);
    kv_encoder_tape et;
    kv_decoder_tape dt;
    memset(&et, 0, sizeof et);
    memset(&dt, 0, sizeof dt);
    et.recompute = dt.recompute = s->recompute;
    kv_tensor moments = {0}, z = {0}, xhat = {0}, d_img = {0}, d_gimg = {0}, d_lpips = {0};
    kv_tensor logits = {0}, d_logits = {0}, d_z = {0}, d_moments = {0};
    kv_disc_tape gt;
    memset(&gt, 0, sizeof gt);
    float grad_scale[64];
    double lp[64];
    if (B > 64)
        return kv_error(KLVAE_ERR_INVALID_ARGUMENT,
                        "klvae_trainer_step: at most 64 images per micro-batch (got %d)", B);
    const uint64_t posterior_seed = stream_seed(t, t->step, micro, SEED_POSTERIOR);

    /* the encoder keeps a tape only when it trains */
    klvae_status_t st = kv_vae_encode_moments(m, x, s->train_encoder ? &et : NULL, &moments);
    if (st == KLVAE_OK)
        st = posterior_z(t, &moments, s->sample, posterior_seed, plan->first_image, &z);
    if (st == KLVAE_OK)
        st = kv_tensor_alloc(be, B, m->cfg.out_channels, x->shape[2], x->shape[3], &xhat);
    if (st == KLVAE_OK)
        st = kv_vae_decode(m, &z, &dt, &xhat);
    /* nll: pixel and perceptual terms, and d nll / d xhat into d_img */
    double pixel_sum = 0.0, lpips_sum = 0.0;
    if (st == KLVAE_OK)
        st = kv_tensor_alloc(be, B, xhat.shape[1], xhat.shape[2], xhat.shape[3], &d_img);
    if (st == KLVAE_OK)
        st = be->ops->pixel_loss(be, x, &xhat, s->pixel_loss,
                                 (float)(s->pixel_weight * inv_var / G), &pixel_sum, &d_img);
    for (int b = 0; b < B; b++) {
        grad_scale[b] = (float)(s->perceptual_weight * pixels * inv_var / G);
        lp[b] = 0.0;
    }
    if (st == KLVAE_OK && t->lpips && s->perceptual_weight > 0.0f) {
        st = kv_lpips_forward(t->lpips, x, &xhat, s->lpips_dropout,
                              stream_seed(t, t->step, micro, SEED_DROPOUT),
                              (uint64_t)plan->first_image, lp, grad_scale, &d_lpips);
        if (st == KLVAE_OK)
            st = be->ops->add(be, &d_img, &d_lpips, &d_img);
        kv_tensor_release(be, &d_lpips);
        for (int b = 0; b < B; b++)
            lpips_sum += lp[b];
    }
    double rec_sum = s->pixel_weight * pixel_sum + s->perceptual_weight * pixels * lpips_sum;
    double kl_sum = 0.0;
    if (st == KLVAE_OK)
        st = be->ops->kl_sum(be, &moments, &kl_sum);
    /* the generator's GAN term and the adaptive weight */
    double g_loss = 0.0, lambda = 0.0;
    if (st == KLVAE_OK && adaptive) {
        st = kv_disc_forward(t->disc, &xhat, &gt, &logits);
        if (st == KLVAE_OK)
            st = kv_tensor_alloc(be, logits.shape[0], 1, logits.shape[2], logits.shape[3],
                                 &d_logits);
        if (st == KLVAE_OK) /* the mean over the global micro-batch's logits */
            st = be->ops->logit_loss(be, &logits, KV_LOGITS_GENERATOR, (float)plan->share,
                                     &g_loss, &d_logits);
        if (st == KLVAE_OK) /* the discriminator is frozen here */
            st = kv_disc_backward(t->disc, NULL, &gt, &d_logits, &d_gimg);
        if (st == KLVAE_OK)
            st = adaptive_weight(t, plan, &dt, &d_img, &d_gimg, &lambda);
    }
    /* for the stats: the GAN term lambda f g, and lambda (with ddp, the
     * ranks' lambdas differ: their mean) */
    double gan_term = lambda * gan_factor * g_loss, lambda_mean = lambda;
    if (st == KLVAE_OK && t->dp) { /* the global micro-batch's losses */
        double v[6] = {rec_sum, lpips_sum, kl_sum, g_loss * B, lambda * B, lambda * g_loss * B};
        st = kv_dp_sum(t->dp, v, 6, "the losses");
        rec_sum = v[0];
        lpips_sum = v[1];
        kl_sum = v[2];
        g_loss = v[3] / G;
        lambda_mean = v[4] / G;
        gan_term = gan_factor * (v[5] / G);
    }
    const double nll = rec_sum * inv_var / G + pixels * t->logvar;
    const double kl = kl_sum / G;
    /* d total / d xhat = d nll + lambda f d g, over the accumulation window */
    if (st == KLVAE_OK)
        st = be->ops->scale(be, &d_img, (float)(1.0 / accum));
    if (st == KLVAE_OK && adaptive && gan_factor > 0.0f)
        st = be->ops->axpy(be, (float)(lambda * gan_factor / accum), &d_gimg, &d_img);
    if (s->learn_logvar) /* d nll / d s = pixels - exp(-s) sum(rec) / B */
        t->logvar_grad += (pixels - inv_var * rec_sum / G) / accum;
    if (st == KLVAE_OK)
        st = kv_vae_decode_backward(m, t->grads, &dt, &d_img, &d_z);
    if (st == KLVAE_OK)
        st = kv_tensor_alloc(be, moments.shape[0], moments.shape[1], moments.shape[2],
                             moments.shape[3], &d_moments);
    if (st == KLVAE_OK)
        st = be->ops->posterior_backward(be, &moments, &d_z, (float)(s->kl_weight / (G * accum)),
                                         s->sample, posterior_seed,
                                         (uint64_t)plan->first_image *
                                             (kv_tensor_numel(&d_z) / (size_t)B),
                                         &d_moments);
    if (st == KLVAE_OK && s->train_encoder)
        st = kv_vae_encode_backward(m, t->grads, &et, &d_moments);

    sums->rec += rec_sum / ((double)G * pixels);
    sums->perceptual += lpips_sum / G;
    sums->nll += nll;
    sums->kl += kl;
    sums->g += g_loss;
    sums->d_weight += lambda_mean;
    sums->total += nll + s->kl_weight * kl + gan_term;

    kv_encoder_tape_free(be, &et);
    kv_decoder_tape_free(be, &dt);
    kv_disc_tape_free(be, &gt);
    kv_tensor *tmp[] = {&moments, &z, &d_img, &d_gimg, &logits, &d_logits, &d_z, &d_moments};
    for (size_t i = 0; i < KV_ARRAY_LEN(tmp); i++)
        kv_tensor_release(be, tmp[i]);
    if (st != KLVAE_OK) {
        kv_tensor_release(be, &xhat);
        return st;
    }
    *recon = xhat;
    return KLVAE_OK;
}

/* The discriminator pass on one micro-batch: D(x) and D(xhat) forwarded
 * separately (each with its own batch statistics), gradients accumulated
 * when the GAN is on. Data-parallel: means over the global micro-batch. */
static klvae_status_t discriminator_pass(klvae_trainer_t *t, const step_plan *plan,
                                         const kv_tensor *x, const kv_tensor *xhat,
                                         step_sums *sums)
{
    kv_backend *be = t->be;
    const double accum = t->s.grad_accum;
    const float gan_factor = plan->gan_factor;
    const float scale = (float)(gan_factor * 0.5 / accum * plan->share);
    const bool backward = gan_factor > 0.0f; /* otherwise the gradients are exactly zero */
    double real = 0.0, fake = 0.0, lr = 0.0, lf = 0.0;
    klvae_status_t st = KLVAE_OK;
    for (int which = 0; which < 2 && st == KLVAE_OK; which++) {
        const kv_tensor *in = which == 0 ? x : xhat;
        kv_disc_tape tape;
        kv_tensor logits = {0}, d_logits = {0};
        st = kv_disc_forward(t->disc, in, &tape, &logits);
        kv_logit_loss kind = which == 0
                                 ? (t->s.vanilla ? KV_LOGITS_VANILLA_REAL : KV_LOGITS_HINGE_REAL)
                                 : (t->s.vanilla ? KV_LOGITS_VANILLA_FAKE : KV_LOGITS_HINGE_FAKE);
        double loss = 0.0, mean_logit = 0.0;
        if (st == KLVAE_OK)
            st = kv_tensor_alloc(be, logits.shape[0], 1, logits.shape[2], logits.shape[3],
                                 &d_logits);
        if (st == KLVAE_OK)
            st = be->ops->logit_loss(be, &logits, kind, scale, &loss, &d_logits);
        if (st == KLVAE_OK) /* the mean logit, for the log */
            st = be->ops->logit_loss(be, &logits, KV_LOGITS_GENERATOR, 0.0f, &mean_logit, NULL);
        if (st == KLVAE_OK && backward)
            st = kv_disc_backward(t->disc, t->disc_grads, &tape, &d_logits, NULL);
        kv_disc_tape_free(be, &tape);
        kv_tensor_release(be, &logits);
        kv_tensor_release(be, &d_logits);
        if (which == 0) {
            lr = loss;
            real = -mean_logit;
        } else {
            lf = loss;
            fake = -mean_logit;
        }
    }
    if (st == KLVAE_OK && t->dp) { /* the global micro-batch's means */
        const int B = x->shape[0], G = plan->global_micro;
        double v[4] = {lr * B, lf * B, real * B, fake * B};
        st = kv_dp_sum(t->dp, v, 4, "the discriminator's losses");
        lr = v[0] / G;
        lf = v[1] / G;
        real = v[2] / G;
        fake = v[3] / G;
    }
    sums->d_loss += gan_factor * 0.5 * (lr + lf);
    sums->real += real;
    sums->fake += fake;
    return st;
}

/* Where a step's images are: host memory, or the caller's device memory
 * (klvae_trainer_step_device: device is the model's plugin). */
typedef struct step_input {
    const char *fn; /* the API function, for messages */
    const float *images;
    const kv_plugin *device;
} step_input;

/* The arguments of klvae_trainer_step, checked; the plan. */
static klvae_status_t plan_step(const klvae_trainer_t *t, const step_input *in, int n, int h,
                                int w, const klvae_step_stats_t *stats, step_plan *plan)
{
    const char *fn = in->fn;
    const float *images = in->images;
    if (!t || !images)
        return kv_error(KLVAE_ERR_INVALID_ARGUMENT, "%s: %s is NULL", fn,
                        !t ? "trainer" : "images");
    if (stats && stats->struct_size < 8)
        return kv_error(KLVAE_ERR_INVALID_ARGUMENT,
                        "%s: stats->struct_size is %u; set it to sizeof(klvae_step_stats_t)", fn,
                        stats->struct_size);
    const klvae_model_t *m = t->m;
    const int f = kv_config_factor(&m->cfg), c = m->cfg.in_channels, accum = t->s.grad_accum;
    if (n <= 0 || n % accum != 0)
        return kv_error(KLVAE_ERR_INVALID_ARGUMENT,
                        "%s: n is %d; it must be a positive multiple of grad_accum = %d", fn, n,
                        accum);
    if (h < 16 || w < 16 || h % f != 0 || w % f != 0)
        return kv_error(KLVAE_ERR_INVALID_ARGUMENT,
                        "%s: images of %d x %d; training needs sides of at least 16 that "
                        "are multiples of the downsampling factor %d",
                        fn, h, w, f);
    if (m->cfg.out_channels != c)
        return kv_error(KLVAE_ERR_CONFIG,
                        "%s: the model maps %d channels to %d; training reconstructs its "
                        "input, so they must be equal",
                        fn, c, m->cfg.out_channels);
    size_t count;
    if (!kv_numel4(n, c, h, w, &count))
        return kv_error(KLVAE_ERR_INVALID_ARGUMENT, "%s: batch too large", fn);
    plan->micro_batch = n / accum;
    plan->global_micro = plan->micro_batch * (t->dp ? t->dp->comm.size : 1);
    plan->first_image = plan->micro_batch * (t->dp ? t->dp->comm.rank : 0);
    plan->share = (double)plan->micro_batch / plan->global_micro;
    plan->channels = c;
    plan->h = h;
    plan->w = w;
    plan->gan_factor = t->step >= t->s.disc_start ? t->s.disc_factor : 0.0f;
    plan->adaptive = plan->gan_factor > 0.0f || (t->s.ldm && t->s.disc_factor > 0.0f);
    plan->disc_pass = plan->gan_factor > 0.0f || t->s.ldm;
    const int disc_min = kv_disc_min_size(t->disc);
    if (plan->disc_pass && (h < disc_min || w < disc_min))
        return kv_error(KLVAE_ERR_INVALID_ARGUMENT,
                        "%s: %d x %d images are too small for the %d-layer discriminator, "
                        "which needs at least %d x %d",
                        fn, h, w, t->disc->layers, disc_min, disc_min);
    if (in->device) /* device pixels are checked on the device (check_device_input) */
        return KLVAE_OK;
    for (size_t i = 0; i < count; i++) /* a cheap pass next to a step */
        if (!isfinite(images[i])) {
            size_t plane = (size_t)h * w;
            return kv_error(KLVAE_ERR_NONFINITE,
                            "%s: image %zu of the batch holds %g at channel %zu, row %zu, "
                            "column %zu; nothing was changed",
                            fn, i / (plane * c), (double)images[i], i / plane % c, i % plane / w,
                            i % w);
        }
    return KLVAE_OK;
}

/* The discriminator pass on micro-batch x: on the generator pass's
 * reconstruction xhat, or with disc_update=fresh on a second forward with the
 * autoencoder's current weights (the reference's order). */
static klvae_status_t discriminate(klvae_trainer_t *t, const step_plan *plan, const kv_tensor *x,
                                   const kv_tensor *xhat, int micro, step_sums *sums)
{
    if (!t->s.fresh)
        return discriminator_pass(t, plan, x, xhat, sums);
    kv_backend *be = t->be;
    kv_tensor moments = {0}, z = {0}, xhat2 = {0};
    klvae_status_t st = kv_vae_encode_moments(t->m, x, NULL, &moments);
    if (st == KLVAE_OK)
        st = posterior_z(t, &moments, t->s.sample,
                         stream_seed(t, t->step, micro, SEED_FRESH_POSTERIOR), plan->first_image,
                         &z);
    if (st == KLVAE_OK)
        st = kv_tensor_alloc_like(be, x, &xhat2);
    if (st == KLVAE_OK)
        st = kv_vae_decode(t->m, &z, NULL, &xhat2);
    if (st == KLVAE_OK)
        st = discriminator_pass(t, plan, x, &xhat2, sums);
    kv_tensor_release(be, &moments);
    kv_tensor_release(be, &z);
    kv_tensor_release(be, &xhat2);
    return st;
}

/* NULL when the losses so far and a network's accumulated gradients are
 * finite, else what is not (for the message). */
static klvae_status_t first_nonfinite(klvae_trainer_t *t, kv_trained_net *n,
                                      const double *values, const char *const *names,
                                      int count, double extra_grad, const char **what)
{
    *what = NULL;
    for (int i = 0; i < count && !*what; i++)
        if (!isfinite(values[i]))
            *what = names[i];
    double norm = extra_grad * extra_grad;
    klvae_status_t st = kv_params_sum_squares(t->be, n->grads, n->trained, &norm);
    n->grad_sum_squares = norm; /* for clipping, which needs the same sum */
    if (st == KLVAE_OK && !*what && !isfinite(norm))
        *what =
            n == &t->model_net ? "the autoencoder's gradients" : "the discriminator's gradients";
    return st;
}

static klvae_status_t check_generator(klvae_trainer_t *t, const step_sums *s, const char **what)
{
    const double v[] = {s->total, s->rec, s->perceptual, s->nll, s->kl, s->g, s->d_weight};
    const char *const names[] = {"the total loss", "the reconstruction loss",
                                 "the perceptual loss", "the nll loss", "the KL loss",
                                 "the generator's GAN loss", "the adaptive weight"};
    return first_nonfinite(t, &t->model_net, v, names, (int)KV_ARRAY_LEN(v),
                           t->s.learn_logvar ? t->logvar_grad : 0.0, what);
}

static klvae_status_t check_discriminator(klvae_trainer_t *t, const step_sums *s,
                                          const char **what)
{
    const double v[] = {s->d_loss, s->real, s->fake};
    const char *const names[] = {"the discriminator loss", "the mean real logit",
                                 "the mean fake logit"};
    return first_nonfinite(t, &t->disc_net, v, names, (int)KV_ARRAY_LEN(v), 0.0, what);
}

/* Data-parallel: the discriminator's gradients summed over the ranks, once
 * its last pass of the step is done (it runs twice per micro-batch, so
 * there is nothing to overlap; without the GAN they are zeros). */
static klvae_status_t sum_disc_grads(klvae_trainer_t *t, const step_plan *plan)
{
    if (!t->dp || !plan->disc_pass || plan->gan_factor <= 0.0f)
        return KLVAE_OK;
    klvae_status_t st = kv_dp_grads_begin(t->dp, &t->dp->disc);
    if (st == KLVAE_OK)
        st = kv_dp_grads_end(t->dp, &t->dp->disc);
    return st;
}

/* Micro-batch micro of the input as a tensor: the caller's array itself when
 * the backend computes in host memory, else a copy (upload, or import from
 * the caller's device memory). */
static klvae_status_t stage_micro(klvae_trainer_t *t, const step_plan *plan, const step_input *in,
                                  int micro, kv_tensor *x)
{
    kv_backend *be = t->be;
    const int mb = plan->micro_batch, c = plan->channels, h = plan->h, w = plan->w;
    const float *src = in->images + (size_t)micro * mb * c * h * w;
    if (be->host_memory && !in->device) {
        *x = kv_tensor_wrap((float *)src, mb, c, h, w);
        return KLVAE_OK;
    }
    klvae_status_t st = kv_tensor_alloc(be, mb, c, h, w, x);
    if (st == KLVAE_OK)
        st = in->device ? kv_plugin_status(in->device->import_device(be, x, src))
                        : be->ops->upload(be, x, src);
    if (st != KLVAE_OK)
        kv_tensor_release(be, x);
    return st;
}

/* The device batch is checked for NaN and infinity before anything runs
 * (the host batch is scanned by plan_step): one sum of squares per
 * micro-batch. */
static klvae_status_t check_device_input(klvae_trainer_t *t, const step_plan *plan,
                                         const step_input *in)
{
    for (int micro = 0; micro < t->s.grad_accum; micro++) {
        kv_tensor x = {0};
        double sum = 0.0;
        klvae_status_t st = stage_micro(t, plan, in, micro, &x);
        if (st == KLVAE_OK)
            st = t->be->ops->sum_squares(t->be, &x, &sum);
        kv_tensor_release(t->be, &x);
        if (st != KLVAE_OK)
            return st;
        if (!isfinite(sum))
            return kv_error(KLVAE_ERR_NONFINITE,
                            "%s: images %d to %d of the batch hold a NaN or an infinity; "
                            "nothing was changed",
                            in->fn, micro * plan->micro_batch,
                            (micro + 1) * plan->micro_batch - 1);
    }
    return KLVAE_OK;
}

/* One micro-batch of the step; the last one also updates both networks
 * unless a value is non-finite (*skipped then says what). */
static klvae_status_t micro_step(klvae_trainer_t *t, const step_plan *plan, const step_input *in,
                                 int micro, bool last, step_sums *sums, const char **skipped)
{
    kv_backend *be = t->be;
    kv_tensor x = {0}, xhat = {0};
    klvae_status_t st = stage_micro(t, plan, in, micro, &x);
    /* data-parallel: the last micro-batch's backward sums the gradients
     * over the ranks, bucket by bucket as it writes them */
    if (st == KLVAE_OK && last && t->dp)
        st = kv_dp_grads_begin(t->dp, &t->dp->model);
    if (st == KLVAE_OK)
        st = generator_pass(t, plan, &x, micro, sums, &xhat);
    /* Everything that does not need the autoencoder's update runs before it,
     * so that a non-finite value is found while nothing has changed. */
    const bool disc_first = plan->disc_pass && (!t->s.fresh || !last);
    if (st == KLVAE_OK && disc_first)
        st = discriminate(t, plan, &x, &xhat, micro, sums);
    if (st == KLVAE_OK && last && t->dp) /* after the discriminator's pass, which they overlap */
        st = kv_dp_grads_end(t->dp, &t->dp->model);
    if (st == KLVAE_OK && last && disc_first)
        st = sum_disc_grads(t, plan);
    if (st == KLVAE_OK && last)
        st = check_generator(t, sums, skipped);
    if (st == KLVAE_OK && last && !*skipped && disc_first)
        st = check_discriminator(t, sums, skipped);
    if (st == KLVAE_OK && last && !*skipped) {
        st = model_optimizer_step(t);
        if (st == KLVAE_OK && plan->disc_pass && !disc_first)
            st = discriminate(t, plan, &x, &xhat, micro, sums);
        if (st == KLVAE_OK && plan->disc_pass && !disc_first)
            st = sum_disc_grads(t, plan);
        if (st == KLVAE_OK && plan->disc_pass && !disc_first)
            st = check_discriminator(t, sums, skipped);
        if (st == KLVAE_OK && plan->disc_pass && !*skipped)
            st = optimizer_step(t, &t->disc_net, NULL);
    }
    kv_tensor_release(be, &x);
    kv_tensor_release(be, &xhat);
    return st;
}

/* The discriminator's BatchNorm running statistics move in every forward
 * (training mode), before the step knows whether it will update anything;
 * a refused or skipped step puts them back. */
static float *running_stats_copy(const kv_disc *d)
{
    size_t total = 0;
    for (int i = 0; i < d->convs; i++)
        if (d->running_mean[i])
            total += 2 * (size_t)d->bn[i].weight.shape[0];
    float *copy = malloc((total ? total : 1) * sizeof *copy), *at = copy;
    for (int i = 0; copy && i < d->convs; i++) {
        if (!d->running_mean[i])
            continue;
        size_t c = (size_t)d->bn[i].weight.shape[0];
        memcpy(at, d->running_mean[i], c * sizeof *at);
        memcpy(at + c, d->running_var[i], c * sizeof *at);
        at += 2 * c;
    }
    return copy;
}

static void running_stats_restore(kv_disc *d, const float *copy)
{
    for (int i = 0; i < d->convs; i++) {
        if (!d->running_mean[i])
            continue;
        size_t c = (size_t)d->bn[i].weight.shape[0];
        memcpy(d->running_mean[i], copy, c * sizeof *copy);
        memcpy(d->running_var[i], copy + c, c * sizeof *copy);
        copy += 2 * c;
    }
}

/* data_parallel=ddp: each rank's BatchNorm running statistics moved with
 * its own batch; every rank takes rank 0's, as DDP's broadcast_buffers. */
static klvae_status_t share_running_stats(klvae_trainer_t *t)
{
    float *stats = running_stats_copy(t->disc);
    if (!stats)
        return kv_error(KLVAE_ERR_OUT_OF_MEMORY, "out of memory in klvae_trainer_step");
    size_t floats = 0;
    for (int i = 0; i < t->disc->convs; i++)
        if (t->disc->running_mean[i])
            floats += 2 * (size_t)t->disc->bn[i].weight.shape[0];
    klvae_status_t st = kv_dp_broadcast(t->dp, stats, floats * sizeof *stats,
                                        "the BatchNorm running statistics");
    if (st == KLVAE_OK)
        running_stats_restore(t->disc, stats);
    free(stats);
    return st;
}

static void write_stats(const klvae_trainer_t *t, const step_plan *plan, const step_sums *sums,
                        bool skipped, double seconds, klvae_step_stats_t *stats)
{
    const double accum = t->s.grad_accum;
    klvae_step_stats_t full;
    memset(&full, 0, sizeof full);
    full.struct_size = stats->struct_size;
    full.step = t->step;
    full.total_loss = sums->total / accum;
    full.rec_loss = sums->rec / accum;
    full.perceptual_loss = sums->perceptual / accum;
    full.nll_loss = sums->nll / accum;
    full.kl_loss = sums->kl / accum;
    full.g_loss = sums->g / accum;
    full.d_weight = sums->d_weight / accum;
    full.disc_factor = plan->gan_factor;
    full.d_loss = sums->d_loss / accum;
    full.logits_real = sums->real / accum;
    full.logits_fake = sums->fake / accum;
    full.logvar = t->logvar;
    full.seconds = seconds;
    full.skipped = skipped ? 1u : 0u;
    full.skipped_steps = t->skipped_steps;
    size_t size = KV_MIN((size_t)stats->struct_size, sizeof full);
    memcpy(stats, &full, size);
    stats->struct_size = (uint32_t)size;
}

static klvae_status_t trainer_step(klvae_trainer_t *t, const step_input *in, const step_plan *p,
                                   klvae_step_stats_t *stats)
{
    step_plan plan = *p;
    klvae_status_t st;
    const double t0 = kv_now_seconds();
    const int accum = t->s.grad_accum;
    step_sums sums;
    memset(&sums, 0, sizeof sums);
    const char *nonfinite = NULL;
    const int64_t model_steps = t->model_net.adam_steps;
    float *running = running_stats_copy(t->disc);
    if (!running)
        return kv_error(KLVAE_ERR_OUT_OF_MEMORY, "out of memory in %s", in->fn);
    st = zero_grads(t);
    for (int micro = 0; micro < accum && st == KLVAE_OK; micro++)
        st = micro_step(t, &plan, in, micro, micro == accum - 1, &sums, &nonfinite);
    /* no trim: the next step allocates what this one released, so the
     * backend keeps it (the CPU's block cache, the CUDA pool) until the
     * trainer is freed */
    /* A non-finite value before the autoencoder's update: nothing changed.
     * After it (disc_update=fresh only): the discriminator's update was
     * left out. */
    const bool updated = t->model_net.adam_steps != model_steps;
    if (st == KLVAE_OK && nonfinite) /* the discriminator is as it was, in both cases */
        running_stats_restore(t->disc, running);
    free(running);
    if (st == KLVAE_OK && !nonfinite && t->dp && !t->s.dp_exact)
        st = share_running_stats(t);
    if (st != KLVAE_OK)
        return st;
    if (nonfinite && t->s.refuse_nonfinite) {
        klvae_status_t refused = kv_error(
            KLVAE_ERR_NONFINITE, "%s: %s is not finite at step %lld; %s", in->fn,
            nonfinite, (long long)t->step,
            updated ? "the autoencoder was updated (disc_update=fresh finds this after its "
                      "update) but the discriminator was not"
                    : "nothing was changed (nonfinite=skip skips such steps instead)");
        if (updated)
            t->step++;
        return refused;
    }
    if (nonfinite)
        t->skipped_steps++;
    if (stats)
        write_stats(t, &plan, &sums, nonfinite != NULL, kv_now_seconds() - t0, stats);
    if (!nonfinite || updated)
        t->step++;
    return KLVAE_OK;
}

/* Data-parallel: every rank learns whether every other could plan its step,
 * with the same n, h, w and step counter; a rank that failed is named to
 * all. */
static klvae_status_t agree_on_step(klvae_trainer_t *t, const char *fn, klvae_status_t mine, int n,
                                    int h, int w)
{
    static const char *const fact_names[] = {"n", "h", "w", "the step counter"};
    const double facts[] = {n, h, w, (double)t->step};
    int rank, fact;
    klvae_status_t st = kv_dp_agree(t->dp, mine, facts, 4, &rank, &fact);
    if (st == KLVAE_OK && rank >= 0)
        st = kv_error(KLVAE_ERR_INVALID_ARGUMENT,
                      "%s: rank %d's %s differs from rank 0's; every rank passes its share of "
                      "the global batch: the same n, h and w, at the same step (load a "
                      "checkpoint on every rank)",
                      fn, rank, fact_names[fact]);
    return st;
}

/* The step once the busy marks (and a device step's stream) are taken:
 * mine is KLVAE_OK or what already failed on this rank. Data-parallel, the
 * ranks first learn whether every one of them can step (its arguments, a
 * device batch's values), so that a rank that refuses stops them all. */
static klvae_status_t checked_step(klvae_trainer_t *t, const step_input *in, klvae_status_t mine,
                                   int n, int h, int w, klvae_step_stats_t *stats)
{
    step_plan plan;
    klvae_status_t st = mine;
    if (st == KLVAE_OK)
        st = plan_step(t, in, n, h, w, stats, &plan);
    if (st == KLVAE_OK && in->device)
        st = check_device_input(t, &plan, in);
    if (t->dp)
        st = agree_on_step(t, in->fn, st, n, h, w);
    return st == KLVAE_OK ? trainer_step(t, in, &plan, stats) : st;
}

/* A step behind the busy marks of the trainer and its model (no encode or
 * decode meanwhile); a device step on the caller's stream. */
static klvae_status_t locked_step(klvae_trainer_t *t, const step_input *in, int n, int h, int w,
                                  void *stream, klvae_step_stats_t *stats)
{
    if (!t)
        return kv_error(KLVAE_ERR_INVALID_ARGUMENT, "%s: trainer is NULL", in->fn);
    klvae_status_t st = kv_busy_enter(&t->busy, in->fn);
    if (st != KLVAE_OK)
        return st;
    char model_fn[64];
    snprintf(model_fn, sizeof model_fn, "%s (its model)", in->fn);
    st = kv_busy_enter(&t->m->busy, model_fn);
    if (st == KLVAE_OK) {
        if (in->device) {
            st = kv_model_stream_enter(t->m, in->fn, "klvae_trainer_step", stream);
            if (st == KLVAE_OK)
                st = kv_model_stream_leave(t->m, checked_step(t, in, KLVAE_OK, n, h, w, stats),
                                           true);
            else if (t->dp) /* the other ranks learn that this one cannot step */
                st = checked_step(t, in, st, n, h, w, stats);
        } else {
            st = checked_step(t, in, KLVAE_OK, n, h, w, stats);
        }
        st = kv_busy_leave(&t->m->busy, st);
    }
    return kv_busy_leave(&t->busy, st);
}

KLVAE_API klvae_status_t klvae_trainer_step(klvae_trainer_t *t, const float *images, int n, int h,
                                            int w, klvae_step_stats_t *stats)
{
    kv_error_clear();
    const step_input in = {"klvae_trainer_step", images, NULL};
    return locked_step(t, &in, n, h, w, NULL, stats);
}

KLVAE_API klvae_status_t klvae_trainer_step_device(klvae_trainer_t *t, const float *images, int n,
                                                   int h, int w, void *stream,
                                                   klvae_step_stats_t *stats)
{
    kv_error_clear();
    const step_input in = {"klvae_trainer_step_device", images, t && t->m ? t->m->plugin : NULL};
    if (t && !in.device)
        return kv_error(KLVAE_ERR_INVALID_ARGUMENT,
                        "klvae_trainer_step_device: the model runs on the %s backend, which has "
                        "no device memory; use klvae_trainer_step with host arrays (or load the "
                        "model with backend=cuda)",
                        t->m->backend_name);
    return locked_step(t, &in, n, h, w, stream, stats);
}

KLVAE_API int64_t klvae_trainer_step_count(const klvae_trainer_t *t)
{
    return t ? t->step : 0;
}

/* ---- settings, notes ---- */

static klvae_status_t trainer_get_unlocked(const klvae_trainer_t *t, const char *key, char *buf,
                                           size_t size)
{
    kv_error_clear();
    if (!t || !key || (!buf && size))
        return kv_error(KLVAE_ERR_INVALID_ARGUMENT, "klvae_trainer_get: %s is NULL",
                        !t ? "trainer" : !key ? "key" : "buf");
    const trainer_settings *s = &t->s;
    char text[64];
    char normal[64];
    size_t len = strlen(key);
    if (len >= sizeof normal)
        return kv_error(KLVAE_ERR_OPTION, "'%s' is not a trainer key", key);
    for (size_t i = 0; i <= len; i++)
        normal[i] = key[i] == '-' ? '_' : key[i];
    struct {
        const char *key;
        double value;
    } numbers[] = {
        {"learning_rate", s->lr},          {"disc_learning_rate", s->disc_lr},
        {"adam_beta1", s->beta1},          {"adam_beta2", s->beta2},
        {"adam_eps", s->eps},              {"pixel_weight", s->pixel_weight},
        {"perceptual_weight", s->perceptual_weight}, {"lpips_dropout", s->lpips_dropout},
        {"kl_weight", s->kl_weight},       {"logvar_init", s->logvar_init},
        {"disc_factor", s->disc_factor},   {"disc_weight", s->disc_weight},
        {"ema_decay", s->ema_decay},       {"grad_clip", s->grad_clip},
        {"disc_start", (double)s->disc_start}, {"disc_layers", s->disc_layers},
        {"disc_channels", s->disc_channels},   {"grad_accum", s->grad_accum},
        {"allreduce_bucket_mb", s->bucket_mb},
    };
    const char *word = NULL;
    for (size_t i = 0; i < KV_ARRAY_LEN(numbers); i++) {
        if (strcmp(normal, numbers[i].key) != 0)
            continue;
        double v = numbers[i].value;
        if (v == floor(v) && fabs(v) < 1e15) {
            snprintf(text, sizeof text, "%.0f", v);
        } else { /* the float setting, in the fewest digits that give it back */
            for (int p = 1; p <= 9; p++) {
                snprintf(text, sizeof text, "%.*g", p, v);
                if (strtof(text, NULL) == (float)v)
                    break;
            }
        }
        word = text;
    }
    if (strcmp(normal, "pixel_loss") == 0)
        word = s->pixel_loss == KV_LOSS_L2 ? "l2" : "l1";
    else if (strcmp(normal, "disc_loss") == 0)
        word = s->vanilla ? "vanilla" : "hinge";
    else if (strcmp(normal, "disc_update") == 0)
        word = s->fresh ? "fresh" : "reuse";
    else if (strcmp(normal, "posterior") == 0)
        word = s->sample ? "sample" : "mode";
    else if (strcmp(normal, "preset") == 0)
        word = s->ldm ? "ldm" : "default";
    else if (strcmp(normal, "learn_logvar") == 0)
        word = s->learn_logvar ? "true" : "false";
    else if (strcmp(normal, "train_encoder") == 0)
        word = s->train_encoder ? "true" : "false";
    else if (strcmp(normal, "recompute") == 0)
        word = s->recompute ? "true" : "false";
    else if (strcmp(normal, "nonfinite") == 0)
        word = s->refuse_nonfinite ? "refuse" : "skip";
    else if (strcmp(normal, "data_parallel") == 0)
        word = s->dp_exact ? "exact" : "ddp";
    else if (strcmp(normal, "allreduce") == 0) /* what a communicator made of it */
        word = t->dp ? kv_dp_allreduce_name(t->dp) : s->allreduce;
    if (!word)
        return kv_error(KLVAE_ERR_OPTION, "'%s' is not a trainer setting", key);
    return kv_copy_out("klvae_trainer_get", key, word, buf, size);
}

KLVAE_API klvae_status_t klvae_trainer_get(const klvae_trainer_t *t, const char *key, char *buf,
                                           size_t size)
{
    /* const for the caller; the in-use mark is the trainer's own state */
    klvae_trainer_t *busy = (klvae_trainer_t *)t;
    kv_error_clear();
    klvae_status_t st = t ? kv_busy_enter(&busy->busy, "klvae_trainer_get") : KLVAE_OK;
    if (st != KLVAE_OK)
        return st;
    st = trainer_get_unlocked(busy, key, buf, size);
    return t ? kv_busy_leave(&busy->busy, st) : st;
}

static int find_note(const klvae_trainer_t *t, const char *key)
{
    for (int i = 0; i < t->notes; i++)
        if (strcmp(t->note_key[i], key) == 0)
            return i;
    return -1;
}

static klvae_status_t trainer_set_note_unlocked(klvae_trainer_t *t, const char *key,
                                                const char *value)
{
    kv_error_clear();
    if (!t || !key || !value)
        return kv_error(KLVAE_ERR_INVALID_ARGUMENT, "klvae_trainer_set_note: %s is NULL",
                        !t ? "trainer" : !key ? "key" : "value");
    if (!*key || strlen(key) >= KV_NOTE_SIZE || strlen(value) >= KV_NOTE_SIZE)
        return kv_error(KLVAE_ERR_INVALID_ARGUMENT,
                        "klvae_trainer_set_note: keys and values are 1 to %d bytes",
                        KV_NOTE_SIZE - 1);
    int i = find_note(t, key);
    if (i < 0) {
        if (t->notes == KV_MAX_NOTES)
            return kv_error(KLVAE_ERR_INVALID_ARGUMENT,
                            "klvae_trainer_set_note: at most %d notes", KV_MAX_NOTES);
        i = t->notes++;
        strcpy(t->note_key[i], key);
    }
    strcpy(t->note_value[i], value);
    return KLVAE_OK;
}

KLVAE_API klvae_status_t klvae_trainer_set_note(klvae_trainer_t *t, const char *key,
                                                const char *value)
{
    kv_error_clear();
    klvae_status_t st = t ? kv_busy_enter(&t->busy, "klvae_trainer_set_note") : KLVAE_OK;
    if (st != KLVAE_OK)
        return st;
    st = trainer_set_note_unlocked(t, key, value);
    return t ? kv_busy_leave(&t->busy, st) : st;
}

static klvae_status_t trainer_get_note_unlocked(const klvae_trainer_t *t, const char *key,
                                                char *buf, size_t size)
{
    kv_error_clear();
    if (!t || !key || (!buf && size))
        return kv_error(KLVAE_ERR_INVALID_ARGUMENT, "klvae_trainer_get_note: %s is NULL",
                        !t ? "trainer" : !key ? "key" : "buf");
    int i = find_note(t, key);
    if (i < 0)
        return kv_error(KLVAE_ERR_OPTION, "the trainer has no note '%s'", key);
    return kv_copy_out("klvae_trainer_get_note", key, t->note_value[i], buf, size);
}

KLVAE_API klvae_status_t klvae_trainer_get_note(const klvae_trainer_t *t, const char *key,
                                                char *buf, size_t size)
{
    /* const for the caller; the in-use mark is the trainer's own state */
    klvae_trainer_t *busy = (klvae_trainer_t *)t;
    kv_error_clear();
    klvae_status_t st = t ? kv_busy_enter(&busy->busy, "klvae_trainer_get_note") : KLVAE_OK;
    if (st != KLVAE_OK)
        return st;
    st = trainer_get_note_unlocked(busy, key, buf, size);
    return t ? kv_busy_leave(&busy->busy, st) : st;
}

const klvae_model_t *kv_trainer_grads(const klvae_trainer_t *t)
{
    return t->grads;
}

const kv_disc *kv_trainer_disc(const klvae_trainer_t *t)
{
    return t->disc;
}

const kv_disc *kv_trainer_disc_grads(const klvae_trainer_t *t)
{
    return t->disc_grads;
}
