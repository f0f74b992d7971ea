/* cuda_harness.c — see cuda_harness.h. */
#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "cuda_harness.h"

static klvae_status_t host_set_error(klvae_status_t status, const char *message)
{
    return kv_error(status, "%s", message ? message : "");
}

static const kv_plugin_host host = {sizeof(kv_plugin_host), host_set_error};

const kv_plugin *harness_open(const char *path, char *why, size_t why_size)
{
    if (!path || !*path)
        path = getenv("KLVAE_CUDA_PLUGIN");
    if (!path || !*path)
        path = "lib/libklvae_cuda.so";
    void *handle = dlopen(path, RTLD_NOW | RTLD_LOCAL);
    if (!handle) {
        snprintf(why, why_size, "cannot load the CUDA plugin %s: %s", path, dlerror());
        return NULL;
    }
    kv_plugin_entry_fn entry = (kv_plugin_entry_fn)(uintptr_t)dlsym(handle, KV_PLUGIN_ENTRY_NAME);
    const kv_plugin *p = entry ? entry() : NULL;
    if (!p || p->abi_version != KV_PLUGIN_ABI_VERSION || p->struct_size < sizeof(kv_plugin)) {
        snprintf(why, why_size, "%s is not a CUDA plugin of ABI version %d", path,
                 KV_PLUGIN_ABI_VERSION);
        return NULL; /* the handle stays open: the process ends soon */
    }
    return p;
}

klvae_status_t harness_probe(const kv_plugin *p, int device)
{
    return p->probe(&host, device);
}

klvae_status_t harness_backend(const kv_plugin *p, int device, kv_precision precision,
                               kv_backend **out)
{
    kv_plugin_settings s;
    memset(&s, 0, sizeof s);
    s.struct_size = sizeof s;
    s.device = device;
    s.precision = precision;
    return p->create(&host, &s, out);
}

klvae_status_t harness_model(kv_backend *be, const char *config, uint64_t seed,
                             const char *precision, klvae_model_t **out)
{
    *out = NULL;
    klvae_model_t *m = calloc(1, sizeof *m);
    if (!m) {
        kv_backend_destroy(be);
        return kv_error(KLVAE_ERR_OUT_OF_MEMORY, "out of memory");
    }
    m->be = be;
    snprintf(m->backend_name, sizeof m->backend_name, "cuda");
    snprintf(m->precision, sizeof m->precision, "%s", precision);
    m->threads = 1;
    klvae_options_t *o = NULL;
    klvae_status_t st = klvae_options_create(&o);
    if (st == KLVAE_OK)
        st = klvae_options_set(o, "config", config);
    if (st == KLVAE_OK)
        st = kv_config_from_options(o, &m->cfg);
    klvae_options_free(o);
    if (st == KLVAE_OK)
        st = kv_model_build(m);
    if (st == KLVAE_OK)
        st = kv_model_alloc_params(m, KV_STORAGE_COMPUTE);
    if (st == KLVAE_OK)
        st = kv_model_init_params(m, seed);
    if (st != KLVAE_OK) {
        kv_model_destroy(m);
        return st;
    }
    *out = m;
    return KLVAE_OK;
}

const char *harness_precision_name(kv_precision p)
{
    return p == KV_PRECISION_TF32 ? "tf32" : p == KV_PRECISION_BF16 ? "bf16" : "fp32";
}

int harness_precision_parse(const char *name)
{
    if (strcmp(name, "fp32") == 0)
        return KV_PRECISION_FP32;
    if (strcmp(name, "tf32") == 0)
        return KV_PRECISION_TF32;
    if (strcmp(name, "bf16") == 0)
        return KV_PRECISION_BF16;
    return -1;
}

double harness_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}
