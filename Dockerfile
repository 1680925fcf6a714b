# syntax=docker/dockerfile:1
# Builds meshlink as one static binary and ships it alone.

FROM golang:1.26 AS build
WORKDIR /src
# Modules first, so that the download layer is cached across source changes.
COPY go.mod go.sum ./
RUN go mod download
COPY . .
RUN CGO_ENABLED=0 GOOS=linux go build -trimpath -ldflags='-s -w' -o /out/meshlink ./cmd/meshlink

# distroless/static: no shell or libc, but CA certificates (for the
# coordinator's OIDC provider), /etc/passwd and tzdata, which scratch lacks.
FROM gcr.io/distroless/static-debian12:nonroot
COPY --from=build /out/meshlink /meshlink
ENTRYPOINT ["/meshlink"]
