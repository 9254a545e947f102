/* The event loop: one poll over the signalfd, the agent channel, every stream's fds and
 * the timers; then the streams' timers; then the release of ended streams. */
#include "serve.h"

#include "acpi.h"
#include "channel.h"
#include "clock.h"
#include "console.h"
#include "json.h"
#include "log.h"
#include "ops.h"
#include "poller.h"
#include "power.h"
#include "procs.h"
#include "reap.h"
#include "streams.h"
#include "vport.h"

#include <errno.h>
#include <poll.h>
#include <stdlib.h>
#include <string.h>
#include <sys/signalfd.h>
#include <unistd.h>

#define DEFAULT_GRACE_MS 5000
#define MAX_GRACE_MS 600000
#define PORT_RESCAN_MS 2000

static int is_pid1;
static int signal_fd = -1;
static int have_channel;
static long long port_rescan_at;

void serve_exit(int code)
{
    streams_reset();
    streams_sweep();
    procs_cleanup();
    exit(code);
}

static void on_child(pid_t pid, int status)
{
    if (procs_child_exited(pid, status))
        return;
    streams_child_exited(pid, status);
    if (is_pid1)
        console_child_exited(pid, status);
}

static void on_signal(void *ctx, int tag, int fd, short revents)
{
    (void)ctx;
    (void)tag;
    (void)revents;
    struct signalfd_siginfo info;
    for (;;) {
        ssize_t n = read(fd, &info, sizeof(info));
        if (n < 0 && errno == EINTR)
            continue;
        if (n != (ssize_t)sizeof(info)) {
            if (n < 0 && errno != EAGAIN)
                log_error(errno, "read signalfd");
            return;
        }
        int sig = (int)info.ssi_signo;
        if (sig == SIGCHLD) {
            reap_children();
        } else if (sig == SIGIO) {
            channel_host_event();
        } else if (is_pid1) {
            power_off(strsignal(sig));
        } else {
            log_info("%s; exiting", strsignal(sig));
            serve_exit(0);
        }
    }
}

void shutdown_run(uint32_t id, const struct json_doc *doc, int req)
{
    long long grace_ms = DEFAULT_GRACE_MS;
    int t = json_find(doc, req, "grace_ms");
    if (t >= 0 && doc->tokens[t].type != JSON_NULL &&
        json_int(doc, t, 0, MAX_GRACE_MS, &grace_ms) != 0) {
        channel_send_error(id, "EINVAL", 0, "shutdown: \"grace_ms\" must be an integer from 0 "
                           "to %d", MAX_GRACE_MS);
        return;
    }
    char mode[16] = "poweroff";
    t = json_find(doc, req, "mode");
    if (t >= 0 && (json_string(doc, t, mode, sizeof(mode)) < 0 ||
                   strcmp(mode, "poweroff") != 0)) {
        channel_send_error(id, "EINVAL", 0, "shutdown: \"mode\" must be \"poweroff\"");
        return;
    }
    channel_send(FRAME_STARTED, id, 0, "{}", 2);
    channel_flush(1000);
    if (is_pid1)
        power_off_after("shutdown requested by the host", (int)grace_ms);
    log_info("shutdown requested by the host; exiting");
    serve_exit(0);
}

/* PID 1 without a channel yet: look for the port now and then. */
static void find_channel(void)
{
    if (monotonic_ms() < port_rescan_at) {
        poller_wake_at(port_rescan_at);
        return;
    }
    char path[128];
    int fd = vport_open(AGENT_PORT_NAME, 0, path, sizeof(path));
    if (fd < 0) {
        port_rescan_at = monotonic_ms() + PORT_RESCAN_MS;
        poller_wake_at(port_rescan_at);
        return;
    }
    log_info("agent channel on %s", path);
    channel_open(fd, CHANNEL_VPORT);
    have_channel = 1;
}

void serve(const sigset_t *signals, int pid1, int channel_fd)
{
    is_pid1 = pid1;
    signal_fd = signalfd(-1, signals, SFD_CLOEXEC | SFD_NONBLOCK);
    if (signal_fd < 0) {
        log_error(errno, "signalfd");
        if (pid1)
            power_off("no signalfd");
        exit(1);
    }
    reap_set_handler(on_child);
    reap_children(); /* whatever exited before the handler was in place */
    if (channel_fd >= 0)
        have_channel = 1;
    else
        port_rescan_at = monotonic_ms() + PORT_RESCAN_MS;
    for (;;) {
        poller_begin();
        poller_add(signal_fd, POLLIN, on_signal, NULL, 0);
        if (have_channel)
            channel_watch();
        else
            find_channel();
        streams_watch();
        procs_watch();
        if (pid1) {
            console_watch();
            acpi_events_watch();
        }
        poller_wait();
        procs_tick();
        streams_tick();
        streams_sweep();
        if (have_channel)
            channel_write_pending();
    }
}
