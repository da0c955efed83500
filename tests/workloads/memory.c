/*
 * memory MIB (default 64): anonymous, heap, .data, .bss and a private
 * file-backed (COW) mapping survive a checkpoint while the big anonymous
 * area is being rewritten right up to the freeze; afterwards the restored
 * address space must still be manageable (brk, mmap, munmap).
 */
#include "common.h"

#include <signal.h>
#include <sys/rseq.h>

#include <fcntl.h>
#include <poll.h>
#include <sys/mman.h>
#include <sys/stat.h>

#define HEAP_BYTES (3u << 20)
#define ARR_WORDS 4096 /* 32 KiB each */

/* Non-zero initialiser keeps it in .data; it is overwritten (COW) at start. */
static uint64_t data_arr[ARR_WORDS] = {1};
static uint64_t bss_arr[ARR_WORDS];

static size_t page_size, page_words;
static uint64_t *area;    /* the big anonymous area */
static size_t npages;
static uint32_t *gens;    /* per-page generation (small malloc: brk heap) */
static uint64_t *heap;    /* large malloc: glibc serves it with mmap */
static uint64_t *shared;  /* MAP_SHARED|MAP_ANONYMOUS */
static uint64_t *rdonly;  /* written, then made read-only */
static uint64_t *noaccess; /* written, then made PROT_NONE */
#define SIDE_BYTES (1u << 20)
static unsigned char *exe_map;
static size_t exe_len;
static char marker[48];

#define MARKER_OFF 256 /* inside page 0 of the exe mapping, past the ELF header */

/* Word w of a block with this seed. A stale or misplaced block differs at word 0. */
static void fill(uint64_t *p, size_t nwords, uint64_t seed)
{
    for (size_t w = 0; w < nwords; w++)
        p[w] = seed ^ (w * 0x9E3779B97F4A7C15ull);
}

/* Index of the first mismatching word, or -1. */
static long verify(const uint64_t *p, size_t nwords, uint64_t seed)
{
    for (size_t w = 0; w < nwords; w++)
        if (p[w] != (seed ^ (w * 0x9E3779B97F4A7C15ull)))
            return (long)w;
    return -1;
}

static uint64_t page_seed(size_t i, uint32_t gen)
{
    return mix64(((uint64_t)i << 32) | gen);
}

static uint64_t *page_at(size_t i)
{
    return area + i * page_words;
}

static void verify_area(size_t from, size_t to)
{
    for (size_t i = from; i < to; i++) {
        long w = verify(page_at(i), page_words, page_seed(i, gens[i]));
        if (w >= 0)
            FAIL("area page %zu (gen %u) differs at word %ld", i, gens[i], w);
    }
}

/* Fill a fresh region, read it back; used for post-restore allocations. */
static void exercise(uint64_t *p, size_t bytes, uint64_t seed, const char *what)
{
    fill(p, bytes / 8, seed);
    long w = verify(p, bytes / 8, seed);
    if (w >= 0)
        FAIL("%s readback differs at word %ld", what, w);
}

static void setup_exe_mapping(void)
{
    int fd = open("/proc/self/exe", O_RDONLY | O_CLOEXEC);
    struct stat st;
    if (fd < 0 || fstat(fd, &st) < 0)
        FAIL("setup: open/fstat /proc/self/exe: %s", strerror(errno));
    if ((size_t)st.st_size < 2 * page_size)
        FAIL("setup: executable smaller than two pages");
    exe_len = (size_t)st.st_size;
    exe_map = mmap(NULL, exe_len, PROT_READ | PROT_WRITE, MAP_PRIVATE, fd, 0);
    if (exe_map == MAP_FAILED)
        FAIL("setup: mmap exe: %s", strerror(errno));
    close(fd); /* the mapping keeps the file; the engine must restore it */
    snprintf(marker, sizeof marker, "mcr-cow-marker pid=%d", (int)getpid());
    memcpy(exe_map + MARKER_OFF, marker, sizeof marker); /* COWs page 0 only */
}

/* Page 0 must hold the marker and otherwise the file bytes; page 1 the file bytes. */
static void verify_exe_mapping(void)
{
    unsigned char *file = malloc(2 * page_size);
    int fd = open("/proc/self/exe", O_RDONLY | O_CLOEXEC);
    if (!file || fd < 0)
        FAIL("open /proc/self/exe after restore: %s", strerror(errno));
    if (pread(fd, file, 2 * page_size, 0) != (ssize_t)(2 * page_size))
        FAIL("pread /proc/self/exe: %s", strerror(errno));
    close(fd);
    if (memcmp(exe_map + MARKER_OFF, marker, sizeof marker) != 0)
        FAIL("COW marker in exe mapping lost");
    if (memcmp(exe_map, file, MARKER_OFF) != 0)
        FAIL("exe mapping page 0 (outside marker) differs from file");
    if (memcmp(exe_map + page_size, file + page_size, page_size) != 0)
        FAIL("exe mapping page 1 differs from file");
    free(file);
}

static void on_usr1(int sig)
{
    (void)sig;
}

/*
 * glibc registered rseq for this thread; the kernel rewrites the area's cpu_id when a
 * signal is delivered, but only if the registration survived the restore.
 */
