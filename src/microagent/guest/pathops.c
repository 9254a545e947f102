/* The stat and mkdir operations: one path each, answered at once with EXIT or ERROR. */
#include "channel.h"
#include "entry.h"
#include "errnames.h"
#include "json.h"
#include "ops.h"
#include "paths.h"

#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

/* EXIT {"exit_code": 0, ...} with the writer's caller adding its own members after. */
static void exit_begin(struct json_writer *w, char *buf, size_t size)
{
    json_writer_init(w, buf, size);
    json_object_begin(w);
    json_key(w, "exit_code");
    json_write_int(w, 0);
    json_key(w, "signal");
    json_write_null(w);
    json_key(w, "timed_out");
    json_write_bool(w, 0);
}

static void send_exit(uint32_t id, struct json_writer *w)
{
    json_object_end(w);
    ssize_t n = json_writer_finish(w);
    if (n < 0)
        channel_send_error(id, "EOVERFLOW", EOVERFLOW, "the answer does not fit its buffer");
    else
        channel_send(FRAME_EXIT, id, 0, w->buf, (size_t)n);
}

static void send_errno(uint32_t id, int err, const char *op, const char *path)
{
    channel_send_error(id, errno_name(err), err, "%s %s: %s", op, path, strerror(err));
}

void stat_run(uint32_t id, const struct json_doc *doc, int req)
{
    char path[PATH_MAX];
    int follow = 0;
    if (request_path(doc, req, path) != 0 || request_bool(doc, req, "follow", &follow) != 0) {
        channel_send_error(id, "EINVAL", EINVAL, "stat: \"path\" must be an absolute path "
                           "and \"follow\" a boolean");
        return;
    }
    struct stat st;
    if (fstatat(AT_FDCWD, path, &st, follow ? 0 : AT_SYMLINK_NOFOLLOW) != 0) {
        send_errno(id, errno, "stat", path);
        return;
    }
    char *buf = malloc(ENTRY_JSON_MAX + 128);
    if (buf == NULL) {
        channel_send_error(id, "ENOMEM", ENOMEM, "out of memory");
        return;
    }
    struct json_writer w;
    exit_begin(&w, buf, ENTRY_JSON_MAX + 128);
    json_key(&w, "entry");
    if (entry_write(&w, path_name(path), &st, AT_FDCWD, path) != 0)
        send_errno(id, errno, "stat: readlink", path);
    else
        send_exit(id, &w);
    free(buf);
}

void mkdir_run(uint32_t id, const struct json_doc *doc, int req)
{
    char path[PATH_MAX];
    long long mode = 0755;
    int parents = 0;
    if (request_path(doc, req, path) != 0 || request_int(doc, req, "mode", 07777, &mode) != 0 ||
        request_bool(doc, req, "parents", &parents) != 0) {
        channel_send_error(id, "EINVAL", EINVAL, "mkdir: \"path\" must be an absolute path, "
                           "\"mode\" an integer from 0 to 0o7777 and \"parents\" a boolean");
        return;
    }
    int created = 0;
    if (path_make_dir(path, (mode_t)mode, parents, &created) != 0) {
        send_errno(id, errno, "mkdir", path);
        return;
    }
    char buf[128];
    struct json_writer w;
    exit_begin(&w, buf, sizeof(buf));
    json_key(&w, "created");
    json_write_bool(&w, created);
    send_exit(id, &w);
}
