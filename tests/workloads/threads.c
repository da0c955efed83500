/*
 * threads: main + three pthread workers, each parked in its own syscall at
 * checkpoint time: main and A in futex (pthread_cond_wait), B in poll(2) on
 * fd 0, C in a loop of raw nanosleep(10 ms) syscalls.  After CHECK each
 * thread checks its tid (restore keeps tids), its __thread value and address
 * (fs base), a double series in a local (bit-identical to a recomputation)
 * and its signal mask (each worker blocks one different extra signal); C
 * also checks its sigaltstack and a ymm register held across each syscall.
 * Main joins the workers last: pthread_join sleeps on the tid word that the
 * kernel clears and futex-wakes at thread exit (clear_child_tid).
 */
#include "common.h"

#include <immintrin.h>
#include <poll.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdatomic.h>
#include <sys/syscall.h>
#include <time.h>

#define ALT_SIZE (64 * 1024)

enum { MAIN, A, B, C, NT };
static const char *const names[NT] = {"main", "A(futex)", "B(poll)", "C(nanosleep)"};
static const int extra_sig[NT] = {0, SIGUSR1, SIGUSR2, SIGWINCH};
/* What /proc/self/task/TID/syscall shows while the thread is blocked. */
static const int blocked_in[NT] = {0, SYS_futex, SYS_poll, SYS_nanosleep};

static struct { int failed; char msg[300]; } res[NT]; /* each written by its own thread */
static pid_t tids[NT];
static uint64_t *tls_addr[NT];
static __thread uint64_t tls_tag;
static sigset_t base_mask; /* main's mask before any worker exists */
static long c_sleeps;

static pthread_barrier_t setup_done;
static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t cv_main = PTHREAD_COND_INITIALIZER; /* B -> main: B woke */
static pthread_cond_t cv_a = PTHREAD_COND_INITIALIZER;    /* main -> A: go */
static int b_woke, a_go;
static atomic_int stop;

/* Record thread t's first failure; main reports it after the joins. */
static void __attribute__((format(printf, 2, 3))) bad(int t, const char *fmt, ...)
{
    if (res[t].failed)
        return;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(res[t].msg, sizeof res[t].msg, fmt, ap);
    va_end(ap);
    res[t].failed = 1;
}

/* noipa: GCC must not prove two calls equal and fold the comparison away. */
static double __attribute__((noipa)) series(long n, long *terms)
{
    double s = 0.0;
    long k;
    for (k = 1; k <= n; k++)
        s += 1.0 / ((double)k * (double)k);
    *terms = k - 1;
    return s;
}

static void setup(int t, double *sum, long *terms)
{
    tids[t] = gettid();
    tls_tag = mix64(0x7100 + (uint64_t)t); /* distinct per thread */
    tls_addr[t] = &tls_tag;
    *sum = series(1000L * (t + 1), terms);
    if (extra_sig[t]) {
        sigset_t s;
        sigemptyset(&s);
        sigaddset(&s, extra_sig[t]);
        int e = pthread_sigmask(SIG_BLOCK, &s, NULL);
        if (e)
            bad(t, "pthread_sigmask: %s", strerror(e));
    }
}

/* noipa: &tls_tag must be recomputed from the live fs base, not CSE'd. */
static void __attribute__((noipa)) verify(int t, double sum, long terms)
{
    pid_t tid = gettid();
    if (tid != tids[t])
        bad(t, "tid %d, recorded %d", (int)tid, (int)tids[t]);
    if (&tls_tag != tls_addr[t])
        bad(t, "TLS address %p, was %p", (void *)&tls_tag, (void *)tls_addr[t]);
    uint64_t tag = mix64(0x7100 + (uint64_t)t);
    if (tls_tag != tag)
        bad(t, "TLS value %#llx, want %#llx", (unsigned long long)tls_tag, (unsigned long long)tag);
    long terms2;
    double again = series(1000L * (t + 1), &terms2);
    if (memcmp(&sum, &again, sizeof sum) != 0 || terms != terms2)
        bad(t, "series %a (%ld terms), recomputed %a (%ld terms)", sum, terms, again, terms2);
    sigset_t cur;
    pthread_sigmask(SIG_BLOCK, NULL, &cur);
    for (int s = 1; s < NSIG; s++) {
        int want = sigismember(&base_mask, s) == 1 || s == extra_sig[t];
        if ((sigismember(&cur, s) == 1) != want)
            bad(t, "signal %d %s in the mask", s, want ? "missing" : "unexpected");
    }
}

