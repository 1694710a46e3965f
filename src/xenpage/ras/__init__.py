"""The page-retirement service: memory errors in, frames retired, and a record of it that
survives reboots.

* :mod:`.sources`    -- machine-check records as dom0 sees them (mcelog text, files, stdin)
* :mod:`.thresholds` -- thresholds in mcelog's and rasdaemon's syntax, xenpage's config file
* :mod:`.policy`     -- leaky buckets per frame / DRAM row / bank, and what to do on overflow
* :mod:`.store`      -- the retired-page list (SQLite), ``badpage=`` for Xen's command line
* :mod:`.service`    -- the service: decide, act through the toolstack, record, retry, replay

It talks to Xen only through the toolstack (``xenpage.toolstack``: the ``Hypervisor``
protocol, ``mem_offline``); the ``hard`` action (mark a frame broken) and the simulated
errors are handed in by the caller (``xenpage.backends.sim.ras`` or ``xen-mceinj``).  The year
study that replays field-like errors through it on simulated hosts is the simulator's
(``xenpage.backends.sim.year``).
"""
