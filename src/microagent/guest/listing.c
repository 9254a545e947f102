/* The list operation: a directory's entries, sorted by name, as JSON lines in FILE
 * frames within the host's credit (docs/protocol.md, "list").
 *
 * Two phases, each a bounded amount of work per loop iteration so that other streams
 * keep being served: reading the names (READ_BATCH per turn) into one buffer, then, after
 * sorting them, describing each entry (fstatat, readlinkat) as it is sent. Only the
 * names are held, so memory grows with the directory (bounded by MAX_NAMES_BYTES and
 * MAX_ENTRIES), never with the listing's size on the wire. */
#include "channel.h"
#include "entry.h"
#include "errnames.h"
#include "json.h"
#include "ops.h"
#include "paths.h"
#include "poller.h"
#include "streams.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#define READ_BATCH 4096
#define MAX_ENTRIES (1 << 21)
#define MAX_NAMES_BYTES (64u << 20)
#define MAX_CREDIT (1LL << 40)

struct listing {
    char path[PATH_MAX];
    DIR *dir;
    int reading;           /* phase 1: readdir; else phase 2: sending */
    char *names;           /* NUL-terminated names, one after another */
    size_t names_len, names_cap;
    uint32_t *order;       /* offsets into names, sorted once reading is done */
    size_t count, cap;
    size_t next;           /* the next entry to describe */
    char *line;            /* the entry being sent: JSON and "\n" */
    size_t line_len, line_off;
    long long credit;      /* FILE bytes the host lets us send */
    long long sent;        /* entries sent */
};

static const char *sort_names; /* qsort has no context argument */

static int by_name(const void *a, const void *b)
{
    return strcmp(sort_names + *(const uint32_t *)a, sort_names + *(const uint32_t *)b);
}

static void list_fail(struct stream *s, int err, const char *what)
{
    struct listing *l = s->state;
    channel_send_error(s->id, errno_name(err), err, "list %s: %s%s", l->path, what,
                       strerror(err));
    stream_end(s);
}

static int add_name(struct listing *l, const char *name)
{
    size_t len = strlen(name) + 1;
    if (l->count == MAX_ENTRIES || l->names_len + len > MAX_NAMES_BYTES) {
        errno = EOVERFLOW;
        return -1;
    }
    if (l->count == l->cap) {
        size_t cap = l->cap ? 2 * l->cap : 256;
        uint32_t *order = realloc(l->order, cap * sizeof(*order));
        if (order == NULL)
            return -1;
        l->order = order;
        l->cap = cap;
    }
    if (l->names_len + len > l->names_cap) {
        size_t cap = l->names_cap ? 2 * l->names_cap : 16384;
        while (cap < l->names_len + len)
            cap *= 2;
        char *names = realloc(l->names, cap);
        if (names == NULL)
            return -1;
        l->names = names;
        l->names_cap = cap;
    }
    memcpy(l->names + l->names_len, name, len);
    l->order[l->count++] = (uint32_t)l->names_len;
    l->names_len += len;
    return 0;
}

/* Phase 1: up to READ_BATCH names; sorts them at the end of the directory. */
static void read_names(struct stream *s)
{
    struct listing *l = s->state;
    for (int i = 0; i < READ_BATCH; i++) {
        errno = 0;
        struct dirent *e = readdir(l->dir);
        if (e == NULL) {
            if (errno != 0) {
                list_fail(s, errno, "readdir: ");
                return;
            }
            sort_names = l->names;
            if (l->count > 1)
                qsort(l->order, l->count, sizeof(*l->order), by_name);
            l->reading = 0;
            return;
        }
        if (strcmp(e->d_name, ".") == 0 || strcmp(e->d_name, "..") == 0)
            continue;
        if (add_name(l, e->d_name) != 0) {
            if (errno == EOVERFLOW)
                channel_send_error(s->id, "EOVERFLOW", EOVERFLOW, "list %s: more than %d "
                                   "entries or %u MiB of names: too large to list", l->path,
                                   MAX_ENTRIES, MAX_NAMES_BYTES >> 20);
            else
                channel_send_error(s->id, "ENOMEM", ENOMEM, "list %s: out of memory", l->path);
            stream_end(s);
            return;
        }
    }
}

/* The next entry's line into l->line; 0, 1 when there is none left, or -1 with errno.
 * An entry removed since readdir is skipped. */
static int describe_next(struct listing *l)
{
    while (l->next < l->count) {
        const char *name = l->names + l->order[l->next++];
        struct stat st;
        if (fstatat(dirfd(l->dir), name, &st, AT_SYMLINK_NOFOLLOW) != 0) {
            if (errno == ENOENT)
                continue;
            return -1;
        }
        struct json_writer w;
        json_writer_init(&w, l->line, ENTRY_JSON_MAX);
        if (entry_write(&w, name, &st, dirfd(l->dir), name) != 0) {
            if (errno == ENOENT || errno == EINVAL)
                continue; /* removed, or replaced by something that is no symlink */
            return -1;
        }
        ssize_t n = json_writer_finish(&w);
        if (n < 0) {
            errno = EOVERFLOW;
            return -1;
        }
        l->line[n] = '\n';
        l->line_len = (size_t)n + 1;
        l->line_off = 0;
        l->sent++;
        return 0;
    }
    return 1;
}

