/* Finding the agent channel. Ports of a multiport virtio console appear asynchronously
 * after the driver loads (the host announces each port and then its name), and devtmpfs
 * creates /dev/vportNpM shortly after, so both are waited for, but only when a virtio
 * console device exists at all. */
#include "vport.h"

#include "clock.h"
#include "log.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#define PORTS "/sys/class/virtio-ports"
#define DRIVER "/sys/bus/virtio/drivers/virtio_console"
#define POLL_MS 20

/* Whether the virtio console driver is bound to a device. */
static int have_device(void)
{
    DIR *dir = opendir(DRIVER);
    if (dir == NULL)
        return 0;
    int found = 0;
    struct dirent *entry;
    while (!found && (entry = readdir(dir)) != NULL)
        found = strncmp(entry->d_name, "virtio", 6) == 0;
    closedir(dir);
    return found;
}

/* The port's device name (vport0p1) for name, into out; 0 when found. */
static int find_port(const char *name, char *out, size_t size)
{
    DIR *dir = opendir(PORTS);
    if (dir == NULL)
        return -1;
    int found = -1;
    struct dirent *entry;
    while (found != 0 && (entry = readdir(dir)) != NULL) {
        if (entry->d_name[0] == '.')
            continue;
        char path[300], value[128];
        snprintf(path, sizeof(path), PORTS "/%s/name", entry->d_name);
        int fd = open(path, O_RDONLY | O_CLOEXEC);
        if (fd < 0)
            continue;
        ssize_t n = read(fd, value, sizeof(value) - 1);
        close(fd);
        if (n <= 0)
            continue;
        value[n] = '\0';
        value[strcspn(value, "\n")] = '\0';
        if (strcmp(value, name) == 0 && strlen(entry->d_name) < size) {
            memcpy(out, entry->d_name, strlen(entry->d_name) + 1); /* fits: checked */
            found = 0;
        }
    }
    closedir(dir);
    return found;
}

int vport_open(const char *name, int wait_ms, char *path, size_t size)
{
    const long long deadline = monotonic_ms() + (have_device() ? wait_ms : 0);
    for (;;) {
        char port[64];
        if (find_port(name, port, sizeof(port)) == 0) {
            snprintf(path, size, "/dev/%s", port);
            int fd = open(path, O_RDWR | O_NONBLOCK | O_CLOEXEC | O_NOCTTY);
            if (fd >= 0)
                return fd;
            if (errno != ENOENT) {
                log_error(errno, "open %s", path);
                return -1;
            }
        }
        if (monotonic_ms() >= deadline)
            return -1;
        sleep_ms(POLL_MS);
    }
}
