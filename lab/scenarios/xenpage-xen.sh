#!/bin/sh
# xenpage's real-Xen backend: the Hypervisor contract and tests_xen/ (memtest domU) in dom0.
# Needs tests_xen/ in the payload: run it with  python3 tests_xen/run_lab.py  (adds tests_xen/
# and the stock-exchange shim), or add "tests_xen" to xenlab.py's payload list.
# --arg LAB_XEN_PYTEST_ARGS="tests_xen -k memtest" selects tests.
# lab-options: vcpus=2 timeout=2400
. /xenpage/lab/dom0/lablib.sh
cd /xenpage || exit 1
if [ ! -f tests_xen/conftest.py ]; then
  lab_fail xenpage-xen "tests_xen/ is not in the payload (use tests_xen/run_lab.py)"
  exit 1
fi
if [ "${LAB_XEN_PV_MEMTEST:-1}" = 0 ]; then
  lab_note "no PV memtest guest (LAB_XEN_PV_MEMTEST=0): the tests start their own"
else
lab_begin memtest-domu
sed 's/^name *=.*/name = "memtest"/' lab/guest/memtest.cfg > /tmp/memtest.cfg
if xl create /tmp/memtest.cfg > "$LAB_OUT/memtest-create.log" 2>&1; then
  i=0
  while [ $i -lt 240 ] && ! grep -q '^MEMTEST OK' /var/log/xen/console/guest-memtest.log 2>/dev/null; do
    sleep 1; i=$((i + 1))
  done
  if grep -q '^MEMTEST OK' /var/log/xen/console/guest-memtest.log 2>/dev/null; then
    lab_ok memtest-domu "first heartbeat after ${i}s"
  else
    lab_fail memtest-domu "no MEMTEST OK within 240 s: $(tail -n 2 /var/log/xen/console/guest-memtest.log | tr '\n' ' ')"
  fi
else
  lab_fail memtest-domu "xl create: $(tail -n 1 "$LAB_OUT/memtest-create.log")"
fi
fi
args=${LAB_XEN_PYTEST_ARGS:-tests/contract tests_xen}
# LAB_XEN_WATCH=N: a note every N s while the scenario runs (uptime, load, busiest processes),
# so that a hung boot shows whether dom0 still ran and what
if [ "${LAB_XEN_WATCH:-0}" -gt 0 ]; then
  ( while :; do
      sleep "$LAB_XEN_WATCH"
      lab_note "watch uptime=$(cut -d' ' -f1 /proc/uptime) load=$(cut -d' ' -f1-3 /proc/loadavg) top=$(ps -eo stat=,pcpu=,comm= --sort=-pcpu | head -n 4 | tr -s ' \n' ' ')"
    done ) &
  watch_pid=$!
fi
lab_begin xenpage-xen-pytest
# shellcheck disable=SC2086
python3 -m pytest -v -p no:cacheprovider -o addopts= --junitxml="$LAB_OUT/junit-xen.xml" $args > "$LAB_OUT/pytest-xen.log" 2>&1
rc=$?
lab_note "pytest exited $rc uptime=$(cut -d' ' -f1 /proc/uptime)"
summary=$(grep -E '(passed|failed|error|skipped|no tests ran).* in [0-9.]+s' "$LAB_OUT/pytest-xen.log" | tail -n 1 | tr -d '=' | sed 's/^ *//')
cp /var/log/xen/console/guest-*.log "$LAB_OUT/" 2>/dev/null
cp /var/log/xen/qemu-dm-*.log /var/log/xen/xl-*.log /var/log/xen/xenpage-*.log "$LAB_OUT/" 2>/dev/null
xl dmesg > "$LAB_OUT/xl-dmesg-xen.txt" 2>&1
[ -n "${watch_pid:-}" ] && kill "$watch_pid" 2>/dev/null
case $rc in
  0) lab_ok xenpage-xen-pytest "$summary" ;;
  *) lab_fail xenpage-xen-pytest "pytest exit $rc: ${summary:-$(tail -n 1 "$LAB_OUT/pytest-xen.log")}" ;;
esac
exit $rc
