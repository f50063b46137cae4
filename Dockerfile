# Kmesh's image: kmesh-daemon (entrypoint), kmeshctl and kmesh-cni, static,
# on an empty base. The bpf2go output is committed, so the build needs only
# the Go toolchain. Without docker, `make image` builds the same image as an
# OCI layout (integration/cmd/kmesh-image).
#
#   docker build --build-arg VERSION=$(git describe --tags --always) -t ghcr.io/kmesh-dev/kmesh:dev .
FROM golang:1.26 AS build
ARG VERSION=dev
WORKDIR /src
COPY go.mod go.sum ./
RUN go mod download
COPY . .
RUN CGO_ENABLED=0 GOOS=linux go build -trimpath -ldflags "-X main.version=${VERSION}" \
        -o /out/ ./cmd/kmesh-daemon ./cmd/kmeshctl ./cmd/kmesh-cni

FROM scratch
ARG VERSION=dev
LABEL org.opencontainers.image.source="https://github.com/kmesh-dev/kmesh" \
      org.opencontainers.image.title="kmesh" \
      org.opencontainers.image.description="Kmesh node proxy for Istio ambient (runs in ztunnel's DaemonSet): kmesh-daemon, kmeshctl, kmesh-cni" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="${VERSION}"
COPY --from=build /out/kmesh-daemon /out/kmeshctl /out/kmesh-cni /usr/local/bin/
ENV PATH=/usr/local/bin
# istioctl's ztunnel DaemonSet passes args `proxy ztunnel`, which kmesh-daemon accepts.
ENTRYPOINT ["/usr/local/bin/kmesh-daemon"]
