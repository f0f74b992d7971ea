/* procedural.h — the built-in training images (procedural.c), which
 * kv_dataset_open_procedural (data.h) serves as an unbounded dataset. */
#ifndef KV_PROCEDURAL_H
#define KV_PROCEDURAL_H

#include <stdint.h>

/* A procedural training image: a random mix of backgrounds (flat, linear
 * and radial gradients), filled and outlined shapes (circles, ellipses,
 * rectangles, triangles, polygons) with soft anti-aliased edges, textures
 * (stripes, checkers, sinusoidal gratings, value noise) and stroke
 * patterns (polylines and curves of varying width), in varied colours.
 * Deterministic: the same (seed, index, size) gives the same bits on every
 * machine. out holds 3 * size * size floats in [-1, 1]. */
void kv_procedural_image(uint64_t seed, uint64_t index, int size, float *out);

#endif /* KV_PROCEDURAL_H */
