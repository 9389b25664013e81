# mdcluster build and test entry points. `make test` is what CI runs; it installs
# whatever the tests need when it is missing, so a fresh machine needs nothing else.

GO ?= go
export PATH := /usr/local/go/bin:$(PATH)

# Debian packages the tests use: mdadm (format interop checks); QEMU and a
# static busybox for the VM tests in vmtest/ (they fetch the kernel themselves);
# libnbd-bin (nbdinfo, nbdcopy) and fio as independent NBD clients;
# e2fsprogs (mke2fs, e2fsck) for the VM cluster test's file system checks.
APT_PACKAGES ?= mdadm qemu-system-x86 busybox-static libnbd-bin fio e2fsprogs

.PHONY: all build test demo deps vet race sim fuzz bench clean vmtest

all: build

# build compiles every package and puts the two programs in bin/.
build:
	$(GO) build ./...
	$(GO) build -o bin/mdclusterd ./cmd/mdclusterd
	$(GO) build -o bin/mdadm-go ./cmd/mdadm-go

# deps installs the system packages the tests need, only when one is missing,
# and makes sure apt has package lists (the VM test looks up the kernel package).
deps:
	@missing=""; for p in $(APT_PACKAGES); do \
	  dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	elif ! ls /var/lib/apt/lists/*_Packages >/dev/null 2>&1; then \
	  apt-get update -qq; \
	fi

vet:
	$(GO) vet ./...

race:
	$(GO) test -race -count=1 -timeout 20m ./...

# sim runs the deterministic cluster simulation at full strength (2,000
# seeds; under -race above it runs fewer). SIM_SEEDS=N runs more.
sim:
	$(GO) test -count=1 ./internal/sim/

# fuzz runs every fuzz target briefly; the seed corpora already run in `race`.
FUZZTIME ?= 10s
fuzz:
	@./scripts/fuzz-all.sh $(FUZZTIME)

test: deps vet race sim fuzz

# vmtest runs only the VM tests (real kernel md and mdadm under QEMU); `race` runs them too.
vmtest: deps
	$(GO) test -count=1 -timeout 20m -v ./vmtest/

# demo runs the product's demo (cmd/mdcluster-demo): three mdclusterd on
# 127.0.0.1, a clustered raid1 over files, NBD clients, a node killed, a
# member replaced; it exits non-zero if a check fails. Needs root, nbdcopy, fio.
demo: deps
	$(GO) build -o bin/ ./cmd/mdclusterd ./cmd/mdadm-go ./cmd/mdcluster-demo
	bin/mdcluster-demo -bin bin

bench:
	$(GO) test -run '^$$' -bench . -benchmem ./dlm/

clean:
	$(GO) clean -testcache
	rm -rf bin
