/* stream_plan.c — how a forward runs (stream.h): the memory of the untiled
 * forward and of the backend's buffers, estimated; the budget; the choice
 * of bands and spilling for a streamed forward, by dry runs. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "model/layers.h"
#include "model/stream_store.h"

#define MB ((uint64_t)1 << 20)

/* ---- the backend's buffers ----
 * What the CPU backend (src/backend/cpu/) allocates inside a conv2d: the
 * upsampled input for the upsample prologue; on the im2col path with a
 * prologue, the normalised input; as scratch (kept for the backend's life,
 * grown to the largest layer), Winograd's transformed weights and band of
 * inputs (shared) and products (per thread), or im2col's columns (per
 * thread). Estimates from the same formulas, rounded up. */

typedef struct conv_cost {
    uint64_t temp, shared, per_thread;
} conv_cost;

static bool winograd(int ci, int co, int k, kv_conv_geometry g)
{
    return k == 3 && g.stride == 1 && g.pad_left == 1 && g.pad_right == 1 && g.pad_top <= 1 &&
           g.pad_bottom <= 1 && ci >= 32 && co >= 32;
}

static conv_cost cpu_conv_cost(int ci, int co, int k, kv_conv_geometry g, int rows, int cols,
                               bool upsample, bool prologue, int out_rows, int out_cols)
{
    const uint64_t f = sizeof(float), up = upsample ? 2 : 1;
    const uint64_t h = (uint64_t)rows * up, w = (uint64_t)cols * up;
    conv_cost c = {0, 0, 0};
    if (upsample)
        c.temp += (uint64_t)ci * h * w * f;
    if (winograd(ci, co, k, g)) {
        /* V holds bands of at most 4M floats (one tile row at least); a
         * thread's products, chunks of 256 tiles or one tile row */
        const uint64_t tw = (w + 1) / 2, tiles_h = ((uint64_t)out_rows + 1) / 2;
        const uint64_t band = KV_MIN(tiles_h, KV_MAX(1, ((uint64_t)4 << 20) / (16 * ci * tw)));
        const uint64_t chunk = KV_MIN(band, (256 + tw - 1) / tw) * tw;
        c.shared = (16 * (uint64_t)ci * co + 16 * (uint64_t)ci * band * tw) * f;
        c.per_thread = KV_MAX(16 * (uint64_t)co * chunk + 16 * tw + 16, 9 * (uint64_t)ci) * f;
        /* with bf16 products (conv2d_winograd_bf16.c): half of U shared, and
         * per thread a V of at most 384K words or one 48-tile block, M
         * (16 x 8 x 48) and rows of tw + 1 columns */
        const uint64_t pairs = ((uint64_t)ci + 1) / 2;
        const uint64_t v = KV_MAX((uint64_t)384 << 10, 16 * pairs * 48);
        c.per_thread = KV_MAX(c.per_thread, (v + 16 * 8 * 48 + 34 * (tw + 1) + 16) * f);
        return c;
    }
    if (prologue)
        c.temp += (uint64_t)ci * h * w * f;
    const bool direct = k == 1 && g.stride == 1 && g.pad_top == 0 && g.pad_bottom == 0 &&
                        g.pad_left == 0 && g.pad_right == 0;
    if (!direct) {
        const uint64_t K = (uint64_t)ci * k * k;
        const uint64_t band_cols = KV_MAX(((uint64_t)1 << 21) / K, (uint64_t)out_cols);
        const uint64_t band_rows = KV_MIN((uint64_t)out_rows, KV_MAX(1, band_cols / out_cols));
        c.per_thread = K * band_rows * out_cols * f;
    }
    return c;
}

uint64_t kv_attention_thread_bytes(int positions)
{
    return (uint64_t)64 * positions * sizeof(float); /* a block of 64 queries' scores */
}

void kv_stream_conv_memory(kv_stream *s, const kv_conv *conv, int rows, int cols, bool upsample,
                           bool prologue, kv_conv_geometry g, int out_rows, int out_cols)
{
    const int k = conv->weight.ndim == 4 ? conv->weight.shape[2] : 1;
    const int ci = conv->weight.shape[1];
    conv_cost c = cpu_conv_cost(ci, conv->weight.shape[0], k, g, rows, cols, upsample, prologue,
                                out_rows, out_cols);
    kv_stream_scratch(s, c.shared, c.per_thread);
    kv_stream_take(s, c.temp);
    kv_stream_give(s, c.temp);
}

/* ---- the untiled forward's memory ---- */

typedef struct tally {
    uint64_t held, peak, shared, per_thread;
    uint64_t n; /* images */
} tally;

static void hold(tally *t, uint64_t c, uint64_t h, uint64_t w)
{
    t->held += t->n * c * h * w * sizeof(float);
    t->peak = KV_MAX(t->peak, t->held);
}

