/* The console shell. /dev/console is the kernel's last console= device; the shell gets
 * that device itself (a real tty, so it can be the controlling terminal: /dev/console
 * cannot), becomes a session leader with it as controlling terminal, and runs as a login
 * shell (argv[0] "-sh") so the image's /etc/profile applies. */
#include "console.h"

#include "channel.h"
#include "clock.h"
#include "json.h"
#include "log.h"
#include "ops.h"
#include "poller.h"
#include "spawn.h"

#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/ioctl.h>
#include <unistd.h>

#define RESPAWN_BURST 5
#define RESPAWN_WINDOW_MS 10000
#define BACKOFF_MS 30000
#define DEFAULT_PATH "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

static char device[64];
static char shell[32];
static pid_t shell_pid;
static long long starts[RESPAWN_BURST]; /* the latest start times, a ring */
static int next_start;
static long long respawn_at; /* 0: none scheduled */
static int stopping;          /* set at shutdown: no more shells */

/* The device /dev/console stands for: the last name in /sys/class/tty/console/active. */
static int find_console_device(void)
{
    int fd = open("/sys/class/tty/console/active", O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return -1;
    char buf[256];
    ssize_t n = read(fd, buf, sizeof(buf) - 1);
    close(fd);
    if (n <= 0)
        return -1;
    buf[n] = '\0';
    char *last = NULL, *save = NULL;
    for (char *word = strtok_r(buf, " \n", &save); word != NULL;
         word = strtok_r(NULL, " \n", &save))
        last = word;
    if (last == NULL || strchr(last, '/') != NULL || strlen(last) > 32)
        return -1;
    snprintf(device, sizeof(device), "/dev/%s", last);
    return 0;
}

__attribute__((noreturn)) static void run_shell(void)
{
    sigset_t none;
    sigemptyset(&none);
    sigprocmask(SIG_SETMASK, &none, NULL);
    for (int sig = 1; sig < NSIG; sig++)
        signal(sig, SIG_DFL);
    if (setsid() < 0)
        _exit(126);
    int fd = open(device, O_RDWR | O_CLOEXEC);
    if (fd < 0) {
        log_error(errno, "console shell: open %s", device);
        _exit(126);
    }
    /* Steal the terminal if a session of an earlier shell still holds it. */
    if (ioctl(fd, TIOCSCTTY, 1) != 0)
        log_error(errno, "console shell: TIOCSCTTY on %s", device);
    for (int target = 0; target <= 2; target++)
        if (dup2(fd, target) < 0)
            _exit(126);
    spawn_restore_limits();
    if (chdir("/root") != 0 && chdir("/") != 0)
        _exit(126);
    char shell_env[48];
    snprintf(shell_env, sizeof(shell_env), "SHELL=%s", shell);
    char *const env[] = {"TERM=linux", "HOME=/root", "PATH=" DEFAULT_PATH, "USER=root",
                         "LOGNAME=root", shell_env, NULL};
    char *const argv[] = {strcmp(shell, "/bin/bash") == 0 ? "-bash" : "-sh", NULL};
    execve(shell, argv, env);
    log_error(errno, "console shell: execve %s", shell);
    _exit(127);
}

static void start_shell(void)
{
    long long now = monotonic_ms();
    starts[next_start] = now;
    next_start = (next_start + 1) % RESPAWN_BURST;
    pid_t pid = fork();
    if (pid < 0) {
        log_error(errno, "console shell: fork");
        respawn_at = now + BACKOFF_MS;
        return;
    }
    if (pid == 0)
        run_shell();
    shell_pid = pid;
}

void console_start(void)
{
    if (find_console_device() != 0) {
        log_info("no console device found; console has no shell");
        return;
    }
    static const char *const shells[] = {"/bin/bash", "/bin/sh"};
    for (size_t i = 0; i < sizeof(shells) / sizeof(shells[0]); i++)
        if (access(shells[i], X_OK) == 0) {
            snprintf(shell, sizeof(shell), "%s", shells[i]);
            break;
        }
    if (shell[0] == '\0') {
        log_info("no shell in the image; console has no shell");
        return;
    }
    log_info("console shell on %s", device + 5);
    start_shell();
}

void console_stop(void)
{
    stopping = 1;
    respawn_at = 0;
    if (shell_pid > 0 && kill(-shell_pid, SIGKILL) != 0 && errno != ESRCH)
        log_error(errno, "console shell: kill session %d", (int)shell_pid);
}

void console_watch(void)
{
    if (respawn_at == 0 || stopping)
        return;
    if (monotonic_ms() >= respawn_at) {
        respawn_at = 0;
        start_shell();
        return;
    }
    poller_wake_at(respawn_at);
}

void console_child_exited(pid_t pid, int status)
{
    (void)status;
    if (pid != shell_pid || shell_pid == 0)
        return;
    shell_pid = 0;
    if (stopping)
        return;
    long long now = monotonic_ms();
    /* The oldest of the last RESPAWN_BURST starts is next_start's slot. */
    long long oldest = starts[next_start];
    if (oldest != 0 && now - oldest < RESPAWN_WINDOW_MS) {
        log_info("console shell exits too fast; next start in %d s", BACKOFF_MS / 1000);
        respawn_at = now + BACKOFF_MS;
    } else {
        respawn_at = now;
    }
}

/* The console_size operation: the host's terminal size for the console, so that full-screen
 * programs in the console shell fit it (the shell's foreground group gets SIGWINCH). */
void console_size_run(uint32_t id, const struct json_doc *doc, int req)
{
    long long rows, cols;
    if (json_int(doc, json_find(doc, req, "rows"), 1, 65535, &rows) != 0 ||
        json_int(doc, json_find(doc, req, "cols"), 1, 65535, &cols) != 0) {
        channel_send_error(id, "EINVAL", 0, "console_size: \"rows\" and \"cols\" must be "
                           "integers from 1 to 65535");
        return;
    }
    if (device[0] == '\0') {
        channel_send_error(id, "ENODEV", 0, "console_size: no console device");
        return;
    }
    int fd = open(device, O_RDWR | O_NOCTTY | O_NONBLOCK | O_CLOEXEC);
    if (fd < 0) {
        channel_send_error(id, "EIO", errno, "console_size: open %s: %s", device,
                           strerror(errno));
        return;
    }
    struct winsize size = {.ws_row = (unsigned short)rows, .ws_col = (unsigned short)cols};
    int rc = ioctl(fd, TIOCSWINSZ, &size);
    int saved = errno;
    close(fd);
    if (rc != 0) {
        channel_send_error(id, "EIO", saved, "console_size: TIOCSWINSZ on %s: %s", device,
                           strerror(saved));
        return;
    }
    static const char done[] = "{\"exit_code\":0,\"signal\":null,\"timed_out\":false}";
    channel_send(FRAME_EXIT, id, 0, done, sizeof(done) - 1);
}
