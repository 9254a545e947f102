/* The open streams and OPEN dispatch. Streams live in a fixed table; an ended stream's
 * slot is released only by streams_sweep at the end of a loop iteration. */
#include "streams.h"

#include "channel.h"
#include "clock.h"
#include "log.h"
#include "ops.h"

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>

static struct stream table[MAX_STREAMS];
static uint32_t highest_id; /* the highest id ever opened on this connection */
static struct json_token tokens[MAX_PAYLOAD / 2 + 2];

static struct stream *find(uint32_t id)
{
    for (int i = 0; i < MAX_STREAMS; i++)
        if (table[i].used && !table[i].ended && table[i].id == id)
            return &table[i];
    return NULL;
}

static struct stream *free_slot(void)
{
    for (int i = 0; i < MAX_STREAMS; i++)
        if (!table[i].used)
            return &table[i];
    return NULL;
}

int streams_count(void)
{
    int n = 0;
    for (int i = 0; i < MAX_STREAMS; i++)
        n += table[i].used && !table[i].ended;
    return n;
}

void stream_no_watch(struct stream *s)
{
    (void)s;
}

void stream_no_tick(struct stream *s, long long now)
{
    (void)s;
    (void)now;
}

int stream_no_child(struct stream *s, pid_t pid, int status)
{
    (void)s;
    (void)pid;
    (void)status;
    return 0;
}

void stream_end(struct stream *s)
{
    s->ended = 1;
}

void stream_fail(struct stream *s, const char *code, int err, const char *fmt, ...)
{
    char message[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(message, sizeof(message), fmt, ap);
    va_end(ap);
    if (!s->ended)
        s->ops->cancel(s, 1);
    channel_send_error(s->id, code, err, "%s", message);
    stream_end(s);
}

void streams_open(uint32_t id, const uint8_t *payload, size_t len)
{
    if (id == 0) {
        channel_send_error(0, "EPROTO", 0, "OPEN on stream 0");
        return;
    }
    if (id > highest_id)
        highest_id = id;
    struct stream *existing = find(id);
    if (existing != NULL) {
        stream_fail(existing, "EPROTO", 0, "OPEN for stream %u, which is already open", id);
        return;
    }
    struct json_doc doc;
    char error[128];
    if (json_parse(&doc, (const char *)payload, len, tokens,
                   sizeof(tokens) / sizeof(tokens[0]), error, sizeof(error)) != 0) {
        channel_send_error(id, "EPROTO", 0, "OPEN: %s", error);
        return;
    }
    char op[32];
    if (doc.tokens[0].type != JSON_OBJECT ||
        json_string(&doc, json_find(&doc, 0, "op"), op, sizeof(op)) < 0) {
        channel_send_error(id, "EINVAL", 0, "OPEN: a JSON object with a string \"op\" expected");
        return;
    }
    if (strcmp(op, "info") == 0) {
        info_run(id);
        return;
    }
    if (strcmp(op, "shutdown") == 0) {
        shutdown_run(id, &doc, 0);
        return;
    }
    if (strcmp(op, "console_size") == 0) {
        console_size_run(id, &doc, 0);
        return;
    }
    if (strcmp(op, "stat") == 0) {
        stat_run(id, &doc, 0);
        return;
    }
    if (strcmp(op, "mkdir") == 0) {
        mkdir_run(id, &doc, 0);
        return;
    }
    if (strcmp(op, "resumed") == 0) {
        resumed_run(id, &doc, 0);
        return;
    }
    if (strcmp(op, "procs") == 0) {
        procs_run(id, &doc, 0);
        return;
    }
    if (strcmp(op, "proc_signal") == 0) {
        proc_signal_run(id, &doc, 0);
        return;
    }
    int (*open_op)(struct stream *, const struct json_doc *, int) =
        strcmp(op, "exec") == 0     ? exec_open
        : strcmp(op, "put") == 0    ? put_open
        : strcmp(op, "get") == 0    ? get_open
        : strcmp(op, "list") == 0   ? list_open
        : strcmp(op, "remove") == 0 ? remove_open
        : strcmp(op, "spawn") == 0  ? spawn_open
        : strcmp(op, "proc_read") == 0 ? proc_read_open
        : strcmp(op, "proc_write") == 0 ? proc_write_open
                                    : NULL;
    if (open_op == NULL) {
        channel_send_error(id, "ENOTSUP", 0, "unknown operation \"%s\"", op);
        return;
    }
    struct stream *s = free_slot();
    if (s == NULL) {
        channel_send_error(id, "EBUSY", EBUSY, "too many open streams (at most %d)",
                           MAX_STREAMS);
        return;
    }
    *s = (struct stream){.id = id, .used = 1};
    if (open_op(s, &doc, 0) != 0)
        *s = (struct stream){0};
}

void streams_frame(uint32_t id, uint8_t type, uint8_t flags, const uint8_t *payload,
                   size_t len)
{
    struct stream *s = find(id);
    if (s == NULL) {
        /* A frame racing with the end of its stream (a CREDIT for output the host read
         * after EXIT was sent) is normal; one for a stream never opened is not. */
        if (id > highest_id)
            channel_send_error(id, "EPROTO", 0, "frame type 0x%02x for stream %u, which is "
                               "not open", type, id);
        return;
    }
    if (type == FRAME_CANCEL) {
        s->ops->cancel(s, 0);
        return;
    }
    s->ops->frame(s, type, flags, payload, len);
}

void streams_reset(void)
{
    for (int i = 0; i < MAX_STREAMS; i++) {
        struct stream *s = &table[i];
        if (s->used && !s->ended) {
            s->ops->cancel(s, 1);
            stream_end(s);
        }
    }
    highest_id = 0;
}

void streams_watch(void)
{
    for (int i = 0; i < MAX_STREAMS; i++)
        if (table[i].used && !table[i].ended)
            table[i].ops->watch(&table[i]);
}

void streams_tick(void)
{
    long long now = monotonic_ms();
    for (int i = 0; i < MAX_STREAMS; i++)
        if (table[i].used && !table[i].ended)
            table[i].ops->tick(&table[i], now);
}

void streams_sweep(void)
{
    for (int i = 0; i < MAX_STREAMS; i++) {
        struct stream *s = &table[i];
        if (s->used && s->ended) {
            s->ops->release(s);
            *s = (struct stream){0};
        }
    }
}

void streams_child_exited(pid_t pid, int status)
{
    for (int i = 0; i < MAX_STREAMS; i++) {
        struct stream *s = &table[i];
        /* Ended streams still get their child's status (and ignore it), so a pid is
         * never mistaken for another stream's. */
        if (s->used && s->ops->child_exited(s, pid, status))
            return;
    }
}