static void drop(tally *t, uint64_t c, uint64_t h, uint64_t w)
{
    t->held -= t->n * c * h * w * sizeof(float);
}

/* A conv2d of the untiled forward whose output is already held. */
static void conv_call(tally *t, int ci, int co, int k, kv_conv_geometry g, int h, int w,
                      bool upsample, bool prologue)
{
    const int up = upsample ? 2 : 1;
    const int ho = (h * up + g.pad_top + g.pad_bottom - k) / g.stride + 1;
    const int wo = (w * up + g.pad_left + g.pad_right - k) / g.stride + 1;
    conv_cost c = cpu_conv_cost(ci, co, k, g, h, w, upsample, prologue, ho, wo);
    t->peak = KV_MAX(t->peak, t->held + t->n * c.temp);
    t->shared = KV_MAX(t->shared, c.shared);
    t->per_thread = KV_MAX(t->per_thread, c.per_thread);
}

/* vae.c's resnet_forward: x (ci) is held; leaves its output (co) held. */
static void resnet_tally(tally *t, int ci, int co, int h, int w)
{
    hold(t, co, h, w); /* conv1's output */
    conv_call(t, ci, co, 3, kv_same_3x3, h, w, false, true);
    if (ci != co) {
        hold(t, co, h, w); /* the shortcut */
        conv_call(t, ci, co, 1, kv_pointwise, h, w, false, false);
        drop(t, ci, h, w);
    }
    hold(t, co, h, w);
    conv_call(t, co, co, 3, kv_same_3x3, h, w, false, true);
    drop(t, co, h, w);
    drop(t, ci != co ? co : ci, h, w);
}

/* attention_forward: the normalised x, q, k, v, the attended values. */
static void attention_tally(tally *t, int c, int h, int w)
{
    hold(t, c, h, w);
    for (int i = 0; i < 3; i++)
        hold(t, c, h, w);
    drop(t, c, h, w);
    hold(t, c, h, w);
    t->per_thread = KV_MAX(t->per_thread, kv_attention_thread_bytes(h * w));
    for (int i = 0; i < 3; i++)
        drop(t, c, h, w);
    hold(t, c, h, w);
    drop(t, c, h, w);
    drop(t, c, h, w);
}

static void mid_tally(tally *t, const kv_config *cfg, int c, int h, int w)
{
    resnet_tally(t, c, c, h, w);
    if (cfg->mid_block_add_attention)
        attention_tally(t, c, h, w);
    resnet_tally(t, c, c, h, w);
}

static void decoder_tally(tally *t, const kv_config *cfg, int h, int w)
{
    const int z = cfg->latent_channels, nb = cfg->num_blocks;
    int c = cfg->block_out_channels[nb - 1];
    if (cfg->use_post_quant_conv)
        hold(t, z, h, w);
    hold(t, c, h, w);
    conv_call(t, z, c, 3, kv_same_3x3, h, w, false, false);
    if (cfg->use_post_quant_conv)
        drop(t, z, h, w);
    mid_tally(t, cfg, c, h, w);
    for (int i = 0; i < nb; i++) {
        const int co = cfg->block_out_channels[nb - 1 - i];
        for (int j = 0; j <= cfg->layers_per_block; j++, c = co)
            resnet_tally(t, c, co, h, w);
        if (i + 1 < nb) { /* Upsample2D */
            hold(t, c, 2 * h, 2 * w);
            conv_call(t, c, c, 3, kv_same_3x3, h, w, true, false);
            drop(t, c, h, w);
            h *= 2, w *= 2;
        }
    }
    conv_call(t, c, cfg->out_channels, 3, kv_same_3x3, h, w, false, true);
}

static void encoder_tally(tally *t, const kv_config *cfg, int h, int w)
{
    const int nb = cfg->num_blocks, z2 = 2 * cfg->latent_channels;
    int c = cfg->block_out_channels[0];
    hold(t, c, h, w);
    conv_call(t, cfg->in_channels, c, 3, kv_same_3x3, h, w, false, false);
    for (int i = 0; i < nb; i++) {
        const int co = cfg->block_out_channels[i];
        for (int j = 0; j < cfg->layers_per_block; j++, c = co)
            resnet_tally(t, c, co, h, w);
        if (i + 1 < nb) { /* Downsample2D */
            hold(t, c, h / 2, w / 2);
            conv_call(t, c, c, 3, kv_downsample, h, w, false, false);
            drop(t, c, h, w);
            h /= 2, w /= 2;
        }
    }
    mid_tally(t, cfg, c, h, w);
    hold(t, z2, h, w);
    conv_call(t, c, z2, 3, kv_same_3x3, h, w, false, true);
    drop(t, c, h, w);
    if (cfg->use_quant_conv) {
        hold(t, z2, h, w);
        conv_call(t, z2, z2, 1, kv_pointwise, h, w, false, false);
    }
}

