/* encode_folder.c — encode every PNG and JPEG of a folder into latents, one
 * safetensors file per image: the latent cache a diffusion trainer reads.
 *
 *   cc encode_folder.c $(pkg-config --cflags --libs klvae) -o encode_folder
 *   ./encode_folder MODEL IN_DIR OUT_DIR [--sample SEED] [--scaled] [--OPTION VALUE ...]
 *
 * For each IN_DIR/NAME.png, .jpg or .jpeg (any case; sub-folders are not
 * entered) it writes OUT_DIR/NAME.safetensors, creating OUT_DIR if needed.
 * One file per image, not one file for the folder, because images may have
 * different sizes (a safetensors tensor has one shape), because a failed image
 * then costs only its own file, and because a data loader can read any image
 * without the others. Two inputs with the same NAME (a.png, a.jpg) would write
 * the same file: the second is refused.
 *
 * The files are what 'klvae encode' writes (docs/cli.md, "Latent file
 * format"; only the metadata's "producer" differs), so 'klvae decode MODEL OUT_DIR/NAME.safetensors out.png' turns
 * one back into an image, and Python reads them with
 * safetensors.numpy.load_file. Each holds three float32 tensors of shape
 * [1, C, H/f, W/f]: "mean", "logvar" and "latent" (the mean, or with
 * --sample a seeded draw; with --scaled the latent is (z - shift) * scale, the
 * form a denoiser takes), and string metadata: the image size before padding,
 * how the latent was made, the model's scaling and shift factors.
 *
 * Images whose sides are not multiples of the downsampling factor f are
 * padded by repeating the last row and column, as klvae encode does; the
 * metadata keeps the real size so that klvae decode crops the padding away.
 *
 * With --sample SEED, image number i (0-based, in name order) is drawn with
 * seed SEED + i: different noise for each image, the same on every run and
 * machine. Any other --KEY VALUE pair goes to klvae_options_set (for example
 * --threads 2, --scaling-factor 0.13025); a bad key or value is refused with
 * the library's message.
 *
 * Every libklvae status is checked and klvae_last_error() printed on
 * failure. An image that cannot be read or encoded is reported and skipped;
 * the exit status is then 1. A model that cannot be loaded or an unusable
 * OUT_DIR stops the program at once. */
#define _POSIX_C_SOURCE 200809L /* opendir, mkdir, strcasecmp under -std=c11 */
#include <klvae.h>
#include <dirent.h>
#include <errno.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/stat.h>

static void report(const char *what, klvae_status_t st)
{
    fprintf(stderr, "%s: %s (%s)\n", what, klvae_last_error(), klvae_status_string(st));
}

/* ---- the folder ---- */

typedef struct entry {
    char *name; /* file name, "cat.png" */
    char *stem; /* without the extension, "cat" */
} entry;

static int is_image_name(const char *name)
{
    const char *dot = strrchr(name, '.');
    return dot && dot != name &&
           (strcasecmp(dot, ".png") == 0 || strcasecmp(dot, ".jpg") == 0 ||
            strcasecmp(dot, ".jpeg") == 0);
}

/* Sorted by stem, then name: the order is the same on every file system, and
 * names that would write the same output file are neighbours. */
static int compare_entries(const void *a, const void *b)
{
    const entry *x = a, *y = b;
    int c = strcmp(x->stem, y->stem);
    return c ? c : strcmp(x->name, y->name);
}

static void free_entries(entry *list, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        free(list[i].name);
        free(list[i].stem);
    }
    free(list);
}

/* The image files of dir, sorted; NULL with *n = 0 when there are none. */
static int list_images(const char *dir, entry **out, size_t *n)
{
    *out = NULL;
    *n = 0;
    DIR *d = opendir(dir);
    if (!d) {
        fprintf(stderr, "%s: %s\n", dir, strerror(errno));
        return -1;
    }
    entry *list = NULL;
    size_t count = 0, cap = 0;
    struct dirent *de;
    while ((de = readdir(d)) != NULL) {
        if (!is_image_name(de->d_name))
            continue;
        if (count == cap) {
            size_t ncap = cap ? 2 * cap : 64;
            entry *grown = realloc(list, ncap * sizeof *grown);
            if (!grown)
                goto oom;
            list = grown;
            cap = ncap;
        }
        size_t len = strlen(de->d_name);
        list[count].name = malloc(len + 1);
        list[count].stem = malloc(len + 1);
        if (!list[count].name || !list[count].stem) {
            free(list[count].name);
            free(list[count].stem);
            goto oom;
        }
        memcpy(list[count].name, de->d_name, len + 1);
        memcpy(list[count].stem, de->d_name, len + 1);
        *strrchr(list[count].stem, '.') = '\0';
        count++;
    }
    closedir(d);
    if (count > 1)
        qsort(list, count, sizeof *list, compare_entries);
    *out = list;
    *n = count;
    return 0;
oom:
    closedir(d);
    free_entries(list, count);
    fprintf(stderr, "out of memory\n");
    return -1;
}

