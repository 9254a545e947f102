/* A minimal JSON reader and writer (see json.h). The reader is iterative with an explicit
 * stack, checks every index against the text's length, and keeps no pointers into the
 * text beyond the document's lifetime. */
#include "json.h"

#include <stdio.h>
#include <string.h>

/* --- reader ---------------------------------------------------------------------- */

struct parser {
    const char *s;
    size_t len;
    size_t pos;
    struct json_token *tokens;
    uint32_t max;
    uint32_t n;
    const char *error;
};

static void skip_space(struct parser *p)
{
    while (p->pos < p->len) {
        char c = p->s[p->pos];
        if (c != ' ' && c != '\t' && c != '\n' && c != '\r')
            return;
        p->pos++;
    }
}

static int add_token(struct parser *p, uint8_t type, size_t start)
{
    if (p->n >= p->max) {
        p->error = "too many values";
        return -1;
    }
    struct json_token *t = &p->tokens[p->n];
    t->type = type;
    t->start = (uint32_t)start;
    t->end = (uint32_t)start;
    t->next = p->n + 1;
    t->count = 0;
    return (int)p->n++;
}

static int is_hex(char c)
{
    return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'f') || (c >= 'A' && c <= 'F');
}

static int is_digit(char c)
{
    return c >= '0' && c <= '9';
}

/* At the opening quote: record a string token (text between the quotes). */
static int scan_string(struct parser *p)
{
    size_t start = ++p->pos;
    while (p->pos < p->len) {
        unsigned char c = (unsigned char)p->s[p->pos];
        if (c == '"') {
            int t = add_token(p, JSON_STRING, start);
            if (t < 0)
                return -1;
            p->tokens[t].end = (uint32_t)p->pos;
            p->pos++;
            return t;
        }
        if (c < 0x20) {
            p->error = "control character in a string";
            return -1;
        }
        if (c == '\\') {
            if (p->pos + 1 >= p->len)
                break;
            char e = p->s[p->pos + 1];
            if (e == 'u') {
                if (p->pos + 5 >= p->len)
                    break;
                for (int i = 2; i < 6; i++)
                    if (!is_hex(p->s[p->pos + i])) {
                        p->error = "bad \\u escape";
                        return -1;
                    }
                p->pos += 6;
                continue;
            }
            if (strchr("\"\\/bfnrt", e) == NULL || e == '\0') {
                p->error = "bad escape";
                return -1;
            }
            p->pos += 2;
            continue;
        }
        p->pos++;
    }
    p->error = "unterminated string";
    return -1;
}

static int scan_number(struct parser *p)
{
    size_t start = p->pos;
    if (p->pos < p->len && p->s[p->pos] == '-')
        p->pos++;
    if (p->pos >= p->len || !is_digit(p->s[p->pos]))
        goto bad;
    if (p->s[p->pos] == '0')
        p->pos++;
    else
        while (p->pos < p->len && is_digit(p->s[p->pos]))
            p->pos++;
    if (p->pos < p->len && p->s[p->pos] == '.') {
        p->pos++;
        if (p->pos >= p->len || !is_digit(p->s[p->pos]))
            goto bad;
        while (p->pos < p->len && is_digit(p->s[p->pos]))
            p->pos++;
    }
    if (p->pos < p->len && (p->s[p->pos] == 'e' || p->s[p->pos] == 'E')) {
        p->pos++;
        if (p->pos < p->len && (p->s[p->pos] == '+' || p->s[p->pos] == '-'))
            p->pos++;
        if (p->pos >= p->len || !is_digit(p->s[p->pos]))
            goto bad;
        while (p->pos < p->len && is_digit(p->s[p->pos]))
            p->pos++;
    }
    int t = add_token(p, JSON_NUMBER, start);
    if (t >= 0)
        p->tokens[t].end = (uint32_t)p->pos;
    return t;
bad:
    p->error = "bad number";
    return -1;
}

