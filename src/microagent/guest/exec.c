/* The exec operation: one command per stream.
 *
 * STARTED goes out when the child's status pipe reaches EOF (its execve succeeded);
 * STDOUT and STDERR are read only while the host has credit and the channel has room,
 * so a slow reader blocks the process on its full pipe instead of anything buffering
 * without bound; STDIN is buffered up to the window the agent granted and credit goes
 * back as bytes reach the process. EXIT goes out once both outputs are at EOF and PID 1's
 * reaper has handed over the exit status (or, after a timeout or CANCEL killed the
 * process group, once the process is reaped: a process that left the group and holds a
 * pipe must not keep the stream open). */
#include "channel.h"
#include "clock.h"
#include "errnames.h"
#include "json.h"
#include "log.h"
#include "ops.h"
#include "outport.h"
#include "poller.h"
#include "spawn.h"
#include "streams.h"

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/uio.h>
#include <sys/wait.h>
#include <unistd.h>

#define MAX_CREDIT (1LL << 40)
#define MAX_TIMEOUT_MS (1LL << 40)
/* After a read that emptied a pipe, the next read waits this long: programs write in
 * small blocks (busybox: 4 KiB), and every write to the virtio-serial port is a VM exit
 * whatever its size, so a little patience turns 4 KiB frames into 64 KiB ones (measured
 * under TCG: busybox head 7 -> 14 MB/s, dd with 64 KiB blocks 131 -> 148 MB/s). It only
 * delays output that follows other output within 2 ms. */
#define COALESCE_MS 2
/* At most this many frames per batch (channel_data_iov; spliced batches: channel.c). */
#define BATCH_FRAMES 16
/* The output pipes: at ~600 MB/s a producer fills 1 MiB in COALESCE_MS. */
#define EXEC_PIPE_SIZE (1024 * 1024)

/* While a process left behind still has the output port open, look again after this
 * long, doubling up to PORT_RETRY_MAX_MS. */
#define PORT_RETRY_MS 2
#define PORT_RETRY_MAX_MS 100

/* The output port, for an exec that has it as stdout (outport.h). */
enum port_state {
    PORT_NONE,    /* stdout is a pipe (or the pty) */
    PORT_LENT,    /* the process has it */
    PORT_MARKING, /* taken back: the end marker is being written */
    PORT_DONE,    /* the marker is written (marker_sent == marker_len), or cannot be */
};

enum { TAG_STATUS, TAG_OUT, TAG_ERR, TAG_IN, TAG_PORT };

struct exec {
    pid_t pid;
    int status_fd; /* -1 once the exec's outcome is known */
    int out_fd;    /* -1 at EOF */
    int err_fd;    /* -1 at EOF (always with a tty) */
    int in_fd;     /* -1 when closed or unused */
    int master;    /* the pty master, or -1 */
    int started;
    int reaped;
    int status;
    int killed; /* by a timeout, CANCEL or a connection reset */
    int timed_out;
    int cancelled;
    long long deadline; /* monotonic ms, 0 for none */
    long long out_credit;
    long long err_credit;
    long long out_read_at; /* monotonic ms before which a drained pipe is not read again */
    long long err_read_at;
    int stdin_wanted;
    int in_end;
    long long in_allowance; /* STDIN bytes the host may still send */
    uint8_t *in_buf;        /* AGENT_WINDOW bytes once the first STDIN arrives */
    size_t in_head, in_tail;
    /* stdout is the output port (outport.h) instead of a pipe and STDOUT frames */
    enum port_state port;
    char marker[64]; /* "\0microagent-end NONCE\n", written once the process let go */
    size_t marker_len, marker_sent;
    int marker_wait;         /* the port is full: wait for POLLOUT */
    long long port_retry_at; /* a process still has the port: look again then */
    long long port_retry_ms;
};

static const struct stream_ops exec_ops;

static void close_role(struct exec *e, int *fd)
{
    if (*fd >= 0 && *fd != e->master)
        close(*fd);
    *fd = -1;
}

