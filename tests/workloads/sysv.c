/*
 * sysv: SysV IPC objects of the process's own ipc namespace (run it under
 * `unshare --ipc`), shared with a child.
 *
 *   segment K (key 0x5157, 1 MiB + 100 bytes, mode 0640): attached twice, read-write
 *     (with its second page made read-only by mprotect, which splits the mapping) and
 *     read-only; the child inherits both attaches;
 *   segment D (IPC_PRIVATE, two pages): attached, then marked for removal (IPC_RMID);
 *   segment U (key 0x5158, four pages): written, then attached by no one;
 *   a set of three semaphores (5, 0, 42) and a queue of three messages (types 1, 2, 7;
 *   the last one empty).
 *
 * The child blocks in read() on a pipe. On CHECK the parent checks every pattern, ids
 * and modes, writes through one attach and reads through the other, wakes the child,
 * which writes 'C' into K and exits 0, and reads that back: one segment, two processes.
 */
#include "common.h"

#include <sys/ipc.h>
#include <sys/mman.h>
#include <sys/msg.h>
#include <sys/sem.h>
#include <sys/shm.h>
#include <sys/wait.h>

#define K_SIZE ((1 << 20) + 100)
#define U_SIZE (4 * 4096)
#define C_AT 12345

static uint8_t pat(size_t i, int seed)
{
    return (uint8_t)mix64((uint64_t)seed * 0x100000 + i);
}

struct qmsg {
    long mtype;
    char text[512];
};

