/* trainer.c — klvae_trainer_*: the LDM training step (generator pass,
 * adaptive GAN weight, Adam, EMA, discriminator pass), checkpoints.
 * docs/training.md describes the step and every difference between the
 * default settings and preset=ldm. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "base/io.h"
#include "base/options.h"
#include "base/philox.h"
#include "formats/safetensors.h"
#include "model/vae.h"
#include "train/discriminator.h"
#include "train/lpips.h"
#include "train/trainer.h"

#define KV_MAX_NOTES 32
#define KV_NOTE_SIZE 256
#define KV_LAMBDA_EPS 1e-4
#define KV_LAMBDA_MAX 1e4
#define CHECKPOINT_FORMAT "klvae-trainer-checkpoint-1"

typedef struct trainer_settings {
    float lr, disc_lr, beta1, beta2, eps;
    kv_pixel_loss pixel_loss;
    float pixel_weight, perceptual_weight, lpips_dropout, kl_weight, logvar_init;
    bool learn_logvar;
    int64_t disc_start;
    float disc_factor, disc_weight;
    bool vanilla, fresh, sample, train_encoder, ldm;
    int disc_layers, disc_channels, grad_accum;
    float ema_decay, grad_clip;
} trainer_settings;

struct klvae_trainer {
    klvae_model_t *m; /* borrowed */
    kv_backend *be;
    trainer_settings s;
    uint64_t seed;
    int64_t step, model_adam_steps, disc_adam_steps;
    klvae_model_t *grads, *adam_m, *adam_v, *ema; /* shadows of the model */
    kv_disc *disc, *disc_grads, *disc_m, *disc_v;
    kv_lpips *lpips;
    kv_tensor last_grad_nll, last_grad_g; /* for the adaptive weight */
    float logvar;
    double logvar_grad, logvar_m, logvar_v;
    char *options_text; /* every option's value, for checkpoints */
    int notes;
    char note_key[KV_MAX_NOTES][KV_NOTE_SIZE], note_value[KV_MAX_NOTES][KV_NOTE_SIZE];
};

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
        st = kv_model_alloc_params(s);
    for (size_t i = 0; st == KLVAE_OK && i < s->num_params; i++) {
        if (copy) {
            st = m->be->ops->fill(m->be, s->params[i].tensor, 0.0f);
            if (st == KLVAE_OK)
                st = m->be->ops->add(m->be, s->params[i].tensor, m->params[i].tensor,
                                     s->params[i].tensor);
        } else {
            st = m->be->ops->fill(m->be, s->params[i].tensor, 0.0f);
        }
    }
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

KLVAE_API void klvae_trainer_free(klvae_trainer_t *t)
{
    if (!t)
        return;
    kv_backend *be = t->be;
    shadow_release(be, t->grads);
    shadow_release(be, t->adam_m);
    shadow_release(be, t->adam_v);
    shadow_release(be, t->ema);
    kv_disc_free(t->disc);
    kv_disc_free(t->disc_grads);
    kv_disc_free(t->disc_m);
    kv_disc_free(t->disc_v);
    kv_lpips_free(t->lpips);
    kv_tensor_release(be, &t->last_grad_nll);
    kv_tensor_release(be, &t->last_grad_g);
    free(t->options_text);
    free(t);
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
    if (st != KLVAE_OK) {
        klvae_trainer_free(t);
        return st;
    }
    *out = t;
    return KLVAE_OK;
}

/* ---- the step ---- */

typedef struct step_sums {
    double total, rec, perceptual, nll, kl, g, d_weight, d_loss, real, fake;
} step_sums;

static klvae_status_t zero_grads(klvae_trainer_t *t)
{
    klvae_status_t st = KLVAE_OK;
    for (size_t i = 0; st == KLVAE_OK && i < t->grads->num_params; i++)
        st = t->be->ops->fill(t->be, t->grads->params[i].tensor, 0.0f);
    for (int i = 0; st == KLVAE_OK && i < t->disc_grads->num_params; i++)
        st = t->be->ops->fill(t->be, t->disc_grads->params[i].tensor, 0.0f);
    t->logvar_grad = 0.0;
    return st;
}

/* Scales grads to the clip norm when they exceed it, as PyTorch's
 * clip_grad_norm_ does (coefficient clip / (norm + 1e-6), at most 1). */
static klvae_status_t clip_grads(kv_backend *be, kv_param *params, size_t count,
                                 const bool *use, double *extra, float clip)
{
    double total = extra ? *extra * *extra : 0.0;
    for (size_t i = 0; i < count; i++) {
        if (use && !use[i])
            continue;
        double s;
        klvae_status_t st = be->ops->sum_squares(be, params[i].tensor, &s);
        if (st != KLVAE_OK)
            return st;
        total += s;
    }
    double norm = sqrt(total), coef = clip / (norm + 1e-6);
    if (coef >= 1.0)
        return KLVAE_OK;
    for (size_t i = 0; i < count; i++) {
        if (use && !use[i])
            continue;
        klvae_status_t st = be->ops->scale(be, params[i].tensor, (float)coef);
        if (st != KLVAE_OK)
            return st;
    }
    if (extra)
        *extra *= coef;
    return KLVAE_OK;
}

