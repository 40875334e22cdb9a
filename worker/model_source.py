"""Where the model comes from: the first of these places that holds the CSM files.

1. `CSM_MODEL_DIR`, when set: that folder and no other (downloaded into when missing and
   `HF_TOKEN` is set).
2. The image's folder (`CSM_BAKED_DIR`, /models/csm-1b): the full image bakes the whole model
   there, the slim image only Mimi and SilentCipher.
3. A cached copy of `CSM_MODEL_REPO` (sesame/csm-1b) in the Hugging Face hub-cache layout:
   RunPod's cached models (`<volume>/huggingface-cache/hub`, what an endpoint's "Model" setting
   provides), then the local Hugging Face cache. Resolved through `refs/main`, offline.
4. A model folder on the network volume (`<volume>/models/<repo>`), then in the local download
   cache: where step 5 puts it, so the next start finds it.
5. With `HF_TOKEN` set: a download at start into the volume (else the local cache), resumable,
   one download shared by the workers that start together.

The CSM files are the weights and `tokenizer.json`. The parts a CSM repo lacks (Mimi, from
kyutai's repo; SilentCipher's weights; the preset prompts) are taken from the image's folder:
the worker then reads a folder of links, the source's files plus the image's parts.
"""

from __future__ import annotations

import atexit
import logging
import os
import shutil
import tempfile
from collections.abc import MutableMapping
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock
from huggingface_hub import snapshot_download
from huggingface_hub.errors import LocalEntryNotFoundError
import torch

from builder.fetch_weights import (CODEC, CSM, CSM_REPO, WATERMARK, FetchError, failure_message,
                                   fetch, read_token)
from csm.checkpoint import INDEX_FILES, SINGLE_FILES, find_weight_files
from csm.codec import WEIGHTS_FILE as MIMI_FILE
from csm.config import load_config
from csm.engine import Engine
from csm.frame_step import CompileError, GraphCaptureError
from csm.presets import PRESETS
from csm.watermark import MODEL_FILES as WATERMARK_FILES

from .settings import Settings, StartupError

log = logging.getLogger("worker.model")

TOKENIZER = "tokenizer.json"
# The image's parts: folder name -> the files that make it present.
PARTS = {
    "mimi": (MIMI_FILE,),
    "silentcipher": WATERMARK_FILES,
    "prompts": tuple(Path(p.wav).name for p in PRESETS.values()),
}
OPTIONAL_PARTS = ("prompts",)  # without them the preset voices are skipped (worker/voices.py)
PART_NAMES = {"mimi": "Mimi", "silentcipher": "SilentCipher", "prompts": "the preset prompts"}
TINY_HINT = ("to try the worker with random weights (noise, not speech): `make tiny`, then "
             "CSM_MODEL_DIR=models/tiny-random (`make serve MODEL_DIR=models/tiny-random`)")


@dataclass(frozen=True)
class ModelSource:
    kind: str  # "CSM_MODEL_DIR", "image", "cached model", "network volume", "download cache"
    origin: Path  # the folder holding the CSM files
    folder: Path  # what the engine reads: origin, or a folder of links adding the image's parts
    borrowed: tuple[str, ...] = ()  # parts taken from the image
    downloaded: bool = False

    def describe(self) -> str:
        how = " (downloaded at start)" if self.downloaded else ""
        parts = (f"; {', '.join(PART_NAMES[p] for p in self.borrowed)} from the image"
                 if self.borrowed else "")
        return f"{self.kind} {self.origin}{how}{parts}"

    def remedy(self) -> str:
        if self.kind == "CSM_MODEL_DIR":
            return ("check the folder, or fetch a fresh one with `python -m builder.fetch_weights "
                    f"--dest {self.origin}`")
        if self.kind == "image":
            return "the image is broken: build it again"
        if self.kind == "cached model":
            return "check that CSM_MODEL_REPO names a CSM repo with the files of sesame/csm-1b"
        return f"delete {self.origin} to download it again (HF_TOKEN set)"


def csm_problems(folder: Path) -> list[str]:
    """What the folder lacks of the CSM repo's own files (nothing: it holds a model)."""
    if not folder.is_dir():
        return ["no such folder"]
    problems = []
    try:
        find_weight_files(folder)
    except FileNotFoundError as e:
        problems.append(str(e))
    if not (folder / TOKENIZER).is_file():
        problems.append(f"no {TOKENIZER}")
    return problems


