/* Attached disks, mounted in stage 2 before the agent channel opens (so every disk is in
 * place before exec is ready). The host names each disk by its virtio serial, not by
 * probe order, which virtio-mmio under QEMU's microvm does not guarantee; the kernel shows
 * the serial in /sys/block/vdX/serial. Read-only disks are read-only devices on the host
 * side (QEMU readonly=on) and are mounted MS_RDONLY here. */
#include "disks.h"

#include "clock.h"
#include "cmdline.h"
#include "log.h"
#include "power.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <unistd.h>

#define DISK_WAIT_MS 10000
#define POLL_MS 10
#define MAX_DISKS 64

struct disk {
    char serial[32];
    char name[64];
    char dest[1024];
    int read_only;
};

static int hex_value(char c)
{
    if (c >= '0' && c <= '9')
        return c - '0';
    if (c >= 'a' && c <= 'f')
        return c - 'a' + 10;
    if (c >= 'A' && c <= 'F')
        return c - 'A' + 10;
    return -1;
}

/* Undo the host's %XX encoding into out (size bytes). Returns 0, or -1 if malformed. */
static int percent_decode(const char *in, size_t len, char *out, size_t size)
{
    size_t used = 0;
    for (size_t i = 0; i < len; i++) {
        char c = in[i];
        if (c == '%') {
            if (i + 2 >= len)
                return -1;
            int high = hex_value(in[i + 1]);
            int low = hex_value(in[i + 2]);
            if (high < 0 || low < 0)
                return -1;
            c = (char)(high * 16 + low);
            i += 2;
        }
        if (c == '\0' || used + 1 >= size)
            return -1;
        out[used++] = c;
    }
    out[used] = '\0';
    return 0;
}

/* Copy the field [start, end) into out (size bytes). Returns 0, or -1 when too long. */
static int copy_field(const char *start, const char *end, char *out, size_t size)
{
    size_t len = (size_t)(end - start);
    if (len == 0 || len >= size)
        return -1;
    memcpy(out, start, len);
    out[len] = '\0';
    return 0;
}

/* "SERIAL:NAME:DEST:MODE" into disk. Returns 0, or -1 when malformed. */
static int parse_disk(const char *spec, struct disk *disk)
{
    const char *first = strchr(spec, ':');
    const char *second = first != NULL ? strchr(first + 1, ':') : NULL;
    const char *third = second != NULL ? strchr(second + 1, ':') : NULL;
    if (third == NULL || strchr(third + 1, ':') != NULL)
        return -1;
    if (copy_field(spec, first, disk->serial, sizeof(disk->serial)) != 0 ||
        copy_field(first + 1, second, disk->name, sizeof(disk->name)) != 0 ||
        percent_decode(second + 1, (size_t)(third - second - 1), disk->dest,
                       sizeof(disk->dest)) != 0)
        return -1;
    if (strcmp(third + 1, "ro") == 0)
        disk->read_only = 1;
    else if (strcmp(third + 1, "rw") == 0)
        disk->read_only = 0;
    else
        return -1;
    return disk->dest[0] == '/' ? 0 : -1;
}

/* Whether /sys/block/<name>/serial holds serial (the file may end in a newline). */
static int serial_matches(const char *name, const char *serial)
{
    char path[300], found[64];
    snprintf(path, sizeof(path), "/sys/block/%s/serial", name);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return 0;
    ssize_t n = read(fd, found, sizeof(found) - 1);
    close(fd);
    if (n <= 0)
        return 0;
    found[n] = '\0';
    found[strcspn(found, "\n")] = '\0';
    return strcmp(found, serial) == 0;
}

