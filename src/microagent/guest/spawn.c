/* Starting a command. The child undoes what PID 1 set up for itself (blocked signals,
 * ignored SIGPIPE, a raised fd limit), becomes a session and process group leader, gets
 * its stdio, credentials, environment and directory, and execs. Whatever fails before
 * the exec goes back to the parent as a struct spawn_failure on a close-on-exec pipe:
 * EOF on that pipe means the exec succeeded. */
#include "spawn.h"

#include "errnames.h"
#include "users.h"

#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <linux/close_range.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <time.h>
#include <unistd.h>

#define DEFAULT_PATH "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
#define PIPE_SIZE (256 * 1024)
#define AGENT_NOFILE 16384

static struct rlimit original_nofile;
static int have_original_nofile;
static int keep_credentials;
/* The host test mode's stand-in for a directory on a hung mount: a child whose directory
 * is $MICROAGENT_TEST_SLOW_CWD waits $MICROAGENT_TEST_SLOW_CWD_MS before its chdir. */
static const char *slow_cwd;
static long slow_cwd_ms;

void spawn_init(int keep_credentials_for_root)
{
    keep_credentials = keep_credentials_for_root;
    if (keep_credentials_for_root) {
        slow_cwd = getenv("MICROAGENT_TEST_SLOW_CWD");
        const char *ms = getenv("MICROAGENT_TEST_SLOW_CWD_MS");
        slow_cwd_ms = ms != NULL ? strtol(ms, NULL, 10) : 0;
    }
    if (getrlimit(RLIMIT_NOFILE, &original_nofile) != 0)
        return;
    have_original_nofile = 1;
    struct rlimit raised = original_nofile;
    if (raised.rlim_cur < AGENT_NOFILE)
        raised.rlim_cur = raised.rlim_max < AGENT_NOFILE ? raised.rlim_max : AGENT_NOFILE;
    setrlimit(RLIMIT_NOFILE, &raised); /* best effort: the default still serves 128 streams */
}

void spawn_restore_limits(void)
{
    if (have_original_nofile)
        setrlimit(RLIMIT_NOFILE, &original_nofile);
}

__attribute__((noreturn, format(printf, 4, 5))) static void fail(int status_fd, int err,
                                                                 const char *code,
                                                                 const char *fmt, ...)
{
    struct spawn_failure f;
    memset(&f, 0, sizeof(f));
    f.err = err;
    snprintf(f.code, sizeof(f.code), "%s", code);
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(f.message, sizeof(f.message), fmt, ap);
    va_end(ap);
    while (write(status_fd, &f, sizeof(f)) < 0 && errno == EINTR)
        ;
    _exit(127);
}

static const char *find_env(char *const *env, const char *name)
{
    size_t len = strlen(name);
    for (; env != NULL && *env != NULL; env++)
        if (strncmp(*env, name, len) == 0 && (*env)[len] == '=')
            return *env + len + 1;
    return NULL;
}

/* env with HOME=home added when it has no HOME. */
static char **with_home(char *const *env, const char *home)
{
    size_t n = 0;
    while (env != NULL && env[n] != NULL)
        n++;
    if (find_env(env, "HOME") != NULL)
        return (char **)env;
    char **copy = calloc(n + 2, sizeof(char *));
    char *entry = malloc(strlen(home) + 6);
    if (copy == NULL || entry == NULL)
        return (char **)env;
    memcpy(copy, env, n * sizeof(char *));
    sprintf(entry, "HOME=%s", home);
    copy[n] = entry;
    return copy;
}

__attribute__((noreturn)) static void exec_command(int status_fd, char *const *argv,
                                                   char *const *env)
{
    const char *name = argv[0];
    if (strchr(name, '/') != NULL) {
        execve(name, argv, env);
        int err = errno;
        fail(status_fd, err, errno_name(err), "cannot execute %s: %s", name, strerror(err));
    }
    const char *path = find_env(env, "PATH");
    if (path == NULL)
        path = DEFAULT_PATH;
    int denied = 0;
    const char *p = path;
    for (;;) {
        size_t len = strcspn(p, ":");
        char candidate[4096];
        int n = len == 0 ? snprintf(candidate, sizeof(candidate), "%s", name)
                         : snprintf(candidate, sizeof(candidate), "%.*s/%s", (int)len, p, name);
        if (n > 0 && (size_t)n < sizeof(candidate)) {
            execve(candidate, argv, env);
            int err = errno;
            if (err == EACCES)
                denied = 1;
            else if (err != ENOENT && err != ENOTDIR && err != ESTALE && err != ENODEV &&
                     err != ETIMEDOUT && err != ENAMETOOLONG)
                fail(status_fd, err, errno_name(err), "cannot execute %s: %s", candidate,
                     strerror(err));
        }
        if (p[len] == '\0')
            break;
        p += len + 1;
    }
    if (denied)
        fail(status_fd, EACCES, "EACCES", "cannot execute %s: %s", name, strerror(EACCES));
    fail(status_fd, ENOENT, "ENOENT", "%s: command not found (PATH=%s)", name, path);
}

