# trainjob: the GPU training image.
#
#   docker build -t trainjob:0.1.0 .
#   docker run --rm --gpus all --read-only --tmpfs /tmp --shm-size 2g \
#       -e AWS_ACCESS_KEY_ID -e AWS_SECRET_ACCESS_KEY \
#       trainjob:0.1.0 train --data s3://bucket/caltech-101.zip --output s3://bucket/runs/r1
#
# Base: the official TensorFlow GPU image (Ubuntu 22.04, Python 3.11 as the system Python,
# TensorFlow 2.21.0 with CUDA, root). Pin it by digest for reproducible builds:
#   BASE_IMAGE=tensorflow/tensorflow:2.21.0-gpu@sha256:<digest>
# Digest: not recorded yet. It was written where no registry is reachable; resolve it with
#   docker buildx imagetools inspect tensorflow/tensorflow:2.21.0-gpu
# and put it here and in the default below. CI builds on a CPU stand-in instead
# (scripts/build_base_image.sh: Debian bookworm, Python 3.11, tensorflow==2.21.0).
ARG BASE_IMAGE=tensorflow/tensorflow:2.21.0-gpu

# ---- build: the trainjob wheel ------------------------------------------------------
FROM ${BASE_IMAGE} AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY src ./src
RUN python3 -m pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

# ---- runtime ------------------------------------------------------------------------
FROM ${BASE_IMAGE} AS runtime
SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# tini is PID 1: it forwards SIGTERM/SIGINT to trainjob (Python as PID 1 would ignore a
# SIGTERM that arrives before the job installs its handler) and reaps zombies.
# DL3008 (pin apt versions) is ignored: the same file builds on Ubuntu 22.04 (the GPU base)
# and on Debian bookworm (the CI stand-in), whose version strings for tini differ
# (0.19.0-1 vs 0.19.0-1+b3); tini is one small, stable binary.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends tini \
    && rm -rf /var/lib/apt/lists/*

# Install the wheel (with the mlflow extra: MLflow's client) into the base's Python without
# touching its TensorFlow: every package
# the base already has is a constraint (pip fails rather than up- or downgrading one), and
# the check after the install proves no package of the base changed.
COPY --from=build /wheels /tmp/wheels
RUN python3 -m pip list --format=freeze 2>/dev/null | sort > /tmp/base-packages.txt \
    && grep -E '^[A-Za-z0-9._-]+==[0-9]+(\.[0-9]+)*((a|b|rc)[0-9]+)?(\.post[0-9]+)?(\.dev[0-9]+)?(\+[A-Za-z0-9.]+)?$' \
        /tmp/base-packages.txt > /tmp/base-constraints.txt \
    && { grep -q '^tensorflow==' /tmp/base-constraints.txt \
        || { echo "BASE_IMAGE has no tensorflow in its python3" >&2; exit 1; }; } \
    && PIP_BREAK_SYSTEM_PACKAGES=1 PIP_ROOT_USER_ACTION=ignore python3 -m pip install \
        --no-cache-dir --constraint /tmp/base-constraints.txt "$(ls /tmp/wheels/*.whl)[mlflow]" \
    && python3 -m pip list --format=freeze 2>/dev/null | sort > /tmp/after-packages.txt \
    && changed=$(comm -23 /tmp/base-packages.txt /tmp/after-packages.txt) \
    && if [ -n "$changed" ]; then echo "the install changed the base's packages: $changed" >&2; exit 1; fi \
    && trainjob --version \
    && rm -rf /tmp/wheels /tmp/*.txt

COPY entrypoint/entrypoint.sh /usr/local/bin/trainjob-entrypoint

# A non-root user (uid 1000). Everything the job writes lives under TRAINJOB_HOME, in /tmp,
# so the container runs with a read-only root filesystem and one writable mount:
#   docker run --read-only --tmpfs /tmp ...    (Kubernetes: emptyDir volumes, k8s/base/job.yaml)
RUN chmod 0755 /usr/local/bin/trainjob-entrypoint \
    && groupadd --gid 1000 trainjob \
    && useradd --uid 1000 --gid 1000 --home-dir /home/trainjob --create-home \
        --shell /usr/sbin/nologin trainjob
WORKDIR /home/trainjob
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    TF_CPP_MIN_LOG_LEVEL=2 \
    TRAINJOB_HOME=/tmp/trainjob \
    KERAS_HOME=/tmp/trainjob/keras \
    MPLCONFIGDIR=/tmp/trainjob/matplotlib \
    HOME=/tmp/trainjob/home \
    TINI_SUBREAPER=1
USER 1000:1000

# Labels last: a new revision rebuilds only this layer.
ARG VERSION=0.1.0
ARG REVISION=unknown
# What the job tags an MLflow run with (trainjob.image); k8s/base sets the pod's image.
ENV TRAINJOB_IMAGE=trainjob:${VERSION}+${REVISION}
LABEL org.opencontainers.image.title="trainjob" \
      org.opencontainers.image.description="Batch training job: image-classification data from S3-compatible storage, Keras ResNet50, artifacts back to S3" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.source="https://github.com/trainjob/trainjob" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.base.name="tensorflow/tensorflow:2.21.0-gpu"

ENTRYPOINT ["/usr/bin/tini", "--", "/usr/local/bin/trainjob-entrypoint"]
CMD ["--help"]