def has_csm_files(folder: Path) -> bool:
    names = (TOKENIZER, "config.json", *SINGLE_FILES, *INDEX_FILES)
    return folder.is_dir() and any((folder / name).exists() for name in names)


def has_part(folder: Path, part: str) -> bool:
    return all((folder / part / name).is_file() for name in PARTS[part])


def cached_snapshot(cache: Path, repo: str) -> Path | None:
    """The snapshot `refs/main` points at, read from the cache alone: no network call."""
    if not cache.is_dir():
        return None
    try:
        return Path(snapshot_download(repo, cache_dir=cache, local_files_only=True))
    except (LocalEntryNotFoundError, OSError, ValueError) as e:
        log.debug("no cached %s in %s: %s", repo, cache, e)
        return None


def candidates(settings: Settings) -> list[tuple[str, Path | None, Path]]:
    """(kind, folder or None when absent, where it was looked for), in the documented order."""
    repo = settings.model_repo
    runpod_cache = settings.volume_dir / "huggingface-cache" / "hub"
    return [
        ("image", settings.baked_dir, settings.baked_dir),
        ("cached model", cached_snapshot(runpod_cache, repo), runpod_cache),
        ("cached model", cached_snapshot(settings.hf_hub_cache, repo), settings.hf_hub_cache),
        ("network volume", settings.volume_dir / "models" / repo, settings.volume_dir / "models" / repo),
        ("download cache", settings.download_cache / "models" / repo,
         settings.download_cache / "models" / repo),
    ]


def find_model(settings: Settings) -> ModelSource:
    """The model folder to load (downloaded first where that is the way), or StartupError."""
    token = read_token() is not None
    repo = settings.model_repo
    if settings.model_dir is not None:
        folder = settings.model_dir
        problems = csm_problems(folder)
        if not problems:
            return with_parts("CSM_MODEL_DIR", folder, settings)
        if token:
            return download("CSM_MODEL_DIR", folder, settings)
        raise StartupError(
            f"CSM_MODEL_DIR={folder} holds no CSM model ({'; '.join(problems)}). To download "
            f"it there: {gated(repo)}, then run again (about 10 GB free needed). Or {TINY_HINT}")
    looked = []
    for kind, folder, where in candidates(settings):
        problems = csm_problems(folder) if folder is not None else [f"no cached {repo}"]
        if not problems:
            return with_parts(kind, folder, settings)
        if folder is not None and has_csm_files(folder):
            log.warning("skipping the %s %s: %s", kind, folder, "; ".join(problems))
        looked.append(f"{kind} {where} ({'; '.join(problems)})")
    if token:
        volume = settings.volume_dir.is_dir()
        dest = (settings.volume_dir if volume else settings.download_cache) / "models" / repo
        return download("network volume" if volume else "download cache", dest, settings)
    raise StartupError(
        f"no CSM model found; looked in: {', '.join(looked)}. Give the endpoint a cached model "
        f"(its Model setting: {repo}), or set CSM_MODEL_DIR to a model folder, or download it "
        f"at start: {gated(repo)}. Or {TINY_HINT}")


def gated(repo: str) -> str:
    return (f"{repo} is gated: accept its license at https://huggingface.co/{repo}, create a "
            "read token and set HF_TOKEN")


def with_parts(kind: str, origin: Path, settings: Settings, downloaded: bool = False) -> ModelSource:
    """The source, with the parts it lacks taken from the image (or StartupError)."""
    image = settings.baked_dir
    borrowed, missing = [], []
    for part in PARTS:
        if has_part(origin, part):
            continue
        if origin != image and has_part(image, part):
            borrowed.append(part)
        elif part not in OPTIONAL_PARTS:
            missing.append(PART_NAMES[part])
    if missing:
        raise StartupError(
            f"the {kind} {origin} has the CSM weights but not {' or '.join(missing)}, and the "
            f"image's folder {image} lacks them too: fetch them with `python -m "
            f"builder.fetch_weights --csm-weights skip --dest {image}` (public, no token needed)")
    folder = linked_view(origin, image, borrowed) if borrowed else origin
    source = ModelSource(kind, origin, folder, tuple(borrowed), downloaded)
    log.info("model: %s", source.describe())
    return source


