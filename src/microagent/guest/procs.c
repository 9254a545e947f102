/* Background processes (procs.h): the table, their start, the draining of their output
 * into bounded files, their exit status and the meta file.
 *
 * The agent drains the pipes itself (never blocking the process: the files are bounded)
 * so that it can keep the head and the tail: bytes up to PROC_HEAD stay where they were
 * written; once more than PROC_HEAD + PROC_TAIL + PROC_STEP bytes were written, the
 * oldest whole PROC_STEP blocks after the head are punched out of the file
 * (FALLOC_FL_PUNCH_HOLE: tmpfs and ext4 free them; the file keeps its size and reads
 * zeros there), so every byte keeps its offset and the kept tail is between PROC_TAIL and
 * PROC_TAIL + PROC_STEP bytes long. */
#include "procs.h"

#include "clock.h"
#include "channel.h"
#include "errnames.h"
#include "log.h"
#include "poller.h"
#include "spawn.h"

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define PROC_BASE "/run/microagent/proc"
#define START_WAIT_MS 10000
/* Bytes drained from one pipe per loop iteration, so other streams go on. */
#define DRAIN_PER_TURN (1024 * 1024)

static struct proc table[MAX_PROCS];
static long long next_id = 1;
static char base[200];
static const char *const output_names[2] = {"stdout", "stderr"};

static long long wall_ms(void)
{
    struct timespec now;
    clock_gettime(CLOCK_REALTIME, &now);
    return (long long)now.tv_sec * 1000 + now.tv_nsec / 1000000;
}

struct proc *procs_find(long long id)
{
    for (int i = 0; i < MAX_PROCS; i++)
        if (table[i].used && !table[i].starting && table[i].id == id)
            return &table[i];
    return NULL;
}

/* The directory every process's directory goes in: made on first use. */
static const char *base_dir(void)
{
    if (base[0] != '\0')
        return base;
    if (getpid() != 1) {
        /* The host test mode: never the host's /run. */
        const char *tmp = getenv("TMPDIR");
        snprintf(base, sizeof(base), "%s/microagent-procs-XXXXXX",
                 tmp != NULL && tmp[0] != '\0' ? tmp : "/tmp");
        if (mkdtemp(base) == NULL) {
            base[0] = '\0';
            return NULL;
        }
        return base;
    }
    if ((mkdir("/run/microagent", 0755) != 0 && errno != EEXIST) ||
        (mkdir(PROC_BASE, 0700) != 0 && errno != EEXIST))
        return NULL;
    snprintf(base, sizeof(base), "%s", PROC_BASE);
    return base;
}

static void remove_files(struct proc *p)
{
    char path[320];
    const char *names[] = {"stdout", "stderr", "meta", "meta.tmp"};
    for (size_t i = 0; i < sizeof(names) / sizeof(names[0]); i++) {
        snprintf(path, sizeof(path), "%s/%s", p->dir, names[i]);
        unlink(path);
    }
    if (rmdir(p->dir) != 0 && errno != ENOENT)
        log_error(errno, "remove %s", p->dir);
}

static void free_entry(struct proc *p)
{
    for (int k = 0; k < 2; k++) {
        if (p->out[k].pipe_fd >= 0)
            close(p->out[k].pipe_fd);
        if (p->out[k].file_fd >= 0)
            close(p->out[k].file_fd);
    }
    if (p->in_fd >= 0)
        close(p->in_fd);
    if (p->starting && p->status_fd >= 0)
        close(p->status_fd);
    free(p->argv);
    *p = (struct proc){0};
}

/* A free slot: an unused one, else the entry of the process that finished first (its
 * files go with it). NULL when all run. */
static struct proc *free_slot(void)
{
    struct proc *oldest = NULL;
    for (int i = 0; i < MAX_PROCS; i++) {
        if (!table[i].used)
            return &table[i];
        if (table[i].state != PROC_RUNNING && table[i].writing == 0 && !table[i].starting &&
            (oldest == NULL || table[i].finished_ms < oldest->finished_ms))
            oldest = &table[i];
    }
    if (oldest != NULL) {
        remove_files(oldest);
        free_entry(oldest);
    }
    return oldest;
}

static char **copy_argv(char *const *argv)
{
    size_t n = 0, bytes = 0;
    while (argv[n] != NULL)
        bytes += strlen(argv[n++]) + 1;
    char **out = malloc((n + 1) * sizeof(char *) + bytes);
    if (out == NULL)
        return NULL;
    char *q = (char *)(out + n + 1);
    for (size_t i = 0; i < n; i++) {
        size_t len = strlen(argv[i]) + 1;
        memcpy(q, argv[i], len);
        out[i] = q;
        q += len;
    }
    out[n] = NULL;
    return out;
}

