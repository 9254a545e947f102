/* ACPI events over generic netlink: resolve the "acpi_event" family and its multicast
 * group "acpi_mc_group", join it, and power off on a "button/power" event. The message
 * layouts are the kernel's (linux/genetlink.h, drivers/acpi/event.c). */
#include "acpi.h"

#include "log.h"
#include "poller.h"
#include "power.h"

#include <errno.h>
#include <linux/genetlink.h>
#include <linux/netlink.h>
#include <poll.h>
#include <stdint.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#define ACPI_FAMILY "acpi_event"
#define ACPI_GROUP "acpi_mc_group"
#define ACPI_GENL_ATTR_EVENT 1

/* drivers/acpi/event.c */
struct acpi_genl_event {
    char device_class[20];
    char bus_id[15];
    uint32_t type;
    uint32_t data;
};

static int sock = -1;

/* Iterate the attributes in [p, end): calls fn(type, payload, len) for each. */
static void each_attr(const uint8_t *p, const uint8_t *end,
                      void (*fn)(void *ctx, uint16_t type, const uint8_t *data, size_t len),
                      void *ctx)
{
    while (end - p >= (long)NLA_HDRLEN) {
        struct nlattr a;
        memcpy(&a, p, sizeof(a));
        if (a.nla_len < NLA_HDRLEN || a.nla_len > end - p)
            return;
        fn(ctx, a.nla_type & NLA_TYPE_MASK, p + NLA_HDRLEN, a.nla_len - NLA_HDRLEN);
        p += NLA_ALIGN(a.nla_len);
    }
}

struct family {
    int id;
    int group;
};

/* One multicast group's attributes (the kernel puts the id before the name). */
struct group {
    int id;
    char name[GENL_NAMSIZ];
};

static void group_attr(void *ctx, uint16_t type, const uint8_t *data, size_t len)
{
    struct group *g = ctx;
    if (type == CTRL_ATTR_MCAST_GRP_NAME && len > 0) {
        size_t n = len < sizeof(g->name) ? len : sizeof(g->name) - 1;
        memcpy(g->name, data, n);
        g->name[n] = '\0';
    } else if (type == CTRL_ATTR_MCAST_GRP_ID && len >= 4) {
        uint32_t id;
        memcpy(&id, data, 4);
        g->id = (int)id;
    }
}

static void groups_attr(void *ctx, uint16_t type, const uint8_t *data, size_t len)
{
    (void)type; /* each entry is a nested group */
    struct family *f = ctx;
    struct group g = {0};
    each_attr(data, data + len, group_attr, &g);
    if (strcmp(g.name, ACPI_GROUP) == 0)
        f->group = g.id;
}

static void family_attr(void *ctx, uint16_t type, const uint8_t *data, size_t len)
{
    struct family *f = ctx;
    if (type == CTRL_ATTR_FAMILY_ID && len >= 2) {
        uint16_t id;
        memcpy(&id, data, 2);
        f->id = id;
    } else if (type == CTRL_ATTR_MCAST_GROUPS) {
        each_attr(data, data + len, groups_attr, f);
    }
}

