/*
 * inet: TCP listeners and UDP sockets, IPv4 and IPv6, with options set.
 *
 *   L4  TCP listener on 127.0.0.1 (ephemeral port), SO_KEEPALIVE, SO_RCVBUF 65536,
 *       backlog 16
 *   L6  TCP listener on [::1], IPV6_V6ONLY, TCP_NODELAY
 *   U   UDP socket bound to 127.0.0.1; C, a UDP socket connected to U
 *   U6  UDP socket bound to [::1]
 *   T   a TCP socket never bound
 *
 * On CHECK: every socket has its address and options again; the listeners accept new
 * connections on their ports, C and U talk both ways, U6 receives.
 */
#include "common.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>

static int sock(int family, int type)
{
    int s = socket(family, type, 0);
    if (s < 0)
        FAIL("setup: socket: %s", strerror(errno));
    return s;
}

static void setint(int s, int level, int name, int v)
{
    if (setsockopt(s, level, name, &v, sizeof v) < 0)
        FAIL("setup: setsockopt(%d, %d): %s", level, name, strerror(errno));
}

static int getint(int s, int level, int name)
{
    int v = -1;
    socklen_t l = sizeof v;
    getsockopt(s, level, name, &v, &l);
    return v;
}

static void bind_lo(int s, int family)
{
    struct sockaddr_storage a = {0};
    socklen_t len;
    if (family == AF_INET) {
        struct sockaddr_in *in = (struct sockaddr_in *)&a;
        in->sin_family = AF_INET;
        in->sin_addr.s_addr = htonl(INADDR_LOOPBACK);
        len = sizeof *in;
    } else {
        struct sockaddr_in6 *in6 = (struct sockaddr_in6 *)&a;
        in6->sin6_family = AF_INET6;
        in6->sin6_addr = in6addr_loopback;
        len = sizeof *in6;
    }
    if (bind(s, (struct sockaddr *)&a, len) < 0)
        FAIL("setup: bind: %s", strerror(errno));
}

static struct sockaddr_storage name_of(int s, socklen_t *len)
{
    struct sockaddr_storage a;
    *len = sizeof a;
    if (getsockname(s, (struct sockaddr *)&a, len) < 0)
        FAIL("getsockname: %s", strerror(errno));
    return a;
}

static int port_of(const struct sockaddr_storage *a)
{
    return a->ss_family == AF_INET ? ntohs(((struct sockaddr_in *)a)->sin_port)
                                   : ntohs(((struct sockaddr_in6 *)a)->sin6_port);
}

/* A new connection to listener `l` is accepted. */
static void accepts(int l, const char *what)
{
    socklen_t len;
    struct sockaddr_storage a = name_of(l, &len);
    int c = socket(a.ss_family, SOCK_STREAM, 0);
    if (c < 0 || connect(c, (struct sockaddr *)&a, len) < 0)
        FAIL("%s: connect to port %d: %s", what, port_of(&a), strerror(errno));
    int s = accept(l, NULL, NULL);
    if (s < 0 || write(c, "hi", 2) != 2)
        FAIL("%s: accept: %s", what, strerror(errno));
    char b[2];
    if (read(s, b, 2) != 2 || memcmp(b, "hi", 2) != 0)
        FAIL("%s: the accepted connection does not carry data", what);
    close(c);
    close(s);
}

