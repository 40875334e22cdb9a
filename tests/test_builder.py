"""builder.fetch_weights against a stand-in hub: only `hf_hub_download` is replaced.

The stand-in is a folder laid out like the three hub repos, filled from csm.testing.make_tiny
(conftest's tiny_model_dir), so the fetched folder must load in the real engine.
"""

from __future__ import annotations

import errno
import re
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from huggingface_hub.errors import EntryNotFoundError, GatedRepoError
from safetensors import safe_open
from safetensors.torch import save_file

from builder import fetch_weights as fw


@pytest.fixture(scope="module")
def tiny(tiny_model_dir: Path) -> Path:
    """conftest's session-wide make_tiny folder (original format), read-only."""
    return tiny_model_dir


@pytest.fixture(scope="module")
def standin(tiny: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """<standin>/<owner>/<repo>/<path in repo>, for every file the fetcher asks for."""
    root = tmp_path_factory.mktemp("hub")
    for remote in fw.remotes():
        source = tiny / remote.dest
        target = root / remote.repo / remote.path
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)
    return root


@pytest.fixture
def hub(standin: Path, monkeypatch: pytest.MonkeyPatch) -> list[dict]:
    """Serve the stand-in through hf_hub_download's contract; returns the calls it saw."""
    calls: list[dict] = []

    def fake_download(*, repo_id: str, filename: str, revision: str | None, token: str | None,
                      local_dir: Path) -> str:
        calls.append({"repo_id": repo_id, "filename": filename, "revision": revision, "token": token})
        source = standin / repo_id / filename
        if not source.exists():
            raise EntryNotFoundError(f"{repo_id}/{filename} not found")
        target = Path(local_dir) / filename
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)
        return str(target)

    monkeypatch.setattr(fw, "hf_hub_download", fake_download)
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    return calls


def run(dest: Path, *extra: str) -> int:
    return fw.main(["--dest", str(dest), "--no-verify-sizes", *extra])


def test_fetched_folder_loads_in_the_engine(hub: list[dict], tiny: Path, tmp_path: Path) -> None:
    from csm.engine import Engine

    dest = tmp_path / "csm-1b"
    assert run(dest, "--revision", "abc123") == 0
    for remote in fw.remotes():
        assert (dest / remote.dest).stat().st_size > 0, remote.dest
    assert not (dest / ".download").exists()
    # Only the CSM repo follows --revision; every call carries the token.
    assert {c["revision"] for c in hub if c["repo_id"] == fw.CSM_REPO} == {"abc123"}
    assert {c["revision"] for c in hub if c["repo_id"] != fw.CSM_REPO} == {None}
    assert {c["token"] for c in hub} == {"hf_test_token"}
    # The tiny Mimi is not the published architecture, so make_tiny writes its config beside the
    # weights; the hub's full-size Mimi needs none. Hand it over as a fixture file.
    shutil.copyfile(tiny / "mimi" / "config.json", dest / "mimi" / "config.json")
    engine = Engine.load(dest, device="cpu")
    assert engine.model.codebook0_head.weight.numel() > 0


def test_bfloat16_fetch_converts_the_model(hub: list[dict], tiny: Path, tmp_path: Path) -> None:
    dest = tmp_path / "csm-1b"
    assert run(dest, "--dtype", "bfloat16") == 0
    with safe_open(tiny / fw.MODEL_FILE, framework="pt") as before, \
            safe_open(dest / fw.MODEL_FILE, framework="pt") as after:
        assert sorted(before.keys()) == sorted(after.keys())
        for key in before.keys():
            assert after.get_tensor(key).dtype == torch.bfloat16
            assert torch.equal(after.get_tensor(key), before.get_tensor(key).to(torch.bfloat16)), key
    from csm.engine import Engine

    shutil.copyfile(tiny / "mimi" / "config.json", dest / "mimi" / "config.json")
    Engine.load(dest, device="cpu")


