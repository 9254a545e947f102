/* The operations a stream can run (OPEN's "op"), each in its own file. */
#ifndef MICROAGENT_OPS_H
#define MICROAGENT_OPS_H

#include "json.h"
#include "streams.h"

/* Each returns 0 when the stream is now open (s->ops and s->state set), or -1 after
 * answering with ERROR, or with EXIT when it was done at once (the slot is then free
 * again). */
int exec_open(struct stream *s, const struct json_doc *doc, int request);   /* exec.c */
int put_open(struct stream *s, const struct json_doc *doc, int request);    /* files.c */
int get_open(struct stream *s, const struct json_doc *doc, int request);    /* files.c */
int list_open(struct stream *s, const struct json_doc *doc, int request);   /* listing.c */
int remove_open(struct stream *s, const struct json_doc *doc, int request); /* remove.c */

int spawn_open(struct stream *s, const struct json_doc *doc, int request);      /* procops.c */
int proc_read_open(struct stream *s, const struct json_doc *doc, int request);  /* procops.c */
int proc_write_open(struct stream *s, const struct json_doc *doc, int request); /* procops.c */

/* Operations that answer at once and need no stream state. */
void info_run(uint32_t id);                                                  /* info.c */
void shutdown_run(uint32_t id, const struct json_doc *doc, int request);     /* serve.c */
void console_size_run(uint32_t id, const struct json_doc *doc, int request); /* console.c */
void stat_run(uint32_t id, const struct json_doc *doc, int request);         /* pathops.c */
void mkdir_run(uint32_t id, const struct json_doc *doc, int request);        /* pathops.c */
void resumed_run(uint32_t id, const struct json_doc *doc, int request);      /* resumed.c */
void procs_run(uint32_t id, const struct json_doc *doc, int request);        /* procops.c */
void proc_signal_run(uint32_t id, const struct json_doc *doc, int request);  /* procops.c */

/* Shared by exec and spawn (exec.c): a NULL-terminated copy of an array of strings in one
 * allocation, or NULL; an optional string member ("" when missing or null), -1 when it
 * is not a string or does not fit. */
char **string_array(const struct json_doc *doc, int arr);

/* What exec and spawn run: argv, env (NULL: none given), cwd and user ("" when not
 * given; static buffers, valid until the next call). */
struct command {
    char **argv, **env;
    char *cwd, *user;
};

/* Parse the request's "argv", "env", "cwd" and "user"; NULL, or what is wrong. On a
 * failure the arrays parsed so far are in c (for the caller to free, as before). */
const char *command_parse(const struct json_doc *doc, int req, struct command *c);
int optional_string(const struct json_doc *doc, int req, const char *key, char *out,
                    size_t size);

/* End s with ERROR after killing what it runs (a bad frame for an open stream). */
void stream_fail(struct stream *s, const char *code, int err, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));

#endif