static void set_credentials(int status_fd, const char *spec, struct credentials *creds)
{
    char own[32];
    if (spec[0] == '\0' && keep_credentials) {
        snprintf(own, sizeof(own), "%u", (unsigned)geteuid());
        spec = own;
    }
    char error[400];
    if (resolve_user(spec, creds, error, sizeof(error)) != 0)
        fail(status_fd, 0, "EUSER", "%s", error);
    if (geteuid() != 0) {
        if (creds->uid != geteuid() || creds->gid != getegid())
            fail(status_fd, EPERM, "EUSER", "cannot run as user \"%s\": the agent is not root",
                 spec);
        return;
    }
    if (setgroups((size_t)creds->ngroups, creds->groups) != 0)
        fail(status_fd, errno, "EUSER", "setgroups for user \"%s\": %s", spec,
             strerror(errno));
    if (setgid(creds->gid) != 0)
        fail(status_fd, errno, "EUSER", "setgid %u for user \"%s\": %s", (unsigned)creds->gid,
             spec, strerror(errno));
    if (setuid(creds->uid) != 0)
        fail(status_fd, errno, "EUSER", "setuid %u for user \"%s\": %s", (unsigned)creds->uid,
             spec, strerror(errno));
}

static void move_fd(int status_fd, int from, int to)
{
    if (dup2(from, to) < 0)
        fail(status_fd, errno, "ESETUP", "dup2: %s", strerror(errno));
}

static void write_preamble(int status_fd, const char *preamble)
{
    size_t len = preamble != NULL ? strlen(preamble) : 0, done = 0;
    while (done < len) {
        ssize_t n = write(1, preamble + done, len - done);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            fail(status_fd, errno, "ESETUP", "write to the output port: %s", strerror(errno));
        done += (size_t)n;
    }
}

/* Close every fd from 3 on but status_fd (close-on-exec only, where close_range cannot). */
static void close_others(int status_fd)
{
    int r = 0;
    if (status_fd > 3)
        r = close_range(3, (unsigned)status_fd - 1, 0);
    if (r == 0)
        r = close_range((unsigned)status_fd + 1, ~0U, 0);
    if (r != 0 && (errno == ENOSYS || errno == EINVAL))
        r = close_range(3, ~0U, CLOSE_RANGE_CLOEXEC);
    if (r != 0 && errno != ENOSYS && errno != EINVAL)
        fail(status_fd, errno, "ESETUP", "close_range: %s", strerror(errno));
}

__attribute__((noreturn)) static void child(const struct spawn_request *req, int status_fd,
                                            int out_fd, int err_fd, int in_fd, int slave)
{
    sigset_t none;
    sigemptyset(&none);
    sigprocmask(SIG_SETMASK, &none, NULL);
    for (int sig = 1; sig < NSIG; sig++)
        signal(sig, SIG_DFL); /* fails harmlessly for SIGKILL, SIGSTOP and libc's own */
    if (setsid() < 0)
        fail(status_fd, errno, "ESETUP", "setsid: %s", strerror(errno));

    if (req->tty) {
        move_fd(status_fd, slave, 0);
        move_fd(status_fd, slave, 1);
        move_fd(status_fd, slave, 2);
        if (ioctl(0, TIOCSCTTY, 0) != 0)
            fail(status_fd, errno, "ESETUP", "TIOCSCTTY: %s", strerror(errno));
    } else {
        move_fd(status_fd, req->stdout_fd >= 0 ? req->stdout_fd : out_fd, 1);
        move_fd(status_fd, err_fd, 2);
        write_preamble(status_fd, req->preamble);
        if (req->stdin_pipe) {
            move_fd(status_fd, in_fd, 0);
        } else {
            int null = open("/dev/null", O_RDONLY | O_CLOEXEC);
            if (null < 0)
                fail(status_fd, errno, "ESETUP", "open /dev/null: %s", strerror(errno));
            move_fd(status_fd, null, 0);
        }
    }
    spawn_restore_limits();
    /* Every fd of the agent is close-on-exec, but the time to the exec can be long (a
     * directory on a hung mount): meanwhile the agent serves on, and the copies here must
     * not hold other processes' pipes open (a closed stdin would never reach EOF). */
    close_others(status_fd);

    struct credentials creds;
    set_credentials(status_fd, req->user, &creds);
    char **env = with_home(req->env, creds.home);

    const char *cwd = req->cwd[0] != '\0' ? req->cwd : "/";
    if (slow_cwd != NULL && slow_cwd_ms > 0 && strcmp(cwd, slow_cwd) == 0) {
        struct timespec pause = {slow_cwd_ms / 1000, slow_cwd_ms % 1000 * 1000000};
        while (nanosleep(&pause, &pause) != 0 && errno == EINTR) {
        }
    }
    if (chdir(cwd) != 0)
        fail(status_fd, errno, "ECWD", "cannot change to the directory %s: %s", cwd,
             strerror(errno));
    exec_command(status_fd, req->argv, env);
}

