/* checkpoint.c — klvae_trainer_save, klvae_trainer_load and
 * klvae_trainer_export: the whole trainer state in one safetensors file
 * (format "klvae-trainer-checkpoint-1"), walked through the same param
 * sets as the optimiser (train/param_set.h). docs/training.md describes the
 * file. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "formats/safetensors.h"
#include "model/config.h"
#include "train/trainer_state.h"

#define CHECKPOINT_FORMAT "klvae-trainer-checkpoint-1"

/* One tensor of a checkpoint: in backend memory, or a host array. */
typedef struct ck_entry {
    char name[KV_PARAM_NAME + 32];
    kv_tensor *tensor;
    float *host;
    int64_t shape[4];
    int ndim;
} ck_entry;

typedef struct ck_list {
    ck_entry *items;
    size_t count, capacity;
} ck_list;

static klvae_status_t ck_add(ck_list *l, const char *prefix, const char *name, kv_tensor *t,
                             float *host, int64_t host_count)
{
    if (l->count == l->capacity) {
        size_t cap = l->capacity ? 2 * l->capacity : 512;
        ck_entry *grown = realloc(l->items, cap * sizeof *grown);
        if (!grown)
            return kv_error(KLVAE_ERR_OUT_OF_MEMORY, "out of memory writing a checkpoint");
        l->items = grown;
        l->capacity = cap;
    }
    ck_entry *e = &l->items[l->count++];
    memset(e, 0, sizeof *e);
    snprintf(e->name, sizeof e->name, "%s%s", prefix, name);
    e->tensor = t;
    e->host = host;
    if (t) {
        e->ndim = t->ndim;
        for (int d = 0; d < t->ndim; d++)
            e->shape[d] = t->shape[d];
    } else {
        e->ndim = 1;
        e->shape[0] = host_count;
    }
    return KLVAE_OK;
}

/* A network's parameters (its float32 master weights when it has them),
 * both Adam moments and (when kept) EMA weights, under the names NAME.P,
 * adam.NAME.m.P, adam.NAME.v.P and ema.P. */
static klvae_status_t ck_collect_net(const kv_trained_net *n, ck_list *l)
{
    char weights[16], adam_m[24], adam_v[24];
    snprintf(weights, sizeof weights, "%s.", n->name);
    snprintf(adam_m, sizeof adam_m, "adam.%s.m.", n->name);
    snprintf(adam_v, sizeof adam_v, "adam.%s.v.", n->name);
    const kv_param_set exact = n->master.count ? n->master : n->weights;
    klvae_status_t st = KLVAE_OK;
    for (size_t i = 0; st == KLVAE_OK && i < n->weights.count; i++) {
        const char *name = n->weights.params[i].name;
        st = ck_add(l, weights, name, exact.params[i].tensor, NULL, 0);
        if (st == KLVAE_OK)
            st = ck_add(l, adam_m, name, n->adam_m.params[i].tensor, NULL, 0);
        if (st == KLVAE_OK)
            st = ck_add(l, adam_v, name, n->adam_v.params[i].tensor, NULL, 0);
        if (st == KLVAE_OK && n->ema.count)
            st = ck_add(l, "ema.", name, n->ema.params[i].tensor, NULL, 0);
    }
    return st;
}

/* Every tensor of the trainer's state, under its checkpoint name. The
 * host-side scalars live in a small array the caller provides. */
