/* An entry's JSON shape, shared by stat and list. */
#include "entry.h"

#include <errno.h>
#include <limits.h>
#include <unistd.h>

static const char *kind_of(mode_t mode)
{
    return S_ISREG(mode) ? "file" : S_ISDIR(mode) ? "dir" : S_ISLNK(mode) ? "symlink" : "other";
}

int entry_write(struct json_writer *w, const char *name, const struct stat *st, int dir,
                const char *at)
{
    char target[PATH_MAX];
    ssize_t target_len = -1;
    if (S_ISLNK(st->st_mode)) {
        target_len = readlinkat(dir, at, target, sizeof(target));
        if (target_len < 0)
            return -1;
    }
    json_object_begin(w);
    json_key(w, "name");
    json_write_string(w, name);
    json_key(w, "kind");
    json_write_string(w, kind_of(st->st_mode));
    json_key(w, "size");
    json_write_int(w, (long long)st->st_size);
    json_key(w, "mode");
    json_write_int(w, st->st_mode & 07777);
    json_key(w, "uid");
    json_write_int(w, st->st_uid);
    json_key(w, "gid");
    json_write_int(w, st->st_gid);
    json_key(w, "mtime_ns");
    json_write_int(w, (long long)st->st_mtim.tv_sec * 1000000000LL + st->st_mtim.tv_nsec);
    if (target_len >= 0) {
        json_key(w, "target");
        json_write_bytes(w, target, (size_t)target_len);
    }
    json_object_end(w);
    return 0;
}
