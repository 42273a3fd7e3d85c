# qubes-gpu-share: installation and packages (docs/packaging.md).
#
# Self-contained, so the packages' build scripts run it directly
# (`make -f packaging.mk ...` in rpm_spec/ and debian/rules) and the top
# Makefile can include it:
#   make install-dom0 DESTDIR=...   dom0 files (broker, admin CLI, policy,
#                                   dom0's opt-in agent)
#   make install-vm DESTDIR=...     qube files (agent, udev rule, post-install)
#   make man                        the man pages, from the argparse parsers
#   make rpm                        both RPMs with rpmbuild (also on Debian)
#   make deb                        the VM .deb with dpkg-buildpackage
# Every path below can be overridden on the command line; the defaults are
# Fedora's (dom0 and Fedora templates), debian/rules passes Debian's.

PKG_TOP     := $(patsubst %/,%,$(dir $(abspath $(lastword $(MAKEFILE_LIST)))))
PKG_SRC     := $(PKG_TOP)/qubes-gpu-share
PKG_VERSION := $(shell cat $(PKG_TOP)/version)

PYTHON          ?= python3
# the interpreter named in the installed programs' first line
PYTHON_SHEBANG  ?= /usr/bin/python3
# platform-specific site dir: the package has a compiled module
PYTHON_SITEARCH ?= $(shell $(PYTHON) -c 'import sysconfig;print(sysconfig.get_path("platlib"))')
DESTDIR         ?=
BINDIR          ?= /usr/bin
SYSCONFDIR      ?= /etc
UNITDIR         ?= /usr/lib/systemd/system
PRESETDIR       ?= /usr/lib/systemd/system-preset
SYSUSERSDIR     ?= /usr/lib/sysusers.d
UDEVRULESDIR    ?= /usr/lib/udev/rules.d
MANDIR          ?= /usr/share/man
STATEDIR        ?= /var/lib/qubes-gpu-share
# build products (python build tree, man pages, rpm tree); tests use their own
PKG_BUILDDIR    ?= $(PKG_TOP)/build/pkg

PKG_PYBUILD := $(PKG_BUILDDIR)/py
PKG_MANOUT  := $(PKG_BUILDDIR)/man
PKG_RPMTOP  := $(PKG_BUILDDIR)/rpm

.PHONY: install-dom0 install-vm install-common install-python man \
        check-version rpm deb FORCE

# One version, in the top `version` file; the Python package repeats it
# (__version__, read by pyproject.toml, which may not reach outside its
# folder): refuse to build packages while they disagree.
check-version:
	@py=$$(sed -n 's/^__version__ = "\(.*\)"$$/\1/p' $(PKG_SRC)/qubes_gpu_share/__init__.py); \
	test "$$py" = "$(PKG_VERSION)" || { \
	    echo "version file says $(PKG_VERSION), qubes_gpu_share.__version__ says $$py" >&2; exit 1; }

# setup.py build compiles the cffi helper (_native.abi3.so) beside the
# package's modules; the build tree is copied, not pip-installed, so the
# same files land under any PYTHON_SITEARCH (Fedora's or Debian's).
install-python: check-version
	cd $(PKG_SRC) && $(PYTHON) setup.py -q build \
	    --build-base $(PKG_PYBUILD) --build-lib $(PKG_PYBUILD)/lib \
	    egg_info --egg-base $(PKG_PYBUILD)
	install -d $(DESTDIR)$(PYTHON_SITEARCH)
	cp -R $(PKG_PYBUILD)/lib/qubes_gpu_share $(DESTDIR)$(PYTHON_SITEARCH)/
	rm -rf $(DESTDIR)$(PYTHON_SITEARCH)/qubes_gpu_share-$(PKG_VERSION).egg-info
	cp -R $(PKG_PYBUILD)/qubes_gpu_share.egg-info \
	    $(DESTDIR)$(PYTHON_SITEARCH)/qubes_gpu_share-$(PKG_VERSION).egg-info
	find $(DESTDIR)$(PYTHON_SITEARCH)/qubes_gpu_share -name __pycache__ -prune -exec rm -rf {} +

# commands in section 1, the daemons (run by their units) in section 8
PKG_MANPAGES := qubes-gpu-share.1 qvm-gpu-share.1 \
    qubes-gpu-share-broker.8 qubes-gpu-share-agent.8
man: $(PKG_MANPAGES:%=$(PKG_MANOUT)/%)

