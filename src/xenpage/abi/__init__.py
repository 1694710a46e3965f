"""Xen's public ABI numbers, defined once (mirrors ``xen/include/public``)."""
