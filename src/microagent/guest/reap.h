/* Zombie reaping: PID 1 inherits every orphan and must wait for it. */
#ifndef MICROAGENT_REAP_H
#define MICROAGENT_REAP_H

/* Wait for every exited child without blocking. Returns the number reaped, or -1 when
 * there is no child left at all (ECHILD): then no user process remains in the guest. */
int reap_children(void);

#endif
