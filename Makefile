# qemu-vnet: install, demo and test on Debian 12.
#   sudo make demo   installs everything and runs a VM on the default NAT network vnet2
#   sudo make test   make lint (ruff, mypy), then the whole test suite (real bus, polkitd,
#                    kernel, QEMU guests, and the systemd tier: the package on Debian 12 and
#                    13 images, tests/vm/)
#   make deb         build/qemu-vnet_<version>_all.deb (debhelper; docs/packaging.md)
# Other targets: install, uninstall, install-files, start, stop, lint, unit, bench.

VENV        ?= /opt/qemu-vnet
PY          := $(VENV)/bin/python
BINDIR      ?= /usr/local/bin
SBINDIR     ?= /usr/local/sbin
LIBEXECDIR  ?= /usr/libexec/qemu-vnet
DBUS_SYSD   ?= /usr/share/dbus-1/system.d
DBUS_SVCD   ?= /usr/share/dbus-1/system-services
DBUS_IFACES ?= /usr/share/dbus-1/interfaces
POLKIT_ACT  ?= /usr/share/polkit-1/actions
POLKIT_RUL  ?= /usr/share/polkit-1/rules.d
UNITDIR     ?= /etc/systemd/system
LOGDIR      ?= /var/log/qemu-vnet
BASHCOMPDIR ?= /usr/share/bash-completion/completions
ZSHCOMPDIR  ?= /usr/share/zsh/vendor-completions
FISHCOMPDIR ?= /usr/share/fish/vendor_completions.d
MAN1DIR     ?= /usr/share/man/man1

# What the service needs, and what the tests and the demo need on top.
DEB_RUNTIME := dbus-daemon dbus-bin polkitd pkexec python3 python3-venv python3-pip netbase \
               python3-nftables python3-jeepney nftables iproute2 dnsmasq-base isc-dhcp-server vde2 \
               python3-shtab python3-argparse-manpage
DEB_TEST    := qemu-system-x86 linux-image-cloud-amd64 busybox-static expect dnsutils \
               iperf3 systemd procps psmisc frr iputils-ping vdeplug man-db fish
PIP_TEST    := pytest pytest-asyncio hypothesis pexpect ruff mypy
# Building the Debian package, and the systemd tier's Debian 12/13 images (tests/vm/).
DEB_BUILD   := debhelper dpkg-dev lintian python3-pip python3-shtab python3-argparse-manpage
DEB_VMTEST  := mmdebstrap e2fsprogs

SYSTEMD_PID1 := $(shell [ "$$(cat /proc/1/comm 2>/dev/null)" = systemd ] && echo yes)

.PHONY: all install install-deps install-test-deps install-files venv start stop uninstall \
        demo test test-env unit lint bench clean check-root host-coexistence host-coexistence-remove \
        deb install-build-deps shell-files

all:
	@echo "Try: sudo make demo    (install and boot a VM on network vnet2)"
	@echo "     sudo make test    (the whole test suite)"

check-root:
	@[ "$$(id -u)" = 0 ] || { echo "make: run this as root (sudo make $(MAKECMDGOALS))" >&2; exit 1; }

install: check-root install-deps install-files start
	@echo "qemu-vnet is installed. Add users to group 'vnet' to let them attach VMs:"
	@echo "  sudo usermod -aG vnet USER"

install-deps: check-root
	@missing=""; for p in $(DEB_RUNTIME); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "Installing Debian packages:$$missing"; \
	  apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $$missing; \
	fi

install-test-deps: check-root install-deps
	@missing=""; for p in $(DEB_TEST) $(DEB_BUILD) $(DEB_VMTEST); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "Installing Debian packages for tests:$$missing"; \
	  apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $$missing; \
	fi

venv: check-root
	@[ -x $(PY) ] || /usr/bin/python3 -m venv --system-site-packages $(VENV)
	@$(PY) -m pip install -q --disable-pip-version-check --no-build-isolation --no-deps --force-reinstall . >/dev/null
	@$(PY) -c "import dbus_fast, jeepney, pyroute2" 2>/dev/null || \
	  $(PY) -m pip install -q --disable-pip-version-check ".[daemon]"
	@chmod -R a+rX $(VENV)

