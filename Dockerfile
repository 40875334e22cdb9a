# syntax=docker/dockerfile:1
# CSM-1B RunPod serverless worker, in two variants of this one file (build argument CSM_WEIGHTS):
#   full image, the gated CSM weights baked in (the default whenever the token is given):
#     docker buildx build --secret id=HF_TOKEN,env=HF_TOKEN --build-arg CSM_WEIGHTS=fetch -t IMAGE .
#   slim image, Mimi and SilentCipher but no CSM weights (no token needed; the worker takes the
#   weights from a RunPod cached model, a network volume or a download at start):
#     docker buildx build --build-arg CSM_WEIGHTS=skip -t IMAGE-slim .
#
# Base: Debian slim with Python 3.11, not a CUDA image. torch 2.9.1's PyPI wheels bring their
# own CUDA 12.8 user-space libraries (the nvidia-* wheels: cuBLAS, cuDNN, NCCL, ...) and the
# host's container runtime injects the driver, so a CUDA runtime base would only add ~3 GB of
# libraries torch never loads. The bookworm tag is explicit because the plain 3.11-slim tag now
# follows newer Debian releases, which would invalidate the gcc pin below.
FROM python:3.11-slim-bookworm

# gcc and libc headers: Triton (torch.compile on the GPU) compiles a small C launcher on first
# use. libc6-dev must match the image's libc6 exactly; if this step fails with "version not
# found", the base image is older than Debian's archive: build again with --pull.
RUN apt-get update \
    && apt-get install -y --no-install-recommends \
        gcc=4:12.2.0-3 \
        "libc6-dev=$(dpkg-query -W -f='${Version}' libc6)" \
    && rm -rf /var/lib/apt/lists/*

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore
WORKDIR /app

# Layers from the least to the most often changed: dependencies, weights, code.
COPY requirements.txt requirements-nodeps.txt ./
RUN pip install --no-cache-dir -r requirements.txt \
    && pip install --no-cache-dir --no-deps -r requirements-nodeps.txt

# The variant: fetch (full: the CSM weights too, needs the HF_TOKEN secret), skip (slim), or
# auto (the default): fetch when the HF_TOKEN secret is given, else skip. A build without
# secrets, such as the RunPod Hub's, makes the slim image; `make image` and CI ask for fetch.
ARG CSM_WEIGHTS=auto

# Only the fetcher, so that editing builder/deploy.py does not download the weights again.
# The token arrives as a BuildKit secret file (never an ARG/ENV, which would stay in the image
# history); HF_HOME points the hub's caches at /tmp so nothing but the model folder is kept.
COPY builder/__init__.py builder/fetch_weights.py builder/
RUN --mount=type=secret,id=HF_TOKEN \
    HF_TOKEN_PATH=/run/secrets/HF_TOKEN HF_HOME=/tmp/hf-home \
    python -m builder.fetch_weights --dest /models/csm-1b --dtype bfloat16 \
        --csm-weights "${CSM_WEIGHTS}" \
    && rm -rf /tmp/hf-home

# No CSM_MODEL_DIR: the worker searches its model sources, and /models/csm-1b is the first
# (worker/model_source.py). With the slim image it finds the weights in a RunPod cached model or
# on a network volume, or downloads them at start when HF_TOKEN is set; Mimi and SilentCipher
# always come from /models/csm-1b.

COPY csm/ csm/
COPY worker/ worker/
COPY handler.py ./

CMD ["python", "-u", "handler.py"]
