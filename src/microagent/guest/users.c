/* User and group lookup in the image's /etc/passwd and /etc/group. Lines longer than the
 * line buffer, NIS entries (+/-) and malformed lines are skipped. */
#include "users.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define PASSWD "/etc/passwd"
#define GROUP "/etc/group"
#define MAX_ID 4294967294ULL /* (uid_t)-1 is "no change" for setuid and friends */

struct passwd_entry {
    char name[256];
    unsigned long uid;
    unsigned long gid;
    char home[1024];
};

/* A decimal id, the whole string, at most MAX_ID. */
static int parse_id(const char *s, unsigned long *out)
{
    if (*s < '0' || *s > '9')
        return -1;
    errno = 0;
    char *end;
    unsigned long long v = strtoull(s, &end, 10);
    if (errno != 0 || *end != '\0' || v > MAX_ID)
        return -1;
    *out = (unsigned long)v;
    return 0;
}

/* Split line at ':' into at most max fields (the last keeps the rest). */
static int split_fields(char *line, char **fields, int max)
{
    int n = 0;
    fields[n++] = line;
    for (char *p = line; *p != '\0' && n < max; p++)
        if (*p == ':') {
            *p = '\0';
            fields[n++] = p + 1;
        }
    return n;
}

/* Read the next complete line of f into line (newline removed). Returns 0, or -1 at EOF.
 * An overlong line is skipped whole. */
static int next_line(FILE *f, char *line, size_t size)
{
    while (fgets(line, (int)size, f) != NULL) {
        size_t len = strlen(line);
        if (len > 0 && line[len - 1] == '\n') {
            line[len - 1] = '\0';
            return 0;
        }
        if (feof(f))
            return 0; /* the last line has no newline */
        int c;
        while ((c = fgetc(f)) != EOF && c != '\n')
            ;
    }
    return -1;
}

/* Find a passwd entry by name (when name is not NULL) or by uid. 1 found, 0 not, -1 no
 * file. */
static int find_passwd(const char *name, unsigned long uid, struct passwd_entry *out)
{
    FILE *f = fopen(PASSWD, "re");
    if (f == NULL)
        return -1;
    char line[4096];
    int found = 0;
    while (!found && next_line(f, line, sizeof(line)) == 0) {
        char *fields[7];
        if (line[0] == '+' || line[0] == '-' || split_fields(line, fields, 7) < 7)
            continue;
        unsigned long u, g;
        if (parse_id(fields[2], &u) != 0 || parse_id(fields[3], &g) != 0)
            continue;
        if (name != NULL ? strcmp(fields[0], name) != 0 : u != uid)
            continue;
        if (strlen(fields[0]) >= sizeof(out->name) || strlen(fields[5]) >= sizeof(out->home))
            continue;
        strcpy(out->name, fields[0]);
        strcpy(out->home, fields[5]);
        out->uid = u;
        out->gid = g;
        found = 1;
    }
    fclose(f);
    return found;
}

/* Whether name is in the comma-separated member list. */
static int is_member(const char *members, const char *name)
{
    size_t len = strlen(name);
    const char *p = members;
    while (*p != '\0') {
        size_t n = strcspn(p, ",");
        if (n == len && strncmp(p, name, len) == 0)
            return 1;
        p += n;
        if (*p == ',')
            p++;
    }
    return 0;
}

/* Look a group up by name (gid_out set), and/or collect the groups member belongs to
 * into creds. Returns 1 when the named group was found, 0 when not, -1 without a file. */
static int scan_groups(const char *group_name, unsigned long *gid_out, const char *member,
                       struct credentials *creds)
{
    FILE *f = fopen(GROUP, "re");
    if (f == NULL)
        return -1;
    char line[8192];
    int found = 0;
    while (next_line(f, line, sizeof(line)) == 0) {
        char *fields[4];
        if (line[0] == '+' || line[0] == '-' || split_fields(line, fields, 4) < 4)
            continue;
        unsigned long g;
        if (parse_id(fields[2], &g) != 0)
            continue;
        if (group_name != NULL && strcmp(fields[0], group_name) == 0) {
            *gid_out = g;
            found = 1;
        }
        if (member != NULL && is_member(fields[3], member) && creds->ngroups < MAX_GROUPS) {
            int duplicate = 0;
            for (int i = 0; i < creds->ngroups; i++)
                duplicate |= creds->groups[i] == (gid_t)g;
            if (!duplicate)
                creds->groups[creds->ngroups++] = (gid_t)g;
        }
    }
    fclose(f);
    return found;
}

int resolve_user(const char *spec, struct credentials *out, char *error, size_t size)
{
    char user[512];
    if (strlen(spec) >= sizeof(user)) {
        snprintf(error, size, "user \"%.40s...\" is too long", spec);
        return -1;
    }
    strcpy(user, spec);
    char *group = strchr(user, ':');
    if (group != NULL)
        *group++ = '\0';

    struct passwd_entry pw;
    int have_pw = 0;
    unsigned long uid = 0, gid = 0;
    if (user[0] == '\0' || parse_id(user, &uid) == 0) {
        have_pw = find_passwd(NULL, uid, &pw) == 1;
    } else {
        int r = find_passwd(user, 0, &pw);
        if (r == 1) {
            have_pw = 1;
        } else if (strcmp(user, "root") != 0) {
            snprintf(error, size, "user \"%s\" not found in %s%s", user, PASSWD,
                     r < 0 ? " (the image has none)" : "");
            return -1;
        }
    }
    if (have_pw) {
        uid = pw.uid;
        gid = pw.gid;
    }
    out->uid = (uid_t)uid;
    out->ngroups = 0;
    snprintf(out->home, sizeof(out->home), "%s",
             have_pw && pw.home[0] != '\0' ? pw.home : uid == 0 ? "/root" : "/");

    if (group != NULL && group[0] != '\0') {
        if (parse_id(group, &gid) != 0) {
            int r = scan_groups(group, &gid, NULL, out);
            if (r != 1) {
                snprintf(error, size, "group \"%s\" not found in %s%s", group, GROUP,
                         r < 0 ? " (the image has none)" : "");
                return -1;
            }
        }
        out->gid = (gid_t)gid;
        out->groups[out->ngroups++] = (gid_t)gid;
        return 0;
    }
    out->gid = (gid_t)gid;
    out->groups[out->ngroups++] = (gid_t)gid;
    if (have_pw)
        scan_groups(NULL, NULL, pw.name, out); /* no /etc/group: no supplementary groups */
    return 0;
}
