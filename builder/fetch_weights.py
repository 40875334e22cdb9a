"""Fetch everything CSM-1B needs into one model folder, the layout `csm.engine.Engine.load` reads.

    python -m builder.fetch_weights --dest DIR [--dtype float32|bfloat16] [--revision REV]
                                    [--repo OWNER/NAME] [--no-verify-sizes]
                                    [--csm-weights fetch|skip|auto]

The token comes from the environment: HF_TOKEN, or else the file named by HF_TOKEN_PATH (how the
Docker build hands over its `HF_TOKEN` build secret). It is never printed. Only the CSM repo is
gated: `--csm-weights skip` fetches the public parts (Mimi, SilentCipher) alone, as the slim
image does, and `auto` fetches the CSM files only when a token is there.
The free disk space is checked before anything is downloaded; an interrupted run resumes.
Every failure ends with one line on stderr that says what to do, and exit status 1.
"""

from __future__ import annotations

import argparse
import errno
import json
import math
import os
import shutil
import struct
import sys
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

import torch
from huggingface_hub import hf_hub_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    GatedRepoError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
    XetError,
)
from safetensors import SafetensorError, safe_open

CSM_REPO = "sesame/csm-1b"
# moshi.models.loaders.DEFAULT_REPO / MIMI_NAME (tests/test_builder.py checks they still agree).
MIMI_REPO = "kyutai/moshiko-pytorch-bf16"
MIMI_FILE = "tokenizer-e351c8d8-checkpoint125.safetensors"
WATERMARK_REPO = "sony/silentcipher"
WATERMARK_DIR = "44_1_khz/73999_iteration"
MODEL_FILE = "model.safetensors"
# The parts of a model folder: the gated CSM repo's files, and the two public ones.
CSM, CODEC, WATERMARK = "csm", "codec", "watermark"
PARTS = (CSM, CODEC, WATERMARK)


@dataclass(frozen=True)
class Remote:
    """One file to fetch: where it lives on the hub, where it goes in the model folder."""

    repo: str
    path: str
    dest: str
    size: int | None = None  # bytes as published, where known (checked after the download)
    approx: int = 0  # a size for the free-space check where the exact one is not known
    part: str = CSM

    @property
    def expected_bytes(self) -> int:
        return self.size if self.size is not None else self.approx


def remotes(csm_repo: str = CSM_REPO, parts: Collection[str] = PARTS) -> list[Remote]:
    """The files of a model folder. Sizes are those of the published files (see csm-facts.md)."""
    watermark = [
        Remote(WATERMARK_REPO, f"{WATERMARK_DIR}/{name}", f"silentcipher/{name}", size,
               part=WATERMARK)
        for name, size in (
            ("enc_c.ckpt", 184_765),
            ("dec_c.ckpt", 2_008_794),
            ("dec_m_0.ckpt", 9_554_818),
            ("hparams.yaml", None),
        )
    ]
    files = [
        Remote(csm_repo, "config.json", "config.json"),
        Remote(csm_repo, MODEL_FILE, MODEL_FILE, 6_211_186_784),
        Remote(csm_repo, "tokenizer.json", "tokenizer.json", approx=17_300_000),
        Remote(csm_repo, "prompts/conversational_a.wav", "prompts/conversational_a.wav", 2_646_044),
        Remote(csm_repo, "prompts/conversational_b.wav", "prompts/conversational_b.wav", 2_646_044),
        Remote(MIMI_REPO, MIMI_FILE, f"mimi/{MIMI_FILE}", approx=385_000_000, part=CODEC),
        *watermark,
    ]
    return [r for r in files if r.part in parts]


class FetchError(Exception):
    """A failure with a one-line message that tells the user what to do."""


def read_token() -> str | None:
    """HF_TOKEN, or the contents of the file HF_TOKEN_PATH names (a BuildKit secret mount)."""
    token = os.environ.get("HF_TOKEN", "").strip()
    if token:
        return token
    path = os.environ.get("HF_TOKEN_PATH")
    if path and Path(path).is_file():
        return Path(path).read_text().strip() or None
    return None


