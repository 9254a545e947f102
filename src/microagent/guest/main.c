/* microagent-init: the guest agent. It is PID 1 from the first instruction of userspace
 * to the power-off: stage 1 in the initramfs (boot.c), then, in the image's root file
 * system, stage 2 (the duties of an init) and the agent's own services. */
#include "boot.h"
#include "cmdline.h"
#include "log.h"
#include "mounts.h"
#include "power.h"
#include "reap.h"

#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/reboot.h>
#include <sys/stat.h>
#include <unistd.h>

#define VERSION "0.1.0"

/* The signals PID 1 takes synchronously with sigwaitinfo. They stay blocked in PID 1;
 * whoever forks a child must restore an empty mask before exec. */
static void pid1_signals(sigset_t *set)
{
    sigemptyset(set);
    sigaddset(set, SIGCHLD);
    sigaddset(set, SIGTERM);
    sigaddset(set, SIGINT); /* Ctrl-Alt-Del, after reboot(RB_DISABLE_CAD) */
    sigaddset(set, SIGPWR);
    sigaddset(set, SIGUSR2);
}

static void set_hostname(void)
{
    const char *name = cmdline_get("microagent.hostname");
    if (name == NULL || *name == '\0')
        return;
    if (sethostname(name, strlen(name)) != 0)
        log_error(errno, "sethostname %s", name);
    else
        log_info("hostname %s", name);
}

/* Stage 2: the duties of an init in the image's root file system. */
static void boot_stage2(void)
{
    int failures = mount_api_filesystems();
    if (cmdline_load() != 0)
        fatal(0, "cannot read the kernel command line");
    set_hostname();
    if (reboot(RB_DISABLE_CAD) != 0)
        log_error(errno, "reboot(RB_DISABLE_CAD)");
    if (failures > 0)
        log_info("%d mounts failed; going on", failures);
}

/* Until the agent channel exists: reap children, power off on a shutdown signal. */
__attribute__((noreturn)) static void serve(const sigset_t *signals)
{
    for (;;) {
        siginfo_t info;
        int sig = sigwaitinfo(signals, &info);
        if (sig < 0) {
            if (errno != EINTR)
                log_error(errno, "sigwaitinfo");
            continue;
        }
        if (sig == SIGCHLD)
            reap_children();
        else
            power_off(strsignal(sig));
    }
}

int main(int argc, char **argv)
{
    if (getpid() != 1) {
        /* The kernel passes unknown command-line words to PID 1 as arguments, so argv is
         * only looked at when not running as init. */
        if (argc > 1 && strcmp(argv[1], "--version") == 0) {
            printf("microagent-init %s\n", VERSION);
            return 0;
        }
        fprintf(stderr, "microagent-init: must run as PID 1 of a microagent VM\n");
        return 2;
    }
    sigset_t signals;
    pid1_signals(&signals);
    if (sigprocmask(SIG_BLOCK, &signals, NULL) != 0)
        log_error(errno, "sigprocmask");
    umask(022);

    if (in_initramfs())
        boot_stage1();
    boot_stage2();
    log_info("ready");

    const char *test = cmdline_get("microagent.test");
    if (test != NULL && strcmp(test, "poweroff") == 0) {
        log_mounts();
        power_off("microagent.test=poweroff");
    }
    serve(&signals);
}
