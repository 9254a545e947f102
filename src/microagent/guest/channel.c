/* The agent channel: framing, the connection's state, the bounded input and output
 * buffers (docs/protocol.md).
 *
 * Bounds: the input buffer holds two maximal frames; input is parsed only while less
 * than INPUT_LIMIT bytes wait to be sent, and every frame's answer is smaller than the
 * slack above that, so host requests never make the output grow without bound. Data
 * (STDOUT, STDERR, FILE) is produced only below DATA_LIMIT: when the host reads slowly,
 * the producers stop reading their pipes and the processes block.
 *
 * A virtio-serial port reads 0 and polls POLLHUP for as long as no host is connected, so
 * the fd is not polled then: the agent waits for SIGIO (the driver signals a change of
 * the host's connection) or a slow timer, and then looks again.
 *
 * Spliced output (channel_data_splice): a batch of data frames goes from a process's pipe
 * to the channel without a copy in the guest. One splice(2) takes the batch's bytes from
 * the process's pipe into the agent's pipe `take` (the process is woken once per batch);
 * the frames are assembled in the agent's pipe `block`: each header written, its payload
 * moved from `take` (pipe to pipe: the pages move); when the queue has been written up to
 * the block's place, splice(2) hands the block's pages to the channel (virtio_console's
 * splice_write queues them to the device as they are). Frames queued after the block
 * wait for it; at most one block is pending, and no data frame is produced meanwhile
 * (channel_data_room() is 0). A channel that cannot splice (EINVAL) gets the block
 * copied into the queue instead, and batches are read with readv from then on.
 *
 * Why whole blocks: virtio_console's splice_write (Linux 6.1) sizes its scatterlist by
 * the source pipe's occupancy and marks only the list's last entry as the end, so a
 * splice that stops before the pipe's last buffer (len reached) hands the device zeroed
 * entries too (QEMU: "zero sized buffers are not allowed", and the port stops for good).
 * The block pipe holds nothing but the pending block and is spliced with len = all of
 * it, so every splice either empties it or stops at the list's end. */
#include "channel.h"

#include "clock.h"
#include "json.h"
#include "log.h"
#include "poller.h"
#include "serve.h"
#include "streams.h"
#include "version.h"

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#define MIN_PEER_PAYLOAD 1024
#define DATA_LIMIT (512 * 1024)
#define INPUT_LIMIT (1024 * 1024)
#define OUT_CAP (2 * 1024 * 1024 + FRAME_HEADER + MAX_PAYLOAD)
#define RECHECK_MS 1000
#define BATCH_FRAMES 16
/* The agent's pipes for spliced output. A batch is at most DATA_LIMIT bytes, and at most
 * what `take`'s 128 slots hold (fewer bytes when the process's pipe buffers are partly
 * filled). Assembled as a block, that is at most 128 buffers, BATCH_FRAMES headers and
 * BATCH_FRAMES buffers split at a frame's end: `block`'s 256 slots always suffice. */
#define TAKE_PIPE_SIZE (512 * 1024)
#define BLOCK_PIPE_SIZE (1024 * 1024)

enum state {
    CONN_CLOSED, /* no fd */
    CONN_HUNG,   /* virtio-serial: no host connected */
    CONN_NEW,    /* connected; the first frame must be HELLO */
    CONN_READY,  /* HELLO exchanged */
    CONN_RESYNC, /* after a malformed header or a refused HELLO: drop all but HELLO */
};

static int fd = -1;
static enum channel_kind kind;
static enum state state = CONN_CLOSED;
static uint8_t in[2 * (FRAME_HEADER + MAX_PAYLOAD)];
static size_t in_len;
static size_t skip_input; /* bytes of a refused frame still to be discarded */
static uint8_t out[OUT_CAP];
static size_t out_head, out_tail;
static size_t out_boundary; /* the start of the first frame not yet begun on the wire */
static uint32_t peer_window = AGENT_WINDOW;
static size_t peer_max = MAX_PAYLOAD;
static long long recheck_at;
static struct json_token hello_tokens[256];