static int set_nonblock(int fd)
{
    int flags = fcntl(fd, F_GETFL);
    return flags < 0 ? -1 : fcntl(fd, F_SETFL, flags | O_NONBLOCK);
}

static void close_all(int *fds, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if (fds[i] >= 0) {
            close(fds[i]);
            fds[i] = -1;
        }
}

static int open_pty(const struct winsize *size, int *master, int *slave)
{
    *master = posix_openpt(O_RDWR | O_NOCTTY | O_CLOEXEC);
    if (*master < 0)
        return -1;
    if (grantpt(*master) != 0 || unlockpt(*master) != 0 ||
        ioctl(*master, TIOCSWINSZ, size) != 0)
        return -1;
    *slave = ioctl(*master, TIOCGPTPEER, O_RDWR | O_NOCTTY | O_CLOEXEC);
    if (*slave >= 0)
        return 0;
    char name[64]; /* kernels before 4.13: open the slave by name */
    if (ptsname_r(*master, name, sizeof(name)) != 0)
        return -1;
    *slave = open(name, O_RDWR | O_NOCTTY | O_CLOEXEC);
    return *slave < 0 ? -1 : 0;
}

int spawn(const struct spawn_request *req, struct spawn_result *res)
{
    /* status[2], out[2], err[2], in[2], master, slave */
    int fds[10] = {-1, -1, -1, -1, -1, -1, -1, -1, -1, -1};
    int *status = fds, *out = fds + 2, *err = fds + 4, *in = fds + 6;
    int *master = fds + 8, *slave = fds + 9;
    if (pipe2(status, O_CLOEXEC) != 0)
        goto fail;
    if (req->tty) {
        if (open_pty(&req->size, master, slave) != 0 || set_nonblock(*master) != 0)
            goto fail;
    } else {
        if ((req->stdout_fd < 0 && (pipe2(out, O_CLOEXEC) != 0 || set_nonblock(out[0]) != 0)) ||
            pipe2(err, O_CLOEXEC) != 0 || set_nonblock(err[0]) != 0)
            goto fail;
        /* Fewer wake-ups per byte; a failure only costs speed. */
        if (out[0] >= 0)
            fcntl(out[0], F_SETPIPE_SZ, PIPE_SIZE);
        fcntl(err[0], F_SETPIPE_SZ, PIPE_SIZE);
        if (req->stdin_pipe && (pipe2(in, O_CLOEXEC) != 0 || set_nonblock(in[1]) != 0))
            goto fail;
    }
    if (set_nonblock(status[0]) != 0)
        goto fail;
    pid_t pid = fork();
    if (pid < 0)
        goto fail;
    if (pid == 0)
        child(req, status[1], out[1], err[1], in[0], *slave);
    int child_ends[] = {status[1], out[1], err[1], in[0], *slave};
    close_all(child_ends, sizeof(child_ends) / sizeof(child_ends[0]));
    res->pid = pid;
    res->status_fd = status[0];
    res->master = *master;
    if (req->tty) {
        res->out_fd = *master;
        res->err_fd = -1;
        res->in_fd = *master;
    } else {
        res->out_fd = out[0];
        res->err_fd = err[0];
        res->in_fd = in[1];
    }
    return 0;
fail:;
    int saved = errno;
    close_all(fds, sizeof(fds) / sizeof(fds[0]));
    errno = saved;
    return -1;
}
