/* What stat and list say about one directory entry: its JSON shape (docs/protocol.md,
 * "stat"), from lstat(2) semantics and, for a symlink, its target. */
#ifndef MICROAGENT_ENTRY_H
#define MICROAGENT_ENTRY_H

#include "json.h"

#include <sys/stat.h>

/* The largest entry document: a name of NAME_MAX and a target of PATH_MAX bytes, every
 * byte escaped (\udcXX: 6 bytes), and the numbers. */
#define ENTRY_JSON_MAX (6 * (255 + 4096) + 512)

/* Write {"name", "kind", "size", "mode", "uid", "gid", "mtime_ns"[, "target"]} for the
 * entry st describes; a symlink's target is read with readlinkat(dir, at). Returns 0,
 * or -1 with errno when the target cannot be read (ENOENT, EINVAL: the entry was
 * removed or replaced since st). */
int entry_write(struct json_writer *w, const char *name, const struct stat *st, int dir,
                const char *at);

#endif
