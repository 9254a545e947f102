#include "io.h"

#include <errno.h>
#include <stdint.h>
#include <unistd.h>

int write_all(int fd, const void *p, size_t len)
{
    const uint8_t *at = p;
    while (len > 0) {
        ssize_t n = write(fd, at, len);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return -1;
        }
        at += n;
        len -= (size_t)n;
    }
    return 0;
}