int main(void)
{
    int l4 = sock(AF_INET, SOCK_STREAM);
    setint(l4, SOL_SOCKET, SO_KEEPALIVE, 1);
    setint(l4, SOL_SOCKET, SO_RCVBUF, 65536);
    bind_lo(l4, AF_INET);
    int l6 = sock(AF_INET6, SOCK_STREAM);
    setint(l6, IPPROTO_IPV6, IPV6_V6ONLY, 1);
    setint(l6, IPPROTO_TCP, TCP_NODELAY, 1);
    bind_lo(l6, AF_INET6);
    if (listen(l4, 16) < 0 || listen(l6, 8) < 0)
        FAIL("setup: listen: %s", strerror(errno));
    int u = sock(AF_INET, SOCK_DGRAM);
    bind_lo(u, AF_INET);
    socklen_t ulen;
    struct sockaddr_storage ua = name_of(u, &ulen);
    int c = sock(AF_INET, SOCK_DGRAM);
    if (connect(c, (struct sockaddr *)&ua, ulen) < 0)
        FAIL("setup: connect UDP: %s", strerror(errno));
    int u6 = sock(AF_INET6, SOCK_DGRAM);
    bind_lo(u6, AF_INET6);
    int t = sock(AF_INET, SOCK_STREAM);
    socklen_t len;
    int ports[5];
    struct sockaddr_storage a = name_of(l4, &len);
    ports[0] = port_of(&a);
    a = name_of(l6, &len);
    ports[1] = port_of(&a);
    ports[2] = port_of(&ua);
    a = name_of(c, &len);
    ports[3] = port_of(&a);
    a = name_of(u6, &len);
    ports[4] = port_of(&a);
    int rcvbuf = getint(l4, SOL_SOCKET, SO_RCVBUF);

    ready();
    wait_check();

    int socks[5] = {l4, l6, u, c, u6};
    for (int i = 0; i < 5; i++) {
        a = name_of(socks[i], &len);
        if (port_of(&a) != ports[i])
            FAIL("socket %d is on port %d, was %d", i, port_of(&a), ports[i]);
    }
    if (getint(l4, SOL_SOCKET, SO_KEEPALIVE) != 1 || getint(l4, SOL_SOCKET, SO_RCVBUF) != rcvbuf ||
        getint(l4, SOL_SOCKET, SO_ACCEPTCONN) != 1)
        FAIL("L4 options: keepalive %d rcvbuf %d (was %d) listening %d",
             getint(l4, SOL_SOCKET, SO_KEEPALIVE), getint(l4, SOL_SOCKET, SO_RCVBUF), rcvbuf,
             getint(l4, SOL_SOCKET, SO_ACCEPTCONN));
    if (getint(l6, IPPROTO_IPV6, IPV6_V6ONLY) != 1 || getint(l6, IPPROTO_TCP, TCP_NODELAY) != 1)
        FAIL("L6 options");
    if (getint(l4, SOL_SOCKET, SO_REUSEADDR) != 0)
        FAIL("L4 has SO_REUSEADDR, which it never asked for");
    accepts(l4, "L4");
    accepts(l6, "L6");
    char b[8] = {0};
    struct sockaddr_storage from;
    socklen_t fl = sizeof from;
    if (send(c, "ping", 4, 0) != 4 ||
        recvfrom(u, b, sizeof b, 0, (struct sockaddr *)&from, &fl) != 4 ||
        port_of(&from) != ports[3])
        FAIL("C -> U: '%s' from port %d: %s", b, port_of(&from), strerror(errno));
    if (sendto(u, "pong", 4, 0, (struct sockaddr *)&from, fl) != 4 ||
        recv(c, b, sizeof b, 0) != 4 || memcmp(b, "pong", 4) != 0)
        FAIL("U -> C: %s", strerror(errno));
    a = name_of(u6, &len);
    int s6 = sock(AF_INET6, SOCK_DGRAM);
    if (sendto(s6, "six", 3, 0, (struct sockaddr *)&a, len) != 3 ||
        recv(u6, b, sizeof b, 0) != 3)
        FAIL("U6 receives nothing: %s", strerror(errno));
    if (getint(t, SOL_SOCKET, SO_TYPE) != SOCK_STREAM)
        FAIL("T is not a stream socket");
    say("PASS inet ports=%d,%d,%d,%d,%d\n", ports[0], ports[1], ports[2], ports[3], ports[4]);
    return 0;
}