/* Ask the generic netlink controller for the family; fills f. Returns 0 or -1. */
static int resolve_family(int fd, struct family *f)
{
    struct {
        struct nlmsghdr n;
        struct genlmsghdr g;
        uint8_t attrs[NLA_HDRLEN + NLA_ALIGN(sizeof(ACPI_FAMILY))];
    } req;
    memset(&req, 0, sizeof(req));
    req.n.nlmsg_len = sizeof(req);
    req.n.nlmsg_type = GENL_ID_CTRL;
    req.n.nlmsg_flags = NLM_F_REQUEST;
    req.n.nlmsg_seq = 1;
    req.g.cmd = CTRL_CMD_GETFAMILY;
    req.g.version = 1;
    struct nlattr a = {.nla_len = NLA_HDRLEN + sizeof(ACPI_FAMILY),
                       .nla_type = CTRL_ATTR_FAMILY_NAME};
    memcpy(req.attrs, &a, sizeof(a));
    memcpy(req.attrs + NLA_HDRLEN, ACPI_FAMILY, sizeof(ACPI_FAMILY));
    struct sockaddr_nl kernel = {.nl_family = AF_NETLINK};
    if (sendto(fd, &req, sizeof(req), 0, (struct sockaddr *)&kernel, sizeof(kernel)) < 0)
        return -1;
    struct pollfd p = {.fd = fd, .events = POLLIN};
    if (poll(&p, 1, 1000) <= 0)
        return -1;
    uint8_t buf[8192];
    ssize_t n = recv(fd, buf, sizeof(buf), 0);
    if (n < (ssize_t)(NLMSG_HDRLEN + GENL_HDRLEN))
        return -1;
    struct nlmsghdr h;
    memcpy(&h, buf, sizeof(h));
    if (h.nlmsg_type == NLMSG_ERROR || h.nlmsg_len > (size_t)n ||
        h.nlmsg_len < NLMSG_HDRLEN + GENL_HDRLEN) {
        errno = ENOENT;
        return -1;
    }
    each_attr(buf + NLMSG_HDRLEN + GENL_HDRLEN, buf + h.nlmsg_len, family_attr, f);
    return f->id > 0 && f->group > 0 ? 0 : -1;
}

int acpi_events_open(void)
{
    int fd = socket(AF_NETLINK, SOCK_RAW | SOCK_CLOEXEC, NETLINK_GENERIC);
    if (fd < 0) {
        log_error(errno, "ACPI events: netlink socket");
        return -1;
    }
    struct family f = {0};
    if (resolve_family(fd, &f) != 0) {
        log_info("ACPI events: no \"" ACPI_FAMILY "\" netlink family; the power button "
                 "does nothing");
        close(fd);
        return -1;
    }
    if (setsockopt(fd, SOL_NETLINK, NETLINK_ADD_MEMBERSHIP, &f.group, sizeof(f.group)) != 0) {
        log_error(errno, "ACPI events: join " ACPI_GROUP);
        close(fd);
        return -1;
    }
    sock = fd;
    return 0;
}

static void event_attr(void *ctx, uint16_t type, const uint8_t *data, size_t len)
{
    (void)ctx;
    if (type != ACPI_GENL_ATTR_EVENT || len < sizeof(struct acpi_genl_event))
        return;
    struct acpi_genl_event e;
    memcpy(&e, data, sizeof(e));
    e.device_class[sizeof(e.device_class) - 1] = '\0';
    if (strncmp(e.device_class, "button/power", 12) == 0)
        power_off("ACPI power button");
}

static void on_event(void *ctx, int tag, int fd, short revents)
{
    (void)ctx;
    (void)tag;
    (void)revents;
    uint8_t buf[4096];
    ssize_t n = recv(fd, buf, sizeof(buf), MSG_DONTWAIT);
    if (n < 0) {
        if (errno != EAGAIN && errno != EINTR && errno != ENOBUFS)
            log_error(errno, "ACPI events: recv");
        return;
    }
    const uint8_t *p = buf;
    const uint8_t *end = buf + n;
    while (end - p >= (long)NLMSG_HDRLEN) {
        struct nlmsghdr h;
        memcpy(&h, p, sizeof(h));
        if (h.nlmsg_len < NLMSG_HDRLEN || h.nlmsg_len > end - p)
            return;
        if (h.nlmsg_len >= NLMSG_HDRLEN + GENL_HDRLEN)
            each_attr(p + NLMSG_HDRLEN + GENL_HDRLEN, p + h.nlmsg_len, event_attr, NULL);
        p += NLMSG_ALIGN(h.nlmsg_len);
    }
}

void acpi_events_watch(void)
{
    if (sock >= 0)
        poller_add(sock, POLLIN, on_event, NULL, 0);
}

int acpi_power_button_present(void)
{
    struct stat st;
    return stat("/sys/module/button", &st) == 0;
}
