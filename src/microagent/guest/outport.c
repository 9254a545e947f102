/* The output port (outport.h): who holds it, lending it, taking it back. */
#include "outport.h"

#include "log.h"
#include "vport.h"

#include <errno.h>
#include <fcntl.h>
#include <string.h>
#include <unistd.h>

static int port_fd = -1; /* the agent's own open description; -1 while lent, or none */
static int looked;       /* a VM without the port is not searched again */
static int host_mode;    /* outport_set_fd: a socket that cannot be opened again */
static int lent;         /* a process has (or may still have) the port open */
static uint32_t holder;
static char path[64];

void outport_set_fd(int fd)
{
    port_fd = fd;
    looked = 1;
    host_mode = 1;
}

static int set_blocking(int fd, int blocking)
{
    int flags = fcntl(fd, F_GETFL);
    if (flags < 0)
        return -1;
    return fcntl(fd, F_SETFL, blocking ? flags & ~O_NONBLOCK : flags | O_NONBLOCK);
}

/* 1 the agent has the port again, 0 a process still has it open, -1 it is gone. */
static int take_back(void)
{
    if (!lent)
        return port_fd >= 0 ? 1 : -1;
    if (host_mode) {
        lent = 0;
        return set_blocking(port_fd, 0) == 0 ? 1 : -1;
    }
    /* A virtio-serial port opens once at a time: EBUSY while any process holds it. */
    int fd = open(path, O_RDWR | O_NONBLOCK | O_CLOEXEC | O_NOCTTY);
    if (fd < 0 && errno == EBUSY)
        return 0;
    lent = 0;
    if (fd < 0) {
        log_error(errno, "open output port %s", path);
        return -1;
    }
    port_fd = fd;
    return 1;
}

int outport_lend(uint32_t stream)
{
    if (port_fd < 0 && !looked) {
        looked = 1;
        port_fd = vport_open(OUT_PORT_NAME, 0, path, sizeof(path));
        if (port_fd >= 0)
            log_info("output port %s", path);
    }
    if (holder != 0 || take_back() != 1)
        return -1;
    /* The process's stdout blocks (a full port, a host not there yet), as a pipe would. */
    if (set_blocking(port_fd, 1) != 0) {
        log_error(errno, "output port: fcntl");
        return -1;
    }
    int fd = port_fd;
    if (host_mode && (fd = fcntl(port_fd, F_DUPFD_CLOEXEC, 3)) < 0) {
        log_error(errno, "output port: dup");
        set_blocking(port_fd, 0);
        return -1;
    }
    if (!host_mode)
        port_fd = -1;
    lent = 1;
    holder = stream;
    return fd;
}

int outport_reclaim(uint32_t stream)
{
    if (holder != stream)
        return -1;
    return take_back();
}

int outport_fd(void)
{
    return lent ? -1 : port_fd;
}

void outport_release(uint32_t stream)
{
    if (holder == stream)
        holder = 0;
}