static void check_rseq(void)
{
    if (__rseq_size == 0)
        return; /* glibc without rseq: nothing to check */
    volatile uint32_t *cpu_id =
        (volatile uint32_t *)((char *)__builtin_thread_pointer() + __rseq_offset + 4);
    signal(SIGUSR1, on_usr1);
    *cpu_id = 0xdeadbeef;
    raise(SIGUSR1);
    if (*cpu_id == 0xdeadbeef)
        FAIL("rseq area not updated by the kernel: registration lost");
}

int main(int argc, char **argv)
{
    size_t mib = argc > 1 ? strtoul(argv[1], NULL, 10) : 64;
    if (mib == 0)
        FAIL("setup: MIB must be > 0");
    page_size = (size_t)sysconf(_SC_PAGESIZE);
    page_words = page_size / 8;
    npages = (mib << 20) / page_size;

    area = mmap(NULL, npages * page_size, PROT_READ | PROT_WRITE,
                MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    gens = calloc(npages, sizeof *gens);
    heap = malloc(HEAP_BYTES);
    if (area == MAP_FAILED || !gens || !heap)
        FAIL("setup: allocation failed");
    for (size_t i = 0; i < npages; i++)
        fill(page_at(i), page_words, page_seed(i, 0));
    fill(heap, HEAP_BYTES / 8, 0x4845415048454150ull);
    fill(data_arr, ARR_WORDS, 0x44415441ull);
    fill(bss_arr, ARR_WORDS, 0x425353ull);
    setup_exe_mapping();

    /* Memory a restore must fill past its protections, and shmem nobody names. */
    shared = mmap(NULL, SIDE_BYTES, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    rdonly = mmap(NULL, SIDE_BYTES, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    noaccess = mmap(NULL, SIDE_BYTES, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (shared == MAP_FAILED || rdonly == MAP_FAILED || noaccess == MAP_FAILED)
        FAIL("setup: side mappings: %s", strerror(errno));
    fill(shared, SIDE_BYTES / 8, 0x5348415245ull);
    fill(rdonly, SIDE_BYTES / 8, 0x524f4e4c59ull);
    fill(noaccess, SIDE_BYTES / 8, 0x4e4f4e45ull);
    if (mprotect(rdonly, SIDE_BYTES, PROT_READ) || mprotect(noaccess, SIDE_BYTES, PROT_NONE))
        FAIL("setup: mprotect: %s", strerror(errno));

    ready();

    /*
     * Steady state: rewrite one pseudo-random page per iteration with a new
     * generation, so the freeze lands in the middle of dirtying memory.  The
     * generation is bumped before the rewrite; since CHECK is only honoured
     * between iterations, a half-written page is finished after restore.
     */
    uint64_t rng = mix64((uint64_t)getpid());
    for (;;) {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        size_t i = rng % npages;
        gens[i]++;
        fill(page_at(i), page_words, page_seed(i, gens[i]));

        struct pollfd pfd = {.fd = 0, .events = POLLIN};
        int r = poll(&pfd, 1, 0);
        if (r > 0)
            break; /* POLLIN or POLLHUP: wait_check() reads or sees EOF */
        if (r < 0 && errno != EINTR)
            FAIL("poll(stdin): %s", strerror(errno));
    }
    wait_check();

    verify_area(0, npages);
    long w;
    if ((w = verify(heap, HEAP_BYTES / 8, 0x4845415048454150ull)) >= 0)
        FAIL("malloc buffer differs at word %ld", w);
    if ((w = verify(data_arr, ARR_WORDS, 0x44415441ull)) >= 0)
        FAIL(".data array differs at word %ld", w);
    if ((w = verify(bss_arr, ARR_WORDS, 0x425353ull)) >= 0)
        FAIL(".bss array differs at word %ld", w);
    verify_exe_mapping();
    if ((w = verify(shared, SIDE_BYTES / 8, 0x5348415245ull)) >= 0)
        FAIL("shared anonymous mapping differs at word %ld", w);
    if ((w = verify(rdonly, SIDE_BYTES / 8, 0x524f4e4c59ull)) >= 0)
        FAIL("read-only mapping differs at word %ld", w);
    if (mprotect(noaccess, SIDE_BYTES, PROT_READ))
        FAIL("mprotect(PROT_NONE area): %s", strerror(errno));
    if ((w = verify(noaccess, SIDE_BYTES / 8, 0x4e4f4e45ull)) >= 0)
        FAIL("PROT_NONE mapping differs at word %ld", w);
    check_rseq();

    /* Memory management on the restored address space. */
    void *brk_mem = sbrk(4 << 20);
    if (brk_mem == (void *)-1)
        FAIL("sbrk(4 MiB): %s", strerror(errno));
    exercise(brk_mem, 4 << 20, 0x42524bull, "sbrk region");

    uint64_t *fresh = mmap(NULL, 8 << 20, PROT_READ | PROT_WRITE,
                           MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (fresh == MAP_FAILED)
        FAIL("mmap(8 MiB): %s", strerror(errno));
    exercise(fresh, 8 << 20, 0x4e4557ull, "new mmap region");
    if (munmap(fresh, 8 << 20) != 0)
        FAIL("munmap(new region): %s", strerror(errno));

    size_t half = npages / 2;
    if (munmap(area, half * page_size) != 0)
        FAIL("munmap(half of area): %s", strerror(errno));
    verify_area(half, npages);

    say("PASS memory MIB=%zu pages=%zu\n", mib, npages);
    return 0;
}
