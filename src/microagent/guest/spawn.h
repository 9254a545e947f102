/* Starting a command: the fork and everything the child does before execve. */
#ifndef MICROAGENT_SPAWN_H
#define MICROAGENT_SPAWN_H

#include <stddef.h>
#include <sys/ioctl.h>
#include <sys/types.h>

/* The child's report when it could not exec, read by the parent from the status pipe. */
struct spawn_failure {
    int err;          /* errno, or 0 */
    char code[16];    /* ENOENT, EACCES, ENOEXEC, ..., EUSER, ECWD, ESETUP */
    char message[480];
};

struct spawn_request {
    char *const *argv;
    char *const *env;
    const char *cwd;      /* "" means "/" */
    const char *user;     /* see users.h */
    int tty;              /* a pty for stdin, stdout and stderr */
    struct winsize size;  /* its size */
    int stdin_pipe;       /* stdin from a pipe (else /dev/null; a pty when tty) */
    int stdout_fd;        /* >= 0: stdout is this fd (not with a tty), no pipe; else -1 */
    const char *preamble; /* written to that stdout by the child before the command runs */
};

struct spawn_result {
    pid_t pid;            /* also the process group and session id */
    int status_fd;        /* EOF: the exec succeeded; a struct spawn_failure: it failed */
    int out_fd;           /* stdout pipe (or the pty master; -1 with stdout_fd) */
    int err_fd;           /* stderr pipe (-1 with a tty) */
    int in_fd;            /* stdin pipe (or the pty master; -1 without stdin) */
    int master;           /* the pty master, or -1 */
};

/* Record the agent's own limits and raise its fd limit (many streams); children get the
 * original limits back. keep_credentials_for_root: user "" keeps the agent's own user
 * (the host test mode, which may not run as root). */
void spawn_init(int keep_credentials_for_root);

/* In a child: give back the limits the agent changed for itself. */
void spawn_restore_limits(void);

/* Fork the child. Returns 0, or -1 with errno set (pipes, pty or fork failed); the
 * parent's fds are non-blocking and close-on-exec. */
int spawn(const struct spawn_request *req, struct spawn_result *res);

#endif