/* Spliced output (see the top): the pending block goes out at splice_at in out. */
static int take_pipe[2] = {-1, -1};
static int block_pipe[2] = {-1, -1};
static size_t splice_at;
static size_t splice_left;  /* bytes of the block still to go; 0: no block pending */
static int splice_started;  /* some of the block went out: it must be completed */
static int splice_off;      /* the channel's fd cannot splice */


static uint32_t get32(const uint8_t *p)
{
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}

static void put32(uint8_t *p, uint32_t v)
{
    p[0] = (uint8_t)(v >> 24);
    p[1] = (uint8_t)(v >> 16);
    p[2] = (uint8_t)(v >> 8);
    p[3] = (uint8_t)v;
}

static void put_header(uint8_t *p, uint8_t type, uint32_t stream, uint8_t flags, size_t len)
{
    put32(p, (uint32_t)len);
    p[4] = type;
    p[5] = flags;
    p[6] = 0;
    p[7] = 0;
    put32(p + 8, stream);
}

static size_t queued(void)
{
    return out_tail - out_head;
}

/* Something waits to be written: queued bytes or a spliced block. */
static int pending(void)
{
    return queued() > 0 || splice_left > 0;
}

static void close_pipe(int p[2])
{
    if (p[0] >= 0)
        close(p[0]);
    if (p[1] >= 0)
        close(p[1]);
    p[0] = p[1] = -1;
}

/* Forget the pending block (what is in the pipes belongs to it: new pipes are simplest). */
static void splice_cancel(void)
{
    if (splice_left > 0) {
        close_pipe(take_pipe);
        close_pipe(block_pipe);
    }
    splice_left = 0;
    splice_at = 0;
    splice_started = 0;
}

/* Make n contiguous bytes free at out_tail. Returns 0, or -1 when the queue is full. */
static int reserve(size_t n)
{
    if (queued() + n > OUT_CAP)
        return -1;
    if (out_tail + n > OUT_CAP) {
        memmove(out, out + out_head, queued());
        out_boundary -= out_head;
        out_tail -= out_head;
        if (splice_left > 0)
            splice_at -= out_head; /* >= out_head: nothing beyond it is written yet */
        out_head = 0;
    }
    return 0;
}

/* Drop queued frames that have not begun on the wire (a partly written one stays, so
 * the byte stream keeps its framing). */
static void drop_unsent(void)
{
    if (out_boundary < out_tail)
        out_tail = out_boundary > out_head ? out_boundary : out_head;
    if (splice_left > 0 && !splice_started)
        splice_cancel(); /* the block is behind every byte written: nothing of it went out */
}

static void clear_buffers(void)
{
    in_len = 0;
    skip_input = 0;
    out_head = out_tail = out_boundary = 0;
    splice_cancel();
}

/* The host went away: forget the connection. */
static void hang_up(const char *why)
{
    streams_reset();
    clear_buffers();
    if (kind == CHANNEL_SOCKET) {
        if (why != NULL)
            log_info("agent channel: %s; exiting", why);
        serve_exit(0);
    }
    if (state == CONN_READY || state == CONN_NEW)
        log_info("agent channel: host disconnected%s%s", why != NULL ? ": " : "",
                 why != NULL ? why : "");
    state = CONN_HUNG;
    recheck_at = monotonic_ms() + RECHECK_MS;
}

/* The channel cannot splice the block (or it went missing): copy it into the queue at its
 * place. Returns 0, or -1 (no room). */
static int block_to_queue(void)
{
    size_t n = splice_left;
    if (reserve(n) != 0)
        return -1;
    memmove(out + splice_at + n, out + splice_at, out_tail - splice_at);
    size_t got = 0;
    while (got < n) {
        ssize_t r = read(block_pipe[0], out + splice_at + got, n - got);
        if (r < 0 && errno == EINTR)
            continue;
        if (r <= 0)
            break;
        got += (size_t)r;
    }
    if (got < n) { /* cannot happen; keep the framing and say so */
        log_info("agent channel: %zu bytes of spliced output missing; zeros sent", n - got);
        memset(out + splice_at + got, 0, n - got);
    }
    out_tail += n;
    /* A block not begun: out_boundary (<= splice_at) finds its frames in the queue. One
     * begun: where its frames start is not known, so all of it counts as begun. */
    if (splice_started)
        out_boundary = splice_at + n;
    splice_left = 0;
    splice_at = 0;
    splice_started = 0;
    return 0;
}

