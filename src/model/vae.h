/* vae.h — the AutoencoderKL network: the forward passes (encoder, decoder,
 * posterior) and, for training, what the backward needs ("tapes") and the
 * backward passes. Written against the backend interface only.
 *
 * What a tape keeps: the input of every block and the group-norm statistics
 * (scale, shift, mean, rstd per sample and channel/group); activations that
 * a norm produces are recomputed from those in the backward (they are the
 * prologues of the convolutions), which keeps a step's memory near two
 * tensors per resnet. */
#ifndef KV_VAE_H
#define KV_VAE_H

#include "model/layers.h"
#include "model/model.h"

typedef struct kv_resnet_tape {
    kv_tensor x;  /* block input */
    kv_tensor h2; /* conv1 output (empty with recompute) */
    kv_norm_state n1, n2;
} kv_resnet_tape;

typedef struct kv_attention_tape {
    kv_tensor x, normed, q, k, v, a; /* a: attention output, to_out's input */
    kv_norm_state n;
} kv_attention_tape;

typedef struct kv_mid_tape {
    kv_resnet_tape res[2];
    kv_attention_tape attn;
} kv_mid_tape;

typedef struct kv_level_tape {
    kv_resnet_tape res[KV_MAX_LAYERS + 1];
    kv_tensor sampler_in; /* downsample conv input / upsample input */
} kv_level_tape;

/* recompute (set by the caller before the forward, kept by it): each
 * resnet keeps its input and statistics only, and the backward recomputes
 * its conv1 output (kv_resnet_tape.h2 stays empty). */
typedef struct kv_encoder_tape {
    bool recompute;
    kv_tensor images; /* the caller's; not owned */
    kv_level_tape down[KV_MAX_BLOCKS];
    kv_mid_tape mid;
    kv_tensor out_in; /* conv_norm_out's input */
    kv_norm_state out_norm;
    kv_tensor quant_in; /* conv_out's output when quant_conv exists */
} kv_encoder_tape;

typedef struct kv_decoder_tape {
    bool recompute;    /* as kv_encoder_tape's */
    kv_tensor z;       /* the caller's; not owned */
    kv_tensor conv_in_in; /* post_quant_conv's output (owned), or z */
    kv_mid_tape mid;
    kv_level_tape up[KV_MAX_BLOCKS];
    kv_tensor out_in; /* conv_norm_out's input */
    kv_norm_state out_norm;
} kv_decoder_tape;

/* Gradients of a model's parameters: a second module tree of the same
 * shapes (built by kv_model_build), owned by the trainer. */
typedef klvae_model_t kv_grads;

/* ---- the forward (vae.c), for inference (tape NULL) and training ---- */

/* moments = encoder(images) (+ quant_conv): (N, 2Z, h, w), allocated here.
 * With a tape, what the backward needs is kept in it (free it with
 * kv_encoder_tape_free, or let kv_vae_encode_backward do it); on error the
 * tape is already freed. */
klvae_status_t kv_vae_encode_moments(klvae_model_t *m, const kv_tensor *images,
                                     kv_encoder_tape *tape, kv_tensor *moments);
/* mean and logvar (caller-allocated; logvar may be NULL) of the posterior. */
klvae_status_t kv_vae_encode(klvae_model_t *m, const kv_tensor *images, kv_tensor *mean,
                             kv_tensor *logvar);
/* images = decoder(z) (post_quant_conv first) into images, which the caller
 * allocated. The tape as for the encoder. */
klvae_status_t kv_vae_decode(klvae_model_t *m, const kv_tensor *z, kv_decoder_tape *tape,
                             kv_tensor *images);

/* ---- the backward (vae_backward.c) ---- */

/* Accumulates parameter gradients into g from d_images and returns d_z
 * (allocated here; pass NULL when not needed). Frees the tape. */
klvae_status_t kv_vae_decode_backward(klvae_model_t *m, kv_grads *g, kv_decoder_tape *t,
                                      const kv_tensor *d_images, kv_tensor *d_z);
/* Accumulates parameter gradients into g from d_moments. Frees the tape. */
klvae_status_t kv_vae_encode_backward(klvae_model_t *m, kv_grads *g, kv_encoder_tape *t,
                                      const kv_tensor *d_moments);
/* dw = the gradient of decoder.conv_out.weight for d_images alone (the
 * adaptive GAN weight needs two of these). dw is overwritten. */
klvae_status_t kv_vae_decoder_last_weight_grad(klvae_model_t *m, const kv_decoder_tape *t,
                                               const kv_tensor *d_images, kv_tensor *dw);
void kv_encoder_tape_free(kv_backend *be, kv_encoder_tape *t);
void kv_decoder_tape_free(kv_backend *be, kv_decoder_tape *t);

#endif /* KV_VAE_H */
