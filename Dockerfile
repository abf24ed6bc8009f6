# bnfold: the Open Inference Protocol V2 server (FastAPI + uvicorn + ONNX Runtime), folding BatchNorm on load.
#
#   docker build -t bnfold .                                  CPU image (onnxruntime), python:3.11-slim-bookworm
#   docker build --build-arg GPU=1 -t bnfold:gpu .            GPU image (onnxruntime-gpu, CUDA EP, CUDA/cuDNN wheels)
#   docker build --network host --build-arg BASE_IMAGE=bnfold-base:local -t bnfold .   (no registry reachable)
#
# The GPU choice is a build argument, not a target: the classic builder (Docker 20.10 without buildx, and
# docker-compose v1) builds every stage before the target, so a GPU stage would cost every CPU build GBs.
#
# Both stages use the same BASE_IMAGE: the venv's `python` is a link to the base image's interpreter
# (/usr/local/bin/python3 in the official images, /usr/bin/python3 in Debian's), so it must exist, at the
# same path, where the venv runs.
ARG BASE_IMAGE=python:3.11-slim-bookworm

# ---------------------------------------------------------------------------------------------- builder
FROM ${BASE_IMAGE} AS builder
# GPU: empty (CPU image) or 1 (GPU image). GPU_EXTRAS: the onnxruntime-gpu extras that bring CUDA and cuDNN
# as pip wheels (nvidia-*); set it empty when the host-side CUDA libraries come from elsewhere.
ARG GPU=
ARG ONNXRUNTIME_GPU="onnxruntime-gpu>=1.18"
ARG GPU_EXTRAS=cuda,cudnn
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore \
    PATH=/opt/venv/bin:$PATH
RUN python3 -m venv /opt/venv
WORKDIR /src
# The dependencies first, from pyproject.toml alone: a code change does not download them again.
COPY pyproject.toml ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt
COPY README.md ./
COPY converter ./converter
COPY service ./service
# A wheel of the project, installed without its build tree. COPY keeps the checkout's file modes, and the
# bundled model may be 0600 there: make the sources readable by anyone before they go into the wheel.
RUN chmod -R a+rX converter service \
    && pip wheel --no-deps --wheel-dir /tmp/wheels . \
    && pip install --no-deps /tmp/wheels/bnfold-*.whl \
    && pip check \
    && rm -rf /tmp/wheels /src/build
# GPU: both wheels install the same `onnxruntime` package, so remove the CPU one first and force the GPU one
# in without dependencies (they are the CPU wheel's, already present); then only its CUDA/cuDNN extras.
RUN set -eu; \
    case "$GPU" in \
      "") ;; \
      1) pip uninstall -y onnxruntime; \
         pip install --no-deps --force-reinstall "$ONNXRUNTIME_GPU"; \
         if [ -n "$GPU_EXTRAS" ]; then \
           version=$(python -c "import importlib.metadata as m; print(m.version('onnxruntime-gpu'))"); \
           pip install "onnxruntime-gpu[$GPU_EXTRAS]==$version"; \
         fi; \
         python -c "import onnxruntime as o; p = o.get_available_providers(); print(p); assert 'CUDAExecutionProvider' in p"; \
         if pip show -q onnxruntime 2>/dev/null; then echo "the CPU onnxruntime came back" >&2; exit 1; fi ;; \
      *) echo "GPU must be empty (CPU image) or 1 (GPU image), not '$GPU'" >&2; exit 1 ;; \
    esac

# ---------------------------------------------------------------------------------------------- runtime
FROM ${BASE_IMAGE}
ARG GPU=
LABEL org.opencontainers.image.title="bnfold" \
      org.opencontainers.image.description="Fold BatchNorm into ONNX weights and serve over the Open Inference Protocol V2" \
      org.opencontainers.image.licenses="Apache-2.0"
# A fixed uid/gid so that a mounted repository can be made readable for it (10001:10001).
RUN groupadd --system --gid 10001 bnfold \
    && useradd --system --uid 10001 --gid bnfold --home-dir /nonexistent --no-create-home \
       --shell /usr/sbin/nologin bnfold \
    && mkdir -p /models
COPY --from=builder /opt/venv /opt/venv
COPY scripts/docker-entrypoint /usr/local/bin/bnfold-entrypoint
# GPU: the CUDA/cuDNN libraries of the nvidia-* wheels go on the loader's path (onnxruntime's CUDA provider
# has no RUNPATH to them).
RUN chmod 0755 /usr/local/bin/bnfold-entrypoint \
    && if [ -n "$GPU" ]; then \
         find /opt/venv -type d -path '*/site-packages/nvidia/*/lib' | sort > /etc/ld.so.conf.d/bnfold-nvidia.conf; \
         cat /etc/ld.so.conf.d/bnfold-nvidia.conf; \
         ldconfig; \
       fi
# Every setting is a BNFOLD_ variable (docs/serving.md, "Settings"); these are the container's defaults.
# The GPU image asks for CUDA first (the default `fallback` policy serves on CPU when no GPU is visible).
# ORT_DISABLE_TELEMETRY: ONNX Runtime's telemetry off (a server sends nothing home; on a read-only root it would
# also warn that it cannot store its device id).
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    ORT_DISABLE_TELEMETRY=1 \
    BNFOLD_HOST=0.0.0.0 \
    BNFOLD_PORT=8000 \
    BNFOLD_GRPC_PORT=8001 \
    BNFOLD_PROVIDERS=${GPU:+cuda,}cpu
USER 10001:10001
# 8000: REST; 8001: V2 gRPC (inference.GRPCInferenceService, grpc.health.v1)
EXPOSE 8000 8001
# Ready (not merely live): a model serves and no SIGTERM arrived. Python's urllib: the image carries no curl.
HEALTHCHECK --interval=10s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request as u; h = os.environ.get('BNFOLD_HOST') or '127.0.0.1'; h = {'0.0.0.0': '127.0.0.1', '::': '::1'}.get(h, h); h = '[' + h + ']' if ':' in h else h; u.urlopen('http://%s:%s/v2/health/ready' % (h, os.environ.get('BNFOLD_PORT') or '8000'), timeout=4)"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["bnfold-entrypoint"]
CMD ["bnfold", "serve"]
