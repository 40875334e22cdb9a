"""The GPU suite (`python -m bench.gpu_suite`): its CPU mode end to end, as CI runs it so that
the suite cannot rot; a part over its time limit; the GPU run's time budget.

The CPU mode runs every part at tiny shapes with RANDOM weights (noise, never speech): the
checks are the suite's own (codes, audio, responses), the figures only have to be sane here.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from bench.gpu_suite.device_machine import ABSENT, CARRIED, CARRIED_FOR_COMPARISON, IN_IMAGE
from bench.gpu_suite.parts import GPU_RUN_LIMIT_S, PARTS, STOP_GRACE_S, default_parts

REPO = Path(__file__).resolve().parents[1]


def import_blocker(folder: Path) -> dict[str, str]:
    """An environment whose Python processes can't import what the GPU machine lacks (a None
    entry in sys.modules makes `import name` raise ModuleNotFoundError)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sitecustomize.py").write_text(
        f"import sys\nsys.modules.update(dict.fromkeys({sorted(ABSENT.values())!r}))\n")
    return dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(folder), *filter(None, [os.environ.get("PYTHONPATH")])]))


def suite(out: Path, *args: str) -> subprocess.CompletedProcess:
    """The CPU mode, as on the GPU machine: without the modules it lacks."""
    return subprocess.run([sys.executable, "-m", "bench.gpu_suite", "--cpu", "--out", str(out),
                           *args], cwd=REPO, env=import_blocker(out / "blocked-imports"),
                          capture_output=True, text=True, timeout=590)


@pytest.fixture(scope="module")
def cpu_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, str]:
    out = tmp_path_factory.mktemp("gpu-suite")
    run = suite(out)
    assert run.returncode == 0, run.stdout + run.stderr
    return json.loads((out / "report.json").read_text()), (out / "report.md").read_text()


def positive(value: float) -> bool:
    return math.isfinite(value) and value > 0


def test_cpu_mode_runs_every_part_and_each_passes_its_checks(cpu_run):
    report, _ = cpu_run
    assert report["mode"] == "cpu" and report["passed"] is True
    assert report["command"].startswith("python -m bench.gpu_suite --cpu --out ")
    assert report["environment"]["torch"] == torch.__version__
    assert list(report["parts"]) == [p.name for p in default_parts()]
    for name, part in report["parts"].items():
        assert part["status"] == "passed", (name, part.get("reason"), part.get("log_tail"))
        assert 0 < part["elapsed_s"] <= part["limit_s"] == PARTS[name].limit_s["cpu"]
        assert all(check["ok"] for check in part["checks"]), part["checks"]
        assert positive(part["peak_memory_mb"])
    checks = {name: len(part["checks"]) for name, part in report["parts"].items()}
    assert checks == {"models": 0, "graphs_eager": 8, "mimi": 3, "chaos": 2, "worker": 14,
                      "speed": 1, "attention": 3, "transformers": 1}, checks


