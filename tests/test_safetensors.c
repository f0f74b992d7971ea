/* test_safetensors.c — the safetensors reader and writer (internal API):
 * round trips, dtype conversion checked against independently computed
 * values, alignment, holes, empty tensors, key order. */
#include <dirent.h>
#include <float.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <unistd.h>

#include "formats/safetensors.h"
#include "test_util.h"

/* ---- helpers ---- */

static uint32_t float_bits(float f)
{
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    return u;
}

static float bits_float(uint32_t u)
{
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

/* Writes a safetensors file: the 8-byte little-endian length of header,
 * header itself, then exactly the given data bytes. */
static void write_st_bytes(const char *path, const char *header, const void *data, size_t len)
{
    size_t hlen = strlen(header);
    unsigned char *buf = malloc(8 + hlen + len + 1);
    ck_assert_ptr_nonnull(buf);
    for (int i = 0; i < 8; i++)
        buf[i] = (unsigned char)((uint64_t)hlen >> (8 * i));
    memcpy(buf + 8, header, hlen);
    if (len)
        memcpy(buf + 8 + hlen, data, len);
    test_write_file(path, buf, 8 + hlen + len);
    free(buf);
}

static void assert_bits_equal(const float *got, const float *want, size_t n, const char *what)
{
    for (size_t i = 0; i < n; i++)
        ck_assert_msg(float_bits(got[i]) == float_bits(want[i]),
                      "%s[%zu]: got 0x%08x (%g), expected 0x%08x (%g)", what, i,
                      float_bits(got[i]), (double)got[i], float_bits(want[i]), (double)want[i]);
}

/* ---- round trip through kv_st_write ---- */

typedef struct rt_tensor {
    const char *name;
    int ndim;
    int64_t shape[KV_ST_MAX_DIMS];
    float *data;
    size_t numel;
} rt_tensor;

typedef struct rt_ctx {
    rt_tensor *tensors;
    int fetched;
    int fail_at; /* index whose fetch fails, or -1 */
} rt_ctx;

static klvae_status_t rt_fetch(void *ctx, size_t index, float *dst)
{
    rt_ctx *c = ctx;
    c->fetched++;
    if ((int)index == c->fail_at)
        return KLVAE_ERR_INTERNAL;
    if (c->tensors[index].numel)
        memcpy(dst, c->tensors[index].data, c->tensors[index].numel * sizeof(float));
    return KLVAE_OK;
}

#define RT_COUNT 6

static void rt_make(rt_tensor t[RT_COUNT], test_rng *rng)
{
    static const struct {
        const char *name;
        int ndim;
        int64_t shape[4];
    } spec[RT_COUNT] = {
        {"encoder.conv_in.weight", 4, {5, 3, 3, 1}},
        {"alpha", 1, {7}},
        {"empty_middle", 3, {4, 0, 3}},
        {"Zed.bias", 2, {1, 11}},
        {"scalar", 0, {0}},
        {"big.odd", 4, {2, 3, 5, 7}},
    };
    for (int i = 0; i < RT_COUNT; i++) {
        t[i].name = spec[i].name;
        t[i].ndim = spec[i].ndim;
        memset(t[i].shape, 0, sizeof t[i].shape);
        size_t n = 1;
        for (int d = 0; d < spec[i].ndim; d++) {
            t[i].shape[d] = spec[i].shape[d];
            n *= (size_t)spec[i].shape[d];
        }
        t[i].numel = n;
        t[i].data = test_alloc(n);
        test_fill(t[i].data, n, rng, -100.0f, 100.0f);
    }
    /* Special bit patterns must survive untouched. */
    float *b = t[5].data;
    b[0] = bits_float(0x7FC12345u); /* NaN with payload */
    b[1] = -0.0f;
    b[2] = INFINITY;
    b[3] = -INFINITY;
    b[4] = bits_float(0x00000001u); /* smallest subnormal */
    b[5] = FLT_MAX;
    b[6] = bits_float(0xFF812345u); /* negative signalling NaN */
}

static void rt_free(rt_tensor t[RT_COUNT])
{
    for (int i = 0; i < RT_COUNT; i++)
        free(t[i].data);
}

START_TEST(write_read_round_trip)
{
    char *dir = test_tmpdir();
    char *path = test_join(dir, "model.safetensors");
    test_rng rng = test_rng_new(11);
    rt_tensor t[RT_COUNT];
    rt_make(t, &rng);
    kv_st_entry entries[RT_COUNT];
    for (int i = 0; i < RT_COUNT; i++) {
        entries[i].name = t[i].name;
        entries[i].ndim = t[i].ndim;
        memcpy(entries[i].shape, t[i].shape, sizeof entries[i].shape);
    }
    kv_st_meta meta[] = {{"format", "pt"}, {"note", "odd \xe2\x98\x83 value, with \"quotes\""}};
    rt_ctx ctx = {t, 0, -1};
    ck_assert_ok(kv_st_write(path, entries, RT_COUNT, meta, 2, rt_fetch, &ctx, NULL));
    ck_assert_int_eq(ctx.fetched, RT_COUNT);

    kv_safetensors st;
    ck_assert_ok(kv_st_open(path, &st));
    ck_assert_uint_eq(st.count, RT_COUNT);
    ck_assert_uint_eq(st.metadata_count, 2);
    ck_assert_str_eq(kv_st_metadata(&st, "format"), "pt");
    ck_assert_str_eq(kv_st_metadata(&st, "note"), meta[1].value);
    ck_assert_ptr_null(kv_st_metadata(&st, "missing"));
    ck_assert_ptr_null(kv_st_find(&st, "__metadata__"));
    ck_assert_ptr_null(kv_st_find(&st, "alph"));
    size_t total_bytes = 0;
    for (int i = 0; i < RT_COUNT; i++) {
        const kv_st_tensor *x = kv_st_find(&st, t[i].name);
        ck_assert_msg(x != NULL, "tensor %s not found", t[i].name);
        ck_assert_str_eq(x->name, t[i].name);
        ck_assert_str_eq(x->dtype, "F32");
        ck_assert_int_eq(x->bits, 32);
        ck_assert_int_eq(x->ndim, t[i].ndim);
        for (int d = 0; d < t[i].ndim; d++)
            ck_assert_int_eq(x->shape[d], t[i].shape[d]);
        ck_assert_uint_eq(kv_st_numel(x), t[i].numel);
        ck_assert_uint_eq(x->end - x->begin, t[i].numel * 4);
        total_bytes += t[i].numel * 4;
        float *got = test_alloc(t[i].numel);
        ck_assert_ok(kv_st_read_f32(&st, x, got));
        assert_bits_equal(got, t[i].data, t[i].numel, t[i].name);
        free(got);
    }
    /* Data starts 8-byte aligned: the header is padded with spaces. */
    ck_assert_uint_eq(st.data_start % 8, 0);
    ck_assert_uint_eq(st.file_size, st.data_start + total_bytes);
    uint64_t data_start = st.data_start;
    kv_st_close(&st);

    size_t len;
    unsigned char *raw = test_read_file(path, &len);
    uint64_t hlen = 0;
    for (int i = 7; i >= 0; i--)
        hlen = (hlen << 8) | raw[i];
    ck_assert_uint_eq(8 + hlen, data_start);
    ck_assert_uint_eq(len, data_start + total_bytes);
    size_t last = 8 + (size_t)hlen;
    while (last > 8 && raw[last - 1] == ' ')
        last--;
    ck_assert_msg(raw[8] == '{' && raw[last - 1] == '}', "header is not a padded JSON object");
    ck_assert_uint_lt(8 + hlen - last, 8); /* at most 7 spaces of padding */
    free(raw);

    int tmp_found;
    ck_assert_int_eq(test_count_entries(dir, &tmp_found), 1);
    ck_assert_int_eq(tmp_found, 0);
    rt_free(t);
    test_rmtree(dir);
    free(path);
    free(dir);
}
END_TEST

START_TEST(write_fetch_failure_leaves_nothing)
{
    char *dir = test_tmpdir();
    char *path = test_join(dir, "model.safetensors");
    test_rng rng = test_rng_new(12);
    rt_tensor t[RT_COUNT];
    rt_make(t, &rng);
    kv_st_entry entries[RT_COUNT];
    for (int i = 0; i < RT_COUNT; i++) {
        entries[i].name = t[i].name;
        entries[i].ndim = t[i].ndim;
        memcpy(entries[i].shape, t[i].shape, sizeof entries[i].shape);
    }
    rt_ctx ctx = {t, 0, 3};
    ck_assert_status(kv_st_write(path, entries, RT_COUNT, NULL, 0, rt_fetch, &ctx, NULL),
                     KLVAE_ERR_INTERNAL);
    struct stat sb;
    ck_assert_int_ne(stat(path, &sb), 0);
    int tmp_found;
    ck_assert_int_eq(test_count_entries(dir, &tmp_found), 0);
    rt_free(t);
    test_rmtree(dir);
    free(path);
    free(dir);
}
END_TEST

START_TEST(write_replaces_existing_file)
{
    char *dir = test_tmpdir();
    char *path = test_join(dir, "w.safetensors");
    test_write_file(path, "old contents that are not safetensors at all, and long", 55);
    float v[3] = {1.5f, -2.25f, 3.125f};
    rt_tensor t = {"v", 1, {3}, v, 3};
    rt_ctx ctx = {&t, 0, -1};
    kv_st_entry e = {"v", 1, {3}};
    ck_assert_ok(kv_st_write(path, &e, 1, NULL, 0, rt_fetch, &ctx, NULL));
    kv_safetensors st;
    ck_assert_ok(kv_st_open(path, &st));
    ck_assert_uint_eq(st.count, 1);
    ck_assert_uint_eq(st.metadata_count, 0);
    float got[3];
    ck_assert_ok(kv_st_read_f32(&st, kv_st_find(&st, "v"), got));
    assert_bits_equal(got, v, 3, "v");
    kv_st_close(&st);
    int tmp_found;
    ck_assert_int_eq(test_count_entries(dir, &tmp_found), 1);
    ck_assert_int_eq(tmp_found, 0);
    test_rmtree(dir);
    free(path);
    free(dir);
}
END_TEST

/* ---- dtype conversion ---- */

/* IEEE binary16 computed from its fields, without kv_half_to_float. */
static float ref_half(uint16_t h)
{
    int sign = h >> 15, e = (h >> 10) & 0x1F, m = h & 0x3FF;
    double v;
    if (e == 0)
        v = ldexp((double)m, -24);
    else if (e == 31)
        v = m ? NAN : INFINITY;
    else
        v = ldexp((double)(1024 + m), e - 25);
    return (float)(sign ? -v : v);
}

/* bfloat16 from its fields, without kv_bf16_to_float. */
static float ref_bf16(uint16_t b)
{
    int sign = b >> 15, e = (b >> 7) & 0xFF, m = b & 0x7F;
    double v;
    if (e == 0)
        v = ldexp((double)m, -133);
    else if (e == 255)
        v = m ? NAN : INFINITY;
    else
        v = ldexp((double)(128 + m), e - 134);
    return (float)(sign ? -v : v);
}

/* Reads tensor name of path into a new array of n floats. */
static float *read_tensor(const char *path, const char *name, size_t n)
{
    kv_safetensors st;
    ck_assert_ok(kv_st_open(path, &st));
    const kv_st_tensor *t = kv_st_find(&st, name);
    ck_assert_ptr_nonnull(t);
    ck_assert_uint_eq(kv_st_numel(t), n);
    float *out = test_alloc(n);
    ck_assert_ok(kv_st_read_f32(&st, t, out));
    kv_st_close(&st);
    return out;
}

/* A file holding one 1-D tensor "t" of dtype with n elements of elem bytes. */
static void write_one_tensor(const char *path, const char *dtype, const void *data, size_t n,
                             size_t elem)
{
    char header[256];
    snprintf(header, sizeof header,
             "{\"t\":{\"dtype\":\"%s\",\"shape\":[%zu],\"data_offsets\":[0,%zu]}}", dtype, n,
             n * elem);
    write_st_bytes(path, header, data, n * elem);
}

START_TEST(f16_known_values)
{
    static const struct {
        uint16_t bits;
        uint32_t want;
    } cases[] = {
        {0x0000, 0x00000000u}, /* +0 */
        {0x8000, 0x80000000u}, /* -0 */
        {0x3C00, 0x3F800000u}, /* 1 */
        {0xBC00, 0xBF800000u}, /* -1 */
        {0x4000, 0x40000000u}, /* 2 */
        {0x3555, 0x3EAAA000u}, /* 0x1.554p-2 */
        {0x5640, 0x42C80000u}, /* 100 */
        {0x3BFF, 0x3F7FE000u}, /* largest below 1 */
        {0x7BFF, 0x477FE000u}, /* max: 65504 */
        {0xFBFF, 0xC77FE000u}, /* -65504 */
        {0x0400, 0x38800000u}, /* smallest normal 2^-14 */
        {0x03FF, 0x387FC000u}, /* largest subnormal */
        {0x0200, 0x38000000u}, /* subnormal 2^-15 */
        {0x0001, 0x33800000u}, /* smallest subnormal 2^-24 */
        {0x8001, 0xB3800000u}, /* -2^-24 */
        {0x0155, 0x37AA8000u}, /* subnormal 341 * 2^-24 */
        {0x7C00, 0x7F800000u}, /* +inf */
        {0xFC00, 0xFF800000u}, /* -inf */
        {0x7E00, 0x7FC00000u}, /* quiet NaN */
        {0xFE00, 0xFFC00000u}, /* negative quiet NaN */
        {0x7E2B, 0x7FC56000u}, /* quiet NaN with payload */
    };
    const size_t n = sizeof cases / sizeof cases[0];
    uint16_t raw[32];
    for (size_t i = 0; i < n; i++)
        raw[i] = cases[i].bits;
    char *dir = test_tmpdir();
    char *path = test_join(dir, "f16.safetensors");
    write_one_tensor(path, "F16", raw, n, 2);
    float *got = read_tensor(path, "t", n);
    for (size_t i = 0; i < n; i++)
        ck_assert_msg(float_bits(got[i]) == cases[i].want,
                      "F16 0x%04x: got 0x%08x (%a), expected 0x%08x", cases[i].bits,
                      float_bits(got[i]), (double)got[i], cases[i].want);
    free(got);
    test_rmtree(dir);
    free(path);
    free(dir);
}
END_TEST

START_TEST(f16_every_bit_pattern)
{
    const size_t n = 65536;
    uint16_t *raw = malloc(n * sizeof *raw);
    ck_assert_ptr_nonnull(raw);
    /* Scrambled order, so that position and value are not the same. */
    for (size_t i = 0; i < n; i++)
        raw[i] = (uint16_t)(i * 40503u + 12345u);
    char *dir = test_tmpdir();
    char *path = test_join(dir, "f16all.safetensors");
    char header[128];
    snprintf(header, sizeof header,
             "{\"t\":{\"dtype\":\"F16\",\"shape\":[256,16,16],\"data_offsets\":[0,%zu]}}", n * 2);
    write_st_bytes(path, header, raw, n * 2);
    float *got = read_tensor(path, "t", n);
    for (size_t i = 0; i < n; i++) {
        uint16_t h = raw[i];
        float want = ref_half(h);
        if (isnan(want)) {
            ck_assert_msg(isnan(got[i]) && !signbit(got[i]) == !(h & 0x8000),
                          "F16 0x%04x: got %a, expected a NaN of the same sign", h,
                          (double)got[i]);
            if (h & 0x0200) /* quiet NaN: the payload widens exactly */
                ck_assert_uint_eq(float_bits(got[i]),
                                  ((uint32_t)(h & 0x8000) << 16) | 0x7F800000u |
                                      ((uint32_t)(h & 0x3FF) << 13));
        } else {
            ck_assert_msg(float_bits(got[i]) == float_bits(want),
                          "F16 0x%04x: got %a, expected %a", h, (double)got[i], (double)want);
        }
    }
    free(got);
    free(raw);
    test_rmtree(dir);
    free(path);
    free(dir);
}
END_TEST

START_TEST(bf16_known_values)
{
    static const struct {
        uint16_t bits;
        uint32_t want;
    } cases[] = {
        {0x0000, 0x00000000u}, /* +0 */
        {0x8000, 0x80000000u}, /* -0 */
        {0x3F80, 0x3F800000u}, /* 1 */
        {0xC000, 0xC0000000u}, /* -2 */
        {0x4049, 0x40490000u}, /* 3.140625 */
        {0x3EAB, 0x3EAB0000u}, /* 0x1.56p-2 */
        {0x7F7F, 0x7F7F0000u}, /* max: 0x1.fep127 */
        {0xFF7F, 0xFF7F0000u}, /* -max */
        {0x0080, 0x00800000u}, /* smallest normal 2^-126 */
        {0x007F, 0x007F0000u}, /* largest subnormal */
        {0x0001, 0x00010000u}, /* smallest subnormal 2^-133 */
        {0x8001, 0x80010000u}, /* -2^-133 */
        {0x7F80, 0x7F800000u}, /* +inf */
        {0xFF80, 0xFF800000u}, /* -inf */
        {0x7FC0, 0x7FC00000u}, /* quiet NaN */
        {0xFFC1, 0xFFC10000u}, /* negative quiet NaN with payload */
    };
    /* The same values, spelled as float literals. */
    const float literal[] = {0.0f,        -0.0f,      1.0f,         -2.0f,
                             3.140625f,   0x1.56p-2f, 0x1.fep127f,  -0x1.fep127f,
                             0x1p-126f,   0x1.fcp-127f, 0x1p-133f,  -0x1p-133f,
                             INFINITY,    -INFINITY};
    const size_t n = sizeof cases / sizeof cases[0];
    uint16_t raw[32];
    for (size_t i = 0; i < n; i++)
        raw[i] = cases[i].bits;
    char *dir = test_tmpdir();
    char *path = test_join(dir, "bf16.safetensors");
    write_one_tensor(path, "BF16", raw, n, 2);
    float *got = read_tensor(path, "t", n);
    for (size_t i = 0; i < n; i++) {
        ck_assert_msg(float_bits(got[i]) == cases[i].want,
                      "BF16 0x%04x: got 0x%08x (%a), expected 0x%08x", cases[i].bits,
                      float_bits(got[i]), (double)got[i], cases[i].want);
        if (i < sizeof literal / sizeof literal[0])
            ck_assert_uint_eq(float_bits(got[i]), float_bits(literal[i]));
    }
    free(got);
    test_rmtree(dir);
    free(path);
    free(dir);
}
END_TEST

START_TEST(bf16_every_bit_pattern)
{
    const size_t n = 65536;
    uint16_t *raw = malloc(n * sizeof *raw);
    ck_assert_ptr_nonnull(raw);
    for (size_t i = 0; i < n; i++)
        raw[i] = (uint16_t)(i * 24571u + 999u);
    char *dir = test_tmpdir();
    char *path = test_join(dir, "bf16all.safetensors");
    write_one_tensor(path, "BF16", raw, n, 2);
    float *got = read_tensor(path, "t", n);
    for (size_t i = 0; i < n; i++) {
        uint16_t b = raw[i];
        float want = ref_bf16(b);
        if (isnan(want)) {
            ck_assert_msg(isnan(got[i]) && !signbit(got[i]) == !(b & 0x8000),
                          "BF16 0x%04x: got %a, expected a NaN of the same sign", b,
                          (double)got[i]);
            if (b & 0x0040)
                ck_assert_uint_eq(float_bits(got[i]), (uint32_t)b << 16);
        } else {
            ck_assert_msg(float_bits(got[i]) == float_bits(want),
                          "BF16 0x%04x: got %a, expected %a", b, (double)got[i], (double)want);
        }
    }
    free(got);
    free(raw);
    test_rmtree(dir);
    free(path);
    free(dir);
}
END_TEST

START_TEST(f64_converts_with_correct_rounding)
{
    /* Expected values written as float literals: round to nearest even,
     * overflow to infinity, underflow through the subnormals to zero. */
    static const struct {
        double in;
        float want;
    } cases[] = {
        {1.0, 1.0f},
        {-0.0, -0.0f},
        {0.1, 0x1.99999ap-4f},
        {-2.5, -2.5f},
        {16777217.0, 16777216.0f}, /* tie, to even */
        {16777219.0, 16777220.0f}, /* tie, to even (upwards) */
        {0x1.fffffep127, 0x1.fffffep127f},
        {0x1.fffffefffffffp127, 0x1.fffffep127f}, /* just below the midpoint */
        {0x1.ffffffp127, INFINITY},               /* the midpoint rounds to 2^128 */
        {DBL_MAX, INFINITY},
        {-DBL_MAX, -INFINITY},
        {0x1.8p-140, 0x1.8p-140f},  /* exact subnormal */
        {0x1.4p-148, 0x1p-148f},    /* 2.5 * 2^-149: tie, to even */
        {0x1.cp-148, 0x1p-147f},    /* 3.5 * 2^-149: tie, to even */
        {0x1.0000000000001p-150, 0x1p-149f},
        {0x1p-150, 0.0f}, /* tie between 0 and 2^-149 */
        {1e-300, 0.0f},
        {-1e-300, -0.0f},
        {INFINITY, INFINITY},
        {-INFINITY, -INFINITY},
        {-12345.678901234567, -12345.6787109375f},
    };
    const size_t n = sizeof cases / sizeof cases[0];
    double raw[32];
    for (size_t i = 0; i < n; i++)
        raw[i] = cases[i].in;
    raw[n] = NAN;
    char *dir = test_tmpdir();
    char *path = test_join(dir, "f64.safetensors");
    write_one_tensor(path, "F64", raw, n + 1, 8);
    float *got = read_tensor(path, "t", n + 1);
    for (size_t i = 0; i < n; i++)
        ck_assert_msg(float_bits(got[i]) == float_bits(cases[i].want),
                      "F64 %a: got %a, expected %a", cases[i].in, (double)got[i],
                      (double)cases[i].want);
    ck_assert(isnan(got[n]));
    free(got);
    test_rmtree(dir);
    free(path);
    free(dir);
}
END_TEST

START_TEST(integer_dtype_opens_but_does_not_convert)
{
    char *dir = test_tmpdir();
    char *path = test_join(dir, "ints.safetensors");
    unsigned char data[24 + 8];
    int64_t ids[3] = {1, -2, 300000000000LL};
    float w[2] = {0.5f, -7.0f};
    memcpy(data, ids, 24);
    memcpy(data + 24, w, 8);
    write_st_bytes(path,
                   "{\"token_ids\":{\"dtype\":\"I64\",\"shape\":[3],\"data_offsets\":[0,24]},"
                   "\"w\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[24,32]}}",
                   data, sizeof data);
    kv_safetensors st;
    ck_assert_ok(kv_st_open(path, &st));
    ck_assert_uint_eq(st.count, 2);
    const kv_st_tensor *t = kv_st_find(&st, "token_ids");
    ck_assert_ptr_nonnull(t);
    ck_assert_str_eq(t->dtype, "I64");
    ck_assert_int_eq(t->bits, 64);
    ck_assert_int_eq(t->ndim, 1);
    ck_assert_int_eq(t->shape[0], 3);
    float out[3];
    ck_assert_status(kv_st_read_f32(&st, t, out), KLVAE_ERR_UNSUPPORTED);
    ck_assert_error_mentions("token_ids");
    ck_assert_error_mentions("I64");
    /* The float tensor next to it still reads. */
    float got[2];
    ck_assert_ok(kv_st_read_f32(&st, kv_st_find(&st, "w"), got));
    assert_bits_equal(got, w, 2, "w");
    kv_st_close(&st);
    test_rmtree(dir);
    free(path);
    free(dir);
}
END_TEST

/* ---- layout ---- */

START_TEST(unaligned_header_and_data)
{
    /* Header of a length that is not a multiple of 8 and tensors that start
     * at odd offsets of the data buffer: nothing may assume alignment. */
    char header[512];
    int hlen;
    int pad = 0;
    for (;;) {
        hlen = snprintf(header, sizeof header,
                        "{\"b\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[0,1]},"
                        "\"x\":{\"dtype\":\"F32\",\"shape\":[3,7],\"data_offsets\":[1,85]},"
                        "\"h\":{\"dtype\":\"F16\",\"shape\":[5],\"data_offsets\":[85,95]},"
                        "\"d\":{\"dtype\":\"F64\",\"shape\":[3],\"data_offsets\":[95,119]}}%*s",
                        pad, "");
        if ((8 + hlen) % 8 == 3)
            break;
        pad++;
    }
    ck_assert_int_ne((8 + hlen) % 8, 0);
    test_rng rng = test_rng_new(5);
    float x[21];
    test_fill(x, 21, &rng, -3.0f, 3.0f);
    uint16_t h[5] = {0x3C00, 0xC500, 0x0001, 0x7BFF, 0x8000};
    const float h_want[5] = {1.0f, -5.0f, 0x1p-24f, 65504.0f, -0.0f};
    double d[3] = {0.25, -1e10, 0.1};
    const float d_want[3] = {0.25f, -1e10f, 0x1.99999ap-4f};
    unsigned char data[119];
    data[0] = 0xAB;
    memcpy(data + 1, x, 84);
    memcpy(data + 85, h, 10);
    memcpy(data + 95, d, 24);
    char *dir = test_tmpdir();
    char *path = test_join(dir, "unaligned.safetensors");
    write_st_bytes(path, header, data, sizeof data);

    kv_safetensors st;
    ck_assert_ok(kv_st_open(path, &st));
    ck_assert_uint_eq(st.data_start, 8 + (uint64_t)hlen);
    ck_assert_uint_eq(st.count, 4);
    float got[21];
    const kv_st_tensor *t = kv_st_find(&st, "x");
    ck_assert_ptr_nonnull(t);
    ck_assert_int_eq(t->ndim, 2);
    ck_assert_int_eq(t->shape[0], 3);
    ck_assert_int_eq(t->shape[1], 7);
    ck_assert_ok(kv_st_read_f32(&st, t, got));
    assert_bits_equal(got, x, 21, "x");
    ck_assert_ok(kv_st_read_f32(&st, kv_st_find(&st, "h"), got));
    assert_bits_equal(got, h_want, 5, "h");
    ck_assert_ok(kv_st_read_f32(&st, kv_st_find(&st, "d"), got));
    assert_bits_equal(got, d_want, 3, "d");
    kv_st_close(&st);
    test_rmtree(dir);
    free(path);
    free(dir);
}
END_TEST

START_TEST(holes_and_empty_tensors_are_accepted)
{
    /* a [0,8), hole [8,16), b [16,28), hole, c [40,44), 4 spare bytes; empty
     * tensors sit inside a, inside b, in the hole and at the very end. */
    float a[2] = {1.25f, -3.5f}, b[3] = {7.0f, 0.0078125f, -1e20f}, c[1] = {42.0f};
    unsigned char data[48];
    memset(data, 0xEE, sizeof data);
    memcpy(data, a, 8);
    memcpy(data + 16, b, 12);
    memcpy(data + 40, c, 4);
    char *dir = test_tmpdir();
    char *path = test_join(dir, "holes.safetensors");
    write_st_bytes(path,
                   "{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]},"
                   "\"e_in_a\":{\"dtype\":\"F32\",\"shape\":[0],\"data_offsets\":[4,4]},"
                   "\"b\":{\"dtype\":\"F32\",\"shape\":[3],\"data_offsets\":[16,28]},"
                   "\"e_in_b\":{\"dtype\":\"F16\",\"shape\":[0,5],\"data_offsets\":[20,20]},"
                   "\"e_hole\":{\"dtype\":\"F32\",\"shape\":[2,0],\"data_offsets\":[8,8]},"
                   "\"e_at_a\":{\"dtype\":\"F32\",\"shape\":[0],\"data_offsets\":[0,0]},"
                   "\"c\":{\"dtype\":\"F32\",\"shape\":[1,1],\"data_offsets\":[40,44]},"
                   "\"e_end\":{\"dtype\":\"F64\",\"shape\":[0],\"data_offsets\":[48,48]}}",
                   data, sizeof data);
    kv_safetensors st;
    ck_assert_ok(kv_st_open(path, &st));
    ck_assert_uint_eq(st.count, 8);
    float got[3];
    ck_assert_ok(kv_st_read_f32(&st, kv_st_find(&st, "a"), got));
    assert_bits_equal(got, a, 2, "a");
    ck_assert_ok(kv_st_read_f32(&st, kv_st_find(&st, "b"), got));
    assert_bits_equal(got, b, 3, "b");
    ck_assert_ok(kv_st_read_f32(&st, kv_st_find(&st, "c"), got));
    assert_bits_equal(got, c, 1, "c");
    static const char *const empties[] = {"e_in_a", "e_in_b", "e_hole", "e_at_a", "e_end"};
    for (size_t i = 0; i < 5; i++) {
        const kv_st_tensor *t = kv_st_find(&st, empties[i]);
        ck_assert_msg(t != NULL, "%s not found", empties[i]);
        ck_assert_uint_eq(kv_st_numel(t), 0);
        ck_assert_uint_eq(t->end, t->begin);
        float sentinel = 99.0f;
        ck_assert_ok(kv_st_read_f32(&st, t, &sentinel));
        ck_assert(sentinel == 99.0f);
    }
    kv_st_close(&st);
    test_rmtree(dir);
    free(path);
    free(dir);
}
END_TEST

START_TEST(lookup_ignores_json_key_order)
{
    /* Keys in no particular order, data in yet another order. */
    float zeta[2] = {1.0f, 2.0f}, alpha[3] = {-3.0f, -4.0f, -5.0f}, mid[1] = {6.5f},
          upper[2] = {7.75f, 8.125f}, under[1] = {-9.0f};
    unsigned char data[36];
    memcpy(data, mid, 4);
    memcpy(data + 4, upper, 8);
    memcpy(data + 12, zeta, 8);
    memcpy(data + 20, under, 4);
    memcpy(data + 24, alpha, 12);
    char *dir = test_tmpdir();
    char *path = test_join(dir, "order.safetensors");
    write_st_bytes(path,
                   "{\"zeta\":{\"data_offsets\":[12,20],\"shape\":[2],\"dtype\":\"F32\"},"
                   "\"__metadata__\":{\"z\":\"last\",\"a\":\"first\"},"
                   "\"alpha\":{\"shape\":[3],\"dtype\":\"F32\",\"data_offsets\":[24,36]},"
                   "\"mid.layer\":{\"dtype\":\"F32\",\"data_offsets\":[0,4],\"shape\":[1]},"
                   "\"Upper\":{\"dtype\":\"F32\",\"shape\":[2,1],\"data_offsets\":[4,12]},"
                   "\"_under\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[20,24]}}",
                   data, sizeof data);
    kv_safetensors st;
    ck_assert_ok(kv_st_open(path, &st));
    ck_assert_uint_eq(st.count, 5);
    static const char *const names[] = {"zeta", "alpha", "mid.layer", "Upper", "_under"};
    const float *want[] = {zeta, alpha, mid, upper, under};
    const size_t sizes[] = {2, 3, 1, 2, 1};
    for (size_t i = 0; i < 5; i++) {
        const kv_st_tensor *t = kv_st_find(&st, names[i]);
        ck_assert_msg(t != NULL, "%s not found", names[i]);
        ck_assert_str_eq(t->name, names[i]);
        ck_assert_uint_eq(kv_st_numel(t), sizes[i]);
        float got[3];
        ck_assert_ok(kv_st_read_f32(&st, t, got));
        assert_bits_equal(got, want[i], sizes[i], names[i]);
    }
    ck_assert_ptr_null(kv_st_find(&st, "Zeta"));
    ck_assert_ptr_null(kv_st_find(&st, "mid"));
    ck_assert_ptr_null(kv_st_find(&st, ""));
    ck_assert_str_eq(kv_st_metadata(&st, "a"), "first");
    ck_assert_str_eq(kv_st_metadata(&st, "z"), "last");
    kv_st_close(&st);
    test_rmtree(dir);
    free(path);
    free(dir);
}
END_TEST

/* ---- reader validation (internal API) ---- */

START_TEST(open_rejects_shape_whose_byte_count_overflows)
{
    /* 2^59 float32 elements are 2^61 bytes; a byte count computed in bits
     * wraps to 0 and would make data_offsets [0, 0] look right. */
    char *dir = test_tmpdir();
    char *path = test_join(dir, "huge.safetensors");
    write_st_bytes(path,
                   "{\"huge\":{\"dtype\":\"F32\",\"shape\":[576460752303423488],"
                   "\"data_offsets\":[0,0]}}",
                   "", 0);
    kv_safetensors st;
    klvae_status_t status = kv_st_open(path, &st);
    if (status == KLVAE_OK)
        kv_st_close(&st);
    char message[1024];
    snprintf(message, sizeof message, "%s", klvae_last_error());
    bool names_path = strstr(message, path) != NULL;
    /* Clean up before asserting, so that a failure leaks nothing. */
    test_rmtree(dir);
    free(path);
    free(dir);
    ck_assert_msg(status == KLVAE_ERR_FORMAT, "kv_st_open returned %d, expected %d: %s",
                  (int)status, (int)KLVAE_ERR_FORMAT, message);
    ck_assert_msg(names_path && strstr(message, "'huge'"), "message \"%s\"", message);
}
END_TEST

START_TEST(open_rejects_two_dim_shape_whose_byte_count_overflows)
{
    /* 2^31 x 2^31 F64 elements: 2^68 bits, which wrap to 0 in 64 bits. */
    char *dir = test_tmpdir();
    char *path = test_join(dir, "huge2.safetensors");
    write_st_bytes(path,
                   "{\"big\":{\"dtype\":\"F64\",\"shape\":[2147483648,2147483648],"
                   "\"data_offsets\":[0,0]}}",
                   "", 0);
    kv_safetensors st;
    klvae_status_t status = kv_st_open(path, &st);
    if (status == KLVAE_OK)
        kv_st_close(&st);
    char message[1024];
    snprintf(message, sizeof message, "%s", klvae_last_error());
    test_rmtree(dir);
    free(path);
    free(dir);
    ck_assert_msg(status == KLVAE_ERR_FORMAT, "kv_st_open returned %d, expected %d: %s",
                  (int)status, (int)KLVAE_ERR_FORMAT, message);
    ck_assert_msg(strstr(message, "'big'") != NULL, "message \"%s\" does not name 'big'",
                  message);
}
END_TEST

START_TEST(open_message_starts_with_path)
{
    char *dir = test_tmpdir();
    char *path = test_join(dir, "bad.safetensors");
    write_st_bytes(path, "{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,4]}}",
                   "abcd", 4);
    kv_safetensors st;
    klvae_status_t status = kv_st_open(path, &st);
    if (status == KLVAE_OK)
        kv_st_close(&st);
    ck_assert_status(status, KLVAE_ERR_FORMAT);
    ck_assert_msg(strncmp(klvae_last_error(), path, strlen(path)) == 0,
                  "message \"%s\" does not start with %s", klvae_last_error(), path);
    ck_assert_error_mentions("'a'");
    test_rmtree(dir);
    free(path);
    free(dir);
}
END_TEST

/* ---- header size and parse cost ---- */

/* Opens path expecting KLVAE_ERR_FORMAT with a message that starts with
 * the path and contains what; st must come back closed. */
static void expect_open_failure(const char *path, const char *what)
{
    kv_safetensors st;
    klvae_status_t status = kv_st_open(path, &st);
    if (status == KLVAE_OK)
        kv_st_close(&st);
    ck_assert_msg(status == KLVAE_ERR_FORMAT, "kv_st_open(%s) returned %d, expected %d: %s", path,
                  (int)status, (int)KLVAE_ERR_FORMAT, klvae_last_error());
    ck_assert_msg(strncmp(klvae_last_error(), path, strlen(path)) == 0,
                  "message \"%s\" does not start with %s", klvae_last_error(), path);
    ck_assert_error_mentions(what);
    ck_assert_ptr_null(st.tensors);
    ck_assert_ptr_null(st.metadata);
    ck_assert_uint_eq(st.count, 0);
    ck_assert_int_eq(st.fd, -1);
}

/* Writes a file whose header is head, fill_len bytes of fill, then tail
 * (so a 90 MB header needs no 90 MB buffer), followed by data_len zero
 * bytes of data (a hole: no disk is written for them). */
static void write_st_stream(const char *path, const char *head, char fill, uint64_t fill_len,
                            const char *tail, uint64_t data_len)
{
    uint64_t hlen = strlen(head) + fill_len + strlen(tail);
    FILE *fp = fopen(path, "wb");
    ck_assert_ptr_nonnull(fp);
    unsigned char length[8];
    for (int i = 0; i < 8; i++)
        length[i] = (unsigned char)(hlen >> (8 * i));
    ck_assert_uint_eq(fwrite(length, 1, 8, fp), 8);
    fputs(head, fp);
    static char block[65536];
    memset(block, fill, sizeof block);
    for (uint64_t left = fill_len; left > 0;) {
        size_t n = left < sizeof block ? (size_t)left : sizeof block;
        ck_assert_uint_eq(fwrite(block, 1, n, fp), n);
        left -= n;
    }
    fputs(tail, fp);
    ck_assert_int_eq(fflush(fp), 0);
    ck_assert_int_eq(ftruncate(fileno(fp), (off_t)(8 + hlen + data_len)), 0);
    fclose(fp);
}

static long peak_rss_kb(void)
{
    struct rusage r;
    getrusage(RUSAGE_SELF, &r);
    return r.ru_maxrss;
}

START_TEST(open_refuses_a_header_far_larger_than_its_data)
{
    /* A valid 90,000,000-byte header (under the format's 100 MB limit) for
     * one 4-byte tensor: a string of 'x' in the metadata. It used to be read
     * and parsed whole (a jansson tree: 27 s and 1.7 GB for 87.5 MB of
     * entries); it must be refused before its bytes are even read. */
    char *dir = test_tmpdir();
    char *path = test_join(dir, "bloated.safetensors");
    const char *head = "{\"t\":{\"dtype\":\"U8\",\"shape\":[4],\"data_offsets\":[0,4]},"
                       "\"__metadata__\":{\"pad\":\"";
    const char *tail = "\"}}";
    uint64_t fill = 90000000u - strlen(head) - strlen(tail);
    write_st_stream(path, head, 'x', fill, tail, 4);
    long before = peak_rss_kb();
    expect_open_failure(path, "the header is 90000000 bytes but the tensor data only 4");
    long grew_kb = peak_rss_kb() - before;
    test_rmtree(dir);
    free(path);
    free(dir);
    ck_assert_msg(grew_kb < 32 * 1024, "refusing the header raised the peak RSS by %ld kB", grew_kb);
}
END_TEST

START_TEST(open_refuses_a_header_padded_beyond_its_tensors)
{
    /* Enough data (128 KiB) to pass the first check, but a 2 MiB header for
     * one tensor: refused after the (linear) parse, by the per-tensor
     * allowance. */
    char *dir = test_tmpdir();
    char *path = test_join(dir, "padded.safetensors");
    const char *head = "{\"t\":{\"dtype\":\"U8\",\"shape\":[131072],\"data_offsets\":[0,131072]}}";
    write_st_stream(path, head, ' ', 2097152 - strlen(head), "", 131072);
    expect_open_failure(path, "the header is 2097152 bytes for 1 tensor, more than they can need");
    test_rmtree(dir);
    free(path);
    free(dir);
}
END_TEST

START_TEST(header_allowance_is_exact)
{
    /* A header of exactly 1 MiB plus 16 bytes a data byte loads; one byte
     * more is refused before it is read. An odd data size, small enough for
     * the per-tensor allowance of the one tensor. */
    test_rng rng = test_rng_new(21);
    const uint64_t data = 100 + (uint64_t)(test_uniform(&rng) * 150);
    const uint64_t allowed = KV_ST_HEADER_SLACK + KV_ST_HEADER_PER_DATA_BYTE * data;
    char head[160];
    snprintf(head, sizeof head, "{\"t\":{\"dtype\":\"U8\",\"shape\":[%llu],\"data_offsets\":[0,%llu]}}",
             (unsigned long long)data, (unsigned long long)data);
    char *dir = test_tmpdir();
    char *path = test_join(dir, "edge.safetensors");
    write_st_stream(path, head, ' ', allowed - strlen(head), "", data);
    kv_safetensors st;
    ck_assert_ok(kv_st_open(path, &st));
    ck_assert_uint_eq(st.count, 1);
    ck_assert_uint_eq(st.data_start, 8 + allowed);
    kv_st_close(&st);
    write_st_stream(path, head, ' ', allowed + 1 - strlen(head), "", data);
    char want[96];
    snprintf(want, sizeof want, "the header is %llu bytes but the tensor data only %llu",
             (unsigned long long)(allowed + 1), (unsigned long long)data);
    expect_open_failure(path, want);
    test_rmtree(dir);
    free(path);
    free(dir);
}
END_TEST

/* Appends a random name to buf: ASCII, escapes and multi-byte UTF-8; the
 * decoded name goes to name. */
static void random_name(test_rng *rng, size_t index, char *json, char *name)
{
    static const char *const pieces[][2] = {
        {"layer", "layer"}, {".", "."}, {"_w", "_w"}, {"\\u00e9", "\xc3\xa9"},
        {"\\\"", "\""}, {"\\n", "\n"}, {"\xe2\x98\x83", "\xe2\x98\x83"},
        {"\\ud83d\\ude00", "\xf0\x9f\x98\x80"}, {"\\/", "/"}, {"Z", "Z"},
    };
    int n = 1 + (int)(test_uniform(rng) * 6);
    json[0] = name[0] = '\0';
    for (int i = 0; i < n; i++) {
        size_t k = (size_t)(test_uniform(rng) * 10);
        strcat(json, pieces[k][0]);
        strcat(name, pieces[k][1]);
    }
    char suffix[24];
    snprintf(suffix, sizeof suffix, "#%zu", index); /* names stay distinct */
    strcat(json, suffix);
    strcat(name, suffix);
}

START_TEST(many_tensors_with_odd_names_load)
{
    /* 12,000 small tensors with random names, dtypes, shapes and an
     * unknown key each, laid out in random order; then every one is found
     * with its own dtype, shape and byte range. */
    enum { N = 12000 };
    test_rng rng = test_rng_new(22);
    static const char *const dtypes[] = {"U8", "F16", "F32", "I64"};
    static const int bytes_of[] = {1, 2, 4, 8};
    size_t *order = malloc(N * sizeof *order);
    char (*names)[128] = malloc(N * sizeof *names);
    int *kind = malloc(N * sizeof *kind), *dim = malloc(N * sizeof *dim);
    uint64_t *begin = malloc(N * sizeof *begin);
    char *header = malloc((size_t)N * 256 + 64);
    ck_assert(order && names && kind && dim && begin && header);
    for (size_t i = 0; i < N; i++)
        order[i] = i;
    for (size_t i = N - 1; i > 0; i--) { /* data in another order than the keys */
        size_t k = (size_t)(test_uniform(&rng) * (double)(i + 1));
        size_t t = order[i];
        order[i] = order[k];
        order[k] = t;
    }
    uint64_t offset = 0;
    for (size_t i = 0; i < N; i++) {
        size_t t = order[i];
        kind[t] = (int)(test_uniform(&rng) * 4);
        dim[t] = 1 + (int)(test_uniform(&rng) * 3);
        begin[t] = offset;
        offset += (uint64_t)(bytes_of[kind[t]] * dim[t]);
    }
    size_t len = (size_t)sprintf(header, "{\"__metadata__\":{\"format\":\"pt\"}");
    for (size_t i = 0; i < N; i++) {
        char json[128];
        random_name(&rng, i, json, names[i]);
        len += (size_t)sprintf(header + len,
                               ",\n \"%s\": {\"shape\": [%d], \"extra\": {\"a\": [1.5e3, null, "
                               "true]}, \"dtype\": \"%s\", \"data_offsets\": [%llu, %llu]}",
                               json, dim[i], dtypes[kind[i]], (unsigned long long)begin[i],
                               (unsigned long long)(begin[i] + (uint64_t)(bytes_of[kind[i]] * dim[i])));
    }
    strcpy(header + len, "}");
    char *dir = test_tmpdir();
    char *path = test_join(dir, "many.safetensors");
    write_st_stream(path, header, ' ', 0, "", offset);
    kv_safetensors st;
    ck_assert_ok(kv_st_open(path, &st));
    ck_assert_uint_eq(st.count, N);
    ck_assert_str_eq(kv_st_metadata(&st, "format"), "pt");
    for (size_t i = 0; i < N; i++) {
        const kv_st_tensor *t = kv_st_find(&st, names[i]);
        ck_assert_msg(t != NULL, "tensor %zu (%s) not found", i, names[i]);
        ck_assert_str_eq(t->dtype, dtypes[kind[i]]);
        ck_assert_int_eq(t->ndim, 1);
        ck_assert_int_eq(t->shape[0], dim[i]);
        ck_assert_uint_eq(t->begin, begin[i]);
    }
    kv_st_close(&st);
    test_rmtree(dir);
    free(path);
    free(dir);
    free(header);
    free(begin);
    free(dim);
    free(kind);
    free(names);
    free(order);
}
END_TEST

START_TEST(malformed_headers_are_refused)
{
    /* Each header is wrong in one way; the message says which. */
    static const struct {
        const char *header, *mentions;
    } cases[] = {
        {"{\"a\xff\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[0,1]}}", "UTF-8"},
        {"{\"a\xc0\xaf\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[0,1]}}", "UTF-8"},
        {"{\"a\xed\xa0\x80\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[0,1]}}", "UTF-8"},
        {"{\"a\tb\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[0,1]}}", "control character"},
        {"{\"a\\ud800\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[0,1]}}", "surrogate"},
        {"{\"a\\udc00x\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[0,1]}}", "surrogate"},
        {"{\"a\\u0000\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[0,1]}}", "\\u0000"},
        {"{\"a\\q\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[0,1]}}", "invalid escape"},
        {"{\"a\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[0,1]}}x", "text after"},
        {"{\"a\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[0,1]},}", "expected a string"},
        {"{\"a\":{\"dtype\":\"U8\",\"shape\":[01],\"data_offsets\":[0,1]}}", "expected ']'"},
        {"{\"a\":{\"dtype\":\"U8\",\"shape\":[1.0],\"data_offsets\":[0,1]}}", "non-negative"},
        {"{\"a\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[-0,1]}}", "data_offsets"},
        {"{\"a\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[0,1,1]}}", "data_offsets"},
        {"{\"a\":{\"dtype\":\"U8\",\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[0,1]}}",
         "duplicate key 'dtype'"},
        {"{\"__metadata__\":{},\"__metadata__\":{}}", "duplicate key '__metadata__'"},
        {"{\"__metadata__\":{\"k\":\"1\",\"j\":\"2\",\"k\":\"3\"}}", "duplicate key 'k'"},
        {"{\"__metadata__\":{\"k\":1}}", "value of 'k' is not a string"},
        {"{\"a\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[0,1],\"x\":tru}}",
         "expected a value"},
        {"{\"a\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[0,1],\"x\":\"open", "unterminated"},
    };
    char *dir = test_tmpdir();
    char *path = test_join(dir, "bad.safetensors");
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        write_st_bytes(path, cases[i].header, "abcdefgh", 8);
        expect_open_failure(path, cases[i].mentions);
    }
    test_rmtree(dir);
    free(path);
    free(dir);
}
END_TEST

