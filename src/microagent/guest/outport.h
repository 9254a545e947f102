/* The output port: a second virtio-serial port that carries one exec's stdout at a time
 * as raw bytes, spliced from the process's pipe, to a host reader the supervisor handed
 * the port's connection to: no framing, no credit, no relay (docs/protocol.md, "The
 * output port"). */
#ifndef MICROAGENT_OUTPORT_H
#define MICROAGENT_OUTPORT_H

#include <stdint.h>

#define OUT_PORT_NAME "microagent-out"
/* The hex nonce the host chooses per exec; the port's bytes for that exec start with
 * "microagent-out NONCE\n" so that the host can skip anything left from an earlier one. */
#define OUT_NONCE_LEN 32

/* Serve the port on fd (the host test mode; in a VM the port is opened at first use). */
void outport_set_fd(int fd);

/* Take the port for stream; its fd, or -1 when there is no port or another stream has it. */
int outport_claim(uint32_t stream);

/* Give the port back (nothing if stream does not hold it). */
void outport_release(uint32_t stream);

#endif
