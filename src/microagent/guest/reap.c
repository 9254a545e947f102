/* Zombie reaping for PID 1 (and for the host test mode, a child subreaper). */
#include "reap.h"

#include "log.h"

#include <errno.h>
#include <sys/wait.h>

static void (*on_reaped)(pid_t pid, int status);

void reap_set_handler(void (*handler)(pid_t pid, int status))
{
    on_reaped = handler;
}

int reap_children(void)
{
    int reaped = 0;
    for (;;) {
        int status;
        pid_t pid = waitpid(-1, &status, WNOHANG);
        if (pid > 0) {
            reaped++;
            if (on_reaped != NULL)
                on_reaped(pid, status);
            continue;
        }
        if (pid == 0)
            return reaped;
        if (errno == EINTR)
            continue;
        if (errno == ECHILD)
            return reaped > 0 ? reaped : -1;
        log_error(errno, "waitpid");
        return reaped;
    }
}
