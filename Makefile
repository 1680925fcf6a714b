# meshlink build, test and CI entry points. `make help` lists them.

# The go command: the one on PATH, else the official tarball's place
# (/usr/local/go/bin, which a fresh shell or sudo's PATH may lack).
ifeq ($(origin GO),undefined)
GO := $(or $(shell command -v go 2>/dev/null),$(wildcard /usr/local/go/bin/go),go)
endif
# make install puts bin/meshlink in $(DESTDIR)$(PREFIX)/bin, the man pages,
# the shell completions and the systemd units under it.
PREFIX    ?= /usr/local
MANDIR    ?= $(PREFIX)/share/man
UNITDIR   ?= $(PREFIX)/lib/systemd/system
# make image: the tag, and the container engine (docker, else podman).
IMAGE     ?= meshlink:$(VERSION)
ENGINE    ?= $(shell command -v docker 2>/dev/null || command -v podman 2>/dev/null)
GOARCH_   := $(shell $(GO) env GOARCH 2>/dev/null || echo amd64)
BIN       ?= bin/meshlink
AGENT_BIN ?= bin/meshlink-agent
IMAGE_AGENT ?= meshlink-agent:$(VERSION)
# A count of executions (Nx), not a duration: with a duration, go1.26's fuzz
# coordinator sometimes fails a target with a bare "context deadline
# exceeded" as the time runs out (golang/go#75804, fixed in go1.27); a count
# has no deadline to race.
FUZZTIME  ?= 20000x
BENCHTIME ?= 3s
# make bench-control: how many nodes, joining how fast, extra coordinator
# flags, policy groups of POLICY nodes (0: no policy, every map holds every
# node), the window the reconnect storm is spread over (as agents do).
N          ?= 1000
RATE       ?= 200
COORD_ARGS ?=
POLICY     ?= 0
SPREAD     ?= 10s
# PPROF=DIR: save the coordinator's CPU profiles of the join phase and the
# idle window, its heap and goroutines, in DIR.
PPROF      ?=
PKGS      ?= ./...
# The packages `make race` covers: all but those that drive the gVisor
# netstack hard (agent, netstack, test/...), which -race slows past CI's
# budget on 2 cores.
RACE_PKGS ?= ./wire/... ./coordinator/... ./agent/proxy/... ./agent/bind/... ./agent/httpobs/... \
	./dns/... ./agent/localapi/... ./relay/... ./stun/... ./internal/...
# govulncheck, and the snapshot of the Go vulnerability database it checks
# against (both modules from the module proxy; see vuln).
VULN_VERSION   ?= v1.9.0
VULNDB_VERSION ?= v0.0.0-20261105234957-e22db6528018

# The Go toolchain that every target builds, tests and checks with. The go
# command fetches it from the module proxy when the machine's own Go is
# another version; `:=` overrides a GOTOOLCHAIN=local in the environment,
# and `make GOTOOLCHAIN=...` still overrides this. go1.26.10 has the fixes
# (crypto/x509, net/http, html/template) that go1.26.8 lacks, on the same
# Go release the netstack (gVisor) is built and tested with; go.mod keeps
# `go 1.26.8`, so a plain `go` on the machine's own Go still builds.
export GOTOOLCHAIN := go1.26.10

# bash with pipefail, so that a failing command on the left of a pipe fails
# the target (fuzz lists targets through one).
SHELL       := /bin/bash
.SHELLFLAGS := -o pipefail -ec

# What `meshlink version` reports: stamped from git by the build target
# (a binary built without them reads Go's VCS stamp, else says "dev").
VERSION ?= $(shell git describe --tags --always --dirty 2>/dev/null || echo dev)
COMMIT  ?= $(shell git rev-parse HEAD 2>/dev/null)
LDFLAGS  = -X main.version=$(VERSION) -X main.commit=$(COMMIT)

.PHONY: all help build build-agent image-agent install image tarball test test-wireguard race bench bench-control demo fuzz lint vuln clean docs

all: build

