/* The operations on background processes (procs.h): spawn, procs and proc_signal answer
 * at once; proc_read waits for output (or the end) and sends what it read as FILE
 * frames; proc_write takes FILE frames for the process's stdin. */
#include "channel.h"
#include "clock.h"
#include "errnames.h"
#include "json.h"
#include "log.h"
#include "ops.h"
#include "poller.h"
#include "procs.h"
#include "streams.h"

#include <errno.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define MAX_CREDIT (1LL << 40)
#define READ_MAX (1024 * 1024)
#define MAX_WAIT_MS 600000
#define ENTRY_ARGV 2048 /* argv bytes in the entry of one process */

static const char ok_head[] = "{\"exit_code\":0,\"signal\":null,\"timed_out\":false";

/* {"exit_code": 0, ..., key: entry/entries} into buf; the list's argv is cut shorter
 * until it fits. Returns the length. */
static size_t answer(char *buf, size_t size, const char *key, const struct proc *one)
{
    for (size_t budget = ENTRY_ARGV;; budget /= 2) {
        struct json_writer w;
        json_writer_init(&w, buf, size);
        json_object_begin(&w);
        json_key(&w, "exit_code");
        json_write_int(&w, 0);
        json_key(&w, key);
        if (one != NULL)
            procs_write_entry(&w, one, budget);
        else
            procs_write_all(&w, budget);
        json_object_end(&w);
        ssize_t n = json_writer_finish(&w);
        if (n >= 0)
            return (size_t)n;
        if (budget == 0)
            return 0;
    }
}

static struct proc *find_proc(uint32_t id, const struct json_doc *doc, int req, const char *op)
{
    long long pid;
    if (json_int(doc, json_find(doc, req, "id"), 1, 1LL << 53, &pid) != 0) {
        channel_send_error(id, "EINVAL", 0, "%s: \"id\" must be a positive integer", op);
        return NULL;
    }
    struct proc *p = procs_find(pid);
    if (p == NULL)
        channel_send_error(id, "ENOENT", ENOENT, "%s: no background process %lld", op, pid);
    return p;
}

/* --- spawn: answered once the child's exec worked or failed ------------------------ */

static void spawned(void *ctx, struct proc *p, const struct spawn_failure *f)
{
    struct stream *s = ctx;
    s->state = NULL;
    if (f != NULL) {
        channel_send_error(s->id, f->code, f->err, "%s", f->message);
    } else {
        static char buf[MAX_PAYLOAD];
        channel_send(FRAME_EXIT, s->id, 0, buf, answer(buf, sizeof(buf), "proc", p));
    }
    stream_end(s);
}

static void spawn_frame(struct stream *s, uint8_t type, uint8_t flags, const uint8_t *payload,
                        size_t len)
{
    (void)flags;
    (void)payload;
    (void)len;
    stream_fail(s, "EPROTO", 0, "frame type 0x%02x is not valid on a spawn stream", type);
}

/* CANCEL (the host gave up on the spawn): the starting process is killed. The connection
 * reset or lost (quiet): it starts on without anyone waiting, a background process all
 * the same, as one whose answer was lost. */
static void spawn_cancel(struct stream *s, int quiet)
{
    if (s->state != NULL) {
        if (quiet) {
            procs_forget_start(s->state);
        } else {
            procs_drop_start(s->state);
        }
    }
    s->state = NULL;
    if (!quiet)
        channel_send_error(s->id, "ECANCELED", ECANCELED, "spawn cancelled");
    stream_end(s);
}

static void spawn_release(struct stream *s)
{
    if (s->state != NULL)
        procs_forget_start(s->state);
    s->state = NULL;
}

static const struct stream_ops spawn_ops = {
    .frame = spawn_frame,
    .watch = stream_no_watch, /* procs_watch waits for the child's report */
    .tick = stream_no_tick,
    .child_exited = stream_no_child,
    .cancel = spawn_cancel,
    .release = spawn_release,
};

