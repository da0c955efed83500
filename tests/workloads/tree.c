/*
 * tree DIR [own-session]: a process tree across process groups and sessions, sharing
 * one open file. With own-session, P leads a session of its own and does not check its
 * parent: the tree then holds every id it uses, and can move to a new pid namespace
 * (whose init becomes P's parent).
 *
 *   P (the test's child) ── A ── A1   A1 leads its own session (setsid)
 *                        └─ B          B leads its own process group
 *
 * P maps shared anonymous memory and a POSIX shm object (/dev/shm) before forking, so
 * all four share them. A fifth
 * child exits at once with 42 and stays a zombie until CHECK, when P reaps it.
 * Every process keeps a memory pattern and the ids it started with, and waits in
 * sigsuspend. On CHECK, P wakes A and B; A wakes A1. Each checks its pid, parent, group,
 * session and memory, appends its letter through the fd all of them inherited from P
 * (one open file description, one offset), and exits 0 or with a code saying what
 * differed. P reaps its children (wait4 on restored children), checks their exit codes
 * and that DIR/shared holds each letter once: separate offsets would overwrite.
 */
#include "common.h"

#include <fcntl.h>
#include <limits.h>
#include <sched.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/wait.h>

#define AREA_WORDS (256 * 1024) /* 2 MiB per process */

static uint64_t *area;
static int shared_fd;
/* MAP_SHARED|MAP_ANONYMOUS, made before the forks: one object in every process. */
#define SHM_WORDS (16 * 512)
static volatile uint64_t *shm;
/* A POSIX shared memory object (/dev/shm), mapped before the forks too. */
static volatile char *pshm;
static char pshm_name[64];
static pid_t my_pid, my_ppid, my_pgid, my_sid;
/* P's parent is outside the tree and may change (own-session mode). */
static int skip_ppid;

static void on_usr1(int sig)
{
    (void)sig;
}

static void remember(uint64_t seed)
{
    my_pid = getpid();
    my_ppid = getppid();
    my_pgid = getpgid(0);
    my_sid = getsid(0);
    area = malloc(AREA_WORDS * sizeof *area);
    if (!area)
        _exit(20);
    for (size_t i = 0; i < AREA_WORDS; i++)
        area[i] = mix64(seed * AREA_WORDS + i);
}

/* P is a child subreaper; B has a parent-death signal. */
static int want_subreaper, want_pdeathsig;

/* 0 if this process is still itself, else a code naming what differs. */
static int verify(uint64_t seed)
{
    int subreaper = -1, pdeathsig = -1;
    prctl(PR_GET_CHILD_SUBREAPER, &subreaper);
    prctl(PR_GET_PDEATHSIG, &pdeathsig);
    if (subreaper != want_subreaper || pdeathsig != want_pdeathsig)
        return 17;
    if (getpid() != my_pid)
        return 11;
    if (!skip_ppid && getppid() != my_ppid)
        return 12;
    if (getpgid(0) != my_pgid)
        return 13;
    if (getsid(0) != my_sid)
        return 14;
    for (size_t i = 0; i < AREA_WORDS; i++)
        if (area[i] != mix64(seed * AREA_WORDS + i))
            return 15;
    return 0;
}

/* Parked: in rt_sigsuspend (syscall 130). */
static void wait_parked(pid_t pid)
{
    wait_in_syscall(pid, 130);
}

static void park(void)
{
    sigset_t none;
    sigemptyset(&none);
    sigsuspend(&none);
}

static int append(char c)
{
    /* The shared page must still hold the parent's pattern, and take our letter. */
    for (size_t i = 64; i < SHM_WORDS; i++)
        if (shm[i] != mix64(0x5348 + i))
            return 19;
    shm[c & 63] = (uint64_t)c;
    if (pshm[0] != 'P')
        return 18;
    pshm[(unsigned char)c] = c;
    return write(shared_fd, &c, 1) == 1 ? 0 : 16;
}

static int reap(pid_t pid)
{
    int st;
    if (waitpid(pid, &st, 0) != pid)
        return 17;
    return WIFEXITED(st) ? WEXITSTATUS(st) : 18;
}

/* A child's life: pattern, park, verify, append, exit. */
static void child(uint64_t seed, char letter, pid_t (*spawn)(void))
{
    skip_ppid = 0;
    /* Not inherited through fork. */
    want_subreaper = 0;
    remember(seed);
    pid_t kid = spawn ? spawn() : 0;
    if (kid)
        wait_parked(kid);
    park();
    int r = verify(seed);
    if (!r)
        r = append(letter);
    if (!r && kid) {
        kill(kid, SIGUSR1);
        r = reap(kid);
        if (r)
            r += 100; /* the grandchild's code, told apart */
    }
    _exit(r);
}

