/* image.c — PNG (libpng) and JPEG (libjpeg-turbo) to float CHW in [-1, 1],
 * and float CHW to 8-bit RGB PNG. */
#include <errno.h>
#include <stdbool.h>
#include <stdio.h>
#include <jpeglib.h> /* after stdio.h: it needs FILE and size_t */
#include <jerror.h>
#include <math.h>
#include <png.h>
#include <setjmp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "base/io.h"
#include "base/options.h"
#include "formats/image.h"

#define KV_IMAGE_MAX_SIDE 65536

/* The pixel budget (option max_image_pixels), checked from the header
 * before anything the size of the image is allocated or decoded: a file of
 * a few bytes can claim billions of pixels. */
static klvae_status_t check_pixel_budget(const char *path, uint64_t width, uint64_t height,
                                         uint64_t budget)
{
    if (width * height <= budget) /* each side < 2^32: no overflow */
        return KLVAE_OK;
    return kv_error(KLVAE_ERR_UNSUPPORTED,
                    "%s: the image is %llu x %llu = %llu pixels, more than the budget of %llu "
                    "pixels (option max_image_pixels)",
                    path, (unsigned long long)width, (unsigned long long)height,
                    (unsigned long long)(width * height), (unsigned long long)budget);
}

/* ---- PNG ---- */

typedef struct png_failure {
    jmp_buf jump;
    char message[200];
} png_failure;

static void png_error_handler(png_structp png, png_const_charp message)
{
    png_failure *failure = png_get_error_ptr(png);
    snprintf(failure->message, sizeof failure->message, "%s", message);
    longjmp(failure->jump, 1);
}

static void png_warning_handler(png_structp png, png_const_charp message)
{
    (void)png;
    (void)message; /* benign: unknown chunks, bad gamma, ... */
}

/* Chunks that only carry metadata are skipped without being read into
 * memory: libpng allocates a text chunk's whole length before reading it,
 * so 77 bytes claiming a 1.2 GB tEXt chunk cost 1.2 GB (found by
 * tests/fuzz/fuzz_png.c). Nothing here uses text, colour profiles,
 * suggested palettes or EXIF; unknown chunks are dropped as well. Any chunk
 * still buffered may take at most 8 MB. */
static void png_skip_metadata(png_structp png)
{
    static const png_byte metadata[] = "tEXt\0zTXt\0iTXt\0iCCP\0sPLT\0eXIf";
    png_set_keep_unknown_chunks(png, PNG_HANDLE_CHUNK_NEVER, NULL, 0);
    png_set_keep_unknown_chunks(png, PNG_HANDLE_CHUNK_NEVER, metadata, 6);
    png_set_chunk_malloc_max(png, 8000000);
}

/* Asks libpng for RGB with 8 or 16 bits per sample, whatever the file
 * holds. Returns the number of interlace passes. */
static int png_request_rgb(png_structp png, png_infop info)
{
    int depth = png_get_bit_depth(png, info);
    int color = png_get_color_type(png, info);
    if (color == PNG_COLOR_TYPE_PALETTE)
        png_set_palette_to_rgb(png);
    if (color == PNG_COLOR_TYPE_GRAY && depth < 8)
        png_set_expand_gray_1_2_4_to_8(png);
    if (png_get_valid(png, info, PNG_INFO_tRNS))
        png_set_tRNS_to_alpha(png);
    if (color == PNG_COLOR_TYPE_GRAY || color == PNG_COLOR_TYPE_GRAY_ALPHA)
        png_set_gray_to_rgb(png);
    png_set_strip_alpha(png);
    if (depth == 16)
        png_set_swap(png); /* network order to little-endian */
    int passes = png_set_interlace_handling(png);
    png_read_update_info(png, info);
    return passes;
}

