/*
 * pty: a pseudo-terminal pair inside the tree.
 *
 *   P holds the master. S (its child) starts a session and takes the slave as its
 *   controlling terminal; G (S's child) leads its own process group, which S makes the
 *   terminal's foreground group. The slave is in raw mode with VMIN 3 and a 33x101
 *   window. G blocks reading the slave; S waits for G.
 *
 * On CHECK, P checks the master still leads to /dev/pts/N (same N) and writes "ping".
 * G reads it (VMIN 3: one read of at least 3 bytes), checks its session, group, the
 * foreground group, termios and window, answers "pong ok" or what differed, and exits.
 * S checks the terminal is still its session's and exits; P reads G's answer.
 */
#include "common.h"

#include <fcntl.h>
#include <signal.h>
#include <sys/ioctl.h>
#include <sys/wait.h>
#include <termios.h>

static int slave_ok(int fd, pid_t session, char *why, size_t cap)
{
    struct termios t;
    struct winsize ws;
    if (tcgetattr(fd, &t) < 0 || ioctl(fd, TIOCGWINSZ, &ws) < 0) {
        snprintf(why, cap, "tcgetattr: %s", strerror(errno));
        return 0;
    }
    if ((t.c_lflag & (ICANON | ECHO)) || t.c_cc[VMIN] != 3) {
        snprintf(why, cap, "termios lflag %#x vmin %d", t.c_lflag, t.c_cc[VMIN]);
        return 0;
    }
    if (ws.ws_row != 33 || ws.ws_col != 101) {
        snprintf(why, cap, "window %dx%d", ws.ws_col, ws.ws_row);
        return 0;
    }
    if (tcgetsid(fd) != session || getsid(0) != session) {
        snprintf(why, cap, "session %d, terminal's %d, want %d", getsid(0), tcgetsid(fd),
                 session);
        return 0;
    }
    return 1;
}

int main(void)
{
    int m = posix_openpt(O_RDWR | O_NOCTTY);
    if (m < 0 || grantpt(m) < 0 || unlockpt(m) < 0)
        FAIL("setup: posix_openpt: %s", strerror(errno));
    char name[64];
    snprintf(name, sizeof name, "%s", ptsname(m));
    struct winsize ws = {.ws_row = 33, .ws_col = 101};
    if (ioctl(m, TIOCSWINSZ, &ws) < 0)
        FAIL("setup: TIOCSWINSZ: %s", strerror(errno));

    int ready_pipe[2];
    if (pipe(ready_pipe) < 0)
        FAIL("setup: pipe: %s", strerror(errno));
    pid_t s = fork();
    if (s == 0) {
        /* S: a session whose controlling terminal is the slave. */
        setsid();
        int sl = open(name, O_RDWR);
        if (sl < 0)
            _exit(20);
        struct termios t;
        tcgetattr(sl, &t);
        cfmakeraw(&t);
        t.c_cc[VMIN] = 3;
        t.c_cc[VTIME] = 0;
        if (tcsetattr(sl, TCSANOW, &t) < 0)
            _exit(21);
        signal(SIGTTOU, SIG_IGN);
        pid_t g = fork();
        if (g == 0) {
            setpgid(0, 0);
            /* Wait until S made us the foreground group. */
            char b;
            if (read(ready_pipe[0], &b, 1) != 1)
                _exit(22);
            char buf[64] = {0};
            ssize_t n;
            while ((n = read(sl, buf, sizeof buf - 1)) < 0 && errno == EINTR)
                ;
            char why[128] = "ok";
            if (n < 3 || strncmp(buf, "ping", 4) != 0)
                snprintf(why, sizeof why, "read %zd bytes '%s'", n, buf);
            else if (tcgetpgrp(sl) != getpid())
                snprintf(why, sizeof why, "foreground group %d, want %d", tcgetpgrp(sl), getpid());
            else
                slave_ok(sl, getsid(0), why, sizeof why);
            char out[160];
            int len = snprintf(out, sizeof out, "pong %s\n", why);
            write_all(sl, out, len);
            _exit(strcmp(why, "ok") == 0 ? 0 : 3);
        }
        setpgid(g, g);
        if (tcsetpgrp(sl, g) < 0)
            _exit(23);
        if (write(ready_pipe[1], "g", 1) != 1)
            _exit(24);
        int st;
        while (waitpid(g, &st, 0) < 0 && errno == EINTR)
            ;
        char why[128];
        if (!slave_ok(sl, getpid(), why, sizeof why))
            _exit(25);
        _exit(WIFEXITED(st) ? WEXITSTATUS(st) : 26);
    }
    if (s < 0)
        FAIL("setup: fork: %s", strerror(errno));
    /* G is parked in read on the slave once S has waited for it (wait4 = 61). */
    wait_in_syscall(s, 61);
    pid_t g = 0;
    {
        char path[64], kids[64] = {0};
        snprintf(path, sizeof path, "/proc/%d/task/%d/children", s, s);
        int fd = open(path, O_RDONLY);
        if (fd < 0 || read(fd, kids, sizeof kids - 1) <= 0)
            FAIL("setup: reading S's children: %s", strerror(errno));
        close(fd);
        g = atoi(kids);
    }
    wait_in_syscall(g, 0);

    ready();
    wait_check();

    char now[64];
    snprintf(now, sizeof now, "%s", ptsname(m));
    if (strcmp(now, name) != 0)
        FAIL("the master now leads to %s, not %s", now, name);
    write_all(m, "ping", 4);
    char buf[200] = {0};
    size_t got = 0;
    while (got < sizeof buf - 1 && !memchr(buf, '\n', got)) {
        ssize_t n = read(m, buf + got, sizeof buf - 1 - got);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            FAIL("reading the master: %s", n < 0 ? strerror(errno) : "EOF");
        got += n;
    }
    int st;
    if (waitpid(s, &st, 0) != s || !WIFEXITED(st) || WEXITSTATUS(st) != 0)
        FAIL("S: status %#x; G said: %s", st, buf);
    if (strncmp(buf, "pong ok", 7) != 0)
        FAIL("G said: %s", buf);
    say("PASS pty %s\n", name);
    return 0;
}
