"""A fresh machine: `make serve` and `python handler.py` without a model say what to do in one
line and exit non-zero (no traceback); with HF_TOKEN the worker downloads the model at start
(from a stand-in hub: a local HTTP server, tests/hub_standin.py) and serves.

Each run is a real subprocess with a clean environment: HOME, the caches, the image's folder
and the volume all point into the test's own folders, so nothing on this machine is found.
The tiny model has RANDOM weights: what it generates is noise, not speech.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from builder import fetch_weights as fw
from hub_standin import StandinHub, hub_tree
from worker_helpers import REPO, handler_cmd, start_up_error

VENV = Path(sys.executable).parent.parent
JOB = {"input": {"text": "Hello from a fresh machine.", "max_audio_length_ms": 160, "seed": 1}}


def fresh_env(home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("CSM_", "RUNPOD_", "HF_", "HUGGING", "XDG_"))}
    env.update(HOME=str(home), PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1", CSM_DEVICE="cpu",
               CSM_BAKED_DIR=str(home / "no-image"), CSM_VOLUME_DIR=str(home / "no-volume"),
               RUNPOD_LOG_LEVEL="INFO")
    env.update(extra)
    return env


def run(cmd: list[str], env: dict[str, str], cwd: Path = REPO, timeout: float = 240) -> tuple[int, str]:
    done = subprocess.run(cmd, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, timeout=timeout)
    return done.returncode, done.stdout


def one_error_line(output: str) -> str:
    """The one line that explains (the runpod SDK's log format shows no level name)."""
    assert "Traceback" not in output, output
    errors = [line for line in output.splitlines() if "the worker cannot start: " in line]
    assert len(errors) == 1, output
    return errors[0]


@pytest.fixture(scope="module")
def fresh_machine(tmp_path_factory: pytest.TempPathFactory):
    """`make serve` and `python handler.py` with no model anywhere, started together."""
    home = tmp_path_factory.mktemp("fresh-home")
    model_dir = home / "models" / "csm-1b"
    # `-o` keeps make from (re)installing the virtual environment the suite already runs in.
    commands = {"make serve": ["make", "-o", f"{VENV}/.installed", "serve", f"VENV={VENV}",
                               f"MODEL_DIR={model_dir}"],
                "handler": handler_cmd()}
    procs = {name: subprocess.Popen(cmd, env=fresh_env(home), cwd=REPO, text=True,
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
             for name, cmd in commands.items()}
    results = {name: (proc.communicate(timeout=240)[0], proc.returncode)
               for name, proc in procs.items()}
    return home, model_dir, {name: (code, out) for name, (out, code) in results.items()}


def test_make_serve_without_a_model_says_how_to_get_one(fresh_machine) -> None:
    _, model_dir, results = fresh_machine
    code, output = results["make serve"]
    assert code != 0, output
    line = one_error_line(output)
    assert f"the worker cannot start: CSM_MODEL_DIR={model_dir} holds no CSM model" in line
    assert "https://huggingface.co/sesame/csm-1b" in line and "HF_TOKEN" in line
    assert "make tiny" in line and "MODEL_DIR=models/tiny-random" in line


def test_handler_without_any_model_lists_where_it_looked(fresh_machine) -> None:
    home, _, results = fresh_machine
    code, output = results["handler"]
    assert code == 1, output
    line = one_error_line(output)
    assert "the worker cannot start: no CSM model found; looked in: image" in line
    assert str(home / "no-volume" / "huggingface-cache" / "hub") in line
    assert str(home / ".cache" / "huggingface" / "hub") in line  # the local HF cache
    assert "Model setting: sesame/csm-1b" in line and "HF_TOKEN" in line


@pytest.mark.parametrize("case", ["broken model folder", "malformed setting"])
def test_start_up_ends_in_one_line_and_status_1(case: str, tiny_model_dir: Path, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch,
                                                caplog: pytest.LogCaptureFixture) -> None:
    """What the entry points call (handler.py imports it), in this process: one line, no
    traceback."""
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_dir, broken, ignore=shutil.ignore_patterns("model.safetensors"))
    (broken / "model.safetensors").write_bytes(b"\x00" * 64)
    env = {"CSM_MODEL_REPO": "not a repo"} if case == "malformed setting" else {}
    message = start_up_error(broken, monkeypatch, caplog, **env)
    if case == "malformed setting":
        assert "CSM_MODEL_REPO must be a hub repo id" in message
    else:
        assert f"the model from the CSM_MODEL_DIR {broken} could not be loaded" in message
        assert "SafetensorError" in message and "fetch_weights --dest" in message


def test_graphs_that_cannot_be_captured_end_start_up_in_one_line_that_names_the_switch(
        tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """CSM_CUDA_GRAPHS=1 where no CUDA graph can be captured (this CPU): the real capture runs
    and fails, and the one line says how to serve without graphs, not that the folder is bad."""
    message = start_up_error(tiny_model_dir, monkeypatch, caplog, CSM_CUDA_GRAPHS="1")
    assert message.startswith("the worker cannot start: capturing the frame step as CUDA "
                              "graphs failed (")
    assert message.endswith("CSM_CUDA_GRAPHS=0 serves without them, slower")
    assert "could not be loaded" not in message and "fetch_weights" not in message


def test_a_failed_compile_ends_start_up_in_one_line_that_names_the_switch(
        tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """CSM_COMPILE=1 where torch.compile fails: the one line says how to serve without it.
    Only the backend is swapped (for one torch does not have): inductor takes minutes here."""
    from worker import model_source

    chosen = []
    monkeypatch.setattr(model_source, "compile_backend",
                        lambda settings: chosen.append(settings.compile) or "no-such-backend")
    message = start_up_error(tiny_model_dir, monkeypatch, caplog, CSM_COMPILE="1")
    assert chosen == [True]
    assert message.startswith("the worker cannot start: compiling the frame step failed (")
    assert message.endswith("CSM_COMPILE=0 serves without it")
    assert "could not be loaded" not in message and "fetch_weights" not in message


def test_cuda_graphs_off_turns_off_mimis_graphs_too(tiny_model_dir: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """The escape hatch covers both graphed paths: ours (the engine is built eager) and
    moshi's (its own switch, NO_CUDA_GRAPH, which it reads at every call)."""
    from moshi.utils import compile as moshi_compile

    from worker.model_source import ModelSource, load_engine
    from worker.settings import load_settings

    monkeypatch.setenv("NO_CUDA_GRAPH", "")  # restored, whatever load_engine sets
    settings = load_settings({"CSM_DEVICE": "cpu", "CSM_CUDA_GRAPHS": "0"})
    assert moshi_compile._is_cuda_graph_enabled()
    source = ModelSource("CSM_MODEL_DIR", tiny_model_dir, tiny_model_dir)
    with load_engine(source, settings) as engine:
        assert engine.scheduler.stepper.use_graphs is False
    assert not moshi_compile._is_cuda_graph_enabled()


@pytest.fixture(scope="module")
def slim_image(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The slim image's folder: Mimi and SilentCipher, no CSM weights."""
    folder = tmp_path_factory.mktemp("slim-image")
    for part in ("mimi", "silentcipher"):
        shutil.copytree(tiny_model_dir / part, folder / part)
    return folder


def test_with_a_token_the_first_start_downloads_then_serves(tiny_model_dir: Path, slim_image: Path,
                                                            tmp_path: Path) -> None:
    """The slim image on an endpoint with a network volume and HF_TOKEN: the first worker
    downloads the CSM files onto the volume and serves; the next one finds them there."""
    volume = tmp_path / "runpod-volume"
    volume.mkdir()
    # A fine-tune's repo: its files are checked for existence and format, not csm-1b's sizes.
    repo = "someone/csm-finetune"
    hub_root = hub_tree(tmp_path / "hub", tiny_model_dir, fw.remotes(repo, parts=(fw.CSM,)))
    with StandinHub(hub_root) as hub:
        env = fresh_env(tmp_path, HF_TOKEN="hf_test_token", HF_ENDPOINT=hub.url,
                        CSM_BAKED_DIR=str(slim_image), CSM_VOLUME_DIR=str(volume),
                        CSM_MODEL_REPO=repo)
        code, first = run(handler_cmd("--test_input", json.dumps(JOB)), env)
        downloads = [r for r in hub.requests if r.method == "GET"]
        seen = len(hub.requests)
        code2, second = run(handler_cmd("--test_input", json.dumps(JOB)), env)
        later = hub.requests[seen:]
    assert code == 0, first
    model = volume / "models" / "someone" / "csm-finetune"
    assert f"downloading someone/csm-finetune into {model}" in first
    assert f"model: network volume {model} (downloaded at start); Mimi, SilentCipher from the image" in first
    assert {r.repo for r in downloads} == {repo}  # the public parts come from the image
    assert "Job local_test completed successfully." in first and "'duration_ms': 160.0" in first
    assert "hf_test_token" not in first
    assert code2 == 0, second
    assert f"model: network volume {model}; Mimi, SilentCipher from the image" in second
    assert later == []  # found on the volume: the hub is not asked again


def test_every_setting_the_worker_reads_is_in_the_readmes_table() -> None:
    """A newcomer configures from the README: each variable the code reads (CSM_*, the
    bucket's BUCKET_*) has its row in the configuration table."""
    import re
    from dataclasses import fields

    from worker.settings import Limits

    code = "\n".join(p.read_text() for p in [REPO / "handler.py", *(REPO / "worker").glob("*.py"),
                                             *(REPO / "csm").glob("*.py")])
    read = set(re.findall(r'"((?:CSM|BUCKET)_[A-Z0-9_]+)"', code))
    read |= {f"CSM_{f.name.upper()}" for f in fields(Limits)}  # read by their field names
    readme = (REPO / "README.md").read_text()
    table = readme[readme.index("## Configuration (environment)"):]
    table = table[:table.index("\n## ")]
    rows = {name for line in table.splitlines() if line.startswith("| `")
            for name in re.findall(r"`([A-Z][A-Z0-9_]+)`", line.split("|")[1])}
    assert len(read) > 30 and read <= rows, sorted(read - rows)