static const char *state_name(enum proc_state st)
{
    return st == PROC_RUNNING ? "running" : st == PROC_EXITED ? "exited" : "signaled";
}

void procs_write_entry(struct json_writer *w, const struct proc *p, size_t argv_budget)
{
    json_object_begin(w);
    json_key(w, "id");
    json_write_int(w, p->id);
    json_key(w, "pid");
    json_write_int(w, p->pid);
    json_key(w, "argv");
    json_array_begin(w);
    size_t used = 0;
    int truncated = 0;
    for (size_t i = 0; p->argv[i] != NULL; i++) {
        size_t len = strlen(p->argv[i]);
        if (used + len > argv_budget && i > 0) {
            truncated = 1;
            break;
        }
        json_write_bytes(w, p->argv[i], len > argv_budget ? argv_budget : len);
        truncated |= len > argv_budget;
        used += len;
    }
    json_array_end(w);
    json_key(w, "argv_truncated");
    json_write_bool(w, truncated);
    json_key(w, "started_ms");
    json_write_int(w, p->started_ms);
    json_key(w, "state");
    json_write_string(w, state_name(p->state));
    json_key(w, "exit_code");
    if (p->state == PROC_EXITED)
        json_write_int(w, WEXITSTATUS(p->status));
    else
        json_write_null(w);
    json_key(w, "signal");
    if (p->state == PROC_SIGNALED)
        json_write_int(w, WTERMSIG(p->status));
    else
        json_write_null(w);
    json_key(w, "finished_ms");
    if (p->state != PROC_RUNNING)
        json_write_int(w, p->finished_ms);
    else
        json_write_null(w);
    json_key(w, "stdin");
    json_write_bool(w, p->in_fd >= 0);
    for (int k = 0; k < 2; k++) {
        const struct proc_output *o = &p->out[k];
        json_key(w, output_names[k]);
        json_object_begin(w);
        json_key(w, "size");
        json_write_int(w, o->size);
        json_key(w, "dropped");
        json_write_int(w, o->tail_start - PROC_HEAD);
        json_key(w, "tail_start");
        json_write_int(w, o->tail_start);
        json_key(w, "eof");
        json_write_bool(w, o->pipe_fd < 0);
        json_object_end(w);
    }
    json_key(w, "dir");
    json_write_string(w, p->dir);
    json_object_end(w);
}

void procs_write_all(struct json_writer *w, size_t argv_budget)
{
    json_array_begin(w);
    /* in the order they were started */
    long long last = 0;
    for (;;) {
        struct proc *next = NULL;
        for (int i = 0; i < MAX_PROCS; i++)
            if (table[i].used && !table[i].starting && table[i].id > last &&
                (next == NULL || table[i].id < next->id))
                next = &table[i];
        if (next == NULL)
            break;
        procs_write_entry(w, next, argv_budget);
        last = next->id;
    }
    json_array_end(w);
}

/* The meta file: the entry as JSON, replaced atomically (for a reader in the guest). */
static void write_meta(const struct proc *p)
{
    static char doc[MAX_PAYLOAD];
    struct json_writer w;
    json_writer_init(&w, doc, sizeof(doc) - 1);
    procs_write_entry(&w, p, 16384);
    ssize_t n = json_writer_finish(&w);
    if (n < 0)
        return;
    doc[n++] = '\n';
    char tmp[320], path[320];
    snprintf(tmp, sizeof(tmp), "%s/meta.tmp", p->dir);
    snprintf(path, sizeof(path), "%s/meta", p->dir);
    int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    if (fd < 0) {
        log_error(errno, "write %s", tmp);
        return;
    }
    int ok = write(fd, doc, (size_t)n) == n;
    if (!ok)
        log_error(errno, "write %s", tmp);
    close(fd);
    if (ok && rename(tmp, path) != 0)
        log_error(errno, "rename %s", tmp);
}

static void check_finished(struct proc *p)
{
    if (p->state != PROC_RUNNING || !p->reaped || p->out[0].pipe_fd >= 0 ||
        p->out[1].pipe_fd >= 0)
        return;
    p->state = WIFSIGNALED(p->status) ? PROC_SIGNALED : PROC_EXITED;
    p->finished_ms = wall_ms();
    procs_close_stdin(p);
    write_meta(p);
}