static void flush_some(void)
{
    for (;;) {
        size_t end = splice_left > 0 ? splice_at : out_tail;
        if (out_head < end) {
            ssize_t n = write(fd, out + out_head, end - out_head);
            if (n < 0) {
                if (errno == EINTR)
                    continue;
                if (errno == EAGAIN)
                    break;
                char why[96];
                snprintf(why, sizeof(why), "write: %s", strerror(errno));
                hang_up(why);
                return;
            }
            out_head += (size_t)n;
            while (out_boundary < out_head)
                out_boundary += FRAME_HEADER + get32(out + out_boundary);
            continue;
        }
        if (splice_left == 0)
            break;
        /* The queue is out up to the block: now the block, all of it (see the top). */
        ssize_t n = splice(block_pipe[0], NULL, fd, NULL, splice_left, SPLICE_F_NONBLOCK);
        if (n > 0) {
            splice_left -= (size_t)n;
            splice_started = 1;
            if (splice_left == 0)
                splice_at = splice_started = 0;
            continue;
        }
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0 && errno == EAGAIN)
            break;
        if (n < 0 && errno != EINVAL) {
            char why[96];
            snprintf(why, sizeof(why), "splice: %s", strerror(errno));
            hang_up(why);
            return;
        }
        if (n < 0) {
            log_info("agent channel: the channel cannot splice; output is copied");
            splice_off = 1;
        } else {
            log_info("agent channel: spliced output: the pipe is empty with %zu bytes to go",
                     splice_left);
        }
        if (block_to_queue() != 0) {
            hang_up("output queue full while copying spliced output");
            return;
        }
    }
    if (out_head == out_tail && splice_left == 0)
        out_head = out_tail = out_boundary = 0;
}

int channel_send(uint8_t type, uint32_t stream, uint8_t flags, const void *payload,
                 size_t len)
{
    if (state == CONN_CLOSED || state == CONN_HUNG)
        return -1;
    if (len > MAX_PAYLOAD)
        len = MAX_PAYLOAD;
    if (reserve(FRAME_HEADER + len) != 0) {
        log_info("agent channel: output queue full; frame type 0x%02x for stream %u lost",
                 type, stream);
        return -1;
    }
    put_header(out + out_tail, type, stream, flags, len);
    if (len > 0)
        memcpy(out + out_tail + FRAME_HEADER, payload, len);
    out_tail += FRAME_HEADER + len;
    return 0;
}

