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

/* The size of the PNG or JPEG image at path, from its header alone (the
 * pixels are not decoded, so a file whose image data is damaged passes):
 * the same checks and errors as kv_image_read up to the header, the budget
 * included. *h and *w are 0 on error. */
klvae_status_t kv_image_read_size(const char *path, uint64_t max_pixels, int *h, int *w);

#endif