install-files: check-root venv
	@getent group vnet >/dev/null || groupadd --system vnet
	@# the children's own users (docs/sandboxing.md): dnsmasq, ISC dhcpd and vde_switch never
	@# run as root
	@for u in vnet-dns vnet-dhcp vnet-vde; do getent passwd $$u >/dev/null || useradd --system \
	  --user-group --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin $$u; done
	@install -d -m 755 $(BINDIR) $(SBINDIR) $(LIBEXECDIR) $(DBUS_SYSD) $(DBUS_SVCD) $(DBUS_IFACES) \
	  $(POLKIT_ACT) $(POLKIT_RUL) $(UNITDIR) /etc/qemu-vnet/networks $(LOGDIR)
	@for c in vnet-client vnet-ifup vnet-ifdown; do ln -sf $(VENV)/bin/$$c $(BINDIR)/$$c; done
	@ln -sf $(VENV)/bin/vnetd $(SBINDIR)/vnetd
	@ln -sf $(VENV)/bin/vnet-bridge-helper $(LIBEXECDIR)/vnet-bridge-helper
	@install -m 644 dbus/org.qemuvnet.Vnet1.conf $(DBUS_SYSD)/
	@install -m 644 dbus/org.qemuvnet.Vnet1.service $(DBUS_SVCD)/
	@install -m 644 dbus/org.qemuvnet.Vnet1.xml $(DBUS_IFACES)/
	@install -m 644 polkit/org.qemuvnet.Vnet1.policy $(POLKIT_ACT)/
	@install -m 644 polkit/rules.d/50-qemu-vnet.rules $(POLKIT_RUL)/
	@install -m 644 systemd/vnetd.service $(UNITDIR)/vnetd.service
	@$(MAKE) -s shell-files
	@install -D -m 644 build/shell/vnet-client.bash $(BASHCOMPDIR)/vnet-client
	@install -D -m 644 build/shell/_vnet-client $(ZSHCOMPDIR)/_vnet-client
	@install -D -m 644 build/shell/vnet-client.fish $(FISHCOMPDIR)/vnet-client.fish
	@install -D -m 644 build/shell/vnet-client.1 $(MAN1DIR)/vnet-client.1
	@$(MAKE) -s host-coexistence
	@echo "Installed files under $(VENV), $(BINDIR), $(DBUS_SYSD), $(POLKIT_ACT), $(UNITDIR)."

# The host must not fight the VMs' network: NetworkManager and dhcpcd leave vnetd's bridges
# and taps alone (only where they are installed), and bridged frames skip iptables.
NM_CONF     := /etc/NetworkManager/conf.d/90-qemu-vnet.conf
DHCPCD_CONF := /etc/dhcpcd.conf
SYSCTL_CONF := /etc/sysctl.d/60-qemu-vnet.conf
MARK        := \# qemu-vnet: vnetd's bridges and taps are not the host's
UDEV_LINK   := /etc/systemd/network/70-qemu-vnet-tap.link

host-coexistence: check-root
	@# the package's snippet: a [device-*] section of its own, which an admin's
	@# unmanaged-devices= in another file does not replace
	@if [ -d /etc/NetworkManager ]; then install -d /etc/NetworkManager/conf.d; \
	  install -m 644 debian/NetworkManager.conf $(NM_CONF); echo "Wrote $(NM_CONF)."; fi
	@if [ -f $(DHCPCD_CONF) ] && ! grep -q "^$(MARK)" $(DHCPCD_CONF); then \
	  printf '%s\n' "$(MARK)" 'denyinterfaces vnet* vmnet*' >> $(DHCPCD_CONF); \
	  echo "Added denyinterfaces to $(DHCPCD_CONF)."; fi
	@printf '%s\n' "$(MARK): bridged frames do not go through iptables" \
	  'net.bridge.bridge-nf-call-iptables = 0' 'net.bridge.bridge-nf-call-ip6tables = 0' \
	  'net.bridge.bridge-nf-call-arptables = 0' > $(SYSCTL_CONF)
	@if [ -d /proc/sys/net/bridge ]; then sysctl -q -p $(SYSCTL_CONF) || true; fi
	@# udev's MACAddressPolicy=persistent would re-MAC every tap vnetd makes for an attach,
	@# and vnetd cuts off a port whose address changes (the package ships the same file)
	@if [ -d /etc/systemd ]; then install -D -m 644 debian/udev.link $(UDEV_LINK); \
	  echo "Wrote $(UDEV_LINK)."; fi