void channel_send_error(uint32_t stream, const char *code, int err, const char *fmt, ...)
{
    char message[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(message, sizeof(message), fmt, ap);
    va_end(ap);
    char doc[1024];
    struct json_writer w;
    json_writer_init(&w, doc, sizeof(doc));
    json_object_begin(&w);
    json_key(&w, "code");
    json_write_string(&w, code);
    json_key(&w, "errno");
    json_write_int(&w, err);
    json_key(&w, "message");
    json_write_string(&w, message);
    json_object_end(&w);
    ssize_t n = json_writer_finish(&w);
    if (n < 0)
        n = snprintf(doc, sizeof(doc), "{\"code\":\"%s\",\"errno\":%d,\"message\":\"\"}",
                     code, err);
    channel_send(FRAME_ERROR, stream, 0, doc, (size_t)n);
}

void channel_send_credit(uint32_t stream, uint8_t data_type, uint32_t increment)
{
    uint8_t payload[5] = {data_type};
    put32(payload + 1, increment);
    channel_send(FRAME_CREDIT, stream, 0, payload, sizeof(payload));
}

size_t channel_data_room(void)
{
    if (state != CONN_READY || queued() >= DATA_LIMIT || splice_left > 0)
        return 0;
    if (reserve(FRAME_HEADER + peer_max) != 0)
        return 0;
    return peer_max;
}

uint8_t *channel_data_buffer(void)
{
    return out + out_tail + FRAME_HEADER;
}

void channel_data_commit(uint8_t type, uint32_t stream, uint8_t flags, size_t len)
{
    put_header(out + out_tail, type, stream, flags, len);
    out_tail += FRAME_HEADER + len;
}

int channel_data_iov(size_t total, struct iovec *iov, int max)
{
    if (channel_data_room() == 0 || total == 0 || max <= 0)
        return 0;
    /* channel_data_room() made one frame's room; a batch takes at most what keeps the
     * queue under DATA_LIMIT (the bound of one frame at a time, give or take a frame). */
    size_t limit = DATA_LIMIT - queued();
    if (limit < peer_max)
        limit = peer_max;
    if (total > limit)
        total = limit;
    size_t n = (total + peer_max - 1) / peer_max;
    if (n > (size_t)max) {
        n = (size_t)max;
        total = n * peer_max;
    }
    if (n > 1 && reserve(total + n * FRAME_HEADER) != 0) {
        n = 1;
        total = peer_max;
    }
    size_t pos = out_tail;
    for (size_t i = 0; i < n; i++) {
        size_t len = total < peer_max ? total : peer_max;
        iov[i].iov_base = out + pos + FRAME_HEADER;
        iov[i].iov_len = len;
        pos += FRAME_HEADER + len;
        total -= len;
    }
    return (int)n;
}

void channel_data_commit_iov(uint8_t type, uint32_t stream, size_t len)
{
    while (len > 0) {
        size_t n = len < peer_max ? len : peer_max;
        put_header(out + out_tail, type, stream, 0, n);
        out_tail += FRAME_HEADER + n;
        len -= n;
    }
}

static int open_pipe(int p[2], int size)
{
    if (p[0] >= 0)
        return 0;
    if (pipe2(p, O_CLOEXEC | O_NONBLOCK) != 0) {
        log_error(errno, "agent channel: pipe for spliced output");
        p[0] = p[1] = -1;
        return -1;
    }
    if (fcntl(p[0], F_SETPIPE_SZ, size) < 0) {
        log_error(errno, "agent channel: F_SETPIPE_SZ");
        close_pipe(p);
        return -1;
    }
    return 0;
}

/* Move exactly len bytes from the take pipe to the block pipe. */
static int move_all(size_t len)
{
    while (len > 0) {
        ssize_t n = splice(take_pipe[0], NULL, block_pipe[1], NULL, len, SPLICE_F_NONBLOCK);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            return -1;
        len -= (size_t)n;
    }
    return 0;
}

ssize_t channel_data_splice(uint8_t type, uint32_t stream, int src, size_t total,
                            int *drained)
{
    *drained = 0;
    if (splice_off || total == 0 || channel_data_room() == 0 ||
        open_pipe(take_pipe, TAKE_PIPE_SIZE) != 0 ||
        open_pipe(block_pipe, BLOCK_PIPE_SIZE) != 0) {
        errno = EINVAL;
        return -1;
    }
    size_t cap = DATA_LIMIT - queued();
    if (cap > BATCH_FRAMES * peer_max)
        cap = BATCH_FRAMES * peer_max;
    if (total > cap)
        total = cap;
    ssize_t taken;
    do
        taken = splice(src, NULL, take_pipe[1], NULL, total, SPLICE_F_NONBLOCK);
    while (taken < 0 && errno == EINTR);
    if (taken <= 0)
        return taken;
    *drained = (size_t)taken < total;
    size_t left = (size_t)taken, block = 0;
    while (left > 0) {
        size_t n = left < peer_max ? left : peer_max;
        uint8_t header[FRAME_HEADER];
        put_header(header, type, stream, 0, n);
        if (write(block_pipe[1], header, sizeof(header)) != (ssize_t)sizeof(header) ||
            move_all(n) != 0) {
            /* Cannot happen (the block pipe is empty and large enough, see
             * BLOCK_PIPE_SIZE): the bytes taken are lost, and so is the framing. */
            log_error(errno, "agent channel: assembling spliced output");
            close_pipe(take_pipe);
            close_pipe(block_pipe);
            hang_up("spliced output failed");
            errno = EIO;
            return -1;
        }
        block += FRAME_HEADER + n;
        left -= n;
    }
    splice_at = out_tail;
    splice_left = block;
    splice_started = 0;
    return taken;
}

uint32_t channel_peer_window(void)
{
    return peer_window;
}

int channel_ready(void)
{
    return state == CONN_READY;
}

static void send_hello(void)
{
    char doc[512];
    struct json_writer w;
    json_writer_init(&w, doc, sizeof(doc));
    json_object_begin(&w);
    json_key(&w, "version");
    json_write_int(&w, PROTOCOL_VERSION);
    json_key(&w, "features");
    json_array_begin(&w);
    static const char *const features[] = {
        "exec",  "tty",         "signal", "put",  "get",    "info",  "shutdown",
        "console_size", "stdout_port", "stat", "list", "remove", "mkdir", "put_parents",
        "resumed", "resumed_identity", "procs"};
    for (size_t i = 0; i < sizeof(features) / sizeof(features[0]); i++)
        json_write_string(&w, features[i]);
    json_array_end(&w);
    json_key(&w, "software");
    json_write_string(&w, "microagent-init " AGENT_VERSION);
    json_key(&w, "max_payload");
    json_write_int(&w, MAX_PAYLOAD);
    json_key(&w, "window");
    json_write_int(&w, AGENT_WINDOW);
    json_object_end(&w);
    ssize_t n = json_writer_finish(&w);
    if (n > 0)
        channel_send(FRAME_HELLO, 0, 0, doc, (size_t)n);
}

static void on_hello(const uint8_t *payload, size_t len)
{
    struct json_doc doc;
    char error[128];
    if (json_parse(&doc, (const char *)payload, len, hello_tokens,
                   sizeof(hello_tokens) / sizeof(hello_tokens[0]), error, sizeof(error)) != 0
        || doc.tokens[0].type != JSON_OBJECT) {
        channel_send_error(0, "EPROTO", 0, "HELLO: %s", doc.ntokens ? "not an object" : error);
        return;
    }
    long long version, window = AGENT_WINDOW, max_payload = MAX_PAYLOAD;
    if (json_int(&doc, json_find(&doc, 0, "version"), 0, 1LL << 31, &version) != 0) {
        channel_send_error(0, "EPROTO", 0, "HELLO without an integer \"version\"");
        return;
    }
    /* Either way, a HELLO starts the connection over: the old streams end. */
    streams_reset();
    drop_unsent();
    if (version != PROTOCOL_VERSION) {
        state = CONN_RESYNC;
        channel_send_error(0, "EVERSION", 0, "guest agent speaks protocol version %d, the "
                           "host sent version %lld", PROTOCOL_VERSION, version);
        return;
    }
    int t = json_find(&doc, 0, "window");
    if (t >= 0 && json_int(&doc, t, 1, 1LL << 31, &window) != 0) {
        state = CONN_RESYNC;
        channel_send_error(0, "EPROTO", 0, "HELLO: \"window\" must be an integer from 1 to "
                           "2^31");
        return;
    }
    t = json_find(&doc, 0, "max_payload");
    if (t >= 0 && json_int(&doc, t, MIN_PEER_PAYLOAD, 1LL << 31, &max_payload) != 0) {
        state = CONN_RESYNC;
        channel_send_error(0, "EPROTO", 0, "HELLO: \"max_payload\" must be an integer of at "
                           "least %d", MIN_PEER_PAYLOAD);
        return;
    }
    peer_window = (uint32_t)window;
    peer_max = max_payload < MAX_PAYLOAD ? (size_t)max_payload : MAX_PAYLOAD;
    state = CONN_READY;
    send_hello();
    char software[128] = "";
    json_string(&doc, json_find(&doc, 0, "software"), software, sizeof(software));
    log_info("agent channel: hello from %s", software[0] ? software : "the host");
}

static void on_frame(uint8_t type, uint8_t flags, uint32_t stream, const uint8_t *payload,
                     size_t len)
{
    if (type == FRAME_HELLO) {
        if (stream != 0)
            channel_send_error(0, "EPROTO", 0, "HELLO on stream %u", stream);
        else
            on_hello(payload, len);
        return;
    }
    if (state == CONN_RESYNC)
        return;
    if (state == CONN_NEW) {
        channel_send_error(0, "EPROTO", 0, "frame type 0x%02x before HELLO", type);
        return;
    }
    if (stream != 0) {
        if (type == FRAME_OPEN)
            streams_open(stream, payload, len);
        else
            streams_frame(stream, type, flags, payload, len);
        return;
    }
    switch (type) {
    case FRAME_PING:
        channel_send(FRAME_PONG, 0, 0, payload, len < peer_max ? len : peer_max);
        break;
    case FRAME_PONG:
        break;
    case FRAME_ERROR:
        log_info("agent channel: the host reported an error: %.*s",
                 (int)(len < 300 ? len : 300), (const char *)payload);
        break;
    default:
        channel_send_error(0, "EPROTO", 0, "frame type 0x%02x on stream 0", type);
    }
}

/* A malformed header: answer EPROTO (once per resync) and wait for HELLO. */
static void protocol_error(uint32_t length, uint8_t flags, unsigned reserved)
{
    if (state == CONN_RESYNC)
        return;
    streams_reset();
    drop_unsent();
    if (length > MAX_PAYLOAD)
        channel_send_error(0, "EPROTO", 0, "frame of %u bytes exceeds the maximum of %d; "
                           "waiting for HELLO", length, MAX_PAYLOAD);
    else
        channel_send_error(0, "EPROTO", 0, "frame header has reserved bits set "
                           "(flags=0x%02x, reserved=0x%04x); waiting for HELLO", flags,
                           reserved);
    state = CONN_RESYNC;
}

/* Parse and handle the complete frames in the input buffer. */
static void process_input(void)
{
    size_t pos = 0;
    if (skip_input > 0) { /* the rest of a frame refused for its reserved bits */
        size_t n = skip_input < in_len ? skip_input : in_len;
        skip_input -= n;
        pos = n;
    }
    while (in_len - pos >= FRAME_HEADER && queued() < INPUT_LIMIT &&
           (state == CONN_NEW || state == CONN_READY || state == CONN_RESYNC)) {
        const uint8_t *h = in + pos;
        uint32_t length = get32(h);
        uint8_t type = h[4], flags = h[5];
        unsigned reserved = (unsigned)h[6] << 8 | h[7];
        if (length > MAX_PAYLOAD) {
            /* Where the next frame starts is unknown: drop everything buffered. */
            protocol_error(length, flags, reserved);
            in_len = 0;
            return;
        }
        if (reserved != 0 || (flags & ~FLAG_END) != 0) {
            /* The length is still plausible: skip exactly this frame, stay aligned. */
            protocol_error(length, flags, reserved);
            size_t whole = FRAME_HEADER + (size_t)length;
            size_t n = whole < in_len - pos ? whole : in_len - pos;
            skip_input = whole - n;
            pos += n;
            continue;
        }
        if (in_len - pos < FRAME_HEADER + length)
            break;
        on_frame(type, flags, get32(h + 8), h + FRAME_HEADER, length);
        pos += FRAME_HEADER + length;
        if (in_len == 0) /* the connection was dropped while handling the frame */
            return;
    }
    if (pos > 0) {
        memmove(in, in + pos, in_len - pos);
        in_len -= pos;
    }
}

static void read_some(void)
{
    while (in_len < sizeof(in)) {
        ssize_t n = read(fd, in + in_len, sizeof(in) - in_len);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            if (errno == EAGAIN)
                return;
            char why[96];
            snprintf(why, sizeof(why), "read: %s", strerror(errno));
            hang_up(why);
            return;
        }
        if (n == 0) {
            hang_up(kind == CHANNEL_SOCKET ? "the host closed the connection" : NULL);
            return;
        }
        in_len += (size_t)n;
        process_input();
        if (state == CONN_HUNG)
            return;
    }
}