static klvae_status_t model_optimizer_step(klvae_trainer_t *t)
{
    kv_backend *be = t->be;
    const size_t n = t->m->num_params;
    bool use[4096];
    bool *usep = n <= 4096 ? use : NULL;
    for (size_t i = 0; usep && i < n; i++)
        use[i] = is_trainable(t, i);
    klvae_status_t st = KLVAE_OK;
    if (t->s.grad_clip > 0.0f)
        st = clip_grads(be, t->grads->params, n, usep, t->s.learn_logvar ? &t->logvar_grad : NULL,
                        t->s.grad_clip);
    t->model_adam_steps++;
    for (size_t i = 0; st == KLVAE_OK && i < n; i++) {
        if (!is_trainable(t, i))
            continue;
        st = be->ops->adam(be, t->m->params[i].tensor, t->grads->params[i].tensor,
                           t->adam_m->params[i].tensor, t->adam_v->params[i].tensor, t->s.lr,
                           t->s.beta1, t->s.beta2, t->s.eps, t->model_adam_steps);
    }
    if (st == KLVAE_OK && t->s.learn_logvar) { /* the one scalar, on the host */
        double g = t->logvar_grad, b1 = t->s.beta1, b2 = t->s.beta2;
        t->logvar_m += (1.0 - b1) * (g - t->logvar_m);
        t->logvar_v = t->logvar_v * b2 + (1.0 - b2) * g * g;
        double bc1 = 1.0 - pow(b1, (double)t->model_adam_steps);
        double bc2 = 1.0 - pow(b2, (double)t->model_adam_steps);
        t->logvar -= (float)(t->s.lr / bc1 * t->logvar_m / (sqrt(t->logvar_v) / sqrt(bc2) + t->s.eps));
    }
    for (size_t i = 0; st == KLVAE_OK && t->ema && i < n; i++)
        st = be->ops->lerp(be, t->ema->params[i].tensor, t->m->params[i].tensor,
                           1.0f - t->s.ema_decay);
    return st;
}

static klvae_status_t disc_optimizer_step(klvae_trainer_t *t)
{
    kv_backend *be = t->be;
    klvae_status_t st = KLVAE_OK;
    if (t->s.grad_clip > 0.0f)
        st = clip_grads(be, t->disc_grads->params, (size_t)t->disc_grads->num_params, NULL, NULL,
                        t->s.grad_clip);
    t->disc_adam_steps++;
    for (int i = 0; st == KLVAE_OK && i < t->disc->num_params; i++)
        st = be->ops->adam(be, t->disc->params[i].tensor, t->disc_grads->params[i].tensor,
                           t->disc_m->params[i].tensor, t->disc_v->params[i].tensor,
                           t->s.disc_lr, t->s.beta1, t->s.beta2, t->s.eps, t->disc_adam_steps);
    return st;
}

/* z from the posterior: a sample (seeded) or the mean. Allocates z. */
static klvae_status_t posterior_z(klvae_trainer_t *t, const kv_tensor *moments, bool sample,
                                  uint64_t seed, kv_tensor *z)
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
        st = be->ops->gaussian_sample(be, &mean, &logvar, seed, &mean);
    kv_tensor_release(be, &logvar);
    if (st != KLVAE_OK) {
        kv_tensor_release(be, &mean);
        return st;
    }
    *z = mean;
    return KLVAE_OK;
}

/* The generator pass on one micro-batch: losses, gradients accumulated into
 * t->grads, and the reconstruction (for a discriminator step that reuses it). */