def explain(exc: BaseException, remote: Remote, revision: str | None) -> str:
    """Turn a hub or I/O exception into an instruction. Subclasses come before their bases."""
    where = f"{remote.repo}/{remote.path}"
    page = f"https://huggingface.co/{remote.repo}"
    if isinstance(exc, GatedRepoError):
        return (f"{remote.repo} is gated and this token has not been granted access: open {page}, "
                "accept the license with the account that owns HF_TOKEN, then run again")
    if isinstance(exc, RevisionNotFoundError):
        return f"revision {revision!r} does not exist in {remote.repo}: check --revision"
    if isinstance(exc, RepositoryNotFoundError):
        return (f"{remote.repo} was not found, or HF_TOKEN is invalid or lacks read access: "
                f"check the repo name and the token (https://huggingface.co/settings/tokens)")
    if isinstance(exc, LocalEntryNotFoundError):
        return (f"could not reach the Hugging Face hub for {where} (network error): check the "
                "connection, proxy or HF_ENDPOINT, then run again; finished files are kept")
    if isinstance(exc, EntryNotFoundError):
        return (f"{where} does not exist at revision {revision or 'main'}: a fine-tuned repo must "
                "hold the same files as sesame/csm-1b")
    if isinstance(exc, HfHubHTTPError):
        status = exc.response.status_code if exc.response is not None else "?"
        if status in (401, 403):
            return f"the hub refused HF_TOKEN for {where} (HTTP {status}): create a new read token"
        return f"the hub answered HTTP {status} for {where}: try again later"
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        return disk_full_message(exc)
    # What is left: requests' ConnectionError, Timeout, SSLError, ProxyError (OSErrors) and XetError.
    return f"downloading {where} failed ({type(exc).__name__}: {exc}): check the network and run again"


def disk_full_message(exc: OSError) -> str:
    where = exc.filename or "the destination"
    return (f"no space left on the device while writing {where}: the model folder needs about "
            "10 GB free while it is built (6.6 GB download + 3.1 GB bfloat16 copy), "
            "then 3.5 GB (bfloat16) or 6.6 GB (float32); free some space or choose another --dest")


def download(remote: Remote, staging: Path, revision: str | None, token: str | None) -> Path:
    try:
        return Path(hf_hub_download(repo_id=remote.repo, filename=remote.path, revision=revision,
                                    token=token, local_dir=staging / remote.repo))
    except (OSError, XetError) as exc:
        raise FetchError(explain(exc, remote, revision)) from exc


def verify(path: Path, remote: Remote, check_size: bool) -> None:
    """Exists, non-empty, the published size where known, and safetensors headers parse."""
    if not path.is_file() or path.stat().st_size == 0:
        raise FetchError(f"{remote.dest} is missing or empty after the download: run again")
    size = path.stat().st_size
    if check_size and remote.size is not None and size != remote.size:
        raise FetchError(
            f"{remote.dest} is {size:,} bytes but {remote.repo}/{remote.path} is published as "
            f"{remote.size:,} bytes: delete it and run again, or pass --no-verify-sizes for a fine-tune")
    if path.suffix == ".safetensors":
        try:
            with safe_open(path, framework="pt"):
                pass  # opening parses the header
        except SafetensorError as exc:
            raise FetchError(f"{remote.dest} is not a readable safetensors file ({exc}): run again") from exc


# Bytes per element of the safetensors dtypes a checkpoint may hold.
ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
# float32 and float64 become bfloat16; float16 and integers are left as they are.
TO_BF16 = {"F32", "F64"}


def convert_to_bf16(path: Path) -> None:
    """Rewrite a safetensors file with bfloat16 weights, same key names, one tensor in memory at a time.

    safetensors' own writer takes the whole converted state dict at once (3.1 GB for csm-1b, on
    top of the tensor being read), so the file is written by hand: 8-byte header length, JSON
    header, then the tensors back to back.
    """
    partial = path.with_name(path.name + ".partial")
    with safe_open(path, framework="pt") as src:
        keys = sorted(src.keys())
        header: dict[str, object] = {}
        offset = 0
        for key in keys:
            tensor_slice = src.get_slice(key)
            dtype = tensor_slice.get_dtype()
            if dtype not in ITEMSIZE:
                raise FetchError(f"{path.name}: tensor {key} has dtype {dtype}, which the converter "
                                 "does not handle: fetch with --dtype float32")
            dtype = "BF16" if dtype in TO_BF16 else dtype
            shape = tensor_slice.get_shape()
            end = offset + math.prod(shape) * ITEMSIZE[dtype]
            header[key] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, end]}
            offset = end
        metadata = src.metadata()
        if metadata:
            header["__metadata__"] = metadata
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)  # keeps the data 8-byte aligned, as safetensors does
        with open(partial, "wb") as out:
            out.write(struct.pack("<Q", len(encoded)))
            out.write(encoded)
            for key in keys:
                tensor = src.get_tensor(key)
                if header[key]["dtype"] == "BF16":
                    tensor = tensor.to(torch.bfloat16)
                out.write(tensor.contiguous().reshape(-1).view(torch.uint8).numpy())
                del tensor
    os.replace(partial, path)


def is_bf16(path: Path) -> bool:
    with safe_open(path, framework="pt") as f:
        return all(f.get_slice(k).get_dtype() not in TO_BF16 for k in f.keys())


