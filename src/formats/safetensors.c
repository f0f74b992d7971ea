/* safetensors.c — see safetensors.h. */
#include <errno.h>
#include <fcntl.h>
#include <jansson.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "base/io.h"
#include "formats/json_scan.h"
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

static int compare_meta(const void *a, const void *b)
{
    return strcmp(((const kv_st_meta *)a)->key, ((const kv_st_meta *)b)->key);
}

static klvae_status_t json_failure(const kv_json *j, const kv_safetensors *st)
{
    return kv_error(KLVAE_ERR_FORMAT, "%s: invalid JSON header at byte %llu: %s", st->path,
                    (unsigned long long)(8 + j->at), j->error ? j->error : "malformed");
}

/* One tensor's fields as the header spells them, before they are checked. */
typedef struct raw_entry {
    const char *dtype; /* NULL: absent or not a string */
    bool seen[3];      /* dtype, shape, data_offsets */
    bool shape_is_list, shape_ok, offsets_is_list, offsets_ok;
    size_t ndim, noffsets; /* items in the lists (only the first ones are kept) */
    uint64_t shape[KV_ST_MAX_DIMS], offsets[2];
} raw_entry;

/* A list of non-negative integers: keeps at most max of them in items and
 * counts them all. Any other value is skipped with *is_list false. */
static bool read_uint_list(kv_json *j, uint64_t *items, size_t max, size_t *count, bool *is_list,
                           bool *all_uint)
{
    *count = 0;
    *all_uint = true;
    *is_list = kv_json_peek(j) == '[';
    if (!*is_list)
        return kv_json_skip(j);
    kv_json_take(j, '[');
    if (kv_json_take(j, ']'))
        return true;
    do {
        bool is_uint;
        uint64_t v;
        if (!kv_json_uint(j, &is_uint, &v))
            return false;
        *all_uint = *all_uint && is_uint;
        if (*count < max)
            items[*count] = v;
        (*count)++;
    } while (kv_json_take(j, ','));
    return kv_json_expect(j, ']');
}

/* The value of tensor name: an object with dtype, shape and data_offsets
 * (other keys are skipped, as the reference reader does). */
static klvae_status_t read_entry(kv_json *j, const kv_safetensors *st, const char *name,
                                 raw_entry *e)
{
    static const char *const fields[3] = {"dtype", "shape", "data_offsets"};
    memset(e, 0, sizeof *e);
    if (kv_json_peek(j) != '{')
        return kv_error(KLVAE_ERR_FORMAT, "%s: entry '%s' is not an object", st->path, name);
    kv_json_take(j, '{');
    if (kv_json_take(j, '}'))
        return KLVAE_OK;
    do {
        char *key;
        if (!kv_json_string(j, &key) || !kv_json_expect(j, ':'))
            return json_failure(j, st);
        int f = 0;
        while (f < 3 && strcmp(key, fields[f]) != 0)
            f++;
        if (f < 3 && e->seen[f])
            return kv_error(KLVAE_ERR_FORMAT, "%s: tensor '%s' has a duplicate key '%s'",
                            st->path, name, key);
        bool ok;
        if (f == 0 && kv_json_peek(j) == '"')
            ok = kv_json_string(j, (char **)&e->dtype);
        else if (f == 1)
            ok = read_uint_list(j, e->shape, KV_ST_MAX_DIMS, &e->ndim, &e->shape_is_list,
                                &e->shape_ok);
        else if (f == 2)
            ok = read_uint_list(j, e->offsets, 2, &e->noffsets, &e->offsets_is_list,
                                &e->offsets_ok);
        else
            ok = kv_json_skip(j);
        if (!ok)
            return json_failure(j, st);
        if (f < 3)
            e->seen[f] = true;
    } while (kv_json_take(j, ','));
    return kv_json_expect(j, '}') ? KLVAE_OK : json_failure(j, st);
}

/* The dtype's bits per element, or 0 when the format has no such dtype. */
static int dtype_bits(const char *name)
{
    for (size_t i = 0; i < KV_ARRAY_LEN(known_dtypes); i++)
        if (strcmp(known_dtypes[i].name, name) == 0)
            return known_dtypes[i].bits;
    return 0;
}

