/*
 * sockets: a parent and a child joined by three unix socket pairs (stream, datagram,
 * seqpacket), with data queued in both directions when the checkpoint lands. After
 * CHECK the child reads what waited for it, message by message where boundaries
 * matter, and answers; the parent reads what waited for it and reaps the child. The
 * parent also listens on a path and on an abstract name, and after CHECK connects to
 * both listeners it restored and exchanges a message through each.
 */
#include "common.h"

#include <fcntl.h>
#include <stddef.h>
#include <sched.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>

static int recv_exact(int fd, char *buf, size_t len)
{
    size_t got = 0;
    while (got < len) {
        ssize_t n = read(fd, buf + got, len - got);
        if (n <= 0)
            return -1;
        got += (size_t)n;
    }
    return 0;
}

static int all_are(const char *b, size_t n, char c)
{
    for (size_t i = 0; i < n; i++)
        if (b[i] != c)
            return 0;
    return 1;
}

/* Binds and listens on `name` (a leading '@' means the abstract namespace). */
static int listener(int type, const char *name, struct sockaddr_un *a, socklen_t *len)
{
    memset(a, 0, sizeof *a);
    a->sun_family = AF_UNIX;
    int abs = name[0] == '@';
    strncpy(a->sun_path + abs, name + abs, sizeof a->sun_path - 2);
    *len = (socklen_t)(offsetof(struct sockaddr_un, sun_path) + strlen(name) + !abs);
    int fd = socket(AF_UNIX, type, 0);
    if (fd < 0 || bind(fd, (struct sockaddr *)a, *len) || listen(fd, 4))
        return -1;
    return fd;
}

/* Connects to a listener, accepts, and passes "ping" through: 0 if it worked. */
static int ping(int type, int lfd, const struct sockaddr_un *a, socklen_t len)
{
    int c = socket(AF_UNIX, type, 0);
    if (c < 0 || connect(c, (const struct sockaddr *)a, len))
        return -1;
    int s = accept(lfd, NULL, NULL);
    char b[8] = {0};
    int ok = s >= 0 && write(c, "ping", 4) == 4 && read(s, b, sizeof b) == 4 && memcmp(b, "ping", 4) == 0;
    close(c);
    close(s);
    return ok ? 0 : -1;
}

static void on_usr1(int s)
{
    (void)s;
}

/* The child: sends its part, parks, then checks what waited for it. */
static int child(int st, int dg, int sp)
{
    char buf[2048];
    memset(buf, 'C', 500);
    if (write(st, buf, 500) != 500)
        return 10;
    sigset_t none;
    sigemptyset(&none);
    sigsuspend(&none);
    if (recv_exact(st, buf, 1000) || !all_are(buf, 1000, 'P'))
        return 11;
    /* Datagrams keep their boundaries: 10, 20 and 30 bytes. */
    for (int i = 1; i <= 3; i++)
        if (recv(dg, buf, sizeof buf, 0) != 10 * i || !all_are(buf, 10 * (size_t)i, (char)('a' + i)))
            return 11 + i;
    if (recv(sp, buf, sizeof buf, 0) != 7 || memcmp(buf, "seq-one", 7))
        return 15;
    if (recv(sp, buf, sizeof buf, 0) != 7 || memcmp(buf, "seq-two", 7))
        return 16;
    return write(st, "done", 4) == 4 ? 0 : 17;
}

int main(void)
{
    int st[2], dg[2], sp[2];
    if (socketpair(AF_UNIX, SOCK_STREAM, 0, st) || socketpair(AF_UNIX, SOCK_DGRAM, 0, dg) ||
        socketpair(AF_UNIX, SOCK_SEQPACKET, 0, sp))
        FAIL("setup: socketpair: %s", strerror(errno));
    char lpath[64], aname[64];
    snprintf(lpath, sizeof lpath, "/tmp/mcr-listen-%d.sock", (int)getpid());
    snprintf(aname, sizeof aname, "@mcr-listen-%d", (int)getpid());
    struct sockaddr_un la, aa;
    socklen_t llen, alen;
    int lfd = listener(SOCK_STREAM, lpath, &la, &llen);
    int afd = listener(SOCK_SEQPACKET, aname, &aa, &alen);
    if (lfd < 0 || afd < 0 || chmod(lpath, 0640))
        FAIL("setup: listening sockets: %s", strerror(errno));
    sigset_t usr1;
    sigemptyset(&usr1);
    sigaddset(&usr1, SIGUSR1);
    sigprocmask(SIG_BLOCK, &usr1, NULL);
    signal(SIGUSR1, on_usr1);
    pid_t c = fork();
    if (c == 0) {
        close(st[0]), close(dg[0]), close(sp[0]);
        _exit(child(st[1], dg[1], sp[1]));
    }
    close(st[1]), close(dg[1]), close(sp[1]);
    char buf[1024];
    memset(buf, 'P', 1000);
    if (c < 0 || write(st[0], buf, 1000) != 1000)
        FAIL("setup: fork or stream write: %s", strerror(errno));
    for (int i = 1; i <= 3; i++) {
        memset(buf, 'a' + i, sizeof buf);
        if (send(dg[0], buf, 10 * (size_t)i, 0) != 10 * i)
            FAIL("setup: datagram send: %s", strerror(errno));
    }
    if (send(sp[0], "seq-one", 7, 0) != 7 || send(sp[0], "seq-two", 7, 0) != 7)
        FAIL("setup: seqpacket send: %s", strerror(errno));
    /* Ready once the child has sent its part and parked in sigsuspend (syscall 130). */
    wait_in_syscall(c, 130);

    ready();
    wait_check();

    if (recv_exact(st[0], buf, 500) || !all_are(buf, 500, 'C'))
        FAIL("the child's 500 bytes did not wait for the parent");
    kill(c, SIGUSR1);
    int status;
    if (waitpid(c, &status, 0) != c || !WIFEXITED(status) || WEXITSTATUS(status))
        FAIL("child exit status %#x", status);
    if (recv_exact(st[0], buf, 4) || memcmp(buf, "done", 4))
        FAIL("no answer from the child");
    struct stat ls;
    if (stat(lpath, &ls) || (ls.st_mode & 0777) != 0640)
        FAIL("listening socket file mode %o, want 640", (unsigned)(ls.st_mode & 0777));
    if (ping(SOCK_STREAM, lfd, &la, llen))
        FAIL("the listener on %s does not take connections: %s", lpath, strerror(errno));
    if (ping(SOCK_SEQPACKET, afd, &aa, alen))
        FAIL("the abstract listener does not take connections: %s", strerror(errno));
    unlink(lpath);
    say("PASS sockets\n");
    return 0;
}