/* One row of interleaved RGB samples into row y of the three planes. */
static void png_row_to_planes(const png_byte *src, bool wide, png_uint_32 width, png_uint_32 y,
                              size_t plane, float *out)
{
    const float scale = wide ? 2.0f / 65535.0f : 2.0f / 255.0f;
    for (png_uint_32 x = 0; x < width; x++) {
        for (int c = 0; c < 3; c++) {
            float v;
            if (wide) {
                uint16_t s;
                memcpy(&s, src + 2 * (3 * x + (png_uint_32)c), 2);
                v = (float)s;
            } else {
                v = (float)src[3 * x + (png_uint_32)c];
            }
            out[(size_t)c * plane + (size_t)y * width + x] = v * scale - 1.0f;
        }
    }
}

static klvae_status_t read_png(FILE *fp, const char *path, uint64_t budget, float **pixels,
                               int *h, int *w)
{
    png_failure failure;
    failure.message[0] = '\0';
    png_structp png = png_create_read_struct(PNG_LIBPNG_VER_STRING, &failure, png_error_handler,
                                             png_warning_handler);
    if (!png)
        return kv_error(KLVAE_ERR_OUT_OF_MEMORY, "out of memory reading %s", path);
    png_infop info = png_create_info_struct(png);
    /* Volatile: they change between setjmp and a possible longjmp, and the
     * handler frees whatever was allocated by then. */
    float *volatile out = NULL;
    png_bytep volatile image = NULL;
    png_bytep *volatile rows = NULL;
    if (!info) {
        png_destroy_read_struct(&png, NULL, NULL);
        return kv_error(KLVAE_ERR_OUT_OF_MEMORY, "out of memory reading %s", path);
    }
    if (setjmp(failure.jump)) {
        png_destroy_read_struct(&png, &info, NULL);
        free(out);
        free(image);
        free(rows);
        return kv_error(KLVAE_ERR_FORMAT, "%s: corrupt PNG: %s", path, failure.message);
    }
    png_init_io(png, fp);
    png_set_user_limits(png, KV_IMAGE_MAX_SIDE, KV_IMAGE_MAX_SIDE);
    png_skip_metadata(png);
    png_read_info(png, info);
    png_uint_32 width = png_get_image_width(png, info);
    png_uint_32 height = png_get_image_height(png, info);
    if (check_pixel_budget(path, width, height, budget) != KLVAE_OK) {
        png_destroy_read_struct(&png, &info, NULL);
        return KLVAE_ERR_UNSUPPORTED;
    }
    int passes = png_request_rgb(png, info);
    bool wide = png_get_bit_depth(png, info) == 16;
    size_t rowbytes = png_get_rowbytes(png, info);
    size_t plane = (size_t)width * height;
    out = malloc(3 * plane * sizeof(float));
    /* Interlaced images need the whole image before rows are final. */
    image = malloc(passes > 1 ? rowbytes * height : rowbytes);
    rows = passes > 1 ? malloc(height * sizeof *rows) : NULL;
    if (!out || !image || (passes > 1 && !rows)) {
        png_destroy_read_struct(&png, &info, NULL);
        free(out);
        free(image);
        free(rows);
        return kv_error(KLVAE_ERR_OUT_OF_MEMORY, "out of memory reading %s (%u x %u)", path,
                        (unsigned)width, (unsigned)height);
    }
    if (passes > 1) {
        for (png_uint_32 y = 0; y < height; y++)
            rows[y] = image + y * rowbytes;
        png_read_image(png, rows);
    }
    for (png_uint_32 y = 0; y < height; y++) {
        png_bytep src = passes > 1 ? rows[y] : image;
        if (passes <= 1)
            png_read_row(png, src, NULL);
        png_row_to_planes(src, wide, width, y, plane, out);
    }
    png_read_end(png, NULL);
    png_destroy_read_struct(&png, &info, NULL);
    free(image);
    free(rows);
    *pixels = out;
    *h = (int)height;
    *w = (int)width;
    return KLVAE_OK;
}

/* ---- JPEG ---- */

