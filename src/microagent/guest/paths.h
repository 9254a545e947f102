/* The paths of the file operations (put, get, stat, list, remove, mkdir): reading a
 * request's fields, splitting a path into its directory and name, making directories. */
#ifndef MICROAGENT_PATHS_H
#define MICROAGENT_PATHS_H

#include "json.h"

#include <limits.h>
#include <sys/types.h>

/* The request's "path" into out (PATH_MAX bytes): an absolute path, trailing slashes
 * removed (but "/" itself). Returns 0, or -1 when missing, not a string or relative. */
int request_path(const struct json_doc *doc, int req, char out[PATH_MAX]);

/* An optional integer field in [0, max]: *out untouched when missing or null. 0 or -1. */
int request_int(const struct json_doc *doc, int req, const char *key, long long max,
                long long *out);

/* An optional boolean field: *out untouched when missing or null. 0 or -1. */
int request_bool(const struct json_doc *doc, int req, const char *key, int *out);

/* The last component of path (a request_path: no trailing slash); "/" for the root. */
const char *path_name(const char *path);

/* Open the directory that holds path's last component (O_PATH: for the *at calls; the
 * directories on the way are followed) and point *name at that component. Returns the
 * fd, or -1 with errno: EBUSY for "/" (it has no parent), EINVAL for a last component
 * "." or "..". */
int path_open_parent(const char *path, const char **name);

/* Make the directory path (mode exactly, not masked by the umask). parents: create the
 * missing directories above it (0755) and accept an existing directory at path (a
 * symlink to one too), as mkdir -p. *created: whether path itself was made. Returns 0,
 * or -1 with errno (EEXIST: path exists and is not a directory, or exists at all
 * without parents; ENOTDIR: a component above is not a directory). */
int path_make_dir(const char *path, mode_t mode, int parents, int *created);

#endif