/* Checks the shape of e into t; the message names the tensor. */
static klvae_status_t check_shape(const kv_safetensors *st, const char *name, const raw_entry *e,
                                  kv_st_tensor *t, uint64_t *numel)
{
    if (e->ndim > KV_ST_MAX_DIMS)
        return kv_error(KLVAE_ERR_FORMAT, "%s: tensor '%s' has %zu dimensions (at most %d)",
                        st->path, name, e->ndim, KV_ST_MAX_DIMS);
    t->ndim = (int)e->ndim;
    *numel = 1;
    for (int d = 0; d < t->ndim; d++) {
        uint64_t dim = e->shape[d];
        if (!e->shape_ok || dim > ((uint64_t)1 << 62))
            return kv_error(KLVAE_ERR_FORMAT,
                            "%s: tensor '%s' has a shape entry that is not a non-negative integer",
                            st->path, name);
        t->shape[d] = (int64_t)dim;
        if (dim != 0 && *numel > (((uint64_t)1 << 62) / dim))
            return kv_error(KLVAE_ERR_FORMAT, "%s: tensor '%s' has an impossibly large shape",
                            st->path, name);
        *numel *= dim;
    }
    if (*numel > UINT64_MAX / (uint64_t)t->bits)
        return kv_error(KLVAE_ERR_FORMAT, "%s: tensor '%s' has an impossibly large shape",
                        st->path, name);
    return KLVAE_OK;
}

/* Checks e and fills t: a known dtype, a shape whose bytes fill exactly
 * its data_offsets, inside the data buffer. */
