#!/bin/sh
# xen-mceinj under TCG: does an injected memory error (MCE_SRAO_MEM, -t 0) reach Xen's
# machine-check handler and offline_page(mfn, broken=1), as the page-retirement service's
# `hard` action needs?  A free frame is found first (offline -> OFFLINED, then online again)
# with dom0's vCPUs kept off pCPU 0 (the Xen 4.17 PoD-lock hang, xen-lab.md).
. /xenpage/lab/dom0/lablib.sh
fail=0
lab_step pin xl vcpu-pin 0 all 1 || fail=1
lab_step mca-boot sh -c 'xl dmesg | grep -i -E "mce|mca|machine.check|cmci" ; true'

free=""
for m in 20000 30000 40000 50000 70000 78000; do
  out=$(xen-hptool mem-offline $m 2>&1)
  echo "$m: $out" >> "$LAB_OUT/probe.log"
  case "$out" in
    *"current state is [PG_OFFLINE_OFFLINED]"*) free=$m; xen-hptool mem-online $m >> "$LAB_OUT/probe.log" 2>&1; break ;;
    *) xen-hptool mem-online $m >> "$LAB_OUT/probe.log" 2>&1 ;;
  esac
done
lab_note "free frame: ${free:-none}"
if [ -z "$free" ]; then lab_fail find-free "no free frame among the candidates"; exit 1; fi

lab_step status-before xen-hptool mem-status $free
lab_step mceinj-help sh -c 'xen-mceinj -h; true'
lab_step mceinj sh -c "xen-mceinj -t 0 -c 0 -p 0x${free}000; echo exit=\$?"
sleep 2
lab_step status-after xen-hptool mem-status $free
lab_step dmesg-after sh -c 'xl dmesg | tail -n 60'
lab_step dom0-mcelog sh -c 'ls -l /dev/mcelog 2>&1; dmesg | grep -i -E "mce|mcelog|machine" | tail -n 20; true'
grep -q "BROKEN" "$LAB_OUT/status-after.log" && lab_note "xen-mceinj marked the frame broken" \
  || lab_note "xen-mceinj did NOT mark the frame broken"
exit $fail
