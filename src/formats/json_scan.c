/* json_scan.c — see json_scan.h. */
#include <stdio.h>
#include <string.h>

#include "formats/json_scan.h"

void kv_json_init(kv_json *j, char *text, size_t len)
{
    j->text = text;
    j->len = len;
    j->at = 0;
    j->error = NULL;
    j->message[0] = '\0';
}

static bool fail(kv_json *j, const char *what)
{
    if (!j->error)
        j->error = what;
    return false;
}

static bool is_digit(char c)
{
    return c >= '0' && c <= '9';
}

char kv_json_peek(kv_json *j)
{
    while (j->at < j->len) {
        char c = j->text[j->at];
        if (c != ' ' && c != '\t' && c != '\n' && c != '\r')
            return c;
        j->at++;
    }
    return '\0';
}

bool kv_json_take(kv_json *j, char c)
{
    if (c == '\0' || j->at >= j->len || kv_json_peek(j) != c)
        return false;
    j->at++;
    return true;
}

bool kv_json_expect(kv_json *j, char c)
{
    if (kv_json_take(j, c))
        return true;
    snprintf(j->message, sizeof j->message, "expected '%c'", c);
    return fail(j, j->message);
}

bool kv_json_at_end(kv_json *j)
{
    kv_json_peek(j);
    return j->at == j->len;
}

/* The length of the valid UTF-8 sequence at s (avail bytes there), or 0:
 * no overlong forms, no surrogates, nothing above U+10FFFF. */
static size_t utf8_sequence(const unsigned char *s, size_t avail)
{
    size_t n;
    uint32_t cp, min;
    if (s[0] >= 0xC2 && s[0] <= 0xDF)
        n = 2, cp = s[0] & 0x1Fu, min = 0x80;
    else if (s[0] >= 0xE0 && s[0] <= 0xEF)
        n = 3, cp = s[0] & 0x0Fu, min = 0x800;
    else if (s[0] >= 0xF0 && s[0] <= 0xF4)
        n = 4, cp = s[0] & 0x07u, min = 0x10000;
    else
        return 0;
    if (avail < n)
        return 0;
    for (size_t i = 1; i < n; i++) {
        if ((s[i] & 0xC0u) != 0x80u)
            return 0;
        cp = cp << 6 | (s[i] & 0x3Fu);
    }
    if (cp < min || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF))
        return 0;
    return n;
}

static size_t utf8_encode(uint32_t cp, char *out)
{
    if (cp < 0x80) {
        out[0] = (char)cp;
        return 1;
    }
    if (cp < 0x800) {
        out[0] = (char)(0xC0 | cp >> 6);
        out[1] = (char)(0x80 | (cp & 0x3F));
        return 2;
    }
    if (cp < 0x10000) {
        out[0] = (char)(0xE0 | cp >> 12);
        out[1] = (char)(0x80 | (cp >> 6 & 0x3F));
        out[2] = (char)(0x80 | (cp & 0x3F));
        return 3;
    }
    out[0] = (char)(0xF0 | cp >> 18);
    out[1] = (char)(0x80 | (cp >> 12 & 0x3F));
    out[2] = (char)(0x80 | (cp >> 6 & 0x3F));
    out[3] = (char)(0x80 | (cp & 0x3F));
    return 4;
}

/* The 4 hex digits at byte pos, as a number. */
static bool hex4(const kv_json *j, size_t pos, uint32_t *out)
{
    if (pos + 4 > j->len)
        return false;
    uint32_t v = 0;
    for (size_t i = pos; i < pos + 4; i++) {
        char c = j->text[i];
        int d = is_digit(c) ? c - '0' : c >= 'a' && c <= 'f' ? c - 'a' + 10
                                      : c >= 'A' && c <= 'F' ? c - 'A' + 10 : -1;
        if (d < 0)
            return false;
        v = v << 4 | (uint32_t)d;
    }
    *out = v;
    return true;
}

/* \uXXXX (at the backslash), with a following low surrogate when it is a
 * high one: the code point. */
static bool unicode_escape(kv_json *j, uint32_t *cp)
{
    if (!hex4(j, j->at + 2, cp))
        return fail(j, "invalid \\u escape");
    j->at += 6;
    if (*cp >= 0xDC00 && *cp <= 0xDFFF)
        return fail(j, "unpaired surrogate in a \\u escape");
    if (*cp >= 0xD800 && *cp <= 0xDBFF) {
        uint32_t low;
        if (j->at + 1 >= j->len || j->text[j->at] != '\\' || j->text[j->at + 1] != 'u' ||
            !hex4(j, j->at + 2, &low) || low < 0xDC00 || low > 0xDFFF)
            return fail(j, "unpaired surrogate in a \\u escape");
        j->at += 6;
        *cp = 0x10000 + ((*cp - 0xD800) << 10) + (low - 0xDC00);
    }
    if (*cp == 0)
        return fail(j, "\\u0000 in a string");
    return true;
}

/* An escape at the backslash, decoded to *w. An escape is never shorter
 * than what it decodes to, so in-place decoding never overtakes reading. */