def test_conversion_keeps_keys_metadata_and_non_float_tensors(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    tensors = {
        "b.weight": torch.randn(3, 5),
        "a.scale": torch.randn(7, dtype=torch.float64),
        "steps": torch.arange(4, dtype=torch.int64),
        "half": torch.randn(2, 2, dtype=torch.float16),
        "scalar": torch.tensor(1.5),
    }
    save_file(tensors, str(path), metadata={"format": "pt"})
    fw.convert_to_bf16(path)
    with safe_open(path, framework="pt") as f:
        assert f.metadata() == {"format": "pt"}
        assert sorted(f.keys()) == sorted(tensors)
        for key, original in tensors.items():
            converted = f.get_tensor(key)
            expected = original.to(torch.bfloat16) if key in ("b.weight", "a.scale", "scalar") else original
            assert converted.dtype == expected.dtype and torch.equal(converted, expected), key
    assert fw.is_bf16(path)
    assert not path.with_name(path.name + ".partial").exists()


def error_line(capsys: pytest.CaptureFixture) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def test_no_token(hub: list[dict], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                  capsys: pytest.CaptureFixture) -> None:
    monkeypatch.delenv("HF_TOKEN")
    monkeypatch.delenv("HF_TOKEN_PATH", raising=False)
    assert run(tmp_path / "d") == 1
    line = error_line(capsys)
    assert "HF_TOKEN" in line and "https://huggingface.co/sesame/csm-1b" in line
    assert hub == []


def test_token_from_secret_file(hub: list[dict], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    secret = tmp_path / "HF_TOKEN"
    secret.write_text("hf_from_file\n")
    monkeypatch.delenv("HF_TOKEN")
    monkeypatch.setenv("HF_TOKEN_PATH", str(secret))
    assert run(tmp_path / "d") == 0
    assert {c["token"] for c in hub} == {"hf_from_file"}


def test_token_is_never_printed(hub: list[dict], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert run(tmp_path / "d", "--dtype", "bfloat16") == 0
    captured = capsys.readouterr()
    assert "hf_test_token" not in captured.out + captured.err


def failing_hub(monkeypatch: pytest.MonkeyPatch, exc: BaseException) -> None:
    def fail(**_: object) -> str:
        raise exc

    monkeypatch.setattr(fw, "hf_hub_download", fail)


def test_license_not_accepted(hub: list[dict], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                              capsys: pytest.CaptureFixture) -> None:
    failing_hub(monkeypatch, GatedRepoError("403 Client Error: access to this repo is restricted"))
    assert run(tmp_path / "d") == 1
    line = error_line(capsys)
    assert "accept the license" in line and "https://huggingface.co/sesame/csm-1b" in line


def test_file_not_found(hub: list[dict], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                        capsys: pytest.CaptureFixture) -> None:
    failing_hub(monkeypatch, EntryNotFoundError("404 Client Error"))
    assert run(tmp_path / "d", "--repo", "someone/csm-finetune") == 1
    line = error_line(capsys)
    assert "someone/csm-finetune/config.json does not exist" in line


def test_disk_full(hub: list[dict], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                   capsys: pytest.CaptureFixture) -> None:
    failing_hub(monkeypatch, OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "d")))
    assert run(tmp_path / "d") == 1
    assert "no space left" in error_line(capsys)


def test_disk_full_while_converting(hub: list[dict], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                    capsys: pytest.CaptureFixture) -> None:
    def full(path: Path) -> None:
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(fw, "convert_to_bf16", full)
    assert run(tmp_path / "d", "--dtype", "bfloat16") == 1
    assert "no space left" in error_line(capsys)


def test_network_failure(hub: list[dict], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                         capsys: pytest.CaptureFixture) -> None:
    from huggingface_hub.errors import LocalEntryNotFoundError

    failing_hub(monkeypatch, LocalEntryNotFoundError("cannot reach the hub"))
    assert run(tmp_path / "d") == 1
    assert "network" in error_line(capsys)


def test_size_mismatch_names_the_file_and_both_sizes(hub: list[dict], standin: Path, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture) -> None:
    # With verification on, the tiny stand-in's model.safetensors is the first file whose
    # published size is known, and it does not match.
    assert fw.main(["--dest", str(tmp_path / "d")]) == 1
    line = error_line(capsys)
    tiny_size = (standin / fw.CSM_REPO / fw.MODEL_FILE).stat().st_size
    assert "model.safetensors" in line
    assert f"{tiny_size:,}" in line and "6,211,186,784" in line
    assert "--no-verify-sizes" in line


def test_sizes_taken_from_the_standin_pass(hub: list[dict], standin: Path, tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    real = fw.remotes

    def standin_sizes(csm_repo: str = fw.CSM_REPO, parts=fw.PARTS) -> list[fw.Remote]:
        return [replace(r, size=(standin / r.repo / r.path).stat().st_size)
                for r in real(csm_repo, parts)]

    monkeypatch.setattr(fw, "remotes", standin_sizes)
    assert fw.main(["--dest", str(tmp_path / "d")]) == 0


def test_mimi_names_match_moshi() -> None:
    from moshi.models import loaders

    assert (fw.MIMI_REPO, fw.MIMI_FILE) == (loaders.DEFAULT_REPO, loaders.MIMI_NAME)


@pytest.mark.parametrize("mode", ["skip", "auto"])
def test_slim_fetch_takes_only_the_public_parts_without_a_token(
        hub: list[dict], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mode: str,
        capsys: pytest.CaptureFixture) -> None:
    monkeypatch.delenv("HF_TOKEN")
    monkeypatch.delenv("HF_TOKEN_PATH", raising=False)
    dest = tmp_path / "parts"
    assert run(dest, "--dtype", "bfloat16", "--csm-weights", mode) == 0
    assert {c["repo_id"] for c in hub} == {fw.MIMI_REPO, fw.WATERMARK_REPO}
    assert {c["token"] for c in hub} == {None}
    assert sorted(p.name for p in dest.iterdir()) == ["mimi", "silentcipher"]
    assert "Mimi and SilentCipher, no CSM weights" in capsys.readouterr().out


def test_auto_fetches_the_csm_files_when_a_token_is_set(hub: list[dict], tmp_path: Path) -> None:
    assert run(tmp_path / "d", "--csm-weights", "auto") == 0
    assert {c["repo_id"] for c in hub} == {fw.CSM_REPO, fw.MIMI_REPO, fw.WATERMARK_REPO}
    assert (tmp_path / "d" / fw.MODEL_FILE).is_file()


def test_free_space_is_checked_before_anything_is_downloaded(
        hub: list[dict], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture) -> None:
    free = shutil.disk_usage(tmp_path).free
    real = fw.remotes

    def larger_than_the_disk(csm_repo: str = fw.CSM_REPO, parts=fw.PARTS) -> list[fw.Remote]:
        return [replace(r, size=free) if r.dest == fw.MODEL_FILE else r for r in real(csm_repo, parts)]

    monkeypatch.setattr(fw, "remotes", larger_than_the_disk)
    assert run(tmp_path / "d", "--dtype", "bfloat16") == 1
    line = error_line(capsys)
    # the download (that file, Mimi, the rest) plus the half-size bfloat16 copy made while converting
    needed = float(re.search(r"about ([\d.]+) GB more are needed", line)[1]) * 1e9
    assert 1.5 * free < needed < 1.5 * free + 0.5e9
    assert f"{free / 1e9:.1f} GB are free" in line and "nothing was downloaded" in line
    assert hub == []


def test_the_space_check_counts_what_an_interrupted_run_left(tmp_path: Path) -> None:
    files = fw.remotes(parts=(fw.CODEC, fw.WATERMARK))
    staging = tmp_path / ".download"
    total = sum(r.expected_bytes for r in files)
    assert fw.bytes_needed(files, staging, "bfloat16") == total
    (staging / fw.MIMI_REPO).mkdir(parents=True)
    (staging / fw.MIMI_REPO / "part.incomplete").write_bytes(b"x" * 1000)
    assert fw.bytes_needed(files, staging, "bfloat16") == total - 1000
