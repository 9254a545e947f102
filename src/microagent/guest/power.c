/* The shutdown path. Under QEMU's microvm with ACPI, reboot(RB_POWER_OFF) makes the VMM
 * exit; the disk is clean because / was remounted read-only first. */
#include "power.h"

#include "clock.h"
#include "console.h"
#include "log.h"
#include "mounts.h"
#include "net.h"
#include "reap.h"

#include <errno.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <sys/reboot.h>
#include <unistd.h>

#define TERM_GRACE_MS 2000
#define KILL_GRACE_MS 1000
#define POLL_MS 10

/* Reap until no child is left or timeout_ms passes. Returns 1 when none is left. */
static int wait_for_no_children(int timeout_ms)
{
    const long long deadline = monotonic_ms() + timeout_ms;
    for (;;) {
        if (reap_children() < 0)
            return 1;
        if (monotonic_ms() >= deadline)
            return 0;
        sleep_ms(POLL_MS);
    }
}

static void signal_all(int sig, const char *name)
{
    /* kill(-1) reaches every process but PID 1 itself; ESRCH means there is none. */
    if (kill(-1, sig) != 0 && errno != ESRCH)
        log_error(errno, "kill -%s all processes", name);
}

void power_off(const char *reason)
{
    power_off_after(reason, TERM_GRACE_MS);
}

void power_off_after(const char *reason, int grace_ms)
{
    log_info("powering off (%s)", reason);
    console_stop();
    signal_all(SIGTERM, "TERM");
    if (!wait_for_no_children(grace_ms)) {
        log_info("processes left after %d ms, sending SIGKILL", grace_ms);
        signal_all(SIGKILL, "KILL");
        if (!wait_for_no_children(KILL_GRACE_MS))
            log_info("processes left after SIGKILL");
    }
    sync();
    net_release();
    int failures = unmount_all();
    sync();
    log_info("power off%s", failures > 0 ? " (some file systems were not unmounted)" : "");
    if (reboot(RB_POWER_OFF) != 0)
        log_error(errno, "reboot(RB_POWER_OFF)");
    /* Still here: nothing left to do but keep PID 1 alive. */
    for (;;)
        pause();
}

void fatal(int err, const char *fmt, ...)
{
    char message[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(message, sizeof(message), fmt, ap);
    va_end(ap);
    if (err != 0)
        log_error(err, "fatal: %s", message);
    else
        log_info("fatal: %s", message);
    power_off("fatal error");
}
