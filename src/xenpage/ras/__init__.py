"""The page-retirement service: memory errors in, frames retired, and a record of it that
survives reboots.

* :mod:`.sources`    -- machine-check records as dom0 sees them (mcelog text, files, stdin)
* :mod:`.devmcelog`  -- dom0's ``/dev/mcelog`` read natively (the default source on Xen);
  :mod:`.columns` -- a read's records as numpy columns for the service
* :mod:`.thresholds` -- thresholds in mcelog's and rasdaemon's syntax, xenpage's config file
* :mod:`.policy`     -- leaky buckets per frame / DRAM row / bank, and what to do on overflow;
  :mod:`.pagecounts` -- every frame's event counts and page bucket as numpy columns
* :mod:`.store`      -- the retired-page list (SQLite), ``badpage=`` for Xen's command line
* :mod:`.service`    -- the service: decide, act through the toolstack, record, retry, replay

It talks to Xen only through the toolstack (``xenpage.toolstack``: the ``Hypervisor``
protocol, ``mem_offline``); the ``hard`` action is handed in by the caller: on the simulator
Xen's own machine-check path (``xenpage.backends.sim.ras``), on real Xen retirement by policy
that never fakes a machine check (:mod:`.actions`); the simulated errors come from
``xenpage.backends.sim.ras``, real ones from the hardware through ``/dev/mcelog``.  The year
study that replays field-like errors through it on simulated hosts is the simulator's
(``xenpage.backends.sim.year``).
"""
