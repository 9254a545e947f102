/* Mounting and unmounting file systems, for boot (stage 1 and 2) and for shutdown. */
#include "mounts.h"

#include "log.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <unistd.h>

#define MAX_MOUNTS 256

int ensure_directory(const char *path)
{
    if (mkdir(path, 0755) == 0 || errno == EEXIST)
        return 0;
    log_error(errno, "mkdir %s", path);
    return -1;
}

int is_mountpoint(const char *path)
{
    struct stat self, parent;
    char parent_path[4096];
    if (stat(path, &self) != 0)
        return 0;
    if (snprintf(parent_path, sizeof(parent_path), "%s/..", path) >= (int)sizeof(parent_path))
        return 0;
    if (stat(parent_path, &parent) != 0)
        return 0;
    return self.st_dev != parent.st_dev || self.st_ino == parent.st_ino;
}

int mount_at(const char *source, const char *target, const char *type, unsigned long flags,
             const char *data)
{
    if (ensure_directory(target) != 0)
        return -1;
    if (mount(source, target, type, flags, data) != 0) {
        log_error(errno, "mount %s on %s", source != NULL ? source : "(none)", target);
        return -1;
    }
    return 0;
}

struct flag_name {
    const char *name;
    unsigned long set;
    unsigned long clear;
};

static const struct flag_name flag_names[] = {
    {"ro", MS_RDONLY, 0},           {"rw", 0, MS_RDONLY},
    {"nosuid", MS_NOSUID, 0},       {"suid", 0, MS_NOSUID},
    {"nodev", MS_NODEV, 0},         {"dev", 0, MS_NODEV},
    {"noexec", MS_NOEXEC, 0},       {"exec", 0, MS_NOEXEC},
    {"sync", MS_SYNCHRONOUS, 0},    {"async", 0, MS_SYNCHRONOUS},
    {"noatime", MS_NOATIME, 0},     {"atime", 0, MS_NOATIME},
    {"nodiratime", MS_NODIRATIME, 0},
    {"relatime", MS_RELATIME, 0},   {"norelatime", 0, MS_RELATIME},
    {"strictatime", MS_STRICTATIME, 0},
    {"lazytime", MS_LAZYTIME, 0},   {"dirsync", MS_DIRSYNC, 0},
};

int parse_mount_options(const char *options, unsigned long *flags, char *data, size_t size)
{
    size_t used = 0;
    data[0] = '\0';
    const char *p = options;
    while (*p != '\0') {
        size_t len = strcspn(p, ",");
        int matched = 0;
        for (size_t i = 0; i < sizeof(flag_names) / sizeof(flag_names[0]); i++) {
            if (strlen(flag_names[i].name) == len && strncmp(flag_names[i].name, p, len) == 0) {
                *flags = (*flags | flag_names[i].set) & ~flag_names[i].clear;
                matched = 1;
                break;
            }
        }
        if (!matched && len > 0) {
            if (used + len + 2 > size)
                return -1;
            if (used > 0)
                data[used++] = ',';
            memcpy(data + used, p, len);
            used += len;
            data[used] = '\0';
        }
        p += len;
        if (*p == ',')
            p++;
    }
    return 0;
}

static int ensure_symlink(const char *target, const char *path)
{
    if (symlink(target, path) == 0 || errno == EEXIST)
        return 0;
    log_error(errno, "symlink %s -> %s", path, target);
    return -1;
}