def test_cpu_mode_measures_what_the_gpu_run_reports(cpu_run):
    parts = {name: part["measurements"] for name, part in cpu_run[0]["parts"].items()}
    graphs = parts["graphs_eager"]
    assert graphs["tiny_fp32"]["frames_stepped"] == 28 and graphs["tiny_fp32"]["graphs"] is False
    logits = graphs["tiny_bf16"]["codebook0_logits_vs_fp32"]
    assert logits["job"] == "a" and logits["frames"] == 28
    assert 0 < logits["relative_error_median"] <= logits["relative_error_max"] < 0.05
    assert set(graphs["tiny_bf16"]["first_differing_frame_vs_fp32"]) == set("abcdefghi")
    # On the CPU a job draws the same codes batched and alone (a GPU may part at ties).
    assert graphs["tiny_fp32_batched_vs_alone"] == dict.fromkeys("abcdefghi")
    assert parts["chaos"]["rounding_partings"] == [] and parts["chaos"]["problems"] == []
    # On the CPU Mimi's streaming decode matches to float rounding.
    assert all(v < 1e-5 for v in parts["mimi"]["max_relative_difference"].values())
    steps = parts["mimi"]["decode_step_ms_one_live_row"]
    assert list(steps) == ["1", "4"] and all(positive(ms) for ms in steps.values())
    worker = parts["worker"]
    assert worker["window_edge"]["last_position"] == 2046  # the window's last free position
    assert positive(worker["stream"]["stream_first_chunk_ms"]["median"])
    cloned = worker["cloned_stream"]
    assert all(positive(cloned[k]["stream_first_chunk_ms"]["median"])
               for k in ("encoded_each_time", "codes_kept"))
    assert positive(worker["verify_watermark"]["ms"])
    period = worker["watermark_period"]
    assert positive(period["ms"]) and round(period["audio_ms"]) == 975
    # three calls, the last of them a whole period: more than one call's time but for noise
    # (the two short calls add ~20%, less than a 2-core machine's jitter under load)
    assert period["first_period_ms"] > 0.5 * period["ms"]
    assert period["real_time_streams"] == pytest.approx(period["audio_ms"] / period["ms"])
    busy = worker["watermark_period_busy"]  # no CUDA stream of its own on the CPU
    assert busy["own_stream"] is False and busy["jobs_running"] == 8
    assert positive(busy["own_stream_ms"]) and positive(busy["default_stream_ms"])
    assert {"weights", "codec", "watermark", "voices", "warm_up"} <= set(worker["startup_ms"])
    assert 0 < worker["worker_start_s"] < worker["ready_after_process_start_s"]
    speed = parts["speed"]
    assert positive(speed["batch1"]["frames_per_s"]["median"])
    assert positive(speed["batch1"]["real_time_factor"]["median"])
    assert [row["jobs"] for row in speed["concurrency"]] == [1, 4]
    assert speed["key_block"] == 512
    launched = speed["frame_step_launches"]  # CUDA kernels on a GPU; operations on the CPU
    assert launched["unit"] == "ATen operations called directly" and launched["total"] > 1000
    assert launched["most_frequent"]["aten::linear"] > 0
    assert {"weights", "codec", "watermark", "caches_and_graphs", "total"} <= set(
        speed["startup_ms"])
    attention = parts["attention"]
    assert list(attention["by_batch"]) == ["1", "4"]
    for row in attention["by_batch"].values():
        assert all(positive(row[f"{call}_ms"]) for call in (
            "engine_call_2048", "engine_call_512", "grouped_query_2048"))
        for call in ("", "grouped_query_"):
            assert positive(row[f"{call}math_2048_ms"])  # the one backend every device has
            assert row[f"{call}efficient_attention"].startswith("refused: ")  # a CUDA kernel
    assert attention["masked_tail_relative_error"] == [0.0, 0.0]  # fp32 on the CPU: exact
    assert all(e < 1e-5 for e in attention["grouped_query_relative_error"])
    assert positive(parts["transformers"]["frames_per_s"]["median"])
    assert parts["transformers"]["compiled"] is False


def test_report_has_the_header_the_parts_and_the_targets(cpu_run):
    report, md = cpu_run
    targets = report["targets"]
    assert len(targets) == 5
    assert all(t["met"] in (True, False) and "not measured" not in t["measured"]
               for t in targets), targets
    for line in ("# GPU suite report", f"- Command: `{report['command']}`",
                 "| part | status | time (s) | limit (s) | notes |", "## Targets (cpu mode)",
                 "| real-time factor, batch 1 | <= 0.06 |"):
        assert line in md, line
    for name in report["parts"]:
        assert f"| {name} | passed |" in md
    assert f"torch {torch.__version__}" in md