static char *join(const char *dir, const char *name, const char *suffix)
{
    size_t len = strlen(dir) + 1 + strlen(name) + strlen(suffix) + 1;
    char *s = malloc(len);
    if (s)
        snprintf(s, len, "%s/%s%s", dir, name, suffix);
    return s;
}

/* ---- writing a safetensors file by hand ----
 *
 * The format: an unsigned 64-bit little-endian header length N, N bytes of
 * JSON, then the tensor data. The JSON maps each tensor name to
 * {"dtype", "shape", "data_offsets": [begin, end]} (byte offsets into the
 * data, which follows the header) and "__metadata__" to string pairs. Like
 * the library's writer we sort the keys and pad the JSON with spaces so that
 * the data starts 8-byte aligned. */

typedef struct tensor {
    const char *name;
    const float *data;
} tensor;

/* Writes n floats as little-endian IEEE 754 bytes, whatever the host order. */
static int write_floats_le(FILE *fp, const float *x, size_t n)
{
    unsigned char buf[4096];
    size_t used = 0;
    for (size_t i = 0; i < n; i++) {
        uint32_t u;
        memcpy(&u, &x[i], 4);
        buf[used++] = (unsigned char)u;
        buf[used++] = (unsigned char)(u >> 8);
        buf[used++] = (unsigned char)(u >> 16);
        buf[used++] = (unsigned char)(u >> 24);
        if (used == sizeof buf || i + 1 == n) {
            if (fwrite(buf, 1, used, fp) != used)
                return -1;
            used = 0;
        }
    }
    return 0;
}

/* Appends printf-style text to the header buffer. Once the text no longer
 * fits, *len stays at cap or beyond and the caller reports it. */
static void append(char *buf, size_t cap, size_t *len, const char *fmt, ...)
{
    if (*len >= cap)
        return;
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(buf + *len, cap - *len, fmt, ap);
    va_end(ap);
    *len = n < 0 ? cap : *len + (size_t)n;
}

/* nt tensors named "latent", "logvar" or "mean", each of shape [1, c, h, w],
 * stored in the order given and listed in the JSON in sorted order; meta is
 * a NULL-terminated list of key/value pairs already in sorted order, plain
 * text without quotes or backslashes. Written to PATH.tmp, then renamed: a
 * failure leaves no partial file. */
static int write_safetensors(const char *path, const tensor *t, int nt, int c, int h, int w,
                             const char *const *meta)
{
    const size_t bytes = (size_t)c * h * w * sizeof(float);
    char json[4096];
    const size_t cap = sizeof json;
    size_t len = 0;
    /* Sorted keys: "__metadata__" < "latent" < "logvar" < "mean". */
    append(json, cap, &len, "{\"__metadata__\":{");
    for (int k = 0; meta[k]; k += 2)
        append(json, cap, &len, "%s\"%s\":\"%s\"", k ? "," : "", meta[k], meta[k + 1]);
    append(json, cap, &len, "}");
    static const char *const sorted[] = {"latent", "logvar", "mean"};
    for (int s = 0; s < 3; s++)
        for (int i = 0; i < nt; i++)
            if (strcmp(t[i].name, sorted[s]) == 0)
                append(json, cap, &len,
                       ",\"%s\":{\"data_offsets\":[%zu,%zu],\"dtype\":\"F32\",\"shape\":[1,%d,%d,%d]}",
                       t[i].name, (size_t)i * bytes, (size_t)(i + 1) * bytes, c, h, w);
    append(json, cap, &len, "}");
    if (len + 8 > cap) {
        fprintf(stderr, "%s: header too long\n", path);
        return -1;
    }
    while (len % 8) /* 8 + len is then a multiple of 8 */
        json[len++] = ' ';

    const size_t plen = strlen(path) + 5;
    char *tmp = malloc(plen);
    if (tmp)
        snprintf(tmp, plen, "%s.tmp", path);
    if (!tmp) {
        fprintf(stderr, "out of memory\n");
        return -1;
    }
    FILE *fp = fopen(tmp, "wb");
    if (!fp) {
        fprintf(stderr, "%s: %s\n", tmp, strerror(errno));
        free(tmp);
        return -1;
    }
    unsigned char n8[8];
    for (int b = 0; b < 8; b++)
        n8[b] = (unsigned char)((uint64_t)len >> (8 * b));
    int bad = fwrite(n8, 1, 8, fp) != 8 || fwrite(json, 1, len, fp) != len;
    for (int i = 0; i < nt && !bad; i++)
        bad = write_floats_le(fp, t[i].data, bytes / sizeof(float)) != 0;
    if (fclose(fp) != 0)
        bad = 1;
    if (bad || rename(tmp, path) != 0) {
        fprintf(stderr, "%s: %s\n", bad ? tmp : path, strerror(errno));
        remove(tmp);
        free(tmp);
        return -1;
    }
    free(tmp);
    return 0;
}

