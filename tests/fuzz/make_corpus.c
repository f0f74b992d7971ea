/* make_corpus.c — writes the seed corpora of tests/fuzz/corpus/ (make
 * fuzz-corpus): small valid files of every layout each parser knows, and a
 * few broken ones. Run it only to change the seeds; they are committed.
 * Links libklvae.a (it writes model files through the internal registry)
 * and libpng and libjpeg. Usage: make_corpus CORPUS_DIR FIXTURES_DIR */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <jpeglib.h> /* after stdio.h: it needs FILE and size_t */
#include <png.h>

#include "base/options.h"
#include "formats/safetensors.h"
#include "model/model.h"

static const char *corpus;

static void die(const char *what)
{
    fprintf(stderr, "make_corpus: %s: %s\n", what, klvae_last_error());
    exit(1);
}

static void folder(const char *name)
{
    char path[4096];
    snprintf(path, sizeof path, "%s/%s", corpus, name);
    if (mkdir(path, 0755) != 0 && errno != EEXIST)
        die(path);
}

/* corpus/dir/name with bytes, after dropping the first skip bytes. */
static void seed(const char *dir, const char *name, const void *bytes, size_t len, size_t skip)
{
    char path[4096];
    snprintf(path, sizeof path, "%s/%s/%s", corpus, dir, name);
    FILE *fp = fopen(path, "wb");
    if (!fp || fwrite((const char *)bytes + skip, 1, len - skip, fp) != len - skip || fclose(fp))
        die(path);
}

static unsigned char *slurp(const char *path, size_t *len)
{
    FILE *fp = fopen(path, "rb");
    if (!fp)
        die(path);
    fseek(fp, 0, SEEK_END);
    *len = (size_t)ftell(fp);
    rewind(fp);
    unsigned char *buf = malloc(*len + 1);
    if (!buf || fread(buf, 1, *len, fp) != *len)
        die(path);
    fclose(fp);
    return buf;
}

/* ---- models ---- */

static klvae_model_t *tiny_model(bool attention, bool quant)
{
    static const char *const keys[][2] = {
        {"block_out_channels", "4,8"}, {"layers_per_block", "1"}, {"latent_channels", "2"},
        {"norm_num_groups", "2"},      {"threads", "1"},          {"seed", "11"},
    };
    klvae_options_t *o = NULL;
    klvae_options_create(&o);
    for (size_t i = 0; i < sizeof keys / sizeof keys[0]; i++)
        klvae_options_set(o, keys[i][0], keys[i][1]);
    klvae_options_set(o, "mid_block_add_attention", attention ? "true" : "false");
    klvae_options_set(o, "use_quant_conv", quant ? "true" : "false");
    klvae_options_set(o, "use_post_quant_conv", quant ? "true" : "false");
    klvae_model_t *m = NULL;
    if (klvae_model_create(o, &m) != KLVAE_OK)
        die("tiny model");
    klvae_options_free(o);
    return m;
}

static klvae_status_t fetch_param(void *ctx, size_t index, float *dst)
{
    const klvae_model_t *m = ctx;
    const kv_tensor *t = m->params[index].tensor;
    memcpy(dst, t->data, kv_tensor_numel(t) * sizeof(float));
    return KLVAE_OK;
}

/* The model's weights under CompVis names (ldm) or diffusers names, with a
 * prefix, as one file. */
static void write_model(const klvae_model_t *m, const char *path, bool ldm, const char *prefix)
{
    kv_st_entry *entries = calloc(m->num_params, sizeof *entries);
    char (*names)[160] = calloc(m->num_params, sizeof *names);
    for (size_t i = 0; i < m->num_params; i++) {
        snprintf(names[i], sizeof names[i], "%s%s", prefix,
                 ldm ? m->params[i].ldm_name : m->params[i].name);
        entries[i].name = names[i];
        entries[i].ndim = m->params[i].tensor->ndim;
        for (int d = 0; d < entries[i].ndim; d++)
            entries[i].shape[d] = m->params[i].tensor->shape[d];
    }
    if (kv_st_write(path, entries, m->num_params, NULL, 0, fetch_param, (void *)m, NULL))
        die(path);
    free(names);
    free(entries);
}

