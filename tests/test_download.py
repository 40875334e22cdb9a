"""builder.fetch_weights through the real huggingface_hub client against a stand-in hub (a local
HTTP server, tests/hub_standin.py): the only thing replaced is the hub. A transfer cut off
mid-file fails with one line; the next run resumes from the bytes already on disk."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from builder import fetch_weights as fw
from hub_standin import StandinHub, hub_tree
from worker_helpers import REPO

CHUNK = 10 * 1024 * 1024  # huggingface_hub's DOWNLOAD_CHUNK_SIZE: what reaches the disk per read


@pytest.fixture(scope="module")
def hub_root(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return hub_tree(tmp_path_factory.mktemp("hub"), tiny_model_dir, fw.remotes())


def fetch_cli(hub: StandinHub, dest: Path, home: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING"))}
    env.update(HF_ENDPOINT=hub.url, HF_TOKEN="hf_test_token", HF_HOME=str(home),
               PYTHONPATH=str(REPO), HF_HUB_DISABLE_TELEMETRY="1")
    return subprocess.run([sys.executable, "-m", "builder.fetch_weights", "--dest", str(dest),
                           "--no-verify-sizes"], env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=300)


def test_a_cut_download_fails_in_one_line_and_the_next_run_resumes(
        hub_root: Path, tiny_model_dir: Path, tmp_path: Path) -> None:
    size = (tiny_model_dir / fw.MODEL_FILE).stat().st_size
    cut = 3 * CHUNK
    assert size > cut + CHUNK, "the tiny model must be larger than the cut for this test"
    dest = tmp_path / "csm-1b"
    with StandinHub(hub_root, cut_at={fw.MODEL_FILE: cut}) as hub:
        first = fetch_cli(hub, dest, tmp_path / "home")
        assert first.returncode == 1, first.stdout + first.stderr
        errors = first.stderr.strip().splitlines()
        assert errors[-1].startswith("fetch_weights: error: downloading sesame/csm-1b/model.safetensors failed")
        assert "run again" in errors[-1] and "Traceback" not in first.stderr
        assert "[2/" in first.stdout  # progress: the file being fetched is named
        assert not (dest / fw.MODEL_FILE).exists()
        partial = list((dest / ".download").rglob("*.incomplete"))
        assert [p.stat().st_size for p in partial] == [cut]

        hub.cut_at.clear()
        before = len(hub.requests)
        second = fetch_cli(hub, dest, tmp_path / "home")
        assert second.returncode == 0, second.stdout + second.stderr
        resumed = [r for r in hub.requests[before:] if r.method == "GET"]
    # The model resumes at the cut, and config.json (finished in the first run) is not fetched again.
    model_gets = [r for r in resumed if r.path == fw.MODEL_FILE]
    assert [(r.range, r.bytes_sent) for r in model_gets] == [(f"bytes={cut}-", size - cut)]
    assert not [r for r in resumed if r.path == "config.json"]
    assert (dest / fw.MODEL_FILE).read_bytes() == (tiny_model_dir / fw.MODEL_FILE).read_bytes()
    assert not (dest / ".download").exists()
    # The token went to the hub in the Authorization header, and nowhere in the output.
    assert {r.authorization for r in model_gets} == {"Bearer hf_test_token"}
    assert "hf_test_token" not in first.stdout + first.stderr + second.stdout + second.stderr