def test_the_int8_part_runs_in_cpu_mode_and_measures_both_decoders(tmp_path):
    """Not in the default run (on a GPU it takes ~a minute of the eight): named, as a GPU
    session runs it."""
    run = suite(tmp_path, "--parts", "models,int8")
    assert run.returncode == 0, run.stdout + run.stderr
    part = json.loads((tmp_path / "report.json").read_text())["parts"]["int8"]
    assert part["status"] == "passed" and len(part["checks"]) == 3, part
    measured = part["measurements"]
    effect = measured["decoder_logits_int8_vs_full"]
    assert 0 < effect["relative_error_median"] < 0.05 and 0.9 < effect["top1_agreement"] < 1
    for label in ("plain", "int8"):
        assert positive(measured[label]["frames_per_s"]["median"])
        assert positive(measured[f"{label}_4_jobs"]["aggregate_frames_per_s"])
    assert positive(measured["int8_over_plain_frames_per_s"])


def test_a_part_over_its_limit_is_stopped_and_reported_as_timed_out(tmp_path):
    start = time.monotonic()
    run = suite(tmp_path, "--parts", "models,mimi", "--limit", "models=0.5")
    elapsed = time.monotonic() - start
    assert run.returncode == 1, run.stdout + run.stderr
    report = json.loads((tmp_path / "report.json").read_text())
    models, mimi = report["parts"]["models"], report["parts"]["mimi"]
    assert models["status"] == "timed out", models
    assert "still running at its 0.5 s limit" in models["reason"]
    assert models["reason"].endswith("stopped")
    assert models["elapsed_s"] < 0.5 + STOP_GRACE_S
    # The next part still runs, and says why it could not do its work.
    assert mimi["status"] == "not run" and "`models` part did not finish" in mimi["reason"]
    assert report["targets"][0]["measured"] == "not measured (speed: not in this run)"
    md = (tmp_path / "report.md").read_text()
    assert "| models | timed out |" in md and "| mimi | not run |" in md
    assert elapsed < 60


def test_the_default_gpu_run_fits_in_eight_minutes_with_every_part_stopped_late():
    assert sum(p.limit_s["gpu"] + STOP_GRACE_S for p in default_parts()) <= GPU_RUN_LIMIT_S
    assert all(set(p.limit_s) == {"gpu", "cpu"} for p in PARTS.values())


def test_every_requirement_is_on_the_gpu_machine_or_blocked_in_the_cpu_mode():
    """A new runtime requirement must say whether the GPU machine has it; if not, the CPU-mode
    run above blocks its import, so the suite is known to run without it."""
    def requirements(*files: str) -> set[str]:
        lines = [line for name in files for line in (REPO / name).read_text().splitlines()]
        return {re.split(r"[=<>\[ ]", line)[0].lower().replace("-", "_")
                for line in lines if line.strip() and not line.startswith("#")}

    runtime = requirements("requirements.txt", "requirements-nodeps.txt")
    classified = IN_IMAGE | CARRIED | set(ABSENT)
    assert not IN_IMAGE & CARRIED and not (IN_IMAGE | CARRIED) & set(ABSENT)
    assert runtime == classified, runtime ^ classified
    assert CARRIED_FOR_COMPARISON <= requirements("requirements-dev.txt")


def test_the_import_blocker_blocks_only_what_the_gpu_machine_lacks(tmp_path):
    """Else the CPU-mode run would pass vacuously: PyAV (FFmpeg's formats) is blocked, the
    worker's service still imports, and the encoder that needs PyAV says so."""
    code = ("import worker.service\n"
            "print('the service imported')\n"
            "from worker.ffmpeg_encoder import FfmpegEncoder\n"
            "FfmpegEncoder('mp3', 24000)\n")
    run = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                         text=True, env=import_blocker(tmp_path))
    assert run.returncode == 1 and run.stdout == "the service imported\n", run.stderr
    assert run.stderr.strip().splitlines()[-1].startswith("ModuleNotFoundError: import of av"), \
        run.stderr
