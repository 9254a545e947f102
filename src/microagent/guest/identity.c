/* A fork's new identity, taken in the resumed operation (resumed.c).
 *
 * A fork is a workspace resumed from another one's memory image: its kernel still holds
 * the source's hostname and its disk the source's /etc. The host names the fork (and may
 * ask for a new machine ID); the agent sets the kernel's hostname and rewrites the files
 * that carry the old identity. Nothing after boot reads microagent.hostname again: in a
 * fork, /proc/cmdline is the source's. Files are replaced atomically (a temporary file
 * beside them, renamed over), keeping their mode and owner; a file that is missing or not
 * a regular file is left alone, and so is a read-only /etc. The machine ID is drawn with
 * getrandom after the reseed, so two forks of one image never share one. */
#include "identity.h"

#include "channel.h"
#include "io.h"
#include "log.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <sys/utsname.h>
#include <unistd.h>

#define HOSTNAME_FILE "/etc/hostname"
#define HOSTS_FILE "/etc/hosts"
#define MACHINE_ID_FILE "/etc/machine-id"
#define RANDOM_SEED_FILE "/var/lib/systemd/random-seed"
#define TMP_SUFFIX ".microagent-tmp"

static int valid_hostname(const char *name, ssize_t len)
{
    if (len < 1 || len > 63 || name[0] == '-' || name[len - 1] == '-')
        return 0;
    for (ssize_t i = 0; i < len; i++) {
        char c = name[i];
        if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
              c == '-'))
            return 0;
    }
    return 1;
}

int identity_parse(uint32_t id, const struct json_doc *doc, int request, struct identity *out)
{
    memset(out, 0, sizeof(*out));
    int tok = json_find(doc, request, "identity");
    if (tok < 0)
        return 0;
    out->present = 1;
    ssize_t len = json_string(doc, json_find(doc, tok, "hostname"), out->hostname,
                              sizeof(out->hostname));
    int machine_id = json_find(doc, tok, "machine_id");
    if (!valid_hostname(out->hostname, len) ||
        (machine_id >= 0 && json_bool(doc, machine_id, &out->machine_id) != 0)) {
        channel_send_error(id, "EINVAL", 0, "resumed: \"identity\" must be an object with a "
                           "\"hostname\" of 1 to 63 letters, digits and '-' (not first or "
                           "last) and an optional boolean \"machine_id\"");
        return -1;
    }
    return 0;
}

/* 0 when path is a regular file (*st filled in); 1 when it is to be left alone (missing,
 * or not a regular file: said on the console); -1 on another error. */
static int existing_file(const char *path, struct stat *st)
{
    if (lstat(path, st) != 0)
        return errno == ENOENT ? 1 : -1;
    if (!S_ISREG(st->st_mode)) {
        log_info("identity: %s is not a regular file; left alone", path);
        return 1;
    }
    return 0;
}

/* Replace path's content with data[0..len), with st's mode and owner. Returns 0; 1 when
 * the file system is read-only (said on the console); -1 on another error. */
static int replace_file(const char *path, const struct stat *st, const char *data, size_t len)
{
    char tmp[64];
    snprintf(tmp, sizeof(tmp), "%s" TMP_SUFFIX, path);
    int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_NOFOLLOW | O_CLOEXEC, 0600);
    if (fd < 0) {
        if (errno != EROFS)
            return -1;
        log_info("identity: %s is on a read-only file system; left alone", path);
        return 1;
    }
    /* fchmod after fchown, which clears set-id bits */
    int ok = write_all(fd, data, len) == 0 && fchown(fd, st->st_uid, st->st_gid) == 0 &&
             fchmod(fd, st->st_mode & 07777) == 0 && fsync(fd) == 0 && rename(tmp, path) == 0;
    int saved = errno;
    close(fd);
    if (ok)
        return 0;
    unlink(tmp);
    errno = saved;
    return -1;
}

static int write_hostname_file(const char *name)
{
    struct stat st;
    int rc = existing_file(HOSTNAME_FILE, &st);
    if (rc != 0)
        return rc < 0 ? -1 : 0; /* 1: left alone */
    char text[66];
    int n = snprintf(text, sizeof(text), "%s\n", name);
    return replace_file(HOSTNAME_FILE, &st, text, (size_t)n) < 0 ? -1 : 0;
}

static int is_blank(char c)
{
    return c == ' ' || c == '\t' || c == '\n' || c == '\r';
}

static int same_word(const char *word, size_t len, const char *s)
{
    return strlen(s) == len && memcmp(word, s, len) == 0;
}

/* Copy one line of /etc/hosts to out, its names (the words after the address, before a
 * '#') equal to old replaced by new (*changed set then). Returns whether it names new. */
static int edit_hosts_line(FILE *out, const char *line, size_t n, const char *old,
                           const char *new, int *changed)
{
    const char *comment = memchr(line, '#', n);
    size_t end = comment != NULL ? (size_t)(comment - line) : n;
    int words = 0, names_new = 0;
    for (size_t i = 0; i < end;) {
        if (is_blank(line[i])) {
            fputc(line[i++], out);
            continue;
        }
        size_t j = i;
        while (j < end && !is_blank(line[j]))
            j++;
        const char *word = line + i;
        size_t len = j - i;
        int is_name = words++ > 0;
        if (is_name && strcmp(old, new) != 0 && same_word(word, len, old)) {
            word = new;
            len = strlen(new);
            *changed = 1;
        }
        names_new |= is_name && same_word(word, len, new);
        fwrite(word, 1, len, out);
        i = j;
    }
    fwrite(line + end, 1, n - end, out);
    return names_new;
}