typedef struct jpeg_failure {
    struct jpeg_error_mgr base;
    jmp_buf jump;
    char message[JMSG_LENGTH_MAX];
} jpeg_failure;

/* More scans than any encoder writes (progressive JPEGs have about ten):
 * each one costs a pass over the whole image, so a small file of many
 * empty scans could keep the decoder busy for minutes. libjpeg-turbo's own
 * fuzzers use the same limit. */
#define KV_JPEG_MAX_SCANS 500

static void jpeg_error_exit(j_common_ptr cinfo)
{
    jpeg_failure *failure = (jpeg_failure *)cinfo->err;
    cinfo->err->format_message(cinfo, failure->message);
    longjmp(failure->jump, 1);
}

/* libjpeg reports damaged image data only as warnings and goes on, filling
 * what it could not decode with grey: data that ends early, a marker in
 * the middle of a scan, a bad Huffman or arithmetic code, a lost restart
 * marker. Here those are errors. Benign warnings leave every pixel as the
 * encoder meant it: stray bytes between markers, and metadata that cannot
 * be used (an unknown JFIF revision or Adobe transform, a bad ICC marker). */
static bool jpeg_warning_is_benign(int code)
{
#if defined(LIBJPEG_TURBO_VERSION_NUMBER) && LIBJPEG_TURBO_VERSION_NUMBER >= 2000000
    if (code == JWRN_BOGUS_ICC)
        return true;
#endif
    return code == JWRN_EXTRANEOUS_DATA || code == JWRN_ADOBE_XFORM || code == JWRN_JFIF_MAJOR;
}

static void jpeg_emit_message(j_common_ptr cinfo, int level)
{
    if (level >= 0 || jpeg_warning_is_benign(cinfo->err->msg_code))
        return; /* trace messages and benign warnings: silent */
    jpeg_error_exit(cinfo);
}

static void jpeg_limit_scans(j_common_ptr cinfo)
{
    j_decompress_ptr d = (j_decompress_ptr)cinfo;
    if (d->input_scan_number <= KV_JPEG_MAX_SCANS)
        return;
    jpeg_failure *failure = (jpeg_failure *)cinfo->err;
    snprintf(failure->message, sizeof failure->message, "more than %d scans",
             KV_JPEG_MAX_SCANS);
    longjmp(failure->jump, 1);
}

/* One row of RGB or (Adobe, inverted) CMYK samples into row y of the three
 * planes. */
static void jpeg_row_to_planes(const JSAMPLE *row, bool cmyk, unsigned width, unsigned y,
                               size_t plane, float *out)
{
    for (unsigned x = 0; x < width; x++) {
        float rgb[3];
        if (cmyk) {
            /* Adobe writes inverted CMYK: R = C * K / 255. */
            const JSAMPLE *p = row + 4 * x;
            for (int c = 0; c < 3; c++)
                rgb[c] = (float)p[c] * (float)p[3] / 255.0f;
        } else {
            for (int c = 0; c < 3; c++)
                rgb[c] = (float)row[3 * x + (unsigned)c];
        }
        for (int c = 0; c < 3; c++)
            out[(size_t)c * plane + (size_t)y * width + x] = rgb[c] * (2.0f / 255.0f) - 1.0f;
    }
}

/* Reads the header, asks for RGB (or CMYK, converted here) and checks the
 * size: before jpeg_start_decompress, which allocates the coefficients of
 * a whole progressive image. */
static klvae_status_t jpeg_read_size(j_decompress_ptr cinfo, const char *path, uint64_t budget,
                                     bool *cmyk)
{
    jpeg_read_header(cinfo, TRUE);
    *cmyk = cinfo->jpeg_color_space == JCS_CMYK || cinfo->jpeg_color_space == JCS_YCCK;
    cinfo->out_color_space = *cmyk ? JCS_CMYK : JCS_RGB;
    jpeg_calc_output_dimensions(cinfo);
    unsigned width = cinfo->output_width, height = cinfo->output_height;
    if (width > KV_IMAGE_MAX_SIDE || height > KV_IMAGE_MAX_SIDE)
        return kv_error(KLVAE_ERR_FORMAT, "%s: %u x %u is larger than %d on a side", path, width,
                        height, KV_IMAGE_MAX_SIDE);
    return check_pixel_budget(path, width, height, budget);
}