static pid_t spawn_a1(void)
{
    pid_t p = fork();
    if (p == 0) {
        if (setsid() < 0)
            _exit(21);
        child(3, 'a', NULL);
    }
    return p;
}

int main(int argc, char **argv)
{
    if (argc < 2)
        FAIL("usage: tree DIR [own-session]");
    if (argc > 2 && strcmp(argv[2], "own-session") == 0) {
        if (setsid() < 0)
            FAIL("setup: setsid: %s", strerror(errno));
        skip_ppid = 1;
    }
    char path[PATH_MAX];
    snprintf(path, sizeof path, "%s/shared", argv[1]);
    shared_fd = open(path, O_RDWR | O_CREAT | O_TRUNC, 0644);
    if (shared_fd < 0 || write(shared_fd, "P", 1) != 1)
        FAIL("setup: %s: %s", path, strerror(errno));

    /* SIGUSR1 stays blocked except inside sigsuspend, so no wake-up is ever lost. */
    sigset_t usr1;
    sigemptyset(&usr1);
    sigaddset(&usr1, SIGUSR1);
    sigprocmask(SIG_BLOCK, &usr1, NULL);
    signal(SIGUSR1, on_usr1);

    shm = mmap(NULL, SHM_WORDS * 8, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    if (shm == MAP_FAILED)
        FAIL("setup: mmap shared: %s", strerror(errno));
    for (size_t i = 64; i < SHM_WORDS; i++)
        shm[i] = mix64(0x5348 + i);
    snprintf(pshm_name, sizeof pshm_name, "/mcr-tree-%d", getpid());
    int pfd = shm_open(pshm_name, O_RDWR | O_CREAT | O_TRUNC, 0600);
    if (pfd < 0 || ftruncate(pfd, 4096) < 0)
        FAIL("setup: shm_open %s: %s", pshm_name, strerror(errno));
    pshm = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_SHARED, pfd, 0);
    if (pshm == MAP_FAILED)
        FAIL("setup: mmap %s: %s", pshm_name, strerror(errno));
    close(pfd);
    pshm[0] = 'P';
    prctl(PR_SET_CHILD_SUBREAPER, 1);
    want_subreaper = 1;
    remember(0);
    pid_t a = fork();
    if (a == 0)
        child(1, 'A', spawn_a1);
    pid_t b = fork();
    if (b == 0) {
        if (setpgid(0, 0) < 0)
            _exit(22);
        want_pdeathsig = SIGWINCH;
        prctl(PR_SET_PDEATHSIG, SIGWINCH);
        child(2, 'B', NULL);
    }
    /* A zombie: exited with 42, not reaped until CHECK. */
    pid_t z = fork();
    if (z == 0)
        _exit(42);
    siginfo_t zi;
    if (a < 0 || b < 0 || z < 0 || waitid(P_PID, z, &zi, WEXITED | WNOWAIT) != 0)
        FAIL("setup: fork: %s", strerror(errno));
    wait_parked(a);
    wait_parked(b);
    /* Drop our page-table entries for the last page: its data lives on in the shared
     * object, which is what a checkpoint must read, not our page tables. */
    madvise((void *)(shm + SHM_WORDS - 512), 4096, MADV_DONTNEED);

    ready();
    wait_check();

    int r = verify(0);
    if (r)
        FAIL("parent: verify code %d", r);
    kill(a, SIGUSR1);
    int ra = reap(a);
    kill(b, SIGUSR1);
    int rb = reap(b);
    if (ra || rb)
        FAIL("children exit codes: A %d, B %d", ra, rb);
    int zs;
    if (waitpid(z, &zs, 0) != z || !WIFEXITED(zs) || WEXITSTATUS(zs) != 42)
        FAIL("zombie %d: status %#x, want exit 42", z, zs);

    if (shm['A' & 63] != 'A' || shm['B' & 63] != 'B' || shm['a' & 63] != 'a')
        FAIL("shared memory lacks the children's letters: the object was not shared");
    if (pshm['A'] != 'A' || pshm['B'] != 'B' || pshm['a'] != 'a')
        FAIL("%s lacks the children's letters: it was not shared", pshm_name);
    shm_unlink(pshm_name);

    char got[8] = {0};
    ssize_t n = pread(shared_fd, got, sizeof got - 1, 0);
    struct stat st;
    fstat(shared_fd, &st);
    if (n != 4 || st.st_size != 4 || !strchr(got, 'P') || !strchr(got, 'A') ||
        !strchr(got, 'a') || !strchr(got, 'B'))
        FAIL("shared file holds '%s' (%lld bytes): the offset was not shared", got,
             (long long)st.st_size);
    say("PASS tree pids=%d,%d,%d shared=%s\n", getpid(), a, b, got);
    return 0;
}
