/* mpi_tool.c — helpers of tests/mpi_test.sh (built by make as
 * build/tests/mpi_tool; it links libklvae.a for the safetensors reader):
 *
 *   mpi_tool compare A B REL   every tensor of the trainer checkpoint A (the
 *                              weights of both networks, the BatchNorm
 *                              statistics, EMA; "adam.*" left out) against
 *                              B: max |a - b| <= REL * max |b| per tensor,
 *                              REL 0 meaning bit for bit; the steps and the
 *                              data positions must be equal. Prints the
 *                              worst tensor; exit 1 when one is off.
 *   mpi_tool images DIR N S    N random S x S PNG images DIR/img_K.png
 *   mpi_tool note FILE KEY     the metadata value KEY of a safetensors file
 *   mpi_tool perturb IN OUT A  IN's tensors into OUT, each 1-D one (biases,
 *                              BatchNorm weights and statistics) plus a
 *                              deterministic uniform (-A, A): a "trained"
 *                              discriminator, whose BatchNorm biases are not
 *                              the zeros of its initialisation (a tensor
 *                              that only a few Adam steps of LDM's learning
 *                              rate moved from zero cannot be compared to
 *                              1e-5 of its own size) */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "formats/safetensors.h"

static int usage(void)
{
    fprintf(stderr, "usage: mpi_tool compare A B REL | images DIR N SIZE | note FILE KEY | "
                    "perturb IN OUT AMPLITUDE\n");
    return 2;
}

static int open_or_say(const char *path, kv_safetensors *st)
{
    if (kv_st_open(path, st) == KLVAE_OK)
        return 0;
    fprintf(stderr, "mpi_tool: %s\n", klvae_last_error());
    return 1;
}

/* One tensor of a against b's of the same name: the relative error. */
static double tensor_error(kv_safetensors *a, kv_safetensors *b, const kv_st_tensor *t,
                           int *missing)
{
    const kv_st_tensor *u = kv_st_find(b, t->name);
    size_t n = kv_st_numel(t);
    if (!u || kv_st_numel(u) != n) {
        *missing = 1;
        return INFINITY;
    }
    float *x = malloc((n ? n : 1) * sizeof *x), *y = malloc((n ? n : 1) * sizeof *y);
    double worst = 0.0, scale = 0.0;
    if (x && y && kv_st_read_f32(a, t, x) == KLVAE_OK && kv_st_read_f32(b, u, y) == KLVAE_OK) {
        for (size_t i = 0; i < n; i++) {
            double d = fabs((double)x[i] - (double)y[i]);
            worst = d > worst || d != d ? (d != d ? INFINITY : d) : worst;
            scale = fmax(scale, fabs(y[i]));
            if (memcmp(&x[i], &y[i], sizeof *x) != 0 && worst == 0.0)
                worst = 1e-300; /* -0 against +0: not bitwise */
        }
    } else {
        worst = INFINITY;
    }
    free(x);
    free(y);
    return worst == 0.0 ? 0.0 : worst / (scale > 0.0 ? scale : 1e-30);
}

static int compare(const char *pa, const char *pb, double rel)
{
    kv_safetensors a, b;
    if (open_or_say(pa, &a) || open_or_say(pb, &b))
        return 1;
    int bad = 0, missing = 0;
    double worst = 0.0;
    const char *worst_name = "";
    size_t compared = 0;
    for (size_t i = 0; i < a.count; i++) {
        const kv_st_tensor *t = &a.tensors[i];
        if (strncmp(t->name, "adam.", 5) == 0)
            continue;
        double e = tensor_error(&a, &b, t, &missing);
        compared++;
        if (e > worst) {
            worst = e;
            worst_name = t->name;
        }
        if (missing || (rel == 0.0 ? e != 0.0 : e > rel)) {
            if (bad++ < 5)
                fprintf(stderr, "%s: %s %s (relative %.3g)\n", pb, t->name,
                        missing ? "is missing" : "differs", e);
            missing = 0;
        }
    }
    static const char *const keys[] = {"step", "note.data_position", "note.batch"};
    for (size_t k = 0; k < sizeof keys / sizeof keys[0]; k++) {
        const char *x = kv_st_metadata(&a, keys[k]), *y = kv_st_metadata(&b, keys[k]);
        if (!x || !y || strcmp(x, y) != 0) {
            fprintf(stderr, "%s: %s is %s, %s has %s\n", pb, keys[k], y ? y : "missing", pa,
                    x ? x : "missing");
            bad++;
        }
    }
    printf("%zu tensors, worst %s (relative %.3g), %s\n", compared, worst_name, worst,
           bad ? "DIFFERENT" : "same");
    kv_st_close(&a);
    kv_st_close(&b);
    return bad ? 1 : 0;
}

