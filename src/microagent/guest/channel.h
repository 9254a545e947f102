/* The agent channel: protocol version 1 of docs/protocol.md over one file descriptor.
 *
 * One connection at a time. The channel parses frames from a bounded input buffer,
 * answers HELLO and PING itself, hands stream frames to streams.c, and queues outgoing
 * frames in a bounded output buffer that is written without blocking. */
#ifndef MICROAGENT_CHANNEL_H
#define MICROAGENT_CHANNEL_H

#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>
#include <sys/uio.h>

#define PROTOCOL_VERSION 1
#define MAX_PAYLOAD 65536
#define FRAME_HEADER 12
#define AGENT_WINDOW (256 * 1024) /* the credit the agent grants per data channel */
#define FLAG_END 0x01

enum frame_type {
    FRAME_HELLO = 0x01,
    FRAME_PING = 0x02,
    FRAME_PONG = 0x03,
    FRAME_OPEN = 0x10,
    FRAME_STARTED = 0x11,
    FRAME_EXIT = 0x12,
    FRAME_ERROR = 0x13,
    FRAME_STDIN = 0x20,
    FRAME_STDOUT = 0x21,
    FRAME_STDERR = 0x22,
    FRAME_FILE = 0x23,
    FRAME_CREDIT = 0x30,
    FRAME_SIGNAL = 0x31,
    FRAME_RESIZE = 0x32,
    FRAME_CANCEL = 0x33,
};

/* How the fd behaves when the host goes away. */
enum channel_kind {
    CHANNEL_VPORT,  /* virtio-serial: reads 0 / POLLHUP while no host is connected */
    CHANNEL_SOCKET, /* --serve-fd: EOF ends the agent */
};

/* Start serving fd (made non-blocking and close-on-exec). */
void channel_open(int fd, enum channel_kind kind);

/* Register the channel's fd with the poller for this loop iteration (and handle input
 * that waited for the output queue to drain). */
void channel_watch(void);

/* SIGIO: the host may have connected to the virtio-serial port. */
void channel_host_event(void);

/* Whether the host has said HELLO and the connection is usable. */
int channel_ready(void);

/* --- sending (for the operations) -------------------------------------------------- */

/* Queue a control frame. Returns 0, or -1 when the connection is not usable (dropped). */
int channel_send(uint8_t type, uint32_t stream, uint8_t flags, const void *payload,
                 size_t len);

/* Queue ERROR {"code", "errno", "message"} on stream. err may be 0. */
void channel_send_error(uint32_t stream, const char *code, int err, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));

/* Queue CREDIT for one data channel of stream. */
void channel_send_credit(uint32_t stream, uint8_t data_type, uint32_t increment);

/* Room for a data frame's payload right now: 0 when the output queue is too full (the
 * producer must wait: that is the back-pressure), else at most the negotiated maximum. */
size_t channel_data_room(void);

/* Where the next data frame's payload goes (channel_data_room() bytes are writable). */
uint8_t *channel_data_buffer(void);

/* Queue the data frame whose len payload bytes were put at channel_data_buffer(). */
void channel_data_commit(uint8_t type, uint32_t stream, uint8_t flags, size_t len);

/* Several data frames read with one readv(2), for producers that have much to send: a
 * process writing into a pipe is woken once per batch instead of once per frame (under
 * TCG every wake-up is a context switch, which costs more than copying 64 KiB).
 * Fills iov with up to max payload slots whose lengths add up to at most total (each at
 * most the negotiated maximum; together at most what the output queue takes now) and
 * returns how many: 0 when there is no room. The slots stay valid until the next call
 * into the channel. */
int channel_data_iov(size_t total, struct iovec *iov, int max);

/* Queue the frames of the len bytes a readv put into channel_data_iov()'s slots (the
 * slots fill in order: all frames but the last are full). */
void channel_data_commit_iov(uint8_t type, uint32_t stream, size_t len);

/* A batch of data frames of up to total bytes taken from the pipe src and sent without
 * a copy in the guest (splice(2); see channel.c). Returns the bytes taken, 0 at the
 * pipe's EOF, or -1 with errno: EAGAIN (the pipe is empty), EINVAL (no splicing here or
 * now: use channel_data_iov). *drained: the pipe had less than the batch could take.
 * Until the batch is out, channel_data_room() is 0. */
ssize_t channel_data_splice(uint8_t type, uint32_t stream, int src, size_t total,
                            int *drained);

/* The host's window: the initial credit of every agent-to-host data channel. */
uint32_t channel_peer_window(void);

/* Write what is queued now, as far as the fd takes it without blocking. */
void channel_write_pending(void);

/* Write what is queued, waiting up to timeout_ms (before a power-off). */
void channel_flush(int timeout_ms);

#endif
