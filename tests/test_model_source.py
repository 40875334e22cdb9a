"""Where the model comes from (worker/model_source.py): every source layout, built from the tiny
RANDOM-weight model (noise, not speech), is found in the documented order and loads.

Layouts: a CSM_MODEL_DIR folder, the image's folder (full, or slim: Mimi and SilentCipher only),
RunPod's cached model and the local Hugging Face cache (hub-cache trees with blobs, snapshots and
refs/main), a folder on the network volume, the local download cache, and a download at start.
Files are hard links to the tiny model's, so building a layout costs no copies. Only the hub is
stubbed (`hf_hub_download`, as in test_builder.py).
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import socket
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from huggingface_hub.errors import EntryNotFoundError

from builder import fetch_weights as fw
from csm.config import TINY
from csm.engine import Engine
from csm.model import CSM
from worker.model_source import ModelSource, find_model, load_engine
from worker.settings import Settings, StartupError, load_settings

REPO = "sesame/csm-1b"
CSM_FILES = ("config.json", "model.safetensors", "tokenizer.json", "prompts")
IMAGE_PARTS = ("mimi", "silentcipher")
COMMIT = "a" * 40
STALE = "b" * 40


def link_tree(src: Path, dst: Path, names: tuple[str, ...] | None = None) -> Path:
    """dst holding hard links to src's files (only the top-level `names`, if given)."""
    dst.mkdir(parents=True, exist_ok=True)
    for entry in src.iterdir():
        if names is not None and entry.name not in names:
            continue
        if entry.is_dir():
            link_tree(entry, dst / entry.name)
        else:
            (dst / entry.name).hardlink_to(entry)
    return dst


def hub_cache(cache: Path, tiny: Path, repo: str = REPO) -> Path:
    """The hub-cache layout RunPod's cached models use: blobs named by hash, snapshots of
    relative links into them, refs/main naming the current snapshot (a stale one beside it)."""
    root = cache / f"models--{repo.replace('/', '--')}"
    (root / "blobs").mkdir(parents=True)
    files = [p for name in CSM_FILES for p in ([tiny / name] if (tiny / name).is_file()
                                               else sorted((tiny / name).rglob("*")))]
    for commit, chosen in ((COMMIT, files), (STALE, files[:1])):
        for file in chosen:
            blob = root / "blobs" / hashlib.sha256(str(file).encode()).hexdigest()
            if not blob.exists():
                blob.hardlink_to(file)
            link = root / "snapshots" / commit / file.relative_to(tiny)
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(Path("../" * (len(file.relative_to(tiny).parts) + 1)) / "blobs" / blob.name)
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text(COMMIT)
    return root / "snapshots" / COMMIT