int mount_api_filesystems(void)
{
    const unsigned long secure = MS_NOSUID | MS_NODEV | MS_NOEXEC;
    int failures = 0;
    if (!is_mountpoint("/proc"))
        failures += mount_at("proc", "/proc", "proc", secure, NULL) != 0;
    if (!is_mountpoint("/sys"))
        failures += mount_at("sysfs", "/sys", "sysfs", secure, NULL) != 0;
    if (!is_mountpoint("/dev"))
        failures += mount_at("devtmpfs", "/dev", "devtmpfs", MS_NOSUID, "mode=0755") != 0;
    /* newinstance: the image's own devpts mounts, if any, must not share our ptys; gid 5 is
     * the tty group in every common distribution. */
    if (!is_mountpoint("/dev/pts"))
        failures += mount_at("devpts", "/dev/pts", "devpts", MS_NOSUID | MS_NOEXEC,
                             "newinstance,ptmxmode=0666,mode=0620,gid=5") != 0;
    /* Since Linux 4.7 devtmpfs's /dev/ptmx follows the devpts mounted at /dev/pts; the
     * symlink is only for a /dev without the node. */
    struct stat st;
    if (lstat("/dev/ptmx", &st) != 0)
        failures += ensure_symlink("pts/ptmx", "/dev/ptmx") != 0;
    if (!is_mountpoint("/dev/shm"))
        failures += mount_at("shm", "/dev/shm", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777") != 0;
    if (!is_mountpoint("/run"))
        failures += mount_at("run", "/run", "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755") != 0;
    failures += ensure_symlink("/proc/self/fd", "/dev/fd") != 0;
    failures += ensure_symlink("/proc/self/fd/0", "/dev/stdin") != 0;
    failures += ensure_symlink("/proc/self/fd/1", "/dev/stdout") != 0;
    failures += ensure_symlink("/proc/self/fd/2", "/dev/stderr") != 0;
    return failures;
}

/* Undo the octal escapes (\040 for a space) of a /proc/self/mountinfo path, in place. */
static void unescape(char *s)
{
    char *out = s;
    for (; *s != '\0'; s++) {
        if (s[0] == '\\' && s[1] >= '0' && s[1] <= '3' && s[2] >= '0' && s[2] <= '7' &&
            s[3] >= '0' && s[3] <= '7') {
            *out++ = (char)((s[1] - '0') * 64 + (s[2] - '0') * 8 + (s[3] - '0'));
            s += 3;
        } else {
            *out++ = *s;
        }
    }
    *out = '\0';
}

/* The mount points of /proc/self/mountinfo in mount order; returns their number or -1. */
static int read_mountpoints(char *points[], int max)
{
    FILE *f = fopen("/proc/self/mountinfo", "re");
    if (f == NULL) {
        log_error(errno, "open /proc/self/mountinfo");
        return -1;
    }
    int n = 0;
    char line[4096];
    while (n < max && fgets(line, sizeof(line), f) != NULL) {
        /* fields: id parent major:minor root mountpoint ... */
        char *field = line;
        for (int i = 0; i < 4 && field != NULL; i++) {
            field = strchr(field, ' ');
            if (field != NULL)
                field++;
        }
        if (field == NULL)
            continue;
        field[strcspn(field, " ")] = '\0';
        unescape(field);
        points[n] = strdup(field);
        if (points[n] == NULL) {
            log_error(ENOMEM, "read /proc/self/mountinfo");
            break;
        }
        n++;
    }
    fclose(f);
    return n;
}

void log_mounts(void)
{
    FILE *f = fopen("/proc/self/mountinfo", "re");
    if (f == NULL) {
        log_error(errno, "open /proc/self/mountinfo");
        return;
    }
    char line[4096];
    while (fgets(line, sizeof(line), f) != NULL) {
        /* id parent major:minor root mountpoint options [optional...] - type source ... */
        char *fields[6] = {0};
        char *save = NULL;
        char *token = strtok_r(line, " \n", &save);
        for (int i = 0; token != NULL && i < 6; i++) {
            fields[i] = token;
            token = strtok_r(NULL, " \n", &save);
        }
        while (token != NULL && strcmp(token, "-") != 0)
            token = strtok_r(NULL, " \n", &save);
        char *type = token != NULL ? strtok_r(NULL, " \n", &save) : NULL;
        if (fields[5] == NULL || type == NULL)
            continue;
        unescape(fields[4]);
        log_info("mount %s %s %s", fields[4], type, fields[5]);
    }
    fclose(f);
}

int unmount_all(void)
{
    char *points[MAX_MOUNTS];
    int failures = 0;
    int n = read_mountpoints(points, MAX_MOUNTS);
    for (int i = n - 1; i >= 0; i--) {
        if (strcmp(points[i], "/") != 0 && umount2(points[i], 0) != 0) {
            /* The console keeps /dev busy; a lazy detach still lets / go read-only. */
            if (errno != EBUSY || umount2(points[i], MNT_DETACH) != 0) {
                if (errno != EINVAL && errno != ENOENT) {
                    log_error(errno, "umount %s", points[i]);
                    failures++;
                }
            }
        }
        free(points[i]);
    }
    if (mount(NULL, "/", NULL, MS_REMOUNT | MS_RDONLY, NULL) != 0) {
        log_error(errno, "remount / read-only");
        failures++;
    }
    return failures;
}