static klvae_status_t generator_pass(klvae_trainer_t *t, const kv_tensor *x, int micro,
                                     float gan_factor, bool adaptive, step_sums *sums,
                                     kv_tensor *recon)
{
    kv_backend *be = t->be;
    klvae_model_t *m = t->m;
    const trainer_settings *s = &t->s;
    const int B = x->shape[0];
    const double accum = s->grad_accum, pixels = (double)x->shape[1] * x->shape[2] * x->shape[3];
    const double inv_var = exp(-(double)t->logvar);
    kv_encoder_tape et;
    kv_decoder_tape dt;
    memset(&et, 0, sizeof et);
    memset(&dt, 0, sizeof dt);
    kv_tensor moments = {0}, z = {0}, xhat = {0}, d_img = {0}, d_gimg = {0}, d_lpips = {0};
    kv_tensor logits = {0}, d_logits = {0}, d_z = {0}, d_moments = {0};
    kv_disc_tape gt;
    memset(&gt, 0, sizeof gt);
    float grad_scale[64];
    double lp[64];
    if (B > 64)
        return kv_error(KLVAE_ERR_INVALID_ARGUMENT,
                        "klvae_trainer_step: at most 64 images per micro-batch (got %d)", B);

    klvae_status_t st = s->train_encoder ? kv_encode_train(m, x, &et, &moments)
                                         : kv_vae_encode_moments(m, x, &moments);
    if (st == KLVAE_OK)
        st = posterior_z(t, &moments, s->sample, stream_seed(t, t->step, micro, SEED_POSTERIOR),
                         &z);
    if (st == KLVAE_OK)
        st = kv_decode_train(m, &z, &dt, &xhat);
    /* nll: pixel and perceptual terms, and d nll / d xhat into d_img */
    double pixel_sum = 0.0, lpips_sum = 0.0;
    if (st == KLVAE_OK)
        st = kv_tensor_alloc(be, B, xhat.shape[1], xhat.shape[2], xhat.shape[3], &d_img);
    if (st == KLVAE_OK)
        st = be->ops->pixel_loss(be, x, &xhat, s->pixel_loss,
                                 (float)(s->pixel_weight * inv_var / B), &pixel_sum, &d_img);
    for (int b = 0; b < B; b++) {
        grad_scale[b] = (float)(s->perceptual_weight * pixels * inv_var / B);
        lp[b] = 0.0;
    }
    if (st == KLVAE_OK && t->lpips && s->perceptual_weight > 0.0f) {
        st = kv_lpips_forward(t->lpips, x, &xhat, s->lpips_dropout,
                              stream_seed(t, t->step, micro, SEED_DROPOUT), lp, grad_scale,
                              &d_lpips);
        if (st == KLVAE_OK)
            st = be->ops->add(be, &d_img, &d_lpips, &d_img);
        kv_tensor_release(be, &d_lpips);
        for (int b = 0; b < B; b++)
            lpips_sum += lp[b];
    }
    const double rec_sum = s->pixel_weight * pixel_sum + s->perceptual_weight * pixels * lpips_sum;
    const double nll = rec_sum * inv_var / B + pixels * t->logvar;
    double kl = 0.0;
    if (st == KLVAE_OK) {
        st = be->ops->kl_sum(be, &moments, &kl);
        kl /= B;
    }
    /* the generator's GAN term and the adaptive weight */
    double g_loss = 0.0, lambda = 0.0;
    if (st == KLVAE_OK && adaptive) {
        st = kv_disc_forward(t->disc, &xhat, &gt, &logits);
        if (st == KLVAE_OK)
            st = kv_tensor_alloc(be, logits.shape[0], 1, logits.shape[2], logits.shape[3],
                                 &d_logits);
        if (st == KLVAE_OK)
            st = be->ops->logit_loss(be, &logits, KV_LOGITS_GENERATOR, 1.0f, &g_loss, &d_logits);
        if (st == KLVAE_OK) /* the discriminator is frozen here */
            st = kv_disc_backward(t->disc, NULL, &gt, &d_logits, &d_gimg);
        double gn = 0.0, gg = 0.0;
        if (st == KLVAE_OK)
            st = kv_decoder_last_weight_grad(m, &dt, &d_img, &t->last_grad_nll);
        if (st == KLVAE_OK)
            st = kv_decoder_last_weight_grad(m, &dt, &d_gimg, &t->last_grad_g);
        if (st == KLVAE_OK)
            st = be->ops->sum_squares(be, &t->last_grad_nll, &gn);
        if (st == KLVAE_OK)
            st = be->ops->sum_squares(be, &t->last_grad_g, &gg);
        lambda = sqrt(gn) / (sqrt(gg) + KV_LAMBDA_EPS);
        lambda = lambda < 0.0 ? 0.0 : (lambda > KV_LAMBDA_MAX ? KV_LAMBDA_MAX : lambda);
        lambda *= s->disc_weight;
    }
    /* d total / d xhat = d nll + lambda f d g, over the accumulation window */
    if (st == KLVAE_OK)
        st = be->ops->scale(be, &d_img, (float)(1.0 / accum));
    if (st == KLVAE_OK && adaptive && gan_factor > 0.0f)
        st = be->ops->axpy(be, (float)(lambda * gan_factor / accum), &d_gimg, &d_img);
    if (s->learn_logvar) /* d nll / d s = pixels - exp(-s) sum(rec) / B */
        t->logvar_grad += (pixels - inv_var * rec_sum / B) / accum;
    if (st == KLVAE_OK)
        st = kv_decode_backward(m, t->grads, &dt, &d_img, &d_z);
    if (st == KLVAE_OK)
        st = kv_tensor_alloc(be, moments.shape[0], moments.shape[1], moments.shape[2],
                             moments.shape[3], &d_moments);
    if (st == KLVAE_OK)
        st = be->ops->posterior_backward(be, &moments, &d_z, (float)(s->kl_weight / (B * accum)),
                                         s->sample,
                                         stream_seed(t, t->step, micro, SEED_POSTERIOR),
                                         &d_moments);
    if (st == KLVAE_OK && s->train_encoder)
        st = kv_encode_backward(m, t->grads, &et, &d_moments);

    sums->rec += rec_sum / ((double)B * pixels);
    sums->perceptual += lpips_sum / B;
    sums->nll += nll;
    sums->kl += kl;
    sums->g += g_loss;
    sums->d_weight += lambda;
    sums->total += nll + s->kl_weight * kl + lambda * gan_factor * g_loss;

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
 * when the GAN is on. */
static klvae_status_t discriminator_pass(klvae_trainer_t *t, const kv_tensor *x,
                                         const kv_tensor *xhat, float gan_factor,
                                         step_sums *sums)
{
    kv_backend *be = t->be;
    const double accum = t->s.grad_accum;
    const float scale = (float)(gan_factor * 0.5 / accum);
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
    sums->d_loss += gan_factor * 0.5 * (lr + lf);
    sums->real += real;
    sums->fake += fake;
    return st;
}

KLVAE_API klvae_status_t klvae_trainer_step(klvae_trainer_t *t, const float *images, int n, int h,
                                            int w, klvae_step_stats_t *stats)
{
    kv_error_clear();
    if (!t || !images)
        return kv_error(KLVAE_ERR_INVALID_ARGUMENT, "klvae_trainer_step: %s is NULL",
                        !t ? "trainer" : "images");
    if (stats && stats->struct_size < 8)
        return kv_error(KLVAE_ERR_INVALID_ARGUMENT,
                        "klvae_trainer_step: stats->struct_size is %u; set it to "
                        "sizeof(klvae_step_stats_t)",
                        stats->struct_size);
    klvae_model_t *m = t->m;
    const int f = kv_config_factor(&m->cfg), c = m->cfg.in_channels, accum = t->s.grad_accum;
    if (n <= 0 || n % accum != 0)
        return kv_error(KLVAE_ERR_INVALID_ARGUMENT,
                        "klvae_trainer_step: n is %d; it must be a positive multiple of "
                        "grad_accum = %d",
                        n, accum);
    if (h < 16 || w < 16 || h % f != 0 || w % f != 0)
        return kv_error(KLVAE_ERR_INVALID_ARGUMENT,
                        "klvae_trainer_step: images of %d x %d; training needs sides of at "
                        "least 16 that are multiples of the downsampling factor %d",
                        h, w, f);
    if (m->cfg.out_channels != c)
        return kv_error(KLVAE_ERR_CONFIG,
                        "klvae_trainer_step: the model maps %d channels to %d; training "
                        "reconstructs its input, so they must be equal",
                        c, m->cfg.out_channels);
    size_t count;
    if (!kv_numel4(n, c, h, w, &count))
        return kv_error(KLVAE_ERR_INVALID_ARGUMENT, "klvae_trainer_step: batch too large");
    kv_backend *be = t->be;
    const double t0 = kv_now_seconds();
    const int mb = n / accum;
    const float gan_factor = t->step >= t->s.disc_start ? t->s.disc_factor : 0.0f;
    const bool adaptive = gan_factor > 0.0f || (t->s.ldm && t->s.disc_factor > 0.0f);
    const bool disc_pass = gan_factor > 0.0f || t->s.ldm;
    const int disc_min = kv_disc_min_size(t->disc);
    if (disc_pass && (h < disc_min || w < disc_min))
        return kv_error(KLVAE_ERR_INVALID_ARGUMENT,
                        "klvae_trainer_step: %d x %d images are too small for the %d-layer "
                        "discriminator, which needs at least %d x %d",
                        h, w, t->disc->layers, disc_min, disc_min);
    step_sums sums;
    memset(&sums, 0, sizeof sums);
    klvae_status_t st = zero_grads(t);
    for (int micro = 0; micro < accum && st == KLVAE_OK; micro++) {
        const float *src = images + (size_t)micro * mb * c * h * w;
        kv_tensor x = {0}, xhat = {0}, xhat2 = {0};
        if (be->host_memory) {
            x = kv_tensor_wrap((float *)src, mb, c, h, w);
        } else {
            st = kv_tensor_alloc(be, mb, c, h, w, &x);
            if (st == KLVAE_OK)
                st = be->ops->upload(be, x.data, src, (size_t)mb * c * h * w);
        }
        if (st == KLVAE_OK)
            st = generator_pass(t, &x, micro, gan_factor, adaptive, &sums, &xhat);
        if (st == KLVAE_OK && micro == accum - 1)
            st = model_optimizer_step(t);
        if (st == KLVAE_OK && disc_pass) {
            const kv_tensor *fake = &xhat;
            if (t->s.fresh) { /* the reference's second forward, on the updated weights */
                kv_tensor moments = {0}, z = {0};
                st = kv_vae_encode_moments(m, &x, &moments);
                if (st == KLVAE_OK)
                    st = posterior_z(t, &moments, t->s.sample,
                                     stream_seed(t, t->step, micro, SEED_FRESH_POSTERIOR), &z);
                if (st == KLVAE_OK)
                    st = kv_tensor_alloc(be, mb, c, h, w, &xhat2);
                if (st == KLVAE_OK)
                    st = kv_vae_decode(m, &z, &xhat2);
                kv_tensor_release(be, &moments);
                kv_tensor_release(be, &z);
                fake = &xhat2;
            }
            if (st == KLVAE_OK)
                st = discriminator_pass(t, &x, fake, gan_factor, &sums);
        }
        if (st == KLVAE_OK && disc_pass && micro == accum - 1)
            st = disc_optimizer_step(t);
        kv_tensor_release(be, &x);
        kv_tensor_release(be, &xhat);
        kv_tensor_release(be, &xhat2);
    }
    be->ops->trim(be);
    if (st != KLVAE_OK)
        return st;
    if (stats) {
        klvae_step_stats_t full;
        memset(&full, 0, sizeof full);
        full.struct_size = stats->struct_size;
        full.step = t->step;
        full.total_loss = sums.total / accum;
        full.rec_loss = sums.rec / accum;
        full.perceptual_loss = sums.perceptual / accum;
        full.nll_loss = sums.nll / accum;
        full.kl_loss = sums.kl / accum;
        full.g_loss = sums.g / accum;
        full.d_weight = sums.d_weight / accum;
        full.disc_factor = gan_factor;
        full.d_loss = sums.d_loss / accum;
        full.logits_real = sums.real / accum;
        full.logits_fake = sums.fake / accum;
        full.logvar = t->logvar;
        full.seconds = kv_now_seconds() - t0;
        size_t size = KV_MIN((size_t)stats->struct_size, sizeof full);
        memcpy(stats, &full, size);
        stats->struct_size = (uint32_t)size;
    }
    t->step++;
    return KLVAE_OK;
}

KLVAE_API int64_t klvae_trainer_step_count(const klvae_trainer_t *t)
{
    return t ? t->step : 0;
}

/* ---- settings, notes ---- */

KLVAE_API klvae_status_t klvae_trainer_get(const klvae_trainer_t *t, const char *key, char *buf,
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
    if (!word)
        return kv_error(KLVAE_ERR_OPTION, "'%s' is not a trainer setting", key);
    return kv_copy_out("klvae_trainer_get", key, word, buf, size);
}

static int find_note(const klvae_trainer_t *t, const char *key)
{
    for (int i = 0; i < t->notes; i++)
        if (strcmp(t->note_key[i], key) == 0)
            return i;
    return -1;
}

KLVAE_API klvae_status_t klvae_trainer_set_note(klvae_trainer_t *t, const char *key,
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

KLVAE_API klvae_status_t klvae_trainer_get_note(const klvae_trainer_t *t, const char *key,
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

/* ---- checkpoints ---- */

/* One tensor of a checkpoint: in backend memory, or a host array. */
typedef struct ck_entry {
    char name[KV_PARAM_NAME + 32];
    kv_tensor *tensor;
    float *host;
    int64_t shape[4];
    int ndim;
} ck_entry;

typedef struct ck_list {
    ck_entry *items;
    size_t count, capacity;
} ck_list;

static klvae_status_t ck_add(ck_list *l, const char *prefix, const char *name, kv_tensor *t,
                             float *host, int64_t host_count)
{
    if (l->count == l->capacity) {
        size_t cap = l->capacity ? 2 * l->capacity : 512;
        ck_entry *grown = realloc(l->items, cap * sizeof *grown);
        if (!grown)
            return kv_error(KLVAE_ERR_OUT_OF_MEMORY, "out of memory writing a checkpoint");
        l->items = grown;
        l->capacity = cap;
    }
    ck_entry *e = &l->items[l->count++];
    memset(e, 0, sizeof *e);
    snprintf(e->name, sizeof e->name, "%s%s", prefix, name);
    e->tensor = t;
    e->host = host;
    if (t) {
        e->ndim = t->ndim;
        for (int d = 0; d < t->ndim; d++)
            e->shape[d] = t->shape[d];
    } else {
        e->ndim = 1;
        e->shape[0] = host_count;
    }
    return KLVAE_OK;
}

/* Every tensor of the trainer's state, under its checkpoint name. The
 * host-side scalars live in a small array the caller provides. */
static klvae_status_t ck_collect(const klvae_trainer_t *t, float *scalars, ck_list *l)
{
    klvae_status_t st = KLVAE_OK;
    const klvae_model_t *m = t->m;
    for (size_t i = 0; st == KLVAE_OK && i < m->num_params; i++) {
        const char *name = m->params[i].name;
        st = ck_add(l, "model.", name, m->params[i].tensor, NULL, 0);
        if (st == KLVAE_OK)
            st = ck_add(l, "adam.model.m.", name, t->adam_m->params[i].tensor, NULL, 0);
        if (st == KLVAE_OK)
            st = ck_add(l, "adam.model.v.", name, t->adam_v->params[i].tensor, NULL, 0);
        if (st == KLVAE_OK && t->ema)
            st = ck_add(l, "ema.", name, t->ema->params[i].tensor, NULL, 0);
    }
    const kv_disc *d = t->disc;
    for (int i = 0; st == KLVAE_OK && i < d->num_params; i++) {
        const char *name = d->params[i].name;
        st = ck_add(l, "disc.", name, d->params[i].tensor, NULL, 0);
        if (st == KLVAE_OK)
            st = ck_add(l, "adam.disc.m.", name, t->disc_m->params[i].tensor, NULL, 0);
        if (st == KLVAE_OK)
            st = ck_add(l, "adam.disc.v.", name, t->disc_v->params[i].tensor, NULL, 0);
    }
    for (int i = 0; st == KLVAE_OK && i < d->convs; i++) {
        if (!d->running_mean[i])
            continue;
        char name[64];
        int bn = (i == 0 ? 0 : 2 + 3 * (i - 1)) + 1;
        int ch = d->bn[i].weight.shape[0];
        snprintf(name, sizeof name, "main.%d.running_mean", bn);
        st = ck_add(l, "disc.", name, NULL, d->running_mean[i], ch);
        snprintf(name, sizeof name, "main.%d.running_var", bn);
        if (st == KLVAE_OK)
            st = ck_add(l, "disc.", name, NULL, d->running_var[i], ch);
    }
    scalars[0] = t->logvar;
    scalars[1] = (float)t->logvar_m;
    scalars[2] = (float)t->logvar_v;
    if (st == KLVAE_OK)
        st = ck_add(l, "", "loss.logvar", NULL, scalars, 1);
    if (st == KLVAE_OK)
        st = ck_add(l, "", "adam.loss.logvar", NULL, scalars + 1, 2);
    return st;
}

typedef struct ck_fetch_ctx {
    const klvae_trainer_t *t;
    const ck_list *list;
} ck_fetch_ctx;

static klvae_status_t ck_fetch(void *ctx, size_t index, float *dst)
{
    const ck_fetch_ctx *c = ctx;
    const ck_entry *e = &c->list->items[index];
    if (e->tensor)
        return c->t->be->ops->download(c->t->be, dst, e->tensor->data, kv_tensor_numel(e->tensor));
    memcpy(dst, e->host, (size_t)e->shape[0] * sizeof(float));
    return KLVAE_OK;
}

/* The structural keys a checkpoint must agree on. */
/* The model config in checkpoint metadata (config.KEY), so that a run can
 * be resumed without the model it started from. The first
 * STRUCTURE_KEY_COUNT decide the architecture and must match on load; the
 * latent scaling does not change training and is only recorded. */
static const char *const structure_keys[] = {
    "in_channels", "out_channels", "latent_channels", "block_out_channels", "layers_per_block",
    "norm_num_groups", "use_quant_conv", "use_post_quant_conv", "mid_block_add_attention",
    "act_fn", "scaling_factor", "shift_factor",
};
#define STRUCTURE_KEY_COUNT 10

KLVAE_API klvae_status_t klvae_trainer_save(const klvae_trainer_t *t, const char *path)
{
    kv_error_clear();
    if (!t || !path)
        return kv_error(KLVAE_ERR_INVALID_ARGUMENT, "klvae_trainer_save: %s is NULL",
                        !t ? "trainer" : "path");
    float scalars[3];
    ck_list list = {NULL, 0, 0};
    klvae_status_t st = ck_collect(t, scalars, &list);
    kv_st_entry *entries = NULL;
    enum { FIXED_META = 10 };
    kv_st_meta meta[FIXED_META + KV_ARRAY_LEN(structure_keys) + KV_MAX_NOTES];
    char values[FIXED_META + KV_ARRAY_LEN(structure_keys)][96];
    char note_names[KV_MAX_NOTES][KV_NOTE_SIZE + 8];
    char structure_names[KV_ARRAY_LEN(structure_keys)][48];
    size_t nmeta = 0;
    if (st == KLVAE_OK) {
        entries = calloc(list.count ? list.count : 1, sizeof *entries);
        if (!entries)
            st = kv_error(KLVAE_ERR_OUT_OF_MEMORY, "out of memory writing %s", path);
    }
    if (st == KLVAE_OK) {
        for (size_t i = 0; i < list.count; i++) {
            entries[i].name = list.items[i].name;
            entries[i].ndim = list.items[i].ndim;
            memcpy(entries[i].shape, list.items[i].shape, sizeof list.items[i].shape);
        }
        snprintf(values[0], 96, "%lld", (long long)t->step);
        snprintf(values[1], 96, "%lld", (long long)t->model_adam_steps);
        snprintf(values[2], 96, "%lld", (long long)t->disc_adam_steps);
        snprintf(values[3], 96, "%llu", (unsigned long long)t->seed);
        snprintf(values[4], 96, "%d", t->disc->layers);
        snprintf(values[5], 96, "%d", t->disc->channels);
        const char *fixed_keys[] = {"step", "model_adam_steps", "disc_adam_steps", "seed",
                                    "disc_layers", "disc_channels"};
        meta[nmeta].key = (char *)"format";
        meta[nmeta++].value = (char *)CHECKPOINT_FORMAT;
        meta[nmeta].key = (char *)"klvae_version";
        meta[nmeta++].value = (char *)KLVAE_VERSION_STRING;
        meta[nmeta].key = (char *)"options";
        meta[nmeta++].value = t->options_text;
        for (int i = 0; i < 6; i++) {
            meta[nmeta].key = (char *)fixed_keys[i];
            meta[nmeta++].value = values[i];
        }
        for (size_t i = 0; i < KV_ARRAY_LEN(structure_keys); i++) {
            snprintf(structure_names[i], sizeof structure_names[i], "config.%s", structure_keys[i]);
            kv_config_get(&t->m->cfg, structure_keys[i], values[6 + i], 96);
            meta[nmeta].key = structure_names[i];
            meta[nmeta++].value = values[6 + i];
        }
        for (int i = 0; i < t->notes; i++) {
            snprintf(note_names[i], sizeof note_names[i], "note.%s", t->note_key[i]);
            meta[nmeta].key = note_names[i];
            meta[nmeta++].value = (char *)t->note_value[i];
        }
        ck_fetch_ctx ctx = {t, &list};
        st = kv_st_write(path, entries, list.count, meta, nmeta, ck_fetch, &ctx, NULL);
    }
    free(entries);
    free(list.items);
    return st;
}

static bool parse_i64(const char *text, int64_t *out)
{
    if (!text || !*text)
        return false;
    char *end;
    long long v = strtoll(text, &end, 10);
    if (*end || v < 0)
        return false;
    *out = v;
    return true;
}

KLVAE_API klvae_status_t klvae_trainer_load(klvae_trainer_t *t, const char *path)
{
    kv_error_clear();
    if (!t || !path)
        return kv_error(KLVAE_ERR_INVALID_ARGUMENT, "klvae_trainer_load: %s is NULL",
                        !t ? "trainer" : "path");
    kv_safetensors st;
    klvae_status_t status = kv_st_open(path, &st);
    if (status != KLVAE_OK)
        return status;
    float scalars[3];
    ck_list list = {NULL, 0, 0};
    float *host = NULL;
    int64_t step = 0, model_steps = 0, disc_steps = 0;
    const char *format = kv_st_metadata(&st, "format");
    if (!format || strcmp(format, CHECKPOINT_FORMAT) != 0) {
        status = kv_error(KLVAE_ERR_FORMAT,
                          "%s is not a klvae trainer checkpoint (its metadata has no format "
                          "'%s')",
                          path, CHECKPOINT_FORMAT);
        goto done;
    }
    if (!parse_i64(kv_st_metadata(&st, "step"), &step) ||
        !parse_i64(kv_st_metadata(&st, "model_adam_steps"), &model_steps) ||
        !parse_i64(kv_st_metadata(&st, "disc_adam_steps"), &disc_steps)) {
        status = kv_error(KLVAE_ERR_FORMAT, "%s: the step counters in its metadata are missing "
                                            "or malformed",
                          path);
        goto done;
    }
    for (size_t i = 0; i < STRUCTURE_KEY_COUNT; i++) {
        char key[64], mine[96];
        snprintf(key, sizeof key, "config.%s", structure_keys[i]);
        const char *theirs = kv_st_metadata(&st, key);
        kv_config_get(&t->m->cfg, structure_keys[i], mine, sizeof mine);
        if (!theirs || strcmp(theirs, mine) != 0) {
            status = kv_error(KLVAE_ERR_CONFIG,
                              "%s was saved by a trainer of another model: %s is %s there and %s "
                              "here",
                              path, structure_keys[i], theirs ? theirs : "missing", mine);
            goto done;
        }
    }
    /* Check every tensor before changing anything. */
    status = ck_collect(t, scalars, &list);
    size_t largest = 1;
    for (size_t i = 0; status == KLVAE_OK && i < list.count; i++) {
        const ck_entry *e = &list.items[i];
        const kv_st_tensor *f = kv_st_find(&st, e->name);
        if (!f && strncmp(e->name, "ema.", 4) == 0)
            continue; /* a checkpoint without EMA: EMA restarts from the weights */
        if (!f) {
            status = kv_error(KLVAE_ERR_MISSING_TENSOR, "%s: missing tensor '%s'", path, e->name);
            break;
        }
        bool same = f->ndim == e->ndim;
        for (int d = 0; same && d < e->ndim; d++)
            same = f->shape[d] == e->shape[d];
        if (!same) {
            status = kv_error(KLVAE_ERR_CONFIG,
                              "%s: tensor '%s' has another shape than this trainer's (saved with "
                              "other disc_layers or disc_channels?)",
                              path, e->name);
            break;
        }
        if (!kv_st_is_float(f)) { /* here, not half-way through the uploads below */
            status = kv_error(KLVAE_ERR_UNSUPPORTED,
                              "%s: tensor '%s' has dtype %s; checkpoints hold F32, F16, BF16 or "
                              "F64",
                              path, e->name, f->dtype);
            break;
        }
        largest = KV_MAX(largest, kv_st_numel(f));
    }
    if (status == KLVAE_OK) {
        host = malloc(largest * sizeof *host);
        if (!host)
            status = kv_error(KLVAE_ERR_OUT_OF_MEMORY, "out of memory reading %s", path);
    }
    for (size_t i = 0; status == KLVAE_OK && i < list.count; i++) {
        const ck_entry *e = &list.items[i];
        const kv_st_tensor *f = kv_st_find(&st, e->name);
        if (!f) { /* EMA missing: restart it from the loaded weights (below) */
            continue;
        }
        if (e->tensor) {
            status = kv_st_read_f32(&st, f, host);
            if (status == KLVAE_OK)
                status = t->be->ops->upload(t->be, e->tensor->data, host,
                                            kv_tensor_numel(e->tensor));
        } else {
            status = kv_st_read_f32(&st, f, e->host);
        }
    }
    if (status == KLVAE_OK && t->ema && !kv_st_find(&st, "ema.decoder.conv_out.weight")) {
        for (size_t i = 0; status == KLVAE_OK && i < t->m->num_params; i++) {
            status = t->be->ops->fill(t->be, t->ema->params[i].tensor, 0.0f);
            if (status == KLVAE_OK)
                status = t->be->ops->add(t->be, t->ema->params[i].tensor,
                                         t->m->params[i].tensor, t->ema->params[i].tensor);
        }
    }
    if (status == KLVAE_OK) {
        t->logvar = scalars[0];
        t->logvar_m = scalars[1];
        t->logvar_v = scalars[2];
        t->step = step;
        t->model_adam_steps = model_steps;
        t->disc_adam_steps = disc_steps;
        uint64_t seed;
        const char *seed_text = kv_st_metadata(&st, "seed");
        if (seed_text && sscanf(seed_text, "%llu", (unsigned long long *)&seed) == 1)
            t->seed = seed;
        t->notes = 0;
        for (size_t i = 0; i < st.metadata_count && t->notes < KV_MAX_NOTES; i++) {
            const kv_st_meta *md = &st.metadata[i];
            if (strncmp(md->key, "note.", 5) != 0 || strlen(md->key + 5) >= KV_NOTE_SIZE ||
                strlen(md->value) >= KV_NOTE_SIZE)
                continue;
            strcpy(t->note_key[t->notes], md->key + 5);
            strcpy(t->note_value[t->notes], md->value);
            t->notes++;
        }
    }
done:
    free(host);
    free(list.items);
    kv_st_close(&st);
    return status;
}

KLVAE_API klvae_status_t klvae_trainer_export(const klvae_trainer_t *t, const char *path,
                                              int use_ema)
{
    kv_error_clear();
    if (!t || !path)
        return kv_error(KLVAE_ERR_INVALID_ARGUMENT, "klvae_trainer_export: %s is NULL",
                        !t ? "trainer" : "path");
    if (!use_ema)
        return kv_weights_save(t->m, path);
    if (!t->ema)
        return kv_error(KLVAE_ERR_INVALID_ARGUMENT,
                        "klvae_trainer_export: the trainer keeps no EMA weights (set ema_decay)");
    /* The EMA tree with the model's config (and its extra keys). */
    klvae_model_t view = *t->ema;
    view.cfg = t->m->cfg;
    return kv_weights_save(&view, path);
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