static void kill_group(struct exec *e, int sig)
{
    if (e->pid <= 0)
        return;
    if (kill(-e->pid, sig) == 0)
        return;
    /* Before the child's setsid its group does not exist yet. */
    if (errno == ESRCH && !e->reaped && kill(e->pid, sig) != 0 && errno != ESRCH)
        log_error(errno, "kill %d", (int)e->pid);
}

/* Once the process and all it left behind let go of the output port: take it back and
 * write the end marker. 1 done (marked, or it cannot be), 0 not yet. */
static int finish_port(struct stream *s)
{
    struct exec *e = s->state;
    if (e->port == PORT_LENT) {
        int taken = outport_reclaim(s->id);
        /* A process left in the background has it: wait, as for a pipe's EOF. Killed
         * (timeout, CANCEL): only while the SIGKILL takes effect (2+4+...+64 ms). */
        if (taken == 0 && (!e->killed || e->port_retry_ms < PORT_RETRY_MAX_MS)) {
            e->port_retry_ms = e->port_retry_ms == 0 ? PORT_RETRY_MS : 2 * e->port_retry_ms;
            if (e->port_retry_ms > PORT_RETRY_MAX_MS)
                e->port_retry_ms = PORT_RETRY_MAX_MS;
            e->port_retry_at = monotonic_ms() + e->port_retry_ms;
            return 0;
        }
        /* after CANCEL nobody waits for the marker: it would wait for a reader */
        e->port = taken == 1 && !e->cancelled ? PORT_MARKING : PORT_DONE;
    }
    int fd = outport_fd();
    while (e->port == PORT_MARKING && e->marker_sent < e->marker_len) {
        ssize_t n = write(fd, e->marker + e->marker_sent, e->marker_len - e->marker_sent);
        if (n > 0) {
            e->marker_sent += (size_t)n;
            continue;
        }
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0 && errno == EAGAIN) {
            struct pollfd p = {.fd = fd, .events = POLLOUT};
            if (poll(&p, 1, 0) >= 0 && (p.revents & POLLHUP))
                break; /* no host on the port: nobody to tell */
            e->marker_wait = 1;
            return 0;
        }
        log_error(errno, "exec stream %u: output port", s->id);
        break;
    }
    e->port = PORT_DONE;
    outport_release(s->id);
    return 1;
}

static void send_exit(struct stream *s)
{
    struct exec *e = s->state;
    if (e->out_fd >= 0) {
        channel_send(FRAME_STDOUT, s->id, FLAG_END, NULL, 0);
        close_role(e, &e->out_fd);
    }
    if (e->err_fd >= 0) {
        channel_send(FRAME_STDERR, s->id, FLAG_END, NULL, 0);
        close_role(e, &e->err_fd);
    }
    char doc[128];
    struct json_writer w;
    json_writer_init(&w, doc, sizeof(doc));
    json_object_begin(&w);
    json_key(&w, "exit_code");
    if (WIFEXITED(e->status) && !e->cancelled && !e->timed_out)
        json_write_int(&w, WEXITSTATUS(e->status));
    else
        json_write_null(&w);
    json_key(&w, "signal");
    if (e->cancelled || e->timed_out)
        json_write_int(&w, SIGKILL);
    else if (WIFSIGNALED(e->status))
        json_write_int(&w, WTERMSIG(e->status));
    else
        json_write_null(&w);
    json_key(&w, "timed_out");
    json_write_bool(&w, e->timed_out);
    if (e->port != PORT_NONE) {
        json_key(&w, "stdout_end");
        json_write_bool(&w, e->marker_sent == e->marker_len);
    }
    json_object_end(&w);
    ssize_t n = json_writer_finish(&w);
    channel_send(FRAME_EXIT, s->id, 0, doc, n > 0 ? (size_t)n : 0);
    stream_end(s);
}

