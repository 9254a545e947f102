/* Zombie reaping for PID 1. */
#include "reap.h"

#include "log.h"

#include <errno.h>
#include <sys/wait.h>

int reap_children(void)
{
    int reaped = 0;
    for (;;) {
        int status;
        pid_t pid = waitpid(-1, &status, WNOHANG);
        if (pid > 0) {
            reaped++;
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
