/* The agent's event loop is one poll(2) per iteration: every module registers the fds it
 * waits on (and the time it wants to be woken at) afresh before each wait. */
#ifndef MICROAGENT_POLLER_H
#define MICROAGENT_POLLER_H

/* Called with the ctx and tag given to poller_add when fd has revents. */
typedef void (*poll_fn)(void *ctx, int tag, int fd, short revents);

/* Start a new iteration: no fds, no wake-up time. */
void poller_begin(void);

/* Wait for events on fd in this iteration. Entries beyond the table's capacity are
 * dropped with a console message (the table holds every fd of MAX_STREAMS streams and
 * MAX_PROCS background processes). */
void poller_add(int fd, short events, poll_fn fn, void *ctx, int tag);

/* Wake up no later than when_ms (monotonic_ms() time; the earliest request wins). */
void poller_wake_at(long long when_ms);

/* Wait until an fd is ready or the wake-up time passes, then run the callbacks of the
 * ready fds in registration order. */
void poller_wait(void);

#endif
