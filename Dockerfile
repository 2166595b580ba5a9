# syntax=docker/dockerfile:1
# Quotient's images, one multi-stage file (docs/deploy.md):
#   cpu         embedded backend, ONNX Runtime's CPU build: no torch, no Java   make image
#   gpu         onnxruntime-gpu with its CUDA/cuDNN wheels, and torch           make image TARGET=gpu
#   torchserve  the TorchServe 0.12 backend: Java 17, TorchServe, torch         make image TARGET=torchserve
# Python packages are installed with --no-index from a wheelhouse that `make wheelhouse` fills on
# the build host (build/wheelhouse/<target>), so a build needs no network for pip and installs
# exactly the versions of requirements/constraints.txt. BASE is any Debian 12 image with python3.11
# and its venv module: a public one in production, or one made offline (`make base-image`).
ARG BASE=docker.io/library/python:3.11-slim-bookworm

# ------------------------------------------------------------------ common runtime layer
FROM ${BASE} AS runtime
ARG VERSION=0.1.0
ARG REVISION=unknown
ARG SOURCE=https://example.invalid/quotient
LABEL org.opencontainers.image.title="quotient" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.source="${SOURCE}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.vendor="Quotient"
ENV LANG=C.UTF-8 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PATH=/opt/quotient/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
# What every shipped image shares; each target adds its own ENV, then USER and HEALTHCHECK.
ENV QUOTIENT_HOST=0.0.0.0 \
    QUOTIENT_METRICS_HOST=0.0.0.0 \
    QUOTIENT_MODEL_STORE=/opt/quotient/models
WORKDIR /tmp
EXPOSE 50051 9464
STOPSIGNAL SIGTERM
ENTRYPOINT ["quotient-server"]
# A fixed, unprivileged user (Kubernetes runAsUser 10001); no home, no login shell.
RUN groupadd --system --gid 10001 quotient \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin quotient

# ------------------------------------------------------------------ build stages (not shipped)
FROM runtime AS build
ARG TARGET=cpu
COPY requirements/ /src/requirements/
COPY build/wheelhouse/${TARGET}/ /wheels/
# One virtual environment; the wheels stay in this stage, pip and setuptools are removed.
RUN python3 -m venv /opt/quotient \
 && /opt/quotient/bin/pip install --no-cache-dir --no-index --find-links /wheels \
      -c /src/requirements/constraints.txt -r /src/requirements/${TARGET}.txt \
      quotient-server quotient-client
RUN /opt/quotient/bin/python -m pip uninstall -y -q pip setuptools \
 && find /opt/quotient/lib -depth -type d -name tests -path '*/site-packages/*' -exec rm -rf {} + \
 && rm -rf /opt/quotient/lib/python3.11/site-packages/rdkit-stubs
# Compiled once here: the root filesystem is read-only at run time.
# torch's test helpers include Python 3.12-only syntax; they never run here.
RUN python3 -m compileall -q -j 0 -x 'torch/testing/_internal' /opt/quotient/lib
COPY model_store/models/ /opt/quotient/models/
COPY LICENSE README.md /opt/quotient/share/doc/
# Checkpoints are training state, not served; the TorchScript exports only serve --engine torch.
RUN find /opt/quotient/models -name checkpoint.pt -delete \
 && if [ "${TARGET}" = cpu ]; then find /opt/quotient/models -name '*.pt' -delete; fi

FROM build AS build-cpu
FROM build AS build-gpu
FROM build AS build-torchserve
COPY model_store/archives/ /opt/quotient/archives/

# ------------------------------------------------------------------ shipped images
FROM runtime AS cpu
LABEL org.opencontainers.image.description="Invariant embeddings of images and molecules over gRPC (embedded backend, CPU)"
COPY --from=build-cpu /opt/quotient /opt/quotient
ENV QUOTIENT_DEVICE=cpu
USER 10001:10001
HEALTHCHECK --interval=10s --timeout=4s --start-period=60s --retries=3 CMD ["quotient-probe"]

FROM runtime AS gpu
LABEL org.opencontainers.image.description="Invariant embeddings of images and molecules over gRPC (embedded backend, CUDA)"
COPY --from=build-gpu /opt/quotient /opt/quotient
# The NVIDIA container toolkit mounts the driver; CUDA and cuDNN come from the nvidia-* wheels.
ENV QUOTIENT_DEVICE=cuda \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
USER 10001:10001
HEALTHCHECK --interval=10s --timeout=4s --start-period=120s --retries=3 CMD ["quotient-probe"]

FROM runtime AS torchserve
LABEL org.opencontainers.image.description="Invariant embeddings of images and molecules over gRPC (TorchServe 0.12 backend)"
# TorchServe's frontend is Java; the JRE comes from Debian (this stage needs a Debian mirror).
# Unpinned on purpose: Debian 12 ships security fixes as new versions of the same package.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends openjdk-17-jre-headless \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build-torchserve /opt/quotient /opt/quotient
ENV QUOTIENT_BACKEND=torchserve \
    QUOTIENT_ARCHIVE_DIR=/opt/quotient/archives \
    QUOTIENT_TORCHSERVE_WORKDIR=/tmp/torchserve
USER 10001:10001
HEALTHCHECK --interval=10s --timeout=4s --start-period=180s --retries=3 CMD ["quotient-probe"]

# `docker build .` without --target builds the cpu image.
FROM cpu
