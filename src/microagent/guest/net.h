/* Networking without any binary from the image: loopback, one interface with a static
 * address and a default route (ioctl), and resolv.conf.
 *
 * Kernel parameters: microagent.ip=ADDR/PREFIX microagent.gw=ADDR microagent.dns=ADDR[,ADDR]
 * (QEMU's user networking: 10.0.2.15/24, 10.0.2.2, 10.0.2.3). */
#ifndef MICROAGENT_NET_H
#define MICROAGENT_NET_H

#include "json.h"

/* Configure the network from the command line; reports on the console. */
void net_setup(void);

/* Record that networking is not the agent's business (the host test mode). */
void net_disable(const char *why);

/* "network": {"configured", "address", "gateway", "dns", "interface", "detail"}. */
void net_write_info(struct json_writer *w);

/* Shutdown: undo the resolv.conf bind mount and remove a placeholder the agent created,
 * so the image's disk is left as it was. */
void net_release(void);

#endif
