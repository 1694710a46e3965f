/* pfdshim: an LD_PRELOAD library that gives stock libxenguest's xc_exchange_page() the one
 * fix it needs to get past its first mmu_update batch on Xen >= 3.4 (xen-semantics.md 7.A1):
 * the batch is created with subject = domid, i.e. "page tables belong to the caller"; the
 * guest's tables belong to the guest, so the foreigndom argument must also carry the page-table
 * owner: ((domid + 1) << 16) | domid.  Everything else in xc_exchange_page stays as shipped.
 *
 * Active only when $XENPAGE_PFD is set.  Built by tests_xen/run_lab.py on the host (dom0 has no
 * compiler) with the version script pfdshim.map, because libxenguest binds the symbol as
 * xc_alloc_mmu_updates@VERS_4.17.0.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>

typedef void *(*alloc_fn)(void *xch, unsigned int subject);

void *xc_alloc_mmu_updates(void *xch, unsigned int subject)
{
    static alloc_fn next;
    unsigned int fd = subject;

    if (!next) {
        /* ctypes loads libxenctrl RTLD_LOCAL, so RTLD_NEXT cannot see it: ask for it by name */
        void *lib = dlopen("libxenctrl.so.4.17", RTLD_LAZY | RTLD_NOLOAD);
        if (!lib)
            lib = dlopen("libxenctrl.so.4.17", RTLD_LAZY);
        next = lib ? (alloc_fn)dlvsym(lib, "xc_alloc_mmu_updates", "VERS_4.17.0") : NULL;
        if (!next) {
            fprintf(stderr, "pfdshim: xc_alloc_mmu_updates@VERS_4.17.0 not found\n");
            abort();
        }
    }
    if (getenv("XENPAGE_PFD") && (subject >> 16) == 0 && subject < 0x7ff0)
        fd = ((subject + 1) << 16) | subject;
    fprintf(stderr, "pfdshim: mmu batch for d%u with foreigndom %#x\n", subject & 0xffff, fd);
    return next(xch, fd);
}
