"""The backend-neutral dom0 toolstack (``tools/libs/guest``, ``tools/misc``).

Everything here talks to a :class:`~xenpage.toolstack.hypervisor.Hypervisor` only -- the
privileged view a dom0 process has -- and never imports the simulator.
"""