static klvae_status_t check_entry(const kv_safetensors *st, const char *name, const raw_entry *e,
                                  uint64_t data_size, kv_st_tensor *t)
{
    if (!e->dtype || !e->shape_is_list || !e->offsets_is_list)
        return kv_error(KLVAE_ERR_FORMAT,
                        "%s: tensor '%s' needs a string dtype, a shape list and data_offsets",
                        st->path, name);
    t->bits = dtype_bits(e->dtype);
    if (t->bits == 0)
        return kv_error(KLVAE_ERR_FORMAT, "%s: tensor '%s' has unknown dtype '%s'", st->path,
                        name, e->dtype);
    snprintf(t->dtype, sizeof t->dtype, "%s", e->dtype);
    uint64_t numel = 0;
    klvae_status_t status = check_shape(st, name, e, t, &numel);
    if (status != KLVAE_OK)
        return status;
    if (e->noffsets != 2 || !e->offsets_ok)
        return kv_error(KLVAE_ERR_FORMAT,
                        "%s: tensor '%s' needs data_offsets [begin, end] of non-negative integers",
                        st->path, name);
    t->begin = e->offsets[0];
    t->end = e->offsets[1];
    if (t->end < t->begin)
        return kv_error(KLVAE_ERR_FORMAT, "%s: tensor '%s' ends (%llu) before it begins (%llu)",
                        st->path, name, (unsigned long long)t->end, (unsigned long long)t->begin);
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

/* Makes room for one more item in a growing array (doubling: linear). */
static bool grow(void **items, size_t count, size_t *cap, size_t size)
{
    if (count < *cap)
        return true;
    size_t want = *cap ? 2 * *cap : 64;
    void *bigger = want <= SIZE_MAX / size ? realloc(*items, want * size) : NULL;
    if (!bigger)
        return false;
    *items = bigger;
    *cap = want;
    return true;
}

/* Tensor name's entry, appended to st->tensors. */
static klvae_status_t parse_tensor(kv_json *j, kv_safetensors *st, const char *name,
                                   uint64_t data_size, size_t *cap)
{
    raw_entry e;
    klvae_status_t status = read_entry(j, st, name, &e);
    if (status != KLVAE_OK)
        return status;
    if (!grow((void **)&st->tensors, st->count, cap, sizeof *st->tensors))
        return kv_error(KLVAE_ERR_OUT_OF_MEMORY, "out of memory reading %s", st->path);
    kv_st_tensor *t = &st->tensors[st->count];
    memset(t, 0, sizeof *t);
    status = check_entry(st, name, &e, data_size, t);
    if (status != KLVAE_OK)
        return status;
    t->name = kv_strdup(name);
    if (!t->name)
        return KLVAE_ERR_OUT_OF_MEMORY;
    st->count++;
    return KLVAE_OK;
}

/* __metadata__: an object of strings. */
static klvae_status_t parse_metadata(kv_json *j, kv_safetensors *st)
{
    if (kv_json_peek(j) != '{')
        return kv_error(KLVAE_ERR_FORMAT, "%s: __metadata__ is not an object", st->path);
    kv_json_take(j, '{');
    if (kv_json_take(j, '}'))
        return KLVAE_OK;
    size_t cap = 0;
    do {
        char *key, *value;
        if (!kv_json_string(j, &key) || !kv_json_expect(j, ':'))
            return json_failure(j, st);
        if (kv_json_peek(j) != '"')
            return kv_error(KLVAE_ERR_FORMAT, "%s: __metadata__ value of '%s' is not a string",
                            st->path, key);
        if (!kv_json_string(j, &value))
            return json_failure(j, st);
        if (!grow((void **)&st->metadata, st->metadata_count, &cap, sizeof *st->metadata))
            return kv_error(KLVAE_ERR_OUT_OF_MEMORY, "out of memory reading %s", st->path);
        kv_st_meta *m = &st->metadata[st->metadata_count++]; /* kv_st_close frees both */
        m->key = kv_strdup(key);
        m->value = kv_strdup(value);
        if (!m->key || !m->value)
            return KLVAE_ERR_OUT_OF_MEMORY;
    } while (kv_json_take(j, ','));
    return kv_json_expect(j, '}') ? KLVAE_OK : json_failure(j, st);
}

/* The top-level object: tensors and at most one __metadata__. */
static klvae_status_t parse_root(kv_json *j, kv_safetensors *st, uint64_t data_size)
{
    kv_json_take(j, '{');
    size_t cap = 0;
    bool saw_metadata = false;
    if (!kv_json_take(j, '}')) {
        do {
            char *key;
            if (!kv_json_string(j, &key) || !kv_json_expect(j, ':'))
                return json_failure(j, st);
            klvae_status_t status;
            if (strcmp(key, "__metadata__") != 0)
                status = parse_tensor(j, st, key, data_size, &cap);
            else if (saw_metadata)
                status = kv_error(KLVAE_ERR_FORMAT, "%s: duplicate key '__metadata__'", st->path);
            else
                status = parse_metadata(j, st);
            saw_metadata = saw_metadata || strcmp(key, "__metadata__") == 0;
            if (status != KLVAE_OK)
                return status;
        } while (kv_json_take(j, ','));
        if (!kv_json_expect(j, '}'))
            return json_failure(j, st);
    }
    if (!kv_json_at_end(j)) {
        j->error = "text after the header's object";
        return json_failure(j, st);
    }
    return KLVAE_OK;
}

/* Sorts tensors and metadata by name for lookups; no name twice. */
static klvae_status_t sort_and_check_names(kv_safetensors *st)
{
    /* (qsort and bsearch take no NULL array, even empty) */
    if (st->count > 1)
        qsort(st->tensors, st->count, sizeof *st->tensors, compare_by_name);
    for (size_t i = 1; i < st->count; i++)
        if (strcmp(st->tensors[i - 1].name, st->tensors[i].name) == 0)
            return kv_error(KLVAE_ERR_FORMAT, "%s: duplicate tensor name '%s'", st->path,
                            st->tensors[i].name);
    if (st->metadata_count > 1)
        qsort(st->metadata, st->metadata_count, sizeof *st->metadata, compare_meta);
    for (size_t i = 1; i < st->metadata_count; i++)
        if (strcmp(st->metadata[i - 1].key, st->metadata[i].key) == 0)
            return kv_error(KLVAE_ERR_FORMAT, "%s: duplicate key '%s' in __metadata__", st->path,
                            st->metadata[i].key);
    return KLVAE_OK;
}

/* No two byte ranges may overlap. */
static klvae_status_t check_overlaps(const kv_safetensors *st)
{
    const kv_st_tensor **by_offset = malloc((st->count ? st->count : 1) * sizeof *by_offset);
    if (!by_offset)
        return kv_error(KLVAE_ERR_OUT_OF_MEMORY, "out of memory reading %s", st->path);
    for (size_t i = 0; i < st->count; i++)
        by_offset[i] = &st->tensors[i];
    qsort(by_offset, st->count, sizeof *by_offset, compare_by_offset);
    klvae_status_t status = KLVAE_OK;
    const kv_st_tensor *reach = NULL; /* the tensor that ends furthest so far */
    for (size_t i = 0; i < st->count && status == KLVAE_OK; i++) {
        const kv_st_tensor *b = by_offset[i];
        if (b->end == b->begin)
            continue; /* empty tensors occupy no bytes */
        if (reach && b->begin < reach->end)
            status = kv_error(KLVAE_ERR_FORMAT,
                              "%s: tensors '%s' [%llu, %llu) and '%s' [%llu, %llu) overlap",
                              st->path, reach->name, (unsigned long long)reach->begin,
                              (unsigned long long)reach->end, b->name,
                              (unsigned long long)b->begin, (unsigned long long)b->end);
        if (!reach || b->end > reach->end)
            reach = b;
    }
    free(by_offset);
    return status;
}

/* Parses the header (decoded in place: it is the caller's scratch copy).
 * One pass, linear in its length, memory for the entries it holds. */
static klvae_status_t parse_header(kv_safetensors *st, char *header, size_t len,
                                   uint64_t data_size)
{
    if (len == 0 || header[0] != '{')
        return kv_error(KLVAE_ERR_FORMAT, "%s: the header does not start with '{'; not a "
                                          "safetensors file",
                        st->path);
    kv_json j;
    kv_json_init(&j, header, len);
    klvae_status_t status = parse_root(&j, st, data_size);
    if (status != KLVAE_OK)
        return status;
    /* A real entry is 100-200 bytes: a header beyond this is padding. */
    uint64_t need = KV_ST_HEADER_SLACK + (uint64_t)KV_ST_HEADER_PER_TENSOR * st->count;
    if (len > need)
        return kv_error(KLVAE_ERR_FORMAT,
                        "%s: the header is %zu bytes for %zu tensor%s, more than they can need "
                        "(at most %llu: %u bytes plus %u a tensor)",
                        st->path, len, st->count, st->count == 1 ? "" : "s",
                        (unsigned long long)need, KV_ST_HEADER_SLACK, KV_ST_HEADER_PER_TENSOR);
    status = sort_and_check_names(st);
    return status != KLVAE_OK ? status : check_overlaps(st);
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
    /* Refused before anything its size is allocated or read: a header far
     * larger than the data it describes (safetensors.h says how far). */
    uint64_t data_size = st->file_size - 8 - header_len;
    if (header_len > KV_ST_HEADER_SLACK + (uint64_t)KV_ST_HEADER_PER_DATA_BYTE * data_size) {
        status = kv_error(KLVAE_ERR_FORMAT,
                          "%s: the header is %llu bytes but the tensor data only %llu; no real "
                          "file needs more than %u bytes plus %u a data byte: corrupt or not a "
                          "safetensors file",
                          path, (unsigned long long)header_len, (unsigned long long)data_size,
                          KV_ST_HEADER_SLACK, KV_ST_HEADER_PER_DATA_BYTE);
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
    if (st->count == 0)
        return NULL;
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
    if (st->metadata_count == 0)
        return NULL;
    kv_st_meta probe;
    probe.key = (char *)key;
    const kv_st_meta *m =
        bsearch(&probe, st->metadata, st->metadata_count, sizeof *st->metadata, compare_meta);
    return m ? m->value : NULL;
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

bool kv_st_is_float(const kv_st_tensor *t)
{
    return strcmp(t->dtype, "F32") == 0 || strcmp(t->dtype, "F16") == 0 ||
           strcmp(t->dtype, "BF16") == 0 || strcmp(t->dtype, "F64") == 0;
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

int kv_st_dtype_bits(const char *dtype)
{
    return dtype_bits(dtype);
}

/* The header of kv_st_write_raw as compact JSON text (sorted keys), with
 * each tensor's byte count in sizes. */
static klvae_status_t raw_header(const char *path, const kv_st_raw *tensors, size_t count,
                                 const kv_st_meta *metadata, size_t metadata_count,
                                 uint64_t *sizes, char **text)
{
    *text = NULL;
    json_t *root = json_object();
    if (!root)
        return kv_error(KLVAE_ERR_OUT_OF_MEMORY, "out of memory writing %s", path);
    bool ok = true;
    if (metadata_count > 0) {
        json_t *meta = json_object();
        ok = meta && json_object_set_new(root, "__metadata__", meta) == 0;
        for (size_t i = 0; ok && i < metadata_count; i++)
            ok = json_object_set_new(meta, metadata[i].key, json_string(metadata[i].value)) == 0;
    }
    uint64_t offset = 0;
    for (size_t i = 0; ok && i < count; i++) {
        const kv_st_raw *t = &tensors[i];
        int bits = dtype_bits(t->dtype);
        if (bits == 0 || bits % 8 != 0 || t->ndim < 0 || t->ndim > KV_ST_MAX_DIMS) {
            json_decref(root);
            return kv_error(KLVAE_ERR_INVALID_ARGUMENT, "%s: tensor '%s' has dtype '%s' or %d "
                            "dimensions, which cannot be written", path, t->name, t->dtype,
                            t->ndim);
        }
        json_t *shape = json_array();
        uint64_t numel = 1;
        for (int d = 0; shape && d < t->ndim; d++) {
            json_array_append_new(shape, json_integer(t->shape[d]));
            numel *= (uint64_t)t->shape[d];
        }
        sizes[i] = numel * (uint64_t)(bits / 8);
        json_t *item = shape ? json_pack("{s:s, s:o, s:[I, I]}", "dtype", t->dtype, "shape",
                                         shape, "data_offsets", (json_int_t)offset,
                                         (json_int_t)(offset + sizes[i]))
                             : NULL;
        ok = item && json_object_set_new(root, t->name, item) == 0;
        offset += sizes[i];
    }
    *text = ok ? json_dumps(root, JSON_COMPACT | JSON_SORT_KEYS) : NULL;
    json_decref(root);
    if (!*text)
        return kv_error(KLVAE_ERR_OUT_OF_MEMORY, "out of memory writing %s", path);
    return KLVAE_OK;
}

/* The header lists the tensors by name (sorted keys), but their offsets
 * follow the caller's order, and so does the data. */
klvae_status_t kv_st_write_raw(const char *path, const kv_st_raw *tensors, size_t count,
                               const kv_st_meta *metadata, size_t metadata_count)
{
    uint64_t *sizes = calloc(count ? count : 1, sizeof *sizes);
    if (!sizes)
        return kv_error(KLVAE_ERR_OUT_OF_MEMORY, "out of memory writing %s", path);
    char *text = NULL;
    klvae_status_t status =
        raw_header(path, tensors, count, metadata, metadata_count, sizes, &text);
    if (status != KLVAE_OK) {
        free(sizes);
        return status;
    }
    size_t header_len = strlen(text);
    size_t padded = (header_len + 7) / 8 * 8;
    unsigned char length_bytes[8];
    for (int i = 0; i < 8; i++)
        length_bytes[i] = (unsigned char)((uint64_t)padded >> (8 * i));
    static const char spaces[8] = "        ";
    kv_atomic_file f;
    status = kv_atomic_open(&f, path);
    if (status == KLVAE_OK && (status = kv_atomic_write(&f, length_bytes, 8)) == KLVAE_OK &&
        (status = kv_atomic_write(&f, text, header_len)) == KLVAE_OK)
        status = kv_atomic_write(&f, spaces, padded - header_len);
    for (size_t i = 0; status == KLVAE_OK && i < count; i++)
        status = kv_atomic_write(&f, tensors[i].data, (size_t)sizes[i]);
    if (status == KLVAE_OK)
        status = kv_atomic_commit(&f);
    free(text);
    free(sizes);
    return status;
}