static klvae_status_t ck_collect(const klvae_trainer_t *t, float *scalars, ck_list *l)
{
    klvae_status_t st = ck_collect_net(&t->model_net, l);
    if (st == KLVAE_OK)
        st = ck_collect_net(&t->disc_net, l);
    const kv_disc *d = t->disc;
    for (int i = 0; st == KLVAE_OK && i < d->convs; i++) {
        if (!d->running_mean[i])
            continue;
        char name[64];
        int bn = (i == 0 ? 0 : 2 + 3 * (i - 1)) + 1;
        int ch = d->bn[i].weight.shape[0];
        snprintf(name, sizeof name, "main.%d.running_mean", bn);
        st = ck_add(l, "disc.", name, NULL, d->running_mean[i], ch);
        snprintf(name, sizeof name, "main.%d.running_var", bn);
        if (st == KLVAE_OK)
            st = ck_add(l, "disc.", name, NULL, d->running_var[i], ch);
    }
    scalars[0] = t->logvar;
    scalars[1] = (float)t->logvar_m;
    scalars[2] = (float)t->logvar_v;
    if (st == KLVAE_OK)
        st = ck_add(l, "", "loss.logvar", NULL, scalars, 1);
    if (st == KLVAE_OK)
        st = ck_add(l, "", "adam.loss.logvar", NULL, scalars + 1, 2);
    return st;
}

typedef struct ck_fetch_ctx {
    const klvae_trainer_t *t;
    const ck_list *list;
} ck_fetch_ctx;

static klvae_status_t ck_fetch(void *ctx, size_t index, float *dst)
{
    const ck_fetch_ctx *c = ctx;
    const ck_entry *e = &c->list->items[index];
    if (e->tensor)
        return c->t->be->ops->download(c->t->be, dst, e->tensor);
    memcpy(dst, e->host, (size_t)e->shape[0] * sizeof(float));
    return KLVAE_OK;
}

/* The structural keys a checkpoint must agree on. */
/* The model config in checkpoint metadata (config.KEY), so that a run can
 * be resumed without the model it started from. The first
 * STRUCTURE_KEY_COUNT decide the architecture and must match on load; the
 * latent scaling does not change training and is only recorded. */
static const char *const structure_keys[] = {
    "in_channels", "out_channels", "latent_channels", "block_out_channels", "layers_per_block",
    "norm_num_groups", "use_quant_conv", "use_post_quant_conv", "mid_block_add_attention",
    "act_fn", "scaling_factor", "shift_factor",
};
#define STRUCTURE_KEY_COUNT 10

static klvae_status_t trainer_save_unlocked(const klvae_trainer_t *t, const char *path)
{
    kv_error_clear();
    if (!t || !path)
        return kv_error(KLVAE_ERR_INVALID_ARGUMENT, "klvae_trainer_save: %s is NULL",
                        !t ? "trainer" : "path");
    float scalars[3];
    ck_list list = {NULL, 0, 0};
    klvae_status_t st = ck_collect(t, scalars, &list);
    kv_st_entry *entries = NULL;
    enum { FIXED_META = 10 };
    kv_st_meta meta[FIXED_META + KV_ARRAY_LEN(structure_keys) + KV_MAX_NOTES];
    char values[FIXED_META + KV_ARRAY_LEN(structure_keys)][96];
    char note_names[KV_MAX_NOTES][KV_NOTE_SIZE + 8];
    char structure_names[KV_ARRAY_LEN(structure_keys)][48];
    size_t nmeta = 0;
    if (st == KLVAE_OK) {
        entries = calloc(list.count ? list.count : 1, sizeof *entries);
        if (!entries)
            st = kv_error(KLVAE_ERR_OUT_OF_MEMORY, "out of memory writing %s", path);
    }
    if (st == KLVAE_OK) {
        for (size_t i = 0; i < list.count; i++) {
            entries[i].name = list.items[i].name;
            entries[i].ndim = list.items[i].ndim;
            memcpy(entries[i].shape, list.items[i].shape, sizeof list.items[i].shape);
        }
        snprintf(values[0], 96, "%lld", (long long)t->step);
        snprintf(values[1], 96, "%lld", (long long)t->model_net.adam_steps);
        snprintf(values[2], 96, "%lld", (long long)t->disc_net.adam_steps);
        snprintf(values[3], 96, "%llu", (unsigned long long)t->seed);
        snprintf(values[4], 96, "%d", t->disc->layers);
        snprintf(values[5], 96, "%d", t->disc->channels);
        snprintf(values[6], 96, "%lld", (long long)t->skipped_steps);
        const char *fixed_keys[] = {"step",        "model_adam_steps", "disc_adam_steps", "seed",
                                    "disc_layers", "disc_channels",    "skipped_steps"};
        enum { FIXED_KEYS = KV_ARRAY_LEN(fixed_keys) };
        meta[nmeta].key = (char *)"format";
        meta[nmeta++].value = (char *)CHECKPOINT_FORMAT;
        meta[nmeta].key = (char *)"klvae_version";
        meta[nmeta++].value = (char *)KLVAE_VERSION_STRING;
        meta[nmeta].key = (char *)"options";
        meta[nmeta++].value = t->options_text;
        for (int i = 0; i < FIXED_KEYS; i++) {
            meta[nmeta].key = (char *)fixed_keys[i];
            meta[nmeta++].value = values[i];
        }
        for (size_t i = 0; i < KV_ARRAY_LEN(structure_keys); i++) {
            snprintf(structure_names[i], sizeof structure_names[i], "config.%s", structure_keys[i]);
            kv_config_get(&t->m->cfg, structure_keys[i], values[FIXED_KEYS + i], 96);
            meta[nmeta].key = structure_names[i];
            meta[nmeta++].value = values[FIXED_KEYS + i];
        }
        for (int i = 0; i < t->notes; i++) {
            snprintf(note_names[i], sizeof note_names[i], "note.%s", t->note_key[i]);
            meta[nmeta].key = note_names[i];
            meta[nmeta++].value = (char *)t->note_value[i];
        }
        ck_fetch_ctx ctx = {t, &list};
        st = kv_st_write(path, entries, list.count, meta, nmeta, ck_fetch, &ctx, NULL);
    }
    free(entries);
    free(list.items);
    return st;
}