static bool escape(kv_json *j, char **w)
{
    static const char from[] = "\"\\/bfnrt", to[] = "\"\\/\b\f\n\r\t";
    char e = j->at + 1 < j->len ? j->text[j->at + 1] : '\0';
    const char *hit = e ? strchr(from, e) : NULL;
    if (hit) {
        *(*w)++ = to[hit - from];
        j->at += 2;
        return true;
    }
    if (e != 'u')
        return fail(j, e ? "invalid escape in a string" : "unterminated string");
    uint32_t cp;
    if (!unicode_escape(j, &cp))
        return false;
    *w += utf8_encode(cp, *w);
    return true;
}

bool kv_json_string(kv_json *j, char **out)
{
    if (kv_json_peek(j) != '"')
        return fail(j, "expected a string");
    char *start = j->text + j->at, *w = start; /* written from the opening quote on */
    j->at++;
    for (;;) {
        if (j->at >= j->len)
            return fail(j, "unterminated string");
        unsigned char c = (unsigned char)j->text[j->at];
        if (c == '"') {
            j->at++;
            *w = '\0';
            *out = start;
            return true;
        }
        if (c < 0x20)
            return fail(j, "control character in a string");
        if (c == '\\') {
            if (!escape(j, &w))
                return false;
            continue;
        }
        size_t n = c < 0x80 ? 1
                            : utf8_sequence((const unsigned char *)j->text + j->at, j->len - j->at);
        if (n == 0)
            return fail(j, "invalid UTF-8 in a string");
        memmove(w, j->text + j->at, n);
        w += n;
        j->at += n;
    }
}

static void skip_digits(kv_json *j)
{
    while (j->at < j->len && is_digit(j->text[j->at]))
        j->at++;
}

/* A number at the cursor (after whitespace), by the JSON grammar. */
static bool number(kv_json *j, bool *is_uint, uint64_t *value)
{
    const char *t = j->text;
    bool negative = j->at < j->len && t[j->at] == '-', integer = true, overflow = false;
    uint64_t v = 0;
    j->at += negative;
    if (j->at >= j->len || !is_digit(t[j->at]))
        return fail(j, "invalid number");
    if (t[j->at] == '0') {
        j->at++;
    } else {
        for (; j->at < j->len && is_digit(t[j->at]); j->at++) {
            uint64_t d = (uint64_t)(t[j->at] - '0');
            if (v > (INT64_MAX - d) / 10)
                overflow = true;
            else
                v = v * 10 + d;
        }
    }
    if (j->at < j->len && t[j->at] == '.') {
        integer = false;
        j->at++;
        if (j->at >= j->len || !is_digit(t[j->at]))
            return fail(j, "invalid number");
        skip_digits(j);
    }
    if (j->at < j->len && (t[j->at] == 'e' || t[j->at] == 'E')) {
        integer = false;
        j->at++;
        if (j->at < j->len && (t[j->at] == '+' || t[j->at] == '-'))
            j->at++;
        if (j->at >= j->len || !is_digit(t[j->at]))
            return fail(j, "invalid number");
        skip_digits(j);
    }
    *is_uint = integer && !negative && !overflow;
    *value = v;
    return true;
}

static bool skip_value(kv_json *j, int depth);

/* An object or array at the cursor; depth counts the enclosing ones. */
static bool skip_container(kv_json *j, int depth)
{
    if (depth > KV_JSON_MAX_DEPTH)
        return fail(j, "values nested too deeply");
    const char open = j->text[j->at++], close = open == '{' ? '}' : ']';
    if (kv_json_take(j, close))
        return true;
    do {
        char *key;
        if (open == '{' && (!kv_json_string(j, &key) || !kv_json_expect(j, ':')))
            return false;
        if (!skip_value(j, depth))
            return false;
    } while (kv_json_take(j, ','));
    return kv_json_expect(j, close);
}

static bool skip_value(kv_json *j, int depth)
{
    static const char *const literals[] = {"true", "false", "null"};
    char c = kv_json_peek(j);
    if (c == '"') {
        char *s;
        return kv_json_string(j, &s);
    }
    if (c == '-' || is_digit(c)) {
        bool is_uint;
        uint64_t v;
        return number(j, &is_uint, &v);
    }
    if (c == '{' || c == '[')
        return skip_container(j, depth + 1);
    for (size_t i = 0; i < 3; i++) {
        size_t n = strlen(literals[i]);
        if (j->len - j->at >= n && memcmp(j->text + j->at, literals[i], n) == 0) {
            j->at += n;
            return true;
        }
    }
    return fail(j, "expected a value");
}

bool kv_json_skip(kv_json *j)
{
    return skip_value(j, 0);
}

bool kv_json_uint(kv_json *j, bool *is_uint, uint64_t *value)
{
    char c = kv_json_peek(j);
    *is_uint = false;
    *value = 0;
    if (c == '-' || is_digit(c))
        return number(j, is_uint, value);
    return kv_json_skip(j);
}