/* The child's status pipe is readable: EOF means the exec succeeded. */
static void read_status(struct stream *s)
{
    struct exec *e = s->state;
    struct spawn_failure f;
    ssize_t n;
    do
        n = read(e->status_fd, &f, sizeof(f));
    while (n < 0 && errno == EINTR);
    if (n < 0 && errno == EAGAIN)
        return;
    int err = errno;
    close(e->status_fd);
    e->status_fd = -1;
    if (n == 0) {
        e->started = 1;
        char doc[96];
        struct json_writer w;
        json_writer_init(&w, doc, sizeof(doc));
        json_object_begin(&w);
        json_key(&w, "pid");
        json_write_int(&w, e->pid);
        json_key(&w, "stdout_port");
        json_write_bool(&w, e->port != PORT_NONE);
        json_object_end(&w);
        channel_send(FRAME_STARTED, s->id, 0, doc, (size_t)json_writer_finish(&w));
        return;
    }
    kill_group(e, SIGKILL);
    e->killed = 1;
    if (n == (ssize_t)sizeof(f)) {
        f.code[sizeof(f.code) - 1] = '\0';
        f.message[sizeof(f.message) - 1] = '\0';
        channel_send_error(s->id, f.code, f.err, "%s", f.message);
    } else {
        channel_send_error(s->id, "ESETUP", n < 0 ? err : 0, "the command's start-up "
                           "report was cut short (%zd bytes)", n);
    }
    stream_end(s);
}

static void check_done(struct stream *s)
{
    struct exec *e = s->state;
    if (s->ended || !e->reaped)
        return;
    if (e->status_fd >= 0)
        read_status(s); /* the child is gone: its report (or EOF) is complete */
    if (s->ended || !e->started)
        return;
    if (!e->killed && (e->out_fd >= 0 || e->err_fd >= 0))
        return;
    if (e->port != PORT_NONE && e->port != PORT_DONE && !finish_port(s))
        return;
    send_exit(s);
}

/* Move output from the pipe (or pty) to the channel within credit and room. */
static void pump(struct stream *s, int tag)
{
    struct exec *e = s->state;
    int *fd = tag == TAG_OUT ? &e->out_fd : &e->err_fd;
    long long *credit = tag == TAG_OUT ? &e->out_credit : &e->err_credit;
    uint8_t type = tag == TAG_OUT ? FRAME_STDOUT : FRAME_STDERR;
    long long *read_at = tag == TAG_OUT ? &e->out_read_at : &e->err_read_at;
    while (*fd >= 0) {
        /* As much as the credit allows at once: the process is woken once per batch, not
         * once per frame (under TCG a context switch costs more than copying 64 KiB). */
        if (*credit <= 0)
            return;
        ssize_t n = -1;
        int drained = 0, spliced = 0;
        errno = EINVAL;
        if (*fd != e->master) { /* a pipe: its pages go to the channel as they are */
            n = channel_data_splice(type, s->id, *fd, (size_t)*credit, &drained);
            spliced = n > 0;
        }
        if (n < 0 && errno == EINVAL) { /* a pty, or no splicing: read a batch */
            struct iovec iov[BATCH_FRAMES];
            int slots = channel_data_iov((size_t)*credit, iov, BATCH_FRAMES); /* < 2^40 */
            if (slots <= 0 || slots > BATCH_FRAMES)
                return;
            size_t want = 0;
            for (int i = 0; i < slots; i++)
                want += iov[i].iov_len;
            n = readv(*fd, iov, slots);
            if (n > 0) {
                channel_data_commit_iov(type, s->id, (size_t)n);
                drained = (size_t)n < want;
            }
        }
        if (n > 0) {
            *credit -= n;
            if (drained) {
                *read_at = monotonic_ms() + COALESCE_MS;
                return;
            }
            if (spliced)
                channel_write_pending(); /* the next batch once this one is out */
            continue;
        }
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0 && errno == EAGAIN)
            return;
        /* EOF; a pty master reads EIO once no process has the terminal open. */
        if (n < 0 && !(*fd == e->master && errno == EIO))
            log_error(errno, "exec stream %u: read output", s->id);
        channel_send(type, s->id, FLAG_END, NULL, 0);
        if (*fd == e->master)
            e->in_fd = -1;
        close_role(e, fd);
        check_done(s);
        return;
    }
}

static void return_stdin_credit(struct stream *s, size_t n)
{
    struct exec *e = s->state;
    if (n == 0)
        return;
    e->in_allowance += (long long)n;
    channel_send_credit(s->id, FRAME_STDIN, (uint32_t)n);
}