static void model_seeds(void)
{
    folder("model_load");
    char path[4096];
    struct {
        const char *name;
        bool attention, quant, ldm;
        const char *prefix;
    } layouts[] = {
        {"tiny-diffusers.safetensors", true, true, false, ""},
        {"tiny-compvis-noattn.safetensors", false, true, true, "first_stage_model."},
        {"tiny-diffusers-noquant.safetensors", true, false, false, "vae."},
    };
    for (size_t i = 0; i < sizeof layouts / sizeof layouts[0]; i++) {
        klvae_model_t *m = tiny_model(layouts[i].attention, layouts[i].quant);
        snprintf(path, sizeof path, "%s/model_load/%s", corpus, layouts[i].name);
        write_model(m, path, layouts[i].ldm, layouts[i].prefix);
        klvae_model_free(m);
    }
    size_t len;
    snprintf(path, sizeof path, "%s/model_load/tiny-diffusers.safetensors", corpus);
    unsigned char *bytes = slurp(path, &len);
    seed("model_load", "cut-in-data.safetensors", bytes, len / 2, 0);
    free(bytes);
    static const char empty[] = "\x02\0\0\0\0\0\0\0{}";
    seed("model_load", "empty-header.safetensors", empty, sizeof empty - 1, 0);
}

static void config_seeds(void)
{
    folder("config");
    klvae_model_t *m = tiny_model(true, true);
    char dir[4096], path[4200];
    snprintf(dir, sizeof dir, "%s/config-model-tmp", corpus);
    if (klvae_model_save(m, dir) != KLVAE_OK)
        die(dir);
    klvae_model_free(m);
    snprintf(path, sizeof path, "%s/config.json", dir);
    size_t len;
    unsigned char *text = slurp(path, &len);
    seed("config", "saved.json", text, len, 0);
    remove(path);
    snprintf(path, sizeof path, "%s/diffusion_pytorch_model.safetensors", dir);
    remove(path);
    rmdir(dir);
    free(text);
    static const char *const broken[][2] = {
        {"minimal.json", "{\"block_out_channels\": [4, 8], \"layers_per_block\": 1, "
                         "\"latent_channels\": 2, \"norm_num_groups\": 2}"},
        {"cross-attention.json", "{\"block_out_channels\": [4, 8], \"norm_num_groups\": 2, "
                                 "\"down_block_types\": [\"CrossAttnDownBlock2D\", "
                                 "\"DownEncoderBlock2D\"], \"latent_channels\": 2}"},
        {"types.json", "{\"block_out_channels\": \"4,8\", \"latent_channels\": 2.5, "
                       "\"act_fn\": null, \"scaling_factor\": \"x\", \"shift_factor\": 1e400}"},
        {"array.json", "[1, 2, {\"a\": [true, false, null]}]"},
    };
    for (size_t i = 0; i < sizeof broken / sizeof broken[0]; i++)
        seed("config", broken[i][0], broken[i][1], strlen(broken[i][1]), 0);
}

/* ---- latent files and checkpoints ---- */

/* ctx: the element count of every tensor of the file. */
static klvae_status_t fetch_ramp(void *ctx, size_t index, float *dst)
{
    const size_t numel = *(const size_t *)ctx;
    for (size_t i = 0; i < numel; i++)
        dst[i] = (float)((int)(i * 37 + index * 11) % 19) * 0.25f - 2.0f;
    return KLVAE_OK;
}

static void latent_file(const char *name, const char *const *names, size_t count,
                        const int64_t *shape, int ndim, const kv_st_meta *meta, size_t nmeta)
{
    char path[4096];
    snprintf(path, sizeof path, "%s/latents/%s", corpus, name);
    kv_st_entry entries[4];
    size_t numel = 1;
    for (int d = 0; d < ndim; d++)
        numel *= (size_t)shape[d];
    for (size_t i = 0; i < count; i++) {
        entries[i].name = names[i];
        entries[i].ndim = ndim;
        for (int d = 0; d < ndim; d++)
            entries[i].shape[d] = shape[d];
    }
    if (kv_st_write(path, entries, count, meta, nmeta, fetch_ramp, &numel, NULL) != KLVAE_OK)
        die(path);
}

