#!/bin/sh
# Boot check: xl info / xl list, the hypervisor's console, a file back to the host.
. /xenpage/lab/dom0/lablib.sh
fail=0
lab_step xl-info xl info || fail=1
lab_step xl-list xl list || fail=1
lab_step xl-dmesg xl dmesg || fail=1
lab_step python-imports python3 -c "import numpy, click, rich, pytest, hypothesis, xenpage; print(xenpage.__file__)" || fail=1
exit $fail