static void *worker_a(void *arg)
{
    double sum; /* locals: they live on this thread's stack */
    long terms;
    setup(A, &sum, &terms);
    pthread_barrier_wait(&setup_done);
    pthread_mutex_lock(&mu);
    while (!a_go) /* the loop also absorbs spurious/restart wakeups */
        pthread_cond_wait(&cv_a, &mu);
    pthread_mutex_unlock(&mu);
    verify(A, sum, terms);
    return &res[A];
}

static void *worker_b(void *arg)
{
    double sum;
    long terms;
    setup(B, &sum, &terms);
    pthread_barrier_wait(&setup_done);
    /* Only wait for readability (or EOF): main consumes the line, and only
     * after our report, so B cannot miss it. */
    struct pollfd p = {.fd = 0, .events = POLLIN};
    while (poll(&p, 1, -1) < 0)
        if (errno != EINTR) {
            bad(B, "poll: %s", strerror(errno));
            break;
        }
    verify(B, sum, terms);
    pthread_mutex_lock(&mu);
    b_woke = 1;
    pthread_cond_signal(&cv_main);
    pthread_mutex_unlock(&mu);
    return &res[B];
}

static void *worker_c(void *arg)
{
    static const double start[4] = {0.25, 1e6, -7.5, 0.125}, inc[4] = {1, 2, 3, 4};
    double sum;
    long terms, sleeps = 0;
    setup(C, &sum, &terms);
    void *alt = malloc(ALT_SIZE);
    stack_t ss = {.ss_sp = alt, .ss_size = ALT_SIZE, .ss_flags = 0};
    if (!alt || sigaltstack(&ss, NULL) != 0)
        bad(C, "sigaltstack: %s", strerror(errno));
    __m256d v = _mm256_loadu_pd(start), vinc = _mm256_loadu_pd(inc);
    pthread_barrier_wait(&setup_done);
    do { /* at least one sleep, so sleeps > 0 even when CHECK comes at once */
        struct timespec req = {.tv_sec = 0, .tv_nsec = 10 * 1000000};
        long r;
        /* Raw syscall with v pinned in a ymm register for its whole
         * duration ("+x"): only this thread's restored xstate keeps it.
         * -EINTR: go on with the remainder the kernel wrote back to req. */
        do
            __asm__ volatile("syscall"
                             : "=a"(r), "+x"(v)
                             : "0"((long)SYS_nanosleep), "D"(&req), "S"(&req)
                             : "rcx", "r11", "memory");
        while (r == -EINTR);
        if (r != 0) {
            bad(C, "nanosleep: %s", strerror((int)-r));
            break;
        }
        sleeps++;
        v = _mm256_add_pd(v, vinc);
        double got[4];
        _mm256_storeu_pd(got, v);
        int lane = 0; /* every value is an exact double: == is exact */
        while (lane < 4 && got[lane] == start[lane] + (double)sleeps * inc[lane])
            lane++;
        if (lane < 4) {
            bad(C, "ymm lane %d after %ld sleeps: %a, want %a", lane, sleeps, got[lane],
                start[lane] + (double)sleeps * inc[lane]);
            break;
        }
    } while (!atomic_load(&stop));
    verify(C, sum, terms);
    stack_t old = {.ss_flags = SS_DISABLE}; /* stays so if the query fails */
    sigaltstack(NULL, &old);
    if (old.ss_sp != alt || old.ss_size != ALT_SIZE || (old.ss_flags & SS_DISABLE))
        bad(C, "sigaltstack sp=%p size=%zu flags=%#x, want sp=%p size=%d", old.ss_sp,
            old.ss_size, (unsigned)old.ss_flags, alt, ALT_SIZE);
    c_sleeps = sleeps;
    return &res[C];
}

