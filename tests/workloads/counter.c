/*
 * counter: the simplest workload.  A global counter is incremented in a
 * busy loop; every 1024 increments stdin is polled and a CLOCK_REALTIME
 * timestamp taken.  The largest gap between two consecutive batches since
 * READY is the blackout the workload saw (freeze + dump + restore).
 * Writes "PID <pid>" on its own line just before READY.
 *
 * The global counter (in .bss) and the batch count (a local, so in a
 * register or on the stack) are updated in lockstep, so at CHECK
 * counter == at_ready + 1024 * batches must hold exactly.
 */
#include "common.h"

#include <poll.h>
#include <time.h>

static volatile uint64_t counter; /* volatile: every increment hits memory */

static int64_t now_us(void)
{
    struct timespec t;
    clock_gettime(CLOCK_REALTIME, &t);
    return (int64_t)t.tv_sec * 1000000 + t.tv_nsec / 1000;
}

int main(void)
{
    say("PID %d\n", (int)getpid());
    for (int i = 0; i < 1 << 20; i++) /* warm-up: READY value is not 0 */
        counter++;
    uint64_t at_ready = counter, batches = 0;
    int64_t last = now_us(), max_gap = 0;
    ready();

    for (;;) {
        for (int i = 0; i < 1024; i++)
            counter++;
        batches++;
        int64_t t = now_us();
        if (t - last > max_gap)
            max_gap = t - last;
        last = t;

        struct pollfd pfd = {.fd = 0, .events = POLLIN};
        int r = poll(&pfd, 1, 0);
        if (r > 0)
            break; /* POLLIN or POLLHUP: wait_check() reads or sees EOF */
        if (r < 0 && errno != EINTR)
            FAIL("poll(stdin): %s", strerror(errno));
    }
    wait_check();

    uint64_t n = counter;
    if (n <= at_ready)
        FAIL("counter %llu not above %llu at READY", (unsigned long long)n,
             (unsigned long long)at_ready);
    if (n != at_ready + 1024 * batches)
        FAIL("counter %llu != %llu + 1024 * %llu batches", (unsigned long long)n,
             (unsigned long long)at_ready, (unsigned long long)batches);
    say("PASS counter=%llu gap_us=%lld\n", (unsigned long long)n, (long long)max_gap);
    return 0;
}