int main(void)
{
    int k = shmget(0x5157, K_SIZE, IPC_CREAT | IPC_EXCL | 0640);
    int d = shmget(IPC_PRIVATE, 8192, 0600);
    int u = shmget(0x5158, U_SIZE, IPC_CREAT | IPC_EXCL | 0600);
    int sem = semget(0x5345, 3, IPC_CREAT | IPC_EXCL | 0600);
    int q = msgget(0x4d53, IPC_CREAT | IPC_EXCL | 0600);
    if (k < 0 || d < 0 || u < 0 || sem < 0 || q < 0)
        FAIL("setup: creating the objects: %s", strerror(errno));
    uint8_t *rw = shmat(k, NULL, 0);
    const uint8_t *ro = shmat(k, NULL, SHM_RDONLY);
    char *dp = shmat(d, NULL, 0);
    uint8_t *up = shmat(u, NULL, 0);
    if (rw == (void *)-1 || ro == (void *)-1 || dp == (void *)-1 || up == (void *)-1)
        FAIL("setup: shmat: %s", strerror(errno));
    for (size_t i = 0; i < K_SIZE; i++)
        rw[i] = pat(i, 1);
    for (size_t i = 0; i < U_SIZE; i++)
        up[i] = pat(i, 2);
    shmdt(up);
    strcpy(dp, "marked for removal");
    if (shmctl(d, IPC_RMID, NULL) < 0 || mprotect(rw + 4096, 4096, PROT_READ) < 0)
        FAIL("setup: IPC_RMID or mprotect: %s", strerror(errno));
    unsigned short vals[3] = {5, 0, 42};
    if (semctl(sem, 0, SETALL, vals) < 0)
        FAIL("setup: SETALL: %s", strerror(errno));
    struct qmsg m = {.mtype = 1};
    strcpy(m.text, "one");
    int r = msgsnd(q, &m, 3, 0);
    m.mtype = 2;
    for (int i = 0; i < 300; i++)
        m.text[i] = (char)pat(i, 3);
    r |= msgsnd(q, &m, 300, 0);
    m.mtype = 7;
    r |= msgsnd(q, &m, 0, 0);
    if (r < 0)
        FAIL("setup: msgsnd: %s", strerror(errno));

    int wake[2];
    if (pipe(wake) < 0)
        FAIL("setup: pipe: %s", strerror(errno));
    pid_t c = fork();
    if (c == 0) {
        char b;
        while (read(wake[0], &b, 1) < 0 && errno == EINTR)
            ;
        rw[C_AT] = 'C';
        _exit(ro[C_AT] == 'C' ? 0 : 3);
    }
    if (c < 0)
        FAIL("setup: fork: %s", strerror(errno));
    wait_in_syscall(c, 0);
    struct shmid_ds ds;
    if (shmctl(k, IPC_STAT, &ds) < 0)
        FAIL("setup: IPC_STAT: %s", strerror(errno));
    unsigned long nattch = ds.shm_nattch;

    ready();
    wait_check();

    if (shmget(0x5157, 0, 0) != k || shmget(0x5158, 0, 0) != u)
        FAIL("segment keys lead elsewhere: %d %d, want %d %d", shmget(0x5157, 0, 0),
             shmget(0x5158, 0, 0), k, u);
    if (semget(0x5345, 0, 0) != sem || msgget(0x4d53, 0) != q)
        FAIL("semaphore or queue ids changed");
    for (size_t i = 0; i < K_SIZE; i++)
        if (ro[i] != pat(i, 1) || rw[i] != pat(i, 1))
            FAIL("segment K differs at %zu", i);
    if (shmctl(k, IPC_STAT, &ds) < 0 || (ds.shm_perm.mode & 0777) != 0640 ||
        ds.shm_segsz != K_SIZE || ds.shm_nattch != nattch)
        FAIL("segment K: mode %o size %zu nattch %lu, was %lu", ds.shm_perm.mode,
             ds.shm_segsz, (unsigned long)ds.shm_nattch, nattch);
    if (strcmp(dp, "marked for removal") != 0)
        FAIL("segment D holds '%.20s'", dp);
    if (shmctl(d, IPC_STAT, &ds) < 0 || !(ds.shm_perm.mode & SHM_DEST))
        FAIL("segment D is not marked for removal (mode %o)", ds.shm_perm.mode);
    up = shmat(u, NULL, SHM_RDONLY);
    if (up == (void *)-1)
        FAIL("shmat of U: %s", strerror(errno));
    for (size_t i = 0; i < U_SIZE; i++)
        if (up[i] != pat(i, 2))
            FAIL("segment U differs at %zu", i);
    unsigned short got[3];
    if (semctl(sem, 0, GETALL, got) < 0 || got[0] != 5 || got[1] != 0 || got[2] != 42)
        FAIL("semaphores hold %u %u %u", got[0], got[1], got[2]);
    struct sembuf down = {.sem_num = 2, .sem_op = -42, .sem_flg = IPC_NOWAIT};
    if (semop(sem, &down, 1) < 0)
        FAIL("semop: %s", strerror(errno));
    ssize_t n = msgrcv(q, &m, sizeof m.text, 0, IPC_NOWAIT);
    if (n != 3 || m.mtype != 1 || memcmp(m.text, "one", 3) != 0)
        FAIL("first message: %zd bytes, type %ld", n, m.mtype);
    n = msgrcv(q, &m, sizeof m.text, 0, IPC_NOWAIT);
    if (n != 300 || m.mtype != 2)
        FAIL("second message: %zd bytes, type %ld", n, m.mtype);
    for (int i = 0; i < 300; i++)
        if ((uint8_t)m.text[i] != pat(i, 3))
            FAIL("second message differs at %d", i);
    n = msgrcv(q, &m, sizeof m.text, 0, IPC_NOWAIT);
    if (n != 0 || m.mtype != 7)
        FAIL("third message: %zd bytes, type %ld", n, m.mtype);

    /* One segment: written through one attach, read through the other. */
    rw[0] = (uint8_t)~pat(0, 1);
    if (ro[0] != rw[0])
        FAIL("the two attaches of K are different memory");
    if (write(wake[1], "x", 1) != 1)
        FAIL("waking the child: %s", strerror(errno));
    int st;
    if (waitpid(c, &st, 0) != c || !WIFEXITED(st) || WEXITSTATUS(st) != 0)
        FAIL("child: status %#x", st);
    if (ro[C_AT] != 'C')
        FAIL("the child's write did not reach the parent's attach");
    say("PASS sysv shm=%d,%d,%d sem=%d msg=%d\n", k, d, u, sem, q);
    return 0;
}
