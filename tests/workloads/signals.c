/*
 * signals: handlers (flags, sa_mask), SIG_IGN, sigaltstack, blocked mask,
 * pending standard and realtime signals (with a payload), rlimits and
 * personality across a checkpoint.
 *
 * Two pending queues are exercised: raise(SIGUSR2) is thread-directed
 * (tgkill -> the thread's pending set) while sigqueue(getpid(), ...) is
 * process-directed (the shared pending set).
 */
#include "common.h"

#include <sys/time.h>
#include <time.h>

static timer_t ptimer, qtimer;

#include <signal.h>
#include <sys/personality.h>
#include <sys/resource.h>

#define ALT_SIZE (64 * 1024)
#define RT_VALUE 4242

static void *alt_mem;
static volatile sig_atomic_t usr1_hit, usr1_winch_blocked, usr2_hit, rt_hit;
static volatile uintptr_t usr1_local;
static volatile int rt_value, rt_code, rt_pid;

static void on_usr1(int sig, siginfo_t *si, void *uc)
{
    volatile char local = 0; /* its address shows which stack we run on */
    usr1_local = (uintptr_t)&local;
    sigset_t cur;
    sigprocmask(SIG_BLOCK, NULL, &cur); /* sa_mask must be in effect here */
    usr1_winch_blocked = sigismember(&cur, SIGWINCH) == 1;
    usr1_hit = 1;
}

static void on_usr2(int sig)
{
    usr2_hit++;
}

static void on_rt(int sig, siginfo_t *si, void *uc)
{
    rt_value = si->si_value.sival_int;
    rt_code = si->si_code;
    rt_pid = si->si_pid;
    rt_hit++;
}

static void install(int sig, void *fn, int flags, const sigset_t *mask)
{
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    if (flags & SA_SIGINFO)
        sa.sa_sigaction = fn;
    else
        sa.sa_handler = fn;
    sa.sa_flags = flags;
    if (mask)
        sa.sa_mask = *mask;
    else
        sigemptyset(&sa.sa_mask);
    if (sigaction(sig, &sa, NULL) != 0)
        FAIL("setup: sigaction(%d): %s", sig, strerror(errno));
}

static void check_handler(int sig, void *fn, int flags)
{
    struct sigaction sa;
    if (sigaction(sig, NULL, &sa) != 0)
        FAIL("sigaction(%d) query: %s", sig, strerror(errno));
    if ((void *)sa.sa_sigaction != fn)
        FAIL("signal %d handler %p want %p", sig, (void *)sa.sa_sigaction, fn);
    if ((sa.sa_flags & flags) != flags)
        FAIL("signal %d flags %#x lack %#x", sig, (unsigned)sa.sa_flags, (unsigned)flags);
}