help:
	@echo "make build   bin/meshlink and bin/hello (static)"
	@echo "make build-agent  $(AGENT_BIN): the agent-only build (no coordinator; the sidecar image's)"
	@echo "make install bin/meshlink, man pages, completions, systemd units under $(DESTDIR)$(PREFIX)"
	@echo "make image   the container image $(IMAGE) with docker or podman"
	@echo "make image-agent  the sidecar image $(IMAGE_AGENT) (the agent-only build)"
	@echo "make tarball dist/meshlink-VERSION-linux-ARCH.tar.gz and its SHA256SUMS"
	@echo "make test    go vet + every test (the network-namespace tests need root)"
	@echo "make test-wireguard  the tests of the wireguard-go fork in third_party/"
	@echo "make race    go test -race on the packages that don't drive gVisor (RACE_PKGS)"
	@echo "make lint    gofmt, go vet, go mod tidy -diff"
	@echo "make fuzz    every fuzz target for FUZZTIME each (now $(FUZZTIME))"
	@echo "make vuln    govulncheck $(VULN_VERSION) against golang.org/x/vulndb $(VULNDB_VERSION)"
	@echo "make bench   mesh vs direct loopback benchmarks (BENCHTIME=$(BENCHTIME)), and as root"
	@echo "             two namespaced sites vs the bare veth path (BenchmarkNetns, about 90 s)"
	@echo "make bench-control N=10000 POLICY=100  the control plane under N simulated agents (RATE=$(RATE)/s; POLICY=K: tagged groups of K)"
	@echo "make demo    a coordinator and two agents on this machine"
	@echo "make docs    docs/cli.md and docs/man/*.1 from the CLI definitions"
	@echo "make clean   remove bin/ and the test cache"
	@echo "toolchain: GOTOOLCHAIN=$(GOTOOLCHAIN) (override with make GOTOOLCHAIN=...)"

build:
	CGO_ENABLED=0 $(GO) build -trimpath -ldflags "$(LDFLAGS)" -o $(BIN) ./cmd/meshlink
	CGO_ENABLED=0 $(GO) build -trimpath -o bin/hello ./examples/hello

# The agent-only binary (-tags agentonly): the same CLI for the agent's
# commands, without the coordinator, its stores (SQLite, PostgreSQL), the
# console and OIDC; coordinator commands say to use the full binary.
# Stripped (-s -w): symbols are not needed to run, and panics still name
# functions.
build-agent:
	CGO_ENABLED=0 $(GO) build -trimpath -tags agentonly -ldflags "-s -w $(LDFLAGS)" -o $(AGENT_BIN) ./cmd/meshlink

