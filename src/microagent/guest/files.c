/* The put and get operations (`microagent cp`, the API's files.read and files.write).
 *
 * put writes FILE frames into a temporary file beside the target (same directory, so the
 * final rename is atomic), sets owner and mode, fsyncs and renames at END; with
 * "parents" it first makes the missing directories above the target. get sends a
 * regular file's content within the host's credit. Both return credit per frame. */
#include "channel.h"
#include "errnames.h"
#include "io.h"
#include "json.h"
#include "log.h"
#include "ops.h"
#include "paths.h"
#include "poller.h"
#include "streams.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#define MAX_CREDIT (1LL << 40)

struct file_op {
    int fd;
    int put;
    char path[PATH_MAX];
    char tmp[PATH_MAX + 32]; /* put: the temporary file, "" once renamed or removed */
    long long mode, uid, gid; /* put: -1 leaves a value as created */
    long long credit;         /* put: FILE bytes the host may still send; get: we may */
};

static const struct stream_ops put_ops, get_ops;

static void send_exit_ok(struct stream *s)
{
    static const char doc[] = "{\"exit_code\":0,\"signal\":null,\"timed_out\":false}";
    channel_send(FRAME_EXIT, s->id, 0, doc, sizeof(doc) - 1);
    stream_end(s);
}

static void fail_errno(struct stream *s, int err, const char *what)
{
    struct file_op *f = s->state;
    channel_send_error(s->id, errno_name(err), err, "%s %s: %s", what, f->path, strerror(err));
    stream_end(s);
}

static void discard_tmp(struct file_op *f)
{
    if (f->tmp[0] != '\0' && unlink(f->tmp) != 0 && errno != ENOENT)
        log_error(errno, "put: remove %s", f->tmp);
    f->tmp[0] = '\0';
}

static void file_release(struct stream *s)
{
    struct file_op *f = s->state;
    if (f == NULL)
        return;
    if (f->fd >= 0)
        close(f->fd);
    if (f->put)
        discard_tmp(f);
    free(f);
    s->state = NULL;
}

static void file_cancel(struct stream *s, int quiet)
{
    struct file_op *f = s->state;
    if (f->put)
        discard_tmp(f);
    if (!quiet) {
        channel_send_error(s->id, "ECANCELED", ECANCELED, "%s %s cancelled",
                           f->put ? "put" : "get", f->path);
        stream_end(s);
    }
}

/* Request fields shared by put and get: an absolute "path". */
static struct file_op *new_op(struct stream *s, const struct json_doc *doc, int req, int put)
{
    struct file_op *f = calloc(1, sizeof(*f));
    if (f == NULL) {
        channel_send_error(s->id, "ENOMEM", ENOMEM, "out of memory");
        return NULL;
    }
    f->fd = -1;
    f->put = put;
    f->mode = f->uid = f->gid = -1;
    if (json_string(doc, json_find(doc, req, "path"), f->path, sizeof(f->path)) <= 0 ||
        f->path[0] != '/') {
        channel_send_error(s->id, "EINVAL", EINVAL, "%s: \"path\" must be an absolute path",
                           put ? "put" : "get");
        free(f);
        return NULL;
    }
    return f;
}

/* --- put ------------------------------------------------------------------------- */

static void put_finish(struct stream *s)
{
    struct file_op *f = s->state;
    if ((f->uid >= 0 || f->gid >= 0) &&
        fchown(f->fd, (uid_t)f->uid, (gid_t)f->gid) != 0) { /* -1 keeps a value */
        fail_errno(s, errno, "put: chown");
        return;
    }
    /* After fchown, which clears set-id bits. */
    if (fchmod(f->fd, (mode_t)(f->mode >= 0 ? f->mode : 0644)) != 0) {
        fail_errno(s, errno, "put: chmod");
        return;
    }
    if (fsync(f->fd) != 0) {
        fail_errno(s, errno, "put: fsync");
        return;
    }
    int fd = f->fd;
    f->fd = -1;
    if (close(fd) != 0) {
        fail_errno(s, errno, "put: close");
        return;
    }
    if (rename(f->tmp, f->path) != 0) {
        fail_errno(s, errno, "put: rename to");
        return;
    }
    f->tmp[0] = '\0';
    send_exit_ok(s);
}

static void put_frame(struct stream *s, uint8_t type, uint8_t flags, const uint8_t *payload,
                      size_t len)
{
    struct file_op *f = s->state;
    if (type == FRAME_CREDIT)
        return; /* the agent sends no FILE data on a put */
    if (type != FRAME_FILE) {
        stream_fail(s, "EPROTO", 0, "frame type 0x%02x is not valid on a put stream", type);
        return;
    }
    if ((long long)len > f->credit) {
        stream_fail(s, "EPROTO", 0, "FILE of %zu bytes exceeds the credit of %lld", len,
                    f->credit);
        return;
    }
    if (len > 0) {
        if (write_all(f->fd, payload, len) != 0) {
            fail_errno(s, errno, "put: write");
            return;
        }
        channel_send_credit(s->id, FRAME_FILE, (uint32_t)len);
    }
    if (flags & FLAG_END)
        put_finish(s);
}

static const struct stream_ops put_ops = {
    .frame = put_frame,
    .watch = stream_no_watch,
    .tick = stream_no_tick,
    .child_exited = stream_no_child,
    .cancel = file_cancel,
    .release = file_release,
};

/* put's "parents": make the directories above path that are missing. */
static int make_parents(const char *path)
{
    char dir[PATH_MAX];
    size_t len = (size_t)(strrchr(path, '/') - path);
    memcpy(dir, path, len);
    dir[len] = '\0';
    while (len > 1 && dir[len - 1] == '/')
        dir[--len] = '\0';
    int created;
    return path_make_dir(len == 0 ? "/" : dir, 0755, 1, &created);
}

