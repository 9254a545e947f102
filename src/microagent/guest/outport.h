/* The output port: a second virtio-serial port that is one exec's stdout at a time. The
 * process writes to it itself (the port is its fd 1), so its bytes reach the host reader
 * the supervisor handed the port's connection to with no hop through the agent: no
 * framing, no credit, no relay (docs/protocol.md, "The output port"). */
#ifndef MICROAGENT_OUTPORT_H
#define MICROAGENT_OUTPORT_H

#include <stdint.h>

#define OUT_PORT_NAME "microagent-out"
/* The hex nonce the host chooses per exec. The port's bytes for that exec are
 * "microagent-out NONCE\n", the output, then "\0microagent-end NONCE\n": the host skips
 * anything before its preamble (left from an earlier exec that was cut off) and knows
 * the end without a count the agent could not keep. */
#define OUT_NONCE_LEN 32

/* Serve the port on fd (the host test mode; in a VM the port is opened at first use).
 * In this mode the agent cannot tell when the last process let go of the port: it takes
 * it back when the exec's process has exited. */
void outport_set_fd(int fd);

/* Lend the port to stream's process: an fd for its stdout (blocking), which the caller
 * closes once the child has it; or -1 when there is no port, another stream holds it, or
 * a process of an earlier exec still has it open. */
int outport_lend(uint32_t stream);

/* Take the port back from stream's processes: 1 done (write with outport_fd), 0 some
 * process still has it open (try again later), -1 the port is gone. */
int outport_reclaim(uint32_t stream);

/* The agent's own fd of the port (non-blocking), or -1. */
int outport_fd(void);

/* stream is done with the port (nothing if it does not hold it). If its processes still
 * have it, the next outport_lend takes it back once they let go. */
void outport_release(uint32_t stream);

#endif
