/* The remove operation: a file, a symlink, an empty directory, or with "recursive" a
 * whole tree (docs/protocol.md, "remove").
 *
 * A tree is walked with an explicit stack, never by recursion: each level is a
 * directory opened with openat(O_NOFOLLOW | O_DIRECTORY) from its parent, so a symlink
 * inside the tree is removed, never followed, and a directory on another file system (a
 * mount point) is not entered. Only the deepest KEEP_OPEN levels keep their directory
 * open (a deep tree must not use an fd per level); climbing back into a level that was
 * closed reopens it through ".." and checks that it is the same directory (device and
 * inode). Entries go one at a time, REMOVE_BATCH per loop iteration, so a large tree
 * never stops the agent from serving the other streams; a STARTED frame with the count
 * so far goes out at the start and then once a second, so that the host can tell a long
 * removal from a guest that stopped. */
#include "channel.h"
#include "errnames.h"
#include "json.h"
#include "ops.h"
#include "paths.h"
#include "poller.h"
#include "streams.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#define REMOVE_BATCH 256
#define KEEP_OPEN 16
#define PROGRESS_MS 1000

struct level {
    DIR *dir;     /* NULL while closed (a level above the deepest KEEP_OPEN) */
    dev_t dev;
    ino_t ino;
    char *name;   /* its name in the level above (the top's: in the parent of path) */
};

struct removal {
    char path[PATH_MAX];
    int parent;           /* the directory that holds path's last component */
    dev_t tree_dev;       /* the top directory's file system */
    struct level *stack;
    size_t depth, cap;
    long long removed;
    long long progress_at; /* when the next STARTED goes out */
};

static void send_removed(struct stream *s, uint32_t id, long long removed)
{
    char doc[128];
    int n = snprintf(doc, sizeof(doc), "{\"exit_code\":0,\"signal\":null,\"timed_out\":false,"
                     "\"removed\":%lld}", removed);
    channel_send(FRAME_EXIT, id, 0, doc, (size_t)n);
    if (s != NULL)
        stream_end(s);
}

/* ERROR naming the entry below path where err happened: path/level/.../name. */
static void remove_fail(struct stream *s, int err, const char *what, const char *name)
{
    struct removal *r = s->state;
    char where[PATH_MAX];
    size_t len = (size_t)snprintf(where, sizeof(where), "%s", r->path);
    for (size_t i = 1; i < r->depth && len < sizeof(where); i++)
        len += (size_t)snprintf(where + len, sizeof(where) - len, "/%s", r->stack[i].name);
    if (name != NULL && len < sizeof(where))
        snprintf(where + len, sizeof(where) - len, "/%s", name);
    channel_send_error(s->id, errno_name(err), err, "remove %s: %s %s: %s (%lld removed)",
                       r->path, what, where, strerror(err), r->removed);
    stream_end(s);
}

static int level_fd(const struct removal *r, size_t i)
{
    return i == 0 ? r->parent : dirfd(r->stack[i - 1].dir);
}

/* Enter the directory name of the top level (or path's own, for the first level) whose
 * lstat is st. Returns 0, or -1 with errno. */