static int scan_literal(struct parser *p, const char *word, uint8_t type)
{
    size_t n = strlen(word);
    if (p->len - p->pos < n || memcmp(p->s + p->pos, word, n) != 0) {
        p->error = "unexpected character";
        return -1;
    }
    int t = add_token(p, type, p->pos);
    p->pos += n;
    if (t >= 0)
        p->tokens[t].end = (uint32_t)p->pos;
    return t;
}

/* Scan one scalar, or open a container (pushed on the stack by the caller). */
static int scan_value(struct parser *p)
{
    skip_space(p);
    if (p->pos >= p->len) {
        p->error = "unexpected end";
        return -1;
    }
    char c = p->s[p->pos];
    switch (c) {
    case '{':
        p->pos++;
        return add_token(p, JSON_OBJECT, p->pos - 1);
    case '[':
        p->pos++;
        return add_token(p, JSON_ARRAY, p->pos - 1);
    case '"':
        return scan_string(p);
    case 't':
        return scan_literal(p, "true", JSON_TRUE);
    case 'f':
        return scan_literal(p, "false", JSON_FALSE);
    case 'n':
        return scan_literal(p, "null", JSON_NULL);
    default:
        if (c == '-' || is_digit(c))
            return scan_number(p);
        p->error = "unexpected character";
        return -1;
    }
}

static void close_container(struct parser *p, int tok)
{
    p->tokens[tok].end = (uint32_t)p->pos;
    p->tokens[tok].next = p->n;
}

/* After '{' or ',' inside an object: a key, then ':'. Returns 0 or -1. */
static int scan_key(struct parser *p)
{
    skip_space(p);
    if (p->pos >= p->len || p->s[p->pos] != '"') {
        p->error = "expected a key";
        return -1;
    }
    if (scan_string(p) < 0)
        return -1;
    skip_space(p);
    if (p->pos >= p->len || p->s[p->pos] != ':') {
        p->error = "expected ':'";
        return -1;
    }
    p->pos++;
    return 0;
}

static int parse(struct parser *p)
{
    int stack[JSON_MAX_DEPTH];
    int depth = 0;
    int tok = scan_value(p);
    for (;;) {
        if (tok < 0)
            return -1;
        uint8_t type = p->tokens[tok].type;
        if (type == JSON_OBJECT || type == JSON_ARRAY) {
            if (depth == JSON_MAX_DEPTH) {
                p->error = "nested too deeply";
                return -1;
            }
            stack[depth++] = tok;
            skip_space(p);
            char close = type == JSON_OBJECT ? '}' : ']';
            if (p->pos < p->len && p->s[p->pos] == close) {
                p->pos++;
                close_container(p, stack[--depth]);
            } else {
                p->tokens[tok].count = 1;
                if (type == JSON_OBJECT && scan_key(p) < 0)
                    return -1;
                tok = scan_value(p);
                continue;
            }
        }
        /* A value is complete: close every container that ends here. */
        for (;;) {
            if (depth == 0) {
                skip_space(p);
                if (p->pos != p->len) {
                    p->error = "trailing characters";
                    return -1;
                }
                return 0;
            }
            int top = stack[depth - 1];
            int object = p->tokens[top].type == JSON_OBJECT;
            skip_space(p);
            if (p->pos >= p->len) {
                p->error = "unexpected end";
                return -1;
            }
            char c = p->s[p->pos++];
            if (c == ',') {
                p->tokens[top].count++;
                if (object && scan_key(p) < 0)
                    return -1;
                break;
            }
            if (c != (object ? '}' : ']')) {
                p->error = object ? "expected ',' or '}'" : "expected ',' or ']'";
                return -1;
            }
            close_container(p, top);
            depth--;
        }
        tok = scan_value(p);
    }
}

