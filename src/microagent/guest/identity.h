/* A fork's new identity, for the resumed operation (resumed.c). */
#ifndef MICROAGENT_IDENTITY_H
#define MICROAGENT_IDENTITY_H

#include "json.h"

#include <stdint.h>

struct identity {
    int present;       /* the request had an "identity" */
    char hostname[64]; /* 1 to 63 letters, digits and '-', not first or last */
    int machine_id;    /* give /etc/machine-id a new value */
};

/* Read the request's optional "identity" into *out. Returns 0 (also when there is
 * none), or -1 after answering with ERROR EINVAL. */
int identity_parse(uint32_t id, const struct json_doc *doc, int request, struct identity *out);

/* Take the identity as PID 1: the kernel's hostname, /etc/hostname, /etc/hosts and, when
 * asked, /etc/machine-id (with systemd's random seed removed). A read-only /etc or a
 * missing file is skipped with a note on the console. Returns 0, or -1 after answering
 * with ERROR EIO. */
int identity_apply(uint32_t id, const struct identity *identity);

#endif