/* ---- one image ---- */

/* Pads a (3, h, w) image to (3, ph, pw) by repeating the last row and column. */
static void pad_image(const float *img, int h, int w, float *out, int ph, int pw)
{
    for (int c = 0; c < 3; c++)
        for (int y = 0; y < ph; y++) {
            const float *src = img + ((size_t)c * h + (size_t)(y < h ? y : h - 1)) * w;
            float *dst = out + ((size_t)c * ph + y) * pw;
            memcpy(dst, src, (size_t)w * sizeof(float));
            for (int x = w; x < pw; x++)
                dst[x] = src[w - 1];
        }
}

typedef struct settings {
    int sample, scaled;
    uint64_t seed;
} settings;

static int encode_one(klvae_model_t *model, const settings *s, uint64_t index, const char *in,
                      const char *out, const char *name)
{
    float *img = NULL, *padded = NULL, *mean = NULL, *logvar = NULL, *latent = NULL;
    int h = 0, w = 0, rc = -1;
    klvae_status_t st = klvae_image_read(in, &img, &h, &w);
    if (st != KLVAE_OK) {
        report(in, st);
        return -1;
    }
    const int f = klvae_model_downsampling_factor(model), zc = klvae_model_latent_channels(model);
    const int ph = (h + f - 1) / f * f, pw = (w + f - 1) / f * f, lh = ph / f, lw = pw / f;
    const size_t nz = (size_t)zc * lh * lw;
    padded = malloc((size_t)3 * ph * pw * sizeof(float));
    mean = malloc(nz * sizeof(float));
    logvar = malloc(nz * sizeof(float));
    latent = malloc(nz * sizeof(float));
    if (!padded || !mean || !logvar || !latent) {
        fprintf(stderr, "%s: out of memory\n", in);
        goto done;
    }
    pad_image(img, h, w, padded, ph, pw);
    if ((st = klvae_encode(model, padded, 1, ph, pw, mean, logvar)) != KLVAE_OK) {
        report(in, st);
        goto done;
    }
    char how[64];
    if (s->sample) {
        const uint64_t seed = s->seed + index;
        if ((st = klvae_sample(model, mean, logvar, 1, lh, lw, seed, latent)) != KLVAE_OK) {
            report(in, st);
            goto done;
        }
        snprintf(how, sizeof how, "sample seed %llu", (unsigned long long)seed);
    } else {
        memcpy(latent, mean, nz * sizeof(float));
        snprintf(how, sizeof how, "mean");
    }
    if (s->scaled) {
        const float scale = klvae_model_scaling_factor(model);
        const float shift = klvae_model_shift_factor(model);
        for (size_t i = 0; i < nz; i++)
            latent[i] = (latent[i] - shift) * scale;
    }
    /* The factors as the model's config writes them ("0.18215", "none"). */
    char sscale[64], sshift[64], sh[16], sw[16], producer[64];
    if ((st = klvae_model_get(model, "scaling_factor", sscale, sizeof sscale)) != KLVAE_OK ||
        (st = klvae_model_get(model, "shift_factor", sshift, sizeof sshift)) != KLVAE_OK) {
        report("model_get", st);
        goto done;
    }
    snprintf(sh, sizeof sh, "%d", h);
    snprintf(sw, sizeof sw, "%d", w);
    snprintf(producer, sizeof producer, "encode_folder (libklvae %s)", klvae_version_string());
    const char *const meta[] = {
        "format", "pt", "image_height", sh, "image_width", sw, "latent", how,
        "producer", producer, "scaled", s->scaled ? "true" : "false",
        "scaling_factor", sscale, "shift_factor", sshift, NULL,
    };
    /* Data order as klvae encode writes it: mean, logvar, latent. */
    const tensor t[3] = {{"mean", mean}, {"logvar", logvar}, {"latent", latent}};
    if (write_safetensors(out, t, 3, zc, lh, lw, meta) != 0)
        goto done;
    printf("%s: %d x %d -> %s [1, %d, %d, %d] (%s%s)\n", name, w, h, out, zc, lh, lw, how,
           s->scaled ? ", scaled" : "");
    rc = 0;
done:
    free(latent);
    free(logvar);
    free(mean);
    free(padded);
    klvae_free(img); /* klvae_image_read's memory goes back through klvae_free */
    return rc;
}