int json_parse(struct json_doc *doc, const char *text, size_t len, struct json_token *tokens,
               uint32_t max, char *error_buf, size_t error_size)
{
    struct parser p = {text, len, 0, tokens, max, 0, NULL};
    doc->text = text;
    doc->len = len;
    doc->tokens = tokens;
    doc->ntokens = 0;
    if (len > UINT32_MAX - 1) {
        snprintf(error_buf, error_size, "document too large");
        return -1;
    }
    if (parse(&p) != 0) {
        snprintf(error_buf, error_size, "malformed JSON at byte %zu: %s", p.pos,
                 p.error != NULL ? p.error : "error");
        return -1;
    }
    doc->ntokens = p.n;
    return 0;
}

static int valid_token(const struct json_doc *doc, int tok)
{
    return tok >= 0 && (uint32_t)tok < doc->ntokens;
}

static unsigned hex_value(char c)
{
    if (c >= '0' && c <= '9')
        return (unsigned)(c - '0');
    if (c >= 'a' && c <= 'f')
        return (unsigned)(c - 'a' + 10);
    return (unsigned)(c - 'A' + 10);
}

static unsigned read_hex4(const char *s)
{
    return hex_value(s[0]) << 12 | hex_value(s[1]) << 8 | hex_value(s[2]) << 4 |
           hex_value(s[3]);
}

/* Append one byte to out if it fits; always count it. */
static void put(char *out, size_t size, size_t *n, char c)
{
    if (out != NULL && *n < size)
        out[*n] = c;
    (*n)++;
}

static int put_utf8(char *out, size_t size, size_t *n, unsigned cp)
{
    if (cp >= 0xdc80 && cp <= 0xdcff) { /* surrogateescape: a raw byte */
        put(out, size, n, (char)(cp - 0xdc00));
    } else if (cp >= 0xd800 && cp <= 0xdfff) {
        return -1;
    } else if (cp < 0x80) {
        put(out, size, n, (char)cp);
    } else if (cp < 0x800) {
        put(out, size, n, (char)(0xc0 | cp >> 6));
        put(out, size, n, (char)(0x80 | (cp & 0x3f)));
    } else if (cp < 0x10000) {
        put(out, size, n, (char)(0xe0 | cp >> 12));
        put(out, size, n, (char)(0x80 | ((cp >> 6) & 0x3f)));
        put(out, size, n, (char)(0x80 | (cp & 0x3f)));
    } else {
        put(out, size, n, (char)(0xf0 | cp >> 18));
        put(out, size, n, (char)(0x80 | ((cp >> 12) & 0x3f)));
        put(out, size, n, (char)(0x80 | ((cp >> 6) & 0x3f)));
        put(out, size, n, (char)(0x80 | (cp & 0x3f)));
    }
    return 0;
}

/* Decode the string token into out (when not NULL); returns the decoded length or -1.
 * The escapes were checked by the parser: \u has 4 hex digits inside the token. */
static ssize_t decode(const struct json_doc *doc, int tok, char *out, size_t size)
{
    if (!valid_token(doc, tok) || doc->tokens[tok].type != JSON_STRING)
        return -1;
    const char *s = doc->text;
    size_t i = doc->tokens[tok].start, end = doc->tokens[tok].end, n = 0;
    while (i < end) {
        char c = s[i];
        if (c != '\\') {
            if (c == '\0')
                return -1;
            put(out, size, &n, c);
            i++;
            continue;
        }
        char e = s[i + 1];
        i += 2;
        switch (e) {
        case 'b': put(out, size, &n, '\b'); break;
        case 'f': put(out, size, &n, '\f'); break;
        case 'n': put(out, size, &n, '\n'); break;
        case 'r': put(out, size, &n, '\r'); break;
        case 't': put(out, size, &n, '\t'); break;
        case 'u': {
            unsigned cp = read_hex4(s + i);
            i += 4;
            if (cp == 0)
                return -1;
            if (cp >= 0xd800 && cp <= 0xdbff) {
                if (i + 6 > end || s[i] != '\\' || s[i + 1] != 'u')
                    return -1;
                unsigned low = read_hex4(s + i + 2);
                if (low < 0xdc00 || low > 0xdfff)
                    return -1;
                cp = 0x10000 + ((cp - 0xd800) << 10) + (low - 0xdc00);
                i += 6;
            }
            if (put_utf8(out, size, &n, cp) != 0)
                return -1;
            break;
        }
        default: put(out, size, &n, e); break; /* " \ / */
        }
    }
    return (ssize_t)n;
}

