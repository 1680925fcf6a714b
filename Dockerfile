# syntax=docker/dockerfile:1
# meshlink as one static binary in a distroless image, running as non-root.
#   make image                      (docker or podman; stamps version and commit)
#   docker build --build-arg VERSION=$(git describe --tags --always) \
#                --build-arg COMMIT=$(git rev-parse HEAD) -t meshlink .
# The sidecar image holds the agent-only build (-tags agentonly: no
# coordinator, store, console or OIDC; a smaller binary and footprint):
#   make image-agent                (docker build --target agent ...)
# Running it: docs/deploy.md.

ARG GO_IMAGE=golang:1.26
FROM ${GO_IMAGE} AS build
# The toolchain the Makefile pins; the go command fetches it if the image's
# Go is another 1.26 release.
ARG GOTOOLCHAIN=go1.26.10
ENV GOTOOLCHAIN=${GOTOOLCHAIN} CGO_ENABLED=0 GOOS=linux
WORKDIR /src
# Modules first, so that the download layer is cached across source changes.
COPY go.mod go.sum ./
RUN go mod download
# .dockerignore keeps .git, bin/, state directories and keys out of this.
COPY . .
ARG VERSION=dev
ARG COMMIT=unknown
RUN go build -trimpath -ldflags="-s -w -X main.version=${VERSION} -X main.commit=${COMMIT}" -o /out/meshlink ./cmd/meshlink \
	&& /out/meshlink version \
	&& mkdir -p /out/state/coordinator /out/state/agent

FROM build AS build-agent
RUN go build -trimpath -tags agentonly -ldflags="-s -w -X main.version=${VERSION} -X main.commit=${COMMIT}" -o /out/meshlink-agent ./cmd/meshlink \
	&& /out/meshlink-agent version

# The sidecar image: the agent-only binary as /meshlink, its state on the
# volume, and the health check pointed at the agent's /healthz.
FROM gcr.io/distroless/static-debian12:nonroot AS agent
ARG VERSION=dev
LABEL org.opencontainers.image.title="meshlink-agent" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.source="https://github.com/meshlink/meshlink"
COPY --from=build-agent /out/meshlink-agent /meshlink
COPY --from=build --chown=65532:65532 /out/state /var/lib/meshlink
ENV MESHLINK_STATE=/var/lib/meshlink/agent \
    MESHLINK_HEALTH_LISTEN=127.0.0.1:9099 \
    MESHLINK_HEALTHCHECK_URL=http://127.0.0.1:9099/healthz
VOLUME ["/var/lib/meshlink"]
USER 65532:65532
HEALTHCHECK --interval=30s --timeout=6s --start-period=10s --retries=3 CMD ["/meshlink", "healthcheck"]
ENTRYPOINT ["/meshlink"]
CMD ["agent"]

# The full image (the default target): coordinator, agent and CLI.
# distroless/static: no shell or libc, but CA certificates (for the
# coordinator's OIDC provider), /etc/passwd and tzdata, which scratch lacks.
FROM gcr.io/distroless/static-debian12:nonroot
ARG VERSION=dev
LABEL org.opencontainers.image.title="meshlink" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.source="https://github.com/meshlink/meshlink"
COPY --from=build /out/meshlink /meshlink
# State lives on the volume, so a recreated container is the same node (an
# agent) or the same mesh (a coordinator): no name_in_use at the next start.
COPY --from=build --chown=65532:65532 /out/state /var/lib/meshlink
ENV MESHLINK_DATA=/var/lib/meshlink/coordinator \
    MESHLINK_STATE=/var/lib/meshlink/agent
VOLUME ["/var/lib/meshlink"]
USER 65532:65532
# The coordinator: HTTPS (API, console, embedded relay) and STUN on the
# same port number over UDP; Prometheus metrics with --metrics-listen
# 0.0.0.0:9090. It listens on loopback unless told --listen 0.0.0.0:8443.
EXPOSE 8443/tcp 8443/udp 9090/tcp
# The coordinator's /healthz by default; an agent container sets
# MESHLINK_HEALTHCHECK_URL=http://127.0.0.1:9099/healthz with
# MESHLINK_HEALTH_LISTEN=127.0.0.1:9099.
HEALTHCHECK --interval=30s --timeout=6s --start-period=10s --retries=3 CMD ["/meshlink", "healthcheck"]
ENTRYPOINT ["/meshlink"]
CMD ["--help"]
