/* fuzz_jpeg.c — the JPEG reader (libjpeg-turbo through
 * klvae_image_read_opts); see fuzz_image.h. Inputs start after the SOI
 * marker FF D8. */
#define FUZZ_MAGIC {0xFF, 0xD8}
#include "fuzz_image.h"
