/* Mounting and unmounting file systems. */
#ifndef MICROAGENT_MOUNTS_H
#define MICROAGENT_MOUNTS_H

#include <stddef.h>

/* Create directory path (mode 0755) unless it exists. Returns 0, or -1 after reporting. */
int ensure_directory(const char *path);

/* Whether path is the root of a mount (its device differs from its parent's). */
int is_mountpoint(const char *path);

/* mount(2) onto target (created if missing); reports failures. Returns 0 or -1. */
int mount_at(const char *source, const char *target, const char *type, unsigned long flags,
             const char *data);

/* Split comma-separated options such as "noatime,data=ordered" into mount flags and the
 * file-system specific rest, which is written to data (size bytes). Returns 0, or -1 when
 * data would overflow. */
int parse_mount_options(const char *options, unsigned long *flags, char *data, size_t size);

/* Stage 2: /proc, /sys, /dev, /dev/pts, /dev/shm and /run, each unless already mounted,
 * and the /dev/fd, /dev/std* symlinks. Returns the number of failures (each reported). */
int mount_api_filesystems(void);

/* One console line per mount: "mount <point> <type> <options>" (for tests and debugging). */
void log_mounts(void);

/* Shutdown: unmount everything but / in reverse mount order (detaching busy ones), then
 * remount / read-only. Returns the number of failures (each reported). */
int unmount_all(void);

#endif