# Builds only when bin/meshlink is missing, so that `make build && sudo
# make install` does not build again as root. The man pages are the
# checked-in docs/man (make docs writes them); the completions come from
# the binary; the units' ExecStart is pointed at $(PREFIX)/bin.
install:
	@[ -x $(BIN) ] || $(MAKE) build
	install -d $(DESTDIR)$(PREFIX)/bin $(DESTDIR)$(MANDIR)/man1 $(DESTDIR)$(UNITDIR) \
		$(DESTDIR)$(PREFIX)/share/bash-completion/completions \
		$(DESTDIR)$(PREFIX)/share/zsh/site-functions \
		$(DESTDIR)$(PREFIX)/share/fish/vendor_completions.d
	install -m 0755 $(BIN) $(DESTDIR)$(PREFIX)/bin/meshlink
	install -m 0644 docs/man/*.1 $(DESTDIR)$(MANDIR)/man1/
	$(BIN) completion bash > $(DESTDIR)$(PREFIX)/share/bash-completion/completions/meshlink
	$(BIN) completion zsh > $(DESTDIR)$(PREFIX)/share/zsh/site-functions/_meshlink
	$(BIN) completion fish > $(DESTDIR)$(PREFIX)/share/fish/vendor_completions.d/meshlink.fish
	for u in deploy/systemd/*.service; do \
		sed 's|/usr/local/bin/meshlink|$(PREFIX)/bin/meshlink|' $$u > $(DESTDIR)$(UNITDIR)/$$(basename $$u); \
		chmod 0644 $(DESTDIR)$(UNITDIR)/$$(basename $$u); \
	done

# The container image (Dockerfile), stamped like make build. Needs a
# running docker daemon or podman.
image:
	@[ -n "$(ENGINE)" ] || { echo "make image: neither docker nor podman is installed" >&2; exit 1; }
	@$(ENGINE) info >/dev/null 2>&1 || { echo "make image: $(ENGINE) is installed but cannot reach its daemon (is it running?)" >&2; exit 1; }
	$(ENGINE) build --build-arg VERSION=$(VERSION) --build-arg COMMIT=$(COMMIT) --build-arg GOTOOLCHAIN=$(GOTOOLCHAIN) -t $(IMAGE) .

# The sidecar image: the Dockerfile's agent stage (the agent-only build).
image-agent:
	@[ -n "$(ENGINE)" ] || { echo "make image-agent: neither docker nor podman is installed" >&2; exit 1; }
	@$(ENGINE) info >/dev/null 2>&1 || { echo "make image-agent: $(ENGINE) is installed but cannot reach its daemon (is it running?)" >&2; exit 1; }
	$(ENGINE) build --target agent --build-arg VERSION=$(VERSION) --build-arg COMMIT=$(COMMIT) --build-arg GOTOOLCHAIN=$(GOTOOLCHAIN) -t $(IMAGE_AGENT) .

# A release tarball of what make install lays out under /usr/local, with
# SHA256SUMS beside it. Reproducible: sorted, root-owned, dated by the commit.
DIST    := dist/meshlink-$(VERSION)-linux-$(GOARCH_)
tarball: build
	rm -rf $(DIST) $(DIST).tar.gz
	$(MAKE) install DESTDIR=$(CURDIR)/$(DIST)/stage PREFIX=/usr/local
	mv $(DIST)/stage/usr/local/* $(DIST)/ && rm -rf $(DIST)/stage
	cp README.md $(DIST)/
	tar --sort=name --owner=0 --group=0 --numeric-owner \
		--mtime=@$$(git log -1 --format=%ct 2>/dev/null || echo 0) \
		-C dist -czf $(DIST).tar.gz $(notdir $(DIST))
	cd dist && sha256sum $(notdir $(DIST)).tar.gz > SHA256SUMS && cat SHA256SUMS

# -race is left out on purpose: on 2 cores with the gVisor netstack it makes
# the suite several times slower than CI's budget allows; `make race` runs
# it on the packages that don't drive the netstack.
test: test-wireguard
	$(GO) vet $(PKGS)
	$(GO) test -count=1 -timeout 20m $(PKGS)

# The tests of the wireguard-go fork (third_party/wireguard-go/PATCHES.md):
# a module of its own, so ./... at the top does not reach it.
test-wireguard:
	cd third_party/wireguard-go && $(GO) test -count=1 -timeout 10m ./...

# -race needs cgo (gcc), whatever CGO_ENABLED the environment has.
race:
	CGO_ENABLED=1 $(GO) test -race -count=1 -timeout 20m $(RACE_PKGS)

bench:
	$(GO) test -run '^$$' -bench . -benchtime $(BENCHTIME) ./test/bench/

# The control plane under N simulated agents (test/bench/control): the
# built coordinator as its own process, nodes joining at RATE/s, then a
# service change, a join, a burst of 20 changes and a reconnect storm, each
# timed until every stream has it. Prints figures; asserts no timing.
bench-control:
	nice $(GO) test -count=1 -timeout 40m -v -run '^TestBenchControl$$' ./test/bench/control/ \
		-args -control.n=$(N) -control.rate=$(RATE) -control.args="$(COORD_ARGS)" -control.policy=$(POLICY) -control.stormspread=$(SPREAD) -control.pprof="$(PPROF)"

# The CLI reference, generated from the urfave/cli definitions; a test in
# cmd/meshlink fails when the checked-in files differ from what this writes.
docs:
	$(GO) run ./cmd/meshlink gen-docs docs

demo: build
	./scripts/demo.sh

# Runs every Fuzz target of every package for FUZZTIME each. `go test -fuzz`
# takes one package and one target at a time, so the targets are listed
# first: -list prints a package's matching names, then its "ok  PKG" line.
fuzz:
	@set -e; \
	targets=$$($(GO) test -list '^Fuzz' $(PKGS) | \
		awk '/^Fuzz/ { names = names " " $$1; next } \
		     /^ok/   { n = split(names, a, " "); for (i = 1; i <= n; i++) print $$2, a[i]; names = "" }'); \
	if [ -z "$$targets" ]; then echo "no fuzz targets"; exit 0; fi; \
	echo "$$targets" | while read -r pkg target; do \
		echo "==> fuzz $$pkg $$target for $(FUZZTIME)"; \
		$(GO) test -run '^$$' -fuzz "^$$target\$$" -fuzztime $(FUZZTIME) $$pkg </dev/null || exit 1; \
	done

# gofmt is the pinned toolchain's (the one on PATH may be another version);
# `go mod tidy -diff` prints what tidy would change and fails if anything.
lint:
	@gofmt=$$($(GO) env GOROOT)/bin/gofmt; \
	unformatted=$$($$gofmt -l $$(find . -name '*.go' -not -path './vendor/*')); \
	if [ -n "$$unformatted" ]; then \
		echo "gofmt needed on:"; echo "$$unformatted"; exit 1; \
	fi
	$(GO) vet $(PKGS)
	$(GO) mod tidy -diff

# govulncheck at symbol level: it fails (exit 3) only on vulnerabilities
# that the code calls. The online database is out of reach from CI, so it
# reads a local one that scripts/vulndb lays out from golang.org/x/vulndb's
# OSV entries; raise VULNDB_VERSION to take newer advisories.
vuln:
	$(GO) mod download golang.org/x/vulndb@$(VULNDB_VERSION)
	rm -rf bin/vulndb
	$(GO) run ./scripts/vulndb \
		-osv "$$($(GO) env GOMODCACHE)/golang.org/x/vulndb@$(VULNDB_VERSION)/data/osv" -out bin/vulndb
	$(GO) run golang.org/x/vuln/cmd/govulncheck@$(VULN_VERSION) -db "file://$(CURDIR)/bin/vulndb" $(PKGS)

clean:
	rm -rf bin dist
	$(GO) clean -testcache