static void write_stdin(struct stream *s)
{
    struct exec *e = s->state;
    while (e->in_fd >= 0 && e->in_tail > e->in_head) {
        ssize_t n = write(e->in_fd, e->in_buf + e->in_head, e->in_tail - e->in_head);
        if (n > 0) {
            e->in_head += (size_t)n;
            return_stdin_credit(s, (size_t)n);
            continue;
        }
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0 && errno == EAGAIN)
            break;
        /* EPIPE: the process closed its stdin; what is left (and comes) is dropped. */
        return_stdin_credit(s, e->in_tail - e->in_head);
        e->in_head = e->in_tail;
        close_role(e, &e->in_fd);
    }
    if (e->in_head == e->in_tail) {
        e->in_head = e->in_tail = 0;
        if (e->in_end && e->in_fd >= 0 && e->in_fd != e->master)
            close_role(e, &e->in_fd);
    }
}

static void on_event(void *ctx, int tag, int fd, short revents)
{
    struct stream *s = ctx;
    struct exec *e = s->state;
    if (s->ended)
        return;
    switch (tag) {
    case TAG_STATUS:
        if (fd == e->status_fd)
            read_status(s);
        check_done(s);
        break;
    case TAG_OUT:
        if (fd == e->out_fd)
            pump(s, TAG_OUT);
        break;
    case TAG_PORT: /* room for the end marker, or no host (finish_port polls for it) */
        (void)revents;
        e->marker_wait = 0;
        check_done(s);
        break;
    case TAG_ERR:
        if (fd == e->err_fd)
            pump(s, TAG_ERR);
        break;
    case TAG_IN:
        if (fd == e->in_fd)
            write_stdin(s);
        break;
    }
}

static void on_stdin(struct stream *s, uint8_t flags, const uint8_t *payload, size_t len)
{
    struct exec *e = s->state;
    if ((long long)len > e->in_allowance) {
        stream_fail(s, "EPROTO", 0, "STDIN of %zu bytes exceeds the credit of %lld", len,
                    e->in_allowance);
        return;
    }
    if (e->in_end) {
        stream_fail(s, "EPROTO", 0, "STDIN after its END");
        return;
    }
    e->in_allowance -= (long long)len;
    if (flags & FLAG_END)
        e->in_end = 1;
    if (e->in_fd < 0) {
        return_stdin_credit(s, len); /* no stdin, or the process closed it: dropped */
        return;
    }
    if (len > 0) {
        if (e->in_buf == NULL && (e->in_buf = malloc(AGENT_WINDOW)) == NULL) {
            stream_fail(s, "ENOMEM", ENOMEM, "no memory for stdin");
            return;
        }
        /* Buffered bytes plus the host's credit never exceed the window. */
        if (e->in_tail + len > AGENT_WINDOW) {
            memmove(e->in_buf, e->in_buf + e->in_head, e->in_tail - e->in_head);
            e->in_tail -= e->in_head;
            e->in_head = 0;
        }
        memcpy(e->in_buf + e->in_tail, payload, len);
        e->in_tail += len;
    }
    write_stdin(s);
}

/* A small control document of a SIGNAL or RESIZE frame. */
static int parse_small(struct stream *s, const uint8_t *payload, size_t len,
                       struct json_doc *doc, struct json_token *tokens, uint32_t max,
                       const char *what)
{
    char error[128];
    if (json_parse(doc, (const char *)payload, len, tokens, max, error, sizeof(error)) != 0) {
        stream_fail(s, "EPROTO", 0, "%s: %s", what, error);
        return -1;
    }
    return 0;
}

