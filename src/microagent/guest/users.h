/* Who a command runs as: "user" of an exec request resolved against the image's
 * /etc/passwd and /etc/group (parsed here: the image's libc and NSS are not ours). */
#ifndef MICROAGENT_USERS_H
#define MICROAGENT_USERS_H

#include <stddef.h>
#include <sys/types.h>

#define MAX_GROUPS 64

struct credentials {
    uid_t uid;
    gid_t gid;
    gid_t groups[MAX_GROUPS]; /* supplementary groups, the primary one first */
    int ngroups;
    char home[1024];          /* from passwd, else "/root" for root and "/" otherwise */
};

/* Resolve spec: "" or "root" (uid 0), "N", "N:M", "name", "name:group", "N:group", ...
 * A named user or group must exist in /etc/passwd or /etc/group. Supplementary groups
 * come from /etc/group when no group is given (as Docker does). Returns 0, or -1 with a
 * message in error. */
int resolve_user(const char *spec, struct credentials *out, char *error, size_t size);

#endif