static void on_ready(void *ctx, int tag, int ready_fd, short revents)
{
    (void)ctx;
    (void)tag;
    if (ready_fd != fd || state == CONN_CLOSED || state == CONN_HUNG)
        return;
    if (revents & POLLNVAL) {
        log_info("agent channel: fd %d is not open", fd);
        state = CONN_CLOSED;
        return;
    }
    if (revents & (POLLIN | POLLHUP | POLLERR))
        read_some();
    if (state != CONN_HUNG && state != CONN_CLOSED && (revents & POLLOUT))
        flush_some();
}

/* Virtio-serial: is a host connected now? */
static void check_host(void)
{
    struct pollfd p = {.fd = fd, .events = POLLIN | POLLOUT};
    int n = poll(&p, 1, 0);
    if (n < 0) {
        log_error(errno, "poll the agent channel");
    } else if (!(p.revents & POLLHUP)) {
        state = CONN_NEW;
        clear_buffers();
        return;
    }
    recheck_at = monotonic_ms() + RECHECK_MS;
}

void channel_host_event(void)
{
    if (state == CONN_HUNG)
        check_host();
}

void channel_open(int channel_fd, enum channel_kind channel_kind)
{
    fd = channel_fd;
    kind = channel_kind;
    int flags = fcntl(fd, F_GETFL);
    if (flags < 0 || fcntl(fd, F_SETFL, flags | O_NONBLOCK) != 0)
        log_error(errno, "agent channel: set O_NONBLOCK");
    if (fcntl(fd, F_SETFD, FD_CLOEXEC) != 0)
        log_error(errno, "agent channel: set FD_CLOEXEC");
    clear_buffers();
    if (kind == CHANNEL_VPORT) {
        /* SIGIO when the host connects or disconnects (virtio_console's fasync). */
        if (fcntl(fd, F_SETOWN, getpid()) != 0 || fcntl(fd, F_SETFL,
                                                         fcntl(fd, F_GETFL) | O_ASYNC) != 0)
            log_error(errno, "agent channel: set O_ASYNC");
        state = CONN_HUNG;
        check_host();
    } else {
        state = CONN_NEW;
    }
}