static void latent_seeds(void)
{
    folder("latents");
    static const char *const three[] = {"latent", "logvar", "mean"};
    const int64_t one[4] = {1, 4, 3, 5}, batch[4] = {2, 4, 2, 3}, plain[3] = {4, 2, 2},
                  wrong[4] = {1, 3, 2, 2};
    const kv_st_meta meta[] = {{"format", "pt"},        {"image_height", "21"},
                               {"image_width", "37"},   {"scaled", "false"},
                               {"latent", "mean"},      {"scaling_factor", "0.18215"},
                               {"shift_factor", "none"}};
    const kv_st_meta scaled[] = {{"scaled", "true"}, {"image_height", "16"}};
    latent_file("encoded.safetensors", three, 3, one, 4, meta, 7);
    latent_file("batch-scaled.safetensors", three, 1, batch, 4, scaled, 2);
    static const char *const z[] = {"z"};
    latent_file("single-3d.safetensors", z, 1, plain, 3, NULL, 0);
    latent_file("three-channels.safetensors", three, 1, wrong, 4, NULL, 0);
    /* bf16, written by hand: kv_st_write writes float32 only */
    static const char header[] = "{\"latent\":{\"dtype\":\"BF16\",\"shape\":[1,4,2,2],"
                                 "\"data_offsets\":[0,32]}}";
    unsigned char file[8 + sizeof header - 1 + 32];
    size_t hlen = sizeof header - 1;
    for (int i = 0; i < 8; i++)
        file[i] = (unsigned char)(hlen >> (8 * i));
    memcpy(file + 8, header, hlen);
    for (int i = 0; i < 16; i++) { /* bf16 of small values */
        file[8 + hlen + 2 * i] = 0x00;
        file[8 + hlen + 2 * i + 1] = (unsigned char)(0x3E + i % 3);
    }
    seed("latents", "bf16.safetensors", file, sizeof file, 0);
}

/* The harness's trainer (fuzz_checkpoint.c): its checkpoint's header, with
 * the data cut off, is a seed small enough to commit. */
static void checkpoint_seeds(const char *fixtures)
{
    folder("checkpoint");
    static const char *const settings[][2] = {
        {"backend", "cpu"},     {"threads", "1"},     {"disc_layers", "1"},
        {"disc_channels", "4"}, {"ema_decay", "0.5"}, {"seed", "3"},
        {"disc_start", "0"},    {"learning_rate", "1e-3"},
    };
    klvae_options_t *o = NULL;
    klvae_options_create(&o);
    for (size_t i = 0; i < sizeof settings / sizeof settings[0]; i++)
        klvae_options_set(o, settings[i][0], settings[i][1]);
    char path[4096];
    snprintf(path, sizeof path, "%s/train/vae", fixtures);
    klvae_model_t *m = NULL;
    klvae_trainer_t *t = NULL;
    if (klvae_model_load(path, o, &m) != KLVAE_OK || klvae_trainer_create(m, o, &t) != KLVAE_OK)
        die("trainer");
    klvae_trainer_set_note(t, "data_position", "7");
    snprintf(path, sizeof path, "%s/checkpoint/full.tmp", corpus);
    if (klvae_trainer_save(t, path) != KLVAE_OK)
        die(path);
    size_t len;
    unsigned char *bytes = slurp(path, &len);
    remove(path);
    uint64_t hlen = 0;
    for (int i = 7; i >= 0; i--)
        hlen = hlen << 8 | bytes[i];
    seed("checkpoint", "header-without-data.safetensors", bytes, (size_t)(8 + hlen), 0);
    free(bytes);
    static const char meta_only[] =
        "{\"__metadata__\":{\"format\":\"klvae-trainer-checkpoint-1\",\"step\":\"5\","
        "\"model_adam_steps\":\"5\",\"disc_adam_steps\":\"0\",\"seed\":\"3\"}}";
    unsigned char file[8 + sizeof meta_only];
    size_t n = sizeof meta_only - 1;
    for (int i = 0; i < 8; i++)
        file[i] = (unsigned char)(n >> (8 * i));
    memcpy(file + 8, meta_only, n);
    seed("checkpoint", "metadata-only.safetensors", file, 8 + n, 0);
    klvae_trainer_free(t);
    klvae_model_free(m);
    klvae_options_free(o);
}

