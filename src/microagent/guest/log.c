/* Console messages. Each line is formatted into one buffer and written with one write(2),
 * so lines from the agent never interleave with each other mid-line. */
#include "log.h"

#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#define PREFIX "microagent-init: "

static void write_line(const char *text, size_t len)
{
    while (len > 0) {
        ssize_t n = write(STDERR_FILENO, text, len);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return; /* nowhere left to report a console failure */
        }
        text += n;
        len -= (size_t)n;
    }
}

/* Advance len past what snprintf reported writing, clamped to the truncation point. */
static size_t advance(size_t len, int written, size_t room)
{
    if (written < 0)
        return len;
    return len + (size_t)written >= room ? room - 1 : len + (size_t)written;
}

static void vlog(int err, const char *fmt, va_list ap)
{
    char line[1024];
    const size_t room = sizeof(line) - 1; /* one byte stays free for the newline */
    size_t len = advance(0, snprintf(line, room, "%s", PREFIX), room);
    len = advance(len, vsnprintf(line + len, room - len, fmt, ap), room);
    if (err != 0)
        len = advance(len, snprintf(line + len, room - len, ": %s", strerror(err)), room);
    line[len++] = '\n';
    write_line(line, len);
}

void log_attach_console(void)
{
    if (fcntl(STDERR_FILENO, F_GETFD) >= 0)
        return;
    int fd = open("/dev/console", O_RDWR | O_NOCTTY);
    if (fd < 0)
        return; /* no console at all: messages are lost, the boot goes on */
    for (int target = 0; target <= 2; target++)
        if (fd != target)
            dup2(fd, target);
    if (fd > 2)
        close(fd);
}

void log_info(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vlog(0, fmt, ap);
    va_end(ap);
}

void log_error(int err, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vlog(err, fmt, ap);
    va_end(ap);
}