def bytes_needed(files: list[Remote], staging: Path, dtype: str) -> int:
    """Disk the fetch still needs: what is left to download, plus the bfloat16 copy that
    exists beside the float32 file while it is converted."""
    have = sum(p.stat().st_size for p in staging.rglob("*") if p.is_file()) if staging.exists() else 0
    left = max(0, sum(r.expected_bytes for r in files) - have)
    converting = sum(r.expected_bytes // 2 for r in files if r.dest == MODEL_FILE and dtype == "bfloat16")
    return left + converting


def check_free_space(dest: Path, files: list[Remote], staging: Path, dtype: str) -> None:
    needed = bytes_needed(files, staging, dtype)
    free = shutil.disk_usage(dest).free
    if free < needed:
        raise FetchError(
            f"not enough free disk for the model folder in {dest}: about {needed / 1e9:.1f} GB "
            f"more are needed and {free / 1e9:.1f} GB are free; free some space or choose another "
            "--dest (nothing was downloaded)")


def fetch(dest: Path, dtype: str, revision: str | None, csm_repo: str, check_sizes: bool,
          parts: Collection[str] = PARTS) -> list[Path]:
    token = read_token()
    if token is None and CSM in parts:
        raise FetchError(
            f"no Hugging Face token: {csm_repo} is gated. Accept its license at "
            f"https://huggingface.co/{csm_repo}, create a read token, and set HF_TOKEN "
            "(for `docker buildx build`: --secret id=HF_TOKEN,env=HF_TOKEN)")
    files = remotes(csm_repo, parts)
    # Downloads land in a staging folder inside dest (same filesystem, so moving is a rename);
    # an interrupted run leaves it behind and the next run resumes from it.
    staging = dest / ".download"
    check_free_space(dest, files, staging, dtype)
    for number, remote in enumerate(files, 1):
        size = f" ({remote.size / 1e6:,.1f} MB)" if remote.size else ""
        print(f"[{number}/{len(files)}] {remote.repo}/{remote.path}{size}", flush=True)
        local = download(remote, staging, revision if remote.repo == csm_repo else None, token)
        verify(local, remote, check_sizes)
    placed = []
    for remote in files:
        target = dest / remote.dest
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(staging / remote.repo / remote.path, target)
        placed.append(target)
    shutil.rmtree(staging)

    model = dest / MODEL_FILE
    if CSM in parts and dtype == "bfloat16" and not is_bf16(model):
        print(f"converting {MODEL_FILE} to bfloat16 ...", flush=True)
        convert_to_bf16(model)
        if not is_bf16(model):
            raise FetchError(f"{MODEL_FILE} still holds float32 tensors after conversion: run again")
    return placed


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m builder.fetch_weights", description=__doc__.split("\n")[0])
    parser.add_argument("--dest", type=Path, required=True, help="model folder to fill (created if missing)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                        help="store the CSM weights in this dtype (bfloat16 halves the size)")
    parser.add_argument("--revision", default=None, help="branch, tag or commit of --repo (default: main)")
    parser.add_argument("--repo", default=CSM_REPO, help="the CSM repo, e.g. a fine-tune with the same files")
    parser.add_argument("--no-verify-sizes", action="store_true",
                        help="skip the published-size checks (fine-tunes); existence and headers are still checked")
    parser.add_argument("--csm-weights", choices=("fetch", "skip", "auto"), default="fetch",
                        help="the gated CSM files: fetch them (needs the token), skip them (Mimi and "
                             "SilentCipher only: the slim image), or auto: fetch them when a token is set")
    return parser.parse_args(argv)


def chosen_parts(csm_weights: str) -> tuple[str, ...]:
    if csm_weights == "skip" or (csm_weights == "auto" and read_token() is None):
        print("without the gated CSM files (--csm-weights "
              f"{csm_weights}{', no HF_TOKEN' if csm_weights == 'auto' else ''}): Mimi and "
              "SilentCipher only; the worker finds the CSM weights when it starts", flush=True)
        return (CODEC, WATERMARK)
    return PARTS


def failure_message(exc: FetchError | OSError) -> str:
    """One line for any failure of `fetch`: hub errors were explained in download(), what is
    left comes from moving or converting files."""
    if isinstance(exc, FetchError):
        return str(exc)
    return disk_full_message(exc) if exc.errno == errno.ENOSPC else f"{exc.strerror}: {exc.filename}"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    parts = chosen_parts(args.csm_weights)
    try:
        args.dest.mkdir(parents=True, exist_ok=True)
        placed = fetch(args.dest, args.dtype, args.revision, args.repo, not args.no_verify_sizes, parts)
    except (FetchError, OSError) as exc:
        print(f"fetch_weights: error: {failure_message(exc)}", file=sys.stderr)
        return 1
    total = sum(p.stat().st_size for p in placed)
    for path in placed:
        print(f"  {path.stat().st_size:>14,}  {path.relative_to(args.dest)}")
    what = f"weights in {args.dtype}" if CSM in parts else "Mimi and SilentCipher, no CSM weights"
    print(f"model folder ready: {args.dest} ({total / 1e9:.2f} GB, {what})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
