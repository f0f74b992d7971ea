/* image.h — PNG and JPEG reading for the layers above the public API (the
 * training data reader), which carry a pixel budget rather than an options
 * object. klvae_image_read and klvae_image_read_opts are this function. */
#ifndef KV_IMAGE_H
#define KV_IMAGE_H

#include "base/common.h"

/* Reads path as klvae_image_read does, refusing images of more than
 * max_pixels pixels (KLVAE_ERR_UNSUPPORTED) before decoding them. function
 * names the caller in messages about NULL arguments. Does not clear the
 * thread's last error first: the caller does. */
klvae_status_t kv_image_read(const char *function, const char *path, uint64_t max_pixels,
                             float **pixels, int *h, int *w);

#endif
