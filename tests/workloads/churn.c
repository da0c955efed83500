/*
 * churn FILE [MIB [RATE]] (default 16 MiB, 4 pages a millisecond): an address space that keeps changing between the images of
 * a chain (pre-dump, pre-dump, checkpoint). It rewrites random pages of a big area
 * all the time; on each "CHURN" line it also changes its shape once, every way a
 * write tracker can miss: pages dropped (MADV_DONTNEED, so zeros now), a region
 * unmapped and mapped afresh elsewhere, a region moved (mremap), a private file
 * mapping whose written page is dropped back to the file, the heap grown (brk), a
 * region unmapped and mapped again at the very same place with half of it written
 * (the rest must read as zeros, not as before), and a page written through a
 * read-only-then-writable mprotect. It answers "CHURNED".
 * On "FORK" it forks a child that only waits (and dies with it): "FORKED PID".
 * On "DONTFORK" it marks its read-only region MADV_DONTFORK whole: "MARKED".
 * On "CHECK" it verifies every byte against its own record.
 */
#include "common.h"

#include <poll.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/mman.h>
#include <sys/stat.h>

#define SIDE_PAGES 64
#define FILE_PAGES 8
#define DROPPED 0xffffffffu

static size_t pg, pw;

static void fill(uint64_t *p, size_t nwords, uint64_t seed)
{
    for (size_t w = 0; w < nwords; w++)
        p[w] = seed ^ (w * 0x9E3779B97F4A7C15ull);
}

static long verify(const uint64_t *p, size_t nwords, uint64_t seed)
{
    for (size_t w = 0; w < nwords; w++)
        if (p[w] != (seed ^ (w * 0x9E3779B97F4A7C15ull)))
            return (long)w;
    return -1;
}

static long nonzero(const uint64_t *p, size_t nwords)
{
    for (size_t w = 0; w < nwords; w++)
        if (p[w])
            return (long)w;
    return -1;
}

/* A region whose pages each carry a generation (DROPPED: reads as zeros). */
struct region {
    const char *name;
    uint64_t *base;
    size_t pages;
    uint32_t *gen;
    uint64_t salt;
};

static uint64_t seed_of(const struct region *r, size_t i)
{
    return mix64(r->salt ^ ((uint64_t)i << 32) ^ r->gen[i]);
}

static void put(struct region *r, size_t i)
{
    r->gen[i]++;
    fill(r->base + i * pw, pw, seed_of(r, i));
}

static void drop(struct region *r, size_t i)
{
    if (madvise(r->base + i * pw, pg, MADV_DONTNEED))
        FAIL("madvise(DONTNEED) %s page %zu: %s", r->name, i, strerror(errno));
    r->gen[i] = DROPPED;
}

static void check_region(const struct region *r)
{
    for (size_t i = 0; i < r->pages; i++) {
        const uint64_t *p = r->base + i * pw;
        long w = r->gen[i] == DROPPED ? nonzero(p, pw) : verify(p, pw, seed_of(r, i));
        if (w >= 0)
            FAIL("%s page %zu (gen %u) differs at word %ld", r->name, i, r->gen[i], w);
    }
}

static uint64_t *map_anon(size_t pages)
{
    void *p = mmap(NULL, pages * pg, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED)
        FAIL("mmap %zu pages: %s", pages, strerror(errno));
    return p;
}

static void place_region(struct region *r, const char *name, uint64_t *base, size_t pages,
                         uint64_t salt)
{
    r->name = name;
    r->pages = pages;
    r->base = base;
    /* Not malloc: it could move the brk, which the test grows itself. */
    r->gen = (uint32_t *)map_anon((pages * sizeof *r->gen + pg - 1) / pg);
    r->salt = salt;
    for (size_t i = 0; i < pages; i++)
        put(r, i);
}

static void new_region(struct region *r, const char *name, size_t pages, uint64_t salt)
{
    place_region(r, name, map_anon(pages), pages, salt);
}

static struct region area, fresh, moving, guarded, reborn;
static uint64_t *hole; /* where `moving` goes next */
static unsigned char *filemap, *file_bytes;
static uint32_t file_gen[FILE_PAGES]; /* 0: the file's bytes */
static char *heap_start;
static size_t heap_pages;
static unsigned rounds;

