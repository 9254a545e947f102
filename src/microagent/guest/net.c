/* Networking. Images such as ubuntu:24.04 have no `ip`, so everything is done with the
 * old ioctl interface, which needs no netlink parsing: SIOCSIFADDR, SIOCSIFNETMASK,
 * SIOCSIFFLAGS and SIOCADDRT.
 *
 * resolv.conf is written to /run/microagent/resolv.conf (a tmpfs) and bind-mounted over
 * /etc/resolv.conf, so the image's file is never written. When /etc/resolv.conf is a
 * symlink into /run (Ubuntu's points to ../run/systemd/resolve/stub-resolv.conf), the
 * target is created on the fresh /run instead. */
#include "net.h"

#include "clock.h"
#include "cmdline.h"
#include "log.h"
#include "mounts.h"

#include <arpa/inet.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <net/if.h>
#include <net/route.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mount.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#define RESOLV "/etc/resolv.conf"
#define RUN_DIR "/run/microagent"
#define RUN_RESOLV RUN_DIR "/resolv.conf"
#define INTERFACE_WAIT_MS 3000

static struct {
    int configured;
    char address[32];
    char gateway[16];
    char dns[64];
    char interface[IFNAMSIZ];
    char detail[200];
    int resolv_mounted;     /* a bind mount over RESOLV */
    int resolv_placeholder; /* RESOLV did not exist: the agent created it */
} net;

static void set_detail(const char *fmt, const char *a, int err)
{
    char text[160];
    snprintf(text, sizeof(text), fmt, a);
    if (err != 0)
        snprintf(net.detail, sizeof(net.detail), "%s: %s", text, strerror(err));
    else
        snprintf(net.detail, sizeof(net.detail), "%s", text);
}

static int set_flags_up(int sock, const char *name)
{
    struct ifreq ifr;
    memset(&ifr, 0, sizeof(ifr));
    snprintf(ifr.ifr_name, sizeof(ifr.ifr_name), "%s", name);
    if (ioctl(sock, SIOCGIFFLAGS, &ifr) != 0)
        return -1;
    ifr.ifr_flags |= IFF_UP | IFF_RUNNING;
    return ioctl(sock, SIOCSIFFLAGS, &ifr);
}

static int set_address(int sock, const char *name, unsigned long request, struct in_addr a)
{
    struct ifreq ifr;
    memset(&ifr, 0, sizeof(ifr));
    snprintf(ifr.ifr_name, sizeof(ifr.ifr_name), "%s", name);
    struct sockaddr_in sin = {.sin_family = AF_INET, .sin_addr = a};
    memcpy(&ifr.ifr_addr, &sin, sizeof(sin));
    return ioctl(sock, request, &ifr);
}

static int add_default_route(int sock, const char *name, struct in_addr gw)
{
    struct rtentry rt;
    memset(&rt, 0, sizeof(rt));
    struct sockaddr_in any = {.sin_family = AF_INET};
    struct sockaddr_in gateway = {.sin_family = AF_INET, .sin_addr = gw};
    memcpy(&rt.rt_dst, &any, sizeof(any));
    memcpy(&rt.rt_genmask, &any, sizeof(any));
    memcpy(&rt.rt_gateway, &gateway, sizeof(gateway));
    rt.rt_flags = RTF_UP | RTF_GATEWAY;
    char dev[IFNAMSIZ];
    snprintf(dev, sizeof(dev), "%s", name);
    rt.rt_dev = dev;
    if (ioctl(sock, SIOCADDRT, &rt) != 0 && errno != EEXIST)
        return -1;
    return 0;
}

/* The first interface that is not loopback ("eth0" preferred), waiting for the driver. */
static int find_interface(char *name, size_t size)
{
    const long long deadline = monotonic_ms() + INTERFACE_WAIT_MS;
    for (;;) {
        DIR *dir = opendir("/sys/class/net");
        if (dir == NULL)
            return -1;
        char best[IFNAMSIZ] = "";
        struct dirent *entry;
        while ((entry = readdir(dir)) != NULL) {
            const char *n = entry->d_name;
            if (n[0] == '.' || strcmp(n, "lo") == 0 || strlen(n) >= IFNAMSIZ)
                continue;
            if (best[0] == '\0' || strcmp(n, "eth0") == 0 ||
                (strcmp(best, "eth0") != 0 && strcmp(n, best) < 0))
                memcpy(best, n, strlen(n) + 1); /* shorter than IFNAMSIZ */
        }
        closedir(dir);
        if (best[0] != '\0') {
            snprintf(name, size, "%s", best);
            return 0;
        }
        if (monotonic_ms() >= deadline)
            return -1;
        sleep_ms(20);
    }
}

