"""The Dockerfile, checked without a Docker engine: lint, sources, layer order, secrets, entry point."""

from __future__ import annotations

import fnmatch
import json
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    joined, parts = [], []
    for line in DOCKERFILE.read_text().splitlines():
        if line.lstrip().startswith("#") or not line.strip():
            continue
        parts.append(line.rstrip().removesuffix("\\"))
        if not line.rstrip().endswith("\\"):
            joined.append(" ".join(parts))
            parts = []
    return [(text.split(None, 1)[0].upper(), text.split(None, 1)[1].strip()) for text in joined]


def index_of(kind: str, needle: str) -> int:
    return next(i for i, (k, args) in enumerate(instructions()) if k == kind and needle in args)


def test_hadolint_is_silent() -> None:
    hadolint = shutil.which("hadolint")
    assert hadolint, "hadolint is not installed (pip install -r requirements-dev.txt)"
    result = subprocess.run([hadolint, str(DOCKERFILE)], capture_output=True, text=True, cwd=ROOT)
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


def dockerignore_patterns() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def test_every_copy_source_exists_and_reaches_the_build_context() -> None:
    ignored = dockerignore_patterns()
    copies = [args for kind, args in instructions() if kind == "COPY"]
    assert copies
    for args in copies:
        words = [w for w in shlex.split(args) if not w.startswith("--")]
        for source in words[:-1]:
            assert (ROOT / source).exists(), f"COPY source {source} is missing from the repository"
            top = source.rstrip("/").split("/")[0]
            assert not any(fnmatch.fnmatch(top, p) for p in ignored), f"{source} is in .dockerignore"


def test_cmd_runs_the_handler_unbuffered_in_exec_form() -> None:
    cmds = [args for kind, args in instructions() if kind == "CMD"]
    assert len(cmds) == 1
    assert json.loads(cmds[0]) == ["python", "-u", "handler.py"]


def test_no_build_argument_or_environment_variable_holds_a_token() -> None:
    for kind, args in instructions():
        if kind in ("ARG", "ENV"):
            names = re.findall(r"([A-Za-z_][A-Za-z0-9_]*)=", args) or [args.split()[0]]
            for name in names:
                assert not re.search(r"TOKEN|SECRET|PASSWORD|KEY", name.upper()), f"{kind} {name}"


def test_weights_are_fetched_with_the_secret_mount_in_bfloat16() -> None:
    runs = [args for kind, args in instructions() if kind == "RUN" and "builder.fetch_weights" in args]
    assert len(runs) == 1
    step = runs[0]
    assert "--mount=type=secret,id=HF_TOKEN" in step
    assert "HF_TOKEN_PATH=/run/secrets/HF_TOKEN" in step
    assert "--dest /models/csm-1b" in step and "--dtype bfloat16" in step


def test_the_image_pins_no_model_folder_and_keeps_the_hub_reachable() -> None:
    """Both variants let the worker search its model sources (worker/model_source.py), the
    image's own folder first; the slim one may download at start (HF_TOKEN)."""
    from worker.settings import DEFAULT_MODEL_DIR

    envs = " ".join(args for kind, args in instructions() if kind == "ENV")
    assert "CSM_MODEL_DIR" not in envs and "HF_HUB_OFFLINE" not in envs
    assert f"--dest {DEFAULT_MODEL_DIR} " in fetch_step()


def fetch_step() -> str:
    return next(args for kind, args in instructions() if kind == "RUN" and "builder.fetch_weights" in args)


def fetch_arguments(variant: str) -> list[str]:
    """The RUN step's fetch_weights arguments, with the build argument given this value."""
    command = fetch_step().split("python -m builder.fetch_weights", 1)[1].split("&&")[0]
    return shlex.split(command.replace("${CSM_WEIGHTS}", variant))


def test_the_variant_is_a_build_argument_defaulting_to_auto() -> None:
    assert ("ARG", "CSM_WEIGHTS=auto") in instructions()
    assert index_of("ARG", "CSM_WEIGHTS") < index_of("RUN", "builder.fetch_weights")


@pytest.mark.parametrize("variant,token,parts", [
    ("fetch", True, ("csm", "codec", "watermark")),  # the full image
    ("auto", True, ("csm", "codec", "watermark")),  # a plain build with the secret: full
    ("skip", True, ("codec", "watermark")),  # the slim image
    ("auto", False, ("codec", "watermark")),  # a build without secrets (the RunPod Hub): slim
])
def test_each_variant_fetches_its_parts(variant: str, token: bool, parts: tuple[str, ...],
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    from builder import fetch_weights as fw

    monkeypatch.delenv("HF_TOKEN_PATH", raising=False)
    if token:
        monkeypatch.setenv("HF_TOKEN", "hf_build_secret")
    else:
        monkeypatch.delenv("HF_TOKEN", raising=False)
    args = fw.parse_args(fetch_arguments(variant))
    assert (str(args.dest), args.dtype) == ("/models/csm-1b", "bfloat16")
    assert fw.chosen_parts(args.csm_weights) == parts


def test_python_dependencies_are_installed_as_the_readme_says() -> None:
    runs = " ".join(args for kind, args in instructions() if kind == "RUN")
    assert "pip install --no-cache-dir -r requirements.txt" in runs
    assert "pip install --no-cache-dir --no-deps -r requirements-nodeps.txt" in runs


def local_imports(path: Path) -> set[str]:
    """Top-level names a file imports that are folders or modules of this repository."""
    names = re.findall(r"^\s*(?:from|import)\s+([A-Za-z_]\w*)", path.read_text(), re.M)
    return {n for n in names if (ROOT / n).is_dir() or (ROOT / f"{n}.py").exists()}


def test_the_image_holds_every_local_module_the_handler_imports() -> None:
    """handler.py's own imports and theirs, transitively (worker imports csm, ...)."""
    needed, todo = set(), [ROOT / "handler.py"]
    while todo:
        for name in local_imports(todo.pop()) - needed:
            needed.add(name)
            todo += list((ROOT / name).rglob("*.py")) if (ROOT / name).is_dir() else [
                ROOT / f"{name}.py"]
    copied = {source.split("/")[0] for kind, args in instructions() if kind == "COPY"
              for source in [w for w in shlex.split(args) if not w.startswith("--")][:-1]}
    assert {"worker", "csm"} <= needed
    assert needed <= copied, needed - copied


@pytest.mark.parametrize("later", [("COPY", "csm/"), ("COPY", "worker/"), ("COPY", "handler.py")])
def test_a_code_change_does_not_download_the_weights_again(later: tuple[str, str]) -> None:
    assert (index_of("COPY", "requirements.txt") < index_of("RUN", "pip install")
            < index_of("COPY", "builder/fetch_weights.py") < index_of("RUN", "builder.fetch_weights")
            < index_of(*later))
    # Only the fetcher is copied before the weights: deploy.py and the rest may change freely.
    builder_copy = instructions()[index_of("COPY", "builder/fetch_weights.py")][1]
    assert shlex.split(builder_copy) == ["builder/__init__.py", "builder/fetch_weights.py", "builder/"]