START_TEST(deep_nesting_is_refused_without_recursing)
{
    /* 200,000 nested arrays in an unknown key: a recursive reader without a
     * depth limit runs out of stack. */
    enum { DEPTH = 200000 };
    const char *head = "{\"a\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[0,1],\"x\":";
    size_t hlen = strlen(head);
    char *header = malloc(hlen + 2 * DEPTH + 3);
    ck_assert_ptr_nonnull(header);
    memcpy(header, head, hlen);
    memset(header + hlen, '[', DEPTH);
    memset(header + hlen + DEPTH, ']', DEPTH);
    strcpy(header + hlen + 2 * DEPTH, "}}");
    char *dir = test_tmpdir();
    char *path = test_join(dir, "deep.safetensors");
    write_st_stream(path, header, ' ', 0, "", 2 * DEPTH);
    free(header);
    expect_open_failure(path, "nested too deeply");
    test_rmtree(dir);
    free(path);
    free(dir);
}
END_TEST

START_TEST(escaped_names_decode)
{
    float v[2] = {1.5f, -2.0f};
    char *dir = test_tmpdir();
    char *path = test_join(dir, "names.safetensors");
    write_st_bytes(path,
                   "{\"caf\\u00e9 \\ud83d\\ude00\\t\\\"q\\\"\":{\"dtype\":\"F32\",\"shape\":[2],"
                   "\"data_offsets\":[0,8]},\"__metadata__\":{\"k\\/e\\u0079\":\"v\\\\al\"}}",
                   v, sizeof v);
    kv_safetensors st;
    ck_assert_ok(kv_st_open(path, &st));
    const kv_st_tensor *t = kv_st_find(&st, "caf\xc3\xa9 \xf0\x9f\x98\x80\t\"q\"");
    ck_assert_ptr_nonnull(t);
    float got[2];
    ck_assert_ok(kv_st_read_f32(&st, t, got));
    assert_bits_equal(got, v, 2, "escaped");
    ck_assert_str_eq(kv_st_metadata(&st, "k/ey"), "v\\al");
    kv_st_close(&st);
    test_rmtree(dir);
    free(path);
    free(dir);
}
END_TEST

Suite *suite_safetensors(void)
{
    Suite *s = suite_create("safetensors");
    TCase *tc = tcase_create("write");
    tcase_add_test(tc, write_read_round_trip);
    tcase_add_test(tc, write_fetch_failure_leaves_nothing);
    tcase_add_test(tc, write_replaces_existing_file);
    suite_add_tcase(s, tc);
    tc = tcase_create("dtypes");
    tcase_add_test(tc, f16_known_values);
    tcase_add_test(tc, f16_every_bit_pattern);
    tcase_add_test(tc, bf16_known_values);
    tcase_add_test(tc, bf16_every_bit_pattern);
    tcase_add_test(tc, f64_converts_with_correct_rounding);
    tcase_add_test(tc, integer_dtype_opens_but_does_not_convert);
    suite_add_tcase(s, tc);
    tc = tcase_create("layout");
    tcase_add_test(tc, unaligned_header_and_data);
    tcase_add_test(tc, holes_and_empty_tensors_are_accepted);
    tcase_add_test(tc, lookup_ignores_json_key_order);
    suite_add_tcase(s, tc);
    tc = tcase_create("validation");
    tcase_add_test(tc, open_rejects_shape_whose_byte_count_overflows);
    tcase_add_test(tc, open_rejects_two_dim_shape_whose_byte_count_overflows);
    tcase_add_test(tc, open_message_starts_with_path);
    suite_add_tcase(s, tc);
    tc = tcase_create("header");
    tcase_set_timeout(tc, 60);
    tcase_add_test(tc, open_refuses_a_header_far_larger_than_its_data);
    tcase_add_test(tc, open_refuses_a_header_padded_beyond_its_tensors);
    tcase_add_test(tc, header_allowance_is_exact);
    tcase_add_test(tc, many_tensors_with_odd_names_load);
    tcase_add_test(tc, malformed_headers_are_refused);
    tcase_add_test(tc, deep_nesting_is_refused_without_recursing);
    tcase_add_test(tc, escaped_names_decode);
    suite_add_tcase(s, tc);
    return s;
}
