/* trainer_state.h — the trainer's state, shared by the step (trainer.c) and
 * checkpoints (checkpoint.c). Private to src/train. */
#ifndef KV_TRAINER_STATE_H
#define KV_TRAINER_STATE_H

#include "model/model.h"
#include "train/discriminator.h"
#include "train/dp.h"
#include "train/lpips.h"
#include "train/param_set.h"

/* One network the trainer trains, as the optimiser and the checkpoints see
 * it: its parameters and their shadows, all in the same order. */
typedef struct kv_trained_net {
    const char *name;       /* "model" or "disc": its checkpoint prefixes */
    kv_param_set weights;   /* the network's own */
    /* float32 copies of the weights that Adam and EMA work on, when the
     * backend stores weights in fewer bits (be->lossy_storage); the weights
     * are then the master's rounding after every step. count 0 otherwise. */
    kv_param_set master;
    kv_param_set grads, adam_m, adam_v;
    kv_param_set ema;       /* count 0: no EMA */
    bool *trained;          /* per parameter: false for frozen ones */
    int64_t adam_steps;
    float lr;
    /* The squared global norm of grads (and of the extra scalar gradient
     * trained with them), summed when the step checks them for NaN. */
    double grad_sum_squares;
} kv_trained_net;

#define KV_MAX_NOTES 32
#define KV_NOTE_SIZE 256

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
    bool refuse_nonfinite; /* nonfinite=refuse, else skip */
    bool dp_exact;         /* data_parallel=exact, else ddp */
    char allreduce[8];     /* auto, host or nccl */
    double bucket_mb;
    bool recompute;        /* resnets recompute conv1 in the backward (option recompute) */
} trainer_settings;

struct klvae_trainer {
    kv_busy busy;
    klvae_model_t *m; /* borrowed */
    kv_backend *be;
    trainer_settings s;
    uint64_t seed;
    int64_t step;
    int64_t skipped_steps; /* steps left out for a non-finite value (nonfinite=skip) */
    klvae_model_t *grads, *adam_m, *adam_v, *ema, *master; /* shadows of the model */
    kv_disc *disc, *disc_grads, *disc_m, *disc_v, *disc_master;
    /* the two networks as the optimiser and checkpoints see them */
    kv_trained_net model_net, disc_net;
    kv_lpips *lpips;
    kv_tensor last_grad_nll, last_grad_g; /* for the adaptive weight */
    float logvar;
    double logvar_grad, logvar_m, logvar_v;
    char *options_text; /* every option's value, for checkpoints */
    int notes;
    char note_key[KV_MAX_NOTES][KV_NOTE_SIZE], note_value[KV_MAX_NOTES][KV_NOTE_SIZE];
    kv_dp *dp; /* data-parallel (klvae_trainer_set_comm), or NULL */
};

/* data_parallel.c: leaves the communicator (its hooks too); dp may be NULL. */
void kv_trainer_detach_comm(klvae_trainer_t *t);

/* checkpoint.c: rank 0's whole state (what a checkpoint holds) copied to
 * every rank of dp. */
klvae_status_t kv_trainer_broadcast_state(klvae_trainer_t *t, kv_dp *dp);
/* checkpoint.c: what the ranks' trainers must agree on, as text: the
 * options but those of the machine (backend, device, threads), the model's
 * structure, the discriminator's shape. Free it; NULL when out of memory. */
char *kv_trainer_identity_text(const klvae_trainer_t *t);

#endif /* KV_TRAINER_STATE_H */
