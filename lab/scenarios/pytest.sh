#!/bin/sh
# The project's pytest suite inside the lab's dom0 (real Xen below it); junit XML to the host.
# --arg LAB_PYTEST_ARGS="tests -k foo" selects tests (default: the whole tests/ folder).
# lab-options: vcpus=2 timeout=2400 mem=4096 dom0_mem=3072
. /xenpage/lab/dom0/lablib.sh
cd /xenpage || exit 1
args=${LAB_PYTEST_ARGS:-tests}
# one pytest-xdist worker per dom0 vCPU (TCG runs each vCPU in its own host thread)
[ "${LAB_VCPUS:-1}" -gt 1 ] && args="-n $LAB_VCPUS $args"
lab_begin dom0-pytest
# shellcheck disable=SC2086
# progress dots also go to the console (the serial log shows a live, if slow, run)
{ PYTHONUNBUFFERED=1 python3 -m pytest -q -p no:cacheprovider --junitxml="$LAB_OUT/junit.xml" $args 2>&1; echo $? > /tmp/pytest.rc; } \
  | tee "$LAB_OUT/pytest.log" > "$LAB_CONSOLE"
rc=$(cat /tmp/pytest.rc)
[ $rc -eq 137 ] && dmesg | grep -iE "killed process|out of memory" | tail -n 3 > "$LAB_OUT/oom.txt"
summary=$(grep -E '(passed|failed|error|skipped|no tests ran).* in [0-9.]+s' "$LAB_OUT/pytest.log" | tail -n 1 | tr -d '=' | sed 's/^ *//')
case $rc in
  0) lab_ok dom0-pytest "$summary" ;;
  5) lab_fail dom0-pytest "no tests collected (pytest exit 5)" ;;
  137) lab_fail dom0-pytest "pytest killed (exit 137): $(head -n 1 "$LAB_OUT/oom.txt" 2>/dev/null)" ;;
  *) lab_fail dom0-pytest "pytest exit $rc: ${summary:-$(tail -n 1 "$LAB_OUT/pytest.log")}" ;;
esac
exit $rc
