/* fuzz_png.c — the PNG reader (libpng through klvae_image_read_opts); see
 * fuzz_image.h. Inputs start after the 8-byte PNG signature. */
#define FUZZ_MAGIC {0x89, 'P', 'N', 'G', '\r', '\n', 0x1A, '\n'}
#include "fuzz_image.h"