ssize_t json_string_length(const struct json_doc *doc, int tok)
{
    return decode(doc, tok, NULL, 0);
}

ssize_t json_string(const struct json_doc *doc, int tok, char *out, size_t size)
{
    ssize_t n = decode(doc, tok, out, size);
    if (n < 0 || (size_t)n >= size)
        return -1;
    out[n] = '\0';
    return n;
}

int json_find(const struct json_doc *doc, int obj, const char *key)
{
    if (!valid_token(doc, obj) || doc->tokens[obj].type != JSON_OBJECT)
        return -1;
    int found = -1;
    char name[128];
    uint32_t k = (uint32_t)obj + 1;
    for (uint32_t m = 0; m < doc->tokens[obj].count && k + 1 < doc->ntokens; m++) {
        uint32_t value = k + 1;
        if (json_string(doc, (int)k, name, sizeof(name)) >= 0 && strcmp(name, key) == 0)
            found = (int)value;
        k = doc->tokens[value].next;
    }
    return found;
}

int json_item(const struct json_doc *doc, int arr, uint32_t k)
{
    if (!valid_token(doc, arr) || doc->tokens[arr].type != JSON_ARRAY ||
        k >= doc->tokens[arr].count)
        return -1;
    uint32_t t = (uint32_t)arr + 1;
    for (uint32_t i = 0; i < k && t < doc->ntokens; i++)
        t = doc->tokens[t].next;
    return t < doc->ntokens ? (int)t : -1;
}

int json_bool(const struct json_doc *doc, int tok, int *out)
{
    if (!valid_token(doc, tok) ||
        (doc->tokens[tok].type != JSON_TRUE && doc->tokens[tok].type != JSON_FALSE))
        return -1;
    *out = doc->tokens[tok].type == JSON_TRUE;
    return 0;
}

int json_int(const struct json_doc *doc, int tok, long long min, long long max,
             long long *out)
{
    if (!valid_token(doc, tok) || doc->tokens[tok].type != JSON_NUMBER)
        return -1;
    const char *s = doc->text + doc->tokens[tok].start;
    const char *end = doc->text + doc->tokens[tok].end;
    int negative = 0;
    if (s < end && *s == '-') {
        negative = 1;
        s++;
    }
    if (s == end)
        return -1;
    unsigned long long v = 0;
    for (; s < end; s++) {
        if (!is_digit(*s))
            return -1; /* a fraction or an exponent */
        if (v > (1ULL << 62))
            return -1;
        v = v * 10 + (unsigned)(*s - '0');
    }
    if (v > (1ULL << 62))
        return -1;
    long long value = negative ? -(long long)v : (long long)v;
    if (value < min || value > max)
        return -1;
    *out = value;
    return 0;
}

/* --- writer ---------------------------------------------------------------------- */

void json_writer_init(struct json_writer *w, char *buf, size_t size)
{
    w->buf = buf;
    w->size = size;
    w->len = 0;
    w->overflow = 0;
    w->depth = 0;
    w->after_key = 0;
    w->first[0] = 1;
}

static void emit(struct json_writer *w, const char *s, size_t n)
{
    if (w->overflow || n > w->size - w->len) {
        w->overflow = 1;
        return;
    }
    memcpy(w->buf + w->len, s, n);
    w->len += n;
}

static void emit_char(struct json_writer *w, char c)
{
    emit(w, &c, 1);
}

/* Before a value: a comma unless it is the first in its container (keys handle their
 * own comma; a value right after a key needs none). */
static void before_value(struct json_writer *w, int after_key)
{
    if (after_key)
        return;
    if (!w->first[w->depth])
        emit_char(w, ',');
    w->first[w->depth] = 0;
}

