/*
 * Shared helpers for the mcr integration-test workloads.
 *
 * Protocol (see README.md): write "READY\n" once set up, wait for a
 * "CHECK\n" line on fd 0, answer exactly one "PASS ...\n" / "FAIL ...\n"
 * line on fd 1, exit 0 on PASS, 1 on FAIL, 2 on EOF on stdin.
 *
 * All protocol I/O goes straight through write(2)/read(2) on the fd
 * numbers 0 and 1: after a restore those numbers point at NEW pipes, so
 * nothing about the pipes themselves may be cached (no stdio buffers).
 * Everything here is static inline so unused helpers do not trip -Wall.
 */
#ifndef MCR_WORKLOAD_COMMON_H
#define MCR_WORKLOAD_COMMON_H

#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <sched.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

/* Write the whole buffer, retrying on EINTR and short writes. */
static inline void write_all(int fd, const char *buf, size_t len)
{
    while (len > 0) {
        ssize_t n = write(fd, buf, len);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            _exit(3); /* stdout is gone: nobody to report to */
        }
        buf += n;
        len -= (size_t)n;
    }
}

/* printf-style line to stdout, one write(2) call for the whole line. */
static inline void __attribute__((format(printf, 1, 2))) say(const char *fmt, ...)
{
    char buf[512];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    if (n < 0)
        n = 0;
    if ((size_t)n >= sizeof buf)
        n = sizeof buf - 1;
    write_all(1, buf, (size_t)n);
}

/*
 * Report a failure (fmt without the trailing newline) and exit 1.  A function
 * rather than a macro around snprintf: truncating a long message is fine and
 * must not trip -Wformat-truncation under -Werror.
 */
static inline void __attribute__((noreturn, format(printf, 1, 2)))
FAIL(const char *fmt, ...)
{
    char msg[400];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    say("FAIL %s\n", msg);
    exit(1);
}

static inline void ready(void)
{
    write_all(1, "READY\n", 6);
}

/*
 * Read one line from fd 0 (byte by byte so nothing past the newline is
 * consumed).  EINTR is retried (a restored process may see it); EOF means
 * the test went away: exit 2.  The newline is stripped.
 */
static inline size_t read_line(char *buf, size_t cap)
{
    size_t len = 0;
    for (;;) {
        char c;
        ssize_t n = read(0, &c, 1);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            FAIL("read(stdin): %s", strerror(errno));
        }
        if (n == 0)
            exit(2);
        if (c == '\n')
            break;
        if (len + 1 < cap)
            buf[len++] = c;
    }
    buf[len] = '\0';
    return len;
}

/* Block until the CHECK line arrives; anything else is a protocol failure. */
static inline void wait_check(void)
{
    char line[64];
    read_line(line, sizeof line);
    if (strcmp(line, "CHECK") != 0)
        FAIL("expected CHECK, got '%s'", line);
}

/* splitmix64 finaliser: cheap, well-mixed patterns from small integers. */
static inline uint64_t mix64(uint64_t x)
{
    x += 0x9E3779B97F4A7C15ull;
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
    x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
    return x ^ (x >> 31);
}

/* Waits, without sleeping, until `pid` sits in syscall `nr` (from /proc/PID/syscall):
 * how a parent knows its child is parked, e.g. in rt_sigsuspend (130). */
static inline void wait_in_syscall(pid_t pid, int nr)
{
    char path[64], buf[64], want[16];
    snprintf(path, sizeof path, "/proc/%d/syscall", (int)pid);
    int wl = snprintf(want, sizeof want, "%d ", nr);
    for (;;) {
        int fd = open(path, O_RDONLY);
        ssize_t n = fd >= 0 ? read(fd, buf, sizeof buf - 1) : -1;
        if (fd >= 0)
            close(fd);
        if (n > wl && strncmp(buf, want, (size_t)wl) == 0)
            return;
        sched_yield();
    }
}

#endif
