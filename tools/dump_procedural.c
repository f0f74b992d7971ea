/* dump_procedural.c — writes the procedural images `klvae train` sees, as
 * raw float32 (n, 3, size, size) in [-1, 1], for tools/demo_pytorch.py:
 * the training stream (seed, positions 0..n-1) and the held-out set that
 * `klvae train` and `klvae eval` evaluate on.
 *
 *   dump_procedural SEED SIZE N_TRAIN N_EVAL TRAIN.f32 EVAL.f32
 * Build: make build/dump_procedural */
#include <stdio.h>
#include <stdlib.h>

#include "train/procedural.h"

static int dump(const char *path, uint64_t seed, int size, long n)
{
    float *img = malloc(sizeof(float) * 3 * (size_t)size * size);
    FILE *f = fopen(path, "wb");
    if (!img || !f) {
        perror(path);
        return 1;
    }
    for (long i = 0; i < n; i++) {
        kv_procedural_image(seed, (uint64_t)i, size, img);
        if (fwrite(img, sizeof(float), 3 * (size_t)size * size, f) != 3 * (size_t)size * size) {
            perror(path);
            return 1;
        }
    }
    free(img);
    return fclose(f) != 0;
}

int main(int argc, char **argv)
{
    if (argc != 7) {
        fprintf(stderr, "usage: dump_procedural SEED SIZE N_TRAIN N_EVAL TRAIN.f32 EVAL.f32\n");
        return 2;
    }
    uint64_t seed = strtoull(argv[1], NULL, 10);
    int size = atoi(argv[2]);
    /* the held-out seed of src/cli/train.c */
    return dump(argv[5], seed, size, atol(argv[3])) ||
           dump(argv[6], seed ^ 0x5EEDE7A1C0FFEEull, size, atol(argv[4]));
}