static int images(const char *dir, int n, int size)
{
    float *px = malloc(sizeof(float) * 3 * (size_t)size * size);
    if (!px)
        return 1;
    unsigned s = 12345;
    for (int k = 0; k < n; k++) {
        for (size_t i = 0; i < (size_t)3 * size * size; i++) {
            s = s * 1103515245u + 12345u;
            px[i] = (float)((s >> 8) & 0xFFFF) / 32768.0f - 1.0f;
        }
        char path[4096];
        snprintf(path, sizeof path, "%s/img_%02d.png", dir, k);
        if (klvae_image_write_png(path, px, size, size) != KLVAE_OK) {
            fprintf(stderr, "mpi_tool: %s\n", klvae_last_error());
            free(px);
            return 1;
        }
    }
    free(px);
    return 0;
}

typedef struct perturb_ctx {
    kv_safetensors *st;
    double amplitude;
    unsigned seed;
} perturb_ctx;

static klvae_status_t perturbed(void *ctx, size_t index, float *dst)
{
    perturb_ctx *p = ctx;
    const kv_st_tensor *t = &p->st->tensors[index];
    klvae_status_t st = kv_st_read_f32(p->st, t, dst);
    for (size_t i = 0; st == KLVAE_OK && t->ndim == 1 && i < kv_st_numel(t); i++) {
        p->seed = p->seed * 1103515245u + 12345u;
        dst[i] += (float)(p->amplitude * (((p->seed >> 8) & 0xFFFF) / 32768.0 - 1.0));
    }
    return st;
}

static int perturb(const char *in, const char *out, double amplitude)
{
    kv_safetensors st;
    if (open_or_say(in, &st))
        return 1;
    kv_st_entry *entries = calloc(st.count ? st.count : 1, sizeof *entries);
    if (!entries)
        return 1;
    for (size_t i = 0; i < st.count; i++) {
        entries[i].name = st.tensors[i].name;
        entries[i].ndim = st.tensors[i].ndim;
        memcpy(entries[i].shape, st.tensors[i].shape, sizeof entries[i].shape);
    }
    perturb_ctx ctx = {&st, amplitude, 4242};
    klvae_status_t s = kv_st_write(out, entries, st.count, NULL, 0, perturbed, &ctx, NULL);
    if (s != KLVAE_OK)
        fprintf(stderr, "mpi_tool: %s\n", klvae_last_error());
    free(entries);
    kv_st_close(&st);
    return s == KLVAE_OK ? 0 : 1;
}

static int note(const char *path, const char *key)
{
    kv_safetensors st;
    if (open_or_say(path, &st))
        return 1;
    const char *v = kv_st_metadata(&st, key);
    if (v)
        printf("%s\n", v);
    kv_st_close(&st);
    return v ? 0 : 1;
}

int main(int argc, char **argv)
{
    if (argc == 5 && strcmp(argv[1], "compare") == 0)
        return compare(argv[2], argv[3], atof(argv[4]));
    if (argc == 5 && strcmp(argv[1], "images") == 0)
        return images(argv[2], atoi(argv[3]), atoi(argv[4]));
    if (argc == 4 && strcmp(argv[1], "note") == 0)
        return note(argv[2], argv[3]);
    if (argc == 5 && strcmp(argv[1], "perturb") == 0)
        return perturb(argv[2], argv[3], atof(argv[4]));
    return usage();
}
