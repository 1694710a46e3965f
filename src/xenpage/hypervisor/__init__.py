"""The simulated Xen 4.17 x86-64 host.

Module map (each named for the Xen concept it holds):

* :mod:`.e820`        -- the machine's memory map, ``mfn_valid`` and ``page_is_ram_type``.
* :mod:`.frametable`  -- ``struct page_info`` for every MFN, as a structure of numpy arrays.
* :mod:`.page_alloc`  -- the buddy heap and the offline state machine (xen/common/page_alloc.c).
* :mod:`.bootmem`     -- the boot-time allocator before the heap exists (page_alloc.c).
* :mod:`.start_xen`   -- where ``__start_xen`` puts Xen's own frames (xen/arch/x86/setup.c).
* :mod:`.layout`      -- a real machine's boot layout, to build a host frame for frame like it.
* :mod:`.domain`      -- domains, their flags, shutdown, destruction (xen/common/domain.c).
* :mod:`.sysctl`      -- ``XEN_SYSCTL_page_offline_op`` (xen/common/sysctl.c).
* :mod:`.host`        -- one simulated machine: all of the above, plus save/load.
"""
