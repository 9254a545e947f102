/* The resumed operation: what the host tells the guest after its vCPUs were stopped (a
 * pause now; a restore or a fork later): the host's wall clock, fresh entropy, and the
 * new value of a counter workloads can watch.
 *
 * A stopped guest's clock stops too: the kernel does not re-read the RTC, so after a
 * 10 s pause the wall clock is 10 s behind. The clock is stepped to the host's (the
 * host's time as it sent the request: the relay's delay, milliseconds, is not made up).
 * The entropy is mixed in with RNDADDENTROPY and the CRNG reseeded at once with
 * RNDRESEEDCRNG, so that two guests resumed from one memory image stop producing the same
 * bytes before anything else runs. A fork also gets its own identity (identity.c), after
 * the reseed so that its new machine ID is drawn from the reseeded RNG. The counter goes
 * to /run/microagent/generation, replaced atomically. */
#include "channel.h"
#include "identity.h"
#include "json.h"
#include "ops.h"

#include <errno.h>
#include <fcntl.h>
#include <linux/random.h>
#include <stdio.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define ENTROPY_MAX 64
#define GENERATION_DIR "/run/microagent"
#define GENERATION_FILE GENERATION_DIR "/generation"

static int hex_value(char c)
{
    if (c >= '0' && c <= '9')
        return c - '0';
    if (c >= 'a' && c <= 'f')
        return c - 'a' + 10;
    return -1;
}

/* Mix `len` bytes into the kernel's pool, crediting them, and reseed the CRNG. */
static int reseed(const unsigned char *bytes, size_t len)
{
    struct {
        struct rand_pool_info info;
        unsigned char buf[ENTROPY_MAX];
    } pool;
    pool.info.entropy_count = (int)(len * 8);
    pool.info.buf_size = (int)len;
    memcpy(pool.buf, bytes, len);
    int fd = open("/dev/urandom", O_WRONLY | O_CLOEXEC);
    if (fd < 0)
        return -1;
    int rc = ioctl(fd, RNDADDENTROPY, &pool.info);
    if (rc == 0)
        rc = ioctl(fd, RNDRESEEDCRNG);
    int saved = errno;
    close(fd);
    errno = saved;
    return rc;
}

static int write_generation(long long generation)
{
    if (mkdir(GENERATION_DIR, 0755) != 0 && errno != EEXIST)
        return -1;
    char text[32];
    int n = snprintf(text, sizeof(text), "%lld\n", generation);
    int fd = open(GENERATION_FILE ".tmp", O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd < 0)
        return -1;
    int ok = write(fd, text, (size_t)n) == n;
    int saved = errno;
    close(fd);
    if (!ok) {
        errno = saved;
        return -1;
    }
    return rename(GENERATION_FILE ".tmp", GENERATION_FILE);
}

void resumed_run(uint32_t id, const struct json_doc *doc, int req)
{
    long long time_ns, generation;
    char hex[2 * ENTROPY_MAX + 1];
    int len = json_string(doc, json_find(doc, req, "entropy"), hex, sizeof(hex));
    if (json_int(doc, json_find(doc, req, "time_ns"), 1, (1LL << 62), &time_ns) != 0 ||
        json_int(doc, json_find(doc, req, "generation"), 0, (1LL << 53), &generation) != 0 ||
        len < 32 || len % 2 != 0) {
        channel_send_error(id, "EINVAL", 0, "resumed: \"time_ns\" and \"generation\" must be "
                           "integers and \"entropy\" 16 to %d bytes in lowercase hex",
                           ENTROPY_MAX);
        return;
    }
    unsigned char bytes[ENTROPY_MAX];
    for (int i = 0; i < len / 2; i++) {
        int hi = hex_value(hex[2 * i]), lo = hex_value(hex[2 * i + 1]);
        if (hi < 0 || lo < 0) {
            channel_send_error(id, "EINVAL", 0, "resumed: \"entropy\" is not lowercase hex");
            return;
        }
        bytes[i] = (unsigned char)(hi << 4 | lo);
    }
    struct identity identity;
    if (identity_parse(id, doc, req, &identity) != 0)
        return;
    if (getpid() != 1) {
        /* The host test mode (--serve-fd): the clock, the RNG, /run, the hostname and
         * /etc are the host's, never to be touched; the request is checked and answered
         * only. */
        char done[160];
        int n = snprintf(done, sizeof(done),
                         "{\"exit_code\":0,\"signal\":null,\"timed_out\":false,"
                         "\"stepped_ms\":0,\"generation\":%lld,\"applied\":false}",
                         generation);
        channel_send(FRAME_EXIT, id, 0, done, (size_t)n);
        return;
    }
    struct timespec before;
    clock_gettime(CLOCK_REALTIME, &before);
    struct timespec now = {.tv_sec = time_ns / 1000000000LL, .tv_nsec = time_ns % 1000000000LL};
    if (clock_settime(CLOCK_REALTIME, &now) != 0) {
        channel_send_error(id, "EIO", errno, "resumed: clock_settime: %s", strerror(errno));
        return;
    }
    long long stepped_ms = (time_ns - ((long long)before.tv_sec * 1000000000LL +
                                       before.tv_nsec)) / 1000000LL;
    if (reseed(bytes, (size_t)len / 2) != 0) {
        channel_send_error(id, "EIO", errno, "resumed: reseed the kernel RNG: %s",
                           strerror(errno));
        return;
    }
    if (identity.present && identity_apply(id, &identity) != 0)
        return;
    if (write_generation(generation) != 0) {
        channel_send_error(id, "EIO", errno, "resumed: write %s: %s", GENERATION_FILE,
                           strerror(errno));
        return;
    }
    /* the hostname needs no escaping: letters, digits and '-' (identity_parse) */
    char hostname[96] = "";
    if (identity.present)
        snprintf(hostname, sizeof(hostname), ",\"hostname\":\"%s\"", identity.hostname);
    char done[256];
    int n = snprintf(done, sizeof(done),
                     "{\"exit_code\":0,\"signal\":null,\"timed_out\":false,"
                     "\"stepped_ms\":%lld,\"generation\":%lld,\"applied\":true%s}",
                     stepped_ms, generation, hostname);
    channel_send(FRAME_EXIT, id, 0, done, (size_t)n);
}
