# Shell helpers for lab scenarios (source it: . /xenpage/lab/dom0/lablib.sh).
# Marker lines go straight to the console; see labproto.py for the protocol.
LAB_CONSOLE=${LAB_CONSOLE:-/dev/console}
lab_begin()  { echo "XENPAGE-LAB STEP $1 BEGIN" > "$LAB_CONSOLE"; }
lab_ok()     { n=$1; shift; echo "XENPAGE-LAB STEP $n OK $*" > "$LAB_CONSOLE"; }
lab_fail()   { n=$1; shift; echo "XENPAGE-LAB STEP $n FAIL ${*:-failed}" > "$LAB_CONSOLE"; }
lab_note()   { echo "XENPAGE-LAB NOTE $*" > "$LAB_CONSOLE"; }
# lab_export PATH [NAME]: send a file to the host now (files left in $LAB_OUT are sent at the end)
lab_export() { python3 /xenpage/lab/dom0/labproto.py export "$@"; }
# lab_step NAME CMD...: run CMD as a step; its output goes to $LAB_OUT/NAME.log
lab_step() {
  n=$1; shift
  lab_begin "$n"
  "$@" > "$LAB_OUT/$n.log" 2>&1
  r=$?
  if [ $r -eq 0 ]; then lab_ok "$n"; else lab_fail "$n" "exit $r: $(tail -n 1 "$LAB_OUT/$n.log")"; fi
  return $r
}