void procs_close_stdin(struct proc *p)
{
    if (p->in_fd >= 0)
        close(p->in_fd);
    p->in_fd = -1;
}

/* Drop whole PROC_STEP blocks after the head that are older than the last PROC_TAIL. */
static void trim(struct proc *p, struct proc_output *o)
{
    long long keep_from = o->size - PROC_TAIL;
    if (keep_from < o->tail_start + PROC_STEP)
        return;
    long long to = PROC_HEAD + (keep_from - PROC_HEAD) / PROC_STEP * PROC_STEP;
    if (!o->punch_failed &&
        fallocate(o->file_fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, o->tail_start,
                  to - o->tail_start) != 0) {
        /* The bytes are reported dropped all the same: a reader sees the same ranges
         * whatever the file system; only the space is not given back. */
        log_error(errno, "process %lld: punch a hole in %s/%s", p->id, p->dir,
                  output_names[o == &p->out[0] ? 0 : 1]);
        o->punch_failed = 1;
    }
    o->tail_start = to;
}

static void drain(struct proc *p, int k)
{
    static char buf[64 * 1024];
    struct proc_output *o = &p->out[k];
    long long taken = 0;
    while (o->pipe_fd >= 0 && taken < DRAIN_PER_TURN) {
        ssize_t n = read(o->pipe_fd, buf, sizeof(buf));
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0 && errno == EAGAIN)
            return;
        if (n <= 0) {
            if (n < 0)
                log_error(errno, "process %lld: read %s", p->id, output_names[k]);
            close(o->pipe_fd);
            o->pipe_fd = -1;
            check_finished(p);
            return;
        }
        taken += n;
        size_t done = 0;
        while (done < (size_t)n) {
            ssize_t m = pwrite(o->file_fd, buf + done, (size_t)n - done, o->size);
            if (m < 0 && errno == EINTR)
                continue;
            if (m <= 0) {
                /* ENOSPC and the like: the bytes are lost, but the offsets stay those of
                 * the process's output (they read as zeros). */
                log_error(errno, "process %lld: write %s", p->id, output_names[k]);
                o->size += (long long)((size_t)n - done);
                break;
            }
            done += (size_t)m;
            o->size += m;
        }
        trim(p, o);
    }
}

static void on_pipe(void *ctx, int tag, int fd, short revents)
{
    (void)revents;
    struct proc *p = ctx;
    if (p->used && p->out[tag].pipe_fd == fd)
        drain(p, tag);
}

static void end_start(struct proc *p, int overdue);

static void on_status(void *ctx, int tag, int fd, short revents)
{
    (void)tag;
    (void)revents;
    struct proc *p = ctx;
    if (p->used && p->starting && p->status_fd == fd)
        end_start(p, 0);
}

void procs_watch(void)
{
    for (int i = 0; i < MAX_PROCS; i++) {
        struct proc *p = &table[i];
        if (!p->used)
            continue;
        for (int k = 0; k < 2; k++)
            if (p->out[k].pipe_fd >= 0)
                poller_add(p->out[k].pipe_fd, POLLIN, on_pipe, p, k);
        if (p->starting) {
            poller_add(p->status_fd, POLLIN, on_status, p, 0);
            poller_wake_at(p->start_deadline);
        }
    }
}

void procs_tick(void)
{
    long long now = monotonic_ms();
    for (int i = 0; i < MAX_PROCS; i++)
        if (table[i].used && table[i].starting && now >= table[i].start_deadline)
            end_start(&table[i], 1);
}

int procs_child_exited(pid_t pid, int status)
{
    for (int i = 0; i < MAX_PROCS; i++) {
        struct proc *p = &table[i];
        if (p->used && p->pid == pid && !p->reaped) {
            p->reaped = 1;
            p->status = status;
            /* what the pipes still hold comes before the exit is told */
            for (int k = 0; k < 2; k++)
                drain(p, k);
            check_finished(p);
            return 1;
        }
    }
    return 0;
}

