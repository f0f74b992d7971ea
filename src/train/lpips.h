/* lpips.h — the LPIPS perceptual distance (VGG16 trunk, v0.1 lin weights),
 * forward and input gradient, against the backend interface.
 *
 *   LPIPS(a, b) = sum over taps k of mean_p sum_c w_k[c] (n_k(a) - n_k(b))^2
 *
 * with the scaling layer (x - shift_c) / scale_c, the taps relu1_2, relu2_2,
 * relu3_3, relu4_3, relu5_3 of VGG16's features, n_k the channel-wise unit
 * normalisation (epsilon 1e-10 on the norm), and optional dropout on the
 * squared differences (training mode of the reference). The trunk is
 * frozen: only the gradient with respect to b is computed. Channel widths
 * are read from the weights, so narrower VGG-shaped networks load too. */
#ifndef KV_LPIPS_H
#define KV_LPIPS_H

#include "backend/backend.h"
#include "model/model.h"

#define KV_LPIPS_CONVS 13
#define KV_LPIPS_TAPS 5

typedef struct kv_lpips {
    kv_backend *be; /* borrowed */
    kv_conv convs[KV_LPIPS_CONVS];
    kv_tensor lin[KV_LPIPS_TAPS]; /* (1, C_k, 1, 1) */
    /* The trunk's weights transposed and flipped, (ci, co, 3, 3), made on the
     * first gradient: the data gradient of a frozen convolution is then a
     * plain convolution, without flipping the weights on every step. */
    kv_tensor transposed[KV_LPIPS_CONVS];
    int widths[KV_LPIPS_TAPS];
} kv_lpips;

/* Loads from a safetensors file with torchvision names
 * (features.N.weight/bias) or lpips names (net.sliceK.N.weight/bias), and
 * lin weights named linK.model.1.weight or lins.K.model.1.weight, with or
 * without a "loss.perceptual_loss." or "perceptual_loss." prefix.
 * Errors: as klvae_model_load. */
klvae_status_t kv_lpips_load(kv_backend *be, const char *path, kv_lpips **out);
void kv_lpips_free(kv_lpips *l);

/* distances[n] = LPIPS(a[n], b[n]) for (N, 3, H, W) images in [-1, 1]. With
 * grad_scale not NULL, db (allocated here) = sum_n grad_scale[n] *
 * d LPIPS(a[n], b[n]) / d b. dropout is the probability of zeroing a term
 * (0 in eval mode), its mask drawn from seed; a and b are images
 * first_image, first_image + 1, ... of a larger batch, whose masks they
 * draw (a process's share of a batch split over processes). */
klvae_status_t kv_lpips_forward(kv_lpips *l, const kv_tensor *a, const kv_tensor *b,
                                float dropout, uint64_t seed, uint64_t first_image,
                                double *distances, const float *grad_scale, kv_tensor *db);

/* The LPIPS distances (eval mode) of n host images a[i], b[i] (n, 3, h, w)
 * in [-1, 1], h and w at least 16. */
klvae_status_t kv_lpips_distance_host(kv_lpips *l, const float *a, const float *b, int n, int h,
                                      int w, double *distances);

#endif
