# xenpage: `make demo` and `make test` set everything up by themselves on a fresh machine.
PY      ?= python3
VENV    := .venv
VPY     := $(VENV)/bin/python
STAMP   := $(VENV)/.installed
PYTEST_WORKERS ?= 2

.PHONY: venv demo test test-fast bench soak test-xen test-xen-long lab-build clean xen-headers man

$(STAMP): pyproject.toml
	test -x $(VPY) || $(PY) -m venv $(VENV)
	$(VPY) -m pip install --quiet --upgrade pip
	$(VPY) -m pip install --quiet -e '.[test,plot,fleet]'
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/xenpage demo

# The ABI tests compile against libxen-dev's headers and the kernel's uapi asm/mce.h
# (linux-libc-dev) (Debian packages; installed when root).
XEN_DEV_PKGS := libxen-dev linux-libc-dev gcc libc6-dev
xen-headers:
	@if [ ! -f /usr/include/xenctrl.h ] || ! echo '#include <asm/mce.h>' | cc -E -x c - >/dev/null 2>&1; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing $(XEN_DEV_PKGS) for the ABI test"; \
	    export DEBIAN_FRONTEND=noninteractive; \
	    apt-get install -y -qq --no-install-recommends $(XEN_DEV_PKGS) >/dev/null 2>&1 || \
	    { apt-get update -qq && apt-get install -y -qq --no-install-recommends $(XEN_DEV_PKGS) >/dev/null; }; \
	  else echo "note: libxen-dev or linux-libc-dev is missing and this is not root: the ABI test will skip (fail under CI=true)"; fi; \
	fi

test: $(STAMP) xen-headers
	$(VENV)/bin/lint-imports
	$(VPY) -m pytest -q -n $(PYTEST_WORKERS) tests

test-fast: $(STAMP)
	$(VPY) -m pytest -q -x tests -m "not slow"

# xenpage(1), written from the CLI's command tree; read it with `man -l build/man/xenpage.1`
man: $(STAMP)
	$(VPY) -m xenpage.cli.manpage build/man/xenpage.1
	@echo "build/man/xenpage.1"

bench: $(STAMP)
	$(VPY) bench/run.py

soak: $(STAMP)
	$(VPY) bench/soak.py

# Real Xen 4.17 under QEMU (root; minutes): stock xen-hptool and the raw sysctl, verbatim,
# then xenpage's real-Xen backend (tests_xen/: PV, PVH and HVM guests; one fresh boot per group).
test-xen: $(STAMP)
	$(PY) lab/xenlab.py test hptool sysctl
	$(PY) tests_xen/run_lab.py

# Lab groups that pass but do not fit CI's budget (README): run by hand before resolving.
test-xen-long: $(STAMP)
	$(PY) tests_xen/run_lab.py --group mce,prescan-shadow,reboot

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis .import_linter_cache
