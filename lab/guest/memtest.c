/* memtest: the xenpage lab's PV domU workload (runs as the domU's init, i.e. as root).
 *
 *   memtest <MiB> [heartbeat-seconds]
 *
 * Allocates <MiB> of anonymous memory, locks it, fills every page with a per-page pattern,
 * looks up each page's pseudo-physical frame number (PFN) through /proc/self/pagemap and prints
 *   MEMTEST PFN <index> <pfn hex>
 * once per page.  Then it loops forever: verify every page against the pattern of the current
 * generation, rewrite it with the next generation's pattern, and print
 *   MEMTEST OK gen=<n> pages=<N>
 * every heartbeat (default 2 s).  A mismatch prints
 *   MEMTEST CORRUPT page=<i> pfn=<hex> gen=<n> word=<w> expected=<hex> got=<hex>
 * and a PFN that changes under the program (it must not: exchanging a page keeps the PFN)
 *   MEMTEST PFNMOVED page=<i> old=<hex> new=<hex>
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#define PAGE 4096UL
#define WORDS (PAGE / sizeof(uint64_t))

static void say(const char *fmt, ...)
{
    char buf[256];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(buf, sizeof(buf) - 1, fmt, ap);
    va_end(ap);
    if (n < 0)
        return;
    if (n > (int)sizeof(buf) - 2)
        n = sizeof(buf) - 2;
    buf[n++] = '\n';
    for (int off = 0; off < n;) {
        ssize_t w = write(1, buf + off, n - off);
        if (w < 0 && errno == EINTR)
            continue;
        if (w <= 0)
            return;
        off += w;
    }
}

static inline uint64_t pattern(uint64_t gen, uint64_t page, uint64_t word)
{
    /* distinct per generation, page and word; never all-zero */
    uint64_t x = (gen << 48) ^ (page << 20) ^ (word << 3) ^ 0x5a5aa5a5c3c33c3cULL;
    x ^= x >> 29;
    x *= 0xbf58476d1ce4e5b9ULL;
    x ^= x >> 32;
    return x | 1;
}

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static int pagemap_fd = -1;

static uint64_t pfn_of(const void *va)
{
    uint64_t ent = 0;
    off_t off = (off_t)((uintptr_t)va / PAGE) * 8;
    if (pread(pagemap_fd, &ent, 8, off) != 8)
        return ~0ULL;
    if (!(ent >> 63))               /* not present */
        return ~0ULL;
    return ent & ((1ULL << 55) - 1);
}

int main(int argc, char **argv)
{
    unsigned long mib = argc > 1 ? strtoul(argv[1], NULL, 0) : 16;
    double beat = argc > 2 ? atof(argv[2]) : 2.0;
    unsigned long n = mib * 1024 * 1024 / PAGE;
    if (n == 0) {
        say("MEMTEST ERROR usage: memtest <MiB> [heartbeat-seconds]");
        return 2;
    }
    uint64_t *mem = mmap(NULL, n * PAGE, PROT_READ | PROT_WRITE,
                         MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
    if (mem == MAP_FAILED) {
        say("MEMTEST ERROR mmap %lu MiB: %s", mib, strerror(errno));
        return 1;
    }
    madvise(mem, n * PAGE, MADV_NOHUGEPAGE);
    if (mlock(mem, n * PAGE) != 0)
        say("MEMTEST WARN mlock: %s", strerror(errno));
    pagemap_fd = open("/proc/self/pagemap", O_RDONLY);
    if (pagemap_fd < 0) {
        say("MEMTEST ERROR open /proc/self/pagemap: %s", strerror(errno));
        return 1;
    }
    for (unsigned long i = 0; i < n; i++)
        for (unsigned long w = 0; w < WORDS; w++)
            mem[i * WORDS + w] = pattern(0, i, w);
    uint64_t *pfn = calloc(n, sizeof(*pfn));
    if (!pfn) {
        say("MEMTEST ERROR calloc");
        return 1;
    }
    say("MEMTEST START pages=%lu mib=%lu pid=%d", n, mib, (int)getpid());
    for (unsigned long i = 0; i < n; i++) {
        pfn[i] = pfn_of(&mem[i * WORDS]);
        say("MEMTEST PFN %lu %llx", i, (unsigned long long)pfn[i]);
    }
    say("MEMTEST PFNS-DONE pages=%lu", n);

    uint64_t gen = 0, corrupt = 0, moved = 0;
    double last = 0;
    for (;;) {
        for (unsigned long i = 0; i < n; i++) {
            uint64_t *p = &mem[i * WORDS];
            int reported = 0;
            for (unsigned long w = 0; w < WORDS; w++) {
                uint64_t want = pattern(gen, i, w);
                if (p[w] != want) {
                    corrupt++;
                    if (!reported && corrupt <= 1000)
                        say("MEMTEST CORRUPT page=%lu pfn=%llx gen=%llu word=%lu expected=%016llx got=%016llx",
                            i, (unsigned long long)pfn[i], (unsigned long long)gen, w,
                            (unsigned long long)want, (unsigned long long)p[w]);
                    reported = 1;
                }
                p[w] = pattern(gen + 1, i, w);
            }
        }
        gen++;
        double t = now();
        if (t - last >= beat) {
            last = t;
            for (unsigned long i = 0; i < n; i++) {
                uint64_t q = pfn_of(&mem[i * WORDS]);
                if (q != pfn[i]) {
                    moved++;
                    say("MEMTEST PFNMOVED page=%lu old=%llx new=%llx", i,
                        (unsigned long long)pfn[i], (unsigned long long)q);
                    pfn[i] = q;
                }
            }
            say("MEMTEST OK gen=%llu pages=%lu corrupt=%llu moved=%llu", (unsigned long long)gen, n,
                (unsigned long long)corrupt, (unsigned long long)moved);
        }
    }
}
