# kvtierd container image.
#
#   docker build -t kvtierd .                                  # CPU: host + disk tiers
#   docker build -t kvtierd:gpu --build-arg VARIANT=gpu .      # CUDA 12 runtime base + the [gpu-cu12] extra (HBM tier)
#
# Run it next to the inference containers, sharing the socket directory (the host
# tier's memory comes over the socket) and, for the HBM tier's CUDA IPC, the IPC
# namespace; see README.md, "Run in a container":
#   docker run -d --name kvtierd --ipc=shareable \
#     -v kvtierd-run:/run/kvtierd -v kvtierd-state:/var/lib/kvtierd -p 127.0.0.1:9477:9477 kvtierd
#
# The wheel is built once in a slim stage (kvtierd is pure Python; its CUDA kernels ship as
# source, kvtierd/native/*.cu, compiled at run time), so neither runtime image carries pip's
# build tooling or the source tree.

ARG VARIANT=cpu
ARG PYTHON_IMAGE=python:3.11-slim-bookworm
ARG CUDA_IMAGE=nvidia/cuda:12.6.3-runtime-ubuntu24.04

FROM ${PYTHON_IMAGE} AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY kvtierd ./kvtierd
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

# ---- runtime bases: each ends with a venv at /opt/kvtierd and PIP_EXTRAS set
FROM ${PYTHON_IMAGE} AS runtime-cpu
ENV PIP_EXTRAS=""
RUN python -m venv /opt/kvtierd

FROM ${CUDA_IMAGE} AS runtime-gpu
ENV PIP_EXTRAS="[gpu-cu12]"
# Versions come from the pinned base image's release; pinning apt versions would break on its updates.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv \
 && rm -rf /var/lib/apt/lists/* \
 && python3 -m venv /opt/kvtierd

# ---- the image
# A stage name chosen by build arg, not an image: hadolint cannot see that it is pinned above.
# hadolint ignore=DL3006
FROM runtime-${VARIANT}
ARG VARIANT
LABEL org.opencontainers.image.title="kvtierd" \
      org.opencontainers.image.description="Tiered KV-cache store for LLM inference workers (${VARIANT})"
ENV PATH=/opt/kvtierd/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    KVTIERD_SOCKET=/run/kvtierd/kvtierd.sock

COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir "$(ls /wheels/kvtierd-*.whl)${PIP_EXTRAS}" \
 && rm -rf /wheels

# A fixed uid/gid so the host can grant access (access.allowed_gids, socket group).
RUN groupadd --system --gid 10001 kvtierd \
 && useradd --system --uid 10001 --gid kvtierd --no-create-home --home-dir /var/lib/kvtierd \
      --shell /usr/sbin/nologin kvtierd \
 && install -d -o kvtierd -g kvtierd -m 0755 /run/kvtierd \
 && install -d -o kvtierd -g kvtierd -m 0750 /var/lib/kvtierd \
 && install -d -m 0755 /etc/kvtierd
COPY configs/kvtierd.toml /etc/kvtierd/kvtierd.toml

USER 10001:10001
VOLUME ["/var/lib/kvtierd", "/run/kvtierd"]
# Prometheus. The daemon's default is 127.0.0.1:9477; in a container it must listen on
# all interfaces to be reachable, so the command below sets 0.0.0.0:9477.
EXPOSE 9477
HEALTHCHECK --interval=30s --timeout=5s --start-period=5m --retries=3 \
  CMD ["python", "-c", "import urllib.request,sys; urllib.request.urlopen('http://127.0.0.1:9477/metrics', timeout=4); sys.exit(0)"]
# SIGTERM drains leases and flushes the host tier (disk.flush_on_shutdown): give it time
# with `docker stop -t 60`.
STOPSIGNAL SIGTERM
ENTRYPOINT ["kvtierd"]
CMD ["serve", "--config", "/etc/kvtierd/kvtierd.toml", "--socket", "/run/kvtierd/kvtierd.sock", \
     "--state-dir", "/var/lib/kvtierd", "--metrics-address", "0.0.0.0:9477"]
