/* sample_latents.c — what a diffusion pipeline does around the VAE: encode,
 * draw a seeded latent from the posterior, scale it for the denoiser, then
 * unscale and decode. Runs on a freshly created model when no MODEL is given,
 * so it needs no download:
 *
 *   ./sample_latents [MODEL]
 */
#include <klvae.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>

#define N 2  /* a batch of two images */
#define H 64
#define W 96

int main(int argc, char **argv)
{
    klvae_options_t *opts = NULL;
    klvae_model_t *model = NULL;
    klvae_status_t st = klvae_options_create(&opts);
    if (st == KLVAE_OK && argc < 2)
        st = klvae_options_set(opts, "config", "tiny"); /* a small random model */
    if (st == KLVAE_OK)
        st = argc >= 2 ? klvae_model_load(argv[1], opts, &model)
                       : klvae_model_create(opts, &model);
    klvae_options_free(opts);
    if (st != KLVAE_OK) {
        fprintf(stderr, "%s\n", klvae_last_error());
        return 1;
    }
    const int f = klvae_model_downsampling_factor(model), z = klvae_model_latent_channels(model);
    const int lh = H / f, lw = W / f;
    const size_t n_img = (size_t)N * 3 * H * W, n_lat = (size_t)N * z * lh * lw;
    float *images = malloc(n_img * sizeof(float)), *decoded = malloc(n_img * sizeof(float));
    float *mean = malloc(n_lat * sizeof(float)), *logvar = malloc(n_lat * sizeof(float));
    float *latent = malloc(n_lat * sizeof(float));
    if (!images || !decoded || !mean || !logvar || !latent)
        return 1;
    for (size_t i = 0; i < n_img; i++) /* a smooth test pattern in [-1, 1] */
        images[i] = (float)sin(0.05 * (double)(i % W) + 0.07 * (double)((i / W) % H));

    st = klvae_encode(model, images, N, H, W, mean, logvar);
    if (st == KLVAE_OK) /* same seed, same latent, on any machine */
        st = klvae_sample(model, mean, logvar, N, lh, lw, 1234, latent);
    /* Diffusion models see (z - shift) * scale ... */
    const float scale = klvae_model_scaling_factor(model), shift = klvae_model_shift_factor(model);
    for (size_t i = 0; st == KLVAE_OK && i < n_lat; i++)
        latent[i] = (latent[i] - shift) * scale;
    /* ... and hand back latents to be unscaled before decoding. */
    for (size_t i = 0; st == KLVAE_OK && i < n_lat; i++)
        latent[i] = latent[i] / scale + shift;
    if (st == KLVAE_OK)
        st = klvae_decode(model, latent, N, lh, lw, decoded);
    if (st != KLVAE_OK) {
        fprintf(stderr, "%s\n", klvae_last_error());
        return 1;
    }
    double se = 0;
    for (size_t i = 0; i < n_img; i++)
        se += (decoded[i] - images[i]) * (decoded[i] - images[i]);
    printf("%d images %dx%d -> latents %dx%dx%d (scale %g, shift %g) -> decoded, RMS change %.3f\n",
           N, H, W, z, lh, lw, scale, shift, sqrt(se / (double)n_img));
    free(images), free(decoded), free(mean), free(logvar), free(latent);
    klvae_model_free(model);
    return 0;
}
