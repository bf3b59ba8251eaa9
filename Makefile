# The two commands a newcomer needs:  make demo  and  make test.
# Both create .venv when it is missing, install the project into it, then run.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp

# Programs the test suite drives, as COMMAND:DEBIAN-PACKAGE (each test that
# needs one also checks for it and says which package is missing).  A package
# is installed, as root, only when its command is absent: judging by command
# rather than by package keeps a machine whose Node.js came from elsewhere
# (bundling npm) from being offered a conflicting Debian npm.  `make sysdeps`
# on its own does just this.  An absolute path instead of a command names a
# data file a package ships (LibreCAD's DXF parts library, which dxf2svg's
# tests read as drawings made by a real CAD program).
SYS_TOOLS := node:nodejs npm:npm clang:clang wasm-ld:lld \
	/usr/share/librecad/library:librecad-data \
	/usr/lib/python3/dist-packages/cryptography:python3-cryptography \
	sfdisk:fdisk mcopy:mtools debugfs:e2fsprogs mkfs.fat:dosfstools

.PHONY: demo test test-quick test-boot lint sysdeps bench clean wasm

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	@touch $(STAMP)

sysdeps:
	@missing=""; for t in $(SYS_TOOLS); do \
	  command -v $${t%%:*} >/dev/null 2>&1 || test -e "$${t%%:*}" || \
	    missing="$$missing $${t#*:}"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing system packages:$$missing"; \
	  if [ "$$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi; \
	  $$SUDO apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends $$missing; \
	fi

demo: $(STAMP)
	$(VENV)/bin/optogate demo $(ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

test: $(STAMP) sysdeps isolator-node lint
	$(PY) -m pytest -q -p no:cacheprovider -m "not boot"

# Everyday subset: the sans-I/O cores only, seconds.
test-quick: $(STAMP)
	$(PY) -m pytest -q -m unit

# The emulated Raspberry Pi boot (slow; its own target, also run by CI).
# Its own programs, installed the same way: mmdebstrap builds an arm64 Debian
# root under qemu-user (which needs the kernel's binfmt_misc; without it the
# test skips and says so), qemu-system boots the images.
BOOT_TOOLS := mmdebstrap:mmdebstrap arch-test:arch-test \
	qemu-aarch64-static:qemu-user-static qemu-system-aarch64:qemu-system-arm

test-boot: $(STAMP) sysdeps
	@$(MAKE) --no-print-directory sysdeps SYS_TOOLS="$(BOOT_TOOLS)"
	$(PY) -m pytest -q -p no:cacheprovider -m boot tests || test $$? -eq 5

# MicroPython's WebAssembly port, so the isolator's tests run its filter core
# under the board's interpreter too (versions pinned by package-lock.json).
ISOLATOR_NODE := firmware/isolator/node/node_modules/.package-lock.json

.PHONY: isolator-node
isolator-node: $(ISOLATOR_NODE)

$(ISOLATOR_NODE): firmware/isolator/node/package.json firmware/isolator/node/package-lock.json
	cd firmware/isolator/node && npm ci --no-audit --no-fund
	@touch $@

# The reference wasm service, compiled from C with clang's wasm32 target
# (reproducible: same clang, same bytes; the tests rebuild and compare).
wasm: sysdeps
	$(MAKE) -C provisioning/reference/polyline-simplify

bench: $(STAMP)
	@for b in bench/*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis
