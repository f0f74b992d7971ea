/* safetensors.c — see safetensors.h. */
#include <errno.h>
#include <fcntl.h>
#include <jansson.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "base/io.h"
#include "formats/safetensors.h"

#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "libklvae reads safetensors data in place and needs a little-endian host"
#endif

typedef struct dtype_info {
    const char *name;
    int bits;
} dtype_info;

/* Every dtype of the format; only the float ones convert to float32. */
static const dtype_info known_dtypes[] = {
    {"F64", 64},     {"F32", 32},     {"F16", 16},         {"BF16", 16},        {"I64", 64},
    {"I32", 32},     {"I16", 16},     {"I8", 8},           {"U8", 8},           {"BOOL", 8},
    {"U16", 16},     {"U32", 32},     {"U64", 64},         {"C64", 64},         {"F8_E4M3", 8},
    {"F8_E5M2", 8},  {"F8_E8M0", 8},  {"F8_E4M3FNUZ", 8},  {"F8_E5M2FNUZ", 8},  {"F4", 4},
    {"F6_E2M3", 6},  {"F6_E3M2", 6},
};

float kv_half_to_float(uint16_t h)
{
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t exponent = (h >> 10) & 0x1Fu;
    uint32_t mantissa = h & 0x3FFu;
    uint32_t bits;
    if (exponent == 0) {
        if (mantissa == 0) {
            bits = sign;
        } else { /* subnormal: normalise */
            int shift = 0;
            while (!(mantissa & 0x400u)) {
                mantissa <<= 1;
                shift++;
            }
            mantissa &= 0x3FFu;
            bits = sign | ((uint32_t)(127 - 15 + 1 - shift) << 23) | (mantissa << 13);
        }
    } else if (exponent == 31) {
        bits = sign | 0x7F800000u | (mantissa << 13);
    } else {
        bits = sign | ((exponent + 127 - 15) << 23) | (mantissa << 13);
    }
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

static int compare_by_name(const void *a, const void *b)
{
    return strcmp(((const kv_st_tensor *)a)->name, ((const kv_st_tensor *)b)->name);
}

static int compare_by_offset(const void *a, const void *b)
{
    const kv_st_tensor *x = *(const kv_st_tensor *const *)a;
    const kv_st_tensor *y = *(const kv_st_tensor *const *)b;
    if (x->begin != y->begin)
        return x->begin < y->begin ? -1 : 1;
    return x->end < y->end ? -1 : (x->end > y->end ? 1 : 0);
}

void kv_st_close(kv_safetensors *st)
{
    if (st->fd >= 0)
        close(st->fd);
    for (size_t i = 0; i < st->count; i++)
        free(st->tensors[i].name);
    free(st->tensors);
    for (size_t i = 0; i < st->metadata_count; i++) {
        free(st->metadata[i].key);
        free(st->metadata[i].value);
    }
    free(st->metadata);
    free(st->path);
    memset(st, 0, sizeof *st);
    st->fd = -1;
}

static bool json_uint(json_t *v, uint64_t *out)
{
    if (!json_is_integer(v) || json_integer_value(v) < 0)
        return false;
    *out = (uint64_t)json_integer_value(v);
    return true;
}

/* Parses one tensor entry; the message names the tensor. */
static klvae_status_t parse_entry(const kv_safetensors *st, const char *name, json_t *v,
                                  uint64_t data_size, kv_st_tensor *t)
{
    if (!json_is_object(v))
        return kv_error(KLVAE_ERR_FORMAT, "%s: entry '%s' is not an object", st->path, name);
    json_t *dtype = json_object_get(v, "dtype");
    json_t *shape = json_object_get(v, "shape");
    json_t *offsets = json_object_get(v, "data_offsets");
    if (!json_is_string(dtype) || !json_is_array(shape) || !json_is_array(offsets))
        return kv_error(KLVAE_ERR_FORMAT,
                        "%s: tensor '%s' needs a string dtype, a shape list and data_offsets",
                        st->path, name);
    const char *dname = json_string_value(dtype);
    t->bits = 0;
    for (size_t i = 0; i < KV_ARRAY_LEN(known_dtypes); i++)
        if (strcmp(known_dtypes[i].name, dname) == 0) {
            t->bits = known_dtypes[i].bits;
            snprintf(t->dtype, sizeof t->dtype, "%s", dname);
        }
    if (t->bits == 0)
        return kv_error(KLVAE_ERR_FORMAT, "%s: tensor '%s' has unknown dtype '%s'", st->path,
                        name, dname);
    if (json_array_size(shape) > KV_ST_MAX_DIMS)
        return kv_error(KLVAE_ERR_FORMAT, "%s: tensor '%s' has %zu dimensions (at most %d)",
                        st->path, name, json_array_size(shape), KV_ST_MAX_DIMS);
    t->ndim = (int)json_array_size(shape);
    uint64_t numel = 1;
    for (int d = 0; d < t->ndim; d++) {
        uint64_t dim;
        if (!json_uint(json_array_get(shape, (size_t)d), &dim) || dim > ((uint64_t)1 << 62))
            return kv_error(KLVAE_ERR_FORMAT,
                            "%s: tensor '%s' has a shape entry that is not a non-negative integer",
                            st->path, name);
        t->shape[d] = (int64_t)dim;
        if (dim != 0 && numel > (((uint64_t)1 << 62) / dim))
            return kv_error(KLVAE_ERR_FORMAT, "%s: tensor '%s' has an impossibly large shape",
                            st->path, name);
        numel *= dim;
    }
    if (json_array_size(offsets) != 2 || !json_uint(json_array_get(offsets, 0), &t->begin) ||
        !json_uint(json_array_get(offsets, 1), &t->end))
        return kv_error(KLVAE_ERR_FORMAT,
                        "%s: tensor '%s' needs data_offsets [begin, end] of non-negative integers",
                        st->path, name);
    if (t->end < t->begin)
        return kv_error(KLVAE_ERR_FORMAT, "%s: tensor '%s' ends (%llu) before it begins (%llu)",
                        st->path, name, (unsigned long long)t->end, (unsigned long long)t->begin);
    if (numel > UINT64_MAX / (uint64_t)t->bits)
        return kv_error(KLVAE_ERR_FORMAT, "%s: tensor '%s' has an impossibly large shape",
                        st->path, name);
    uint64_t bits = numel * (uint64_t)t->bits;
    if (bits % 8 != 0 || t->end - t->begin != bits / 8)
        return kv_error(KLVAE_ERR_FORMAT,
                        "%s: tensor '%s' of dtype %s and %llu elements needs %llu bytes, but its "
                        "data_offsets [%llu, %llu] hold %llu",
                        st->path, name, t->dtype, (unsigned long long)numel,
                        (unsigned long long)(bits / 8), (unsigned long long)t->begin,
                        (unsigned long long)t->end, (unsigned long long)(t->end - t->begin));
    if (t->end > data_size)
        return kv_error(KLVAE_ERR_FORMAT,
                        "%s: tensor '%s' ends at data byte %llu, past the end of the data (%llu "
                        "bytes): the file is truncated or corrupt",
                        st->path, name, (unsigned long long)t->end,
                        (unsigned long long)data_size);
    return KLVAE_OK;
}

static klvae_status_t parse_metadata(kv_safetensors *st, json_t *meta)
{
    if (!json_is_object(meta))
        return kv_error(KLVAE_ERR_FORMAT, "%s: __metadata__ is not an object", st->path);
    size_t n = json_object_size(meta);
    st->metadata = calloc(n ? n : 1, sizeof *st->metadata);
    if (!st->metadata)
        return kv_error(KLVAE_ERR_OUT_OF_MEMORY, "out of memory reading %s", st->path);
    const char *key;
    json_t *value;
    json_object_foreach(meta, key, value)
    {
        if (!json_is_string(value))
            return kv_error(KLVAE_ERR_FORMAT, "%s: __metadata__ value of '%s' is not a string",
                            st->path, key);
        kv_st_meta *m = &st->metadata[st->metadata_count];
        m->key = kv_strdup(key);
        m->value = kv_strdup(json_string_value(value));
        st->metadata_count++;
        if (!m->key || !m->value)
            return KLVAE_ERR_OUT_OF_MEMORY;
    }
    return KLVAE_OK;
}

static klvae_status_t parse_header(kv_safetensors *st, const char *header, size_t len,
                                   uint64_t data_size)
{
    if (len == 0 || header[0] != '{')
        return kv_error(KLVAE_ERR_FORMAT, "%s: the header does not start with '{'; not a "
                                          "safetensors file",
                        st->path);
    json_error_t jerr;
    json_t *root = json_loadb(header, len, JSON_REJECT_DUPLICATES, &jerr);
    if (!root)
        return kv_error(KLVAE_ERR_FORMAT, "%s: invalid JSON header at byte %d: %s", st->path,
                        jerr.position + 8, jerr.text);
    klvae_status_t status = KLVAE_OK;
    kv_st_tensor **by_offset = NULL;
    if (!json_is_object(root)) {
        status = kv_error(KLVAE_ERR_FORMAT, "%s: the header is not a JSON object", st->path);
        goto done;
    }
    size_t n = json_object_size(root);
    st->tensors = calloc(n ? n : 1, sizeof *st->tensors);
    if (!st->tensors) {
        status = kv_error(KLVAE_ERR_OUT_OF_MEMORY, "out of memory reading %s", st->path);
        goto done;
    }
    const char *key;
    json_t *value;
    json_object_foreach(root, key, value)
    {
        if (strcmp(key, "__metadata__") == 0) {
            status = parse_metadata(st, value);
            if (status != KLVAE_OK)
                goto done;
            continue;
        }
        kv_st_tensor *t = &st->tensors[st->count];
        status = parse_entry(st, key, value, data_size, t);
        if (status != KLVAE_OK)
            goto done;
        t->name = kv_strdup(key);
        if (!t->name) {
            status = KLVAE_ERR_OUT_OF_MEMORY;
            goto done;
        }
        st->count++;
    }
    /* No two byte ranges may overlap. */
    by_offset = malloc((st->count ? st->count : 1) * sizeof *by_offset);
    if (!by_offset) {
        status = kv_error(KLVAE_ERR_OUT_OF_MEMORY, "out of memory reading %s", st->path);
        goto done;
    }
    for (size_t i = 0; i < st->count; i++)
        by_offset[i] = &st->tensors[i];
    qsort(by_offset, st->count, sizeof *by_offset, compare_by_offset);
    const kv_st_tensor *reach = NULL; /* the tensor that ends furthest so far */
    for (size_t i = 0; i < st->count; i++) {
        const kv_st_tensor *b = by_offset[i];
        if (b->end == b->begin)
            continue; /* empty tensors occupy no bytes */
        if (reach && b->begin < reach->end) {
            status = kv_error(KLVAE_ERR_FORMAT,
                              "%s: tensors '%s' [%llu, %llu) and '%s' [%llu, %llu) overlap",
                              st->path, reach->name, (unsigned long long)reach->begin,
                              (unsigned long long)reach->end, b->name,
                              (unsigned long long)b->begin, (unsigned long long)b->end);
            goto done;
        }
        if (!reach || b->end > reach->end)
            reach = b;
    }
    qsort(st->tensors, st->count, sizeof *st->tensors, compare_by_name);
done:
    free(by_offset);
    json_decref(root);
    return status;
}

klvae_status_t kv_st_open(const char *path, kv_safetensors *st)
{
    memset(st, 0, sizeof *st);
    st->fd = -1;
    st->path = kv_strdup(path);
    if (!st->path)
        return KLVAE_ERR_OUT_OF_MEMORY;
    klvae_status_t status = KLVAE_OK;
    char *header = NULL;
    st->fd = open(path, O_RDONLY | O_CLOEXEC);
    if (st->fd < 0) {
        status = kv_error(KLVAE_ERR_IO, "cannot open %s: %s", path, strerror(errno));
        goto fail;
    }
    struct stat info;
    if (fstat(st->fd, &info) != 0 || !S_ISREG(info.st_mode)) {
        status = kv_error(KLVAE_ERR_IO, "%s is not a regular file", path);
        goto fail;
    }
    st->file_size = (uint64_t)info.st_size;
    if (st->file_size < 8) {
        status = kv_error(KLVAE_ERR_FORMAT,
                          "%s: the file is %llu bytes, too short to hold the 8-byte header "
                          "length of a safetensors file",
                          path, (unsigned long long)st->file_size);
        goto fail;
    }
    unsigned char length_bytes[8];
    if (pread(st->fd, length_bytes, 8, 0) != 8) {
        status = kv_error(KLVAE_ERR_IO, "cannot read %s: %s", path, strerror(errno));
        goto fail;
    }
    uint64_t header_len = 0;
    for (int i = 7; i >= 0; i--)
        header_len = (header_len << 8) | length_bytes[i];
    if (header_len > KV_ST_MAX_HEADER) {
        status = kv_error(KLVAE_ERR_FORMAT,
                          "%s: header length %llu is larger than the format's limit of %u bytes",
                          path, (unsigned long long)header_len, KV_ST_MAX_HEADER);
        goto fail;
    }
    if (header_len > st->file_size - 8) {
        status = kv_error(KLVAE_ERR_FORMAT,
                          "%s: header length %llu runs past the end of the file (%llu bytes): "
                          "truncated or not a safetensors file",
                          path, (unsigned long long)header_len,
                          (unsigned long long)st->file_size);
        goto fail;
    }
    header = malloc(header_len + 1);
    if (!header) {
        status = kv_error(KLVAE_ERR_OUT_OF_MEMORY, "out of memory reading the header of %s",
                          path);
        goto fail;
    }
    if (pread(st->fd, header, header_len, 8) != (ssize_t)header_len) {
        status = kv_error(KLVAE_ERR_IO, "cannot read the header of %s", path);
        goto fail;
    }
    header[header_len] = '\0';
    st->data_start = 8 + header_len;
    status = parse_header(st, header, header_len, st->file_size - st->data_start);
    if (status != KLVAE_OK)
        goto fail;
    free(header);
    return KLVAE_OK;
fail:
    free(header);
    kv_st_close(st);
    return status;
}

const kv_st_tensor *kv_st_find(const kv_safetensors *st, const char *name)
{
    kv_st_tensor key;
    key.name = (char *)name;
    return bsearch(&key, st->tensors, st->count, sizeof *st->tensors, compare_by_name);
}

const kv_st_tensor *kv_st_find_prefixed(const kv_safetensors *st, const char *const *prefixes,
                                        size_t count, const char *name)
{
    char full[512];
    for (size_t p = 0; p < count; p++) {
        int len = snprintf(full, sizeof full, "%s%s", prefixes[p], name);
        if (len < 0 || (size_t)len >= sizeof full)
            continue; /* longer than any tensor name we look for */
        const kv_st_tensor *t = kv_st_find(st, full);
        if (t)
            return t;
    }
    return NULL;
}

const char *kv_st_metadata(const kv_safetensors *st, const char *key)
{
    for (size_t i = 0; i < st->metadata_count; i++)
        if (strcmp(st->metadata[i].key, key) == 0)
            return st->metadata[i].value;
    return NULL;
}

size_t kv_st_numel(const kv_st_tensor *t)
{
    size_t n = 1;
    for (int d = 0; d < t->ndim; d++)
        n *= (size_t)t->shape[d];
    return n;
}

static klvae_status_t read_exact(const kv_safetensors *st, const kv_st_tensor *t, void *dst)
{
    size_t bytes = (size_t)(t->end - t->begin);
    size_t done = 0;
    while (done < bytes) {
        ssize_t got = pread(st->fd, (char *)dst + done, bytes - done,
                            (off_t)(st->data_start + t->begin + done));
        if (got < 0 && errno == EINTR)
            continue;
        if (got <= 0)
            return kv_error(KLVAE_ERR_IO, "%s: cannot read tensor '%s': %s", st->path, t->name,
                            got < 0 ? strerror(errno) : "unexpected end of file");
        done += (size_t)got;
    }
    return KLVAE_OK;
}

klvae_status_t kv_st_read_f32(const kv_safetensors *st, const kv_st_tensor *t, float *dst)
{
    size_t n = kv_st_numel(t);
    if (strcmp(t->dtype, "F32") == 0)
        return read_exact(st, t, dst);
    if (strcmp(t->dtype, "F16") == 0 || strcmp(t->dtype, "BF16") == 0) {
        /* The 2-byte values are read into the front of dst and widened from
         * the back, so no second buffer is needed. */
        klvae_status_t status = read_exact(st, t, dst);
        if (status != KLVAE_OK)
            return status;
        const uint16_t *raw = (const uint16_t *)dst;
        bool half = t->dtype[0] == 'F';
        for (size_t i = n; i-- > 0;) {
            uint16_t v = raw[i];
            dst[i] = half ? kv_half_to_float(v) : kv_bf16_to_float(v);
        }
        return KLVAE_OK;
    }
    if (strcmp(t->dtype, "F64") == 0) {
        double *tmp = malloc(n ? n * sizeof(double) : 1);
        if (!tmp)
            return kv_error(KLVAE_ERR_OUT_OF_MEMORY, "out of memory reading '%s'", t->name);
        klvae_status_t status = read_exact(st, t, tmp);
        for (size_t i = 0; status == KLVAE_OK && i < n; i++)
            dst[i] = (float)tmp[i];
        free(tmp);
        return status;
    }
    return kv_error(KLVAE_ERR_UNSUPPORTED,
                    "%s: tensor '%s' has dtype %s; weights must be F32, F16, BF16 or F64",
                    st->path, t->name, t->dtype);
}

klvae_status_t kv_st_write(const char *path, const kv_st_entry *entries, size_t count,
                           const kv_st_meta *metadata, size_t metadata_count,
                           kv_st_fetch_fn fetch, void *ctx, kv_atomic_file *pending)
{
    klvae_status_t status = KLVAE_OK;
    json_t *root = json_object();
    float *buffer = NULL;
    char *text = NULL;
    if (!root)
        return kv_error(KLVAE_ERR_OUT_OF_MEMORY, "out of memory writing %s", path);
    if (metadata_count > 0) {
        json_t *meta = json_object();
        for (size_t i = 0; meta && i < metadata_count; i++)
            json_object_set_new(meta, metadata[i].key, json_string(metadata[i].value));
        json_object_set_new(root, "__metadata__", meta);
    }
    uint64_t offset = 0;
    size_t largest = 1;
    for (size_t i = 0; i < count; i++) {
        const kv_st_entry *e = &entries[i];
        json_t *shape = json_array();
        size_t numel = 1;
        for (int d = 0; d < e->ndim; d++) {
            json_array_append_new(shape, json_integer(e->shape[d]));
            numel *= (size_t)e->shape[d];
        }
        uint64_t bytes = (uint64_t)numel * 4;
        json_t *item = json_pack("{s:s, s:o, s:[I, I]}", "dtype", "F32", "shape", shape,
                                 "data_offsets", (json_int_t)offset,
                                 (json_int_t)(offset + bytes));
        if (!item || json_object_set_new(root, e->name, item) != 0) {
            status = kv_error(KLVAE_ERR_OUT_OF_MEMORY, "out of memory writing %s", path);
            goto done;
        }
        offset += bytes;
        if (numel > largest)
            largest = numel;
    }
    text = json_dumps(root, JSON_COMPACT | JSON_SORT_KEYS);
    buffer = malloc(largest * sizeof(float));
    if (!text || !buffer) {
        status = kv_error(KLVAE_ERR_OUT_OF_MEMORY, "out of memory writing %s", path);
        goto done;
    }
    /* Pad the header with spaces so the data starts 8-byte aligned. */
    size_t header_len = strlen(text);
    size_t padded = (header_len + 7) / 8 * 8;
    unsigned char length_bytes[8];
    for (int i = 0; i < 8; i++)
        length_bytes[i] = (unsigned char)((uint64_t)padded >> (8 * i));
    kv_atomic_file f;
    status = kv_atomic_open(&f, path);
    if (status != KLVAE_OK)
        goto done;
    static const char spaces[8] = "        ";
    if ((status = kv_atomic_write(&f, length_bytes, 8)) != KLVAE_OK ||
        (status = kv_atomic_write(&f, text, header_len)) != KLVAE_OK ||
        (status = kv_atomic_write(&f, spaces, padded - header_len)) != KLVAE_OK)
        goto done;
    for (size_t i = 0; i < count; i++) {
        size_t numel = 1;
        for (int d = 0; d < entries[i].ndim; d++)
            numel *= (size_t)entries[i].shape[d];
        status = fetch(ctx, i, buffer);
        if (status != KLVAE_OK) {
            kv_atomic_abort(&f);
            goto done;
        }
        if ((status = kv_atomic_write(&f, buffer, numel * sizeof(float))) != KLVAE_OK)
            goto done;
    }
    if (pending) {
        status = kv_atomic_finish(&f);
        if (status == KLVAE_OK)
            *pending = f;
    } else {
        status = kv_atomic_commit(&f);
    }
done:
    free(buffer);
    free(text);
    json_decref(root);
    return status;
}