int main(void)
{
    const int rt = SIGRTMIN + 3;

    alt_mem = malloc(ALT_SIZE);
    stack_t ss = {.ss_sp = alt_mem, .ss_size = ALT_SIZE, .ss_flags = 0};
    if (!alt_mem || sigaltstack(&ss, NULL) != 0)
        FAIL("setup: sigaltstack: %s", strerror(errno));

    sigset_t winch;
    sigemptyset(&winch);
    sigaddset(&winch, SIGWINCH);
    install(SIGUSR1, (void *)on_usr1, SA_SIGINFO | SA_ONSTACK | SA_RESTART, &winch);
    install(SIGUSR2, (void *)on_usr2, 0, NULL);
    install(rt, (void *)on_rt, SA_SIGINFO, NULL);
    if (signal(SIGHUP, SIG_IGN) == SIG_ERR)
        FAIL("setup: SIGHUP SIG_IGN: %s", strerror(errno));

    sigset_t blk;
    sigemptyset(&blk);
    sigaddset(&blk, SIGUSR2);
    sigaddset(&blk, rt);
    if (sigprocmask(SIG_BLOCK, &blk, NULL) != 0)
        FAIL("setup: sigprocmask: %s", strerror(errno));
    if (raise(SIGUSR2) != 0)
        FAIL("setup: raise(SIGUSR2): %s", strerror(errno));
    if (sigqueue(getpid(), rt, (union sigval){.sival_int = RT_VALUE}) != 0)
        FAIL("setup: sigqueue: %s", strerror(errno));

    struct rlimit rl;
    getrlimit(RLIMIT_NOFILE, &rl);
    if (rl.rlim_max < 777)
        FAIL("setup: RLIMIT_NOFILE hard limit %llu < 777", (unsigned long long)rl.rlim_max);
    rl.rlim_cur = 777;
    if (setrlimit(RLIMIT_NOFILE, &rl) != 0)
        FAIL("setup: setrlimit(NOFILE): %s", strerror(errno));
    getrlimit(RLIMIT_CORE, &rl);
    rl.rlim_cur = 0;
    if (setrlimit(RLIMIT_CORE, &rl) != 0)
        FAIL("setup: setrlimit(CORE): %s", strerror(errno));
    int pers = personality(0xffffffff);
    if (pers == -1 || personality((unsigned long)pers | ADDR_NO_RANDOMIZE) == -1)
        FAIL("setup: personality: %s", strerror(errno));

    /* Interval timers: a real one far off, a virtual one with a period. */
    struct itimerval real = {{0, 0}, {30, 0}}, virt = {{1, 0}, {100, 0}};
    if (setitimer(ITIMER_REAL, &real, NULL) || setitimer(ITIMER_VIRTUAL, &virt, NULL))
        FAIL("setup: setitimer: %s", strerror(errno));

    /* POSIX timers: one signalling SIGRTMIN+5 with a value in 30 s, one silent and periodic. */
    struct sigevent ev = {.sigev_notify = SIGEV_SIGNAL, .sigev_signo = SIGRTMIN + 5};
    ev.sigev_value.sival_int = 77;
    struct sigevent quiet = {.sigev_notify = SIGEV_NONE};
    struct itimerspec in30 = {{0, 0}, {30, 0}}, every2 = {{2, 0}, {60, 0}};
    if (timer_create(CLOCK_MONOTONIC, &ev, &ptimer) || timer_create(CLOCK_REALTIME, &quiet, &qtimer) ||
        timer_settime(ptimer, 0, &in30, NULL) || timer_settime(qtimer, 0, &every2, NULL))
        FAIL("setup: timer_create: %s", strerror(errno));

    ready();
    wait_check();

    /* Dispositions. */
    check_handler(SIGUSR1, (void *)on_usr1, SA_SIGINFO | SA_ONSTACK | SA_RESTART);
    check_handler(SIGUSR2, (void *)on_usr2, 0);
    check_handler(rt, (void *)on_rt, SA_SIGINFO);
    struct sigaction sa;
    sigaction(SIGUSR1, NULL, &sa);
    if (sigismember(&sa.sa_mask, SIGWINCH) != 1)
        FAIL("SIGUSR1 sa_mask lost SIGWINCH");
    sigaction(SIGHUP, NULL, &sa);
    if (sa.sa_handler != SIG_IGN)
        FAIL("SIGHUP is not SIG_IGN");

    /* Alternate stack. */
    stack_t cur_ss;
    if (sigaltstack(NULL, &cur_ss) != 0)
        FAIL("sigaltstack query: %s", strerror(errno));
    if (cur_ss.ss_sp != alt_mem || cur_ss.ss_size != ALT_SIZE || (cur_ss.ss_flags & SS_DISABLE))
        FAIL("sigaltstack sp=%p size=%zu flags=%#x want sp=%p size=%d", cur_ss.ss_sp,
             cur_ss.ss_size, (unsigned)cur_ss.ss_flags, alt_mem, ALT_SIZE);

    /* Pending and blocked sets (before anything is unblocked). */
    sigset_t pend, mask;
    sigpending(&pend);
    sigprocmask(SIG_BLOCK, NULL, &mask);
    if (sigismember(&pend, SIGUSR2) != 1)
        FAIL("SIGUSR2 no longer pending");
    if (sigismember(&pend, rt) != 1)
        FAIL("SIGRTMIN+3 no longer pending");
    if (sigismember(&mask, SIGUSR2) != 1 || sigismember(&mask, rt) != 1)
        FAIL("blocked mask lost SIGUSR2 or SIGRTMIN+3");
    if (usr2_hit || rt_hit)
        FAIL("blocked signal delivered early (usr2=%d rt=%d)", (int)usr2_hit, (int)rt_hit);

    /* SIGUSR1 must run on the alternate stack with SIGWINCH blocked. */
    raise(SIGUSR1);
    if (!usr1_hit)
        FAIL("SIGUSR1 handler did not run");
    if (usr1_local < (uintptr_t)alt_mem || usr1_local >= (uintptr_t)alt_mem + ALT_SIZE)
        FAIL("SIGUSR1 handler ran at %#lx, not on altstack %p", (unsigned long)usr1_local, alt_mem);
    if (!usr1_winch_blocked)
        FAIL("SIGWINCH not blocked inside SIGUSR1 handler");

    /* Unblocking delivers the pending signals before sigprocmask returns. */
    sigset_t one;
    sigemptyset(&one);
    sigaddset(&one, rt);
    sigprocmask(SIG_UNBLOCK, &one, NULL);
    if (rt_hit != 1)
        FAIL("SIGRTMIN+3 delivered %d times, want 1", (int)rt_hit);
    if (rt_value != RT_VALUE || rt_code != SI_QUEUE || rt_pid != getpid())
        FAIL("SIGRTMIN+3 info value=%d code=%d pid=%d want %d/%d/%d", rt_value, rt_code,
             rt_pid, RT_VALUE, SI_QUEUE, (int)getpid());
    sigemptyset(&one);
    sigaddset(&one, SIGUSR2);
    sigprocmask(SIG_UNBLOCK, &one, NULL);
    if (usr2_hit != 1)
        FAIL("SIGUSR2 delivered %d times, want 1", (int)usr2_hit);

    /* Resource limits and personality. */
    getrlimit(RLIMIT_NOFILE, &rl);
    if (rl.rlim_cur != 777)
        FAIL("RLIMIT_NOFILE soft %llu want 777", (unsigned long long)rl.rlim_cur);
    getrlimit(RLIMIT_CORE, &rl);
    if (rl.rlim_cur != 0)
        FAIL("RLIMIT_CORE soft %llu want 0", (unsigned long long)rl.rlim_cur);
    pers = personality(0xffffffff);
    if (pers == -1 || !(pers & ADDR_NO_RANDOMIZE))
        FAIL("personality %#x lacks ADDR_NO_RANDOMIZE", (unsigned)pers);

    struct itimerval now;
    if (getitimer(ITIMER_REAL, &now) || now.it_value.tv_sec >= 30 ||
        (now.it_value.tv_sec == 0 && now.it_value.tv_usec == 0))
        FAIL("ITIMER_REAL has %ld s left, want (0, 30)", (long)now.it_value.tv_sec);
    if (getitimer(ITIMER_VIRTUAL, &now) || now.it_interval.tv_sec != 1 || now.it_value.tv_sec == 0)
        FAIL("ITIMER_VIRTUAL lost (interval %ld s, left %ld s)", (long)now.it_interval.tv_sec,
             (long)now.it_value.tv_sec);
    setitimer(ITIMER_REAL, &(struct itimerval){0}, NULL);
    struct itimerspec left;
    if (timer_gettime(ptimer, &left) || left.it_value.tv_sec >= 30 ||
        (left.it_value.tv_sec == 0 && left.it_value.tv_nsec == 0))
        FAIL("POSIX timer %p has %ld s left, want (0, 30)", (void *)ptimer, (long)left.it_value.tv_sec);
    if (timer_gettime(qtimer, &left) || left.it_interval.tv_sec != 2)
        FAIL("silent POSIX timer lost its 2 s period");
    timer_delete(ptimer);

    say("PASS signals\n");
    return 0;
}
