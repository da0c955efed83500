/*
 * fpu: AVX, SSE (MXCSR) and x87 state across a checkpoint.
 *
 * Part A: one asm block loads ymm0..ymm15 (and three x87 stack slots) with
 * known values, blocks in a raw read(0) syscall until CHECK arrives, then
 * stores the registers back.  The kernel preserves them across a syscall, so
 * only a faithful xsave restore by the engine keeps them.  MXCSR (round
 * toward zero) and the x87 control word are set before blocking.
 * Part B: a double series computed before the read must be bit-identical to
 * a recomputation (same rounding mode) afterwards.
 *
 * The CHECK line is consumed by the raw read, so stdin is not read again
 * (except to finish a CHECK line that arrived in pieces).
 */
#include "common.h"

#include <immintrin.h>

#define MXCSR_RZ 0x7f80u     /* default 0x1f80 + RC=11 (round toward zero) */
#define X87_CW_RZ 0x0f7fu    /* default 0x037f + RC=11 (round toward zero) */
#define SERIES_N 1000000

static uint64_t ymm_in[16][4] __attribute__((aligned(32)));
static uint64_t ymm_out[16][4] __attribute__((aligned(32)));
/* 80-bit x87 values, each in a 16-byte slot (only the first 10 bytes count). */
static long double x87_in[3], x87_out[3];
static char rbuf[64];
static volatile double series_before;

static double __attribute__((noinline)) series(int n)
{
    double s = 0.0;
    for (int k = 1; k <= n; k++)
        s += 1.0 / ((double)k * (double)k);
    return s;
}

