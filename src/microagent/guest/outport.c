/* The output port (outport.h): who holds it, and opening it. */
#include "outport.h"

#include "log.h"
#include "vport.h"

static int port_fd = -1;
static int looked; /* a VM without the port is not searched again */
static uint32_t holder;

void outport_set_fd(int fd)
{
    port_fd = fd;
    looked = 1;
}

int outport_claim(uint32_t stream)
{
    if (port_fd < 0 && !looked) {
        char path[64];
        looked = 1;
        port_fd = vport_open(OUT_PORT_NAME, 0, path, sizeof(path));
        if (port_fd >= 0)
            log_info("output port %s", path);
    }
    if (port_fd < 0 || holder != 0)
        return -1;
    holder = stream;
    return port_fd;
}

void outport_release(uint32_t stream)
{
    if (holder == stream)
        holder = 0;
}
