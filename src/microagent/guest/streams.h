/* The open streams of the connection: OPEN dispatch to the operations, per-stream frame
 * routing, and the life cycle every operation shares (ended streams are released at the
 * end of a loop iteration, so no callback of the same iteration sees freed memory). */
#ifndef MICROAGENT_STREAMS_H
#define MICROAGENT_STREAMS_H

#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#define MAX_STREAMS 128

struct stream;

struct stream_ops {
    /* A frame for the stream other than OPEN. */
    void (*frame)(struct stream *s, uint8_t type, uint8_t flags, const uint8_t *payload,
                  size_t len);
    /* Register fds and wake-up times for this loop iteration. */
    void (*watch)(struct stream *s);
    /* Timers and work that waits on no fd; called once per iteration. */
    void (*tick)(struct stream *s, long long now);
    /* A child was reaped; returns 1 when it was this stream's. */
    int (*child_exited)(struct stream *s, pid_t pid, int status);
    /* End the stream now: kill what it runs. quiet: the connection is gone or reset,
     * send nothing; else end the stream with EXIT or ERROR. */
    void (*cancel)(struct stream *s, int quiet);
    /* Free the state (fds, memory); the stream has ended. */
    void (*release)(struct stream *s);
};

struct stream {
    uint32_t id;
    int used;
    int ended;
    const struct stream_ops *ops;
    void *state;
};

/* Callbacks for operations that wait on no fd, no timer and no child. */
void stream_no_watch(struct stream *s);
void stream_no_tick(struct stream *s, long long now);
int stream_no_child(struct stream *s, pid_t pid, int status);

/* Handle OPEN for stream id. Answers errors itself. */
void streams_open(uint32_t id, const uint8_t *payload, size_t len);

/* Route a non-OPEN frame to stream id (frames for a stream that just ended are dropped;
 * frames for a stream never opened are answered with ERROR). */
void streams_frame(uint32_t id, uint8_t type, uint8_t flags, const uint8_t *payload,
                   size_t len);

/* The stream's last frame was queued: release it at the end of this iteration. */
void stream_end(struct stream *s);

/* End every stream quietly (the connection was reset or lost). */
void streams_reset(void);

/* Per iteration: register, then tick, then release the ended ones. */
void streams_watch(void);
void streams_tick(void);
void streams_sweep(void);

/* The handler reap.c calls for every reaped child. */
void streams_child_exited(pid_t pid, int status);

/* The number of open streams. */
int streams_count(void);

#endif
