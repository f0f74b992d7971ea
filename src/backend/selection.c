/* selection.c — choosing and creating a backend by name (the CUDA plugin
 * itself is found and loaded in plugin_loader.c). */
#include <stdio.h>
#include <string.h>

#include "backend/cpu/bf16_gemm.h"
#include "backend/plugin_loader.h"

/* The CPU backend: bf16 products when asked for and the CPU has them, else
 * float32 (tf32 is the CUDA backend's; the caller decides about it). */
static klvae_status_t cpu_backend(const kv_backend_settings *settings, kv_backend **out,
                                  kv_backend_info *info)
{
    kv_backend_settings cpu = *settings;
    char why[200];
    if (cpu.precision == KV_PRECISION_BF16 && !kv_bf16_available(why, sizeof why)) {
        cpu.precision = KV_PRECISION_FP32;
        if (info)
            snprintf(info->precision_reason, sizeof info->precision_reason,
                     "precision=bf16 computes in fp32 here: %s", why);
    }
    if (cpu.precision == KV_PRECISION_TF32)
        cpu.precision = KV_PRECISION_FP32;
    if (info)
        info->precision = cpu.precision;
    return kv_cpu_backend_create(&cpu, out);
}

klvae_status_t kv_backend_create(const char *name, const kv_backend_settings *settings,
                                 kv_backend **out, kv_backend_info *info)
{
    *out = NULL;
    if (info) {
        info->plugin = NULL;
        info->reason[0] = '\0';
        info->precision = settings->precision;
        info->precision_reason[0] = '\0';
    }
    if (strcmp(name, "cpu") == 0)
        return cpu_backend(settings, out, info);
    if (strcmp(name, "cuda") != 0 && strcmp(name, "auto") != 0)
        return kv_error(KLVAE_ERR_OPTION, "unknown backend '%s' (expected auto, cpu or cuda)",
                        name);
    const kv_plugin *plugin = NULL;
    klvae_status_t st = kv_cuda_backend_create(settings, out, &plugin);
    if (st == KLVAE_OK) {
        if (info)
            info->plugin = plugin;
        return KLVAE_OK;
    }
    if (strcmp(name, "cuda") == 0)
        return st == KLVAE_ERR_BACKEND_UNAVAILABLE
                   ? kv_error_prefix(st, "backend 'cuda' is unavailable")
                   : st;
    /* auto: the CPU, and why */
    if (info)
        snprintf(info->reason, sizeof info->reason, "%s", kv_error_message());
    kv_error_clear();
    return cpu_backend(settings, out, info);
}

void kv_backend_destroy(kv_backend *be)
{
    if (be)
        be->ops->destroy(be);
}
