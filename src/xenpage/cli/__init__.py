"""The ``xenpage`` command (``tools/misc``: xen-hptool, xl, xen-mfndump)."""
