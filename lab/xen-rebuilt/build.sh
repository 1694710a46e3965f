#!/bin/sh
# Build the lab's rebuilt Xen 4.17 (xen-4.17-rebuilt.elf) from Debian bookworm's source
# package with two changes, each for one lab group:
#  1. mca_cap_init() sets the bank bits in the all-banks mask it has just allocated (upstream
#     commit 532988dccc, "x86/mcheck: fix mca_allbanks updating", 2025; in 4.21 only).  Without
#     it Xen 4.13-4.20 poll and scan no MCA bank at all (tests_xen/README.md, "Machine checks
#     ..."): the machine-check group `mce`.
#  2. CONFIG_SHADOW_PAGING=y, which Debian's configuration leaves unset.  A PV guest's log-dirty
#     mode lives in the shadow code (paging_log_dirty_enable -> shadow_enable): without it
#     XEN_DOMCTL_shadow_op ENABLE_LOGDIRTY of a PV guest fails with EOPNOTSUPP, so neither PV
#     live migration nor xenpage's pre-scan under log-dirty can run: the group `prescan-shadow`.
# Every other group boots Debian's own Xen 4.17.7.
#
#   lab/xen-rebuilt/build.sh SRC_DIR OUT_ELF
# SRC_DIR holds the source package as `apt-get source --download-only xen` leaves it
# (xen_*.orig.tar.xz, xen_*.debian.tar.xz); OUT_ELF receives the multiboot ELF (xen/xen).
# Debian's patch series is applied, then Debian's own hypervisor configuration
# (/boot/xen-4.17-amd64.config of xen-hypervisor-4.17-amd64) is used with change 2; the
# configuration used is left next to OUT_ELF as OUT_ELF.config.  Needs gcc, make,
# python3, flex and bison.
set -eu
here=$(dirname "$(readlink -f "$0")")
src=$(readlink -f "$1"); out=$(readlink -f "$2")
work=$(mktemp -d "${TMPDIR:-/tmp}/xen-rebuilt-build.XXXXXX")
trap 'rm -rf "$work"' EXIT
orig=$(ls "$src"/xen_*.orig.tar.xz | head -n1)
deb=$(ls "$src"/xen_*.debian.tar.xz | head -n1)
tar -C "$work" -xf "$orig"
top=$(ls -d "$work"/xen-* | head -n1)
tar -C "$top" -xf "$deb"
cd "$top"
grep -v '^#' debian/patches/series | while read -r p; do
  [ -n "$p" ] && patch -p1 -s --no-backup-if-mismatch < "debian/patches/$p"
done
python3 "$here/fix_allbanks.py" xen/arch/x86/cpu/mcheck/mce.c
sed -e 's/^# CONFIG_SHADOW_PAGING is not set$/CONFIG_SHADOW_PAGING=y/' \
  /boot/xen-4.17-amd64.config > xen/.config
make -C xen olddefconfig >/dev/null
grep -qx 'CONFIG_SHADOW_PAGING=y' xen/.config || { echo "CONFIG_SHADOW_PAGING=y did not stick" >&2; exit 1; }
nice make -C xen -j"$(nproc)" >"$work/build.log" 2>&1 || { tail -n 40 "$work/build.log"; exit 1; }
cp xen/xen "$out"
cp xen/.config "$out.config"
echo "built $out ($(grep -o 'XEN_FULLVERSION[^;]*' xen/include/xen/compile.h 2>/dev/null | head -n1))"