static int push(struct removal *r, int at, const char *name, const struct stat *st)
{
    if (r->depth == r->cap) {
        size_t cap = r->cap ? 2 * r->cap : 32;
        struct level *stack = realloc(r->stack, cap * sizeof(*stack));
        if (stack == NULL)
            return -1;
        r->stack = stack;
        r->cap = cap;
    }
    int fd = openat(at, name, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
    if (fd < 0)
        return -1;
    struct stat now;
    if (fstat(fd, &now) != 0 || now.st_dev != st->st_dev || now.st_ino != st->st_ino) {
        close(fd);
        errno = EBUSY; /* replaced between lstat and open */
        return -1;
    }
    struct level *l = &r->stack[r->depth];
    *l = (struct level){.dev = st->st_dev, .ino = st->st_ino, .name = strdup(name)};
    if (l->name == NULL || (l->dir = fdopendir(fd)) == NULL) {
        int err = l->name == NULL ? ENOMEM : errno;
        free(l->name);
        close(fd);
        errno = err;
        return -1;
    }
    r->depth++;
    if (r->depth > KEEP_OPEN) {
        struct level *old = &r->stack[r->depth - KEEP_OPEN - 1];
        closedir(old->dir);
        old->dir = NULL;
    }
    return 0;
}

/* The top level is empty: reopen the level above if it was closed, remove the top. */
static int pop(struct removal *r, const char **failed_op)
{
    struct level *top = &r->stack[r->depth - 1];
    if (r->depth >= 2 && r->stack[r->depth - 2].dir == NULL) {
        struct level *up = &r->stack[r->depth - 2];
        *failed_op = "reopen the directory above";
        int fd = openat(dirfd(top->dir), "..", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
        struct stat st;
        if (fd < 0)
            return -1;
        if (fstat(fd, &st) != 0 || st.st_dev != up->dev || st.st_ino != up->ino) {
            close(fd);
            errno = EBUSY; /* moved away while we were below it */
            return -1;
        }
        if ((up->dir = fdopendir(fd)) == NULL) {
            int err = errno;
            close(fd);
            errno = err;
            return -1;
        }
    }
    closedir(top->dir);
    top->dir = NULL;
    r->depth--;
    *failed_op = "rmdir";
    if (unlinkat(level_fd(r, r->depth), top->name, AT_REMOVEDIR) != 0) {
        r->depth++; /* kept, so that the message names it */
        return -1;
    }
    free(top->name);
    top->name = NULL;
    r->removed++;
    return 0;
}

/* One entry of the top level: a file removed, a directory entered, or the top level
 * itself removed when it is empty. Returns 0, or -1 after ending the stream. */
static int step(struct stream *s)
{
    struct removal *r = s->state;
    struct level *top = &r->stack[r->depth - 1];
    errno = 0;
    struct dirent *e = readdir(top->dir);
    if (e == NULL) {
        const char *op = "readdir";
        if (errno != 0 || pop(r, &op) != 0) {
            remove_fail(s, errno, op, NULL);
            return -1;
        }
        return 0;
    }
    if (strcmp(e->d_name, ".") == 0 || strcmp(e->d_name, "..") == 0)
        return 0;
    int at = dirfd(top->dir);
    struct stat st;
    if (e->d_type == DT_DIR || e->d_type == DT_UNKNOWN) {
        if (fstatat(at, e->d_name, &st, AT_SYMLINK_NOFOLLOW) != 0) {
            if (errno == ENOENT)
                return 0;
            remove_fail(s, errno, "lstat", e->d_name);
            return -1;
        }
        if (S_ISDIR(st.st_mode)) {
            /* A mount point in the tree: not entered (its rmdir says EBUSY). */
            if (st.st_dev != r->tree_dev) {
                if (unlinkat(at, e->d_name, AT_REMOVEDIR) == 0) {
                    r->removed++;
                    return 0;
                }
                remove_fail(s, errno, "rmdir", e->d_name);
                return -1;
            }
            if (push(r, at, e->d_name, &st) != 0) {
                if (errno == ENOENT)
                    return 0;
                remove_fail(s, errno, "open", e->d_name);
                return -1;
            }
            return 0;
        }
    }
    if (unlinkat(at, e->d_name, 0) != 0 && errno != ENOENT) {
        remove_fail(s, errno, "unlink", e->d_name);
        return -1;
    }
    r->removed++;
    return 0;
}

static void remove_tick(struct stream *s, long long now)
{
    struct removal *r = s->state;
    if (now >= r->progress_at) {
        char doc[64];
        int n = snprintf(doc, sizeof(doc), "{\"removed\":%lld}", r->removed);
        channel_send(FRAME_STARTED, s->id, 0, doc, (size_t)n);
        r->progress_at = now + PROGRESS_MS;
    }
    for (int i = 0; i < REMOVE_BATCH && !s->ended; i++) {
        if (r->depth == 0) {
            send_removed(s, s->id, r->removed);
            return;
        }
        if (step(s) != 0)
            return;
    }
}

static void remove_watch(struct stream *s)
{
    (void)s;
    poller_wake_at(0);
}

static void remove_frame(struct stream *s, uint8_t type, uint8_t flags,
                         const uint8_t *payload, size_t len)
{
    (void)flags;
    (void)payload;
    (void)len;
    stream_fail(s, "EPROTO", 0, "frame type 0x%02x is not valid on a remove stream", type);
}

static void remove_cancel(struct stream *s, int quiet)
{
    struct removal *r = s->state;
    if (!quiet) {
        channel_send_error(s->id, "ECANCELED", ECANCELED, "remove %s cancelled after %lld "
                           "entries", r->path, r->removed);
        stream_end(s);
    }
}

static void free_removal(struct removal *r)
{
    for (size_t i = 0; i < r->depth; i++) {
        if (r->stack[i].dir != NULL)
            closedir(r->stack[i].dir);
        free(r->stack[i].name);
    }
    free(r->stack);
    if (r->parent >= 0)
        close(r->parent);
    free(r);
}

static void remove_release(struct stream *s)
{
    if (s->state != NULL)
        free_removal(s->state);
    s->state = NULL;
}

static const struct stream_ops remove_ops = {
    .frame = remove_frame,
    .watch = remove_watch,
    .tick = remove_tick,
    .child_exited = stream_no_child,
    .cancel = remove_cancel,
    .release = remove_release,
};

int remove_open(struct stream *s, const struct json_doc *doc, int req)
{
    struct removal *r = calloc(1, sizeof(*r));
    if (r == NULL) {
        channel_send_error(s->id, "ENOMEM", ENOMEM, "out of memory");
        return -1;
    }
    r->parent = -1;
    int recursive = 0;
    if (request_path(doc, req, r->path) != 0 ||
        request_bool(doc, req, "recursive", &recursive) != 0) {
        channel_send_error(s->id, "EINVAL", EINVAL, "remove: \"path\" must be an absolute "
                           "path and \"recursive\" a boolean");
        free_removal(r);
        return -1;
    }
    const char *name = NULL;
    struct stat st;
    r->parent = path_open_parent(r->path, &name);
    if (r->parent < 0 || fstatat(r->parent, name, &st, AT_SYMLINK_NOFOLLOW) != 0)
        goto fail;
    if (!S_ISDIR(st.st_mode) || !recursive) {
        if (unlinkat(r->parent, name, S_ISDIR(st.st_mode) ? AT_REMOVEDIR : 0) != 0)
            goto fail;
        send_removed(NULL, s->id, 1);
        free_removal(r);
        return -1; /* done at once: the slot is free again */
    }
    /* A mount point: refused before anything in it goes (rm -rf would empty it). */
    struct stat above;
    if (fstat(r->parent, &above) != 0)
        goto fail;
    if (above.st_dev != st.st_dev) {
        errno = EBUSY;
        goto fail;
    }
    r->tree_dev = st.st_dev;
    if (push(r, r->parent, name, &st) != 0)
        goto fail;
    s->ops = &remove_ops;
    s->state = r;
    return 0;
fail:;
    int err = errno;
    channel_send_error(s->id, errno_name(err), err, "remove %s: %s", r->path,
                       err != EBUSY                ? strerror(err)
                       : strcmp(r->path, "/") == 0 ? "the root cannot be removed"
                                                   : "a mount point (or busy): not removed");
    free_removal(r);
    return -1;
}