def linked_view(origin: Path, image: Path, borrowed: list[str]) -> Path:
    """A folder of links, the origin's files plus the image's parts: the engine reads one
    folder, and a cached model's snapshot is read-only."""
    view = Path(tempfile.mkdtemp(prefix="csm-model-"))
    atexit.register(shutil.rmtree, view, True)  # links only: the files stay where they are
    for entry in origin.iterdir():
        if entry.name not in borrowed:
            (view / entry.name).symlink_to(entry.absolute())
    for part in borrowed:
        (view / part).symlink_to((image / part).absolute())
    return view


def download(kind: str, dest: Path, settings: Settings) -> ModelSource:
    """Fetch the CSM files (and the parts the image lacks) into dest, then use it."""
    parts = (CSM, *(p for p, name in ((CODEC, "mimi"), (WATERMARK, "silentcipher"))
                    if not has_part(settings.baked_dir, name)))
    repo = settings.model_repo
    try:
        dest.mkdir(parents=True, exist_ok=True)
        # Workers that start together on one volume share one download: the others wait here.
        with FileLock(dest / ".fetch.lock"):
            if csm_problems(dest):
                log.info("downloading %s into %s (%s)", repo, dest, ", ".join(parts))
                fetch(dest, "bfloat16", None, repo, check_sizes=repo == CSM_REPO, parts=parts)
    except (FetchError, OSError) as e:
        raise StartupError(f"downloading {repo} into {dest} failed: {failure_message(e)}") from e
    return with_parts(kind, dest, settings, downloaded=True)


def compile_backend(settings: Settings,
                    environ: MutableMapping[str, str] = os.environ) -> str | None:
    """torch.compile's backend under CSM_COMPILE=1, with inductor's cache on the network
    volume when there is one and TORCHINDUCTOR_CACHE_DIR is unset: a cold compile takes
    minutes, loading the compiled kernels seconds, and /tmp goes with the worker."""
    if not settings.compile:
        return None
    if "TORCHINDUCTOR_CACHE_DIR" not in environ and settings.volume_dir.is_dir():
        environ["TORCHINDUCTOR_CACHE_DIR"] = str(settings.volume_dir / "torchinductor")
    log.info("compiling the frame step, caching in %s",
             environ.get("TORCHINDUCTOR_CACHE_DIR", "/tmp (lost with this worker)"))
    return "inductor"


def load_engine(source: ModelSource, settings: Settings) -> Engine:
    """The engine on the source's folder; a broken folder becomes one line that says what to do."""
    if settings.cuda_graphs is False:
        # moshi's own switch for Mimi's graphs, read at each call: off for this process.
        os.environ["NO_CUDA_GRAPH"] = "1"
    if settings.decoder_int8:
        log.info("the depth decoder's weights in int8 (CSM_DECODER_INT8=1)")
    try:
        return Engine.load(source.folder, device=settings.device,
                           max_batch=settings.max_concurrency,
                           stall_timeout_s=settings.stall_timeout_s,
                           use_graphs=settings.cuda_graphs,
                           compile_backend=compile_backend(settings),
                           decoder_int8=settings.decoder_int8)
    except (GraphCaptureError, CompileError) as e:
        raise StartupError(str(e)) from e
    except torch.cuda.OutOfMemoryError as e:  # the GPU's size, not the folder, is at fault
        raise StartupError(out_of_memory(source, settings, e)) from e
    except Exception as e:  # noqa: BLE001 - any other failure means the folder can't serve
        log.debug("loading the model failed", exc_info=True)
        raise StartupError(f"the model from the {source.describe()} could not be loaded "
                           f"({type(e).__name__}: {e}); {source.remedy()}") from e


def out_of_memory(source: ModelSource, settings: Settings, error: BaseException) -> str:
    """What to change when the GPU can't hold the model and the rows it is built for."""
    try:
        per_row = load_config(source.folder).cache_bytes_per_row(element_size=2)  # bf16
        rows = f", each holding {per_row / 2**20:.1f} MiB of keys and values"
    except ValueError:  # an unreadable config.json: say what is known
        rows = ""
    return (f"the GPU ran out of memory while the worker started "
            f"({str(error).splitlines()[0]}); its frame loop is built for "
            f"CSM_MAX_CONCURRENCY={settings.max_concurrency} jobs at once{rows}: lower "
            "CSM_MAX_CONCURRENCY, or use a GPU with more free memory")
