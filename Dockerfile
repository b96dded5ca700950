# Step-Audio-EditX speech server, CUDA image.
#   docker build -t step-audio-server .
#   ./start_api_container.sh --gpu 0 --models /data/models
# torch 2.13.0's Linux wheel is a CUDA 13 build, and onnxruntime-gpu 1.31 needs CUDA 13 with
# cuDNN 9: the base image supplies exactly that runtime (torch also brings its own CUDA wheels;
# the two agree on the major version).
ARG CUDA_IMAGE=nvidia/cuda:13.0.1-cudnn-runtime-ubuntu22.04
FROM ${CUDA_IMAGE}

ARG DEBIAN_FRONTEND=noninteractive
# ffmpeg: the web UI's live playback (Gradio's streaming player encodes the pieces with the ffmpeg program)
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3.11 python3.11-venv libsndfile1 ffmpeg curl ca-certificates \
    && rm -rf /var/lib/apt/lists/*

ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True \
    OMP_NUM_THREADS=8 \
    MKL_NUM_THREADS=8 \
    HF_HUB_OFFLINE=1 \
    STEP_AUDIO_CACHE_DIR=/app/cache

RUN python3.11 -m venv /opt/venv && pip install --upgrade pip==25.3

WORKDIR /app
# Dependencies first (from the pinned list in pyproject.toml), so a code change reuses this layer.
COPY pyproject.toml /app/
RUN python -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; \
print('\n'.join(p['dependencies'] + p['optional-dependencies']['gpu'] + p['optional-dependencies']['quant']))" \
        > /tmp/requirements.txt \
    && pip install torch==2.13.0 \
    && pip install -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt

COPY . /app
RUN useradd --create-home --uid 1000 stepaudio \
    && mkdir -p /app/models /app/cache \
    && chown -R stepaudio:stepaudio /app/cache
USER 1000:1000

EXPOSE 8000
VOLUME ["/app/cache"]
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
    CMD ["curl", "-fsS", "--max-time", "4", "http://127.0.0.1:8000/healthz"]

ENTRYPOINT ["python", "api_server.py", "--model-path", "/app/models", "--model-source", "local", "--api-host", "0.0.0.0", "--api-port", "8000"]
