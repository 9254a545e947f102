/* A login-like shell on the serial console, for `microagent connect`. */
#ifndef MICROAGENT_CONSOLE_H
#define MICROAGENT_CONSOLE_H

#include <sys/types.h>

/* Find the console device and a shell in the image; start the shell. Reports on the
 * console either way. */
void console_start(void);

/* Register the respawn timer with the poller; respawn when it is due. */
void console_watch(void);

/* The handler reap.c calls for every reaped child: the shell's exit schedules a respawn
 * (at most RESPAWN_BURST starts in RESPAWN_WINDOW_MS, then a back-off). */
void console_child_exited(pid_t pid, int status);

/* Shutdown: end the console shell's session now and never respawn it. An interactive
 * shell ignores SIGTERM, so waiting for it would cost the whole grace period. */
void console_stop(void);

#endif
