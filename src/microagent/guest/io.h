/* Whole writes to a descriptor. */
#ifndef MICROAGENT_IO_H
#define MICROAGENT_IO_H

#include <stddef.h>

/* Write all of p[0..len) to fd, again after EINTR and short writes. 0, or -1 with errno. */
int write_all(int fd, const void *p, size_t len);

#endif