/* ---- images ---- */

typedef struct png_seed {
    const char *name;
    int w, h, depth, color, interlace;
} png_seed;

static void write_png_seed(const png_seed *s)
{
    char path[4096];
    snprintf(path, sizeof path, "%s/png/%s.tmp", corpus, s->name);
    FILE *fp = fopen(path, "wb");
    png_structp png = png_create_write_struct(PNG_LIBPNG_VER_STRING, NULL, NULL, NULL);
    png_infop info = png_create_info_struct(png);
    if (!fp || !png || !info || setjmp(png_jmpbuf(png)))
        die(path);
    png_init_io(png, fp);
    png_set_IHDR(png, info, (png_uint_32)s->w, (png_uint_32)s->h, s->depth, s->color,
                 s->interlace, PNG_COMPRESSION_TYPE_DEFAULT, PNG_FILTER_TYPE_DEFAULT);
    png_color palette[16];
    png_byte alpha[16];
    for (int i = 0; i < 16; i++) {
        palette[i] = (png_color){(png_byte)(i * 16), (png_byte)(255 - i * 9), (png_byte)(i * 5)};
        alpha[i] = (png_byte)(i * 17);
    }
    if (s->color == PNG_COLOR_TYPE_PALETTE) {
        png_set_PLTE(png, info, palette, 16);
        png_set_tRNS(png, info, alpha, 16, NULL);
    }
    png_write_info(png, info);
    int passes = png_set_interlace_handling(png); /* libpng picks each pass's pixels */
    size_t rowbytes = png_get_rowbytes(png, info);
    png_bytep row = malloc(rowbytes);
    for (int pass = 0; pass < passes; pass++)
        for (int y = 0; y < s->h; y++) {
            for (size_t i = 0; i < rowbytes; i++) /* 4-bit indices: any byte is valid */
                row[i] = (png_byte)((size_t)y * 31 + i * 7);
            png_write_row(png, row);
        }
    png_write_end(png, NULL);
    png_destroy_write_struct(&png, &info);
    fclose(fp);
    free(row);
    size_t len;
    unsigned char *bytes = slurp(path, &len);
    remove(path);
    char name[256];
    snprintf(name, sizeof name, "%s.png-body", s->name);
    seed("png", name, bytes, len, 8); /* fuzz_png.c puts the signature back */
    free(bytes);
}

static void png_seeds(void)
{
    folder("png");
    static const png_seed seeds[] = {
        {"rgb8", 7, 5, 8, PNG_COLOR_TYPE_RGB, PNG_INTERLACE_NONE},
        {"grey1", 9, 3, 1, PNG_COLOR_TYPE_GRAY, PNG_INTERLACE_NONE},
        {"palette4-trns", 6, 4, 4, PNG_COLOR_TYPE_PALETTE, PNG_INTERLACE_NONE},
        {"rgba16", 3, 5, 16, PNG_COLOR_TYPE_RGB_ALPHA, PNG_INTERLACE_NONE},
        {"grey-alpha8-adam7", 11, 13, 8, PNG_COLOR_TYPE_GRAY_ALPHA, PNG_INTERLACE_ADAM7},
        {"grey16-adam7", 5, 9, 16, PNG_COLOR_TYPE_GRAY, PNG_INTERLACE_ADAM7},
    };
    for (size_t i = 0; i < sizeof seeds / sizeof seeds[0]; i++)
        write_png_seed(&seeds[i]);
}

typedef struct jpeg_seed {
    const char *name;
    int w, h, components;
    J_COLOR_SPACE space;
    bool progressive, subsample;
    int restart_rows;
} jpeg_seed;