static void finish(struct stream *s)
{
    struct listing *l = s->state;
    channel_send(FRAME_FILE, s->id, FLAG_END, NULL, 0);
    char doc[128];
    struct json_writer w;
    json_writer_init(&w, doc, sizeof(doc));
    json_object_begin(&w);
    json_key(&w, "exit_code");
    json_write_int(&w, 0);
    json_key(&w, "signal");
    json_write_null(&w);
    json_key(&w, "timed_out");
    json_write_bool(&w, 0);
    json_key(&w, "count");
    json_write_int(&w, l->sent);
    json_object_end(&w);
    channel_send(FRAME_EXIT, s->id, 0, doc, (size_t)json_writer_finish(&w));
    stream_end(s);
}

/* Phase 2: fill FILE frames with lines (a line may span frames) while there is credit
 * and room in the output queue. */
static void send_entries(struct stream *s)
{
    struct listing *l = s->state;
    while (!s->ended) {
        size_t room = channel_data_room();
        if ((long long)room > l->credit)
            room = (size_t)l->credit;
        if (room == 0)
            return;
        uint8_t *buf = channel_data_buffer();
        size_t n = 0;
        int done = 0, err = 0;
        while (n < room) {
            if (l->line_off == l->line_len) {
                int r = describe_next(l);
                if (r != 0) {
                    done = r > 0;
                    err = r < 0 ? errno : 0;
                    break;
                }
            }
            size_t chunk = l->line_len - l->line_off;
            if (chunk > room - n)
                chunk = room - n;
            memcpy(buf + n, l->line + l->line_off, chunk);
            n += chunk;
            l->line_off += chunk;
        }
        if (n > 0) {
            channel_data_commit(FRAME_FILE, s->id, 0, n);
            l->credit -= (long long)n;
        }
        if (err != 0) {
            list_fail(s, err, "stat: ");
            return;
        }
        if (done) {
            finish(s);
            return;
        }
    }
}

static void list_frame(struct stream *s, uint8_t type, uint8_t flags, const uint8_t *payload,
                       size_t len)
{
    (void)flags;
    struct listing *l = s->state;
    if (type != FRAME_CREDIT || len != 5 || payload[0] != FRAME_FILE) {
        stream_fail(s, "EPROTO", 0, "frame type 0x%02x is not valid on a list stream", type);
        return;
    }
    long long inc = (long long)payload[1] << 24 | payload[2] << 16 | payload[3] << 8 |
                    payload[4];
    l->credit = l->credit + inc > MAX_CREDIT ? MAX_CREDIT : l->credit + inc;
}

static void list_watch(struct stream *s)
{
    struct listing *l = s->state;
    if (l->reading || (l->credit > 0 && channel_data_room() > 0))
        poller_wake_at(0);
}

static void list_tick(struct stream *s, long long now)
{
    (void)now;
    struct listing *l = s->state;
    if (l->reading)
        read_names(s);
    if (!s->ended && !l->reading)
        send_entries(s);
}

static void list_cancel(struct stream *s, int quiet)
{
    struct listing *l = s->state;
    if (!quiet) {
        channel_send_error(s->id, "ECANCELED", ECANCELED, "list %s cancelled", l->path);
        stream_end(s);
    }
}

static void list_release(struct stream *s)
{
    struct listing *l = s->state;
    if (l == NULL)
        return;
    if (l->dir != NULL)
        closedir(l->dir);
    free(l->names);
    free(l->order);
    free(l->line);
    free(l);
    s->state = NULL;
}

static const struct stream_ops list_ops = {
    .frame = list_frame,
    .watch = list_watch,
    .tick = list_tick,
    .child_exited = stream_no_child,
    .cancel = list_cancel,
    .release = list_release,
};

int list_open(struct stream *s, const struct json_doc *doc, int req)
{
    struct listing *l = calloc(1, sizeof(*l));
    if (l == NULL || (l->line = malloc(ENTRY_JSON_MAX + 1)) == NULL) {
        free(l);
        channel_send_error(s->id, "ENOMEM", ENOMEM, "out of memory");
        return -1;
    }
    if (request_path(doc, req, l->path) != 0) {
        channel_send_error(s->id, "EINVAL", EINVAL, "list: \"path\" must be an absolute path");
        goto fail;
    }
    int fd = open(l->path, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (fd < 0 || (l->dir = fdopendir(fd)) == NULL) {
        int err = errno;
        if (fd >= 0)
            close(fd);
        channel_send_error(s->id, errno_name(err), err, "list %s: %s", l->path, strerror(err));
        goto fail;
    }
    l->reading = 1;
    l->credit = channel_peer_window();
    s->ops = &list_ops;
    s->state = l;
    return 0;
fail:
    free(l->line);
    free(l);
    return -1;
}
