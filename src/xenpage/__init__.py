"""xenpage: retire faulty memory pages on Xen hosts.

Layers (imports go downwards only):

* :mod:`xenpage.abi`        -- every public Xen number, defined once (xen/include/public).
* :mod:`xenpage.hypervisor` -- the simulated Xen 4.17 host (xen/common, xen/arch/x86).
* :mod:`xenpage.guests`     -- simulated guest kernels acting through hypercalls.
* :mod:`xenpage.toolstack`  -- backend-neutral dom0 tools (tools/libs/guest, tools/misc).
* :mod:`xenpage.backends`   -- the ``Hypervisor`` protocol over real Xen (``backends.xen``) or the
  simulator; ``backends.sim`` is the simulator's wing (composition, field-error model, year study).
* :mod:`xenpage.ras`        -- the page-retirement service.
* :mod:`xenpage.cli`        -- the ``xenpage`` command (xen-hptool compatible).
"""

__version__ = "0.1.0"
