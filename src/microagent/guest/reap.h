/* Zombie reaping: PID 1 inherits every orphan and must wait for it. The one waitpid(-1)
 * loop of the agent hands every status to a handler (exec streams, the console shell), so
 * no exit status is lost to a second waiter. */
#ifndef MICROAGENT_REAP_H
#define MICROAGENT_REAP_H

#include <sys/types.h>

/* Called with each reaped child's pid and wait status. */
void reap_set_handler(void (*handler)(pid_t pid, int status));

/* Wait for every exited child without blocking. Returns the number reaped, or -1 when
 * there is no child left at all (ECHILD): then no user process remains in the guest. */
int reap_children(void);

#endif