KLVAE_API klvae_status_t klvae_trainer_save(const klvae_trainer_t *t, const char *path)
{
    /* const for the caller; the in-use mark is the trainer's own state */
    klvae_trainer_t *busy = (klvae_trainer_t *)t;
    kv_error_clear();
    klvae_status_t st = t ? kv_busy_enter(&busy->busy, "klvae_trainer_save") : KLVAE_OK;
    if (st != KLVAE_OK)
        return st;
    st = trainer_save_unlocked(busy, path);
    return t ? kv_busy_leave(&busy->busy, st) : st;
}

static bool parse_i64(const char *text, int64_t *out)
{
    if (!text || !*text)
        return false;
    char *end;
    long long v = strtoll(text, &end, 10);
    if (*end || v < 0)
        return false;
    *out = v;
    return true;
}

static klvae_status_t trainer_load_unlocked(klvae_trainer_t *t, const char *path)
{
    kv_error_clear();
    if (!t || !path)
        return kv_error(KLVAE_ERR_INVALID_ARGUMENT, "klvae_trainer_load: %s is NULL",
                        !t ? "trainer" : "path");
    kv_safetensors st;
    klvae_status_t status = kv_st_open(path, &st);
    if (status != KLVAE_OK)
        return status;
    float scalars[3];
    ck_list list = {NULL, 0, 0};
    float *host = NULL;
    int64_t step = 0, model_steps = 0, disc_steps = 0, skipped_steps = 0;
    const char *format = kv_st_metadata(&st, "format");
    if (!format || strcmp(format, CHECKPOINT_FORMAT) != 0) {
        status = kv_error(KLVAE_ERR_FORMAT,
                          "%s is not a klvae trainer checkpoint (its metadata has no format "
                          "'%s')",
                          path, CHECKPOINT_FORMAT);
        goto done;
    }
    if (!parse_i64(kv_st_metadata(&st, "step"), &step) ||
        !parse_i64(kv_st_metadata(&st, "model_adam_steps"), &model_steps) ||
        !parse_i64(kv_st_metadata(&st, "disc_adam_steps"), &disc_steps)) {
        status = kv_error(KLVAE_ERR_FORMAT, "%s: the step counters in its metadata are missing "
                                            "or malformed",
                          path);
        goto done;
    }
    const char *skipped_text = kv_st_metadata(&st, "skipped_steps"); /* since 0.2.0 */
    if (skipped_text && !parse_i64(skipped_text, &skipped_steps)) {
        status = kv_error(KLVAE_ERR_FORMAT, "%s: its skipped_steps metadata is malformed", path);
        goto done;
    }
    for (size_t i = 0; i < STRUCTURE_KEY_COUNT; i++) {
        char key[64], mine[96];
        snprintf(key, sizeof key, "config.%s", structure_keys[i]);
        const char *theirs = kv_st_metadata(&st, key);
        kv_config_get(&t->m->cfg, structure_keys[i], mine, sizeof mine);
        if (!theirs || strcmp(theirs, mine) != 0) {
            status = kv_error(KLVAE_ERR_CONFIG,
                              "%s was saved by a trainer of another model: %s is %s there and %s "
                              "here",
                              path, structure_keys[i], theirs ? theirs : "missing", mine);
            goto done;
        }
    }
    /* Check every tensor, values included, before changing anything: the
     * trainer is unchanged unless the whole checkpoint is good. */
    status = ck_collect(t, scalars, &list);
    size_t largest = 1;
    for (size_t i = 0; i < list.count; i++) {
        size_t n = 1;
        for (int d = 0; d < list.items[i].ndim; d++)
            n *= (size_t)list.items[i].shape[d];
        largest = KV_MAX(largest, n);
    }
    if (status == KLVAE_OK) {
        host = malloc(largest * sizeof *host);
        if (!host)
            status = kv_error(KLVAE_ERR_OUT_OF_MEMORY, "out of memory reading %s", path);
    }
    for (size_t i = 0; status == KLVAE_OK && i < list.count; i++) {
        const ck_entry *e = &list.items[i];
        const kv_st_tensor *f = kv_st_find(&st, e->name);
        if (!f && strncmp(e->name, "ema.", 4) == 0)
            continue; /* a checkpoint without EMA: EMA restarts from the weights */
        if (!f) {
            status = kv_error(KLVAE_ERR_MISSING_TENSOR, "%s: missing tensor '%s'", path, e->name);
            break;
        }
        bool same = f->ndim == e->ndim;
        for (int d = 0; same && d < e->ndim; d++)
            same = f->shape[d] == e->shape[d];
        if (!same) {
            status = kv_error(KLVAE_ERR_CONFIG,
                              "%s: tensor '%s' has another shape than this trainer's (saved with "
                              "other disc_layers or disc_channels?)",
                              path, e->name);
            break;
        }
        /* the dtype (an integer tensor of the same size is refused here) and
         * every value */
        status = kv_weights_check_finite(&st, f, host);
    }
    /* Then read it for real. Only an I/O error can stop this pass. */
    for (size_t i = 0; status == KLVAE_OK && i < list.count; i++) {
        const ck_entry *e = &list.items[i];
        const kv_st_tensor *f = kv_st_find(&st, e->name);
        if (!f) /* EMA missing: restart it from the loaded weights (below) */
            continue;
        if (e->tensor)
            status = kv_weights_read(t->be, &st, f, host, e->tensor);
        else
            status = kv_st_read_f32(&st, f, e->host);
    }
    /* the weights are the loaded master weights' rounding */
    if (status == KLVAE_OK && t->model_net.master.count)
        status = kv_params_copy(t->be, t->model_net.weights, t->model_net.master);
    if (status == KLVAE_OK && t->disc_net.master.count)
        status = kv_params_copy(t->be, t->disc_net.weights, t->disc_net.master);
    if (status == KLVAE_OK && t->ema && !kv_st_find(&st, "ema.decoder.conv_out.weight"))
        status = kv_params_copy(t->be, t->model_net.ema,
                                t->model_net.master.count ? t->model_net.master
                                                          : t->model_net.weights);
    if (status == KLVAE_OK) {
        t->logvar = scalars[0];
        t->logvar_m = scalars[1];
        t->logvar_v = scalars[2];
        t->step = step;
        t->skipped_steps = skipped_steps;
        t->model_net.adam_steps = model_steps;
        t->disc_net.adam_steps = disc_steps;
        uint64_t seed;
        const char *seed_text = kv_st_metadata(&st, "seed");
        if (seed_text && sscanf(seed_text, "%llu", (unsigned long long *)&seed) == 1)
            t->seed = seed;
        t->notes = 0;
        for (size_t i = 0; i < st.metadata_count && t->notes < KV_MAX_NOTES; i++) {
            const kv_st_meta *md = &st.metadata[i];
            if (strncmp(md->key, "note.", 5) != 0 || strlen(md->key + 5) >= KV_NOTE_SIZE ||
                strlen(md->value) >= KV_NOTE_SIZE)
                continue;
            strcpy(t->note_key[t->notes], md->key + 5);
            strcpy(t->note_value[t->notes], md->value);
            t->notes++;
        }
    }
done:
    free(host);
    free(list.items);
    kv_st_close(&st);
    return status;
}