static void exec_frame(struct stream *s, uint8_t type, uint8_t flags, const uint8_t *payload,
                       size_t len)
{
    struct exec *e = s->state;
    struct json_token tokens[16];
    struct json_doc doc;
    long long v, rows, cols;
    switch (type) {
    case FRAME_STDIN:
        on_stdin(s, flags, payload, len);
        return;
    case FRAME_CREDIT: {
        if (len != 5 || (payload[0] != FRAME_STDOUT && payload[0] != FRAME_STDERR)) {
            stream_fail(s, "EPROTO", 0, "bad CREDIT frame for an exec stream");
            return;
        }
        long long inc = (long long)payload[1] << 24 | payload[2] << 16 | payload[3] << 8 |
                        payload[4];
        long long *credit = payload[0] == FRAME_STDOUT ? &e->out_credit : &e->err_credit;
        *credit = *credit + inc > MAX_CREDIT ? MAX_CREDIT : *credit + inc;
        return;
    }
    case FRAME_SIGNAL:
        if (parse_small(s, payload, len, &doc, tokens, 16, "SIGNAL") != 0)
            return;
        if (json_int(&doc, json_find(&doc, 0, "signal"), 1, 64, &v) != 0) {
            stream_fail(s, "EPROTO", 0, "SIGNAL: \"signal\" must be an integer from 1 to 64");
            return;
        }
        if (!e->reaped || e->out_fd >= 0 || e->err_fd >= 0)
            kill_group(e, (int)v);
        return;
    case FRAME_RESIZE:
        if (parse_small(s, payload, len, &doc, tokens, 16, "RESIZE") != 0)
            return;
        if (json_int(&doc, json_find(&doc, 0, "rows"), 0, 65535, &rows) != 0 ||
            json_int(&doc, json_find(&doc, 0, "cols"), 0, 65535, &cols) != 0) {
            stream_fail(s, "EPROTO", 0, "RESIZE: \"rows\" and \"cols\" must be integers "
                        "from 0 to 65535");
            return;
        }
        if (e->master >= 0) {
            struct winsize ws = {.ws_row = (unsigned short)rows,
                                 .ws_col = (unsigned short)cols};
            if (ioctl(e->master, TIOCSWINSZ, &ws) != 0)
                log_error(errno, "exec stream %u: TIOCSWINSZ", s->id);
        }
        return; /* without a pty there is nothing to resize */
    default:
        stream_fail(s, "EPROTO", 0, "frame type 0x%02x is not valid on an exec stream", type);
    }
}

static void exec_watch(struct stream *s)
{
    struct exec *e = s->state;
    if (e->status_fd >= 0)
        poller_add(e->status_fd, POLLIN, on_event, s, TAG_STATUS);
    long long now = monotonic_ms();
    if (e->port == PORT_MARKING && e->marker_wait)
        poller_add(outport_fd(), POLLOUT, on_event, s, TAG_PORT);
    if (e->port == PORT_LENT && e->port_retry_at > 0)
        poller_wake_at(e->port_retry_at);
    if (e->started && channel_data_room() > 0) {
        if (e->out_fd >= 0 && e->out_credit > 0) {
            if (now >= e->out_read_at)
                poller_add(e->out_fd, POLLIN, on_event, s, TAG_OUT);
            else
                poller_wake_at(e->out_read_at);
        }
        if (e->err_fd >= 0 && e->err_credit > 0) {
            if (now >= e->err_read_at)
                poller_add(e->err_fd, POLLIN, on_event, s, TAG_ERR);
            else
                poller_wake_at(e->err_read_at);
        }
    }
    if (e->in_fd >= 0 && e->in_tail > e->in_head)
        poller_add(e->in_fd, POLLOUT, on_event, s, TAG_IN);
    if (e->deadline > 0)
        poller_wake_at(e->deadline);
}

static void exec_tick(struct stream *s, long long now)
{
    struct exec *e = s->state;
    if (e->port == PORT_LENT && e->port_retry_at > 0 && now >= e->port_retry_at) {
        e->port_retry_at = 0;
        check_done(s);
    }
    if (e->deadline == 0 || now < e->deadline)
        return;
    e->deadline = 0;
    if (!e->reaped) {
        e->timed_out = 1;
        e->killed = 1;
    }
    /* After the process itself exited, the timeout still kills the background processes
     * of its group that hold the pipes open; the output left is still read to EOF. */
    kill_group(e, SIGKILL);
    check_done(s);
}

