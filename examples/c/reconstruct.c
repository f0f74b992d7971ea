/* reconstruct.c — the smallest complete use of libklvae: read an image,
 * encode it to the posterior, decode the mean, write the result.
 *
 *   cc reconstruct.c $(pkg-config --cflags --libs klvae) -o reconstruct
 *   ./reconstruct MODEL in.png out.png
 *
 * MODEL is a diffusers folder or a .safetensors file. The image's sides must
 * be multiples of the model's downsampling factor (8 for SD); the klvae tool
 * pads and crops for you, this example keeps it simple and refuses. */
#include <klvae.h>
#include <stdio.h>
#include <stdlib.h>

static int fail(const char *what, klvae_status_t st)
{
    fprintf(stderr, "%s: %s (%s)\n", what, klvae_last_error(), klvae_status_string(st));
    return 1;
}

int main(int argc, char **argv)
{
    if (argc != 4) {
        fprintf(stderr, "usage: %s MODEL in.png out.png\n", argv[0]);
        return 2;
    }
    klvae_model_t *model = NULL;
    klvae_status_t st = klvae_model_load(argv[1], NULL, &model); /* NULL: default options */
    if (st != KLVAE_OK)
        return fail("load", st);

    float *image = NULL; /* (3, h, w), values in [-1, 1], owned by us after the call */
    int h, w;
    st = klvae_image_read(argv[2], &image, &h, &w);
    if (st != KLVAE_OK) {
        klvae_model_free(model);
        return fail("read", st);
    }
    const int f = klvae_model_downsampling_factor(model);
    const int z = klvae_model_latent_channels(model);
    float *mean = malloc(sizeof(float) * z * (h / f) * (w / f));
    float *logvar = malloc(sizeof(float) * z * (h / f) * (w / f));
    float *decoded = malloc(sizeof(float) * 3 * h * w);
    int rc = 0;
    if (!mean || !logvar || !decoded) {
        fprintf(stderr, "out of memory\n");
        rc = 1;
    } else if ((st = klvae_encode(model, image, 1, h, w, mean, logvar)) != KLVAE_OK) {
        rc = fail("encode", st);
    } else if ((st = klvae_decode(model, mean, 1, h / f, w / f, decoded)) != KLVAE_OK) {
        rc = fail("decode", st);
    } else if ((st = klvae_image_write_png(argv[3], decoded, h, w)) != KLVAE_OK) {
        rc = fail("write", st);
    } else {
        printf("%s -> %d x %d x %d latent -> %s\n", argv[2], z, h / f, w / f, argv[3]);
    }
    free(mean);
    free(logvar);
    free(decoded);
    klvae_free(image); /* library-allocated memory goes back through klvae_free */
    klvae_model_free(model);
    return rc;
}