KLVAE_API klvae_status_t klvae_trainer_load(klvae_trainer_t *t, const char *path)
{
    kv_error_clear();
    if (!t)
        return trainer_load_unlocked(t, path); /* the NULL check and its message */
    klvae_status_t st = kv_busy_enter(&t->busy, "klvae_trainer_load");
    if (st != KLVAE_OK)
        return st;
    /* it writes the model's weights: no encode or decode meanwhile */
    st = kv_busy_enter(&t->m->busy, "klvae_trainer_load (its model)");
    if (st == KLVAE_OK)
        st = kv_busy_leave(&t->m->busy, trainer_load_unlocked(t, path));
    return kv_busy_leave(&t->busy, st);
}

static klvae_status_t trainer_export_unlocked(const klvae_trainer_t *t, const char *path,
                                              int use_ema)
{
    kv_error_clear();
    if (!t || !path)
        return kv_error(KLVAE_ERR_INVALID_ARGUMENT, "klvae_trainer_export: %s is NULL",
                        !t ? "trainer" : "path");
    if (!use_ema)
        return kv_weights_save(t->m, path);
    if (!t->ema)
        return kv_error(KLVAE_ERR_INVALID_ARGUMENT,
                        "klvae_trainer_export: the trainer keeps no EMA weights (set ema_decay)");
    /* The EMA tree with the model's config (and its extra keys). */
    klvae_model_t view = *t->ema;
    view.cfg = t->m->cfg;
    return kv_weights_save(&view, path);
}

