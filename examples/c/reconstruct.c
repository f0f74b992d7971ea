/* reconstruct.c — the smallest complete use of libklvae: read an image,
 * encode it to the posterior, decode the mean, write the result and print
 * how close it came (PSNR).
 *
 *   cc reconstruct.c $(pkg-config --cflags --libs klvae) -lm -o reconstruct
 *   ./reconstruct MODEL in.png out.png
 *
 * MODEL is a diffusers folder or a .safetensors file. The image's sides must
 * be multiples of the model's downsampling factor (8 for SD): the klvae tool
 * pads and crops for you (so does examples/cpp/reconstruct.cpp); this
 * example keeps it simple and lets the library refuse, which shows what its
 * error messages look like.
 *
 * Every call that returns a klvae_status_t is checked. On failure the
 * program prints klvae_last_error() (the detailed message for this thread)
 * and klvae_status_string() (the status in words) and exits with 1. */
#include <klvae.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>

static int fail(const char *what, klvae_status_t st)
{
    /* Read klvae_last_error() before any other libklvae call: the next call
     * that returns a status replaces it. */
    fprintf(stderr, "%s: %s (%s)\n", what, klvae_last_error(), klvae_status_string(st));
    return 1;
}

int main(int argc, char **argv)
{
    if (argc != 4) {
        fprintf(stderr, "usage: %s MODEL in.png out.png\n", argv[0]);
        return 2;
    }
    /* A header/library mismatch is a packaging error: refuse it early. */
    if (klvae_version() / 10000 != KLVAE_VERSION_MAJOR) {
        fprintf(stderr, "libklvae %s cannot serve a program built for %s\n",
                klvae_version_string(), KLVAE_VERSION_STRING);
        return 1;
    }

    klvae_model_t *model = NULL;
    klvae_status_t st = klvae_model_load(argv[1], NULL, &model); /* NULL: default options */
    if (st != KLVAE_OK)
        return fail("load", st);
    /* klvae_image_read gives RGB and klvae_image_write_png takes RGB: the
     * library cannot know how long our arrays are, so we check that the
     * model's channel counts fit them. */
    if (klvae_model_in_channels(model) != 3 || klvae_model_out_channels(model) != 3) {
        fprintf(stderr, "%s: the model does not map RGB images to RGB images\n", argv[1]);
        klvae_model_free(model);
        return 1;
    }

    float *image = NULL; /* (3, h, w), values in [-1, 1]; released with klvae_free */
    int h = 0, w = 0;
    st = klvae_image_read(argv[2], &image, &h, &w);
    if (st != KLVAE_OK) {
        klvae_model_free(model);
        return fail("read", st);
    }
    const int f = klvae_model_downsampling_factor(model);
    const int z = klvae_model_latent_channels(model);
    /* Latents are (1, z, h / f, w / f); if h or w is not a multiple of f,
     * klvae_encode refuses and says so (before touching these arrays). */
    const size_t n_lat = (size_t)z * (size_t)(h / f) * (size_t)(w / f);
    const size_t n_img = (size_t)3 * (size_t)h * (size_t)w;
    float *mean = malloc(sizeof(float) * (n_lat ? n_lat : 1));
    float *decoded = malloc(sizeof(float) * n_img);
    int rc = 0;
    if (!mean || !decoded) {
        fprintf(stderr, "out of memory\n");
        rc = 1;
    } else if ((st = klvae_encode(model, image, 1, h, w, mean, NULL)) != KLVAE_OK) {
        /* logvar = NULL: we only decode the mean (the posterior's mode). */
        rc = fail("encode", st);
    } else if ((st = klvae_decode(model, mean, 1, h / f, w / f, decoded)) != KLVAE_OK) {
        rc = fail("decode", st);
    } else if ((st = klvae_image_write_png(argv[3], decoded, h, w)) != KLVAE_OK) {
        rc = fail("write", st);
    } else {
        /* PSNR of the floats on the [0, 1] scale (klvae reconstruct compares
         * the 8-bit values, so its number can differ a little). */
        double se = 0;
        for (size_t i = 0; i < n_img; i++) {
            double d = 0.5 * ((double)decoded[i] - (double)image[i]);
            se += d * d;
        }
        double mse = se / (double)n_img;
        printf("%s: %d x %d -> latent %d x %d x %d -> %s, PSNR %.2f dB\n", argv[2], w, h, z,
               h / f, w / f, argv[3], mse > 0 ? 10.0 * log10(1.0 / mse) : INFINITY);
    }
    free(mean);
    free(decoded);
    klvae_free(image); /* library-allocated memory goes back through klvae_free */
    klvae_model_free(model);
    return rc;
}