# from the program's argparse parser (qubes_gpu_share/cli/manpage.py)
$(PKG_MANPAGES:%=$(PKG_MANOUT)/%): $(PKG_MANOUT)/%: FORCE
	cd $(PKG_SRC) && $(PYTHON) -m qubes_gpu_share.cli.manpage $(PKG_MANOUT) $(basename $*)
FORCE:

# Programs are small Python scripts, not pip console scripts, so the rpm and
# the deb install the same files. runpy is `python3 -m MODULE` without
# putting the current directory on sys.path.
# $(call pkg-program,NAME,MODULE)
define pkg-program
	printf '#!%s\n# %s: runs %s (qubes-gpu-share)\nimport runpy\nrunpy.run_module("%s", run_name="__main__", alter_sys=True)\n' \
	    '$(PYTHON_SHEBANG)' '$(1)' '$(2)' '$(2)' > $(DESTDIR)$(BINDIR)/$(1)
	chmod 0755 $(DESTDIR)$(BINDIR)/$(1)
endef

# $(call pkg-qubes-rpc,dom0|vm): the service entries, symlinks to a socket
define pkg-qubes-rpc
	install -d $(DESTDIR)$(SYSCONFDIR)/qubes-rpc
	cp -P $(PKG_TOP)/qubes-rpc/$(1)/qubes.Gpu* $(DESTDIR)$(SYSCONFDIR)/qubes-rpc/
endef

# $(call pkg-man,PAGE...): man pages (NAME.SECTION) into their sections
define pkg-man
	$(foreach page,$(1),install -D -m 0644 $(PKG_MANOUT)/$(page) \
	    $(DESTDIR)$(MANDIR)/man$(subst .,,$(suffix $(page)))/$(page)
	)
endef

# In both packages: the library, the user, the preset, the command and
# the agent with their man pages.
install-common: install-python $(PKG_MANOUT)/qubes-gpu-share.1 \
        $(PKG_MANOUT)/qubes-gpu-share-agent.8
	install -d $(DESTDIR)$(BINDIR) $(DESTDIR)$(UNITDIR) \
	    $(DESTDIR)$(PRESETDIR) $(DESTDIR)$(SYSUSERSDIR)
	$(call pkg-program,qubes-gpu-share,qubes_gpu_share.cli.main)
	$(call pkg-program,qubes-gpu-share-agent,qubes_gpu_share.agent)
	install -m 0644 $(PKG_TOP)/systemd/qubes-gpu-share.sysusers \
	    $(DESTDIR)$(SYSUSERSDIR)/qubes-gpu-share.conf
	install -m 0644 $(PKG_TOP)/systemd/70-qubes-gpu-share.preset $(DESTDIR)$(PRESETDIR)/
	$(call pkg-man,qubes-gpu-share.1 qubes-gpu-share-agent.8)

