/* sample_latents.c — what a diffusion pipeline does around the VAE: encode,
 * draw a seeded latent from the posterior, scale it for the denoiser, then
 * unscale and decode. Runs on a freshly created model when no MODEL is given,
 * so it needs no download:
 *
 *   cc sample_latents.c $(pkg-config --cflags --libs klvae) -lm -o sample_latents
 *   ./sample_latents [MODEL]
 *
 * Every status is checked; on failure the program prints klvae_last_error()
 * and exits with 1. */
#include <klvae.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>

#define N 2  /* a batch of two images */
#define H 64 /* multiples of every downsampling factor up to 64 */
#define W 96

static int fail(const char *what, klvae_status_t st)
{
    fprintf(stderr, "%s: %s (%s)\n", what, klvae_last_error(), klvae_status_string(st));
    return 1;
}

int main(int argc, char **argv)
{
    if (argc > 2) {
        fprintf(stderr, "usage: %s [MODEL]\n", argv[0]);
        return 2;
    }
    klvae_options_t *opts = NULL;
    klvae_model_t *model = NULL;
    klvae_status_t st = klvae_options_create(&opts);
    if (st != KLVAE_OK)
        return fail("options", st);
    if (argc < 2 && (st = klvae_options_set(opts, "config", "tiny")) != KLVAE_OK) {
        klvae_options_free(opts); /* a small random model: 2 levels, f = 2 */
        return fail("options", st);
    }
    st = argc >= 2 ? klvae_model_load(argv[1], opts, &model) : klvae_model_create(opts, &model);
    klvae_options_free(opts); /* the model copied what it needed */
    if (st != KLVAE_OK)
        return fail(argc >= 2 ? "load" : "create", st);

    /* Size every array from the model: a model may take or give other
     * channel counts than RGB, and the library trusts our array sizes. */
    const int f = klvae_model_downsampling_factor(model), z = klvae_model_latent_channels(model);
    const int c_in = klvae_model_in_channels(model), c_out = klvae_model_out_channels(model);
    if (H % f != 0 || W % f != 0) {
        fprintf(stderr, "this example's %dx%d images do not suit f = %d\n", H, W, f);
        klvae_model_free(model);
        return 1;
    }
    const int lh = H / f, lw = W / f;
    const size_t n_in = (size_t)N * c_in * H * W, n_out = (size_t)N * c_out * H * W;
    const size_t n_lat = (size_t)N * z * lh * lw;
    float *images = malloc(n_in * sizeof(float)), *decoded = malloc(n_out * sizeof(float));
    float *mean = malloc(n_lat * sizeof(float)), *logvar = malloc(n_lat * sizeof(float));
    float *latent = malloc(n_lat * sizeof(float));
    int rc = 0;
    if (!images || !decoded || !mean || !logvar || !latent) {
        fprintf(stderr, "out of memory\n");
        rc = 1;
        goto done;
    }
    for (size_t i = 0; i < n_in; i++) /* a smooth test pattern in [-1, 1] */
        images[i] = (float)sin(0.05 * (double)(i % W) + 0.07 * (double)((i / W) % H));

    if ((st = klvae_encode(model, images, N, H, W, mean, logvar)) != KLVAE_OK) {
        rc = fail("encode", st);
        goto done;
    }
    /* z = mean + std * eps: the same seed gives the same latent on any
     * machine, backend and thread count. */
    if ((st = klvae_sample(model, mean, logvar, N, lh, lw, 1234, latent)) != KLVAE_OK) {
        rc = fail("sample", st);
        goto done;
    }
    /* Diffusion models see (z - shift) * scale ... */
    const float scale = klvae_model_scaling_factor(model), shift = klvae_model_shift_factor(model);
    for (size_t i = 0; i < n_lat; i++)
        latent[i] = (latent[i] - shift) * scale;
    /* ... (a denoiser would work here) and hand back latents that are
     * unscaled before decoding. */
    for (size_t i = 0; i < n_lat; i++)
        latent[i] = latent[i] / scale + shift;
    if ((st = klvae_decode(model, latent, N, lh, lw, decoded)) != KLVAE_OK) {
        rc = fail("decode", st);
        goto done;
    }
    /* How far the round trip moved the pixels (only where the channels
     * correspond, which they do for RGB models). */
    const int c = c_in < c_out ? c_in : c_out;
    double se = 0;
    for (int b = 0; b < N; b++)
        for (size_t i = 0; i < (size_t)c * H * W; i++) {
            double d = decoded[(size_t)b * c_out * H * W + i] - images[(size_t)b * c_in * H * W + i];
            se += d * d;
        }
    printf("%d images %dx%d -> latents %dx%dx%d (scale %g, shift %g) -> decoded, RMS change %.3f\n",
           N, H, W, z, lh, lw, scale, shift, sqrt(se / ((double)N * c * H * W)));
done:
    free(images);
    free(decoded);
    free(mean);
    free(logvar);
    free(latent);
    klvae_model_free(model);
    return rc;
}