static int write_file(const char *path, const char *text)
{
    int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC | O_NOFOLLOW, 0644);
    if (fd < 0)
        return -1;
    size_t len = strlen(text);
    ssize_t n = write(fd, text, len);
    int err = errno;
    if (close(fd) != 0 || n != (ssize_t)len) {
        errno = n < 0 ? err : EIO;
        return -1;
    }
    return 0;
}

/* mkdir -p of path's parent directories (path itself excluded). */
static int make_parents(const char *path)
{
    char buf[4096];
    if (snprintf(buf, sizeof(buf), "%s", path) >= (int)sizeof(buf))
        return -1;
    for (char *p = buf + 1; *p != '\0'; p++) {
        if (*p != '/')
            continue;
        *p = '\0';
        if (mkdir(buf, 0755) != 0 && errno != EEXIST)
            return -1;
        *p = '/';
    }
    return 0;
}

/* Resolve a symlink target found in /etc lexically ("." and ".." removed). */
static int normalize(const char *target, char *out, size_t size)
{
    char joined[4096];
    if (snprintf(joined, sizeof(joined), "%s%s", target[0] == '/' ? "" : "/etc/", target) >=
        (int)sizeof(joined))
        return -1;
    size_t len = 0;
    out[0] = '\0';
    char *save = NULL;
    for (char *part = strtok_r(joined, "/", &save); part != NULL;
         part = strtok_r(NULL, "/", &save)) {
        if (strcmp(part, ".") == 0)
            continue;
        if (strcmp(part, "..") == 0) {
            while (len > 0 && out[len - 1] != '/')
                len--;
            if (len > 0)
                len--;
            out[len] = '\0';
            continue;
        }
        size_t n = strlen(part);
        if (len + n + 2 > size)
            return -1;
        out[len++] = '/';
        memcpy(out + len, part, n + 1);
        len += n;
    }
    if (len == 0)
        snprintf(out, size, "/");
    return 0;
}

static void provide_resolv_conf(const char *content)
{
    if (ensure_directory(RUN_DIR) != 0 || write_file(RUN_RESOLV, content) != 0) {
        log_error(errno, "write " RUN_RESOLV);
        return;
    }
    struct stat st;
    if (lstat(RESOLV, &st) != 0) {
        if (errno != ENOENT) {
            log_error(errno, "lstat " RESOLV);
            return;
        }
        /* A mount point must exist: an empty placeholder, removed again at shutdown. */
        int fd = open(RESOLV, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC | O_NOFOLLOW, 0644);
        if (fd < 0) {
            log_error(errno, "create " RESOLV);
            return;
        }
        close(fd);
        net.resolv_placeholder = 1;
    } else if (S_ISLNK(st.st_mode) && stat(RESOLV, &st) != 0) {
        /* A dangling symlink: create its target if it lies on the fresh /run. */
        char target[4096], resolved[4096];
        ssize_t n = readlink(RESOLV, target, sizeof(target) - 1);
        if (n < 0) {
            log_error(errno, "readlink " RESOLV);
            return;
        }
        target[n] = '\0';
        if (normalize(target, resolved, sizeof(resolved)) != 0 ||
            strncmp(resolved, "/run/", 5) != 0) {
            log_info("cannot provide " RESOLV ": it links to %s, which is missing and not "
                     "under /run", target);
            return;
        }
        if (make_parents(resolved) != 0 || write_file(resolved, content) != 0)
            log_error(errno, "write %s (the target of " RESOLV ")", resolved);
        return;
    }
    if (mount(RUN_RESOLV, RESOLV, NULL, MS_BIND, NULL) != 0) {
        log_error(errno, "bind-mount " RUN_RESOLV " on " RESOLV);
        return;
    }
    net.resolv_mounted = 1;
}

/* "a,b,c" -> "nameserver a\nnameserver b\n..." (invalid addresses skipped). */
static int resolv_content(const char *list, char *out, size_t size)
{
    size_t len = 0;
    int count = 0;
    out[0] = '\0';
    const char *p = list;
    while (*p != '\0') {
        size_t n = strcspn(p, ",");
        char addr[64];
        struct in_addr a;
        struct in6_addr a6;
        if (n < sizeof(addr)) {
            memcpy(addr, p, n);
            addr[n] = '\0';
            if (inet_pton(AF_INET, addr, &a) == 1 || inet_pton(AF_INET6, addr, &a6) == 1) {
                int w = snprintf(out + len, size - len, "nameserver %s\n", addr);
                if (w > 0 && (size_t)w < size - len) {
                    len += (size_t)w;
                    count++;
                }
            } else {
                log_info("microagent.dns: %s is not an IP address", addr);
            }
        }
        p += n;
        if (*p == ',')
            p++;
    }
    return count;
}