int spawn_open(struct stream *s, const struct json_doc *doc, int req)
{
    struct command c;
    const char *bad = command_parse(doc, req, &c);
    struct proc *p = NULL;
    if (bad != NULL) {
        channel_send_error(s->id, "EINVAL", 0, "spawn: %s", bad);
    } else {
        static char *const no_env[] = {NULL};
        p = procs_spawn(s->id, c.argv, c.env != NULL ? c.env : no_env, c.cwd, c.user,
                        spawned, s);
    }
    free(c.argv);
    free(c.env);
    if (p == NULL)
        return -1;
    s->ops = &spawn_ops;
    s->state = p;
    return 0;
}

void procs_run(uint32_t id, const struct json_doc *doc, int req)
{
    static char buf[MAX_PAYLOAD];
    int t = json_find(doc, req, "id");
    if (t >= 0 && doc->tokens[t].type != JSON_NULL) {
        struct proc *p = find_proc(id, doc, req, "procs");
        if (p != NULL)
            channel_send(FRAME_EXIT, id, 0, buf, answer(buf, sizeof(buf), "proc", p));
        return;
    }
    size_t n = answer(buf, sizeof(buf), "procs", NULL);
    if (n == 0)
        channel_send_error(id, "EOVERFLOW", EOVERFLOW, "procs: the list does not fit a frame");
    else
        channel_send(FRAME_EXIT, id, 0, buf, n);
}

void proc_signal_run(uint32_t id, const struct json_doc *doc, int req)
{
    long long sig;
    struct proc *p = find_proc(id, doc, req, "proc_signal");
    if (p == NULL)
        return;
    if (json_int(doc, json_find(doc, req, "signal"), 1, 64, &sig) != 0) {
        channel_send_error(id, "EINVAL", 0, "proc_signal: \"signal\" must be an integer from "
                           "1 to 64");
        return;
    }
    if (p->state != PROC_RUNNING) {
        channel_send_error(id, "ESRCH", ESRCH, "proc_signal: process %lld has ended", p->id);
        return;
    }
    /* the process group (its leader may be gone while others hold its output open) */
    if (kill(-p->pid, (int)sig) != 0 && (errno != ESRCH || p->reaped ||
                                         kill(p->pid, (int)sig) != 0)) {
        int err = errno;
        channel_send_error(id, errno_name(err), err, "proc_signal %lld: %s", p->id,
                           strerror(err));
        return;
    }
    static const char done[] = "{\"exit_code\":0,\"signal\":null,\"timed_out\":false}";
    channel_send(FRAME_EXIT, id, 0, done, sizeof(done) - 1);
}

/* --- proc_read ------------------------------------------------------------------- */

struct proc_read {
    long long proc_id;
    int k;              /* 0 stdout, 1 stderr */
    long long offset;   /* asked for */
    long long max;
    long long deadline; /* monotonic ms */
    int ready;          /* the data is read: sending */
    char *buf;          /* the data */
    size_t len, sent;
    char *exit_doc;     /* the EXIT, made when the data was read */
    size_t exit_len;
    long long credit;
};

static const struct stream_ops proc_read_ops;

/* Take the data now (one instant: the tail cannot move under a slow sender). */
static int snapshot(struct stream *s, struct proc *p)
{
    struct proc_read *r = s->state;
    const struct proc_output *o = &p->out[r->k];
    long long off = r->offset, skipped = 0;
    if (off >= PROC_HEAD && off < o->tail_start) {
        skipped = o->tail_start - off;
        off = o->tail_start;
    }
    long long end = o->size < off + r->max ? o->size : off + r->max;
    if (off < PROC_HEAD && end > PROC_HEAD)
        end = PROC_HEAD; /* the next read starts at the gap, if there is one */
    if (end < off)
        end = off;
    r->len = (size_t)(end - off);
    if (r->len > 0 && (r->buf = malloc(r->len)) == NULL) {
        stream_fail(s, "ENOMEM", ENOMEM, "proc_read: no memory for %zu bytes", r->len);
        return -1;
    }
    size_t got = 0;
    while (got < r->len) {
        ssize_t n = pread(o->file_fd, r->buf + got, r->len - got, off + (long long)got);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0) {
            /* a short file (a write that failed): the offsets still count */
            memset(r->buf + got, 0, r->len - got);
            break;
        }
        got += (size_t)n;
    }
    static char entry[MAX_PAYLOAD];
    struct json_writer w;
    json_writer_init(&w, entry, sizeof(entry));
    json_object_begin(&w);
    json_key(&w, "exit_code");
    json_write_int(&w, 0);
    json_key(&w, "offset");
    json_write_int(&w, off);
    json_key(&w, "next");
    json_write_int(&w, end);
    json_key(&w, "skipped");
    json_write_int(&w, skipped);
    json_key(&w, "eof");
    json_write_bool(&w, o->pipe_fd < 0 && end == o->size);
    json_key(&w, "proc");
    procs_write_entry(&w, p, ENTRY_ARGV);
    json_object_end(&w);
    ssize_t n = json_writer_finish(&w);
    if (n < 0 || (r->exit_doc = malloc((size_t)n)) == NULL) {
        stream_fail(s, "ENOMEM", ENOMEM, "proc_read: the answer does not fit");
        return -1;
    }
    memcpy(r->exit_doc, entry, (size_t)n);
    r->exit_len = (size_t)n;
    r->ready = 1;
    return 0;
}

