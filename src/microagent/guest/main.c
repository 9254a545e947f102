/* microagent-init: the guest agent. It is PID 1 from the first instruction of userspace
 * to the power-off: stage 1 in the initramfs (boot.c), then, in the image's root file
 * system, stage 2 (the duties of an init) and the agent's own services: the network,
 * the console shell and the agent channel, served by one event loop (serve.c).
 *
 * Not as PID 1, `microagent-init --serve-fd N` serves the protocol on fd N and runs the
 * commands on the machine it runs on: the protocol test suite drives the real binary that
 * way, without a VM (`--out-fd M`: fd M stands in for the output port, outport.h). */
#include "acpi.h"
#include "boot.h"
#include "channel.h"
#include "cmdline.h"
#include "console.h"
#include "disks.h"
#include "log.h"
#include "mounts.h"
#include "net.h"
#include "outport.h"
#include "power.h"
#include "serve.h"
#include "spawn.h"
#include "version.h"
#include "vport.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/reboot.h>
#include <sys/stat.h>
#include <unistd.h>

#define PORT_WAIT_MS 5000

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
    sigaddset(set, SIGIO); /* the agent channel's host connected or went away */
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
    /* before the channel opens: every attached disk is in place once exec is ready */
    disks_attach();
}

/* PID 1 after boot: network, console shell, agent channel, then the event loop. */
__attribute__((noreturn)) static void run_init(sigset_t *signals)
{
    net_setup();
    if (acpi_events_open() == 0 && !acpi_power_button_present())
        log_info("power button: no ACPI button driver (button.ko) loaded; only the "
                 "shutdown operation powers off");
    spawn_init(0);
    char path[128];
    int fd = vport_open(AGENT_PORT_NAME, PORT_WAIT_MS, path, sizeof(path));
    if (fd >= 0) {
        log_info("agent channel on %s", path);
        channel_open(fd, CHANNEL_VPORT);
    } else {
        log_info("no agent channel yet (no virtio-serial port named \"" AGENT_PORT_NAME
                 "\"); still looking");
    }
    /* after the channel: the host's HELLO is not kept waiting by the shell's start-up */
    console_start();
    log_info("ready");

    const char *test = cmdline_get("microagent.test");
    if (test != NULL && strcmp(test, "poweroff") == 0) {
        log_mounts();
        power_off("microagent.test=poweroff");
    }
    serve(signals, 1, fd);
}

/* The host test mode: serve the protocol on fd, run commands on this machine. */
__attribute__((noreturn)) static void run_serve_fd(int fd)
{
    /* fds 0-2 must be taken, or a pipe could land there and be lost to a child's dup2. */
    for (int target = 0; target <= 2; target++)
        if (fcntl(target, F_GETFD) < 0 && open("/dev/null", O_RDWR) != target)
            fprintf(stderr, "microagent-init: cannot open /dev/null on fd %d\n", target);
    sigset_t signals;
    sigemptyset(&signals);
    sigaddset(&signals, SIGCHLD);
    sigaddset(&signals, SIGTERM);
    sigaddset(&signals, SIGINT);
    sigaddset(&signals, SIGHUP);
    if (sigprocmask(SIG_BLOCK, &signals, NULL) != 0)
        log_error(errno, "sigprocmask");
    if (signal(SIGPIPE, SIG_IGN) == SIG_ERR)
        log_error(errno, "ignore SIGPIPE");
    /* Orphans of the commands come back to the agent, as they would to PID 1. */
    if (prctl(PR_SET_CHILD_SUBREAPER, 1) != 0)
        log_error(errno, "PR_SET_CHILD_SUBREAPER");
    spawn_init(1);
    net_disable("host test mode (--serve-fd)");
    channel_open(fd, CHANNEL_SOCKET);
    serve(&signals, 0, fd);
}

/* An open fd given on the command line, or -1 (said on stderr). */
static int fd_argument(const char *option, const char *text)
{
    char *end;
    errno = 0;
    long fd = strtol(text, &end, 10);
    if (errno != 0 || *end != '\0' || end == text || fd < 0 || fd > INT_MAX ||
        fcntl((int)fd, F_GETFD) < 0) {
        fprintf(stderr, "microagent-init: %s %s: not an open fd\n", option, text);
        return -1;
    }
    return (int)fd;
}

static int usage(void)
{
    fprintf(stderr, "usage: microagent-init --version\n"
                    "       microagent-init --serve-fd N [--out-fd M]   (host test mode;\n"
                    "           M stands in for the output port)\n"
                    "As PID 1 it is the init of a microagent VM.\n");
    return 2;
}

int main(int argc, char **argv)
{
    if (getpid() != 1) {
        /* The kernel passes unknown command-line words to PID 1 as arguments, so argv is
         * only looked at when not running as init. */
        if (argc == 2 && strcmp(argv[1], "--version") == 0) {
            printf("microagent-init %s\n", AGENT_VERSION);
            return 0;
        }
        if ((argc == 3 || (argc == 5 && strcmp(argv[3], "--out-fd") == 0)) &&
            strcmp(argv[1], "--serve-fd") == 0) {
            int fd = fd_argument("--serve-fd", argv[2]);
            int out = argc == 5 ? fd_argument("--out-fd", argv[4]) : -1;
            if (fd < 0 || (argc == 5 && out < 0))
                return 2;
            if (out >= 0)
                outport_set_fd(out);
            run_serve_fd(fd);
        }
        if (argc == 1)
            fprintf(stderr, "microagent-init: must run as PID 1 of a microagent VM\n");
        return usage();
    }
    sigset_t signals;
    pid1_signals(&signals);
    if (sigprocmask(SIG_BLOCK, &signals, NULL) != 0)
        log_error(errno, "sigprocmask");
    if (signal(SIGPIPE, SIG_IGN) == SIG_ERR)
        log_error(errno, "ignore SIGPIPE");
    umask(022);

    if (in_initramfs())
        boot_stage1();
    boot_stage2();
    run_init(&signals);
}
