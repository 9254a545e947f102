/* Loading kernel modules. There is no modprobe in the initramfs: the host resolved the
 * dependencies and wrote the modules in load order, so each one is a single syscall. */
#include "modules.h"

#include "log.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
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
        if (load_module(path, params) == 0)
            loaded++;
    }
    if (ferror(list))
        log_error(errno, "read %s", list_path);
    fclose(list);
    return loaded;
}
