/* The agent's event loop, after boot (PID 1) or in the host test mode (--serve-fd). */
#ifndef MICROAGENT_SERVE_H
#define MICROAGENT_SERVE_H

#include <signal.h>

/* Serve forever. signals: the set blocked in this process, taken through a signalfd.
 * pid1: the duties of init (console shell, power-off on SIGTERM/SIGPWR/SIGINT and on
 * the shutdown operation); else SIGTERM, SIGINT and the shutdown operation end the
 * process. channel_fd: the agent channel, or -1 to keep looking for the virtio port. */
void serve(const sigset_t *signals, int pid1, int channel_fd) __attribute__((noreturn));

/* Leave the test mode: kill the streams' processes and exit. */
void serve_exit(int code) __attribute__((noreturn));

#endif
