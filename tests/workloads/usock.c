/*
 * usock DIR: unix sockets connected in every way a restore must make again.
 *
 *   L  stream listener on DIR/srv.sock; c1 connected and accepted as a1, with "hello"
 *      waiting on a1 and "world" on c1; c2 and c3 connected, still waiting in L's queue
 *   Q  seqpacket listener on an abstract name; c4 accepted as a4, two packets waiting
 *   S  datagram socket bound to DIR/dgram.sock; d1 (unnamed) connected to it, with two
 *      datagrams waiting on S
 *   u  a stream socket never connected
 *
 * On CHECK it checks names, peers, every queue (and message boundaries), that the two
 * waiting connections are accepted in their order and no other, and that every socket
 * still works.
 */
#include "common.h"

#include <fcntl.h>
#include <stddef.h>
#include <sys/socket.h>
#include <sys/un.h>

static socklen_t addr_of(struct sockaddr_un *a, const char *name, int abstract_)
{
    memset(a, 0, sizeof *a);
    a->sun_family = AF_UNIX;
    size_t n = strlen(name);
    memcpy(a->sun_path + (abstract_ ? 1 : 0), name, n);
    /* A path ends with its NUL; an abstract name starts with one. */
    return (socklen_t)(offsetof(struct sockaddr_un, sun_path) + n + 1);
}

static int listener(int type, struct sockaddr_un *a, socklen_t len)
{
    int s = socket(AF_UNIX, type, 0);
    if (s < 0 || bind(s, (struct sockaddr *)a, len) < 0 || listen(s, 8) < 0)
        FAIL("setup: listener: %s", strerror(errno));
    return s;
}

static int client(int type, struct sockaddr_un *a, socklen_t len)
{
    int s = socket(AF_UNIX, type, 0);
    if (s < 0 || connect(s, (struct sockaddr *)a, len) < 0)
        FAIL("setup: connect: %s", strerror(errno));
    return s;
}

static void expect(int fd, const char *want, const char *what)
{
    char buf[64] = {0};
    ssize_t n = recv(fd, buf, sizeof buf - 1, MSG_DONTWAIT);
    if (n != (ssize_t)strlen(want) || memcmp(buf, want, n) != 0)
        FAIL("%s: got %zd bytes '%s', want '%s' (%s)", what, n, buf, want,
             n < 0 ? strerror(errno) : "");
}

static void name_is(int fd, int peer, const char *want, const char *what)
{
    struct sockaddr_un a;
    socklen_t len = sizeof a;
    int r = peer ? getpeername(fd, (struct sockaddr *)&a, &len)
                 : getsockname(fd, (struct sockaddr *)&a, &len);
    if (r < 0 || strcmp(a.sun_path, want) != 0)
        FAIL("%s is '%s', want '%s'", what, r < 0 ? strerror(errno) : a.sun_path, want);
}

int main(int argc, char **argv)
{
    if (argc < 2)
        FAIL("usage: usock DIR");
    char srv[108], dg[108], abs_name[64];
    snprintf(srv, sizeof srv, "%s/srv.sock", argv[1]);
    snprintf(dg, sizeof dg, "%s/dgram.sock", argv[1]);
    snprintf(abs_name, sizeof abs_name, "mcr-usock-%d", getpid());
    struct sockaddr_un la, qa, sa;
    socklen_t llen = addr_of(&la, srv, 0), qlen = addr_of(&qa, abs_name, 1),
              slen = addr_of(&sa, dg, 0);

    int L = listener(SOCK_STREAM, &la, llen);
    int c1 = client(SOCK_STREAM, &la, llen);
    int a1 = accept(L, NULL, NULL);
    int c2 = client(SOCK_STREAM, &la, llen);
    int c3 = client(SOCK_STREAM, &la, llen);
    int Q = listener(SOCK_SEQPACKET, &qa, qlen);
    int c4 = client(SOCK_SEQPACKET, &qa, qlen);
    int a4 = accept(Q, NULL, NULL);
    int S = socket(AF_UNIX, SOCK_DGRAM, 0);
    if (a1 < 0 || a4 < 0 || S < 0 || bind(S, (struct sockaddr *)&sa, slen) < 0)
        FAIL("setup: %s", strerror(errno));
    int d1 = client(SOCK_DGRAM, &sa, slen);
    int u = socket(AF_UNIX, SOCK_STREAM, 0);
    if (write(c1, "hello", 5) != 5 || write(a1, "world", 5) != 5 ||
        send(c4, "p1", 2, 0) != 2 || send(c4, "p22", 3, 0) != 3 ||
        send(d1, "d-one", 5, 0) != 5 || send(d1, "d-two", 5, 0) != 5 || u < 0)
        FAIL("setup: sending: %s", strerror(errno));

    ready();
    wait_check();

    name_is(a1, 0, srv, "a1's name");
    name_is(c1, 1, srv, "c1's peer");
    expect(a1, "hello", "a1");
    expect(c1, "world", "c1");
    if (write(c1, "again", 5) != 5)
        FAIL("c1 write: %s", strerror(errno));
    expect(a1, "again", "a1 after restore");

    /* The waiting connections, in their order, and nothing else. */
    if (write(c2, "two", 3) != 3 || write(c3, "three", 5) != 5)
        FAIL("c2/c3 write: %s", strerror(errno));
    int a2 = accept(L, NULL, NULL), a3 = accept(L, NULL, NULL);
    if (a2 < 0 || a3 < 0)
        FAIL("accepting the waiting connections: %s", strerror(errno));
    expect(a2, "two", "first waiting connection");
    expect(a3, "three", "second waiting connection");
    fcntl(L, F_SETFL, O_NONBLOCK);
    if (accept(L, NULL, NULL) >= 0 || errno != EAGAIN)
        FAIL("a third connection was waiting");

    expect(a4, "p1", "first packet");
    expect(a4, "p22", "second packet");
    name_is(c4, 1, "", "c4's peer (abstract: empty path)");

    expect(S, "d-one", "first datagram");
    expect(S, "d-two", "second datagram");
    name_is(d1, 1, dg, "d1's peer");
    if (send(d1, "d-three", 7, 0) != 7)
        FAIL("d1 send: %s", strerror(errno));
    expect(S, "d-three", "datagram after restore");

    int type = 0;
    socklen_t tl = sizeof type;
    if (getsockopt(u, SOL_SOCKET, SO_TYPE, &type, &tl) < 0 || type != SOCK_STREAM)
        FAIL("u: type %d", type);
    fcntl(L, F_SETFL, 0);
    if (connect(u, (struct sockaddr *)&la, llen) < 0)
        FAIL("u connect: %s", strerror(errno));
    say("PASS usock\n");
    return 0;
}
