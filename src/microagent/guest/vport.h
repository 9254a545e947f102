/* Finding the agent channel's virtio-serial port in the guest. */
#ifndef MICROAGENT_VPORT_H
#define MICROAGENT_VPORT_H

#include <stddef.h>

/* The port QEMU names with virtserialport's name= (docs/protocol.md). */
#define AGENT_PORT_NAME "microagent"

/* Open the virtio-serial port called name (read-write, non-blocking, close-on-exec),
 * waiting up to wait_ms for it to appear when a virtio console device exists. Returns the
 * fd with its /dev path in path, or -1 (no device, or no such port yet). */
int vport_open(const char *name, int wait_ms, char *path, size_t size);

#endif