host-coexistence-remove: check-root
	@rm -f $(NM_CONF) $(SYSCTL_CONF) $(UDEV_LINK)
	@if [ -f $(DHCPCD_CONF) ]; then sed -i "/^$(MARK)/,+1d" $(DHCPCD_CONF); fi

# Start the bus, polkitd and vnetd: through systemd where it is PID 1, by hand otherwise.
start: check-root
ifeq ($(SYSTEMD_PID1),yes)
	systemctl daemon-reload
	systemctl reload dbus || true
	systemctl enable --now vnetd.service
else
	@$(PY) -m vnetd.devhost start --vnetd --venv $(VENV) --source $(CURDIR)
endif

stop: check-root
ifeq ($(SYSTEMD_PID1),yes)
	systemctl stop vnetd.service || true
else
	@$(PY) -m vnetd.devhost stop-vnetd
endif

uninstall: check-root stop host-coexistence-remove
ifeq ($(SYSTEMD_PID1),yes)
	-systemctl disable vnetd.service
endif
	rm -f $(BINDIR)/vnet-client $(BINDIR)/vnet-ifup $(BINDIR)/vnet-ifdown $(SBINDIR)/vnetd
	rm -f $(BASHCOMPDIR)/vnet-client $(ZSHCOMPDIR)/_vnet-client $(FISHCOMPDIR)/vnet-client.fish \
	  $(MAN1DIR)/vnet-client.1
	rm -rf $(LIBEXECDIR)
	rm -f $(DBUS_SYSD)/org.qemuvnet.Vnet1.conf $(DBUS_SVCD)/org.qemuvnet.Vnet1.service \
	  $(DBUS_IFACES)/org.qemuvnet.Vnet1.xml $(POLKIT_ACT)/org.qemuvnet.Vnet1.policy \
	  $(POLKIT_RUL)/50-qemu-vnet.rules $(UNITDIR)/vnetd.service
	rm -rf $(VENV)
	@echo "Uninstalled. Definitions in /etc/qemu-vnet and state in /var/lib/qemu-vnet were kept;"
	@echo "remove them by hand if you want them gone. Group 'vnet' was kept."

# The Debian package. The two bundled libraries (debian/bundled.txt) are fetched as wheels
# here, so that debian/rules itself never touches the network.
DEB_VERSION := $(shell dpkg-parsechangelog -l debian/changelog -S Version 2>/dev/null)
DEB_SRC     := build/deb/qemu-vnet-$(DEB_VERSION)
DEB         := build/qemu-vnet_$(DEB_VERSION)_all.deb

install-build-deps: check-root
	@missing=""; for p in $(DEB_BUILD); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "Installing Debian packages for building the package:$$missing"; \
	  apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $$missing; \
	fi