KLVAE_API klvae_status_t klvae_trainer_export(const klvae_trainer_t *t, const char *path,
                                              int use_ema)
{
    /* const for the caller; the in-use mark is the trainer's own state */
    klvae_trainer_t *busy = (klvae_trainer_t *)t;
    kv_error_clear();
    klvae_status_t st = t ? kv_busy_enter(&busy->busy, "klvae_trainer_export") : KLVAE_OK;
    if (st != KLVAE_OK)
        return st;
    st = trainer_export_unlocked(busy, path, use_ema);
    return t ? kv_busy_leave(&busy->busy, st) : st;
}

/* ---- data-parallel: the ranks' shared state ---- */

/* A line "key=value\n" appended to text (grown as needed). */
static bool append_line(char **text, size_t *len, size_t *cap, const char *key, const char *value)
{
    size_t need = strlen(key) + strlen(value) + 3;
    if (*len + need >= *cap) {
        size_t grown_cap = 2 * (*len + need);
        char *grown = realloc(*text, grown_cap);
        if (!grown)
            return false;
        *text = grown;
        *cap = grown_cap;
    }
    *len += (size_t)snprintf(*text + *len, *cap - *len, "%s=%s\n", key, value);
    return true;
}

char *kv_trainer_identity_text(const klvae_trainer_t *t)
{
    static const char *const machine[] = {"backend", "device", "threads"};
    size_t cap = 4096, len = 0;
    char *text = malloc(cap);
    bool ok = text != NULL;
    if (ok)
        text[0] = '\0';
    for (const char *line = t->options_text; ok && line && *line;) {
        size_t n = strcspn(line, "\n"), key = strcspn(line, "=");
        bool skip = false;
        for (size_t i = 0; i < KV_ARRAY_LEN(machine); i++)
            skip |= key == strlen(machine[i]) && strncmp(line, machine[i], key) == 0;
        if (!skip && n < 2048) {
            char buf[2048];
            memcpy(buf, line, n);
            buf[n] = '\0';
            buf[KV_MIN(key, n)] = '\0';
            ok = append_line(&text, &len, &cap, buf, key < n ? buf + key + 1 : "");
        }
        line += n + (line[n] == '\n');
    }
    for (size_t i = 0; ok && i < STRUCTURE_KEY_COUNT; i++) {
        char key[64], value[96];
        snprintf(key, sizeof key, "config.%s", structure_keys[i]);
        kv_config_get(&t->m->cfg, structure_keys[i], value, sizeof value);
        ok = append_line(&text, &len, &cap, key, value);
    }
    if (!ok) {
        free(text);
        return NULL;
    }
    return text;
}

