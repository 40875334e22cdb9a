"""The suite's report: `report.json` (everything the parts recorded) and `report.md` (the
header, one row per part, the issue's targets, then each part's checks and measurements)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .modes import Mode

Parts = dict[str, dict[str, Any]]


def _median(value: dict[str, float]) -> float:
    return value["median"]


def _rtf(parts: Parts) -> tuple[str, bool]:
    rtf = _median(parts["speed"]["measurements"]["batch1"]["real_time_factor"])
    return f"{rtf:.3f}", rtf <= 0.06


def _vs_transformers(parts: Parts) -> tuple[str, bool]:
    ours = _median(parts["speed"]["measurements"]["batch1"]["frames_per_s"])
    theirs = _median(parts["transformers"]["measurements"]["frames_per_s"])
    return f"{ours / theirs:.2f}x ({ours:.1f} vs {theirs:.1f} frames/s)", ours / theirs >= 5


def _streams(parts: Parts) -> tuple[str, bool]:
    rows = parts["speed"]["measurements"]["concurrency"]
    real_time = [r["jobs"] for r in rows if r["per_stream_real_time_factor"] < 1]
    best = max(real_time, default=0)
    tried = "/".join(str(r["jobs"]) for r in rows)
    return f"{best} (of {tried} tried)", best >= 64


def _first_chunk(parts: Parts) -> tuple[str, bool]:
    ms = _median(parts["worker"]["measurements"]["stream"]["stream_first_chunk_ms"])
    return f"{ms:.0f} ms", ms <= 100


def _ready(parts: Parts) -> tuple[str, bool]:
    seconds = parts["worker"]["measurements"]["ready_after_process_start_s"]
    return f"{seconds:.1f} s", seconds <= 20


# (measure, target, how to read it from the parts, the parts it needs)
TARGETS: list[tuple[str, str, Callable[[Parts], tuple[str, bool]], tuple[str, ...]]] = [
    ("real-time factor, batch 1", "<= 0.06", _rtf, ("speed",)),
    ("frames/s vs transformers, same device and weights", ">= 5x", _vs_transformers,
     ("speed", "transformers")),
    ("concurrent real-time streams", ">= 64", _streams, ("speed",)),
    ("time to first streamed audio, preset voice", "<= 100 ms", _first_chunk, ("worker",)),
    ("worker ready after process start, weights on local disk", "<= 20 s", _ready,
     ("worker",)),
]


def targets(parts: Parts) -> list[dict[str, Any]]:
    rows = []
    for measure, target, read, needs in TARGETS:
        row: dict[str, Any] = {"measure": measure, "target": target, "met": None}
        try:
            row["measured"], row["met"] = read(parts)
        except KeyError:
            reasons = [f"{n}: {parts[n]['status'] if n in parts else 'not in this run'}"
                       for n in needs if parts.get(n, {}).get("status") != "passed"]
            row["measured"] = "not measured" + (f" ({'; '.join(reasons)})" if reasons else "")
        rows.append(row)
    return rows


def build(mode: Mode, command: str, started: str, elapsed_s: float,
          results: list[dict[str, Any]]) -> dict[str, Any]:
    parts = {r["name"]: r for r in results}
    environment = next((r["environment"] for r in results if r.get("environment")), {})
    return {"command": command, "date": started, "mode": mode.name,
            "mode_description": mode.describe, "environment": environment,
            "elapsed_s": round(elapsed_s, 1),
            "passed": all(r["status"] == "passed" for r in results),
            "targets": targets(parts), "parts": parts}


def write(report: dict[str, Any], out: Path) -> None:
    (out / "report.json").write_text(json.dumps(report, indent=1, default=str))
    (out / "report.md").write_text(markdown(report))


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_fmt(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_fmt(v)}" for k, v in value.items()) + "}"
    return str(value)


def _flatten(values: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    """Nested measurements as dotted keys; a {median, min, max} stays one line."""
    rows = []
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and not {"median", "min", "max"} <= set(value):
            rows += _flatten(value, name + ".")
        else:
            rows.append((name, value))
    return rows


def markdown(report: dict[str, Any]) -> str:
    env = report["environment"]
    device = ", ".join(f"{k} {env[k]}" for k in ("device", "torch", "cuda", "cudnn", "python",
                                                   "moshi", "transformers") if env.get(k))
    parts = report["parts"].values()
    passed = sum(p["status"] == "passed" for p in parts)
    lines = [
        "# GPU suite report", "",
        f"- Command: `{report['command']}`",
        f"- Date: {report['date']}",
        f"- Mode: {report['mode_description']}",
        f"- Device and versions: {device or 'unknown (no part reported)'}",
        f"- Result: {passed} of {len(parts)} parts passed, in {report['elapsed_s']:.0f} s", "",
        "| part | status | time (s) | limit (s) | notes |", "|---|---|---|---|---|",
    ]
    for p in parts:
        note = (p.get("reason") or "").replace("|", "/").replace("\n", " ")
        lines.append(f"| {p['name']} | {p['status']} | {p['elapsed_s']:.1f} | "
                     f"{p['limit_s']:g} | {note} |")
    lines += ["", f"## Targets ({report['mode']} mode)", ""]
    if report["mode"] != "gpu":
        lines += ["CPU mode: tiny shapes in fp32, so these figures only show that the suite "
                  "computes them; the targets are for csm-1b on an H100.", ""]
    lines += ["| measure | target | measured | met |", "|---|---|---|---|"]
    for t in report["targets"]:
        met = {True: "yes", False: "no", None: "-"}[t["met"]]
        lines.append(f"| {t['measure']} | {t['target']} | {t['measured']} | {met} |")
    for p in parts:
        lines += ["", f"## {p['name']}: {p['status']}", "", p["about"], ""]
        lines += [f"- {'ok' if c['ok'] else 'FAILED'}: {c['name']}"
                  + (f" ({_fmt(c['detail'])})" if c["detail"] is not None else "")
                  for c in p.get("checks", [])]
        lines += [f"- {k}: {_fmt(v)}" for k, v in _flatten(p.get("measurements", {}))]
        if p.get("peak_memory_mb") is not None:
            lines.append(f"- peak memory (this part's process): {p['peak_memory_mb']:.0f} MB")
        if p.get("log_tail"):
            lines += ["", "```", p["log_tail"].strip()[-1500:], "```"]
    return "\n".join(lines) + "\n"
