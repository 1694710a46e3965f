"""Errno values as Xen on x86 returns them (identical to Linux's; ``xen/include/public/errno.h``)."""

EPERM = 1
ENOENT = 2
ESRCH = 3
EINTR = 4
EIO = 5
ENXIO = 6
EAGAIN = 11
ENOMEM = 12
EACCES = 13
EFAULT = 14
EBUSY = 16
EEXIST = 17
ENODEV = 19
EINVAL = 22
ENOSPC = 28
ERESTART = 85
ENOSYS = 38
EILSEQ = 84
EOPNOTSUPP = 95
ETIMEDOUT = 110

NAMES = {v: k for k, v in dict(globals()).items() if k.isupper() and isinstance(v, int)}


def name(err: int) -> str:
    """Symbolic name of a (positive or negative) errno, e.g. ``-22`` -> ``EINVAL``."""
    return NAMES.get(abs(err), f"E{abs(err)}")
