/*
 * files DIR: regular-file offsets, O_APPEND, character devices on odd fd
 * numbers, a directory fd, close-on-exec, cwd and umask across a checkpoint.
 * DIR is prepared by the test; DIR/data and DIR/log are created here.
 */
#include "common.h"

#include <fcntl.h>
#include <limits.h>
#include <sys/file.h>
#include <sys/resource.h>
#include <sys/stat.h>

#define DATA_BYTES (1u << 20)
#define DATA_OFF 123457
#define NULL_FD 57
#define HIGH_FD 900
#define LOW_NOFILE 100

static int data_fd, log_fd, zero_fd, dir_fd, fifo_r, fifo_w;
static char dir_real[PATH_MAX];
/* Identity of each open file at setup, to check the same object is back. */
static struct stat st_data, st_null, st_zero, st_dir;
/* Restored under another root (a copy of DIR): same contents, other inodes. */
static int moved;

static unsigned char pat(size_t off)
{
    return (unsigned char)(off * 131 + (off >> 9) + 7);
}

static void fd_identity(int fd, const struct stat *want, const char *what)
{
    struct stat st;
    if (fstat(fd, &st) != 0)
        FAIL("fstat(%s): %s", what, strerror(errno));
    int same_inode = st.st_dev == want->st_dev && st.st_ino == want->st_ino;
    if ((!moved && !same_inode) ||
        st.st_rdev != want->st_rdev || (st.st_mode & S_IFMT) != (want->st_mode & S_IFMT))
        FAIL("%s is not the same file after restore", what);
}

/*
 * Whether a lock we took is held: asked through a new open file description of the
 * same file, which conflicts with it (no /proc needed: this may run in a chroot).
 * kind 'f' is our flock, 'p' our POSIX lock on [start, start+len), 'o' an OFD lock.
 */
static int holds_lock(const char *name, char kind, off_t start, off_t len)
{
    char path[PATH_MAX + 16];
    snprintf(path, sizeof path, "%s/%s", dir_real, name);
    int t = open(path, O_RDWR);
    if (t < 0)
        return 0;
    int held;
    if (kind == 'f') {
        held = flock(t, LOCK_SH | LOCK_NB) != 0 && errno == EWOULDBLOCK;
    } else {
        struct flock q = {.l_type = F_WRLCK, .l_whence = SEEK_SET, .l_start = start, .l_len = len};
        held = fcntl(t, F_OFD_GETLK, &q) == 0 && q.l_type == F_WRLCK && q.l_start == start &&
               q.l_len == len && q.l_pid == (kind == 'p' ? getpid() : -1);
    }
    close(t);
    return held;
}

static void check_flags(int fd, int want_acc, int want_append, int want_cloexec,
                        const char *what)
{
    int fl = fcntl(fd, F_GETFL), fdfl = fcntl(fd, F_GETFD);
    if (fl < 0 || fdfl < 0)
        FAIL("fcntl(%s): %s", what, strerror(errno));
    if ((fl & O_ACCMODE) != want_acc)
        FAIL("%s access mode %#x want %#x", what, fl & O_ACCMODE, want_acc);
    if (!!(fl & O_APPEND) != want_append)
        FAIL("%s O_APPEND is %d want %d", what, !!(fl & O_APPEND), want_append);
    if (!!(fdfl & FD_CLOEXEC) != want_cloexec)
        FAIL("%s FD_CLOEXEC is %d want %d", what, !!(fdfl & FD_CLOEXEC), want_cloexec);
}