static klvae_status_t read_jpeg(FILE *fp, const char *path, uint64_t budget, float **pixels,
                                int *h, int *w)
{
    struct jpeg_decompress_struct cinfo;
    jpeg_failure failure;
    float *volatile out = NULL;
    JSAMPLE *volatile row = NULL;
    struct jpeg_progress_mgr progress = {.progress_monitor = jpeg_limit_scans};
    cinfo.err = jpeg_std_error(&failure.base);
    failure.base.error_exit = jpeg_error_exit;
    failure.base.emit_message = jpeg_emit_message;
    failure.message[0] = '\0';
    if (setjmp(failure.jump)) {
        jpeg_destroy_decompress(&cinfo);
        free(out);
        free(row);
        const char *why = failure.message; /* without libjpeg's own "Corrupt JPEG data: " */
        if (strncmp(why, "Corrupt JPEG data: ", 19) == 0)
            why += 19;
        return kv_error(KLVAE_ERR_FORMAT, "%s: corrupt JPEG: %s", path, why);
    }
    jpeg_create_decompress(&cinfo);
    cinfo.progress = &progress;
    jpeg_stdio_src(&cinfo, fp);
    bool cmyk;
    klvae_status_t st = jpeg_read_size(&cinfo, path, budget, &cmyk);
    if (st != KLVAE_OK) {
        jpeg_destroy_decompress(&cinfo);
        return st;
    }
    unsigned width = cinfo.output_width, height = cinfo.output_height;
    int comps = cinfo.output_components;
    jpeg_start_decompress(&cinfo);
    size_t plane = (size_t)width * height;
    out = malloc(3 * plane * sizeof(float));
    row = malloc((size_t)width * comps);
    if (!out || !row) {
        jpeg_destroy_decompress(&cinfo);
        free(out);
        free(row);
        return kv_error(KLVAE_ERR_OUT_OF_MEMORY, "out of memory reading %s", path);
    }
    while (cinfo.output_scanline < height) {
        unsigned y = cinfo.output_scanline;
        JSAMPROW rows[1] = {row};
        jpeg_read_scanlines(&cinfo, rows, 1);
        jpeg_row_to_planes(row, cmyk, width, y, plane, out);
    }
    jpeg_finish_decompress(&cinfo);
    jpeg_destroy_decompress(&cinfo);
    free(row);
    *pixels = out;
    *h = (int)height;
    *w = (int)width;
    return KLVAE_OK;
}

/* The size in a PNG's IHDR, through libpng (which checks the signature,
 * the chunk's CRC and the side limits). */
static klvae_status_t png_size(FILE *fp, const char *path, uint64_t budget, int *h, int *w)
{
    png_failure failure;
    failure.message[0] = '\0';
    png_structp png = png_create_read_struct(PNG_LIBPNG_VER_STRING, &failure, png_error_handler,
                                             png_warning_handler);
    png_infop info = png ? png_create_info_struct(png) : NULL;
    if (!png || !info) {
        png_destroy_read_struct(&png, &info, NULL);
        return kv_error(KLVAE_ERR_OUT_OF_MEMORY, "out of memory reading %s", path);
    }
    if (setjmp(failure.jump)) {
        png_destroy_read_struct(&png, &info, NULL);
        return kv_error(KLVAE_ERR_FORMAT, "%s: corrupt PNG: %s", path, failure.message);
    }
    png_init_io(png, fp);
    png_set_user_limits(png, KV_IMAGE_MAX_SIDE, KV_IMAGE_MAX_SIDE);
    png_skip_metadata(png);
    png_read_info(png, info);
    png_uint_32 width = png_get_image_width(png, info);
    png_uint_32 height = png_get_image_height(png, info);
    png_destroy_read_struct(&png, &info, NULL);
    klvae_status_t st = check_pixel_budget(path, width, height, budget);
    if (st == KLVAE_OK) {
        *h = (int)height;
        *w = (int)width;
    }
    return st;
}