static int exec_child_exited(struct stream *s, pid_t pid, int status)
{
    struct exec *e = s->state;
    if (e == NULL || e->pid != pid || e->reaped)
        return 0;
    e->reaped = 1;
    e->status = status;
    check_done(s);
    return 1;
}

static void exec_cancel(struct stream *s, int quiet)
{
    struct exec *e = s->state;
    kill_group(e, SIGKILL);
    e->killed = 1;
    if (quiet)
        return;
    e->cancelled = 1;
    check_done(s);
}

static void exec_release(struct stream *s)
{
    struct exec *e = s->state;
    if (e == NULL)
        return;
    /* the port comes back to the next exec that asks, once the processes are gone */
    outport_release(s->id);
    if (e->status_fd >= 0)
        close(e->status_fd);
    close_role(e, &e->out_fd);
    close_role(e, &e->err_fd);
    close_role(e, &e->in_fd);
    if (e->master >= 0)
        close(e->master);
    free(e->in_buf);
    free(e);
    s->state = NULL;
}

static const struct stream_ops exec_ops = {
    .frame = exec_frame,
    .watch = exec_watch,
    .tick = exec_tick,
    .child_exited = exec_child_exited,
    .cancel = exec_cancel,
    .release = exec_release,
};

char **string_array(const struct json_doc *doc, int arr)
{
    uint32_t n = doc->tokens[arr].count;
    size_t bytes = (n + 1) * sizeof(char *);
    for (uint32_t i = 0; i < n; i++) {
        ssize_t len = json_string_length(doc, json_item(doc, arr, i));
        if (len < 0)
            return NULL;
        bytes += (size_t)len + 1;
    }
    char **out = malloc(bytes);
    if (out == NULL)
        return NULL;
    char *p = (char *)(out + n + 1);
    char *end = (char *)out + bytes;
    for (uint32_t i = 0; i < n; i++) {
        ssize_t len = json_string(doc, json_item(doc, arr, i), p, (size_t)(end - p));
        if (len < 0 || memchr(p, '\0', (size_t)len) != NULL) {
            free(out);
            return NULL;
        }
        out[i] = p;
        p += len + 1;
    }
    out[n] = NULL;
    return out;
}

int optional_string(const struct json_doc *doc, int req, const char *key, char *out,
                    size_t size)
{
    int t = json_find(doc, req, key);
    out[0] = '\0';
    if (t < 0 || doc->tokens[t].type == JSON_NULL)
        return 0;
    return json_string(doc, t, out, size) < 0 ? -1 : 0;
}

const char *command_parse(const struct json_doc *doc, int req, struct command *c)
{
    static char cwd[4096], user[512];
    c->argv = NULL;
    c->env = NULL;
    c->cwd = cwd;
    c->user = user;
    int t = json_find(doc, req, "argv");
    if (t < 0 || doc->tokens[t].type != JSON_ARRAY || doc->tokens[t].count == 0 ||
        (c->argv = string_array(doc, t)) == NULL || c->argv[0][0] == '\0')
        return "\"argv\" must be a non-empty array of strings without NUL";
    t = json_find(doc, req, "env");
    if (t >= 0 && doc->tokens[t].type != JSON_NULL &&
        (doc->tokens[t].type != JSON_ARRAY || (c->env = string_array(doc, t)) == NULL))
        return "\"env\" must be an array of strings";
    if (optional_string(doc, req, "cwd", cwd, sizeof(cwd)) != 0)
        return "\"cwd\" must be a string";
    if (optional_string(doc, req, "user", user, sizeof(user)) != 0)
        return "\"user\" must be a string";
    return NULL;
}

