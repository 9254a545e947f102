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

/* Operations that answer at once and need no stream state. */
void info_run(uint32_t id);                                                  /* info.c */
void shutdown_run(uint32_t id, const struct json_doc *doc, int request);     /* serve.c */
void console_size_run(uint32_t id, const struct json_doc *doc, int request); /* console.c */
void stat_run(uint32_t id, const struct json_doc *doc, int request);         /* pathops.c */
void mkdir_run(uint32_t id, const struct json_doc *doc, int request);        /* pathops.c */
void resumed_run(uint32_t id, const struct json_doc *doc, int request);      /* resumed.c */

/* End s with ERROR after killing what it runs (a bad frame for an open stream). */
void stream_fail(struct stream *s, const char *code, int err, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));

#endif