# Shell completion (bash, zsh, fish) and the manual page, generated from vnet-client's parser
# by shtab (fish: by vnet_client.cli.completion itself) and argparse-manpage (Debian:
# python3-shtab, python3-argparse-manpage).
shell-files:
	@for m in shtab build_manpages; do /usr/bin/python3 -c "import $$m" 2>/dev/null || { \
	  echo "make shell-files: python module $$m is missing (Debian packages python3-shtab python3-argparse-manpage)" >&2; exit 1; }; done
	@mkdir -p build/shell
	@PYTHONPATH=client:common /usr/bin/python3 -m vnet_client.cli.completion bash > build/shell/vnet-client.bash
	@PYTHONPATH=client:common /usr/bin/python3 -m vnet_client.cli.completion zsh > build/shell/_vnet-client
	@PYTHONPATH=client:common /usr/bin/python3 -m vnet_client.cli.completion fish > build/shell/vnet-client.fish
	@PYTHONPATH=client:common /usr/bin/argparse-manpage --module vnet_client.cli --function build_parser \
	  --project-name qemu-vnet --output build/shell/vnet-client.1
	@# its NAME line with the one-line summary whatis and apropos read
	@sed -i '/^\.SH NAME$$/{n;s/.*/vnet-client \\- manage qemu-vnet networks and attach QEMU VMs to them/}' \
	  build/shell/vnet-client.1

deb:
	@for p in dpkg-buildpackage dh lintian; do command -v $$p >/dev/null || { \
	  echo "make deb: $$p is not installed (Debian packages: $(DEB_BUILD); sudo make install-build-deps)" >&2; exit 1; }; done
	@rm -rf build/deb build/bundle build/wheels && mkdir -p build/wheels build/bundle $(DEB_SRC)
	@# the pinned wheels; offline, the same libraries from the project's virtualenv instead
	@if python3 -m pip download -q --retries 1 --timeout 20 --no-deps --only-binary=:all: --dest build/wheels \
	    -r debian/bundled.txt 2>build/pip.log; then \
	  for w in build/wheels/*.whl; do python3 -m zipfile -e $$w build/bundle/; done; \
	elif [ -x $(PY) ]; then \
	  echo "make deb: pip download failed ($$(tail -1 build/pip.log)); bundling from $(VENV)"; \
	  site=$$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])'); \
	  for n in $$(grep -v '^#' debian/bundled.txt | sed 's/==.*//; s/-/_/g'); do \
	    cp -r $$site/$$n $$site/$$n-*.dist-info build/bundle/ || exit 1; done; \
	else echo "make deb: cannot fetch the bundled libraries:" >&2; cat build/pip.log >&2; exit 1; fi
	@git ls-files -co --exclude-standard | grep -v '^build/' | tar -cf - -T - | tar -xf - -C $(DEB_SRC)
	@mkdir -p $(DEB_SRC)/build && cp -r build/bundle $(DEB_SRC)/build/
	cd $(DEB_SRC) && dpkg-buildpackage -b -us -uc -rnone >../build.log 2>&1 || \
	  { tail -30 ../build.log >&2; exit 1; }
	@mv build/deb/qemu-vnet_$(DEB_VERSION)_all.deb $(DEB)
	lintian --info --fail-on error,warning $(DEB)
	@echo "Built $(DEB)"

demo: check-root install install-test-deps
	@$(PY) -m vnetd.devhost demo --client $(BINDIR)/vnet-client --source $(CURDIR)

test-env: check-root install-deps install-test-deps install-files
	@$(PY) -c "import pytest, pytest_asyncio, hypothesis, pexpect, ruff, mypy" 2>/dev/null || \
	  $(PY) -m pip install -q --disable-pip-version-check $(PIP_TEST)

# the lint first: a style or type error fails the run in seconds, before the long tiers
test: test-env
	@$(MAKE) --no-print-directory lint
	$(PY) -m pytest -q -p no:cacheprovider tests

# the virtualenv's Python (the system's python3 lacks its packages); make test-env makes it
unit:
	@[ -x $(PY) ] || { echo "make unit: no $(PY): run 'sudo make test-env' first" >&2; exit 1; }
	$(PY) -m pytest -q -p no:cacheprovider tests/unit

# ruff, and mypy on vnetd, vnet_client and vnet_common ([tool.mypy] in pyproject.toml), from
# the virtualenv (make test-env installs both)
lint:
	$(PY) -m ruff check .
	$(PY) -m mypy

bench: test-env
	@for b in bench/[!_]*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

clean:
	rm -rf build *.egg-info .pytest_cache .mypy_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
