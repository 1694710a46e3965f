"""The simulated Xen 4.17 x86-64 host.

Module map (each named for the Xen concept it holds):

* :mod:`.e820`        -- the machine's memory map, ``mfn_valid`` and ``page_is_ram_type``.
* :mod:`.frametable`  -- ``struct page_info`` for every MFN, as a structure of numpy arrays.
* :mod:`.page_alloc`  -- the buddy heap and the offline state machine (xen/common/page_alloc.c).
* :mod:`.domain`      -- domains, their flags, shutdown, destruction (xen/common/domain.c).
* :mod:`.sysctl`      -- ``XEN_SYSCTL_page_offline_op`` (xen/common/sysctl.c).
* :mod:`.host`        -- one simulated machine: all of the above, plus save/load.
"""
