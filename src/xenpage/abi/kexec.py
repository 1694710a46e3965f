"""``kexec_op`` (``xen/include/public/kexec.h``): only what a toolstack asks of it here."""

KEXEC_CMD_kexec_get_range = 3

#: ``xen_kexec_range_t.range``: machine address and size of the crash area, of Xen itself
KEXEC_RANGE_MA_CRASH = 0
KEXEC_RANGE_MA_XEN = 1
KEXEC_RANGE_MA_CPU = 2
KEXEC_RANGE_MA_XENHEAP = 3
KEXEC_RANGE_MA_BOOT_PARAM = 4
KEXEC_RANGE_MA_EFI_MEMMAP = 5
KEXEC_RANGE_MA_VMCOREINFO = 6