int main(void)
{
    for (int r = 0; r < 16; r++)
        for (int l = 0; l < 4; l++)
            ymm_in[r][l] = mix64(0xa5a50000u + (uint64_t)r * 4 + (uint64_t)l);
    x87_in[0] = 3.14159265358979323846264338327950288L;
    x87_in[1] = -1.0L / 3.0L;
    x87_in[2] = 1.0e-4000L; /* only representable in 80-bit extended */

    _mm_setcsr(MXCSR_RZ);
    unsigned short cw = X87_CW_RZ;
    __asm__ volatile("fldcw %0" : : "m"(cw));

    series_before = series(SERIES_N);

    ready();

    long ret;
    unsigned int csr_before = _mm_getcsr();
    __asm__ volatile(
        "vmovdqa   0(%[in]), %%ymm0\n\t"
        "vmovdqa  32(%[in]), %%ymm1\n\t"
        "vmovdqa  64(%[in]), %%ymm2\n\t"
        "vmovdqa  96(%[in]), %%ymm3\n\t"
        "vmovdqa 128(%[in]), %%ymm4\n\t"
        "vmovdqa 160(%[in]), %%ymm5\n\t"
        "vmovdqa 192(%[in]), %%ymm6\n\t"
        "vmovdqa 224(%[in]), %%ymm7\n\t"
        "vmovdqa 256(%[in]), %%ymm8\n\t"
        "vmovdqa 288(%[in]), %%ymm9\n\t"
        "vmovdqa 320(%[in]), %%ymm10\n\t"
        "vmovdqa 352(%[in]), %%ymm11\n\t"
        "vmovdqa 384(%[in]), %%ymm12\n\t"
        "vmovdqa 416(%[in]), %%ymm13\n\t"
        "vmovdqa 448(%[in]), %%ymm14\n\t"
        "vmovdqa 480(%[in]), %%ymm15\n\t"
        "fldt  0(%[xin])\n\t"
        "fldt 16(%[xin])\n\t"
        "fldt 32(%[xin])\n\t"
        /* read(0, rbuf, 64); re-issue while it returns -EINTR */
        "1:\n\t"
        "xorl %%eax, %%eax\n\t"
        "xorl %%edi, %%edi\n\t"
        "movq %[buf], %%rsi\n\t"
        "movl $64, %%edx\n\t"
        "syscall\n\t"
        "cmpq $-4, %%rax\n\t"
        "je 1b\n\t"
        "movq %%rax, %[ret]\n\t"
        "vmovdqa %%ymm0,    0(%[out])\n\t"
        "vmovdqa %%ymm1,   32(%[out])\n\t"
        "vmovdqa %%ymm2,   64(%[out])\n\t"
        "vmovdqa %%ymm3,   96(%[out])\n\t"
        "vmovdqa %%ymm4,  128(%[out])\n\t"
        "vmovdqa %%ymm5,  160(%[out])\n\t"
        "vmovdqa %%ymm6,  192(%[out])\n\t"
        "vmovdqa %%ymm7,  224(%[out])\n\t"
        "vmovdqa %%ymm8,  256(%[out])\n\t"
        "vmovdqa %%ymm9,  288(%[out])\n\t"
        "vmovdqa %%ymm10, 320(%[out])\n\t"
        "vmovdqa %%ymm11, 352(%[out])\n\t"
        "vmovdqa %%ymm12, 384(%[out])\n\t"
        "vmovdqa %%ymm13, 416(%[out])\n\t"
        "vmovdqa %%ymm14, 448(%[out])\n\t"
        "vmovdqa %%ymm15, 480(%[out])\n\t"
        /* pop in reverse order: top of stack is x87_in[2] */
        "fstpt 32(%[xout])\n\t"
        "fstpt 16(%[xout])\n\t"
        "fstpt  0(%[xout])\n\t"
        "vzeroupper\n\t"
        : [ret] "=m"(ret)
        : [in] "r"(ymm_in), [out] "r"(ymm_out), [xin] "r"(x87_in),
          [xout] "r"(x87_out), [buf] "r"(rbuf)
        : "rax", "rcx", "rdx", "rsi", "rdi", "r11", "cc", "memory",
          "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7",
          "xmm8", "xmm9", "xmm10", "xmm11", "xmm12", "xmm13", "xmm14", "xmm15",
          "st", "st(1)", "st(2)");
    unsigned int csr_after = _mm_getcsr();
    unsigned short cw_after;
    __asm__ volatile("fnstcw %0" : "=m"(cw_after));

    if (ret == 0)
        exit(2); /* EOF: the test went away */
    if (ret < 0)
        FAIL("raw read(0) returned %ld", ret);
    if (ret < 5 || memcmp(rbuf, "CHECK", 5) != 0)
        FAIL("expected CHECK, got %ld bytes '%.*s'", ret, (int)ret, rbuf);
    if (!memchr(rbuf, '\n', (size_t)ret)) {
        /* Rest of a CHECK line that arrived in pieces: drain to newline. */
        char tail[64];
        read_line(tail, sizeof tail);
    }

    for (int r = 0; r < 16; r++)
        for (int l = 0; l < 4; l++)
            if (ymm_out[r][l] != ymm_in[r][l])
                FAIL("ymm%d bits %d..%d got %016llx want %016llx", r, l * 64,
                     l * 64 + 63, (unsigned long long)ymm_out[r][l],
                     (unsigned long long)ymm_in[r][l]);
    if (csr_after != csr_before)
        FAIL("mxcsr got %#x want %#x", csr_after, csr_before);
    if (cw_after != X87_CW_RZ)
        FAIL("x87 control word got %#x want %#x", cw_after, X87_CW_RZ);
    for (int i = 0; i < 3; i++)
        if (memcmp(&x87_out[i], &x87_in[i], 10) != 0)
            FAIL("x87 st(%d) value differs", 2 - i);

    /* Part B: recompute under the rounding mode used before the checkpoint. */
    _mm_setcsr(MXCSR_RZ);
    double again = series(SERIES_N), before = series_before;
    uint64_t a, b;
    memcpy(&a, &again, 8);
    memcpy(&b, &before, 8);
    if (a != b)
        FAIL("series sum %016llx != recomputed %016llx", (unsigned long long)b,
             (unsigned long long)a);

    say("PASS fpu ymm=16 mxcsr=%#x\n", csr_after);
    return 0;
}
