/* Paths of the file operations: request fields, a path's directory and name, and the
 * directories that mkdir and put's "parents" make, walked with openat from "/" so that
 * no path is resolved twice (and no recursion: one component at a time). */
#include "paths.h"

#include <errno.h>
#include <fcntl.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#define PARENT_MODE 0755

int request_path(const struct json_doc *doc, int req, char out[PATH_MAX])
{
    ssize_t len = json_string(doc, json_find(doc, req, "path"), out, PATH_MAX);
    if (len <= 0 || out[0] != '/')
        return -1;
    while (len > 1 && out[len - 1] == '/')
        out[--len] = '\0';
    return 0;
}

int request_int(const struct json_doc *doc, int req, const char *key, long long max,
                long long *out)
{
    int t = json_find(doc, req, key);
    if (t < 0 || doc->tokens[t].type == JSON_NULL)
        return 0;
    return json_int(doc, t, 0, max, out);
}

int request_bool(const struct json_doc *doc, int req, const char *key, int *out)
{
    int t = json_find(doc, req, key);
    if (t < 0 || doc->tokens[t].type == JSON_NULL)
        return 0;
    return json_bool(doc, t, out);
}

const char *path_name(const char *path)
{
    const char *slash = strrchr(path, '/');
    return slash == NULL || slash[1] == '\0' ? path : slash + 1;
}

int path_open_parent(const char *path, const char **name)
{
    if (strcmp(path, "/") == 0) {
        errno = EBUSY;
        return -1;
    }
    const char *slash = strrchr(path, '/');
    if (slash == NULL) {
        errno = EINVAL;
        return -1;
    }
    *name = slash + 1;
    if (strcmp(*name, ".") == 0 || strcmp(*name, "..") == 0) {
        errno = EINVAL;
        return -1;
    }
    char dir[PATH_MAX];
    size_t len = (size_t)(slash - path);
    if (len == 0)
        len = 1; /* "/name": the root */
    memcpy(dir, path, len);
    dir[len] = '\0';
    return open(dir, O_PATH | O_DIRECTORY | O_CLOEXEC);
}

/* mkdir name in dir with exactly mode. */
static int make_one(int dir, const char *name, mode_t mode, int *created)
{
    if (mkdirat(dir, name, mode) != 0)
        return -1;
    *created = 1;
    /* mkdir masks with the umask and may drop the set-gid and sticky bits */
    return fchmodat(dir, name, mode, 0);
}

static void close_keeping_errno(int fd)
{
    int err = errno;
    close(fd);
    errno = err;
}

/* The last component: made, or (parents) already a directory. */
static int make_last(int dir, const char *name, mode_t mode, int parents, int *created)
{
    if (make_one(dir, name, mode, created) == 0)
        return 0;
    if (errno != EEXIST || !parents)
        return -1;
    struct stat st;
    if (fstatat(dir, name, &st, 0) == 0 && S_ISDIR(st.st_mode))
        return 0;
    errno = EEXIST;
    return -1;
}

int path_make_dir(const char *path, mode_t mode, int parents, int *created)
{
    *created = 0;
    if (strcmp(path, "/") == 0) {
        if (parents)
            return 0;
        errno = EEXIST;
        return -1;
    }
    if (!parents) {
        const char *name;
        int dir = path_open_parent(path, &name);
        if (dir < 0)
            return errno == EINVAL ? (errno = EEXIST, -1) : -1; /* "." and ".." exist */
        int r = make_last(dir, name, mode, 0, created);
        close_keeping_errno(dir);
        return r;
    }
    int dir = open("/", O_PATH | O_DIRECTORY | O_CLOEXEC);
    if (dir < 0)
        return -1;
    const char *p = path + 1;
    for (;;) {
        const char *slash = strchr(p, '/');
        size_t len = slash != NULL ? (size_t)(slash - p) : strlen(p);
        char name[NAME_MAX + 1];
        if (len > NAME_MAX) {
            close(dir);
            errno = ENAMETOOLONG;
            return -1;
        }
        memcpy(name, p, len);
        name[len] = '\0';
        if (slash == NULL) { /* request_path left no trailing slash: never empty */
            int r = make_last(dir, name, mode, 1, created);
            close_keeping_errno(dir);
            return r;
        }
        p = slash + 1;
        if (len == 0)
            continue; /* "//" */
        int made = 0;
        if (make_one(dir, name, PARENT_MODE, &made) != 0 && (made || errno != EEXIST)) {
            close_keeping_errno(dir);
            return -1;
        }
        int next = openat(dir, name, O_PATH | O_DIRECTORY | O_CLOEXEC);
        close_keeping_errno(dir);
        if (next < 0)
            return -1;
        dir = next;
    }
}
