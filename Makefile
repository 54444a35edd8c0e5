# Two commands for a new user on a fresh Debian machine: `make demo` and `make test`.
# Each installs what it needs (Debian packages, then a venv in .venv) by itself.

VENV     ?= .venv
OUT      ?= out
PYTHON   ?= python3
SUDO     := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
BIN      := $(VENV)/bin
# `file` is for dib-lint (make lint), which tells Python scripts by it.
APT_PACKAGES := python3-venv qemu-system-x86 qemu-utils debootstrap squashfs-tools xorriso mtools \
	dosfstools fdisk gdisk grub-pc-bin grub-efi-amd64-bin grub-common ovmf busybox-static \
	openssh-server openssh-client e2fsprogs cpio zstd sudo kpartx rsync \
	file dnsmasq-base passt cloud-init

.PHONY: deps image demo test test-fast lint bench clean

deps: $(VENV)/.installed
	@missing=$$(for p in $(APT_PACKAGES); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q '^install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages:" $$missing; \
		$(SUDO) apt-get update -q && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -q $$missing; \
	fi

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV) || { $(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q python3-venv && $(PYTHON) -m venv $(VENV); }
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

image: deps
	$(SUDO) $(BIN)/appliance build -o $(OUT)

# Builds the default appliance with your SSH key (or a demo key made in $(OUT)), then boots it
# with its console on this terminal. Ctrl-C stops it.
demo: deps
	@mkdir -p $(OUT)
	@key=$$(ls $$HOME/.ssh/id_ed25519.pub $$HOME/.ssh/id_ecdsa.pub 2>/dev/null | head -n 1); \
	if [ -z "$$key" ]; then \
		[ -f $(OUT)/demo-key.pub ] || ssh-keygen -q -t ed25519 -N '' -C appliance-demo -f $(OUT)/demo-key; \
		key=$(OUT)/demo-key.pub; \
	fi; \
	echo "operator key: $$key"; \
	$(SUDO) $(BIN)/appliance build -o $(OUT) --authorized-key $$key && \
	$(SUDO) $(BIN)/appliance boot $(OUT)

# The linters first, so that CI (.ci/run is `make test`) fails on style as on a test.
test: deps lint
	$(SUDO) $(BIN)/pytest -v

test-fast: deps
	$(BIN)/pytest -v -m 'not slow'

# Figures, not a test: builds, boots, round-trips, guest starts against libvirt, fleet fan-out.
# BENCH_ARGS passes options, e.g. BENCH_ARGS='--skip builds,libvirt' (see bench/bench.py --help).
BENCH_ARGS ?=
bench: deps
	$(SUDO) $(BIN)/python bench/bench.py $(BENCH_ARGS)

# dib-lint (from diskimage-builder) checks elements/ as DIB checks its own; it runs the venv's
# python and flake8. It also checks LIB_DIR, DIB's shell library, for tabs and final newlines:
# we have none, so that check covers every file of elements/. It names each file it checks;
# only its errors are shown.
lint: deps
	$(BIN)/ruff check appliance tests bench ansible
	$(BIN)/ruff format --check appliance tests bench ansible
	$(BIN)/mypy
	@echo "dib-lint elements"
	@out=$$(PATH="$(abspath $(BIN)):$$PATH" ELEMENTS_DIR=elements LIB_DIR=elements $(BIN)/dib-lint 2>&1) \
		|| { printf '%s\n' "$$out" | grep -v '^\(Checking\|Parsing\|Skipping\) '; exit 1; }; \
		printf '%s\n' "$$out" | tail -n 1

clean:
	rm -rf $(VENV) $(OUT) .pytest_cache .mypy_cache .ruff_cache
