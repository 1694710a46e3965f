"""The simulator's wing: everything only the simulated world needs.

* :mod:`.hypervisor` -- the ``Hypervisor`` protocol over the simulated host, in-process, as
  dom0 sees it; the saved default host (:func:`build_host`, :func:`open_host`);
  importing the wing imports :mod:`xenpage.guests`, which plugs the guest kernel models into
  the hypervisor model (:mod:`xenpage.hypervisor.guest_models`: the hypervisor model never
  imports the guests);
* :mod:`.ras` -- the simulated machine's memory errors, ``hard`` action, reboot with
  ``badpage=`` and guest restarts, for the retirement service;
* :mod:`.field` -- the field-error statistics model (a year of errors shaped like field
  studies) and :mod:`.year` -- the year study that replays it through the service.
"""

from __future__ import annotations

from ... import guests  # noqa: F401  (plugs the guest kernel models into the host)
from .hypervisor import (HOST_DIRNAME, DefaultHostSpec, SimForeignMap, SimHypervisor, SimPages,
                         build_host, host_path, open_host)

__all__ = ["SimHypervisor", "SimPages", "SimForeignMap", "DefaultHostSpec", "build_host",
           "host_path", "open_host", "HOST_DIRNAME"]