static void configure_interface(int sock, const char *ip, const char *gw)
{
    char addr_text[24];
    const char *slash = strchr(ip, '/');
    long prefix = 24;
    size_t alen = slash != NULL ? (size_t)(slash - ip) : strlen(ip);
    if (slash != NULL) {
        char *end;
        prefix = strtol(slash + 1, &end, 10);
        if (slash[1] == '\0' || *end != '\0' || prefix < 0 || prefix > 32)
            prefix = -1;
    }
    struct in_addr addr, mask, gateway;
    if (alen >= sizeof(addr_text) || prefix < 0) {
        set_detail("microagent.ip=%s is not ADDRESS/PREFIX", ip, 0);
        return;
    }
    memcpy(addr_text, ip, alen);
    addr_text[alen] = '\0';
    if (inet_pton(AF_INET, addr_text, &addr) != 1) {
        set_detail("microagent.ip=%s is not an IPv4 address", ip, 0);
        return;
    }
    mask.s_addr = htonl(prefix == 0 ? 0 : 0xffffffffu << (32 - prefix));
    if (gw != NULL && inet_pton(AF_INET, gw, &gateway) != 1) {
        set_detail("microagent.gw=%s is not an IPv4 address", gw, 0);
        return;
    }
    if (find_interface(net.interface, sizeof(net.interface)) != 0) {
        set_detail("no network interface besides lo%s", "", 0);
        return;
    }
    snprintf(net.address, sizeof(net.address), "%s/%ld", addr_text, prefix);
    if (set_address(sock, net.interface, SIOCSIFADDR, addr) != 0) {
        set_detail("set the address of %s", net.interface, errno);
        return;
    }
    if (set_address(sock, net.interface, SIOCSIFNETMASK, mask) != 0) {
        set_detail("set the netmask of %s", net.interface, errno);
        return;
    }
    if (set_flags_up(sock, net.interface) != 0) {
        set_detail("bring %s up", net.interface, errno);
        return;
    }
    if (gw != NULL) {
        snprintf(net.gateway, sizeof(net.gateway), "%s", gw);
        if (add_default_route(sock, net.interface, gateway) != 0) {
            set_detail("add the default route via %s", gw, errno);
            return;
        }
    }
    net.configured = 1;
}

void net_setup(void)
{
    int sock = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    if (sock < 0) {
        log_error(errno, "network: socket");
        set_detail("socket(AF_INET)%s", "", errno);
        return;
    }
    if (set_flags_up(sock, "lo") != 0)
        log_error(errno, "network: bring lo up");
    const char *ip = cmdline_get("microagent.ip");
    const char *gw = cmdline_get("microagent.gw");
    const char *dns = cmdline_get("microagent.dns");
    if (gw != NULL && gw[0] == '\0')
        gw = NULL;
    if (ip == NULL || ip[0] == '\0') {
        set_detail("no microagent.ip on the kernel command line%s", "", 0);
        log_info("network: loopback only (no microagent.ip)");
    } else {
        configure_interface(sock, ip, gw);
        if (net.configured)
            log_info("network %s via %s on %s", net.address, gw != NULL ? gw : "(none)",
                     net.interface);
        else
            log_info("network not configured: %s", net.detail);
    }
    close(sock);
    if (dns != NULL && dns[0] != '\0') {
        char content[512];
        if (resolv_content(dns, content, sizeof(content)) > 0) {
            snprintf(net.dns, sizeof(net.dns), "%s", dns);
            provide_resolv_conf(content);
        }
    }
}

void net_disable(const char *why)
{
    set_detail("%s", why, 0);
}

void net_write_info(struct json_writer *w)
{
    json_key(w, "network");
    json_object_begin(w);
    json_key(w, "configured");
    json_write_bool(w, net.configured);
    json_key(w, "address");
    json_write_string(w, net.address);
    json_key(w, "gateway");
    json_write_string(w, net.gateway);
    json_key(w, "dns");
    json_write_string(w, net.dns);
    json_key(w, "interface");
    json_write_string(w, net.interface);
    json_key(w, "detail");
    json_write_string(w, net.detail);
    json_object_end(w);
}

void net_release(void)
{
    if (net.resolv_mounted && umount2(RESOLV, MNT_DETACH) != 0)
        log_error(errno, "umount " RESOLV);
    net.resolv_mounted = 0;
    if (net.resolv_placeholder && unlink(RESOLV) != 0)
        log_error(errno, "remove the placeholder " RESOLV);
    net.resolv_placeholder = 0;
}