# dom0: the broker, the admin tool, the policy, and dom0's own agent
# (opt-in: its unit, socket unit, user and device access).
install-dom0: install-common $(PKG_MANOUT)/qvm-gpu-share.1 \
        $(PKG_MANOUT)/qubes-gpu-share-broker.8
	$(call pkg-program,qubes-gpu-share-broker,qubes_gpu_share.broker)
	$(call pkg-program,qvm-gpu-share,qubes_gpu_share.cli.admin)
	install -m 0644 $(PKG_TOP)/systemd/qubes-gpu-share-broker.service \
	    $(PKG_TOP)/systemd/qubes-gpu-share-dom0-agent.service \
	    $(PKG_TOP)/systemd/qubes-gpu-share-dom0-agent.socket $(DESTDIR)$(UNITDIR)/
	install -m 0644 $(PKG_TOP)/systemd/qubes-gpu-share-dom0.sysusers \
	    $(DESTDIR)$(SYSUSERSDIR)/qubes-gpu-share-dom0.conf
	install -d $(DESTDIR)$(UDEVRULESDIR)
	install -m 0644 $(PKG_TOP)/udev/90-qubes-gpu-share-dom0.rules $(DESTDIR)$(UDEVRULESDIR)/
	$(call pkg-qubes-rpc,dom0)
	install -d $(DESTDIR)$(SYSCONFDIR)/qubes/policy.d
	install -m 0664 $(PKG_TOP)/policy/*.policy $(DESTDIR)$(SYSCONFDIR)/qubes/policy.d/
	$(call pkg-man,qvm-gpu-share.1 qubes-gpu-share-broker.8)
	install -d -m 0750 $(DESTDIR)$(STATEDIR)

install-vm: install-common
	install -m 0644 $(PKG_TOP)/systemd/qubes-gpu-share-agent.service $(DESTDIR)$(UNITDIR)/
	$(call pkg-qubes-rpc,vm)
	install -d $(DESTDIR)$(UDEVRULESDIR) $(DESTDIR)$(SYSCONFDIR)/qubes/post-install.d
	install -m 0644 $(PKG_TOP)/udev/90-qubes-gpu-share.rules $(DESTDIR)$(UDEVRULESDIR)/
	install -m 0755 $(PKG_TOP)/post-install.d/50-qubes-gpu-share.sh \
	    $(DESTDIR)$(SYSCONFDIR)/qubes/post-install.d/

# --- rpm ---------------------------------------------------------------
# Qubes builds the spec on Fedora, with Fedora's rpm macros; Debian's
# rpmbuild lacks them, so rpm_spec/debian-host.macros gives them the same
# meaning (the spec stays a plain Fedora spec). BuildRequires name Fedora
# packages, so they are not checked (--nodeps): their Debian equivalents
# are installed instead.
PKG_PYVER := $(shell /usr/bin/python3 -c 'import sys;print("%d.%d" % sys.version_info[:2])')
PKG_RPM_DEFINES = \
    --load $(PKG_TOP)/rpm_spec/debian-host.macros \
    --define '_topdir $(PKG_RPMTOP)' \
    --define 'python3_version $(PKG_PYVER)'

# python3-packaging: rpm's generator of python3dist() Provides needs it
PKG_RPM_DEPS := rpm:/usr/bin/rpmbuild gcc:/usr/bin/gcc \
    python3-dev:/usr/bin/python3-config \
    python3-packaging:/usr/lib/python3/dist-packages/packaging \
    python3-setuptools:/usr/lib/python3/dist-packages/setuptools \
    python3-cffi:/usr/lib/python3/dist-packages/cffi \
    linux-libc-dev:/usr/include/xen/gntdev.h \
    libdrm-dev:/usr/include/libdrm/drm_mode.h

# The source tarball holds the files git tracks, as they are in the work
# tree (so a change is built before it is committed; untracked files never).
rpm: check-version
	@$(PKG_TOP)/scripts/ensure-system-deps $(PKG_RPM_DEPS)
	rm -rf $(PKG_RPMTOP)
	install -d $(PKG_RPMTOP)/SOURCES $(PKG_RPMTOP)/SPECS
	cd $(PKG_TOP) && git ls-files -z | tar --null -T - \
	    --transform 's,^,qubes-gpu-share-$(PKG_VERSION)/,S' \
	    -czf $(PKG_RPMTOP)/SOURCES/qubes-gpu-share-$(PKG_VERSION).tar.gz
	cp $(PKG_TOP)/systemd/qubes-gpu-share.sysusers \
	    $(PKG_TOP)/systemd/qubes-gpu-share-dom0.sysusers $(PKG_RPMTOP)/SOURCES/
	sed 's/@VERSION@/$(PKG_VERSION)/g' $(PKG_TOP)/rpm_spec/qubes-gpu-share.spec.in \
	    > $(PKG_RPMTOP)/SPECS/qubes-gpu-share.spec
	rpmbuild -bb --nodeps $(PKG_RPM_DEFINES) $(PKG_RPMTOP)/SPECS/qubes-gpu-share.spec
	@find $(PKG_RPMTOP)/RPMS -name '*.rpm'

# --- deb ---------------------------------------------------------------
# dpkg-buildpackage writes to the parent folder; the packages are moved
# into the build folder, out of the way of other checkouts.
PKG_DEBOUT := $(PKG_BUILDDIR)/deb
deb: check-version
	@$(PKG_TOP)/scripts/ensure-system-deps dpkg-dev:/usr/bin/dpkg-buildpackage \
	    debhelper:/usr/bin/dh dh-python:/usr/bin/dh_python3
	cd $(PKG_TOP) && { dpkg-checkbuilddeps 2>/dev/null || apt-get build-dep -y -qq ./; }
	cd $(PKG_TOP) && dpkg-buildpackage -us -uc -b --post-clean
	rm -rf $(PKG_DEBOUT) && install -d $(PKG_DEBOUT)
	mv $(PKG_TOP)/../qubes-gpu-share*_$(PKG_VERSION)-* $(PKG_DEBOUT)/
	@find $(PKG_DEBOUT) -name '*.deb'