klvae_status_t kv_trainer_broadcast_state(klvae_trainer_t *t, kv_dp *dp)
{
    float scalars[3];
    ck_list list = {NULL, 0, 0};
    klvae_status_t st = ck_collect(t, scalars, &list);
    size_t largest = 1;
    for (size_t i = 0; i < list.count; i++) {
        size_t n = 1;
        for (int d = 0; d < list.items[i].ndim; d++)
            n *= (size_t)list.items[i].shape[d];
        largest = KV_MAX(largest, n);
    }
    float *host = st == KLVAE_OK ? malloc(largest * sizeof *host) : NULL;
    if (st == KLVAE_OK && !host)
        st = kv_error(KLVAE_ERR_OUT_OF_MEMORY, "out of memory copying the trainer's state");
    ck_fetch_ctx ctx = {t, &list};
    for (size_t i = 0; st == KLVAE_OK && i < list.count; i++) {
        const ck_entry *e = &list.items[i];
        const size_t n = e->tensor ? kv_tensor_numel(e->tensor) : (size_t)e->shape[0];
        if (dp->comm.rank == 0)
            st = ck_fetch(&ctx, i, host);
        if (st == KLVAE_OK)
            st = kv_dp_broadcast(dp, host, n * sizeof *host, e->name);
        if (st == KLVAE_OK && dp->comm.rank != 0) {
            if (e->tensor)
                st = t->be->ops->upload(t->be, e->tensor, host);
            else
                memcpy(e->host, host, n * sizeof *host);
        }
    }
    /* the counters, and the loss' logvar with its Adam moments in double
     * (a checkpoint rounds them to float) */
    double counters[] = {(double)t->step,          (double)t->model_net.adam_steps,
                         (double)t->disc_net.adam_steps, (double)t->skipped_steps,
                         (double)(t->seed >> 32),  (double)(t->seed & 0xFFFFFFFFu),
                         t->logvar,                t->logvar_m,
                         t->logvar_v};
    if (st == KLVAE_OK)
        st = kv_dp_broadcast(dp, counters, sizeof counters, "the step counters");
    if (st == KLVAE_OK && dp->comm.rank != 0) {
        t->step = (int64_t)counters[0];
        t->model_net.adam_steps = (int64_t)counters[1];
        t->disc_net.adam_steps = (int64_t)counters[2];
        t->skipped_steps = (int64_t)counters[3];
        t->seed = (uint64_t)counters[4] << 32 | (uint64_t)counters[5];
        t->logvar = (float)counters[6];
        t->logvar_m = counters[7];
        t->logvar_v = counters[8];
    }
    /* with master weights (they were copied), the weights are their rounding */
    if (st == KLVAE_OK && dp->comm.rank != 0 && t->model_net.master.count)
        st = kv_params_copy(t->be, t->model_net.weights, t->model_net.master);
    if (st == KLVAE_OK && dp->comm.rank != 0 && t->disc_net.master.count)
        st = kv_params_copy(t->be, t->disc_net.weights, t->disc_net.master);
    free(host);
    free(list.items);
    return st;
}
