# aio-gateway container image.
#
#   docker build -t aio-gateway .
#   docker run --rm -p 8080:8080 --read-only --tmpfs /tmp \
#     -e APIINONE_API_KEY -v ./config.yaml:/etc/aio-gateway/config.yaml:ro aio-gateway
#
# The config is read from /etc/aio-gateway/config.yaml (mount it read-only); it must listen on
# 0.0.0.0:8080 and reference the upstream key as ${APIINONE_API_KEY}, which comes from the
# environment. The root filesystem may be read-only: the gateway writes nothing to disk, except
# that `--workers N` (N > 1) keeps prometheus-client's per-worker metric files under /tmp, so /tmp
# must then be writable (a tmpfs, or an emptyDir in Kubernetes).

# ---- builder: build the gateway's wheel and install it, with its dependencies, into a venv ----
FROM python:3.11-slim AS builder

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1

WORKDIR /src
COPY pyproject.toml README.md ./
COPY gateway ./gateway

# Dependencies must come as binary wheels (uvloop, httptools, orjson and pyyaml all publish
# them), so no compiler is needed here either, and none can reach the final image.
RUN python -m pip wheel --no-deps --wheel-dir /wheels . \
    && python -m venv /opt/venv \
    && /opt/venv/bin/pip install --only-binary=:all: /wheels/*.whl \
    && /opt/venv/bin/pip uninstall --yes pip setuptools

# ---- runtime: the venv on a clean slim image, as a fixed non-root user ----
FROM python:3.11-slim

LABEL org.opencontainers.image.title="aio-gateway" \
      org.opencontainers.image.description="Organisation-wide gateway for the API in One API" \
      org.opencontainers.image.licenses="MIT"

RUN groupadd --system --gid 10001 aio \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin aio

COPY --from=builder /opt/venv /opt/venv

# PROMETHEUS_MULTIPROC_DIR is deliberately not set here: when it is set, prometheus-client keeps
# metrics in files in that directory even with one worker, and the directory (on an empty /tmp)
# would not exist. With --workers N > 1 the gateway creates a fresh one under /tmp by itself, or
# (re)creates the one named by PROMETHEUS_MULTIPROC_DIR if you set it, e.g. to /tmp/metrics.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1

USER 10001:10001
EXPOSE 8080

# curl is not in the slim image; the standard library does the same job.
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; r = urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=4); sys.exit(0 if r.status == 200 else 1)"]

ENTRYPOINT ["aio-gateway"]
CMD ["serve", "--config", "/etc/aio-gateway/config.yaml"]