int put_open(struct stream *s, const struct json_doc *doc, int req)
{
    struct file_op *f = new_op(s, doc, req, 1);
    if (f == NULL)
        return -1;
    int parents = 0;
    if (request_int(doc, req, "mode", 07777, &f->mode) != 0 ||
        request_int(doc, req, "uid", 4294967294LL, &f->uid) != 0 ||
        request_int(doc, req, "gid", 4294967294LL, &f->gid) != 0 ||
        request_bool(doc, req, "parents", &parents) != 0) {
        channel_send_error(s->id, "EINVAL", EINVAL, "put: \"mode\", \"uid\" and \"gid\" must "
                           "be non-negative integers, \"parents\" a boolean");
        free(f);
        return -1;
    }
    if (parents && make_parents(f->path) != 0) {
        int err = errno;
        channel_send_error(s->id, errno_name(err), err, "put %s: making its directory: %s",
                           f->path, strerror(err));
        free(f);
        return -1;
    }
    struct stat st;
    if (stat(f->path, &st) == 0 && S_ISDIR(st.st_mode)) {
        channel_send_error(s->id, "EISDIR", EISDIR, "put %s: is a directory", f->path);
        free(f);
        return -1;
    }
    snprintf(f->tmp, sizeof(f->tmp), "%s.microagent-XXXXXX", f->path);
    f->fd = mkostemp(f->tmp, O_CLOEXEC);
    if (f->fd < 0) {
        int err = errno;
        f->tmp[0] = '\0';
        channel_send_error(s->id, errno_name(err), err, "put %s: %s", f->path, strerror(err));
        free(f);
        return -1;
    }
    f->credit = AGENT_WINDOW;
    s->ops = &put_ops;
    s->state = f;
    return 0;
}

/* --- get ------------------------------------------------------------------------- */

static void get_pump(struct stream *s)
{
    struct file_op *f = s->state;
    while (!s->ended) {
        size_t want = channel_data_room();
        if ((long long)want > f->credit)
            want = (size_t)f->credit;
        if (want == 0)
            return;
        ssize_t n = read(f->fd, channel_data_buffer(), want);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            fail_errno(s, errno, "get: read");
            return;
        }
        if (n == 0) {
            channel_send(FRAME_FILE, s->id, FLAG_END, NULL, 0);
            send_exit_ok(s);
            return;
        }
        channel_data_commit(FRAME_FILE, s->id, 0, (size_t)n);
        f->credit -= n;
    }
}

static void get_frame(struct stream *s, uint8_t type, uint8_t flags, const uint8_t *payload,
                      size_t len)
{
    (void)flags;
    struct file_op *f = s->state;
    if (type != FRAME_CREDIT || len != 5 || payload[0] != FRAME_FILE) {
        stream_fail(s, "EPROTO", 0, "frame type 0x%02x is not valid on a get stream", type);
        return;
    }
    long long inc = (long long)payload[1] << 24 | payload[2] << 16 | payload[3] << 8 |
                    payload[4];
    f->credit = f->credit + inc > MAX_CREDIT ? MAX_CREDIT : f->credit + inc;
}

/* A regular file is always readable: ask for an immediate turn while there is credit. */
static void get_watch(struct stream *s)
{
    struct file_op *f = s->state;
    if (f->credit > 0 && channel_data_room() > 0)
        poller_wake_at(0);
}

static void get_tick(struct stream *s, long long now)
{
    (void)now;
    get_pump(s);
}

static const struct stream_ops get_ops = {
    .frame = get_frame,
    .watch = get_watch,
    .tick = get_tick,
    .child_exited = stream_no_child,
    .cancel = file_cancel,
    .release = file_release,
};

int get_open(struct stream *s, const struct json_doc *doc, int req)
{
    struct file_op *f = new_op(s, doc, req, 0);
    if (f == NULL)
        return -1;
    f->fd = open(f->path, O_RDONLY | O_CLOEXEC | O_NOCTTY | O_NONBLOCK);
    struct stat st;
    if (f->fd < 0 || fstat(f->fd, &st) != 0) {
        int err = errno;
        channel_send_error(s->id, errno_name(err), err, "get %s: %s", f->path, strerror(err));
        goto fail;
    }
    if (!S_ISREG(st.st_mode)) {
        int err = S_ISDIR(st.st_mode) ? EISDIR : EINVAL;
        channel_send_error(s->id, errno_name(err), err, "get %s: %s", f->path,
                           S_ISDIR(st.st_mode) ? "is a directory" : "not a regular file");
        goto fail;
    }
    char doc_buf[160];
    struct json_writer w;
    json_writer_init(&w, doc_buf, sizeof(doc_buf));
    json_object_begin(&w);
    json_key(&w, "size");
    json_write_int(&w, (long long)st.st_size);
    json_key(&w, "mode");
    json_write_int(&w, st.st_mode & 07777);
    json_key(&w, "uid");
    json_write_int(&w, st.st_uid);
    json_key(&w, "gid");
    json_write_int(&w, st.st_gid);
    json_key(&w, "mtime");
    json_write_int(&w, (long long)st.st_mtime);
    json_object_end(&w);
    channel_send(FRAME_STARTED, s->id, 0, doc_buf, (size_t)json_writer_finish(&w));
    f->credit = channel_peer_window();
    s->ops = &get_ops;
    s->state = f;
    return 0;
fail:
    if (f->fd >= 0)
        close(f->fd);
    free(f);
    return -1;
}