/* ---- main ---- */

static int usage(const char *argv0)
{
    fprintf(stderr,
            "usage: %s MODEL IN_DIR OUT_DIR [--sample SEED] [--scaled] [--OPTION VALUE ...]\n",
            argv0);
    return 2;
}

int main(int argc, char **argv)
{
    if (argc < 4)
        return usage(argv[0]);
    const char *model_path = argv[1], *in_dir = argv[2], *out_dir = argv[3];
    settings s = {0, 0, 0};

    klvae_options_t *opts = NULL;
    klvae_status_t st = klvae_options_create(&opts);
    if (st != KLVAE_OK) {
        report("options", st);
        return 1;
    }
    for (int i = 4; i < argc; i++) {
        const char *a = argv[i];
        if (strncmp(a, "--", 2) != 0) {
            klvae_options_free(opts);
            return usage(argv[0]);
        }
        if (strcmp(a, "--scaled") == 0) {
            s.scaled = 1;
            continue;
        }
        if (i + 1 >= argc) {
            fprintf(stderr, "%s needs a value\n", a);
            klvae_options_free(opts);
            return 2;
        }
        const char *v = argv[++i];
        if (strcmp(a, "--sample") == 0) {
            char *end;
            errno = 0;
            s.seed = strtoull(v, &end, 10);
            if (errno || end == v || *end || *v == '-') {
                fprintf(stderr, "--sample: '%s' is not a seed (0 to 2^64 - 1)\n", v);
                klvae_options_free(opts);
                return 2;
            }
            s.sample = 1;
        } else if ((st = klvae_options_set(opts, a + 2, v)) != KLVAE_OK) {
            report(a, st); /* names the key and the value */
            klvae_options_free(opts);
            return 2;
        }
    }

    klvae_model_t *model = NULL;
    st = klvae_model_load(model_path, opts, &model);
    klvae_options_free(opts);
    if (st != KLVAE_OK) {
        report("load", st);
        return 1;
    }
    if (klvae_model_in_channels(model) != 3) {
        fprintf(stderr, "%s: the model does not take RGB images\n", model_path);
        klvae_model_free(model);
        return 1;
    }
    entry *list = NULL;
    size_t n = 0;
    if (list_images(in_dir, &list, &n) != 0) {
        klvae_model_free(model);
        return 1;
    }
    if (mkdir(out_dir, 0777) != 0 && errno != EEXIST) {
        fprintf(stderr, "%s: %s\n", out_dir, strerror(errno));
        free_entries(list, n);
        klvae_model_free(model);
        return 1;
    }

    size_t done = 0, failed = 0;
    for (size_t i = 0; i < n; i++) {
        if (i > 0 && strcmp(list[i].stem, list[i - 1].stem) == 0) {
            fprintf(stderr, "%s: skipped, %s.safetensors is already %s's\n", list[i].name,
                    list[i].stem, list[i - 1].name);
            failed++;
            continue;
        }
        char *in = join(in_dir, list[i].name, ""), *out = join(out_dir, list[i].stem, ".safetensors");
        if (in && out && encode_one(model, &s, i, in, out, list[i].name) == 0)
            done++;
        else
            failed++;
        if (!in || !out)
            fprintf(stderr, "out of memory\n");
        free(in);
        free(out);
    }
    if (n == 0)
        fprintf(stderr, "%s has no .png, .jpg or .jpeg files\n", in_dir);
    else
        printf("%zu of %zu images encoded into %s%s\n", done, n, out_dir,
               failed ? " (see the errors above)" : "");
    free_entries(list, n);
    klvae_model_free(model);
    return failed ? 1 : 0;
}