@pytest.fixture(scope="module")
def places(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("sources")
    volume = base / "runpod-volume"
    return {
        "explicit": link_tree(tiny_model_dir, base / "explicit"),
        "full image": link_tree(tiny_model_dir, base / "image-full"),
        "slim image": link_tree(tiny_model_dir, base / "image-slim", IMAGE_PARTS),
        "runpod cache": hub_cache(volume / "huggingface-cache" / "hub", tiny_model_dir),
        "hf cache": hub_cache(base / "hf-home" / "hub", tiny_model_dir),
        "volume folder": link_tree(tiny_model_dir, volume / "models" / REPO),
        # a second volume holding a model folder but no cached models
        "plain volume": link_tree(tiny_model_dir, base / "plain-volume" / "models" / REPO).parents[2],
        "download cache": link_tree(tiny_model_dir, base / "cache" / "models" / REPO),
        "volume": volume,
        "base": base,
    }


def settings_for(places: dict[str, Path], **changes: object) -> Settings:
    """Every source present; `changes` take some away (None) or point elsewhere."""
    base = places["base"]
    settings = replace(
        load_settings({"CSM_DEVICE": "cpu", "CSM_MAX_CONCURRENCY": "1"}),
        model_dir=places["explicit"], baked_dir=places["full image"], volume_dir=places["volume"],
        hf_hub_cache=base / "hf-home" / "hub", download_cache=base / "cache")
    return replace(settings, **changes)


@pytest.fixture
def no_token(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HF_TOKEN_PATH", raising=False)


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any connection attempt fails the test: finding a model is offline."""
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"a network connection was attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def the_order(places: dict[str, Path]) -> list[tuple[str, dict, str, Path]]:
    """(case, settings changes, expected kind, expected origin): each row removes the source the
    row before it picked."""
    gone = places["base"] / "nothing-here"
    return [
        ("CSM_MODEL_DIR wins", {}, "CSM_MODEL_DIR", places["explicit"]),
        ("then the image's folder", {"model_dir": None}, "image", places["full image"]),
        ("then RunPod's cached model (slim image)",
         {"model_dir": None, "baked_dir": places["slim image"]}, "cached model", places["runpod cache"]),
        ("then the local Hugging Face cache",
         {"model_dir": None, "baked_dir": places["slim image"], "volume_dir": gone / "v1"},
         "cached model", places["hf cache"]),
        ("then the network volume's folder",
         {"model_dir": None, "baked_dir": places["slim image"], "volume_dir": places["plain volume"],
          "hf_hub_cache": gone}, "network volume", places["plain volume"] / "models" / REPO),
        ("then the download cache",
         {"model_dir": None, "baked_dir": places["slim image"], "volume_dir": gone / "v2",
          "hf_hub_cache": gone}, "download cache", places["download cache"]),
    ]


def test_sources_are_searched_in_the_documented_order_and_each_loads(
        places: dict[str, Path], no_token: None, no_network: None,
        caplog: pytest.LogCaptureFixture) -> None:
    for case, changes, kind, origin in the_order(places):
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="worker.model"):
            source = find_model(settings_for(places, **changes))
        assert (source.kind, source.origin) == (kind, origin), case
        assert f"model: {kind} {origin}" in caplog.text, case  # the log says which source
        engine = load_engine(source, settings_for(places))
        assert engine.model.codebook0_head.weight.numel() > 0, case
        engine.close()


def test_a_cached_model_follows_refs_main_and_borrows_the_image_parts(
        places: dict[str, Path], no_token: None, no_network: None) -> None:
    source = find_model(settings_for(places, model_dir=None, baked_dir=places["slim image"]))
    assert source.origin.name == COMMIT  # not the stale snapshot beside it
    assert source.borrowed == IMAGE_PARTS
    # The engine reads one folder: the snapshot's files, plus Mimi and SilentCipher from the image.
    assert (source.folder / "mimi").resolve() == (places["slim image"] / "mimi").resolve()
    assert (source.folder / "model.safetensors").resolve() == (
        source.origin / "model.safetensors").resolve()
    assert "Mimi, SilentCipher from the image" in source.describe()


def test_a_fine_tune_is_found_by_its_repo_name(places: dict[str, Path], tiny_model_dir: Path,
                                               no_token: None) -> None:
    snapshot = hub_cache(places["volume"] / "huggingface-cache" / "hub", tiny_model_dir,
                         "someone/csm-finetune")
    source = find_model(settings_for(places, model_dir=None, baked_dir=places["slim image"],
                                     model_repo="someone/csm-finetune"))
    assert (source.kind, source.origin) == ("cached model", snapshot)


def test_nothing_found_is_one_line_naming_every_place(places: dict[str, Path], no_token: None) -> None:
    gone = places["base"] / "nothing-here"
    with pytest.raises(StartupError) as info:
        find_model(settings_for(places, model_dir=None, baked_dir=places["slim image"],
                                volume_dir=gone, hf_hub_cache=gone / "hub",
                                download_cache=gone / "cache"))
    message = str(info.value)
    assert "\n" not in message
    for where in (places["slim image"], gone / "huggingface-cache" / "hub", gone / "hub",
                  gone / "models" / REPO, gone / "cache" / "models" / REPO):
        assert str(where) in message
    assert "https://huggingface.co/sesame/csm-1b" in message and "HF_TOKEN" in message
    assert "make tiny" in message and "Model setting" in message


def test_a_missing_model_dir_without_a_token_says_how_to_get_one(places: dict[str, Path],
                                                                  no_token: None) -> None:
    with pytest.raises(StartupError) as info:
        find_model(settings_for(places, model_dir=places["base"] / "models" / "csm-1b"))
    message = str(info.value)
    assert message.startswith(f"CSM_MODEL_DIR={places['base'] / 'models' / 'csm-1b'} holds no CSM model")
    assert "accept its license at https://huggingface.co/sesame/csm-1b" in message
    assert "set HF_TOKEN" in message and "make tiny" in message


def test_without_mimi_anywhere_the_message_says_how_to_fetch_it(places: dict[str, Path],
                                                                tiny_model_dir: Path,
                                                                tmp_path: Path, no_token: None) -> None:
    csm_only = link_tree(tiny_model_dir, tmp_path / "csm-only", CSM_FILES)
    with pytest.raises(StartupError) as info:
        find_model(settings_for(places, model_dir=csm_only, baked_dir=tmp_path / "no-image"))
    message = str(info.value)
    assert "not Mimi or SilentCipher" in message and "--csm-weights skip" in message


def test_a_broken_model_folder_is_one_line_not_a_traceback(places: dict[str, Path],
                                                           tiny_model_dir: Path,
                                                           tmp_path: Path, no_token: None) -> None:
    broken = link_tree(tiny_model_dir, tmp_path / "broken", (*CSM_FILES, *IMAGE_PARTS))
    (broken / "model.safetensors").unlink()
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    settings = settings_for(places, model_dir=broken)
    with pytest.raises(StartupError) as info:
        load_engine(find_model(settings), settings)
    message = str(info.value)
    assert message.startswith(f"the model from the CSM_MODEL_DIR {broken} could not be loaded")
    assert "fetch_weights --dest" in message and "\n" not in message


@pytest.mark.parametrize("kind, remedy", [
    ("image", "the image is broken: build it again"),
    ("cached model", "check that CSM_MODEL_REPO names a CSM repo with the files of sesame/csm-1b"),
    ("network volume", "delete {origin} to download it again (HF_TOKEN set)"),
    ("download cache", "delete {origin} to download it again (HF_TOKEN set)"),
])
def test_a_broken_model_says_what_to_do_for_where_it_came_from(places: dict[str, Path],
                                                                tiny_model_dir: Path,
                                                                tmp_path: Path, kind: str,
                                                                remedy: str) -> None:
    broken = link_tree(tiny_model_dir, tmp_path / "broken", (*CSM_FILES, *IMAGE_PARTS))
    (broken / "config.json").unlink()
    (broken / "config.json").write_text("{not json")
    with pytest.raises(StartupError) as info:
        load_engine(ModelSource(kind, broken, broken), settings_for(places))
    message = str(info.value)
    assert message.startswith(f"the model from the {kind} {broken} could not be loaded"), message
    assert message.endswith(remedy.format(origin=broken)) and "\n" not in message


def test_out_of_gpu_memory_at_start_says_to_lower_the_concurrency(
        places: dict[str, Path], no_token: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """No GPU here, so its allocator's refusal is raised where the caches are allocated."""
    def no_room(self, max_batch: int) -> None:
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 4.00 GiB. "
                                          "GPU 0 has a total capacity of 23.5 GiB\nmore")

    monkeypatch.setattr(CSM, "setup_caches", no_room)
    settings = replace(settings_for(places), max_concurrency=64)
    with pytest.raises(StartupError) as info:
        load_engine(find_model(settings), settings)
    message = str(info.value)
    assert message.startswith("the GPU ran out of memory while the worker started (CUDA out "
                              "of memory. Tried to allocate 4.00 GiB.")
    per_row = TINY.cache_bytes_per_row(element_size=2) / 2**20
    assert f"CSM_MAX_CONCURRENCY=64 jobs at once, each holding {per_row:.1f} MiB" in message
    assert "lower CSM_MAX_CONCURRENCY" in message and "\n" not in message
    assert "could not be loaded" not in message  # the folder is fine


# ---- a download at start (the hub stubbed: hf_hub_download serves the tiny model) ---------------
@pytest.fixture
def hub(tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    calls: list[str] = []

    def fake_download(*, repo_id: str, filename: str, revision: str | None, token: str | None,
                      local_dir: Path) -> str:
        calls.append(f"{repo_id}/{filename}")
        remote = next((r for r in real() if r.path == filename), None)
        if remote is None:
            raise EntryNotFoundError(f"{repo_id}/{filename} not found")
        target = Path(local_dir) / filename
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(tiny_model_dir / remote.dest, target)
        return str(target)

    real = fw.remotes

    def published_sizes(csm_repo: str = fw.CSM_REPO, parts=fw.PARTS) -> list[fw.Remote]:
        """The stand-in publishes the tiny files: their sizes are the ones to check."""
        return [replace(r, size=(tiny_model_dir / r.dest).stat().st_size) for r in real(csm_repo, parts)]

    monkeypatch.setattr(fw, "hf_hub_download", fake_download)
    monkeypatch.setattr(fw, "remotes", published_sizes)
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    return calls


def test_with_a_token_the_model_is_downloaded_to_the_volume_once(
        places: dict[str, Path], hub: list[str], tmp_path: Path) -> None:
    volume = tmp_path / "volume"
    volume.mkdir()
    settings = settings_for(places, model_dir=None, baked_dir=places["slim image"],
                            volume_dir=volume, hf_hub_cache=tmp_path / "no-cache",
                            download_cache=tmp_path / "cache")
    first = find_model(settings)
    assert (first.kind, first.origin, first.downloaded) == (
        "network volume", volume / "models" / REPO, True)
    # The CSM repo's files only: Mimi and SilentCipher come from the image.
    assert hub and all(call.startswith(f"{REPO}/") for call in hub)
    assert first.borrowed == IMAGE_PARTS
    load_engine(first, settings).close()
    # The next start finds it on the volume, with no hub call.
    hub.clear()
    second = find_model(settings)
    assert (second.kind, second.origin, second.downloaded, hub) == (
        "network volume", volume / "models" / REPO, False, [])


def test_without_a_volume_the_download_goes_to_the_local_cache(places: dict[str, Path],
                                                               hub: list[str], tmp_path: Path) -> None:
    settings = settings_for(places, model_dir=None, baked_dir=tmp_path / "no-image",
                            volume_dir=tmp_path / "no-volume", hf_hub_cache=tmp_path / "no-cache",
                            download_cache=tmp_path / "cache")
    source = find_model(settings)
    assert (source.kind, source.origin) == ("download cache", tmp_path / "cache" / "models" / REPO)
    # No image parts to borrow: the public repos are fetched too.
    assert {call.split("/")[0] for call in hub} == {"sesame", "kyutai", "sony"}
    assert source.borrowed == ()


def test_a_missing_model_dir_is_filled_when_a_token_is_set(places: dict[str, Path],
                                                           hub: list[str], tmp_path: Path) -> None:
    source = find_model(settings_for(places, model_dir=tmp_path / "models" / "csm-1b",
                                     baked_dir=places["slim image"]))
    assert (source.kind, source.downloaded) == ("CSM_MODEL_DIR", True)
    assert (tmp_path / "models" / "csm-1b" / "model.safetensors").is_file()


def test_a_failed_download_at_start_is_one_line(places: dict[str, Path], hub: list[str],
                                                tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def gated(**_: object) -> str:
        from huggingface_hub.errors import GatedRepoError
        raise GatedRepoError("403 Client Error: access to this repo is restricted")

    monkeypatch.setattr(fw, "hf_hub_download", gated)
    with pytest.raises(StartupError) as info:
        find_model(settings_for(places, model_dir=tmp_path / "m"))
    message = str(info.value)
    assert message.startswith(f"downloading sesame/csm-1b into {tmp_path / 'm'} failed")
    assert "accept the license" in message and "hf_test_token" not in message


def test_the_engine_reads_the_same_weights_from_every_layout(places: dict[str, Path],
                                                             tiny_model_dir: Path, no_token: None) -> None:
    """Links, snapshots and borrowed parts change nothing: same parameters as the plain folder."""
    plain = Engine.load(tiny_model_dir, device="cpu")
    cached = load_engine(find_model(settings_for(places, model_dir=None,
                                                 baked_dir=places["slim image"])),
                         settings_for(places))
    for (name, a), (_, b) in zip(plain.model.named_parameters(), cached.model.named_parameters()):
        assert a.equal(b), name
    plain.close()
    cached.close()
