/* Monotonic time for bounded waits (counting sleeps undercounts on a busy host). */
#ifndef MICROAGENT_CLOCK_H
#define MICROAGENT_CLOCK_H

#include <time.h>

static inline long long monotonic_ms(void)
{
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    return (long long)now.tv_sec * 1000 + now.tv_nsec / 1000000;
}

static inline void sleep_ms(long ms)
{
    struct timespec tick = {ms / 1000, (ms % 1000) * 1000000L};
    while (nanosleep(&tick, &tick) != 0)
        ;
}

#endif