/* The /dev node of the disk with this serial, waiting for it to be probed. */
static int find_device(const char *serial, char *device, size_t size)
{
    const long long deadline = monotonic_ms() + DISK_WAIT_MS;
    for (;;) {
        DIR *dir = opendir("/sys/block");
        if (dir == NULL)
            return -1;
        struct dirent *entry;
        int found = 0;
        while ((entry = readdir(dir)) != NULL) {
            if (entry->d_name[0] != '.' && serial_matches(entry->d_name, serial)) {
                snprintf(device, size, "/dev/%s", entry->d_name);
                found = 1;
                break;
            }
        }
        closedir(dir);
        struct stat st;
        if (found && stat(device, &st) == 0 && S_ISBLK(st.st_mode))
            return 0;
        if (monotonic_ms() >= deadline) {
            errno = ENODEV;
            return -1;
        }
        sleep_ms(POLL_MS);
    }
}

/* mkdir -p path (0755), refusing a component that exists and is not a directory
 * (symlinks to directories are followed, as mount(2) would). Returns 0, or -1 with errno
 * set and the length of the offending prefix of path in bad. */
static int make_mountpoint(const char *path, size_t *bad)
{
    char prefix[1024];
    size_t len = strlen(path);
    *bad = len;
    if (len >= sizeof(prefix)) {
        errno = ENAMETOOLONG;
        return -1;
    }
    for (size_t i = 1; i <= len; i++) {
        if (i < len && path[i] != '/')
            continue;
        memcpy(prefix, path, i);
        prefix[i] = '\0';
        *bad = i;
        struct stat st;
        if (stat(prefix, &st) == 0) {
            if (!S_ISDIR(st.st_mode)) {
                errno = ENOTDIR;
                return -1;
            }
            continue;
        }
        if (errno != ENOENT)
            return -1;
        if (mkdir(prefix, 0755) != 0 && errno != EEXIST)
            return -1;
    }
    return 0;
}

static void attach(const struct disk *disk)
{
    char device[300];
    size_t bad;
    if (find_device(disk->serial, device, sizeof(device)) != 0)
        fatal(errno, "disk %s (serial %s) for %s did not appear within %d s", disk->name,
              disk->serial, disk->dest, DISK_WAIT_MS / 1000);
    if (make_mountpoint(disk->dest, &bad) != 0) {
        if (errno == ENOTDIR)
            fatal(0, "disk %s cannot be mounted on %s: %.*s is not a directory in the image",
                  disk->name, disk->dest, (int)bad, disk->dest);
        fatal(errno, "disk %s cannot be mounted on %s: cannot create %.*s", disk->name,
              disk->dest, (int)bad, disk->dest);
    }
    unsigned long flags = disk->read_only ? MS_RDONLY : 0;
    int mounted = mount(device, disk->dest, "ext4", flags, NULL) == 0;
    if (!mounted && disk->read_only && errno == EROFS) {
        /* A journal left unrecovered by a VM that was killed cannot be replayed on a
         * read-only device; without it the last moments before the kill may be missing. */
        mounted = mount(device, disk->dest, "ext4", flags, "noload") == 0;
        if (mounted)
            log_info("disk %s: its journal needs recovery, which a read-only device cannot "
                     "do; mounted without it", disk->name);
    }
    if (!mounted) {
        int err = errno;
        if (err == EINVAL)
            fatal(0, "disk %s cannot be mounted on %s: %s is not an ext4 file system",
                  disk->name, disk->dest, device);
        fatal(err, "disk %s cannot be mounted on %s (%s)", disk->name, disk->dest, device);
    }
    log_info("disk %s mounted on %s (%s, %s)", disk->name, disk->dest, device,
             disk->read_only ? "ro" : "rw");
}

int disks_attach(void)
{
    int n = 0;
    const char *spec;
    while (n < MAX_DISKS && (spec = cmdline_get_nth("microagent.disk", n)) != NULL) {
        struct disk disk;
        memset(&disk, 0, sizeof(disk));
        if (parse_disk(spec, &disk) != 0)
            fatal(0, "malformed microagent.disk=%s", spec);
        attach(&disk);
        n++;
    }
    return n;
}
