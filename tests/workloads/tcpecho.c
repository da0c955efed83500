/*
 * tcpecho [BYTES [6|ADDR]]: a TCP echo service for one client.
 *
 * It listens on 127.0.0.1, ::1 with `6`, or IPv4 ADDR (an ephemeral port), prints
 * `PORT <n>`,
 * accepts one
 * connection, and with BYTES first writes that many bytes of a pattern (byte i is
 * i % 251) to the client without waiting for it to read them, so that they sit in its
 * send queue (part of them never sent while the client's window is full). It prints
 * READY, then echoes every byte it receives, until CHECK on stdin: PASS with how many
 * bytes it echoed. Waits in poll on both.
 */
#include "common.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>

int main(int argc, char **argv)
{
    long bytes = argc > 1 ? atol(argv[1]) : 0;
    int v6 = argc > 2 && strcmp(argv[2], "6") == 0;
    /* Or an IPv4 address to listen on. */
    const char *addr4 = argc > 2 && !v6 ? argv[2] : NULL;
    int l = socket(v6 ? AF_INET6 : AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    struct sockaddr_in6 a6 = {.sin6_family = AF_INET6, .sin6_addr = IN6ADDR_LOOPBACK_INIT};
    /* As most services do: the connections it accepts have it too, and must get it
     * back without it undoing the forced reuse their restore binds with. */
    int one = 1;
    setsockopt(l, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (addr4 && inet_pton(AF_INET, addr4, &a.sin_addr) != 1)
        FAIL("setup: bad address %s", addr4);
    struct sockaddr *sa = v6 ? (struct sockaddr *)&a6 : (struct sockaddr *)&a;
    socklen_t len = v6 ? sizeof a6 : sizeof a;
    if (l < 0 || bind(l, sa, len) < 0 || listen(l, 4) < 0 || getsockname(l, sa, &len) < 0)
        FAIL("setup: listen: %s", strerror(errno));
    say("PORT %d\n", ntohs(v6 ? a6.sin6_port : a.sin_port));
    int c = accept(l, NULL, NULL);
    if (c < 0)
        FAIL("setup: accept: %s", strerror(errno));
    if (bytes > 0) {
        unsigned char *pat = malloc(bytes);
        for (long i = 0; i < bytes; i++)
            pat[i] = (unsigned char)(i % 251);
        /* Queue it all: a send buffer big enough, written without blocking. */
        int sb = (int)bytes * 2;
        setsockopt(c, SOL_SOCKET, SO_SNDBUF, &sb, sizeof sb);
        fcntl(c, F_SETFL, O_NONBLOCK);
        long off = 0;
        while (off < bytes) {
            ssize_t n = write(c, pat + off, bytes - off);
            if (n < 0 && errno == EAGAIN) {
                struct pollfd p = {.fd = c, .events = POLLOUT};
                poll(&p, 1, -1);
                continue;
            }
            if (n <= 0)
                FAIL("setup: writing the pattern: %s", strerror(errno));
            off += n;
        }
        fcntl(c, F_SETFL, 0);
        free(pat);
    }
    ready();
    long echoed = 0;
    char buf[4096];
    for (;;) {
        struct pollfd p[2] = {{.fd = 0, .events = POLLIN}, {.fd = c, .events = POLLIN}};
        if (poll(p, 2, -1) < 0) {
            if (errno == EINTR)
                continue;
            FAIL("poll: %s", strerror(errno));
        }
        if (p[1].revents) {
            ssize_t n = read(c, buf, sizeof buf);
            if (n < 0 && errno == EINTR)
                continue;
            if (n <= 0)
                FAIL("the connection broke after %ld bytes: %s", echoed,
                     n < 0 ? strerror(errno) : "EOF");
            write_all(c, buf, n);
            echoed += n;
        }
        if (p[0].revents) {
            char line[64];
            size_t n = read_line(line, sizeof line);
            if (n == 0)
                return 2;
            if (strncmp(line, "CHECK", 5) == 0) {
                say("PASS tcpecho echoed=%ld\n", echoed);
                return 0;
            }
        }
    }
}
