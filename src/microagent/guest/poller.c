/* One poll(2) per loop iteration over the fds the modules registered. */
#include "poller.h"

#include "clock.h"
#include "log.h"
#include "procs.h"
#include "streams.h"

#include <errno.h>
#include <limits.h>
#include <poll.h>

/* every stream's fds, each background process's two pipes and start-up report, and the
 * loop's own */
#define MAX_WATCHES (MAX_STREAMS * 4 + MAX_PROCS * 3 + 16)

struct watch {
    poll_fn fn;
    void *ctx;
    int tag;
};

static struct pollfd fds[MAX_WATCHES];
static struct watch watches[MAX_WATCHES];
static int count;
static long long wake_at;
static int overflow_reported;

void poller_begin(void)
{
    count = 0;
    wake_at = -1;
}

void poller_add(int fd, short events, poll_fn fn, void *ctx, int tag)
{
    if (count == MAX_WATCHES) {
        if (!overflow_reported)
            log_info("poller: more than %d fds to watch; some wait a turn", MAX_WATCHES);
        overflow_reported = 1;
        return;
    }
    fds[count] = (struct pollfd){.fd = fd, .events = events, .revents = 0};
    watches[count] = (struct watch){fn, ctx, tag};
    count++;
}

void poller_wake_at(long long when_ms)
{
    if (wake_at < 0 || when_ms < wake_at)
        wake_at = when_ms;
}

void poller_wait(void)
{
    int timeout = -1;
    if (wake_at >= 0) {
        long long delta = wake_at - monotonic_ms();
        timeout = delta <= 0 ? 0 : delta > INT_MAX ? INT_MAX : (int)delta;
    }
    int n = poll(fds, (nfds_t)count, timeout);
    if (n < 0) {
        if (errno != EINTR)
            log_error(errno, "poll");
        return;
    }
    for (int i = 0; i < count && n > 0; i++) {
        if (fds[i].revents == 0)
            continue;
        n--;
        watches[i].fn(watches[i].ctx, watches[i].tag, fds[i].fd, fds[i].revents);
    }
}