static void read_pump(struct stream *s)
{
    struct proc_read *r = s->state;
    while (!s->ended && r->sent < r->len) {
        size_t want = channel_data_room();
        if (want > r->len - r->sent)
            want = r->len - r->sent;
        if ((long long)want > r->credit)
            want = (size_t)r->credit;
        if (want == 0)
            return;
        memcpy(channel_data_buffer(), r->buf + r->sent, want);
        channel_data_commit(FRAME_FILE, s->id, 0, want);
        r->sent += want;
        r->credit -= (long long)want;
    }
    if (s->ended)
        return;
    channel_send(FRAME_FILE, s->id, FLAG_END, NULL, 0);
    channel_send(FRAME_EXIT, s->id, 0, r->exit_doc, r->exit_len);
    stream_end(s);
}

static void read_tick(struct stream *s, long long now)
{
    struct proc_read *r = s->state;
    if (!r->ready) {
        struct proc *p = procs_find(r->proc_id);
        if (p == NULL) {
            channel_send_error(s->id, "ENOENT", ENOENT, "proc_read: process %lld is gone",
                               r->proc_id);
            stream_end(s);
            return;
        }
        const struct proc_output *o = &p->out[r->k];
        long long from = r->offset >= PROC_HEAD && r->offset < o->tail_start ? o->tail_start
                                                                             : r->offset;
        if (o->size <= from && o->pipe_fd >= 0 && p->state == PROC_RUNNING &&
            now < r->deadline)
            return;
        if (snapshot(s, p) != 0)
            return;
    }
    read_pump(s);
}

static void read_watch(struct stream *s)
{
    struct proc_read *r = s->state;
    if (!r->ready)
        poller_wake_at(r->deadline);
    else if (r->credit > 0 && channel_data_room() > 0)
        poller_wake_at(0);
}

static void read_frame(struct stream *s, uint8_t type, uint8_t flags, const uint8_t *payload,
                       size_t len)
{
    (void)flags;
    struct proc_read *r = s->state;
    if (type != FRAME_CREDIT || len != 5 || payload[0] != FRAME_FILE) {
        stream_fail(s, "EPROTO", 0, "frame type 0x%02x is not valid on a proc_read stream",
                    type);
        return;
    }
    long long inc = (long long)payload[1] << 24 | payload[2] << 16 | payload[3] << 8 |
                    payload[4];
    r->credit = r->credit + inc > MAX_CREDIT ? MAX_CREDIT : r->credit + inc;
}

static void read_cancel(struct stream *s, int quiet)
{
    if (!quiet)
        channel_send_error(s->id, "ECANCELED", ECANCELED, "proc_read cancelled");
    stream_end(s);
}

static void read_release(struct stream *s)
{
    struct proc_read *r = s->state;
    if (r == NULL)
        return;
    free(r->buf);
    free(r->exit_doc);
    free(r);
    s->state = NULL;
}

static const struct stream_ops proc_read_ops = {
    .frame = read_frame,
    .watch = read_watch,
    .tick = read_tick,
    .child_exited = stream_no_child,
    .cancel = read_cancel,
    .release = read_release,
};