/*
 * Spin (sched_yield, no sleeping) until worker t is blocked in its syscall,
 * so that READY really means "every thread is parked in its own syscall".
 * Skipped if /proc/.../syscall cannot be read; gives up after 10 s.
 */
static void wait_blocked(int t)
{
    char path[64], buf[128];
    snprintf(path, sizeof path, "/proc/self/task/%d/syscall", (int)tids[t]);
    time_t t0 = time(NULL);
    for (;;) {
        FILE *f = fopen(path, "r");
        if (!f)
            return;
        int nr = -1;
        buf[0] = '\0';
        if (fgets(buf, sizeof buf, f))
            nr = atoi(buf); /* "running" gives 0, never a wanted number */
        fclose(f);
        buf[strcspn(buf, "\n")] = '\0'; /* the FAIL below must stay one line */
        if (nr == blocked_in[t])
            return;
        if (time(NULL) - t0 > 10)
            FAIL("setup: thread %s not blocked in syscall %d (%s)", names[t], blocked_in[t], buf);
        sched_yield();
    }
}

int main(void)
{
    void *(*const fn[NT])(void *) = {NULL, worker_a, worker_b, worker_c};
    pthread_t th[NT];
    double sum;
    long terms;

    pthread_sigmask(SIG_BLOCK, NULL, &base_mask);
    for (int t = A; t < NT; t++)
        if (sigismember(&base_mask, extra_sig[t]) == 1)
            FAIL("setup: signal %d already blocked at start", extra_sig[t]);
    setup(MAIN, &sum, &terms);
    pthread_barrier_init(&setup_done, NULL, NT);
    for (int t = A; t < NT; t++) {
        int e = pthread_create(&th[t], NULL, fn[t], NULL);
        if (e)
            FAIL("setup: pthread_create %s: %s", names[t], strerror(e));
    }
    pthread_barrier_wait(&setup_done); /* also publishes tids[] and res[] */
    for (int t = A; t < NT; t++) {
        if (res[t].failed)
            FAIL("setup: thread %s: %s", names[t], res[t].msg);
        wait_blocked(t);
    }

    ready();
    /* Main's own futex wait across the checkpoint: B wakes us once the
     * CHECK line is readable. */
    pthread_mutex_lock(&mu);
    while (!b_woke)
        pthread_cond_wait(&cv_main, &mu);
    pthread_mutex_unlock(&mu);
    wait_check();

    atomic_store(&stop, 1);
    pthread_mutex_lock(&mu);
    a_go = 1;
    pthread_cond_signal(&cv_a);
    pthread_mutex_unlock(&mu);
    if (tids[MAIN] != getpid())
        bad(MAIN, "tid %d is not the pid %d", (int)tids[MAIN], (int)getpid());
    verify(MAIN, sum, terms);

    for (int t = A; t < NT; t++) {
        void *rv = NULL;
        int e = pthread_join(th[t], &rv);
        if (e || rv != &res[t])
            FAIL("pthread_join %s: %s, returned %p want %p", names[t], strerror(e), rv,
                 (void *)&res[t]);
    }
    for (int t = MAIN; t < NT; t++)
        if (res[t].failed)
            FAIL("thread %s: %s", names[t], res[t].msg);
    if (c_sleeps <= 0)
        FAIL("thread %s: sleeps=%ld, want > 0", names[C], c_sleeps);
    say("PASS threads tids=%d,%d,%d,%d sleeps=%ld\n", (int)tids[MAIN], (int)tids[A],
        (int)tids[B], (int)tids[C], c_sleeps);
    return 0;
}