uint64_t kv_untiled_bytes(const klvae_model_t *m, bool encode, int n, int h, int w)
{
    tally t = {0, 0, 0, 0, (uint64_t)n};
    const int f = kv_config_factor(&m->cfg);
    if (encode)
        encoder_tally(&t, &m->cfg, h, w);
    else
        decoder_tally(&t, &m->cfg, h / f, w / f);
    /* the CPU backend keeps released blocks for reuse within a call */
    const uint64_t cache = KV_MIN((uint64_t)256 * MB, t.peak / 4);
    return t.peak + cache + t.shared + (uint64_t)KV_MAX(1, m->threads) * t.per_thread;
}

/* ---- the budget ---- */

/* A number from the first line of a file, or 0. */
static uint64_t read_number(const char *path)
{
    FILE *fp = fopen(path, "r");
    unsigned long long v = 0;
    if (fp) {
        if (fscanf(fp, "%llu", &v) != 1)
            v = 0;
        fclose(fp);
    }
    return (uint64_t)v;
}

/* The memory this process could still take: MemAvailable, within its
 * cgroup's limit (v2, else v1). */
static uint64_t available_memory(void)
{
    uint64_t avail = 0;
    FILE *fp = fopen("/proc/meminfo", "r");
    if (fp) {
        char line[256];
        unsigned long long kb;
        while (fgets(line, sizeof line, fp))
            if (sscanf(line, "MemAvailable: %llu kB", &kb) == 1)
                avail = (uint64_t)kb * 1024;
        fclose(fp);
    }
    if (!avail)
        avail = (uint64_t)sysconf(_SC_AVPHYS_PAGES) * (uint64_t)sysconf(_SC_PAGESIZE);
    uint64_t limit = read_number("/sys/fs/cgroup/memory.max"),
             used = read_number("/sys/fs/cgroup/memory.current");
    if (!limit) {
        limit = read_number("/sys/fs/cgroup/memory/memory.limit_in_bytes");
        used = read_number("/sys/fs/cgroup/memory/memory.usage_in_bytes");
    }
    if (limit > used && limit - used < avail)
        avail = limit - used;
    return avail;
}

/* ---- the plan ---- */

static uint64_t dry_peak(const klvae_model_t *m, kv_forward_plan *plan, size_t band,
                         uint64_t threshold, kv_stream_dry *dry)
{
    plan->band_bytes = band;
    plan->spill_threshold = threshold;
    const bool ok = kv_stream_dry_run(m, plan, dry) == KLVAE_OK;
    plan->planned_host_bytes = ok ? dry->host_peak_bytes : UINT64_MAX;
    return ok ? dry->peak_bytes : UINT64_MAX;
}

/* Band sizes to try, largest first; 0 is one row. Larger bands save
 * little: the backend works on bands of a few MB inside each call anyway,
 * and the halo rows computed twice are already under 2% at 256 MB. */
static const size_t band_sizes[] = {256 * MB, 128 * MB, 64 * MB, 32 * MB, 16 * MB,
                                    8 * MB,   4 * MB,   2 * MB,  1 * MB,  MB / 2,
                                    MB / 4,   MB / 8,   MB / 16, MB / 32, 0};

static int descending(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? 1 : x > y ? -1 : 0;
}

/* The largest bands that fit in limit, spilling as little as it can:
 * first nothing spilled, then the activations of at least T bytes for T
 * from the largest down, both with bands of 16 rows or more (thinner ones
 * recompute too many halo rows); then everything spilled with any bands.
 * On a backend without host memory, limit bounds the device's memory and
 * host_limit the host memory of the stores (which spilling lowers); with
 * host memory, host_limit is UINT64_MAX (limit counts both). */
static klvae_status_t plan_streamed(const klvae_model_t *m, uint64_t limit, uint64_t host_limit,
                                    kv_forward_plan *plan)
{
    kv_stream_dry dry, trial;
    const size_t nb = KV_ARRAY_LEN(band_sizes);
    dry_peak(m, plan, band_sizes[0], UINT64_MAX, &dry); /* the activations' sizes */
    qsort(dry.sizes, (size_t)dry.nsizes, sizeof *dry.sizes, descending);
    for (int t = -1; t < dry.nsizes; t++)
        for (size_t i = 0; i < nb; i++) {
            const uint64_t threshold = t < 0 ? UINT64_MAX : dry.sizes[t];
            plan->planned_bytes = dry_peak(m, plan, band_sizes[i], threshold, &trial);
            if (trial.thin)
                break; /* smaller bands are thinner still */
            if (plan->planned_bytes <= limit && plan->planned_host_bytes <= host_limit)
                return KLVAE_OK;
        }
    for (size_t i = 0; i < nb; i++) {
        /* on a GPU spilling lowers only the host side: thin bands unspilled first */
        if (host_limit != UINT64_MAX &&
            (plan->planned_bytes = dry_peak(m, plan, band_sizes[i], UINT64_MAX, &trial)) <= limit &&
            plan->planned_host_bytes <= host_limit)
            return KLVAE_OK;
        if ((plan->planned_bytes = dry_peak(m, plan, band_sizes[i], 0, &trial)) <= limit)
            return KLVAE_OK;
    }
    return KLVAE_ERR_OUT_OF_MEMORY; /* planned_bytes: the least it needs */
}