int exec_open(struct stream *s, const struct json_doc *doc, int req)
{
    struct command c;
    long long timeout_ms = 0;
    const char *bad = command_parse(doc, req, &c);
    char **argv = c.argv, **env = c.env;
    struct spawn_request sr = {.cwd = c.cwd, .user = c.user, .stdout_fd = -1};

    int t = json_find(doc, req, "tty");
    if (bad == NULL && t >= 0 && doc->tokens[t].type != JSON_NULL) {
        long long rows = 0, cols = 0;
        if (json_int(doc, json_find(doc, t, "rows"), 0, 65535, &rows) != 0 ||
            json_int(doc, json_find(doc, t, "cols"), 0, 65535, &cols) != 0)
            bad = "\"tty\" must be null or {\"rows\": R, \"cols\": C}";
        sr.tty = 1;
        sr.size.ws_row = (unsigned short)rows;
        sr.size.ws_col = (unsigned short)cols;
    }
    t = json_find(doc, req, "stdin");
    if (bad == NULL && t >= 0 && doc->tokens[t].type != JSON_NULL) {
        if (doc->tokens[t].type != JSON_TRUE && doc->tokens[t].type != JSON_FALSE)
            bad = "\"stdin\" must be a boolean";
        sr.stdin_pipe = doc->tokens[t].type == JSON_TRUE;
    }
    static char nonce[OUT_NONCE_LEN + 2];
    if (bad == NULL && (optional_string(doc, req, "stdout_port", nonce, sizeof(nonce)) != 0 ||
                        (nonce[0] != '\0' && strlen(nonce) != OUT_NONCE_LEN) ||
                        strspn(nonce, "0123456789abcdef") != strlen(nonce)))
        bad = "\"stdout_port\" must be 32 lowercase hex digits";
    t = json_find(doc, req, "timeout_ms");
    if (bad == NULL && t >= 0 && doc->tokens[t].type != JSON_NULL &&
        json_int(doc, t, 0, MAX_TIMEOUT_MS, &timeout_ms) != 0)
        bad = "\"timeout_ms\" must be a non-negative integer";
    static char *const no_env[] = {NULL};
    sr.argv = argv;
    sr.env = env != NULL ? env : no_env;

    struct exec *e = NULL;
    struct spawn_result res;
    if (bad == NULL && (e = calloc(1, sizeof(*e))) == NULL)
        bad = "out of memory";
    if (bad != NULL) {
        channel_send_error(s->id, "EINVAL", 0, "exec: %s", bad);
        goto fail;
    }
    char preamble[OUT_NONCE_LEN + 20];
    if (nonce[0] != '\0' && !sr.tty && (sr.stdout_fd = outport_lend(s->id)) >= 0) {
        snprintf(preamble, sizeof(preamble), "microagent-out %s\n", nonce);
        sr.preamble = preamble;
    }
    int spawned = spawn(&sr, &res);
    if (sr.stdout_fd >= 0) /* the child has it now (or there is no child) */
        close(sr.stdout_fd);
    if (spawned != 0) {
        int err = errno;
        outport_release(s->id);
        channel_send_error(s->id, errno_name(err), err, "cannot start %s: %s", argv[0],
                           strerror(err));
        goto fail;
    }
    e->pid = res.pid;
    if (sr.stdout_fd >= 0) {
        e->port = PORT_LENT;
        /* NUL first: a reader holds back a trailing prefix of it, never of text */
        e->marker_len = 1 + (size_t)snprintf(e->marker + 1, sizeof(e->marker) - 1,
                                             "microagent-end %s\n", nonce);
    }
    e->status_fd = res.status_fd;
    e->out_fd = res.out_fd;
    e->err_fd = res.err_fd;
    e->master = res.master;
    e->stdin_wanted = sr.stdin_pipe;
    e->in_fd = sr.stdin_pipe ? res.in_fd : -1;
    if (e->master < 0) {
        /* Room for a batch while the agent waits (for credit, or COALESCE_MS): a failure
         * leaves spawn's size and only costs speed. */
        if (e->out_fd >= 0)
            fcntl(e->out_fd, F_SETPIPE_SZ, EXEC_PIPE_SIZE);
        fcntl(e->err_fd, F_SETPIPE_SZ, EXEC_PIPE_SIZE);
    }
    e->out_credit = e->err_credit = channel_peer_window();
    e->in_allowance = AGENT_WINDOW;
    e->deadline = timeout_ms > 0 ? monotonic_ms() + timeout_ms : 0;
    s->ops = &exec_ops;
    s->state = e;
    free(argv);
    free(env);
    return 0;
fail:
    free(e);
    free(argv);
    free(env);
    return -1;
}
