/* Stage 1, as PID 1 in the initramfs: reach the root disk and make it /.
 *
 * The switch is done in-process, as busybox's switch_root does it but without the exec:
 * the agent stays PID 1 after the switch. The initramfs's files are deleted first so
 * their memory is given back (a ramfs cannot be unmounted). */
#include "boot.h"

#include "clock.h"
#include "cmdline.h"
#include "log.h"
#include "modules.h"
#include "mounts.h"
#include "power.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/magic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <sys/vfs.h>
#include <unistd.h>

#define NEWROOT "/newroot"
#define DEFAULT_ROOT "/dev/vda"
#define DEFAULT_ROOT_WAIT_S 10
#define ROOT_POLL_MS 10

int in_initramfs(void)
{
    struct statfs fs;
    if (statfs("/", &fs) != 0) {
        log_error(errno, "statfs /");
        return 0;
    }
    return fs.f_type == RAMFS_MAGIC || fs.f_type == TMPFS_MAGIC;
}

/* Wait up to seconds for path to be a block device (devtmpfs creates the node when the
 * driver has probed the disk). */
static int wait_for_block_device(const char *path, int seconds)
{
    const long long deadline = monotonic_ms() + seconds * 1000LL;
    struct stat st;
    for (;;) {
        if (stat(path, &st) == 0) {
            if (S_ISBLK(st.st_mode))
                return 0;
            errno = ENOTBLK;
            return -1;
        }
        if (monotonic_ms() >= deadline)
            break;
        sleep_ms(ROOT_POLL_MS);
    }
    errno = ENOENT;
    return -1;
}

/* Unlink everything under dirfd that lives on device dev; never crosses a mount. */
static void delete_tree(int dirfd, dev_t dev)
{
    DIR *dir = fdopendir(dirfd);
    if (dir == NULL) {
        log_error(errno, "opendir on the initramfs");
        close(dirfd);
        return;
    }
    struct dirent *entry;
    while ((entry = readdir(dir)) != NULL) {
        const char *name = entry->d_name;
        if (strcmp(name, ".") == 0 || strcmp(name, "..") == 0)
            continue;
        struct stat st;
        if (fstatat(dirfd, name, &st, AT_SYMLINK_NOFOLLOW) != 0 || st.st_dev != dev)
            continue;
        if (S_ISDIR(st.st_mode)) {
            int child = openat(dirfd, name, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
            if (child >= 0)
                delete_tree(child, dev);
            else
                log_error(errno, "open initramfs directory %s", name);
            if (unlinkat(dirfd, name, AT_REMOVEDIR) != 0)
                log_error(errno, "remove initramfs directory %s", name);
        } else if (unlinkat(dirfd, name, 0) != 0) {
            log_error(errno, "remove initramfs file %s", name);
        }
    }
    closedir(dir);
}

static void delete_initramfs(void)
{
    struct stat root;
    int fd = open("/", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (fd < 0 || fstat(fd, &root) != 0) {
        log_error(errno, "open the initramfs root");
        if (fd >= 0)
            close(fd);
        return;
    }
    delete_tree(fd, root.st_dev);
}

static void move_into_newroot(const char *path)
{
    char target[64];
    snprintf(target, sizeof(target), NEWROOT "%s", path);
    if (ensure_directory(target) != 0)
        fatal(0, "cannot create %s in the root file system", path);
    if (mount(path, target, NULL, MS_MOVE, NULL) != 0)
        fatal(errno, "move %s to %s", path, target);
}

static void switch_root(void)
{
    move_into_newroot("/dev");
    move_into_newroot("/proc");
    move_into_newroot("/sys");
    delete_initramfs();
    if (chdir(NEWROOT) != 0)
        fatal(errno, "chdir " NEWROOT);
    if (mount(".", "/", NULL, MS_MOVE, NULL) != 0)
        fatal(errno, "move " NEWROOT " to /");
    if (chroot(".") != 0)
        fatal(errno, "chroot " NEWROOT);
    if (chdir("/") != 0)
        fatal(errno, "chdir /");
}

static void mount_root(void)
{
    const char *device = cmdline_get("microagent.root");
    if (device == NULL || *device == '\0')
        device = DEFAULT_ROOT;
    int wait_s = DEFAULT_ROOT_WAIT_S;
    const char *wait_arg = cmdline_get("microagent.rootwait");
    if (wait_arg != NULL)
        wait_s = atoi(wait_arg) > 0 ? atoi(wait_arg) : 0;
    if (wait_for_block_device(device, wait_s) != 0)
        fatal(errno, "root device %s did not appear within %d s", device, wait_s);

    unsigned long flags = 0;
    char data[512];
    const char *options = cmdline_get("microagent.rootflags");
    if (options != NULL && parse_mount_options(options, &flags, data, sizeof(data)) != 0)
        fatal(E2BIG, "microagent.rootflags=%s", options);
    if (ensure_directory(NEWROOT) != 0)
        fatal(0, "cannot create " NEWROOT);
    if (mount(device, NEWROOT, "ext4", flags, options != NULL ? data : NULL) != 0)
        fatal(errno, "mount %s on " NEWROOT, device);
    log_info("root mounted (%s)", device);
}

void boot_stage1(void)
{
    const unsigned long secure = MS_NOSUID | MS_NODEV | MS_NOEXEC;
    if (mount_at("devtmpfs", "/dev", "devtmpfs", MS_NOSUID, "mode=0755") != 0)
        fatal(0, "cannot mount /dev");
    log_attach_console();
    if (mount_at("proc", "/proc", "proc", secure, NULL) != 0)
        fatal(0, "cannot mount /proc");
    if (mount_at("sysfs", "/sys", "sysfs", secure, NULL) != 0)
        fatal(0, "cannot mount /sys");
    if (cmdline_load() != 0)
        fatal(0, "cannot read the kernel command line");
    log_info("modules loaded (%d)", load_modules(MODULE_LIST));
    mount_root();
    switch_root();
}
