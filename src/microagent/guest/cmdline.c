/* The kernel command line. Parameters with a dot (microagent.root=...) are not passed to
 * init as argv or environment by the kernel, so they are read from /proc/cmdline. */
#include "cmdline.h"

#include "log.h"

#include <errno.h>
#include <fcntl.h>
#include <string.h>
#include <unistd.h>

#define MAX_PARAMS 128

static char buffer[4096];
static char *keys[MAX_PARAMS];
static char *values[MAX_PARAMS];
static int count;

/* Split buffer in place into key/value pairs, honouring double quotes. */
static void split(void)
{
    char *p = buffer;
    count = 0;
    while (*p != '\0' && count < MAX_PARAMS) {
        while (*p == ' ' || *p == '\n' || *p == '\t')
            p++;
        if (*p == '\0')
            break;
        char *key = p;
        char *value = NULL;
        int quoted = 0;
        char *out = p;
        for (; *p != '\0'; p++) {
            if (*p == '"') {
                quoted = !quoted;
                continue;
            }
            if (!quoted && (*p == ' ' || *p == '\n' || *p == '\t'))
                break;
            if (*p == '=' && value == NULL) {
                *out++ = '\0';
                value = out;
                continue;
            }
            *out++ = *p;
        }
        if (*p != '\0')
            p++;
        *out = '\0';
        keys[count] = key;
        values[count] = value != NULL ? value : out;
        count++;
    }
}

int cmdline_load(void)
{
    int fd = open("/proc/cmdline", O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        log_error(errno, "open /proc/cmdline");
        return -1;
    }
    size_t len = 0;
    for (;;) {
        ssize_t n = read(fd, buffer + len, sizeof(buffer) - 1 - len);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0) {
            log_error(errno, "read /proc/cmdline");
            close(fd);
            return -1;
        }
        if (n == 0 || len + (size_t)n >= sizeof(buffer) - 1) {
            len += (size_t)n;
            break;
        }
        len += (size_t)n;
    }
    close(fd);
    buffer[len] = '\0';
    split();
    return 0;
}

const char *cmdline_get(const char *key)
{
    const char *found = NULL;
    for (int i = 0; i < count; i++)
        if (strcmp(keys[i], key) == 0)
            found = values[i]; /* the last one wins, as in the kernel */
    return found;
}

const char *cmdline_get_nth(const char *key, int n)
{
    for (int i = 0; i < count; i++)
        if (strcmp(keys[i], key) == 0 && n-- == 0)
            return values[i];
    return NULL;
}
