/* Loading kernel modules. There is no modprobe in the initramfs: the host resolved the
 * dependencies and wrote the modules in load order, so each one is a single syscall.
 *
 * The vsock modules (the Firecracker backend's channel) are skipped when the VM has no
 * virtio vsock device (QEMU's): loading a module costs ~10 ms under TCG. The virtio bus
 * has its devices by then: virtio_mmio comes before them in the list. */
#include "modules.h"

#include "log.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

static int load_module(const char *path, const char *params)
{
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        log_error(errno, "open module %s", path);
        return -1;
    }
    /* glibc 2.36 has no finit_module wrapper. */
    long rc = syscall(SYS_finit_module, fd, params, 0);
    int err = errno;
    close(fd);
    if (rc != 0 && err != EEXIST) {
        log_error(err, "load module %s", path);
        return -1;
    }
    return 0;
}

#define VIRTIO_ID_VSOCK 19

/* Whether a virtio device of this id is on the bus. */
static int have_virtio_device(unsigned id)
{
    DIR *dir = opendir("/sys/bus/virtio/devices");
    if (dir == NULL)
        return 0;
    int found = 0;
    struct dirent *entry;
    while (!found && (entry = readdir(dir)) != NULL) {
        if (entry->d_name[0] == '.')
            continue;
        char path[300], value[32] = "";
        snprintf(path, sizeof(path), "/sys/bus/virtio/devices/%s/device", entry->d_name);
        FILE *f = fopen(path, "re");
        if (f == NULL)
            continue;
        if (fgets(value, sizeof(value), f) != NULL && strtoul(value, NULL, 0) == id)
            found = 1;
        fclose(f);
    }
    closedir(dir);
    return found;
}

int load_modules(const char *list_path)
{
    FILE *list = fopen(list_path, "re");
    if (list == NULL) {
        if (errno != ENOENT)
            log_error(errno, "open %s", list_path);
        return 0; /* no list: every driver is built into the kernel */
    }
    int loaded = 0;
    char line[1024];
    while (fgets(line, sizeof(line), list) != NULL) {
        line[strcspn(line, "\r\n")] = '\0';
        char *path = line + strspn(line, " \t");
        if (*path == '\0' || *path == '#')
            continue;
        char *params = path + strcspn(path, " \t");
        if (*params != '\0')
            *params++ = '\0';
        params += strspn(params, " \t");
        if (strstr(path, "/vmw_vsock/") != NULL && !have_virtio_device(VIRTIO_ID_VSOCK))
            continue;
        if (load_module(path, params) == 0)
            loaded++;
    }
    if (ferror(list))
        log_error(errno, "read %s", list_path);
    fclose(list);
    return loaded;
}
