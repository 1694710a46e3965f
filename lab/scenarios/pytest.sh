#!/bin/sh
# The project's pytest suite inside the lab's dom0 (real Xen below it); junit XML to the host.
# --arg LAB_PYTEST_ARGS="tests -k foo" selects tests (default: the whole tests/ folder).
# lab-options: vcpus=2 timeout=1800
. /xenpage/lab/dom0/lablib.sh
cd /xenpage || exit 1
args=${LAB_PYTEST_ARGS:-tests}
# one pytest-xdist worker per dom0 vCPU (TCG runs each vCPU in its own host thread)
[ "${LAB_VCPUS:-1}" -gt 1 ] && args="-n $LAB_VCPUS $args"
lab_begin dom0-pytest
# shellcheck disable=SC2086
python3 -m pytest -q -p no:cacheprovider --junitxml="$LAB_OUT/junit.xml" $args > "$LAB_OUT/pytest.log" 2>&1
rc=$?
summary=$(grep -E '(passed|failed|error|skipped|no tests ran).* in [0-9.]+s' "$LAB_OUT/pytest.log" | tail -n 1 | tr -d '=' | sed 's/^ *//')
case $rc in
  0) lab_ok dom0-pytest "$summary" ;;
  5) lab_fail dom0-pytest "no tests collected (pytest exit 5)" ;;
  *) lab_fail dom0-pytest "pytest exit $rc: ${summary:-$(tail -n 1 "$LAB_OUT/pytest.log")}" ;;
esac
exit $rc
