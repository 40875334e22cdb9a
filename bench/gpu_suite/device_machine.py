"""What the lent GPU machine offers the suite, so that its one chance to run is not spent on a
missing module.

That machine has Python 3.12, torch 2.11 and a fixed image of packages, and no registry: what
its image lacks must be carried as wheels (`bench/gpu_suite/wheels.sh`), and PyAV's wheel (FFmpeg
bundled) is too large to carry beside the others. Every runtime requirement of the project is
in one of the two sets below (a test holds requirements.txt to it), and CI runs the CPU mode
with the imports of ABSENT blocked, so a part that came to need one of them fails here first.
"""

from __future__ import annotations

# requirements.txt's distributions the machine has: in its image, or among the carried wheels.
IN_IMAGE = frozenset({"torch", "numpy", "scipy", "pyyaml", "filelock"})
CARRIED = frozenset({"moshi", "silentcipher", "librosa", "pyaml", "soxr", "soundfile",
                     "pydantic", "tokenizers", "huggingface_hub", "safetensors"})
# requirements-dev.txt's, carried for the `transformers` part (the speed reference).
CARRIED_FOR_COMPARISON = frozenset({"transformers"})
# Distribution -> its import name, for the requirements the machine lacks: the queue handler
# (runpod), the HTTP mode (fastapi, uvicorn, websockets), the FFmpeg formats (av) and the
# result bucket (boto3, imported only by a worker that has one).
ABSENT = {"runpod": "runpod", "fastapi": "fastapi", "uvicorn": "uvicorn",
          "websockets": "websockets", "av": "av", "boto3": "boto3"}