/* The size in a JPEG's frame header (the markers before the first scan). */
static klvae_status_t jpeg_size(FILE *fp, const char *path, uint64_t budget, int *h, int *w)
{
    struct jpeg_decompress_struct cinfo;
    jpeg_failure failure;
    cinfo.err = jpeg_std_error(&failure.base);
    failure.base.error_exit = jpeg_error_exit;
    failure.base.emit_message = jpeg_emit_message;
    failure.message[0] = '\0';
    if (setjmp(failure.jump)) {
        jpeg_destroy_decompress(&cinfo);
        const char *why = failure.message;
        if (strncmp(why, "Corrupt JPEG data: ", 19) == 0)
            why += 19;
        return kv_error(KLVAE_ERR_FORMAT, "%s: corrupt JPEG: %s", path, why);
    }
    jpeg_create_decompress(&cinfo);
    jpeg_stdio_src(&cinfo, fp);
    bool cmyk;
    klvae_status_t st = jpeg_read_size(&cinfo, path, budget, &cmyk);
    if (st == KLVAE_OK) {
        *h = (int)cinfo.output_height;
        *w = (int)cinfo.output_width;
    }
    jpeg_destroy_decompress(&cinfo);
    return st;
}

/* Opens path as a regular file and tells PNG from JPEG by the first bytes:
 * 'p' or 'j' with fp positioned at the start, else an error (fp closed). */
static klvae_status_t open_image(const char *path, FILE **out, char *kind)
{
    *out = NULL;
    FILE *fp = fopen(path, "rb");
    if (!fp)
        return kv_error(KLVAE_ERR_IO, "cannot open %s: %s", path, strerror(errno));
    struct stat info;
    if (fstat(fileno(fp), &info) != 0 || !S_ISREG(info.st_mode)) {
        fclose(fp);
        return kv_error(KLVAE_ERR_IO, "%s is not a regular file", path);
    }
    unsigned char magic[8] = {0};
    size_t got = fread(magic, 1, sizeof magic, fp);
    rewind(fp);
    if (got == 8 && png_sig_cmp(magic, 0, 8) == 0) {
        *kind = 'p';
    } else if (got >= 3 && magic[0] == 0xFF && magic[1] == 0xD8 && magic[2] == 0xFF) {
        *kind = 'j';
    } else {
        fclose(fp);
        return kv_error(KLVAE_ERR_FORMAT, "%s is neither a PNG nor a JPEG file%s", path,
                        got == 0 ? " (it is empty)" : "");
    }
    *out = fp;
    return KLVAE_OK;
}

klvae_status_t kv_image_read_size(const char *path, uint64_t max_pixels, int *h, int *w)
{
    *h = 0;
    *w = 0;
    FILE *fp;
    char kind;
    klvae_status_t st = open_image(path, &fp, &kind);
    if (st != KLVAE_OK)
        return st;
    st = kind == 'p' ? png_size(fp, path, max_pixels, h, w) : jpeg_size(fp, path, max_pixels, h, w);
    fclose(fp);
    return st;
}

klvae_status_t kv_image_read(const char *function, const char *path, uint64_t max_pixels,
                             float **pixels, int *h, int *w)
{
    if (pixels)
        *pixels = NULL;
    if (h)
        *h = 0;
    if (w)
        *w = 0;
    if (!path || !pixels || !h || !w)
        return kv_error(KLVAE_ERR_INVALID_ARGUMENT, "%s: %s is NULL", function,
                        !path ? "path" : !pixels ? "pixels" : !h ? "h" : "w");
    FILE *fp;
    char kind;
    klvae_status_t st = open_image(path, &fp, &kind);
    if (st != KLVAE_OK)
        return st;
    if (kind == 'p')
        st = read_png(fp, path, max_pixels, pixels, h, w);
    else
        st = read_jpeg(fp, path, max_pixels, pixels, h, w);
    fclose(fp);
    return st;
}

