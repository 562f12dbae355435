# syntax=docker/dockerfile:1
# A small multi-stage build. `kiln plan --example` shows how kiln resolves it: global ARGs,
# a stage built on another stage, COPY --from, a stage the target does not need (skipped).
ARG ALPINE_VERSION=3.20
ARG GREETING=hello

FROM alpine:${ALPINE_VERSION} AS build
ARG GREETING
ARG TARGETARCH
RUN --mount=type=cache,target=/var/cache/apk apk add ca-certificates
WORKDIR /out
RUN echo "${GREETING} from kiln on ${TARGETARCH}" > greeting.txt

FROM build AS test
RUN test -s /out/greeting.txt

FROM scratch AS final
COPY --from=build /etc/ssl/certs/ca-certificates.crt /etc/ssl/certs/
COPY --from=build /out/greeting.txt /greeting.txt
ENV GREETING_FILE=/greeting.txt
LABEL org.opencontainers.image.title="kiln example"
CMD ["/greeting.txt"]