static void file_put(size_t i)
{
    file_gen[i]++;
    fill((uint64_t *)(filemap + i * pg), pw, mix64(0xf11e ^ ((uint64_t)i << 32) ^ file_gen[i]));
}

static void check_file(void)
{
    for (size_t i = 0; i < FILE_PAGES; i++) {
        const unsigned char *p = filemap + i * pg;
        long w = file_gen[i] ? verify((const uint64_t *)p, pw,
                                      mix64(0xf11e ^ ((uint64_t)i << 32) ^ file_gen[i]))
                             : (memcmp(p, file_bytes + i * pg, pg) ? 0 : -1);
        if (w >= 0)
            FAIL("file mapping page %zu (gen %u) differs at word %ld", i, file_gen[i], w);
    }
}

static void check_heap(void)
{
    for (size_t i = 0; i < heap_pages; i++) {
        long w = verify((uint64_t *)(heap_start + i * pg), pw, mix64(0x4ea9 ^ i));
        if (w >= 0)
            FAIL("brk page %zu differs at word %ld", i, w);
    }
}

/* One change of every kind. */
static void churn(uint64_t *rng)
{
    rounds++;
    for (int k = 0; k < 8; k++) {
        *rng = mix64(*rng);
        drop(&area, *rng % area.pages);
    }
    /* Unmapped, and mapped afresh (the kernel picks where). */
    munmap(fresh.base, fresh.pages * pg);
    munmap(fresh.gen, (fresh.pages * sizeof *fresh.gen + pg - 1) / pg * pg);
    new_region(&fresh, "fresh", SIDE_PAGES, 0xf4e54 + rounds);
    /* Moved, contents and all, to where it was not, then one page rewritten. */
    void *to = mremap(moving.base, moving.pages * pg, moving.pages * pg,
                      MREMAP_MAYMOVE | MREMAP_FIXED, hole);
    if (to == MAP_FAILED)
        FAIL("mremap: %s", strerror(errno));
    hole = moving.base;
    moving.base = to;
    put(&moving, rounds % moving.pages);
    /* Unmapped and mapped again where it was, half written: a new VMA at the old place. */
    munmap(reborn.base, reborn.pages * pg);
    if (mmap(reborn.base, reborn.pages * pg, PROT_READ | PROT_WRITE,
             MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1, 0) != reborn.base)
        FAIL("mmap reborn: %s", strerror(errno));
    for (size_t i = 0; i < reborn.pages; i++) {
        if (i % 2)
            reborn.gen[i] = DROPPED;
        else
            put(&reborn, i);
    }
    /* A written file page dropped goes back to the file's bytes; another is written. */
    if (madvise(filemap + (rounds % FILE_PAGES) * pg, pg, MADV_DONTNEED))
        FAIL("madvise(DONTNEED) file page: %s", strerror(errno));
    file_gen[rounds % FILE_PAGES] = 0;
    file_put((rounds + 3) % FILE_PAGES);
    /* The heap grows by a page. */
    char *p = sbrk((intptr_t)pg);
    if (p == (void *)-1 || p != heap_start + heap_pages * pg)
        FAIL("sbrk: %s", strerror(errno));
    fill((uint64_t *)p, pw, mix64(0x4ea9 ^ heap_pages));
    heap_pages++;
    /* Read-only since the last round, writable again for one write. */
    if (mprotect(guarded.base, guarded.pages * pg, PROT_READ | PROT_WRITE))
        FAIL("mprotect rw: %s", strerror(errno));
    put(&guarded, rounds % guarded.pages);
    if (mprotect(guarded.base, guarded.pages * pg, PROT_READ))
        FAIL("mprotect ro: %s", strerror(errno));
}