static void write_jpeg_seed(const jpeg_seed *s)
{
    char path[4096];
    snprintf(path, sizeof path, "%s/jpeg/%s.tmp", corpus, s->name);
    FILE *fp = fopen(path, "wb");
    if (!fp)
        die(path);
    struct jpeg_compress_struct c;
    struct jpeg_error_mgr err;
    c.err = jpeg_std_error(&err);
    jpeg_create_compress(&c);
    jpeg_stdio_dest(&c, fp);
    c.image_width = (JDIMENSION)s->w;
    c.image_height = (JDIMENSION)s->h;
    c.input_components = s->components;
    c.in_color_space = s->space;
    jpeg_set_defaults(&c);
    jpeg_set_quality(&c, 80, TRUE);
    if (!s->subsample)
        for (int i = 0; i < c.num_components; i++)
            c.comp_info[i].h_samp_factor = c.comp_info[i].v_samp_factor = 1;
    if (s->progressive)
        jpeg_simple_progression(&c);
    c.restart_in_rows = s->restart_rows;
    jpeg_start_compress(&c, TRUE);
    JSAMPLE *row = malloc((size_t)s->w * s->components);
    while (c.next_scanline < c.image_height) {
        for (int i = 0; i < s->w * s->components; i++)
            row[i] = (JSAMPLE)((int)c.next_scanline * 23 + i * 13);
        jpeg_write_scanlines(&c, &row, 1);
    }
    jpeg_finish_compress(&c);
    jpeg_destroy_compress(&c);
    fclose(fp);
    free(row);
    size_t len;
    unsigned char *bytes = slurp(path, &len);
    remove(path);
    char name[256];
    snprintf(name, sizeof name, "%s.jpg-body", s->name);
    seed("jpeg", name, bytes, len, 2); /* fuzz_jpeg.c puts FF D8 back */
    free(bytes);
}

static void jpeg_seeds(void)
{
    folder("jpeg");
    static const jpeg_seed seeds[] = {
        {"rgb-420", 13, 9, 3, JCS_RGB, false, true, 0},
        {"grey", 8, 8, 1, JCS_GRAYSCALE, false, false, 0},
        {"rgb-progressive", 17, 11, 3, JCS_RGB, true, true, 0},
        {"rgb-restart", 16, 24, 3, JCS_RGB, false, false, 1},
        {"cmyk", 9, 7, 4, JCS_CMYK, false, false, 0},
    };
    for (size_t i = 0; i < sizeof seeds / sizeof seeds[0]; i++)
        write_jpeg_seed(&seeds[i]);
}

/* ---- options ---- */

static void option_seeds(void)
{
    folder("options");
    /* name, then key/value strings, each ended by a NUL in the seed */
    static const char *const seeds[][5] = {
        {"threads", "threads", "4", NULL},
        {"channels", "block_out_channels", "128,256,512,512", NULL},
        {"budget", "max-image-pixels", "1099511627776", NULL},
        {"two", "scaling_factor", "1e-3", "shift_factor", "none"},
        {"seed", "seed", "18446744073709551615", NULL},
        {"bad", "backend", "gpu", "act_fn", "swish"},
        {"unknown", "colour", "red", NULL},
    };
    for (size_t i = 0; i < sizeof seeds / sizeof seeds[0]; i++) {
        char bytes[256];
        size_t len = 0;
        for (int k = 1; k < 5 && seeds[i][k]; k++) {
            size_t n = strlen(seeds[i][k]) + 1;
            memcpy(bytes + len, seeds[i][k], n);
            len += n;
        }
        seed("options", seeds[i][0], bytes, len, 0);
    }
}

int main(int argc, char **argv)
{
    if (argc != 3) {
        fprintf(stderr, "usage: make_corpus CORPUS_DIR FIXTURES_DIR\n");
        return 2;
    }
    corpus = argv[1];
    if (mkdir(corpus, 0755) != 0 && errno != EEXIST)
        die(corpus);
    model_seeds();
    config_seeds();
    latent_seeds();
    checkpoint_seeds(argv[2]);
    png_seeds();
    jpeg_seeds();
    option_seeds();
    return 0;
}