int main(int argc, char **argv)
{
    if (argc < 2)
        FAIL("usage: files DIR [--moved]");
    moved = argc > 2 && strcmp(argv[2], "--moved") == 0;
    const char *dir = argv[1];
    char path[PATH_MAX + 16];
    if (!realpath(dir, dir_real))
        FAIL("setup: realpath(%s): %s", dir, strerror(errno));

    snprintf(path, sizeof path, "%s/data", dir_real);
    data_fd = open(path, O_RDWR | O_CREAT | O_TRUNC, 0644);
    if (data_fd < 0)
        FAIL("setup: open data: %s", strerror(errno));
    unsigned char *buf = malloc(DATA_BYTES);
    for (size_t i = 0; i < DATA_BYTES; i++)
        buf[i] = pat(i);
    if (write(data_fd, buf, DATA_BYTES) != DATA_BYTES)
        FAIL("setup: write data: %s", strerror(errno));
    free(buf);
    if (lseek(data_fd, DATA_OFF, SEEK_SET) != DATA_OFF)
        FAIL("setup: lseek data: %s", strerror(errno));

    /* Longer than the line written at CHECK: see the O_APPEND test below. */
    snprintf(path, sizeof path, "%s/log", dir_real);
    log_fd = open(path, O_WRONLY | O_APPEND | O_CREAT, 0644);
    const char *line = "files workload started; this line is longer than the check line\n";
    if (log_fd < 0 || write(log_fd, line, strlen(line)) != (ssize_t)strlen(line))
        FAIL("setup: log: %s", strerror(errno));

    int n = open("/dev/null", O_RDWR);
    if (n < 0 || dup2(n, NULL_FD) != NULL_FD)
        FAIL("setup: /dev/null on fd %d: %s", NULL_FD, strerror(errno));
    close(n);
    zero_fd = open("/dev/zero", O_RDONLY | O_CLOEXEC);
    dir_fd = open(dir_real, O_RDONLY | O_DIRECTORY);
    if (zero_fd < 0 || dir_fd < 0)
        FAIL("setup: open /dev/zero or DIR: %s", strerror(errno));
    if (fstat(data_fd, &st_data) || fstat(NULL_FD, &st_null) ||
        fstat(zero_fd, &st_zero) || fstat(dir_fd, &st_dir))
        FAIL("setup: fstat: %s", strerror(errno));
    if (chdir(dir_real) != 0)
        FAIL("setup: chdir: %s", strerror(errno));
    umask(027);

    /* An fd above a soft RLIMIT_NOFILE lowered after it was opened: legal, and the
     * restore must still be able to put it back. */
    if (dup2(NULL_FD, HIGH_FD) != HIGH_FD)
        FAIL("setup: dup2 to fd %d: %s", HIGH_FD, strerror(errno));
    struct rlimit rl;
    getrlimit(RLIMIT_NOFILE, &rl);
    rl.rlim_cur = LOW_NOFILE;
    if (setrlimit(RLIMIT_NOFILE, &rl) != 0)
        FAIL("setup: setrlimit: %s", strerror(errno));

    /* A named pipe with both ends open here and 300 bytes in flight. */
    snprintf(path, sizeof path, "%s/fifo", dir_real);
    if (mkfifo(path, 0600) != 0)
        FAIL("setup: mkfifo: %s", strerror(errno));
    fifo_r = open(path, O_RDONLY | O_NONBLOCK);
    fifo_w = open(path, O_WRONLY);
    char in_flight[300];
    memset(in_flight, 'f', sizeof in_flight);
    if (fifo_r < 0 || fifo_w < 0 || write(fifo_w, in_flight, sizeof in_flight) != (ssize_t)sizeof in_flight)
        FAIL("setup: fifo: %s", strerror(errno));

    /* Locks: a flock and a POSIX range lock on data, an OFD lock on log. */
    struct flock range = {.l_type = F_WRLCK, .l_whence = SEEK_SET, .l_start = 100, .l_len = 50};
    struct flock whole = {.l_type = F_WRLCK, .l_whence = SEEK_SET};
    if (flock(data_fd, LOCK_EX) || fcntl(data_fd, F_SETLK, &range) || fcntl(log_fd, F_OFD_SETLK, &whole))
        FAIL("setup: locks: %s", strerror(errno));

    ready();
    wait_check();

    fd_identity(data_fd, &st_data, "data fd");
    fd_identity(NULL_FD, &st_null, "fd 57 (/dev/null)");
    fd_identity(zero_fd, &st_zero, "/dev/zero fd");
    fd_identity(dir_fd, &st_dir, "dir fd");

    /* data: offset, content at the offset, and a write that advances it. */
    off_t off = lseek(data_fd, 0, SEEK_CUR);
    if (off != DATA_OFF)
        FAIL("data offset %lld want %d", (long long)off, DATA_OFF);
    unsigned char chunk[4096];
    if (read(data_fd, chunk, sizeof chunk) != sizeof chunk)
        FAIL("read data: %s", strerror(errno));
    for (size_t i = 0; i < sizeof chunk; i++)
        if (chunk[i] != pat(DATA_OFF + i))
            FAIL("data byte at %zu differs", DATA_OFF + i);
    memset(chunk, 0xA5, 100);
    if (write(data_fd, chunk, 100) != 100)
        FAIL("write data: %s", strerror(errno));
    off = lseek(data_fd, 0, SEEK_CUR);
    if (off != DATA_OFF + 4096 + 100)
        FAIL("data offset after read+write %lld want %d", (long long)off,
             DATA_OFF + 4096 + 100);
    unsigned char back[100];
    if (pread(data_fd, back, 100, DATA_OFF + 4096) != 100 || memcmp(back, chunk, 100))
        FAIL("data write not readable back");

    /*
     * log: seek to 0 first; with O_APPEND the write still lands at the end
     * and the size grows by exactly its length.  Without O_APPEND it would
     * overwrite the (longer) first line and the size would not change.
     */
    struct stat s1, s2;
    const char *cl = "check line\n";
    if (fstat(log_fd, &s1) != 0)
        FAIL("fstat log: %s", strerror(errno));
    lseek(log_fd, 0, SEEK_SET);
    if (write(log_fd, cl, strlen(cl)) != (ssize_t)strlen(cl))
        FAIL("write log: %s", strerror(errno));
    if (fstat(log_fd, &s2) != 0)
        FAIL("fstat log: %s", strerror(errno));
    if (s2.st_size != s1.st_size + (off_t)strlen(cl))
        FAIL("log size %lld -> %lld, not appended", (long long)s1.st_size,
             (long long)s2.st_size);

    if (write(HIGH_FD, "x", 1) != 1)
        FAIL("write fd %d (above RLIMIT_NOFILE): %s", HIGH_FD, strerror(errno));
    struct rlimit now;
    if (getrlimit(RLIMIT_NOFILE, &now) != 0 || now.rlim_cur != LOW_NOFILE)
        FAIL("RLIMIT_NOFILE soft %lu want %d", (unsigned long)now.rlim_cur, LOW_NOFILE);
    if (write(NULL_FD, "x", 1) != 1)
        FAIL("write fd %d: %s", NULL_FD, strerror(errno));
    unsigned char z[256];
    memset(z, 0xFF, sizeof z);
    if (read(zero_fd, z, sizeof z) != sizeof z)
        FAIL("read /dev/zero: %s", strerror(errno));
    for (size_t i = 0; i < sizeof z; i++)
        if (z[i])
            FAIL("/dev/zero gave non-zero byte");

    check_flags(data_fd, O_RDWR, 0, 0, "data fd");
    check_flags(log_fd, O_WRONLY, 1, 0, "log fd");
    check_flags(NULL_FD, O_RDWR, 0, 0, "fd 57");
    check_flags(zero_fd, O_RDONLY, 0, 1, "/dev/zero fd");
    check_flags(dir_fd, O_RDONLY, 0, 0, "dir fd");

    char cwd[PATH_MAX];
    if (!getcwd(cwd, sizeof cwd))
        FAIL("getcwd: %s", strerror(errno));
    if (strcmp(cwd, dir_real) != 0)
        FAIL("cwd '%s' want '%s'", cwd, dir_real);
    mode_t old = umask(0);
    umask(old);
    if (old != 027)
        FAIL("umask %03o want 027", (unsigned)old);

    struct stat sd;
    if (fstatat(dir_fd, "data", &sd, 0) != 0)
        FAIL("fstatat(dirfd, data): %s", strerror(errno));
    if (!moved && sd.st_ino != st_data.st_ino)
        FAIL("fstatat(dirfd, data) finds a different file");

    char fb[512];
    ssize_t fn = read(fifo_r, fb, sizeof fb);
    if (fn != 300 || fb[0] != 'f' || fb[299] != 'f')
        FAIL("fifo gave %zd bytes, want the 300 in flight", fn);
    if (write(fifo_w, "x", 1) != 1 || read(fifo_r, fb, 1) != 1 || fb[0] != 'x')
        FAIL("fifo ends are not one pipe after restore");
    check_flags(fifo_r, O_RDONLY, 0, 0, "fifo read end");

    /* POSIX first: closing any fd of a file drops the process's POSIX locks on it,
     * and each check opens and closes one. */
    if (!holds_lock("data", 'p', 100, 50))
        FAIL("the POSIX lock on data bytes 100-149 is not held");
    if (!holds_lock("data", 'f', 0, 0))
        FAIL("the flock on data is not held");
    if (!holds_lock("log", 'o', 0, 0))
        FAIL("the OFD lock on log is not held");

    say("PASS files\n");
    return 0;
}
