/* A minimal JSON reader and writer for the agent channel's control messages.
 *
 * Reader: json_parse validates a whole document (RFC 8259; depth at most JSON_MAX_DEPTH)
 * and records every value as a token in pre-order, so lookups never rescan the text and
 * never read outside it. Strings are decoded on demand; a lone surrogate \udc80..\udcff
 * stands for the raw byte 0x80..0xff (Python's "surrogateescape"), so strings can carry
 * any bytes but NUL.
 *
 * Writer: appends to a caller's fixed buffer; an overflow is remembered and reported by
 * json_writer_finish, never written past the end. */
#ifndef MICROAGENT_JSON_H
#define MICROAGENT_JSON_H

#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#define JSON_MAX_DEPTH 32

enum json_type { JSON_NULL, JSON_FALSE, JSON_TRUE, JSON_NUMBER, JSON_STRING, JSON_ARRAY,
                 JSON_OBJECT };

struct json_token {
    uint8_t type;
    uint32_t start; /* byte offsets of the value's text; a string's exclude the quotes */
    uint32_t end;
    uint32_t next;  /* the index of the token after this value's subtree */
    uint32_t count; /* array items, or object members (key and value count as one) */
};

struct json_doc {
    const char *text;
    size_t len;
    struct json_token *tokens;
    uint32_t ntokens;
};

/* Parse text[0..len) into doc using tokens[0..max). Returns 0, or -1 with a static
 * message in *error ("malformed JSON at byte N" style text is in error_buf). */
int json_parse(struct json_doc *doc, const char *text, size_t len, struct json_token *tokens,
               uint32_t max, char *error_buf, size_t error_size);

/* The value of key in the object at token obj, or -1 (also when obj is not an object).
 * With duplicate keys the last one wins. */
int json_find(const struct json_doc *doc, int obj, const char *key);

/* The token index of item k of the array at token arr, or -1. */
int json_item(const struct json_doc *doc, int arr, uint32_t k);

/* An integer value (no fraction, no exponent) in [min, max]. Returns 0 or -1. */
int json_int(const struct json_doc *doc, int tok, long long min, long long max,
             long long *out);

/* A boolean value: *out 0 or 1. Returns 0, or -1 when tok is not true or false. */
int json_bool(const struct json_doc *doc, int tok, int *out);

/* Decode the string at tok into out (size bytes, NUL-terminated). Returns its length, or
 * -1 when tok is not a string, holds a NUL, or does not fit. */
ssize_t json_string(const struct json_doc *doc, int tok, char *out, size_t size);

/* The decoded length of the string at tok (without the terminator), or -1. */
ssize_t json_string_length(const struct json_doc *doc, int tok);

struct json_writer {
    char *buf;
    size_t size;
    size_t len;
    int overflow;
    int depth;
    int after_key;                 /* a key was just written: its value takes no comma */
    uint8_t first[JSON_MAX_DEPTH]; /* no member written yet at this depth */
};

void json_writer_init(struct json_writer *w, char *buf, size_t size);
void json_object_begin(struct json_writer *w);
void json_object_end(struct json_writer *w);
void json_array_begin(struct json_writer *w);
void json_array_end(struct json_writer *w);
/* A member's key; the value follows with one of the value calls below. */
void json_key(struct json_writer *w, const char *key);
void json_write_string(struct json_writer *w, const char *s);
void json_write_bytes(struct json_writer *w, const char *s, size_t len);
void json_write_int(struct json_writer *w, long long v);
void json_write_bool(struct json_writer *w, int v);
void json_write_null(struct json_writer *w);
/* The document's length, or -1 when it did not fit. */
ssize_t json_writer_finish(const struct json_writer *w);

#endif