/* /etc/hosts with old's names renamed new, and a 127.0.1.1 line for new when no line
 * names it (as Debian's installer writes one). */
static int write_hosts_file(const char *old, const char *new)
{
    struct stat st;
    int rc = existing_file(HOSTS_FILE, &st);
    if (rc != 0)
        return rc < 0 ? -1 : 0;
    FILE *in = fopen(HOSTS_FILE, "re");
    if (in == NULL)
        return -1;
    char *text = NULL;
    size_t size = 0;
    FILE *out = open_memstream(&text, &size);
    if (out == NULL) {
        int saved = errno;
        fclose(in);
        errno = saved;
        return -1;
    }
    char *line = NULL;
    size_t cap = 0;
    ssize_t n;
    int changed = 0, names_new = 0, newline = 1;
    while ((n = getline(&line, &cap, in)) > 0) {
        names_new |= edit_hosts_line(out, line, (size_t)n, old, new, &changed);
        newline = line[n - 1] == '\n';
    }
    int read_error = ferror(in) ? errno : 0;
    if (!names_new) {
        fprintf(out, "%s127.0.1.1\t%s\n", newline ? "" : "\n", new);
        changed = 1;
    }
    free(line);
    fclose(in);
    rc = fclose(out) != 0 ? -1 : 0; /* text and size are valid after fclose */
    if (rc == 0 && read_error != 0) {
        errno = read_error;
        rc = -1;
    }
    if (rc == 0 && changed)
        rc = replace_file(HOSTS_FILE, &st, text, size) < 0 ? -1 : 0;
    int saved = errno;
    free(text);
    errno = saved;
    return rc;
}

/* A new /etc/machine-id, unless the image leaves it to be made at boot (empty or
 * "uninitialized"): the file then holds no ID to replace. */
static int write_machine_id(void)
{
    struct stat st;
    int rc = existing_file(MACHINE_ID_FILE, &st);
    if (rc != 0)
        return rc < 0 ? -1 : 0;
    char old[64];
    int fd = open(MACHINE_ID_FILE, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return -1;
    ssize_t n = read(fd, old, sizeof(old) - 1);
    int saved = errno;
    close(fd);
    errno = saved;
    if (n < 0)
        return -1;
    while (n > 0 && is_blank(old[n - 1]))
        n--;
    old[n] = '\0';
    if (n == 0 || strcmp(old, "uninitialized") == 0) {
        log_info("identity: %s is %s; left alone", MACHINE_ID_FILE,
                 n == 0 ? "empty" : "\"uninitialized\"");
        return 0;
    }
    unsigned char id[16];
    ssize_t got = getrandom(id, sizeof(id), 0);
    if (got != (ssize_t)sizeof(id)) {
        if (got >= 0)
            errno = EIO;
        return -1;
    }
    /* a version 4 UUID, as systemd draws them (sd_id128_randomize) */
    id[6] = (unsigned char)((id[6] & 0x0f) | 0x40);
    id[8] = (unsigned char)((id[8] & 0x3f) | 0x80);
    static const char digits[] = "0123456789abcdef";
    char text[33];
    for (size_t i = 0; i < sizeof(id); i++) {
        text[2 * i] = digits[id[i] >> 4];
        text[2 * i + 1] = digits[id[i] & 0x0f];
    }
    text[32] = '\n';
    return replace_file(MACHINE_ID_FILE, &st, text, sizeof(text)) < 0 ? -1 : 0;
}

/* systemd credits the seed file's bytes to the RNG at boot: a fork must not have the
 * source's. */
static int remove_random_seed(void)
{
    if (unlink(RANDOM_SEED_FILE) == 0 || errno == ENOENT)
        return 0;
    if (errno != EROFS)
        return -1;
    log_info("identity: %s is on a read-only file system; left alone", RANDOM_SEED_FILE);
    return 0;
}

static int failed(uint32_t id, const char *what)
{
    int err = errno;
    channel_send_error(id, "EIO", err, "resumed: identity: %s: %s", what, strerror(err));
    return -1;
}

int identity_apply(uint32_t id, const struct identity *identity)
{
    const char *name = identity->hostname;
    struct utsname u;
    if (uname(&u) != 0)
        return failed(id, "uname");
    if (sethostname(name, strlen(name)) != 0)
        return failed(id, "sethostname");
    log_info("identity: hostname %s (was %s)", name, u.nodename);
    if (write_hostname_file(name) != 0)
        return failed(id, HOSTNAME_FILE);
    if (write_hosts_file(u.nodename, name) != 0)
        return failed(id, HOSTS_FILE);
    if (!identity->machine_id)
        return 0;
    if (write_machine_id() != 0)
        return failed(id, MACHINE_ID_FILE);
    if (remove_random_seed() != 0)
        return failed(id, RANDOM_SEED_FILE);
    return 0;
}