void channel_watch(void)
{
    if (state == CONN_CLOSED)
        return;
    if (state == CONN_HUNG) {
        if (monotonic_ms() >= recheck_at)
            check_host();
        if (state == CONN_HUNG) {
            poller_wake_at(recheck_at);
            return;
        }
    }
    /* Input left unparsed while the output queue was full. */
    if (in_len >= FRAME_HEADER && queued() < INPUT_LIMIT)
        process_input();
    if (state == CONN_HUNG || state == CONN_CLOSED)
        return;
    short events = 0;
    if (in_len < sizeof(in))
        events |= POLLIN;
    if (pending())
        events |= POLLOUT;
    if (events != 0)
        poller_add(fd, events, on_ready, NULL, 0);
}

void channel_write_pending(void)
{
    if (pending() && state != CONN_CLOSED && state != CONN_HUNG)
        flush_some();
}

void channel_flush(int timeout_ms)
{
    const long long deadline = monotonic_ms() + timeout_ms;
    while (pending() && state != CONN_CLOSED && state != CONN_HUNG) {
        long long left = deadline - monotonic_ms();
        if (left <= 0)
            return;
        struct pollfd p = {.fd = fd, .events = POLLOUT};
        if (poll(&p, 1, (int)left) < 0 && errno != EINTR)
            return;
        if (p.revents & POLLHUP)
            return;
        if (p.revents & POLLOUT)
            flush_some();
    }
}
