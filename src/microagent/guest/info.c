/* The info operation: what the host shows in status and uses for readiness. */
#include "channel.h"
#include "json.h"
#include "net.h"
#include "ops.h"
#include "streams.h"
#include "version.h"

#include <sys/utsname.h>
#include <time.h>
#include <unistd.h>

void info_run(uint32_t id)
{
    struct utsname u;
    if (uname(&u) != 0)
        u.release[0] = u.nodename[0] = '\0';
    struct timespec up;
    if (clock_gettime(CLOCK_BOOTTIME, &up) != 0)
        up.tv_sec = up.tv_nsec = 0;
    char doc[2048];
    struct json_writer w;
    json_writer_init(&w, doc, sizeof(doc));
    json_object_begin(&w);
    json_key(&w, "exit_code");
    json_write_int(&w, 0);
    json_key(&w, "signal");
    json_write_null(&w);
    json_key(&w, "timed_out");
    json_write_bool(&w, 0);
    json_key(&w, "info");
    json_object_begin(&w);
    json_key(&w, "agent");
    json_write_string(&w, "microagent-init " AGENT_VERSION);
    json_key(&w, "kernel");
    json_write_string(&w, u.release);
    json_key(&w, "hostname");
    json_write_string(&w, u.nodename);
    json_key(&w, "uptime_ms");
    json_write_int(&w, (long long)up.tv_sec * 1000 + up.tv_nsec / 1000000);
    json_key(&w, "pid1");
    json_write_bool(&w, getpid() == 1);
    json_key(&w, "streams");
    json_write_int(&w, streams_count());
    net_write_info(&w);
    json_object_end(&w);
    json_object_end(&w);
    ssize_t n = json_writer_finish(&w);
    if (n < 0)
        channel_send_error(id, "EOVERFLOW", 0, "info does not fit its buffer");
    else
        channel_send(FRAME_EXIT, id, 0, doc, (size_t)n);
}
