/* Background processes: commands that outlive the connection (and the stream) that
 * started them (the spawn, procs, proc_read, proc_write and proc_signal operations,
 * procops.c). The table lives for the agent's lifetime; each process's stdout and
 * stderr are drained by the agent into files under the process's directory
 * (/run/microagent/proc/ID/; in the host test mode a temporary directory), bounded:
 * the head (the first PROC_HEAD bytes) is kept, and beyond it a rolling tail (the last
 * PROC_TAIL to PROC_TAIL + PROC_STEP bytes); the bytes between are dropped by punching a
 * hole in the file, so a byte's offset in the file is its offset in the output. */
#ifndef MICROAGENT_PROCS_H
#define MICROAGENT_PROCS_H

#include "json.h"
#include "spawn.h"

#include <stddef.h>
#include <sys/types.h>

#define MAX_PROCS 64
#define PROC_HEAD (1024 * 1024)
#define PROC_TAIL (1024 * 1024)
#define PROC_STEP (64 * 1024)

enum proc_state { PROC_RUNNING, PROC_EXITED, PROC_SIGNALED };

struct proc_output {
    int pipe_fd;          /* the read end of the process's pipe, -1 at EOF */
    int file_fd;          /* the file the output goes to */
    long long size;       /* bytes the process wrote in all */
    long long tail_start; /* the bytes [PROC_HEAD, tail_start) were dropped */
    int punch_failed;
};

struct proc;

/* How a start ended: f is NULL when the command runs (the entry is visible from then on),
 * else the child's report (the entry is freed right after the call). */
typedef void (*proc_started_fn)(void *ctx, struct proc *p, const struct spawn_failure *f);

struct proc {
    int used;
    int starting;   /* forked, its exec not yet reported: invisible to procs_find */
    int status_fd;  /* the child's start-up report while starting */
    long long start_deadline;     /* monotonic ms */
    proc_started_fn on_started;   /* NULL once told, or when nobody waits */
    void *started_ctx;
    long long id;
    pid_t pid;      /* also the process group and session id */
    char **argv;    /* one allocation */
    long long started_ms, finished_ms; /* wall clock, ms since the epoch */
    int reaped;
    int status;
    enum proc_state state; /* RUNNING until reaped and both outputs at EOF */
    int in_fd;             /* the write end of stdin, -1 once closed */
    int writing;           /* a proc_write stream holds stdin */
    struct proc_output out[2]; /* stdout, stderr */
    char dir[256];
};

/* The process with this id, or NULL. */
struct proc *procs_find(long long id);

/* Start argv as a background process (spawn.h's request, stdin a pipe). Returns the new
 * entry, still starting: done(ctx, ...) is called from the loop once the child's exec
 * worked or failed (within START_WAIT_MS), never from here; the loop goes on meanwhile.
 * NULL after answering stream id with ERROR. */
struct proc *procs_spawn(uint32_t id, char *const *argv, char *const *env, const char *cwd,
                         const char *user, proc_started_fn done, void *ctx);

/* Nobody waits for this start any more (its stream ended): the process starts all the
 * same, and a failed start is forgotten. */
void procs_forget_start(struct proc *p);

/* A start that failed or was cancelled (CANCEL on its stream): kill the child (unless it
 * was reaped already: one whose exec failed) and free the entry. */
void procs_drop_start(struct proc *p);

/* Write the entry as a JSON object; argv_budget: at most that many bytes of argv (later
 * items are left out and "argv_truncated" is true). */
void procs_write_entry(struct json_writer *w, const struct proc *p, size_t argv_budget);

/* Write "id" ... of every entry into an array (the procs operation). */
void procs_write_all(struct json_writer *w, size_t argv_budget);

/* Close the process's stdin. */
void procs_close_stdin(struct proc *p);

/* Per loop iteration: register the output pipes (drained without bound: the files are)
 * and the start-up reports; after the wait, end the starts whose report is overdue. */
void procs_watch(void);
void procs_tick(void);

/* A child was reaped: returns 1 when it was a background process. */
int procs_child_exited(pid_t pid, int status);

/* The host test mode ends: kill every running process group and remove the files. */
void procs_cleanup(void);

#endif