static int open_output(struct proc *p, int k)
{
    char path[320];
    snprintf(path, sizeof(path), "%s/%s", p->dir, output_names[k]);
    p->out[k].file_fd = open(path, O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    p->out[k].tail_start = PROC_HEAD;
    return p->out[k].file_fd < 0 ? -1 : 0;
}

void procs_drop_start(struct proc *p)
{
    if (!p->reaped) {
        kill(-p->pid, SIGKILL);
        kill(p->pid, SIGKILL);
    }
    if (p->id == next_id - 1)
        next_id--; /* an id nobody saw: the next process takes it, unless one started since */
    remove_files(p);
    free_entry(p);
}

/* The child's report is readable, or overdue: EOF means the exec worked (the process is
 * visible from now on), a struct spawn_failure that it did not (the entry goes). */
static void end_start(struct proc *p, int overdue)
{
    struct spawn_failure f;
    ssize_t n;
    do /* overdue too: a report that came but was not seen yet (a poll that overflowed) */
        n = read(p->status_fd, &f, sizeof(f));
    while (n < 0 && errno == EINTR);
    if (n < 0 && errno == EAGAIN && !overdue)
        return;
    close(p->status_fd);
    p->status_fd = -1;
    p->starting = 0;
    proc_started_fn done = p->on_started;
    void *ctx = p->started_ctx;
    p->on_started = NULL;
    if (n == 0) {
        write_meta(p);
        if (done != NULL)
            done(ctx, p, NULL);
        return;
    }
    if (n == (ssize_t)sizeof(f)) {
        f.code[sizeof(f.code) - 1] = '\0';
        f.message[sizeof(f.message) - 1] = '\0';
    } else {
        f = (struct spawn_failure){.err = 0, .code = "ESETUP"};
        snprintf(f.message, sizeof(f.message), "spawn %s: the command's start-up report did "
                 "not come within %d ms", p->argv[0], START_WAIT_MS);
    }
    if (done != NULL)
        done(ctx, p, &f);
    procs_drop_start(p);
}

void procs_forget_start(struct proc *p)
{
    p->on_started = NULL;
}

struct proc *procs_spawn(uint32_t id, char *const *argv, char *const *env, const char *cwd,
                         const char *user, proc_started_fn done, void *ctx)
{
    const char *dir = base_dir();
    if (dir == NULL) {
        int err = errno;
        channel_send_error(id, errno_name(err), err, "spawn: cannot make the directory for "
                           "the output under %s: %s", getpid() == 1 ? PROC_BASE : "$TMPDIR",
                           strerror(err));
        return NULL;
    }
    struct proc *p = free_slot();
    if (p == NULL) {
        channel_send_error(id, "EBUSY", EBUSY, "spawn: %d background processes run already",
                           MAX_PROCS);
        return NULL;
    }
    *p = (struct proc){.used = 1, .id = next_id, .in_fd = -1, .status_fd = -1,
                       .out = {{.pipe_fd = -1, .file_fd = -1}, {.pipe_fd = -1, .file_fd = -1}}};
    snprintf(p->dir, sizeof(p->dir), "%s/%lld", dir, p->id);
    int err = 0;
    if ((p->argv = copy_argv(argv)) == NULL)
        err = ENOMEM;
    else if ((mkdir(p->dir, 0700) != 0 && errno != EEXIST) || open_output(p, 0) != 0 ||
             open_output(p, 1) != 0)
        err = errno;
    if (err != 0) {
        channel_send_error(id, errno_name(err), err, "spawn: %s: %s", p->dir, strerror(err));
        goto fail;
    }
    struct spawn_request sr = {.argv = argv, .env = env, .cwd = cwd, .user = user,
                               .stdin_pipe = 1, .stdout_fd = -1};
    struct spawn_result res;
    if (spawn(&sr, &res) != 0) {
        err = errno;
        channel_send_error(id, errno_name(err), err, "cannot start %s: %s", argv[0],
                           strerror(err));
        goto fail;
    }
    p->pid = res.pid;
    p->in_fd = res.in_fd;
    p->out[0].pipe_fd = res.out_fd;
    p->out[1].pipe_fd = res.err_fd;
    p->status_fd = res.status_fd;
    p->starting = 1;
    p->start_deadline = monotonic_ms() + START_WAIT_MS;
    p->on_started = done;
    p->started_ctx = ctx;
    p->started_ms = wall_ms();
    next_id++;
    return p;
fail:
    remove_files(p);
    free_entry(p);
    return NULL;
}

void procs_cleanup(void)
{
    for (int i = 0; i < MAX_PROCS; i++) {
        struct proc *p = &table[i];
        if (!p->used)
            continue;
        if (p->state == PROC_RUNNING && kill(-p->pid, SIGKILL) != 0 && errno == ESRCH &&
            !p->reaped)
            kill(p->pid, SIGKILL);
        remove_files(p);
        free_entry(p);
    }
    if (base[0] != '\0' && getpid() != 1 && rmdir(base) != 0)
        log_error(errno, "remove %s", base);
}
