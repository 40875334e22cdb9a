"""`python handler.py --test_input '<json>'` and `python handler.py` with ./test_input.json.

The SDK runs one job and exits: 0 on success, 1 when the handler's answer holds `error`.
It does not iterate generator handlers, so handler.py hands that mode a plain coroutine that
runs the job to completion; these runs check it really generates (the SDK logs the result,
cut to 4096 characters a message: the head of audio_base64 and the tail with the summary).

The runs start together (each loads the tiny RANDOM-weight model: noise, not speech).
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path

import pytest

from worker_helpers import REPO, handler_cmd, handler_env, stop

SMALL = {"CSM_MAX_AUDIO_LENGTH_MS": "800", "RUNPOD_LOG_LEVEL": "INFO"}
GOOD = {"input": {"text": "Hello from a local test.", "max_audio_length_ms": 160, "seed": 7}}
STREAMED = {"input": {"text": "Streamed locally.", "max_audio_length_ms": 240, "seed": 8,
                      "stream": True, "response_format": "wav"}}
BAD = {"input": {"text": "Hi.", "topk": 0}}
TIMEOUT = 150  # seconds for one run, on a busy 2-core machine


class Run:
    def __init__(self, name: str, args: list[str], env: dict[str, str], cwd: Path, log: Path):
        self.name, self.log = name, log
        self.started = time.monotonic()
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(handler_cmd(*args), env=env, cwd=cwd, stdout=out,
                                         stderr=subprocess.STDOUT)
        self.returncode: int | None = None
        self.seconds = 0.0
        self.timed_out = False

    def wait(self, timeout: float) -> "Run":
        if self.returncode is None:
            try:
                self.returncode = self.proc.wait(max(1.0, timeout - self.elapsed()))
            except subprocess.TimeoutExpired:
                self.timed_out = True
                stop(self.proc)
                self.returncode = self.proc.returncode
            self.seconds = self.elapsed()
        return self

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    @property
    def output(self) -> str:
        return self.log.read_text(errors="replace")


@pytest.fixture(scope="module")
def runs(tiny_model_dir, tmp_path_factory):
    base = tmp_path_factory.mktemp("test-input")
    empty = tmp_path_factory.mktemp("no-test-input-json")
    small = handler_env(tiny_model_dir, **SMALL)
    default_limits = handler_env(tiny_model_dir, RUNPOD_LOG_LEVEL="INFO")
    started = {
        "good": Run("good", ["--test_input", json.dumps(GOOD)], small, base, base / "good.log"),
        "streamed": Run("streamed", ["--test_input", json.dumps(STREAMED)], small, base,
                        base / "streamed.log"),
        "bad": Run("bad", ["--test_input", json.dumps(BAD)], small, base, base / "bad.log"),
        # no --test_input: the SDK reads ./test_input.json, here the repository's own
        "repo_json": Run("repo_json", [], default_limits, REPO, base / "repo_json.log"),
        # no --test_input and no ./test_input.json: the SDK gives up
        "missing": Run("missing", [], small, empty, base / "missing.log"),
    }
    yield started
    for run in started.values():
        stop(run.proc)


def result_line(output: str) -> str:
    lines = [line for line in output.splitlines() if "Job result:" in line]
    assert lines, output[-3000:]
    return lines[-1]


def check_generated(output: str, duration_ms: float) -> None:
    assert "Job local_test completed successfully." in output, output[-3000:]
    head = result_line(output)
    # the head of the answer: a whole WAV file in base64 ("RIFF" + a real size, not the
    # streaming header's 0xFFFFFFFF)
    assert "'audio_base64': 'UklGR" in head and "'audio_base64': 'UklGRv////" not in head
    # the tail, after the SDK's cut: the summary of a real generation
    tail = output[output.index(head):]
    assert f"'duration_ms': {duration_ms}" in tail, tail[-1500:]
    assert "'sample_rate': 24000" in tail and "'watermarked': True" in tail
    assert re.search(r"'frames': \d+", tail) and "'error'" not in tail


def test_good_job_exits_0(runs):
    run = runs["good"].wait(TIMEOUT)
    assert not run.timed_out, run.output[-3000:]
    assert run.returncode == 0, run.output[-3000:]
    check_generated(run.output, 160.0)
    assert "'seed': 7" in run.output


def test_streamed_job_really_generates(runs):
    """`--test_input` can't iterate a generator: the job must still run, answered whole."""
    run = runs["streamed"].wait(TIMEOUT)
    assert not run.timed_out and run.returncode == 0, run.output[-3000:]
    check_generated(run.output, 240.0)
    assert "<generator object" not in run.output and "<async_generator" not in run.output
    assert "'chunk_index'" not in run.output  # one whole response, not stream chunks
    assert "'seed': 8" in run.output


def test_bad_job_exits_non_zero(runs):
    run = runs["bad"].wait(TIMEOUT)
    assert not run.timed_out, run.output[-3000:]
    assert run.returncode == 1, run.output[-3000:]
    assert "Job local_test failed with error: topk: Input should be greater than or equal to 1" \
        in run.output, run.output[-3000:]


def test_repository_test_input_json(runs):
    run = runs["repo_json"].wait(TIMEOUT)
    assert not run.timed_out, f"test_input.json took over {TIMEOUT} s: " + run.output[-3000:]
    assert run.returncode == 0, run.output[-3000:]
    assert "Using test_input.json as job input." in run.output
    expected = json.loads((REPO / "test_input.json").read_text())["input"]
    check_generated(run.output, float(expected["max_audio_length_ms"]))
    assert f"'seed': {expected['seed']}" in run.output


def test_missing_test_input_json_exits_non_zero(runs):
    run = runs["missing"].wait(TIMEOUT)
    assert not run.timed_out and run.returncode == 1, run.output[-3000:]
    assert "test_input.json not found" in run.output


@pytest.mark.parametrize("mode, loaded", [("queue", ["runpod"]), ("http", [])])
def test_each_mode_imports_only_its_own_server(tiny_model_dir, mode, loaded):
    """FastAPI and uvicorn would cost every queue-mode start ~0.3 s, the SDK every HTTP-mode
    start ~1.7 s before its port opens; importing handler.py loads the SDK only in queue mode
    (and there beside the model's load) and the HTTP server in neither (`serve` imports it)."""
    probe = ("import sys; import handler; print(sorted({'fastapi', 'uvicorn', 'runpod', "
             "'worker.http_app'} & set(sys.modules)))")
    done = subprocess.run([handler_cmd()[0], "-c", probe], cwd=REPO, capture_output=True,
                          text=True, timeout=TIMEOUT,
                          env=handler_env(tiny_model_dir, CSM_MODE=mode))
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == str(loaded), done.stdout[-3000:]