static void value_prefix(struct json_writer *w)
{
    before_value(w, w->after_key);
    w->after_key = 0;
}

static void open_container(struct json_writer *w, char c)
{
    value_prefix(w);
    emit_char(w, c);
    if (w->depth + 1 >= JSON_MAX_DEPTH) {
        w->overflow = 1;
        return;
    }
    w->first[++w->depth] = 1;
}

static void close_container_w(struct json_writer *w, char c)
{
    if (w->depth > 0)
        w->depth--;
    emit_char(w, c);
}

void json_object_begin(struct json_writer *w) { open_container(w, '{'); }
void json_object_end(struct json_writer *w) { close_container_w(w, '}'); }
void json_array_begin(struct json_writer *w) { open_container(w, '['); }
void json_array_end(struct json_writer *w) { close_container_w(w, ']'); }

/* The length of a valid UTF-8 sequence at s (at most n bytes), or 0. */
static size_t utf8_sequence(const unsigned char *s, size_t n)
{
    unsigned cp;
    size_t len;
    if (s[0] >= 0xc2 && s[0] <= 0xdf) {
        len = 2;
        cp = s[0] & 0x1f;
    } else if (s[0] >= 0xe0 && s[0] <= 0xef) {
        len = 3;
        cp = s[0] & 0x0f;
    } else if (s[0] >= 0xf0 && s[0] <= 0xf4) {
        len = 4;
        cp = s[0] & 0x07;
    } else {
        return 0;
    }
    if (len > n)
        return 0;
    for (size_t i = 1; i < len; i++) {
        if ((s[i] & 0xc0) != 0x80)
            return 0;
        cp = cp << 6 | (s[i] & 0x3f);
    }
    if ((len == 3 && (cp < 0x800 || (cp >= 0xd800 && cp <= 0xdfff))) ||
        (len == 4 && (cp < 0x10000 || cp > 0x10ffff)))
        return 0;
    return len;
}

static void emit_string(struct json_writer *w, const char *s, size_t n)
{
    emit_char(w, '"');
    const unsigned char *u = (const unsigned char *)s;
    size_t i = 0;
    while (i < n) {
        unsigned char c = u[i];
        char esc[8];
        if (c == '"' || c == '\\') {
            esc[0] = '\\';
            esc[1] = (char)c;
            emit(w, esc, 2);
            i++;
        } else if (c < 0x20) {
            snprintf(esc, sizeof(esc), "\\u%04x", c);
            emit(w, esc, 6);
            i++;
        } else if (c < 0x80) {
            emit_char(w, (char)c);
            i++;
        } else {
            size_t len = utf8_sequence(u + i, n - i);
            if (len > 0) {
                emit(w, s + i, len);
                i += len;
            } else {
                snprintf(esc, sizeof(esc), "\\udc%02x", c);
                emit(w, esc, 6);
                i++;
            }
        }
    }
    emit_char(w, '"');
}

void json_key(struct json_writer *w, const char *key)
{
    before_value(w, 0);
    emit_string(w, key, strlen(key));
    emit_char(w, ':');
    w->after_key = 1;
}

void json_write_bytes(struct json_writer *w, const char *s, size_t len)
{
    value_prefix(w);
    emit_string(w, s, len);
}

void json_write_string(struct json_writer *w, const char *s)
{
    json_write_bytes(w, s, strlen(s));
}

void json_write_int(struct json_writer *w, long long v)
{
    char num[32];
    value_prefix(w);
    int n = snprintf(num, sizeof(num), "%lld", v);
    emit(w, num, (size_t)n);
}

void json_write_bool(struct json_writer *w, int v)
{
    value_prefix(w);
    emit(w, v ? "true" : "false", v ? 4 : 5);
}

void json_write_null(struct json_writer *w)
{
    value_prefix(w);
    emit(w, "null", 4);
}

ssize_t json_writer_finish(const struct json_writer *w)
{
    return w->overflow ? -1 : (ssize_t)w->len;
}
