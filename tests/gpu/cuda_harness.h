/* cuda_harness.h — what tests/gpu/test_cuda.c and tools/bench_cuda.c share:
 * loading the CUDA plugin directly (dlopen, src/backend/plugin.h), creating its
 * backends, and building a model on a given backend with the library's
 * internal functions (both programs link lib/libklvae.a). */
#ifndef KV_CUDA_HARNESS_H
#define KV_CUDA_HARNESS_H

#include "backend/plugin.h"
#include "model/vae.h"

/* Opens the plugin at path (NULL: $KLVAE_CUDA_PLUGIN, else
 * lib/libklvae_cuda.so). On failure returns NULL and writes why. */
const kv_plugin *harness_open(const char *path, char *why, size_t why_size);

/* The plugin's probe of device (KLVAE_OK, or the reason in
 * klvae_last_error()). */
klvae_status_t harness_probe(const kv_plugin *p, int device);

/* A backend of the plugin on device with precision. */
klvae_status_t harness_backend(const kv_plugin *p, int device, kv_precision precision,
                               kv_backend **out);

/* A model of the named config with seeded weights (klvae_model_create's
 * initialisation) on be, which the model then owns. */
klvae_status_t harness_model(kv_backend *be, const char *config, uint64_t seed,
                             const char *precision, klvae_model_t **out);

/* "fp32", "tf32", "bf16" and back; -1 for an unknown name. */
const char *harness_precision_name(kv_precision p);
int harness_precision_parse(const char *name);

/* Wall-clock seconds. */
double harness_now(void);

#endif
