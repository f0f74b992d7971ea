/* fuzz_latents.c — the klvae tool's latent file reader (read_latents in
 * src/cli/latents.c, what `klvae decode` reads) on a fuzzed safetensors
 * file, for a model of 4 latent channels.
 * Invariants: a failed read leaves *out all zero (data NULL) and a message;
 * a read that succeeds gives N in 1..4096, C = 4, h and w in 1..65536,
 * image sizes >= 0, and N*C*h*w readable floats. */
#include <string.h>

#include "cli/latents.h"
#include "fuzz.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    const char *path = fuzz_path("latents.safetensors");
    fuzz_write(path, data, size);
    latents lat;
    memset(&lat, 0x5A, sizeof lat);
    kv_error_clear();
    klvae_status_t st = read_latents(path, 4, &lat);
    if (st != KLVAE_OK) {
        fuzz_check_failure(st, "read_latents");
        latents zero;
        memset(&zero, 0, sizeof zero);
        FUZZ_CHECK(memcmp(&lat, &zero, sizeof lat) == 0, "a failed read left output behind");
        return 0;
    }
    FUZZ_CHECK(lat.n >= 1 && lat.n <= 4096 && lat.c == 4 && lat.h >= 1 && lat.h <= 65536 &&
                   lat.w >= 1 && lat.w <= 65536,
               "latents of shape (%d, %d, %d, %d)", lat.n, lat.c, lat.h, lat.w);
    FUZZ_CHECK(lat.data != NULL && lat.image_height >= 0 && lat.image_width >= 0,
               "data %p, image %d x %d", (void *)lat.data, lat.image_width, lat.image_height);
    size_t count = (size_t)lat.n * lat.c * lat.h * lat.w;
    volatile float sum = 0.0f;
    sum += lat.data[0] + lat.data[count - 1]; /* ASan checks both ends */
    (void)sum;
    free(lat.data);
    return 0;
}