int main(int argc, char **argv)
{
    if (argc < 2)
        FAIL("usage: churn FILE [MIB [RATE]]");
    size_t mib = argc > 2 ? strtoul(argv[2], NULL, 10) : 16;
    int rate = argc > 3 ? atoi(argv[3]) : 4;
    pg = (size_t)sysconf(_SC_PAGESIZE);
    pw = pg / 8;
    new_region(&area, "area", (mib << 20) / pg, 0xa4ea);
    new_region(&fresh, "fresh", SIDE_PAGES, 0xf4e54);
    new_region(&moving, "moving", SIDE_PAGES, 0x30e);
    new_region(&guarded, "guarded", SIDE_PAGES, 0x6a4d);
    /* Between PROT_NONE guards, so that it stays a VMA of its own, never merged. */
    uint64_t *span = map_anon(3 * SIDE_PAGES);
    if (mprotect(span, SIDE_PAGES * pg, PROT_NONE) ||
        mprotect(span + 2 * SIDE_PAGES * pw, SIDE_PAGES * pg, PROT_NONE))
        FAIL("mprotect guards: %s", strerror(errno));
    place_region(&reborn, "reborn", span + SIDE_PAGES * pw, SIDE_PAGES, 0x4eb0);
    if (mprotect(guarded.base, guarded.pages * pg, PROT_READ))
        FAIL("mprotect: %s", strerror(errno));
    hole = map_anon(SIDE_PAGES); /* a place of the right size, unmapped by the move */

    /* The private file mapping's file: made here, never changed after. */
    int fd = open(argv[1], O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
    if (fd < 0)
        FAIL("create %s: %s", argv[1], strerror(errno));
    for (size_t i = 0; i < FILE_PAGES * pw; i++) {
        uint64_t w = mix64(0xf11ee ^ i);
        if (write(fd, &w, sizeof w) != sizeof w)
            FAIL("write %s: %s", argv[1], strerror(errno));
    }
    filemap = mmap(NULL, FILE_PAGES * pg, PROT_READ | PROT_WRITE, MAP_PRIVATE, fd, 0);
    file_bytes = malloc(FILE_PAGES * pg);
    if (filemap == MAP_FAILED || !file_bytes ||
        pread(fd, file_bytes, FILE_PAGES * pg, 0) != (ssize_t)(FILE_PAGES * pg))
        FAIL("file mapping: %s", strerror(errno));
    close(fd);
    for (size_t i = 0; i < FILE_PAGES; i += 2)
        file_put(i);
    heap_start = sbrk(0);

    ready();
    uint64_t rng = mix64((uint64_t)getpid());
    for (;;) {
        /* A burst of rewrites, then a look at stdin (which paces the bursts). */
        for (int k = 0; k < rate; k++) {
            rng = mix64(rng);
            put(&area, rng % area.pages);
        }
        struct pollfd pfd = {.fd = 0, .events = POLLIN};
        int r = poll(&pfd, 1, 1);
        if (r < 0 && errno != EINTR)
            FAIL("poll(stdin): %s", strerror(errno));
        if (r <= 0)
            continue;
        char line[64];
        read_line(line, sizeof line);
        if (strcmp(line, "CHURN") == 0) {
            churn(&rng);
            say("CHURNED %u\n", rounds);
            continue;
        }
        if (strcmp(line, "DONTFORK") == 0) {
            if (madvise(guarded.base, guarded.pages * pg, MADV_DONTFORK))
                FAIL("madvise(DONTFORK): %s", strerror(errno));
            say("MARKED %p\n", (void *)guarded.base);
            continue;
        }
        if (strcmp(line, "FORK") == 0) {
            pid_t kid = fork();
            if (kid < 0)
                FAIL("fork: %s", strerror(errno));
            if (kid == 0) {
                prctl(PR_SET_PDEATHSIG, SIGKILL);
                for (;;)
                    pause();
            }
            say("FORKED %d\n", (int)kid);
            continue;
        }
        if (strcmp(line, "CHECK") != 0)
            FAIL("unexpected line %s", line);
        break;
    }
    check_region(&area);
    check_region(&fresh);
    check_region(&moving);
    check_region(&guarded);
    check_region(&reborn);
    check_file();
    check_heap();
    say("PASS churn MIB=%zu rounds=%u heap+%zu\n", mib, rounds, heap_pages);
    return 0;
}