int proc_read_open(struct stream *s, const struct json_doc *doc, int req)
{
    struct proc *p = find_proc(s->id, doc, req, "proc_read");
    if (p == NULL)
        return -1;
    char name[16];
    long long offset = 0, max = READ_MAX, wait_ms = 0;
    int t;
    if (optional_string(doc, req, "stream", name, sizeof(name)) != 0 ||
        (name[0] != '\0' && strcmp(name, "stdout") != 0 && strcmp(name, "stderr") != 0) ||
        ((t = json_find(doc, req, "offset")) >= 0 && json_int(doc, t, 0, 1LL << 62, &offset)) ||
        ((t = json_find(doc, req, "max")) >= 0 && json_int(doc, t, 0, 1LL << 62, &max)) ||
        ((t = json_find(doc, req, "wait_ms")) >= 0 &&
         json_int(doc, t, 0, MAX_WAIT_MS, &wait_ms))) {
        channel_send_error(s->id, "EINVAL", 0, "proc_read: \"stream\" must be \"stdout\" or "
                           "\"stderr\", \"offset\" and \"max\" non-negative integers, "
                           "\"wait_ms\" from 0 to %d", MAX_WAIT_MS);
        return -1;
    }
    int k = strcmp(name, "stderr") == 0;
    if (offset > p->out[k].size) {
        channel_send_error(s->id, "EINVAL", EINVAL, "proc_read: offset %lld is beyond the "
                           "%lld bytes written", offset, p->out[k].size);
        return -1;
    }
    struct proc_read *r = calloc(1, sizeof(*r));
    if (r == NULL) {
        channel_send_error(s->id, "ENOMEM", ENOMEM, "proc_read: out of memory");
        return -1;
    }
    long long window = channel_peer_window();
    r->proc_id = p->id;
    r->k = k;
    r->offset = offset;
    r->max = max > READ_MAX ? READ_MAX : max;
    r->deadline = monotonic_ms() + wait_ms;
    r->credit = window;
    s->ops = &proc_read_ops;
    s->state = r;
    return 0;
}

/* --- proc_write ------------------------------------------------------------------ */

struct proc_write {
    long long proc_id;
    int close_after;
    int end;
    long long written;
    long long allowance; /* FILE bytes the host may still send */
    uint8_t *buf;        /* AGENT_WINDOW bytes */
    size_t head, tail;
};

static const struct stream_ops proc_write_ops;

static struct proc *writer_proc(struct stream *s)
{
    struct proc_write *pw = s->state;
    return procs_find(pw->proc_id);
}

static void write_fail(struct stream *s, const char *code, int err, const char *what)
{
    struct proc_write *pw = s->state;
    channel_send_error(s->id, code, err, "proc_write %lld: %s", pw->proc_id, what);
    stream_end(s);
}

static void write_pending(struct stream *s)
{
    struct proc_write *pw = s->state;
    struct proc *p = writer_proc(s);
    if (s->ended)
        return;
    /* what was written before the process closed its stdin (or ended) counts */
    if ((p == NULL || p->in_fd < 0) && pw->tail > pw->head) {
        write_fail(s, "EPIPE", EPIPE, "the process's stdin is closed");
        return;
    }
    while (pw->tail > pw->head) {
        ssize_t n = write(p->in_fd, pw->buf + pw->head, pw->tail - pw->head);
        if (n > 0) {
            pw->head += (size_t)n;
            pw->written += n;
            pw->allowance += n;
            channel_send_credit(s->id, FRAME_FILE, (uint32_t)n);
            continue;
        }
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0 && errno == EAGAIN)
            return;
        int err = errno;
        procs_close_stdin(p); /* EPIPE: the process closed its stdin */
        write_fail(s, errno_name(err), err, strerror(err));
        return;
    }
    pw->head = pw->tail = 0;
    if (!pw->end)
        return;
    if (pw->close_after && p != NULL)
        procs_close_stdin(p);
    char doc[128];
    int len = snprintf(doc, sizeof(doc), "%s,\"written\":%lld}", ok_head, pw->written);
    channel_send(FRAME_EXIT, s->id, 0, doc, (size_t)len);
    stream_end(s);
}