static void format_bytes(uint64_t bytes, char *buf, size_t size)
{
    if (bytes >= ((uint64_t)1 << 30))
        snprintf(buf, size, "%.2f GiB", (double)bytes / (double)((uint64_t)1 << 30));
    else
        snprintf(buf, size, "%.1f MiB", (double)bytes / (double)MB);
}

static klvae_status_t too_small(const klvae_model_t *m, const kv_forward_plan *plan)
{
    char limit[32], need[32];
    format_bytes(plan->limit, limit, sizeof limit);
    format_bytes(plan->planned_bytes, need, sizeof need);
    const int f = kv_config_factor(&m->cfg);
    if (plan->encode)
        return kv_error(KLVAE_ERR_OUT_OF_MEMORY,
                        "memory_limit %s is too small to encode %d x %d images: a streamed "
                        "encode of that size needs at least %s (its activations spilled to "
                        "disk)",
                        limit, plan->w, plan->h, need);
    return kv_error(KLVAE_ERR_OUT_OF_MEMORY,
                    "memory_limit %s is too small to decode %d x %d latents: a streamed decode "
                    "of that size needs at least %s (its activations spilled to disk)",
                    limit, plan->w / f, plan->h / f, need);
}

klvae_status_t kv_plan_forward(const klvae_model_t *m, bool encode, int n, int h, int w,
                               bool device_arrays, kv_forward_plan *plan)
{
    const kv_inference_settings *set = &m->infer;
    memset(plan, 0, sizeof *plan);
    plan->encode = encode;
    plan->n = n, plan->h = h, plan->w = w;
    plan->spill_threshold = UINT64_MAX;
    if (set->blend) {
        const int tile = set->tile_size ? set->tile_size : m->cfg.sample_size;
        if (h > tile || w > tile)
            plan->mode = KV_FORWARD_BLEND;
        if (plan->mode == KV_FORWARD_BLEND && device_arrays)
            return kv_error(KLVAE_ERR_UNSUPPORTED,
                            "tiling=blend works on host arrays: use klvae_%s instead of "
                            "klvae_%s_device",
                            encode ? "encode" : "decode", encode ? "encode" : "decode");
        return KLVAE_OK;
    }
    if (set->limit_kind == KV_LIMIT_NONE)
        return KLVAE_OK;
    const bool automatic = set->limit_kind == KV_LIMIT_AUTO;
    /* auto on a GPU: its memory is not known here */
    if (automatic && (device_arrays || !m->be->host_memory))
        return KLVAE_OK;
    uint64_t host_budget = available_memory() / 20 * 17;
    plan->limit = automatic ? host_budget : set->memory_limit;
    plan->planned_bytes = kv_untiled_bytes(m, encode, n, h, w);
    if (plan->planned_bytes > plan->limit && automatic && m->be->host_memory) {
        /* what the model kept from its last call (keep_memory) is not
         * MemAvailable but is this call's to use: give it back and look
         * again */
        m->be->ops->trim(m->be, false);
        host_budget = available_memory() / 20 * 17;
        plan->limit = host_budget;
    }
    if (plan->planned_bytes <= plan->limit)
        return KLVAE_OK;
    if (device_arrays)
        return kv_error(KLVAE_ERR_UNSUPPORTED,
                        "klvae_%s_device runs untiled, which needs about %.2f GiB here, over "
                        "memory_limit; klvae_%s with host arrays can stream it",
                        encode ? "encode" : "decode",
                        (double)plan->planned_bytes / (double)((uint64_t)1 << 30),
                        encode ? "encode" : "decode");
    plan->mode = KV_FORWARD_STREAMED;
    kv_forward_plan one = *plan; /* samples stream one at a time */
    one.n = 1;
    /* a GPU: memory_limit bounds its memory, the stores take host memory
     * (85% of what is available, then the spill file) */
    klvae_status_t st =
        plan_streamed(m, plan->limit, m->be->host_memory ? UINT64_MAX : host_budget, &one);
    plan->band_bytes = one.band_bytes;
    plan->spill_threshold = one.spill_threshold;
    plan->planned_bytes = one.planned_bytes;
    plan->planned_host_bytes = m->be->host_memory ? 0 : one.planned_host_bytes;
    return st == KLVAE_OK ? KLVAE_OK : too_small(m, plan);
}
