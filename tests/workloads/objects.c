/*
 * objects: kernel objects behind anon_inode fds, across a checkpoint.
 *
 * - an eventfd holding 5 (non-blocking) and a semaphore eventfd holding 3;
 * - a periodic timerfd (every 20 ms) and a one-shot timerfd armed for 30 s;
 * - a signalfd for SIGUSR1, which is blocked and pending;
 * - an epoll watching the eventfd (data 0xabc) and stdin (data 0x0);
 * - an inotify instance with watch descriptors 2 and 3 (1 removed) on a directory of
 *   its own and its cwd;
 * - a sealed memfd of 100 KiB, open at offset 777, mapped shared and privately (with a
 *   copy-on-write change in the private mapping).
 * After CHECK each object must be back with its state: the counters, the epoll
 * reporting the eventfd with its data, the timers still armed with what is left,
 * and the pending signal readable from the signalfd.
 */
#include "common.h"

#define MEMFD_BYTES (100 * 1024)

#include <fcntl.h>
#include <signal.h>
#include <sys/epoll.h>
#include <sys/inotify.h>
#include <sys/mman.h>
#include <sys/eventfd.h>
#include <sys/signalfd.h>
#include <sys/timerfd.h>

int main(void)
{
    int ev = eventfd(5, EFD_NONBLOCK);
    int sem = eventfd(3, EFD_SEMAPHORE);
    int tick = timerfd_create(CLOCK_MONOTONIC, 0);
    int once = timerfd_create(CLOCK_REALTIME, TFD_NONBLOCK);
    struct itimerspec every = {{0, 20 * 1000 * 1000}, {0, 20 * 1000 * 1000}};
    struct itimerspec later = {{0, 0}, {30, 0}};
    if (ev < 0 || sem < 0 || tick < 0 || once < 0 || timerfd_settime(tick, 0, &every, NULL) ||
        timerfd_settime(once, 0, &later, NULL))
        FAIL("setup: eventfd/timerfd: %s", strerror(errno));

    sigset_t usr1;
    sigemptyset(&usr1);
    sigaddset(&usr1, SIGUSR1);
    sigprocmask(SIG_BLOCK, &usr1, NULL);
    int sfd = signalfd(-1, &usr1, SFD_NONBLOCK);
    if (sfd < 0 || raise(SIGUSR1))
        FAIL("setup: signalfd: %s", strerror(errno));

    int ep = epoll_create1(EPOLL_CLOEXEC);
    struct epoll_event e1 = {.events = EPOLLIN, .data.u64 = 0xabc};
    struct epoll_event e0 = {.events = EPOLLIN, .data.u64 = 0};
    if (ep < 0 || epoll_ctl(ep, EPOLL_CTL_ADD, ev, &e1) || epoll_ctl(ep, EPOLL_CTL_ADD, 0, &e0))
        FAIL("setup: epoll: %s", strerror(errno));

    int mfd = memfd_create("mcr-test", MFD_ALLOW_SEALING);
    static unsigned char pat[MEMFD_BYTES];
    for (size_t i = 0; i < sizeof pat; i++)
        pat[i] = (unsigned char)(i * 7 + 3);
    if (mfd < 0 || write(mfd, pat, sizeof pat) != (ssize_t)sizeof pat || lseek(mfd, 777, SEEK_SET) != 777)
        FAIL("setup: memfd: %s", strerror(errno));
    unsigned char *msh = mmap(NULL, MEMFD_BYTES, PROT_READ | PROT_WRITE, MAP_SHARED, mfd, 0);
    unsigned char *mpv = mmap(NULL, MEMFD_BYTES, PROT_READ | PROT_WRITE, MAP_PRIVATE, mfd, 0);
    if (msh == MAP_FAILED || mpv == MAP_FAILED || fcntl(mfd, F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW))
        FAIL("setup: memfd mappings or seals: %s", strerror(errno));
    mpv[5] = 0xee; /* copy-on-write: private to this mapping */

    /* inotify: watch descriptors 2 and 3 (1 was removed), on a directory of our own
     * (nothing else makes events there) and the cwd. */
    static char watched[] = "/tmp/mcr-objects-XXXXXX";
    if (!mkdtemp(watched))
        FAIL("setup: mkdtemp: %s", strerror(errno));
    int ino = inotify_init1(IN_NONBLOCK);
    int w1 = inotify_add_watch(ino, watched, IN_CREATE);
    int w2 = inotify_add_watch(ino, ".", IN_ATTRIB);
    if (ino < 0 || w1 != 1 || w2 != 2 || inotify_rm_watch(ino, w1))
        FAIL("setup: inotify: %s", strerror(errno));
    int w3 = inotify_add_watch(ino, watched, IN_CREATE | IN_DELETE);
    if (w3 != 3)
        FAIL("setup: inotify third watch is %d", w3);
    /* The IN_IGNORED event of the removed watch is read now: nothing may wait in it. */
    char evbuf[4096] __attribute__((aligned(8)));
    while (read(ino, evbuf, sizeof evbuf) > 0)
        ;

    ready();
    wait_check();

    /* inotify: the directory's watch is still number 3 and reports; 2 still exists. */
    char tmpname[64];
    snprintf(tmpname, sizeof tmpname, "%s/file", watched);
    int t = open(tmpname, O_CREAT | O_WRONLY, 0600);
    if (t < 0)
        FAIL("creating %s: %s", tmpname, strerror(errno));
    close(t);
    unlink(tmpname);
    ssize_t evlen = read(ino, evbuf, sizeof evbuf);
    struct inotify_event *e = (struct inotify_event *)evbuf;
    if (evlen < (ssize_t)sizeof *e || e->wd != 3 || !(e->mask & IN_CREATE))
        FAIL("inotify: no IN_CREATE from watch 3 (read %zd, wd %d)", evlen, evlen > 0 ? e->wd : -1);
    if (inotify_rm_watch(ino, 2) != 0)
        FAIL("inotify watch 2 is gone");
    rmdir(watched);

    /* The memfd: offset, contents, one object behind the fd and the shared mapping. */
    if (lseek(mfd, 0, SEEK_CUR) != 777)
        FAIL("memfd offset is not 777");
    if (fcntl(mfd, F_GET_SEALS) != (F_SEAL_SHRINK | F_SEAL_GROW))
        FAIL("memfd seals %#x", fcntl(mfd, F_GET_SEALS));
    static unsigned char back[MEMFD_BYTES];
    if (pread(mfd, back, sizeof back, 0) != (ssize_t)sizeof back || memcmp(back, pat, sizeof pat))
        FAIL("memfd contents differ");
    if (memcmp(msh, pat, sizeof pat))
        FAIL("shared memfd mapping differs");
    msh[100] = 0x55;
    unsigned char b = 0;
    if (pread(mfd, &b, 1, 100) != 1 || b != 0x55)
        FAIL("the shared mapping and the fd are not one memfd");
    if (mpv[5] != 0xee || mpv[6] != pat[6])
        FAIL("private memfd mapping lost its copy-on-write page");

    /* The epoll first: the eventfd must be reported, with its data. */
    struct epoll_event got[4];
    int n = epoll_wait(ep, got, 4, 0), found = 0;
    for (int i = 0; i < n; i++)
        if (got[i].data.u64 == 0xabc && (got[i].events & EPOLLIN))
            found = 1;
        else if (got[i].data.u64 != 0) /* stdin (data 0) may be at EOF: fine */
            FAIL("epoll_wait reported unknown data %#llx", (unsigned long long)got[i].data.u64);
    if (!found)
        FAIL("epoll_wait (%d events) did not report the eventfd with its data", n);
    uint64_t v = 0;
    if (read(ev, &v, 8) != 8 || v != 5)
        FAIL("eventfd holds %llu, want 5", (unsigned long long)v);
    if (read(ev, &v, 8) != -1 || errno != EAGAIN)
        FAIL("eventfd lost O_NONBLOCK or was not emptied");
    for (int i = 0; i < 3; i++)
        if (read(sem, &v, 8) != 8 || v != 1)
            FAIL("semaphore eventfd read %d gave %llu", i, (unsigned long long)v);

    /* A blocking read of the periodic timer returns once it has fired. */
    if (read(tick, &v, 8) != 8 || v < 1)
        FAIL("periodic timerfd read %llu expirations", (unsigned long long)v);
    struct itimerspec left;
    if (timerfd_gettime(tick, &left) || left.it_interval.tv_nsec != 20 * 1000 * 1000)
        FAIL("periodic timerfd lost its interval");
    if (timerfd_gettime(once, &left) || left.it_value.tv_sec >= 30 ||
        (left.it_value.tv_sec == 0 && left.it_value.tv_nsec == 0))
        FAIL("one-shot timerfd has %lld.%09ld s left, want (0, 30)", (long long)left.it_value.tv_sec,
             left.it_value.tv_nsec);

    struct signalfd_siginfo si;
    if (read(sfd, &si, sizeof si) != sizeof si || si.ssi_signo != SIGUSR1)
        FAIL("signalfd did not deliver the pending SIGUSR1");

    say("PASS objects timer_left=%llds\n", (long long)left.it_value.tv_sec);
    return 0;
}