KLVAE_API klvae_status_t klvae_image_read_opts(const char *path, const klvae_options_t *opts,
                                               float **pixels, int *h, int *w)
{
    kv_error_clear();
    return kv_image_read("klvae_image_read_opts", path,
                         kv_options_uint64(opts, "max_image_pixels"), pixels, h, w);
}

KLVAE_API klvae_status_t klvae_image_read(const char *path, float **pixels, int *h, int *w)
{
    kv_error_clear();
    return kv_image_read("klvae_image_read", path, kv_options_uint64(NULL, "max_image_pixels"),
                         pixels, h, w);
}

KLVAE_API klvae_status_t klvae_image_write_png(const char *path, const float *pixels, int h,
                                               int w)
{
    kv_error_clear();
    if (!path || !pixels)
        return kv_error(KLVAE_ERR_INVALID_ARGUMENT, "klvae_image_write_png: %s is NULL",
                        !path ? "path" : "pixels");
    size_t count;
    if (h <= 0 || w <= 0 || h > KV_IMAGE_MAX_SIDE || w > KV_IMAGE_MAX_SIDE ||
        !kv_numel4(1, 3, h, w, &count))
        return kv_error(KLVAE_ERR_INVALID_ARGUMENT,
                        "klvae_image_write_png: size %d x %d is not between 1 and %d on a side", h,
                        w, KV_IMAGE_MAX_SIDE);
    unsigned char *volatile row = malloc((size_t)w * 3);
    if (!row)
        return kv_error(KLVAE_ERR_OUT_OF_MEMORY, "out of memory writing %s", path);
    kv_atomic_file f;
    klvae_status_t st = kv_atomic_open(&f, path);
    if (st != KLVAE_OK) {
        free(row);
        return st;
    }
    png_failure failure;
    failure.message[0] = '\0';
    png_structp png = png_create_write_struct(PNG_LIBPNG_VER_STRING, &failure, png_error_handler,
                                              png_warning_handler);
    png_infop info = png ? png_create_info_struct(png) : NULL;
    if (!png || !info) {
        png_destroy_write_struct(&png, &info);
        kv_atomic_abort(&f);
        free(row);
        return kv_error(KLVAE_ERR_OUT_OF_MEMORY, "out of memory writing %s", path);
    }
    if (setjmp(failure.jump)) {
        png_destroy_write_struct(&png, &info);
        kv_atomic_abort(&f);
        free(row);
        return kv_error(KLVAE_ERR_IO, "cannot write %s: %s", path, failure.message);
    }
    png_init_io(png, f.fp);
    png_set_IHDR(png, info, (png_uint_32)w, (png_uint_32)h, 8, PNG_COLOR_TYPE_RGB,
                 PNG_INTERLACE_NONE, PNG_COMPRESSION_TYPE_DEFAULT, PNG_FILTER_TYPE_DEFAULT);
    png_write_info(png, info);
    const size_t plane = (size_t)h * w;
    for (int y = 0; y < h; y++) {
        for (int x = 0; x < w; x++) {
            for (int c = 0; c < 3; c++) {
                float v = pixels[(size_t)c * plane + (size_t)y * w + x] * 0.5f + 0.5f;
                v = v > 0.0f ? (v < 1.0f ? v : 1.0f) : 0.0f; /* NaN becomes 0 */
                row[3 * x + c] = (unsigned char)nearbyintf(v * 255.0f);
            }
        }
        png_write_row(png, row);
    }
    png_write_end(png, NULL);
    png_destroy_write_struct(&png, &info);
    free(row);
    return kv_atomic_commit(&f);
}
