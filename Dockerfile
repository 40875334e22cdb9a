# syntax=docker/dockerfile:1
# CSM-1B RunPod serverless worker.
#   docker buildx build --secret id=HF_TOKEN,env=HF_TOKEN -t IMAGE .
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

# Only the fetcher, so that editing builder/deploy.py does not download the weights again.
# The token arrives as a BuildKit secret file (never an ARG/ENV, which would stay in the image
# history); HF_HOME points the hub's caches at /tmp so nothing but the model folder is kept.
COPY builder/__init__.py builder/fetch_weights.py builder/
RUN --mount=type=secret,id=HF_TOKEN \
    HF_TOKEN_PATH=/run/secrets/HF_TOKEN HF_HOME=/tmp/hf-home \
    python -m builder.fetch_weights --dest /models/csm-1b --dtype bfloat16 \
    && rm -rf /tmp/hf-home

# Everything the worker needs is in the image: a hub download at run time would be a bug.
ENV CSM_MODEL_DIR=/models/csm-1b \
    HF_HUB_OFFLINE=1

COPY csm/ csm/
COPY worker/ worker/
COPY handler.py ./

CMD ["python", "-u", "handler.py"]
