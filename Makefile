# qubes-gpu-share: every target bootstraps what it needs from nothing.
#   make test    the whole test suite (what CI runs)
#   make quick   the suite without tests marked slow
# Other targets are described in README.md.

PYTHON ?= python3
VENV   := .venv
VPY    := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
SRC    := qubes-gpu-share

# Qubes' own qubesadmin/qrexec (tests only; never packaged, never
# committed): the system's where importable (dom0), else the folder the
# developer exported as QUBES_GPU_SHARE_QUBES_PATH (docs/qrexec.md says how
# to make one); without either, tests marked `qubes` skip with the reason.
QUBES_PY := $(or $(shell $(PYTHON) -c 'import os,qubesadmin,qrexec;print(os.path.dirname(os.path.dirname(qubesadmin.__file__)))' 2>/dev/null),$(QUBES_GPU_SHARE_QUBES_PATH))
export QUBES_GPU_SHARE_QUBES_PATH := $(QUBES_PY)

PY_INCLUDE := $(shell $(PYTHON) -c 'import sysconfig;print(sysconfig.get_paths()["include"])')

.PHONY: all test quick system-deps lint-tools venv clean policy-verdicts
all: test

# Debian packages the build needs (installed only when missing).
system-deps:
	@scripts/ensure-system-deps \
	    gcc:/usr/bin/gcc \
	    linux-libc-dev:/usr/include/xen/gntdev.h \
	    libdrm-dev:/usr/include/libdrm/drm_mode.h \
	    python3-dev:$(PY_INCLUDE)/Python.h \
	    python3-venv:$(shell $(PYTHON) -c 'import ensurepip,os;print(os.path.dirname(ensurepip.__file__))' 2>/dev/null || echo /nonexistent-ensurepip)

$(STAMP): $(SRC)/pyproject.toml $(wildcard $(SRC)/setup.py) $(wildcard $(SRC)/qubes_gpu_share/_native_build.py)
	@$(MAKE) --no-print-directory system-deps
	test -x $(VPY) || $(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade 'pip>=23' 'setuptools>=64' wheel
	$(VPY) -m pip install -q -e '$(SRC)[test]'
	touch $@

venv: $(STAMP)

# The packagers' linters, which tests/test_packaging.py runs on the built
# packages: installed where we can, skipped by the tests where not.
lint-tools:
	@scripts/ensure-system-deps lintian:/usr/bin/lintian rpmlint:/usr/bin/rpmlint \
	    || echo "(the packaging tests skip the linters without them)"

test: $(STAMP) lint-tools
	$(VPY) -m pytest

quick: $(STAMP)
	$(VPY) -m pytest -m 'not slow'

# Qubes' own policy parser's verdicts on tests/test_policy.py's request
# grid, which CI compares the project's evaluator against: run after a
# change to policy/ or to the grid (a test fails until then). Needs Qubes'
# qrexec package (above); QREXEC_COMMIT names the commit of
# QubesOS/qubes-core-qrexec it was copied from, unless it is a git checkout.
policy-verdicts: $(STAMP)
	$(VPY) tests/test_policy.py --write-verdicts $(if $(QREXEC_COMMIT),--qrexec-commit $(QREXEC_COMMIT))

clean:
	rm -rf $(VENV) build dist .pytest_cache .hypothesis
	find . -name __pycache__ -prune -exec rm -rf {} +
	find $(SRC) -name '*.so' -delete

# Further targets, each kept beside what it builds:
#   demo.mk (make demo), bench.mk (make bench, make fuzz),
#   packaging.mk (make install-dom0, install-vm, rpm, deb, man), lab/lab.mk (make xen-lab, xen-test)
-include demo.mk bench.mk packaging.mk lab/lab.mk
