/*
 * sleeper MS (default 1500): a nanosleep that spans the checkpoint must not
 * be cut short (it may take longer).  Prints "SLEPT <elapsed_ms>" when the
 * sleep ends, then answers CHECK.
 */
#include "common.h"

#include <time.h>

static int64_t ns_of(const struct timespec *t)
{
    return (int64_t)t->tv_sec * 1000000000 + t->tv_nsec;
}

int main(int argc, char **argv)
{
    long ms = argc > 1 ? strtol(argv[1], NULL, 10) : 1500;
    if (ms < 0)
        FAIL("setup: MS must be >= 0");

    ready();

    struct timespec mono0, real0, mono1, real1;
    clock_gettime(CLOCK_MONOTONIC, &mono0);
    clock_gettime(CLOCK_REALTIME, &real0);

    /* A restored sleep may come back with EINTR: go on with the remainder. */
    struct timespec req = {.tv_sec = ms / 1000, .tv_nsec = (ms % 1000) * 1000000};
    while (nanosleep(&req, &req) == -1 && errno == EINTR) {
    }

    clock_gettime(CLOCK_REALTIME, &real1);
    clock_gettime(CLOCK_MONOTONIC, &mono1);
    int64_t elapsed_ns = ns_of(&real1) - ns_of(&real0);
    int64_t elapsed_ms = elapsed_ns / 1000000;
    say("SLEPT %lld\n", (long long)elapsed_ms);

    wait_check();
    /* REALTIME is what is checked; MONOTONIC is only reported on failure. */
    if (elapsed_ns < (int64_t)ms * 1000000)
        FAIL("sleep cut short: realtime %lld ms monotonic %lld ms, want >= %ld ms",
             (long long)elapsed_ms,
             (long long)((ns_of(&mono1) - ns_of(&mono0)) / 1000000), ms);
    say("PASS sleeper elapsed_ms=%lld\n", (long long)elapsed_ms);
    return 0;
}