static void on_writable(void *ctx, int tag, int fd, short revents)
{
    (void)tag;
    (void)fd;
    (void)revents;
    struct stream *s = ctx;
    if (!s->ended)
        write_pending(s);
}

static void write_frame(struct stream *s, uint8_t type, uint8_t flags, const uint8_t *payload,
                        size_t len)
{
    struct proc_write *pw = s->state;
    if (type != FRAME_FILE) {
        stream_fail(s, "EPROTO", 0, "frame type 0x%02x is not valid on a proc_write stream",
                    type);
        return;
    }
    if ((long long)len > pw->allowance || pw->end) {
        stream_fail(s, "EPROTO", 0, "FILE of %zu bytes beyond the credit or after END", len);
        return;
    }
    pw->allowance -= (long long)len;
    if (flags & FLAG_END)
        pw->end = 1;
    if (len > 0) {
        if (pw->tail + len > AGENT_WINDOW) {
            memmove(pw->buf, pw->buf + pw->head, pw->tail - pw->head);
            pw->tail -= pw->head;
            pw->head = 0;
        }
        memcpy(pw->buf + pw->tail, payload, len);
        pw->tail += len;
    }
    write_pending(s);
}

static void write_watch(struct stream *s)
{
    struct proc_write *pw = s->state;
    struct proc *p = writer_proc(s);
    if (p != NULL && p->in_fd >= 0 && pw->tail > pw->head)
        poller_add(p->in_fd, POLLOUT, on_writable, s, 0);
}

/* The process may have ended (its stdin closed) while bytes waited. */
static void write_tick(struct stream *s, long long now)
{
    (void)now;
    struct proc_write *pw = s->state;
    struct proc *p = writer_proc(s);
    if (pw->tail > pw->head && (p == NULL || p->in_fd < 0))
        write_pending(s);
}

static void write_cancel(struct stream *s, int quiet)
{
    if (!quiet)
        channel_send_error(s->id, "ECANCELED", ECANCELED, "proc_write cancelled");
    stream_end(s);
}

static void write_release(struct stream *s)
{
    struct proc_write *pw = s->state;
    if (pw == NULL)
        return;
    struct proc *p = writer_proc(s);
    if (p != NULL)
        p->writing = 0;
    free(pw->buf);
    free(pw);
    s->state = NULL;
}

static const struct stream_ops proc_write_ops = {
    .frame = write_frame,
    .watch = write_watch,
    .tick = write_tick,
    .child_exited = stream_no_child,
    .cancel = write_cancel,
    .release = write_release,
};

int proc_write_open(struct stream *s, const struct json_doc *doc, int req)
{
    struct proc *p = find_proc(s->id, doc, req, "proc_write");
    if (p == NULL)
        return -1;
    int close_after = 0;
    int t = json_find(doc, req, "close");
    if (t >= 0 && doc->tokens[t].type != JSON_NULL && json_bool(doc, t, &close_after) != 0) {
        channel_send_error(s->id, "EINVAL", 0, "proc_write: \"close\" must be a boolean");
        return -1;
    }
    if (p->in_fd < 0) {
        channel_send_error(s->id, "EPIPE", EPIPE, "proc_write: the stdin of process %lld is "
                           "closed", p->id);
        return -1;
    }
    if (p->writing) {
        channel_send_error(s->id, "EBUSY", EBUSY, "proc_write: another proc_write to process "
                           "%lld is under way", p->id);
        return -1;
    }
    struct proc_write *pw = calloc(1, sizeof(*pw));
    if (pw == NULL || (pw->buf = malloc(AGENT_WINDOW)) == NULL) {
        free(pw);
        channel_send_error(s->id, "ENOMEM", ENOMEM, "proc_write: out of memory");
        return -1;
    }
    pw->proc_id = p->id;
    pw->close_after = close_after;
    pw->allowance = AGENT_WINDOW;
    p->writing = 1;
    s->ops = &proc_write_ops;
    s->state = pw;
    return 0;
}
